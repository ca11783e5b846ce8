"""``drscreen data agreement`` and ``drscreen data export-graded``: the graders' grades seen by an
operator, and exported as a folder ``drscreen evaluate`` reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import AuditEvent, Image
from ml.evaluation import read_labels
from tests.api_support import Key
from tests.unit.test_grader_grades import scored  # noqa: F401  (the fixture)

runner = CliRunner()


def _grade(client: TestClient, key: Key, image_id: str, grade: int | None, who: str = "Dr A") -> None:
    answer = client.put(
        f"/v1/images/{image_id}/grader-grade", headers=key.headers, json={"grade": grade, "grader": who}
    )
    assert answer.status_code == 200, answer.text


def test_agreement_prints_what_the_api_answers(
    client: TestClient,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, _, ids = scored
    _grade(client, north, ids[0], 4)
    _grade(client, north, ids[1], 0)
    _grade(client, north, ids[2], None)
    api = client.get("/v1/agreement", headers=north.headers).json()
    done = runner.invoke(app, ["data", "agreement", "--clinic", "North", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1]) == api
    every = runner.invoke(app, ["data", "agreement", "--json"])  # every clinic: South has none
    assert json.loads(every.output.strip().splitlines()[-1])["n_images"] == 3
    text = runner.invoke(app, ["data", "agreement", "--clinic", "North"])
    assert text.exit_code == 0
    assert f"{api['model_version']}: 3 photograph(s) graded by both" in text.output
    assert "ungradable: by both 0, by the grader only 1, by the model only 0" in text.output
    for missed in api["missed_referable"]:
        assert missed in text.output
    assert runner.invoke(app, ["data", "agreement", "--clinic", "Nowhere"]).exit_code == 2
    assert runner.invoke(app, ["data", "agreement", "--model", "nope@1"]).exit_code == 2
    assert runner.invoke(app, ["data", "agreement", "--since", "12/01/2026"]).exit_code == 2


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
