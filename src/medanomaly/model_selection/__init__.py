"""Model selection: which detector, epoch, post-processing and threshold, under an honest protocol.

Owns the patient-grouped splits (:mod:`~medanomaly.model_selection.splits`), repeated
cross-validation of one config (:mod:`~medanomaly.model_selection.cv`), the spec of
``compare`` (:mod:`~medanomaly.model_selection.spec`) and ``compare`` itself
(:mod:`~medanomaly.model_selection.compare`), with the summary and the resume check the two
share. Whatever is chosen is chosen on training and validation parts; the test part is scored
only once the choice is made.

May import: ``jobs``, ``models``, ``outputs``, ``config``, ``reports``, ``metrics``,
``detectors`` and the layers below.
"""
