"""Reading weight files and loading them into modules, with one-line errors.

:func:`load_state_dict_file` reads the tensors of a weights file without running code
(``torch.load(..., weights_only=True)``, or safetensors) and unwraps training checkpoints
(Lightning's ``"state_dict"``, the ``"model"`` entry of timm/DeiT training scripts).
:func:`load_into` matches such a state dict to a module: it finds the key prefix the file
adds (``"module."`` from DDP, ``"backbone."`` from a segmentor, ...), drops keys the caller
ignores (a classification head), adapts the stem of a model with another number of input
channels, and loads the rest. Anything that does not fit (missing or unexpected keys,
shape mismatches) is a ``ValueError`` naming the first few offending keys.
:func:`load_pretrained` applies the ``pretrained`` argument of the encoder builders.

Example, loading the backbone of a Lightning checkpoint into a ResNet-50 encoder::

    state_dict = load_state_dict_file("last.ckpt")        # {"model.backbone.conv1.weight": ...}
    load_into(encoder, state_dict, prefix_candidates=("model.backbone.",), ignore=("fc",))
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DEFAULT_PREFIXES",
    "LoadReport",
    "adapt_input_conv",
    "fit_state_dict",
    "load_into",
    "load_pretrained",
    "load_state_dict_file",
]

#: Prefixes tried by :func:`load_into` (and every concatenation of two of them).
DEFAULT_PREFIXES = ("", "module.", "backbone.", "encoder.", "model.")

#: Keys under which training checkpoints nest their state dict, tried in this order.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module")

_SHOWN = 3  # offending keys named in an error message


def _show(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (", ..." if len(items) > _SHOWN else "")


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``path``, on the CPU, loaded without running code.

    ``.safetensors`` files are read with ``safetensors.torch.load_file`` (needs the
    ``safetensors`` package); any other file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) with
    ``torch.load(path, map_location="cpu", weights_only=True)``. A checkpoint dictionary that
    keeps its tensors under ``"state_dict"`` (Lightning, mmsegmentation), ``"model"``,
    ``"model_state_dict"`` or ``"module"`` is unwrapped (repeatedly, if nested).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: a ``.safetensors`` file without the ``safetensors`` package.
        ValueError: the file cannot be read safely (a pickled model, a corrupt file) or holds
            no flat mapping from names to tensors.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must be an existing weights file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ImportError(
                f"reading {path.name} needs the optional package 'safetensors' "
                "(pip install safetensors)"
            )
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"path {str(path)!r} is not a readable safetensors file: {_one_line(error)}"
            ) from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise ValueError(
            f"path {str(path)!r} could not be read with torch.load(weights_only=True) "
            f"({type(error).__name__}: {_one_line(error)})"
        ) from error
    while isinstance(loaded, Mapping) and not _all_tensors(loaded):
        nested = next((k for k in _NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if nested is None:
            break
        loaded = loaded[nested]
    if not isinstance(loaded, Mapping) or not loaded:
        got = "an empty mapping" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"path {str(path)!r} must hold a non-empty state dict (names -> tensors), got {got}"
        )
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"path {str(path)!r} must hold a state dict of tensors, got {len(bad)} non-tensor "
            f"entries ({_show(bad)}) and no nested 'state_dict' / 'model' entry"
        )
    return {str(k): v for k, v in loaded.items()}


def _all_tensors(mapping: Mapping[object, object]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem convolution weight ``(O, S, kh, kw)`` made for ``in_channels`` input channels.

    Every new input channel gets the sum of the ``S`` source filters divided by
    ``in_channels`` (the mean RGB filter scaled by ``3 / in_channels``). The adapted stem
    answers an input whose ``in_channels`` channels all equal ``g`` exactly as the
    original stem answers ``g`` repeated in its ``S`` channels, so a grey model
    (``in_channels=1``) sees a grey image as the RGB model saw it; only the per-channel
    input normalisation is averaged.

    Returns a new ``(O, in_channels, kh, kw)`` tensor.
    """
    if weight.ndim != 4:
        raise ValueError(
            f"weight must be a 4-D convolution weight (O, S, kh, kw), got shape "
            f"{tuple(weight.shape)}"
        )
    summed = weight.sum(dim=1, keepdim=True) / in_channels
    return summed.repeat(1, in_channels, 1, 1)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`fit_state_dict` / :func:`load_into` did.

    Attributes:
        prefix: the prefix removed from the file's keys (``""`` if none).
        loaded: the module keys filled from the file.
        ignored: file keys not loaded: outside ``prefix`` or matched by ``ignore``.
        missing: module keys the file did not provide (empty unless ``strict=False``).
        unexpected: file keys the module does not have (empty unless ``strict=False``).
        adapted: the stem weight adapted to another number of input channels, or ``None``.
    """

    prefix: str
    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    adapted: str | None


def _is_ignored(key: str, patterns: Sequence[str]) -> bool:
    """``key`` equals a pattern, lies under it (``"fc"`` and ``"fc."`` cover ``"fc.weight"``)
    or matches it as a shell pattern (``"*.num_batches_tracked"``)."""
    for pattern in patterns:
        stem = pattern.removesuffix(".")
        if key == stem or key.startswith(stem + ".") or fnmatch.fnmatchcase(key, pattern):
            return True
    return False


def _best_prefix(keys: Sequence[str], targets: set[str], candidates: Sequence[str]) -> str:
    """The candidate (or concatenation of two) under which most ``keys`` name a target;
    the first one listed wins a tie."""
    tried = list(dict.fromkeys([*candidates, *(a + b for a in candidates for b in candidates)]))
    best, best_count = "", -1
    for prefix in tried:
        count = sum(1 for k in keys if k.startswith(prefix) and k[len(prefix) :] in targets)
        if count > best_count:
            best, best_count = prefix, count
    return best


def _differs_in_inputs(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Both are convolution weights that differ only in their input channels."""
    return (
        source.ndim == 4
        and target.ndim == 4
        and source.shape[1] != target.shape[1]
        and source.shape[0] == target.shape[0]
        and source.shape[2:] == target.shape[2:]
    )


def fit_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    prefix_candidates: Sequence[str] = DEFAULT_PREFIXES,
    ignore: Sequence[str] = (),
    strict: bool = True,
    input_conv: str | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The entries of ``state_dict`` renamed and checked for ``module``, without loading them.

    Arguments as in :func:`load_into`. Returns ``(fitted, report)``: ``fitted`` maps
    ``module``'s key names to the file's tensors (the stem adapted where asked).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if isinstance(prefix_candidates, str) or isinstance(ignore, str):
        raise TypeError("prefix_candidates and ignore must be sequences of str, got a str")
    bad = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors, got non-tensors at {_show(bad)}")
    name = type(module).__name__
    targets = module.state_dict()
    keys = [str(k) for k in state_dict]
    prefix = _best_prefix(keys, set(targets), prefix_candidates)
    in_scope = {k[len(prefix) :]: state_dict[k] for k in keys if k.startswith(prefix)}
    ignored = [k for k in keys if not k.startswith(prefix)]
    ignored += [prefix + k for k in in_scope if _is_ignored(k, ignore)]
    fitted = {k: v for k, v in in_scope.items() if not _is_ignored(k, ignore)}
    where = f" (after removing the prefix {prefix!r})" if prefix else ""
    if not any(k in targets for k in fitted):
        raise ValueError(
            f"state_dict shares no key with {name}{where}: the file has keys like "
            f"{_show(keys)}, the module {_show(list(targets))}"
        )

    adapted = None
    if (
        input_conv is not None
        and input_conv in fitted
        and input_conv in targets
        and _differs_in_inputs(fitted[input_conv], targets[input_conv])
    ):
        fitted[input_conv] = adapt_input_conv(fitted[input_conv], targets[input_conv].shape[1])
        adapted = input_conv

    # BatchNorm fills a missing num_batches_tracked itself (old torchvision files lack it)
    missing = [
        k
        for k in targets
        if k not in fitted and not _is_ignored(k, ignore) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in fitted if k not in targets]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, module {tuple(targets[k].shape)}"
        for k, v in fitted.items()
        if k in targets and v.shape != targets[k].shape
    ]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing key(s) ({_show(missing)})")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_show(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) ({_show(mismatched)})")
        stems = [k for k, v in fitted.items() if k in targets and _differs_in_inputs(v, targets[k])]
        if input_conv is None and stems:
            problems[-1] += f" (to adapt the stem to the input, pass input_conv={stems[0]!r})"
    if problems:
        raise ValueError(f"state_dict does not fit {name}{where}: " + "; ".join(problems))
    fitted = {k: v for k, v in fitted.items() if k in targets}
    report = LoadReport(
        prefix=prefix,
        loaded=tuple(fitted),
        ignored=tuple(ignored),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        adapted=adapted,
    )
    return fitted, report


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    prefix_candidates: Sequence[str] = DEFAULT_PREFIXES,
    ignore: Sequence[str] = (),
    strict: bool = True,
    input_conv: str | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` after matching names, in place.

    Args:
        module: the module to fill.
        state_dict: names -> tensors, e.g. from :func:`load_state_dict_file`.
        prefix_candidates: prefixes the file may put before ``module``'s key names; each
            one and each concatenation of two (``"module.backbone."``) is tried and the one
            under which most keys match is removed. Keys outside it are ignored (a
            segmentor's ``head.*`` when loading its ``backbone.``).
        ignore: keys, key prefixes (``"fc"`` or ``"fc."`` covers ``"fc.weight"``) or shell
            patterns (``"head.*"``) that are neither loaded from the file nor required of
            the module: a classification head, say.
        strict: if ``True`` (default) every module key must come from the file and every
            kept file key must exist in the module; if ``False`` such keys are only listed
            in the report. Shape mismatches are always an error. A missing BatchNorm
            ``num_batches_tracked`` is never an error (BatchNorm fills it in).
        input_conv: the key of the stem convolution weight (``"conv1.weight"``); when the
            file's weight has another number of input channels than the module's, it is
            adapted by :func:`adapt_input_conv`.

    Returns:
        a :class:`LoadReport`.

    Raises:
        ValueError: naming the first few missing / unexpected / mis-shaped keys, or saying
            that no key matches at all.
    """
    fitted, report = fit_state_dict(
        module,
        state_dict,
        prefix_candidates=prefix_candidates,
        ignore=ignore,
        strict=strict,
        input_conv=input_conv,
    )
    module.load_state_dict(fitted, strict=False)
    return report


def load_pretrained(
    module: nn.Module,
    pretrained: str | os.PathLike[str] | None,
    *,
    name: str,
    imagenet: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ignore: Sequence[str] = (),
    input_conv: str | None = None,
) -> LoadReport | None:
    """Apply an encoder builder's ``pretrained`` argument to ``module``.

    Args:
        module: the freshly built encoder.
        pretrained: ``None`` (keep the random initialisation), ``"imagenet"`` (the state
            dict ``imagenet()`` returns) or the path of a weights file
            (:func:`load_state_dict_file`).
        name: the encoder's name, for error messages.
        imagenet: returns the ImageNet state dict, with the module's key names; ``None``
            where no ImageNet weights are installable here.
        ignore, input_conv: as in :func:`load_into` (strict loading, default prefixes).

    Returns:
        the :class:`LoadReport`, or ``None`` when ``pretrained`` is ``None``.
    """
    if pretrained is None:
        return None
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            "pretrained must be None, 'imagenet' or the path of a weights file, "
            f"got {type(pretrained).__name__}"
        )
    if pretrained == "imagenet":
        if imagenet is None:
            raise ValueError(
                f"pretrained='imagenet' is not available for {name} in this environment; "
                f"pass the path of a local weights file (a torchvision or timm {name} state "
                "dict) instead"
            )
        state_dict = imagenet()
    else:
        state_dict = load_state_dict_file(pretrained)
    return load_into(module, state_dict, ignore=ignore, input_conv=input_conv)
