"""``drscreen data audit``: a clinic's audit trail as CSV, through the real API writing it (embedded
database), and an erased patient still findable by their erasure."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from cli.main import app
from core.db import session_scope
from core.deployment_key import KEY_FILE
from core.settings import get_settings
from core.tables import ApiKey, AuditEvent
from tests.api_support import Key, make_key, sample_bytes

runner = CliRunner()


def _upload(client: TestClient, key: Key, patient: str) -> str:
    resp = client.post(
        "/v1/images",
        headers=key.headers,
        data={"patient_id": patient, "eye": "left"},
        files={"file": ("x.jpg", sample_bytes("16", "left"))},
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _audit(*args: str) -> list[dict[str, str]]:
    done = runner.invoke(app, ["data", "audit", *args])
    assert done.exit_code == 0, done.output
    text = done.stdout
    return list(csv.DictReader(io.StringIO(text)))


def test_the_audit_trail_lists_a_clinics_uploads_and_reads_oldest_first(client: TestClient, url: str) -> None:
    north, south = make_key(url, "North"), make_key(url, "South")
    with session_scope(url) as s:  # a label a spreadsheet would run as a formula
        s.execute(update(ApiKey).where(ApiKey.id == north.key_id).values(label="=HYPERLINK(1)"))
    image = _upload(client, north, "p-1")
    _upload(client, north, "p-2")
    _upload(client, south, "s-1")
    assert client.get("/v1/patients/p-1", headers=north.headers).status_code == 200

    rows = _audit("--clinic", "North")
    assert [(r["action"], r["patient_id"]) for r in rows] == [
        ("image.create", "p-1"),
        ("image.create", "p-2"),
        ("patient.read", "p-1"),
    ]
    assert rows[0]["target_id"] == image and rows[0]["key_id"] == str(north.key_id)
    assert rows[0]["key_prefix"] and rows[0]["key_prefix"] in north.key
    assert north.key not in runner.invoke(app, ["data", "audit", "--clinic", "North"]).output
    assert rows[0]["key_label"] == "'=HYPERLINK(1)"  # not a formula when the CSV is opened
    assert [r["action"] for r in _audit("--clinic", "North", "--patient", "p-1")] == [
        "image.create",
        "patient.read",
    ]
    assert [r["patient_id"] for r in _audit("--clinic", "South")] == ["s-1"]


def test_the_period_and_the_output_file(client: TestClient, url: str, tmp_path: Path) -> None:
    north = make_key(url, "North")
    _upload(client, north, "p-1")
    _upload(client, north, "p-2")
    with session_scope(url) as s:
        first = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).first()
        assert first is not None
        first.at = first.at.replace(year=2025, month=1, day=15)
    assert [r["patient_id"] for r in _audit("--clinic", "North", "--until", "2025-01-16")] == ["p-1"]
    assert [r["patient_id"] for r in _audit("--clinic", "North", "--since", "2025-01-16")] == ["p-2"]
    out = tmp_path / "audit.csv"
    done = runner.invoke(app, ["data", "audit", "--clinic", "North", "--out", str(out)])
    assert done.exit_code == 0 and f"2 audit row(s) written to {out}" in done.output
    assert len(list(csv.DictReader(out.open()))) == 2
    # the README review: a missing folder was a FileNotFoundError traceback, a folder IsADirectoryError
    deeper = tmp_path / "new" / "dir" / "audit.csv"
    done = runner.invoke(app, ["data", "audit", "--clinic", "North", "--out", str(deeper)])
    assert done.exit_code == 0 and len(list(csv.DictReader(deeper.open()))) == 2
    refused = runner.invoke(app, ["data", "audit", "--clinic", "North", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and f"cannot write {tmp_path}: {tmp_path} is a folder" in refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)


def test_an_erased_patient_is_found_by_their_erasure_only(client: TestClient, url: str) -> None:
    north = make_key(url, "North")
    _upload(client, north, "p-1")
    _upload(client, north, "p-2")
    erased = runner.invoke(app, ["data", "erase", "--clinic", "North", "p-1", "--yes", "--force"])
    assert erased.exit_code == 0, erased.output

    rows = _audit("--clinic", "North", "--patient", "p-1")
    assert [(r["action"], r["patient_id"]) for r in rows] == [("patient.erase", "p-1")]
    assert '"by": "cli:' in rows[0]["detail"]
    assert _audit("--clinic", "North", "--patient", "nobody") == []
    # the whole trail: the erased patient's upload is there, without their id
    assert [(r["action"], r["patient_id"]) for r in _audit("--clinic", "North")] == [
        ("image.create", ""),
        ("image.create", "p-2"),
        ("patient.erase", ""),
    ]


def test_wrong_options_are_one_line(url: str) -> None:
    make_key(url, "North")
    bad = runner.invoke(app, ["data", "audit", "--clinic", "North", "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since takes a date as YYYY-MM-DD" in bad.output
    unknown = runner.invoke(app, ["data", "audit", "--clinic", "Nowhere"])
    assert unknown.exit_code == 1 and "no clinic 'Nowhere'" in unknown.output


def test_an_erasure_is_found_when_the_id_came_back_or_was_never_sealed(client: TestClient, url: str) -> None:
    """The review: a patient erased and uploaded again showed only the new rows; an erasure row
    still holding the plain sha256 (before a worker sealed it) was not found; a purge of every
    clinic (no clinic on its row) was in no clinic's trail."""
    north = make_key(url, "North")
    _upload(client, north, "p-1")
    assert (
        runner.invoke(app, ["data", "erase", "--clinic", "North", "p-1", "--yes", "--force"]).exit_code == 0
    )
    _upload(client, north, "p-1")  # the same id again: a new patient
    rows = _audit("--clinic", "North", "--patient", " p-1 ")
    assert [(r["action"], r["patient_id"]) for r in rows] == [
        ("patient.erase", "p-1"),
        ("image.create", "p-1"),
    ]

    with session_scope(url) as s:  # as written before keyed digests
        erasure = s.scalars(select(AuditEvent).where(AuditEvent.action == "patient.erase")).one()
        erasure.detail = {"by": "cli:old", "patient_sha256": hashlib.sha256(b"p-1").hexdigest()}
    assert [r["action"] for r in _audit("--clinic", "North", "--patient", "p-1")] == [
        "patient.erase",
        "image.create",
    ]

    with session_scope(url) as s:
        s.add(
            AuditEvent(action="data.purge", clinic_id=None, target_type="retention", detail={"by": "cli:x"})
        )
    assert _audit("--clinic", "North")[-1]["action"] == "data.purge"


@pytest.mark.parametrize(
    ("store_key", "said"),
    [(None, "no deployment key in"), ("cd" * 32, "the erasure rows were keyed with deployment key")],
)
def test_an_erased_patient_needs_the_deployments_own_key(
    client: TestClient,
    url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_key: str | None,
    said: str,
) -> None:
    """On a machine without the store, a new key would find nothing and be left behind; with a
    store holding another key, the erased patient read "0 audit row(s)" (the review)."""
    north = make_key(url, "North")
    _upload(client, north, "p-1")
    assert (
        runner.invoke(app, ["data", "erase", "--clinic", "North", "p-1", "--yes", "--force"]).exit_code == 0
    )
    elsewhere = tmp_path / "other-store"
    if store_key is not None:
        elsewhere.mkdir()
        (elsewhere / KEY_FILE).write_text(store_key + "\n")
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(elsewhere))
    get_settings.cache_clear()
    refused = runner.invoke(app, ["data", "audit", "--clinic", "North", "--patient", "p-1"])
    assert refused.exit_code == 2 and said in refused.output, refused.output
    assert (elsewhere / KEY_FILE).exists() == (store_key is not None)  # none made
    assert [r["patient_id"] for r in _audit("--clinic", "North")] == ["", ""]  # the trail itself needs no key


def test_without_the_key_an_existing_patients_earlier_erasure_is_said_to_be_unknown(
    client: TestClient, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documentation check: the earlier erasure of an id uploaded again was left out silently."""
    north = make_key(url, "North")
    _upload(client, north, "p-1")
    assert (
        runner.invoke(app, ["data", "erase", "--clinic", "North", "p-1", "--yes", "--force"]).exit_code == 0
    )
    _upload(client, north, "p-1")
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(tmp_path / "no-key-here"))
    get_settings.cache_clear()
    done = runner.invoke(app, ["data", "audit", "--clinic", "North", "--patient", "p-1"])
    assert done.exit_code == 0 and "NOTE: no deployment key here: an earlier erasure" in done.output
