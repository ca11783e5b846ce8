"""Celery workers: the app, thin named tasks, and the plain functions they call.

Imports ``core`` and the serving side of ``ml`` (``ml.inference``, ``ml.quality``, ``ml.imageio``)
only; the API never imports this package (it enqueues by task name through ``core.producer``).
"""
