"""Outputs: the per-case score table and the anomaly maps, on the model's grid and the scan's own.

Owns the CSV of scores, the maps as ``.npy`` and pictures, maps sampled back into the source
geometry (NIfTI, float TIFF + overlay) and DICOM Parametric Maps that reference their series.
Every file is written atomically.

May import: ``detectors`` (for :class:`~medanomaly.detectors.base.AnomalyResult`), ``viz``,
``io``, ``image``, ``errors``.
"""
