"""``check_manifest_members``: the weights a manifest was fitted with, checked against each
member's metadata, reusing the metadata ``read_release`` has read when given it."""

from __future__ import annotations

import json
import logging
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


def test_every_shipped_release_has_checksums_that_hold() -> None:
    from ml.publish import SUMS_FILE, checked_sums

    members, ensembles = sorted(REPO_MODELS.glob("members/*/*")), sorted(REPO_MODELS.glob("ensembles/*/*"))
    for folder in members:
        assert set(checked_sums(folder)) == {"config.json", "model.safetensors", "metadata.json"}, folder
    for folder in ensembles:
        assert set(checked_sums(folder)) == {"manifest.json"}, folder
    assert all((f / SUMS_FILE).is_file() for f in members + ensembles)


def _copy_dev_release(tmp_path: Path) -> tuple[Path, Path, Path]:
    """models/ with the dev ensemble and its member, copied: (models, member folder, ensemble folder)."""
    import shutil

    models = tmp_path / "models"
    member = models / "members" / "dev-mnv2-64" / "0.1.0"
    ensemble = models / "ensembles" / "drscreen-dev" / "0.1.0"
    shutil.copytree(REPO_MODELS / "members" / "dev-mnv2-64" / "0.1.0", member)
    shutil.copytree(REPO_MODELS / "ensembles" / "drscreen-dev" / "0.1.0", ensemble)
    return models, member, ensemble


def _edit_json(path: Path, change: dict[str, object], key: str | None = None) -> None:
    data = json.loads(path.read_text())
    (data[key] if key else data).update(change)
    path.write_text(json.dumps(data, indent=2))


def test_a_release_edited_after_export_is_refused(tmp_path: Path) -> None:
    """The release review (session 29): config.json (preprocessing, head) and the manifest (cut
    points, weights) were covered by no checksum; edited, they changed every grade silently."""
    models, member, ensemble = _copy_dev_release(tmp_path)
    assert ens_mod.check_release("drscreen-dev@0.1.0", models) == "drscreen-dev@0.1.0"
    original = (member / "config.json").read_text()
    _edit_json(member / "config.json", {"enhancements": []}, key="preprocess")
    with pytest.raises(ValueError, match=r"config.json was changed after the release was exported"):
        ens_mod.check_release("drscreen-dev@0.1.0", models)
    (member / "config.json").write_text(original)
    _edit_json(ensemble / "manifest.json", {"thresholds": [0.1, 0.2, 0.3, 0.4]}, key="combination")
    with pytest.raises(ValueError, match=r"manifest.json was changed after the release was exported"):
        ens_mod.check_release("drscreen-dev@0.1.0", models)
    with pytest.raises(ValueError, match=r"manifest.json was changed"):
        ens_mod.load_ensemble("drscreen-dev@0.1.0", models, runtime="torch")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rule": "median"}, "unknown rule 'median'"),
        ({"weights": [0.0]}, "weights must be finite, not negative, and not all 0"),
        ({"weights": [1.0, 1.0]}, "2 weights for 1 members"),
        ({"thresholds": [2.5, 1.5, 0.5, 3.5]}, "thresholds must not decrease"),
        ({"thresholds": [0.5, 1.5]}, "thresholds must be 4 numbers"),
        ({"rule": "stacking"}, r"stacking coefficients of shape \(0,\) for 1 members"),
    ],
)
def test_a_combination_that_cannot_grade_is_refused_at_load(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    """Even with its checksums re-made (an export by hand): two weights for three members or an
    unknown rule loaded and then failed every photograph; weights of 0 graded all 4 from NaN."""
    from ml.publish import write_sums

    models, _member, ensemble = _copy_dev_release(tmp_path)
    _edit_json(ensemble / "manifest.json", change, key="combination")
    write_sums(ensemble)
    with pytest.raises(
        ValueError, match=rf"drscreen-dev@0.1.0: the manifest's combination cannot be used: {message}"
    ):
        ens_mod.check_release("drscreen-dev@0.1.0", models)


def test_a_malformed_manifest_or_unknown_release_is_one_clear_error(tmp_path: Path) -> None:
    from ml.publish import write_sums

    models, _member, ensemble = _copy_dev_release(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"no ensemble release drscreen-dev@9.9 .*there: drscreen-dev@0.1.0"
    ):
        ens_mod.check_release("drscreen-dev@9.9", models)
    _edit_json(ensemble / "manifest.json", {"members": ["dev-mnv2-64@0.1.0"]})
    write_sums(ensemble)
    with pytest.raises(ValueError, match=r"the manifest's members must be a list"):
        ens_mod.check_release("drscreen-dev@0.1.0", models)
    for ref in (" drscreen-dev@0.1.0", "drscreen-dev@0.1.0@x"):
        with pytest.raises(ValueError, match="expected NAME@VERSION"):
            ens_mod.check_release(ref, models)


def test_the_api_leaves_out_a_release_whose_manifest_was_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The second review (session 29): /readyz said `model: true` and /v1/models showed an edited
    manifest's figures while every worker refused the release."""
    from services.modelinfo import released_ensembles

    models, _member, ensemble = _copy_dev_release(tmp_path)
    assert list(released_ensembles(models)) == ["drscreen-dev@0.1.0"]
    _edit_json(ensemble / "manifest.json", {"thresholds": [0.1, 0.2, 0.3, 0.4]}, key="combination")
    with caplog.at_level(logging.WARNING, logger="services.modelinfo"):
        for _ in range(3):  # /readyz, a /metrics scrape, the model page: one warning, not three
            assert released_ensembles(models) == {}
    assert [r.getMessage() for r in caplog.records if "left out" in r.getMessage()] == [
        f"release {ensemble} left out: {ensemble / 'manifest.json'} was changed after the release "
        "was exported (its sha256 differs from SHA256SUMS): restore the release folder as shipped, "
        "or export a new version"
    ]


def test_checksums_written_by_sha256sum_in_binary_mode_are_read(tmp_path: Path) -> None:
    from ml.publish import SUMS_FILE, checked_sums

    _models, member, _ensemble = _copy_dev_release(tmp_path)
    lines = (member / SUMS_FILE).read_text().splitlines()
    (member / SUMS_FILE).write_text("".join(line.replace("  ", " *", 1) + "\n" for line in lines))
    assert set(checked_sums(member)) == {"config.json", "model.safetensors", "metadata.json"}
