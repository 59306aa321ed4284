"""Variational autoencoder detector (Chung & Choi 2023: Chung & Choi 2023, 3D orbit CT)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.latent_search import latent_search, unwrap
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import gaussian_kl, per_image_sum, residual_map
from medanomaly.nets import VariationalAutoencoder
from medanomaly.training.engine import EngineConfig


@register("vae")
class VAE(DeepDetector):
    """VAE trained with sum of squared errors + KL divergence; score = that total loss.

    At scoring time the latent mean is decoded (no sampling), so scores are deterministic.
    The map is the squared difference between input and reconstruction. With
    ``latent_steps > 0`` the latent mean is first refined by a latent representation search
    (Kobayashi et al. 2020; :func:`~medanomaly.detectors.latent_search.latent_search`, Adam on the
    sum of squared
    errors, network frozen) and the searched ``z`` is decoded; the KL term of the score is
    then that of N(z, sigma^2) with the encoder's sigma.

    Args:
        spatial_dims: 2 or 3 (Chung & Choi 2023 is 3D at 64^3).
        in_channels: Image channels.
        channels: Channels of the four encoder modules.
        hidden_dim: Width of the fully connected layer before the latent.
        latent_dim: Latent size (Chung & Choi 2023: 8).
        dropout: Dropout of each encoder module (Chung & Choi 2023: 0.19, 0.19, 0.2, 0.23).
        negative_slope: Decoder LeakyReLU slope (Chung & Choi 2023: 0.6).
        output_activation: ``sigmoid`` ([0, 1] inputs), ``tanh`` ([-1, 1]) or ``none``.
        kl_weight: Weight of the KL term (Chung & Choi 2023: 1).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the model's own
            score.
        latent_steps: Steps of latent representation search before decoding at scoring
            (and validation) time; 0 turns it off (Kobayashi et al. 2020 uses 100).
        latent_lr: Learning rate of that search (Kobayashi et al. 2020: 1e-3).
    """

    @property
    def exportable(self) -> bool:  # type: ignore[override]
        """Without a latent search: the search is an optimisation per image, not a graph."""
        return not self.latent_steps

    export_refusal = "its latent representation search (latent_steps) optimises each image"

    has_latent = True

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_dim: int = 256,
        latent_dim: int = 8,
        dropout: float | Sequence[float] = (0.19, 0.19, 0.2, 0.23),
        negative_slope: float = 0.6,
        output_activation: str = "sigmoid",
        kl_weight: float = 1.0,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
        latent_steps: int = 0,
        latent_lr: float = 1e-3,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.channels = channels
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.output_activation = output_activation
        self.kl_weight = kl_weight
        self.latent_steps = latent_steps
        self.latent_lr = latent_lr

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Build the VAE for images of ``input_shape``."""
        return VariationalAutoencoder(
            self.spatial_dims,
            input_shape[1:],
            input_shape[0],
            tuple(self.channels),
            self.hidden_dim,
            self.latent_dim,
            self.dropout,
            self.negative_slope,
            self.output_activation,
        )

    def _total_loss(self, network: nn.Module, x: torch.Tensor):
        reconstruction, mu, logvar = network(x)
        maps = residual_map(x, reconstruction, "squared")
        total = per_image_sum(maps) + self.kl_weight * gaussian_kl(mu.float(), logvar.float())
        return total, maps, reconstruction

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of (sum of squared errors + KL) per image."""
        return self._total_loss(network, x)[0].mean()

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total loss per image, squared-difference maps and reconstructions.

        With ``latent_steps`` the reconstruction is decoded from the searched latent.
        """
        if not self.latent_steps:
            return self._total_loss(network, x)
        net = unwrap(network)
        mu, logvar = net.encode(x)
        z = latent_search(net.decode, x, mu, self.latent_steps, self.latent_lr, "l2")
        reconstruction = net.decode(z)
        maps = residual_map(x, reconstruction, "squared")
        total = per_image_sum(maps) + self.kl_weight * gaussian_kl(z.float(), logvar.float())
        return total, maps, reconstruction

    def latent(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The latent mean of each image."""
        return network.encode(x)[0]
