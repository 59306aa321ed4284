"""Tests of medanomaly.transforms on tiny synthetic 2D (1x32x32) and 3D (1x16x16x16) images."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
import yaml

from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms import (
    FOREGROUND_KEY,
    TRANSFORMS,
    Clip,
    Compose,
    Crop,
    Flip,
    ForegroundMask,
    HistogramMatch,
    HUWindow,
    MinMax,
    N4BiasCorrection,
    Pad,
    PercentileRescale,
    RandAffine,
    RandFlip,
    RandIntensity,
    Resample,
    Resize,
    ZScore,
    build_transforms,
)

ORIGIN = np.array([10.0, 20.0, 30.0])


def make_3d(array: np.ndarray | None = None, spacing=(1.0, 1.0, 2.0), **meta) -> MedicalImage:
    if array is None:
        array = np.random.default_rng(0).normal(100, 10, (1, 16, 16, 16))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = ORIGIN
    return MedicalImage(
        np.asarray(array, np.float32), tuple(spacing), affine, source="vol.nii.gz", meta=meta
    )


def make_2d(array: np.ndarray | None = None, spacing=(0.5, 0.5), **meta) -> MedicalImage:
    if array is None:
        array = np.random.default_rng(1).normal(100, 10, (1, 32, 32))
    return MedicalImage(np.asarray(array, np.float32), tuple(spacing), None, "slice.png", meta)


def with_mask(image: MedicalImage, mask: np.ndarray) -> MedicalImage:
    return image.with_array(image.array, meta={**image.meta, FOREGROUND_KEY: mask})


def box_mask(shape, box) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in box)] = True
    return mask


# ----------------------------------------------------------------------------- intensity


def test_hu_window_maps_window_edges_to_output():
    values = np.array([-1000, -160, 40, 240, 1000], np.float32).reshape(1, 5, 1)
    out = HUWindow(center=40, width=400)(make_2d(values)).array.ravel()
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)
    out = HUWindow(40, 400, output=(-1, 1))(make_2d(values)).array.ravel()
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1], atol=1e-6)
    assert out.dtype == np.float32


def test_clip_lower_cut_off():
    values = np.array([-3000, -1024, 0, 3000], np.float32).reshape(1, 4, 1)
    out = Clip(lower=-1024)(make_2d(values)).array.ravel()
    np.testing.assert_array_equal(out, [-1024, -1024, 0, 3000])
    with pytest.raises(ConfigError):
        Clip()
    with pytest.raises(ConfigError, match="above"):
        Clip(lower=1, upper=0)


@pytest.mark.parametrize("make", [make_2d, make_3d])
@pytest.mark.parametrize("output", [(0.0, 1.0), (-1.0, 1.0)])
def test_min_max(make, output):
    out = MinMax(output=output)(make()).array
    assert out.min() == pytest.approx(output[0]) and out.max() == pytest.approx(output[1])
    flat = MinMax(output=output)(make(np.full((1, 4, 4), 7.0))).array
    np.testing.assert_array_equal(flat, output[0])


@pytest.mark.parametrize("make", [make_2d, make_3d])
def test_z_score_per_image(make):
    out = ZScore()(make()).array
    assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-4)


def test_z_score_dataset_statistics_and_foreground():
    image = make_2d(np.arange(16, dtype=np.float32).reshape(1, 4, 4))
    np.testing.assert_allclose(ZScore(mean=5, std=2)(image).array, (image.array - 5) / 2)
    mask = box_mask((4, 4), [(0, 2), (0, 4)])  # values 0..7
    out = ZScore(foreground_only=True)(with_mask(image, mask)).array
    inside = np.arange(8.0)
    np.testing.assert_allclose(out[0], (image.array[0] - inside.mean()) / inside.std(), rtol=1e-5)
    with pytest.raises(InvalidImageError, match="slice.png.*foreground"):
        ZScore(foreground_only=True)(image)
    with pytest.raises(ConfigError, match="both"):
        ZScore(mean=1.0)
    with pytest.raises(ConfigError, match="std"):
        ZScore(mean=1.0, std=0.0)


def test_percentile_rescale():
    values = np.arange(1024, dtype=np.float32).reshape(1, 32, 32)
    out = PercentileRescale(lower=0, upper=100)(make_2d(values)).array
    np.testing.assert_allclose(out, values / 1023, atol=1e-6)
    out = PercentileRescale(lower=0, upper=50, output=(-1, 1))(make_2d(values)).array
    median = np.percentile(values, 50)
    np.testing.assert_allclose(out[values >= median], 1.0)
    np.testing.assert_allclose(out[values <= median], values[values <= median] / median * 2 - 1)
    assert out.min() == -1
    with pytest.raises(ConfigError):
        PercentileRescale(lower=10, upper=5)


# ----------------------------------------------------------------------------- geometry


def expected_resampled_size(n: int, spacing_in: float, spacing_out: float) -> int:
    """The rule Resample documents (MONAI Spacing): voxel-centre extent, round half to even."""
    return int(np.round((n - 1) * spacing_in / spacing_out + 1))


def test_resample_3d_to_3mm_isotropic():
    mask = box_mask((16, 16, 16), [(4, 12), (4, 12), (4, 12)])
    image = with_mask(make_3d(), mask)
    out = Resample(spacing=(3.0, 3.0, 3.0))(image)
    expected = tuple(expected_resampled_size(16, s, 3.0) for s in (1.0, 1.0, 2.0))
    assert expected == (6, 6, 11)
    assert out.array.shape == (1, *expected)
    assert out.spacing == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(out.affine[:3, :3], np.eye(3) * 3)
    np.testing.assert_allclose(out.affine[:3, 3], ORIGIN)
    assert out.meta[FOREGROUND_KEY].shape == expected and out.meta[FOREGROUND_KEY].dtype == bool
    assert out.meta[FOREGROUND_KEY].any()
    assert image.array.shape == (1, 16, 16, 16)  # input untouched


def test_resample_2d_and_constant_image():
    out = Resample(spacing=1.0)(make_2d(np.full((1, 32, 32), 5.0)))
    assert out.array.shape == (1, 16, 16) and out.spacing == (1.0, 1.0) and out.affine is None
    np.testing.assert_allclose(out.array, 5.0)
    assert Resample(spacing=1.0)(make_2d(np.ones((1, 16, 16)))).array.shape == (1, 8, 8)


def test_resample_wrong_dimensionality_names_source():
    with pytest.raises(InvalidImageError, match=r"slice\.png.*resample.*3 values.*2D"):
        Resample(spacing=(3.0, 3.0, 3.0))(make_2d())


def test_resize_3d_keeps_physical_extent():
    image = with_mask(make_3d(), box_mask((16, 16, 16), [(0, 8), (0, 16), (0, 16)]))
    out = Resize(shape=(8, 8, 8))(image)
    assert out.array.shape == (1, 8, 8, 8)
    assert out.spacing == (2.0, 2.0, 4.0)
    # voxel 0 now covers old voxels 0-1: its centre is half an old voxel further on
    np.testing.assert_allclose(out.affine[:3, 3], ORIGIN + [0.5, 0.5, 1.0])
    blocks = image.array[0].reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out.array[0], blocks, rtol=1e-5)  # "area" = block mean
    np.testing.assert_array_equal(
        out.meta[FOREGROUND_KEY], box_mask((8, 8, 8), [(0, 4), (0, 8), (0, 8)])
    )


@pytest.mark.parametrize("mode", ["area", "bilinear", "linear", "nearest", "bicubic"])
def test_resize_2d_modes(mode):
    out = Resize(shape=(64, 48), mode=mode)(make_2d())
    assert out.array.shape == (1, 64, 48)
    assert out.spacing == pytest.approx((0.25, 32 * 0.5 / 48))


def test_resize_wrong_dimensionality():
    with pytest.raises(InvalidImageError, match=r"slice\.png.*resize.*shape has 3 values"):
        Resize(shape=(64, 64, 64))(make_2d())
    with pytest.raises(InvalidImageError, match="bicubic"):
        Resize(shape=(8, 8, 8), mode="bicubic")(make_3d())


def test_pad_centre_places_image_in_the_middle():
    image = make_3d(np.ones((1, 4, 4, 4)), spacing=(1.0, 1.0, 1.0))
    image = with_mask(image, np.ones((4, 4, 4), bool))
    out = Pad(shape=(8, 7, 4), value=-1.0)(image)
    assert out.array.shape == (1, 8, 7, 4)
    expected = np.full((8, 7, 4), -1.0)
    expected[2:6, 1:5, :] = 1.0
    np.testing.assert_array_equal(out.array[0], expected)
    np.testing.assert_array_equal(out.meta[FOREGROUND_KEY], expected > 0)
    np.testing.assert_allclose(out.affine[:3, 3], ORIGIN - [2, 1, 0])
    assert not Pad(shape=(8, 8, 8)).is_random


def _placement(image: MedicalImage) -> tuple[int, ...]:
    return tuple(int(np.argwhere(image.array[0] > 0).min(axis=0)[i]) for i in range(3))


def test_pad_random_position_reproducible_by_seed():
    image = make_3d(np.ones((1, 4, 4, 4)))
    centre = _placement(Pad(shape=(16, 16, 16))(image))
    first = [_placement(Pad(shape=(16, 16, 16), position="random", seed=7)(image)) for _ in "ab"]
    again = Pad(shape=(16, 16, 16), position="random", seed=7)
    draws = [_placement(again(image)) for _ in range(3)]
    assert first[0] == first[1] == draws[0]
    assert len(set(draws)) > 1  # the RNG moves on between calls
    assert any(d != centre for d in draws)
    assert again.set_random_state(7) is again and _placement(again(image)) == draws[0]
    assert Pad(shape=(16, 16, 16), position="random").is_random


def test_pad_larger_image_raises_unless_crop():
    with pytest.raises(InvalidImageError, match=r"slice\.png.*larger"):
        Pad(shape=(16, 64))(make_2d())
    out = Pad(shape=(16, 64), crop=True)(make_2d())
    assert out.array.shape == (1, 16, 64)
    np.testing.assert_array_equal(out.array[0, :, 16:48], make_2d().array[0, 8:24, :])


def test_2d_image_with_3x3_affine_keeps_its_form():
    affine = np.array([[0.5, 0.0, 7.0], [0.0, 0.5, 9.0], [0.0, 0.0, 1.0]])
    image = MedicalImage(make_2d().array, (0.5, 0.5), affine, "slice.png")
    out = Pad(shape=(36, 32))(image)
    np.testing.assert_allclose(out.affine, [[0.5, 0, 6.0], [0, 0.5, 9.0], [0, 0, 1]])
    assert Resize(shape=(16, 16))(image).spacing == (1.0, 1.0)


def test_crop_box_and_foreground():
    image = make_3d()
    out = Crop(box=[[2, 10], [0, None], [-4, None]])(image)
    np.testing.assert_array_equal(out.array, image.array[:, 2:10, :, 12:])
    np.testing.assert_allclose(out.affine[:3, 3], ORIGIN + [2, 0, 24])

    mask = box_mask((16, 16, 16), [(5, 9), (6, 8), (0, 3)])
    out = Crop(foreground=True, margin=1)(with_mask(image, mask))
    np.testing.assert_array_equal(out.array, image.array[:, 4:10, 5:9, 0:4])
    np.testing.assert_array_equal(out.meta[FOREGROUND_KEY], mask[4:10, 5:9, 0:4])

    values = np.zeros((1, 32, 32), np.float32)
    values[0, 3:5, 10:20] = 1
    assert Crop(foreground=True, threshold=0.5)(make_2d(values)).array.shape == (1, 2, 10)
    with pytest.raises(InvalidImageError, match="empty"):
        Crop(foreground=True, threshold=5.0)(make_2d(values))
    with pytest.raises(InvalidImageError, match="foreground_mask"):
        Crop(foreground=True)(make_2d(values))
    with pytest.raises(ConfigError, match="either"):
        Crop()


def test_flip_updates_affine_and_mask():
    image = make_3d()
    image = with_mask(image, box_mask((16, 16, 16), [(0, 3), (0, 16), (0, 16)]))
    out = Flip(axes=[0])(image)
    np.testing.assert_array_equal(out.array, image.array[:, ::-1])
    np.testing.assert_array_equal(out.meta[FOREGROUND_KEY], image.meta[FOREGROUND_KEY][::-1])
    assert out.affine[0, 0] == -1 and out.affine[0, 3] == ORIGIN[0] + 15
    # the world position of each value is unchanged
    old = image.affine @ [2, 3, 4, 1]
    new = out.affine @ [13, 3, 4, 1]
    np.testing.assert_allclose(old, new)
    np.testing.assert_array_equal(Flip(axes=1)(make_2d()).array, make_2d().array[:, :, ::-1])


def test_flip_only_when_meta_matches():
    flip = Flip(axes=[0], when={"laterality": "L"})
    left, right, unknown = make_3d(laterality="L"), make_3d(laterality="R"), make_3d()
    np.testing.assert_array_equal(flip(left).array, left.array[:, ::-1])
    assert flip(right) is right and flip(unknown) is unknown
    either = Flip(axes=[0], when={"laterality": ["L", "left"]})
    assert either(make_3d(laterality="left")).affine[0, 0] == -1
    with pytest.raises(InvalidImageError, match="axes"):
        Flip(axes=[2])(make_2d())


def test_geometric_transforms_reject_mask_of_wrong_shape():
    with pytest.raises(InvalidImageError, match="foreground"):
        Resize(shape=(8, 8))(with_mask(make_2d(), np.ones((4, 4), bool)))


# ----------------------------------------------------------------------------- masks and MRI


def test_foreground_mask_fills_hole_and_keeps_array():
    values = np.full((1, 16, 16, 16), -1024.0, np.float32)
    values[0, 3:13, 3:13, 3:13] = 40.0
    values[0, 6:9, 6:9, 6:9] = -1000.0  # enclosed air pocket
    values[0, 0, 0, 0] = 100.0  # a separate speck
    image = make_3d(values)
    out = ForegroundMask(threshold=-990)(image)
    np.testing.assert_array_equal(out.array, image.array)
    mask = out.meta[FOREGROUND_KEY]
    assert mask.dtype == bool and mask.shape == (16, 16, 16)
    assert mask[7, 7, 7] and mask.sum() == 1000 + 1
    assert FOREGROUND_KEY not in image.meta  # input meta untouched
    holey = ForegroundMask(threshold=-990, fill_holes=False)(image).meta[FOREGROUND_KEY]
    assert not holey[7, 7, 7]
    largest = ForegroundMask(threshold=-990, largest_component=True)(image).meta[FOREGROUND_KEY]
    assert largest.sum() == 1000 and not largest[0, 0, 0]


def bias_phantom(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    grid = np.mgrid[:n, :n, :n].astype(np.float64)
    inside = np.sqrt(((grid - (n - 1) / 2) ** 2).sum(0)) < n * 0.4
    bias = np.exp(0.6 * (grid[0] / (n - 1) - 0.5) + 0.3 * (grid[2] / (n - 1) - 0.5))
    return (inside * 100.0 * bias)[None].astype(np.float32), inside


def coefficient_of_variation(values: np.ndarray, inside: np.ndarray) -> float:
    return float(values[0][inside].std() / values[0][inside].mean())


def test_n4_reduces_multiplicative_bias():
    values, inside = bias_phantom()
    out = N4BiasCorrection()(make_3d(values, spacing=(1.0, 1.0, 1.0)))
    before = coefficient_of_variation(values, inside)
    after = coefficient_of_variation(out.array, inside)
    assert after < before / 3
    assert out.array.shape == values.shape and out.array.dtype == np.float32


def test_n4_2d_without_otsu():
    values, inside = bias_phantom(32)
    image = with_mask(make_2d(values[:, :, :, 16]), inside[:, :, 16])
    out = N4BiasCorrection(shrink_factor=1, iterations=[20, 20], mask_otsu=False)(image)
    before = coefficient_of_variation(values[:, :, :, 16], inside[:, :, 16])
    assert coefficient_of_variation(out.array, inside[:, :, 16]) < before / 2


def distance_to(values: np.ndarray, reference: np.ndarray) -> float:
    q = np.linspace(5, 95, 19)
    return float(np.abs(np.percentile(values, q) - np.percentile(reference, q)).mean())


def test_histogram_match_moves_towards_reference(tmp_path):
    rng = np.random.default_rng(3)
    source = make_3d(rng.gamma(2.0, 10.0, (1, 16, 16, 16)))
    reference = rng.normal(200.0, 20.0, (20, 20, 20)).astype(np.float32)
    matcher = HistogramMatch(reference, threshold_at_mean=False)
    out = matcher(source).array
    assert distance_to(out, reference) < distance_to(source.array, reference) / 5
    assert matcher.to_config()["histogram_match"]["reference"].startswith("array:sha1:")

    np.save(tmp_path / "ref.npy", reference)
    from_npy = HistogramMatch(str(tmp_path / "ref.npy"), threshold_at_mean=False)(source).array
    np.testing.assert_allclose(from_npy, out)
    nibabel.save(nibabel.Nifti1Image(reference, np.eye(4)), str(tmp_path / "ref.nii.gz"))
    from_nii = HistogramMatch(tmp_path / "ref.nii.gz", threshold_at_mean=False)(source).array
    np.testing.assert_allclose(from_nii, out)
    with pytest.raises(ConfigError, match="does not exist"):
        HistogramMatch(str(tmp_path / "missing.npy"))
    (tmp_path / "ref.txt").write_text("1 2 3")
    with pytest.raises(ConfigError, match=".npy"):
        HistogramMatch(str(tmp_path / "ref.txt"))


# ----------------------------------------------------------------------------- augmentation


AUGMENTATIONS = [
    lambda seed: RandFlip(axes=[0, 1], prob=0.5, seed=seed),
    lambda seed: RandAffine(prob=1.0, seed=seed),
    lambda seed: RandIntensity(prob=1.0, seed=seed),
]


@pytest.mark.parametrize("factory", AUGMENTATIONS)
@pytest.mark.parametrize("make", [make_2d, make_3d])
def test_augmentation_reproducible_and_keeps_shape(factory, make):
    image = make()
    first, second = factory(5), factory(5)
    outs = [first(image).array for _ in range(4)]
    np.testing.assert_array_equal(outs[0], second(image).array)
    assert all(o.shape == image.array.shape and o.dtype == np.float32 for o in outs)
    assert any(not np.array_equal(o, image.array) for o in outs)
    first.set_random_state(5)
    np.testing.assert_array_equal(first(image).array, outs[0])
    assert first.is_random


@pytest.mark.parametrize("factory", AUGMENTATIONS)
def test_augmentation_with_prob_zero_is_identity(factory):
    template = factory(0)
    transform = type(template)(**{**template.to_config()[template.name], "prob": 0.0})
    image = make_3d()
    np.testing.assert_array_equal(transform(image).array, image.array)


def test_augmentation_moves_mask_with_image():
    values = np.zeros((1, 32, 32), np.float32)
    values[0, 4:12, 6:20] = 1.0
    image = with_mask(make_2d(values), values[0] > 0.5)
    for transform in (RandFlip(axes=[0, 1], prob=0.5, seed=1), RandAffine(prob=1.0, seed=1)):
        for _ in range(3):
            out = transform(image)
            agree = (out.array[0] > 0.5) == out.meta[FOREGROUND_KEY]
            assert agree.mean() > 0.97


def test_rand_intensity_stays_within_its_bounds():
    image = make_2d(np.random.default_rng(0).uniform(0, 1, (1, 32, 32)))
    out = RandIntensity(brightness=0.1, contrast=0.1, prob=1.0, seed=0)(image).array
    assert abs(out.mean() - image.array.mean()) <= 0.1 + 1e-5
    ratio = out.std() / image.array.std()
    assert 0.9 - 1e-5 <= ratio <= 1.1 + 1e-5


# ----------------------------------------------------------------------------- config


YAML = """
transforms:
  - clip: {lower: -1024}
  - foreground_mask: {threshold: -990}
  - hu_window: {center: 40, width: 400}
  - resample: {spacing: 3}
  - resize: {shape: [8, 8, 8], mode: trilinear}
  - flip: {axes: [0], when: {laterality: L}}
  - min_max:
  - rand_flip: {axes: [1], seed: 3}
  - rand_affine: {rotate_deg: 5, seed: 4}
  - rand_intensity: {brightness: 0.05, contrast: 0.05, seed: 5}
"""


def test_build_transforms_from_yaml_round_trips():
    config = yaml.safe_load(YAML)["transforms"]
    compose = build_transforms(config)
    assert [next(iter(t.to_config())) for t in compose] == [next(iter(c)) for c in config]
    dumped = compose.to_config()
    assert dumped[2] == {"hu_window": {"center": 40.0, "width": 400.0, "output": [0.0, 1.0]}}
    assert dumped[5]["flip"] == {"axes": [0], "when": {"laterality": "L"}}
    assert json.loads(json.dumps(dumped)) == dumped
    rebuilt = build_transforms(yaml.safe_load(yaml.safe_dump(dumped)))
    assert rebuilt.to_config() == dumped and rebuilt.cache_key() == compose.cache_key()

    prefix, rest = compose.split_deterministic()
    assert len(prefix) == 7 and not prefix.is_random and rest.is_random
    image = make_3d(np.full((1, 16, 16, 16), -2000.0), laterality="L")
    image.array[0, 4:12, 4:12, 4:12] = 100.0
    out = compose(image)
    assert out.array.shape == (1, 8, 8, 8) and out.meta[FOREGROUND_KEY].shape == (8, 8, 8)
    np.testing.assert_array_equal(
        compose.set_random_state(0)(image).array, rebuilt.set_random_state(0)(image).array
    )


def test_build_transforms_empty_and_bare_names():
    assert len(build_transforms(None)) == 0 and len(build_transforms([])) == 0
    assert isinstance(build_transforms(["min_max"]).transforms[0], MinMax)
    assert Compose()(make_2d()).array.shape == (1, 32, 32)


def test_unknown_transform_suggests_name():
    with pytest.raises(ConfigError, match="unknown transform 'hu_windw'.*Did you mean 'hu_window'"):
        build_transforms([{"hu_windw": {"center": 40, "width": 400}}])


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"resize": {"shap": [64, 64]}}, r"'resize'.*unknown argument 'shap'.*'shape'"),
        ({"hu_window": {"center": 40}}, r"'hu_window'.*missing required argument 'width'"),
        ({"hu_window": {"center": 40, "width": -1}}, r"'hu_window'.*'width'.*> 0"),
        ({"resize": {"shape": [64]}}, r"'resize'.*'shape'"),
        ({"pad": {"shape": [8, 8], "position": "corner"}}, r"'pad'.*'position'.*center"),
        ({"rand_flip": {"prob": 2}}, r"'rand_flip'.*'prob'"),
        ({"flip": {"axes": [0], "when": "left"}}, r"'flip'.*'when'"),
        ({"min_max": [0, 1]}, r"'min_max'.*mapping"),
        ({"clip": {"lower": "low"}}, r"'clip'.*'lower'.*number"),
    ],
)
def test_bad_arguments_name_transform_and_argument(config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_transforms([config])


def test_bad_config_shapes():
    with pytest.raises(ConfigError, match="list"):
        build_transforms({"min_max": {}})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="entry 0"):
        build_transforms([{"min_max": {}, "clip": {"lower": 0}}])


def test_transform_table_is_complete():
    assert all(cls.name == name for name, cls in TRANSFORMS.items())
    assert len(TRANSFORMS) == 21


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_leaves_its_input_alone(name):
    args = {
        "hu_window": {"center": 40, "width": 400},
        "clip": {"lower": 90},
        "pad": {"shape": [20, 20, 20], "position": "random", "seed": 0},
        "crop": {"box": [[0, 8], [0, 16], [0, 16]]},
        "flip": {"axes": [0]},
        "histogram_match": {"reference": np.arange(100.0)},
        "rand_flip": {"axes": [0, 1, 2], "prob": 1.0},
        "rand_affine": {"prob": 1.0},
        "rand_intensity": {"prob": 1.0},
    }.get(name, {})
    image = make_3d()
    image = with_mask(image, image.array[0] > 100)
    before, mask = image.array.copy(), image.meta[FOREGROUND_KEY].copy()
    out = TRANSFORMS[name](**args)(image)
    np.testing.assert_array_equal(image.array, before)
    np.testing.assert_array_equal(image.meta[FOREGROUND_KEY], mask)
    assert out.array.dtype == np.float32 and out.array.ndim == 4
    assert out.meta[FOREGROUND_KEY].shape == out.spatial_shape
    masks_only = ("foreground_mask", "brain_mask", "head_ct_brain_mask")
    assert name in masks_only or not np.shares_memory(out.array, image.array)


def test_non_image_array_is_rejected():
    image = MedicalImage(np.zeros((4, 4), np.float32), (1.0,), source="flat.npy")
    with pytest.raises(InvalidImageError, match="flat.npy.*channel-first"):
        MinMax()(image)
