"""Scale-space autoencoder detector (the UAD slide deck: SSAE on 2D head CT).

The image is split into a Laplacian pyramid; every scale has its own small convolutional
autoencoder; the reconstruction is the collapsed pyramid of the reconstructed scales.
Head CT (config ``ssae_head_ct_2d``, spec ``head_ct``): AUROC 0.73 +- 0.06
under 2 x 5 CV (the UAD slide deck: 0.81 +- 0.08; the CAE here: 0.75 +- 0.06), 0.77-0.78 on the
fixed split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import per_image_mean, residual_map
from medanomaly.nets import ConvAutoencoder
from medanomaly.nets.layers import check_spatial_dims
from medanomaly.training.engine import EngineConfig

KERNELS = ("gaussian", "average")
_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)  # sampled Gaussian of the classic Burt-Adelson pyramid
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def _blur_axis(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Convolve every channel of ``x`` with the 5-tap binomial kernel along ``axis``."""
    spatial_dims = x.ndim - 2
    taps = torch.tensor(_BINOMIAL_5, dtype=x.dtype, device=x.device)
    shape = [1] * spatial_dims
    shape[axis] = len(taps)
    weight = (taps / taps.sum()).view(1, 1, *shape).repeat(x.shape[1], *[1] * (spatial_dims + 1))
    pad = [0] * (2 * spatial_dims)  # functional.pad lists the last axis first
    pad[2 * (spatial_dims - 1 - axis)] = pad[2 * (spatial_dims - 1 - axis) + 1] = 2
    conv = functional.conv2d if spatial_dims == 2 else functional.conv3d
    return conv(functional.pad(x, pad, mode="replicate"), weight, groups=x.shape[1])


def downsample(x: torch.Tensor, kernel: str = "gaussian") -> torch.Tensor:
    """Low-pass filter ``x`` ``(B, C, *spatial)`` and keep every second sample per axis.

    Args:
        x: Batch of images; each side even.
        kernel: ``gaussian`` (separable 5-tap binomial blur, replicate padding) or
            ``average`` (mean of each 2x2 / 2x2x2 block).
    """
    spatial_dims = check_spatial_dims(x.ndim - 2)
    if kernel == "average":
        pool = functional.avg_pool2d if spatial_dims == 2 else functional.avg_pool3d
        return pool(x, 2)
    if kernel != "gaussian":
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for axis in range(spatial_dims):
        x = _blur_axis(x, axis)
    return x[(slice(None), slice(None), *[slice(None, None, 2)] * spatial_dims)]


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Double every side of ``x`` by (bi/tri)linear interpolation."""
    mode = _INTERPOLATION[check_spatial_dims(x.ndim - 2)]
    return functional.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def laplacian_pyramid(x: torch.Tensor, levels: int, kernel: str = "gaussian") -> list[torch.Tensor]:
    """Split ``x`` into ``levels`` scales: band-pass residuals, finest first, low-pass last.

    Scale ``k`` has sides ``side / 2**k``; :func:`collapse_pyramid` inverts it exactly.

    Args:
        x: Batch ``(B, C, *spatial)``; sides divisible by ``2 ** (levels - 1)``.
        levels: Number of scales (1 returns ``[x]``).
        kernel: Low-pass kernel of :func:`downsample`.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    bands, current = [], x
    for _ in range(levels - 1):
        coarser = downsample(current, kernel)
        bands.append(current - upsample(coarser))
        current = coarser
    bands.append(current)
    return bands


def collapse_pyramid(bands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the image from its pyramid: upsample the coarsest scale and add each band."""
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = band + upsample(image)
    return image


def _per_scale(value: Sequence[int], levels: int, name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in value)
    if len(values) != levels:
        raise ValueError(f"{name} needs {levels} values (one per scale), got {values}")
    return values


def scale_latents(latent_channels: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """Bottleneck channels of each scale, finest first.

    One number is the finest scale's; each coarser scale gets a quarter of the previous
    one (at least 1). Coarse scales hold the low frequencies where a lesion's bulk lies;
    compressing them hard keeps their autoencoders from copying it.
    """
    if isinstance(latent_channels, int):
        return tuple(max(1, latent_channels // 4**k) for k in range(levels))
    return _per_scale(latent_channels, levels, "latent_channels")


def scale_depths(depths: Sequence[int] | None, n_channels: int, levels: int) -> tuple[int, ...]:
    """Encoder blocks of each scale's autoencoder, finest first.

    ``None``: the two finest scales use all ``n_channels`` blocks and each coarser scale one
    block fewer (at least 1). The finest band then keeps a bottleneck grid twice as fine as
    the others (it has to rebuild sharp normal edges), while the coarser scales, where a
    lesion's bulk lies, all end on the same small grid.
    """
    if depths is None:
        return tuple(max(1, min(n_channels, n_channels + 1 - k)) for k in range(levels))
    values = _per_scale(depths, levels, "depths")
    if not all(1 <= d <= n_channels for d in values):
        raise ValueError(f"depths must lie in [1, {n_channels}] (len(channels)), got {values}")
    return values


class ScaleSpaceAutoencoder(nn.Module):
    """One :class:`ConvAutoencoder` per Laplacian-pyramid scale.

    Scale ``k`` (half the side of scale ``k - 1``) gets an autoencoder with the first
    ``depths[k]`` entries of ``channels`` as encoder blocks and ``latent_channels[k]``
    bottleneck channels. Band-pass scales have no output activation (their values are
    signed); the low-pass scale uses ``output_activation``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        levels: Number of pyramid scales.
        channels: Encoder block channels (a scale uses the first ``depths[k]``).
        latent_channels: Bottleneck channels per scale (finest first), or one number for
            the finest scale, divided by 4 per coarser scale (see :func:`scale_latents`).
        depths: Encoder blocks per scale; ``None`` applies :func:`scale_depths`.
        dropout: Dropout after each block.
        negative_slope: LeakyReLU slope.
        output_activation: Output activation of the low-pass autoencoder.
        kernel: Low-pass kernel of the pyramid (``gaussian`` or ``average``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        levels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        latent_channels: int | Sequence[int] = 16,
        depths: Sequence[int] | None = None,
        dropout: float = 0.0,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
        kernel: str = "gaussian",
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.levels = levels
        self.kernel = kernel
        latents = scale_latents(latent_channels, levels)
        blocks = scale_depths(depths, len(channels), levels)
        self.autoencoders = nn.ModuleList(
            ConvAutoencoder(
                spatial_dims,
                in_channels,
                tuple(channels[: blocks[k]]),
                latents[k],
                dropout,
                negative_slope,
                output_activation if k == levels - 1 else "none",
            )
            for k in range(levels)
        )

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Laplacian pyramid of ``x`` (finest band first)."""
        return laplacian_pyramid(x, self.levels, self.kernel)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(pyramid of x, reconstructed pyramid)``, finest scale first."""
        bands = self.decompose(x)
        return bands, [ae(band) for ae, band in zip(self.autoencoders, bands, strict=True)]


@register("ssae")
class SSAE(DeepDetector):
    """Scale-space autoencoder (UAD slide deck): reconstruct each Laplacian scale, then collapse.

    Training loss: sum over scales of the mean squared error between a scale and its
    reconstruction. Map: squared (or absolute) residual between the input and the collapsed
    reconstruction; score: mean of the map.

    Each spatial side must be divisible by ``size_multiple = 2 ** max_k(k + depths[k])``
    (16 for the defaults, ``2 ** (len(channels) + 1)`` for default depths): scale ``k`` is
    the input halved ``k`` times, and its autoencoder halves it once more per encoder block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        levels: Pyramid scales (band-pass levels + the low-pass one).
        channels: Encoder block channels; scale ``k`` uses the first ``depths[k]``.
        latent_channels: Bottleneck channels per scale (finest first), or one number for
            the finest scale that is quartered per coarser scale (16 -> 16, 4, 1).
        depths: Encoder blocks per scale (finest first); ``None``: ``len(channels)`` for the
            two finest scales, one fewer for each coarser one (3 levels, 3 channels:
            3, 3, 2). On 32x32 phantoms this beat equal bottleneck grids (AUROC 0.91 vs
            0.84 at 30 epochs).
        dropout: Dropout after each block (0 by default: on the phantoms, channel dropout
            kept the band-pass autoencoders from learning fine edges).
        negative_slope: LeakyReLU slope.
        output_activation: Activation of the low-pass reconstruction: ``sigmoid`` ([0, 1]
            inputs), ``tanh`` ([-1, 1]) or ``none``.
        kernel: Pyramid low-pass kernel: ``gaussian`` (5-tap binomial) or ``average``.
        residual: ``squared`` or ``abs`` difference for maps and scores.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the model's own
            score.
    """

    exportable = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        levels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        latent_channels: int | Sequence[int] = 16,
        depths: Sequence[int] | None = None,
        dropout: float = 0.0,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
        kernel: str = "gaussian",
        residual: str = "squared",
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.levels = levels
        self.channels = channels
        self.latent_channels = latent_channels
        self.depths = depths
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.output_activation = output_activation
        self.kernel = kernel
        self.residual = residual

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        """Sides must be divisible by ``2 ** max_k(k + depths[k])``."""
        blocks = scale_depths(self.depths, len(self.channels), self.levels)
        return 2 ** max(k + d for k, d in enumerate(blocks))

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Build one autoencoder per scale (fully convolutional: only channels matter)."""
        return ScaleSpaceAutoencoder(
            self.spatial_dims,
            input_shape[0],
            self.levels,
            tuple(self.channels),
            self.latent_channels
            if isinstance(self.latent_channels, int)
            else tuple(self.latent_channels),
            None if self.depths is None else tuple(self.depths),
            self.dropout,
            self.negative_slope,
            self.output_activation,
            self.kernel,
        )

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Sum over scales of each scale's mean squared error."""
        bands, reconstructed = network(x)
        terms = [
            torch.mean((r.float() - b.float()) ** 2)
            for b, r in zip(bands, reconstructed, strict=True)
        ]
        return torch.stack(terms).sum()

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, residual maps and collapsed reconstructions of a batch."""
        reconstruction = collapse_pyramid([r.float() for r in network(x)[1]])
        maps = residual_map(x, reconstruction, self.residual)
        return per_image_mean(maps), maps, reconstruction
