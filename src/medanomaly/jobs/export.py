"""``medanomaly export``: a run's scoring as an ONNX graph, with its preprocessing and threshold.

:func:`export_run` loads a run, asks its detector for its scoring as one module
(:meth:`~medanomaly.detectors.base.BaseDetector.scoring_graph`: images -> score and map, the
``map_score`` standardisation included), writes it with ``torch.onnx.export`` (the
``torch.export`` based exporter, opset 18) with a dynamic batch size, checks the graph under
ONNX Runtime against the detector on a random batch, and writes ``medanomaly_export.json`` and
a README beside it (see :mod:`medanomaly.detectors.exported` for the folder). A detector that
is not :attr:`~medanomaly.detectors.base.BaseDetector.exportable` is refused with its reason.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly._version import __version__
from medanomaly.detectors.base import EXPORT_FILE, BaseDetector
from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.exported import (
    EXPORT_FORMAT_VERSION,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAMES,
    onnx_runtime,
)
from medanomaly.errors import ConfigError
from medanomaly.io.atomic import atomic_write_text
from medanomaly.outputs.archive import run_identity
from medanomaly.outputs.guard import claim_outputs, staging_folder
from medanomaly.reports.files import write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
OPSET = 18
CHECK_BATCH = 3
"""Random images the written graph is checked on against the detector."""
CHECK_TOLERANCE = 1e-3
"""Largest difference (relative to the values' size) between the graph and the detector."""


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_run` wrote.

    Attributes:
        folder: The export folder.
        model: The detector's registry name.
        input_shape: ``(C, *spatial)`` of one image.
        seconds: Time the export took.
        score_difference: Largest score difference between the graph and the detector.
        map_difference: Largest map difference between them.
    """

    folder: Path
    model: str
    input_shape: tuple[int, ...]
    seconds: float
    score_difference: float
    map_difference: float


def export_run(run: str | Path, out: str | Path, fmt: str = "onnx") -> ExportSummary:
    """Export a run's scoring as ONNX with its preprocessing and threshold.

    Args:
        run: Run directory (or ``model.safetensors``).
        out: The export folder (written into a staging folder and swapped in at the end).
        fmt: ``onnx`` (the only format).

    Returns:
        What was written.

    Raises:
        ConfigError: Unknown format, missing ONNX packages, or a detector whose scoring
            cannot be expressed as one graph (the message names the reason).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {FORMATS}")
    started = time.perf_counter()
    detector = _in_float32(BaseDetector.load(run).to("cpu"))
    name = detector.name or type(detector).__name__
    if not detector.exportable:
        raise ConfigError(f"{run}: {name} cannot be exported: {detector.export_refusal}")
    torch_onnx = _exporter()
    out = Path(out)
    with claim_outputs(staged=[out], command="export") as claim:
        staging = staging_folder(out)
        graph = detector.scoring_graph().eval()
        shape = tuple(int(n) for n in detector.input_shape_)
        _write_graph(torch_onnx, graph, shape, staging / ONNX_FILE)
        differences = _check(detector, staging / ONNX_FILE, shape)
        description = export_description(detector, run, shape, differences)
        write_json(staging / EXPORT_FILE, description)
        atomic_write_text(staging / "README.md", export_readme(description))
        claim.commit(out)
    return ExportSummary(
        out, str(detector.name), shape, time.perf_counter() - started, *differences
    )


def _in_float32(detector: BaseDetector) -> BaseDetector:
    """``detector`` scoring in float32, as its graph does.

    Under ``engine.precision`` bf16 the run's own scoring autocasts the network, which moves
    scores in about the third significant digit; the graph is float32, so it is checked
    against (and described as) the detector's float32 scoring.
    """
    if isinstance(detector, DeepDetector):
        detector.set_params(engine={**detector.engine_config.to_dict(), "precision": "32-true"})
    return detector


def _exporter() -> Any:
    """``torch.onnx`` after checking that the packages its exporter needs are installed."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"export needs {', '.join(missing)}: pip install 'medanomaly[export]'")
    import torch.onnx

    return torch.onnx


def _write_graph(torch_onnx: Any, graph: Any, shape: tuple[int, ...], path: Path) -> None:
    """``graph`` as ONNX at ``path``, the batch axis dynamic."""
    import torch

    example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    log.info("exporting the scoring graph for images %s", shape)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed": not the user's concern
    try:
        with warnings.catch_warnings():  # torch.export's deprecation notices neither
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(torch_onnx, graph, example, batch, path)
    finally:
        exporter_log.setLevel(level)


def _export(torch_onnx: Any, graph: Any, example: Any, batch: Any, path: Path) -> None:
    torch_onnx.export(
        graph,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _check(detector: BaseDetector, path: Path, shape: tuple[int, ...]) -> tuple[float, float]:
    """Largest score and map differences between the graph (ONNX Runtime) and the detector.

    Raises:
        ConfigError: They exceed :data:`CHECK_TOLERANCE` relative to the values' size.
    """
    runtime = onnx_runtime()
    images = np.random.default_rng(0).random((CHECK_BATCH, *shape), dtype=np.float32)
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    expected = detector.detect(images)
    differences = (
        float(np.max(np.abs(scores - expected.scores))),
        float(np.max(np.abs(maps - np.asarray(expected.maps, dtype=np.float32)))),
    )
    sizes = (float(np.max(np.abs(expected.scores))), float(np.max(np.abs(expected.maps))))
    for what, difference, size in zip(("scores", "maps"), differences, sizes, strict=True):
        if not difference <= CHECK_TOLERANCE * max(size, 1.0):
            raise ConfigError(
                f"the exported graph's {what} differ from the detector's by {difference:.3g}: "
                "not written"
            )
    return differences


def export_description(
    detector: BaseDetector,
    run: str | Path,
    shape: tuple[int, ...],
    differences: tuple[float, float],
) -> dict[str, Any]:
    """What ``medanomaly_export.json`` holds (see docs/export.md)."""
    from medanomaly.detectors.describe import reference

    params = detector.get_params()
    calibration = np.asarray(detector.val_scores_, dtype=np.float64)
    k = params.get("threshold_sd")
    data = dict(detector.run_config_.get("data") or {})
    spatial = [int(n) for n in shape[1:]]
    return {
        "medanomaly_export": EXPORT_FORMAT_VERSION,
        "medanomaly_version": __version__,
        "format": "onnx",
        "model": {
            "name": detector.name,
            "reference": reference(detector.name),
            "params": detector.config().get("model", {}) | {"name": detector.name},
        },
        "source_run": {"path": str(run), "digest": run_identity(run)},
        "graph": {
            "file": ONNX_FILE,
            "opset": OPSET,
            "inputs": {INPUT_NAME: {"shape": ["batch", *shape], "dtype": "float32"}},
            "outputs": {
                "score": {"shape": ["batch"], "dtype": "float32"},
                "map": {"shape": ["batch", *spatial], "dtype": "float32"},
            },
            "checked": {
                "images": CHECK_BATCH,
                "max_score_difference": differences[0],
                "max_map_difference": differences[1],
            },
        },
        "input": {
            "spatial_dims": int(detector.spatial_dims),
            "channels": int(shape[0]),
            "shape": list(shape),
        },
        "preprocessing": data,
        "preprocessing_note": "the run's data block: read each scan as medanomaly does, then "
        "apply data.transforms in order; steps named rand_* augment training only and are "
        "skipped when scoring",
        "threshold": {
            "value": float(detector.threshold_),
            "rule": detector.threshold_rule_,
            "k": k,
            "n": int(calibration.size),
            "text": f"{detector.threshold_rule_}, from a run whose {calibration.size} held-out "
            "normal validation scores are kept in val_scores",
            "decision": "flagged iff score > threshold",
            "val_scores": calibration.tolist(),
        },
    }


def export_readme(description: dict[str, Any]) -> str:
    """The README written into an export folder: what it holds and how to score without us."""
    model = description["model"]
    shape = description["input"]["shape"]
    threshold = description["threshold"]
    voxels = math.prod(shape)
    return f"""# medanomaly export: {model["name"]} ({model["reference"] or "see medanomaly"})

- `{ONNX_FILE}`: ONNX (opset {description["graph"]["opset"]}). Input `{INPUT_NAME}`: float32
  `(batch, {", ".join(str(n) for n in shape)})` ({voxels} values per image). Outputs `score`
  `(batch,)` and `map` `(batch, {", ".join(str(n) for n in shape[1:])})`.
- `{EXPORT_FILE}`: the preprocessing (`preprocessing`: the run's data block), the threshold
  ({threshold["value"]:.6g}: {threshold["text"]}), the model, the source run's digest.

Score with medanomaly (same preprocessing, maps and flags as the run):

    medanomaly score --run THIS_FOLDER --data SCANS --out scores.csv

Score without medanomaly (images already preprocessed as `preprocessing` says):

```python
import json
import numpy as np
import onnxruntime as ort

meta = json.load(open("{EXPORT_FILE}"))
session = ort.InferenceSession("{ONNX_FILE}")
images = np.zeros((4, {", ".join(str(n) for n in shape)}), np.float32)  # your preprocessed batch
scores, maps = session.run(["score", "map"], {{"{INPUT_NAME}": images}})
flagged = scores > meta["threshold"]["value"]  # {threshold["decision"]}
```
"""
