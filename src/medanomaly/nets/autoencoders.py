"""Convolutional autoencoder (the UAD slide deck) and VAE (Chung & Choi 2023), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medanomaly.nets import layers


def _as_tuple(value: float | Sequence[float], n: int, name: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} needs {n} values (one per block), got {len(values)}")
    return values


class ConvAutoencoder(nn.Module):
    """Fully convolutional autoencoder of the UAD slide deck.

    Encoder blocks are strided convolution + batch norm + LeakyReLU + dropout, each halving
    the grid; a 1x1 convolution squeezes the deepest features into ``latent_channels``
    (the bottleneck that keeps the network from copying its input). Decoder blocks are
    transposed convolution + batch norm + LeakyReLU + dropout. Any input whose sides are
    divisible by ``2 ** len(channels)`` works.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Feature channels of the encoder blocks (the decoder mirrors them).
        latent_channels: Channels of the bottleneck feature map.
        dropout: Dropout rate after each block.
        negative_slope: LeakyReLU slope.
        output_activation: ``sigmoid`` for [0, 1] inputs, ``tanh`` for [-1, 1], ``none``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        dropout: float = 0.1,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        widths = [in_channels, *channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            encoder += [
                layers.conv(d, c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                layers.batch_norm(d, c_out),
                nn.LeakyReLU(negative_slope),
                layers.dropout(d, dropout),
            ]
        encoder.append(layers.conv(d, widths[-1], latent_channels, kernel_size=1))
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [layers.conv(d, latent_channels, widths[-1], kernel_size=1)]
        reversed_widths = widths[::-1]
        for i, (c_in, c_out) in enumerate(
            zip(reversed_widths[:-1], reversed_widths[1:], strict=True)
        ):
            decoder.append(
                layers.conv_transpose(d, c_in, c_out, kernel_size=4, stride=2, padding=1)
            )
            if i < len(channels) - 1:
                decoder += [
                    layers.batch_norm(d, c_out),
                    nn.LeakyReLU(negative_slope),
                    layers.dropout(d, dropout),
                ]
        decoder.append(layers.output_activation(output_activation))
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x``."""
        return self.decoder(self.encoder(x))


class VariationalAutoencoder(nn.Module):
    """The 3D VAE of Chung & Choi 2023 (Chung & Choi 2023), usable in 2D too.

    Encoder: four modules of convolution, batch norm, ReLU, dropout (0.19, 0.19, 0.2, 0.23)
    and max-pooling; two fully connected layers give the mean and log-variance of an
    8-dimensional latent. Decoder: a fully connected layer back to the deepest feature map,
    three transposed-convolution modules (batch norm, LeakyReLU with slope 0.6) and a last
    module that upsamples and convolves instead of transposing (fewer checkerboard artefacts).

    Args:
        spatial_dims: 2 or 3.
        spatial_size: Input grid, e.g. ``(64, 64, 64)``; each side divisible by 16.
        in_channels: Image channels.
        channels: Feature channels of the four encoder modules.
        hidden_dim: Width of the first fully connected layer.
        latent_dim: Size of the latent vector (Chung & Choi 2023: 8).
        dropout: Dropout rate of each encoder module.
        negative_slope: LeakyReLU slope in the decoder (Chung & Choi 2023: 0.6).
        output_activation: ``sigmoid`` for [0, 1] inputs, ``tanh`` for [-1, 1], ``none``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        spatial_size: Sequence[int] = (64, 64, 64),
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_dim: int = 256,
        latent_dim: int = 8,
        dropout: float | Sequence[float] = (0.19, 0.19, 0.2, 0.23),
        negative_slope: float = 0.6,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        if len(channels) != 4:
            raise ValueError(
                f"the Chung & Choi 2023 VAE has 4 encoder modules; got channels={channels}"
            )
        if len(spatial_size) != d or any(s % 16 for s in spatial_size):
            raise ValueError(
                f"spatial_size must have {d} sides divisible by 16, got {spatial_size}"
            )
        rates = _as_tuple(dropout, 4, "dropout")
        widths = [in_channels, *channels]
        encoder: list[nn.Module] = []
        for c_in, c_out, rate in zip(widths[:-1], widths[1:], rates, strict=True):
            encoder += [
                layers.conv(d, c_in, c_out, kernel_size=3, padding=1, bias=False),
                layers.batch_norm(d, c_out),
                nn.ReLU(),
                layers.dropout(d, rate),
                layers.max_pool(d, 2),
            ]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.feature_shape = (channels[-1], *(s // 16 for s in spatial_size))
        n_features = int(torch.tensor(self.feature_shape).prod())
        self.fc_hidden = nn.Sequential(nn.Linear(n_features, hidden_dim), nn.ReLU())
        self.fc_stats = nn.Linear(hidden_dim, 2 * latent_dim)
        self.fc_decode = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, n_features)
        )
        decoder: list[nn.Module] = []
        back = widths[::-1]
        for c_in, c_out in zip(back[:3], back[1:4], strict=True):
            decoder += [
                layers.conv_transpose(
                    d, c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False
                ),
                layers.batch_norm(d, c_out),
                nn.LeakyReLU(negative_slope),
            ]
        decoder += [
            layers.upsample(d, 2),
            layers.conv(d, back[3], in_channels, kernel_size=3, padding=1),
            layers.output_activation(output_activation),
        ]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the latent mean and log-variance of ``x``."""
        mu, logvar = self.fc_stats(self.fc_hidden(self.encoder(x))).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latent vectors ``z`` into images."""
        return self.decoder(self.fc_decode(z).view(-1, *self.feature_shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, mu, logvar)``; ``z`` is sampled in training, ``mu`` in eval."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar
