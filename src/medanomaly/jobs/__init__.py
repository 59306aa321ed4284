"""Batch jobs over a trained run that write outputs: what ``score`` does, shared by evaluation.

A job sits above both training (its ranks) and outputs (the tables and maps it writes).

May import: ``outputs``, ``models``, ``detectors`` and everything below them.
"""
