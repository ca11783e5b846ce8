"""`drscreen export`: promote training runs to releases and fit the ensemble.

    drscreen export member RUN_DIR --name NAME --version 1.0.0 [--half]
    drscreen export soup RUN_DIR RUN_DIR ... --out SOUP_RUN_DIR   (then export it as a member)
    drscreen export ensemble --member NAME@VER ... --name NAME --version 1.0.0 [--rule auto]
                             [--validation-only] [--plain-weight-check]
    drscreen export onnx --model NAME@VER [--quantize]

The ensemble step is where every combination rule meets every member on the same natural-colour
validation patients: weights, thresholds and the stacking model are fitted there, the rule
with the best validation QWK is chosen, and all of it is also measured on the natural-colour
test patients that no member was trained or tuned on. The figures go into the manifest and the
model card. ``--validation-only`` leaves the test part out (not even scored): for candidates that
a rule fixed beforehand must choose between, so no test figure is on screen before the choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml.ensemble_fit import (
    RELEASE_REPEATS,
    TARGET_SENSITIVITY,
    TARGET_SPECIFICITY,
    choose_rule,
    fit_rules,
    fit_weighted_average,
    member_checks,
)
from ml.inference.combine import CombineRule, combine, expected
from ml.inference.ensemble import Ensemble, Member
from ml.metrics import DEFAULT_THRESHOLDS, bootstrap_intervals, grading_report, patient_referable_metrics
from ml.publish import ReleaseError, publishing, writable
from ml.release import (
    default_models_dir,
    ensemble_dir,
    is_candidate,
    load_checkpoint,
    member_dir,
    save_checkpoint,
    sha256_file,
)
from ml.training.config import DataConfig, TrainConfig
from ml.training.crossval import CURVES_FILE, OOF_FILE
from ml.training.data import Sample, load_rgb
from ml.training.train import natural_split

log = logging.getLogger(__name__)


def export_member(
    run_dir: Path,
    name: str,
    version: str,
    half: bool,
    models_dir: Path,
    check: list[Sample] | None = None,
    force: bool = False,
) -> Path:
    """Copy a run's best checkpoint into models/members/<name>/<version>.

    With ``half``, weights are stored as float16 only if that changes no grade (default cuts on
    the expected grade) on the ``check`` photographs (the natural-colour validation patients
    unless given); otherwise float32 is kept and the metadata says why. An existing version is
    refused unless ``force`` (``ml.publish``); nothing is written unless every step passes.
    """
    src = run_dir / "best"
    if not (src / "config.json").exists():
        raise ReleaseError(f"{run_dir} has no best checkpoint ({src}): not a finished training run")
    with publishing(models_dir, "members", name, version, force) as staging:
        _write_member(run_dir, staging, name, version, half, check)
    dst = member_dir(f"{name}@{version}", models_dir)
    log.info("exported %s -> %s (%.1f MB)", run_dir, dst, (dst / "model.safetensors").stat().st_size / 1e6)
    return dst


def _write_member(
    run_dir: Path, dst: Path, name: str, version: str, half: bool, check: list[Sample] | None
) -> None:
    src = run_dir / "best"
    model, pre, config = load_checkpoint(src)
    meta = {
        k: v
        for k, v in config["metadata"].items()
        if k not in ("name", "version", "libraries", "weights_sha256")
    }
    meta.pop("history", None)
    meta.update({"changelog": f"{version}: trained by run {run_dir.name}", "run": run_dir.name})
    if "libraries" in config["metadata"]:  # the release's own are the export's: keep the training's
        meta["trained_with_libraries"] = config["metadata"]["libraries"]
    save_checkpoint(dst, model, pre, name, version, meta, half=half)
    if half:
        if check is None:
            train_cfg = meta.get("train_config", {})
            data = DataConfig(
                **{k: v for k, v in train_cfg.get("data", {}).items() if k in DataConfig.__dataclass_fields__}
            )
            split = natural_split(TrainConfig(data=data), Path.cwd())
            # a cross-validated final run has no validation part: check on its training photographs
            # (this is a numerical comparison of two precisions, not a measure of accuracy)
            check = split["val"] or split["train"]
        report = half_precision_check(src, dst, name, check)
        keep_half = report["grades_changed"] == 0
        if not keep_half:
            log.warning("float16 changed %d grades: keeping float32", report["grades_changed"])
        # rewritten either way so the metadata carries the check's figures
        save_checkpoint(
            dst, model, pre, name, version, meta | {"half_precision_check": report}, half=keep_half
        )
    for extra in ("curves.png", "metrics.jsonl", "config.json", OOF_FILE, "cv.json", CURVES_FILE):
        if (run_dir / extra).exists():
            shutil.copy(run_dir / extra, dst / ("train_" + extra if extra == "config.json" else extra))


def half_precision_check(full: Path, half: Path, name: str, samples: list[Sample]) -> dict[str, Any]:
    """Compare a float32 checkpoint with its float16 copy on real photographs."""
    loaded = []
    for folder in (full, half):
        model, pre, config = load_checkpoint(folder)
        loaded.append(Member(name, model, pre, config))
    p32, p16 = member_probs(loaded[:1], samples)[0], member_probs(loaded[1:], samples)[0]
    cuts = list(DEFAULT_THRESHOLDS)
    g32 = np.searchsorted(cuts, expected(p32), side="right")
    g16 = np.searchsorted(cuts, expected(p16), side="right")
    return {
        "n_images": len(samples),
        "grades_changed": int((g32 != g16).sum()),
        "max_abs_probability_diff": float(np.abs(p32 - p16).max()),
    }


def member_probs(members: list[Member], samples: list[Sample]) -> np.ndarray:
    """(M, N, 5) member probabilities for labelled samples."""
    ens = Ensemble("fit", members, CombineRule(), {})
    out = []
    for start in tqdm(range(0, len(samples), 16), desc="scoring", unit="batch"):
        batch = [load_rgb(s.path) for s in samples[start : start + 16]]
        out.append(ens.member_probabilities(ens.pixel_inputs(batch)))
    return np.concatenate(out, axis=1)


def evaluate_probs(rule: CombineRule, probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    combined, _, grade = combine(rule, probs)
    referable_score = combined[:, 2:].sum(axis=1)
    return grading_report(y, grade, referable_score)


def export_ensemble(
    member_refs: list[str],
    name: str,
    version: str,
    rule_name: str,
    data: DataConfig,
    models_dir: Path,
    nested: bool = True,
    measure_test: bool = True,
    repeats: int = RELEASE_REPEATS,
    force: bool = False,
) -> Path:
    """Fit the combination rules on validation, choose one, write manifest and model card.
    ``nested=False``: the weighted average judged as up to 1.4.0 (``ml.ensemble_fit.fit_rules``);
    ``measure_test=False``: the test patients are neither scored nor reported; ``repeats``:
    shuffles of the patient folds that judge rules, floors and members (4 up to 1.4.2).
    An existing version is refused unless ``force``; a member trained on any of the test patients
    is refused (its test figures would not be of unseen patients)."""
    folder = ensemble_dir(f"{name}@{version}", models_dir)
    # a candidate may be replaced by the export that adopts it, test part measured (the documented
    # pre-registration sequence, docs/experiments.md)
    force = force or is_candidate(folder)
    writable(models_dir, "ensembles", name, version, force)  # before the fitting, not after it
    members = []
    for ref in member_refs:
        try:
            model, pre, config = load_checkpoint(member_dir(ref, models_dir))
        except (OSError, ValueError) as exc:  # unknown or malformed name@version, bad weights
            raise ReleaseError(f"member {ref} cannot be loaded from {models_dir}: {exc}") from exc
        members.append(Member(ref, model, pre, config))
    split = natural_split(TrainConfig(data=data), Path.cwd())
    val, test = split["val"], split["test"]
    if not measure_test:
        test = []
    fit_set = out_of_fold_set(member_refs, models_dir)
    for member in members:
        # cross-validated members trained on validation patients by design (their out-of-fold
        # probabilities are what the rules are fitted on); any other member must not have
        _check_not_trained_on(member, test, [] if fit_set is not None else val, data.natural_dir)
    y_test = np.array([s.grade for s in test])
    p_test = member_probs(members, test) if test else None
    if fit_set is not None:
        # every member was cross-validated (ml/training/crossval.py): fit on their out-of-fold
        # probabilities of the pooled train+validation patients
        p_val, y_val, groups = fit_set
        fit_desc = (
            "natural-colour train+validation patients, out-of-fold probabilities of cross-validated members"
        )
    else:
        y_val, groups = np.array([s.grade for s in val]), np.array([s.patient_id for s in val])
        p_val = member_probs(members, val)
        fit_desc = "natural-colour validation patients"
    rules, checks = fit_rules(p_val, y_val, groups, nested=nested, repeats=repeats)
    singles = member_checks(p_val, y_val, groups, repeats)
    table: dict[str, dict[str, Any]] = {}
    for i, ref in enumerate(member_refs):
        # each member at the floor its own out-of-fold check chose, so all of its row is one fit
        # (max_vote's cut points were fitted at max_vote's floor: the review of session 30)
        single = fit_weighted_average([1.0])(p_val[i : i + 1], y_val, groups, singles[i].floor)
        table[ref] = {
            "validation": evaluate_probs(single, p_val[i : i + 1], y_val),
            "validation_out_of_fold": asdict(singles[i]),
        }
        if p_test is not None:
            table[ref]["test"] = evaluate_probs(single, p_test[i : i + 1], y_test)
    for rname, rule in rules.items():
        table[f"rule:{rname}"] = {
            "validation": evaluate_probs(rule, p_val, y_val),
            "validation_out_of_fold": asdict(checks[rname]),
        }
        if p_test is not None:
            table[f"rule:{rname}"]["test"] = evaluate_probs(rule, p_test, y_test)
    chosen = rule_name if rule_name != "auto" else choose_rule(checks)
    test_intervals = patient_level = None
    if p_test is not None:
        combined, _, chosen_grades = combine(rules[chosen], p_test)
        test_intervals = bootstrap_intervals(
            y_test, chosen_grades, combined[:, 2:].sum(axis=1), [s.patient_id for s in test]
        )
        patient_level = patient_referable_metrics(
            rules[chosen],
            p_test,
            [s.patient_id for s in test],
            [s.eye for s in test],
            y_test,
            with_intervals=True,
        )
    manifest = {
        "name": name,
        "version": version,
        "members": [
            {"ref": r, "weights_sha256": sha256_file(member_dir(r, models_dir) / "model.safetensors")}
            for r in member_refs
        ],
        "combination": rules[chosen].to_dict(),
        "card": {
            "chosen_rule": chosen,
            # --rule NAME: the user's choice, not the out-of-fold ranking's (the card says which)
            "rule_pinned": rule_name != "auto",
            "sensitivity_floor_on_validation": checks[chosen].floor if chosen in checks else None,
            "weighted_average_check": "nested" if nested else "plain",
            "out_of_fold_repeats": repeats,
            "validation": {"set": fit_desc, "n_images": len(y_val)},
            "test": {
                "set": "natural-colour test patients (never trained or tuned on)"
                if measure_test
                else "not measured (--validation-only)",
                "n_images": len(test),
                "chosen_rule_intervals_95": test_intervals,
                "chosen_rule_patient_level": patient_level,
            },
            "metrics": table,
        },
    }
    quality = Path(__file__).with_name("quality_thresholds.json")
    if quality.exists():
        manifest["quality_thresholds"] = json.loads(quality.read_text())
    with publishing(models_dir, "ensembles", name, version, force) as staging:
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
        (staging / "MODEL_CARD.md").write_text(model_card(manifest))
    oof = checks.get(chosen)
    log.info(
        "ensemble %s@%s: rule %s, out-of-fold QWK %s, sensitivity %s, specificity %s%s",
        name,
        version,
        chosen,
        *(_fmt(getattr(oof, k, None)) for k in ("qwk", "sensitivity", "specificity")),
        "" if measure_test else " (test part not measured)",
    )
    return folder


def _check_not_trained_on(member: Member, test: list[Sample], val: list[Sample], natural_dir: str) -> None:
    """Refuse a member whose own split put any of ``test``'s patients in its training or
    validation part, or any of ``val``'s (the patients the rules and cut points are fitted and
    judged on) in its training part: a member trained with another ``data.split_seed`` or
    fractions. Its figures would not be of unseen patients."""
    if not test and not val:
        return
    trained = member.config.get("metadata", {}).get("train_config", {}).get("data")
    if not trained:
        return  # no record of its split (releases before metadata carried train_config)
    # the member's split parameters (seed, fractions, folds) over the photographs this export
    # reads: its recorded folder may be relative to another directory, or moved since
    own_data = {k: v for k, v in trained.items() if k in DataConfig.__dataclass_fields__}
    data = DataConfig(**{**own_data, "natural_dir": natural_dir})
    own = natural_split(TrainConfig(data=data), Path.cwd())
    seen = {s.patient_id for part in ("train", "val") for s in own[part]}
    leaked = sorted({s.patient_id for s in test} & seen)
    if leaked:
        raise ReleaseError(
            f"{member.ref} was trained or tuned on {len(leaked)} of the test patients (its data "
            f"split differs: e.g. patients {', '.join(leaked[:5])}); its test figures would not be "
            "of unseen patients"
        )
    trained_on = sorted({s.patient_id for s in val} & {s.patient_id for s in own["train"]})
    if trained_on:
        raise ReleaseError(
            f"{member.ref} was trained on {len(trained_on)} of the validation patients the rules are "
            f"fitted on (its data split differs: e.g. patients {', '.join(trained_on[:5])}); its "
            "validation and out-of-fold figures would flatter it"
        )


def out_of_fold_set(
    member_refs: list[str], models_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(M, N, 5) out-of-fold probabilities, grades and patients when every member carries them
    for the same photographs in the same order; otherwise None."""
    files = [member_dir(ref, models_dir) / OOF_FILE for ref in member_refs]
    if not all(f.exists() for f in files):
        return None
    loaded = [np.load(f) for f in files]
    first = loaded[0]
    if any(not np.array_equal(d["paths"], first["paths"]) for d in loaded[1:]):
        log.warning("members' out-of-fold photographs differ: fitting on the validation patients")
        return None
    return np.stack([d["probs"] for d in loaded]), first["grades"], first["patients"]


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


CARD_INTRO = (
    "Grades colour fundus photographs on the ICDR scale (0 none ... 4 proliferative DR); "
    "referable = grade >= 2."
)
CARD_LIMITS = [
    "- Trained on EyePACS (Kaggle 2015) photographs: stage 1 on ~5,200 colour-equalised 256 px "
    "photographs, stage 2 on natural-colour patients; split by patient.",
    "- The test set is small (about 58 patients): its figures carry wide confidence intervals, "
    "and grades 3 and 4 are rare in it.",
    "- One population and camera family; other cameras (e.g. DRIVE) were only checked by the "
    "quality gate, not graded.",
    "- Not a medical device. Ungradable photographs get no grade and the eye is reported as "
    "ungradable (refer).",
]
CARD_COLUMNS = (
    "| model or rule | val QWK (in sample) | val QWK (out of fold) | val sens. / spec. (out of fold) "
    "| test QWK | test accuracy | test referable sens. | test referable spec. | test referable AUC |"
)
CARD_PER_PHOTOGRAPH = "Every figure in this table is per photograph; the service refers per patient (below)."
CARD_SELECTION = (
    "- The out-of-fold figures also chose among the rules and sensitivity floors on the same "
    "validation patients (and members' stage-1 checkpoints may have been chosen on them): the "
    "chosen rule's out-of-fold figure is optimistic; the test figures are the least biased ones "
    "here, but the same test patients have been read for each release since 1.0.0."
)


WEIGHT_CHECKS = {
    "nested": "The weighted average's out-of-fold figures choose its weights inside each fold.",
    "plain": "The weighted average's weights were picked and judged on the same folds (before "
    "session 6): its out-of-fold figures flatter it.",
}


def _meets_targets(row: dict[str, Any]) -> bool:
    """A metrics row's out-of-fold referable sensitivity/specificity meet the screening targets."""
    oof = row.get("validation_out_of_fold") or {}
    sensitivity, specificity = oof.get("sensitivity") or 0, oof.get("specificity") or 0
    return bool(sensitivity >= TARGET_SENSITIVITY and specificity >= TARGET_SPECIFICITY)


def _pinned_verdict(card: dict[str, Any], met: bool, folds: str, targets: str) -> str:
    """How a rule pinned with ``--rule`` fares against the screening targets, and, when it misses
    them, whether another rule met them (the ranking would then have chosen among those)."""
    oof = f"its out-of-fold referable sensitivity/specificity ({folds})"
    if met:
        return f"{oof} meet the {targets} screening targets"
    others = [
        f"`{key.removeprefix('rule:')}`"
        for key, row in card["metrics"].items()
        if key.startswith("rule:") and isinstance(row, dict) and _meets_targets(row)
    ]
    if others:
        named = " and ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
        return f"**{oof} miss the {targets} screening targets**, which {named} met"
    return f"**no rule met the {targets} screening targets out of fold** ({folds}), this one included"


def model_card(manifest: dict[str, Any]) -> str:
    card = manifest["card"]
    combination = manifest["combination"]
    lines = [f"# Model card: {manifest['name']}@{manifest['version']}", "", CARD_INTRO, "", "## Members", ""]
    lines += [f"- `{m['ref']}`" for m in manifest["members"]]
    met = _meets_targets(card["metrics"].get(f"rule:{card['chosen_rule']}", {}))
    folds = f"5 patient-grouped folds x {card.get('out_of_fold_repeats', 4)} shuffles"
    targets = f"{TARGET_SENSITIVITY:.2f}/{TARGET_SPECIFICITY:.2f}"
    if card.get("rule_pinned"):
        pinned = f"pinned by `--rule {card['chosen_rule']}` at export, not chosen by out-of-fold QWK"
        how = f"{pinned}: {_pinned_verdict(card, met, folds, targets)}"
    else:
        among = (
            f"among the rules whose out-of-fold referable sensitivity/specificity meet {targets}"
            if met
            else f"**no rule met the {targets} screening targets out of fold**: the rules were ranked "
            "by meeting the sensitivity target first, then QWK"
        )
        how = f"chosen by out-of-fold QWK ({folds}) {among}"
    lines += [
        "",
        f"Combination rule: **{card['chosen_rule']}**, weights {combination['weights']}, thresholds "
        f"{combination['thresholds']}. Fitted on {card['validation']['set']} and "
        f"{how}; cut points are the median of bootstrap fits, and "
        f"the 1|2 cut is lowered until validation referable sensitivity >= "
        f"{card['sensitivity_floor_on_validation']}. "
        + WEIGHT_CHECKS[card.get("weighted_average_check", "plain")],
        "",
        f"## Figures ({card['validation']['n_images']} validation / "
        + (f"{card['test']['n_images']} test" if card["test"]["n_images"] else "no (not measured)")
        + " natural-colour photographs)",
        "",
        CARD_PER_PHOTOGRAPH,
        "",
        CARD_COLUMNS,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in card["metrics"].items():
        t, oof = row.get("test") or {}, row.get("validation_out_of_fold")
        sens_spec = f"{_fmt(oof['sensitivity'])} / {_fmt(oof['specificity'])}" if oof else "-"
        cells = [_fmt(row["validation"]["qwk"]), _fmt(oof["qwk"] if oof else None), sens_spec]
        cells += [_fmt(t.get(k)) for k in ("qwk", "accuracy", "referable_sensitivity")]
        cells += [_fmt(t.get(k)) for k in ("referable_specificity", "referable_auc")]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    intervals = card["test"].get("chosen_rule_intervals_95")
    if intervals:
        lines += [
            "",
            "95% bootstrap intervals of the chosen rule's test figures (2,000 resamples of the "
            "test patients): "
            + "; ".join(f"{k} {_fmt(v[0])} .. {_fmt(v[1])}" for k, v in intervals.items())
            + ".",
        ]
    lines += _patient_level_lines(card["test"].get("chosen_rule_patient_level"))
    lines += ["", "## Data and limits", "", *CARD_LIMITS, CARD_SELECTION, *_grade_one_limit(manifest)]
    return "\n".join(lines) + "\n"


def _patient_level_lines(figures: dict[str, Any] | None) -> list[str]:
    """The chosen rule's test figures per patient, and whether they keep the screening targets."""
    if not figures:
        return []
    sens, spec = figures["referable_sensitivity"], figures["referable_specificity"]
    verdict = (
        "they meet the screening targets at patient level too."
        if sens >= TARGET_SENSITIVITY and spec >= TARGET_SPECIFICITY
        else f"**below the {TARGET_SENSITIVITY:.2f}/{TARGET_SPECIFICITY:.2f} screening targets at patient "
        "level**: the operating point was chosen per photograph, and a patient has two chances to be "
        "referred."
    )
    intervals = figures.get("intervals_95") or {}

    def figure(key: str) -> str:
        lo_hi = intervals.get(key)
        return _fmt(figures[key]) + (f" ({_fmt(lo_hi[0])} .. {_fmt(lo_hi[1])})" if lo_hi else "")

    return [
        "",
        "Per patient, by the service's rule (an eye graded from its photographs pooled, and referred "
        "when one of them alone is referable; the patient referred when either eye is), every "
        "photograph graded (the quality gate not applied: `drscreen evaluate` prints this as "
        f"'patient, model only'), on the {figures['n_patients']} test patients"
        + (", 95% intervals from 2,000 resamples of the patients" if intervals else "")
        + ": "
        f"referable sensitivity {figure('referable_sensitivity')}, specificity "
        f"{figure('referable_specificity')}, AUC {figure('referable_auc')}; {verdict}",
    ]


def _grade_one_limit(manifest: dict[str, Any]) -> list[str]:
    """A limit line when the chosen cut points leave grade 1 (mild) all but unreachable: the
    sensitivity floor drags the 0|1 cut down with the 1|2 cut (ml.ensemble_fit)."""
    card, cuts = manifest["card"], manifest["combination"].get("thresholds") or []
    row = card["metrics"].get(f"rule:{card['chosen_rule']}", {})
    graded_one = {
        name: sum(r[1] for r in part["confusion_matrix"])
        for name in ("validation", "test")
        if (part := row.get(name)) and part.get("confusion_matrix")
    }
    if len(cuts) < 2 or (cuts[1] - cuts[0] >= 0.05 and any(graded_one.values())):
        return []
    counts = ", ".join(f"{n} {name}" for name, n in graded_one.items())
    return [
        f"- Grade 1 (mild) is all but never given: the 0|1 and 1|2 cut points are {_fmt(cuts[0])} and "
        f"{_fmt(cuts[1])} (photographs graded 1: {counts}). Mild disease is reported as 0 or 2: the "
        "referral decision is what the rule was fitted for."
    ]


def export_cli(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="drscreen export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    pm = sub.add_parser("member", help="promote a training run")
    pm.add_argument("run_dir", type=Path)
    pm.add_argument("--name", required=True)
    pm.add_argument("--version", required=True)
    pm.add_argument("--half", action="store_true", help="store weights as float16")
    pm.add_argument("--force", action="store_true", help="replace an existing version (candidates only)")
    ps = sub.add_parser("soup", help="average the weights of several runs into one run folder (ml/soup.py)")
    ps.add_argument("run_dirs", type=Path, nargs="+")
    ps.add_argument("--out", type=Path, required=True)
    pe = sub.add_parser("ensemble", help="fit and write an ensemble manifest")
    pe.add_argument("--member", action="append", required=True, help="NAME@VERSION (repeat)")
    pe.add_argument("--name", required=True)
    pe.add_argument("--version", required=True)
    pe.add_argument(
        "--rule",
        default="auto",
        choices=["auto", "weighted_average", "equal_average", "max_vote", "stacking"],
    )
    pe.add_argument("--natural-dir", default=DataConfig().natural_dir)
    pe.add_argument(
        "--plain-weight-check",
        action="store_true",
        help="judge the weighted average as releases up to 1.4.0 were (weights not chosen inside each fold)",
    )
    pe.add_argument(
        "--repeats",
        type=int,
        default=RELEASE_REPEATS,
        help=f"patient-fold shuffles judging rules and floors (default {RELEASE_REPEATS}; 4 up to 1.4.2)",
    )
    pe.add_argument(
        "--validation-only",
        action="store_true",
        help="leave the test patients out (a candidate for a rule fixed beforehand to choose)",
    )
    pe.add_argument("--force", action="store_true", help="replace an existing version (candidates only)")
    po = sub.add_parser("onnx", help="export an ensemble's members to ONNX")
    po.add_argument("--model", default=None, help="ensemble NAME@VERSION (default newest)")
    po.add_argument("--quantize", action="store_true")
    for p in (pm, pe, po):
        p.add_argument("--models-dir", type=Path, default=default_models_dir())
    ns = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        _run(ns)
    except ReleaseError as exc:
        sys.stderr.write(f"drscreen export: {exc}\n")
        raise SystemExit(2) from None


def _run(ns: argparse.Namespace) -> None:
    if ns.what == "member":
        export_member(ns.run_dir, ns.name, ns.version, ns.half, ns.models_dir, force=ns.force)
    elif ns.what == "soup":
        from ml.soup import make_soup

        make_soup(ns.run_dirs, ns.out)
    elif ns.what == "ensemble":
        data = DataConfig(natural_dir=ns.natural_dir)
        export_ensemble(
            ns.member,
            ns.name,
            ns.version,
            ns.rule,
            data,
            ns.models_dir,
            nested=not ns.plain_weight_check,
            measure_test=not ns.validation_only,
            repeats=ns.repeats,
            force=ns.force,
        )
    else:
        from ml.onnx_export import export_onnx

        export_onnx(ns.model, ns.models_dir, quantize=ns.quantize)
