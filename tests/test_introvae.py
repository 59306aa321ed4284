"""IntroVAE (Kobayashi et al. 2020 eq. 4-7) and the latent representation search, on synthetic
phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medanomaly import BaseDetector, get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.latent_search import latent_search, reconstruction_error
from medanomaly.models.introvae import IntroVAENetwork, decoder_loss, encoder_loss

SMALL = {"channels": (4, 8, 8, 8), "hidden_dim": 16, "latent_dim": 4}


# -- eq. 6 and 7 on hand-checkable numbers ------------------------------------------------------
def test_encoder_loss_hinge_is_zero_above_the_margin():
    kl_real = torch.tensor([2.0, 4.0])
    kl_rec = torch.tensor([130.0, 100.0], requires_grad=True)  # above m: no hinge; below: 20
    kl_prior = torch.tensor([125.0, 119.0], requires_grad=True)  # hinge 0 and 1
    ae = torch.tensor([100.0, 200.0])
    loss = encoder_loss(kl_real, [kl_rec, kl_prior], ae, margin=120.0, alpha=0.5, beta=0.04)
    # mean KL 3 + 0.5 * (mean hinge 10 + mean hinge 0.5) + 0.04 * mean L_AE 150
    assert loss.item() == pytest.approx(3.0 + 0.5 * 10.5 + 6.0)
    loss.backward()
    assert kl_rec.grad.tolist() == [0.0, -0.25]  # an image above m gets no push
    assert kl_prior.grad.tolist() == [0.0, -0.25]
    far_above = [torch.tensor([500.0, 600.0])] * 2
    assert encoder_loss(kl_real, far_above, ae, 120.0, 0.5, 0.04).item() == pytest.approx(9.0)


def test_decoder_loss_sums_the_kl_of_both_generated_kinds():
    kl_rec, kl_prior = torch.tensor([130.0, 100.0]), torch.tensor([125.0, 119.0])
    loss = decoder_loss([kl_rec, kl_prior], torch.tensor([100.0, 200.0]), alpha=0.5, beta=0.04)
    assert loss.item() == pytest.approx(0.5 * (115.0 + 122.0) + 0.04 * 150.0)


# -- the training step: who gets which gradient --------------------------------------------------
def _grad_flags(network: IntroVAENetwork) -> tuple[bool, bool]:
    """(some encoder parameter has a non-zero gradient, same for the decoder)."""

    def has(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    return has(network.encoder_parameters()), has(network.decoder_parameters())


def test_optimisers_split_encoder_and_decoder_parameters():
    detector = get_model("introvae", **SMALL)
    network = detector.build_network((1, 16, 16))
    optimizers = detector.make_optimizers(network)
    groups = {
        k: {id(p) for g in o.param_groups for p in g["params"]} for k, o in optimizers.items()
    }
    assert groups["encoder"].isdisjoint(groups["decoder"])
    assert groups["encoder"] | groups["decoder"] == {id(p) for p in network.parameters()}
    assert optimizers["encoder"].param_groups[0]["lr"] == 1e-4  # Kobayashi et al. 2020
    assert optimizers["decoder"].param_groups[0]["lr"] == 5e-3


def test_step_detaches_generated_images_for_the_encoder_only():
    # beta = 0: the only path from the encoder loss to G would run through the generated
    # images, which eq. 6 detaches; eq. 7 must reach G through E(G(z)).
    torch.manual_seed(0)
    detector = get_model("introvae", beta=0.0, margin=1e6, **SMALL)
    network = detector.build_network((1, 16, 16)).train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    flags = []

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        flags.append(_grad_flags(network))

    x = torch.rand(4, 1, 16, 16)
    loss = detector.training_step(network, x, detector.make_optimizers(network), backward, 0)
    assert math.isfinite(loss.item())
    assert flags == [(True, False), (True, True)]
    changed = {k for k, v in network.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_introvae_trains_and_lowers_its_objective(dims, tiny2d, tiny3d):
    data = (tiny2d if dims == 2 else tiny3d).normal
    engine = {"epochs": 3, "batch_size": 4, "progress": False, "seed": 0, "patience": None}
    detector = get_model("introvae", spatial_dims=dims, engine=engine, **SMALL)
    torch.manual_seed(0)
    untrained = detector.build_network(data.images.shape[1:]).eval()
    detector.fit(data)
    for row in detector.history_:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    x = torch.from_numpy(data.images)
    with torch.no_grad():
        assert detector.loss(detector.network_, x) < detector.loss(untrained, x)
    assert np.isfinite(detector.score(data)).all()


def test_introvae_map_score_and_embedding(tiny2d):
    engine = {"epochs": 1, "batch_size": 8, "progress": False}
    detector = get_model("introvae", engine=engine, map_score={"smooth": 3}, **SMALL)
    result = detector.fit(tiny2d.normal).detect(tiny2d)
    assert detector.map_scale_ is not None and np.isfinite(result.scores).all()
    assert result.maps.shape == (len(tiny2d), 32, 32)
    assert detector.embed(tiny2d).shape == (len(tiny2d), SMALL["latent_dim"])


# -- latent representation search ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_vae():
    """A small VAE trained on 2D phantoms, and normal + abnormal test phantoms."""
    engine = {"epochs": 8, "batch_size": 16, "progress": False, "patience": None}
    detector = get_model(
        "vae",
        spatial_dims=2,
        channels=(8, 16, 32, 32),
        hidden_dim=64,
        kl_weight=0.05,
        engine=engine,
    )
    detector.fit(make_phantoms(96, 0, (32, 32), seed=1))
    return detector.network_.eval(), make_phantoms(6, 6, (32, 32), seed=2)


@pytest.mark.parametrize(
    ("loss", "optimizer"), [("l2", "adam"), ("l2+ssim", "adam"), ("l2", "sgd")]
)
def test_latent_search_lowers_the_error_of_normal_and_abnormal_images(trained_vae, loss, optimizer):
    # the seed's settings: 100 steps at learning rate 1e-3
    network, test = trained_vae
    x = torch.from_numpy(test.images)
    with torch.inference_mode():  # as in the scoring loop
        z0 = network.encode(x)[0]
        z = latent_search(network.decode, x, z0, 100, 1e-3, loss=loss, optimizer=optimizer)
        before = reconstruction_error(x, network.decode(z0), loss)
        after = reconstruction_error(x, network.decode(z), loss)
    assert not z.requires_grad and z.shape == z0.shape
    for label in (0, 1):
        group = test.labels == label
        assert (after[group] < before[group]).all(), (label, before[group], after[group])


def test_latent_search_leaves_the_network_unchanged(trained_vae):
    network, test = trained_vae
    network.zero_grad(set_to_none=True)  # training left its last gradients
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.from_numpy(test.images[:4])
    with torch.no_grad():
        z0 = network.encode(x)[0]
    z = latent_search(network.decode, x, z0, steps=20, lr=1e-2)
    assert not torch.equal(z, z0)
    assert all(p.grad is None for p in network.parameters())
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_latent_search_gives_each_image_its_own_latent(trained_vae):
    network, test = trained_vae
    x = torch.from_numpy(test.images[:4])
    with torch.no_grad():
        z0 = network.encode(x)[0]
    together = latent_search(network.decode, x, z0, steps=10, lr=1e-2)
    alone = latent_search(network.decode, x[2:3], z0[2:3], steps=10, lr=1e-2)
    torch.testing.assert_close(together[2:3], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"loss": "l1"}, "loss"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_latent_search_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        latent_search(lambda z: z, torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), **kwargs)
    with pytest.raises(ValueError, match="one z per image"):
        latent_search(lambda z: z, torch.zeros(2, 1, 4, 4), torch.zeros(3, 3))


@pytest.mark.parametrize("name", ["vae", "introvae"])
def test_latent_steps_survive_save_and_load(name, tiny2d, tmp_path):
    engine = {"epochs": 3, "batch_size": 4, "progress": False}
    params = {"spatial_dims": 2, "channels": (4, 8, 8, 8), "hidden_dim": 16, "latent_dim": 4}
    detector = get_model(name, latent_steps=5, latent_lr=1e-2, engine=engine, **params)
    detector.fit(tiny2d.normal)
    detector.save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    assert (loaded.latent_steps, loaded.latent_lr) == (5, 1e-2)
    scores = detector.score(tiny2d)
    np.testing.assert_allclose(loaded.score(tiny2d), scores, rtol=1e-5)
    loaded.latent_steps = 0
    assert not np.allclose(loaded.score(tiny2d), scores, rtol=1e-5)
