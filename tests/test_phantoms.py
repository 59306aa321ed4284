from __future__ import annotations

import numpy as np
import pytest

from medanomaly.data.phantoms import make_phantoms


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_phantoms_are_deterministic_labelled_and_masked(shape):
    a = make_phantoms(4, 3, shape, seed=5)
    b = make_phantoms(4, 3, shape, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (7, 1, *shape)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert list(a.labels) == [0, 0, 0, 0, 1, 1, 1]
    assert not a.masks[:4].any()
    assert all(a.masks[i].any() for i in range(4, 7))
    assert not np.array_equal(a.images, make_phantoms(4, 3, shape, seed=6).images)


def test_abnormal_kinds_cycle():
    ids = make_phantoms(0, 3, (32, 32)).ids
    assert [i.rsplit("_", 1)[1] for i in ids] == ["bright", "dark", "enlarged"]
