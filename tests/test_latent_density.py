import numpy as np
import pytest

from medanomaly import BaseDetector, get_model
from medanomaly.errors import ConfigError

ENCODER = {"name": "cae", "channels": [8, 16], "latent_channels": 2}


@pytest.fixture(scope="module")
def fitted(tiny2d):
    engine = {"epochs": 3, "batch_size": 8, "progress": False, "seed": 0}
    detector = get_model("latent_density", encoder=ENCODER, combine="sum", engine=engine)
    return detector.fit(tiny2d.normal, val=tiny2d.normal)


def test_scores_are_the_mahalanobis_distance_of_the_latent_plus_the_encoder(fitted, tiny2d):
    latents = fitted.encoder_.embed(tiny2d.normal)
    centred = latents - latents.mean(axis=0)
    np.testing.assert_allclose(fitted.latent_mean_, latents.mean(axis=0), rtol=1e-6)
    distance = np.sqrt(np.einsum("ij,jk,ik->i", centred, fitted.latent_precision_, centred))
    np.testing.assert_allclose(fitted.latent_scores(latents), distance, rtol=1e-6)
    own = fitted.encoder_.score(tiny2d.normal)
    expected = (distance - distance.mean()) / distance.std(ddof=1)
    expected += (own - own.mean()) / own.std(ddof=1)
    np.testing.assert_allclose(fitted.score(tiny2d.normal), expected, rtol=1e-5, atol=1e-8)


def test_an_image_unlike_every_normal_scores_higher(fitted, tiny2d):
    odd = np.full((1, *tiny2d.images.shape[1:]), 1.0, np.float32)  # a white square
    assert fitted.score(odd)[0] > fitted.score(tiny2d.normal).max()
    result = fitted.detect(tiny2d)
    assert result.maps.shape == (len(tiny2d), 32, 32)  # the encoder's maps
    assert result.reconstructions is not None


def test_mixture_density_round_trip(tiny2d, tmp_path):
    engine = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}
    detector = get_model(
        "latent_density", encoder=ENCODER, density="gmm", components=2, engine=engine
    ).fit(tiny2d.normal, val=tiny2d.normal, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "encoder_cae" / "model.safetensors").exists()
    loaded = BaseDetector.load(tmp_path / "run")
    np.testing.assert_allclose(loaded.score(tiny2d), detector.score(tiny2d), rtol=1e-6)


def test_bad_settings_are_named(tiny2d):
    engine = {"epochs": 1, "batch_size": 8, "progress": False}
    with pytest.raises(ConfigError, match="no latent vector"):
        get_model("latent_density", encoder={"name": "dae"}, engine=engine).fit(tiny2d.normal)
    with pytest.raises(ConfigError, match="density.*Did you mean 'gaussian'"):
        get_model("latent_density", density="gausian").fit(tiny2d.normal)


def test_a_trained_encoder_is_reused_and_the_combination_recalibrated(fitted, tiny2d, tmp_path):
    fitted.encoder_.save(tmp_path / "model.safetensors")
    reused = get_model("latent_density", encoder_run=str(tmp_path), combine="latent")
    reused.fit(tiny2d.normal, val=tiny2d.normal)
    np.testing.assert_allclose(reused.latent_mean_, fitted.latent_mean_, rtol=1e-6)
    reused.combine = "sum"
    reused.calibrate(tiny2d.normal)
    np.testing.assert_allclose(reused.score(tiny2d), fitted.score(tiny2d), rtol=1e-5, atol=1e-8)
