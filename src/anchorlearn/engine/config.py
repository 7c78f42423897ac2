"""Validated experiment configs: YAML in, typed dataclasses out.

Every section is a dataclass. An unknown or mistyped key, or a value of the wrong type, is a
:class:`ConfigError` naming the key and the allowed ones; so is a key given twice in one
mapping (with both line numbers), and a loss parameter its loss does not take.
``--set a.b=value`` overrides are applied to the raw mapping before validation, so they are
checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMMON_RANGES",
    "UNIT_INTERVAL",
    "ConfigError",
    "DataConfig",
    "DuplicateKeyError",
    "EvalConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "above",
    "apply_overrides",
    "at_least",
    "check_choices",
    "check_ranges",
    "config_to_dict",
    "load_config",
    "parse_config",
    "read_config_file",
    "yaml_load",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to do."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives one key twice: ``path`` (dotted, list items by index) on the
    1-based ``lines``."""

    def __init__(self, path: str, lines: tuple[int, int]) -> None:
        super().__init__(f"{path} is given twice (lines {lines[0]} and {lines[1]})")
        self.path = path
        self.lines = lines


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is a
    :class:`DuplicateKeyError` (PyYAML would keep the last value silently). Keys that a
    merge (``<<: *base``) brings in may be overridden: that is what a merge is for."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, _join(path, i), seen)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    self._refuse_duplicate_keys(value_node, path, seen)
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if earlier is not None:
                    raise DuplicateKeyError(_join(path, key), (earlier, line))
                first_line[key] = line
                self._refuse_duplicate_keys(value_node, _join(path, key), seen)


def yaml_load(text: str) -> Any:
    """The data of a YAML document, read as :func:`yaml.safe_load` reads it, except that a
    key given twice in one mapping raises :class:`DuplicateKeyError`."""
    return yaml.load(text, Loader=_StrictLoader)


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and batched."""

    source: str = "fashion_mnist"
    imbalance_ratio: float = 1.0
    profile: str = "exp"
    val_fraction: float = 0.1
    batch_size: int = 128
    num_workers: int = 0
    max_train_samples: int | None = None
    # classification: score on a class-stratified subset of exactly this many test images
    # (drawn with the run's seed), for fast runs
    max_test_samples: int | None = None
    augment: bool = True
    canvas: int = 64
    num_train_scenes: int = 2000
    num_val_scenes: int = 500
    scene_imbalance_ratio: float = 10.0
    # segmentation data sets in their standard layouts (ade20k:, cityscapes:, camvid:, ...)
    crop_size: list[int] | None = None
    base_size: list[int] | None = None
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class ModelConfig:
    """A model from the factory; ``etf_classifier`` classifies with a fixed simplex ETF
    behind a batch normalisation of the features (:class:`~anchorlearn.models.FixedETFModel`)."""

    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    etf_classifier: bool = False


@dataclass
class LossConfig:
    """One term of the training objective: ``name`` and the loss's own keyword arguments."""

    name: str = "ce"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    warmup_steps: int = 0
    poly_power: float = 0.9
    min_lr: float = 0.0
    backbone_lr_mult: float = 1.0


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 20
    progress: bool = True
    deterministic: bool = False
    max_steps: int | None = None
    val_every_n_steps: int | None = None
    checkpoint_every_n_steps: int | None = None
    accumulate_grad_batches: int = 1
    num_nodes: int = 1
    sync_batchnorm: bool = False
    channels_last: bool = False


@dataclass
class InferenceConfig:
    """How segmentation images are scored (validation, test, ``eval``): see
    :func:`anchorlearn.inference.segment`. ``base_size`` ``[h, w]`` first rescales each
    image, aspect ratio kept, to fit it (long side <= the larger, short side <= the smaller
    number: mmsegmentation's test ``Resize``; ``None``: the image's own size); ``scales``
    then resize it further (multi-scale testing); ``crop_size`` and ``stride`` ``[h, w]``
    are the sliding windows. Logits are always scored at the labels' full size."""

    mode: str = "whole"
    base_size: list[int] | None = None
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 1


@dataclass
class EvalConfig:
    """What the evaluation after training draws: ``plots`` (training curves, t-SNE) and at
    most ``tsne_points`` test embeddings in the t-SNE picture."""

    plots: bool = True
    tsne_points: int = 1500


@dataclass
class ExperimentConfig:
    """A whole run. ``task`` is ``classification`` or ``segmentation``."""

    name: str = "run"
    task: str = "classification"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: list[LossConfig] = field(default_factory=lambda: [LossConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Full precision or mixed precision (Lightning's "16" and "bf16" mean the mixed ones). The
# "*-true" half and double precisions are left out: they would convert the losses' state
# (counts, EMA prototypes, anchors) along with the weights, and the data modules hand over
# float32 batches.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16")

_CHOICES = {
    "task": ("classification", "segmentation"),
    "data.profile": ("exp", "step"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "constant", "poly"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.precision": PRECISIONS,
    "inference.mode": ("whole", "slide"),
}


Range = tuple[Callable[[Any], bool], str]  # a test of the value and what it expects


def at_least(bound: float) -> Range:
    return (lambda v: v >= bound), f">= {bound}"


def above(bound: float) -> Range:
    return (lambda v: v > bound), f"> {bound}"


UNIT_INTERVAL: Range = ((lambda v: 0 <= v < 1), "in [0, 1)")
OPEN_UNIT_INTERVAL: Range = ((lambda v: 0 < v < 1), "in (0, 1)")


# Ranges of the numeric settings shared by supervised and pretraining configs.
COMMON_RANGES: dict[str, Range] = {
    "seed": at_least(0),
    "data.batch_size": at_least(1),
    "data.num_workers": at_least(0),
    "optim.lr": above(0),
    "optim.momentum": UNIT_INTERVAL,
    "optim.weight_decay": at_least(0),
    "optim.warmup_epochs": at_least(0),
    "optim.warmup_steps": at_least(0),
    "optim.poly_power": above(0),
    "optim.min_lr": at_least(0),
    "optim.backbone_lr_mult": at_least(0),
    "trainer.max_epochs": at_least(1),
    "trainer.devices": at_least(1),
    "trainer.num_nodes": at_least(1),
    "trainer.log_every_n_steps": at_least(1),
    "trainer.max_steps": at_least(1),
    "trainer.val_every_n_steps": at_least(1),
    "trainer.checkpoint_every_n_steps": at_least(1),
    "trainer.accumulate_grad_batches": at_least(1),
}

_RANGES: dict[str, Range] = {
    **COMMON_RANGES,
    "data.imbalance_ratio": at_least(1),
    "data.max_train_samples": at_least(1),
    "data.max_test_samples": at_least(1),
    "data.val_fraction": OPEN_UNIT_INTERVAL,  # the validation split is never empty
    "data.canvas": at_least(8),
    "data.num_train_scenes": at_least(1),
    "data.num_val_scenes": at_least(1),
    "data.scene_imbalance_ratio": at_least(1),
    "data.cat_max_ratio": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "inference.batch_size": at_least(1),
    "eval.tsne_points": at_least(2),
}


def setting(cfg: Any, key: str) -> Any:
    """The value of a dotted ``key`` such as ``"optim.lr"`` in a parsed config."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_choices(cfg: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise :class:`ConfigError` naming the first setting that is not one of its choices."""
    for key, allowed in choices.items():
        value = setting(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def check_ranges(cfg: Any, ranges: dict[str, Range]) -> None:
    """Raise :class:`ConfigError` naming the first setting outside its range."""
    for key, (ok, expected) in ranges.items():
        value = setting(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate."""
    return parse_config(apply_overrides(read_config_file(path), overrides or []))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; a missing, empty or unparsable file, one
    whose top level is not a mapping, or one that gives a key twice in a mapping, is a
    :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_reason(err)}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty: a config is a YAML mapping such as `name: run`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def _yaml_reason(err: Exception) -> str:
    """A YAML error on one line: the problem and where it is."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        where = err.problem_mark
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        return f"{err.problem}{at}"
    return " ".join(str(err).split())


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested mapping, in place.

    ``losses.1.pull_weight=0.2`` addresses list items by index.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml_load(text)
        except DuplicateKeyError as err:
            raise ConfigError(f"--set {item}: {_join(key, err.path)} is given twice") from None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {item}: the value is not valid YAML: {_yaml_reason(err)}"
            ) from None
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {key}: {'.'.join(parts[:i])} has {len(node)} item(s); "
                        f"{part!r} is not an index into it"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict | list):
                        raise ConfigError(f"--set {key}: {part} is not a section")
    return raw


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, "")
    check_choices(cfg, _CHOICES)
    if not cfg.losses:
        raise ConfigError("losses must list at least one loss")
    _check_losses(cfg.losses)
    check_ranges(cfg, _RANGES)
    check_step_settings(cfg.trainer, cfg.optim)
    _check_segmentation_settings(cfg)
    if cfg.task != "classification" and cfg.data.max_test_samples is not None:
        raise ConfigError(
            f"data.max_test_samples={cfg.data.max_test_samples} is for classification; "
            "segmentation runs score their whole test split: remove the key"
        )
    return cfg


def _check_losses(losses: list[LossConfig]) -> None:
    """Every loss is a known one and every parameter one its class takes, so that a typo
    stops a run as the config is read: before any data is loaded, and before ``compare``
    trains the configs listed ahead of it."""
    from .objective import LOSSES, _user_parameters  # the loss classes import torch

    for i, spec in enumerate(losses):
        if spec.name not in LOSSES:
            raise ConfigError(
                f"losses.{i}: unknown loss {spec.name!r}{_did_you_mean(spec.name, LOSSES)}; "
                f"known losses: {', '.join(sorted(LOSSES))}"
            )
        entry = LOSSES[spec.name]
        allowed = _user_parameters(entry.cls, entry.injected)
        for key in spec.params:
            if key not in allowed:
                raise ConfigError(
                    f"losses.{i}: unknown parameter {key!r} for loss {spec.name}"
                    f"{_did_you_mean(key, allowed)}; allowed: {', '.join(allowed) or '(none)'}"
                )


def _did_you_mean(key: Any, choices: Any) -> str:
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_step_settings(t: TrainerConfig, o: OptimConfig) -> None:
    """Iteration-based settings (``trainer.max_steps`` and what goes with it) are coherent."""
    if t.max_steps is None:
        for key in ("val_every_n_steps", "checkpoint_every_n_steps"):
            if getattr(t, key) is not None:
                raise ConfigError(
                    f"trainer.{key} needs trainer.max_steps (iteration-based training); "
                    "epoch-based runs validate and checkpoint every epoch"
                )
        if o.warmup_steps:
            raise ConfigError(
                "optim.warmup_steps needs trainer.max_steps; epoch-based runs use "
                "optim.warmup_epochs"
            )
        return
    if o.warmup_epochs:
        raise ConfigError(
            "optim.warmup_epochs is for epoch-based runs; with trainer.max_steps use "
            "optim.warmup_steps"
        )
    if o.warmup_steps >= t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps ({o.warmup_steps}) must be below trainer.max_steps ({t.max_steps})"
        )
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")


def _pair(value: list | None, key: str, kind: type) -> None:
    if value is None:
        return
    if len(value) != 2 or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} must be a list of two {kind.__name__}s [h, w], got {value!r}")
    if min(value) <= 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")


def _check_segmentation_settings(cfg: ExperimentConfig) -> None:
    d, inf = cfg.data, cfg.inference
    _pair(d.crop_size, "data.crop_size", int)
    _pair(d.base_size, "data.base_size", int)
    _pair(inf.base_size, "inference.base_size", int)
    _pair(inf.crop_size, "inference.crop_size", int)
    _pair(inf.stride, "inference.stride", int)
    if len(d.ratio_range) != 2 or not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        raise ConfigError(
            f"data.ratio_range must be [low, high] with 0 < low <= high, got {d.ratio_range!r}"
        )
    if not inf.scales or any(s <= 0 for s in inf.scales):
        raise ConfigError(f"inference.scales must be positive numbers, got {inf.scales!r}")
    if inf.mode == "slide":
        if inf.crop_size is None or inf.stride is None:
            raise ConfigError("inference.mode slide needs inference.crop_size and inference.stride")
        if any(s > c for s, c in zip(inf.stride, inf.crop_size, strict=True)):
            raise ConfigError(
                f"inference.stride {inf.stride} must not exceed inference.crop_size "
                f"{inf.crop_size} (windows would leave gaps)"
            )
    elif inf.crop_size is not None or inf.stride is not None:
        raise ConfigError(
            "inference.crop_size and inference.stride are the sliding windows of mode slide; "
            "remove them for mode whole"
        )


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _build(cls: type, raw: Any, where: str) -> Any:
    label = where or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown key {_join(where, key)!r}{_did_you_mean(key, fields)}; allowed keys in "
            f"{label}: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if tp is LossConfig:
        return _build(LossConfig, _loss_mapping(value, key), key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = _number_hint(value, integer=True)
            raise ConfigError(f"{key} must be an integer, got {value!r}{hint}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if _number_hint(value):
                raise ConfigError(
                    f"{key} must be a number, got the string {value!r}{_number_hint(value)}"
                )
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _number_hint(value: Any, integer: bool = False) -> str:
    """How to write ``value``, a string that Python reads as a finite number (a whole one
    when ``integer``), so that YAML reads a number: YAML 1.1 reads ``5e-2`` (no dot in the
    mantissa, or no sign in the exponent) and quoted numbers as text. Empty for any other
    value."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number) or (integer and not number.is_integer()):
        return ""
    text = value.strip()
    quoted = not isinstance(yaml.safe_load(text), str)  # a number once the quotes are gone
    if integer:
        spellings = [str(int(number))]
    elif quoted:
        spellings = [text]
    else:
        spellings = [_yaml_float(number)]
        if "e" in text.lower():
            mantissa, _, exponent = text.lower().partition("e")
            spellings.append(_yaml_exponent(mantissa, exponent))
    write = " or ".join(dict.fromkeys(spellings))
    if quoted:
        return f" (YAML reads {value!r} as text; write {write} without quotes)"
    return f" (YAML reads {text} as text; write {write})"


def _yaml_float(number: float) -> str:
    """``number`` spelt so that YAML 1.1 reads it back as this float."""
    text = repr(number)
    if "e" not in text:
        return text
    mantissa, _, exponent = text.partition("e")
    return _yaml_exponent(mantissa, exponent)


def _yaml_exponent(mantissa: str, exponent: str) -> str:
    """``mantissa`` e ``exponent`` in YAML 1.1's float syntax, a dot in the mantissa and a
    signed exponent: ``5e-2`` -> ``5.0e-2``, ``1e3`` -> ``1.0e+3``."""
    digits = repr(float(mantissa))
    if "e" in digits:  # a mantissa of 17 digits or more
        return _yaml_float(float(f"{mantissa}e{exponent}"))
    sign = exponent[0] if exponent[:1] in ("-", "+") else "+"
    return f"{digits}e{sign}{exponent.lstrip('+-').lstrip('0') or '0'}"


def _loss_mapping(value: Any, key: str) -> dict[str, Any]:
    """Losses are written flat (``{name: sar, pull_weight: 0.1}``), with their parameters
    under ``params``, both (merged), or as a bare name."""
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(
            f"{key} must be a loss name or a mapping with a 'name' key, got {value!r}"
        )
    nested = value.get("params") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{key}.params must be a mapping, got {nested!r}")
    flat = {k: v for k, v in value.items() if k not in ("name", "params")}
    both = sorted(set(flat) & set(nested))
    if both:
        raise ConfigError(f"{key}: {both[0]!r} is given both flat and under params")
    return {"name": value["name"], "params": {**nested, **flat}}


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
