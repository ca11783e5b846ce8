"""The training loop: `drscreen train --config configs/<member>.toml`.

Two stages: (1) the large equalised EyePACS set, starting with a frozen-backbone phase;
(2) fine-tuning on the natural-colour patients of the training part. Early stopping on
validation QWK in each stage (stage 1 on equalised validation patients, stage 2 on the
natural-colour validation patients). Every epoch writes `last.pt`, so `--resume` continues
an interrupted run; the run folder holds the resolved config, metrics per epoch, curves and
the best checkpoint (as a release-style folder that `drscreen export` promotes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ml.metrics import DEFAULT_THRESHOLDS, apply_thresholds, qwk, referable_metrics
from ml.models import GradingNet, ModelSpec, build_model, expected_grade, grade_probabilities
from ml.preprocess import PIXELS_REVISION
from ml.release import code_commit, load_checkpoint, save_checkpoint
from ml.training.config import StageConfig, TrainConfig, load_config
from ml.training.data import Sample, augment, cached_pixels, read_labels, split_hash, split_patients, to_batch
from ml.training.ema import WeightAverage
from ml.training.losses import grading_loss
from ml.training.plots import plot_curves

log = logging.getLogger(__name__)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Split:
    samples: list[Sample]
    pixels: np.ndarray

    @property
    def grades(self) -> np.ndarray:
        return np.array([s.grade for s in self.samples])


@dataclass
class Datasets:
    eq_train: Split
    eq_val: Split
    nat_train: Split
    nat_val: Split
    split_hash: str
    counts: dict[str, int] = field(default_factory=dict)


def resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p).resolve()


def prepare_data(cfg: TrainConfig, base: Path) -> Datasets:
    """Patient-level splits of both domains and their cached, preprocessed pixels."""
    eq_dir = resolve(cfg.data.equalized_dir, base)
    cache = resolve(cfg.data.cache_dir, base)
    nat = natural_split(cfg, base)
    eq = split_patients(
        equalized_without(read_labels(eq_dir), nat),
        {"train": 1 - cfg.data.equalized_val_fraction, "val": cfg.data.equalized_val_fraction},
        cfg.data.split_seed,
    )
    splits = {f"eq_{k}": v for k, v in eq.items()} | {f"nat_{k}": v for k, v in nat.items()}

    if cfg.data.limit_per_split > 0:
        splits = {k: v[: cfg.data.limit_per_split] for k, v in splits.items()}

    def make(tag: str) -> Split:
        # empty parts (a final cross-validated run has no validation part), and the equalised
        # parts of a natural-colour-only run, which are neither trained on nor worth caching
        if not splits[tag] or (tag.startswith("eq_") and not uses_equalized(cfg)):
            size = cfg.preprocess.size
            return Split([], np.zeros((0, size, size, 3), np.uint8))
        return Split(splits[tag], cached_pixels(splits[tag], cfg.preprocess, cache, tag))

    return Datasets(
        make("eq_train"),
        make("eq_val"),
        make("nat_train"),
        make("nat_val"),
        split_hash=split_hash(splits),
        counts={k: len(v) for k, v in splits.items()},
    )


def uses_equalized(cfg: TrainConfig) -> bool:
    """Whether any stage trains on the equalised photographs (else they are not even cached)."""
    return cfg.stage1.epochs > 0 or (cfg.two_stage and cfg.stage2.mix_equalized > 0)


def equalized_without(equalized: list[Sample], natural: dict[str, list[Sample]]) -> list[Sample]:
    """The equalised photographs of patients who are not in the natural-colour folder.

    41 patients are in both folders: their equalised photographs are the natural ones after
    the third party's colour processing. Left in stage 1, they let a member train on natural
    validation and test patients (and on every cross-validation fold's held-out patients).
    """
    natural_ids = {s.patient_id for part in natural.values() for s in part}
    kept = [s for s in equalized if s.patient_id not in natural_ids]
    if len(kept) < len(equalized):
        log.info("stage 1 leaves out %d equalised copies of natural photographs", len(equalized) - len(kept))
    return kept


def natural_split(cfg: TrainConfig, base: Path) -> dict[str, list[Sample]]:
    """The natural-colour patients' train/val/test parts (the test part is never trained on)."""
    parts = split_patients(
        read_labels(resolve(cfg.data.natural_dir, base)), cfg.data.natural_fractions, cfg.data.split_seed
    )
    k, fold = cfg.data.natural_folds, cfg.data.natural_fold
    if k <= 0:
        return parts
    if not -1 <= fold < k:
        raise ValueError(f"data.natural_fold must be -1 or 0..{k - 1}, got {fold}")
    folds = natural_folds(parts["train"] + parts["val"], k, cfg.data.split_seed)
    if fold == -1:
        return {"train": [s for f in folds for s in f], "val": [], "test": parts["test"]}
    train = [s for i, f in enumerate(folds) if i != fold for s in f]
    return {"train": train, "val": folds[fold], "test": parts["test"]}


def natural_folds(pool: list[Sample], k: int, seed: int) -> list[list[Sample]]:
    """``k`` patient folds of the pooled train+val photographs, stratified by worst grade."""
    parts = split_patients(pool, {f"fold{i}": 1 / k for i in range(k)}, seed + 1)
    return [parts[f"fold{i}"] for i in range(k)]


def sampling_order(grades: np.ndarray, n: int, power: float, rng: np.random.Generator) -> np.ndarray:
    """Indices for one epoch, over-sampling rare grades by class_frequency ** -power."""
    if n <= 0:
        n = len(grades)
    freq = np.bincount(grades, minlength=5).astype(float)
    weights = np.where(freq[grades] > 0, freq[grades] ** -power, 0.0)
    return rng.choice(len(grades), size=n, replace=power > 0 or n > len(grades), p=weights / weights.sum())


def extra_draws(n: int, share: float) -> int:
    """Draws from the extra set that make up ``share`` of an epoch with ``n`` main draws."""
    return round(n * share / (1 - share))


def mixed_order(
    grades: np.ndarray, extra_grades: np.ndarray, n: int, share: float, power: float, rng: np.random.Generator
) -> np.ndarray:
    """One epoch of ``n`` draws over ``grades`` (as ``sampling_order``) shuffled together with
    ``extra_draws(n, share)`` draws over ``extra_grades``, whose indices follow the main ones."""
    main = sampling_order(grades, n, power, rng)
    n_extra = extra_draws(n, share)
    extra = sampling_order(extra_grades, n_extra, power, rng) + len(grades) if n_extra else main[:0]
    order = np.concatenate([main, extra])
    rng.shuffle(order)
    return order


@torch.inference_mode()
def predict(
    model: GradingNet, split: Split, cfg: TrainConfig, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(continuous grade, 5-class probabilities) for every image of a split."""
    model.eval()
    scores, probs = [], []
    for start in range(0, len(split.samples), batch_size):
        x = to_batch(split.pixels[start : start + batch_size], cfg.preprocess)
        out = model(x.to(DEVICE, memory_format=torch.channels_last))
        scores.append(expected_grade(out).float().cpu().numpy())
        probs.append(grade_probabilities(out).float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(probs)


def validation_figures(model: GradingNet, val: Split, cfg: TrainConfig) -> dict[str, float | None]:
    """val_loss (mean |grade error|), val_accuracy and val_qwk at the default cuts, and the
    referable AUC of P(grade >= 2); None each when the split is empty (or the AUC undefined)."""
    if not val.samples:
        return dict.fromkeys(("val_loss", "val_accuracy", "val_qwk", "val_referable_auc"))
    scores, probs = predict(model, val, cfg)
    pred = apply_thresholds(scores, DEFAULT_THRESHOLDS)
    auc = referable_metrics(val.grades, pred, probs[:, 2:].sum(axis=1))["referable_auc"]
    return {
        "val_loss": float(np.mean(np.abs(scores - val.grades))),
        "val_accuracy": float((pred == val.grades).mean()),
        "val_qwk": qwk(val.grades, pred),
        "val_referable_auc": None if math.isnan(auc) else auc,
    }


def epoch_figures(
    model: GradingNet, val: Split, watch: Split | None, cfg: TrainConfig
) -> dict[str, float | None]:
    """``validation_figures`` on the stage's own validation part, plus ``nat_``-prefixed ones
    on ``watch`` (stage 1: the natural-colour validation patients) when given."""
    figures = validation_figures(model, val, cfg)
    if watch is not None and watch.samples:
        figures |= {f"nat_{k}": v for k, v in validation_figures(model, watch, cfg).items()}
    return figures


def set_backbone_frozen(model: GradingNet, frozen: bool) -> None:
    for p in model.backbone.parameters():
        p.requires_grad = not frozen


def run_stage(
    model: GradingNet,
    stage: StageConfig,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    name: str,
    run_dir: Path,
    history: list[dict[str, Any]],
    start_epoch: int = 0,
    extra: Split | None = None,
    resumed_best: tuple[dict[str, torch.Tensor], float] | None = None,
    resumed_average: tuple[dict[str, torch.Tensor], int] | None = None,
    watch: Split | None = None,
    on_epoch_end: Callable[[GradingNet, int], None] | None = None,
    resumed_training: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Train one stage; returns the best state (by ``stage.monitor_key``) and appends to history.
    With ``extra`` and ``stage.mix_equalized`` > 0, that share of each epoch comes from ``extra``.
    ``resumed_best``: the best state and score a resumed stage had reached before it stopped;
    ``resumed_average``: its weight average and update count (with ``stage.ema_decay`` > 0);
    ``watch``: a second validation part logged as ``nat_val_*`` (and monitored with
    ``stage.select_on = "natural"``); ``on_epoch_end(model, epoch)`` is called with the validated
    weights in place (the average's, if any); ``resumed_training``: the optimiser's moments and
    the random generators' states as the interrupted run saved them (:func:`_training_state`)."""
    if stage.select_on == "natural" and (watch is None or not watch.samples):
        raise ValueError(
            f"{name}: select_on = 'natural' needs the natural-colour validation photographs "
            "beside the stage's own (stage 1 only)"
        )
    rng = np.random.default_rng(cfg.seed + (0 if name == "stage1" else 1000))
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = stage.samples_per_epoch or len(train.samples)
    share = stage.mix_equalized if extra is not None and extra.samples else 0.0
    n_main = len(train.samples)
    if share > 0:
        if not 0 < share < 1:
            raise ValueError(f"mix_equalized must be in [0, 1), got {share}")
        assert extra is not None
        train = Split(train.samples + extra.samples, np.concatenate([train.pixels, extra.pixels]))
    grades = train.grades

    def epoch_order() -> np.ndarray:
        if share > 0:
            main, rest = grades[:n_main], grades[n_main:]
            return mixed_order(main, rest, per_epoch, share, stage.balance_power, rng)
        return sampling_order(grades, per_epoch, stage.balance_power, rng)

    draws = per_epoch + (extra_draws(per_epoch, share) if share > 0 else 0)
    steps_total = stage.epochs * math.ceil(draws / stage.batch_size)
    optimizer = torch.optim.AdamW(
        (p for p in model.parameters()), lr=stage.lr, weight_decay=stage.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, steps_total - stage.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # a resumed stage starts its schedule where the interrupted run stopped
    skipped = start_epoch * math.ceil(draws / stage.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step + skipped))
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=DEVICE.type == "cuda")
    class_weight = None
    if cfg.loss.class_weight_power > 0:
        freq = np.bincount(grades, minlength=5).astype(float).clip(min=1)
        w = freq**-cfg.loss.class_weight_power
        class_weight = torch.tensor(w / w.mean(), dtype=torch.float32, device=DEVICE)
    best_score, best_state, bad_epochs = (
        -1.0,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        0,
    )
    average = WeightAverage(model, stage.ema_decay) if stage.ema_decay > 0 else None
    if resumed_training is not None and start_epoch > 0:
        # without these a resumed run restarted AdamW's moments and replayed the first epochs'
        # augmentations: it continued, but not as the uninterrupted run would have (the review)
        optimizer.load_state_dict(resumed_training["optimizer"])
        gen.set_state(resumed_training["augment_rng"])
        torch.set_rng_state(resumed_training["torch_rng"])
        scaler.load_state_dict(resumed_training["scaler"])
        log.info("%s resumed after epoch %d with its optimiser and random states", name, start_epoch)
    if resumed_best is not None and start_epoch > 0:
        best_state, best_score = resumed_best
        bad_epochs = epochs_since_best([r for r in history if r["stage"] == name], stage.monitor_key)
        if bad_epochs >= stage.patience:  # the interrupted run had stopped this stage early
            log.info("%s had stopped early before the interruption: not trained further", name)
            return best_state
    if average is not None and resumed_average is not None and start_epoch > 0:
        average.state, average.updates = resumed_average
    for epoch in range(stage.epochs):
        order = epoch_order()
        if epoch < start_epoch:  # resumed: replay the sampling RNG, skip the work
            continue
        frozen = epoch < stage.freeze_epochs
        set_backbone_frozen(model, frozen)
        model.train()
        losses, correct, seen = [], 0, 0
        t0 = time.time()
        bar = tqdm(
            range(0, len(order), stage.batch_size),
            desc=f"{name} epoch {epoch + 1}/{stage.epochs}{' (frozen)' if frozen else ''}",
            unit="batch",
        )
        for start in bar:
            idx = np.sort(order[start : start + stage.batch_size])
            x = augment(to_batch(train.pixels[idx], cfg.preprocess), gen, stage.augment_strength)
            x = x.to(DEVICE, memory_format=torch.channels_last)
            y = torch.from_numpy(grades[idx]).long().to(DEVICE)
            # mixed precision where it pays (CUDA); CPU autocast is slower for these nets
            with torch.autocast(device_type=DEVICE.type, enabled=DEVICE.type == "cuda"):
                out = model(x)
                loss = grading_loss(out, y, cfg.loss, class_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                average.update(model)
            losses.append(float(loss.detach()))
            pred = apply_thresholds(expected_grade(out).detach().float().cpu().numpy(), DEFAULT_THRESHOLDS)
            correct += int((pred == y.cpu().numpy()).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        # With a weight average, the average is what is validated and kept; the live net's figures
        # are logged beside it for comparison.
        live: dict[str, float | None] = {}
        if average is not None:
            live = {f"live_{k}": v for k, v in epoch_figures(model, val, watch, cfg).items()}
        with average.swapped_in(model) if average is not None else contextlib.nullcontext():
            figures = epoch_figures(model, val, watch, cfg) | live
            if on_epoch_end is not None:
                on_epoch_end(model, epoch + 1)
        score = figures[stage.monitor_key]
        row = {
            "stage": name,
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": correct / max(1, seen),
            "train_samples": seen,
            **figures,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.time() - t0, 1),
        }
        history.append(row)
        log.info("%s", json.dumps(row))
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        # without validation photographs (a final cross-validated run) every epoch counts as an
        # improvement: the stage keeps its last epoch and never stops early
        if score is None or score > best_score:
            best_score, bad_epochs = (best_score if score is None else score), 0
            best_state = (
                average.snapshot()
                if average is not None
                else {k: v.detach().clone() for k, v in model.state_dict().items()}
            )
        else:
            bad_epochs += 1
        # written aside and renamed: a run killed while saving keeps its previous last.pt
        torch.save(
            {
                "stage": name,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "best": best_state,
                "best_score": best_score,
                "history": history,
                "average": None if average is None else (average.state, average.updates),
                "training": _training_state(optimizer, gen, scaler),
            },
            run_dir / "last.pt.tmp",
        )
        os.replace(run_dir / "last.pt.tmp", run_dir / "last.pt")
        plot_curves(history, run_dir / "curves.png")
        if bad_epochs >= stage.patience:
            log.info(
                "early stop in %s after epoch %d (best val %s %.3f)",
                name,
                epoch + 1,
                stage.monitor,
                best_score,
            )
            break
    return best_state


def _training_state(
    optimizer: torch.optim.Optimizer, gen: torch.Generator, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """What an exact resumption needs beyond the weights (the learning rate follows the epoch)."""
    return {
        "optimizer": optimizer.state_dict(),
        "augment_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "scaler": scaler.state_dict(),
    }


# What may differ between a run and its resumption: the machine's share, not the experiment.
_RESUME_MAY_CHANGE = ("threads", "out_dir")


class ResumeError(ValueError):
    """``--resume`` was given a folder that is not this config's interrupted run."""


def check_resumable(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume ``run_dir`` with another config (its config.json would be overwritten
    and the checkpoint loaded into another network)."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        raise ResumeError(f"--resume {run_dir}: not a run folder (no config.json)")
    saved = {k: v for k, v in json.loads(saved_path.read_text()).items() if k not in _RESUME_MAY_CHANGE}
    wanted = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in _RESUME_MAY_CHANGE}
    if saved != wanted:
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise ResumeError(
            f"--resume {run_dir}: the run was started with another configuration (differs in "
            f"{', '.join(differ)}); resume with the same --config and --set options"
        )
    started, now = json.loads(saved_path.read_text()).get("threads"), cfg.to_dict().get("threads")
    if started != now:
        # allowed (a run may move to a busier or bigger machine), but not exact: the session-31
        # review's resumed run ended at QWK -0.087 against 0.204 uninterrupted
        log.warning(
            "resuming %s with threads=%s where it was started with threads=%s: it continues, but "
            "its weights will differ from an uninterrupted run's (CPU kernels add up in another "
            "order); resume with threads=%s for the same weights",
            run_dir, now, started, started,
        )  # fmt: skip


def epochs_since_best(rows: list[dict[str, Any]], key: str) -> int:
    """Epochs after the first best score (the early-stopping count a resumed stage carries on)."""
    scores = [r[key] for r in rows if r.get(key) is not None]
    return len(scores) - 1 - scores.index(max(scores)) if scores else 0


def new_run_dir(parent: Path, label: str) -> Path:
    """A new ``<stamp>-<label>`` folder; runs started in the same second (side by side, as
    scripts/release.sh starts them) get ``<stamp>-2-<label>`` and so on instead of crashing."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        run_dir = parent / (f"{stamp}-{label}" if n == 1 else f"{stamp}-{n}-{label}")
        try:
            run_dir.mkdir()  # atomic: of two processes only one creates it
            return run_dir
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def train_from_config(
    path: str | Path, resume: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """Run a whole training (both stages) and return the run folder."""
    cfg = load_config(path, overrides)
    base = Path.cwd()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    for folder in (cfg.data.natural_dir, cfg.data.equalized_dir):
        if not (resolve(folder, base) / "labels.csv").exists():  # before a run folder is made
            raise FileNotFoundError(f"no labels.csv in {resolve(folder, base)} (data folder of the config)")
    if resume:
        run_dir = Path(resume)
        check_resumable(run_dir, cfg)
    else:
        run_dir = new_run_dir(
            resolve(cfg.out_dir, base), f"{cfg.model.arch}-{cfg.preprocess.size}-{cfg.name}"
        )
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    data = prepare_data(cfg, base)
    log.info("data: %s split %s", data.counts, data.split_hash)
    # a run interrupted before its first epoch ended has no checkpoint: it starts over, from the
    # ImageNet weights (it once resumed from random ones)
    has_checkpoint = resume is not None and (run_dir / "last.pt").exists()
    if resume is not None and not has_checkpoint:
        log.warning("%s has no last.pt (stopped during its first epoch): starting it over", run_dir)
    model = initial_model(cfg, base, has_checkpoint).to(DEVICE).to(memory_format=torch.channels_last)
    history: list[dict[str, Any]] = []
    done_stage, done_epoch = None, 0
    resumed_best = resumed_average = resumed_training = None
    if has_checkpoint:
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        history, done_stage, done_epoch = state["history"], state["stage"], state["epoch"]
        # the interrupted stage's best so far; without it a resumed stage would keep only the
        # best of the epochs after the resume (or, if it had finished, its last epoch)
        resumed_best = (state["best"], state["best_score"])
        resumed_average = state.get("average")
        resumed_training = state.get("training")  # None in a checkpoint from before session 29
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    best = model.state_dict()
    if done_stage in (None, "stage1") and cfg.stage1.epochs > 0:
        best = run_stage(
            model,
            cfg.stage1,
            data.eq_train,
            data.eq_val,
            cfg,
            "stage1",
            run_dir,
            history,
            done_epoch if done_stage == "stage1" else 0,
            resumed_best=resumed_best if done_stage == "stage1" else None,
            resumed_average=resumed_average if done_stage == "stage1" else None,
            resumed_training=resumed_training if done_stage == "stage1" else None,
            watch=data.nat_val,
            on_epoch_end=epoch_saver(cfg, cfg.stage1, data, run_dir, "stage1", history),
        )
        model.load_state_dict(best)
        save_member(model, cfg, data, run_dir / "stage1", history)
    if cfg.two_stage:
        start = done_epoch if done_stage == "stage2" else 0
        best = run_stage(
            model,
            cfg.stage2,
            data.nat_train,
            data.nat_val,
            cfg,
            "stage2",
            run_dir,
            history,
            start,
            data.eq_train,
            resumed_best=resumed_best if done_stage == "stage2" else None,
            resumed_average=resumed_average if done_stage == "stage2" else None,
            resumed_training=resumed_training if done_stage == "stage2" else None,
            on_epoch_end=epoch_saver(cfg, cfg.stage2, data, run_dir, "stage2", history),
        )
        model.load_state_dict(best)
    save_member(model, cfg, data, run_dir / "best", history)
    log.info("run finished: %s", run_dir)
    return run_dir


def epoch_saver(
    cfg: TrainConfig,
    stage_cfg: StageConfig,
    data: Datasets,
    run_dir: Path,
    stage: str,
    history: list[dict[str, Any]],
) -> Callable[[GradingNet, int], None] | None:
    """With ``stageN.save_epochs``, a callback that saves each epoch's validated weights as the
    member folder <stage>-epochNN/; else None."""
    if not stage_cfg.save_epochs:
        return None

    def save(model: GradingNet, epoch: int) -> None:
        save_member(model, cfg, data, run_dir / f"{stage}-epoch{epoch:02d}", history)

    return save


def initial_model(cfg: TrainConfig, base: Path, resuming: bool) -> GradingNet:
    """ImageNet-initialised network, or a released member's weights when the config warm-starts."""
    if not cfg.init_from:
        return build_model(cfg.model, pretrained=not resuming)
    folder = resolve(cfg.init_from, base)
    model, pre, config = load_checkpoint(folder)
    if ModelSpec.from_dict(config["model"]) != cfg.model:
        raise ValueError(f"init_from {folder}: architecture {config['model']} differs from the config's")
    # the input size may change (a convolutional network with global pooling takes any size);
    # every other pixel setting must match what the weights were trained on
    if {**pre.to_dict(), "size": 0} != {**cfg.preprocess.to_dict(), "size": 0}:
        raise ValueError(f"init_from {folder}: its preprocessing differs from the config's")
    log.info("warm start from %s", folder)
    return model


def member_metrics(model: GradingNet, cfg: TrainConfig, nat_val: Split) -> dict[str, float | None]:
    """What a released member's metadata says of it: the natural-colour validation QWK at the
    default cuts and the referable AUC (None without validation photographs)."""
    val_qwk = val_auc = None
    if nat_val.samples:
        scores, probs = predict(model, nat_val, cfg)
        val_qwk = qwk(nat_val.grades, apply_thresholds(scores, DEFAULT_THRESHOLDS))
        val_auc = referable_metrics(nat_val.grades, [], probs[:, 2:].sum(axis=1))["referable_auc"]
    return {"natural_val_qwk_default_thresholds": val_qwk, "natural_val_referable_auc": val_auc}


def natural_validation(cfg: TrainConfig, base: Path) -> Split:
    """The natural-colour validation part of ``cfg``'s split, with its cached pixels."""
    samples = natural_split(cfg, base)["val"]
    if cfg.data.limit_per_split > 0:
        samples = samples[: cfg.data.limit_per_split]
    cache = resolve(cfg.data.cache_dir, base)
    return Split(samples, cached_pixels(samples, cfg.preprocess, cache, "nat_val"))


def save_member(
    model: GradingNet, cfg: TrainConfig, data: Datasets, folder: Path, history: list[dict[str, Any]]
) -> None:
    save_checkpoint(
        folder,
        model,
        cfg.preprocess,
        cfg.name,
        "0.0.0",
        {
            "metrics": member_metrics(model, cfg, data.nat_val),
            "data_split_hash": data.split_hash,
            "split_counts": data.counts,
            "train_config": cfg.to_dict(),
            "pixels_revision": PIXELS_REVISION,
            "code_commit": code_commit(),
            "history": history,
        },
    )
