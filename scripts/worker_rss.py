"""Resident memory of a scoring worker's pool child over its life, without the broker or the API.

    DRSCREEN_MODEL=drscreen-ensemble@1.0.0 python scripts/worker_rss.py [--photos 120] [--heatmaps 8]
        [--concurrency 2]

Runs in a temporary var folder (SQLite, store): the child's start-up (``worker_process_init``:
threads, ensemble), the real ``score_images`` over natural-colour photographs in tasks of
``score_chunk`` (24), then ``explain_image`` for a few of them (feature-map graphs, no torch), printing
VmRSS and the peak VmHWM after each phase. The ONNX files come from ``DRSCREEN_ONNX_CACHE``.
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_rss import PHOTOS, memory  # noqa: E402  (this folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--heatmaps", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2, help="of the worker (sets the threads)")
    args = parser.parse_args()
    var = tempfile.mkdtemp(prefix="drscreen-worker-rss-")
    os.environ["DRSCREEN_VAR_DIR"] = var
    os.environ.setdefault("DRSCREEN_LOG_LEVEL", "WARNING")
    try:
        run(args.photos, args.heatmaps, args.concurrency)
    finally:
        shutil.rmtree(var, ignore_errors=True)


def run(photos: int, heatmaps: int, concurrency: int) -> None:

    import workers.tasks  # noqa: F401  (everything a pool child has imported)
    from core import repository as repo
    from core.db import session_scope
    from core.migrate import upgrade
    from core.settings import get_settings
    from core.store import get_store
    from workers import app, explain, scoring
    from workers.settings import get_worker_settings

    memory("imports")
    upgrade(get_settings().database_url)
    app._concurrency = concurrency  # as celeryd_init notes it in the worker's parent
    app._init_child()
    memory("worker_process_init")
    store = get_store()
    ids: list[str] = []
    with session_scope() as session:
        clinic = repo.get_or_create_clinic(session, "RSS")
        for path in sorted(PHOTOS.glob("*.jpg"))[:photos]:
            patient_name, eye = path.stem.split("_")[:2]
            patient = repo.get_or_create_patient(session, clinic.id, patient_name)
            stored = store.put_bytes(path.read_bytes(), "jpg")
            image = repo.create_image(
                session,
                clinic_id=clinic.id,
                patient_id=patient.id,
                eye=eye,
                sha256=stored.sha256,
                stored_path=stored.relpath,
                size_bytes=stored.size_bytes,
                filename=path.name,
            )
            ids.append(image.id)
    chunk = get_worker_settings().score_chunk
    for start in range(0, len(ids), chunk):
        scoring.score_images(ids[start : start + chunk], explain=False, enqueue=lambda *_: None)
    memory(f"scored {len(ids)} (tasks of {chunk})")
    for image_id in ids[:heatmaps]:
        explain.explain_image(image_id)
    memory(f"then {heatmaps} heatmaps")


if __name__ == "__main__":
    main()
