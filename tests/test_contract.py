"""One contract, every registered detector, in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest

from medanomaly import BaseDetector, get_model, list_models
from medanomaly.errors import ConfigError, InvalidImageError, NotFittedError

CASES = [(name, dims) for name in list_models() for dims in (2, 3)]


def _data(request, dims):
    return request.getfixturevalue("tiny2d" if dims == 2 else "tiny3d")


ENGINE = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}


def _train(detector, data):
    """Normals only, or the labelled set for a supervised detector (a classifier)."""
    return data if detector.supervised else data.normal


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def fitted(request):
    """Each registered model fitted once per module, in 2D and 3D."""
    name, dims = request.param
    data = _data(request, dims)
    detector = get_model(name, spatial_dims=dims, engine=ENGINE)
    returned = detector.fit(_train(detector, data))
    return name, dims, detector, returned, data


def test_fit_returns_self(fitted):
    _, _, detector, returned, _ = fitted
    assert returned is detector
    assert np.isfinite(detector.threshold_)


def test_outputs_have_the_documented_shapes(fitted):
    _, _, detector, _, data = fitted
    result = detector.detect(data)
    n, spatial = len(data), data.images.shape[2:]
    assert detector.score(data).shape == (n,)
    assert detector.anomaly_map(data).shape == (n, *spatial)
    assert set(np.unique(detector.predict(data))) <= {0, 1}
    assert result.maps.shape == (n, *spatial)
    assert np.isfinite(result.scores).all()
    np.testing.assert_allclose(result.scores, detector.score(data), rtol=1e-5)


def test_same_seed_gives_same_scores(fitted):
    name, dims, detector, _, data = fitted
    again = get_model(name, spatial_dims=dims, engine=ENGINE)
    again.fit(_train(again, data))
    np.testing.assert_allclose(again.score(data), detector.score(data), rtol=1e-5)


def test_fit_on_a_streamed_set_gives_the_same_scores(fitted, to_streamed):
    """A set read lazily from the cache trains and scores like the same set in memory."""
    name, dims, detector, _, data = fitted
    again = get_model(name, spatial_dims=dims, engine=ENGINE)
    again.fit(to_streamed(_train(again, data)))
    streamed = to_streamed(data)
    np.testing.assert_allclose(again.score(streamed), detector.score(data), rtol=1e-5)
    np.testing.assert_allclose(
        again.detect(streamed).maps, detector.detect(data).maps, rtol=1e-4, atol=1e-6
    )
    assert again.threshold_ == pytest.approx(detector.threshold_, rel=1e-5)


def test_save_and_load_round_trip(fitted, tmp_path):
    _, _, detector, _, data = fitted
    detector.save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    assert type(loaded) is type(detector)
    assert loaded.threshold_ == detector.threshold_
    np.testing.assert_allclose(loaded.score(data), detector.score(data), rtol=1e-5)


def test_bad_input_is_named(fitted):
    _, dims, detector, _, data = fitted
    images = data.images[:2].copy()
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        detector.score(images)
    wrong_size = np.zeros((1, 1, *([32 if dims == 3 else 16] * dims)), np.float32)
    if detector.scores_any_size:  # declared by the class: any size is scored
        assert np.isfinite(detector.score(wrong_size)).all()
    else:
        with pytest.raises(InvalidImageError, match="training shape"):
            detector.score(wrong_size)
    with pytest.raises(InvalidImageError, match="expected an array"):
        detector.score(np.zeros((2, 2), np.float32))


CAPABILITIES = ("baseline", "supervised", "has_latent", "scores_any_size", "streams")


def test_fitted_state_is_there_after_fit_and_after_load(fitted, tmp_path):
    _, _, detector, _, data = fitted
    detector.save(tmp_path / "model.safetensors")
    for each in (detector, BaseDetector.load(tmp_path / "model.safetensors")):
        assert isinstance(each.val_scores_, np.ndarray) and each.val_scores_.ndim == 1
        assert isinstance(each.history_, list)
        assert isinstance(each.run_config_, dict) and each.run_config_["model"]["name"]
        assert all(isinstance(getattr(each, name), bool) for name in CAPABILITIES)
    if not detector.supervised:
        assert len(detector.val_scores_) > 0
        normals = detector.val_scores_
        spread = normals.std(ddof=1) if len(normals) > 1 else 0.0
        assert detector.threshold_ == pytest.approx(normals.mean() + detector.threshold_sd * spread)
    trains = not detector.baseline
    assert bool(detector.history_) == trains, "a network's epochs are in history_"


def test_declared_latent_gives_one_vector_per_image(fitted):
    _, _, detector, _, data = fitted
    if detector.has_latent:
        vectors = detector.embed(data)
        assert vectors.shape[0] == len(data) and vectors.shape[1] > 0
        assert np.isfinite(vectors).all()
    else:
        with pytest.raises(NotImplementedError, match="no latent"):
            detector.embed(data)


def test_clone_is_unfitted_with_equal_params_and_set_params_checks_names(fitted):
    name, dims, detector, _, data = fitted
    twin = detector.clone()
    assert type(twin) is type(detector) and twin is not detector
    assert repr(twin.get_params()) == repr(detector.get_params())
    with pytest.raises(NotFittedError):
        twin.score(data)
    assert twin.set_params(spatial_dims=dims) is twin
    with pytest.raises(ConfigError, match="Did you mean 'spatial_dims'"):
        twin.set_params(spatial_dim=2)


@pytest.mark.parametrize("name", list_models())
def test_predict_before_fit_raises(name):
    detector = get_model(name)
    with pytest.raises(NotFittedError, match="not fitted"):
        detector.predict(np.zeros((1, 1, 16, 16, 16), np.float32))
