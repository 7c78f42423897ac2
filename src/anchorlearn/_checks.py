"""Input validation and reshaping shared across anchorlearn (losses, models, metrics, clustering).

Every check raises ``ValueError`` or ``TypeError`` naming the argument, what was expected
and what was received, before any arithmetic can fail deep inside torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "autocast_off",
    "check_finite",
    "check_non_negative",
    "check_num_classes",
    "check_positive",
    "check_probability",
    "check_seed",
    "connected_zero",
    "loss_compute_dtype",
    "unit_norm_tolerance",
    "validate_features_and_labels",
]


def check_num_classes(num_classes: object, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{name} must be an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"{name} must be >= 2, got {num_classes}")
    return num_classes


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _real(value: object, name: str) -> float:
    """``value`` as a float; a non-number (a bool included) is a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_probability(value: float, name: str, *, closed_low: bool = True) -> float:
    value = _real(value, name)
    ok = (0.0 <= value <= 1.0) if closed_low else (0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_non_negative(value: float, name: str) -> float:
    value = _real(value, name)
    if not 0.0 <= value < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_positive(value: float, name: str) -> float:
    value = _real(value, name)
    if not 0.0 < value < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_seed(seed: object, name: str = "seed", *, optional: bool = True) -> int | None:
    """An int (a bool is refused), what ``torch.Generator.manual_seed`` takes, or ``None``
    where ``optional``."""
    if seed is None and optional:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        expected = "None or an int" if optional else "an int"
        raise TypeError(f"{name} must be {expected}, got {type(seed).__name__} {seed!r}")
    return seed


def check_finite(tensor: torch.Tensor, name: str) -> None:
    # One reduction first: a finite sum proves every element finite (NaN and inf propagate);
    # only a non-finite sum, which overflow can also cause, needs the element-wise check.
    # Half-precision tensors are summed in float32, where a batch of them cannot overflow.
    accumulate = loss_compute_dtype(tensor.dtype) if tensor.is_floating_point() else None
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/inf value(s)")


def check_float_tensor(tensor: object, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def check_labels_tensor(labels: object, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    return labels


def check_label_range(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None, name: str = "labels"
) -> None:
    """Every label is in ``[0, num_classes)`` or equals ``ignore_index``."""
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid |= labels == ignore_index
    if not bool(valid.all()):
        bad = labels[~valid]
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(
            f"{name} must lie in {allowed}, got {bad.numel()} value(s) outside it "
            f"(e.g. {int(bad[0])})"
        )


def validate_features_and_labels(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    feat_dim: int,
    num_classes: int,
    ignore_index: int | None,
) -> torch.Tensor:
    """Validate ``features`` and ``labels``; return the labels as ``long``, resized if dense.

    Accepts ``features`` ``(N, D)`` with ``labels`` ``(N,)``, or ``features`` ``(B, D, H, W)``
    with ``labels`` ``(B, H', W')``; in the dense case the labels are resized to ``(H, W)``
    by nearest neighbour. Labels are moved to the features' device.
    """
    check_float_tensor(features, "features")
    labels = check_labels_tensor(labels)
    if features.ndim not in (2, 4):
        raise ValueError(
            "features must be 2-D (N, D) or 4-D (B, D, H, W), "
            f"got {features.ndim}-D shape {tuple(features.shape)}"
        )
    if features.shape[1] != feat_dim:
        raise ValueError(
            f"features must have feat_dim={feat_dim} channels in dim 1, "
            f"got shape {tuple(features.shape)}"
        )
    if features.ndim == 2:
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"labels must have shape ({features.shape[0]},) to match features "
                f"{tuple(features.shape)}, got {tuple(labels.shape)}"
            )
    else:
        b, _, h, w = features.shape
        if labels.ndim != 3 or labels.shape[0] != b:
            raise ValueError(
                f"labels must have shape ({b}, H, W) to match features "
                f"{tuple(features.shape)}, got {tuple(labels.shape)}"
            )
        if labels.shape[1:] != (h, w):
            labels = resize_labels(labels, (h, w))
    labels = labels.to(device=features.device)
    check_finite(features, "features")
    check_label_range(labels, num_classes, ignore_index)
    return labels.long()


def labelled_rows(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    feat_dim: int,
    num_classes: int,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``features`` and ``labels``, flatten them to ``(M, D)`` and ``(M,)`` rows and
    drop the rows labelled ``ignore_index``.

    Shapes as in :func:`validate_features_and_labels`.
    """
    labels = validate_features_and_labels(
        features, labels, feat_dim=feat_dim, num_classes=num_classes, ignore_index=ignore_index
    ).reshape(-1)
    if features.ndim == 4:
        features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    valid = valid_label_mask(labels, ignore_index)
    return features[valid], labels[valid]


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of integer ``labels`` ``(B, H', W')`` to ``(B, *size)``."""
    resized = F.interpolate(labels[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].to(labels.dtype)


def check_ignore_index(ignore_index: object, name: str = "ignore_index") -> int | None:
    """``ignore_index`` is an ``int`` or ``None``."""
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"{name} must be an int or None, got {type(ignore_index).__name__}")
    return ignore_index


def valid_label_mask(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Boolean mask, same shape as ``labels``, of the positions not equal to ``ignore_index``."""
    if ignore_index is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != ignore_index


def loss_compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Dtype to compute a loss in: at least float32 (float16 and bfloat16 inputs, e.g. under
    autocast, are promoted: their sums and squares overflow or lose the loss), float64 kept."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def autocast_off(tensor: torch.Tensor) -> torch.autocast:
    """A context that turns autocast off on ``tensor``'s device, so that a loss computes in
    the dtype it chose (:func:`loss_compute_dtype`), matrix products included."""
    return torch.autocast(tensor.device.type, enabled=False)


def connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar zero attached to the autograd graph of each of ``tensors`` (zero gradient).

    An inactive loss term returns it so that every parameter behind its inputs still counts
    as used (DDP) and the loss keys and dtypes never change. Each tensor is multiplied by 0
    *before* it is summed, in :func:`loss_compute_dtype`: a sum of a large float16 batch
    first would overflow to ``inf``, and ``inf * 0`` is NaN. Inputs must be finite.
    """
    dtype = loss_compute_dtype(*(t.dtype for t in tensors))
    zero = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for tensor in tensors:
        zero = zero + (tensor * 0).sum(dtype=dtype)
    return zero


def check_matrix(tensor: object, name: str, *, cols: int | None = None) -> torch.Tensor:
    """A finite floating-point ``(rows, cols)`` tensor; ``cols`` is checked when given."""
    tensor = check_float_tensor(tensor, name)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {tensor.ndim}-D shape {tuple(tensor.shape)}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(
            f"{name} must have {cols} columns to match, got shape {tuple(tensor.shape)}"
        )
    check_finite(tensor, name)
    return tensor


# a row normalised in float32 or float64 is off unit norm by far less than this
_UNIT_NORM_ATOL = 1e-3
# ... and one normalised in float16 or bfloat16 by up to about one machine epsilon
_UNIT_NORM_EPS_FACTOR = 4


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far a row norm of ``dtype`` may be from 1 and still count as normalised:
    ``max(1e-3, 4 * eps)``, so 1e-3 for float32 and float64, about 3.9e-3 for float16 and
    3.1e-2 for bfloat16, whose rounding alone leaves ``F.normalize``'s rows off by up to
    about 0.75 eps (bfloat16: 6e-3)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(_UNIT_NORM_ATOL, _UNIT_NORM_EPS_FACTOR * eps)


def check_l2_normalised(tensor: torch.Tensor, name: str, *, atol: float | None = None) -> None:
    """Every row of ``tensor`` ``(N, D)`` has Euclidean norm 1 within ``atol`` (default:
    :func:`unit_norm_tolerance` of the tensor's dtype)."""
    if tensor.numel() == 0:
        return
    if atol is None:
        atol = unit_norm_tolerance(tensor.dtype)
    norms = tensor.detach().float().norm(dim=-1)
    worst = float((norms - 1.0).abs().max())
    if worst > atol:
        raise ValueError(
            f"{name} must be L2-normalised along the last dim (row norms 1 +- {atol:.2g}), "
            f"got a row norm off by {worst:.3g}; apply torch.nn.functional.normalize first"
        )
