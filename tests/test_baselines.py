import numpy as np
import pytest

from medanomaly import BaseDetector, get_model
from medanomaly.data.phantoms import _ellipsoid, _grid, make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.errors import ConfigError


@pytest.fixture(scope="module")
def phantoms():
    return make_phantoms(16, 6, (32, 32), seed=2)


def test_bright_planted_lesion_scores_higher_under_intensity(phantoms):
    # per voxel: the bright skull is normal where it is (a global scale would flag it)
    detector = get_model("intensity", foreground_threshold=0.05, per_voxel=True)
    detector.fit(phantoms.normal)
    result = detector.detect(phantoms)
    bright = np.array(["bright" in name for name in phantoms.ids])
    normal = phantoms.labels == 0
    assert result.scores[bright].min() > result.scores[normal].max()
    for image_map, lesion in zip(result.maps[bright], phantoms.masks[bright], strict=True):
        peak = np.unravel_index(image_map.argmax(), image_map.shape)
        assert lesion[peak]
    # the dark lesions are found by the other direction
    dark = np.array(["dark" in name for name in phantoms.ids])
    low = get_model("intensity", direction="low", foreground_threshold=0.05, per_voxel=True)
    low_scores = low.fit(phantoms.normal).score(phantoms)
    assert low_scores[dark].mean() > low_scores[normal].max()


def test_intensity_statistics_are_those_of_the_normal_foreground():
    images = np.zeros((4, 2, 8, 8), np.float32)
    images[:, 0, 2:6, 2:6] = [[[1.0]], [[2.0]], [[3.0]], [[4.0]]]
    images[:, 1, 2:6, 2:6] = 10.0
    detector = get_model("intensity", in_channels=2, foreground_threshold=0.5)
    detector.fit(images, val=images)
    np.testing.assert_allclose(detector.mean_, [2.5, 10.0])
    np.testing.assert_allclose(detector.sd_[0], np.std([1, 2, 3, 4]), rtol=1e-5)
    per_voxel = get_model("intensity", in_channels=2, foreground_threshold=0.5, per_voxel=True)
    per_voxel.fit(images, val=images)
    assert per_voxel.mean_.shape == (2, 8, 8)
    assert per_voxel.mean_[0, 3, 3] == pytest.approx(2.5)
    assert per_voxel.mean_[0, 0, 0] == pytest.approx(2.5)  # never foreground: global mean


def _blob_volumes(radii: list[float]) -> np.ndarray:
    grid = _grid((16, 16, 16))
    shapes = [_ellipsoid(grid, (0.0, 0.0, 0.0), (r, r * 0.8, r * 1.1)) for r in radii]
    return np.stack(shapes)[:, None].astype(np.float32)


def test_enlarged_structure_scores_higher_under_volume(tmp_path):
    rng = np.random.default_rng(0)
    normal = _blob_volumes(list(rng.uniform(0.45, 0.55, 20)))
    enlarged = _blob_volumes([0.7, 0.75])
    shrunk = _blob_volumes([0.3])
    detector = get_model("volume", direction="high").fit(normal)
    assert detector.score(enlarged).min() > detector.score(normal).max()
    assert detector.predict(enlarged).tolist() == [1, 1]
    maps = detector.anomaly_map(enlarged)
    shell = enlarged[0, 0].astype(bool) & (detector.occupancy_ == 0)
    assert shell.any() and maps[0][shell].min() == 1.0  # tissue where no normal has any
    both = get_model("volume", direction="both").fit(normal)
    assert both.score(shrunk)[0] > both.score(normal).max()
    detector.save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    np.testing.assert_allclose(loaded.score(enlarged), detector.score(enlarged))


def test_baselines_take_their_threshold_from_held_out_normals(phantoms):
    detector = get_model("intensity", engine={"val_fraction": 0.25, "seed": 1})
    detector.fit(phantoms.normal)
    assert len(detector.val_scores_) == 4
    val = ImageSet(phantoms.images[:5], np.zeros(5, np.int64))
    detector.fit(phantoms.normal, val=val)
    assert len(detector.val_scores_) == 5


def test_bad_settings_are_named(phantoms):
    with pytest.raises(ConfigError, match="direction.*Did you mean 'high'"):
        get_model("intensity", direction="hgh").fit(phantoms.normal)
    with pytest.raises(ConfigError, match="score_reduce"):
        get_model("intensity", score_reduce="medain").fit(phantoms.normal)


@pytest.mark.parametrize(
    ("name", "params"),
    [("intensity", {"per_voxel": True, "foreground_threshold": 0.05}), ("volume", {})],
)
def test_baselines_read_a_streamed_set_in_chunks_never_whole(
    phantoms, to_streamed, monkeypatch, name, params
):
    from medanomaly.data.streaming import StreamedSet
    from medanomaly.models import baselines

    in_memory = get_model(name, spatial_dims=2, **params).fit(phantoms.normal)
    streamed = to_streamed(phantoms)

    def whole(self):
        raise AssertionError("the whole streamed set was read into memory")

    monkeypatch.setattr(StreamedSet, "to_image_set", whole)
    monkeypatch.setattr(baselines, "BATCH_VOXELS", 3 * 32 * 32)  # chunks of three images
    fitted = get_model(name, spatial_dims=2, **params).fit(streamed.normal)
    for key, value in in_memory.statistics().items():
        np.testing.assert_allclose(fitted.statistics()[key], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.score(streamed), in_memory.score(phantoms), rtol=1e-5)
    assert fitted.threshold_ == pytest.approx(in_memory.threshold_)


def test_baselines_refuse_training_images_of_different_shapes(tmp_path):
    from medanomaly.data.cache import PreprocessCache, Preprocessed
    from medanomaly.data.streaming import StreamedSet
    from medanomaly.errors import InvalidImageError

    store = PreprocessCache(tmp_path)
    shapes = [(32, 32), (32, 32), (32, 48), (32, 48)]
    images = [make_phantoms(1, 0, shape, seed=i).images[0] for i, shape in enumerate(shapes)]
    entries = [store.save(f"case{i}", Preprocessed(image)) for i, image in enumerate(images)]
    mixed = StreamedSet(store, entries, labels=np.zeros(4, np.int64))
    with pytest.raises(InvalidImageError, match="one grid"):
        get_model("intensity", engine={"val_fraction": 0.0}).fit(mixed, val=mixed)
