"""`drscreen evaluate`: score a labelled set with a released ensemble (or one member) and
report the contract's metrics; `--report DIR` adds a confusion matrix and a Markdown/HTML
report. Without `--model` it measures what the workers serve (`DRSCREEN_MODEL`, else the newest
release); `--runtime onnx|openvino` runs the CPU workers' graphs instead of PyTorch float32.

Labels CSV: columns `image` (path relative to the CSV's folder) and `grade`, optionally
`patient_id` and `eye`. With patient ids, patient-level referable figures are added (a
patient is referable when either eye is, using the contract's worse-eye rule).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml.environment import env_setting
from ml.imageio import ImageDecodeError, decode_image
from ml.inference.combine import CombineRule
from ml.inference.ensemble import Ensemble, Member, load_ensemble
from ml.metrics import bootstrap_intervals, grading_report, patient_referable_metrics, referable_metrics
from ml.quality import assess_quality, thresholds_for_manifest
from ml.release import load_checkpoint, member_dir, models_root_has_member

log = logging.getLogger(__name__)
# the figures printed first and tabulated in the report, in this order
HEADLINE_KEYS = (
    "n_images",
    "qwk",
    "accuracy",
    "referable_sensitivity",
    "referable_specificity",
    "referable_auc",
)


RUNTIMES = ("torch", "onnx", "openvino")


def load_model(ref: str | None, runtime: str = "torch", precision: str = "auto") -> Ensemble:
    """An ensemble by name@version, or a single released member wrapped as a 1-member ensemble.

    No ``ref``: the ensemble the workers serve (``DRSCREEN_MODEL``, else the newest shipped).
    ``runtime``: PyTorch float32 (the model card's figures), or the ONNX Runtime / OpenVINO path
    a CPU worker runs (OpenVINO at ``precision``; ``auto``: bfloat16 where the release accepted it).
    """
    ref = ref or os.environ.get("DRSCREEN_MODEL") or None
    if ref and models_root_has_member(ref):
        if runtime != "torch":
            raise LabelsError(f"--runtime {runtime}: a single member is evaluated with PyTorch only")
        model, pre, config = load_checkpoint(member_dir(ref))
        return Ensemble(ref, [Member(ref, model, pre, config)], CombineRule("weighted_average", [1.0]), {})
    if runtime not in RUNTIMES:
        raise LabelsError(f"--runtime {runtime}: choose from {', '.join(RUNTIMES)}")
    # quantized=None: int8 graphs only where the export kept them, as a worker loads them
    return load_ensemble(ref, runtime=runtime, precision=precision, quantized=None)


class LabelsError(ValueError):
    """A labels file that cannot be evaluated as it is (said before any photograph is scored,
    except for a photograph that turns out not to decode)."""


def read_labels(path: Path) -> list[dict[str, str]]:
    """The rows of a labels CSV, each checked: an ``image`` that exists under the CSV's folder
    and a ``grade`` that is an integer 0-4."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:  # a photograph or a spreadsheet given as --labels
        raise LabelsError(f"{path} is not a UTF-8 CSV file ({exc.reason} at byte {exc.start})") from exc
    if not rows or "image" not in rows[0] or "grade" not in rows[0]:
        raise LabelsError(f"{path}: needs a header with columns 'image' and 'grade', and rows")
    problems = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        grade = (row.get("grade") or "").strip()
        if grade not in {"0", "1", "2", "3", "4"}:
            problems.append(f"line {line}: grade {grade!r} is not an ICDR grade 0-4")
        if not (path.parent / (row.get("image") or "")).is_file() or not row.get("image"):
            problems.append(f"line {line}: image {row.get('image')!r} not found under {path.parent}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise LabelsError(f"{path}: " + "; ".join(problems[:10]) + more)
    return rows


def _decode(path: Path) -> np.ndarray:
    try:
        return decode_image(path.read_bytes())
    except ImageDecodeError as exc:
        raise LabelsError(f"{path}: cannot be read as a photograph ({exc.reason}: {exc.detail})") from exc


def evaluate(labels: Path, ref: str | None, batch: int = 16, runtime: str = "torch") -> dict[str, Any]:
    rows = read_labels(labels)
    # read once: the precision OpenVINO runs at is also reported (its grades depend on it)
    precision = env_setting("DRSCREEN_OPENVINO_PRECISION", "auto")
    ens = load_model(ref, runtime, precision)
    base = labels.parent
    gate = thresholds_for_manifest(getattr(ens, "quality_thresholds", None))
    probs: list[list[float]] = []
    member_probs: list[dict[str, list[float]]] = []
    grades: list[int] = []
    ungradable: list[str] = []
    for start in tqdm(range(0, len(rows), batch), desc="evaluating", unit="batch", file=sys.stderr):
        chunk = rows[start : start + batch]
        images = [_decode(base / r["image"]) for r in chunk]
        for r, rgb in zip(chunk, images, strict=True):
            if not assess_quality(rgb, gate).gradable:
                ungradable.append(r["image"])
        for pred in ens.predict(images):
            probs.append(pred.probabilities)
            member_probs.append(pred.members)
            grades.append(pred.grade)
    y = np.array([int(r["grade"]) for r in rows])
    p = np.array(probs)
    referable_score = p[:, 2:].sum(axis=1)
    # The model's figures grade every photograph (comparable with the model card's); the service
    # also runs the quality gate first and refers what it rejects, which is what "screening" says.
    report = grading_report(y.tolist(), grades, referable_score.tolist())
    report["referable_roc"] = referable_roc(y >= 2, referable_score)
    report["model"] = ens.ref
    report["runtime"] = runtime
    if runtime == "openvino":  # its grades depend on it (docs/performance.md, session 17)
        from ml.inference.openvino_runtime import bf16_kernels

        report["openvino_precision"] = precision
        report["bf16_kernels"] = bf16_kernels()  # the CPU kind whose verdict "auto" follows
    report["n_ungradable"] = len(ungradable)
    report["ungradable_images"] = ungradable
    rejected = set(ungradable)
    as_served = [4 if r["image"] in rejected else g for r, g in zip(rows, grades, strict=True)]
    served = referable_metrics(y.tolist(), as_served, None)
    report["screening"] = {
        "referable_sensitivity": served["referable_sensitivity"],
        "referable_specificity": served["referable_specificity"],
        "note": "as the service decides: photographs the quality gate rejects are referred",
    }
    with_patients = any(r.get("patient_id") for r in rows)
    # resample patients, not photographs, when they are known (two eyes are not two patients)
    report["intervals_95"] = bootstrap_intervals(
        y, grades, referable_score, _patient_ids(rows) if with_patients else None
    )
    report["intervals_resampled"] = "patients" if with_patients else "images"
    gradable = [r["image"] not in rejected for r in rows]
    if with_patients:
        report["patient"] = {
            **patient_metrics(rows, ens, member_probs, y, gradable),
            "note": "as the service decides: an eye whose photographs the quality gate rejects is referred",
        }
        report["patient_model_only"] = {
            **patient_metrics(rows, ens, member_probs, y, None),
            "note": "every photograph graded, the quality gate not applied (the model card's figures)",
        }
    # one row per photograph, so every figure above can be recomputed from what was printed
    report["predictions"] = [
        {
            "image": r["image"],
            "patient_id": r.get("patient_id") or None,
            "eye": r.get("eye") or None,
            "grade": int(t),
            "predicted": int(g),
            "referable_score": round(float(sc), 6),
            "gradable": ok,
        }
        for r, t, g, sc, ok in zip(rows, y, grades, referable_score, gradable, strict=True)
    ]
    return report


def referable_roc(truth: np.ndarray, score: np.ndarray) -> dict[str, list[float]] | None:
    """The referable ROC curve's points (None when the labels hold one class only)."""
    if truth.all() or not truth.any():
        return None
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(truth, score)
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def number(value: float, digits: int = 3) -> str:
    """A figure as text: "n/a" where it is undefined on the labels given (NaN printed before)."""
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def interval_lines(report: dict[str, Any]) -> list[str]:
    """'key: lo .. hi' for the headline figures that have a bootstrap interval."""
    intervals = report.get("intervals_95", {})
    return [
        f"{k}: {number(intervals[k][0])} .. {number(intervals[k][1])}"
        for k in HEADLINE_KEYS
        if k in intervals
    ]


def patient_metrics(
    rows: list[dict[str, str]],
    ens: Ensemble,
    members: list[dict[str, list[float]]],
    y: np.ndarray,
    gradable: list[bool] | None = None,
) -> dict[str, Any]:
    """Referable figures per patient, as the service decides (``ml.metrics.patient_referable_metrics``
    on the members' stored outputs; photographs the quality gate rejects are not pooled, and an eye
    left with none is referred). Rows without a patient id are each their own patient (a blank id
    pooled every such row into one patient)."""
    member_probs = np.array([[m[ref] for m in members] for ref in ens.members])
    eyes = [r.get("eye") or "" for r in rows]
    return patient_referable_metrics(
        ens.rule, member_probs, _patient_ids(rows), eyes, y, gradable, with_intervals=True
    )


def _patient_ids(rows: list[dict[str, str]]) -> list[str]:
    """Each row's patient; a row without one is a patient of its own (not one blank patient)."""
    return [r.get("patient_id") or f"image:{r['image']}" for r in rows]


def write_report(report: dict[str, Any], out: Path, y_true: list[int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    matrix = np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(matrix, cmap="Blues")
    for i in range(5):
        for j in range(5):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="black" if matrix[i, j] < matrix.max() / 2 else "white",
            )
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("reference grade")
    ax.set_title(f"{report['model']}\nQWK {number(report['qwk'])}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    with (out / "confusion_matrix.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["reference \\ predicted", *(f"grade {g}" for g in range(5))])
        writer.writerows([f"grade {g}", *matrix[g].tolist()] for g in range(5))
    plots = ["![confusion matrix](confusion_matrix.png)"]
    roc = report.get("referable_roc")
    if roc:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(roc["fpr"], roc["tpr"], color="#c0392b")
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":")
        ax.set_xlabel("1 - specificity (non-referable photographs referred)")
        ax.set_ylabel("sensitivity (referable photographs found)")
        ax.set_title(f"referable (grade >= 2): AUC {report['referable_auc']:.3f}")
        fig.tight_layout()
        fig.savefig(out / "roc_referable.png", dpi=100)
        plt.close(fig)
        plots.append("![referable ROC](roc_referable.png)")
    md = [f"# Evaluation of {report['model']}", "", "| metric | value |", "|---|---|"]
    md += [
        f"| {k} | {number(report[k])} |" if isinstance(report[k], float) else f"| {k} | {report[k]} |"
        for k in HEADLINE_KEYS
    ]
    md += [
        "",
        "Per-class recall: "
        + ", ".join(f"grade {g}: {number(r, 2)}" for g, r in enumerate(report["per_class_recall"])),
        "",
    ]
    if "intervals_95" in report:
        md += [
            f"95% bootstrap intervals (resampling {report['intervals_resampled']}): "
            + "; ".join(interval_lines(report)),
            "",
        ]
    for key, label in (("patient", "Patient level"), ("patient_model_only", "Patient level, model only")):
        if key in report:
            md += [f"{label}: {patient_line(report[key])}", ""]
    md += [
        "The referable AUC and ROC curve rank photographs by the ensemble's probability of grade >= 2; "
        "the referral itself cuts the expected grade (its cut points), so the sensitivity and "
        "specificity above are near the curve, not always on it.",
        "",
        "Each photograph's reference grade, predicted grade and referable score: `predictions.csv`.",
        "",
        *plots,
        "",
    ]
    with (out / "predictions.csv").open("w", newline="") as fh:
        columns = ["image", "patient_id", "eye", "grade", "predicted", "referable_score", "gradable"]
        rows_out = csv.DictWriter(fh, fieldnames=columns)
        rows_out.writeheader()
        rows_out.writerows(report.get("predictions", []))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(html_report(report))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return number(value)
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(report: dict[str, Any]) -> str:
    """The evaluation as a page: headline metrics, per-grade recall, intervals, patient level and
    the confusion matrix (``confusion_matrix.png`` beside it)."""
    parts = [
        f"<h1>Evaluation of {html.escape(str(report['model']))}</h1>",
        _table(["metric", "value"], [[k, report[k]] for k in HEADLINE_KEYS]),
        "<h2>Recall per reference grade</h2>",
        _table([f"grade {g}" for g in range(5)], [list(report["per_class_recall"])]),
    ]
    if "intervals_95" in report:
        rows = [[name, lo, hi] for name, (lo, hi) in report["intervals_95"].items()]
        parts += [
            f"<h2>95% bootstrap intervals (resampling {html.escape(report['intervals_resampled'])})</h2>",
            _table(["metric", "low", "high"], rows),
        ]
    for key, title in (
        ("patient", "Patient level (worse eye)"),
        ("patient_model_only", "Patient level, model only"),
    ):
        if key in report:
            figures = report[key]
            intervals = figures.get("intervals_95", {})
            rows = [
                [k, v, *intervals.get(k, ["", ""])]
                for k, v in figures.items()
                if k not in ("intervals_95", "note")
            ]
            parts += [
                f"<h2>{title}</h2><p>{html.escape(figures['note'])}</p>",
                _table(["metric", "value", "95% low", "95% high"], rows),
            ]
    parts += ['<h2>Confusion matrix</h2><img src="confusion_matrix.png" alt="confusion matrix">']
    if report.get("referable_roc"):
        parts += ['<h2>Referable ROC</h2><img src="roc_referable.png" alt="referable ROC curve">']
    style = (
        "body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}"
    )
    head = f"<meta charset='utf-8'><title>drscreen evaluation</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def nan_to_none(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, +-inf) replaced by None: what strict
    JSON can carry (``json.dumps`` writes NaN and Infinity, which JSON parsers refuse)."""
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value


def evaluate_cli(
    labels: Path, model: str | None, as_json: bool, report_dir: Path | None, runtime: str = "torch"
) -> int:
    logging.basicConfig(level=logging.WARNING)
    if report_dir is not None:
        # before scoring: a report folder that cannot be made lost the whole run's metrics (and the
        # JSON line) after every photograph had been scored
        try:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            sys.stderr.write(f"drscreen evaluate: cannot write the report to {report_dir}: {exc}\n")
            return 2
    try:
        report = evaluate(Path(labels), model, runtime=runtime)
    except LabelsError as exc:
        sys.stderr.write(f"drscreen evaluate: {exc}\n")
        return 2
    except FileNotFoundError as exc:  # an unknown --model
        sys.stderr.write(f"drscreen evaluate: no such model {model or '(newest)'}: {exc}\n")
        return 2
    except ValueError as exc:  # a malformed name@version, or weights that fail their sha256
        sys.stderr.write(f"drscreen evaluate: model {model or '(newest)'} cannot be used: {exc}\n")
        return 2
    if report_dir:
        write_report(report, Path(report_dir))
    out = sys.stdout
    for key in HEADLINE_KEYS:
        value = report[key]
        out.write(f"{key:>24}: {number(value, 4)}\n" if isinstance(value, float) else f"{key:>24}: {value}\n")
    out.write(f"{'per_class_recall':>24}: " + ", ".join(number(r) for r in report["per_class_recall"]) + "\n")
    if "intervals_95" in report:
        out.write(f"{'95% interval':>24}: " + "; ".join(interval_lines(report)))
        out.write(f" (bootstrap over {report['intervals_resampled']})\n")
    screening = report["screening"]
    out.write(
        f"{'quality gate':>24}: {report['n_ungradable']} of {report['n_images']} photograph(s) "
        f"ungradable; referring them as the service does: sensitivity "
        f"{number(screening['referable_sensitivity'], 4)}, specificity "
        f"{number(screening['referable_specificity'], 4)}\n"
    )
    for key, label in (("patient", "patient level"), ("patient_model_only", "patient, model only")):
        if key in report:
            out.write(f"{label:>24}: {patient_line(report[key])}\n")
    if as_json:
        # the LAST line of stdout is one JSON object (NaN -> null so any JSON parser reads it)
        out.write(json.dumps(nan_to_none(json_report(report))) + "\n")
    return 0


def patient_line(figures: dict[str, Any]) -> str:
    """'n patients; sensitivity x (lo .. hi), ...; note' ("n/a" where a figure is undefined)."""

    def fmt(key: str) -> str:
        value = figures.get(key)
        if value is None:
            return "n/a"
        lo, hi = figures.get("intervals_95", {}).get(key, (float("nan"), float("nan")))
        return number(value) + (f" ({number(lo)} .. {number(hi)})" if np.isfinite(lo) else "")

    names = {"referable_sensitivity": "sensitivity", "referable_specificity": "specificity"}
    shown = [
        f"{names.get(k, 'AUC')} {fmt(k)}"
        for k in ("referable_sensitivity", "referable_specificity", "referable_auc")
    ]
    return f"{figures['n_patients']} patients; " + ", ".join(shown) + f"; {figures['note']}"


def json_report(report: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: the contract's ``per_class_recall`` is a list of 5 numbers, so the
    recall of a grade with no photograph in the labels is 0.0 (scikit-learn's zero_division=0;
    the text report says "n/a"), and ``per_class_support`` tells how many photographs each grade
    had (0 there: no recall to speak of)."""
    matrix = np.asarray(report["confusion_matrix"])
    support = [int(n) for n in matrix.sum(axis=1)]
    recall = [0.0 if n == 0 else float(r) for r, n in zip(report["per_class_recall"], support, strict=True)]
    return {**report, "per_class_recall": recall, "per_class_support": support}
