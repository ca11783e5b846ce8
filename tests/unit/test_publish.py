"""``ml.publish.writable``: which existing versions ``--force`` may replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml import publish
from ml.publish import ReleaseError, writable


def _ensemble(models: Path, version: str, test_images: int) -> None:
    folder = models / "ensembles" / "ens" / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"card": {"test": {"n_images": test_images}}}))


def test_force_never_rewrites_a_shipped_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README walkthrough: ``--force`` said "candidates only" and rewrote a shipped ensemble's
    manifest (its thresholds, so its grades) under the same name@version."""
    with pytest.raises(ReleaseError, match="ships with drscreen"):  # the real shipped default
        writable(publish.SHIPPED_DIR, "ensembles", "drscreen-ensemble", "1.6.0", force=True)

    shipped = tmp_path / "repo-models"
    monkeypatch.setattr(publish, "SHIPPED_DIR", shipped.resolve())
    _ensemble(shipped, "1.0.0", test_images=120)  # a release: its test part was measured
    _ensemble(shipped, "1.1.0", test_images=0)  # a --validation-only candidate
    (shipped / "members" / "m" / "1.0.0").mkdir(parents=True)
    with pytest.raises(ReleaseError, match="ships with drscreen"):
        writable(shipped, "ensembles", "ens", "1.0.0", force=True)
    with pytest.raises(ReleaseError, match="ships with drscreen"):
        writable(shipped, "members", "m", "1.0.0", force=True)
    assert writable(shipped, "ensembles", "ens", "1.1.0", force=True).name == "1.1.0"  # adopted
    with pytest.raises(ReleaseError, match="choose a new version"):
        writable(shipped, "ensembles", "ens", "1.0.0")

    copy = tmp_path / "rebuild"  # README: rebuild a shipped release in a copy
    _ensemble(copy, "1.0.0", test_images=120)
    assert writable(copy, "ensembles", "ens", "1.0.0", force=True) == copy / "ensembles" / "ens" / "1.0.0"
