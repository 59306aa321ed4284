"""The deep-learning base class: it owns data handling, the training loop, thresholds and saving.

A neural detector subclasses :class:`DeepDetector` and defines its network, its loss and how a
trained network scores a batch; :class:`~medanomaly.training.engine.Engine` runs the loop.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medanomaly._version import __version__
from medanomaly.data.sets import Cases, ImageSet, as_cases
from medanomaly.detectors.base import (
    INFERENCE_VOXELS,
    MODEL_FILE,
    RESOLVED_KEY,
    AnomalyResult,
    BaseDetector,
    yaml_plain,
)
from medanomaly.detectors.scoring import MapScoring, RunningMoments
from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.training.compiled import compile_network, dynamic_batch
from medanomaly.training.engine import (
    Engine,
    EngineConfig,
    TrainingData,
    TrainingTask,
    resolve_precision,
    scoring_network,
    seeded,
    split_indices,
)
from medanomaly.training.layout import (
    MEASURE_IMAGES,
    choose_layout,
    layout_of,
    set_network_layout,
    to_layout,
)

log = logging.getLogger(__name__)


class DeepDetector(BaseDetector):
    """Base of the neural detectors: owns data handling, training, thresholds and saving.

    A subclass provides three things: ``build_network(input_shape)``, ``loss(network, x)``
    (scalar, for training) and ``evaluate(network, x)`` returning per-image scores, maps and
    optionally reconstructions. Everything else (the loop, early stopping, checkpoints,
    resume, thresholds, input checks, save/load) lives here and in
    :mod:`medanomaly.training.engine`.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: Image channels.
        threshold_sd: ``k`` in the default threshold mean + k * SD of normal validation scores.
        engine: Training settings (:class:`~medanomaly.training.engine.EngineConfig` or a dict).
        map_score: Score images from their standardised, smoothed anomaly maps instead of
            the model's own score (:class:`~medanomaly.detectors.scoring.MapScoring` or its dict
            form,
            e.g. ``{smooth: 5, reduce: top}``); ``None`` keeps the model's score.
    """

    epoch_monitor_: str | None = None
    """What ranked the epochs of the fit, in words (``resolved: epoch_monitor`` in config.yaml)."""
    memory_formats_: dict[str, str] | None = None
    """The layout of each phase on the machine that fitted (``resolved: memory_format``)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: MapScoring | dict[str, Any] | None = None,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.threshold_sd = threshold_sd
        self.engine = engine
        self.map_score = map_score

    # -- what a model defines -------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Each spatial side must be divisible by this (the network's total down-sampling)."""
        return 16

    def training_collate(self) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
        """How training cases of different shapes join one batch; ``None``: by shape.

        A model trained on random patches (``resnet_ae``) crops each case's patch here.
        """
        return None

    @abstractmethod
    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Make the network for images of ``input_shape`` ``(C, *spatial)``."""

    @abstractmethod
    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch (a scalar)."""

    @abstractmethod
    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(scores (B,), maps (B, *spatial), reconstructions or None)``."""

    # -- fitting --------------------------------------------------------------------------
    @property
    def engine_config(self) -> EngineConfig:
        """The resolved training settings."""
        return EngineConfig.from_any(self.engine)

    def fit(
        self,
        train: ImageSet | np.ndarray | torch.Tensor,
        val: ImageSet | np.ndarray | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> DeepDetector:
        """Train on normal images.

        Args:
            train: Normal training images ``(N, C, *spatial)``; images of an ``ImageSet``
                labelled abnormal are left out.
            val: Validation images. Its normal images drive early stopping and the
                threshold; its abnormal images (if labelled) only feed the training curves.
                ``None`` holds out ``engine.val_fraction`` of ``train``.
            run_dir: Where to keep the checkpoint, history, config and final model.
            resume: Continue an interrupted run from ``run_dir``.

        Returns:
            ``self``, fitted.
        """
        cfg = self.engine_config
        data = self._training_data(train, val, cfg)
        input_shape = self._training_shape(data)
        with seeded(cfg.seed):
            network = self.build_network(input_shape)
        self.run_config_ = self._run_config(run_dir)
        engine = Engine(cfg)
        self.history_ = self.train_network(engine, network, data, run_dir, resume)
        self.epoch_monitor_ = engine.monitor_used
        self.is_main_process_ = engine.is_global_zero
        self.network_ = inference_network(network, self.spatial_dims)
        self.input_shape_ = input_shape
        self.memory_formats_ = {"training": engine.memory_format_used}
        self._fit_map_statistics(data.train)
        self._set_threshold(data.val_normal if len(data.val_normal) else data.train)
        if run_dir is not None and self.is_main_process_:
            self.record_resolved(run_dir)
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def train_network(
        self,
        engine: Engine,
        network: nn.Module,
        data: TrainingData,
        run_dir: str | Path | None,
        resume: bool,
    ) -> list[dict[str, float]]:
        """Optimise ``network`` in place; return the per-epoch history.

        The default minimises :meth:`loss` in one stage. Models trained in several stages
        or with several optimisers (GANs) override this and call ``engine.fit`` per stage
        with their own :class:`~medanomaly.training.engine.TrainingTask`.
        """
        score, refresh = self._validation_scoring(data.train)
        task = TrainingTask(
            network=network,
            loss=self.loss,
            score=score,
            before_validation=refresh,
            collate=self.training_collate(),
        )
        return engine.fit(task, data, run_dir=run_dir, resume=resume, extra_state=self.config())

    def _validation_scoring(
        self, normal: ImageSet
    ) -> tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[nn.Module], None]]:
        """The score the engine validates with, and what refreshes it before each validation.

        With ``map_score`` the validation scores are the final ones: the per-voxel scale is
        recomputed from the normal training images with the current weights, so that
        ``monitor: val_auroc`` ranks epochs by the score the detector will use.
        """
        scoring = self.map_scoring
        if scoring is None:
            return self._score_only, lambda network: None

        def refresh(network: nn.Module) -> None:
            self._fit_map_statistics(normal, network)

        def score(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
            maps = scoring.transform(self.evaluate(network, x)[1], self.map_scale_)
            return scoring.reduce_maps(maps)

        self.map_scale_ = None
        return score, refresh

    def _training_shape(self, data: TrainingData) -> tuple[int, ...]:
        """The most common shape of the training cases, after checking every shape.

        Cases of several shapes (training and validation) train only a model that scores
        any size; for the others the error names the odd cases.
        """
        sets = [s for s in (data.train, data.val_normal, data.val_abnormal) if s is not None]
        shapes = [shape for s in sets for shape in s.shapes]
        ids = [i for s in sets for i in s.ids]
        distinct = sorted(set(data.train.shapes), key=shapes.count, reverse=True)
        distinct += sorted(set(shapes) - set(distinct))
        if len(distinct) > 1 and not self.scores_any_size:
            odd = [
                f"{Path(i).name} {s}" for i, s in zip(ids, shapes, strict=True) if s != distinct[0]
            ]
            raise ConfigError(
                f"{self.name or type(self).__name__} trains on one grid, but the training "
                f"images have {len(distinct)} shapes (most are {distinct[0]}; "
                f"{', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}); add a 'resize' (or "
                "'pad') step to data.transforms"
            )
        for shape in set(data.train.shapes):
            self._check_input_shape(shape)
        return distinct[0] if distinct else ()

    def _training_data(self, train: Any, val: Any, cfg: EngineConfig) -> TrainingData:
        train_set = as_cases(train, self.spatial_dims)
        if (train_set.labels == 1).any():
            log.info("fit: leaving out %d images labelled abnormal", int(train_set.labels.sum()))
            train_set = train_set.subset(train_set.labels != 1, keep_augment=True)
        if val is None:
            keep, held = split_indices(len(train_set), cfg.val_fraction, cfg.seed, cfg.val_min)
            return TrainingData(
                train_set.subset(keep, keep_augment=True), train_set.subset(held), None
            )
        val_set = as_cases(val, self.spatial_dims)
        abnormal = val_set.abnormal
        return TrainingData(
            train_set, val_set.subset(val_set.labels != 1), abnormal if len(abnormal) else None
        )

    def _check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        channels, *spatial = input_shape
        if channels != self.in_channels:
            raise InvalidImageError(
                "<input>", f"images have {channels} channels, the model expects {self.in_channels}"
            )
        bad = [s for s in spatial if s % self.size_multiple]
        if bad:
            raise InvalidImageError(
                "<input>",
                f"spatial size {tuple(spatial)} is not divisible by {self.size_multiple}; "
                f"resize or pad the images (e.g. to {self.size_multiple * 4} per axis)",
            )

    @property
    def map_scoring(self) -> MapScoring | None:
        """The resolved ``map_score`` setting (``None``: the model's own score)."""
        return MapScoring.from_any(self.map_score)

    def _fit_map_statistics(self, normal: Cases, network: nn.Module | None = None) -> None:
        """Per-voxel residual statistics of the normal training images (no augmentation).

        The maps are summed batch by batch (:class:`~medanomaly.detectors.scoring.RunningMoments`),
        so
        that memory holds one batch of maps, never the set's.

        Args:
            normal: The normal training images.
            network: Their maps come from this network (default the fitted ``network_``).

        Raises:
            ConfigError: The images have several shapes (per-voxel statistics need one grid).
        """
        self.map_scale_ = None
        scoring = self.map_scoring
        if scoring is None or not scoring.standardise:
            return
        if len(set(normal.shapes)) > 1:
            raise ConfigError(
                "map_score standardises each voxel by the normal training images, which needs "
                "them on one grid: add a 'resize' step or leave map_score's standardise off"
            )
        moments = RunningMoments()
        network = self.scoring_network(network)
        for _, batch in self._batches(normal, network):
            moments.add(self.evaluate(network, batch)[1].float().cpu().numpy())
        self.map_scale_ = scoring.scale(moments.mean, moments.sd)

    def calibrate(self, normal: ImageSet | np.ndarray | torch.Tensor) -> DeepDetector:
        """Recompute ``threshold_`` from held-out normal images (e.g. after changing the score).

        Args:
            normal: Normal images the network was not trained on.

        Returns:
            ``self``, with ``val_scores_`` and ``threshold_`` (mean + ``threshold_sd`` * SD) set.
        """
        self.check_fitted()
        self._set_threshold(as_cases(normal, self.spatial_dims))
        return self

    def _set_threshold(self, normal: Cases) -> None:
        self._learn_threshold(self._run(normal, with_maps=False)[0])

    def _score_only(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(network, x)[0]

    # -- inference ------------------------------------------------------------------------
    def detect(self, x: Cases | np.ndarray | torch.Tensor) -> AnomalyResult:
        """Score, map and label images ``(N, C, *spatial)`` in one pass.

        This keeps every map: give a large or streamed set in chunks (``x.chunks(n)``,
        ``x.subset(index)``), as the batch jobs do.
        """
        self.check_fitted()
        scores, maps, recons = self._run(x, with_maps=True)
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=maps,
            reconstructions=recons,
            threshold=self.threshold_,
        )

    def score(self, x: ImageSet | np.ndarray | torch.Tensor) -> np.ndarray:
        """One anomaly score per image, higher = more abnormal; maps are never kept."""
        self.check_fitted()
        return self._run(x, with_maps=False)[0]

    def inference_batch_size(self, voxels_per_image: int) -> int:
        """Images per scoring batch: about ``INFERENCE_VOXELS`` voxels.

        Never fewer than the training batch (which fitted in memory), nor more than 512.
        """
        train = self.engine_config.batch_size
        return int(np.clip(INFERENCE_VOXELS // max(voxels_per_image, 1), train, max(train, 512)))

    def _run(
        self, x: Any, with_maps: bool, raw: bool = False, network: nn.Module | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Scores (and maps, reconstructions) of ``x`` in batches, in input order.

        Args:
            x: Images (any form of :class:`~medanomaly.data.sets.Cases`, or an array).
            with_maps: Keep maps and reconstructions.
            raw: The model's own scores and maps, without ``map_score``.
            network: Evaluate this network (default the fitted ``network_``).
        """
        network = self.scoring_network(network)
        cases = as_cases(x, self.spatial_dims)
        self._check_scoring_shape(cases)
        scores = np.zeros(len(cases), dtype=np.float64)
        maps: list[tuple[np.ndarray, np.ndarray]] = []
        recons: list[tuple[np.ndarray, np.ndarray]] = []
        scoring = None if raw else self.map_scoring
        for index, batch in self._batches(cases, network):
            if not with_maps and scoring is None:  # costly maps are skipped in _score_only
                scores[index] = self._score_only(network, batch).float().cpu().numpy()
                continue
            s, m, r = self.evaluate(network, batch)
            if scoring is not None:
                m = scoring.transform(m, self.map_scale_)
                s = scoring.reduce_maps(m)
            scores[index] = s.float().cpu().numpy()
            if with_maps:
                maps.append((index, m.float().cpu().numpy()))
                if r is not None:
                    recons.append((index, r.float().cpu().numpy()))
        if not with_maps:
            return scores, None, None
        return scores, _assemble(maps, len(cases)), _assemble(recons, len(cases))

    def scoring_network(self, network: nn.Module | None = None) -> nn.Module:
        """``network`` (default the fitted ``network_``) as scoring runs it.

        Under bf16 autocast where ``engine.precision`` resolves to ``bf16-mixed`` on the
        device that scores (:func:`~medanomaly.training.engine.scoring_network`). The fitted
        network is also put in its scoring layout (``engine.memory_format``, measured on
        this device with :meth:`evaluate` once per process) and, with ``engine.compile``,
        compiled; a network given (e.g. during training) keeps its layout.
        """
        config = self.engine_config
        if network is not None:
            return scoring_network(network, config)
        network = self.network_
        device = next(network.parameters()).device
        precision = resolve_precision(config, device.type)
        example = _example_images(self.input_shape_, device)

        def work(batch: torch.Tensor, module: nn.Module | None = None) -> None:
            with torch.inference_mode():
                self.evaluate(scoring_network(network if module is None else module, config), batch)

        layout = choose_layout(config.memory_format, network, example, "scoring", precision, work)
        set_network_layout(network, layout)
        self.memory_formats_ = {**(self.memory_formats_ or {}), "scoring": layout}
        if config.compile:
            network = self._compiled(network, (device, layout), work, to_layout(example, layout))
        return scoring_network(network, config)

    def _compiled(
        self, network: nn.Module, key: tuple[Any, ...], work: Callable[..., None], example: Any
    ) -> nn.Module:
        """``network`` compiled for scoring (kept while its device and layout stay)."""
        cached = self.__dict__.get("_compiled_scoring")
        if cached is not None and cached[0] is network and cached[1] == key:
            return cached[2]
        compiled = compile_network(network, lambda module: work(dynamic_batch(example), module))
        self.__dict__["_compiled_scoring"] = (network, key, compiled)
        return compiled

    def resolved_settings(self) -> dict[str, Any]:
        """What ``auto`` settings resolve to here: the precision and, once fitted, the monitor.

        ``engine.monitor: val_auroc`` falls back to ``val_loss`` with too few abnormal
        validation images (see :func:`medanomaly.training.engine.epoch_monitor`).
        """
        resolved: dict[str, Any] = {"precision": resolve_precision(self.engine_config)}
        if self.memory_formats_:
            resolved["memory_format"] = dict(self.memory_formats_)
        if self.epoch_monitor_ is not None:
            resolved["epoch_monitor"] = self.epoch_monitor_
        return resolved

    def _batches(
        self, cases: Cases, network: nn.Module
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(index, batch on the network's device)`` over ``cases``, one shape per batch.

        Images come through :meth:`~medanomaly.data.sets.Cases.batch`, not the dataset's items,
        so that a training set's augmentation stays off.
        """
        device = next(network.parameters()).device
        layout = layout_of(network)
        network.eval()
        with torch.inference_mode():
            for index in cases.chunks(lambda shape: self.inference_batch_size(math.prod(shape))):
                yield index, _to_device(cases.batch(index), device, layout)

    def _check_scoring_shape(self, images: Cases) -> None:
        """Raise unless ``images`` fit the network: its training grid, or any size.

        A model that scores any size (:attr:`scores_any_size`) checks the channels only.
        """
        expected = self.input_shape_
        if expected is None:
            return
        for case_id, shape in zip(images.ids, images.shapes, strict=True):
            if self.scores_any_size and shape[0] == expected[0]:
                continue
            if self.scores_any_size:
                raise InvalidImageError(
                    case_id, f"images have {shape[0]} channels, the model expects {expected[0]}"
                )
            if tuple(shape) != expected:
                raise InvalidImageError(
                    case_id,
                    f"image shape {tuple(shape)} differs from the training shape {expected}; "
                    "apply the same preprocessing as for training",
                )

    def latent(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Latent vectors ``(B, D)`` of a batch; ``None`` for models without a latent."""
        return None

    def embed(self, x: Cases | np.ndarray | torch.Tensor) -> np.ndarray:
        """Latent vectors ``(N, D)`` of images (for UMAP/clustering), where :attr:`has_latent`."""
        if not self.has_latent:
            return super().embed(x)
        self.check_fitted()
        cases = as_cases(x, self.spatial_dims)
        self._check_scoring_shape(cases)
        vectors = np.zeros((len(cases), 0))
        network = self.scoring_network()
        for index, batch in self._batches(cases, network):
            vector = self.latent(network, batch)
            vector = vector.float().flatten(1).cpu().numpy().astype(np.float64)
            if vectors.shape[1] != vector.shape[1]:
                vectors = np.zeros((len(cases), vector.shape[1]))
            vectors[index] = vector
        return vectors

    def scoring_graph(self) -> nn.Module:
        """The fitted network with its scoring: images -> ``(scores, maps)`` (see the base)."""
        self.check_fitted()
        if not self.exportable:
            return super().scoring_graph()
        return ScoringGraph(self)

    # -- persistence ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name, ...params}, engine: {...}}``."""
        params = {k: yaml_plain(v) for k, v in self.get_params().items() if k != "engine"}
        return {
            "model": {"name": self.name, **params},
            "engine": self.engine_config.to_dict(),
        }

    def saved_state(self) -> dict[str, Any]:
        """Weights, constructor arguments, fitted state and the resolved config."""
        params = {k: yaml_plain(v) for k, v in self.get_params().items()}
        params["engine"] = self.engine_config.to_dict()
        return {
            "model": self.name,
            "params": params,
            "config": getattr(self, "run_config_", None) or self.config(),
            "version": __version__,
            "state_dict": {k: v.cpu() for k, v in self.network_.state_dict().items()},
            "input_shape": list(self.input_shape_),
            **self._threshold_state(),
            "history": getattr(self, "history_", []),
            "map_scale": getattr(self, "map_scale_", None),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        self.input_shape_ = tuple(saved["input_shape"])
        network = self.build_network(self.input_shape_)
        network.load_state_dict(saved["state_dict"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.network_ = inference_network(network.to(device), self.spatial_dims)
        self._restore_threshold(saved)
        self.history_ = saved.get("history", [])
        self.run_config_ = saved.get("config", {})
        resolved = self.run_config_.get(RESOLVED_KEY) or {}
        self.epoch_monitor_ = resolved.get("epoch_monitor")
        self.memory_formats_ = resolved.get("memory_format")
        self.map_scale_ = saved.get("map_scale")


class ScoringGraph(nn.Module):
    """A fitted detector's :meth:`DeepDetector.evaluate` and ``map_score`` as one module.

    What :meth:`DeepDetector.detect` computes for a batch, without the batching, so that
    ``torch.onnx.export`` writes it as one graph: ``forward(images) -> (scores, maps)``.
    """

    def __init__(self, detector: DeepDetector) -> None:
        super().__init__()
        self.detector = detector
        self.network = detector.network_

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and maps ``(B, *spatial)`` of a batch."""
        scores, maps, _ = self.detector.evaluate(self.network, images)
        scoring = self.detector.map_scoring
        if scoring is not None:
            maps = scoring.transform(maps, self.detector.map_scale_)
            scores = scoring.reduce_maps(maps)
        return scores.float(), maps.float()


def inference_network(network: nn.Module, spatial_dims: int) -> nn.Module:
    """``network`` in eval mode (in place), for scoring.

    Its memory layout is set where scoring starts (:meth:`DeepDetector.scoring_network`,
    by ``engine.memory_format``), not fixed by the dimension: the faster layout differs
    between networks, phases and precisions (:mod:`medanomaly.training.layout`).
    """
    return network.eval()


def _example_images(input_shape: tuple[int, ...] | None, device: torch.device) -> Any:
    """A tiny batch of the input shape (fixed values; torch's random state is not drawn)."""
    if not input_shape:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.rand((MEASURE_IMAGES, *input_shape), generator=generator).to(device)


def _assemble(batches: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray | None:
    """Per-batch arrays ``(index, values)`` as one array ``(n, ...)`` in case order.

    Batches that are runs of cases in order are concatenated as they are; cases of several
    shapes give an object array holding one array per case.
    """
    if not batches or sum(len(index) for index, _ in batches) != n:
        return None
    order = np.concatenate([index for index, _ in batches])
    shapes = {values.shape[1:] for _, values in batches}
    if len(shapes) == 1 and np.array_equal(order, np.arange(n)):
        return np.concatenate([values for _, values in batches])
    if len(shapes) == 1:
        out = np.empty((n, *shapes.pop()), dtype=batches[0][1].dtype)
    else:
        out = np.empty(n, dtype=object)
    for index, values in batches:
        for j, i in enumerate(index):
            out[int(i)] = values[j]
    return out


def _to_device(array: np.ndarray, device: torch.device, layout: str) -> torch.Tensor:
    """A batch on ``device`` in the network's layout (``channels_last`` or ``contiguous``)."""
    return to_layout(torch.from_numpy(np.ascontiguousarray(array)).to(device), layout)
