"""Training configuration: a TOML file in configs/ resolved into typed dataclasses."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.models import ATTENTIONS, HEADS, ModelSpec
from ml.preprocess import PreprocessConfig

MONITORS = ("qwk", "referable_auc")
SELECT_ON = ("own", "natural")


@dataclass
class StageConfig:
    epochs: int = 4
    samples_per_epoch: int = 0  # 0 = every training image once per epoch
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    freeze_epochs: int = 0  # epochs with a frozen backbone (head and attention only)
    patience: int = 3  # early stopping on the monitored validation figure
    # "qwk" (at the default cuts) or "referable_auc" (threshold-free: blind to a shift of the
    # expected grades that moves every photograph across the fixed cuts; docs/experiments.md)
    monitor: str = "qwk"
    balance_power: float = 0.5  # sampling weight = class_frequency ** -power (0 = natural)
    augment_strength: float = 1.0
    # Stage 2 only: share of each epoch drawn from the equalised training photographs (0 = natural
    # colour only). The natural stage has 230 photographs and overfits within a few epochs;
    # mixing the large domain back in is the usual remedy when fine-tuning on a tiny target set.
    mix_equalized: float = 0.0
    # >0: validate and keep an exponential moving average of the weights (this decay per
    # optimiser step) instead of the live weights; 0 = off (ml/training/ema.py)
    ema_decay: float = 0.0
    # Which validation part early stopping reads: "own" (the stage's: equalised for stage 1) or
    # "natural" (stage 1 only: the natural-colour validation patients, whose figures stage 1 logs
    # as nat_val_* anyway). Equalised-validation QWK did not rank stage-1 checkpoints by how
    # they transfer to natural colour (docs/experiments.md, session 12).
    select_on: str = "own"
    # save every epoch's validated weights as a member folder <stage>-epochNN/ (to compare
    # stage-1 checkpoints after the fact)
    save_epochs: bool = False

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor {self.monitor!r}: choose from {MONITORS}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on {self.select_on!r}: choose from {SELECT_ON}")

    @property
    def monitor_key(self) -> str:
        """The metrics.jsonl key early stopping reads."""
        return f"{'nat_' if self.select_on == 'natural' else ''}val_{self.monitor}"


@dataclass
class DataConfig:
    equalized_dir: str = "../shared/data/eyepacs-equalized-256"
    natural_dir: str = "../shared/data/eyepacs-natural-512"
    split_seed: int = 20261123
    # natural-colour patients: fine-tuning / validation (thresholds, ensemble) / untouched test
    natural_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.5, "val": 0.25, "test": 0.25}
    )
    # Cross-validated natural stage (scripts/natural_cv.py): with natural_folds = K > 0 the train
    # and val patients are pooled and re-split into K patient folds; natural_fold = k holds fold k
    # out as validation, -1 trains on the whole pool with no validation (the stage then keeps
    # its last epoch). The test patients are the same either way.
    natural_folds: int = 0
    natural_fold: int = 0
    equalized_val_fraction: float = 0.1
    cache_dir: str = "var/cache"
    limit_per_split: int = 0  # >0: keep only the first N photographs of each part (smoke tests)


@dataclass
class LossConfig:
    class_weight_power: float = 0.0
    regression_weight: float = 1.0
    classification_weight: float = 1.0
    ordinal_weight: float = 1.0


@dataclass
class TrainConfig:
    name: str = "member"
    seed: int = 0
    threads: int = 2
    out_dir: str = "runs"
    model: ModelSpec = field(default_factory=ModelSpec)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=6, lr=2e-4, warmup_steps=10))
    two_stage: bool = True
    # warm start: a released member folder (e.g. "models/members/x/1.0.0") whose weights replace
    # the ImageNet initialisation; its architecture and pixel pipeline must match this config
    init_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        data["preprocess"] = self.preprocess.to_dict()
        return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (values in TOML syntax, e.g. ``stage1.epochs=2``, ``out_dir="x"``; a
    value that is not TOML is taken as a string, so a path needs no quotes: ``data.natural_dir=/d``,
    which was "Invalid value (at line 1, column 5)", naming neither the option nor the quotes)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value.strip()  # the config's check still wants a string there
    return overrides


class ConfigError(ValueError):
    """A training config (or a ``--set``) names an unknown key or gives a value of the wrong type."""


# The defaults of every section: their fields are the keys a config may set, their types the
# types it must give (a typo such as ``sed = 3`` used to be ignored: the run went on with seed 0).
_SECTIONS: dict[str, Any] = {
    "model": ModelSpec(),
    "preprocess": PreprocessConfig(),
    "data": DataConfig(),
    "loss": LossConfig(),
    "stage1": StageConfig(),
    "stage2": StageConfig(),
}
_TOP_KEYS = ("name", "seed", "threads", "out_dir", "two_stage", "init_from")
_TOP = {k: getattr(TrainConfig(), k) for k in _TOP_KEYS}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def check_raw(raw: dict[str, Any]) -> None:
    """Every key known and every value of its field's type; raises :class:`ConfigError`."""
    problems = []
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"[{key}] must be a table")
                continue
            fields = _SECTIONS[key].__dataclass_fields__
            for name, item in value.items():
                if name not in fields:
                    problems.append(f"unknown key {key}.{name}")
                elif not _type_ok(item, getattr(_SECTIONS[key], name)):
                    kind = type(getattr(_SECTIONS[key], name)).__name__
                    problems.append(f"{key}.{name} = {item!r}: expected {kind}")
        elif key not in _TOP:
            problems.append(f"unknown key {key}")
        elif not _type_ok(value, _TOP[key]):
            problems.append(f"{key} = {value!r}: expected {type(_TOP[key]).__name__}")
    model = raw.get("model", {})
    if isinstance(model, dict) and isinstance(model.get("arch"), str):
        import timm  # here, not at import: reading a config needs no network library otherwise

        if not timm.is_model(model["arch"]):
            problems.append(f"model.arch {model['arch']!r}: not a timm architecture")
    if isinstance(model, dict):
        if model.get("head", HEADS[0]) not in HEADS:
            problems.append(f"model.head {model['head']!r}: choose from {', '.join(HEADS)}")
        if model.get("attention", ATTENTIONS[0]) not in ATTENTIONS:
            problems.append(f"model.attention {model['attention']!r}: choose from {', '.join(ATTENTIONS)}")
    if problems:
        raise ConfigError("; ".join(problems))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config file with ``overrides`` applied, checked (:class:`ConfigError`)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # not a traceback: a line to fix
        raise ConfigError(f"{path} is not a valid TOML file: {exc}") from exc
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        target[name] = value
    check_raw(raw)
    try:
        return _build(raw)
    except (TypeError, ValueError) as exc:  # e.g. an unknown monitor (StageConfig checks it)
        raise ConfigError(str(exc)) from exc


#: Keys older runs and releases wrote that no longer exist (read, then ignored).
_RETIRED = {"preprocess": ("extra",)}


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A config as ``TrainConfig.to_dict`` wrote it (a run's or a release's ``train_config``,
    of any age: keys since retired are dropped)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, keys in _RETIRED.items():
        for key in keys:
            raw.get(section, {}).pop(key, None)
    check_raw(raw)
    return _build(raw)


def _build(raw: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        name=raw.get("name", "member"),
        seed=raw.get("seed", 0),
        threads=raw.get("threads", 2),
        out_dir=raw.get("out_dir", "runs"),
        model=ModelSpec.from_dict(raw.get("model", {})),
        preprocess=PreprocessConfig.from_dict(raw.get("preprocess", {})),
        data=DataConfig(**raw.get("data", {})),
        loss=LossConfig(**raw.get("loss", {})),
        stage1=StageConfig(**raw.get("stage1", {})),
        stage2=StageConfig(**{"epochs": 6, "lr": 2e-4, "warmup_steps": 10, **raw.get("stage2", {})}),
        two_stage=raw.get("two_stage", True),
        init_from=raw.get("init_from", ""),
    )
