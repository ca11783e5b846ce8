"""The deployment key in the store folder (core.deployment_key): created once, private, shared by
processes that start together, and refused when it is not a key."""

from __future__ import annotations

import hashlib
import multiprocessing
import stat
from pathlib import Path

import pytest

from core import deployment_key as dk
from core import heartbeat
from core.settings import get_settings
from core.tables import WorkerHeartbeat


def _create_and_read(store: str) -> str:
    return dk.deployment_key(Path(store)).hex()


def test_the_key_is_created_once_private_and_stable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert dk.fingerprint(store) == "none" and not store.exists(), "reading must not create"
    key = dk.deployment_key(store)
    assert len(key) == 32
    assert stat.S_IMODE(dk.key_path(store).stat().st_mode) == 0o600
    assert dk.deployment_key(store) == key
    assert [p.name for p in store.iterdir()] == [dk.KEY_FILE], "no temporary file left behind"
    assert dk.fingerprint(store) not in ("none", "unreadable")
    assert dk.deployment_key(tmp_path / "other") != key


def test_processes_creating_the_key_together_agree_on_one(tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(_create_and_read, [str(store)] * 8)
    assert len(set(keys)) == 1
    assert dk.deployment_key(store).hex() == keys[0]


@pytest.mark.parametrize("text", ["", "abc", "z" * 64, "0" * 63, "é" * 64])
def test_a_file_that_is_not_a_key_is_refused(tmp_path: Path, text: str) -> None:
    dk.key_path(tmp_path).write_text(text)
    with pytest.raises(dk.DeploymentKeyError, match=r"not a drscreen deployment key|cannot be read"):
        dk.deployment_key(tmp_path)
    assert dk.fingerprint(tmp_path) == "unreadable"


def test_the_digest_is_keyed_and_can_seal_a_plain_sha256(tmp_path: Path) -> None:
    key, other = dk.deployment_key(tmp_path / "a"), dk.deployment_key(tmp_path / "b")
    plain = hashlib.sha256(b"P-123").hexdigest()
    digest = dk.keyed_digest(key, "P-123")
    assert digest not in (plain, dk.keyed_digest(other, "P-123"), dk.keyed_digest(key, "P-124"))
    assert dk.seal(key, plain) == digest


def test_two_stores_at_one_path_are_told_apart_by_status(isolated_settings: Path, tmp_path: Path) -> None:
    """The same store path on two machines can be two disks: the key's fingerprint differs."""
    settings = get_settings()
    dk.deployment_key(settings.store_path)
    own = heartbeat.shared_settings(settings)
    dk.deployment_key(tmp_path / "other-disk")
    elsewhere = dict(own, store_identity=dk.fingerprint(tmp_path / "other-disk"))
    assert own["store_identity"] != elsewhere["store_identity"]
    worker = WorkerHeartbeat(node="w1@elsewhere", settings=elsewhere)
    [mismatch] = heartbeat.settings_mismatches([worker], own)
    assert mismatch.setting == "store_identity"
    assert "deployment.key" in mismatch.describe() and "DRSCREEN_STORE_IDENTITY" not in mismatch.describe()
