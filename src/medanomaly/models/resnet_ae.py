"""3D ResNet autoencoder detector (Hjohlman 2022: outlier screening of unlabelled CT volumes)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import foreground_mask, patch_starts, residual_map
from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.nets import ResNetAutoencoder
from medanomaly.training.engine import EngineConfig

PATCH_REDUCTIONS = ("mean", "max")


@register("resnet_ae")
class ResNetAE(DeepDetector):
    """ResNet autoencoder with a 1024-d latent vector, trained with MSE; masked-MSE score.

    The score is the mean squared residual over the foreground voxels only (Hjohlman 2022:
    HU > -990, so that air around the patient, whose amount varies with the field of view,
    does not decide the score); the map is the squared residual, zero outside the foreground.

    With ``patch_size`` the network sees patches: training draws one random patch per volume
    and step, scoring reconstructs the whole volume by sliding window (overlapping patches,
    Gaussian-weighted) and the volume's score is the mean (``patch_reduce: mean``) or the
    largest (``max``) masked MSE over the windows. ``max`` is the thesis's proposed remedy for
    its size bias: a large volume is no longer scored by an average over more normal tissue.
    Volumes may then be of any size (at least the patch in each side is best).

    Args:
        spatial_dims: 3 (Hjohlman 2022) or 2.
        in_channels: Image channels.
        depth: ResNet depth of the encoder: 10, 18 or 34 (Hjohlman 2022: 34).
        channels: Channels of the four residual stages (the decoder mirrors them); the
            default is CPU-sized, ResNet's own widths are 64-512.
        latent_dim: Size of the latent vector (Hjohlman 2022: 1024).
        output_activation: ``none`` for z-scored inputs, ``sigmoid`` for [0, 1], ``tanh``.
        foreground_threshold: Voxels whose input value (after preprocessing, in the model's
            units) exceeds this count in the score; ``None`` counts every voxel. For the
            seed's HU > -990 after a z-score with mean m and SD s use ``(-990 - m) / s``.
        patch_size: Train on random patches of this size and score by sliding window;
            ``None`` uses whole volumes. Each side divisible by 16.
        patch_overlap: Overlap of neighbouring windows when scoring (0 to < 1).
        patch_reduce: ``mean`` or ``max`` of the per-window masked MSE (``max`` needs
            ``patch_size``).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the masked MSE.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        depth: int = 18,
        channels: Sequence[int] = (16, 32, 64, 128),
        latent_dim: int = 1024,
        output_activation: str = "none",
        foreground_threshold: float | None = None,
        patch_size: Sequence[int] | None = None,
        patch_overlap: float = 0.5,
        patch_reduce: str = "mean",
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.depth = depth
        self.channels = channels
        self.latent_dim = latent_dim
        self.output_activation = output_activation
        self.foreground_threshold = foreground_threshold
        self.patch_size = patch_size
        self.patch_overlap = patch_overlap
        self.patch_reduce = patch_reduce

    has_latent = True
    export_refusal = "with patch_size it scores by a sliding window over volumes of any size"

    # -- shapes ---------------------------------------------------------------------------
    @property
    def exportable(self) -> bool:  # type: ignore[override]
        """Whole volumes only: the sliding window of ``patch_size`` is not one graph."""
        return self.patch is None

    @property
    def scores_any_size(self) -> bool:  # type: ignore[override]
        """With ``patch_size``, volumes of any size are scored by sliding window."""
        return self.patch is not None

    @property
    def patch(self) -> tuple[int, ...] | None:
        """``patch_size`` as a tuple (``None`` without patches)."""
        return None if self.patch_size is None else tuple(int(s) for s in self.patch_size)

    def _check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        self._check_settings()
        if self.patch is None:
            super()._check_input_shape(input_shape)
            return
        self._check_channels(input_shape[0])
        too_small = [s for s, p in zip(input_shape[1:], self.patch, strict=True) if s < p]
        if too_small:
            raise InvalidImageError(
                "<input>",
                f"training volumes {tuple(input_shape[1:])} are smaller than patch_size "
                f"{self.patch}; lower patch_size or pad the volumes",
            )

    def _check_settings(self) -> None:
        if self.patch_reduce not in PATCH_REDUCTIONS:
            raise ConfigError(
                f"resnet_ae: patch_reduce must be one of {PATCH_REDUCTIONS}, "
                f"got {self.patch_reduce!r}"
            )
        if self.patch is None:
            if self.patch_reduce == "max":
                raise ConfigError("resnet_ae: patch_reduce 'max' needs a patch_size")
            return
        if len(self.patch) != self.spatial_dims or any(p % 16 for p in self.patch):
            raise ConfigError(
                f"resnet_ae: patch_size needs {self.spatial_dims} sides divisible by 16, "
                f"got {list(self.patch)}"
            )
        if not 0 <= self.patch_overlap < 1:
            raise ConfigError(
                f"resnet_ae: patch_overlap must be in [0, 1), got {self.patch_overlap}"
            )

    def _check_channels(self, channels: int) -> None:
        if channels != self.in_channels:
            raise InvalidImageError(
                "<input>", f"images have {channels} channels, the model expects {self.in_channels}"
            )

    # -- network --------------------------------------------------------------------------
    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Build the autoencoder for whole volumes of ``input_shape`` or for patches."""
        return ResNetAutoencoder(
            self.spatial_dims,
            self.patch or input_shape[1:],
            input_shape[0],
            self.depth,
            tuple(self.channels),
            self.latent_dim,
            self.output_activation,
        )

    def training_collate(self) -> PatchCollate | None:
        """With patches, volumes of different shapes join a batch by their random patches."""
        return None if self.patch is None else PatchCollate(self.patch)

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error: of one random patch per volume in training, else of the volume."""
        if network.training and self.patch is not None:
            x = random_patches(x, self.patch)
            reconstruction = network(x)
        else:
            reconstruction = self.reconstruct(network, x)
        return torch.mean((reconstruction.float() - x.float()) ** 2)

    def reconstruct(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of whole volumes (by sliding window when they exceed the patch)."""
        if self.patch is None or tuple(x.shape[2:]) == self.patch:
            return network(x)
        return sliding_window_inference(
            x,
            roi_size=self.patch,
            sw_batch_size=max(1, self.engine_config.batch_size),
            predictor=network,
            overlap=self.patch_overlap,
            mode="gaussian",
        )

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked-MSE scores, squared residuals (zero outside the foreground), reconstructions."""
        reconstruction = self.reconstruct(network, x)
        maps = residual_map(x, reconstruction, "squared")
        inside = foreground_mask(x, self.foreground_threshold)
        maps = maps * inside
        window = self.patch if self.patch_reduce == "max" else None
        return window_scores(maps, inside, window, self.patch_overlap), maps, reconstruction

    def latent(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The 1024-d latent vector (mean over the scoring windows for large volumes)."""
        if self.patch is None or tuple(x.shape[2:]) == self.patch:
            return network.encode(x)
        windows = window_slices(x.shape[2:], self.patch, self.patch_overlap)
        vectors = [network.encode(x[(slice(None), slice(None), *w)]) for w in windows]
        return torch.stack(vectors).mean(dim=0)


def random_patches(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """One random patch of size ``patch`` per image of the batch ``x`` (torch's RNG)."""
    spatial = x.shape[2:]
    if tuple(spatial) == tuple(patch):
        return x
    crops = []
    for image in x:
        starts = [int(torch.randint(0, s - p + 1, ())) for s, p in zip(spatial, patch, strict=True)]
        index = tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))
        crops.append(image[(slice(None), *index)])
    return torch.stack(crops)


class PatchCollate:
    """Join volumes of different shapes into a batch of one random patch each (torch's RNG).

    The loss then finds the batch at patch size and trains on it as it is.
    """

    def __init__(self, patch: Sequence[int]) -> None:
        self.patch = tuple(int(p) for p in patch)

    def __call__(self, volumes: list[torch.Tensor]) -> torch.Tensor:
        """The batch ``(B, C, *patch)``."""
        return torch.cat([random_patches(v[None], self.patch) for v in volumes])


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start of every window along one axis: step ``patch * (1 - overlap)``, last one flush."""
    return patch_starts(size, patch, int(patch * (1 - overlap)))


def window_slices(
    spatial: Sequence[int], patch: Sequence[int], overlap: float
) -> list[tuple[slice, ...]]:
    """Index of every scoring window of a grid ``spatial``."""
    axes = [
        [slice(a, a + p) for a in window_starts(s, p, overlap)]
        for s, p in zip(spatial, patch, strict=True)
    ]
    return list(product(*axes))


def window_scores(
    maps: torch.Tensor, inside: torch.Tensor, window: Sequence[int] | None, overlap: float
) -> torch.Tensor:
    """Masked mean of ``maps`` per image, or its maximum over windows of size ``window``.

    Args:
        maps: Residual maps ``(B, *spatial)``, already zero outside the foreground.
        inside: Foreground ``(B, *spatial)`` (bool).
        window: Window size for the maximum; ``None`` gives the mean over the whole image.
        overlap: Overlap of neighbouring windows.
    """
    if window is None:
        return maps.flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
    per_window = [
        maps[(slice(None), *w)].flatten(1).sum(1)
        / inside[(slice(None), *w)].flatten(1).sum(1).clamp(min=1)
        for w in window_slices(maps.shape[1:], window, overlap)
    ]
    return torch.stack(per_window, dim=1).amax(dim=1)
