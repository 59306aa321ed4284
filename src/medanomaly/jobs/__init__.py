"""Jobs that write run directories and outputs: fitting a run (``fit_run``) and scoring one.

A job sits above both training (its ranks) and outputs (the tables and maps it writes).

May import: ``outputs``, ``models``, ``config``, ``postprocess``, ``detectors`` and everything
below them.
"""
