"""Model registry and factory.

Models register themselves under a name with :func:`register_model`; :func:`create_model`
builds one by name with keyword arguments. Names with a ``timm:`` or ``smp:`` prefix are
routed to the optional adapters in :mod:`anchorlearn.models.adapters`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering a model builder under ``name``.

    Raises ``ValueError`` if ``name`` is empty, contains ``:`` (reserved for adapter
    prefixes) or is already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if ":" in name:
        raise ValueError(f"name must not contain ':' (reserved for adapters), got {name!r}")

    def decorator(builder: BuilderT) -> BuilderT:
        if name in _REGISTRY:
            raise ValueError(f"name {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names of the registered models (adapter prefixes not included)."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``.

    ``"timm:<model>"`` wraps a timm classifier and ``"smp:<arch>:<encoder>"`` a
    segmentation-models-pytorch network (both optional extras). Every model returns
    ``(logits, features)`` from ``forward``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name.startswith("timm:"):
        from anchorlearn.models.adapters import create_timm_model

        return create_timm_model(name.removeprefix("timm:"), **kwargs)
    if name.startswith("smp:"):
        from anchorlearn.models.adapters import create_smp_model

        arch, sep, encoder = name.removeprefix("smp:").partition(":")
        if not sep or not arch or not encoder:
            raise ValueError(f"name must look like 'smp:<arch>:<encoder>', got {name!r}")
        return create_smp_model(arch, encoder, **kwargs)
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise ValueError(
            f"name must be a registered model or 'timm:<name>' / 'smp:<arch>:<encoder>'; "
            f"got {name!r}, known: {known}"
        )
    return _REGISTRY[name](**kwargs)
