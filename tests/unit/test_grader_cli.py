"""``drscreen data agreement`` and ``drscreen data export-graded``: the graders' grades seen by an
operator, and exported as a folder ``drscreen evaluate`` reads."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import AuditEvent, Image
from ml.evaluation import read_labels
from tests.api_support import Key, sample_bytes
from tests.unit.test_grader_grades import scored  # noqa: F401  (the fixture)
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images
from workers import scoring

runner = CliRunner()


def _grade(client: TestClient, key: Key, image_id: str, grade: int | None, who: str = "Dr A") -> None:
    answer = client.put(
        f"/v1/images/{image_id}/grader-grade", headers=key.headers, json={"grade": grade, "grader": who}
    )
    assert answer.status_code == 200, answer.text


def test_agreement_prints_what_the_api_answers(
    client: TestClient,
    url: str,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, south, ids = scored
    _grade(client, north, ids[0], 4)
    _grade(client, north, ids[1], 0)
    _grade(client, north, ids[2], None)
    store = FileStore(get_settings().store_path)  # South's one photograph, graded too
    [theirs] = add_images(url, store, "S1", [("s.jpg", sample_bytes("19", "left"), "left")], clinic="South")
    scoring.score_images([theirs], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    _grade(client, south, theirs, 1)
    api = client.get("/v1/agreement", headers=north.headers).json()
    done = runner.invoke(app, ["data", "agreement", "--clinic", "North", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1]) == api
    every = runner.invoke(app, ["data", "agreement", "--json"])  # every clinic
    assert json.loads(every.output.strip().splitlines()[-1])["n_images"] == 4
    text = runner.invoke(app, ["data", "agreement", "--clinic", "North"])
    assert text.exit_code == 0
    assert "the grades the results report: 3 photograph(s) graded by both" in text.output
    assert "ungradable: by both 0, by the grader only 1, by the model only 0" in text.output
    assert api["missed_referable"] == [ids[0]] and ids[0] in text.output
    assert runner.invoke(app, ["data", "agreement", "--clinic", "Nowhere"]).exit_code == 2
    assert runner.invoke(app, ["data", "agreement", "--model", "nope@1"]).exit_code == 2
    assert runner.invoke(app, ["data", "agreement", "--since", "12/01/2026"]).exit_code == 2
    inverted = runner.invoke(app, ["data", "agreement", "--since", "2026-12-08", "--until", "2026-12-01"])
    assert inverted.exit_code == 2 and "--since must be before --until" in inverted.output


def test_export_graded_writes_a_folder_evaluate_reads(
    client: TestClient,
    url: str,
    tmp_path: Path,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, south, ids = scored
    _grade(client, north, ids[0], 3, who="=cmd|' /C calc'!A0")  # a name a spreadsheet would run
    _grade(client, north, ids[1], 1)
    _grade(client, north, ids[2], None)
    out = tmp_path / "graded"
    done = runner.invoke(app, ["data", "export-graded", "--clinic", "North", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "2 graded photograph(s)" in done.output and "1 the graders found ungradable" in done.output
    rows = read_labels(out / "labels.csv")  # what `drscreen evaluate` checks before scoring
    assert {r["image_id"]: int(r["grade"]) for r in rows} == {ids[0]: 3, ids[1]: 1}
    assert {r["patient_id"] for r in rows} == {"P16"}
    assert rows[0]["grader"].startswith("'=")  # not a formula
    store = FileStore(get_settings().store_path)
    with session_scope(url) as s:
        for r in rows:
            image = s.get(Image, r["image_id"])
            assert image is not None
            assert (out / r["image"]).read_bytes() == store.read_bytes(image.stored_path)
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "grader_grade.export")).all()
        assert len(events) == 1 and events[0].clinic_id == north.clinic_id
        assert events[0].detail is not None and events[0].detail["labelled"] == 2
    with open(out / "ungradable.csv", newline="") as fh:
        assert [r["image_id"] for r in csv.DictReader(fh)] == [ids[2]]
    assert not (tmp_path / "graded.partial").exists()

    # a folder with something in it is refused and left as it was
    again = runner.invoke(app, ["data", "export-graded", "--clinic", "North", "--out", str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    assert len(list((out / "images").iterdir())) == 2
    # another clinic exports its own (none)
    other = tmp_path / "south"
    assert (
        runner.invoke(app, ["data", "export-graded", "--clinic", "South", "--out", str(other)]).exit_code == 0
    )
    assert read_labels_rows(other / "labels.csv") == [] and list((other / "images").iterdir()) == []
    assert south.clinic_id != north.clinic_id


def read_labels_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_photograph_missing_from_the_store_is_left_out_and_said(
    client: TestClient,
    url: str,
    tmp_path: Path,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, _, ids = scored
    _grade(client, north, ids[2], 2)
    with session_scope(url) as s:
        image = s.get(Image, ids[2])
        assert image is not None
        FileStore(get_settings().store_path).path(image.stored_path).unlink()
    out = tmp_path / "graded"
    done = runner.invoke(app, ["data", "export-graded", "--clinic", "North", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "1 photograph(s) missing from the store" in done.output and ids[2] in done.output
    assert read_labels_rows(out / "labels.csv") == []


def _export(*args: str) -> Any:
    return runner.invoke(app, ["data", "export-graded", "--clinic", "North", *args])


def test_export_is_private_and_refuses_links_the_store_and_leaves_neighbours_alone(
    client: TestClient,
    url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    """The review: a folder named like the temporary one was deleted; a link was written through;
    an export inside the store would be pruned as unnamed files; the photographs were readable
    by every user; `--out .` crashed."""
    north, _, ids = scored
    _grade(client, north, ids[0], 3)
    neighbour = tmp_path / "graded.partial"
    neighbour.mkdir()
    (neighbour / "notes.txt").write_text("precious")
    done = _export("--out", str(tmp_path / "graded"))
    assert done.exit_code == 0, done.output
    assert (neighbour / "notes.txt").read_text() == "precious"
    out = tmp_path / "graded"
    assert (
        oct(out.stat().st_mode & 0o777) == "0o700" and oct((out / "images").stat().st_mode & 0o777) == "0o700"
    )
    for f in [out / "labels.csv", out / "ungradable.csv", *(out / "images").iterdir()]:
        assert oct(f.stat().st_mode & 0o777) == "0o600", f
    [row] = read_labels_rows(out / "labels.csv")
    assert row["received_at"].endswith("+00:00")  # UTC, on SQLite as on PostgreSQL
    with session_scope(url) as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.action == "grader_grade.export")).all()
        assert event.detail is not None and event.detail["folder"] == str(out.resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    refused = _export("--out", str(tmp_path / "link"))
    assert refused.exit_code == 2 and "symbolic link" in refused.output
    assert list(elsewhere.iterdir()) == []
    inside = _export("--out", str(get_settings().store_path / "exported"))
    assert inside.exit_code == 2 and "inside the store" in inside.output
    assert not (get_settings().store_path / "exported").exists()

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    dot = _export("--out", ".")
    assert dot.exit_code == 0, dot.output
    assert (here / "labels.csv").is_file() and len(list((here / "images").iterdir())) == 1
    assert oct(here.stat().st_mode & 0o777) == "0o700"  # an existing folder made private too
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_an_export_that_fails_leaves_nothing_and_audits_nothing(
    client: TestClient,
    url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, _, ids = scored
    for image_id in ids:
        _grade(client, north, image_id, 2)
    copied: list[str] = []

    def copy_then_fail(src: Any, dst: Any) -> None:
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(str(dst))
        shutil.copyfile(src, dst)

    monkeypatch.setattr("core.graded_export.shutil.copyfile", copy_then_fail)
    exports = tmp_path / "exports"
    exports.mkdir()
    done = _export("--out", str(exports / "graded"))
    assert done.exit_code == 2 and "No space left on device" in done.output
    assert copied and list(exports.iterdir()) == []  # neither the folder nor its temporary
    with session_scope(url) as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "grader_grade.export")).all() == []
