"""The file names of an evaluation and the JSON writer every command uses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.io.atomic import atomic_write_text

METRICS_FILE = "metrics.json"


SCORES_FILE = "scores.csv"


REPORT_FILE = "report.html"


FIGURES_DIR = "figures"


def json_ready(value: Any) -> Any:
    """Replace non-finite floats by ``None`` and NumPy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-finite floats become ``null``)."""
    atomic_write_text(path, json.dumps(json_ready(data), indent=2) + "\n")
    return path
