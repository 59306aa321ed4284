"""Training and processes: the one training loop (Lightning Fabric) and the ranks of batch jobs.

Owns :class:`~medanomaly.training.engine.Engine` (epochs, validation, early stopping,
checkpoints that resume, mixed precision, several devices) and
:mod:`~medanomaly.training.distributed` (the ranks that share a batch job's cases).

May import: ``data``, ``transforms``, ``io``, ``image``, ``errors``.
"""
