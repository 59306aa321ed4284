"""The Hjohlman 2022 ResNet autoencoder: masked MSE, patch training, sliding-window scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medanomaly import get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.errors import ConfigError
from medanomaly.models.resnet_ae import window_scores, window_slices, window_starts
from medanomaly.nets import ResNetAutoencoder

ENGINE = {"epochs": 2, "batch_size": 4, "progress": False, "seed": 0}
SMALL = {"depth": 10, "channels": [4, 8, 8, 16], "latent_dim": 32}


@pytest.fixture(scope="module")
def volumes32():
    """6 normal + 2 abnormal 1x32^3 phantoms."""
    return make_phantoms(6, 2, (32, 32, 32), seed=3)


@pytest.fixture(scope="module")
def patch_model(volumes32):
    """A ResNet AE trained on random 16^3 patches of 32^3 volumes."""
    detector = get_model(
        "resnet_ae", patch_size=[16, 16, 16], patch_overlap=0.0, engine=ENGINE, **SMALL
    )
    return detector.fit(volumes32.normal)


@pytest.mark.parametrize("depth", [10, 18, 34])
def test_network_depths_give_a_1024_latent_and_the_input_grid(depth):
    network = ResNetAutoencoder(3, (16, 16, 32), 1, depth, (4, 8, 8, 16), 1024).eval()
    x = torch.rand(2, 1, 16, 16, 32)
    assert network.encode(x).shape == (2, 1024)
    assert network(x).shape == x.shape


def test_bad_depth_and_patch_are_named():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetAutoencoder(3, (16, 16, 16), 1, depth=50)
    data = make_phantoms(4, 0, (32, 32, 32), seed=0)
    with pytest.raises(ConfigError, match="divisible by 16"):
        get_model("resnet_ae", patch_size=[20, 20, 20], engine=ENGINE, **SMALL).fit(data)
    with pytest.raises(ConfigError, match="needs a patch_size"):
        get_model("resnet_ae", patch_reduce="max", engine=ENGINE, **SMALL).fit(data)


def test_masked_score_counts_only_foreground_voxels(tiny3d):
    detector = get_model("resnet_ae", foreground_threshold=0.05, engine=ENGINE, **SMALL)
    detector.fit(tiny3d.normal)
    result = detector.detect(tiny3d)
    inside = tiny3d.images[:, 0] > 0.05
    residual = ((tiny3d.images - result.reconstructions) ** 2)[:, 0]
    expected = [r[m].mean() for r, m in zip(residual, inside, strict=True)]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)
    assert np.all(result.maps[~inside] == 0)


def test_patch_model_scores_volumes_of_any_size(patch_model, volumes32):
    assert patch_model.input_shape_ == (1, 32, 32, 32)
    for side in (32, 48):
        volumes = np.random.default_rng(0).random((2, 1, side, side, 16), dtype=np.float32)
        result = patch_model.detect(volumes)
        assert result.maps.shape == (2, side, side, 16)
        assert result.reconstructions.shape == volumes.shape
        assert np.isfinite(result.scores).all()
    assert patch_model.embed(volumes32).shape == (len(volumes32), 32)


def test_sliding_window_equals_whole_volume_where_both_fit(patch_model):
    """A volume the size of the patch: one window, the same as the network on the volume."""
    network = patch_model.network_
    x = torch.from_numpy(make_phantoms(3, 0, (16, 16, 16), seed=5).images)
    with torch.inference_mode():
        whole = network(x)
        sliding = sliding_window_inference(x, (16, 16, 16), 2, network, overlap=0.5)
        np.testing.assert_allclose(sliding.numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(patch_model.reconstruct(network, x).numpy(), whole.numpy())


def test_sliding_window_without_overlap_tiles_the_volume(patch_model, volumes32):
    network = patch_model.network_
    x = torch.from_numpy(volumes32.images[:2])
    with torch.inference_mode():
        stitched = patch_model.reconstruct(network, x)
        for window in window_slices(x.shape[2:], (16, 16, 16), 0.0):
            index = (slice(None), slice(None), *window)
            np.testing.assert_allclose(
                stitched[index].numpy(), network(x[index]).numpy(), rtol=1e-4, atol=1e-5
            )


def test_max_over_windows_finds_a_local_lesion():
    maps = torch.zeros(1, 32, 32, 32)
    maps[0, 2:6, 2:6, 2:6] = 1.0
    inside = torch.ones_like(maps, dtype=torch.bool)
    mean = window_scores(maps, inside, None, 0.0)
    largest = window_scores(maps, inside, (16, 16, 16), 0.0)
    assert largest.item() == pytest.approx(8 * mean.item())
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert window_starts(16, 16, 0.5) == [0]


def test_embed_only_where_the_model_declares_a_latent(tiny2d):
    detector = get_model("ssae", spatial_dims=2, engine=ENGINE).fit(tiny2d.normal)
    assert not detector.has_latent
    with pytest.raises(NotImplementedError, match="no latent space"):
        detector.embed(tiny2d)
    vae = get_model("vae", spatial_dims=2, engine=ENGINE).fit(tiny2d.normal)
    assert vae.embed(tiny2d).shape == (len(tiny2d), vae.latent_dim)
