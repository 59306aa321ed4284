import numpy as np
import pytest

from medanomaly.errors import InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms import build_transforms


def _ball(radius: float, side: int = 21) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(side) - side // 2] * 3, indexing="ij"))
    return (np.sqrt((grid**2).sum(axis=0)) <= radius).astype(np.float32)


def test_distance_map_measures_thickness():
    image = MedicalImage(_ball(6.0)[None], (1.0, 1.0, 1.0))
    out = build_transforms([{"distance_transform": {}}])(image)
    centre = out.array[0, 10, 10, 10]
    assert 6.0 < centre < 7.0  # to the nearest voxel outside the radius-6 ball (6.08)
    assert np.all(out.array[0][_ball(6.0) == 0] == 0)
    thicker = build_transforms([{"distance_transform": {}}])(
        MedicalImage(_ball(8.0)[None], (1.0, 1.0, 1.0))
    )
    assert thicker.array.max() > out.array.max()


def test_spacing_scale_and_clip():
    image = MedicalImage(_ball(6.0)[None], (2.0, 2.0, 2.0))
    mm = build_transforms([{"distance_transform": {"scale_mm": 2.0}}])(image)
    voxels = build_transforms([{"distance_transform": {}}])(
        MedicalImage(_ball(6.0)[None], (1.0,) * 3)
    )
    np.testing.assert_allclose(mm.array, voxels.array, rtol=1e-6)
    clipped = build_transforms([{"distance_transform": {"clip": 3.0}}])(image)
    assert clipped.array.max() == 3.0


def test_missing_channel_is_named():
    with pytest.raises(InvalidImageError, match="channel 1 does not exist"):
        build_transforms([{"distance_transform": {"channel": 1}}])(
            MedicalImage(_ball(3.0)[None], (1.0,) * 3)
        )
