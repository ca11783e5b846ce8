"""Training curves as PNG (loss, accuracy, QWK per epoch, both stages on one axis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def plot_curves(history: list[dict[str, Any]], out: Path) -> None:
    if not history:
        return
    fig = curves_figure(history)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def curves_figure(history: list[dict[str, Any]]) -> Figure:
    """Loss, accuracy and validation QWK per epoch (the figure ``plot_curves`` saves)."""
    x = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (train_key, val_key, title) in zip(
        axes,
        [
            ("train_loss", "val_loss", "loss (val: mean |grade error|)"),
            ("train_accuracy", "val_accuracy", "accuracy"),
            (None, "val_qwk", "validation QWK"),
        ],
        strict=True,
    ):
        if train_key:
            ax.plot(x, [h[train_key] for h in history], "o-", label="train")
        # a final cross-validated run has no validation photographs (its folds' curves are in
        # cv_curves.png); None marks an epoch without them
        averaged = any(h.get(f"live_{val_key}") is not None for h in history)
        if any(h[val_key] is not None for h in history):
            label = "validation (weight average)" if averaged else "validation"
            ax.plot(x, _series(history, val_key), "s-", label=label)
        elif not train_key:
            ax.text(0.5, 0.5, "no validation part\n(see cv_curves.png)", ha="center", transform=ax.transAxes)
        if any(h.get(f"nat_{val_key}") is not None for h in history):  # stage 1 watches natural colour too
            ax.plot(x, _series(history, f"nat_{val_key}"), "^:", label="natural-colour validation")
        if averaged:  # stageN.ema_decay: the live network's figures, logged beside the average's
            live = _series(history, f"live_{val_key}")
            ax.plot(x, live, "s--", alpha=0.6, label="validation (live weights)")
        stage2 = [i + 1 for i, h in enumerate(history) if h["stage"] == "stage2"]
        if stage2:
            ax.axvline(stage2[0] - 0.5, color="grey", ls="--", lw=1)
            ax.text(stage2[0] - 0.4, ax.get_ylim()[1], "natural colour", va="top", fontsize=8, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch (both stages)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float("nan") if h.get(key) is None else float(h[key]) for h in history]


def plot_cv_curves(folds: list[list[dict[str, Any]]], final: list[dict[str, Any]], out: Path) -> None:
    """A cross-validated natural stage: each fold's held-out QWK and every run's training loss."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, history in enumerate(folds):
        rows = [h for h in history if h["stage"] == "stage2"]
        epochs = [h["epoch"] for h in rows]
        left.plot(epochs, [h["val_qwk"] for h in rows], "o-", label=f"fold {k + 1}")
        right.plot(epochs, [h["train_loss"] for h in rows], "o-", label=f"fold {k + 1}")
    right.plot([h["epoch"] for h in final], [h["train_loss"] for h in final], "k^-", label="final (all)")
    left.set_title("held-out fold QWK (default cuts)")
    right.set_title("training loss")
    for ax in (left, right):
        ax.set_xlabel("natural-stage epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
