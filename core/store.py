"""Content-addressed local file store for photographs and heatmaps.

Layout: ``<root>/<sha[0:2]>/<sha[2:4]>/<sha>.<ext>``. The same bytes are stored once. Writes go to a
temporary file in the target folder and are renamed into place, so a reader never sees half a file.
Paths kept in the database are relative to the root (``StoredFile.relpath``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.settings import get_settings

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    relpath: str
    path: Path
    size_bytes: int
    created: bool  # False when the same bytes were already stored


def paths_overlap(a: Path, b: Path) -> bool:
    """One folder is, or is inside, the other (after symbolic links): writing into one of them
    writes into the other (a backup or an export inside the live store)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _clean_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if not ext or not ext.isalnum() or len(ext) > 8:
        raise ValueError(f"bad file extension {ext!r}")
    return ext


class FileStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def relpath_for(self, sha256: str, ext: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{_clean_ext(ext)}"

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored relative path (refuses anything outside the root)."""
        full = (self.root / relpath).resolve()
        if not full.is_relative_to(self.root):
            raise ValueError("path outside the store")
        return full

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def put_bytes(self, data: bytes, ext: str) -> StoredFile:
        """Store ``data`` (idempotent: the same bytes land at the same path, written once)."""
        sha = sha256_bytes(data)
        rel = self.relpath_for(sha, ext)
        target = self.path(rel)
        if target.is_file() and target.stat().st_size == len(data):
            return StoredFile(sha, rel, target, len(data), created=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredFile(sha, rel, target, len(data), created=True)

    def put_file(self, source: str | os.PathLike[str], ext: str | None = None) -> StoredFile:
        src = Path(source)
        return self.put_bytes(src.read_bytes(), ext or src.suffix or "bin")

    def set_aside(self, relpath: str) -> Path | None:
        """Rename a stored file to a hidden name beside it (atomic): nothing finds it at its path
        any more (a writer of the same bytes writes them again), yet it can still be put back
        (:meth:`put_back`) or removed (``unlink``). None when there was no file."""
        path = self.path(relpath)
        aside = path.with_name(f".aside-{uuid.uuid4().hex}-{path.name}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, aside: Path, relpath: str) -> None:
        """Undo :meth:`set_aside` (over a copy of the same bytes written meanwhile, if any)."""
        os.replace(aside, self.path(relpath))

    def write_problem(self, min_free_bytes: int = 0) -> str | None:
        """Why a photograph could not be stored now, None when it could: the folder (or, before
        the first upload makes it, its nearest existing parent) is not a writable folder, is on a
        read-only file system, or has less than ``min_free_bytes`` free. For /readyz and
        ``drscreen status`` (the fault review: a read-only or full store failed every upload with a
        500 while the service reported itself ready)."""
        folder = self.root
        while not folder.exists() and folder.parent != folder:  # made on the first write
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):  # EROFS too: a read-only mount
            return f"{folder} cannot be written (read-only or no permission)"
        try:
            fs = os.statvfs(folder)
        except OSError as exc:
            return f"{folder}: {exc.strerror or exc}"
        free = fs.f_bavail * fs.f_frsize
        if free < min_free_bytes:
            return f"{folder} has {free / 2**20:.1f} MiB free, less than one photograph's limit"
        return None

    def delete(self, relpath: str) -> bool:
        path = self.path(relpath)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False


def get_store() -> FileStore:
    """The store at ``DRSCREEN_STORE_DIR``."""
    return FileStore(get_settings().store_path)


def outputs_problem(files: Sequence[Path], folders: Sequence[Path] = ()) -> str | None:
    """Why a command's output ``files`` (and files in ``folders``) could not be written, None when
    they can: checked before the command's work, so it does not fail after it. Missing folders are
    made now, as the writers would; then a file must be creatable in each (a probe: permission bits
    say nothing for root or /proc), and no output file may be a folder or read-only."""
    for file in files:
        if file.is_dir():
            return f"{file} is a folder"
        if file.exists() and not os.access(file, os.W_OK):
            return f"{file} is read-only"
    for folder in dict.fromkeys([file.parent for file in files] + list(folders)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".drscreen-check-"):
                pass  # removed on closing
        except OSError as exc:
            return f"no file can be made in {folder} ({exc.strerror or exc})"
    return None
