"""``check_manifest_members``: the weights a manifest was fitted with, checked against each
member's metadata, reusing the metadata ``read_release`` has read when given it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml.inference import ensemble as ens_mod
from ml.inference.ensemble import check_manifest_members

SHA = "ab" * 32
MANIFEST = {"members": [{"ref": "m@1.0.0", "weights_sha256": SHA}]}


def test_metadata_already_read_is_used_instead_of_the_file(tmp_path: Path) -> None:
    models = tmp_path / "models"  # no member folder at all: nothing is read from disk
    check_manifest_members("e@1.0.0", MANIFEST, models, {"m@1.0.0": {"weights_sha256": SHA}})
    with pytest.raises(
        ValueError, match=r"e@1.0.0: member m@1.0.0 holds other weights .*sha256 cdcdcdcdcdcd"
    ):
        check_manifest_members("e@1.0.0", MANIFEST, models, {"m@1.0.0": {"weights_sha256": "cd" * 32}})


def test_without_it_the_members_metadata_file_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "members" / "m" / "1.0.0"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"sha256 None\.\.\., manifest ababababab"):
        check_manifest_members("e@1.0.0", MANIFEST, tmp_path)  # no metadata.json
    (folder / "metadata.json").write_text(json.dumps({"weights_sha256": SHA}))
    check_manifest_members("e@1.0.0", MANIFEST, tmp_path)


def test_check_release_reads_each_members_metadata_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = Path.read_text

    def counting(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "metadata.json":
            reads.append(str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", counting)
    ref = ens_mod.check_release("drscreen-dev@0.1.0")
    members = ens_mod.read_manifest(ref)["members"]
    assert len(reads) == len(members) == len(set(reads))


REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
#: What issue 6 asks each released member's metadata to hold.
RELEASE_FIELDS = ("name", "version", "metrics", "data_split_hash", "libraries", "weights_sha256")


def test_every_shipped_member_says_what_a_release_must_say() -> None:
    """Weight soups were exported without metrics (1.6.0 and 1.8.0 of Lite1+CBAM, session 20)."""
    folders = sorted(REPO_MODELS.glob("members/*/*/metadata.json"))
    assert len(folders) >= 12
    for path in folders:
        meta = json.loads(path.read_text())
        missing = [key for key in RELEASE_FIELDS if not meta.get(key)]
        assert not missing, f"{path.parent}: no {', '.join(missing)}"
        assert f"{meta['name']}/{meta['version']}" == f"{path.parent.parent.name}/{path.parent.name}"
        # (the referable AUC joined the metrics after the first releases)
        assert meta["metrics"].get("natural_val_qwk_default_thresholds") is not None, path.parent
