"""Jobs that write run directories and outputs: fit a run, score it, evaluate it.

``fit_run`` (:mod:`~medanomaly.jobs.fit`), scoring (:mod:`~medanomaly.jobs.score`) and
``evaluate`` (:mod:`~medanomaly.jobs.evaluate`, with its per-rank pass in
:mod:`~medanomaly.jobs.evaluate_share`). A job sits above training (its ranks), outputs (the
tables and maps it writes) and reports (the evaluation's report and figures).

May import: ``outputs``, ``models``, ``config``, ``reports``, ``postprocess``, ``metrics``,
``detectors`` and everything below them.
"""
