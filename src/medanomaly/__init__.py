"""medanomaly: find abnormal CT and MRI scans by learning what normal anatomy looks like."""

__version__ = "0.1.0"

from medanomaly.base import AnomalyResult, BaseDetector, DeepDetector  # noqa: E402
from medanomaly.data import ImageSet  # noqa: E402
from medanomaly.engine import EngineConfig  # noqa: E402
from medanomaly.registry import get_model, list_models, register  # noqa: E402

load_model = BaseDetector.load

__all__ = [
    "AnomalyResult",
    "BaseDetector",
    "DeepDetector",
    "EngineConfig",
    "ImageSet",
    "__version__",
    "get_model",
    "list_models",
    "load_model",
    "register",
]
