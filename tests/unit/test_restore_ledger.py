"""The restore ledger (core.ledger): erasures and key revocations made after a backup are done again
by its restore, through the CLI an operator runs; never an erasure that did not happen, and never
one a later backup already holds. On SQLite here; tests/integration/test_backup_pg.py runs the main
ones on PostgreSQL."""

from __future__ import annotations

import errno
import json
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli.main import app
from core import backup, heartbeat, ledger, ledger_replay, retention
from core import repository as repo
from core.db import dispose_engines, get_sessionmaker, session_scope
from core.deployment_key import KEY_FILE
from core.errors import Unavailable
from core.settings import get_settings
from core.tables import ApiKey, AuditEvent, Image, Patient, as_utc, utcnow
from tests.api_support import make_key
from tests.unit.test_backup import _deployment
from tests.unit.test_workers_scoring import add_images, photo

runner = CliRunner()


def _patients(url: str) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(select(Patient.external_id)))


def _files_of(url: str, patient: str) -> list[str]:
    with session_scope(url) as s:
        stmt = select(Image.stored_path).join(Patient, Image.patient_id == Patient.id)
        return list(s.scalars(stmt.where(Patient.external_id == patient)))


def _erase(patient: str, clinic: str = "North") -> None:
    erased = runner.invoke(app, ["data", "erase", patient, "--clinic", clinic, "--yes", "--force"])
    assert erased.exit_code == 0, erased.output


def _backup(folder: Path) -> Path:
    taken = runner.invoke(app, ["db", "backup", str(folder)])
    assert taken.exit_code == 0, taken.output
    return folder


def _restore(folder: Path) -> str:
    dispose_engines()  # the service stopped: no session of ours left on the database
    restored = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert restored.exit_code == 0, restored.output
    return restored.output


def _erase_with_a_failed_commit(patient: str) -> Any:
    """``drscreen data erase`` whose commit fails after the ledger's own hook wrote the line."""

    def commit_fails(session: Session) -> None:
        if session.info.get("drscreen.ledger.written"):
            raise OSError("the connection was lost at COMMIT")

    event.listen(Session, "before_commit", commit_fails)
    try:
        return runner.invoke(app, ["data", "erase", patient, "--clinic", "North", "--yes", "--force"])
    finally:
        event.remove(Session, "before_commit", commit_fails)


def _erase_with_its_confirmation_lost(patient: str) -> None:
    """An erasure committed, its ``committed`` line never written (the process died in between)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger, "mark", lambda *_args: (_ for _ in ()).throw(OSError("killed")))
        _erase(patient)


def _revoked_at(url: str, key_id: int) -> datetime | None:
    with session_scope(url) as s:
        at = s.scalar(select(ApiKey.revoked_at).where(ApiKey.id == key_id))
        return None if at is None else as_utc(at)


def _ledger(url: str) -> ledger.Ledger:
    return ledger.read_ledger(get_settings().store_path / ledger.LEDGER_FILE)


def test_erasures_and_revocations_after_a_backup_are_done_again_by_its_restore(
    url: str, tmp_path: Path
) -> None:
    store, _ids = _deployment(url)
    leaked = make_key(url, "North")
    files = _files_of(url, "A1")
    folder = _backup(tmp_path / "backup")

    _erase("A1")  # after the backup
    add_images(url, store, "C3", [photo("19_left.jpg")])
    _erase("C3")  # sent and erased after the backup: not in it
    assert runner.invoke(app, ["keys", "revoke", str(leaked.key_id)]).exit_code == 0
    revoked_at = _revoked_at(url, leaked.key_id)
    lines = _ledger(url)
    assert [e.kind for e in lines.confirmed()] == ["erasure", "erasure", "revocation"]
    assert lines.unconfirmed() == []
    text = (store.root / ledger.LEDGER_FILE).read_text()
    assert "A1" not in text and "C3" not in text  # no patient id in the ledger, as in the audit rows

    output = _restore(folder)
    assert "done again from the restore ledger: 1 patient erasure(s) and 1 API key revocation(s)" in output
    assert _patients(url) == {"B2"}
    again_at = _revoked_at(url, leaked.key_id)
    assert again_at is not None and revoked_at is not None
    assert abs((again_at - revoked_at).total_seconds()) < 1  # dated as the revocation, not the restore
    assert not any(store.path(f).exists() for f in files)  # put back by the restore, then removed
    with session_scope(url) as s:
        erasures = list(
            s.scalars(select(AuditEvent.detail).where(AuditEvent.action == retention.ERASE_ACTION))
        )
    assert [d["by"] for d in erasures] == ["restore"]  # the snapshot had no erasure; this one is new

    # nothing left to do: replaying the ledger again changes nothing
    again = runner.invoke(app, ["db", "replay-ledger"])
    assert again.exit_code == 0 and "0 patient erasure(s) and 0 API key revocation(s)" in again.output
    assert _patients(url) == {"B2"}


def test_an_erasure_the_backup_already_holds_is_not_done_again(url: str, tmp_path: Path) -> None:
    """A patient erased, then sent again before the backup: the new photographs stay."""
    store, _ids = _deployment(url)
    _erase("A1")
    add_images(url, store, "A1", [photo("19_left.jpg")])  # the clinic sends the patient again
    output = _restore(_backup(tmp_path / "backup"))
    assert "0 patient erasure(s)" in output
    assert _patients(url) == {"A1", "B2"}


# ------------------------------------------- the review: database ids are given again after a restore


def test_a_patient_sent_again_after_a_restore_survives_the_next(url: str, tmp_path: Path) -> None:
    """The review: audit ids roll back with a restore, so a line matched by its audit id looked
    undone forever, and the next restore erased the patient the clinic had sent again."""
    store, _ids = _deployment(url)
    older = _backup(tmp_path / "older")
    with session_scope(url) as s:  # audited reads after the backup: the audit ids move on
        for _ in range(5):
            repo.record_audit(s, action="patient.read", clinic_id=1)
    _erase("A1")
    add_images(url, store, "C3", [photo("19_left.jpg")])
    _erase("C3")
    assert "1 patient erasure(s)" in _restore(older)
    assert _patients(url) == {"B2"}
    add_images(url, store, "A1", [photo("19_left.jpg")])  # both screened again, later
    add_images(url, store, "C3", [photo("16_left.jpg")])
    output = _restore(_backup(tmp_path / "newer"))
    assert "0 patient erasure(s)" in output
    assert _patients(url) == {"A1", "B2", "C3"}


def test_an_older_backup_then_a_newer_one_keeps_what_the_newer_holds(url: str, tmp_path: Path) -> None:
    store, _ids = _deployment(url)
    older = _backup(tmp_path / "older")
    _erase("A1")
    add_images(url, store, "A1", [photo("19_left.jpg")])  # sent again after the erasure
    newer = _backup(tmp_path / "newer")
    assert "1 patient erasure(s)" in _restore(older)
    assert _patients(url) == {"B2"}
    assert "0 patient erasure(s)" in _restore(newer)
    assert _patients(url) == {"A1", "B2"}


def test_a_clinic_id_given_again_does_not_carry_another_clinics_erasure(url: str, tmp_path: Path) -> None:
    store, _ids = _deployment(url)  # clinic North
    older = _backup(tmp_path / "older")
    add_images(url, store, "1001", [photo("19_left.jpg")], clinic="East")  # a clinic after the backup
    _erase("1001", clinic="East")
    _restore(older)
    add_images(url, store, "1001", [photo("16_left.jpg")], clinic="West")  # East's id, West's patient
    _restore(_backup(tmp_path / "newer"))
    assert "1001" in _patients(url)
    # and even where the replay's own record is missing, the clinic's name must match
    with session_scope(url) as s:
        [line] = [e for e in _ledger(url).confirmed() if e.clinic == "East"]
        done = ledger_replay.replay(
            s, ledger.Ledger([line, *_committed(line)]), keys=_keys(), store_dir=_store(), key=None
        )
    assert done.erasures == 0 and "1001" in _patients(url)


def _committed(entry: ledger.Entry) -> list[ledger.Entry]:
    return [ledger.Entry(id="c", at=entry.at, kind=ledger.COMMITTED, of=[entry.id])]


def _store() -> Path:
    return get_settings().store_path


def _keys() -> dict[str, bytes]:
    return backup._store_keys(_store())


# -------------------------------------------------------- commits that fail, writes that are cut short


def test_an_erasure_whose_commit_failed_is_never_done_by_a_restore(url: str, tmp_path: Path) -> None:
    """The review: the line is written before the commit; a commit that then failed left a line a
    later restore carried out (on a patient the clinic went on sending). The failed commit's line
    is settled when it fails, by asking the database again: void."""
    store, _ids = _deployment(url)
    failed = _erase_with_a_failed_commit("A1")
    assert failed.exit_code != 0 and _patients(url) == {"A1", "B2"}
    lines = _ledger(url)
    assert lines.unconfirmed() == [] == lines.confirmed() and [e.kind for e in lines.actions()] == ["erasure"]
    add_images(url, store, "A1", [photo("19_left.jpg")])  # the clinic keeps screening A1
    output = _restore(_backup(tmp_path / "backup"))
    assert "0 patient erasure(s)" in output and "WARNING" not in output, output
    assert _patients(url) == {"A1", "B2"}


def test_a_crash_between_line_and_commit_leaves_the_line_undecided_and_said(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fourth review: a database that lacks a line may not be the one it was made on, so no
    restore voids it (an earlier rule voided committed erasures); it is not done, and said at
    every restore, until a database that holds it settles it."""
    _deployment(url)
    folder = _backup(tmp_path / "backup")
    monkeypatch.setattr(ledger, "_settle_failed_commit", lambda *_a: None)  # the process died
    _erase_with_a_failed_commit("A1")
    monkeypatch.undo()
    for _ in range(2):
        output = _restore(folder)
        assert "WARNING: 1 erasure(s) of the restore ledger have no confirmed commit" in output, output
        assert _patients(url) == {"A1", "B2"}


def test_a_committed_erasure_whose_confirmation_was_lost_is_still_done(url: str, tmp_path: Path) -> None:
    """The process died between the commit and its confirmation: the database it committed to
    holds the line, so the restore confirms it and erases again."""
    _deployment(url)
    folder = _backup(tmp_path / "backup")
    _erase_with_its_confirmation_lost("A1")
    assert [e.kind for e in _ledger(url).unconfirmed()] == ["erasure"]
    assert "1 patient erasure(s)" in _restore(folder)
    assert _patients(url) == {"B2"}


def test_an_unconfirmed_erasure_with_its_database_lost_is_reported_not_done(url: str, tmp_path: Path) -> None:
    _deployment(url)
    folder = _backup(tmp_path / "backup")
    _erase_with_its_confirmation_lost("A1")
    dispose_engines()
    Path(url.removeprefix("sqlite:///")).unlink()  # the machine's database is lost
    output = _restore(folder)
    assert "WARNING: 1 erasure(s) of the restore ledger have no confirmed commit" in output, output
    assert _patients(url) == {"A1", "B2"}


def test_a_write_cut_short_leaves_no_half_line_behind(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review: a disk filling up mid-line left half a line, the next line was glued to it, and
    every later restore refused the ledger (a committed erasure inside the unreadable line)."""
    store, _ids = _deployment(url)
    path = store.root / ledger.LEDGER_FILE
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes", "--force"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert refused.exit_code == 2 and "No space left on device" in refused.output, refused.output
    assert str(store.root) not in refused.output  # the server's paths go to its log only
    assert not path.exists() or path.read_bytes() == b""  # cut back to where it was
    assert _patients(url) == {"A1", "B2"}

    path.write_bytes(b'{"at": "2026-12-07T00:00:00", "id": "x')  # a crash mid-line: never committed
    assert _ledger(url).lines == []  # an unterminated last line is not read
    _erase("A1")
    data = path.read_bytes()
    assert data.endswith(b"\n") and b'"id": "x' not in data  # the next append removed it
    assert [e.kind for e in _ledger(url).confirmed()] == ["erasure"]


def test_a_commit_retried_after_the_ledger_failed_writes_the_line(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: the lines were taken off the session before they were written, so a retried
    commit went through without its line."""
    _deployment(url)
    session = get_sessionmaker(url)()
    try:
        retention.erase_patient(session, 1, "A1", force=True)
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(Unavailable):
            session.commit()
        monkeypatch.undo()
        session.commit()
    finally:
        session.close()
    assert _patients(url) == {"B2"}
    assert [e.kind for e in _ledger(url).confirmed()] == ["erasure"]


# ---------------------------------------------------------------- where a line may be written, and read


def test_a_preview_records_nothing_and_an_unwritable_ledger_refuses_the_erasure(url: str) -> None:
    store, _ids = _deployment(url)
    path = store.root / ledger.LEDGER_FILE
    preview = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--force"], input="n\n")
    assert preview.exit_code != 0 and not path.exists()  # asked, refused: rolled back, no line

    path.mkdir()  # cannot be appended to
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes", "--force"])
    assert refused.exit_code == 2 and "restore ledger" in refused.output, refused.output
    assert _patients(url) == {"A1", "B2"}  # nothing erased without its line
    key = make_key(url, "North")  # a revocation is done all the same, said (the third review)
    revoked = runner.invoke(app, ["keys", "revoke", str(key.key_id)])
    assert revoked.exit_code == 0 and "WARNING: not recorded in the restore ledger" in revoked.output
    assert _revoked_at(url, key.key_id) is not None


def test_no_erasure_away_from_the_deployments_store(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: on a machine without the store, a revocation went to a ledger made on the spot
    (and an erasure made a deployment key there too), which no restore reads. Erasures are
    refused there; a revocation is done with a WARNING; nothing is made."""
    _deployment(url)
    key = make_key(url, "North")
    elsewhere = tmp_path / "laptop" / "var" / "store"
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(elsewhere))
    get_settings.cache_clear()
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes"])
    assert refused.exit_code == 2 and "does not exist on this machine" in refused.output, refused.output
    revoked = runner.invoke(app, ["keys", "revoke", str(key.key_id)])
    assert revoked.exit_code == 0 and "WARNING: not recorded in the restore ledger" in revoked.output
    assert not elsewhere.exists() and _revoked_at(url, key.key_id) is not None and "A1" in _patients(url)

    # a store of its own, while the live workers use another one
    elsewhere.mkdir(parents=True)
    (elsewhere / KEY_FILE).write_text(secrets.token_hex(32) + "\n")
    now = utcnow()
    beat = {"host": "w1", "pid": 1, "started_at": now, "seen_at": now, "interval_s": 30.0}
    beat["settings"] = {heartbeat.STORE_IDENTITY: "0123456789ab"}
    with session_scope(url) as s:
        repo.record_heartbeat(s, "worker@w1", beat)
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes"])
    assert refused.exit_code == 2 and "is not the live workers'" in refused.output, refused.output


def test_a_ledger_that_cannot_be_read_stops_the_restore_before_the_database(url: str, tmp_path: Path) -> None:
    store, _ids = _deployment(url)
    folder = _backup(tmp_path / "backup")
    _erase("A1")
    path = store.root / ledger.LEDGER_FILE
    path.write_text(path.read_text() + "{not json\n")
    dispose_engines()
    refused = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert refused.exit_code == 2 and "line 3: not a ledger line" in refused.output, refused.output
    assert _patients(url) == {"B2"}  # the database was not replaced
    taken = runner.invoke(app, ["db", "backup", str(folder)])
    assert taken.exit_code == 0 and "WARNING: the store's restore ledger cannot be read" in taken.output
    assert "keeps its previous copy" in taken.output  # not overwritten by the damaged one
    assert runner.invoke(app, ["db", "verify-backup", str(folder)]).exit_code == 0
    copy = folder / "store" / ledger.LEDGER_FILE
    copy.write_text("{not json\n")  # the copy itself damaged
    verify = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert verify.exit_code == 1 and "ledger.jsonl" in verify.output, verify.output
    # a newer release's field is read past; a kind this release does not know is refused
    path.write_text(json.dumps({"id": "n", "at": "x", "kind": "committed", "of": [], "later": 1}) + "\n")
    assert _ledger(url).lines[0].id == "n"
    path.write_text(json.dumps({"id": "n", "at": "x", "kind": "forget"}) + "\n")
    with pytest.raises(ValueError, match="a kind this release does not know"):
        _ledger(url)


def test_a_backup_carries_the_ledger_and_a_restore_merges_it(url: str, tmp_path: Path) -> None:
    """The store is lost with the machine: the backup's copy of the ledger comes back with it, so a
    later restore of an older backup still knows the erasures between the two."""
    store, _ids = _deployment(url)
    older = _backup(tmp_path / "older")
    _erase("A1")
    newer = _backup(tmp_path / "newer")
    copied = ledger.read_ledger(newer / "store" / ledger.LEDGER_FILE)
    assert [e.kind for e in copied.confirmed()] == ["erasure"]
    assert "A1" not in (newer / "store" / ledger.LEDGER_FILE).read_text()

    (store.root / ledger.LEDGER_FILE).unlink()  # the store lost (its key stays: the same deployment)
    _restore(newer)
    assert (store.root / ledger.LEDGER_FILE).is_file()
    assert "1 patient erasure(s)" in _restore(older)
    assert _patients(url) == {"B2"}


def test_an_erasure_keyed_with_the_key_a_restore_replaced_is_still_found(url: str, tmp_path: Path) -> None:
    """The store's key differed from the backup's (a new store): the restore puts the backup's key
    in place, and the erasure recorded with the replaced one is still matched."""
    store, _ids = _deployment(url)
    folder = _backup(tmp_path / "backup")
    (store.root / KEY_FILE).write_text(secrets.token_hex(32) + "\n")
    _erase("A1")
    output = _restore(folder)
    assert "deployment key was replaced" in output and "1 patient erasure(s)" in output, output
    assert _patients(url) == {"B2"}

    # with the replaced key gone, the line cannot be matched: said, not skipped silently
    for replaced in store.root.glob(f".{KEY_FILE}.replaced-*"):
        replaced.unlink()
    output = _restore(folder)
    assert "1 erasure(s) of the ledger were recorded with a deployment key neither" in output, output
    assert _patients(url) == {"A1", "B2"}


# ---------------------------------------------------------------------------- a replay that did not run


def test_until_the_replay_has_run_the_service_does_not_start(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: a replay failing inside the restore said "nothing was changed" although the
    database was replaced, and nothing kept the API from serving the erased patient again."""
    _deployment(url)
    folder = _backup(tmp_path / "backup")
    _erase("A1")

    def fails(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backup, "replay", fails)
    dispose_engines()
    failed = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    monkeypatch.undo()
    assert failed.exit_code == 2, failed.output
    assert "the database was restored, but the erasures and key revocations" in failed.output
    assert "nothing was changed" not in failed.output
    for command in (["serve"], ["worker"]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "a restore has not finished" in refused.output, refused.output
    status = runner.invoke(app, ["status"])
    assert status.exit_code == 1 and "db replay-ledger" in status.output
    done = runner.invoke(app, ["db", "replay-ledger"])
    assert done.exit_code == 0 and "1 patient erasure(s)" in done.output
    assert not (get_settings().store_path / ledger.PENDING_FILE).exists()
    assert _patients(url) == {"B2"}


def test_an_upgrade_runs_the_replay_an_older_schemas_restore_left(url: str, tmp_path: Path) -> None:
    _deployment(url)
    _erase("A1")
    (get_settings().store_path / ledger.PENDING_FILE).touch()  # as a restore of an older schema leaves it
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0 and "done again from the restore ledger" in upgraded.output, (
        upgraded.output
    )
    assert not (get_settings().store_path / ledger.PENDING_FILE).exists()


def test_one_clinics_patients_are_digested_once_per_replay(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review: every line recomputed every patient's digest (50k patients, 300 lines: 57 s)."""
    _deployment(url)
    lines = []
    for n in range(5):  # patients the snapshot does not hold
        entry = ledger.erasure_entry(
            clinic_id=1,
            clinic="North",
            patient_hmac=f"h{n}",
            key_id=next(iter(_keys())),
        )
        lines += [entry, *_committed(entry)]
    calls = []
    real = ledger_replay._patients_by_digest
    monkeypatch.setattr(ledger_replay, "_patients_by_digest", lambda *a: calls.append(a) or real(*a))
    with session_scope(url) as s:
        done = ledger_replay.replay(s, ledger.Ledger(lines), keys=_keys(), store_dir=_store(), key=None)
    assert done.erasures == 0 and len(calls) == 1


# ------------------------------------------------------------------------------- the second review


def test_unconfirmed_lines_are_not_settled_against_another_database(url: str, tmp_path: Path) -> None:
    """The second review: restoring onto a freshly migrated database (docker-compose's `migrate`
    runs `db upgrade` first) found every unconfirmed line void there, and a committed erasure was
    never done again. A database that lacks the line cannot tell: undecided, reported."""
    _deployment(url)
    folder = _backup(tmp_path / "backup")
    _erase_with_its_confirmation_lost("A1")
    dispose_engines()
    Path(url.removeprefix("sqlite:///")).unlink()  # the database lost; a new one made empty
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    output = _restore(folder)
    assert "WARNING: 1 erasure(s) of the restore ledger have no confirmed commit" in output, output
    assert [e.kind for e in _ledger(url).unconfirmed()] == ["erasure"]  # not void: still undecided


def test_a_committed_mark_wins_over_a_void_one() -> None:
    """The second review: a restore forced beside a running API can read the database between a
    line and its commit (void), while `committed` is written only after a real commit."""
    line = ledger.erasure_entry(clinic_id=1, clinic="North", patient_hmac="h", key_id="k")
    marks = [
        ledger.Entry(id="v", at=line.at, kind=ledger.VOID, of=[line.id]),
        ledger.Entry(id="c", at=line.at, kind=ledger.COMMITTED, of=[line.id]),
    ]
    assert ledger.Ledger([line, *marks]).confirmed() == [line]
    assert ledger.Ledger([line, marks[0]]).confirmed() == [] == ledger.Ledger([line, marks[0]]).unconfirmed()


def test_a_folder_that_is_not_the_deployments_store_takes_no_line(url: str, tmp_path: Path) -> None:
    """The second review: with no live worker, any existing folder passed as the store (every
    container of the Docker image has one) and got a key and a ledger. A folder without the
    deployment key is refused for erasures; a revocation is done all the same, with a WARNING (a
    leaked key must not stay usable: the third review); nothing is made in the folder."""
    _deployment(url)
    key = make_key(url, "North")
    stray = tmp_path / "other" / "store"
    stray.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DRSCREEN_STORE_DIR", str(stray))
        get_settings.cache_clear()
        refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes", "--force"])
        assert refused.exit_code == 2 and "holds no deployment key" in refused.output, refused.output
        revoked = runner.invoke(app, ["keys", "revoke", str(key.key_id)])
        assert revoked.exit_code == 0 and "WARNING: not recorded in the restore ledger" in revoked.output
        replay = runner.invoke(app, ["db", "replay-ledger"])
        assert replay.exit_code == 2 and "holds no deployment key" in replay.output, replay.output
    get_settings.cache_clear()
    assert list(stray.iterdir()) == [] and "A1" in _patients(url)
    assert _revoked_at(url, key.key_id) is not None


def test_a_clinic_is_told_no_more_than_that_the_store_must_be_checked(
    client: Any, url: str, tmp_path: Path
) -> None:
    _deployment(url)
    key = make_key(url, "North")
    now = utcnow()
    beat = {"host": "w1", "pid": 1, "started_at": now, "seen_at": now, "interval_s": 30.0}
    beat["settings"] = {heartbeat.STORE_IDENTITY: "0123456789ab"}  # a live worker on another store
    with session_scope(url) as s:
        repo.record_heartbeat(s, "worker@w1", beat)
        s.execute(Image.__table__.update().values(status="done"))
    refused = client.delete("/v1/patients/A1", headers=key.headers)
    assert refused.status_code == 503, refused.text
    assert str(get_settings().store_path) not in refused.text and "0123456789ab" not in refused.text


def test_a_restore_that_fails_putting_files_back_says_so_and_is_run_again(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second review: a disk filling up while the files were put back gave a traceback; the
    marker then pointed at `db replay-ledger`, which cleared it with the photographs missing."""
    store, _ids = _deployment(url)
    folder = _backup(tmp_path / "backup")
    names = {p.name for p in (folder / "store").rglob("*") if p.is_file() and p.name != KEY_FILE}
    for path in store.root.rglob("*"):
        if path.name in names:
            path.unlink()
    monkeypatch.setattr(
        backup, "_copy", lambda *_a, **_k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    dispose_engines()
    failed = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    monkeypatch.undo()
    assert failed.exit_code == 2 and "the database was restored, but not the rest" in failed.output, (
        failed.output
    )
    for command in (["serve"], ["db", "replay-ledger"]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "run `drscreen db restore`" in refused.output, refused.output
    _restore(folder)
    assert not (store.root / ledger.PENDING_FILE).exists()
    assert all(any(store.root.rglob(name)) for name in names)


def test_a_backups_copy_of_the_ledger_never_shrinks(url: str, tmp_path: Path) -> None:
    """The second review: the store's ledger lost, the next backup overwrote the copy, and a
    restore of an older backup then brought back a patient erased in between."""
    store, _ids = _deployment(url)
    older = _backup(tmp_path / "older")
    _erase("A1")
    daily = _backup(tmp_path / "daily")
    (store.root / ledger.LEDGER_FILE).unlink()  # lost
    _erase("B2")
    again = runner.invoke(app, ["db", "backup", str(daily)])
    assert again.exit_code == 0 and "lacks 2 line(s) this backup's copy has" in again.output, again.output
    _restore(daily)
    _restore(older)
    assert _patients(url) == set()


def test_an_older_schemas_backup_is_replayed_by_the_upgrade_after_its_restore(
    url: str, tmp_path: Path
) -> None:
    """The third review: with a lineage per database (since removed), the upgrade after restoring
    a backup of an older schema gave it a new lineage and every later erasure came back. End to
    end: old schema, backup, upgrade, erase, restore, upgrade: the patient stays erased."""
    from alembic import command

    from core.migrate import alembic_config

    _deployment(url)
    dispose_engines()
    command.downgrade(alembic_config(url), "4c8a1e7f2b90")  # the schema before this release's last
    older = _backup(tmp_path / "older")
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    _erase("A1")
    output = _restore(older)
    assert "the backup's schema is older" in output and _patients(url) == {"A1", "B2"}
    refused = runner.invoke(app, ["serve"])
    assert refused.exit_code == 2 and "not starting" in refused.output, refused.output
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0 and "1 patient erasure(s)" in upgraded.output, upgraded.output
    assert _patients(url) == {"B2"}
    assert not (get_settings().store_path / ledger.PENDING_FILE).exists()


# ------------------------------------------------------------------------------- the fourth review


def test_a_lost_key_is_not_replaced_by_an_erasure(url: str, tmp_path: Path) -> None:
    """The fourth review: with the key lost, an erasure made a new one, and copying the old key
    back (as the README said) left its line matchable by no key: the patient came back, unnamed."""
    store, _ids = _deployment(url)
    _erase("B2")  # an erasure recorded with the deployment key
    key = (store.root / KEY_FILE).read_bytes()
    (store.root / KEY_FILE).unlink()
    refused = runner.invoke(app, ["data", "erase", "A1", "--clinic", "North", "--yes", "--force"])
    assert refused.exit_code == 2 and "the deployment key is missing" in refused.output, refused.output
    assert not (store.root / KEY_FILE).exists() and "A1" in _patients(url)
    (store.root / KEY_FILE).write_bytes(key)  # copied back from a backup
    _erase("A1")
    assert _patients(url) == set()


def test_a_deployment_that_never_had_a_key_is_not_stuck_after_a_restore(url: str, tmp_path: Path) -> None:
    """The fourth review: restoring a deployment where no worker ever started (no key, no erasure)
    left the marker for good: replay-ledger refused for want of a key."""
    key = make_key(url, "North")
    folder = _backup(tmp_path / "backup")
    assert not (get_settings().store_path / KEY_FILE).exists()
    output = _restore(folder)
    assert "done again from the restore ledger: 0 patient erasure(s)" in output
    assert not (get_settings().store_path / ledger.PENDING_FILE).exists()
    assert _revoked_at(url, key.key_id) is None


def test_an_unconfirmed_erasure_the_restored_database_holds_is_not_reported(url: str, tmp_path: Path) -> None:
    """The fourth review: the confirmation lost, a backup taken after the erasure holds it; the
    restore warned about it all the same, at every restore."""
    _deployment(url)
    _erase_with_its_confirmation_lost("A1")
    folder = _backup(tmp_path / "backup")
    dispose_engines()
    Path(url.removeprefix("sqlite:///")).unlink()  # lost: the replaced database cannot answer
    output = _restore(folder)
    assert "WARNING" not in output and _patients(url) == {"B2"}, output
    assert _ledger(url).unconfirmed() == []  # the restored database held it: committed


def test_a_revocation_into_a_folder_without_a_key_is_not_recorded_there(url: str, tmp_path: Path) -> None:
    """The fourth review: on a deployment that names no photograph yet, an empty folder took the
    revocation's line silently."""
    key = make_key(url, "North")
    stray = tmp_path / "empty"
    stray.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DRSCREEN_STORE_DIR", str(stray))
        get_settings.cache_clear()
        revoked = runner.invoke(app, ["keys", "revoke", str(key.key_id)])
    get_settings.cache_clear()
    assert revoked.exit_code == 0 and "WARNING: not recorded in the restore ledger" in revoked.output
    assert list(stray.iterdir()) == [] and _revoked_at(url, key.key_id) is not None


def test_a_keyed_erasure_is_seen_behind_older_erasures_without_a_key(url: str) -> None:
    """The migration review (session 29): 50 unordered erasure rows were read, so 60 erasures from
    before deployment keys hid a keyed one, and a lost key would have been replaced silently."""
    with session_scope(url) as s:
        s.add_all(
            AuditEvent(action=ledger.ERASE_ACTION, detail={"patient_sha256": f"{i:064x}"}) for i in range(60)
        )
    with session_scope(url) as s:
        assert not ledger._key_existed(s)
        s.add(AuditEvent(action=ledger.ERASE_ACTION, detail={ledger.KEY_ID_FIELD: "k1"}))
        s.flush()
        assert ledger._key_existed(s)
