"""CAE and VAE: architecture as the seeds describe it, and detection on phantoms."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medanomaly import get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.nets import ConvAutoencoder, VariationalAutoencoder


def test_vae_follows_seed_000():
    net = VariationalAutoencoder(spatial_dims=3, spatial_size=(64, 64, 64))
    convs = [m for m in net.encoder if isinstance(m, nn.Conv3d)]
    drops = [m.p for m in net.encoder if isinstance(m, nn.Dropout3d)]
    pools = [m for m in net.encoder if isinstance(m, nn.MaxPool3d)]
    assert len(convs) == len(pools) == 4
    assert drops == [0.19, 0.19, 0.2, 0.23]
    assert net.fc_stats.out_features == 2 * 8
    transposed = [m for m in net.decoder if isinstance(m, nn.ConvTranspose3d)]
    slopes = {m.negative_slope for m in net.decoder if isinstance(m, nn.LeakyReLU)}
    assert len(transposed) == 3 and slopes == {0.6}
    assert isinstance(net.decoder[-3], nn.Upsample)
    reconstruction, mu, logvar = net.eval()(torch.rand(1, 1, 64, 64, 64))
    assert reconstruction.shape == (1, 1, 64, 64, 64) and mu.shape == (1, 8)


@pytest.mark.parametrize("dims", [2, 3])
def test_cae_blocks_follow_seed_003(dims):
    net = ConvAutoencoder(spatial_dims=dims, channels=(8, 16))
    kinds = [type(m).__name__ for m in net.encoder]
    assert kinds[:4] == [f"Conv{dims}d", f"BatchNorm{dims}d", "LeakyReLU", f"Dropout{dims}d"]
    decoder_kinds = [type(m).__name__ for m in net.decoder]
    assert decoder_kinds[1:5] == [
        f"ConvTranspose{dims}d",
        f"BatchNorm{dims}d",
        "LeakyReLU",
        f"Dropout{dims}d",
    ]
    x = torch.rand(2, 1, *([16] * dims))
    assert net(x).shape == x.shape


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (32, 32, 32)])
def test_any_size_divisible_by_16(size):
    x = torch.rand(1, 1, *size)
    assert ConvAutoencoder(len(size))(x).shape == x.shape
    assert VariationalAutoencoder(len(size), size)(x)[0].shape == x.shape


def _auroc(name, shape, n_train, epochs, lr=2e-3, **params):
    train = make_phantoms(n_train, 0, shape, seed=1)
    test = make_phantoms(30, 30, shape, seed=2)
    engine = {"epochs": epochs, "batch_size": 16, "lr": lr, "patience": None, "progress": False}
    detector = get_model(name, spatial_dims=len(shape), engine=engine, **params).fit(train)
    return roc_auc_score(test.labels, detector.score(test))


def test_cae_2d_detects_phantom_lesions():
    assert _auroc("cae", (32, 32), 200, 30, channels=(16, 32, 64, 128), latent_channels=8) > 0.9


def test_cae_3d_detects_phantom_lesions():
    assert _auroc("cae", (16, 16, 16), 300, 40, channels=(16, 32, 64), latent_channels=4) > 0.9


def test_vae_2d_detects_phantom_lesions():
    # At 32x32 the sum of squared errors is small next to the KL term; a lower KL weight
    # keeps the posterior from collapsing (Chung & Choi 2023 trains at 64^3 with weight 1).
    assert _auroc("vae", (32, 32), 400, 30, lr=1e-3, kl_weight=0.05) > 0.9


def test_vae_3d_separates_phantoms():
    # A 16^3 volume leaves the VAE's 1^3 bottleneck little room: it separates clearly but
    # less sharply than the CAE; the 64^3 benchmark of Chung & Choi 2023 lives in benchmarks/.
    assert _auroc("vae", (16, 16, 16), 200, 30, lr=1e-3, kl_weight=0.01) > 0.7
