"""Post-processing of anomaly maps as a library stage (between the detectors and their users).

A config's ``postprocess:`` list (steps in :mod:`medanomaly.postprocess.steps`) wraps its
detector in :class:`~medanomaly.postprocess.detector.PostProcessed`; the steps are saved
with the run and applied identically wherever the run is used.

May import: ``detectors`` and everything below it.
"""

from medanomaly.postprocess.chain import PostProcess, build_step
from medanomaly.postprocess.detector import PostProcessed
from medanomaly.postprocess.steps import STEPS

__all__ = ["STEPS", "PostProcess", "PostProcessed", "build_step"]
