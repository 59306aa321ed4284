"""Detectors. Each module here registers its detectors with ``@register(name)``.

The registry imports every module of this package, so a new model is one new file.

May import: ``detectors``, ``nets``, ``training``, ``data`` and the layers below; never
``outputs``, ``jobs`` or anything above.
"""
