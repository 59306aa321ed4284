"""What ``medanomaly models`` says about each registered detector.

Everything comes from the code itself: the class docstring (summary and ``Args:``), the
constructor's signature (types and defaults), the module docstring (the reference) and the
built-in configs shipped with the package (those that use the model).
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import typing
from dataclasses import dataclass

import yaml

from medanomaly import builtin
from medanomaly.detectors.arguments import type_text
from medanomaly.detectors.registry import get_model_class

_ROLE = re.compile(r":[a-z]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_PARENTHESIS = re.compile(r"\(([^()]+)\)")


@dataclass(frozen=True)
class Argument:
    """One constructor argument: its name, type in words, default and description."""

    name: str
    type: str
    default: str
    description: str


def plain(text: str) -> str:
    """``text`` without Sphinx roles and double backticks (``:class:`~a.B``` -> ``B``)."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1], text)
    return text.replace("``", "")


def summary(name: str, width: int = 80) -> str:
    """The model's one-line summary, cut to ``width`` characters."""
    lines = (get_model_class(name).__doc__ or "").strip().splitlines()
    return textwrap.shorten(plain(lines[0]) if lines else "", width=width, placeholder=" …")


def models_table(names: list[str], width: int = 100) -> str:
    """A two-column table of names and summaries that fits ``width`` characters."""
    column = max(len(n) for n in names) + 2
    return "\n".join(f"{n:<{column}}{summary(n, max(20, width - column))}" for n in names)


def arguments(name: str) -> list[Argument]:
    """The constructor arguments of a model, with types, defaults and descriptions."""
    cls = get_model_class(name)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an unresolvable hint: show the annotation as written
        hints = {}
    described = _documented_args(cls.__doc__ or "")
    found = []
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.name == "self" or parameter.kind in (parameter.VAR_KEYWORD,):
            continue
        hint = hints.get(parameter.name, parameter.annotation)
        default = parameter.default
        found.append(
            Argument(
                parameter.name,
                type_text(hint) if hint is not inspect.Parameter.empty else "",
                "(required)" if default is inspect.Parameter.empty else repr(default),
                described.get(parameter.name, ""),
            )
        )
    return found


def _documented_args(doc: str) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section."""
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in [line.strip() for line in lines]:
        return {}
    start = [line.strip() for line in lines].index("Args:") + 1
    described: dict[str, str] = {}
    current = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^\s{4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if match:
            current = match.group(1)
            described[current] = match.group(2)
        elif current and line.strip():
            described[current] += " " + line.strip()
    return {k: plain(v) for k, v in described.items()}


def reference(name: str) -> str:
    """The citation in the first line of the model's module or class docstring.

    That is the first parenthesised text, e.g. ``Schlegl et al. 2019``; '' when none.
    """
    cls = get_model_class(name)
    module = sys.modules.get(cls.__module__)
    for doc in (getattr(module, "__doc__", "") or "", cls.__doc__ or ""):
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        match = _PARENTHESIS.search(first)
        if match:
            return plain(match.group(1))
    return ""


def dimensions(name: str) -> str:
    """Which inputs the model takes, from its ``spatial_dims`` argument."""
    parameter = inspect.signature(get_model_class(name).__init__).parameters.get("spatial_dims")
    if parameter is None:
        return "2D and 3D (any size)"
    default = parameter.default
    return f"2D or 3D (spatial_dims: 2 or 3; default {default})"


def configs_using(name: str) -> list[str]:
    """The built-in configs (``--config NAME``) whose ``model.name`` is ``name``."""
    found = []
    for config_name in builtin.names("config"):
        try:
            config = yaml.safe_load(builtin.builtin("config", config_name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and (config.get("model") or {}).get("name") == name:
            found.append(config_name)
    return found


def describe(name: str, width: int = 100) -> str:
    """Everything ``medanomaly models NAME`` prints."""
    cls = get_model_class(name)
    doc = inspect.cleandoc(cls.__doc__ or "")
    paragraphs = [p for p in doc.split("\n\n") if p.strip() and not p.startswith("Args:")]
    text = " ".join(" ".join(p.split()) for p in paragraphs[:2])
    lines = [f"{name}: {summary(name, width)}"]
    lines.append(f"reference: {reference(name) or '(none given in the docstring)'}")
    lines.append(f"input: {dimensions(name)}")
    lines += ["", *textwrap.wrap(plain(text), width)]
    lines += ["", "arguments (YAML model: block; type, default):"]
    for arg in arguments(name):
        lines.append(f"  {arg.name}: {arg.type}, default {arg.default}")
        if arg.description:
            lines += textwrap.wrap(arg.description, width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)  # fmt: skip
    using = configs_using(name)
    lines += ["", "built-in configs (--config NAME): " + (", ".join(using) if using else "none")]
    return "\n".join(lines)
