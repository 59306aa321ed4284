"""Foreign Patch Interpolation: self-supervised training on synthetic anomalies (Tan et al.).

No abnormal image is ever needed. Into each normal training image a box of random size and
position is blended with the same box of *another* normal image, by a random factor
``alpha`` ~ U(0, 1); a segmentation U-Net learns to regress ``alpha`` per voxel (0 outside
the box). The network thereby learns what does not belong at a place in normal anatomy,
whatever it looks like; at inference its output is the anomaly map. The synthetic anomalies
stay generic on purpose: patches of other normal images, never shapes or intensities modelled
on the lesions a benchmark tests (Tan et al., "Detecting outliers with foreign patch
interpolation", MELBA 2022; the MOOD challenge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import SCORE_REDUCTIONS, foreground_mask, reduce_inside
from medanomaly.errors import ConfigError, check_choice
from medanomaly.nets.unet import CPU_FEATURES, skip_unet
from medanomaly.training.engine import EngineConfig


def foreign_patch_blend(
    x: torch.Tensor,
    partner: torch.Tensor,
    size_range: Sequence[float] = (0.1, 0.5),
    foreground_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend a random box of each image with the same box of its partner image.

    Per image: box sides are drawn uniformly in ``size_range`` (fractions of each side), the
    box position uniformly within the image, ``alpha`` ~ U(0, 1). Inside the box the image
    becomes ``(1 - alpha) * x + alpha * partner``. The target is ``alpha`` inside the box
    where either image is foreground (blending background into background changes nothing),
    0 elsewhere. Draws from torch's global generator (the engine seeds it every epoch).

    Args:
        x: Images ``(B, C, *spatial)``.
        partner: The images whose patches are blended in, same shape.
        size_range: Smallest and largest box side, as fractions of the image side.
        foreground_threshold: Foreground rule of
            :func:`~medanomaly.detectors.scoring.foreground_mask`.

    Returns:
        ``(blended (B, C, *spatial), target (B, *spatial))``.
    """
    low, high = (float(v) for v in size_range)
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(
            f"fpi: patch_size_range must satisfy 0 < low <= high <= 1, got {size_range}"
        )
    spatial = x.shape[2:]
    boxes = torch.zeros((x.shape[0], *spatial), dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        index = []
        for n in spatial:
            side = max(1, round(n * (low + (high - low) * float(torch.rand(())))))
            start = int(torch.randint(0, n - side + 1, ()))
            index.append(slice(start, start + side))
        boxes[(i, *index)] = True
    alpha = torch.rand(x.shape[0], device=x.device).view(-1, *([1] * len(spatial)))
    weight = (alpha * boxes).to(x.dtype).unsqueeze(1)
    blended = x + weight * (partner - x)
    visible = foreground_mask(x, foreground_threshold) | foreground_mask(
        partner, foreground_threshold
    )
    return blended, (alpha * (boxes & visible)).to(x.dtype)


@register("fpi")
class ForeignPatchInterpolation(DeepDetector):
    """A U-Net trained to find patches of other normal images blended into a normal one.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (the patch is blended in every channel).
        features: The U-Net's six widths (five encoder levels, last decoder level).
        norm_groups: Group-normalisation groups (0: instance normalisation).
        patch_size_range: Smallest and largest side of the blended box, as fractions of each
            image side.
        foreground_threshold: Voxels with any channel above it are foreground: the target is
            0 where both images are background, and scores are read inside the foreground;
            ``None``: every voxel.
        score_reduce: Image score from the map (the predicted alpha) inside the foreground:
            ``percentile``, ``top``, ``sum``, ``mean`` or ``max``.
        score_value: The percentile (0-100) or share (0-1).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map instead; ``None`` keeps
            ``score_reduce``.
    """

    exportable = True

    scores_any_size = True  # fully convolutional: scores cases of any size, each at its own

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        features: Sequence[int] = CPU_FEATURES,
        norm_groups: int = 8,
        patch_size_range: Sequence[float] = (0.1, 0.5),
        foreground_threshold: float | None = None,
        score_reduce: str = "percentile",
        score_value: float = 99.0,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.features = features
        self.norm_groups = norm_groups
        self.patch_size_range = patch_size_range
        self.foreground_threshold = foreground_threshold
        self.score_reduce = score_reduce
        self.score_value = score_value

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """The U-Net: image channels in, one logit per voxel out."""
        check_choice(self.name, "score_reduce", self.score_reduce, SCORE_REDUCTIONS)
        return skip_unet(
            self.spatial_dims, input_shape[0], 1, self.features, self.norm_groups, "fpi"
        )

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the predicted against the blended alpha."""
        # another normal image of the batch; a batch of one blends in its mirror image
        partner = x.roll(1, dims=0) if len(x) > 1 else x.flip(-1)
        blended, target = foreign_patch_blend(
            x, partner, self.patch_size_range, self.foreground_threshold
        )
        logits = network(blended)[:, 0].float()
        return functional.binary_cross_entropy_with_logits(logits, target.float())

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Scores and maps (predicted alpha, 0 outside the foreground); no reconstruction."""
        inside = foreground_mask(x, self.foreground_threshold)
        maps = torch.sigmoid(network(x)[:, 0].float()) * inside
        return reduce_inside(maps, inside, self.score_reduce, self.score_value), maps, None
