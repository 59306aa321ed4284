"""Patient-grouped splits in one place: what ``cv``, ``compare`` and the benchmarks use.

Three protocols, each giving :class:`FoldSplit` objects (training, validation and test
indices into a labelled set; a patient group is never on two sides):

* :func:`make_splits`: repeated, grouped, stratified k-fold; the validation part is a
  share (``val_fraction``) of each training part, by groups.
* :func:`val_group_splits`: grouped k-fold with ``n_val`` validation groups drawn from
  inside each training part (the LGG protocol).
* :func:`column_splits`: the manifest's ``split`` column (``train``, ``val``, ``test``).

Every protocol ends in :func:`check_grouped`, which refuses a split that puts one group in two
parts. ``compare`` then halves each validation part by groups (:func:`with_selection_half`):
one half tunes a candidate, the other chooses between candidates.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medanomaly.data.listing import check_groups_apart, split_part_names
from medanomaly.errors import ConfigError


@dataclass(frozen=True)
class FoldSplit:
    """Indices (into the labelled set) of one fold's training, validation and test parts."""

    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    select: np.ndarray | None = None
    """The validation cases that only choose between candidates (``None``: no such half)."""

    @property
    def name(self) -> str:
        """Folder name, e.g. ``r1_f3`` (1-based)."""
        return f"r{self.repeat + 1}_f{self.fold + 1}"

    @property
    def tune(self) -> np.ndarray:
        """The validation cases that tune a candidate (all of them without a selection half)."""
        if self.select is None:
            return self.val
        return np.setdiff1d(self.val, self.select)


PARTS = ("train", "val", "test")


def check_grouped(split: FoldSplit, groups: np.ndarray, where: str) -> FoldSplit:
    """Return ``split`` unless a patient group has cases in two of its parts.

    Raises:
        ConfigError: Naming the first such group, both parts and how many groups straddle.
    """
    groups = np.asarray(groups).astype(str)
    check_groups_apart({part: groups[getattr(split, part)] for part in PARTS}, where)
    return split


# -- splitting ------------------------------------------------------------------------------
def _grouped_splits(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold`` splits (its "too few members" warning silenced)."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield from splitter.split(np.zeros(len(labels)), labels, groups)


def carve_validation(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (training, validation) by groups, stratified where possible.

    The validation part is one of ``round(1 / fraction)`` grouped, stratified folds of
    ``idx``: the first that holds both classes, else the first that holds normal cases (which
    early stopping and every threshold rule need), else the first.
    """
    n_groups = np.unique(groups[idx]).size
    n_splits = min(max(2, round(1.0 / fraction)), n_groups)
    if n_splits < 2:
        raise ConfigError("cv: a training part has a single patient group; no validation left")
    candidates = list(_grouped_splits(labels[idx], groups[idx], n_splits, seed))

    def rank(candidate: tuple[np.ndarray, np.ndarray]) -> int:
        held = set(labels[idx[candidate[1]]].tolist())
        return 0 if held >= {0, 1} else (1 if 0 in held else 2)

    keep, held = min(candidates, key=rank)  # min keeps the first of equal rank
    return np.sort(idx[keep]), np.sort(idx[held])


def make_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    folds: int,
    repeats: int,
    val_fraction: float,
    seed: int = 0,
) -> list[FoldSplit]:
    """Repeated, grouped, stratified k-fold splits with a validation part per fold.

    Args:
        labels: 0/1 per case.
        groups: Patient id per case; a group is always on one side of every split.
        folds: Test folds per repeat.
        repeats: Number of repeats (repeat ``r`` shuffles with ``seed + r``).
        val_fraction: Share of each training part (by groups) used for validation.
        seed: Base seed.

    Returns:
        ``folds * repeats`` splits, repeat-major.

    Raises:
        ConfigError: If there are fewer groups than folds or no normal case to train on.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = np.unique(groups).size
    if n_groups < folds:
        raise ConfigError(f"cv: {n_groups} patient groups are too few for {folds} folds")
    splits = []
    for repeat in range(repeats):
        outer = _grouped_splits(labels, groups, folds, seed + repeat)
        for fold, (train, test) in enumerate(outer):
            val_seed = (seed + repeat) * 1000 + fold
            train, val = carve_validation(train, labels, groups, val_fraction, val_seed)
            if not np.any(labels[train] == 0) or not np.any(labels[val] == 0):
                raise ConfigError(
                    f"cv: repeat {repeat + 1} fold {fold + 1} has no normal case to train or "
                    "validate on; use fewer folds or a larger val_fraction"
                )
            split = FoldSplit(repeat, fold, train, val, np.sort(test))
            splits.append(check_grouped(split, groups, f"cv: repeat {repeat + 1} fold {fold + 1}"))
    return splits


def _check_parts(split: FoldSplit, labels: np.ndarray, where: str) -> FoldSplit:
    """Raise ConfigError, with the counts, unless training and validation hold normals."""
    n_train = int(np.sum(labels[split.train] == 0))
    n_val = int(np.sum(labels[split.val] == 0))
    if n_train == 0 or n_val == 0 or len(split.test) == 0:
        raise ConfigError(
            f"{where}: {n_train} normal training case(s), {n_val} normal validation case(s) "
            f"and {len(split.test)} test case(s); each part needs at least one"
        )
    return split


def val_group_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    folds: int,
    n_val: int,
    repeats: int = 1,
    seed: int = 0,
) -> list[FoldSplit]:
    """Grouped, stratified k-fold; ``n_val`` validation groups drawn from each training part.

    The validation groups are the first ``n_val`` of a permutation of the training groups
    (``default_rng(seed * 1000 + repeat * 100 + fold)``); of up to 20 draws the first whose
    validation part holds both classes is kept (else the first with normals).

    Raises:
        ConfigError: Fewer groups than ``folds``, or a training part with fewer than
            ``n_val + 1`` groups or without normals (the message gives the counts).
    """
    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    n_groups = np.unique(groups).size
    if n_groups < folds:
        raise ConfigError(f"splits: {n_groups} patient groups are too few for {folds} folds")
    splits = []
    for repeat in range(repeats):
        for fold, (train, test) in enumerate(_grouped_splits(labels, groups, folds, seed + repeat)):
            names = np.unique(groups[train])
            if len(names) <= n_val:
                raise ConfigError(
                    f"splits: fold {fold + 1} has {len(names)} training groups, too few for "
                    f"{n_val} validation groups and at least one training group"
                )
            rng = np.random.default_rng(seed * 1000 + repeat * 100 + fold)
            draws = [rng.permutation(names)[:n_val] for _ in range(20)]
            held = next(
                (d for d in draws if set(labels[train][np.isin(groups[train], d)]) >= {0, 1}),
                draws[0],
            )
            is_val = np.isin(groups[train], held)
            split = FoldSplit(
                repeat, fold, np.sort(train[~is_val]), np.sort(train[is_val]), np.sort(test)
            )
            where = f"splits: repeat {repeat + 1} fold {fold + 1}"
            splits.append(check_grouped(_check_parts(split, labels, where), groups, where))
    return splits


def column_splits(
    labels: np.ndarray, column: Sequence[str | None], groups: np.ndarray | None = None
) -> list[FoldSplit]:
    """One split from the manifest's ``split`` column (``train``, ``val``/``validation``, ``test``).

    Args:
        labels: 0/1 per case.
        column: The ``split`` value of every case.
        groups: Patient id per case; a group with cases in two parts is refused.

    Raises:
        ConfigError: A case without a split or with an unknown one, a part without normals
            (the message names the counts), or a group in two parts (named).
    """
    labels = np.asarray(labels)
    parts = np.array(split_part_names(column, "splits"))
    split = FoldSplit(0, 0, *(np.flatnonzero(parts == name) for name in ("train", "val", "test")))
    split = _check_parts(split, labels, "splits: the split column")
    if groups is not None:
        check_grouped(split, groups, "splits: the split column")
    return [split]


def with_selection_half(
    split: FoldSplit, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> FoldSplit:
    """``split`` with ``select``: a grouped, stratified share of its validation part.

    The rest of the validation part (``split.tune``) tunes each candidate; ``select`` only
    scores the tuned candidates for the choice between them.

    Raises:
        ConfigError: The validation part has a single patient group.
    """
    if np.unique(np.asarray(groups)[split.val]).size < 2:
        raise ConfigError(
            f"compare: fold {split.name}'s validation part holds a single patient group; it "
            "cannot be halved into a tuning and a selection part (use more validation groups)"
        )
    tune, select = carve_validation(split.val, labels, groups, fraction, seed)
    return replace(split, select=select)
