import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional

from medanomaly import get_model
from medanomaly.detectors.noise import coarse_noise
from medanomaly.detectors.scoring import erode_mask, median_filter
from medanomaly.errors import ConfigError
from medanomaly.models.dae import DenoisingAE

SMALL = [8, 16, 32, 64, 128, 8]


def _upsampling_basis(grid: int, size: int) -> np.ndarray:
    """Columns: each lattice point's bilinear upsampling to size x size."""
    eye = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)
    up = functional.interpolate(eye, size=(size, size), mode="bilinear", align_corners=False)
    return up.view(grid * grid, -1).T.numpy()


def _residual(basis: np.ndarray, field: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(basis, field.ravel(), rcond=None)
    return float(np.abs(basis @ coef - field.ravel()).max())


def test_noise_is_a_coarse_lattice_upsampled():
    torch.manual_seed(0)
    x = torch.zeros(3, 1, 32, 32)
    noise = coarse_noise(x, 0.2, 4).numpy()
    basis = _upsampling_basis(4, 32)
    for field in noise[:, 0]:
        assert field.std() > 0.01
        assert _residual(basis, field) < 1e-5  # 16 degrees of freedom per image
    fine = np.random.default_rng(0).normal(size=(32, 32))
    assert _residual(basis, fine) > 0.5  # the test can tell fine noise from coarse noise


def test_noise_lattice_values_are_scaled_and_rolled_when_shifted():
    lattice = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(2, 1, 16, 16)
    plain = coarse_noise(x, 0.5, 4, lattice=lattice)
    expected = functional.interpolate(lattice, size=(16, 16), mode="bilinear") * 0.5
    torch.testing.assert_close(plain, expected)
    torch.manual_seed(3)
    shifted = coarse_noise(x, 0.5, 4, shift=True, lattice=lattice)
    for image in range(2):
        rolls = [
            (a, b)
            for a, b in itertools.product(range(16), range(16))
            if torch.allclose(torch.roll(plain[image], (a, b), (1, 2)), shifted[image])
        ]
        assert rolls, "the shifted noise is a roll of the unshifted noise"
    assert not torch.allclose(plain, shifted)


def test_noise_is_added_inside_the_foreground_only():
    torch.manual_seed(0)
    dae = DenoisingAE(noise_std=0.3, noise_grid=4, foreground_threshold=0.1)
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 0.5
    noisy = dae.add_noise(x)
    inside = x > 0.1
    assert torch.equal(noisy[~inside], x[~inside])
    assert (noisy[inside] - x[inside]).abs().mean() > 0.05


def test_no_noise_at_inference(tiny2d, fast_engine):
    dae = get_model("dae", features=SMALL, engine=fast_engine).fit(tiny2d.normal)
    x = torch.from_numpy(tiny2d.images[:4])
    dae.network_.eval()
    with torch.inference_mode():
        _, _, reconstruction = dae.evaluate(dae.network_, x)
        torch.testing.assert_close(reconstruction, dae.network_(x))
    first, second = dae.detect(tiny2d), dae.detect(tiny2d)
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.reconstructions, second.reconstructions)


def test_map_is_median_filtered_inside_the_eroded_foreground(tiny2d, fast_engine):
    dae = get_model("dae", features=SMALL, foreground_threshold=0.1, erode=2, engine=fast_engine)
    dae.fit(tiny2d.normal)
    result = dae.detect(tiny2d)
    x = torch.from_numpy(tiny2d.images)
    core = erode_mask((x > 0.1).any(dim=1), 2)
    residual = (x - torch.from_numpy(result.reconstructions)).abs().mean(dim=1) * core
    np.testing.assert_allclose(result.maps, median_filter(residual, 5).numpy(), atol=1e-6)
    assert np.all(result.maps[:, 0, :] == 0)  # the border is outside the eroded foreground


def test_median_filter_and_erosion():
    maps = torch.zeros(1, 7, 7)
    maps[0, 3, 3] = 10.0  # a single hot voxel is removed by a 3-wide median
    assert median_filter(maps, 3).abs().max() == 0
    block = torch.zeros(1, 7, 7)
    block[0, 2:5, 2:5] = 1.0
    torch.testing.assert_close(median_filter(block, 3)[0, 3, 3], torch.tensor(1.0))
    volume = torch.ones(1, 5, 5, 5, dtype=torch.bool)
    eroded = erode_mask(volume, 1)
    assert eroded.sum() == 27 and eroded[0, 2, 2, 2]
    with pytest.raises(ValueError, match="odd"):
        median_filter(maps, 4)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="six widths|6 widths"):
        DenoisingAE(features=[8, 16]).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="divisible"):
        DenoisingAE(features=[12, 16, 32, 64, 128, 8]).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="score_reduce"):
        DenoisingAE(score_reduce="median").build_network((1, 32, 32))
