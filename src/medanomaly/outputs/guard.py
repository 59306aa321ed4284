"""Outputs that are never lost, mixed or half-written.

A command that writes outputs first *claims* them (:func:`claim_outputs`): it takes a lock
beside each one, so that a second command writing to the same place stops with a clear error
instead of mixing its files in, and it removes what a killed earlier run left behind (its
``.*.tmp`` files and staging folders). A maps folder is written into a fresh staging folder
beside it (:func:`staging_folder`) and swapped in only when the command completes
(:meth:`Claim.commit`), so stale maps of an earlier run never sit beside new ones.

Folders medanomaly wrote hold a hidden marker file (:data:`OUTPUT_MARKER`); the folder reader
does not take them, or the files in them, as cases.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from medanomaly.errors import ConfigError, MedanomalyError
from medanomaly.io.written import OUTPUT_MARKER, is_output_folder

_CASE_FILE = re.compile(r"^\d{5}_")


class OutputBusyError(MedanomalyError):
    """Another medanomaly command is writing the same output."""


def lock_path(path: Path) -> Path:
    """The lock file of an output: ``.<name>.lock`` beside it."""
    return path.parent / f".{path.name}.lock"


def staging_folder(folder: str | Path) -> Path:
    """Where a new version of ``folder`` is written before it is swapped in."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.partial"


def _retired_folder(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


@dataclass
class Claim:
    """Locks on a command's outputs; release them with :meth:`release` (or ``with``)."""

    locks: list[FileLock] = field(default_factory=list)
    staged: list[Path] = field(default_factory=list)

    def commit(self, folder: str | Path) -> None:
        """Swap the staging folder of ``folder`` in, replacing the earlier version."""
        folder = Path(folder)
        staging, retired = staging_folder(folder), _retired_folder(folder)
        if folder.exists():
            folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired, ignore_errors=True)
        self.staged.remove(folder)

    def release(self) -> None:
        """Remove staging folders that were not committed and release the locks."""
        for folder in self.staged:
            shutil.rmtree(staging_folder(folder), ignore_errors=True)
        self.staged.clear()
        for lock in self.locks:
            lock.release()
        self.locks.clear()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_outputs(
    files: Sequence[str | Path | None] = (),
    folders: Sequence[str | Path | None] = (),
    staged: Sequence[str | Path | None] = (),
    command: str = "",
) -> Claim:
    """Lock the outputs of a command and clear what a killed earlier run left.

    Args:
        files: Output files (written atomically by the command).
        folders: Output folders written in place (locked, and marked as medanomaly's so
            that the folder reader never takes their pictures as cases).
        staged: Output folders written into :func:`staging_folder` and swapped in by
            :meth:`Claim.commit`; a fresh, empty staging folder is made for each.
        command: The command's name, recorded in the staging folder's marker.

    Raises:
        OutputBusyError: Another command holds one of the outputs.
    """
    claim = Claim()
    paths = [Path(p) for p in (*files, *folders, *staged) if p is not None]
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(lock_path(path))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise OutputBusyError(
                    f"{path}: another medanomaly command is writing here (lock "
                    f"{lock_path(path).name}); wait for it to finish or choose another output"
                ) from None
            claim.locks.append(lock)
            _clear_leftovers(path)
        for folder in (Path(p) for p in folders if p is not None):
            folder.mkdir(parents=True, exist_ok=True)
            _mark(folder, command)
        for folder in (Path(p) for p in staged if p is not None):
            _check_replaceable(folder)
            staging = staging_folder(folder)
            staging.mkdir()
            _mark(staging, command)
            claim.staged.append(folder)
    except BaseException:
        claim.release()
        raise
    return claim


def _mark(folder: Path, command: str) -> None:
    """Write the hidden marker that says medanomaly wrote ``folder``."""
    (folder / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n")


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds files medanomaly did not write."""
    if not folder.is_dir() or is_output_folder(folder):
        return
    foreign = [
        entry.name
        for entry in sorted(folder.iterdir())
        if not entry.name.startswith(".") and not _CASE_FILE.match(entry.name)
    ]
    if foreign:
        raise ConfigError(
            f"{folder}: holds files medanomaly did not write ({', '.join(foreign[:3])}); "
            "a maps folder is replaced as a whole: give a new or empty folder"
        )


def check_apart(data: str | Path, *outputs: str | Path | None) -> None:
    """Refuse an output folder that is the input or a folder above it.

    Raises:
        ConfigError: ``data`` lies in (or is) one of ``outputs``.
    """
    source = Path(data).resolve()
    if not source.is_dir():  # a manifest lists its cases: nothing is found by listing
        return
    for output in (Path(p).resolve() for p in outputs if p is not None):
        if source == output or output in source.parents:
            raise ConfigError(
                f"{output}: an output folder cannot be the input {data} or a folder above it; "
                "give a folder of its own (it may sit inside the input folder)"
            )


def _clear_leftovers(path: Path) -> None:
    """Remove the temporary files and staging folders a killed run left for ``path``."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    for folder in (staging_folder(path), _retired_folder(path)):
        shutil.rmtree(folder, ignore_errors=True)
    if path.is_dir():
        for leftover in path.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
