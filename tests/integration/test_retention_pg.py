"""Erasure and retention on real PostgreSQL: the SQLite tests of tests/unit/test_retention.py run
again here (each on a fresh database of its own: ``own_pg_url`` in tests/conftest.py), plus the
row locks that only PostgreSQL has: an erasure waits for a worker writing a heatmap of the
patient's photograph, and then erases that heatmap too."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import select

from core import repository as repo
from core import retention
from core.db import get_sessionmaker, session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Explanation, Image
from tests.conftest import PG_TEST_PREFIX
from tests.retention_world import TARGET, World, build, files_of
from tests.unit.test_retention import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    erase,
    test_a_failed_job_file_naming_the_patient_blocks_only_while_its_job_runs,
    test_a_failure_before_the_commit_changes_nothing,
    test_a_file_referenced_again_after_the_commit_stays,
    test_a_folder_job_file_with_the_erased_patients_bytes_keeps_them,
    test_a_folder_job_sent_before_an_erasure_does_not_bring_the_patient_back,
    test_a_forced_erasure_deletes_the_open_folder_job_it_empties,
    test_a_heatmap_drawn_again_for_the_erased_patients_bytes_is_in_the_store,
    test_a_heatmap_the_erased_patient_shared_is_in_the_store_after_scoring,
    test_a_photograph_sent_again_by_a_folder_job_restarts_the_purge_clock,
    test_a_resumed_folder_expansion_does_not_bring_an_erased_patient_back,
    test_an_upload_of_bytes_the_erased_patient_had_keeps_them_when_the_files_go_meanwhile,
    test_cli_erase_asks_then_erases,
    test_cli_failure_midway_removes_no_file,
    test_cli_purge_dry_run_then_real,
    test_cli_purge_refuses_a_period_beyond_the_calendar,
    test_delete_answers_409_while_scoring,
    test_delete_is_scoped_to_the_clinic,
    test_delete_that_fails_midway_leaves_everything,
    test_erase_deletes_the_patient_and_nothing_else,
    test_erase_refuses_while_a_photograph_is_being_scored,
    test_erasing_again_is_a_noop,
    test_explain_discards_the_heatmap_of_an_erased_photograph,
    test_purge_erases_patients_whose_newest_photograph_is_older,
    test_purge_leaves_patients_with_photographs_in_flight,
    test_scoring_skips_photographs_erased_while_graded,
)


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


@pytest.fixture
def store(url: str) -> FileStore:
    return FileStore(get_settings().store_path)


@pytest.fixture
def world(url: str, store: FileStore) -> World:
    return build(url, store)


def test_the_database_is_postgresql(world: World) -> None:
    assert world.url.startswith("postgresql+psycopg://") and f"/{PG_TEST_PREFIX}_" in world.url


def test_an_erasure_waits_for_a_heatmap_being_written_then_erases_it(world: World) -> None:
    """A worker holding an image's lock (workers.explain, via core.retention.lock_image) makes an
    erasure of the patient wait; the erasure then deletes the heatmap written meanwhile and
    counts its file. Without the lock the heatmap row would be cascaded away unseen, its file
    left in the store."""
    with session_scope(world.url) as s:
        image_id = s.scalars(
            select(Image.id).where(Image.patient_id == world.target, Image.gradable.is_(True))
        ).first()
        assert image_id is not None
    heatmap = world.store.put_bytes(os.urandom(64), "png")  # a new file only this row will name
    worker = get_sessionmaker(world.url)()
    try:
        assert retention.lock_image(worker, image_id)
        mv = repo.get_or_create_model_version(worker, "late-release@9.9.9")
        repo.upsert_explanation(
            worker,
            image_id=image_id,
            model_version_id=mv.id,
            sha256=heatmap.sha256,
            stored_path=heatmap.relpath,
        )
        expected = files_of(world.url, world.target) | {heatmap.relpath}
        result: dict[str, object] = {}
        eraser = threading.Thread(target=lambda: result.update(outcome=erase(world)[0]))
        eraser.start()
        time.sleep(1.0)
        assert eraser.is_alive(), "the erasure did not wait for the worker's lock"
        worker.commit()
    finally:
        worker.close()
    eraser.join(timeout=30)
    outcome = result["outcome"]
    assert isinstance(outcome, retention.Outcome)
    assert heatmap.relpath in outcome.files and set(outcome.files) == expected
    assert not world.store.exists(heatmap.relpath)
    with session_scope(world.url) as s:
        assert s.scalar(select(Explanation.id).where(Explanation.image_id == image_id)) is None
        assert repo.get_patient(s, world.north, TARGET) is None


def test_a_worker_after_the_erasure_finds_nothing_to_lock(world: World) -> None:
    with session_scope(world.url) as s:
        image_id = s.scalars(select(Image.id).where(Image.patient_id == world.target)).first()
        assert image_id is not None
    erase(world)
    with session_scope(world.url) as s:
        assert retention.lock_image(s, image_id) is False
