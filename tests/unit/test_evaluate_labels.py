"""``drscreen evaluate`` on labels it cannot use: a clear message and exit 2, never a traceback,
and the labels are checked before any photograph is scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.evaluation import LabelsError, evaluate_cli, read_labels

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "16" / "16_left.jpg"


def _labels(folder: Path, body: str) -> Path:
    (folder / "a.jpg").write_bytes(SAMPLE.read_bytes())
    (folder / "broken.jpg").write_bytes(SAMPLE.read_bytes()[:2000])
    path = folder / "labels.csv"
    path.write_text("image,grade\n" + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a.jpg,7\n", "grade '7' is not an ICDR grade 0-4"),
        ("a.jpg,abc\n", "grade 'abc'"),
        ("a.jpg,\n", "grade ''"),
        ("missing.jpg,1\n", "image 'missing.jpg' not found"),
    ],
)
def test_bad_rows_are_named_before_scoring(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(LabelsError, match=message) as info:
        read_labels(_labels(tmp_path, body))
    assert "line 2" in str(info.value)


def test_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_cli(_labels(tmp_path, "a.jpg,7\n"), None, True, None) == 2
    assert "not an ICDR grade" in capsys.readouterr().err
    assert evaluate_cli(_labels(tmp_path, "a.jpg,0\n"), "nope@1.0.0", True, None) == 2
    assert "no such model nope@1.0.0" in capsys.readouterr().err
    broken = _labels(tmp_path, "a.jpg,0\nbroken.jpg,1\n")
    assert evaluate_cli(broken, "drscreen-dev@0.1.0", True, None) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "truncated" in err
    (tmp_path / "empty.csv").write_text("file,label\n")
    assert evaluate_cli(tmp_path / "empty.csv", None, False, None) == 2


def test_a_malformed_model_name_or_runtime_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = _labels(tmp_path, "a.jpg,0\n")
    assert evaluate_cli(labels, "nope", True, None) == 2  # no @version: was a ValueError traceback
    assert "cannot be used" in capsys.readouterr().err
    assert evaluate_cli(labels, "drscreen-dev@0.1.0", True, None, runtime="tensorrt") == 2
    assert "choose from torch, onnx, openvino" in capsys.readouterr().err


def test_by_default_the_served_model_is_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit: with DRSCREEN_MODEL set, evaluate measured the newest release, not the served one."""
    import json

    monkeypatch.setenv("DRSCREEN_MODEL", "drscreen-dev@0.1.0")
    assert evaluate_cli(_labels(tmp_path, "a.jpg,0\n"), None, True, None) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "drscreen-dev@0.1.0" and report["runtime"] == "torch"


def test_the_json_recall_is_five_numbers_when_a_grade_is_absent() -> None:
    """The contract says "per_class_recall (list of 5)"; a grade missing from the labels was null."""
    from ml.evaluation import json_report, nan_to_none
    from ml.metrics import grading_report

    report = json_report(grading_report([0, 0, 2, 4], [0, 1, 2, 2], [0.1, 0.2, 0.9, 0.8]))
    out = nan_to_none(report)
    assert out["per_class_recall"] == [0.5, 0.0, 1.0, 0.0, 0.0]
    assert out["per_class_support"] == [2, 0, 1, 0, 1]


def test_rows_without_a_patient_id_are_each_their_own_patient() -> None:
    """The audit: rows with a blank patient_id were pooled into one patient ("")."""
    from types import SimpleNamespace

    import numpy as np

    from ml.evaluation import patient_metrics
    from ml.inference.combine import CombineRule

    ens = SimpleNamespace(members=["m@1"], rule=CombineRule("weighted_average", [1.0]))
    g0, g3 = [1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0]
    rows = [
        {"image": "a.jpg", "patient_id": "P", "eye": "left"},
        {"image": "b.jpg", "patient_id": "P", "eye": "right"},
        *({"image": f"x{i}.jpg", "patient_id": "", "eye": ""} for i in range(4)),
    ]
    members = [{"m@1": g} for g in (g0, g0, g3, g0, g0, g0)]
    out = patient_metrics(rows, ens, members, np.array([0, 0, 3, 0, 0, 0]))  # type: ignore[arg-type]
    assert out["n_patients"] == 5
    assert out["referable_sensitivity"] == 1.0 and out["referable_specificity"] == 1.0


def test_a_photograph_given_as_labels_is_named_as_the_labels_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The contract review: a JPEG as --labels was reported as "model (newest) cannot be used"."""
    assert evaluate_cli(SAMPLE, None, True, None) == 2
    err = capsys.readouterr().err
    assert "is not a UTF-8 CSV file" in err and "model" not in err


def test_a_report_folder_that_cannot_be_made_is_refused_before_scoring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: an existing file as --report was found only after every photograph was scored,
    and the traceback lost the metrics and the JSON line."""
    from ml import evaluation

    scored: list[Path] = []
    monkeypatch.setattr(evaluation, "evaluate", lambda labels, *a, **k: scored.append(labels))
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert evaluate_cli(_labels(tmp_path, "a.jpg,0\n"), None, True, taken) == 2
    assert "cannot write the report to" in capsys.readouterr().err
    assert scored == [] and taken.read_text() == "not a folder"


def test_the_text_recall_of_an_absent_grade_reads_n_a(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text report printed "nan" where the docstrings promise "n/a" (the JSON has 0.0 and support 0)."""
    assert evaluate_cli(_labels(tmp_path, "a.jpg,0\n"), "drscreen-dev@0.1.0", False, None) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "per_class_recall" in x)
    assert "nan" not in line and line.split(": ", 1)[1].split(", ")[1:] == ["n/a"] * 4


def test_patient_figures_come_as_served_and_model_only_with_intervals_and_each_photograph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review (session 30): the printed patient figures applied the quality gate while the
    model card's did not, and nothing said so; they had no interval; the per-photograph results
    behind the figures were not in the output; NaN was printed where a figure was undefined."""
    import csv
    import json

    (tmp_path / "a.jpg").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "grey.png").write_bytes(_grey_png())  # not a fundus: the gate rejects it
    labels = tmp_path / "labels.csv"
    labels.write_text("image,grade,patient_id,eye\na.jpg,0,P1,left\ngrey.png,0,P1,right\na.jpg,0,P2,left\n")
    assert evaluate_cli(labels, "drscreen-dev@0.1.0", True, str(tmp_path / "report")) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    served, model_only = report["patient"], report["patient_model_only"]
    assert "quality gate" in served["note"] and "not applied" in model_only["note"]
    assert served["n_patients"] == model_only["n_patients"] == 2
    assert set(served["intervals_95"]) >= {"referable_specificity"}
    # no referable patient: sensitivity undefined, null in JSON, "n/a" in the text
    assert served["referable_sensitivity"] is None
    lines = [x for x in out.splitlines() if x.strip().startswith(("patient level", "patient, model only"))]
    assert len(lines) == 2 and all("sensitivity n/a" in x and "NaN" not in x for x in lines)
    # labels all grade 0: sensitivity is undefined, "n/a" in every text (it printed nan)
    assert report["referable_sensitivity"] is None and "referable_sensitivity: n/a" in out
    assert "nan" not in out.lower() and "nan" not in (tmp_path / "report" / "report.md").read_text().lower()
    # P1's right eye is ungradable as served: referred, so not every patient is cleared
    assert served["referable_specificity"] == 0.5
    assert [(p["image"], p["gradable"]) for p in report["predictions"]] == [
        ("a.jpg", True),
        ("grey.png", False),
        ("a.jpg", True),
    ]
    with (tmp_path / "report" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == ["P1", "P1", "P2"]
    assert [int(r["predicted"]) for r in rows] == [p["predicted"] for p in report["predictions"]]


def _grey_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()
