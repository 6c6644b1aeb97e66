"""The data path: readers, streaming preprocessing into an on-disk session cache, the lane
mini-batch generator with its high-level state cache, and a pinned-memory ring-buffer queue.

Pure Python/NumPy/PyTorch: its modules use nothing of hiertcn_fast but the integer checks of
``hiertcn_fast._ints``, and none of them the compiled extension (importing the package
``hiertcn_fast`` itself loads it, where it is built).

Typical use::

    from hiertcn_fast.data import PreprocessParams, SessionBatcher, load_dataset, preprocess

    cache = preprocess(load_dataset("ml-100k"), "~/.cache/hiertcn", PreprocessParams(min_item_count=5))
    train = SessionBatcher(cache, "train", lanes=32, sessions_per_batch=10, shuffle=True,
                           state_shape=(2, 128), device="cuda")
    for batch in train.iter_queued(num_producers=2):       # or: for batch in train:
        state = train.begin_state(batch)                   # (layers, lanes, hidden), reset per lane
        features, new_state = model(batch, state)          # applies batch.keep after each step
        train.end_state(batch, new_state)                  # carried to the next batch
        checkpoint = train.state_dict()                    # position + state: exact resume

Batch fields and shapes: :mod:`hiertcn_fast.data.batcher`. Cache layout and integrity:
:mod:`hiertcn_fast.data.cache`. Preprocessing steps and memory: :mod:`hiertcn_fast.data.preprocess`.
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
