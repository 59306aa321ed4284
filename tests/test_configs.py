"""Every built-in config builds its detector and transforms; the Hjohlman 2022 pipeline works."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from medanomaly import builtin
from medanomaly.config import build_detector, load_config
from medanomaly.data.loading import load_dataset
from medanomaly.transforms import build_transforms

CONFIGS = builtin.names("config")
SEED_004 = "resnet_ae_ccta_3d_seed004"


def test_configs_are_found() -> None:
    assert SEED_004 in CONFIGS and len(CONFIGS) >= 3


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_detector_and_transforms(name: str) -> None:
    config = load_config(name)
    detector = build_detector(config)
    data = config.get("data") or {}
    assert set(data) <= set(inspect.signature(load_dataset).parameters) - {"source"}
    transforms = build_transforms(data.get("transforms"))
    prefix, tail = transforms.split_deterministic()
    assert not prefix.is_random
    assert len(prefix) + len(tail) == len(transforms)
    shapes = [t.shape for t in transforms if hasattr(t, "shape")]
    assert all(len(shape) == detector.spatial_dims for shape in shapes)


def test_seed_004_random_pad_comes_after_the_cached_steps() -> None:
    transforms = build_transforms(load_config(SEED_004)["data"]["transforms"])
    prefix, tail = transforms.split_deterministic()
    assert [t.name for t in prefix] == ["clip", "resample", "foreground_mask", "z_score", "pad"]
    assert [(t.name, t.position) for t in tail] == [("pad", "random")]
    assert prefix.transforms[-1].position == "center"


def test_seed_004_pipeline_puts_volumes_of_any_size_on_one_grid(tmp_path: Path) -> None:
    data = load_config(SEED_004)["data"]
    folder = tmp_path / "volumes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in {"small": (60, 45, 30), "long": (90, 240, 60)}.items():  # 1 mm voxels
        volume = np.full(shape, -2000.0, np.float32)  # below the HU cut-off
        volume[10:-10, 10:-10, 5:-5] = rng.normal(
            40.0, 10.0, (shape[0] - 20, shape[1] - 20, shape[2] - 10)
        )
        np.save(folder / f"{name}.npy", volume)
    images, report = load_dataset(folder, **{**data, "cache": tmp_path / "cache"}, augment=True)
    assert not report
    assert images.images.shape == (2, 1, 64, 64, 64)  # centred pad/crop, cached
    assert images[0].shape == (1, 80, 80, 80)  # random placement when drawn for training
    assert images.subset([0, 1]).augment is None  # validation/scoring: the 64^3 grid
    # the HU cut-off made the background -1024, the z-score maps it with the stated values
    assert images.images.min() == pytest.approx((-1024.0 + 276.0) / 500.0)
