"""The detector interface and the deep-learning base class that owns the training loop.

Every detector follows scikit-learn's estimator rules: the constructor only stores its
arguments, ``fit`` learns state whose names end in ``_``, and ``get_params`` returns what the
constructor was given, so that a config maps one-to-one onto a detector.
"""

from __future__ import annotations

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
from medanomaly.data.sets import ImageSet
from medanomaly.errors import MissingFileError, NotFittedError
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
            maps=self.maps[index],
            reconstructions=None if self.reconstructions is None else self.reconstructions[index],
            threshold=self.threshold,
        )


class BaseDetector(ABC):
    """Interface of every detector: fit on normal data, then score, map and predict.

    Attributes:
        name: Registry name, set by :func:`medanomaly.detectors.registry.register`.
        baseline: True for the no-model baselines (``intensity``, ``volume``): benchmarks
            mark their rows as such.
        threshold_: Image-level decision threshold learned by ``fit`` (score > threshold_
            means abnormal); by default mean + ``threshold_sd`` * SD of the scores of held-out
            normal validation images (seed 004).
        val_scores_: Those held-out normal scores, kept for other threshold rules.
    """

    name: ClassVar[str] = ""
    baseline: ClassVar[bool] = False  # a no-model baseline (plain statistics, no network)
    spatial_dims: int

    @abstractmethod
    def fit(self, train: Any, val: Any = None, **kwargs: Any) -> BaseDetector:
        """Learn what normal images look like; return ``self``."""

    @abstractmethod
    def detect(self, x: Any) -> AnomalyResult:
        """Score, map and label a batch of images in one pass."""

    def score(self, x: Any) -> np.ndarray:
        """One anomaly score per image, higher = more abnormal."""
        return self.detect(x).scores

    def anomaly_map(self, x: Any) -> np.ndarray:
        """Voxel-wise anomaly map ``(N, *spatial)`` on the input grid."""
        return self.detect(x).maps

    def predict(self, x: Any) -> np.ndarray:
        """1 for images whose score exceeds ``threshold_``, else 0."""
        return (self.score(x) > self.threshold_).astype(np.int64)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments as given (what a YAML ``model:`` block holds)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

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

    def _run_config(self, run_dir: Path) -> dict[str, Any]:
        """The run's full config: ``run_dir/config.yaml`` if a caller wrote one, else ours."""
        path = run_dir / CONFIG_FILE
        if path.exists():
            return yaml.safe_load(path.read_text())
        config = {**self.config(), "version": __version__}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        return config

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


def mean_sd_threshold(scores: np.ndarray, k: float, warn: bool = True) -> float:
    """Mean + k * SD (``ddof=1``) of normal scores; the maximum when there is only one.

    Logs a warning (unless ``warn`` is false) when the scores are fewer than
    :data:`MIN_THRESHOLD_NORMALS`: the SD of a handful of scores is too unsteady for a
    threshold that claims a tail of ``k`` SD.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if warn and len(scores) < MIN_THRESHOLD_NORMALS:
        log.warning(
            "the default threshold (mean + %g SD) rests on only %d held-out normal image(s), "
            "fewer than %d: expect it to be off; hold out more normals (engine.val_min, "
            "engine.val_fraction or --val) or choose a threshold in evaluate",
            k,
            len(scores),
            MIN_THRESHOLD_NORMALS,
        )
    return float(scores.mean() + k * scores.std(ddof=1)) if len(scores) > 1 else float(scores.max())


def standardisation(values: np.ndarray) -> tuple[float, float]:
    """Mean and SD (``ddof=1``) of ``values``; an SD of 0 (or one value) becomes 1."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), sd if sd > 0 else 1.0


def scores_only(detector: BaseDetector, x: Any) -> np.ndarray:
    """A detector's scores without keeping maps (``detect_scores`` where it has it)."""
    fast = getattr(detector, "detect_scores", None)
    return fast(x) if fast is not None else detector.score(x)


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
