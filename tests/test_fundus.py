"""Colour input, the fundus field-of-view mask and the ``quality`` detector (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from medanomaly import get_model, list_models
from medanomaly.data.loading import InputSpec, load_dataset
from medanomaly.data.phantoms import make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.registry import get_model_class
from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.models.classifier import SupervisedClassifier
from medanomaly.models.ensemble import Ensemble
from medanomaly.transforms import FOREGROUND_KEY, build_transforms
from medanomaly.transforms.channels import SelectChannels
from medanomaly.transforms.fundus import FundusFOVMask
from medanomaly.transforms.intensity import PercentileRescale

DRIMDB_STAMP = [[0.0, 0.08, 0.8, 1.0]]


def _fundus(height: int = 120, width: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit RGB fundus-like picture ``(3, H, W)`` and its disc: textured retina on black."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:height, :width]
    disc = (y - height / 2) ** 2 + (x - width / 2) ** 2 <= (0.45 * height) ** 2
    texture = ndimage.gaussian_filter(rng.normal(0, 30, (height, width)), 1.5)
    red, green = 170 + texture, 90 + 0.5 * texture
    image = np.stack([red, green, 0.2 * red]) * disc + rng.normal(4, 1, (3, height, width))
    return np.clip(image, 0, 255).astype(np.float32), disc


def _stamp(image: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Burn a green text-like stamp (vertical strokes) into ``image``."""
    stamped = image.copy()
    strokes = np.zeros(image.shape[1:], bool)
    strokes[rows, cols] = True
    strokes[:, ::3] = False
    stamped[1][strokes] = 250.0
    stamped[0][strokes] = stamped[2][strokes] = 10.0
    return stamped


def _picture(array: np.ndarray, source: str = "fundus.png") -> MedicalImage:
    return MedicalImage(array=array, spacing=(1.0, 1.0), source=source)


# ----------------------------------------------------------------------------- channels


def test_select_channels_keeps_the_listed_channels_in_order() -> None:
    array = np.stack([np.full((4, 4), v, np.float32) for v in (1, 2, 3)])
    out = SelectChannels([2, 0])(_picture(array))
    assert out.array.shape == (2, 4, 4)
    assert out.array[:, 0, 0].tolist() == [3.0, 1.0]


def test_select_channels_names_the_file_and_both_channel_counts() -> None:
    with pytest.raises(InvalidImageError, match=r"gray\.png.*1 channel\(s\).*\[0, 1\] \(2"):
        SelectChannels([0, 1])(_picture(np.zeros((1, 4, 4), np.float32), "gray.png"))


def test_percentile_rescale_channel_wise_scales_each_channel_on_its_own() -> None:
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    array = np.stack([ramp, 100 * ramp, np.full_like(ramp, 5.0)])
    out = PercentileRescale(0, 100, (0, 1), channel_wise=True)(_picture(array)).array
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    assert out[0].max() == pytest.approx(1.0) and np.all(out[2] == 0.0)  # flat channel
    together = PercentileRescale(0, 100, (0, 1))(_picture(array)).array
    assert together[0].max() < 0.02


def _write_png(path, array: np.ndarray) -> None:
    pixels = np.clip(array, 0, 255).astype(np.uint8)
    Image.fromarray(np.moveaxis(pixels, 0, -1) if pixels.shape[0] == 3 else pixels[0]).save(path)


def test_a_colour_run_skips_gray_pictures_and_a_gray_run_names_colour_ones(tmp_path) -> None:
    for seed in range(2):
        _write_png(tmp_path / f"colour{seed}.png", _fundus(seed=seed)[0])
    _write_png(tmp_path / "gray.png", _fundus()[0][:1])
    transforms = [{"select_channels": {"channels": [0, 1]}}]
    options = {"read_options": {"keep_channels": True}, "num_workers": 0}
    images, report = load_dataset(tmp_path, transforms, expect=InputSpec(2, 2), **options)
    assert images.images.shape == (2, 2, 120, 160)
    [(path, problem)] = report.skipped
    assert path.endswith("gray.png") and "1 channel(s)" in problem and "2 channel(s)" in problem
    _, report = load_dataset(tmp_path, None, expect=InputSpec(2, 1), **options)
    problems = dict(report.skipped)
    assert len(problems) == 2
    assert all("3 channels (stored as" in p and "model takes 1" in p for p in problems.values())
    images, report = load_dataset(tmp_path, None, expect=InputSpec(2, 1), num_workers=0)
    assert images.images.shape[1] == 1 and not report.skipped  # gray stays the default


# ----------------------------------------------------------------------------- field of view


def test_fov_mask_keeps_the_disc_and_drops_a_corner_stamp() -> None:
    image, disc = _fundus()
    stamped = _stamp(image, slice(3, 10), slice(125, 158))
    out = FundusFOVMask(background=0.0)(_picture(stamped))
    fov = out.meta[FOREGROUND_KEY]
    assert fov[disc].mean() > 0.97 and fov[~disc].mean() < 0.05  # a one-pixel rim at most
    assert not fov[3:10, 125:158].any()
    assert np.all(out.array[:, 3:10, 125:158] == 0.0)  # stripped


def test_fov_mask_drops_a_stamp_on_the_retina_given_its_box() -> None:
    image, disc = _fundus()
    stamped = _stamp(image, slice(30, 38), slice(70, 100))
    fov = FundusFOVMask()(_picture(stamped)).meta[FOREGROUND_KEY]
    assert fov[30:38, 70:100].all()  # text on the retina is not found by brightness
    boxed = FundusFOVMask(stamp_boxes=[[0.25, 0.32, 0.43, 0.63]])(_picture(stamped))
    fov = boxed.meta[FOREGROUND_KEY]
    assert not fov[30:38, 70:100].any() and fov[disc].mean() > 0.9


@pytest.mark.parametrize("value", [0.0, 255.0])
def test_a_picture_without_a_field_of_view_is_named(value: float) -> None:
    flat = np.full((3, 60, 80), value, np.float32)
    with pytest.raises(InvalidImageError, match=r"blank\.png.*no fundus field of view"):
        FundusFOVMask()(_picture(flat, "blank.png"))


def test_fov_mask_builds_from_yaml() -> None:
    pipeline = build_transforms([{"fundus_fov_mask": {"stamp_boxes": DRIMDB_STAMP}}])
    assert pipeline.to_config()[0]["fundus_fov_mask"]["stamp_boxes"] == DRIMDB_STAMP


# ----------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def quality_2d():
    """``quality`` fitted on 24 normal 2D phantoms (values in [0, 1])."""
    normal = make_phantoms(24, 0, (32, 32), seed=1)
    engine = {"seed": 0, "val_fraction": 0.25}
    detector = get_model("quality", spatial_dims=2, foreground_threshold=0.05, engine=engine)
    return detector.fit(normal), make_phantoms(4, 0, (32, 32), seed=7).images


def test_quality_names_its_measures(quality_2d) -> None:
    detector, _ = quality_2d
    names = detector.measure_names()
    assert {"sharpness_c0", "contrast_c0", "brightness_c0", "saturated_high_c0"} <= set(names)
    assert {"entropy", "snr_c0", "foreground_fraction"} <= set(names)
    doc = " ".join((type(detector).__doc__ or "").split())
    for measure in ("variance of the Laplacian", "entropy", "SD of the high-pass", "foreground"):
        assert measure in doc


def test_quality_scores_a_blurred_copy_higher(quality_2d) -> None:
    detector, images = quality_2d
    blurred = ndimage.gaussian_filter(images, sigma=(0, 0, 1.5, 1.5))
    assert np.all(detector.score(blurred) > detector.score(images))


def test_quality_scores_a_brightness_shifted_copy_higher(quality_2d) -> None:
    detector, images = quality_2d
    shifted = np.where(images > 0.05, np.clip(images + 0.25, 0, 1), images).astype(np.float32)
    assert np.all(detector.score(shifted) > detector.score(images))


def test_quality_features_keep_one_measure_as_its_absolute_z(quality_2d) -> None:
    _, images = quality_2d
    normal = make_phantoms(24, 0, (32, 32), seed=1)
    engine = {"seed": 0, "val_fraction": 0.25}
    sharp = get_model(
        "quality", foreground_threshold=0.05, engine=engine, features=["sharpness_c0"]
    ).fit(normal)
    assert sharp.measure_names() == ["sharpness_c0"]
    assert sharp.get_params()["features"] == ["sharpness_c0"]
    expected = np.abs(sharp.measures(torch.from_numpy(images))[:, 0] - sharp.center_[0])
    np.testing.assert_allclose(sharp.score(images), expected / sharp.scale_[0], rtol=1e-6)
    blurred = ndimage.gaussian_filter(images, sigma=(0, 0, 1.5, 1.5))
    assert np.all(sharp.score(blurred) > sharp.score(images))


def test_quality_features_name_an_unknown_measure() -> None:
    with pytest.raises(ConfigError, match=r"unknown measure 'sharpnes_c1'.*'sharpness_c1'"):
        get_model("quality", in_channels=3, features=["sharpnes_c1"])
    with pytest.raises(ConfigError, match="features is empty"):
        get_model("quality", features=[])


def test_quality_is_a_baseline_and_works_in_3d() -> None:
    assert get_model_class("quality").baseline
    volumes = make_phantoms(30, 0, (16, 16, 16), seed=0)
    detector = get_model("quality", spatial_dims=3, covariance="mcd", engine={"seed": 0})
    scores = detector.fit(volumes).score(volumes)
    assert scores.shape == (30,) and np.isfinite(scores).all()


# ----------------------------------------------------------------------------- C = 2 contract

ENGINE = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}


def _two_channels(images: np.ndarray) -> np.ndarray:
    """A second channel: the first one dimmed, as green is to red in a fundus photograph."""
    return np.concatenate([images, 0.6 * images], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def colour_phantoms():
    train = make_phantoms(16, 0, (32, 32), seed=3)
    test = make_phantoms(4, 0, (32, 32), seed=9).images
    planted = _two_channels(test)
    y, x = np.ogrid[:32, :32]
    spot = (y - 14) ** 2 + (x - 18) ** 2 <= 16
    planted[:, 1, spot] = 1.0  # a colour change in one channel only
    return (
        ImageSet(images=_two_channels(train.images), labels=train.labels),
        _two_channels(test),
        planted,
    )


UNSUPERVISED_2D = [
    name
    for name in list_models()
    if not issubclass(get_model_class(name), SupervisedClassifier | Ensemble)
    and "in_channels" in get_model_class(name)._param_names()  # not the postprocessed wrapper
]


NEED_LONGER_TRAINING = {"fpi", "patch_discriminator"}
"""Self-supervised models whose scores do not yet respond after two epochs: at C = 2 they are
checked to fit, map and score, not for the direction of the change."""


@pytest.mark.parametrize("name", UNSUPERVISED_2D)
def test_a_colour_change_in_one_channel_raises_the_score(name, colour_phantoms) -> None:
    train, test, planted = colour_phantoms
    detector = get_model(name, spatial_dims=2, in_channels=2, engine=ENGINE).fit(train)
    assert detector.anomaly_map(planted).shape == (4, 32, 32)  # one map over both channels
    scores = detector.score(planted)
    assert np.isfinite(scores).all()
    if name not in NEED_LONGER_TRAINING:
        assert scores.mean() > detector.score(test).mean()
