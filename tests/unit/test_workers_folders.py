"""Folder jobs, the sweep, the task error mapping and ``drscreen score`` on SQLite (no broker)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select, update

from core import repository as repo
from core import tasks
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, Prediction, ScoringJobItem, utcnow
from tests.unit.test_workers_scoring import PHOTOS, Sent, StubEnsemble, ens, sent, store, url
from workers import folders, scoring
from workers import sweep as sweep_mod
from workers.naming import ManifestError

__all__ = ["ens", "sent", "store", "url"]  # fixtures shared with the scoring tests

NAMES = ["16_left.jpg", "16_right.jpg", "17_left.jpg", "17_right.jpg", "102_left.jpg", "102_right.jpg"]


def make_folder(root: Path, names: list[str] = NAMES) -> Path:
    folder = root / "batch"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    (folder / "notes.txt").write_text("not a photograph\n")
    good = (PHOTOS / "1012_left.jpg").read_bytes()
    (folder / "21_left.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "holiday.jpg").write_bytes(good)  # no patient/eye in the name
    return folder


def new_job(url: str, folder: Path | str) -> str:
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        return repo.create_job(s, clinic.id, str(folder)).id


def items_by_path(url: str, job_id: str) -> dict[str, ScoringJobItem]:
    with session_scope(url) as s:
        return {i.path: i for i in repo.job_items(s, job_id)}


def test_plan_names_and_links(tmp_path: Path, roots: Path) -> None:
    folder = make_folder(roots)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", folder / "30_left.jpg")
    os.symlink(folder / "16_left.jpg", folder / "31_right.jpg")  # a link inside the roots is fine
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    assert (plan["16_left.jpg"].patient_id, plan["16_left.jpg"].eye) == ("16", "left")
    assert plan["31_right.jpg"].error is None
    assert "outside the import roots" in (plan["30_left.jpg"].error or "")
    assert "cannot tell patient and eye" in (plan["holiday.jpg"].error or "")
    assert plan["notes.txt"].error is not None


def test_patient_ids_follow_the_upload_rule(roots: Path) -> None:
    """A folder job's patient ids (file names, manifest) obey the rule uploads do: they appear
    in URLs. The local CLI (no roots) still scores any name."""
    folder = make_folder(roots, ["16_left.jpg"])
    src = (folder / "16_left.jpg").read_bytes()
    for name in ("a b#c_left.jpg", "ünï_right.jpg", "x" * 200 + "_left.jpg", "ok.id-2_right.jpg"):
        (folder / name).write_bytes(src)
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    assert plan["ok.id-2_right.jpg"].error is None and plan["16_left.jpg"].error is None
    for name in ("a b#c_left.jpg", "ünï_right.jpg", "x" * 200 + "_left.jpg"):
        assert "is not 1-128 letters" in (plan[name].error or ""), name
        assert plan[name].patient_id is None
    local = {p.path: p for p in folders.plan_folder(folder, None)}
    assert local["a b#c_left.jpg"].patient_id == "a b#c"
    (folder / "manifest.csv").write_text("image,patient_id,eye\n16_left.jpg,bad id!,left\n")
    [row] = [p for p in folders.plan_folder(folder, [roots]) if p.path == "16_left.jpg"]
    assert "is not 1-128 letters" in (row.error or "")


def test_manifest_wins(roots: Path) -> None:
    folder = make_folder(roots, ["16_left.jpg", "17_left.jpg"])
    (folder / "manifest.csv").write_text(
        "image,patient_id,eye\n16_left.jpg,A,right\nholiday.jpg,B,L\nmissing.jpg,C,left\n../x.jpg,D,left\n"
    )
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    assert (plan["16_left.jpg"].patient_id, plan["16_left.jpg"].eye) == ("A", "right")
    assert (plan["holiday.jpg"].patient_id, plan["holiday.jpg"].eye) == ("B", "left")
    assert plan["17_left.jpg"].error == "not listed in manifest.csv"
    assert "leaves the job folder" in (plan["../x.jpg"].error or "")
    assert "manifest.csv" not in plan


def test_drscreen_score_keeps_the_manifests_refusals(roots: Path) -> None:
    """The review: `drscreen score` matched every refused manifest row by its file name again, so a
    file listed for two patients was scored as the one its name says, and a row outside the folder
    was read from there."""
    from workers import bulk

    folder = make_folder(roots, ["16_left.jpg"])
    (folder / "manifest.csv").write_text(
        "image,patient_id,eye\n16_left.jpg,,left\n16_left.jpg,M29,right\n../17_left.jpg,M3,left\n"
    )
    _, plan = bulk._plan(folder)
    rows = {p.path: p for p in plan}
    assert rows["16_left.jpg"].error == "manifest.csv gives no patient_id for this file"
    assert "more than once" in (rows["manifest.csv/line 3: 16_left.jpg"].error or "")
    assert "leaves the job folder" in (rows["../17_left.jpg"].error or "")
    assert rows["21_left.jpg"].error == "not listed in manifest.csv"  # as the API's job says
    assert not [p for p in plan if p.error is None]


def test_no_manifest_row_is_silently_dropped(roots: Path) -> None:
    """The walkthrough: a file listed twice for two patients and a row without a file name left
    M29 and M30 out of the job altogether (total 2, failed 0, and GET /v1/patients/M29 a 404)."""
    folder = make_folder(roots, [])
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes((folder / "holiday.jpg").read_bytes())
    (folder / "manifest.csv").write_text(
        "image,patient_id,eye\na.jpg,M21,left\na.jpg,M29,right\n,M30,left\nb.jpg,M21,right\nb.jpg,M21,right\n"
    )
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    assert {"a.jpg", "manifest.csv/line 3: a.jpg", "manifest.csv/line 4", "b.jpg"} <= set(plan)
    assert len([p for p in plan if p.startswith("b.jpg")]) == 1
    # nothing says whether a.jpg is M21's left or M29's right eye: scored for neither
    assert "more than once" in (plan["a.jpg"].error or "") and "M29" in (plan["a.jpg"].error or "")
    again = plan["manifest.csv/line 3: a.jpg"]
    assert (again.patient_id, again.eye) == ("M29", "right") and again.error == plan["a.jpg"].error
    assert plan["manifest.csv/line 4"].patient_id == "M30" and "no file name" in (
        plan["manifest.csv/line 4"].error or ""
    )
    assert plan["b.jpg"].error is None  # listed twice the same way: one item

    # a refused row keeps its reason and drops an id the patient-id rule refuses (over 128
    # characters, it stopped the whole job on PostgreSQL: the review)
    (folder / "manifest.csv").write_text(f"image,patient_id,eye\n,{'M' * 200},left\nb.jpg,M21,right\n")
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    row = plan["manifest.csv/line 2"]
    assert row.patient_id is None and "no file name" in (row.error or "")
    assert plan["b.jpg"].error is None


R = TypeVar("R")


def finishes(fn: Callable[..., R], *args: Any, fifos: Sequence[Path] = (), timeout: float = 10.0) -> R:
    """``fn(*args)`` run on a thread that must end within ``timeout`` seconds: code that opens a
    FIFO blocks for ever waiting for a writer. On a hang, each FIFO is opened for writing once
    (ending the blocked open) before the test fails, so no thread is left behind."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    hung = thread.is_alive()
    for _ in range(20 if hung else 0):
        for fifo in fifos:
            with contextlib.suppress(OSError):  # ENXIO: no reader (yet) on this one
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(0.25)
        if not thread.is_alive():
            break
    assert not hung, f"{getattr(fn, '__name__', fn)} blocked on a FIFO"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_fifos_and_other_non_files_are_reported_not_opened(tmp_path: Path, roots: Path) -> None:
    """A named pipe used to hang the worker for ever: opening it waits for a writer. Nothing that
    is not a regular file is opened, with or without a name rule, linked or not, CLI or service."""
    folder = make_folder(roots, ["16_left.jpg"])
    outside = tmp_path / "outside"
    outside.mkdir()
    fifos = [folder / "notes", folder / "17_left.jpg", outside / "pipe", roots / "pipe"]
    for fifo in fifos:
        os.mkfifo(fifo)
    os.symlink(outside / "pipe", folder / "piped")  # out of the roots: refused before any stat
    os.symlink(roots / "pipe", folder / "piped_inside")  # inside: still not a regular file
    (folder / "subdir").mkdir()
    (folder / "manifest.csv.txt").write_text("x")
    plan = {p.path: p for p in finishes(folders.plan_folder, folder, [roots], fifos=fifos)}
    for name in ("notes", "17_left.jpg", "piped_inside"):
        assert (plan[name].error or "").startswith("not_a_file:"), (name, plan[name].error)
        assert "named pipe (FIFO)" in (plan[name].error or "")
    assert plan["piped"].error == folders.LINK_OUTSIDE
    assert plan["16_left.jpg"].error is None and "not_an_image" in (plan["notes.txt"].error or "")
    local = {p.path: p for p in finishes(folders.plan_folder, folder, None, fifos=fifos)}
    assert all((local[n].error or "").startswith("not_a_file:") for n in ("notes", "17_left.jpg", "piped"))
    # The read at ingestion checks again (a file swapped for a FIFO after planning).
    loaded = finishes(folders.read_photo, folder / "17_left.jpg", 10**6, fifos=fifos)
    assert isinstance(loaded, str) and loaded.startswith("not_a_file:")
    assert "a folder" in str(folders.read_photo(folder / "subdir", 10**6))
    # A manifest.csv that is a FIFO fails the job (it used to be opened as a photograph: a hang).
    (folder / "manifest.csv").unlink(missing_ok=True)
    os.mkfifo(folder / "manifest.csv")
    with pytest.raises(ManifestError, match="not_a_file"):
        finishes(folders.plan_folder, folder, [roots], fifos=[*fifos, folder / "manifest.csv"])


def test_expand_folder_with_a_fifo_goes_on(url: str, store: FileStore, roots: Path) -> None:
    folder = make_folder(roots, ["16_left.jpg"])
    os.mkfifo(folder / "notes")
    job_id = new_job(url, folder)
    finishes(
        lambda: folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent()),
        fifos=[folder / "notes"],
    )
    items = items_by_path(url, job_id)
    assert items["notes"].status == "failed" and (items["notes"].error or "").startswith("not_a_file:")
    assert items["16_left.jpg"].status == "queued"


def test_links_out_of_the_roots_all_get_one_error(tmp_path: Path, roots: Path) -> None:
    """Whatever a link out of the roots points at (nothing, a text file, a photograph, a FIFO), the
    item gets the same error: nothing to learn about what exists outside the roots."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hostname").write_text("db-server-01\n")
    (outside / "photo.jpg").write_bytes((PHOTOS / "16_left.jpg").read_bytes())
    os.mkfifo(outside / "pipe")
    folder = make_folder(roots, ["16_left.jpg"])
    targets = {
        "missing": outside / "nope",
        "etc_hostname": outside / "hostname",
        "photo.jpg": outside / "photo.jpg",
        "pipe": outside / "pipe",
        "40_left.jpg": outside / "nope",
        "41_left.jpg": outside / "hostname",
        "42_left.jpg": outside / "photo.jpg",
    }
    for name, target in targets.items():
        os.symlink(target, folder / name)
    fifos = [outside / "pipe"]
    plan = {p.path: p for p in finishes(folders.plan_folder, folder, [roots], fifos=fifos)}
    assert {name: plan[name].error for name in targets} == dict.fromkeys(targets, folders.LINK_OUTSIDE)

    # The same through a manifest, listed or not.
    rows = "".join(f"{name},P{i},left\n" for i, name in enumerate(["missing", "etc_hostname", "photo.jpg"]))
    (folder / "manifest.csv").write_text("image,patient_id,eye\n16_left.jpg,A,left\n" + rows)
    plan = {p.path: p for p in finishes(folders.plan_folder, folder, [roots], fifos=fifos)}
    assert {name: plan[name].error for name in targets} == dict.fromkeys(targets, folders.LINK_OUTSIDE)
    assert plan["16_left.jpg"].error is None

    # A link swapped to the outside after planning is refused when the photograph is read.
    os.symlink(folder / "16_left.jpg", folder / "43_left.jpg")
    assert not isinstance(folders.read_photo(folder / "43_left.jpg", 10**8, [roots.resolve()]), str)
    (folder / "43_left.jpg").unlink()
    os.symlink(outside / "photo.jpg", folder / "43_left.jpg")
    assert folders.read_photo(folder / "43_left.jpg", 10**8, [roots.resolve()]) == folders.LINK_OUTSIDE
    assert not isinstance(folders.read_photo(folder / "43_left.jpg", 10**8), str)  # the local CLI


def test_a_folder_swapped_for_a_link_while_a_photograph_is_opened_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: clinic B renamed a folder of its own and a link to clinic A's export
    into each other in a loop beside a folder job; a swap landing between the path's check and the
    open handed B one of A's photographs (1 of 300 in 13 s). What was opened is checked now."""
    own_root, other = (tmp_path / "imports" / "B").resolve(), tmp_path / "imports" / "A" / "export"
    ours, theirs = own_root / "race" / "d", other
    ours.mkdir(parents=True)
    theirs.mkdir(parents=True)
    (ours / "P1_left.jpg").write_bytes((PHOTOS / "229_left.jpg").read_bytes())
    (theirs / "P1_left.jpg").write_bytes(stolen := (PHOTOS / "16_left.jpg").read_bytes())
    checked = folders._not_a_regular_file

    def swap_then_check(path: Path) -> str | None:  # runs between the roots check and the open
        problem = checked(path)
        if ours.is_dir() and not ours.is_symlink():
            ours.rename(ours.with_name("d_real"))
            ours.symlink_to(theirs, target_is_directory=True)
        return problem

    monkeypatch.setattr(folders, "_not_a_regular_file", swap_then_check)
    loaded = folders.read_photo(ours / "P1_left.jpg", 10**8, [own_root])
    assert ours.is_symlink()  # the swap happened
    assert not (isinstance(loaded, folders.LoadedFile) and loaded.data == stolen)
    assert loaded == folders.LINK_OUTSIDE


def test_without_proc_a_photograph_swapped_for_a_link_is_still_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc cannot tell what was opened (not Linux), the file itself swapped for a link
    between the check and the open is refused by O_NOFOLLOW (the review: no test needed it)."""
    own_root = (tmp_path / "imports" / "B").resolve()
    own_root.mkdir(parents=True)
    ours, theirs = own_root / "P1_left.jpg", tmp_path / "A_P1_left.jpg"
    ours.write_bytes((PHOTOS / "229_left.jpg").read_bytes())
    theirs.write_bytes((PHOTOS / "16_left.jpg").read_bytes())
    checked = folders._not_a_regular_file

    def swap_then_check(path: Path) -> str | None:
        problem = checked(path)
        if not ours.is_symlink():
            ours.unlink()
            ours.symlink_to(theirs)
        return problem

    monkeypatch.setattr(folders, "_not_a_regular_file", swap_then_check)
    monkeypatch.setattr(folders, "_opened_outside", lambda fd, roots: False)  # no /proc
    assert folders.read_photo(ours, 10**8, [own_root]) == folders.LINK_OUTSIDE


def test_manifest_out_of_the_roots_is_refused(
    url: str, store: FileStore, tmp_path: Path, roots: Path
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("image,patient_id,eye\n16_left.jpg,SECRET-ROW,left\n")
    folder = make_folder(roots, ["16_left.jpg"])
    os.symlink(secret, folder / "manifest.csv")
    with pytest.raises(ManifestError, match="outside the import roots"):
        folders.plan_folder(folder, [roots])
    job_id = new_job(url, folder)
    summary = folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent())
    assert summary.error is not None and "outside the import roots" in summary.error
    assert items_by_path(url, job_id) == {}
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None and job.status == "failed" and "SECRET" not in (job.error or "")
    # A dangling link out of the roots: the same answer (nothing told about what exists).
    (folder / "manifest.csv").unlink()
    os.symlink(tmp_path / "nope.csv", folder / "manifest.csv")
    with pytest.raises(ManifestError, match="outside the import roots"):
        folders.plan_folder(folder, [roots])
    # A link to a manifest inside the roots is fine.
    shared = roots / "shared.csv"
    shared.write_text("image,patient_id,eye\n16_left.jpg,A,right\n")
    (folder / "manifest.csv").unlink()
    os.symlink(shared, folder / "manifest.csv")
    plan = {p.path: p for p in folders.plan_folder(folder, [roots])}
    assert (plan["16_left.jpg"].patient_id, plan["16_left.jpg"].eye) == ("A", "right")


def test_oversized_manifest_is_refused(roots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(roots, ["16_left.jpg"])
    with (folder / "manifest.csv").open("wb") as fh:
        fh.write(b"image,patient_id,eye\n16_left.jpg,A,left\n")
        fh.truncate(folders.MAX_MANIFEST_BYTES + 1)  # sparse: refused from its size, never read
    for roots_arg in ([roots], None):
        with pytest.raises(ManifestError, match="too large"):
            folders.plan_folder(folder, roots_arg)
    # The limit itself: at it the manifest is read, one byte over it is refused.
    body = b"image,patient_id,eye\n16_left.jpg,A,left\n"
    monkeypatch.setattr(folders, "MAX_MANIFEST_BYTES", len(body))
    (folder / "manifest.csv").write_bytes(body)
    assert [p.patient_id for p in folders.plan_folder(folder, [roots]) if p.path == "16_left.jpg"] == ["A"]
    (folder / "manifest.csv").write_bytes(body + b"\n")
    with pytest.raises(ManifestError, match="too large"):
        folders.plan_folder(folder, [roots])


def test_planning_stopped_by_the_soft_time_limit_fails_the_job(
    url: str, store: FileStore, roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-sending an expansion whose planning outlasted the limit would only plan again."""
    folder = make_folder(roots, ["16_left.jpg"])
    job_id = new_job(url, folder)

    def slow(*_: object) -> list[folders.PlannedFile]:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(folders, "plan_folder", slow)
    summary = folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent())
    assert summary.error is not None and "time limit" in summary.error
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None and job.status == "failed" and "time limit" in (job.error or "")


def test_expand_folder(url: str, store: FileStore, roots: Path, ens: StubEnsemble) -> None:
    folder = make_folder(roots)
    job_id = new_job(url, folder)
    sent = Sent()
    summary = folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent, chunk=4)

    items = items_by_path(url, job_id)
    assert summary.items == len(items) == len(NAMES) + 3
    assert items["notes.txt"].status == "failed" and "not_an_image" in (items["notes.txt"].error or "")
    assert items["holiday.jpg"].status == "failed"
    assert items["21_left.jpg"].status == "queued"  # truncation is found when it is decoded
    # Chunks of at most 4 ids, every queued image exactly once, explanations off for the job.
    published = [i for _, args, _ in sent for i in args[0]]
    assert all(name == tasks.SCORE_IMAGES and kw == {"explain": False} for name, _, kw in sent)
    assert all(len(args[0]) <= 4 for _, args, _ in sent)
    assert sorted(published) == sorted(i.image_id for i in items.values() if i.image_id)

    # A redelivered expansion adds no item and no image.
    with session_scope(url) as s:
        n_images = s.scalar(select(func.count()).select_from(Image))
    folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent(), chunk=4)
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == n_images
    assert len(items_by_path(url, job_id)) == len(items)

    # Score the published chunks: the truncated file is reported against its own item.
    for _, args, kw in sent:
        scoring.score_images(
            args[0], explain=kw["explain"], ensemble=ens, store=store, db_url=url, enqueue=Sent()
        )
    items = items_by_path(url, job_id)
    truncated = items["21_left.jpg"]
    assert truncated.status == "failed" and (truncated.error or "").startswith("truncated")
    assert items["16_left.jpg"].status == "done"
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None and job.status == "done"
        assert (job.total, job.done, job.failed) == (len(NAMES) + 3, len(NAMES), 3)


def test_expand_folder_refuses_outside_roots(url: str, store: FileStore, tmp_path: Path, roots: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = roots / "sneaky"
    os.symlink(outside, link)  # under the roots by name, outside by its real path
    for folder in (outside, link, roots / "missing"):
        job_id = new_job(url, folder)
        summary = folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent())
        assert summary.error is not None and not summary.sent
        with session_scope(url) as s:
            job = repo.get_job(s, job_id)
            assert job is not None and job.status == "failed" and job.error


def test_a_folder_over_the_file_limit_fails_its_job_before_anything_is_saved(
    url: str, store: FileStore, roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: nothing bounded a folder job's size (the whole listing in memory)."""
    folder = make_folder(roots, NAMES[:2])  # 2 photographs + 3 other files
    monkeypatch.setattr(folders, "MAX_JOB_FILES", 4)
    job_id = new_job(url, folder)
    summary = folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent())
    assert summary.error == "the folder holds more than 4 files: split it into smaller ones"
    assert not summary.sent and items_by_path(url, job_id) == {}
    assert len(folders.plan_folder(folder, None)) == 5  # the local CLI: no limit


def test_expand_folder_keeps_to_the_clinics_own_folder(
    url: str, store: FileStore, roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DRSCREEN_IMPORT_PER_CLINIC the worker re-checks the job against its clinic's folder
    (``new_job``'s clinic is North): a job naming another clinic's folder fails."""
    monkeypatch.setenv("DRSCREEN_IMPORT_PER_CLINIC", "true")
    get_settings.cache_clear()
    try:
        own = make_folder(roots / "North", ["16_left.jpg"])
        other = make_folder(roots / "South", ["16_left.jpg"])
        assert not folders.expand_folder(new_job(url, own), db_url=url, store=store, enqueue=Sent()).error
        refused = folders.expand_folder(new_job(url, other), db_url=url, store=store, enqueue=Sent())
        assert refused.error is not None and not refused.sent
    finally:
        get_settings.cache_clear()


def test_same_photo_twice_is_one_image(url: str, store: FileStore, roots: Path) -> None:
    folder = make_folder(roots, ["16_left.jpg"])
    (folder / "16_left_copy.jpg").write_bytes((PHOTOS / "16_left.jpg").read_bytes())
    job_id = new_job(url, folder)
    sent = Sent()
    folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent)
    items = items_by_path(url, job_id)
    assert items["16_left.jpg"].image_id == items["16_left_copy.jpg"].image_id is not None
    for _, args, kw in sent:
        scoring.score_images(args[0], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent(), **kw)
    with session_scope(url) as s:
        job = repo.refresh_job_counts(s, job_id)
        # the counts per grade add up to the items done (they counted the one image once)
        assert job.done == 2 and sum(repo.job_grade_counts(s, job_id).values()) == 2


def test_photos_scored_by_an_earlier_release_are_scored_again(
    url: str, store: FileStore, roots: Path
) -> None:
    """Re-submitting a folder: photographs the serving release already scored are linked and not
    scored twice; after a new release they are queued again and the job reports the new grades."""
    folder = make_folder(roots, NAMES[:2])
    (folder / "holiday.jpg").unlink()
    (folder / "21_left.jpg").unlink()
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")

    def run_job(ens: StubEnsemble) -> tuple[str, Sent]:
        job_id = new_job(url, folder)
        sent = Sent()
        folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent, model_ref=ens.ref)
        for _, args, kw in sent:
            scoring.score_images(args[0], ensemble=ens, store=store, db_url=url, enqueue=Sent(), **kw)
        return job_id, sent

    first, sent_first = run_job(old)
    assert sum(len(args[0]) for _, args, _ in sent_first) == 2
    again, sent_again = run_job(old)  # same release: nothing to score, the job still counts both
    assert sent_again == []
    first_items, again_items = items_by_path(url, first), items_by_path(url, again)
    assert {p: i.image_id for p, i in again_items.items()} == {p: i.image_id for p, i in first_items.items()}
    with session_scope(url) as s:
        assert sum(repo.job_grade_counts(s, again).values()) == 2
        assert repo.refresh_job_counts(s, again).status == "done"

    upgraded, sent_upgraded = run_job(new)
    assert sorted(i for _, args, _ in sent_upgraded for i in args[0]) == sorted(
        i.image_id for i in first_items.values() if i.image_id
    )
    with session_scope(url) as s:
        assert repo.refresh_job_counts(s, upgraded).status == "done"
        assert sum(repo.job_grade_counts(s, upgraded).values()) == 2
        photos = [i for i in repo.job_items(s, upgraded) if i.path != "notes.txt"]
        assert len(photos) == 2
        for item in photos:
            assert item.status == "done" and item.image_id is not None
            refs = {
                repo.get_model_version(s, p.model_version_id).ref  # type: ignore[union-attr]
                for p in s.scalars(select(Prediction).where(Prediction.image_id == item.image_id))
            }
            assert refs == {old.ref, new.ref}  # the earlier release's prediction is kept
        patient = repo.get_patient(s, repo.get_or_create_clinic(s, "North").id, "16")
        assert patient is not None
        result = repo.get_current_patient_result(s, patient.id)
        version = repo.get_model_version_by_ref(s, new.ref)
        assert result is not None and version is not None and result.model_version_id == version.id


def test_a_clinic_export_of_every_visit_does_not_pool_them(url: str, store: FileStore, roots: Path) -> None:
    """A clinic's export that holds a patient's every photograph sends last month's again with
    today's. Those rows are reused (scored once) and keep their visit: pooled into today's, the
    result would average a month-old eye with today's (what the visit window exists to stop).
    Their purge clock restarts (``sent_at``)."""
    first = roots / "visit-1"
    first.mkdir()
    for name in ("16_left.jpg", "16_right.jpg"):
        (first / name).write_bytes((PHOTOS / name).read_bytes())
    second = roots / "visit-2"
    second.mkdir()
    for eye in ("left", "right"):
        (second / f"16_{eye}_old.jpg").write_bytes((PHOTOS / f"16_{eye}.jpg").read_bytes())
        (second / f"16_{eye}_new.jpg").write_bytes((PHOTOS / f"17_{eye}.jpg").read_bytes())

    def run_job(folder: Path) -> dict[str, ScoringJobItem]:
        job_id, sent = new_job(url, folder), Sent()
        folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent)
        for _, args, kw in sent:
            scoring.score_images(
                args[0], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent(), **kw
            )
        return items_by_path(url, job_id)

    old = {item.path: item.image_id for item in run_job(first).values()}
    a_month_ago = utcnow() - timedelta(days=30)
    with session_scope(url) as s:
        s.execute(update(Image).values(created_at=a_month_ago, sent_at=a_month_ago))
    items = run_job(second)
    assert items["16_left_old.jpg"].image_id == old["16_left.jpg"]  # reused, not scored again
    with session_scope(url) as s:
        patient = repo.get_patient(s, repo.get_or_create_clinic(s, "North").id, "16")
        assert patient is not None
        result = repo.get_current_patient_result(s, patient.id)
        assert result is not None
        counted = {i for eye in result.eyes for i in eye.image_ids}
        assert counted == {items["16_left_new.jpg"].image_id, items["16_right_new.jpg"].image_id}
        sent_today = s.scalars(select(Image.sent_at).where(Image.id.in_(old.values()))).all()
        yesterday = (utcnow() - timedelta(days=1)).replace(tzinfo=None)  # SQLite gives naive times
        assert all(at.replace(tzinfo=None) > yesterday for at in sent_today)  # the purge's clock


def test_sweep_requeues_stale(url: str, store: FileStore) -> None:
    from tests.unit.test_workers_scoring import add_images, photo

    ids = add_images(url, store, "P1", [photo(n) for n in NAMES[:3]])
    old = utcnow() - timedelta(hours=2)
    with session_scope(url) as s:
        a, b, _c = repo.get_images(s, ids)
        a.updated_at = old  # queued long ago: its message was lost
        b.status, b.updated_at = "running", old  # its worker died
    sent = Sent()
    summary = sweep_mod.sweep(db_url=url, enqueue=sent)
    assert sorted(summary.requeued) == sorted(ids[:2])
    assert sent == [(tasks.SCORE_IMAGES, [ids[:2]], {})] or sent == [(tasks.SCORE_IMAGES, [ids[1::-1]], {})]
    # Touched: a second sweep right away sends nothing.
    again = Sent()
    assert sweep_mod.sweep(db_url=url, enqueue=again).requeued == [] and again == []
    # A short running timeout still leaves a fresh row alone.
    assert sweep_mod.sweep(db_url=url, enqueue=Sent(), running_after=timedelta(hours=1)).requeued == []


def test_sweep_requeues_claims_of_workers_that_did_not_answer(url: str, store: FileStore) -> None:
    from tests.unit.test_workers_scoring import add_images, photo

    ids = add_images(url, store, "P1", [photo(n) for n in NAMES[:4]])
    with session_scope(url) as s:
        for image_id, worker in zip(ids, ["celery@gone", "celery@alive", "celery@gone", None], strict=True):
            assert repo.claim_image(s, image_id, worker) is not None
    with session_scope(url) as s:
        claimers = [i.claimed_by for i in repo.get_images(s, ids)]
        assert claimers == ["celery@gone", "celery@alive", "celery@gone", None]
        repo.get_images(s, [ids[2]])[0].started_at = utcnow() + timedelta(minutes=5)  # claimed after the ping
    asked_at = utcnow() + sweep_mod.CLAIM_MARGIN + timedelta(seconds=1)
    ping = sweep_mod.LiveWorkers(frozenset({"celery@alive"}), asked_at)
    # No ping answer to trust: fresh running rows are left to the staleness rule.
    assert sweep_mod.sweep(db_url=url, enqueue=Sent()).requeued == []
    sent = Sent()
    summary = sweep_mod.sweep(db_url=url, enqueue=sent, live=ping)
    # Only the row claimed before the ping by the node that did not answer; not the live node's,
    # not one claimed after the ping, not one claimed outside Celery.
    assert summary.requeued == summary.orphaned == [ids[0]]
    assert sent == [(tasks.SCORE_IMAGES, [[ids[0]]], {})]
    # Not re-sent at every sweep while its new message waits in the queue.
    assert sweep_mod.sweep(db_url=url, enqueue=Sent(), live=ping).requeued == []
    # The re-sent photograph is scored by the next worker, which claims it in its own name.
    scoring.score_images(
        [ids[0]], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent(), worker="celery@new"
    )
    with session_scope(url) as s:
        row = repo.get_images(s, [ids[0]])[0]
        assert (row.status, row.claimed_by) == ("done", "celery@new")
    assert sweep_mod.sweep(db_url=url, enqueue=Sent(), live=ping).requeued == []
    # The live node restarted under the same name: its claims from before the restart are orphans.
    restarted = sweep_mod.LiveWorkers(ping.names, ping.asked_at, me="celery@alive", me_since=utcnow())
    assert sweep_mod.sweep(db_url=url, enqueue=Sent(), live=restarted).orphaned == [ids[1]]


class _Control:
    def __init__(self, replies: list[dict[str, object]] | Exception) -> None:
        self.replies = replies

    def ping(self, timeout: float) -> list[dict[str, object]]:
        if isinstance(self.replies, Exception):
            raise self.replies
        return self.replies


class _App:
    def __init__(self, replies: list[dict[str, object]] | Exception) -> None:
        self.control = _Control(replies)


def test_ping_workers_trusts_only_an_answer_that_includes_the_asker() -> None:
    answered = [{"celery@a": {"ok": "pong"}}, {"celery@b": {"ok": "pong"}}]
    live = sweep_mod.ping_workers(_App(answered), "celery@a")
    assert live is not None and live.names == {"celery@a", "celery@b"}
    assert sweep_mod.ping_workers(_App(answered), "celery@c") is None  # did not hear itself
    assert sweep_mod.ping_workers(_App([]), "celery@a") is None  # no broadcasts on this broker
    assert sweep_mod.ping_workers(_App(ConnectionError("down")), "celery@a") is None
    assert sweep_mod.ping_workers(_App(answered), None) is None


def test_two_workers_under_one_name_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Two workers started on one host without --hostname answer the ping under one name and
    cover for each other's crashes: the sweep says so, loudly."""
    clash = [{"celery@vm": {"ok": "pong"}}, {"celery@vm": {"ok": "pong"}}, {"celery@b": {"ok": "pong"}}]
    with caplog.at_level("ERROR", logger="workers.sweep"):
        assert sweep_mod.ping_workers(_App(clash), "celery@b") is not None
    assert "more than one worker answers as celery@vm" in caplog.text and "--hostname" in caplog.text
    caplog.clear()
    with caplog.at_level("ERROR", logger="workers.sweep"):
        sweep_mod.ping_workers(_App([{"celery@a": {}}, {"celery@b": {}}]), "celery@a")
    assert caplog.text == ""


def test_sweep_resends_lost_folder_jobs(url: str, store: FileStore, roots: Path) -> None:
    # The API commits the job, then publishes jobs.expand_folder; when that message is lost the job
    # must not stay "queued" for ever. Neither must a job whose expansion stopped midway.
    folder = make_folder(roots, ["16_left.jpg", "17_left.jpg"])
    never_sent, half_done, expanded = new_job(url, folder), new_job(url, folder), new_job(url, folder)
    folders.expand_folder(expanded, db_url=url, store=store, enqueue=Sent())
    with session_scope(url) as s:
        repo.add_job_items(s, half_done, [repo.JobItemSpec("16_left.jpg", "16", "left")])
    old = utcnow() - timedelta(hours=2)
    with session_scope(url) as s:
        for job_id in (never_sent, half_done, expanded):
            job = repo.get_job(s, job_id)
            assert job is not None
            job.updated_at = old
    sent = Sent()
    summary = sweep_mod.sweep(db_url=url, enqueue=sent)
    assert sorted(summary.jobs) == sorted([never_sent, half_done])
    assert sorted(args[0] for name, args, _ in sent if name == tasks.EXPAND_FOLDER) == sorted(summary.jobs)
    # Touched: not re-sent again right away; and the re-sent expansion finishes the job.
    assert sweep_mod.sweep(db_url=url, enqueue=Sent()).jobs == []
    folders.expand_folder(half_done, db_url=url, store=store, enqueue=Sent())
    assert {i.status for i in items_by_path(url, half_done).values()} <= {"queued", "done", "failed"}


def test_sweep_keeps_each_jobs_explain_option(url: str, store: FileStore, roots: Path) -> None:
    # A job asked for heatmaps: its lost expansion and its stale photographs are re-sent with
    # explain on; another job's with explain off.
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        with_maps = repo.create_job(s, clinic.id, str(make_folder(roots, ["16_left.jpg"])), explain=True).id
        without = repo.create_job(s, clinic.id, str(roots), explain=False).id
    folders.expand_folder(with_maps, db_url=url, store=store, enqueue=Sent())
    old = utcnow() - timedelta(hours=2)
    with session_scope(url) as s:
        image_id = items_by_path(url, with_maps)["16_left.jpg"].image_id
        image = repo.get_images(s, [image_id])[0]
        image.updated_at = old
        for job_id in (without,):
            job = repo.get_job(s, job_id)
            assert job is not None
            job.updated_at = old
    sent = Sent()
    sweep_mod.sweep(db_url=url, enqueue=sent)
    assert (tasks.SCORE_IMAGES, [[image_id]], {"explain": True}) in sent
    assert (tasks.EXPAND_FOLDER, [without], {"explain": False}) in sent


def test_transient_errors() -> None:
    import redis
    from sqlalchemy.exc import IntegrityError, OperationalError

    from workers.tasks import backoff, is_transient

    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert is_transient(redis.exceptions.ConnectionError("down"))
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate")))
    assert not is_transient(ValueError("bug"))
    assert 1.0 <= backoff(0) <= 2.0 and backoff(20) <= 300.0


def test_drscreen_score_reports_an_ungradable_photograph_referable(tmp_path: Path) -> None:
    """The session-31 mutation review: ``drscreen score``'s per-image output takes ``referable``
    from the stored prediction; no test said an ungradable photograph reads referable there. A
    clinic scoring a folder would read "not referable" beside a photograph nobody could grade."""
    from tests.unit.test_workers_scoring import gray_png
    from workers import bulk

    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "31_left.png").write_bytes(gray_png())  # a picture, but no fundus photograph
    (folder / "16_left.jpg").write_bytes((PHOTOS / "16_left.jpg").read_bytes())
    result = bulk.run(folder, ensemble=StubEnsemble())
    by_file = {r.file: r for r in result.images}
    ungradable = by_file["31_left.png"]
    assert (ungradable.status, ungradable.gradable, ungradable.grade) == ("done", False, None)
    assert ungradable.referable is True
    assert by_file["16_left.jpg"].gradable is True  # the other photograph was graded


def test_score_path_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import bulk, model

    folder = make_folder(tmp_path, NAMES[:4])
    (folder / "99_left.jpg").write_bytes(b"a text file named as a photograph")  # refused when read
    (folder / "17.jpg").write_bytes((PHOTOS / "16_right.jpg").read_bytes())  # 17, but which eye?
    monkeypatch.setattr(model, "_ensemble", StubEnsemble())
    out_json = tmp_path / "out" / "results.json"
    assert bulk.score_path(folder, out_json, explain=True) == 0
    data = json.loads(out_json.read_text())
    by_file = {r["file"]: r for r in data["images"]}
    assert data["model_version"] == "stub-ensemble@0.0.1"
    assert by_file["notes.txt"]["status"] == "failed"
    assert by_file["holiday.jpg"]["status"] == "done" and by_file["holiday.jpg"]["eye"] is None
    assert by_file["21_left.jpg"]["status"] == "failed"
    patients = {p["patient_id"]: p for p in data["patients"]}
    assert set(patients) == {"16", "17", "17.jpg", "21", "99", "holiday"}
    # 17.jpg is its own patient, named by its file: not pooled into patient 17's left eye
    assert by_file["17.jpg"]["patient_id"] == "17.jpg" and set(patients["17.jpg"]["eyes"]) == {
        bulk.UNKNOWN_EYE
    }
    # Patient 21's only photo could not be read: ungradable, so referred.
    assert patients["21"]["grade"] is None and patients["21"]["referable"] is True
    # 99's only file is not an image at all: still a patient to refer, not left out of the list
    assert by_file["99_left.jpg"]["status"] == "failed"
    assert (patients["99"]["grade"], patients["99"]["referable"], patients["99"]["gradable"]) == (
        None,
        True,
        False,
    )
    assert set(patients["99"]["eyes"]) == {"left", "right"}
    # a photograph whose eye the name does not tell is not reported under the left eye
    assert set(patients["holiday"]["eyes"]) == {bulk.UNKNOWN_EYE}
    assert set(patients["16"]["eyes"]) <= {"left", "right"}
    table = bulk.format_table(bulk.run(folder, ensemble=StubEnsemble()))
    holiday = next(line for line in table.splitlines() if line.startswith("holiday"))
    assert holiday.split()[3:5] == ["-", "-"]  # neither left nor right
    heatmaps = [r["heatmap"] for r in data["images"] if r["heatmap"]]
    assert heatmaps and all(Path(h).is_file() for h in heatmaps)

    out_csv = tmp_path / "out" / "results.csv"
    assert bulk.score_path(folder, out_csv, explain=False) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 9 and {"p0", "p4", "grade", "referable"} <= set(rows[0])
    patients_csv = (tmp_path / "out" / "results_patients.csv").open()
    by_patient = {r["patient_id"]: r for r in csv.DictReader(patients_csv)}
    assert by_patient["99"]["grade"] == "" and by_patient["99"]["referable"] in ("True", "true", "1")
    assert by_patient["holiday"]["left_grade"] == "" and by_patient["holiday"]["unknown_eye_grade"] != ""

    sub = tmp_path / "out" / "my_submission.csv"
    assert bulk.score_path(folder, sub) == 0
    lines = sub.read_text().splitlines()
    assert lines[0] == "ID,TARGET" and any(line.startswith("16_left,") for line in lines)
    assert all(line.split(",")[1].isdigit() for line in lines[1:])

    assert bulk.score_path(folder, tmp_path / "out" / "results.txt") == 2
    assert not (tmp_path / "out" / "results.txt").exists()
    assert bulk.score_path(folder, tmp_path / "out" / "sub.json", submission=True) == 2
    assert bulk.score_path(folder, None, submission=True) == 2
    assert not (tmp_path / "out" / "sub.json").exists()

    single = bulk.run(folder / "16_left.jpg", ensemble=StubEnsemble())
    assert [(r.patient_id, r.eye) for r in single.images] == [("16", "left")]
