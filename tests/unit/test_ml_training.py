"""A tiny real training run on real photographs, resume, export and evaluate with known metrics."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.training.data import Sample, read_labels, split_patients

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA / "eyepacs-natural-512" / "labels.csv").exists():
        pytest.fail(f"training data missing at {DATA}: the shared/ folder must sit beside the repo")
    return DATA


def test_patient_split_never_shares_a_patient(data_dir: Path) -> None:
    samples = read_labels(data_dir / "eyepacs-natural-512")
    parts = split_patients(samples, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=3)
    ids = {k: {s.patient_id for s in v} for k, v in parts.items()}
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    assert sum(len(v) for v in parts.values()) == len(samples)
    again = split_patients(samples, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=3)
    assert {k: [s.path for s in v] for k, v in again.items()} == {
        k: [s.path for s in v] for k, v in parts.items()
    }


def test_stage1_never_sees_a_natural_colour_patient(data_dir: Path) -> None:
    """Some patients are in both folders; their equalised copies must not reach stage 1."""
    from ml.training.config import load_config
    from ml.training.train import equalized_without, natural_split

    cfg = load_config(
        REPO / "configs" / "member-lite1-cbam-multitask.toml",
        {"data.natural_dir": str(data_dir / "eyepacs-natural-512")},
    )
    natural = natural_split(cfg, REPO)
    natural_ids = {s.patient_id for part in natural.values() for s in part}
    equalized = read_labels(data_dir / "eyepacs-equalized-256")
    shared = {s.patient_id for s in equalized} & natural_ids
    assert shared, "the data no longer has patients in both folders: this test checks nothing"
    kept = equalized_without(equalized, natural)
    assert not {s.patient_id for s in kept} & natural_ids
    assert len(kept) == len(equalized) - sum(s.patient_id in shared for s in equalized)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from ml.training.train import train_from_config

    out = tmp_path_factory.mktemp("runs")
    overrides = {
        "out_dir": str(out),
        "data.cache_dir": str(out / "cache"),
        "data.equalized_dir": str(data_dir / "eyepacs-equalized-256"),
        "data.natural_dir": str(data_dir / "eyepacs-natural-512"),
    }
    return train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)


def test_smoke_training_writes_every_artefact(smoke_run: Path) -> None:
    for name in (
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "last.pt",
        "best/model.safetensors",
        "stage1/config.json",
    ):
        assert (smoke_run / name).exists(), name
    rows = _metrics(smoke_run)
    assert [r["stage"] for r in rows] == ["stage1", "stage1", "stage2", "stage2"][: len(rows)]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    meta = json.loads((smoke_run / "best" / "metadata.json").read_text())
    assert len(meta["data_split_hash"]) == 16 and meta["weights_sha256"]
    resolved = json.loads((smoke_run / "config.json").read_text())
    assert resolved["model"]["attention"] == "se" and resolved["preprocess"]["size"] == 64


def test_a_soup_is_measured_like_the_members_it_averages(smoke_run: Path, tmp_path: Path) -> None:
    """The soup's metadata had no metrics (the card had them, the member's own release did not).
    A soup of one run twice is that run, so its metrics must be the run's exactly."""
    from ml.soup import make_soup

    soup = make_soup([smoke_run, smoke_run], tmp_path / "soup")
    run_meta = json.loads((smoke_run / "best" / "metadata.json").read_text())
    soup_meta = json.loads((soup / "best" / "metadata.json").read_text())
    assert soup_meta["metrics"] == run_meta["metrics"]
    assert run_meta["metrics"]["natural_val_qwk_default_thresholds"] is not None


def test_every_shipped_members_training_config_still_reads() -> None:
    """A soup re-reads its runs' training config; runs and releases written before a key was
    retired (``preprocess.extra``, session 20) must still read."""
    from ml.training.config import config_from_dict

    paths = sorted((REPO / "models" / "members").glob("*/*/metadata.json"))
    assert paths
    for path in paths:
        raw = json.loads(path.read_text())["train_config"]
        assert config_from_dict(raw).name, path


def test_resume_continues_from_last_checkpoint(smoke_run: Path, tmp_path: Path) -> None:
    from ml.training.train import train_from_config

    copy = tmp_path / smoke_run.name
    shutil.copytree(smoke_run, copy)
    before = len((copy / "metrics.jsonl").read_text().splitlines())
    train_from_config(REPO / "configs" / "smoke.toml", resume=copy, overrides=_overrides_from(smoke_run))
    after = (copy / "metrics.jsonl").read_text().splitlines()
    assert len(after) == before  # every epoch was done: resuming repeats none
    assert (copy / "best" / "model.safetensors").exists()


def test_a_resumed_run_is_the_run_it_would_have_been(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release review (session 29): last.pt held no optimiser or random state, so a resumed
    run restarted AdamW's moments and replayed the first epochs' augmentations (epoch 2's loss
    1.825 against 1.931 uninterrupted). Interrupted after its first epoch and resumed, the run now
    gives the uninterrupted run's metrics and weights exactly."""
    import ml.training.train as train_mod

    real_plot = train_mod.plot_curves

    def interrupted(*args: Any, **kwargs: Any) -> None:  # after epoch 1's last.pt is written
        raise KeyboardInterrupt

    overrides = {**_overrides_from(smoke_run), "out_dir": str(tmp_path)}
    monkeypatch.setattr(train_mod, "plot_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    monkeypatch.setattr(train_mod, "plot_curves", real_plot)
    [run] = [p for p in tmp_path.iterdir() if (p / "last.pt").exists()]
    assert len(_metrics(run)) == 1
    train_mod.train_from_config(REPO / "configs" / "smoke.toml", resume=run, overrides=overrides)

    def untimed(folder: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in _metrics(folder)]

    assert untimed(run) == untimed(smoke_run)
    first, resumed = (json.loads((r / "best" / "metadata.json").read_text()) for r in (smoke_run, run))
    assert resumed["weights_sha256"] == first["weights_sha256"]


def test_a_run_resumed_between_its_stages_is_the_run_it_would_have_been(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second review (session 29): interrupted after stage 1 had stopped early, the resumed
    run's stage 2 began from fresh random states (the early-stop return came before they were
    restored). Interrupted after stage 1's last epoch here, with early stopping likely."""
    import ml.training.train as train_mod

    overrides = {**_overrides_from(smoke_run), "stage1.epochs": 4, "stage1.patience": 1}
    whole = train_mod.train_from_config(
        REPO / "configs" / "smoke.toml", overrides={**overrides, "out_dir": str(tmp_path / "whole")}
    )
    stage1_epochs = sum(row["stage"] == "stage1" for row in _metrics(whole))
    real_plot, calls = train_mod.plot_curves, []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == stage1_epochs:  # stage 1's last last.pt is written: stop before stage 2
            raise KeyboardInterrupt
        real_plot(*args, **kwargs)

    cut = {**overrides, "out_dir": str(tmp_path / "cut")}
    monkeypatch.setattr(train_mod, "plot_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_from_config(REPO / "configs" / "smoke.toml", overrides=cut)
    monkeypatch.setattr(train_mod, "plot_curves", real_plot)
    [run] = list((tmp_path / "cut").iterdir())
    train_mod.train_from_config(REPO / "configs" / "smoke.toml", resume=run, overrides=cut)

    def untimed(folder: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in _metrics(folder)]

    assert untimed(run) == untimed(whole)
    first, resumed = (json.loads((r / "best" / "metadata.json").read_text()) for r in (whole, run))
    assert resumed["weights_sha256"] == first["weights_sha256"]


def test_resume_keeps_the_best_state_reached_before_the_interruption(smoke_run: Path, tmp_path: Path) -> None:
    """A resumed stage must keep the best state saved in last.pt, not restart its search from the
    weights of the last epoch: the saved best is made different from every epoch's weights here."""
    import torch

    from ml.release import load_checkpoint
    from ml.training.train import train_from_config

    copy = tmp_path / smoke_run.name
    shutil.copytree(smoke_run, copy)
    state = torch.load(copy / "last.pt", map_location="cpu", weights_only=False)
    marked = {k: v + 0.25 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, "best": marked, "best_score": 1.0}, copy / "last.pt")
    train_from_config(REPO / "configs" / "smoke.toml", resume=copy, overrides=_overrides_from(smoke_run))
    resumed, _, _ = load_checkpoint(copy / "best")
    got = resumed.state_dict()
    assert all(torch.equal(got[k], v) for k, v in marked.items())


def test_epochs_since_best_counts_from_the_first_best() -> None:
    from ml.training.train import epochs_since_best

    rows = [{"val_qwk": q} for q in (0.2, 0.5, 0.4, 0.5, 0.3)]
    assert epochs_since_best(rows, "val_qwk") == 3
    assert epochs_since_best([{"val_qwk": None}], "val_qwk") == 0
    assert epochs_since_best([], "val_qwk") == 0


def test_same_seed_same_run(smoke_run: Path, tmp_path: Path) -> None:
    """Reproducible from a seed: the same config on the same machine gives the same metrics and
    weights, byte for byte (docs/model.md: another machine may not)."""
    from ml.training.train import train_from_config

    again = train_from_config(
        REPO / "configs" / "smoke.toml", overrides={**_overrides_from(smoke_run), "out_dir": str(tmp_path)}
    )

    def untimed(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in _metrics(run)]

    assert untimed(again) == untimed(smoke_run)
    first, second = (json.loads((r / "best" / "metadata.json").read_text()) for r in (smoke_run, again))
    assert second["weights_sha256"] == first["weights_sha256"]


def test_natural_only_warm_start_at_another_size(smoke_run: Path) -> None:
    """stage1.epochs = 0 trains on natural-colour photographs only (no equalised stage, none of
    its photographs cached), warm-started from a member trained at another input size."""
    from ml.training.train import train_from_config

    overrides = _natural_only_from(smoke_run, {"preprocess.size": 96})
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    rows = _metrics(run)
    assert rows and {r["stage"] for r in rows} == {"stage2"}
    assert not (run / "stage1").exists()
    assert json.loads((run / "best" / "config.json").read_text())["preprocess"]["size"] == 96
    cache = Path(overrides["data.cache_dir"])  # type: ignore[arg-type]
    assert not [f for f in cache.iterdir() if f.name.startswith("eq_") and "-96-" in f.name]
    assert [f for f in cache.iterdir() if f.name.startswith("nat_train-96-")]

    with pytest.raises(ValueError, match="preprocessing differs"):
        train_from_config(
            REPO / "configs" / "smoke.toml",
            overrides={**overrides, "preprocess.enhancements": ["clahe"]},
        )


def test_early_stopping_can_watch_the_referable_auc(smoke_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stage2.monitor = "referable_auc": the stage stops at the first epoch whose AUC does not
    beat the best so far (patience 1), whatever QWK does; an unknown monitor is refused."""
    import ml.training.train
    from ml.training.train import train_from_config

    overrides = _natural_only_from(
        smoke_run, {"stage2.monitor": "referable_auc", "stage2.patience": 1, "stage2.epochs": 6}
    )
    real = ml.training.train.validation_figures
    aucs = iter([0.6, 0.7, 0.8, 0.75, 0.9, 0.95])  # QWK stays flat: the "qwk" monitor stops at 2

    def scripted(*args: object) -> dict[str, float | None]:
        return real(*args) | {"val_qwk": 0.5, "val_referable_auc": next(aucs)}  # type: ignore[arg-type]

    monkeypatch.setattr(ml.training.train, "validation_figures", scripted)
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    assert [r["val_referable_auc"] for r in _metrics(run)] == [0.6, 0.7, 0.8, 0.75]

    with pytest.raises(ValueError, match="monitor"):
        train_from_config(REPO / "configs" / "smoke.toml", overrides={**overrides, "stage2.monitor": "kappa"})


def test_mixed_epoch_draws_the_asked_share_from_the_extra_set() -> None:
    from ml.training.train import mixed_order

    rng = np.random.default_rng(0)
    grades, extra = np.array([0] * 30 + [2] * 10), np.array([0] * 500 + [4] * 20)
    order = mixed_order(grades, extra, 40, 0.25, 0.5, rng)
    from_extra = order >= len(grades)
    assert len(order) == 40 + round(40 * 0.25 / 0.75) and from_extra.sum() == 13
    assert order.max() < len(grades) + len(extra) and order.min() >= 0
    assert from_extra[:20].any() and from_extra[20:].any(), "the two sets are not shuffled together"
    assert (mixed_order(grades, extra, 40, 0.0, 0.5, rng) < len(grades)).all()  # share 0: main only


def test_natural_stage_mixed_with_equalised_photographs(smoke_run: Path) -> None:
    """stage2.mix_equalized = 0.5 on a natural-only warm start: the equalised training photographs
    are cached for it and make up half of each epoch."""
    from ml.training.train import train_from_config

    overrides = _natural_only_from(smoke_run, {"stage2.mix_equalized": 0.5})
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    rows = _metrics(run)
    assert rows and all(r["stage"] == "stage2" and r["train_samples"] == 32 for r in rows)  # 16 + 16
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["stage2"]["mix_equalized"] == 0.5


def test_weight_average_is_what_a_stage_validates_and_keeps(smoke_run: Path) -> None:
    """With stage2.ema_decay the kept state is the average (not the live weights), and every
    epoch logs the live network's figures beside it."""
    import torch

    from ml.release import load_checkpoint
    from ml.training.train import train_from_config

    overrides = _natural_only_from(smoke_run, {"stage2.ema_decay": 0.5, "stage2.epochs": 1})
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    rows = _metrics(run)
    assert len(rows) == 1 and {"val_qwk", "live_val_qwk", "live_val_loss"} <= rows[0].keys()
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    average, updates = last["average"]
    assert updates == 2  # 16 photographs in batches of 8
    kept = load_checkpoint(run / "best")[0].state_dict()
    floats = [k for k, v in average.items() if v.is_floating_point()]
    assert all(torch.allclose(kept[k], average[k]) for k in floats)
    assert any(not torch.allclose(kept[k], last["model"][k]) for k in floats)


def test_resume_carries_the_weight_average_on(smoke_run: Path, tmp_path: Path) -> None:
    """An interrupted stage resumes its average (and its update count) from last.pt instead of
    starting a new one from the resumed weights."""
    import torch

    from ml.training.train import train_from_config

    overrides = _natural_only_from(smoke_run, {"stage2.ema_decay": 0.5, "out_dir": str(tmp_path)})
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["average"][1] == 4
    # pretend the run stopped after its first epoch (2 updates)
    first = state["history"][:1]
    torch.save({**state, "epoch": 1, "history": first, "average": (state["average"][0], 2)}, run / "last.pt")
    train_from_config(REPO / "configs" / "smoke.toml", resume=run, overrides=overrides)
    resumed = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["average"][1] == 4  # 2 carried + 2 of epoch 2


def test_stage1_can_keep_the_epoch_natural_colour_validation_ranks_best(
    smoke_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stage1.select_on = "natural": stage 1 logs the natural-colour validation figures beside its
    own, keeps the epoch with the best natural referable AUC (not the best equalised QWK), and
    with save_epochs every epoch's weights are a member folder of their own."""
    import torch

    import ml.training.train
    from ml.release import load_checkpoint
    from ml.training.train import train_from_config

    real = ml.training.train.validation_figures
    real_prepare = ml.training.train.prepare_data
    own_qwk, natural_auc = iter([0.1, 0.2, 0.3]), iter([0.6, 0.9, 0.7])
    datasets: list[Any] = []

    def remember(*args: Any) -> Any:
        datasets.append(real_prepare(*args))
        return datasets[-1]

    def scripted(model: Any, split: Any, cfg: Any) -> dict[str, float | None]:
        figures = real(model, split, cfg)
        if split is datasets[-1].nat_val:
            return figures | {"val_referable_auc": next(natural_auc)}
        return figures | {"val_qwk": next(own_qwk)}

    monkeypatch.setattr(ml.training.train, "validation_figures", scripted)
    monkeypatch.setattr(ml.training.train, "prepare_data", remember)
    overrides = _overrides_from(smoke_run) | {
        "two_stage": False,
        "stage1.epochs": 3,
        "stage1.patience": 3,
        "stage1.monitor": "referable_auc",
        "stage1.select_on": "natural",
        "stage1.save_epochs": True,
    }
    run = train_from_config(REPO / "configs" / "smoke.toml", overrides=overrides)
    rows = _metrics(run)
    assert [r["val_qwk"] for r in rows] == [0.1, 0.2, 0.3]
    assert [r["nat_val_referable_auc"] for r in rows] == [0.6, 0.9, 0.7]
    weights = {
        name: load_checkpoint(run / name)[0].state_dict()
        for name in ("stage1", "stage1-epoch01", "stage1-epoch02", "stage1-epoch03")
    }
    floats = [k for k, v in weights["stage1"].items() if v.is_floating_point()]

    def same(a: str, b: str) -> bool:
        return all(torch.equal(weights[a][k], weights[b][k]) for k in floats)

    assert same("stage1", "stage1-epoch02"), "not the epoch with the best natural-colour AUC"
    assert not same("stage1", "stage1-epoch03") and not same("stage1", "stage1-epoch01")


def test_select_on_is_checked() -> None:
    from ml.training.config import StageConfig

    assert StageConfig().monitor_key == "val_qwk"
    assert StageConfig(select_on="natural", monitor="referable_auc").monitor_key == "nat_val_referable_auc"
    with pytest.raises(ValueError, match="select_on"):
        StageConfig(select_on="equalised")


def _natural_only_from(run: Path, settings: dict[str, object]) -> dict[str, object]:
    """Overrides for a natural-colour-only run (no stage 1) warm-started from ``run``'s best."""
    return {**_overrides_from(run), "init_from": str(run / "best"), "stage1.epochs": 0, **settings}


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _overrides_from(run: Path) -> dict[str, str]:
    cfg = json.loads((run / "config.json").read_text())
    keep = ("cache_dir", "equalized_dir", "natural_dir")
    return {f"data.{k}": str(v) for k, v in cfg["data"].items() if k in keep} | {"out_dir": str(run.parent)}


def test_export_and_evaluate_report_known_metrics(
    smoke_run: Path,
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Evaluate's figures must equal metrics recomputed from the model's own predictions."""
    from PIL import Image

    import ml.release as release
    from ml.evaluation import evaluate_cli
    from ml.export import export_member
    from ml.inference.combine import CombineRule
    from ml.inference.ensemble import Ensemble, Member
    from ml.metrics import grading_report
    from ml.release import load_checkpoint

    models = tmp_path / "models"
    folder = export_member(smoke_run, "smoke", "0.0.1", half=False, models_dir=models)
    samples = read_labels(data_dir / "eyepacs-natural-512")[:12]
    (tmp_path / "photos").mkdir()
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient_id", "eye"])
        for s in samples:
            shutil.copy(s.path, tmp_path / "photos" / s.path.name)
            writer.writerow([f"photos/{s.path.name}", s.grade, s.patient_id, s.eye])
        # a black frame labelled referable: the quality gate rejects it, the service refers it
        Image.new("RGB", (512, 512)).save(tmp_path / "photos" / "black.png")
        writer.writerow(["photos/black.png", 2, "blk", "left"])
    paths = [s.path for s in samples] + [tmp_path / "photos" / "black.png"]
    model, pre, config = load_checkpoint(folder)
    member = Member("smoke@0.0.1", model, pre, config)
    ens = Ensemble("smoke@0.0.1", [member], CombineRule("weighted_average", [1.0]), {})
    preds = ens.predict([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    truth = [s.grade for s in samples] + [2]
    expected = grading_report(truth, [p.grade for p in preds], [sum(p.probabilities[2:]) for p in preds])
    monkeypatch.setattr(release, "default_models_dir", lambda: models)
    assert evaluate_cli(labels, "smoke@0.0.1", True, tmp_path / "report") == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["n_images"] == 13
    assert report["qwk"] == pytest.approx(expected["qwk"])  # the model's figures grade everything
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    # the service's decision: what the gate rejects is referred
    assert "photos/black.png" in report["ungradable_images"]
    assert report["n_ungradable"] == len(report["ungradable_images"]) and "quality gate" in out
    rejected = {str(tmp_path / r) for r in report["ungradable_images"]}
    served = [4 if str(p) in rejected else pr.grade for p, pr in zip(paths, preds, strict=True)]
    positives = [i for i, t in enumerate(truth) if t >= 2]
    sensitivity = sum(served[i] >= 2 for i in positives) / len(positives)
    assert report["screening"]["referable_sensitivity"] == pytest.approx(sensitivity)
    assert len(report["per_class_recall"]) == 5
    # five numbers even for a grade the labels lack (the contract audit: they were null)
    assert all(isinstance(r, float) for r in report["per_class_recall"])
    assert report["per_class_support"] == [sum(t == g for t in truth) for g in range(5)]
    assert report["patient"]["n_patients"] == len({s.patient_id for s in samples}) + 1
    lo, hi = report["intervals_95"]["accuracy"]
    assert report["intervals_resampled"] == "patients" and lo <= report["accuracy"] <= hi
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in page and 'src="confusion_matrix.png"' in page and "<pre>" not in page
    assert "95% bootstrap intervals" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "confusion_matrix.png").exists() and (
        tmp_path / "report" / "report.md"
    ).exists()
    # plots, plural (the contract audit: one plot only): the referable ROC, and the matrix as data
    assert (tmp_path / "report" / "roc_referable.png").exists() and 'src="roc_referable.png"' in page
    matrix_rows = (tmp_path / "report" / "confusion_matrix.csv").read_text().splitlines()
    assert len(matrix_rows) == 6 and matrix_rows[1].split(",")[1:] == [
        str(v) for v in report["confusion_matrix"][0]
    ]
    assert report["referable_roc"]["fpr"][0] == 0.0 and report["referable_roc"]["tpr"][-1] == 1.0


def test_cross_validated_natural_stage_feeds_the_ensemble_fit(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pooled train+val photograph gets one out-of-fold probability from a fold model that
    never saw its patient; the exported members carry them and the ensemble is fitted on them."""
    from ml.export import export_ensemble, export_member, out_of_fold_set
    from ml.training.config import DataConfig, TrainConfig
    from ml.training.crossval import OOF_FILE, cross_validate
    from ml.training.train import natural_split

    overrides = {**_overrides_from(smoke_run), "out_dir": str(tmp_path / "runs")}
    final = cross_validate(REPO / "configs" / "smoke.toml", smoke_run / "best", folds=2, overrides=overrides)

    data = DataConfig(natural_dir=overrides["data.natural_dir"])
    plain = natural_split(TrainConfig(data=data), REPO)
    oof = np.load(final / OOF_FILE)
    assert sorted(oof["paths"]) == sorted(s.path.name for s in plain["train"] + plain["val"])
    assert oof["probs"].shape == (len(oof["paths"]), 5)
    assert np.allclose(oof["probs"].sum(axis=1), 1, atol=1e-4)
    assert not set(oof["paths"]) & {s.path.name for s in plain["test"]}
    summary = json.loads((final / "cv.json").read_text())
    assert len(summary["fold_best_epochs"]) == 2 and summary["final_epochs"] >= 1
    rows = _metrics(final)
    assert rows and all(r["stage"] == "stage2" and r["val_qwk"] is None for r in rows)

    models = tmp_path / "models"
    for name in ("cv-a", "cv-b"):
        member = export_member(final, name, "0.0.1", half=True, models_dir=models)
        assert (member / OOF_FILE).exists() and (member / "cv_curves.png").exists()
    fit = out_of_fold_set(["cv-a@0.0.1", "cv-b@0.0.1"], models)
    assert fit is not None and fit[0].shape == (2, len(oof["paths"]), 5)
    folder = export_ensemble(["cv-a@0.0.1", "cv-b@0.0.1"], "cv", "0.0.1", "auto", data, models, repeats=2)
    card = json.loads((folder / "manifest.json").read_text())["card"]
    assert card["out_of_fold_repeats"] == 2 and "folds x 2 shuffles" in (folder / "MODEL_CARD.md").read_text()
    assert card["rule_pinned"] is False and "pinned" not in (folder / "MODEL_CARD.md").read_text()
    assert card["validation"]["n_images"] == len(oof["paths"]) and "out-of-fold" in card["validation"]["set"]
    assert all("test" in row for row in card["metrics"].values())

    # a candidate for a rule fixed beforehand: the test photographs are not even scored
    import ml.export

    scored: list[str] = []
    real_member_probs = ml.export.member_probs

    def recording(members: list[object], samples: list[Sample]) -> np.ndarray:
        scored.extend(s.path.name for s in samples)
        return real_member_probs(members, samples)  # type: ignore[arg-type]

    monkeypatch.setattr(ml.export, "member_probs", recording)
    blind = export_ensemble(
        ["cv-a@0.0.1", "cv-b@0.0.1"], "cv-blind", "0.0.1", "auto", data, models, measure_test=False, repeats=2
    )
    card = json.loads((blind / "manifest.json").read_text())["card"]
    assert not any("test" in row for row in card["metrics"].values()) and card["test"]["n_images"] == 0
    assert not set(scored) & {s.path.name for s in plain["test"]}
    assert "not measured" in (blind / "MODEL_CARD.md").read_text()


def test_runs_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    import ml.training.train
    from ml.training.train import new_run_dir

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Frozen:
            return cls(2026, 12, 4, 19, 31, 25)

    monkeypatch.setattr(ml.training.train, "datetime", Frozen)
    first, second = new_run_dir(tmp_path / "runs", "arch-256-x"), new_run_dir(tmp_path / "runs", "arch-256-x")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-arch-256-x") and second.name.endswith("-arch-256-x")  # release.sh's glob


def test_two_builders_of_one_pixel_cache_do_not_clobber_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs started side by side build the same cache file: here the second build runs in the
    middle of the first (as a second process would). Both must finish with the right pixels;
    with one shared temporary file the first lost its file to the second's rename."""
    from PIL import Image

    import ml.training.data as data
    from ml.preprocess import PreprocessConfig

    samples = []
    for i in range(4):
        photo = np.zeros((64, 64, 3), np.uint8)
        photo[8:56, 8:56] = (40 * i + 20, 60, 30)
        Image.fromarray(photo).save(tmp_path / f"{i}.png")
        samples.append(Sample(tmp_path / f"{i}.png", str(i), "left", 0))
    cfg = PreprocessConfig(size=32, enhancements=[])
    cache = tmp_path / "cache"
    real_prepare = data.prepare_pixels
    nested: list[np.ndarray] = []

    def prepare(rgb: np.ndarray, c: PreprocessConfig) -> np.ndarray:
        if not nested:  # on the first photograph of the outer build, the other builder runs whole
            nested.append(np.zeros(0, np.uint8))
            nested[0] = np.array(data.cached_pixels(samples, cfg, cache, "t"))
        return real_prepare(rgb, c)

    monkeypatch.setattr(data, "prepare_pixels", prepare)
    outer = np.array(data.cached_pixels(samples, cfg, cache, "t"))
    expected = np.stack([real_prepare(data.load_rgb(s.path), cfg) for s in samples])
    assert np.array_equal(outer, expected) and np.array_equal(nested[0], expected)
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("t-32-*.npy")).name]  # no leftovers


def test_releases_are_immutable_all_or_nothing_and_checked(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit re-exported a member under its version: the ensemble fitted on the old weights
    loaded it silently. Names, immutability, atomicity and the manifest's hashes are checked."""
    import ml.export
    from ml.export import export_ensemble, export_member
    from ml.inference.ensemble import check_release
    from ml.publish import ReleaseError, write_sums
    from ml.release import newest_ensemble
    from ml.training.config import DataConfig

    models = tmp_path / "models"
    first = export_member(smoke_run, "imm", "0.0.1", half=False, models_dir=models)
    sha = json.loads((first / "metadata.json").read_text())["weights_sha256"]
    # what made it (the session-31 training review: revision, commit, pixel libraries were missing)
    from ml.preprocess import PIXELS_REVISION

    made = json.loads((first / "metadata.json").read_text())
    assert made["pixels_revision"] == PIXELS_REVISION and "code_commit" in made
    assert {"opencv", "pillow", "torch"} <= made["libraries"].keys() <= made["trained_with_libraries"].keys()
    with pytest.raises(ReleaseError, match="exists"):
        export_member(smoke_run, "imm", "0.0.1", half=False, models_dir=models)
    for name, version in (
        ("..", "0.0.1"),
        ("../escape", "0.0.1"),
        ("Imm", "0.0.1"),
        ("imm", "1"),
        ("imm", "../x"),
    ):
        with pytest.raises(ReleaseError):
            export_member(smoke_run, name, version, half=False, models_dir=models)
    assert [p.name for p in (models / "members").iterdir()] == ["imm"] and not (tmp_path / "escape").exists()

    # a failed export (here: the disk fills while writing) leaves the release as it was
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(ml.export, "save_checkpoint", disk_full)
        with pytest.raises(OSError, match="No space"):
            export_member(smoke_run, "imm", "0.0.1", half=False, models_dir=models, force=True)
    assert json.loads((first / "metadata.json").read_text())["weights_sha256"] == sha
    assert (first / "model.safetensors").exists() and not list((models / ".staging").glob("*"))

    data = DataConfig(natural_dir=_overrides_from(smoke_run)["data.natural_dir"])
    ens = export_ensemble(
        ["imm@0.0.1"], "imm-ens", "0.0.1", "equal_average", data, models, measure_test=False, repeats=2
    )
    assert check_release("imm-ens@0.0.1", models) == "imm-ens@0.0.1"
    with pytest.raises(FileNotFoundError, match="no released ensemble"):
        newest_ensemble(models)  # a candidate is never the default model
    # the rule was given (--rule equal_average): recorded, and the card says it was pinned
    assert json.loads((ens / "manifest.json").read_text())["card"]["rule_pinned"] is True
    assert "pinned by `--rule equal_average`" in (ens / "MODEL_CARD.md").read_text()
    # a --validation-only candidate may be replaced by the export that measures the test part
    # (the pre-registration sequence), and that one is then a release like any other
    # the leak check reads the export's data folder, not the member's recorded (relative) one
    monkeypatch.chdir(tmp_path)
    recorded = json.loads((first / "metadata.json").read_text())
    recorded["train_config"]["data"]["natural_dir"] = "../moved/away/eyepacs-natural-512"
    (first / "metadata.json").write_text(json.dumps(recorded))
    write_sums(first)  # as an export that recorded it so would have (SHA256SUMS, session 29)
    ens = export_ensemble(["imm@0.0.1"], "imm-ens", "0.0.1", "equal_average", data, models, repeats=2)
    assert json.loads((ens / "manifest.json").read_text())["card"]["test"]["n_images"] > 0
    with pytest.raises(ReleaseError, match="exists"):
        export_ensemble(["imm@0.0.1"], "imm-ens", "0.0.1", "equal_average", data, models, measure_test=False)
    assert newest_ensemble(models) == "imm-ens@0.0.1"
    # a candidate with a higher version does not become the default (DRSCREEN_MODEL unset) either
    export_ensemble(
        ["imm@0.0.1"], "imm-ens", "0.0.9", "equal_average", data, models, measure_test=False, repeats=2
    )
    assert newest_ensemble(models) == "imm-ens@0.0.1"

    # a member whose weights are not the ones the manifest names is refused at load
    manifest = json.loads((ens / "manifest.json").read_text())
    manifest["members"][0]["weights_sha256"] = "0" * 64
    (ens / "manifest.json").write_text(json.dumps(manifest))
    write_sums(ens)  # an export's own manifest naming other weights (not an edit SHA256SUMS would catch)
    with pytest.raises(ValueError, match="other weights"):
        check_release("imm-ens@0.0.1", models)

    # a member trained on another split (some of these test patients in its training part)
    meta_path = first / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["train_config"]["data"]["split_seed"] = meta["train_config"]["data"].get("split_seed", 0) + 1
    meta_path.write_text(json.dumps(meta))
    write_sums(first)
    with pytest.raises(ReleaseError, match="test patients"):
        export_ensemble(["imm@0.0.1"], "imm-ens", "0.0.2", "equal_average", data, models, repeats=2)

    # the same test part, but a training part that took some of the validation patients the
    # rules are fitted on (its validation figures would flatter it): refused, candidates too
    meta["train_config"]["data"]["split_seed"] -= 1
    meta["train_config"]["data"]["natural_fractions"] = {"train": 0.6, "val": 0.15, "test": 0.25}
    meta_path.write_text(json.dumps(meta))
    write_sums(first)
    for measure_test in (True, False):
        with pytest.raises(ReleaseError, match="validation patients"):
            export_ensemble(
                ["imm@0.0.1"], "imm-ens", "0.0.2", "equal_average", data, models, repeats=2,
                measure_test=measure_test,
            )  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sed": 3}, "unknown key sed"),
        ({"stage3.epochs": 1}, "unknown key stage3"),
        ({"stage1.epoch": 1}, "unknown key stage1.epoch"),
        ({"model.archh": "x"}, "unknown key model.archh"),
        ({"threads": "two"}, "threads = 'two': expected int"),
        ({"stage1.lr": "fast"}, "stage1.lr = 'fast': expected float"),
        ({"model.head": "regresion"}, "model.head 'regresion'"),
        ({"stage1.monitor": "auc"}, "monitor 'auc'"),
        ({"model.arch": "mobilenetv9"}, "model.arch 'mobilenetv9': not a timm architecture"),
    ],
)
def test_a_config_mistake_is_named_before_anything_runs(override: dict[str, object], message: str) -> None:
    from ml.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs" / "smoke.toml", override)


def test_every_shipped_config_is_valid() -> None:
    from ml.training.config import load_config

    for path in sorted((REPO / "configs").rglob("*.toml")):
        load_config(path)


def test_resume_refuses_another_config_and_restarts_a_run_without_checkpoint(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit: a run stopped in its first epoch resumed from random weights; resuming with
    another config overwrote the run's config.json before failing."""
    import ml.training.train as train_mod
    from ml.training.config import load_config
    from ml.training.train import ResumeError, train_from_config

    config = REPO / "configs" / "smoke.toml"
    overrides = _overrides_from(smoke_run)
    saved = (smoke_run / "config.json").read_text()
    with pytest.raises(ResumeError, match="another configuration"):
        train_from_config(config, resume=smoke_run, overrides={**overrides, "seed": 12345})
    assert (smoke_run / "config.json").read_text() == saved

    stopped = tmp_path / "stopped-in-epoch-1"
    stopped.mkdir()
    (stopped / "config.json").write_text(json.dumps(load_config(config, overrides).to_dict()))
    asked: list[bool] = []
    real_build = train_mod.build_model

    def recording(spec: object, pretrained: bool = False) -> object:
        asked.append(pretrained)
        raise RuntimeError("stop here")  # the initialisation is what this test is about

    monkeypatch.setattr(train_mod, "build_model", recording)
    with pytest.raises(RuntimeError, match="stop here"):
        train_from_config(config, resume=stopped, overrides=overrides)
    assert asked == [True]  # ImageNet weights, not a random network
    monkeypatch.setattr(train_mod, "build_model", real_build)


def test_a_set_value_that_is_not_toml_is_a_string() -> None:
    """The README review: `--set data.natural_dir=/path` answered "Invalid value (at line 1,
    column 5)"; numbers, booleans and quoted strings keep their TOML reading."""
    from ml.training.config import ConfigError, load_config, parse_overrides

    got = parse_overrides(
        ["data.natural_dir=/srv/photos", "threads=1", 'out_dir="/tmp/r"', "two_stage=false"]
    )
    assert got == {"data.natural_dir": "/srv/photos", "threads": 1, "out_dir": "/tmp/r", "two_stage": False}
    assert load_config(REPO / "configs" / "smoke.toml", got).data.natural_dir == "/srv/photos"
    with pytest.raises(ConfigError, match=re.escape("threads = 'two x': expected int")):
        load_config(REPO / "configs" / "smoke.toml", parse_overrides(["threads=two x"]))


def test_resuming_with_another_thread_count_warns_that_the_weights_will_differ(
    smoke_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The session-31 training review: the README promised the same weights on resume while
    ``threads`` could change, and a run resumed with another thread count ended elsewhere."""
    from ml.training.config import load_config
    from ml.training.train import check_resumable

    config = REPO / "configs" / "smoke.toml"
    overrides = _overrides_from(smoke_run)
    started = json.loads((smoke_run / "config.json").read_text())["threads"]
    with caplog.at_level("WARNING", logger="ml.training.train"):
        check_resumable(smoke_run, load_config(config, overrides))
        assert not caplog.records
        check_resumable(smoke_run, load_config(config, {**overrides, "threads": started + 1}))
    assert "will differ" in caplog.text and f"threads={started}" in caplog.text
