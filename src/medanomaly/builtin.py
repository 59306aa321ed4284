"""The configs and ``compare`` specs that ship inside the package, found by name.

``src/medanomaly/configs/*.yaml`` (starter configs for ``fit`` and ``cv``) and
``src/medanomaly/specs/*.yaml`` (benchmark specs for ``compare``) are package data, read
through :mod:`importlib.resources`, so an installed wheel carries them. ``--config NAME`` and
``--spec NAME`` name them by file stem (``dae_lgg_2d``, ``head_ct``). A file wins over a
name: a value that is a file is read as a file, and only a value that is no file is looked
up among the built-in names. The first comment line of each file is its one-line
description (``medanomaly config list``).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from medanomaly.errors import MissingFileError, did_you_mean

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.abc import Traversable

KINDS = {"config": "configs", "spec": "specs"}
"""Each kind of built-in file and the package folder that holds it."""
SUFFIX = ".yaml"

log = logging.getLogger(__name__)


def folder(kind: str) -> Traversable:
    """The package folder of built-in ``kind`` files (``config`` or ``spec``)."""
    return files("medanomaly") / KINDS[kind]


def names(kind: str) -> list[str]:
    """The built-in names of ``kind``, sorted."""
    return sorted(
        entry.name[: -len(SUFFIX)]
        for entry in folder(kind).iterdir()
        if entry.name.endswith(SUFFIX)
    )


def builtin(kind: str, name: str) -> Traversable:
    """The built-in ``kind`` file called ``name`` (a file stem, e.g. ``dae_lgg_2d``).

    Raises:
        MissingFileError: No built-in file has that name (with the closest names).
    """
    entry = folder(kind) / f"{name}{SUFFIX}"
    if name in names(kind) and entry.is_file():
        return entry
    raise MissingFileError(_unknown(kind, name))


def resolve(kind: str, value: str | Path) -> Path | Traversable:
    """The file that ``--config VALUE`` or ``--spec VALUE`` means.

    An existing file wins; otherwise ``value`` must be a built-in name. When both exist the
    file is read and the log (``--verbose``) says so.

    Raises:
        MissingFileError: ``value`` is neither a file nor a built-in name; the one-line
            message names the closest built-in names.
    """
    path = Path(value).expanduser()
    text = str(value)
    if path.is_file():
        if text in names(kind):
            log.info("%s: the file %s wins over the built-in %s %r", kind, path, kind, text)
        return path
    if path.exists():  # a folder, say
        raise MissingFileError(f"{path}: is not a {kind} file")
    found = builtin(kind, text)
    if Path(text + SUFFIX).is_file():  # `config show NAME > NAME.yaml`, edited, then --config NAME
        log.warning(
            "%s %r: the built-in one; the file %s here is read only when named as a path",
            kind,
            text,
            text + SUFFIX,
        )
    return found


def description(text: str) -> str:
    """The first comment line of a YAML file's text, without ``#`` ('' when none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[1:].strip() if line.lstrip().startswith("#") else ""
    return ""


def describe_all(kind: str) -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every built-in ``kind`` file."""
    return [(name, description(builtin(kind, name).read_text())) for name in names(kind)]


def _unknown(kind: str, value: str) -> str:
    """The one line that names an unknown ``--config``/``--spec`` value and the closest names."""
    stem = Path(value).name.removesuffix(SUFFIX).removesuffix(".yml")
    hint = did_you_mean(stem, names(kind)) or did_you_mean(value, names(kind))
    return (
        f"{value}: no such file, nor a built-in {kind} name.{hint} "
        f"List the names with `medanomaly config list{' --specs' if kind == 'spec' else ''}`."
    )
