"""Patient identifiers and keys stay out of logs: database errors carry no statement parameters
(Celery logs a retried task's exception message), and the workers log ids only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import StatementError

from core.db import make_engine
from tests.unit.test_workers_scoring import PHOTOS, Sent, StubEnsemble, add_images
from workers import scoring

SECRET = "PATIENT-DOE-19310412"


def test_database_errors_do_not_show_parameters(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn, pytest.raises(StatementError) as info:
        conn.execute(text("INSERT INTO no_such_table (external_id) VALUES (:p)"), {"p": SECRET})
    assert SECRET not in str(info.value) and "no_such_table" in str(info.value)


def test_scoring_logs_ids_not_patients(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from core.migrate import upgrade
    from core.store import FileStore

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    store = FileStore(tmp_path / "store")
    good = (PHOTOS / "1012_left.jpg").read_bytes()
    files = [("1012_left.jpg", good, "left"), ("1012_right.jpg", good[: len(good) // 2], "right")]
    ids = add_images(url, store, SECRET, files)
    with caplog.at_level(logging.DEBUG):
        scoring.score_images(ids, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
        scoring.score_images(ids, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    text_out = caplog.text
    assert "score_images" in text_out
    assert SECRET not in text_out and "1012_" not in text_out
