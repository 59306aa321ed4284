"""Convolutional autoencoder detector (the UAD slide deck)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.noise import coarse_noise
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import per_image_mean, residual_map
from medanomaly.nets import ConvAutoencoder
from medanomaly.training.engine import EngineConfig


@register("cae")
class CAE(DeepDetector):
    """Convolutional autoencoder trained on normal images with mean squared error.

    Score: mean residual per image; map: the residual (squared or absolute difference).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Encoder feature channels; each block halves the grid.
        latent_channels: Channels of the 1x1 bottleneck.
        dropout: Dropout after each block.
        negative_slope: LeakyReLU slope.
        output_activation: ``sigmoid`` ([0, 1] inputs), ``tanh`` ([-1, 1]) or ``none``.
        residual: ``squared``, ``abs`` or ``ssim`` (1 - SSIM) for maps and scores.
        noise_std: Denoising training: SD of coarse Gaussian noise added to the inputs (the
            target stays clean); 0 trains a plain autoencoder.
        noise_grid: Lattice of that noise per side (16: blobs about 1/16 of the image).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the model's own
            score.
    """

    exportable = True

    has_latent = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        dropout: float = 0.1,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
        residual: str = "squared",
        noise_std: float = 0.0,
        noise_grid: int = 16,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.channels = channels
        self.latent_channels = latent_channels
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.output_activation = output_activation
        self.residual = residual
        self.noise_std = noise_std
        self.noise_grid = noise_grid

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        """Sides must be divisible by 2 ** number of blocks."""
        return 2 ** len(self.channels)

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Build the autoencoder (fully convolutional, so only channels matter)."""
        return ConvAutoencoder(
            self.spatial_dims,
            input_shape[0],
            tuple(self.channels),
            self.latent_channels,
            self.dropout,
            self.negative_slope,
            self.output_activation,
        )

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the batch (from a noised input when denoising)."""
        noisy = x + coarse_noise(x, self.noise_std, self.noise_grid) if self.noise_std else x
        return torch.mean((network(noisy).float() - x.float()) ** 2)

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, residual maps and reconstructions of a batch."""
        reconstruction = network(x)
        maps = residual_map(x, reconstruction, self.residual)
        return per_image_mean(maps), maps, reconstruction

    def latent(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The flattened bottleneck feature map of each image."""
        return network.encoder(x).flatten(1)
