"""A detector exported to ONNX (``medanomaly export``), scored with ONNX Runtime.

An export folder holds::

    model.onnx                 images (batch, C, *spatial) -> score (batch,), map (batch, *spatial)
    medanomaly_export.json     preprocessing (the run's data block), input shape and channels,
                               threshold with its rule and n, model name and reference,
                               the source run's digest
    README.md                  the few lines that score without medanomaly

:class:`ExportedDetector` reads it and follows the detector interface, so that ``score``,
``evaluate`` and ``screen`` take an export folder as ``--run`` and give the same scores, maps
and flags as the run it came from. Only the scoring runs in ONNX Runtime; reading and
preprocessing the scans is medanomaly's own (which imports torch and MONAI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medanomaly.data.sets import as_cases
from medanomaly.detectors.base import EXPORT_FILE, AnomalyResult, BaseDetector
from medanomaly.errors import ConfigError, InvalidImageError, MissingFileError

ONNX_FILE = "model.onnx"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "map")
BATCH_VOXELS = 2**22
"""Voxels per ONNX Runtime call (a batch of 2D slices, or one or a few volumes)."""


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (it holds :data:`EXPORT_FILE`)."""
    return (Path(path) / EXPORT_FILE).is_file()


def read_export(folder: str | Path) -> dict[str, Any]:
    """The description of an export folder.

    Raises:
        MissingFileError: No export description or no ONNX graph in ``folder``.
        ConfigError: The description is not one this version reads.
    """
    folder = Path(folder)
    path = folder / EXPORT_FILE
    if not path.is_file():
        raise MissingFileError(f"{folder}: not an export folder (no {EXPORT_FILE})")
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not readable as JSON ({error})") from None
    version = description.get("medanomaly_export")
    if version != EXPORT_FORMAT_VERSION:
        raise ConfigError(
            f"{path}: export format {version!r}; this medanomaly reads {EXPORT_FORMAT_VERSION}"
        )
    graph = folder / description["graph"]["file"]
    if not graph.is_file():
        raise MissingFileError(f"{folder}: the export's graph {graph.name} is missing")
    return description


def onnx_runtime() -> Any:
    """The ``onnxruntime`` module, or a clear error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "scoring an export needs ONNX Runtime: pip install 'medanomaly[export]'"
        ) from None
    return onnxruntime


class ExportedDetector(BaseDetector):
    """An exported detector: its ONNX graph scored by ONNX Runtime, its threshold and data block.

    It is not registered (nothing fits one); :meth:`BaseDetector.load` returns one for an
    export folder.

    Args:
        folder: The export folder written by ``medanomaly export``.
    """

    exportable: ClassVar[bool] = False
    export_refusal: ClassVar[str] = "it is an export already; export the run it came from"
    streams: ClassVar[bool] = True

    def __init__(self, folder: str | Path) -> None:
        self.folder = folder
        description = read_export(folder)
        self.description_ = description
        model = description["model"]
        self.name = f"{model['name']} (ONNX export)"  # type: ignore[misc]
        self.spatial_dims = int(description["input"]["spatial_dims"])
        self.in_channels = int(description["input"]["channels"])
        self.input_shape_ = tuple(int(n) for n in description["input"]["shape"])
        self.threshold_ = float(description["threshold"]["value"])
        self.threshold_rule_ = str(description["threshold"]["rule"])
        self.val_scores_ = np.asarray(description["threshold"]["val_scores"], dtype=np.float64)
        self.history_ = []
        self.run_config_ = {
            "model": {"name": model["name"], **model["params"]},
            "data": dict(description["preprocessing"]),
        }
        self._session: Any = None

    def get_params(self) -> dict[str, Any]:
        """``{"folder": ...}``."""
        return {"folder": self.folder}

    @property
    def session(self) -> Any:
        """The ONNX Runtime session of the graph (made on first use)."""
        if self._session is None:
            runtime = onnx_runtime()
            graph = Path(self.folder) / self.description_["graph"]["file"]
            self._session = runtime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        return self._session

    def fit(self, train: Any, val: Any = None, **kwargs: Any) -> ExportedDetector:
        """An export is not fitted again: fit the source run's config instead."""
        raise ConfigError(f"{self.folder}: an exported model cannot be fitted (it is fixed)")

    def detect(self, x: Any) -> AnomalyResult:
        """Scores, maps and labels of images ``(N, C, *spatial)`` (a batch at a time)."""
        cases = as_cases(x, self.spatial_dims)
        for case_id, shape in zip(cases.ids, cases.shapes, strict=True):
            if tuple(shape) != self.input_shape_:
                raise InvalidImageError(
                    case_id,
                    f"image shape {tuple(shape)} differs from the export's input shape "
                    f"{self.input_shape_}; the export's preprocessing gives that shape",
                )
        scores = np.zeros(len(cases), dtype=np.float64)
        maps = np.zeros((len(cases), *self.input_shape_[1:]), dtype=np.float32)
        batch = max(1, BATCH_VOXELS // max(math.prod(self.input_shape_), 1))
        for index in cases.chunks(batch):
            images = np.ascontiguousarray(cases.batch(index), dtype=np.float32)
            score, score_map = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
            scores[index] = score
            maps[index] = score_map
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=maps,
            reconstructions=None,
            threshold=self.threshold_,
        )

    def config(self) -> dict[str, Any]:
        """The source run's model and data blocks."""
        return dict(self.run_config_)

    def saved_state(self) -> dict[str, Any]:
        """An export is written by ``medanomaly export``, not saved as a run."""
        raise ConfigError(f"{self.folder}: an export is not saved as a run")

    def _restore(self, saved: dict[str, Any]) -> None:
        raise ConfigError(f"{self.folder}: an export is not loaded from a run's model file")
