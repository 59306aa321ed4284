"""Morphological head and brain masks (transforms.mask, brain_mask) on a head phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms import FOREGROUND_KEY, BrainMask, build_transforms
from medanomaly.transforms.mask import brain_masks, disk, head_masks

SIZE = 96


def _rings() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    return radius, (yy, xx)


def _phantom(n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MRI-like slices: bright scalp ring, dark skull ring, brain with ventricle and lesion."""
    rng = np.random.default_rng(seed)
    radius, (yy, xx) = _rings()
    brain = radius < 32
    slices = rng.uniform(0, 4, (n, SIZE, SIZE)).astype(np.float32)
    for image in slices:
        image[(radius >= 38) & (radius < 45)] = 150.0  # scalp (fat is bright)
        image[(radius >= 32) & (radius < 38)] = 20.0  # cortical bone is dark
        image[brain] = 100.0 + rng.normal(0, 3, brain.sum())
        image[(abs(yy - 48) < 4) & (abs(xx - 44) < 3)] = 25.0  # ventricle (CSF)
        image[(abs(yy - 36) < 4) & (abs(xx - 58) < 4)] = 180.0  # bright lesion
    return slices, np.broadcast_to(brain, slices.shape)


def test_disk_is_round_and_filled():
    element = disk(3)
    assert element.shape == (7, 7)
    assert element[3].all() and element[:, 3].all()
    assert not element[0, 0] and element.sum() == 29


def test_head_mask_covers_the_head_and_fills_holes():
    slices, _ = _phantom()
    radius, _ = _rings()
    head = head_masks(slices)
    assert head.shape == slices.shape
    assert (head == (radius < 45)).mean() > 0.98  # the dark skull ring is a filled hole
    assert head_masks(np.zeros((2, 8, 8))).all()  # nothing above background: nothing dropped


def test_brain_mask_separates_brain_from_scalp():
    slices, truth = _phantom()
    radius, _ = _rings()
    brain = brain_masks(slices)
    overlap = (brain & truth).sum() / (brain | truth).sum()
    assert overlap > 0.9
    assert not brain[:, radius >= 38].any()  # no scalp
    assert brain[:, 48, 44].all() and brain[:, 36, 58].all()  # ventricle and lesion inside


def test_brain_mask_accepts_a_given_head_and_radii():
    slices, truth = _phantom(n=2)
    brain = brain_masks(slices, head_masks(slices), erode=4, opening=3, closing=3)
    assert (brain & truth).sum() / (brain | truth).sum() > 0.85


def test_brain_mask_errors_name_the_problem():
    slices, _ = _phantom(n=1)
    with pytest.raises(ValueError, match=r"expected slices \(n, H, W\)"):
        brain_masks(slices[0])
    with pytest.raises(ValueError, match="does not match"):
        brain_masks(slices, np.ones((1, 8, 8), bool))
    bad = slices.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        brain_masks(bad)
    assert not brain_masks(np.zeros((1, 16, 16)), np.zeros((1, 16, 16), bool)).any()


def test_outer_slices_stay_inside_their_inner_neighbours_brain():
    slices, _ = _phantom(n=3)
    radius, (yy, xx) = _rings()
    slices[2] = np.random.default_rng(3).uniform(0, 4, slices[2].shape)
    slices[2][np.hypot(yy - 84, xx - 48) < 11] = 110.0  # tissue reaching past the brain below
    radii = {"erode": 2, "opening": 2, "closing": 2}
    independent = brain_masks(slices, grow=None, **radii)
    consistent = brain_masks(slices, grow=2, **radii)
    assert independent[2].any() and independent[2, 90, 48]
    np.testing.assert_array_equal(consistent[:2], independent[:2])  # the inner slices
    allowed = ndimage.binary_dilation(consistent[1], structure=disk(2))
    assert consistent[2].any() and not (consistent[2] & ~allowed).any()
    assert not consistent[2, 90, 48]


def test_brain_mask_transform_on_a_volume_and_a_slice():
    slices, truth = _phantom(n=5)
    volume = np.moveaxis(slices, 0, 2)[None]  # (1, X, Y, Z): axial slices along axis 2
    image = MedicalImage(volume, (1.0, 1.0, 3.0), source="head.nii.gz")
    out = build_transforms([{"brain_mask": {"strip": True, "background": -5.0}}])(image)
    brain = out.meta[FOREGROUND_KEY]
    np.testing.assert_array_equal(brain, np.moveaxis(brain_masks(slices), 0, 2))
    assert (brain & np.moveaxis(truth, 0, 2)).sum() / (brain | np.moveaxis(truth, 0, 2)).sum() > 0.9
    assert np.all(out.array[0][~brain] == -5.0)
    np.testing.assert_array_equal(out.array[0][brain], volume[0][brain])
    one = MedicalImage(slices[:1], (1.0, 1.0), source="slice.png")
    flat = BrainMask()(one)
    np.testing.assert_array_equal(flat.array, one.array)  # no strip: values unchanged
    assert flat.meta[FOREGROUND_KEY].shape == (SIZE, SIZE)


def test_brain_mask_radii_follow_the_pixel_size():
    slices, _ = _phantom(n=1)
    one = MedicalImage(slices, (1.0, 1.0), source="slice.png")
    fine = BrainMask()(one).meta[FOREGROUND_KEY]
    coarse = BrainMask()(MedicalImage(slices, (2.0, 2.0))).meta[FOREGROUND_KEY]
    np.testing.assert_array_equal(fine, brain_masks(slices)[0])
    np.testing.assert_array_equal(
        coarse, brain_masks(slices, erode=4, opening=2, closing=3, grow=None)[0]
    )


def test_brain_mask_transform_errors():
    slices, _ = _phantom(n=1)
    with pytest.raises(InvalidImageError, match="slice.png.*channel 2 does not exist"):
        BrainMask(channel=2)(MedicalImage(slices, (1.0, 1.0), source="slice.png"))
    with pytest.raises(ConfigError, match="erode_mm"):
        BrainMask(erode_mm=0)
    with pytest.raises(ConfigError, match="axis"):
        BrainMask(axis=3)(MedicalImage(np.zeros((1, 4, 4, 4), np.float32), (1.0,) * 3))
