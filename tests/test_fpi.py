import numpy as np
import pytest
import torch
from torch.nn import functional

from medanomaly import get_model
from medanomaly.errors import ConfigError
from medanomaly.models.fpi import foreign_patch_blend


def test_alpha_target_equals_the_blend_applied():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 24, 20)
    partner = torch.rand(6, 2, 24, 20)
    blended, target = foreign_patch_blend(x, partner, (0.2, 0.5))
    assert target.shape == (6, 24, 20)
    for i in range(6):
        box = target[i] > 0
        assert box.any()
        alpha = target[i][box].unique()
        assert len(alpha) == 1 and 0 < alpha.item() < 1  # one factor per image
        a = alpha.item()
        torch.testing.assert_close(
            blended[i][:, box], (1 - a) * x[i][:, box] + a * partner[i][:, box]
        )
        torch.testing.assert_close(blended[i][:, ~box], x[i][:, ~box])
        rows, cols = np.flatnonzero(box.any(1).numpy()), np.flatnonzero(box.any(0).numpy())
        assert box.sum() == len(rows) * len(cols)  # one box
        assert 0.2 * 24 - 1 <= len(rows) <= 0.5 * 24 + 1


def test_background_blended_into_background_is_no_anomaly():
    torch.manual_seed(1)
    x = torch.zeros(4, 1, 16, 16, 16)
    partner = torch.zeros_like(x)
    partner[:, :, :8] = 1.0  # foreground only in the first half of the partners
    blended, target = foreign_patch_blend(x, partner, (0.5, 1.0), foreground_threshold=0.5)
    assert torch.all(target[:, 8:] == 0)
    changed = (blended - x).abs().sum(dim=1) > 0
    assert torch.equal(changed, target > 0)


def test_size_range_is_checked():
    with pytest.raises(ConfigError, match="patch_size_range"):
        foreign_patch_blend(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), (0.5, 0.2))


def _smooth_fields(n: int, seed: int) -> np.ndarray:
    """Normal images: smooth random textures (a 4x4 lattice upsampled to 32x32)."""
    lattice = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    fields = functional.interpolate(lattice, size=(32, 32), mode="bilinear") * 0.15 + 0.5
    return fields.numpy().astype(np.float32)


def test_planted_lesion_scores_higher_than_the_rest_of_the_image():
    train, test = _smooth_fields(48, 0), _smooth_fields(4, 1)
    yy, xx = np.mgrid[:32, :32]
    lesions = np.stack([(yy - c) ** 2 + (xx - 31 + c) ** 2 <= 16 for c in (9, 13, 18, 22)])
    test[:, 0][lesions] += 0.4  # a bright disk planted in each test image
    fpi = get_model(
        "fpi",
        features=[8, 16, 32, 64, 128, 8],
        engine={"epochs": 40, "batch_size": 8, "lr": 2e-3, "patience": None, "progress": False},
    ).fit(train)
    maps = fpi.anomaly_map(test)
    for image_map, lesion in zip(maps, lesions, strict=True):
        assert image_map[lesion].mean() > 2 * image_map[~lesion].mean()
    assert fpi.score(test).min() > fpi.score(train[:8]).max()
