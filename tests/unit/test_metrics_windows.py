"""The windowed counts behind two alerts (services.metrics.recent_counts): failures of the last hour
and gradings of the last 6 hours, counted in the database, so an erasure of old rows cannot hide
new failures or inflate the ungradable share (the review of the alert rules)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, Prediction, utcnow
from services.metrics import recent_counts
from tests.unit.test_workers_scoring import add_images, photo


def test_recent_failures_and_gradings_are_counted_over_their_windows(url: str) -> None:
    store = FileStore(get_settings().store_path)
    names = ["16_left.jpg", "16_right.jpg", "17_left.jpg", "17_right.jpg"]
    ids = add_images(url, store, "P1", [photo(n) for n in names])
    now = utcnow()
    with session_scope(url) as s:
        version = repo.get_or_create_model_version(s, "drscreen-ensemble@9.9.9")
        for image_id, grade, gradable in zip(ids, [0, 2, None, 0], [True, True, False, True], strict=True):
            repo.upsert_prediction(
                s, image_id=image_id, model_version_id=version.id, grade=grade, probabilities=None,
                members=None, referable=grade is None or grade >= 2, gradable=gradable,
            )  # fmt: skip
        s.execute(
            update(Prediction)
            .where(Prediction.image_id == ids[3])
            .values(created_at=now - timedelta(hours=7))
        )
        s.execute(update(Image).where(Image.id.in_(ids[:2])).values(status="failed", updated_at=now))
        s.execute(
            update(Image)
            .where(Image.id == ids[2])
            .values(status="failed", updated_at=now - timedelta(hours=2))
        )
    with session_scope(url) as s:
        failed, graded = recent_counts(s, utcnow())
    assert failed == 2  # the one that failed two hours ago is out of the window
    assert graded == {0: 1, 2: 1, None: 1}  # the grading of 7 hours ago is out of the window
