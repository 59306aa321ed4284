"""No-model baselines: plain statistics of the normal training images, fitted like a detector.

A benchmark without these rows can mislead: thresholding FLAIR brightness beats most
autoencoders on brain lesions (Meissen et al. 2021), and an enlarged gland is, first of all,
a larger mask. Both baselines follow the detector interface (``fit`` on normal images, the
default threshold mean + k * SD of held-out normal scores, ``save``/``load``), so
``medanomaly cv`` and every benchmark run them under the same protocol as the models.

* ``intensity``: the map is each voxel's intensity standardised against the normal training
  images (one mean and SD per channel inside the foreground, or per voxel); the score is a
  high percentile of the map inside the foreground.
* ``volume``: the score is the foreground voxel count's deviation from the normal training
  volumes, in SDs; the map shows where the case has foreground that normal images rarely
  have there (or lacks what they have).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medanomaly._version import __version__
from medanomaly.data.sets import Cases, ImageSet, as_cases
from medanomaly.detectors.base import (
    MODEL_FILE,
    AnomalyResult,
    BaseDetector,
    yaml_plain,
)
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import SCORE_REDUCTIONS, foreground_mask, reduce_inside
from medanomaly.errors import InvalidImageError, check_choice
from medanomaly.training.engine import EngineConfig, split_indices

DIRECTIONS = ("high", "low", "both")
BATCH_VOXELS = 2**22
SD_FLOOR = 1e-6


class StatisticDetector(BaseDetector):
    """Base of the baselines: statistics of normal images instead of a network.

    A subclass gives ``fit_statistics(images)`` (learn from normal training images),
    ``evaluate(x)`` (scores and maps of a batch tensor) and ``statistics()`` (its learned
    arrays, for saving); ``fit``, the threshold, batching, input checks and persistence live
    here. The images are read a chunk at a time, so that a streamed set (see
    :mod:`medanomaly.data.streaming`) is fitted and scored without being held in memory; its cases
    must share one grid.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        foreground_threshold: Voxels with any channel above it are foreground; ``None``:
            every voxel.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Only ``val_fraction`` and ``seed`` are used (the held-out normals of the
            threshold when ``fit`` gets no validation set); accepted like every detector's.
    """

    baseline: ClassVar[bool] = True
    exportable: ClassVar[bool] = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        foreground_threshold: float | None = None,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.foreground_threshold = foreground_threshold
        self.threshold_sd = threshold_sd
        self.engine = engine

    @property
    def engine_config(self) -> EngineConfig:
        """The resolved settings (``val_fraction`` and ``seed`` matter here)."""
        return EngineConfig.from_any(self.engine)

    # -- what a baseline defines ------------------------------------------------------------
    @abstractmethod
    def fit_statistics(self, images: np.ndarray | Cases) -> None:
        """Learn the statistics from normal training images ``(N, C, *spatial)``.

        ``images`` is an array or a set of cases on one grid; read it with :func:`_chunks`.
        """

    @abstractmethod
    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (B,), maps (B, *spatial))`` of a batch."""

    @abstractmethod
    def statistics(self) -> dict[str, np.ndarray]:
        """The learned arrays by attribute name (each ends in ``_``)."""

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet | np.ndarray | torch.Tensor,
        val: ImageSet | np.ndarray | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> StatisticDetector:
        """Learn the statistics of normal images and the threshold.

        Args:
            train: Normal training images (images labelled abnormal are left out).
            val: Validation images; its normal ones set the threshold. ``None`` holds out
                ``engine.val_fraction`` of ``train``.
            run_dir: Where to save ``model.safetensors`` and ``config.yaml``.
            resume: Accepted for the common interface (there is nothing to resume).

        Returns:
            ``self``, fitted.
        """
        train_set = as_cases(train, self.spatial_dims)
        train_set = train_set.subset(train_set.labels != 1)
        if val is None:
            cfg = self.engine_config
            keep, held = split_indices(len(train_set), cfg.val_fraction, cfg.seed, cfg.val_min)
            train_set, normal = train_set.subset(keep), train_set.subset(held)
        else:
            val_set = as_cases(val, self.spatial_dims)
            normal = val_set.subset(val_set.labels != 1)
        if len(train_set) == 0:
            raise InvalidImageError("<input>", f"{self.name}: no normal training image")
        shape = _one_shape(train_set, self.name)
        self._check_channels(shape[0])
        self.input_shape_ = shape
        self.fit_statistics(train_set)
        self.history_: list[dict[str, float]] = []
        self.run_config_ = self._run_config(run_dir)
        self._learn_threshold(self.score(normal if len(normal) else train_set))
        if run_dir is not None:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def calibrate(self, normal: ImageSet | np.ndarray | torch.Tensor) -> StatisticDetector:
        """Recompute ``threshold_`` from held-out normal images."""
        self._learn_threshold(self.score(normal))
        return self

    def _check_channels(self, channels: int) -> None:
        if channels != self.in_channels:
            raise InvalidImageError(
                "<input>", f"images have {channels} channels, the model expects {self.in_channels}"
            )

    # -- inference --------------------------------------------------------------------------
    def _batches(self, x: Any) -> Iterator[torch.Tensor]:
        """Batches of ``x`` in input order (a streamed set is read a chunk at a time)."""
        images = as_cases(x, self.spatial_dims)
        expected = self.input_shape_
        if expected is not None:
            for i, shape in enumerate(images.shapes):
                if tuple(shape) != tuple(expected):
                    raise InvalidImageError(
                        images.ids[i] if images.ids else "<input>",
                        f"image shape {tuple(shape)} differs from the training shape "
                        f"{tuple(expected)}; apply the same preprocessing as for training",
                    )
        yield from _chunks(images)

    def detect(self, x: ImageSet | np.ndarray | torch.Tensor) -> AnomalyResult:
        """Scores, maps and labels of images ``(N, C, *spatial)``."""
        self.check_fitted()
        scores, maps = [], []
        for batch in self._batches(x):
            s, m = self.evaluate(batch)
            scores.append(s.double().numpy())
            maps.append(m.float().numpy())
        scores_array = np.concatenate(scores) if scores else np.zeros(0)
        return AnomalyResult(
            scores=scores_array,
            labels=(scores_array > self.threshold_).astype(np.int64),
            maps=np.concatenate(maps) if maps else np.zeros((0, *self.input_shape_[1:])),
            reconstructions=None,
            threshold=self.threshold_,
        )

    def score(self, x: ImageSet | np.ndarray | torch.Tensor) -> np.ndarray:
        """One score per image (no maps kept)."""
        if self.input_shape_ is None:
            self.check_fitted()
        scores = [self.evaluate(batch)[0].double().numpy() for batch in self._batches(x)]
        return np.concatenate(scores) if scores else np.zeros(0)

    def scoring_graph(self) -> nn.Module:
        """The statistics and the scoring as one module: images -> ``(scores, maps)``."""
        self.check_fitted()
        if not self.exportable:
            return super().scoring_graph()
        return _StatisticGraph(self)

    def foreground(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground voxels ``(B, *spatial)`` of a batch."""
        return foreground_mask(x, self.foreground_threshold)

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name, ...params}, engine: {...}}``."""
        params = {k: yaml_plain(v) for k, v in self.get_params().items() if k != "engine"}
        return {"model": {"name": self.name, **params}, "engine": self.engine_config.to_dict()}

    def saved_state(self) -> dict[str, Any]:
        """Constructor arguments, the learned statistics and the threshold."""
        params = {k: yaml_plain(v) for k, v in self.get_params().items()}
        params["engine"] = self.engine_config.to_dict()
        return {
            "model": self.name,
            "params": params,
            "config": getattr(self, "run_config_", None) or self.config(),
            "version": __version__,
            "statistics": {k: np.asarray(v) for k, v in self.statistics().items()},
            "input_shape": list(self.input_shape_),
            **self._threshold_state(),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        for name, value in saved["statistics"].items():
            setattr(self, name, np.asarray(value))
        self.input_shape_ = tuple(saved["input_shape"])
        self._restore_threshold(saved)
        self.history_ = []
        self.run_config_ = saved.get("config", {})


class _StatisticGraph(nn.Module):
    """:meth:`StatisticDetector.evaluate` as a module (its statistics become constants)."""

    def __init__(self, detector: StatisticDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and maps ``(B, *spatial)`` of a batch."""
        scores, maps = self.detector.evaluate(images)
        return scores.float(), maps.float()


def _directed(values: torch.Tensor, direction: str) -> torch.Tensor:
    """``values`` (high), ``-values`` (low) or ``|values|`` (both)."""
    if direction == "high":
        return values
    return -values if direction == "low" else values.abs()


@register("intensity")
class IntensityBaseline(StatisticDetector):
    """The intensity itself, standardised against normal images, as the anomaly map.

    Fit: the mean and SD of each channel's intensities inside the foreground of the normal
    training images (``per_voxel``: at each voxel, over the training images where it is
    foreground; voxels never or once foreground use the channel's global figures). Map: the
    channels' mean z-score, signed by ``direction`` (``high`` for hyperintense lesions such
    as FLAIR lesions or acute blood on CT); outside the foreground it takes the image's lowest
    value inside. Score: ``score_reduce`` of the map inside the foreground (default its 99th
    percentile).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        per_voxel: Standardise each voxel by its own normal mean and SD (needs aligned images).
        direction: ``high`` (brighter is abnormal), ``low`` or ``both``.
        score_reduce: ``percentile``, ``top``, ``sum``, ``mean`` or ``max``.
        score_value: The percentile (0-100) or share (0-1).
        foreground_threshold: Voxels with any channel above it are foreground; ``None``: all.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Only ``val_fraction`` and ``seed`` are used.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        per_voxel: bool = False,
        direction: str = "high",
        score_reduce: str = "percentile",
        score_value: float = 99.0,
        foreground_threshold: float | None = None,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, foreground_threshold, threshold_sd, engine)
        self.per_voxel = per_voxel
        self.direction = direction
        self.score_reduce = score_reduce
        self.score_value = score_value

    def fit_statistics(self, images: np.ndarray | Cases) -> None:
        """Mean and SD per channel (and per voxel) inside the normal foregrounds."""
        check_choice(self.name, "direction", self.direction, DIRECTIONS)
        check_choice(self.name, "score_reduce", self.score_reduce, SCORE_REDUCTIONS)
        totals = _Moments()
        for x in _chunks(images):
            totals.add(x.double(), self.foreground(x).unsqueeze(1).expand_as(x))
        mean, sd = totals.channel_mean_sd()
        mean_, sd_ = mean, sd.clamp_min(SD_FLOOR)
        if self.per_voxel:
            voxel_mean, voxel_sd, voxel_count = totals.voxel_mean_sd()
            enough = voxel_count >= 2
            shape = (-1, *([1] * self.spatial_dims))
            mean_ = torch.where(enough, voxel_mean, mean.view(shape))
            sd_ = torch.where(enough & (voxel_sd > SD_FLOOR), voxel_sd, sd_.view(shape))
        self.mean_ = mean_.float().numpy()
        self.sd_ = sd_.float().numpy()

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and standardised-intensity maps."""
        mean, sd = torch.from_numpy(self.mean_), torch.from_numpy(self.sd_)
        if not self.per_voxel:
            mean, sd = _channels(mean, x), _channels(sd, x)
        z = _directed(((x.float() - mean) / sd).mean(dim=1), self.direction)
        inside = self.foreground(x)
        floor = z.masked_fill(~inside, float("inf")).flatten(1).min(dim=1).values
        floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
        maps = torch.where(inside, z, floor.view(-1, *([1] * (z.dim() - 1))))
        return reduce_inside(maps, inside, self.score_reduce, self.score_value), maps

    def statistics(self) -> dict[str, np.ndarray]:
        """``mean_`` and ``sd_``."""
        return {"mean_": self.mean_, "sd_": self.sd_}


@register("volume")
class VolumeBaseline(StatisticDetector):
    """How far the foreground's voxel count lies from the normal volumes', in SDs.

    Fit: mean and SD of the foreground voxel counts of the normal training images, and the
    share of them in which each voxel is foreground (an occupancy atlas). Score: the count's
    z-score, signed by ``direction`` (``high``: larger than normal is abnormal, e.g. an
    enlarged gland). Map: foreground (1/0) minus the normal occupancy, so that tissue where
    normal images rarely have any stands out (``both``: its absolute value; ``low``: negated).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        direction: ``high``, ``low`` or ``both``.
        foreground_threshold: Voxels with any channel above it are foreground (default 0.5:
            binary masks scaled to [0, 1]); ``None`` counts every voxel, which is useless.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Only ``val_fraction`` and ``seed`` are used.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        direction: str = "both",
        foreground_threshold: float | None = 0.5,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, foreground_threshold, threshold_sd, engine)
        self.direction = direction

    def fit_statistics(self, images: np.ndarray | Cases) -> None:
        """Mean and SD of the foreground counts; per-voxel occupancy."""
        check_choice(self.name, "direction", self.direction, DIRECTIONS)
        counts: list[torch.Tensor] = []
        occupancy: torch.Tensor | float = 0.0
        for x in _chunks(images):
            inside = self.foreground(x)
            counts.append(inside.flatten(1).sum(dim=1).double())
            occupancy = occupancy + inside.double().sum(dim=0)
        counts = torch.cat(counts)
        self.count_mean_ = np.asarray(float(counts.mean()))
        sd = float(counts.std()) if len(counts) > 1 else 0.0
        self.count_sd_ = np.asarray(max(sd, 1.0))  # one voxel: a floor for identical counts
        self.occupancy_ = (occupancy / len(images)).float().numpy()

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count z-scores and foreground-minus-occupancy maps."""
        inside = self.foreground(x)
        counts = inside.flatten(1).sum(dim=1).double()
        z = (counts - float(self.count_mean_)) / float(self.count_sd_)
        maps = inside.float() - torch.from_numpy(self.occupancy_)
        return _directed(z, self.direction), _directed(maps, self.direction)

    def statistics(self) -> dict[str, np.ndarray]:
        """``count_mean_``, ``count_sd_`` and ``occupancy_``."""
        return {
            "count_mean_": self.count_mean_,
            "count_sd_": self.count_sd_,
            "occupancy_": self.occupancy_,
        }


def _channels(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``(C,)`` shaped to broadcast over a batch like ``like``."""
    return values.to(like.dtype if like.is_floating_point() else torch.float32).view(
        1, -1, *([1] * (like.dim() - 2))
    )


def _chunks(images: np.ndarray | Cases) -> Iterator[torch.Tensor]:
    """``images`` in input order as tensors of about :data:`BATCH_VOXELS` voxels each.

    An array is sliced (no copy of the set); a set of cases (one grid) is read a chunk at a
    time, so that a streamed set is never held whole.
    """
    if isinstance(images, np.ndarray):
        step = max(1, BATCH_VOXELS // max(int(np.prod(images.shape[1:])), 1))
        for start in range(0, len(images), step):
            yield torch.from_numpy(np.ascontiguousarray(images[start : start + step]))
        return
    for index in images.chunks(lambda shape: BATCH_VOXELS // max(int(np.prod(shape)), 1)):
        part = np.asarray(images.batch(index), dtype=np.float32)
        yield torch.from_numpy(np.ascontiguousarray(part))


def _one_shape(images: Cases, owner: str) -> tuple[int, ...]:
    """The one shape ``(C, *spatial)`` of ``images``.

    Raises:
        InvalidImageError: The cases have different shapes (a baseline compares voxels).
    """
    shapes = images.shapes
    for i, shape in enumerate(shapes):
        if tuple(shape) != tuple(shapes[0]):
            raise InvalidImageError(
                images.ids[i],
                f"{owner}: shape {tuple(shape)} differs from {tuple(shapes[0])}; the baseline "
                "needs every training image on one grid (resize or pad them to one shape)",
            )
    return tuple(int(n) for n in shapes[0])


class _Moments:
    """Running sums of values inside masks, per channel and per voxel (float64)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, x: torch.Tensor, inside: torch.Tensor) -> None:
        weight = inside.double()
        parts = ((x * weight).sum(dim=0), (x * x * weight).sum(dim=0), weight.sum(dim=0))
        if self.sum is None:
            self.sum, self.squares, self.count = parts
        else:
            self.sum, self.squares, self.count = (
                a + b for a, b in zip((self.sum, self.squares, self.count), parts, strict=True)
            )

    @staticmethod
    def _mean_sd(
        total: torch.Tensor, squares: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = count.clamp_min(1.0)
        mean = total / n
        return mean, (squares / n - mean**2).clamp_min(0.0).sqrt()

    def channel_mean_sd(self) -> tuple[torch.Tensor, torch.Tensor]:
        axes = tuple(range(1, self.sum.dim()))
        return self._mean_sd(self.sum.sum(axes), self.squares.sum(axes), self.count.sum(axes))

    def voxel_mean_sd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, sd = self._mean_sd(self.sum, self.squares, self.count)
        return mean, sd, self.count
