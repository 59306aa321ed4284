"""Pictures of one case: input, reconstruction and difference map, slices of volumes.

May import: ``io`` (atomic writes), ``image``, ``errors``.
"""
