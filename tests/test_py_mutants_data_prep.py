"""Tests written by a mutation-testing audit of data/readers.py, data/preprocess.py and data/synthetic.py: each kills
a planted bug the rest of the suite let through (named in its docstring). Every expected value is hand-computed from
a log small enough to follow by eye (or recomputed with plain numpy/Python), never taken from the code under test."""

import importlib.machinery
import importlib.util
import itertools
import os

import numpy as np
import pytest

from hiertcn_fast.data import (ArraySource, DelimitedSource, MalformedRecordError, PreprocessParams, ReadStats,
                               SyntheticSource, cache_key, load_dataset, preprocess)
from hiertcn_fast.data import readers as readers_module
from test_data_readers import read_all

LOOSE = dict(min_item_count=1, min_user_count=1, max_user_count=None, max_session_length=None)


# ---- readers -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", ["arrays", "delimited", "synthetic"])
def test_a_chunk_size_of_zero_is_refused(tmp_path, make):
    """Kills R2 (readers.py: _check_chunk_size accepts 0): a DelimitedSource then read the whole file as one chunk,
    ignoring the memory bound, and ArraySource failed with range()'s own message."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n")
    source = {"arrays": lambda: ArraySource([1], [2], [3.0]), "delimited": lambda: DelimitedSource(path),
              "synthetic": lambda: SyntheticSource(10)}[make]()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        list(itertools.islice(source.iter_chunks(0), 3))  # bounded: SyntheticSource would yield empty chunks forever
    if make != "synthetic":  # (preprocess would spill those empty chunks for ever)
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            preprocess(source, tmp_path / "cache", PreprocessParams(**LOOSE), chunk_size=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_source_refuses_a_timestamp_that_is_not_finite(bad):
    """Kills R6 (readers.py: ArraySource's finite-timestamp check is gone): the constructor accepted NaN/inf
    seconds, which only preprocess's chunk check caught, after reading the log."""
    with pytest.raises(ValueError, match="timestamp must be finite"):
        ArraySource([1, 1], [2, 3], [0.0, bad])


def test_array_fingerprint_sees_a_change_of_timestamps_only():
    """Kills R7 (readers.py: ArraySource.fingerprint hashes user and item only): two logs that differ only in their
    times got the same cache key, so the second reopened the first one's (stale) sessions."""
    params = PreprocessParams(**LOOSE)
    a = ArraySource([1, 1, 2], [5, 6, 7], [0.0, 60.0, 120.0])
    b = ArraySource([1, 1, 2], [5, 6, 7], [0.0, 7200.0, 120.0])  # user 1's events now two sessions apart
    assert cache_key(a, params) != cache_key(b, params)
    assert cache_key(a, params) == cache_key(ArraySource([1, 1, 2], [5, 6, 7], [0.0, 60.0, 120.0]), params)


def test_an_edit_in_the_middle_of_a_large_file_with_a_new_mtime_changes_the_key(tmp_path):
    """Kills R9 (readers.py: the file fingerprint drops mtime_ns): only the first and last MiB are hashed, so an
    edit in the middle of a 3 MiB file that keeps its size is seen by the modification time alone."""
    path = tmp_path / "log.csv"
    line = b"12345,67890,1600000000\n"
    path.write_bytes(b"user_id,item_id,timestamp\n" + line * ((3 << 20) // len(line)))
    params = PreprocessParams()
    st = path.stat()
    before = cache_key(DelimitedSource(path), params)
    with open(path, "r+b") as f:  # an item id in the middle, size kept
        f.seek(st.st_size // 2)
        start = st.st_size // 2 + f.read(64).index(b"\n") + 1
        f.seek(start + 6)
        f.write(b"9")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == st.st_size
    assert cache_key(DelimitedSource(path), params) != before


def test_dropped_event_types_must_be_known_ones(tmp_path):
    """Kills R12 (readers.py: the drop_event_types <= known_event_types check is gone): dropping a type that is
    also declared unknown is a contradiction the constructor refuses."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,type\n1,10,100,1\n")
    with pytest.raises(ValueError, match="drop_event_types must be a subset of known_event_types"):
        DelimitedSource(path, event_type="type", drop_event_types=(4,), known_event_types=(1, 2))
    DelimitedSource(path, event_type="type", drop_event_types=(2,), known_event_types=(1, 2))  # a subset: fine


def test_a_column_index_one_past_the_header_is_refused_at_the_header(tmp_path):
    """Kills R13 (readers.py: the index range check is 0 <= column <= len(names)): index 3 of a 3-column header was
    accepted and every record then failed as malformed instead of the header being refused."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(ValueError, match=r"log\.csv:1: timestamp column index 3 out of range \(header has 3"):
        read_all(DelimitedSource(path, timestamp=3, on_malformed="skip"))
    user, item, timestamp = read_all(DelimitedSource(path, timestamp=2))  # the last column: fine
    assert user.tolist() == [1] and item.tolist() == [2] and timestamp.tolist() == [3.0]


@pytest.mark.parametrize("bad_line", ["1,9223372036854775808,5", "-9223372036854775809,2,5"])
def test_ids_outside_int64_are_malformed_records(tmp_path, bad_line):
    """Kills R21 (readers.py: the slow parser checks only the user id's int64 range): an item id of 2**63 reached
    np.asarray(..., int64) and ended the read with a bare OverflowError instead of being a malformed record."""
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n1,2,3\n{bad_line}\n4,5,6\n")
    with pytest.raises(MalformedRecordError, match=r"log\.csv:3: id out of int64 range"):
        read_all(DelimitedSource(path))
    stats = ReadStats()
    user, item, timestamp = read_all(DelimitedSource(path, on_malformed="skip"), stats=stats)
    assert user.tolist() == [1, 4] and item.tolist() == [2, 5] and timestamp.tolist() == [3.0, 6.0]
    assert dict(stats.malformed) == {"id out of int64 range": 1} and stats.records == 3 and stats.events == 2
    # The largest and smallest int64 ids are fine.
    path.write_text("user_id,item_id,timestamp\n-9223372036854775808,9223372036854775807,1\n")
    user, item, _ = read_all(DelimitedSource(path))
    assert user.tolist() == [-(1 << 63)] and item.tolist() == [(1 << 63) - 1]


def test_recbole_installed_without_the_example_file_says_to_reinstall(monkeypatch, tmp_path):
    """Kills R25 (readers.py: recbole_example_path returns the first candidate without checking it exists): a
    recbole install lacking dataset_example/ml-100k gave a path to nothing, which DelimitedSource then reported as
    a missing file without the reinstall hint."""
    (tmp_path / "recbole").mkdir()
    spec = importlib.machinery.ModuleSpec("recbole", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "recbole")]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(readers_module.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "recbole" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="no dataset_example/ml-100k/ml-100k.inter; reinstall"):
        readers_module.recbole_example_path("ml-100k")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        load_dataset("ml-100k")


def test_load_dataset_passes_on_its_malformed_policy():
    """Kills R26 (readers.py: load_dataset drops on_malformed): load_dataset('ml-100k', on_malformed='skip') read
    with the 'fail' policy, and the policy is part of the cache key."""
    assert load_dataset("ml-100k", on_malformed="skip").on_malformed == "skip"
    assert load_dataset("ml-100k").on_malformed == "fail"
    with pytest.raises(ValueError, match="on_malformed"):
        load_dataset("ml-100k", on_malformed="ignore")


# ---- preprocessing -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["min_item_count", "min_user_count", "seed"])
def test_negative_counts_and_seed_are_refused(name):
    """Kills P1 (preprocess.py: the non-negative check of min_item_count, min_user_count and seed is gone): a
    negative seed then failed only in the split's numpy generator, after the whole log had been read."""
    with pytest.raises(ValueError, match=f"{name} must be a non-negative integer, got -1"):
        PreprocessParams(**{name: -1})
    assert getattr(PreprocessParams(**{name: 0}), name) == 0


def test_more_partitions_than_spill_buckets_work(tmp_path):
    """Kills P8 (preprocess.py: 256 // num_partitions without max(1, .)): num_partitions=300 gave zero spill
    buckets, so every event was lost and the build ended with 'no events left'."""
    user, item, timestamp = [3, 3, 8, 9], [10, 11, 10, 12], [0.0, 60.0, 5.0, 7.0]
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path,
                       PreprocessParams(**LOOSE, num_partitions=300))
    assert cache.num_partitions == 300 and cache.num_events == 4 and cache.num_users == 3
    assert cache.partition_user_offsets[0] == 0 and cache.partition_user_offsets[-1] == 3
    assert (np.diff(cache.partition_user_offsets) >= 0).all()
    assert sorted(cache.user_raw_id.tolist()) == [3, 8, 9]


def test_drop_statistics_are_hand_counted(tmp_path):
    """Kills P10 (preprocess.py: a user with exactly max_user_count events is dropped: '>=' for '>'), P11
    (preprocess.py: users_dropped_too_few_events counts their events, not the users) and P21 (preprocess.py: items
    left unused by the user filter keep a dense id: present_items = kept_items), and checks every other drop counter
    on a log small enough to count by hand.

    Log (user: items; one event per row, all 60 s apart, so each user's events form one session; 24 events):
    user 1: 10 -> 1 event: too few (min_user_count=3);   user 2: 10 11 -> 2 events: too few;
    user 3: 10 11 10 11 12 12 (99) 13 13 -> 8 events after the item filter: too many (max_user_count=5);
    user 4: 10 11 12 10 -> kept, truncated to max_session_length=3 (10 11 12): 1 event dropped;
    user 5: 10 11 12 10 11 -> exactly max_user_count: kept, truncated to 10 11 12: 2 events dropped;
    user 6: 11 12 11 -> exactly min_user_count: kept whole.
    Item counts: 10 -> 8, 11 -> 8, 12 -> 5, 13 -> 2, 99 -> 1: 5 items read, 99 dropped (min_item_count=2); item 13
    is used by user 3 only, so it is unused once the users are filtered. Dense ids: 10 -> 1, 11 -> 2, 12 -> 3.
    """
    rows = [(1, 10), (2, 10), (2, 11), (3, 10), (3, 11), (3, 10), (3, 11), (3, 12), (3, 12), (3, 99), (3, 13),
            (3, 13), (4, 10), (4, 11), (4, 12), (4, 10), (5, 10), (5, 11), (5, 12), (5, 10), (5, 11),
            (6, 11), (6, 12), (6, 11)]
    user = np.array([u for u, _ in rows])
    item = np.array([i for _, i in rows])
    timestamp = np.arange(len(rows)) * 60.0
    params = PreprocessParams(min_item_count=2, min_user_count=3, max_user_count=5, session_gap=1800,
                              max_session_length=3, num_partitions=2)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    stats = cache.stats
    expected = {"events_read": 24, "items_read": 5, "items_dropped_item_filter": 1, "events_dropped_item_filter": 1,
                "users_dropped_too_few_events": 2, "events_dropped_user_too_few_events": 3,
                "users_dropped_too_many_events": 1, "events_dropped_user_too_many_events": 8,
                "events_dropped_session_truncation": 3, "items_unused_after_user_filter": 1}
    assert {name: stats[name] for name in expected} == expected
    assert cache.item_raw_id.tolist() == [-1, 10, 11, 12]
    items_of = {int(cache.user_raw_id[u]): cache.item[cache.session_offsets[cache.user_session_offsets[u]]:
                                                      cache.session_offsets[cache.user_session_offsets[u + 1]]].tolist()
                for u in range(cache.num_users)}
    assert items_of == {4: [1, 2, 3], 5: [1, 2, 3], 6: [2, 3, 2]}


def test_cold_split_rounds_the_user_boundaries(tmp_path):
    """Kills P14 (preprocess.py: the cold split's first boundary is int(0.8 * users), truncated, not rounded) and
    P18 (preprocess.py: a split's user count is its session count; also killed by test_data_batcher's ml-100k
    counts).

    7 users, 2 one-event sessions each (3600 s apart). Boundaries: round(0.8 * 7) = round(5.6) = 6 and
    round(0.9 * 7) = round(6.3) = 6, so train has 6 users (12 sessions, 12 events), valid none, test 1 user
    (2 sessions). Truncating would give 5 / 1 / 1.
    """
    user = np.repeat(np.arange(1, 8), 2)
    item = np.tile([10, 11], 7)
    timestamp = np.tile([0.0, 3600.0], 7)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, PreprocessParams(**LOOSE, num_partitions=2))
    assert cache.num_sessions == 14
    sessions_per_user = np.diff(cache.user_session_offsets)
    assert sessions_per_user.tolist() == [2] * 7
    user_label = cache.session_split[cache.user_session_offsets[:-1]]
    assert (cache.session_split == np.repeat(user_label, 2)).all()
    assert np.bincount(user_label, minlength=3).tolist() == [6, 0, 1]
    splits = cache.manifest["counts"]["splits"]
    assert splits["train"] == {"users": 6, "sessions": 12, "events": 12}
    assert splits["valid"] == {"users": 0, "sessions": 0, "events": 0}
    assert splits["test"] == {"users": 1, "sessions": 2, "events": 2}


def test_warm_split_puts_a_session_starting_at_a_cut_in_the_later_split(tmp_path):
    """Kills P15 (preprocess.py: the warm split's searchsorted uses side='left') and P18 (preprocess.py: a split's
    user count is its session count).

    Fractions (0.5, 0.25, 0.25) over the span 0..1000 put the cuts at exactly 500 and 750. Sessions (gap 50 s):
    user 1 starts sessions at 0, 100 (train) and 1000 (test); user 2 at 500 (valid: it starts at the first cut) and
    750 (test: at the second cut). Per split (users, sessions, events): train (1, 2, 2), valid (1, 1, 1), test
    (2, 2, 2).
    """
    user = np.array([1, 1, 1, 2, 2])
    item = np.array([10, 11, 12, 10, 11])
    timestamp = np.array([0.0, 100.0, 1000.0, 500.0, 750.0])
    params = PreprocessParams(**LOOSE, session_gap=50, split="warm", split_fractions=(0.5, 0.25, 0.25),
                              num_partitions=1)
    cache = preprocess(ArraySource(user, item, timestamp), tmp_path, params)
    sessions = {}  # raw user -> [(start time, split code)]
    for u in range(cache.num_users):
        for s in range(cache.user_session_offsets[u], cache.user_session_offsets[u + 1]):
            start = float(cache.timestamp[cache.session_offsets[s]])
            sessions.setdefault(int(cache.user_raw_id[u]), []).append((start, int(cache.session_split[s])))
    assert sessions == {1: [(0.0, 0), (100.0, 0), (1000.0, 2)], 2: [(500.0, 1), (750.0, 2)]}
    splits = cache.manifest["counts"]["splits"]
    assert splits["train"] == {"users": 1, "sessions": 2, "events": 2}
    assert splits["valid"] == {"users": 1, "sessions": 1, "events": 1}
    assert splits["test"] == {"users": 2, "sessions": 2, "events": 2}


class _InterruptedSource(ArraySource):
    """Yields one chunk, then is interrupted as by Ctrl-C."""

    def iter_chunks(self, chunk_size=1 << 20, stats=None):
        yield from super().iter_chunks(chunk_size, stats)
        raise KeyboardInterrupt


def test_an_interrupted_build_leaves_nothing_behind(tmp_path):
    """Kills P23 (preprocess.py: the build's clean-up catches Exception, not BaseException): a Ctrl-C during the
    read left the half-built temp dir (with its spill files, ~24 bytes per event) in the cache folder."""
    source = _InterruptedSource([1, 1, 2], [5, 6, 7], [0.0, 60.0, 120.0], name="interrupted")
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, tmp_path, PreprocessParams(**LOOSE, num_partitions=2))
    assert list(tmp_path.iterdir()) == []


# ---- synthetic data ------------------------------------------------------------------------------------------------

def _synthetic_by_user(source):
    user, item, timestamp = read_all(source)
    order = np.lexsort((timestamp, user))
    return user[order], item[order], timestamp[order]


def test_synthetic_blocks_hold_different_users():
    """Kills S5 (synthetic.py: every block is seeded with (seed, 0)) and S6 (synthetic.py: raw user ids restart at
    1 in every block; also killed, indirectly, by test_data_preprocess's chunk-size independence test). With 8
    users per block, the users of block 1 are ids 9..16 and behave independently of block 0's users 1..8."""
    source = SyntheticSource(3000, num_items=200, num_topics=10, mean_events_per_user=40.0, seed=3,
                             users_per_block=8)
    user, item, timestamp = _synthetic_by_user(source)
    ids = np.unique(user)
    assert ids.tolist() == list(range(1, ids.shape[0] + 1)) and ids.shape[0] > 16  # consecutive, several blocks
    # Block 1's users, shifted back by 8, must not replay block 0's users event for event.
    block0 = user <= 8
    block1 = (user > 8) & (user <= 16)
    replay = (sorted(zip((user[block1] - 8).tolist(), item[block1].tolist(), timestamp[block1].tolist()))
              == sorted(zip(user[block0].tolist(), item[block0].tolist(), timestamp[block0].tolist())))
    assert not replay
    assert not np.array_equal(item[user == 1][:5], item[user == 9][:5])


# ---- bad input the audit saw accepted (fixed with these tests) -------------------------------------------------------

@pytest.mark.parametrize("timestamp", [np.array(["5", "6"]), np.array([True, False]),
                                       np.array([5, None], dtype=object)])
def test_array_source_refuses_timestamps_that_are_not_numbers(timestamp):
    """ArraySource cast its timestamps to float64, so the strings "5" and "6" became times 5.0 and 6.0 and True
    became 1.0; the ids were refused for the same dtypes. Now the timestamps are too, naming the dtype."""
    with pytest.raises(ValueError, match=f"timestamp must be numeric .*got dtype {timestamp.dtype}"):
        ArraySource([1, 1], [2, 3], timestamp)


def test_array_source_takes_integer_timestamps():
    """The refusal above leaves integer and floating timestamps alone (as float64 seconds)."""
    source = ArraySource([1, 1], [2, 3], np.array([5, 7], dtype=np.int32))
    assert source.timestamp.dtype == np.float64 and source.timestamp.tolist() == [5.0, 7.0]


@pytest.mark.parametrize("argument", ["drop_event_types", "known_event_types"])
@pytest.mark.parametrize("bad", [4.7, "3", True])
def test_event_types_must_be_integers(tmp_path, argument, bad):
    """DelimitedSource took int(t) of every event type, so 4.7 filtered type 4 and "3" type 3. Now a value that is
    not an integer is refused, naming the argument."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,type\n1,2,3,1\n")
    kwargs = {"known_event_types": (1, 2, 3, 4)} if argument == "drop_event_types" else {}
    kwargs[argument] = (1, bad) if argument == "known_event_types" else (bad,)
    with pytest.raises(ValueError, match=f"{argument} must hold integer event types, got {bad!r}"):
        DelimitedSource(path, event_type="type", **kwargs)


def test_event_types_take_numpy_integers(tmp_path):
    """NumPy integers are integer event types: type 2 (a numpy int64) is dropped, type 1 kept."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,type\n1,2,3,1\n1,5,4,2\n")
    source = DelimitedSource(path, event_type="type", drop_event_types=np.array([2]), known_event_types=[1, 2])
    assert read_all(source)[1].tolist() == [2]


@pytest.mark.parametrize("seed", [1.5, -1, True, "0"])
def test_synthetic_seed_must_be_a_non_negative_integer(seed):
    """SyntheticSource took int(seed): 1.5 gave seed 1's data, and -1 failed later inside NumPy's generator."""
    with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed!r}"):
        SyntheticSource(10, seed=seed)
