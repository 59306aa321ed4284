"""ResNet-style autoencoder with a latent vector (Hjohlman 2022: CT outlier screening), 2D/3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medanomaly.nets import layers

# Residual blocks per stage of the encoder (and, reversed, of the decoder).
RESNET_STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _up(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """Transposed convolution doubling the grid, batch norm, ReLU."""
    return nn.Sequential(
        layers.conv_transpose(spatial_dims, in_channels, out_channels, 2, stride=2, bias=False),
        layers.batch_norm(spatial_dims, out_channels),
        nn.ReLU(inplace=True),
    )


class ResNetAutoencoder(nn.Module):
    """ResNet encoder to a latent vector and a mirrored residual decoder.

    Encoder: a stride-2 stem convolution, four stages of basic residual blocks (stages 2-4
    halve the grid; ResNet-10/18/34 block counts), a 1x1 convolution to ``latent_dim``
    channels and global average pooling: one latent vector per image (Hjohlman 2022: 1024).
    Decoder: a transposed convolution spreads the vector back over the deepest grid, then
    the stages in reverse order (each a transposed convolution doubling the grid followed
    by the same number of residual blocks) and a last upsampling to the input grid.

    Args:
        spatial_dims: 2 or 3.
        spatial_size: Input grid, each side divisible by 16 (the decoder is built for it).
        in_channels: Image channels.
        depth: 10, 18 or 34 (residual blocks per stage as in ResNet).
        channels: Channels of the four stages.
        latent_dim: Size of the latent vector.
        output_activation: ``none`` (z-scored inputs), ``sigmoid`` ([0, 1]) or ``tanh``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        spatial_size: Sequence[int] = (64, 64, 64),
        in_channels: int = 1,
        depth: int = 18,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_dim: int = 1024,
        output_activation: str = "none",
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        if depth not in RESNET_STAGES:
            raise ValueError(f"depth must be one of {sorted(RESNET_STAGES)}, got {depth!r}")
        if len(channels) != 4:
            raise ValueError(f"channels needs 4 values (one per stage), got {list(channels)}")
        if len(spatial_size) != d or any(s % 16 for s in spatial_size):
            raise ValueError(
                f"spatial_size must have {d} sides divisible by 16, got {list(spatial_size)}"
            )
        blocks = RESNET_STAGES[depth]
        self.deepest_grid = tuple(s // 16 for s in spatial_size)
        self.encoder = nn.Sequential(
            layers.conv(d, in_channels, channels[0], 7, stride=2, padding=3, bias=False),
            layers.batch_norm(d, channels[0]),
            nn.ReLU(inplace=True),
            *_stages(d, channels, blocks),
            layers.conv(d, channels[-1], latent_dim, 1),
        )
        self.pool = nn.AdaptiveAvgPool3d(1) if d == 3 else nn.AdaptiveAvgPool2d(1)
        self.expand = nn.Sequential(
            layers.conv_transpose(d, latent_dim, channels[-1], self.deepest_grid, bias=False),
            layers.batch_norm(d, channels[-1]),
            nn.ReLU(inplace=True),
        )
        decoder: list[nn.Module] = []
        for stage in range(3, 0, -1):
            decoder.append(_up(d, channels[stage], channels[stage - 1]))
            decoder += [
                layers.ResidualBlock(d, channels[stage - 1], channels[stage - 1])
                for _ in range(blocks[stage - 1])
            ]
        decoder += [
            _up(d, channels[0], channels[0]),
            layers.conv(d, channels[0], in_channels, 3, padding=1),
            layers.output_activation(output_activation),
        ]
        self.decoder = nn.Sequential(*decoder)
        self.spatial_dims = d

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``(B, latent_dim)`` of ``x``."""
        return self.pool(self.encoder(x)).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images decoded from latent vectors ``z``."""
        grid = z.view(*z.shape, *([1] * self.spatial_dims))
        return self.decoder(self.expand(grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x``."""
        return self.decode(self.encode(x))


def _stages(spatial_dims: int, channels: Sequence[int], blocks: Sequence[int]) -> list[nn.Module]:
    """The four encoder stages; every stage but the first halves the grid."""
    modules: list[nn.Module] = []
    previous = channels[0]
    for stage, (width, count) in enumerate(zip(channels, blocks, strict=True)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            modules.append(layers.ResidualBlock(spatial_dims, previous, width, stride))
            previous = width
    return modules
