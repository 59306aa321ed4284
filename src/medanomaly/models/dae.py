"""Denoising autoencoder with coarse noise (Kascenas, Pugeault and O'Neil, MIDL 2022).

A U-Net with skip connections learns, on normal images only, to remove *coarse* Gaussian
noise: noise drawn on a lattice of ``noise_grid`` points per side (16 for a 128² slice:
blobs of about 8 px), upsampled bilinearly, rolled by a random offset and added inside the
foreground only. A network that can undo blob-sized perturbations of normal anatomy also
"repairs" a lesion, while the skip connections keep the rest of the image sharp; the
residual |x - f(x)| is therefore small on normal tissue and large on lesions. No noise is
added at inference.

Paper settings (BraTS, 128², four MRI channels): a U-Net of widths 64-128-256-512 with
group normalisation, noise SD 0.2 on intensities scaled to the 99th percentile of the
brain, 16² noise lattice, Adam (lr 1e-4), map = channel mean of |x - f(x)| inside the
brain mask eroded by a 5-px box, then a 5×5 median filter. The defaults here keep the
noise, the map and the post-processing, and scale the widths down for a CPU
(16-32-64-128-256, with MONAI's BasicUNet and its four down-samplings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.noise import coarse_noise
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import (
    SCORE_REDUCTIONS,
    SIGNED_RESIDUALS,
    erode_mask,
    foreground_mask,
    median_filter,
    reduce_inside,
    signed_residual,
)
from medanomaly.errors import check_choice
from medanomaly.nets.unet import CPU_FEATURES, skip_unet
from medanomaly.training.engine import EngineConfig


@register("dae")
class DenoisingAE(DeepDetector):
    """Coarse-noise denoising U-Net; the anomaly map is its median-filtered residual.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (all are noised and reconstructed).
        features: The U-Net's six widths (five encoder levels, last decoder level); the
            paper's network is about ``[64, 64, 128, 256, 512, 64]``.
        norm_groups: Group-normalisation groups (0: instance normalisation).
        noise_std: SD of the noise lattice, in intensity units (paper: 0.2 for brain
            intensities scaled to about [0, 1]).
        noise_grid: Lattice points per side (paper: 16 at 128²).
        noise_shift: Roll each image's noise by a random offset.
        foreground_threshold: Voxels with any channel above it are foreground (where noise
            is added, the loss is taken and the map is read); ``None``: every voxel.
        erode: The map is kept only inside the foreground eroded by this many voxels (a box;
            the paper's 5-px box is 2), which drops the residuals of the brain's edge.
        median_size: Width of the median filter of the map; ``None``: 5 in 2D, 3 in 3D.
        residual: ``abs`` (the paper's |x - f(x)|), ``positive`` (max(x - f(x), 0): only
            what is brighter than the repaired image, e.g. FLAIR lesions, acute blood) or
            ``negative`` (only what is darker).
        score_reduce: Image score from the map inside the eroded foreground:
            ``percentile``, ``top`` (mean of the top share), ``sum``, ``mean`` or ``max``.
        score_value: The percentile (``percentile``, 0-100) or share (``top``, 0-1).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map instead (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps ``score_reduce``.
    """

    exportable = True

    scores_any_size = True  # fully convolutional: scores cases of any size, each at its own

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        features: Sequence[int] = CPU_FEATURES,
        norm_groups: int = 8,
        noise_std: float = 0.2,
        noise_grid: int = 16,
        noise_shift: bool = True,
        foreground_threshold: float | None = None,
        erode: int = 2,
        median_size: int | None = None,
        residual: str = "abs",
        score_reduce: str = "percentile",
        score_value: float = 99.0,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.features = features
        self.norm_groups = norm_groups
        self.noise_std = noise_std
        self.noise_grid = noise_grid
        self.noise_shift = noise_shift
        self.foreground_threshold = foreground_threshold
        self.erode = erode
        self.median_size = median_size
        self.residual = residual
        self.score_reduce = score_reduce
        self.score_value = score_value

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """The U-Net, input channels in and out."""
        check_choice(self.name, "score_reduce", self.score_reduce, SCORE_REDUCTIONS)
        check_choice(self.name, "residual", self.residual, SIGNED_RESIDUALS)
        channels = input_shape[0]
        return skip_unet(
            self.spatial_dims, channels, channels, self.features, self.norm_groups, "dae"
        )

    @property
    def median_width(self) -> int:
        """The median filter's width (5 in 2D, 3 in 3D unless set)."""
        if self.median_size is not None:
            return int(self.median_size)
        return 5 if self.spatial_dims == 2 else 3

    def add_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus coarse noise inside its foreground (training input)."""
        inside = foreground_mask(x, self.foreground_threshold).unsqueeze(1)
        noise = coarse_noise(x, self.noise_std, self.noise_grid, shift=self.noise_shift)
        return x + noise * inside

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Squared error of the denoised image against the clean one, inside the foreground."""
        inside = foreground_mask(x, self.foreground_threshold).unsqueeze(1)
        denoised = network(self.add_noise(x)).float()
        return ((denoised - x.float()) ** 2 * inside).mean()

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, median-filtered residual maps inside the eroded foreground, reconstructions."""
        reconstruction = network(x)
        core = erode_mask(foreground_mask(x, self.foreground_threshold), self.erode)
        residual = signed_residual(x, reconstruction, self.residual) * core
        maps = median_filter(residual, self.median_width)
        scores = reduce_inside(maps, core, self.score_reduce, self.score_value)
        return scores, maps, reconstruction
