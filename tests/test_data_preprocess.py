"""Preprocessing against a plain-Python reference; sessionizing edge cases; cache integrity."""

import dataclasses
import importlib
import json
import os
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from hiertcn_fast.data import (ArraySource, CacheCorruptError, DelimitedSource, PreprocessParams, SessionCache,
                               SyntheticSource, load_dataset, preprocess)

# The package exports the function under the module's name, so the module comes from importlib.
preprocess_module = importlib.import_module("hiertcn_fast.data.preprocess")


class CountingSource(ArraySource):
    """An in-memory log that counts its reads; ``fail_after`` simulates a crash after that many
    chunks."""

    def __init__(self, user, item, timestamp, name="arrays", fail_after=None):
        super().__init__(user, item, timestamp, name)
        self.fail_after = fail_after
        self.iterations = 0

    def iter_chunks(self, chunk_size=1 << 20, stats=None):
        self.iterations += 1
        for index, chunk in enumerate(super().iter_chunks(chunk_size, stats)):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("simulated crash while reading")
            yield chunk


def reference_user_sessions(user, item, timestamp, params):
    """Plain-Python version of the paper's preprocessing: raw user -> list of sessions of
    (raw item, timestamp)."""
    events = list(zip(user.tolist(), item.tolist(), timestamp.tolist()))
    item_count = Counter(i for _, i, _ in events)
    events = [e for e in events if item_count[e[1]] >= params.min_item_count]
    user_count = Counter(u for u, _, _ in events)
    high = params.max_user_count if params.max_user_count is not None else float("inf")
    events = [e for e in events if params.min_user_count <= user_count[e[0]] <= high]
    by_user = defaultdict(list)
    for position, (u, i, t) in enumerate(events):
        by_user[u].append((t, position, i))
    result = {}
    for u, rows in by_user.items():
        rows.sort()
        sessions = []
        for t, _, i in rows:
            if not sessions or t - sessions[-1][-1][1] >= params.session_gap:
                sessions.append([])
            sessions[-1].append((i, t))
        if params.max_session_length is not None:
            sessions = [s[:params.max_session_length] for s in sessions]
        result[u] = sessions
    return result


def cache_user_sessions(cache):
    result = {}
    for u in range(cache.num_users):
        sessions = []
        for s in range(cache.user_session_offsets[u], cache.user_session_offsets[u + 1]):
            lo, hi = cache.session_offsets[s], cache.session_offsets[s + 1]
            sessions.append([(int(cache.item_raw_id[i]), float(t))
                             for i, t in zip(cache.item[lo:hi], cache.timestamp[lo:hi])])
        result[int(cache.user_raw_id[u])] = sessions
    return result


def random_log(seed, n=3000, users=300, items=400):
    rng = np.random.default_rng(seed)
    user = (rng.zipf(1.2, size=n) % users) * 7 + 3  # skewed: some heavy, some one-off users
    item = rng.zipf(1.3, size=n) % items + 1000
    # Coarse times make ties and exact-threshold gaps frequent.
    timestamp = rng.integers(0, 150, size=n) * 600.0
    return user, item, timestamp


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size,num_partitions", [(1 << 20, 1), (13, 7), (256, 3)])
@pytest.mark.parametrize("id_scale", [1, 1 << 33])  # dense lookup tables / binary search
def test_preprocess_equals_reference(tmp_path, seed, chunk_size, num_partitions, id_scale):
    user, item, timestamp = random_log(seed)
    user, item = user * id_scale - 5, item * id_scale
    params = PreprocessParams(min_item_count=5, min_user_count=3, max_user_count=70, session_gap=1800,
                              max_session_length=4, num_partitions=num_partitions, seed=seed)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params, chunk_size=chunk_size, verify="full")
    expected = reference_user_sessions(user, item, timestamp, params)
    assert cache_user_sessions(cache) == expected
    stats = cache.stats
    dropped = (stats["events_dropped_item_filter"] + stats["events_dropped_user_too_few_events"]
               + stats["events_dropped_user_too_many_events"] + stats["events_dropped_session_truncation"])
    assert stats["events_read"] == user.shape[0] == dropped + cache.num_events
    assert stats["items_read"] == np.unique(item).shape[0]
    assert stats["users_dropped_too_many_events"] > 0 and stats["users_dropped_too_few_events"] > 0
    assert stats["events_dropped_session_truncation"] > 0 and stats["events_dropped_item_filter"] > 0
    # Dense items 1..num_items, in raw-id order, every one used; 0 reserved.
    assert cache.item_raw_id[0] == -1 and (np.diff(cache.item_raw_id[1:]) > 0).all()
    assert np.array_equal(np.unique(cache.item), np.arange(1, cache.num_items + 1))
    # Partitions are contiguous user ranges covering everything.
    assert cache.partition_user_offsets[-1] == cache.num_users and cache.num_partitions == num_partitions


def test_result_independent_of_chunk_size(tmp_path):
    source = SyntheticSource(60_000, num_items=500, seed=3, users_per_block=50)
    params = PreprocessParams(min_item_count=20, min_user_count=5, max_user_count=400, num_partitions=5)
    in_memory = preprocess(source, tmp_path / "a", params, chunk_size=1 << 20)
    streamed = preprocess(source, tmp_path / "b", params, chunk_size=101)  # ~600 chunks
    for name in ("item", "timestamp", "session_offsets", "session_split", "user_session_offsets",
                 "user_raw_id", "item_raw_id", "partition_user_offsets"):
        np.testing.assert_array_equal(getattr(in_memory, name), getattr(streamed, name), err_msg=name)
    assert in_memory.manifest["checksums"] == streamed.manifest["checksums"]


def sessions_of(times, gap=1800.0, min_user_count=1, max_session_length=None, users=None):
    n = len(times)
    users = [1] * n if users is None else users
    params = PreprocessParams(min_item_count=1, min_user_count=min_user_count, max_user_count=None,
                              session_gap=gap, max_session_length=max_session_length, num_partitions=2)
    return params, np.asarray(users), np.arange(n) + 100, np.asarray(times, dtype=np.float64)


def test_sessionizing_edge_cases(tmp_path):
    # Gap exactly at the threshold starts a session; just below does not; equal timestamps keep
    # source order and stay together; a one-event user is one session of length 1.
    params, user, item, timestamp = sessions_of([0, 1799, 3598, 3598, 3598, 10_000, 5],
                                                users=[1, 1, 1, 1, 1, 1, 2])
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    sessions = cache_user_sessions(cache)
    assert sessions[1] == [[(100, 0.0), (101, 1799.0), (102, 3598.0), (103, 3598.0), (104, 3598.0)],
                           [(105, 10_000.0)]]
    params, user, item, timestamp = sessions_of([0, 1800, 3600, 3600.5])
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    assert cache_user_sessions(cache)[1] == [[(100, 0.0)], [(101, 1800.0)], [(102, 3600.0), (103, 3600.5)]]
    assert cache_user_sessions(preprocess(ArraySource([9], [1], [5.0]), tmp_path, params)) == {9: [[(1, 5.0)]]}


def test_unsorted_input_and_ties_keep_source_order(tmp_path):
    params, user, item, timestamp = sessions_of([50, 10, 50, 10, 30], max_session_length=3)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    assert cache_user_sessions(cache)[1] == [[(101, 10.0), (103, 10.0), (104, 30.0)]]
    assert cache.stats["events_dropped_session_truncation"] == 2


def test_cold_and_warm_splits(tmp_path):
    source = SyntheticSource(40_000, num_items=300, seed=4, users_per_block=100)
    cold = preprocess(source, tmp_path, PreprocessParams(min_item_count=5, min_user_count=2, seed=11))
    user_of_session = np.repeat(np.arange(cold.num_users), np.diff(cold.user_session_offsets))
    label_per_user = {}
    for u, label in zip(user_of_session.tolist(), cold.session_split.tolist()):
        assert label_per_user.setdefault(u, label) == label  # all of a user's sessions in one split
    counts = np.bincount(list(label_per_user.values()), minlength=3) / cold.num_users
    np.testing.assert_allclose(counts, [0.8, 0.1, 0.1], atol=0.01)
    again = preprocess(source, tmp_path / "again", PreprocessParams(min_item_count=5, min_user_count=2, seed=11))
    np.testing.assert_array_equal(again.session_split, cold.session_split)
    reseeded = preprocess(source, tmp_path, PreprocessParams(min_item_count=5, min_user_count=2, seed=12))
    assert not np.array_equal(reseeded.session_split, cold.session_split)

    warm = preprocess(source, tmp_path, PreprocessParams(min_item_count=5, min_user_count=2, split="warm"))
    start_time = warm.timestamp[warm.session_offsets[:-1]]
    span_lo, span_hi = warm.timestamp.min(), warm.timestamp.max()
    cut = span_lo + np.array([0.8, 0.9]) * (span_hi - span_lo)
    np.testing.assert_array_equal(warm.session_split, np.searchsorted(cut, start_time, side="right"))
    assert set(np.unique(warm.session_split).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("fractions", [(1.0, 0.0, 0.0), (0.8, 0.2, 0.0), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5)])
def test_a_warm_split_of_fraction_zero_is_empty(tmp_path, fractions):
    """Sessions starting at the log's last time sat past a cut at the span's end: a split of fraction 0 got them."""
    user = np.array([1, 1, 2, 2, 3])
    item = np.array([5, 6, 5, 6, 5])
    timestamp = np.array([0.0, 10_000.0, 5_000.0, 20_000.0, 20_000.0])  # users 2 and 3 start sessions at the end
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, split="warm",
                              split_fractions=fractions)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    counts = np.bincount(cache.session_split, minlength=3)
    assert counts.sum() == cache.num_sessions == 5
    for code, fraction in enumerate(fractions):
        assert (counts[code] == 0) == (fraction == 0), (counts.tolist(), fractions)


def test_equal_session_gaps_give_one_cache(tmp_path, small_source):
    """1800, 1800.0 and NumPy's 1800 are the same parameters: one key, one cache, resumable across them."""
    gaps = [1800, 1800.0, np.int64(1800), np.float32(1800.0)]
    keys = {preprocess_module.cache_key(small_source, dataclasses.replace(SMALL, session_gap=gap)) for gap in gaps}
    assert len(keys) == 1
    paths = {preprocess(small_source, tmp_path, dataclasses.replace(SMALL, session_gap=gap)).path for gap in gaps}
    assert len(paths) == 1 and small_source.iterations == 1


class _HandMadeSource(preprocess_module.InteractionSource):
    """A user's own InteractionSource, yielding whatever chunk it is given."""

    name = "hand-made"

    def __init__(self, chunk):
        self.chunk = chunk

    def fingerprint(self):
        return {"reader": "hand-made", "id": id(self)}

    def iter_chunks(self, chunk_size=1 << 20, stats=None):
        yield self.chunk


@pytest.mark.parametrize("how, message", [
    ("nan timestamp", "chunk 0: timestamps must be finite; index 2 is nan"),
    ("fractional item", "chunk 0: item: ids must be whole numbers in the int64 range; index 1 is 2.5"),
    ("nan user", "chunk 0: user: ids must be whole numbers"),
    ("text timestamp", "chunk 0: timestamp: seconds must be numbers"),
    ("unequal lengths", "chunk 0: user, item and timestamp must be 1-D of equal length"),
    ("not a chunk", "a chunk must be an InteractionChunk"),
])
def test_a_custom_sources_bad_chunk_is_refused_before_anything_is_written(tmp_path, how, message):
    """InteractionChunk promises int64 ids and float64 seconds; a custom source's chunk that breaks it was used as
    it came (a NaN time joined a session; float ids failed deep inside with an IndexError)."""
    user, item, timestamp = np.array([1, 1, 2]), np.array([1, 2, 3]), np.array([0.0, 60.0, 120.0])
    chunk = {"nan timestamp": (user, item, np.array([0.0, 60.0, np.nan])),
             "fractional item": (user, np.array([1.0, 2.5, 3.0]), timestamp),
             "nan user": (np.array([1.0, np.nan, 2.0]), item, timestamp),
             "text timestamp": (user, item, np.array(["0", "60", "120"])),
             "unequal lengths": (user, item[:2], timestamp),
             "not a chunk": 42}[how]
    if isinstance(chunk, tuple):
        chunk = preprocess_module.InteractionChunk(*chunk)
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None)
    with pytest.raises(ValueError, match="hand-made.*" + message.replace("(", r"\(").replace(")", r"\)")):
        preprocess(_HandMadeSource(chunk), tmp_path / "cache", params)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_bad_verify_is_refused_before_the_build(tmp_path, small_source):
    with pytest.raises(ValueError, match="verify must be"):
        preprocess(small_source, tmp_path, SMALL, verify="ful")
    assert small_source.iterations == 0 and not any(tmp_path.iterdir())


def test_params_validation():
    with pytest.raises(ValueError, match="split"):
        PreprocessParams(split="random")
    with pytest.raises(ValueError, match="split_fractions"):
        PreprocessParams(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="max_user_count"):
        PreprocessParams(min_user_count=10, max_user_count=5)
    with pytest.raises(ValueError, match="session_gap"):
        PreprocessParams(session_gap=0)
    with pytest.raises(ValueError, match="num_partitions"):
        PreprocessParams(num_partitions=0)
    with pytest.raises(TypeError, match="source"):
        preprocess("ml-100k", "/tmp")


def test_no_events_left_is_an_error(tmp_path):
    header_only = tmp_path / "log.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(ValueError, match="no events left"):
        preprocess(DelimitedSource(header_only), tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-built left behind


# ---- the cache: keys, reuse, atomicity, corruption -------------------------------------------

SMALL = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, max_session_length=None,
                         num_partitions=4)


@pytest.fixture
def small_source():
    user, item, timestamp = random_log(7, n=4000, users=50)
    return CountingSource(user, item, timestamp, name="small")


def test_same_params_reopen_without_reading_and_new_params_new_cache(tmp_path, small_source):
    first = preprocess(small_source, tmp_path, SMALL)
    assert small_source.iterations == 1
    started = time.perf_counter()
    again = preprocess(small_source, tmp_path, SMALL)
    assert time.perf_counter() - started < 0.5
    assert small_source.iterations == 1 and again.path == first.path
    other = preprocess(small_source, tmp_path, dataclasses.replace(SMALL, session_gap=900))
    assert small_source.iterations == 2 and other.path != first.path and other.num_sessions > first.num_sessions
    assert other.params["session_gap"] == 900 and first.params["session_gap"] == 1800


def test_crash_mid_build_leaves_nothing_that_looks_valid(tmp_path, small_source):
    small_source.fail_after = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(small_source, tmp_path, SMALL, chunk_size=500)
    assert list(tmp_path.iterdir()) == []
    small_source.fail_after = None
    cache = preprocess(small_source, tmp_path, SMALL, chunk_size=500)
    assert cache.num_events == 4000


def assert_only_the_cache_is_left(tmp_path, cache):
    assert list(tmp_path.iterdir()) == [cache.path]  # no temp dir, no set-aside old cache
    again = SessionCache.open(cache.path, verify="full")
    assert again.num_events == cache.num_events and again.key == cache.key


def test_a_failed_rebuild_keeps_the_existing_cache(tmp_path, small_source):
    cache = preprocess(small_source, tmp_path, SMALL, chunk_size=500)
    small_source.fail_after = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(small_source, tmp_path, SMALL, chunk_size=500, rebuild=True)
    assert_only_the_cache_is_left(tmp_path, cache)
    small_source.fail_after = None
    rebuilt = preprocess(small_source, tmp_path, SMALL, chunk_size=500, rebuild=True)
    assert small_source.iterations == 3 and rebuilt.path == cache.path
    assert_only_the_cache_is_left(tmp_path, rebuilt)


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_a_rebuild_that_fails_to_publish_puts_the_existing_cache_back(tmp_path, small_source, monkeypatch,
                                                                      atomic_swap):
    """(atomic_swap False: a system without renameat2's exchange, where the old cache is moved aside first.)"""
    cache = preprocess(small_source, tmp_path, SMALL)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess_module, "publish_temp_dir", full_disk)
    monkeypatch.setattr(preprocess_module, "seal_temp_dir", full_disk)
    if not atomic_swap:
        monkeypatch.setattr(preprocess_module, "exchange_paths", lambda first, second: False)
    with pytest.raises(OSError, match="No space left"):
        preprocess(small_source, tmp_path, SMALL, rebuild=True)
    assert_only_the_cache_is_left(tmp_path, cache)


def open_files_under(directory):
    """Paths under ``directory`` that this process has open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listing itself, closed meanwhile
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.parametrize("failing_pass", ["sessionize", "split"])
def test_a_failed_build_closes_its_files(tmp_path, small_source, monkeypatch, failing_pass):
    calls = []

    def fail_on_third_call(real):
        def wrapper(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(f"simulated failure in the {failing_pass} pass")
            return real(*args)
        return wrapper

    name = {"sessionize": "_sessionize_bucket", "split": "crc32_of"}[failing_pass]
    monkeypatch.setattr(preprocess_module, name, fail_on_third_call(getattr(preprocess_module, name)))
    with pytest.raises(RuntimeError, match="simulated failure") as caught:
        preprocess(small_source, tmp_path, SMALL)
    # The traceback (alive in ``caught``) still holds the build's frames: the files must be closed
    # by the build itself, not by their objects being collected.
    assert caught.value.__traceback__ is not None
    assert open_files_under(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_leftover_temp_dir_is_never_a_cache(tmp_path, small_source):
    cache = preprocess(small_source, tmp_path, SMALL)
    temp = tmp_path / f".tmp-{cache.path.name}-1-deadbeef"
    os.rename(cache.path, temp)
    with pytest.raises(CacheCorruptError, match="unfinished"):
        SessionCache.open(temp)
    os.rename(temp, cache.path)
    # An unfinished build by a process that is gone is cleaned up by the next build.
    dead = tmp_path / f".tmp-{cache.path.name}-999999999-0badf00d"
    dead.mkdir()
    alive = tmp_path / f".tmp-{cache.path.name}-{os.getpid()}-0badf00d"
    alive.mkdir()
    # The same, named with the host (as builds are now); another machine's build is never removed here (its pid
    # means nothing on this machine: on a disk shared by the nodes of a job, a live build was removed).
    from hiertcn_fast.data.cache import host_label

    dead_here = tmp_path / f".tmp-{cache.path.name}-{host_label()}-999999999-0badf00d"
    other_host = tmp_path / f".tmp-{cache.path.name}-another_node-999999999-0badf00d"
    alive_here = tmp_path / f".tmp-{cache.path.name}-{host_label()}-{os.getpid()}-0badf00d"
    for folder in (dead_here, other_host, alive_here):
        folder.mkdir()
    preprocess(small_source, tmp_path, SMALL, rebuild=True)
    assert not dead.exists() and alive.exists()
    assert not dead_here.exists() and other_host.exists() and alive_here.exists()
    (cache.path / "manifest.json").unlink()
    with pytest.raises(CacheCorruptError, match="no manifest.json"):
        SessionCache.open(cache.path)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)
        f.seek(offset)
        f.write(bytes([value[0] ^ 0x01]))


@pytest.mark.parametrize("name", ["item", "timestamp", "session_split"])
def test_corrupted_partition_data_is_detected(tmp_path, small_source, name):
    cache = preprocess(small_source, tmp_path, SMALL)
    path = cache.path / f"{name}.bin"
    flip_byte(path, path.stat().st_size // 2)
    lazy = SessionCache.open(cache.path)  # cheap open does not read the events
    with pytest.raises(CacheCorruptError, match=f"{name}.bin: checksum mismatch in partition"):
        lazy.verify()
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        SessionCache.open(cache.path, verify="full")
    with pytest.raises(CacheCorruptError, match="rebuild=True"):
        preprocess(small_source, tmp_path, SMALL, verify="full")
    rebuilt = preprocess(small_source, tmp_path, SMALL, rebuild=True, verify="full")
    assert rebuilt.num_events == cache.num_events


def test_corrupted_global_arrays_truncation_and_manifest_are_detected(tmp_path, small_source):
    cache = preprocess(small_source, tmp_path, SMALL)
    flip_byte(cache.path / "user_raw_id.bin", 3)
    with pytest.raises(CacheCorruptError, match="user_raw_id.bin: checksum mismatch"):
        SessionCache.open(cache.path)
    cache = preprocess(small_source, tmp_path, SMALL, rebuild=True)
    with open(cache.path / "timestamp.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 8)
    with pytest.raises(CacheCorruptError, match="timestamp.bin: expected .* bytes"):
        SessionCache.open(cache.path)
    cache = preprocess(small_source, tmp_path, SMALL, rebuild=True)
    manifest_path = cache.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["events"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="manifest checksum mismatch"):
        SessionCache.open(cache.path)
    manifest_path.write_text("{not json")
    with pytest.raises(CacheCorruptError, match="unreadable manifest"):
        SessionCache.open(cache.path)


def test_ml100k_cache_opens_fast(tmp_path):
    params = PreprocessParams(min_item_count=5, min_user_count=5, max_user_count=None)
    cache = preprocess(load_dataset("ml-100k"), tmp_path, params)
    assert cache.num_users == 943 and cache.stats["events_read"] == 100_000
    started = time.perf_counter()
    SessionCache.open(cache.path)
    assert time.perf_counter() - started < 0.2


def test_a_warm_split_of_a_time_span_past_float64_still_cuts_by_time(tmp_path):
    """A warm split cuts sessions by start time at 80% and 90% of the time span. Timestamps may be any finite
    float64; when last - first overflows (here 2e308) the cuts were first + fraction * inf = inf, so every session,
    the latest included, went to train and test stayed empty. The cuts are then 0.6e308 and 0.8e308."""
    timestamps = np.array([-1e308, -5e307, 0.0, 5e307, 1e308])
    source = ArraySource(np.arange(5), np.ones(5, dtype=np.int64), timestamps, name="huge")
    params = PreprocessParams(min_item_count=0, min_user_count=0, max_user_count=None, split="warm", num_partitions=1)
    cache = preprocess(source, tmp_path, params)
    starts = np.asarray(cache.timestamp)[np.asarray(cache.session_offsets)[:-1]]
    split_of_start = dict(zip(starts.tolist(), np.asarray(cache.session_split).tolist()))
    assert split_of_start == {-1e308: 0, -5e307: 0, 0.0: 0, 5e307: 0, 1e308: 2}


def test_timestamps_further_apart_than_float64_spans_start_a_session_without_a_warning(tmp_path):
    """One user's events at -1e308 (twice) and 1e308 (twice): the gap between them overflows to inf, a gap past any
    session_gap (two sessions), which NumPy reported as an overflow."""
    import warnings

    source = ArraySource(np.ones(4, dtype=np.int64), np.array([1, 2, 3, 4]), np.array([1e308, 1e308, -1e308, -1e308]),
                         name="huge-gap")
    params = PreprocessParams(min_item_count=0, min_user_count=0, max_user_count=None, num_partitions=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = preprocess(source, tmp_path, params)
    assert np.diff(np.asarray(cache.session_offsets)).tolist() == [2, 2]


def test_rebuild_interrupted_right_after_the_old_cache_is_moved_aside_keeps_the_old_cache(tmp_path, monkeypatch):
    """preprocess(rebuild=True) promises "a rebuild that fails leaves the existing cache as it was". _publish's
    rename of the old cache aside sat outside the try whose handler puts it back, while the enclosing finally
    deleted the folder it was moved into: a Ctrl-C delivered as that rename returned deleted the old cache (and
    _build the new build), leaving nothing. The old cache must be put back, and open with the same content."""
    source = SyntheticSource(3000, num_items=50, mean_events_per_user=20, seed=1)
    params = PreprocessParams(min_item_count=1, min_user_count=2, num_partitions=2)
    cache = preprocess(source, tmp_path, params)
    path, items = cache.path, np.asarray(cache.item).copy()
    del cache
    real, calls = os.rename, []

    def rename_then_interrupt(src, dst):
        real(src, dst)
        calls.append((src, dst))
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated Ctrl-C as the old cache was moved aside")

    monkeypatch.setattr(os, "rename", rename_then_interrupt)
    monkeypatch.setattr(preprocess_module, "exchange_paths", lambda first, second: False)  # (the rename-aside path)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, tmp_path, params, rebuild=True)
    monkeypatch.undo()
    assert path.exists(), f"the existing cache was deleted; left in {tmp_path}: {sorted(p.name for p in tmp_path.iterdir())}"
    assert np.array_equal(np.asarray(SessionCache.open(path, verify="full").item), items)


def test_rebuild_interrupted_right_after_the_folders_swap_leaves_a_whole_cache(tmp_path, monkeypatch):
    """With the atomic swap, an interrupt as it returns finds the new cache in place and the old one in the build's
    temp dir, which the build's cleanup removes: a whole cache, and nothing else, is left."""
    real = preprocess_module.exchange_paths
    (tmp_path / "probe_a").mkdir()
    (tmp_path / "probe_b").mkdir()
    if not real(tmp_path / "probe_a", tmp_path / "probe_b"):
        pytest.skip("this file system cannot swap folders atomically (the rename-aside path is tested above)")
    (tmp_path / "probe_a").rmdir()
    (tmp_path / "probe_b").rmdir()
    source = SyntheticSource(3000, num_items=50, mean_events_per_user=20, seed=1)
    params = PreprocessParams(min_item_count=1, min_user_count=2, num_partitions=2)
    cache = preprocess(source, tmp_path, params)
    path, items = cache.path, np.asarray(cache.item).copy()
    del cache

    def swap_then_interrupt(first, second):
        assert real(first, second)
        raise KeyboardInterrupt("simulated Ctrl-C as the folders swapped")

    monkeypatch.setattr(preprocess_module, "exchange_paths", swap_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, tmp_path, params, rebuild=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert np.array_equal(np.asarray(SessionCache.open(path, verify="full").item), items)
