from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.store import FileStore, get_store, sha256_file


def test_content_addressed_layout_and_dedup(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    data = b"fundus" * 100
    sha = hashlib.sha256(data).hexdigest()
    first = store.put_bytes(data, ".PNG")
    assert first.created and first.sha256 == sha
    assert first.relpath == f"{sha[:2]}/{sha[2:4]}/{sha}.png"
    assert first.path == store.root / first.relpath and first.path.read_bytes() == data
    second = store.put_bytes(data, "png")
    assert not second.created and second.path == first.path
    assert store.read_bytes(first.relpath) == data and sha256_file(first.path) == sha
    assert not list(first.path.parent.glob(".tmp-*"))  # no temp files left behind
    assert [p for p in store.root.rglob("*") if p.is_file()] == [first.path]


def test_put_file_and_delete(tmp_path: Path) -> None:
    src = tmp_path / "photo.jpg"
    src.write_bytes(b"\xff\xd8jpeg")
    store = FileStore(tmp_path / "s")
    stored = store.put_file(src)
    assert stored.relpath.endswith(".jpg") and store.exists(stored.relpath)
    assert store.delete(stored.relpath) and not store.delete(stored.relpath)


def test_refuses_paths_outside_and_bad_names(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")
    with pytest.raises(ValueError):
        store.relpath_for("not-a-sha", "png")
    with pytest.raises(ValueError):
        store.put_bytes(b"x", "p/ng")


def test_get_store_uses_settings(isolated_settings: Path) -> None:
    assert get_store().root == (isolated_settings / "store").resolve()


def test_write_problem_names_what_keeps_photographs_out(tmp_path: Path) -> None:
    """/readyz and `drscreen status` read it (the fault review: a read-only or full store)."""
    assert FileStore(tmp_path / "not-made-yet" / "store").write_problem() is None  # made on the first upload
    (tmp_path / "a-file").write_text("x")
    assert "is not a folder" in (FileStore(tmp_path / "a-file").write_problem() or "")
    free = FileStore(tmp_path).write_problem(min_free_bytes=2**62)
    assert free is not None and "MiB free" in free
