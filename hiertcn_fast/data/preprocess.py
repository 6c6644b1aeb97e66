"""Preprocessing of an interaction log into a :class:`SessionCache`, streaming in chunks.

The steps follow the HierTCN authors' code, each a field of :class:`PreprocessParams`:
1. drop malformed records and unwanted event types (the reader does this and counts them);
2. keep items with at least ``min_item_count`` events;
3. keep users with ``min_user_count`` .. ``max_user_count`` events (counted after step 2);
4. sort each user's events by time (stable: ties keep source order) and start a new session
   when the gap to the previous event is >= ``session_gap`` seconds;
5. keep the first ``max_session_length`` events of each session;
6. re-index the remaining items densely as 1..num_items in raw-id order (0 = padding/start);
7. split users 80/10/10 at random (``split="cold"``, seeded) or sessions by their start time at
   80% / 90% of the time span (``split="warm"``).

Memory: the source is read once in chunks; each chunk is grouped into ~256 buckets and spilled to
disk as one run file (a user's events all land in one bucket, chosen by a hash of the raw user
id; bucket ``b`` belongs to partition ``b // buckets_per_partition``); each bucket is then loaded, filtered, sorted and
sessionized on its own, and the last pass streams partition by partition with explicit reads (no
memory maps, whose pages would count as resident). Peak memory is therefore about
``~100 bytes x max(chunk_size, events / 256)`` plus per-item and per-user counters, whatever
the log size; the disk needs about 24 bytes per event of scratch space next to the cache.
The result does not depend on ``chunk_size``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .._ints import is_int
from .cache import (ARRAY_DTYPES, CACHE_FORMAT, CACHE_VERSION, GLOBAL_ARRAYS, SPLITS as SPLIT_CODES, VERIFY_MODES,
                    TEMP_PREFIX, LAZY_REBUILD_ADVICE, CacheCorruptError, SessionCache, crc32_of, exchange_paths,
                    fsync_path, host_label, new_temp_dir, publish_temp_dir, remove_stale_temp_dirs, seal_temp_dir)
from .readers import (DEFAULT_CHUNK_SIZE, InteractionChunk, InteractionSource, ReadStats, _check_chunk_size,
                      _integer_ids)

__all__ = ["PreprocessParams", "preprocess", "cache_key"]

SPILL_DTYPE = np.dtype([("user", np.int64), ("item", np.int64), ("timestamp", np.float64)])
SPLIT_MODES = ("cold", "warm")


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    """Every choice that changes the cache's content (and therefore its key).

    Defaults are the paper's XING settings. ``max_user_count`` and ``max_session_length`` may be
    None (no limit). ``session_gap`` is in seconds (any finite positive real number, NumPy scalars
    included); a gap equal to it starts a new session. ``split_fractions`` are (train, validation,
    test), finite, non-negative and summing to 1. NumPy scalars are stored as the equal Python
    numbers, so they give the same cache key.
    """

    min_item_count: int = 50
    min_user_count: int = 10
    max_user_count: int | None = 500
    session_gap: float = 1800.0
    max_session_length: int | None = 20
    split: str = "cold"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    num_partitions: int = 16

    def __post_init__(self):
        for name in ("min_item_count", "min_user_count", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # np.int64 is not JSON-serialisable (cache key)
        for name in ("max_user_count", "max_session_length", "num_partitions"):
            value = getattr(self, name)
            if value is None and name != "num_partitions":
                continue
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer{' or None' if name != 'num_partitions' else ''}, "
                                 f"got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.max_user_count is not None and self.max_user_count < self.min_user_count:
            raise ValueError(f"max_user_count ({self.max_user_count}) must be >= min_user_count "
                             f"({self.min_user_count})")
        gap = self.session_gap
        if not (isinstance(gap, numbers.Real) and not isinstance(gap, (bool, np.bool_))
                and math.isfinite(gap) and gap > 0):
            raise ValueError(f"session_gap must be a finite positive number of seconds, got {gap!r}")
        # A plain float, JSON-serialisable: equal numbers (1800, 1800.0, np.float32(1800)) give the same cache key.
        object.__setattr__(self, "session_gap", float(gap))
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {self.split!r}")
        given = self.split_fractions
        if (isinstance(given, (str, bytes)) or not isinstance(given, collections.abc.Iterable)
                or not all(isinstance(f, numbers.Real) and not isinstance(f, (bool, np.bool_)) for f in given)):
            raise ValueError(f"split_fractions must be three finite non-negative numbers summing to 1, got {given!r}")
        fractions = tuple(float(f) for f in given)
        if (len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions)
                or abs(sum(fractions) - 1.0) > 1e-9):
            raise ValueError(f"split_fractions must be three finite non-negative numbers summing to 1, "
                             f"got {self.split_fractions!r}")
        object.__setattr__(self, "split_fractions", fractions)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"split_fractions": list(self.split_fractions)}


def cache_key(source: InteractionSource, params: PreprocessParams) -> str:
    """Hex digest identifying (format, source content, params): a new key means a new cache."""
    body = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": source.fingerprint(),
            "params": params.to_json()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def _partition_of_user(user: np.ndarray, num_partitions: int) -> np.ndarray:
    # Multiplicative hash so that consecutive ids spread over partitions.
    mixed = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    return (mixed % np.uint64(num_partitions)).astype(np.int64)


def _merge_counts(keys: np.ndarray, counts: np.ndarray, new_values: np.ndarray):
    """(sorted keys, counts) updated with the occurrences in new_values."""
    new_keys, new_counts = np.unique(new_values, return_counts=True)
    if keys.shape[0] == 0:
        return new_keys, new_counts.astype(np.int64)
    merged_keys, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    merged_counts = np.zeros(merged_keys.shape[0], dtype=np.int64)
    np.add.at(merged_counts, inverse, np.concatenate([counts, new_counts]))
    return merged_keys, merged_counts


class _KeyIndex:
    """Position of int64 keys in a sorted unique key array (-1 when absent).

    A dense lookup table when the keys are dense-ish (raw ids usually are): a gather instead of a binary
    search per event, several times faster on large logs. Only then: the table's size is bounded by the keys'
    count (at most DENSE_SLOTS_PER_KEY slots a key, or DENSE_SPAN_FLOOR slots), so that memory follows the
    keys, not the ids' span (two ids 2**25 apart made a 128 MiB table).
    """

    DENSE_SLOTS_PER_KEY = 8
    DENSE_SPAN_FLOOR = 1 << 16

    def __init__(self, sorted_keys: np.ndarray):
        self.keys = sorted_keys
        self.table = None
        if sorted_keys.shape[0]:
            self.low = int(sorted_keys[0])
            span = int(sorted_keys[-1]) - self.low + 1
            if span <= max(self.DENSE_SPAN_FLOOR, self.DENSE_SLOTS_PER_KEY * sorted_keys.shape[0]) and span <= 1 << 31:
                self.table = np.full(span, -1, dtype=np.int32 if sorted_keys.shape[0] < 1 << 31 else np.int64)
                self.table[sorted_keys - self.low] = np.arange(sorted_keys.shape[0])

    def positions(self, values: np.ndarray) -> np.ndarray:
        if self.keys.shape[0] == 0:
            return np.full(values.shape[0], -1, dtype=np.int64)
        if self.table is not None:
            offset = values - self.low
            inside = (offset >= 0) & (offset < self.table.shape[0])
            return np.where(inside, self.table[np.where(inside, offset, 0)], -1)
        position = np.minimum(np.searchsorted(self.keys, values), self.keys.shape[0] - 1)
        return np.where(self.keys[position] == values, position, -1)

    def contains(self, values: np.ndarray) -> np.ndarray:
        return self.positions(values) >= 0


class _Appender:
    """Appends arrays of one dtype to a raw binary file and counts their length.

    :meth:`close` makes the file durable; as a context manager, leaving the block also closes the
    handle on an error path, where the file is thrown away."""

    def __init__(self, path: Path, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.file = open(path, "wb")
        self.length = 0

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        array.tofile(self.file)
        self.length += array.shape[0]

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self) -> "_Appender":
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def _spill_buckets_per_partition(num_partitions: int) -> int:
    # Spill buckets are what pass 2 holds in memory at once; partitions are what the cache is cut
    # into. About 256 buckets keep pass 2 at ~1/256 of the log per step.
    return max(1, 256 // num_partitions)


def _spill(source, params, chunk_size, spill_dir, read_stats):
    """Pass 1: read the source once, count items, and write each chunk's events grouped by bucket
    to one run file (bucket ``b`` belongs to partition ``b // buckets_per_partition``; all of a
    user's events share a bucket). Returns (events read, item keys, item counts, runs), a run
    being (path, bucket offsets)."""
    num_buckets = params.num_partitions * _spill_buckets_per_partition(params.num_partitions)
    item_keys = np.empty(0, np.int64)
    item_counts = np.empty(0, np.int64)
    total = 0
    runs = []
    for number, chunk in enumerate(source.iter_chunks(chunk_size, read_stats)):
        chunk = _checked_chunk(chunk, source, number)
        total += len(chunk)
        item_keys, item_counts = _merge_counts(item_keys, item_counts, chunk.item)
        records = np.empty(len(chunk), dtype=SPILL_DTYPE)
        records["user"], records["item"], records["timestamp"] = chunk.user, chunk.item, chunk.timestamp
        bucket = _partition_of_user(chunk.user, num_buckets)
        # int16 keys make numpy's stable sort a radix sort: linear time.
        order = np.argsort(bucket.astype(np.int16) if num_buckets < 1 << 15 else bucket, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(bucket, minlength=num_buckets))))
        path = spill_dir / f"run{len(runs)}.bin"
        records[order].tofile(path)
        runs.append((path, bounds))
    return total, item_keys, item_counts, runs


def _checked_chunk(chunk, source, number: int) -> InteractionChunk:
    """A chunk of any source (the built-in readers or a user's InteractionSource) as InteractionChunk promises it:
    three 1-D arrays of equal length, int64 ids (integers, or floats holding whole numbers) and finite float64
    seconds; anything else raises ValueError naming the source and the chunk, before the cache is written."""
    where = f"{type(source).__name__} {getattr(source, 'name', '?')!r}, chunk {number}"
    try:
        user, item, timestamp = chunk
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a chunk must be an InteractionChunk (user, item, timestamp), got "
                         f"{type(chunk).__name__}") from None
    try:
        user, item = _integer_ids(user, "user"), _integer_ids(item, "item")
        timestamp = np.asarray(timestamp)
        if timestamp.dtype.kind not in "iuf":
            raise ValueError(f"timestamp: seconds must be numbers, got dtype {timestamp.dtype}")
        timestamp = np.ascontiguousarray(timestamp, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not (user.ndim == item.ndim == timestamp.ndim == 1 and user.shape == item.shape == timestamp.shape):
        raise ValueError(f"{where}: user, item and timestamp must be 1-D of equal length, got shapes {user.shape}, "
                         f"{item.shape}, {timestamp.shape}")
    finite = np.isfinite(timestamp)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{where}: timestamps must be finite; index {first} is {timestamp[first].item()!r}")
    return InteractionChunk(user, item, timestamp)


def _read_range(path: Path, dtype, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a raw binary file, read (not mapped: mapped pages would count
    towards the resident memory the streaming design keeps bounded)."""
    dtype = np.dtype(dtype)
    return np.fromfile(path, dtype=dtype, count=stop - start, offset=start * dtype.itemsize)


def _read_bucket(runs, bucket: int) -> np.ndarray:
    """All spilled events of one bucket, in source order (runs are in source order)."""
    pieces = [_read_range(path, SPILL_DTYPE, int(bounds[bucket]), int(bounds[bucket + 1]))
              for path, bounds in runs if bounds[bucket + 1] > bounds[bucket]]
    return np.concatenate(pieces) if pieces else np.empty(0, SPILL_DTYPE)


def _sessionize_bucket(records, kept_items, params, stats):
    """Pass 2 for one spill bucket (complete users). Returns arrays sorted by (user, time),
    sessionized.

    records: structured (n,) with user, item, timestamp (source order).
    """
    in_kept_items = kept_items.contains(records["item"])
    stats["events_dropped_item_filter"] += int((~in_kept_items).sum())
    records = records[in_kept_items]

    users, user_counts = np.unique(records["user"], return_counts=True)
    too_few = user_counts < params.min_user_count
    too_many = (user_counts > params.max_user_count) if params.max_user_count is not None else np.zeros_like(too_few)
    stats["users_dropped_too_few_events"] += int(too_few.sum())
    stats["events_dropped_user_too_few_events"] += int(user_counts[too_few].sum())
    stats["users_dropped_too_many_events"] += int(too_many.sum())
    stats["events_dropped_user_too_many_events"] += int(user_counts[too_many].sum())
    kept_users = users[~(too_few | too_many)]
    records = records[_KeyIndex(kept_users).contains(records["user"])]

    order = np.lexsort((records["timestamp"], records["user"]))  # stable: ties keep source order
    user = records["user"][order]
    item = records["item"][order]
    timestamp = records["timestamp"][order]
    n = user.shape[0]
    starts = np.ones(n, dtype=bool)
    if n > 1:
        # Finite timestamps more than about 1.8e308 apart differ by inf: a gap past any session_gap, which is what
        # it is (NumPy's overflow warning said otherwise).
        with np.errstate(over="ignore"):
            starts[1:] = (user[1:] != user[:-1]) | (np.diff(timestamp) >= params.session_gap)
    session_start = np.flatnonzero(starts)
    item_before_truncation = item
    if params.max_session_length is not None:
        session_of_event = np.cumsum(starts) - 1
        position_in_session = np.arange(n) - session_start[session_of_event]
        keep = position_in_session < params.max_session_length
        stats["events_dropped_session_truncation"] += int(n - keep.sum())
        user, item, timestamp = user[keep], item[keep], timestamp[keep]
        starts = starts[keep]
        session_start = np.flatnonzero(starts)
    session_lengths = np.diff(np.append(session_start, user.shape[0]))
    user_start = np.flatnonzero(np.concatenate(([True], user[1:] != user[:-1]))) if user.shape[0] else np.empty(0, np.int64)
    sessions_per_user = np.diff(np.append(np.searchsorted(session_start, user_start), session_start.shape[0]))
    return {
        "user_raw_id": user[user_start] if user.shape[0] else np.empty(0, np.int64),
        "item_raw": item,
        "item_raw_before_truncation": item_before_truncation,
        "timestamp": timestamp,
        "session_lengths": session_lengths,
        "sessions_per_user": sessions_per_user,
    }


def _write_items_and_splits(temp, spill_dir, params, partition_user_offsets, user_session_offsets, present_items,
                            time_range):
    """Pass 3, one partition at a time: dense item ids (raw-id order), split labels per session,
    per-partition checksums, and (users, sessions, events) per split.

    Cold: whole users at random (seeded). Warm: sessions by start time, cut at the train and
    train+valid fractions of the time span.
    """
    num_users = user_session_offsets.shape[0] - 1
    train_fraction, valid_fraction, _ = params.split_fractions
    if params.split == "cold":
        permutation = np.random.default_rng(params.seed).permutation(num_users)
        user_split = np.empty(num_users, dtype=np.int8)
        boundaries = [0, int(round(train_fraction * num_users)),
                      int(round((train_fraction + valid_fraction) * num_users)), num_users]
        for code in range(3):
            user_split[permutation[boundaries[code]:boundaries[code + 1]]] = code
        del permutation
    else:
        first, last = time_range
        last_split = max(code for code, fraction in enumerate(params.split_fractions) if fraction > 0)
        # first + f * (last - first), unless the span overflows float64 (timestamps near +-1.8e308): then the
        # weighted mean, which does not (the usual form is kept where it works: the cuts of every earlier cache).
        first, last = float(first), float(last)  # (Python floats: an overflow is inf without a warning)
        span = last - first
        cuts = np.array([first + f * span if math.isfinite(span) else (1 - f) * first + f * last
                         for f in (train_fraction, train_fraction + valid_fraction)])
    present_item_index = _KeyIndex(present_items)
    counts = np.zeros((3, 3), dtype=np.int64)  # (split, [users, sessions, events])
    checksums = []
    with (_Appender(temp / "item.bin", np.int32) as item_writer,
          _Appender(temp / "session_split.bin", np.int8) as split_writer):
        for p in range(params.num_partitions):
            user_lo, user_hi = int(partition_user_offsets[p]), int(partition_user_offsets[p + 1])
            session_lo, session_hi = int(user_session_offsets[user_lo]), int(user_session_offsets[user_hi])
            session_offsets = _read_range(temp / "session_offsets.bin", np.int64, session_lo, session_hi + 1)
            event_lo, event_hi = int(session_offsets[0]), int(session_offsets[-1])
            raw_item = _read_range(spill_dir / "item_raw.bin", np.int64, event_lo, event_hi)
            item = (present_item_index.positions(raw_item) + 1).astype(np.int32)
            sessions_per_user = np.diff(user_session_offsets[user_lo:user_hi + 1])
            if params.split == "cold":
                labels = np.repeat(user_split[user_lo:user_hi], sessions_per_user)
            else:
                start_time = _read_range(spill_dir / "session_start.bin", np.float64, session_lo, session_hi)
                # A cut at the span's end would send the sessions starting at the last time past it: capped at
                # the last split with a share, so that a split of fraction 0 stays empty.
                labels = np.minimum(np.searchsorted(cuts, start_time, side="right"), last_split).astype(np.int8)
            item_writer.append(item)
            split_writer.append(labels)
            timestamp = _read_range(temp / "timestamp.bin", np.float64, event_lo, event_hi)
            checksums.append({"item": crc32_of(item), "timestamp": crc32_of(timestamp),
                              "session_offsets": crc32_of(session_offsets), "session_split": crc32_of(labels)})
            # A user's sessions in a split are contiguous, so each (user, split) run starts once.
            session_user = np.repeat(np.arange(user_lo, user_hi), sessions_per_user)
            run_start = np.ones(labels.shape[0], dtype=bool)
            run_start[1:] = (session_user[1:] != session_user[:-1]) | (labels[1:] != labels[:-1])
            counts[:, 0] += np.bincount(labels[run_start], minlength=3)
            counts[:, 1] += np.bincount(labels, minlength=3)
            counts[:, 2] += np.bincount(labels, weights=np.diff(session_offsets), minlength=3).astype(np.int64)
        item_writer.close()
        split_writer.close()
    split_counts = {name: {"users": int(counts[code, 0]), "sessions": int(counts[code, 1]),
                           "events": int(counts[code, 2])} for name, code in SPLIT_CODES.items()}
    return split_counts, checksums


# The longest file name (in bytes) of the file systems a cache lives on (Linux's NAME_MAX).
NAME_MAX = 255

# Attempts at opening a published cache that another process replaces meanwhile (see _open_published).
OPEN_ATTEMPTS = 20


def _folder_identity(path: Path):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _open_published(final_path: Path, verify: str) -> SessionCache:
    """SessionCache.open of a published cache, again if another process's rebuild replaced the folder while it was
    read (its files were then of two caches, or gone): an error is the cache's only if the folder stayed the one
    that was opened. A file missing for good is reported as the damage it is."""
    attempts = 0
    while True:
        before = _folder_identity(final_path)
        try:
            return SessionCache.open(final_path, verify=verify)
        except (CacheCorruptError, FileNotFoundError) as error:
            attempts += 1
            if attempts == OPEN_ATTEMPTS or (before is not None and _folder_identity(final_path) == before):
                if isinstance(error, FileNotFoundError):
                    raise CacheCorruptError(f"{final_path}: {error.filename or error} is missing (removed)") from None
                raise
        time.sleep(0.005 * attempts)


def _publish(temp: Path, final_path: Path, manifest: dict, replace: bool) -> None:
    """Publish the finished build ``temp`` as ``final_path``. With ``replace``, an existing cache
    there is only given up now that its successor is complete: the two folders swap places in one
    atomic step where the system can (another process opening the cache meanwhile finds the old one
    or the new one, never none), and the old one, now in the temp dir, is deleted. Elsewhere the old
    one is renamed aside (into a temp dir, which a crash leaves as nothing that looks valid and the
    next build removes), the new one renamed in, and only then is the old one deleted; should
    publishing fail, the old one is put back."""
    if not replace:
        publish_temp_dir(temp, final_path, manifest)
        return
    seal_temp_dir(temp, manifest)
    try:
        exchanged = exchange_paths(temp, final_path)
    except FileNotFoundError:  # no cache there now (another rebuild is between its renames): published below
        exchanged = False
    if exchanged:
        try:
            fsync_path(final_path.parent)
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # the old cache
        return
    aside = new_temp_dir(final_path)
    replaced = aside / "replaced"
    # Every step inside the try, the rename aside included: an interrupt (Ctrl-C) can land as any call returns,
    # and the finally decides from what is on disk, never from how far the code got.
    try:
        try:
            os.rename(final_path, replaced)
        except FileNotFoundError:  # removed meanwhile (another rebuild): nothing to keep
            pass
        publish_temp_dir(temp, final_path, manifest)
    finally:
        try:
            if replaced.exists() and not final_path.exists():  # publishing failed: the old cache goes back
                os.rename(replaced, final_path)
        finally:
            # Deleted only with a cache in place (the new one, or the old one put back), or nothing aside: should
            # even the rename back fail, the old cache stays in the temp dir rather than being lost.
            if final_path.exists() or not replaced.exists():
                shutil.rmtree(aside, ignore_errors=True)


def _build(source, params, final_path, chunk_size, key, replace=False):
    started = time.perf_counter()
    read_stats = ReadStats()
    temp = new_temp_dir(final_path)
    try:
        spill_dir = temp / "spill"
        spill_dir.mkdir()
        events_read, item_keys, item_counts, runs = _spill(source, params, chunk_size, spill_dir, read_stats)
        kept_items = item_keys[item_counts >= params.min_item_count]
        stats = {
            "events_read": events_read,
            "items_read": int(item_keys.shape[0]),
            "items_dropped_item_filter": int(item_keys.shape[0] - kept_items.shape[0]),
            "events_dropped_item_filter": 0,
            "users_dropped_too_few_events": 0, "events_dropped_user_too_few_events": 0,
            "users_dropped_too_many_events": 0, "events_dropped_user_too_many_events": 0,
            "events_dropped_session_truncation": 0,
        }
        kept_item_index = _KeyIndex(kept_items)
        del item_keys, item_counts

        with contextlib.ExitStack() as open_files:
            writers = {name: open_files.enter_context(_Appender(temp / f"{name}.bin", ARRAY_DTYPES[name]))
                       for name in ("timestamp", "session_offsets", "user_session_offsets", "user_raw_id")}
            item_raw_writer = open_files.enter_context(_Appender(spill_dir / "item_raw.bin", np.int64))
            session_start_writer = open_files.enter_context(_Appender(spill_dir / "session_start.bin", np.float64))
            time_range = [np.inf, -np.inf]
            writers["session_offsets"].append(np.zeros(1, np.int64))
            writers["user_session_offsets"].append(np.zeros(1, np.int64))
            partition_user_offsets = [0]
            item_used = np.zeros(kept_items.shape[0], dtype=bool)
            item_kept_by_users = np.zeros(kept_items.shape[0], dtype=bool)
            events_written = sessions_written = 0
            max_session_length = 0
            buckets_per_partition = _spill_buckets_per_partition(params.num_partitions)
            for bucket in range(params.num_partitions * buckets_per_partition):
                records = _read_bucket(runs, bucket)
                part = _sessionize_bucket(records, kept_item_index, params, stats)
                del records
                writers["timestamp"].append(part["timestamp"])
                item_raw_writer.append(part["item_raw"])
                writers["session_offsets"].append(events_written + np.cumsum(part["session_lengths"]))
                writers["user_session_offsets"].append(sessions_written + np.cumsum(part["sessions_per_user"]))
                writers["user_raw_id"].append(part["user_raw_id"])
                session_start = np.cumsum(part["session_lengths"]) - part["session_lengths"]
                session_start_writer.append(part["timestamp"][session_start])
                if part["timestamp"].shape[0]:
                    time_range = [min(time_range[0], part["timestamp"].min()),
                                  max(time_range[1], part["timestamp"].max())]
                    max_session_length = max(max_session_length, int(part["session_lengths"].max()))
                item_used[kept_item_index.positions(part["item_raw"])] = True
                item_kept_by_users[kept_item_index.positions(part["item_raw_before_truncation"])] = True
                events_written += part["timestamp"].shape[0]
                sessions_written += part["session_lengths"].shape[0]
                if bucket % buckets_per_partition == 0:
                    partition_user_offsets.append(partition_user_offsets[-1])
                partition_user_offsets[-1] += part["user_raw_id"].shape[0]
            present_items = kept_items[item_used]
            for path, _ in runs:
                path.unlink()
            for writer in (*writers.values(), item_raw_writer, session_start_writer):
                writer.close()
        if events_written == 0:
            raise ValueError(f"no events left after preprocessing {source.name!r}: "
                             f"{json.dumps(stats | {'read': read_stats.to_json()})}")
        # By reason: no event of a kept user, or every event past its session's max_session_length.
        kept_by_users = int(item_kept_by_users.sum())
        stats["items_unused_after_user_filter"] = int(kept_items.shape[0]) - kept_by_users
        stats["items_unused_after_session_truncation"] = kept_by_users - int(present_items.shape[0])

        num_users = partition_user_offsets[-1]
        user_session_offsets = _read_range(temp / "user_session_offsets.bin", np.int64, 0, num_users + 1)
        small = {"item_raw_id": np.concatenate(([-1], present_items)).astype(np.int64),
                 "partition_user_offsets": np.asarray(partition_user_offsets, dtype=np.int64)}
        for name, array in small.items():
            with open(temp / f"{name}.bin", "wb") as f:
                array.tofile(f)
        split_counts, partition_checksums = _write_items_and_splits(
            temp, spill_dir, params, small["partition_user_offsets"], user_session_offsets, present_items,
            time_range)
        shutil.rmtree(spill_dir)
        lengths = {"item": events_written, "timestamp": events_written, "session_offsets": sessions_written + 1,
                   "session_split": sessions_written, "user_session_offsets": num_users + 1,
                   "user_raw_id": num_users, "item_raw_id": present_items.shape[0] + 1,
                   "partition_user_offsets": params.num_partitions + 1}
        global_checksums = {name: crc32_of(_read_range(temp / f"{name}.bin", ARRAY_DTYPES[name], 0, lengths[name]))
                            for name in GLOBAL_ARRAYS}
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "source_name": source.name,
            "source": source.fingerprint(), "params": params.to_json(),
            "counts": {"events": events_written, "sessions": sessions_written, "users": num_users,
                       "items": int(present_items.shape[0]), "partitions": params.num_partitions,
                       "max_session_length": max_session_length, "splits": split_counts},
            "stats": stats | {"read": read_stats.to_json(),
                              "seconds": round(time.perf_counter() - started, 3)},
            "files": {name: {"dtype": np.dtype(dtype).str, "length": int(lengths[name])}
                      for name, dtype in ARRAY_DTYPES.items()},
            "checksums": {"global": global_checksums, "partitions": partition_checksums},
            "created_unix": time.time(),
        }
        _publish(temp, final_path, manifest, replace)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def preprocess(source: InteractionSource, cache_dir: str | os.PathLike, params: PreprocessParams | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE, rebuild: bool = False, verify: str = "lazy") -> SessionCache:
    """Preprocess ``source`` into a cache under ``cache_dir`` (once) and open it.

    The cache lives in ``cache_dir/<source name>-<key>`` (``~`` in ``cache_dir`` is expanded) where
    the key hashes the source's fingerprint and ``params``: an existing cache with the same key is
    opened without reading the source; different params build a new one. A corrupted existing cache raises
    :class:`CacheCorruptError` unless ``rebuild=True``, which replaces it once the new one is
    built: a rebuild that fails leaves the existing cache as it was. What is checked here depends on
    ``verify``: "full" checks every partition's event data, while the default "lazy" checks the manifest and
    the small arrays here and each partition's event data at its first read, where damage is a
    :class:`CacheCorruptError` naming the file and partition (``rebuild=True`` then replaces the cache).
    ``chunk_size`` (events read per chunk) bounds memory and never changes the result.
    The returned cache's ``stats`` count every event and record dropped, by reason.
    """
    if not isinstance(source, InteractionSource):
        raise TypeError(f"source must be an InteractionSource, got {type(source).__name__}")
    params = PreprocessParams() if params is None else params
    if not isinstance(params, PreprocessParams):
        raise TypeError(f"params must be a PreprocessParams, got {type(params).__name__}")
    chunk_size = _check_chunk_size(chunk_size)
    if verify not in VERIFY_MODES:  # before any work: SessionCache.open would refuse it only after the build
        raise ValueError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}")
    name = source.name
    # The cache's folder is named after the source: a name that is not one plain folder name would put it
    # elsewhere ('a/../..') or make it look like an unfinished build ('.tmp-...'), refused only after the work.
    if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name)):
        raise ValueError(f"source.name must be a plain folder name (no path separator, not starting with '.'), "
                         f"got {name!r}")
    key = cache_key(source, params)
    final_path = Path(cache_dir).expanduser() / f"{name}-{key}"
    # The build's folder is named after the cache's, longer (cache.new_temp_dir): a name the file system takes for
    # the cache but not for its build failed as "File name too long" only when the build started.
    build_name = f"{TEMP_PREFIX}{final_path.name}-{host_label()}-{os.getpid()}-{'0' * 8}"
    build_bytes = len(os.fsencode(build_name))
    if build_bytes > NAME_MAX:
        raise ValueError(f"source.name is too long: the cache's build folder {build_name!r} would have {build_bytes} "
                         f"bytes, past the {NAME_MAX} a file name may have; name the source in at most "
                         f"{NAME_MAX - (build_bytes - len(os.fsencode(name)))} bytes")
    if final_path.exists() and not rebuild:
        try:
            return _open_published(final_path, verify)
        except CacheCorruptError as error:
            refused = str(error)
        # Raised outside the handler: the first error (and the refused cache's maps it holds) is not kept as the
        # new one's context.
        # A partition's checksum error already names the way out (SessionCache.verify_partitions, for first reads).
        advised = refused.endswith(LAZY_REBUILD_ADVICE)
        raise CacheCorruptError(refused if advised else f"{refused}; pass rebuild=True to replace the cache")
    remove_stale_temp_dirs(final_path)
    _build(source, params, final_path, chunk_size, key, replace=rebuild)
    return _open_published(final_path, verify)
