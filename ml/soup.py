"""A uniform weight soup: several training runs averaged, weight by weight, into one network.

    drscreen export soup RUN_A RUN_B RUN_C --out runs/soup-abc
    drscreen export member runs/soup-abc --name NAME --version V --half

Runs that share their starting weights and moved little from them (the head-only natural stage
of ``configs/member-*-1.6.toml`` keeps the backbone's weights fixed: only the head, the attention
block and the BatchNorm statistics move) can be averaged into one network that behaves like the
average of their predictions at the cost of one forward pass (Wortsman et al. 2022, "Model
soups"). The soup is written as a run folder (``best/`` + ``config.json``) so that
``drscreen export member`` promotes it like any run. docs/experiments.md, session 11.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ml.release import load_checkpoint, save_checkpoint
from ml.training.config import config_from_dict
from ml.training.train import member_metrics, natural_validation

log = logging.getLogger(__name__)


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of every floating-point tensor; integer buffers (BatchNorm's batch counters) are
    taken from the first state. Every state must have the same keys and shapes."""
    if not states:
        raise ValueError("a soup needs at least one state")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"state {i} has other keys than state 0")
    out = {}
    for key, first in states[0].items():
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) > 1:
            raise ValueError(f"{key}: shapes differ between the states {sorted(shapes)}")
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def max_spread(states: list[dict[str, torch.Tensor]], prefix: str) -> float:
    """Largest absolute difference between the states over the float tensors whose names start
    with ``prefix``: 0 for a backbone that a head-only stage left untouched."""
    spread = 0.0
    for key, first in states[0].items():
        if (
            key.startswith(prefix)
            and first.is_floating_point()
            and not key.endswith(("running_mean", "running_var"))
        ):
            for s in states[1:]:
                spread = max(spread, float((s[key].float() - first.float()).abs().max()))
    return spread


def repo_relative(path: Path) -> str:
    """``path`` relative to the working directory (the repository, where commands run) when it
    lies inside it: released metadata should not carry one machine's absolute paths."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def make_soup(run_dirs: list[Path], out_dir: Path, base: Path | None = None) -> Path:
    """Average the ``best/`` checkpoints of ``run_dirs`` into ``out_dir/best`` (a run folder).
    The soup is measured on its runs' natural-colour validation photographs (paths relative to
    ``base``, default the working directory), as a trained member is."""
    loaded = [load_checkpoint(run / "best") for run in run_dirs]
    first_model, first_pre, first_config = loaded[0]
    for run, (_, pre, config) in zip(run_dirs[1:], loaded[1:], strict=True):
        if config["model"] != first_config["model"] or pre.to_dict() != first_pre.to_dict():
            raise ValueError(f"{run}: architecture or preprocessing differs from {run_dirs[0]}'s")
    states = [model.state_dict() for model, _, _ in loaded]
    backbone_spread = max_spread(states, "backbone.")
    if backbone_spread > 0:
        # not an error (a soup of fully fine-tuned runs from one start can work), but worth knowing
        log.warning(
            "the runs' backbone weights differ (max |diff| %.3g): not head-only draws", backbone_spread
        )
    first_model.load_state_dict(average_states(states), strict=True)
    meta = dict(first_config["metadata"])
    for key in ("name", "version", "libraries", "weights_sha256", "history", "metrics"):
        meta.pop(key, None)
    meta["soup_of"] = [repo_relative(run) for run in run_dirs]
    meta["soup_backbone_max_abs_diff"] = backbone_spread
    if "train_config" in meta:
        cfg = config_from_dict(meta["train_config"])
        meta["metrics"] = member_metrics(first_model, cfg, natural_validation(cfg, base or Path.cwd()))
    else:  # not made by `drscreen train`: nothing says which photographs validate it
        log.warning("the runs carry no training config: the soup's metadata has no metrics")
    save_checkpoint(out_dir / "best", first_model, first_pre, first_config["name"], "0.0.0", meta)
    train_config = meta.get("train_config", {})
    (out_dir / "config.json").write_text(json.dumps(train_config | {"soup_of": meta["soup_of"]}, indent=2))
    log.info("soup of %d runs -> %s (backbone max |diff| %.3g)", len(run_dirs), out_dir, backbone_spread)
    return out_dir
