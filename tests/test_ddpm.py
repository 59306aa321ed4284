"""The diffusion detector (``ddpm``): noising, DDIM healing, patches, noise kinds and maps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medanomaly import BaseDetector, get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.noise import simplex_noise, unit_noise
from medanomaly.detectors.scoring import erode_mask
from medanomaly.errors import ConfigError
from medanomaly.models.ddpm import DiffusionDetector, ddim_levels, patch_grid

SMALL = {"channels": [8, 16, 16], "norm_groups": 4, "ddim_steps": 2}


@pytest.fixture(scope="module")
def fitted(tiny2d):
    """A small ddpm fitted once on the tiny 2D normals (tests change copies of it)."""
    engine = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}
    return get_model("ddpm", noise="simplex", **SMALL, engine=engine).fit(tiny2d.normal)


class Oracle(nn.Module):
    """A network that knows the clean image: it returns the exact noise of ``x_t`` or the image."""

    def __init__(self, clean: torch.Tensor, alphas: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.clean = clean
        self.alphas = alphas
        self.prediction = prediction
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, as a network has
        self.calls = 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.prediction == "sample":
            return self.clean
        alpha = self.alphas[timesteps + 1].view(-1, *([1] * (x.dim() - 1)))
        return (x - alpha.sqrt() * self.clean) / (1 - alpha).sqrt()


def _clean(shape=(3, 1, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def test_ddim_path_is_evenly_spaced_and_ends_clean():
    assert ddim_levels(250, 5) == [250, 200, 150, 100, 50, 0]
    assert ddim_levels(3, 10) == [3, 2, 1, 0]  # never more calls than levels
    assert ddim_levels(100, 1) == [100, 0]


@pytest.mark.parametrize(
    ("noise", "prediction"), [("gaussian", "epsilon"), ("simplex", "sample"), ("coarse", "epsilon")]
)
@pytest.mark.parametrize("patched", [False, True])
def test_an_exact_predictor_heals_every_image_exactly(noise, prediction, patched):
    """The DDIM update is right: with the true noise (or image) the path returns the image."""
    detector = DiffusionDetector(
        noise=noise, prediction=prediction, patched=patched, patch_size=6, ddim_steps=4
    )
    clean = _clean()
    oracle = Oracle(clean, detector.alphas_bar(clean.device), prediction)
    noise_field = detector.scoring_noise(clean, 0)
    everywhere = torch.ones_like(clean[:, 0], dtype=torch.bool)
    healed = detector.heal(oracle, clean, 400, noise_field, everywhere)
    torch.testing.assert_close(healed, clean, atol=1e-4, rtol=0)
    assert oracle.calls == 4 * (9 if patched else 1)  # a 3 x 3 grid of patches, 4 steps each


def test_partial_noising_mixes_in_the_schedule_share_of_noise():
    detector = DiffusionDetector()
    clean = _clean()
    noise = torch.randn_like(clean)
    alphas = detector.alphas_bar(clean.device)
    noised = detector.noised(clean, noise, torch.tensor([0, 250, 1000]))
    torch.testing.assert_close(noised[0], clean[0])
    expected = alphas[250].sqrt() * clean[1] + (1 - alphas[250]).sqrt() * noise[1]
    torch.testing.assert_close(noised[1], expected)
    assert alphas[1000] < 1e-3 < alphas[250] < alphas[1] < 1.0 == alphas[0]


def test_t0_zero_returns_the_input_and_low_t0_nearly_so(fitted, tiny2d):
    detector = copy.deepcopy(fitted).set_params(t0=0)
    result = detector.detect(tiny2d)
    np.testing.assert_array_equal(result.reconstructions, tiny2d.images)
    assert np.all(result.maps == 0) and np.all(result.scores == 0)
    detector.set_params(t0=1, ddim_steps=1)  # the smallest noise level (SD 0.01)
    healed = detector.detect(tiny2d).reconstructions
    assert 0 < np.abs(healed - tiny2d.images).mean() < 0.02


def test_patch_grid_covers_every_voxel_exactly_once():
    for spatial, sides in [((32, 32), (12, 12)), ((16, 16, 16), (6, 8, 16)), ((8, 8), (8, 8))]:
        masks = patch_grid(spatial, sides)
        coverage = torch.stack(masks).sum(dim=0)
        assert torch.equal(coverage, torch.ones_like(coverage))
    assert len(patch_grid((32, 32), (12, 12))) == 9


def test_patched_maps_stitch_one_patch_per_foreground_voxel_and_skip_the_background():
    detector = DiffusionDetector(patched=True, patch_size=8, ddim_steps=1)
    clean = torch.zeros(2, 1, 16, 16)
    clean[:, :, 2:10, 2:6] = 1.0  # foreground in two of the four patches
    calls = []

    def fake_denoise(network, clean, level, noise, inside=None):
        calls.append(inside)
        return clean + len(calls)  # patch k heals to clean + k

    detector.denoise = fake_denoise
    foreground = clean[:, 0] > 0.5
    healed = detector.heal(None, clean, 100, torch.zeros_like(clean), foreground)
    assert len(calls) == 2  # background-only patches are not healed
    stitched = (healed - clean)[:, 0]
    for k, inside in enumerate(calls, start=1):
        assert torch.all(stitched[:, inside[0, 0]] == k)  # each voxel from its own patch only
    outside = ~(calls[0] | calls[1])[0, 0]
    assert torch.all(stitched[:, outside] == 0)
    assert torch.all(stitched[foreground] > 0)


def test_simplex_noise_is_smooth_standardised_and_reproducible():
    like = torch.zeros(4, 1, 64, 64)
    first = unit_noise("simplex", like, generator=torch.Generator().manual_seed(3))
    again = unit_noise("simplex", like, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    flat = first.flatten(1)
    torch.testing.assert_close(flat.std(dim=1), torch.ones(4), atol=1e-4, rtol=0)
    assert (flat[0] - flat[1]).abs().mean() > 0.5  # each image reads its own region
    white = unit_noise("gaussian", like, generator=torch.Generator().manual_seed(3))
    step = (first[..., 1:] - first[..., :-1]).abs().mean()
    assert step < 0.7 * (white[..., 1:] - white[..., :-1]).abs().mean()
    volume = simplex_noise((2, 1, 8, 12, 16), grid=2, octaves=2)
    assert volume.shape == (2, 1, 8, 12, 16) and volume.std() > 0


def test_simplex_octave_has_about_the_asked_cycles_per_side():
    """The power-weighted mean frequency of one octave lies near ``grid`` cycles per side."""
    for grid in (2, 4, 8, 16):
        field = simplex_noise((8, 1, 64, 64), grid, 1, generator=torch.Generator().manual_seed(0))
        power = torch.fft.rfft(field[:, 0], dim=-1).abs().pow(2).mean(dim=(0, 1))[1:]
        cycles = torch.arange(1, len(power) + 1)
        assert 0.5 * grid < float((power * cycles).sum() / power.sum()) < 1.5 * grid


def test_scores_are_reproducible_whatever_the_batching(fitted, tiny2d):
    whole = fitted.score(tiny2d)
    one_by_one = np.concatenate([fitted.score(tiny2d.images[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(one_by_one, whole[:3], rtol=1e-5)


def test_rescoring_with_other_levels_keeps_the_network(fitted, tiny2d, tmp_path):
    images = tiny2d.images[:6]
    before = fitted.score(images)
    fitted.save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    loaded.set_params(t0=[100, 400], noise_draws=2, score_reduce="mean")
    after = loaded.score(images)
    assert not np.allclose(after, before)
    detector = copy.deepcopy(fitted).set_params(t0=[100, 400], noise_draws=2, score_reduce="mean")
    np.testing.assert_allclose(detector.score(images), after, rtol=1e-5)


@pytest.mark.parametrize(("patched", "prediction"), [(False, "epsilon"), (True, "sample")])
def test_validation_loss_draws_the_same_levels_and_noise_every_time(tiny2d, patched, prediction):
    # (MONAI zero-initialises the last layer: an untrained "sample" loss differs by patch only)
    detector = DiffusionDetector(**SMALL, patched=patched, prediction=prediction, loss_norm="l1")
    network = detector.build_network((1, 32, 32))
    batch = torch.from_numpy(tiny2d.images[:4])
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(detector.loss(network, batch), detector.loss(network, batch))
    network.train()
    assert not torch.equal(detector.loss(network, batch), detector.loss(network, batch))


def test_bf16_autocast_keeps_losses_maps_and_scores_in_float32(tiny2d):
    detector = DiffusionDetector(**SMALL)
    network = detector.build_network((1, 32, 32))
    batch = torch.from_numpy(tiny2d.images[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = detector.loss(network, batch)
        loss.backward()
        with torch.no_grad():
            scores, maps, healed = detector.evaluate(network.eval(), batch)
    assert loss.dtype == scores.dtype == maps.dtype == healed.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(maps).all()


def test_images_off_the_network_grid_are_padded_and_cropped(fitted, tiny2d):
    odd = tiny2d.images[:2, :, :30, :27]
    result = fitted.detect(odd)
    assert result.maps.shape == (2, 30, 27) and np.isfinite(result.scores).all()


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="Did you mean 'simplex'"):
        DiffusionDetector(noise="simplx").build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="t0 must lie"):
        DiffusionDetector(t0=[100, 2000]).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="divisible by norm_groups"):
        DiffusionDetector(channels=[12, 16], norm_groups=8).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="attention_levels"):
        DiffusionDetector(attention_levels=[True]).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="ddim_steps"):
        DiffusionDetector(ddim_steps=0).build_network((1, 32, 32))
    with pytest.raises(ConfigError, match="prediction"):
        DiffusionDetector(prediction="x0").build_network((1, 32, 32))


@pytest.mark.slow
def test_planted_lesions_light_up_the_map():
    """The map is higher inside planted lesions than in the rest of the foreground.

    Phantoms at 32², 48 normal training images, 15 epochs (about 90 steps), levels up to 400,
    healing from t0 = 250. Ratio of the mean map inside each lesion to the mean over the rest
    of the eroded foreground, for the bright lesions and enlarged ventricles of 6 abnormal
    phantoms, measured for training seeds 0, 1 and 2: 1.64 to 3.21 (median 2.6). Dark lesions
    (intensity 0.02-0.08) are left out: they fall below the foreground threshold, where the
    map is zero by construction. The test asserts 1.3 for every lesion of seed 0.
    """
    train = make_phantoms(48, 0, (32, 32), seed=0)
    test = make_phantoms(0, 6, (32, 32), seed=100)
    engine = {"epochs": 15, "batch_size": 8, "lr": 2e-3, "patience": None, "progress": False}
    detector = get_model(
        "ddpm",
        channels=[8, 16, 32, 32],
        foreground_threshold=0.01,
        train_t_max=400,
        engine=engine,
    ).fit(train)
    maps = detector.anomaly_map(test)
    core = erode_mask(torch.from_numpy(test.images[:, 0] > 0.01), 2).numpy()
    for index in (0, 2, 3, 5):  # bright, enlarged, bright, enlarged
        lesion, inside = test.masks[index] & core[index], core[index] & ~test.masks[index]
        assert maps[index][lesion].mean() > 1.3 * maps[index][inside].mean()
