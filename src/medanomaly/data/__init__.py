"""Data: cases listed from a folder or manifest, preprocessed once, held in memory or streamed.

Owns the case listing (:mod:`~medanomaly.data.loading`), the two forms of a set
(:class:`~medanomaly.data.sets.ImageSet` in memory, :class:`~medanomaly.data.streaming.StreamedSet`
read from the cache), the content-keyed preprocessing cache, the worker processes of the first
pass, 2.5D slabs and the synthetic phantoms of the demo and the tests.

May import: ``transforms``, ``io``, ``image``, ``errors``.
"""
