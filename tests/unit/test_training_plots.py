"""Training curves: what each panel draws, with and without a weight average."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ml.training.plots import curves_figure


def _rows(live: bool) -> list[dict[str, Any]]:
    rows = []
    for epoch, q in enumerate((0.3, 0.5), start=1):
        row: dict[str, Any] = {
            "stage": "stage1",
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "train_accuracy": 0.4,
            "val_loss": 0.9,
            "val_accuracy": 0.5,
            "val_qwk": q,
        }
        if live:
            row |= {"live_val_loss": 0.95, "live_val_accuracy": 0.45, "live_val_qwk": q - 0.1}
        rows.append(row)
    return rows


def _labels_and_texts(rows: list[dict[str, Any]]) -> list[tuple[list[str], list[str]]]:
    fig = curves_figure(rows)
    try:
        return [
            ([str(line.get_label()) for line in ax.get_lines()], [t.get_text() for t in ax.texts])
            for ax in fig.axes
        ]
    finally:
        plt.close(fig)


def test_plain_run_draws_validation_and_no_missing_validation_notice() -> None:
    for labels, texts in _labels_and_texts(_rows(live=False)):
        assert "validation" in labels and "validation (live weights)" not in labels
        assert not any("no validation part" in t for t in texts)


def test_weight_averaged_run_draws_the_live_network_beside_the_average() -> None:
    for labels, texts in _labels_and_texts(_rows(live=True)):
        assert {"validation (weight average)", "validation (live weights)"} <= set(labels)
        assert not any("no validation part" in t for t in texts)


def test_run_without_validation_says_so_on_the_qwk_panel() -> None:
    rows = [r | {"val_loss": None, "val_accuracy": None, "val_qwk": None} for r in _rows(live=False)]
    texts = _labels_and_texts(rows)[2][1]
    assert any("no validation part" in t for t in texts)


def test_stage1_watching_natural_colour_draws_its_validation_too() -> None:
    rows = [r | {"nat_val_loss": 0.8, "nat_val_accuracy": 0.6, "nat_val_qwk": 0.4} for r in _rows(live=False)]
    for labels, _ in _labels_and_texts(rows):
        assert {"validation", "natural-colour validation"} <= set(labels)
    for labels, _ in _labels_and_texts(_rows(live=False)):
        assert "natural-colour validation" not in labels
