"""The HTTP API (FastAPI). Imports ``core`` (and ``ml.imageio`` to validate uploads at the edge)."""
