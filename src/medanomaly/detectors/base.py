"""The detector interface: what every detector declares, learns, saves and loads.

Every detector follows scikit-learn's estimator rules: the constructor only stores its
arguments, ``fit`` learns state whose names end in ``_``, and ``get_params`` returns what the
constructor was given, so that a config maps one-to-one onto a detector.
"""

from __future__ import annotations

import copy
import inspect
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from torch import nn

from medanomaly._version import __version__
from medanomaly.data.loading import InputSpec
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.thresholds import mean_sd_threshold
from medanomaly.errors import ConfigError, MissingFileError, NotFittedError, did_you_mean
from medanomaly.io.atomic import atomic_write_text
from medanomaly.io.safe_files import load_state, save_state
from medanomaly.training.engine import (
    EngineConfig,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"
"""What medanomaly before 0.2 saved: a pickle, loaded only when trusted."""
CONFIG_FILE = "config.yaml"
EXPORT_FILE = "medanomaly_export.json"
"""What marks an export folder (``medanomaly export``; see :mod:`medanomaly.detectors.exported`)."""
RESOLVED_KEY = "resolved"
"""Top-level ``config.yaml`` block of what ``auto`` settings resolved to (read, never given)."""
INFERENCE_VOXELS = 2**20
MIN_THRESHOLD_NORMALS = 20
"""Fewer held-out normal scores than this make ``fit`` warn about its default threshold."""


@dataclass
class AnomalyResult:
    """What a detector says about a batch of images.

    Attributes:
        scores: One anomaly score per image ``(N,)``; higher is more abnormal.
        labels: Predicted labels ``(N,)`` (1 = abnormal) under ``threshold``.
        maps: Anomaly maps ``(N, *spatial)``, on the input grid (for cases of several
            shapes an object array holding one map per case).
        reconstructions: Reconstructed images ``(N, C, *spatial)`` where the model has them
            (an object array for cases of several shapes).
        threshold: The image-level threshold used for ``labels``.
    """

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    reconstructions: np.ndarray | None
    threshold: float

    def take(self, index: np.ndarray | list[int]) -> AnomalyResult:
        """The results of the cases at ``index``."""
        index = np.asarray(index, dtype=np.int64)
        return AnomalyResult(
            scores=self.scores[index],
            labels=self.labels[index],
            maps=self.maps[index] if self.maps.size else self.maps,
            reconstructions=None if self.reconstructions is None else self.reconstructions[index],
            threshold=self.threshold,
        )


class BaseDetector(ABC):
    """Interface of every detector: fit on normal data, then score, map and predict.

    A detector declares what it can do as class attributes, so that callers read them and
    never probe it. A class whose capability depends on its arguments (``resnet_ae`` scores
    any size only with ``patch_size``) overrides the attribute with a property.

    Attributes:
        name: Registry name, set by :func:`medanomaly.detectors.registry.register`.
        baseline: A no-model baseline (plain statistics, no network): benchmarks mark its
            rows as such.
        supervised: ``fit`` learns from labelled normal *and* abnormal images.
        has_latent: :meth:`embed` gives one latent vector per image (UMAP and clusters in
            ``screen``).
        scores_any_size: Scores images of any spatial size, so cases keep their own shapes.
        streams: Fits on a streamed set a batch at a time, without reading it whole.
        foreground_threshold: Intensity above which a voxel is foreground for masked
            scores, or ``None`` where the model has no such rule.
        exportable: Its scoring (score and map of a batch) is one graph of tensor operations,
            which ``medanomaly export`` writes as ONNX (:meth:`scoring_graph`).
        export_refusal: Why not, where :attr:`exportable` is false (one line for the user).
        threshold_: Image-level decision threshold learned by ``fit`` (score > threshold_
            means abnormal); by default mean + ``threshold_sd`` * SD of the scores of held-out
            normal validation images (the outlier rule of Hjohlman 2022).
        threshold_rule_: How ``threshold_`` was learnt, e.g. ``mean_sd(k=3)`` or, for the
            run ``compare`` chose, the spec's rule (``f1 on 48 validation cases``).
        val_scores_: Those held-out normal scores, kept for other threshold rules.
        history_: One dict of losses per training epoch (empty for a detector that does not
            train).
        run_config_: The resolved config of the run that made this detector.
        is_main_process_: False on the ranks of a distributed fit that write nothing.
    """

    name: ClassVar[str] = ""
    baseline: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    has_latent: ClassVar[bool] = False
    scores_any_size: ClassVar[bool] = False
    streams: ClassVar[bool] = True
    exportable: ClassVar[bool] = False
    export_refusal: ClassVar[str] = "its scoring is not written as one graph of tensor operations"
    foreground_threshold: float | None = None
    spatial_dims: int
    in_channels: int = 1

    threshold_: float
    threshold_rule_: str = "mean_sd(k=3)"
    val_scores_: np.ndarray
    history_: list[dict[str, float]]
    run_config_: dict[str, Any]
    is_main_process_: bool = True
    input_shape_: tuple[int, ...] | None = None

    @abstractmethod
    def fit(self, train: Any, val: Any = None, **kwargs: Any) -> BaseDetector:
        """Learn what normal images look like; return ``self``."""

    @abstractmethod
    def detect(self, x: Any) -> AnomalyResult:
        """Score, map and label a batch of images in one pass."""

    def score(self, x: Any) -> np.ndarray:
        """One anomaly score per image, higher = more abnormal; no maps are kept.

        This is the one way to score without maps: a detector whose maps are costly
        overrides it to skip them.
        """
        self.check_fitted()
        return self.detect(x).scores

    def input_spec(self) -> InputSpec:
        """What the detector takes: its dimensions, channels and (unless any size) its grid."""
        shape = self.input_shape_
        channels = int(shape[0]) if shape is not None else int(self.in_channels)
        if shape is None or self.scores_any_size:
            return InputSpec(int(self.spatial_dims), channels)
        return InputSpec(int(self.spatial_dims), channels, tuple(int(n) for n in shape))

    def embed(self, x: Any) -> np.ndarray:
        """Latent vectors ``(N, D)`` of images; only where :attr:`has_latent` is true."""
        raise NotImplementedError(f"{type(self).__name__} has no latent space (has_latent)")

    def scoring_graph(self) -> nn.Module:
        """The fitted scoring as a module: images ``(B, C, *spatial)`` -> scores, maps.

        Only where :attr:`exportable` is true; its outputs equal :meth:`detect`'s scores and
        maps (up to float rounding), so that an ONNX export of it scores as this detector does.

        Raises:
            ConfigError: The detector is not exportable (:attr:`export_refusal` says why).
        """
        name = self.name or type(self).__name__
        raise ConfigError(f"{name} cannot be exported: {self.export_refusal}")

    def anomaly_map(self, x: Any) -> np.ndarray:
        """Voxel-wise anomaly map ``(N, *spatial)`` on the input grid."""
        return self.detect(x).maps

    def predict(self, x: Any) -> np.ndarray:
        """1 for images whose score exceeds ``threshold_``, else 0."""
        return (self.score(x) > self.threshold_).astype(np.int64)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments as given (what a YAML ``model:`` block holds)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> BaseDetector:
        """Change constructor arguments; return ``self``.

        Raises:
            ConfigError: For a name the constructor does not take (with a suggestion).
        """
        names = self._param_names()
        for key, value in params.items():
            if key not in names:
                raise ConfigError(
                    f"{type(self).__name__} has no argument {key!r}.{did_you_mean(key, names)} "
                    f"Its arguments: {', '.join(names)}"
                )
            setattr(self, key, value)
        return self

    def clone(self) -> BaseDetector:
        """A new, unfitted detector with a deep copy of these constructor arguments."""
        return type(self)(**copy.deepcopy(self.get_params()))

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p not in ("self", "args", "kwargs")]

    def to(self, device: torch.device | str) -> BaseDetector:
        """Move every network (and nested detector) of the fitted detector to ``device``."""
        for value in vars(self).values():
            members = value if isinstance(value, list) else [value]
            for member in members:
                if isinstance(member, nn.Module | BaseDetector):
                    member.to(device)
        return self

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless ``fit`` (or ``load``) has run."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit(normal_images) or "
                "load a saved model before score/anomaly_map/predict"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def load(cls, path: str | Path, trust_pickle: bool | None = None) -> BaseDetector:
        """Load a saved detector: a ``model.safetensors`` file or a run directory holding one.

        An export folder (``medanomaly export``) gives an
        :class:`~medanomaly.detectors.exported.ExportedDetector`, scored by ONNX Runtime.

        Args:
            path: The model file or run directory.
            trust_pickle: Also load a legacy pickle ``model.pt``, which can run code; ``None``
                reads ``MEDANOMALY_TRUST_PICKLE`` (see :mod:`medanomaly.io.safe_files`).

        Raises:
            MissingFileError: No model file at ``path`` (a ``FileNotFoundError``).
            UnsafeFileError: The file is not a safetensors model and pickles are not trusted.
        """
        from medanomaly.detectors.registry import get_model_class

        path = Path(path)
        if path.is_dir() and (path / EXPORT_FILE).is_file():  # an ONNX export
            from medanomaly.detectors.exported import ExportedDetector

            return ExportedDetector(path)
        if path.is_dir():
            legacy = path / LEGACY_MODEL_FILE
            saved_file = path / MODEL_FILE
            path = legacy if legacy.exists() and not saved_file.exists() else saved_file
        if not path.is_file():
            raise MissingFileError(f"{path}: no saved model here (expected {MODEL_FILE})")
        saved = load_state(path, trust_pickle)
        detector = get_model_class(saved["model"])(**saved["params"])
        detector._restore(saved)
        return detector

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name, ...params}, engine: {...}}``."""

    def write_run_config(
        self, run_dir: str | Path, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the run's ``config.yaml`` (model, engine, data block, version) atomically.

        The one writer of a run's config: ``fit``, ``cv`` and the benchmarks all call it.

        Returns:
            The config as written.
        """
        config = {**self.config(), "data": dict(data or {}), "version": __version__}
        config.update(self._resolved_block())
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        return config

    def resolved_settings(self) -> dict[str, Any]:
        """What ``auto`` settings resolve to on this machine (e.g. ``precision``); ``{}``: none.

        The run's ``config.yaml`` records them under ``resolved:``, beside the settings as
        given, so that the config still maps one-to-one onto the constructor arguments.
        """
        return {}

    def record_resolved(self, run_dir: str | Path) -> None:
        """Write what this fit resolved (e.g. the epoch monitor) into the run's ``config.yaml``.

        The block is replaced as a whole; the settings as given are left as they are.
        """
        path = Path(run_dir) / CONFIG_FILE
        if not path.exists():
            return
        config = yaml.safe_load(path.read_text())
        config.update(self._resolved_block())
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        self.run_config_ = config

    def _resolved_block(self) -> dict[str, Any]:
        resolved = self.resolved_settings()
        return {RESOLVED_KEY: resolved} if resolved else {}

    def _run_config(self, run_dir: str | Path | None) -> dict[str, Any]:
        """The run's full config: ``run_dir/config.yaml`` if a caller wrote one, else ours.

        Without a run directory nothing is written and the detector's own config is returned.
        """
        if run_dir is None:
            return {**self.config(), "version": __version__, **self._resolved_block()}
        path = Path(run_dir) / CONFIG_FILE
        if path.exists():
            return yaml.safe_load(path.read_text())
        return self.write_run_config(run_dir)

    def _learn_threshold(self, normal_scores: np.ndarray) -> None:
        """Set ``val_scores_`` and the default ``threshold_`` from held-out normal scores.

        The one place a detector learns its threshold: mean + ``threshold_sd`` * SD
        (:func:`~medanomaly.detectors.thresholds.mean_sd_threshold`), with a warning when it
        rests on fewer than :data:`MIN_THRESHOLD_NORMALS` scores.
        """
        self.val_scores_ = np.asarray(normal_scores, dtype=np.float64)
        k = float(self.threshold_sd)
        if len(self.val_scores_) < MIN_THRESHOLD_NORMALS:
            log.warning(
                "the default threshold (mean + %g SD) rests on only %d held-out normal "
                "image(s), fewer than %d: expect it to be off; hold out more normals "
                "(engine.val_min, engine.val_fraction or --val) or choose a threshold in "
                "evaluate",
                k,
                len(self.val_scores_),
                MIN_THRESHOLD_NORMALS,
            )
        self.threshold_ = mean_sd_threshold(self.val_scores_, k)
        self.threshold_rule_ = f"mean_sd(k={k:g})"

    def set_threshold(self, value: float, rule: str) -> BaseDetector:
        """Replace ``threshold_`` by one learnt elsewhere, saying how (kept by :meth:`save`).

        Args:
            value: The cut-off (abnormal iff score > value).
            rule: How it was learnt, in words (e.g. ``f1 on 48 validation cases``).

        Returns:
            ``self``.
        """
        self.check_fitted()
        self.threshold_, self.threshold_rule_ = float(value), rule
        return self

    def _threshold_state(self) -> dict[str, Any]:
        """The threshold part of :meth:`saved_state` (every detector saves it alike)."""
        return {
            "threshold": self.threshold_,
            "threshold_rule": self.threshold_rule_,
            "val_scores": np.asarray(self.val_scores_).tolist(),
        }

    def _restore_threshold(self, saved: dict[str, Any]) -> None:
        """Set the threshold state written by :meth:`_threshold_state`."""
        self.threshold_ = float(saved["threshold"])
        self.threshold_rule_ = str(saved.get("threshold_rule", type(self).threshold_rule_))
        self.val_scores_ = np.asarray(saved["val_scores"], dtype=np.float64)

    def calibrate(self, normal: Any) -> BaseDetector:
        """Relearn ``threshold_`` from held-out normal cases (e.g. after changing the score).

        Args:
            normal: Normal cases the detector was not fitted on.

        Returns:
            ``self``, with ``val_scores_`` and ``threshold_`` (mean + ``threshold_sd`` * SD).
        """
        self.check_fitted()
        self._learn_threshold(self.score(normal))
        return self

    def save(self, path: str | Path) -> None:
        """Write the fitted detector to ``path`` atomically (read it back with :meth:`load`)."""
        self.check_fitted()
        save_state(self.saved_state(), path)

    @abstractmethod
    def saved_state(self) -> dict[str, Any]:
        """Everything :meth:`load` needs: ``{"model": name, "params": ..., ...}``."""

    @abstractmethod
    def _restore(self, saved: dict[str, Any]) -> None:
        """Set the fitted state from a dict written by ``save``."""


def fit_or_load(
    detector: BaseDetector,
    train: ImageSet,
    val: ImageSet | None,
    folder: str | Path | None,
    resume: bool,
) -> BaseDetector:
    """Fit a nested detector (an ensemble member, a reconstructor) into its own folder.

    Args:
        detector: The unfitted detector.
        train: Normal training images.
        val: Validation images.
        folder: The detector's run directory; ``None`` keeps nothing.
        resume: Load a finished model from ``folder`` or resume its interrupted training.

    Returns:
        The fitted (or loaded) detector.
    """
    if folder is None:
        return detector.fit(train, val)
    folder = Path(folder)
    if resume and (folder / MODEL_FILE).exists():
        return BaseDetector.load(folder)
    return detector.fit(train, val, run_dir=folder, resume=resume)


def standardisation(values: np.ndarray) -> tuple[float, float]:
    """Mean and SD (``ddof=1``) of ``values``; an SD of 0 (or one value) becomes 1."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), sd if sd > 0 else 1.0


def yaml_plain(value: Any) -> Any:
    """Turn tuples and NumPy scalars into YAML-friendly Python values."""
    if isinstance(value, tuple | list):
        return [yaml_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: yaml_plain(v) for k, v in value.items()}
    if isinstance(value, EngineConfig):
        return value.to_dict()
    return value
