"""Exceptions raised by medanomaly.

Every error that comes from user input names the offending file (when there is one) and says
what is wrong with it, so that a batch job can report it and move on.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A `` Did you mean 'x' or 'y'?`` hint for an unknown name ('' when nothing is close)."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def check_choice(owner: str, key: str, value: str, choices: Iterable[str]) -> None:
    """Raise :class:`ConfigError` (with a did-you-mean hint) unless ``value`` is a choice."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(
            f"{owner}: {key} must be one of {choices}, got {value!r}."
            + did_you_mean(str(value), choices)
        )


class MedanomalyError(Exception):
    """Base class of every error raised on purpose by medanomaly."""


class ImageReadError(MedanomalyError):
    """A file or folder could not be read as an image.

    Args:
        path: The file or folder that failed.
        problem: What is wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickle by path and problem, so that the error crosses from a worker process."""
        return type(self), (self.path, self.problem)


def problem_text(error: BaseException, named: str | Path) -> str:
    """The text of ``error`` for a line that already names ``named``, without repeating it.

    A reading error about ``named`` itself gives its problem only; one about a file inside
    the folder ``named`` (a slice of a series) gives that file relative to it, then the problem.
    """
    if not isinstance(error, ImageReadError):
        return str(error)
    where, named = Path(error.path), Path(named)
    if where == named:
        return error.problem
    try:
        return f"{where.relative_to(named)}: {error.problem}"
    except ValueError:
        return str(error)


class InvalidImageError(ImageReadError):
    """An image was read but its content is unusable (NaN/inf, wrong dimensionality, empty)."""


class MissingFileError(MedanomalyError, FileNotFoundError):
    """A file or folder the user named (a run, a config) does not exist."""


class ConfigError(MedanomalyError):
    """A configuration file or argument is invalid."""


class NotFittedError(MedanomalyError, RuntimeError):
    """A detector was asked to score or predict before it was fitted."""


class LabelError(MedanomalyError, ValueError):
    """Labels are missing or unusable for a model that learns from them (a classifier)."""
