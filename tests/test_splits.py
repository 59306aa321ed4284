"""Splits in one place: groups never straddle parts; the split column is honoured."""

import numpy as np
import pytest

from medanomaly.errors import ConfigError
from medanomaly.model_selection.splits import column_splits, make_splits, val_group_splits


def _data(n_groups=12, per_group=3, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_groups)], per_group)
    labels = (rng.random(len(groups)) < 0.3).astype(int)
    labels[:per_group] = 0
    return labels, groups


def _parts_disjoint_by_group(split, groups):
    parts = [set(groups[split.train]), set(groups[split.val]), set(groups[split.test])]
    return all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])


@pytest.mark.parametrize("maker", ["kfold", "val_groups"])
def test_groups_never_straddle_parts_and_every_case_is_tested_once(maker):
    labels, groups = _data()
    if maker == "kfold":
        splits = make_splits(labels, groups, folds=4, repeats=2, val_fraction=0.25, seed=1)
    else:
        splits = val_group_splits(labels, groups, folds=4, n_val=2, repeats=2, seed=1)
    assert len(splits) == 8
    for split in splits:
        assert _parts_disjoint_by_group(split, groups)
        assert np.any(labels[split.train] == 0) and np.any(labels[split.val] == 0)
    for repeat in (0, 1):
        tested = np.concatenate([s.test for s in splits if s.repeat == repeat])
        assert sorted(tested.tolist()) == list(range(len(labels)))


def test_val_groups_draws_exactly_n_validation_groups():
    labels, groups = _data()
    for split in val_group_splits(labels, groups, folds=3, n_val=2):
        assert len(set(groups[split.val])) == 2


def test_split_column_is_honoured():
    labels = np.array([0, 0, 0, 1, 0, 1, 0, 1])
    column = ["train", "train", "val", "val", "validation", "test", "test", "TEST"]
    (split,) = column_splits(labels, column)
    assert split.train.tolist() == [0, 1]
    assert split.val.tolist() == [2, 3, 4]
    assert split.test.tolist() == [5, 6, 7]


def test_split_column_errors_name_the_counts():
    with pytest.raises(ConfigError, match="holds \\['tset'\\]"):
        column_splits(np.array([0, 0, 1]), ["train", "val", "tset"])
    with pytest.raises(ConfigError, match="0 normal training case"):
        column_splits(np.array([1, 0, 1]), ["train", "val", "test"])


def test_too_few_groups_for_the_folds_is_an_error_with_counts():
    labels, groups = _data(n_groups=3)
    with pytest.raises(ConfigError, match="3 patient groups are too few for 5 folds"):
        val_group_splits(labels, groups, folds=5, n_val=1)
    with pytest.raises(ConfigError, match="training groups, too few"):
        val_group_splits(labels, groups, folds=3, n_val=2)
