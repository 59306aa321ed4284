"""Anatomical fidelity (Kobayashi et al. 2020): a U-Net on disc + ring phantoms, quality and
overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medanomaly.metrics.fidelity import (
    anatomical_fidelity,
    dice_overlap,
    overlap_score,
    quality_score,
    softmax_entropy,
)
from medanomaly.metrics.segmentation import train_segmenter

BACKGROUND, DISC, RING = 0, 1, 2


def disc_phantoms(n: int, side: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels: background 0, a disc (class 1) inside a bright ring (class 2)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:side, :side].astype(np.float64)
    images = np.zeros((n, 1, side, side), np.float32)
    labels = np.zeros((n, side, side), np.int64)
    for i in range(n):
        centre = side / 2 + rng.uniform(-3, 3, 2)
        radius, thickness = rng.uniform(0.28, 0.38) * side, rng.uniform(2.0, 3.5)
        distance = np.hypot(rows - centre[0], cols - centre[1])
        labels[i][distance <= radius] = RING
        labels[i][distance < radius - thickness] = DISC
        levels = [0.0, rng.uniform(0.4, 0.5), rng.uniform(0.85, 0.95)]
        images[i, 0] = np.choose(labels[i], levels) + rng.normal(0, 0.03, (side, side))
    return images, labels


@pytest.fixture(scope="module")
def segmenter():
    images, labels = disc_phantoms(48)
    return train_segmenter(
        images,
        labels,
        n_classes=3,
        spatial_dims=2,
        epochs=15,
        channels=(8, 16, 32),
        engine={"batch_size": 8, "lr": 3e-3, "progress": False},
    )


@pytest.fixture(scope="module")
def test_set():
    return disc_phantoms(16, seed=1)


def test_trained_unet_segments_the_anatomy(segmenter, test_set):
    images, labels = test_set
    with torch.no_grad():
        predicted = segmenter(torch.from_numpy(images)).argmax(dim=1)
    dice = dice_overlap(predicted, torch.from_numpy(labels), 3, ignore_classes=(BACKGROUND,))
    assert float(dice.mean()) > 0.9


def test_identical_reconstruction_has_overlap_one_and_quality_zero(segmenter, test_set):
    images, _ = test_set
    scores = anatomical_fidelity(segmenter, images, images.copy())
    np.testing.assert_array_equal(scores.overlap, np.ones(len(images)))
    np.testing.assert_allclose(scores.quality, np.zeros(len(images)), atol=1e-6)
    assert quality_score(segmenter, images, images).shape == (len(images),)


@pytest.mark.parametrize("degradation", ["blur", "noise"])
def test_degraded_reconstruction_loses_quality_and_overlap(segmenter, test_set, degradation):
    images, _ = test_set
    if degradation == "blur":
        degraded = ndimage.gaussian_filter(images, (0, 0, 2, 2))
    else:
        degraded = images + np.random.default_rng(0).normal(0, 0.3, images.shape)
    scores = anatomical_fidelity(segmenter, images, degraded.astype(np.float32))
    assert np.all(scores.quality < 0)  # the network is less sure on the degraded image
    assert scores.overlap.mean() < 0.97 and np.all(scores.overlap < 1)


def test_removing_a_structure_drops_the_overlap(segmenter, test_set):
    images, labels = test_set
    without_ring = images.copy()
    without_ring[:, 0][labels == RING] = 0.0  # the "skull" is gone in the reconstruction
    overlap = overlap_score(segmenter, images, without_ring)
    blurred = overlap_score(segmenter, images, ndimage.gaussian_filter(images, (0, 0, 1, 1)))
    assert np.all(overlap < 0.8) and overlap.mean() < blurred.mean()


def test_overlap_averages_over_the_classes_present():
    first = torch.tensor([[[0, 0, 1, 1]]])  # one image, classes 0 and 1
    second = torch.tensor([[[0, 0, 1, 2]]])  # class 1 half gone, class 2 invented
    either = dice_overlap(first, second, 3)
    expected_either = (1.0 + 2 * 1 / 3 + 0.0) / 3
    np.testing.assert_allclose(either.numpy(), [expected_either], rtol=1e-6)
    from_input = dice_overlap(first, second, 3, classes_from="input", ignore_classes=(0,))
    np.testing.assert_allclose(from_input.numpy(), [2 / 3], rtol=1e-6)


def test_entropy_is_zero_when_sure_and_log_k_when_uniform():
    sure = torch.tensor([[[[50.0]], [[0.0]], [[0.0]]]])
    uniform = torch.zeros(1, 3, 1, 1)
    assert float(softmax_entropy(sure)) < 1e-6
    assert float(softmax_entropy(uniform)) == pytest.approx(np.log(3))


def test_bad_inputs_are_named(segmenter, test_set):
    images, labels = test_set
    with pytest.raises(ValueError, match="differ in shape"):
        anatomical_fidelity(segmenter, images, images[:2])
    with pytest.raises(ValueError, match="reduction"):
        quality_score(segmenter, images, images, reduction="max")
    with pytest.raises(ValueError, match="labels must lie"):
        train_segmenter(images, labels + 5, n_classes=3, epochs=1)
    with pytest.raises(ValueError, match="divisible by 8"):
        train_segmenter(images[:, :, :30, :30], labels[:, :30, :30], 3, epochs=1)
