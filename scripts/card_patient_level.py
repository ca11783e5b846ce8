"""Add the chosen rule's patient-level test figures (with their intervals, session 30) to a release
exported before exports computed them (session 22), and write its model card again. Reporting only:
nothing is fitted or chosen; the test part was read when the release was exported, and is read here
again for the same rule.

    python scripts/card_patient_level.py drscreen-ensemble@1.6.0
    python scripts/card_patient_level.py drscreen-ensemble@1.6.0 --validation   # print only

With ``--validation`` it prints the same figures on the validation patients the rule was fitted on
(in sample, so optimistic) and writes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.export import member_probs, model_card
from ml.inference.combine import CombineRule
from ml.inference.ensemble import Member
from ml.metrics import patient_referable_metrics
from ml.publish import write_sums
from ml.release import ensemble_dir, load_checkpoint, member_dir
from ml.training.config import TrainConfig
from ml.training.train import natural_split


def validation_figures(ref: str) -> dict[str, float]:
    manifest = json.loads((ensemble_dir(ref) / "manifest.json").read_text())
    members = []
    for m in manifest["members"]:
        model, pre, config = load_checkpoint(member_dir(m["ref"]))
        members.append(Member(m["ref"], model, pre, config))
    val = natural_split(TrainConfig(), Path.cwd())["val"]
    rule = CombineRule.from_dict(manifest["combination"])
    return patient_referable_metrics(rule, member_probs(members, val), [s.patient_id for s in val],
                                     [s.eye for s in val], [s.grade for s in val])  # fmt: skip


def main(ref: str) -> None:
    folder = ensemble_dir(ref)
    manifest = json.loads((folder / "manifest.json").read_text())
    if not manifest["card"]["test"]["n_images"]:
        raise SystemExit(f"{ref} is a candidate (test part not measured): nothing to add")
    members = []
    for m in manifest["members"]:
        model, pre, config = load_checkpoint(member_dir(m["ref"]))
        members.append(Member(m["ref"], model, pre, config))
    test = natural_split(TrainConfig(), Path.cwd())["test"]
    if len(test) != manifest["card"]["test"]["n_images"]:
        raise SystemExit(
            f"the test part has {len(test)} photographs, the card {manifest['card']['test']['n_images']}"
        )
    probs = member_probs(members, test)
    rule = CombineRule.from_dict(manifest["combination"])
    figures = patient_referable_metrics(rule, probs, [s.patient_id for s in test], [s.eye for s in test],
                                        [s.grade for s in test], with_intervals=True)  # fmt: skip
    manifest["card"]["test"]["chosen_rule_patient_level"] = figures
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    (folder / "MODEL_CARD.md").write_text(model_card(manifest))
    write_sums(folder)  # the manifest's checksum, or the release would be refused as tampered with
    print(json.dumps(figures))


if __name__ == "__main__":
    if "--validation" in sys.argv[2:]:
        print(json.dumps(validation_figures(sys.argv[1])))
    else:
        main(sys.argv[1])
