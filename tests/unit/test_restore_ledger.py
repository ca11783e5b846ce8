"""The restore ledger (core.ledger): erasures and key revocations made after a backup are done again
by its restore, through the CLI an operator runs. On SQLite here; tests/integration/test_backup_pg.py
runs the same tests on PostgreSQL."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from core import ledger
from core.db import dispose_engines, session_scope
from core.deployment_key import KEY_FILE
from core.retention import ERASE_ACTION
from core.tables import ApiKey, AuditEvent, Image, Patient
from tests.api_support import make_key
from tests.unit.test_backup import _deployment
from tests.unit.test_workers_scoring import add_images, photo

runner = CliRunner()


def _patients(url: str) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(select(Patient.external_id)))


def _files_of(url: str, patient: str) -> list[str]:
    with session_scope(url) as s:
        return list(
            s.scalars(
                select(Image.stored_path)
                .join(Patient, Image.patient_id == Patient.id)
                .where(Patient.external_id == patient)
            )
        )


def _erase(patient: str) -> None:
    erased = runner.invoke(app, ["data", "erase", patient, "--clinic", "North", "--yes", "--force"])
    assert erased.exit_code == 0, erased.output


def _restore(folder: Path) -> str:
    dispose_engines()  # the service stopped: no session of ours left on the database
    restored = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert restored.exit_code == 0, restored.output
    return restored.output


def _revoked(url: str, key_id: int) -> bool:
    with session_scope(url) as s:
        return s.scalar(select(ApiKey.revoked_at).where(ApiKey.id == key_id)) is not None


def test_erasures_and_revocations_after_a_backup_are_done_again_by_its_restore(
    url: str, tmp_path: Path
) -> None:
    store, _ids = _deployment(url)
    leaked = make_key(url, "North")
    files = _files_of(url, "A1")
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0

    _erase("A1")  # after the backup
    add_images(url, store, "C3", [photo("19_left.jpg")])
    _erase("C3")  # sent and erased after the backup: not in it
    assert runner.invoke(app, ["keys", "revoke", str(leaked.key_id)]).exit_code == 0
    lines = ledger.read_ledger(store.root / ledger.LEDGER_FILE)
    assert [e.kind for e in lines] == ["erasure", "erasure", "revocation"]
    text = (store.root / ledger.LEDGER_FILE).read_text()
    assert "A1" not in text and "C3" not in text  # no patient id in the ledger, as in the audit rows

    output = _restore(folder)
    assert "done again from the restore ledger: 1 patient erasure(s) and 1 API key revocation(s)" in output
    assert _patients(url) == {"B2"}
    assert _revoked(url, leaked.key_id)
    assert not any(store.path(f).exists() for f in files)  # put back by the restore, then removed
    with session_scope(url) as s:
        details = list(s.scalars(select(AuditEvent.detail).where(AuditEvent.action == ERASE_ACTION)))
    assert [d["by"] for d in details] == ["restore"]  # the snapshot had no erasure; this one is new

    # nothing left to do: replaying the ledger again changes nothing
    again = runner.invoke(app, ["db", "replay-ledger"])
    assert again.exit_code == 0 and "0 patient erasure(s) and 0 API key revocation(s)" in again.output
    assert _patients(url) == {"B2"}


def test_an_erasure_the_backup_already_holds_is_not_done_again(url: str, tmp_path: Path) -> None:
    """A patient erased, then sent again before the backup: the new photographs stay."""
    store, _ids = _deployment(url)
    _erase("A1")
    add_images(url, store, "A1", [photo("19_left.jpg")])  # the clinic sends the patient again
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    output = _restore(folder)
    assert "0 patient erasure(s)" in output
    assert _patients(url) == {"A1", "B2"}


def test_a_preview_records_nothing_and_an_unwritable_ledger_refuses_the_erasure(url: str) -> None:
    store, _ids = _deployment(url)
    path = store.root / ledger.LEDGER_FILE
    preview = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--force"], input="n\n")
    assert preview.exit_code != 0 and not path.exists()  # asked, refused: rolled back, no line

    path.mkdir()  # cannot be appended to
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes", "--force"])
    assert refused.exit_code == 2 and "restore ledger" in refused.output, refused.output
    assert _patients(url) == {"A1", "B2"}  # nothing erased without its line
    key = make_key(url, "North")
    revoked = runner.invoke(app, ["keys", "revoke", str(key.key_id)])
    assert revoked.exit_code == 2 and not _revoked(url, key.key_id), revoked.output


def test_an_erasure_keyed_with_the_key_a_restore_replaced_is_still_found(url: str, tmp_path: Path) -> None:
    """The store's key differed from the backup's (a new store): the restore puts the backup's key
    in place, and the erasure recorded with the replaced one is still matched."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    (store.root / KEY_FILE).write_text(secrets.token_hex(32) + "\n")
    _erase("A1")
    output = _restore(folder)
    assert "deployment key was replaced" in output and "1 patient erasure(s)" in output, output
    assert _patients(url) == {"B2"}

    # with the replaced key gone, its line cannot be matched: said, not skipped silently; the
    # first restore's own erasure of A1 (a line keyed with the backup's key) still finds them
    for replaced in store.root.glob(f".{KEY_FILE}.replaced-*"):
        replaced.unlink()
    output = _restore(folder)
    assert "1 erasure(s) of the ledger were recorded with a deployment key neither" in output, output
    assert "1 patient erasure(s)" in output
    assert _patients(url) == {"B2"}


def test_a_ledger_that_cannot_be_read_stops_the_restore_before_the_database(url: str, tmp_path: Path) -> None:
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    _erase("A1")
    path = store.root / ledger.LEDGER_FILE
    path.write_text(path.read_text() + "{not json\n")
    dispose_engines()
    refused = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert refused.exit_code == 2 and "line 2: not a ledger entry" in refused.output, refused.output
    assert _patients(url) == {"B2"}  # the database was not replaced

    (folder / "store" / ledger.LEDGER_FILE).write_text("[]\n")
    verify = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert verify.exit_code == 1 and "ledger.jsonl" in verify.output, verify.output


def test_a_backup_carries_the_ledger_and_a_restore_merges_it(url: str, tmp_path: Path) -> None:
    """The store is lost with the machine: the backup's copy of the ledger comes back with it, so a
    later restore of an older backup still knows the erasures between the two."""
    store, _ids = _deployment(url)
    older = tmp_path / "older"
    assert runner.invoke(app, ["db", "backup", str(older)]).exit_code == 0
    _erase("A1")
    newer = tmp_path / "newer"
    assert runner.invoke(app, ["db", "backup", str(newer)]).exit_code == 0
    line = json.loads((newer / "store" / ledger.LEDGER_FILE).read_text())
    assert line["kind"] == "erasure" and "A1" not in json.dumps(line)

    (store.root / ledger.LEDGER_FILE).unlink()  # the store lost (its key stays: the same deployment)
    _restore(newer)
    assert (store.root / ledger.LEDGER_FILE).is_file()
    output = _restore(older)
    assert "1 patient erasure(s)" in output
    assert _patients(url) == {"B2"}
