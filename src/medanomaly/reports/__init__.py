"""Reports: what a run writes for a person or a program to read.

Owns the self-contained HTML report (:mod:`~medanomaly.reports.html`), the figures
(:mod:`~medanomaly.reports.figures`), the JSON writers and the file names of an evaluation
(:mod:`~medanomaly.reports.files`), the evaluation report (:mod:`~medanomaly.reports.evaluation`)
and the tables and report of ``compare`` (:mod:`~medanomaly.reports.compare`). Nothing here
computes a metric or fits a model: the callers pass what they measured.

May import: ``metrics``, ``detectors`` and the layers below.
"""
