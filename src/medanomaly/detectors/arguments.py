"""Check a model's arguments against its constructor before anything is built or written.

A config's ``model:`` block maps one-to-one onto a constructor, so its keys are checked
against the constructor's parameters (a typo gets a did-you-mean and the list of valid
arguments) and its values against the type hints (``channels: "big"`` is refused with one
line that names the argument, the expected type and the value).
"""

from __future__ import annotations

import collections.abc
import inspect
import numbers
import types
import typing
from typing import Any

from medanomaly.errors import ConfigError, did_you_mean


def check_arguments(cls: type, params: dict[str, Any], owner: str) -> None:
    """Raise :class:`ConfigError` for an unknown argument or a value of the wrong type.

    Args:
        cls: The detector class.
        params: Constructor arguments as a config gives them.
        owner: What to name in the message, e.g. ``"model 'cae'"``.
    """
    signature = inspect.signature(cls.__init__)
    names = [n for n in signature.parameters if n != "self"]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key in params:
        if key not in names and not takes_any:
            raise ConfigError(
                f"{owner}: unknown argument {key!r}.{did_you_mean(key, names)} "
                f"Valid arguments: {', '.join(names)}"
            )
    hints = _hints(cls)
    for key, value in params.items():
        if key in hints and not matches(value, hints[key]):
            raise ConfigError(f"{owner}: {key} must be {type_text(hints[key])}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's type hints (a dataclass's field hints); ``{}`` if unresolvable."""
    for owner in (cls.__init__, cls):
        try:
            hints = typing.get_type_hints(owner)
        except Exception:  # a hint that cannot be resolved: leave the values to the constructor
            continue
        if hints:
            return hints
    return {}


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (lenient where a hint is unusual)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            return False
        items = [a for a in args if a is not Ellipsis]
        return len(items) != 1 or all(matches(v, items[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    return True  # classes and other hints: the constructor checks them


def type_text(hint: Any) -> str:
    """A hint in words a config author reads, e.g. ``a list of int``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        return f"a list of {type_text(items[0])}" if len(items) == 1 else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
