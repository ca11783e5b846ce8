"""Erasure and retention (core.retention, ``drscreen data``, ``DELETE /v1/patients/{id}``) on
SQLite. The world and the independent checks are in tests/retention_world.py; the same runs on
PostgreSQL in tests/integration/test_retention_pg.py."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, insert, select, update
from typer.testing import CliRunner

from cli.main import app as cli_app
from core import deployment_key, retention, tasks
from core import repository as repo
from core.db import get_sessionmaker, session_scope
from core.errors import Conflict
from core.settings import get_settings
from core.store import FileStore
from core.tables import AuditEvent, Explanation, Image, Patient, ScoringJob, ScoringJobItem, utcnow
from services.routes import images as image_routes
from tests.api_support import make_key
from tests.retention_world import (
    KEEP,
    NORTH,
    SOUTH,
    TARGET,
    World,
    age,
    assert_only_patient_gone,
    audit_rows,
    build,
    dump,
    files,
    files_of,
    owned_by,
    shared_files_of,
)
from tests.unit.test_workers_scoring import PHOTOS, Sent, StubEnsemble, add_images, photo
from workers import explain as explain_mod
from workers import folders, scoring

runner = CliRunner()


@pytest.fixture
def store(url: str) -> FileStore:
    return FileStore(get_settings().store_path)


@pytest.fixture
def world(url: str, store: FileStore) -> World:
    return build(url, store)


def erase(world: World, external_id: str = TARGET, **kwargs: Any) -> tuple[retention.Outcome, int]:
    """Erase as the API and the CLI do: commit, then remove the files."""
    with session_scope(world.url) as s:
        out = retention.erase_patient(s, world.north, external_id, **kwargs)
    with session_scope(world.url) as s:
        removed = retention.remove_unreferenced_files(s, world.store, out.files)
    return out, removed


def new_photo(world: World, patient: str, name: str = "1012_left.jpg", clinic: str = NORTH) -> str:
    [image_id] = add_images(world.url, world.store, patient, [(name, (PHOTOS / name).read_bytes(), "left")],
                            clinic=clinic)  # fmt: skip
    return image_id


def count_rows(url: str, model: Any, *where: Any) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


# ------------------------------------------------------------------------------------- erasure


def test_erase_deletes_the_patient_and_nothing_else(world: World) -> None:
    gone = owned_by(world.url, world.target)
    unique, shared = files_of(world.url, world.target), shared_files_of(world.url, world.target)
    assert unique and shared  # the world has files of both kinds
    before, stored = dump(world.url), files(world.store)

    out, removed = erase(world)

    after = dump(world.url)
    assert_only_patient_gone(before, after, gone)
    for table, keys in gone.items():
        assert out.rows[table] == len(keys), table
    assert out.found and out.in_flight == 0
    # the job of the target's photograph only is gone; the one shared with KEEP-2 is recounted
    assert out.rows["scoring_job"] == 1
    assert set(after["scoring_job"]) == set(before["scoring_job"]) - {(world.target_job,)}
    with session_scope(world.url) as s:
        job = repo.get_job(s, world.job)
        assert job is not None and (job.total, job.done, job.failed) == (1, 1, 0)
    # files: the target's own are removed; those other rows share (KEEP-2's, South's) stay
    assert removed == len(unique) and sorted(out.files) == sorted(unique)
    assert files(world.store) == stored - unique
    # the audit: counts and a digest of the patient id, never the id; earlier reads unlinked
    [event] = audit_rows(world.url, "patient.erase")
    assert event.clinic_id == world.north and event.patient_id is None and event.api_key_id is None
    assert event.detail is not None and event.detail["rows"] == out.rows
    key = deployment_key.deployment_key(world.store.root)
    plain = hashlib.sha256(TARGET.encode()).hexdigest()
    assert event.detail["patient_hmac"] == hmac.new(key, plain.encode(), hashlib.sha256).hexdigest()
    assert plain not in json.dumps(event.detail), "a plain digest of a guessable id is reversible"
    assert event.detail["files"] == len(unique) and event.detail["forced"] is False
    assert TARGET not in json.dumps(event.detail)
    reads = audit_rows(world.url, "patient.read")
    assert sorted(r.patient_id or 0 for r in reads) == [0, world.south_target]


def test_erasing_again_is_a_noop(world: World) -> None:
    erase(world)
    before, stored = dump(world.url), files(world.store)
    out, removed = erase(world)
    assert not out.found and out.total_rows == 0 and removed == 0 and out.files == []
    assert dump(world.url) == before and files(world.store) == stored
    assert len(audit_rows(world.url, "patient.erase")) == 1


def test_erase_refuses_while_a_photograph_is_being_scored(world: World) -> None:
    images = len(owned_by(world.url, world.target)["image"])
    queued = new_photo(world, TARGET)
    before, stored = dump(world.url), files(world.store)
    with pytest.raises(Conflict, match="still being scored"):
        erase(world)
    assert dump(world.url) == before and files(world.store) == stored
    with session_scope(world.url) as s:  # running counts too
        s.execute(update(Image).where(Image.id == queued).values(status="running"))
    with pytest.raises(Conflict):
        erase(world)

    out, _ = erase(world, force=True)
    assert out.in_flight == 1 and out.rows["image"] == images + 1
    assert count_rows(world.url, Image, Image.id == queued) == 0
    [event] = audit_rows(world.url, "patient.erase")
    assert event.detail is not None and event.detail["forced"] is True


def test_a_failed_job_file_naming_the_patient_blocks_only_while_its_job_runs(world: World) -> None:
    with session_scope(world.url) as s:
        job = repo.create_job(s, world.north, "/exports/north-3")
        job.status = "running"
        repo.add_job_items(s, job.id, [repo.JobItemSpec("ERASE-1_left.jpg", TARGET, "left")])
        job_id = job.id
    with pytest.raises(Conflict):
        erase(world)
    with session_scope(world.url) as s:
        s.execute(update(ScoringJob).where(ScoringJob.id == job_id).values(status="failed"))
    out, _ = erase(world)
    assert out.rows["scoring_job"] == 2  # that job too: finished, and its only file named the patient


def test_a_file_referenced_again_after_the_commit_stays(world: World) -> None:
    """The store deduplicates: an upload of the same bytes between the erasure's commit and the
    removal of its files (another patient's, another clinic's) keeps the file."""
    unique = sorted(files_of(world.url, world.target))
    with session_scope(world.url) as s:
        out = retention.erase_patient(s, world.north, TARGET)
    with session_scope(world.url) as s:
        photo = next(p for p in out.files if not p.endswith(".png"))
        sha = photo.rsplit("/", 1)[-1].split(".")[0]
        repo.create_image(s, clinic_id=world.south, patient_id=world.south_target, eye="left",
                          sha256=sha, stored_path=photo, size_bytes=1)  # fmt: skip
    with session_scope(world.url) as s:
        removed = retention.remove_unreferenced_files(s, world.store, out.files)
    assert sorted(out.files) == unique and removed == len(unique) - 1
    assert world.store.exists(photo)


@pytest.mark.parametrize("step", ["_settle_jobs", "_audit", "_remove"])
def test_a_failure_before_the_commit_changes_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    before, stored = dump(world.url), files(world.store)
    real = getattr(retention, step)
    calls = {"n": 0}

    def fails_later(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= 3 or step != "_remove":  # _remove: after two tables were deleted
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(retention, step, fails_later)
    with pytest.raises(RuntimeError, match="disk on fire"):
        erase(world)
    assert dump(world.url) == before and files(world.store) == stored


# --------------------------------------------------------------------------------------- purge


def purge(url: str, store: FileStore, days: float, clinic_id: int | None) -> tuple[retention.Outcome, int]:
    cutoff = utcnow() - timedelta(days=days)
    with session_scope(url) as s:
        out = retention.purge_before(s, cutoff, clinic_id)
    with session_scope(url) as s:
        return out, retention.remove_unreferenced_files(s, store, out.files)


def dry_purge(url: str, days: float, clinic_id: int | None) -> retention.Outcome:
    session = get_sessionmaker(url)()
    try:
        return retention.purge_before(session, utcnow() - timedelta(days=days), clinic_id)
    finally:
        session.rollback()
        session.close()


def test_purge_erases_patients_whose_newest_photograph_is_older(world: World) -> None:
    for patient in (world.target, world.keep, world.south_target):
        age(world.url, patient, days=400)
    back = new_photo(world, KEEP)  # KEEP-2 came back: keeps every photograph, the old ones too
    with session_scope(world.url) as s:  # scored (not in flight: the rule alone keeps KEEP-2)
        s.execute(update(Image).where(Image.id == back).values(status="done"))
    with session_scope(world.url) as s:
        old = repo.create_job(s, world.north, "/exports/empty")  # finished, nothing in it
        old.status, old.created_at = "done", utcnow() - timedelta(days=500)
        old_id = old.id
        recent = repo.create_job(s, world.north, "/exports/empty-too")
        recent.status = "done"
    gone = owned_by(world.url, world.target)
    unique = files_of(world.url, world.target)
    before, stored = dump(world.url), files(world.store)

    preview = dry_purge(world.url, 365, world.north)
    assert dump(world.url) == before  # the dry run was rolled back
    out, removed = purge(world.url, world.store, 365, world.north)

    assert (out.rows, sorted(out.files)) == (preview.rows, sorted(preview.files))
    assert out.skipped_patients == 0
    after = dump(world.url)
    assert_only_patient_gone(before, after, gone)
    assert out.rows["patient"] == 1 and out.rows["image"] == len(gone["image"])
    assert out.rows["scoring_job"] == 2  # the target's only job, and the old empty one
    assert set(before["scoring_job"]) - set(after["scoring_job"]) == {(world.target_job,), (old_id,)}
    assert removed == len(unique) and files(world.store) == stored - unique
    [event] = audit_rows(world.url, "data.purge")
    assert event.clinic_id == world.north and event.detail is not None
    assert event.detail["rows"] == out.rows and event.detail["cutoff"].startswith(
        str((utcnow() - timedelta(days=365)).date())
    )

    # every clinic: South's old patient goes too; KEEP-2 still stays
    out, _ = purge(world.url, world.store, 365, None)
    assert out.rows["patient"] == 1
    with session_scope(world.url) as s:
        assert repo.get_patient(s, world.south, TARGET) is None
        assert repo.get_patient(s, world.north, KEEP) is not None
    assert count_rows(world.url, Image, Image.patient_id == world.keep) == 3
    # and again: nothing left to purge, still audited
    out, removed = purge(world.url, world.store, 365, None)
    assert out.total_rows == 0 and removed == 0
    assert len(audit_rows(world.url, "data.purge")) == 3


def test_purge_erases_a_patient_with_no_photograph_created_before_the_cutoff(world: World) -> None:
    """The session-31 mutation review: ``_purgeable``'s rule for a patient with no photograph (its
    row's creation date is the clock) was in no test. Never purged, such a patient's id (the
    clinic's identifier of a person) would be kept past the retention period for good."""
    with session_scope(world.url) as s:
        old = repo.get_or_create_patient(s, world.north, "NO-PHOTO-OLD")
        old.created_at = utcnow() - timedelta(days=400)
        old_id = old.id
        new_id = repo.get_or_create_patient(s, world.north, "NO-PHOTO-NEW").id
    out, _ = purge(world.url, world.store, 365, world.north)
    assert out.rows["patient"] == 1 and out.skipped_patients == 0
    with session_scope(world.url) as s:
        assert s.get(Patient, old_id) is None
        assert s.get(Patient, new_id) is not None
        assert repo.get_patient(s, world.north, TARGET) is not None  # photographs sent today: kept


def test_purge_leaves_patients_with_photographs_in_flight(world: World) -> None:
    age(world.url, world.target, days=400)
    with session_scope(world.url) as s:  # a photograph stuck in the queue for 400 days
        first = s.scalars(select(Image.id).where(Image.patient_id == world.target)).first()
        s.execute(update(Image).where(Image.id == first).values(status="queued"))
    before = dump(world.url)
    out, _ = purge(world.url, world.store, 365, None)
    assert out.skipped_patients == 1 and out.rows["patient"] == 0
    assert before["image"] == dump(world.url)["image"]


def test_a_photograph_sent_again_by_a_folder_job_restarts_the_purge_clock(world: World, roots: Path) -> None:
    """A folder job that sends a patient's old photograph again links it to the existing row (one
    photograph, scored once): the purge read only the row's first upload date, and erased a
    patient screened again today."""
    age(world.url, world.target, days=400)
    with session_scope(world.url) as s:
        eye, path = s.execute(
            select(Image.eye, Image.stored_path)
            .where(Image.patient_id == world.target, Image.status == "done", Image.clinic_id == world.north)
            .limit(1)
        ).one()
    images = count_rows(world.url, Image)
    job = _new_job(world, _folder(roots, "north", {f"{TARGET}_{eye}.jpg": world.store.read_bytes(path)}))
    folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=Sent())
    with session_scope(world.url) as s:
        [item] = repo.job_items(s, job)
        reused = repo.get_image(s, item.image_id or "")
        assert reused is not None and reused.patient_id == world.target
    assert count_rows(world.url, Image) == images  # the row was reused, not copied
    scoring.score_images(
        [reused.id], ensemble=StubEnsemble(), store=world.store, db_url=world.url, enqueue=Sent()
    )
    with session_scope(world.url) as s:  # scored: not in flight, so the clock alone keeps the patient
        assert s.scalar(select(Image.status).where(Image.id == reused.id)) == "done"

    out, _ = purge(world.url, world.store, 365, world.north)
    assert out.skipped_patients == 0 and out.rows["patient"] == 0
    with session_scope(world.url) as s:
        assert repo.get_patient(s, world.north, TARGET) is not None
    # a year after the job, the patient goes
    age(world.url, world.target, days=400)
    out, _ = purge(world.url, world.store, 365, world.north)
    assert out.rows["patient"] == 1


# ----------------------------------------------------------------------------------------- API


def test_delete_is_scoped_to_the_clinic(client: TestClient, world: World) -> None:
    north, south = make_key(world.url, NORTH), make_key(world.url, SOUTH)
    gone = owned_by(world.url, world.target)
    before, stored = dump(world.url), files(world.store)
    assert client.delete(f"/v1/patients/{KEEP}").status_code == 401
    # South has no KEEP-2: 404, as GET answers; North's KEEP-2 is untouched
    resp = client.delete(f"/v1/patients/{KEEP}", headers=south.headers)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    assert_only_patient_gone(before, dump(world.url), {}) and files(world.store) == stored

    resp = client.delete(f"/v1/patients/{TARGET}", headers=north.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["patient_id"] == TARGET
    assert {t: body["rows"][t] for t in gone} == {t: len(k) for t, k in gone.items()}
    assert body["files"] == len(stored - files(world.store)) > 0
    assert_only_patient_gone(before, dump(world.url), gone)
    assert client.get(f"/v1/patients/{TARGET}", headers=north.headers).status_code == 404
    assert client.get(f"/v1/patients/{TARGET}", headers=south.headers).status_code == 200  # South's own
    assert client.delete(f"/v1/patients/{TARGET}", headers=north.headers).status_code == 404
    [event] = audit_rows(world.url, "patient.erase")
    assert event.api_key_id == north.key_id and event.detail is not None and event.detail["by"] == "api"


def test_delete_answers_409_while_scoring(client: TestClient, world: World) -> None:
    north = make_key(world.url, NORTH)
    new_photo(world, KEEP)
    resp = client.delete(f"/v1/patients/{KEEP}", headers=north.headers)
    assert resp.status_code == 409 and "still being scored" in resp.json()["detail"]
    assert count_rows(world.url, Patient, Patient.id == world.keep) == 1


def test_delete_that_fails_midway_leaves_everything(
    client: TestClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    north = make_key(world.url, NORTH)
    before, stored = dump(world.url), files(world.store)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(retention, "_audit", broken)
    with pytest.raises(RuntimeError):
        client.delete(f"/v1/patients/{TARGET}", headers=north.headers)
    assert_only_patient_gone(before, dump(world.url), {})
    assert files(world.store) == stored


def test_openapi_documents_the_delete(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/patients/{patient_id}"]["delete"]
    assert {"200", "401", "404", "409", "503"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PatientErasure"
    }


# ------------------------------------------------------------------------------------- workers


class ErasingEnsemble(StubEnsemble):
    """Erases a patient (forced) the moment the model runs: the worker is between claim and write."""

    def __init__(self, erase_now: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.erase_now = erase_now

    def predict(self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None) -> Any:
        self.erase_now()
        return super().predict(images, heatmaps)

    def explain(self, image: np.ndarray) -> np.ndarray:
        self.erase_now()
        return super().explain(image)


def test_scoring_skips_photographs_erased_while_graded(world: World) -> None:
    ids = [new_photo(world, KEEP), new_photo(world, "OTHER-3", "1017_left.jpg")]
    ens = ErasingEnsemble(lambda: erase(world, KEEP, force=True))
    summary = scoring.score_images(ids, ensemble=ens, store=world.store, db_url=world.url, enqueue=Sent())
    assert ids[0] in summary.skipped and ids[1] in summary.scored + summary.ungradable
    assert count_rows(world.url, Patient, Patient.id == world.keep) == 0
    with session_scope(world.url) as s:  # the other patient's result was written as usual
        other = repo.get_patient(s, world.north, "OTHER-3")
        assert other is not None and repo.get_current_patient_result(s, other.id) is not None


def test_scoring_discards_the_heatmap_drawn_for_a_photograph_erased_meanwhile(world: World) -> None:
    """`data erase --force` between the claim and the write: the heatmap drawn in the grading pass
    had no row left to record it and stayed in the store, pointed at by nothing."""
    ids = [new_photo(world, KEEP), new_photo(world, "OTHER-3", "1017_left.jpg")]
    before = files(world.store)
    ens = ErasingEnsemble(lambda: erase(world, KEEP, force=True), maps_in_pass=True)
    summary = scoring.score_images(
        ids, explain=True, ensemble=ens, store=world.store, db_url=world.url, enqueue=Sent()
    )
    assert ids[0] in summary.skipped and summary.explained == [ids[1]], summary
    with session_scope(world.url) as s:
        recorded = set(s.scalars(select(Explanation.stored_path)))
        photos = set(s.scalars(select(Image.stored_path)))
    # every file in the store is a photograph or a recorded heatmap: nothing orphaned
    assert files(world.store) <= recorded | photos | before, files(world.store) - recorded - photos - before


def test_explain_discards_the_heatmap_of_an_erased_photograph(world: World) -> None:
    with session_scope(world.url) as s:
        image_id = s.scalars(
            select(Image.id).where(Image.patient_id == world.keep, Image.gradable.is_(True))
        ).first()
        assert image_id is not None
        s.execute(delete(Explanation).where(Explanation.image_id == image_id))
    stored = files(world.store)
    ens = ErasingEnsemble(lambda: erase(world, KEEP))
    assert explain_mod.explain_image(image_id, ensemble=ens, store=world.store, db_url=world.url) is None
    assert files(world.store) <= stored  # the heatmap drawn meanwhile did not stay
    assert count_rows(world.url, Explanation, Explanation.image_id == image_id) == 0


# ----------------------------------------------------------------------------------------- CLI


def test_cli_refuses_bad_input_in_one_line(world: World) -> None:
    cases = [
        (["data", "erase", "--clinic", "Nowhere", TARGET, "--yes"], "no clinic 'Nowhere'"),
        (["data", "erase", "--clinic", NORTH, "../etc", "--yes"], "is not a patient id"),
        (["data", "purge", "--older-than", "0", "--yes"], "at least 1 day"),
        (["data", "purge", "--older-than", "30", "--clinic", "Nowhere"], "no clinic 'Nowhere'"),
    ]
    for argv, message in cases:
        result = runner.invoke(cli_app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_cli_erase_asks_then_erases(world: World) -> None:
    gone = owned_by(world.url, world.target)
    before = dump(world.url)
    result = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, TARGET], input="n\n")
    assert result.exit_code == 1 and "nothing erased" in result.output
    assert dump(world.url) == before  # the preview was rolled back (its audit row too)
    # the clinic as typed with stray spaces: names are stored trimmed (`keys create`), and found so
    result = runner.invoke(cli_app, ["data", "erase", "--clinic", f" {NORTH} ", TARGET], input="y\n")
    assert result.exit_code == 0, result.output
    assert "erased patient" in result.output and _printed(result.output)["image"] == len(gone["image"])
    assert_only_patient_gone(before, dump(world.url), gone)
    [event] = audit_rows(world.url, "patient.erase")
    assert event.detail is not None and str(event.detail["by"]).startswith("cli")
    again = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, TARGET, "--yes"])
    assert again.exit_code == 0 and "nothing to erase" in again.output


def test_cli_erase_of_a_patient_being_scored(world: World) -> None:
    new_photo(world, KEEP)
    result = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, KEEP, "--yes"])
    assert result.exit_code == 1 and "add --force" in result.output
    assert count_rows(world.url, Patient, Patient.id == world.keep) == 1
    result = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, KEEP, "--yes", "--force"])
    assert result.exit_code == 0, result.output
    assert count_rows(world.url, Patient, Patient.id == world.keep) == 0


def _printed(output: str) -> dict[str, int]:
    counts = {}
    for line in output.splitlines():
        parts = line.rsplit(None, 1)
        if line.startswith("  ") and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0].strip()] = int(parts[1])
    return counts


def test_cli_purge_dry_run_then_real(world: World) -> None:
    age(world.url, world.target, days=40)
    gone = owned_by(world.url, world.target)
    before, stored = dump(world.url), files(world.store)
    dry = runner.invoke(cli_app, ["data", "purge", "--older-than", "30", "--clinic", NORTH, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dump(world.url) == before and files(world.store) == stored
    would = _printed(dry.output)
    assert would["patient"] == 1 and would["image"] == len(gone["image"])

    real = runner.invoke(cli_app, ["data", "purge", "--older-than", "30", "--yes"])
    assert real.exit_code == 0, real.output
    done = _printed(real.output)
    assert {t: done[t] for t in retention.TABLES} == {t: would[t] for t in retention.TABLES}
    assert done["files removed"] == would["stored files"] == len(stored - files(world.store)) > 0
    assert_only_patient_gone(before, dump(world.url), gone)


def test_cli_previews_hold_no_write_lock_on_sqlite(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preview makes the real purge or erasure and rolls it back; on SQLite it held the
    database's one write lock all along (a purge preview of 2,600 patients: 4.5 s of uploads and
    worker writes waiting; the SQLite review of session 32). It runs on a snapshot now: the live
    database's write lock is free while it runs, and nothing changes, no copy is left behind."""
    from sqlalchemy.engine import make_url

    from tests.unit.test_sqlite_reads_hold_no_lock import write_lock_free

    age(world.url, world.target, days=40)
    before, stored = dump(world.url), files(world.store)
    live = make_url(world.url).database
    assert live
    free: list[bool] = []

    def probed(real: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            outcome = real(*args, **kwargs)  # its rows deleted, not rolled back yet
            free.append(write_lock_free(live))
            return outcome

        return run

    monkeypatch.setattr(retention, "purge_before", probed(retention.purge_before))
    monkeypatch.setattr(retention, "erase_patient", probed(retention.erase_patient))
    dry = runner.invoke(cli_app, ["data", "purge", "--older-than", "30", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert _printed(dry.output)["patient"] == 1
    asked = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, KEEP], input="n\n")
    assert asked.exit_code == 1 and "nothing erased" in asked.output, asked.output
    assert free == [True, True], "a preview held the live database's write lock"
    assert dump(world.url) == before and files(world.store) == stored
    assert not list(Path(live).parent.glob(".drscreen-preview-*"))


def test_cli_failure_midway_removes_no_file(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    before, stored = dump(world.url), files(world.store)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(retention, "_audit", broken)
    result = runner.invoke(cli_app, ["data", "erase", "--clinic", NORTH, TARGET, "--yes"])
    assert isinstance(result.exception, RuntimeError)
    assert dump(world.url) == before and files(world.store) == stored


# ------------------------------------------------------------- review: writers of the same bytes
#
# The store keeps identical bytes once. A writer (an upload, a folder job, a heatmap) that finds
# its bytes already stored writes nothing, and its row commits a moment later: a removal of the
# erased patient's files in between found no row referencing the file and deleted it, and the
# writer's row then named a file that was gone (another patient's or clinic's photograph lost).


def _unique_graded_photo(world: World) -> tuple[str, bytes]:
    """A photograph of the target with a heatmap, neither shared by another row: (path, bytes)."""
    unique = files_of(world.url, world.target)
    with session_scope(world.url) as s:
        rows = s.execute(
            select(Image.stored_path, Explanation.stored_path)
            .join(Explanation, Explanation.image_id == Image.id)
            .where(Image.patient_id == world.target)
        ).all()
    path = next(p for p, heatmap in sorted(rows) if p in unique and heatmap in unique)
    return path, world.store.read_bytes(path)


def test_an_upload_of_bytes_the_erased_patient_had_keeps_them_when_the_files_go_meanwhile(
    client: TestClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    south = make_key(world.url, SOUTH)
    path, data = _unique_graded_photo(world)
    with session_scope(world.url) as s:
        out = retention.erase_patient(s, world.north, TARGET)
    assert path in out.files
    real = image_routes.record_photo

    def files_removed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        row = real(*args, **kwargs)  # the upload's row is written, not committed yet
        with session_scope(world.url) as s:
            retention.remove_unreferenced_files(s, world.store, out.files)
        return row

    monkeypatch.setattr(image_routes, "record_photo", files_removed_meanwhile)
    resp = client.post(
        "/v1/images",
        headers=south.headers,
        data={"patient_id": "NEW-7", "eye": "right"},
        files={"file": ("x.jpg", data, "image/jpeg")},
    )
    assert resp.status_code == 202, resp.text
    with session_scope(world.url) as s:
        image = repo.get_image(s, resp.json()["id"])
        assert image is not None and image.stored_path == path
    assert world.store.exists(path), "the upload's photograph is gone from the store"
    assert not any(world.store.exists(p) for p in out.files if p != path)


def test_a_heatmap_the_erased_patient_shared_is_in_the_store_after_scoring(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = _unique_graded_photo(world)
    [other] = add_images(world.url, world.store, "OTHER-4", [("o.jpg", data, "right")], clinic=NORTH)
    real = scoring._write

    def erased_meanwhile(*args: Any, **kwargs: Any) -> Any:
        erase(world)  # after the heatmap was stored (it already was: the target's), before its row
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_write", erased_meanwhile)
    ens, sent = StubEnsemble(maps_in_pass=True), Sent()
    summary = scoring.score_images(
        [other], explain=True, ensemble=ens, store=world.store, db_url=world.url, enqueue=sent
    )
    assert summary.scored + summary.ungradable == [other]
    for name, args, _ in sent:  # what the worker queued, run
        if name == tasks.EXPLAIN_IMAGE:
            explain_mod.explain_image(args[0], ensemble=ens, store=world.store, db_url=world.url)
    with session_scope(world.url) as s:
        row = repo.get_explanation(s, other)
        assert row is not None
    assert world.store.exists(row.stored_path), "the heatmap recorded for OTHER-4 is not in the store"


def test_a_heatmap_drawn_again_for_the_erased_patients_bytes_is_in_the_store(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = _unique_graded_photo(world)
    [other] = add_images(world.url, world.store, "OTHER-4", [("o.jpg", data, "right")], clinic=NORTH)
    ens = StubEnsemble()  # heatmaps left to the explain task
    scoring.score_images(
        [other], explain=True, ensemble=ens, store=world.store, db_url=world.url, enqueue=Sent()
    )
    real = retention.lock_image

    def erased_meanwhile(session: Any, image_id: str) -> bool:
        erase(world)  # the heatmap is stored (already was), its row not written yet
        return real(session, image_id)

    monkeypatch.setattr(retention, "lock_image", erased_meanwhile)
    relpath = explain_mod.explain_image(other, ensemble=ens, store=world.store, db_url=world.url)
    assert relpath is not None and world.store.exists(relpath)


def _folder(roots: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = roots / name
    folder.mkdir()
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    return folder


def _new_job(world: World, folder: Path | str, status: str = "queued") -> str:
    with session_scope(world.url) as s:
        job = repo.create_job(s, world.north, str(folder))
        job.status = status
        return job.id


def test_a_folder_job_file_with_the_erased_patients_bytes_keeps_them(
    world: World, roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _unique_graded_photo(world)
    job = _new_job(world, _folder(roots, "north", {"51_right.jpg": data}))
    with session_scope(world.url) as s:
        out = retention.erase_patient(s, world.north, TARGET)
    real = folders.ingest_item

    def files_removed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        image_id = real(*args, **kwargs)  # its row written, not committed yet
        with session_scope(world.url) as s:
            retention.remove_unreferenced_files(s, world.store, out.files)
        return image_id

    monkeypatch.setattr(folders, "ingest_item", files_removed_meanwhile)
    folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=Sent())
    with session_scope(world.url) as s:
        [item] = repo.job_items(s, job)
        image = repo.get_image(s, item.image_id or "")
        assert image is not None and image.stored_path == path
    assert world.store.exists(path), "the folder job's photograph is gone from the store"


# --------------------------------------------------------------- review: folder jobs bring back


class _Stopped(Exception):
    pass


def _stop(*args: Any) -> None:
    raise _Stopped("the expansion stopped here (a time limit, a worker gone)")


def _named(world: World, job: str) -> set[str | None]:
    with session_scope(world.url) as s:
        return {i.patient_external_id for i in repo.job_items(s, job)}


def test_a_resumed_folder_expansion_does_not_bring_an_erased_patient_back(world: World, roots: Path) -> None:
    """An expansion stopped after its first chunk (31's file stored and scored; 32's pending) is
    resumed later (the sweep re-sends it): it planned the folder again and re-added every file
    missing from the job, so the files of 31, erased meanwhile, came back with the patient."""
    folder = _folder(
        roots, "north", {"31_left.jpg": PHOTOS.joinpath("16_left.jpg").read_bytes(),
                         "32_left.jpg": PHOTOS.joinpath("17_left.jpg").read_bytes()},
    )  # fmt: skip
    job = _new_job(world, folder)
    with pytest.raises(_Stopped):
        folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=_stop, chunk=1)
    with session_scope(world.url) as s:
        patient = repo.get_patient(s, world.north, "31")
        assert patient is not None
        ids = [i.id for i in repo.list_patient_images(s, patient.id)]
    scoring.score_images(ids, ensemble=StubEnsemble(), store=world.store, db_url=world.url, enqueue=Sent())
    out, _ = erase(world, "31")  # nothing of 31's in flight: allowed
    assert out.found and out.rows["scoring_job_item"] == 1

    folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=Sent(), chunk=1)
    with session_scope(world.url) as s:
        assert repo.get_patient(s, world.north, "31") is None, "the erased patient is back"
        assert repo.get_patient(s, world.north, "32") is not None
    assert _named(world, job) == {"32"}


def test_a_folder_job_sent_before_an_erasure_does_not_bring_the_patient_back(
    world: World, roots: Path
) -> None:
    """The job was accepted, its folder not read yet (no file in the job: nothing in flight), when
    patient 33 was erased; its expansion then stored 33's photographs as a new record. A patient
    erased *before* the job was sent (34) is a new record of the folder's photographs, as an upload."""
    first, second = PHOTOS.joinpath("16_left.jpg").read_bytes(), PHOTOS.joinpath("17_left.jpg").read_bytes()
    add_images(world.url, world.store, "34", [("a.jpg", first, "left")], clinic=NORTH)
    erase(world, "34", force=True)
    add_images(world.url, world.store, "33", [("b.jpg", second, "left")], clinic=NORTH)
    with session_scope(world.url) as s:
        s.execute(update(Image).where(Image.stored_path.is_not(None)).values(status="done"))
    job = _new_job(world, _folder(roots, "north", {"33_left.jpg": second, "34_left.jpg": first}))
    out, _ = erase(world, "33")
    assert out.found and out.in_flight == 0

    folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=Sent())
    with session_scope(world.url) as s:
        assert repo.get_patient(s, world.north, "33") is None, "the erased patient is back"
        assert repo.get_patient(s, world.north, "34") is not None
    assert _named(world, job) == {"34"}


def _audited_as_before_the_key(world: World, external_id: str) -> str:
    """Rewrite the newest erasure's audit row as the previous version wrote it (plain sha256)."""
    plain = hashlib.sha256(external_id.encode()).hexdigest()
    with session_scope(world.url) as s:
        event = audit_rows(world.url, "patient.erase")[-1]
        row = s.get(AuditEvent, event.id)
        assert row is not None and row.detail is not None
        kept = {k: v for k, v in row.detail.items() if k not in ("patient_hmac", "key_id")}
        row.detail = kept | {"patient_sha256": plain}
    return plain


def _job_of_one_erased_patient(world: World, roots: Path, patient: str) -> str:
    """A folder job sent while ``patient``'s photograph was there; the patient erased since."""
    second = PHOTOS.joinpath("17_left.jpg").read_bytes()
    add_images(world.url, world.store, patient, [("b.jpg", second, "left")], clinic=NORTH)
    with session_scope(world.url) as s:
        s.execute(update(Image).where(Image.stored_path.is_not(None)).values(status="done"))
    job = _new_job(world, _folder(roots, f"north-{patient}", {f"{patient}_left.jpg": second}))
    erase(world, patient)
    return job


def test_erasures_audited_before_the_deployment_key_still_keep_the_patient_out_and_get_sealed(
    world: World, roots: Path
) -> None:
    """Audit rows written before the key existed hold the plain sha256 of the patient id: a folder
    job accepted before such an erasure must still leave the patient out, and a worker's start
    replaces every plain digest by its keyed one (no reversible digest stays in the database)."""
    job = _job_of_one_erased_patient(world, roots, "35")
    plain = _audited_as_before_the_key(world, "35")

    summary = folders.expand_folder(job, db_url=world.url, store=world.store, enqueue=Sent())
    assert summary.error is not None and "erased since the job was sent" in summary.error
    with session_scope(world.url) as s:
        assert repo.get_patient(s, world.north, "35") is None, "the erased patient is back"

    key = deployment_key.deployment_key(world.store.root)
    with session_scope(world.url) as s:  # as workers.app does at each worker's start
        assert retention.seal_audit_digests(s, key) == 1
    [detail] = [e.detail or {} for e in audit_rows(world.url, "patient.erase")]
    assert plain not in json.dumps(detail)
    assert detail["patient_hmac"] == retention.patient_digest("35", key)
    assert detail["key_id"] == deployment_key.key_fingerprint(key)
    with session_scope(world.url) as s:
        assert retention.seal_audit_digests(s, key) == 0  # idempotent


def test_a_worker_with_another_deployment_key_fails_the_folder_job_rather_than_guess(
    world: World, roots: Path, tmp_path: Path
) -> None:
    """Its store is another disk (or lost its key and made a new one): it could not recognise the
    erased patient, and would record the patient again from the folder. The job fails instead."""
    job = _job_of_one_erased_patient(world, roots, "36")
    elsewhere = FileStore(tmp_path / "other-disk")
    summary = folders.expand_folder(job, db_url=world.url, store=elsewhere, enqueue=Sent())
    assert summary.error is not None and "another deployment key" in summary.error
    with session_scope(world.url) as s:
        failed = repo.get_job(s, job)
        assert (
            failed is not None and failed.status == "failed" and "DRSCREEN_STORE_DIR" in (failed.error or "")
        )
        assert repo.get_patient(s, world.north, "36") is None, "the erased patient is back"


def test_a_forced_erasure_deletes_the_open_folder_job_it_empties(world: World) -> None:
    """Left ``running`` with no file, the job was never finished, and the sweep re-sends the
    expansion of an unfinished job with no file: the folder, read again, brought the patient back."""
    job = _new_job(world, "/exports/north-4", status="running")
    [image] = add_images(world.url, world.store, KEEP, [photo("1012_left.jpg")], clinic=NORTH, job_id=job)
    with session_scope(world.url) as s:
        repo.add_job_items(s, job, [repo.JobItemSpec("KEEP-2_left.jpg", KEEP, "left")])
        [item] = repo.job_items(s, job)
        repo.set_job_item(s, item, status="queued", image_id=image)
    out, _ = erase(world, KEEP, force=True)
    assert out.in_flight == 1
    with session_scope(world.url) as s:
        assert repo.get_job(s, job) is None
        assert repo.get_job(s, world.job) is not None  # it still has the target's files
    assert out.rows["scoring_job"] == 1


# ------------------------------------------------------------------------- review: input, SQL


def test_cli_purge_refuses_a_period_beyond_the_calendar(world: World) -> None:
    for days in ("1000000", "99999999999"):
        result = runner.invoke(cli_app, ["data", "purge", "--older-than", days, "--dry-run"])
        assert result.exit_code == 2, result.output
        assert "at most" in result.output and len(result.output.strip().splitlines()) == 1, result.output


def _vm_steps(session: Any, run: Callable[[], Any]) -> int:
    """SQLite virtual-machine instructions (in hundreds) spent by ``run``'s statements in
    ``session``: a measure of work that does not depend on the machine's speed."""
    raw = session.connection().connection.driver_connection
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    raw.set_progress_handler(tick, 100)
    try:
        run()
    finally:
        raw.set_progress_handler(None, 100)
    return steps[0]


def _named_patients(url: str, first: int, count: int) -> list[int]:
    """``count`` more patients of North, each named by a file of a folder job of their own."""
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, NORTH).id
        job = repo.create_job(s, clinic, f"/exports/many-{first}").id
        names = [f"N-{i}" for i in range(first, first + count)]
        s.execute(insert(Patient), [{"clinic_id": clinic, "external_id": name} for name in names])
        repo.add_job_items(s, job, [repo.JobItemSpec(f"{name}_left.jpg", name, "left") for name in names])
        return list(s.scalars(select(Patient.id).where(Patient.external_id.in_(names)).order_by(Patient.id)))


def test_finding_the_folder_job_files_of_patients_costs_the_same_per_file_for_more_patients(url: str) -> None:
    """The purge looks for the files naming its patients 500 patients at a time. On SQLite that
    query tried every patient of the chunk for every file naming an existing patient: 500 times
    the work per file (a 20,000-photograph purge spent 6 of its 8 s there). Then it read every
    file of every job once per look (the scale review): the work grew with the history. Now it
    grows with the chunk's files alone."""
    ids = _named_patients(url, 0, 400)
    count = select(func.count()).select_from(ScoringJobItem)
    with session_scope(url) as s:
        few = _vm_steps(s, lambda: s.scalar(count.where(retention._items_of(ids[:40]))))
    _named_patients(url, 400, 3600)  # ten times the files, of other patients
    with session_scope(url) as s:
        few_of_more = _vm_steps(s, lambda: s.scalar(count.where(retention._items_of(ids[:40]))))
        many = _vm_steps(s, lambda: s.scalar(count.where(retention._items_of(ids))))
    assert few_of_more < 2 * few, (few, few_of_more)  # not every file of the history read
    assert many < 15 * few_of_more, (few_of_more, many)  # ten times the files, about ten times the work


def test_the_purge_looks_again_at_a_chunk_of_patients_without_reading_every_photograph(url: str) -> None:
    """Each chunk of 500 patients is looked at again once locked; that second look computed the
    newest photograph of every patient of the database (a GROUP BY over the whole image table per
    chunk: quadratic in a large purge), not of the chunk's patients."""
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, NORTH).id
        ids = [repo.get_or_create_patient(s, clinic, f"N-{i}").id for i in range(400)]
        for patient in ids:
            repo.create_image(s, clinic_id=clinic, patient_id=patient, eye="left", sha256="0" * 64,
                              stored_path="00/00/x.jpg", size_bytes=1)  # fmt: skip
        s.execute(
            update(Image).values(
                created_at=utcnow() - timedelta(days=400), sent_at=utcnow() - timedelta(days=400)
            )
        )
    cutoff = utcnow() - timedelta(days=365)
    with session_scope(url) as s:
        every = _vm_steps(s, lambda: retention._purgeable(s, cutoff, None))
        chunk = _vm_steps(s, lambda: retention._purgeable(s, cutoff, None, within=ids[:5]))
    assert chunk * 5 < every, (chunk, every)


def test_a_database_failure_while_the_files_are_removed_leaves_them_where_they_were(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are set aside before their second look: a failure then must not leave them
    under hidden names (erased data nobody would find, or a shared file lost to its readers)."""
    stored = files(world.store)
    with session_scope(world.url) as s:
        out = retention.erase_patient(s, world.north, TARGET)
    real, calls = retention._referenced, {"n": 0}

    def fails_second_look(*args: Any, **kwargs: Any) -> set[str]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("database gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(retention, "_referenced", fails_second_look)
    with pytest.raises(RuntimeError), session_scope(world.url) as s:
        retention.remove_unreferenced_files(s, world.store, out.files)
    assert files(world.store) == stored


# ------------------------------------------------------- review: the preview's copy of the database

PREVIEW_AND_WAIT = """
import sys
from cli.retention import _preview_session
with _preview_session():
    print("previewing", flush=True)
    sys.stdin.readline()  # until stopped
"""


def _previews_beside(url: str) -> list[Path]:
    database = Path(url.removeprefix("sqlite:///"))
    return sorted(database.parent.glob(".drscreen-preview-*"))


def test_a_preview_stopped_by_sigterm_removes_its_copy_of_the_database(world: World) -> None:
    """Session 32's final review: SIGTERM (``timeout``, systemd, a scheduler) killed Python on the
    spot, and the preview's whole copy of the database stayed beside it, patients erased since
    included, until someone found the hidden folder."""
    import os
    import signal
    import subprocess
    import sys

    assert world.url.startswith("sqlite:///")
    env = {**os.environ, "DRSCREEN_DATABASE_URL": world.url}
    preview = subprocess.Popen(
        [sys.executable, "-c", PREVIEW_AND_WAIT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert preview.stdout is not None
    assert preview.stdout.readline().strip() == "previewing"
    assert len(_previews_beside(world.url)) == 1
    preview.send_signal(signal.SIGTERM)
    assert preview.wait(timeout=60) == 128 + signal.SIGTERM
    assert _previews_beside(world.url) == []  # before the fix: the copy stayed


def test_a_copy_left_by_a_killed_preview_is_removed_by_the_next_run(world: World) -> None:
    """SIGKILL or a power cut runs no clean-up: the next preview, or the erasure itself, removes a
    copy whose process is gone (one of a preview still running stays)."""
    import os
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    database = Path(world.url.removeprefix("sqlite:///"))
    left = database.parent / f".drscreen-preview-{int(gone.stdout)}-x"
    running = database.parent / f".drscreen-preview-{os.getpid()}-y"
    for folder in (left, running):
        folder.mkdir()
        (folder / database.name).write_bytes(database.read_bytes())
    dry = runner.invoke(cli_app, ["data", "purge", "--older-than", "3650", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert _previews_beside(world.url) == [running]  # before the fix: both stayed
    left.mkdir()
    real = runner.invoke(cli_app, ["data", "erase", KEEP, "--clinic", NORTH, "--yes", "--force"])
    assert real.exit_code == 0, real.output
    assert _previews_beside(world.url) == [running]
