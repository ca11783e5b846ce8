"""A secret of the deployment, kept in the store folder that the API and every worker share.

What it is for: the audit row of an erasure must not keep the patient id, yet a folder job
accepted before the erasure must still recognise the patient's files (workers.folders). A plain
sha256 of the id did both, but patient ids are short and guessable, so anyone holding a copy of
the database could recover every erased id by trying them all. The audit row now keeps
``HMAC(key, sha256(id))``, and the key is not in the database.

Why in the store folder: every process of a deployment already reads the same store (README "More
machines"), so every process finds the same key without another setting; a database dump or
backup alone does not hold it. The file is created once, atomically (two machines starting
together agree on whichever was linked first), readable by its owner only.

The key's fingerprint also tells whether two processes really share one store: the same path
written on two machines can be two different disks (``core.heartbeat.shared_settings``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

#: The key file, at the root of the store folder (beside the content-addressed ``ab/cd/`` folders).
KEY_FILE = "deployment.key"
_KEY_HEX_CHARS = 64


class DeploymentKeyError(RuntimeError):
    """The key file exists but is not a key (edited or truncated by hand)."""


def key_path(store_dir: Path) -> Path:
    return store_dir / KEY_FILE


def read_key(path: Path) -> bytes:
    """The key in ``path`` (a key file, or one a restore kept beside it); raises
    :class:`DeploymentKeyError` for anything else."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (PermissionError, UnicodeDecodeError) as exc:
        raise DeploymentKeyError(
            f"{path} cannot be read by this process (uid {os.getuid()}): the API and every worker "
            "must run as one user, as they must for the store's photographs"
        ) from exc
    if len(text) != _KEY_HEX_CHARS or any(c not in "0123456789abcdef" for c in text):
        raise DeploymentKeyError(f"{path} is not a drscreen deployment key (64 hex digits)")
    return bytes.fromhex(text)


def _create(path: Path) -> None:
    """Write a new key unless one exists: a temporary file hard-linked to the final name, so a
    second process creating one at the same moment gets FileExistsError and reads the winner's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    text = secrets.token_hex(_KEY_HEX_CHARS // 2) + "\n"
    try:
        _write_new(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a share without hard links (some SMB/FUSE mounts): create in place
            # O_EXCL on the final name: one creator wins; a reader in the instant before the
            # write ends sees a short file and is refused (DeploymentKeyError), never a wrong key
            with contextlib.suppress(FileExistsError):
                _write_new(path, text)
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (failing if it exists), owner-only, with ``text`` on disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def deployment_key(store_dir: Path) -> bytes:
    """The deployment's key (32 bytes), created on first use."""
    path = key_path(store_dir)
    if not path.exists():
        _create(path)
    return read_key(path)


def existing_key(store_dir: Path) -> bytes | None:
    """The deployment's key if this store holds one (never creates it: a machine that only reads,
    e.g. an operator's audit export, must not leave another key behind)."""
    path = key_path(store_dir)
    return read_key(path) if path.exists() else None


def fingerprint(store_dir: Path) -> str:
    """A short public digest of the key, or ``"none"`` before any process created it (reading it
    never creates one: `drscreen status` on a misconfigured machine must not leave a key behind)."""
    path = key_path(store_dir)
    if not path.exists():
        return "none"
    try:
        key = read_key(path)
    except (OSError, DeploymentKeyError):
        return "unreadable"
    return key_fingerprint(key)


def key_fingerprint(key: bytes) -> str:
    """A short public digest of ``key`` (which key a digest was made with, without the key)."""
    return hmac.new(key, b"drscreen store fingerprint", hashlib.sha256).hexdigest()[:12]


def keyed_digest(key: bytes, text: str) -> str:
    """``HMAC-SHA256(key, sha256(text))`` in hex. Keyed over the sha256 (not the text itself) so
    that digests written before there was a key can be sealed in place (:func:`seal`)."""
    return seal(key, hashlib.sha256(text.encode("utf-8")).hexdigest())


def seal(key: bytes, sha256_hex: str) -> str:
    """The keyed digest of a value known only by its plain sha256 (hex)."""
    return hmac.new(key, sha256_hex.encode("ascii"), hashlib.sha256).hexdigest()
