"""Composable preprocessing and augmentation transforms for :class:`~medanomaly.image.MedicalImage`.

Every transform is a small class whose ``__call__`` takes and returns a ``MedicalImage``
(never modifying its input). Geometric transforms keep ``spacing``/``affine`` right and move
the boolean foreground mask in ``meta["foreground"]`` (made by ``foreground_mask``) in step.
``build_transforms`` turns the YAML list form into a :class:`Compose`::

    - hu_window: {center: 40, width: 400}
    - resize: {shape: [64, 64, 64]}
    - flip: {axes: [0], when: {laterality: L}}

``Compose.to_config()`` gives the list back with all arguments (a cache key), and
``Compose.split_deterministic()`` separates the cacheable prefix from random augmentation.

May import: ``io``, ``image``, ``errors``.
"""

from medanomaly.transforms._base import FOREGROUND_KEY, LESION_KEY, RandomTransform, Transform
from medanomaly.transforms.augment import RandAffine, RandFlip, RandIntensity
from medanomaly.transforms.channels import SelectChannels
from medanomaly.transforms.compose import (
    TRANSFORMS,
    Compose,
    build_transform,
    build_transforms,
    get_transform_class,
)
from medanomaly.transforms.fundus import FundusFOVMask
from medanomaly.transforms.intensity import Clip, HUWindow, MinMax, PercentileRescale, ZScore
from medanomaly.transforms.mask import DistanceTransform, ForegroundMask, HeadCTBrainMask
from medanomaly.transforms.mri import BrainMask, HistogramMatch, N4BiasCorrection
from medanomaly.transforms.spatial import Crop, Flip, Pad, Resample, Resize

__all__ = [
    "FOREGROUND_KEY",
    "LESION_KEY",
    "TRANSFORMS",
    "BrainMask",
    "Clip",
    "Compose",
    "Crop",
    "DistanceTransform",
    "Flip",
    "FundusFOVMask",
    "ForegroundMask",
    "HUWindow",
    "HeadCTBrainMask",
    "HistogramMatch",
    "MinMax",
    "N4BiasCorrection",
    "Pad",
    "PercentileRescale",
    "RandAffine",
    "RandFlip",
    "RandIntensity",
    "RandomTransform",
    "Resample",
    "Resize",
    "SelectChannels",
    "Transform",
    "ZScore",
    "build_transform",
    "build_transforms",
    "get_transform_class",
]
