"""Building blocks of validated configs, shared by :mod:`~anchorlearn.engine.config` and
:mod:`~anchorlearn.engine.ssl_config`: the strict YAML reader, ``--set`` overrides, the
building of nested dataclasses from a raw mapping with type checks, and choice and range
checks.

:func:`build_config` turns a mapping into a dataclass: an unknown key, or a value of the wrong
type, is a :class:`ConfigError` naming the key (and, for a typo, the allowed ones). A
dataclass may define a static method ``raw_mapping(value, key)`` that turns what the YAML
holds at ``key`` into the mapping it is built from (a loss given by its bare name, say).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMMON_RANGES",
    "OPEN_UNIT_INTERVAL",
    "UNIT_INTERVAL",
    "ConfigError",
    "DuplicateKeyError",
    "Range",
    "above",
    "apply_overrides",
    "at_least",
    "build_config",
    "check_choices",
    "check_ranges",
    "config_to_dict",
    "did_you_mean",
    "read_config_file",
    "setting",
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


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A parsed config (a dataclass) as plain Python types (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def build_config(cls: type, raw: Any, where: str = "") -> Any:
    """The dataclass ``cls`` built from the mapping ``raw`` found at the dotted key ``where``
    (``""``: the whole config), its nested dataclasses built the same way; a missing section
    (``None``) takes every default."""
    label = where or "config"
    raw_mapping = getattr(cls, "raw_mapping", None)
    if raw_mapping is not None:
        raw = raw_mapping(raw, where)
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
            f"unknown key {_join(where, key)!r}{did_you_mean(key, fields)}; allowed keys in "
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
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, key)
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
            hint = _number_hint(value)
            if hint:
                raise ConfigError(f"{key} must be a number, got the string {value!r}{hint}")
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


def did_you_mean(key: Any, choices: Any) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``choices`` to ``key``, or empty."""
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
