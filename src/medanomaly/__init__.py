"""medanomaly: find abnormal CT and MRI scans by learning what normal anatomy looks like.

The public names below are imported on first use, so that ``import medanomaly`` (and the
command line's ``--help``) stays fast; torch is loaded only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medanomaly._version import __version__

_EXPORTS = {
    "AnomalyResult": "medanomaly.detectors.base",
    "BaseDetector": "medanomaly.detectors.base",
    "DeepDetector": "medanomaly.detectors.deep",
    "EngineConfig": "medanomaly.training.engine",
    "ImageSet": "medanomaly.data.sets",
    "MedicalImage": "medanomaly.image",
    "get_model": "medanomaly.detectors.registry",
    "list_models": "medanomaly.detectors.registry",
    "register": "medanomaly.detectors.registry",
    "read_image": "medanomaly.io",
}

__all__ = [
    "AnomalyResult",
    "BaseDetector",
    "DeepDetector",
    "EngineConfig",
    "ImageSet",
    "MedicalImage",
    "__version__",
    "get_model",
    "list_models",
    "load_model",
    "read_image",
    "register",
]

if TYPE_CHECKING:
    from medanomaly.data.sets import ImageSet
    from medanomaly.detectors.base import AnomalyResult, BaseDetector
    from medanomaly.detectors.deep import DeepDetector
    from medanomaly.detectors.registry import get_model, list_models, register
    from medanomaly.image import MedicalImage
    from medanomaly.io import read_image
    from medanomaly.training.engine import EngineConfig


def load_model(path: Any) -> Any:
    """Load a saved detector (a ``model.safetensors`` file or a run directory)."""
    from medanomaly.detectors.base import BaseDetector

    return BaseDetector.load(path)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medanomaly' has no attribute {name!r}")
