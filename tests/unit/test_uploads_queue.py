"""A clinic's upload is not graded after a whole folder job sent before it (embedded defaults:
SQLite, the file broker, a real ``drscreen worker`` with the dev ensemble).

Uploads and a folder job's chunks shared the one FIFO ``scoring`` queue: a photograph uploaded
15 s into a 3,000-photograph job waited until 2,976 of them were graded (the SQLite review of
session 32), ~17 minutes for a 30,000-photograph export at the shipped ensemble's speed. Uploads
have a queue of their own now, which the worker takes from in turn with ``scoring``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from core import producer, tasks
from core.db import session_scope
from core.settings import Settings, get_settings
from core.store import FileStore
from core.tables import Image, as_utc
from tests.conftest import WorkerProcess
from tests.unit.test_workers_scoring import add_images, photo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNKS, CHUNK = 8, 4


def test_workers_take_uploads_by_default() -> None:
    from cli import worker

    assert worker.WORKER_QUEUES == tasks.WORKER_QUEUES
    assert tasks.QUEUE_UPLOADS in tasks.WORKER_QUEUES.split(",")


def test_an_upload_is_graded_in_turn_with_a_folder_jobs_chunks(
    url: str, isolated_settings: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    store = FileStore(get_settings().store_path)
    chunks = [
        add_images(url, store, f"JOB-{c}-{i}", [photo("1012_left.jpg")])
        for c in range(CHUNKS)
        for i in range(CHUNK)
    ]
    job_ids = [ids[0] for ids in chunks]
    [upload] = add_images(url, store, "CHAIR-1", [photo("1017_left.jpg")])
    app = producer.make_producer_app(Settings())
    # queued before any worker runs: the job's chunks first, as its expansion sends them, then
    # the clinic's upload, as the API sends it
    for c in range(CHUNKS):
        producer.send(tasks.SCORE_IMAGES, [job_ids[c * CHUNK : (c + 1) * CHUNK]], {"explain": False}, app=app)
    producer.send_score_images([upload], app=app)
    worker = start_worker(
        env={
            "DRSCREEN_VAR_DIR": str(isolated_settings),
            "DRSCREEN_STORE_DIR": str(store.root),
            "DRSCREEN_MODEL": "drscreen-dev@0.1.0",
            "DRSCREEN_MODELS_DIR": os.environ.get("DRSCREEN_TEST_MODELS_DIR") or str(REPO_ROOT / "models"),
            "DRSCREEN_TORCH_THREADS": "1",
            "DRSCREEN_SWEEP_INTERVAL_S": "0",
            "DRSCREEN_EXPLAIN": "false",
            "OMP_NUM_THREADS": "1",
        },
        ready_timeout=240,
    )
    every = [*job_ids, upload]
    deadline = time.monotonic() + 400
    while True:
        with session_scope(url) as s:
            finished = dict(
                s.execute(
                    select(Image.id, Image.finished_at).where(Image.id.in_(every), Image.status == "done")
                ).all()
            )
        if len(finished) == len(every):
            break
        assert time.monotonic() < deadline, f"not all graded:\n{worker.output()[-3000:]}"
        time.sleep(0.5)
    graded_before = sum(1 for i in job_ids if as_utc(finished[i]) < as_utc(finished[upload]))
    print(f"job photographs graded before the upload: {graded_before} of {len(job_ids)}")
    # in turn: at most the chunk taken before it (and one more, whichever queue comes first)
    assert graded_before <= 2 * CHUNK, graded_before
