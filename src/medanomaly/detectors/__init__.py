"""Detectors: the interface every model follows, and what models share.

Owns :class:`~medanomaly.detectors.base.BaseDetector` (fit on normal data, then ``score``,
``anomaly_map``, ``predict``, capability flags, ``get_params``/``set_params``/``clone``), the
deep-learning base class that owns the training loop
(:class:`~medanomaly.detectors.deep.DeepDetector`), the registry of model names, the threshold
rules, and the residual-map and latent-search helpers the models build on.

May import: ``nets``, ``training``, ``data``, ``transforms``, ``viz``, ``io``, ``image``,
``errors``. Never ``models`` (the registry finds them by name at run time), nor anything above.
"""
