"""The data path: readers, streaming preprocessing into an on-disk session cache, the lane
mini-batch generator with its high-level state cache, and a pinned-memory ring-buffer queue.

Pure Python/NumPy/PyTorch; it imports nothing else from hiertcn_fast (it sits on top of the
data flow) and never the compiled extension.
"""

from .batcher import BATCH_FIELDS, LaneStateCache, SessionBatch, SessionBatcher
from .cache import CacheCorruptError, SessionCache
from .preprocess import PreprocessParams, cache_key, preprocess
from .readers import (ArraySource, DelimitedSource, InteractionChunk, InteractionSource, MalformedRecordError, ReadStats,
                      RecBoleInterSource, XingSource, load_dataset, recbole_example_path)
from .ring_queue import PinnedRingQueue, QueueStats
from .synthetic import SyntheticSource

__all__ = [
    "ArraySource", "CacheCorruptError", "SessionCache", "PreprocessParams", "cache_key", "preprocess", "DelimitedSource",
    "InteractionChunk", "InteractionSource", "MalformedRecordError", "ReadStats", "RecBoleInterSource",
    "XingSource", "load_dataset", "recbole_example_path", "SyntheticSource", "BATCH_FIELDS", "LaneStateCache",
    "SessionBatch", "SessionBatcher", "PinnedRingQueue", "QueueStats",
]
