"""Exceptions raised by medanomaly.

Every error that comes from user input names the offending file (when there is one) and says
what is wrong with it, so that a batch job can report it and move on.
"""

from __future__ import annotations

from pathlib import Path


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


class InvalidImageError(ImageReadError):
    """An image was read but its content is unusable (NaN/inf, wrong dimensionality, empty)."""


class ConfigError(MedanomalyError):
    """A configuration file or argument is invalid."""


class NotFittedError(MedanomalyError, RuntimeError):
    """A detector was asked to score or predict before it was fitted."""
