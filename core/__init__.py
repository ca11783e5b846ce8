"""Shared domain of drscreen: settings, database, tables, repository, schemas, errors, task names.

Nothing in here imports FastAPI, Celery workers or torch.
"""
