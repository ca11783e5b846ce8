# syntax=docker/dockerfile:1.6
# Multi-stage build:
#   api    : the HTTP API, base dependencies only (no torch)
#   worker : Celery worker with torch, ONNX Runtime and OpenVINO (both images carry models/)
# The worker's torch wheel from PyPI is CUDA-enabled on linux/x86_64, so the same image uses a GPU
# when the host exposes one (see docker-compose.yml) and falls back to CPU otherwise.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRSCREEN_VAR_DIR=/var/lib/drscreen \
    DRSCREEN_STORE_DIR=/var/lib/drscreen/store
RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 curl postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 drscreen \
 && mkdir -p /var/lib/drscreen/store /var/lib/drscreen/onnx && chown -R drscreen /var/lib/drscreen
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY services ./services
COPY workers ./workers
COPY ml ./ml
COPY cli ./cli
COPY migrations ./migrations
# Both images: the API reads the released manifests and model cards (/readyz, /v1/models).
# owned by the service user: `drscreen export onnx` on a new CPU type writes the release's
# openvino-precisions.json there
COPY --chown=drscreen:drscreen models ./models
ENV DRSCREEN_MODELS_DIR=/app/models

# Editable installs: the code runs from /app, where alembic.ini, migrations/ and models/ are
# (a regular install would look for them next to the code in site-packages).
FROM base AS api
RUN pip install -e .
USER drscreen
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["drscreen", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN pip install torch==2.14.1 torchvision==0.29.1 \
 && pip install -e '.[ml]'
USER drscreen
CMD ["drscreen", "worker", "--concurrency", "1"]
