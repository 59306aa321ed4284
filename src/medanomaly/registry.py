"""Name -> detector class registry.

Every module in :mod:`medanomaly.models` is imported the first time the registry is read, and
each detector class registers itself with :func:`register`. Adding a model therefore touches
its own file, its test and a config, nothing else; ``medanomaly models`` lists what is there.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, TypeVar

from medanomaly.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from medanomaly.base import BaseDetector

_REGISTRY: dict[str, type[BaseDetector]] = {}
_MODELS_IMPORTED = False
T = TypeVar("T")


def register(name: str):
    """Class decorator that registers a detector under ``name`` (lower case, unique).

    Args:
        name: The name used in configs and on the command line.

    Returns:
        The decorator; it sets ``cls.name`` and returns the class unchanged.
    """

    def decorator(cls: type[T]) -> type[T]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return decorator


def _import_models() -> None:
    global _MODELS_IMPORTED
    if _MODELS_IMPORTED:
        return
    import medanomaly.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _MODELS_IMPORTED = True


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    _import_models()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[BaseDetector]:
    """Return the detector class registered as ``name``.

    Raises:
        ConfigError: If no model has that name; the message suggests the closest names.
    """
    _import_models()
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    hint = did_you_mean(key, _REGISTRY)
    raise ConfigError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")


def get_model(name: str, **params: Any) -> BaseDetector:
    """Build the detector registered as ``name`` with constructor arguments ``params``."""
    return get_model_class(name)(**params)
