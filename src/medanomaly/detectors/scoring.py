"""Residual maps and image scores shared by the reconstruction-based detectors."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from medanomaly.errors import ConfigError, did_you_mean

RESIDUALS = ("squared", "abs", "ssim")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def residual_map(
    x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "squared"
) -> torch.Tensor:
    """Voxel-wise residual ``(B, *spatial)``, summed over channels.

    Args:
        x: Input batch ``(B, C, *spatial)``.
        reconstruction: Reconstruction of ``x``, same shape.
        kind: ``squared`` (squared difference), ``abs`` (L1 difference) or ``ssim``
            (``1 - SSIM``, local structural dissimilarity: Gaussian window of 11 voxels,
            sigma 1.5, intensities assumed in [0, 1]).
    """
    if kind == "ssim":
        return structural_dissimilarity(x, reconstruction)
    diff = x.float() - reconstruction.float()
    if kind == "squared":
        return diff.pow(2).sum(dim=1)
    if kind == "abs":
        return diff.abs().sum(dim=1)
    raise ValueError(f"residual must be one of {RESIDUALS}, got {kind!r}")


def structural_dissimilarity(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    data_range: float = 1.0,
) -> torch.Tensor:
    """``1 - SSIM`` per voxel ``(B, *spatial)`` (mean over channels), same grid as ``x``.

    MONAI computes SSIM over the valid part of the grid; the inputs are reflect-padded by
    half a window first so that the map covers every voxel.
    """
    from monai.metrics.regression import compute_ssim_and_cs  # heavy: only when used

    spatial_dims = x.dim() - 2
    half = window // 2
    if any(side <= half for side in x.shape[2:]):
        raise ValueError(f"ssim residual: image sides {tuple(x.shape[2:])} under {half + 1}")
    pad = (half,) * (2 * spatial_dims)
    a = functional.pad(x.float(), pad, mode="reflect")
    b = functional.pad(reconstruction.float(), pad, mode="reflect")
    ssim, _ = compute_ssim_and_cs(
        b, a, spatial_dims, [window] * spatial_dims, [sigma] * spatial_dims, data_range
    )
    return (1.0 - ssim).mean(dim=1)


def per_image_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first."""
    return values.flatten(1).mean(dim=1)


def per_image_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first."""
    return values.flatten(1).sum(dim=1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per image, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


SIGNED_RESIDUALS = ("abs", "positive", "negative")


def signed_residual(
    x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "abs"
) -> torch.Tensor:
    """Channel mean of a residual ``(B, *spatial)``: abs(x - x̂), or one sign of ``x - x̂``.

    Args:
        x: Input batch ``(B, C, *spatial)``.
        reconstruction: Its reconstruction, same shape.
        kind: ``abs`` (abs(x - x̂)), ``positive`` (max(x - x̂, 0): only what is brighter than the
            repaired image, e.g. FLAIR lesions, acute blood) or ``negative`` (only what is
            darker).
    """
    difference = x.float() - reconstruction.float()
    if kind == "abs":
        difference = difference.abs()
    elif kind == "positive":
        difference = difference.clamp_min(0)
    elif kind == "negative":
        difference = (-difference).clamp_min(0)
    else:
        raise ConfigError(
            f"residual must be one of {SIGNED_RESIDUALS}, got {kind!r}."
            + did_you_mean(kind, SIGNED_RESIDUALS)
        )
    return difference.mean(dim=1)


def foreground_mask(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Foreground voxels ``(B, *spatial)``: any channel above ``threshold`` (``None``: all)."""
    if threshold is None:
        return torch.ones((x.shape[0], *x.shape[2:]), dtype=torch.bool, device=x.device)
    return (x > threshold).any(dim=1)


def erode_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Box erosion of bool masks ``(B, *spatial)`` by ``width`` voxels (0: unchanged).

    Voxels beyond the image border count as background, so the border is eroded too.
    """
    if width <= 0:
        return mask
    pool = functional.max_pool2d if mask.dim() == 3 else functional.max_pool3d
    outside = functional.pad(
        (~mask).float().unsqueeze(1), (width,) * (2 * (mask.dim() - 1)), value=1.0
    )
    return pool(outside, 2 * width + 1, stride=1)[:, 0] < 0.5


MEDIAN_NETWORK_WINDOW = 27
"""Windows of up to this many voxels (3x3, 5x5, 3x3x3) take their median by a selection
network of element-wise minima and maxima; larger ones sort each window."""
MEDIAN_CHUNK_VOXELS = 1 << 16
"""Voxels of maps the selection network works on at a time (its 25-27 copies stay in cache)."""


def median_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Median of each voxel's ``size``-wide neighbourhood, maps ``(B, *spatial)``.

    The border is replicated; ``size`` 1 returns the maps unchanged. Exact: the middle value
    of each window. Small windows run through a selection network (:func:`selection_network`;
    ``benchmarks/median_filter.py``: 5-8x faster on a 2-core CPU than sorting each window,
    e.g. 5x5 over 256 maps of 64² from 0.28 to 0.035-0.05 s); a NaN in a window makes its
    median NaN either way.
    """
    if size <= 1:
        return maps
    if size % 2 == 0:
        raise ValueError(f"median_filter: size must be odd, got {size}")
    dims = maps.dim() - 1
    half = size // 2
    padded = functional.pad(maps.unsqueeze(1), (half,) * (2 * dims), mode="replicate")[:, 0]
    exporting = torch.compiler.is_exporting()
    if size**dims <= MEDIAN_NETWORK_WINDOW and not exporting:
        return _median_by_network(padded, size, maps.shape[1:])
    windows = padded
    for axis in range(1, dims + 1):
        windows = windows.unfold(axis, size, 1)
    windows = windows.flatten(dims + 1)
    if exporting:  # ONNX has no median: the middle of the sorted window
        return windows.topk(windows.shape[-1] // 2 + 1, dim=-1, largest=False).values[..., -1]
    return windows.median(dim=-1).values


@functools.cache
def selection_network(count: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs ``(i, j)`` that put the median of ``count`` values on its wire.

    The median of an odd ``count`` ends on wire ``count // 2``; each pair moves the smaller
    value to ``i``, the larger to ``j``. Batcher's odd-even merge sort over the next power
    of two, with the padding wires (+inf, never moved) dropped and every pair that cannot
    reach the middle wire pruned (25 values: 113 pairs).
    """
    wires = 1 << (count - 1).bit_length()
    pairs = [(i, j) for i, j in _odd_even_merge_sort(wires) if j < count]
    needed, kept = {count // 2}, []
    for i, j in reversed(pairs):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def _odd_even_merge_sort(wires: int) -> list[tuple[int, int]]:
    """Batcher's sorting network for a power-of-two number of wires, as ``(i < j)`` pairs."""
    pairs = []
    span = 1
    while span < wires:
        step = span
        while step >= 1:
            for start in range(step % span, wires - step, 2 * step):
                for offset in range(min(step, wires - start - step)):
                    i = start + offset
                    if i // (2 * span) == (i + step) // (2 * span):
                        pairs.append((i, i + step))
            step //= 2
        span *= 2
    return pairs


def _window(offset: tuple[int, ...], shape: torch.Size) -> tuple[slice, ...]:
    """Index of the maps shifted by ``offset`` inside their padded copy (all maps)."""
    return (slice(None), *(slice(o, o + n) for o, n in zip(offset, shape, strict=True)))


def _median_by_network(padded: torch.Tensor, size: int, shape: torch.Size) -> torch.Tensor:
    """:func:`median_filter` of replicate-padded maps, a chunk of maps at a time."""
    offsets = list(itertools.product(range(size), repeat=len(shape)))
    network = selection_network(len(offsets))
    per_chunk = max(1, MEDIAN_CHUNK_VOXELS // max(1, math.prod(shape)))
    chunks = []
    for chunk in padded.split(per_chunk):
        values = [
            chunk[
                (slice(None), *(slice(o, o + n) for o, n in zip(offset, shape, strict=True)))
            ].clone()
            for offset in offsets
        ]
        spare = torch.empty_like(values[0])
        for i, j in network:
            torch.minimum(values[i], values[j], out=spare)
            torch.maximum(values[i], values[j], out=values[j])
            values[i], spare = spare, values[i]
        chunks.append(values[len(values) // 2])
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def every_voxel_if_empty(foreground: torch.Tensor) -> torch.Tensor:
    """The foreground masks ``(B, *spatial)``, with an empty one replaced by all voxels.

    An image without foreground (a slice above the head, a failed mask) is scored over the
    whole image rather than not at all.
    """
    empty = ~foreground.flatten(1).any(dim=1)  # no branch on the data: exportable to ONNX
    return foreground | empty.view(-1, *([1] * (foreground.dim() - 1)))


def top_fraction_mean(
    maps: torch.Tensor, foreground: torch.Tensor, fraction: float
) -> torch.Tensor:
    """Mean of the highest ``fraction`` of each map's foreground voxels (at least one).

    An empty foreground counts as every voxel.
    """
    foreground = every_voxel_if_empty(foreground)
    flat = maps.flatten(1).double().masked_fill(~foreground.flatten(1), -math.inf)
    ordered = flat.sort(dim=1, descending=True).values
    counts = foreground.flatten(1).sum(dim=1)
    k = (counts.double() * fraction).round().clamp_min(1).long().clamp_max(counts)
    totals = ordered.cumsum(dim=1).gather(1, (k - 1).unsqueeze(1))[:, 0]
    return (totals / k.double()).float()


def masked_percentile(maps: torch.Tensor, foreground: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0-100, linear interpolation) of each map inside its foreground.

    An empty foreground counts as every voxel. As :func:`torch.quantile` of each map's
    foreground voxels, computed for the whole batch at once (no loop, no boolean indexing), so
    that the scoring is one graph with a dynamic batch size (ONNX export).
    """
    foreground = every_voxel_if_empty(foreground).flatten(1)
    flat = maps.flatten(1).double().masked_fill(~foreground, math.inf)
    ordered = flat.sort(dim=1).values  # the foreground voxels first, ascending
    position = (foreground.sum(dim=1) - 1).double() * (q / 100.0)
    low = position.floor()
    high = position.ceil()
    below = ordered.gather(1, low.long().unsqueeze(1))[:, 0]
    above = ordered.gather(1, high.long().unsqueeze(1))[:, 0]
    return torch.lerp(below, above, position - low).float()


SCORE_REDUCTIONS = ("percentile", "top", "sum", "mean", "max")


def reduce_inside(
    maps: torch.Tensor, foreground: torch.Tensor, how: str, value: float
) -> torch.Tensor:
    """One score per map ``(B,)`` from its voxels inside ``foreground``.

    Args:
        maps: Anomaly maps ``(B, *spatial)``.
        foreground: Bool masks like ``maps``; an empty one counts as every voxel.
        how: ``percentile`` (the ``value``-th percentile), ``top`` (mean of the highest
            ``value`` share of the voxels), ``sum``, ``mean`` or ``max``.
        value: The percentile (0-100) or the share (0-1); unused otherwise.
    """
    if how == "percentile":
        return masked_percentile(maps, foreground, value)
    if how == "top":
        return top_fraction_mean(maps, foreground, value)
    inside = every_voxel_if_empty(foreground).flatten(1)
    flat = maps.flatten(1).float()
    if how == "sum":
        return (flat * inside).sum(dim=1)
    if how == "mean":
        return (flat * inside).sum(dim=1) / inside.sum(dim=1)
    if how == "max":
        return flat.masked_fill(~inside, -math.inf).max(dim=1).values
    raise ConfigError(
        f"score reduction must be one of {SCORE_REDUCTIONS}, got {how!r}."
        + did_you_mean(how, SCORE_REDUCTIONS)
    )


REDUCTIONS = ("mean", "max", "top")


@dataclass(frozen=True)
class MapScoring:
    """Read the image score off a standardised, smoothed anomaly map (``map_score:``).

    A model's own score averages its residual over the whole image, where the voxels that
    are hard to reconstruct in *every* image (bone edges, the skull base) drown the few that
    hold a lesion. With ``standardise`` each voxel's residual is divided by what the normal
    training images show at that voxel (mean + SD of their residuals there, plus 1 % of its
    image-wide mean so that voxels that are always perfectly reconstructed do not dominate);
    a box filter of ``smooth`` voxels then favours lesion-sized blobs over single noisy
    voxels, and the score is the mean of the ``top_fraction`` highest voxels (``top``), the
    maximum or the mean. The standardised map is also what ``anomaly_map`` returns. Under the
    head CT 2x5 CV of the UAD slide deck it lifts the VAE from AUROC 0.77 to 0.88
    (``docs/benchmarks/head_ct.md``).

    Attributes:
        standardise: Standardise each voxel by the normal training residuals.
        smooth: Width of the box filter in voxels (1: no smoothing).
        reduce: ``top``, ``max`` or ``mean``.
        top_fraction: Share of the voxels averaged by ``top``.
    """

    standardise: bool = True
    smooth: int = 5
    reduce: str = "top"
    top_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ConfigError(
                f"map_score: reduce must be one of {REDUCTIONS}, got {self.reduce!r}."
                + did_you_mean(self.reduce, REDUCTIONS)
            )
        if self.smooth < 1 or self.smooth % 2 == 0:
            raise ConfigError(f"map_score: smooth must be an odd width >= 1, got {self.smooth}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(
                f"map_score: top_fraction must lie in (0, 1], got {self.top_fraction}"
            )

    @classmethod
    def from_any(cls, value: MapScoring | dict[str, Any] | None) -> MapScoring | None:
        """Build from a YAML mapping (``None`` keeps the model's own score)."""
        if value is None or isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"map_score: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**value)

    @staticmethod
    def statistics(maps: np.ndarray) -> np.ndarray:
        """Per-voxel scale ``(*spatial)`` of normal maps ``(N, *spatial)``: mean + SD + floor."""
        moments = RunningMoments()
        moments.add(maps)
        return MapScoring.scale(moments.mean, moments.sd)

    @staticmethod
    def scale(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
        """Per-voxel scale from the mean and SD of normal maps: mean + SD + a small floor."""
        typical = np.asarray(mean, dtype=np.float64) + np.asarray(sd, dtype=np.float64)
        floor = 0.01 * float(typical.mean()) or 1e-12
        return (typical + floor).astype(np.float32)

    def transform(self, maps: torch.Tensor, scale: np.ndarray | None) -> torch.Tensor:
        """Standardised (if fitted) and smoothed maps ``(B, *spatial)``."""
        maps = maps.float()
        if self.standardise and scale is not None:
            maps = maps / torch.as_tensor(scale, device=maps.device)
        if self.smooth > 1:
            pool = functional.avg_pool2d if maps.dim() == 3 else functional.avg_pool3d
            pad = self.smooth // 2
            maps = pool(maps.unsqueeze(1), self.smooth, 1, pad, count_include_pad=False)[:, 0]
        return maps

    def reduce_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """One score per image from its (transformed) map."""
        flat = maps.flatten(1)
        if self.reduce == "mean":
            return flat.mean(dim=1)
        if self.reduce == "max":
            return flat.max(dim=1).values
        k = max(1, round(self.top_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)


class RunningMoments:
    """Per-voxel mean and SD (``ddof=1``) of maps added batch by batch.

    Batches are merged with Chan et al.'s pairwise update (float64), so that the result
    equals NumPy's over the whole stack up to rounding while memory holds one batch.

    Attributes:
        count: Maps added so far.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def add(self, maps: np.ndarray) -> None:
        """Add a batch of maps ``(B, *spatial)``."""
        maps = np.asarray(maps, dtype=np.float64)
        n = len(maps)
        if n == 0:
            return
        mean = maps.mean(axis=0)
        m2 = np.square(maps - mean).sum(axis=0)
        if self._mean is None:
            self.count, self._mean, self._m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        """Per-voxel mean."""
        if self._mean is None:
            raise ValueError("RunningMoments: no maps added")
        return self._mean

    @property
    def sd(self) -> np.ndarray:
        """Per-voxel SD with ``ddof=1`` (zeros for a single map)."""
        if self.count < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(self._m2 / (self.count - 1))


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start of every window of side ``patch`` along an axis of ``size`` voxels.

    Windows start every ``stride`` voxels and the last one is flush with the border, so the
    windows cover the axis; an axis no longer than the patch has one window at 0.
    """
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, max(1, stride)))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts
