"""Name -> detector class registry.

Every module in :mod:`medanomaly.models` is imported the first time the registry is read, and
each detector class registers itself with :func:`register`. Adding a model therefore touches
its own file, its test and a config, nothing else; ``medanomaly models`` lists what is there.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from medanomaly.detectors.arguments import check_arguments
from medanomaly.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from medanomaly.detectors.base import BaseDetector

_REGISTRY: dict[str, type[BaseDetector]] = {}
_MODELS_IMPORTED = False
T = TypeVar("T")


def register(name: str) -> Callable[[type[T]], type[T]]:
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
    # The models sit a layer above this registry: they are found by name at run time, so
    # that a saved run can be loaded without its caller naming the model's module.
    package = importlib.import_module("medanomaly.models")
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
    """Build the detector registered as ``name`` with constructor arguments ``params``.

    Raises:
        ConfigError: ``name`` is unknown, or an argument is unknown or of the wrong type.
    """
    cls = get_model_class(name)
    check_arguments(cls, params, f"model {name!r}")
    return cls(**params)


def nested_block(
    block: Mapping[str, Any], owner: str, what: str, inherited: Mapping[str, Any]
) -> dict[str, Any]:
    """A detector's ``model:`` block nested in another's config, with inherited settings.

    ``spatial_dims`` and ``in_channels`` (and any other key of ``inherited`` but ``engine``)
    fill in what the block leaves out; the block's ``engine`` entries override the owner's.

    Args:
        block: The nested block (``{name: ..., ...constructor arguments}``).
        owner: Registry name of the detector that nests it (it cannot nest itself).
        what: How errors name the block, e.g. ``"member 2"`` or ``"the reconstructor"``.
        inherited: The owner's settings, ``engine`` as a dict.

    Raises:
        ConfigError: If the block has no name or names the owner.
    """
    full = dict(block)
    if not full.get("name"):
        raise ConfigError(f"{owner}: {what} has no 'name'")
    if full["name"] == owner:
        raise ConfigError(f"{owner}: {what} cannot itself be a {owner}")
    for key, value in inherited.items():
        if key != "engine":
            full.setdefault(key, value)
    full["engine"] = {**(inherited.get("engine") or {}), **(full.get("engine") or {})}
    return full


def build_nested(block: Mapping[str, Any], owner: str, role: str) -> BaseDetector:
    """Build the detector of a full nested block (see :func:`nested_block`).

    Args:
        block: The full block.
        owner: Registry name of the nesting detector.
        role: The block's role in errors, e.g. ``"member"`` or ``"reconstructor"``.
    """
    params = dict(block)
    name = params.pop("name")
    cls = get_model_class(name)
    check_arguments(cls, params, f"{owner} {role} {name!r}")
    try:
        return cls(**params)
    except TypeError as error:
        raise ConfigError(f"{owner} {role} {name!r}: {error}") from error
