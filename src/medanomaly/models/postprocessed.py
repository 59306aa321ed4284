"""Makes the ``postprocessed`` wrapper known to the registry (it lives in ``postprocess``)."""

from medanomaly.postprocess.detector import PostProcessed

__all__ = ["PostProcessed"]
