"""Detectors. Each module here registers its detectors with ``@register(name)``.

The registry imports every module of this package, so a new model is one new file.
"""
