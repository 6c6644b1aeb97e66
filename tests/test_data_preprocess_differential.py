"""Differential fuzzing of the data preprocessing path (readers, preprocess, cache) against slow pure-Python
re-implementations of what the docstrings say, plus the defects found that way (fixed)."""

import math
import random
import tracemalloc
import warnings
from collections import Counter

import numpy as np
import pytest

from hiertcn_fast.data import (ArraySource, CacheCorruptError, DelimitedSource, PreprocessParams, SessionCache,
                               preprocess)
from hiertcn_fast.data.preprocess import cache_key
from hiertcn_fast.data.readers import MalformedRecordError, ReadStats
from test_data_preprocess import reference_user_sessions

SPLIT_NAMES = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------------------------
# Reference preprocessing, straight from preprocess.py's module docstring.

def reference_warm_label(start, first, last, fractions):
    """Split of a session starting at ``start``: cut at first + f * span for f = train, train + valid (a session
    starting at a cut goes to the later split), never into a split of fraction 0."""
    span = last - first
    cuts = [first + f * span if math.isfinite(span) else (1 - f) * first + f * last
            for f in (fractions[0], fractions[0] + fractions[1])]
    label = sum(1 for cut in cuts if cut <= start)
    return min(label, max(code for code, f in enumerate(fractions) if f > 0))


def cache_contents(cache):
    """(raw user -> sessions of (raw item, timestamp), (raw user, session number) -> split code)."""
    sessions, labels = {}, {}
    for u in range(cache.num_users):
        raw_user = int(cache.user_raw_id[u])
        user_sessions = []
        first = int(cache.user_session_offsets[u])
        for s in range(first, int(cache.user_session_offsets[u + 1])):
            lo, hi = cache.session_offsets[s], cache.session_offsets[s + 1]
            user_sessions.append([(int(cache.item_raw_id[i]), float(t))
                                  for i, t in zip(cache.item[lo:hi], cache.timestamp[lo:hi])])
            labels[(raw_user, s - first)] = int(cache.session_split[s])
        sessions[raw_user] = user_sessions
    return sessions, labels


def random_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    num_users, num_items = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    user_base = int(rng.choice([0, -50, 1 << 40, -(1 << 62), (1 << 62), -(1 << 63)]))
    user = rng.integers(0, num_users, n) * int(rng.choice([1, 3, 1 << 30])) + user_base
    item = rng.integers(0, num_items, n) * int(rng.choice([1, 7, 1 << 35])) - int(rng.choice([0, 1 << 61]))
    mode = int(rng.integers(0, 5))
    if mode == 0:  # coarse: ties and gaps exactly at the threshold
        timestamp = rng.integers(0, 10, n) * 100.0
    elif mode == 1:  # unsorted, negative
        timestamp = rng.normal(0, 1e5, n)
    elif mode == 2:  # differences overflowing float64, signed zeros
        timestamp = rng.choice([-1.7e308, 0.0, 1.7e308, 5.0, -0.0], n)
    elif mode == 3:  # large epoch, sub-second steps
        timestamp = 1.6e9 + rng.integers(0, 5, n) * 0.5
    else:
        timestamp = rng.integers(-3, 3, n).astype(float) * float(rng.choice([1.0, 1e300]))
    min_user_count = int(rng.integers(0, 4))
    fractions = [(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.0, 1.0, 0.0),
                 (1 / 3, 1 / 3, 1 / 3), (0.5, 0.0, 0.5)][int(rng.integers(0, 7))]
    params = PreprocessParams(
        min_item_count=int(rng.integers(0, 4)), min_user_count=min_user_count,
        max_user_count=None if rng.random() < 0.5 else int(rng.integers(max(min_user_count, 1), 10)),
        session_gap=float(rng.choice([100.0, 0.5, 1e-300, 1e308, 1800.0])),
        max_session_length=None if rng.random() < 0.4 else int(rng.integers(1, 5)),
        split="cold" if rng.random() < 0.5 else "warm", split_fractions=fractions, seed=int(rng.integers(0, 5)),
        num_partitions=int(rng.choice([1, 2, 3, 16, 300])))
    chunk_size = int(rng.choice([1, 2, 7, 1 << 20]))
    return user, item, timestamp, params, chunk_size


@pytest.mark.parametrize("block", range(4))
def test_preprocess_matches_a_pure_python_reference_on_random_logs(tmp_path, block):
    """Sessions, dense ids, drop statistics, both splits and the manifest's split counts, on small random logs with
    repeated/unsorted/huge/negative timestamps, one-event users, ids near the int64 ends, filters that remove
    everything, one-event chunks and more partitions than spill buckets."""
    outcomes = Counter()
    for seed in range(block * 12, block * 12 + 12):
        user, item, timestamp, params, chunk_size = random_case(seed)
        users, items = user.tolist(), item.tolist()
        expected = reference_user_sessions(user, item, timestamp, params)
        root = tmp_path / f"seed{seed}"
        source = ArraySource(user, item, timestamp, name=f"log{seed}")
        if not any(expected.values()):
            with pytest.raises(ValueError, match="no events left"):
                preprocess(source, root, params, chunk_size=chunk_size)
            assert not root.exists() or not any(root.iterdir()), "a failed build left something behind"
            outcomes["empty"] += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # np.diff of +-1.7e308 overflows to inf: a new session
            cache = preprocess(source, root, params, chunk_size=chunk_size, verify="full")
        got, labels = cache_contents(cache)
        assert got == expected, (seed, params)
        stats = cache.stats
        dropped = (stats["events_dropped_item_filter"] + stats["events_dropped_user_too_few_events"]
                   + stats["events_dropped_user_too_many_events"] + stats["events_dropped_session_truncation"])
        assert stats["events_read"] == len(users) == dropped + cache.num_events, seed
        item_count = Counter(items)
        kept_items = [i for i, c in item_count.items() if c >= params.min_item_count]
        present = sorted({i for sessions in expected.values() for s in sessions for i, _ in s})
        assert stats["items_read"] == len(item_count)
        assert stats["items_dropped_item_filter"] == len(item_count) - len(kept_items)
        assert cache.item_raw_id.tolist() == [-1] + present and cache.num_items == len(present)
        assert cache.num_sessions == sum(len(s) for s in expected.values())
        assert cache.max_session_length == max(len(s) for ss in expected.values() for s in ss)
        assert cache.num_partitions == params.num_partitions == cache.partition_user_offsets.shape[0] - 1
        if params.split == "warm":
            all_times = [t for ss in expected.values() for s in ss for _, t in s]
            first, last = min(all_times), max(all_times)
            for (u, k), label in labels.items():
                assert label == reference_warm_label(expected[u][k][0][1], first, last, params.split_fractions)
        else:
            user_label = {}
            for (u, _), label in labels.items():
                assert user_label.setdefault(u, label) == label  # a user's sessions share a split
            n_users = len(user_label)
            train, valid, _ = params.split_fractions
            bounds = [0, round(train * n_users), round((train + valid) * n_users), n_users]
            per_split = Counter(user_label.values())
            assert [per_split[c] for c in range(3)] == [bounds[c + 1] - bounds[c] for c in range(3)], seed
        for code, name in enumerate(SPLIT_NAMES):
            chosen = [key for key, label in labels.items() if label == code]
            assert cache.manifest["counts"]["splits"][name] == {
                "users": len({u for u, _ in chosen}), "sessions": len(chosen),
                "events": sum(len(expected[u][k]) for u, k in chosen)}, (seed, name)
        reopened = preprocess(source, root, params)  # same key: opened, not rebuilt
        assert reopened.path == cache.path and reopened.manifest == cache.manifest
        outcomes["built"] += 1
    assert outcomes["built"] >= 5


# ----------------------------------------------------------------------------------------------------------------
# Readers.

def _reference_read(lines, delimiter, first_line):
    """What the reader docstring promises, line by line: (events, malformed line numbers, blank lines)."""
    events, malformed, blank = [], [], 0
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            blank += 1
            continue
        row = line.rstrip("\r\n").split(delimiter)
        try:
            if len(row) < 3:
                raise ValueError
            u, i, t = int(row[0]), int(row[1]), float(row[2])
            if not (math.isfinite(t) and -(1 << 63) <= u < (1 << 63) and -(1 << 63) <= i < (1 << 63)):
                raise ValueError
        except ValueError:
            malformed.append(number)
            continue
        events.append((u, i, t))
    return events, malformed, blank


def _read(path, chunk_size, delimiter, on_malformed="skip"):
    stats, events = ReadStats(), []
    for chunk in DelimitedSource(path, delimiter=delimiter, on_malformed=on_malformed).iter_chunks(chunk_size, stats):
        events += list(zip(chunk.user.tolist(), chunk.item.tolist(), chunk.timestamp.tolist()))
    return events, stats


def test_delimited_reader_matches_a_line_by_line_reference_whatever_the_chunk(tmp_path):
    """Random files (three delimiters; LF, CRLF and CR line ends; a last line without its end; blank lines; short
    rows; bad ids and times; int64 limits): the same events, the same malformed line numbers and blank counts for
    every chunk size."""
    bad_ids = ["1", "-3", "+4", " 5", "007", "x", "", "1.0", "9223372036854775807", "9223372036854775808", "1e3",
               "\u00e9", "nan"]
    bad_times = ["1", "2.5", "-3e2", "nan", "inf", "", "abc", "1e400", " 7 ", ".5", "5."]
    rng = random.Random(1)
    for trial in range(150):
        delimiter, end = rng.choice([",", "\t", ";"]), rng.choice(["\n", "\r\n", "\r"])
        lines = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.1:
                lines.append(rng.choice(["", "  ", "\t"]) + end)
            elif r < 0.6:
                lines.append(delimiter.join(str(rng.randint(a, b)) for a, b in ((-5, 50), (0, 9), (0, 999))) + end)
            else:
                cells = [rng.choice(bad_ids), rng.choice(bad_ids), rng.choice(bad_times), "z"][:rng.randint(2, 4)]
                lines.append(delimiter.join(cells) + end)
        if lines and rng.random() < 0.5:
            lines[-1] = lines[-1].rstrip("\r\n")
        path = tmp_path / f"log{trial}.txt"
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(delimiter.join(["user_id", "item_id", "timestamp"]) + end + "".join(lines))
        with open(path, newline="", encoding="utf-8") as f:
            f.readline()
            expected = _reference_read(list(f), delimiter, 2)
        for chunk_size in (1, 2, 3, 100):
            events, stats = _read(path, chunk_size, delimiter)
            lines_reported = [int(example.split(":")[1]) for example in stats.examples]
            assert (events, lines_reported, stats.blank_lines) == expected, (trial, chunk_size)
            assert stats.malformed_total == len(expected[1]) and stats.events == len(events)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\xef\xbb\xbf", "empty file"),
    (b"\n", "missing column 'user_id'"),
    (b"user_id,item_id\n1,2\n", "missing column 'timestamp'"),
    (b"user_id\titem_id\ttimestamp\n1\t2\t3\n", "missing column 'user_id'"),  # wrong delimiter for a .csv
    (b'"user_id","item_id","timestamp"\n1,2,3\n', "missing column 'user_id'"),
])
def test_a_bad_header_or_empty_file_is_a_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        list(DelimitedSource(path).iter_chunks())
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [
    b"user_id,item_id,timestamp\r\n1,2,3\r\n4,5,6",     # CRLF, no final line end
    b"user_id,item_id,timestamp\r1,2,3\r4,5,6\r",        # CR only
    "\ufeffuser_id,item_id,timestamp\n1,2,3\n\n4,5,6\n".encode(),  # BOM, blank line
    b" user_id , item_id , timestamp \n1,2,3\n4,5,6,extra\n",
])
def test_line_end_variants_read_the_same_events(tmp_path, content):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    for chunk_size in (1, 2, 10):
        assert _read(path, chunk_size, ",", on_malformed="fail")[0] == [(1, 2, 3.0), (4, 5, 6.0)]


@pytest.mark.parametrize("cell", ["1_2", "\uff11\uff12"])
def test_an_id_in_python_literal_syntax_is_malformed_not_another_id(tmp_path, cell):
    """int() and float() also take Python's literal syntax and other scripts' digits: "1_2" and full-width
    "\uff11\uff12" were read as the id 12 (numpy's parser, the fast path, refuses both), merged into another user
    even with on_malformed="fail"."""
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n{cell},5,100\n12,6,200\n", encoding="utf-8")
    for chunk_size in (1, 4):
        with pytest.raises(MalformedRecordError, match=r"log\.csv:2:"):
            _read(path, chunk_size, ",", on_malformed="fail")


# ----------------------------------------------------------------------------------------------------------------
# Failed builds and the cache left behind.

def test_a_malformed_record_deep_in_the_file_leaves_no_cache_and_a_fixed_file_builds(tmp_path):
    path = tmp_path / "log.csv"
    rows = [f"{u % 7},{u % 5},{u * 60}" for u in range(200)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows[:150] + ["3,x,9"] + rows[150:]) + "\n")
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, num_partitions=3)
    cache_dir = tmp_path / "caches"
    source = DelimitedSource(path)
    with pytest.raises(MalformedRecordError, match=r"log\.csv:152:"):
        preprocess(source, cache_dir, params, chunk_size=16)
    assert list(cache_dir.iterdir()) == []  # neither a cache nor a temporary build
    with pytest.raises(CacheCorruptError):
        SessionCache.open(cache_dir / f"log-{cache_key(source, params)}")
    # Skipping it builds; the skipped record is counted with its line, and the cache reopens.
    cache = preprocess(DelimitedSource(path, on_malformed="skip"), cache_dir, params, chunk_size=16)
    assert cache.stats["events_read"] == 200 and cache.stats["read"]["malformed"] == {
        "user or item id is not an integer": 1}
    assert "log.csv:152" in cache.stats["read"]["examples"][0]
    assert [p.name for p in cache_dir.iterdir()] == [cache.path.name]
    assert SessionCache.open(cache.path, verify="full").manifest == cache.manifest


def test_a_header_only_file_is_no_events_and_leaves_nothing(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(ValueError, match="no events left"):
        preprocess(DelimitedSource(path), tmp_path / "caches", PreprocessParams(min_item_count=0, min_user_count=0))
    assert list((tmp_path / "caches").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Statistics and resources.

def test_items_lost_to_session_truncation_are_not_attributed_to_the_user_filter(tmp_path):
    """Items whose every event fell to max_session_length were counted as unused after the user filter (the main
    job's ml-100k: 54 such items while no user was dropped); they have a count of their own now."""
    params = PreprocessParams(min_item_count=0, min_user_count=0, max_user_count=None, max_session_length=1,
                              num_partitions=1)
    cache = preprocess(ArraySource([1, 1], [10, 11], [0.0, 60.0]), tmp_path, params)
    assert cache.stats["users_dropped_too_few_events"] == cache.stats["users_dropped_too_many_events"] == 0
    assert cache.stats["events_dropped_session_truncation"] == 1 and cache.item_raw_id.tolist() == [-1, 10]
    assert cache.stats["items_unused_after_user_filter"] == 0
    assert cache.stats["items_unused_after_session_truncation"] == 1


@pytest.mark.parametrize("user, item", [([0, 0], [1, 33_554_000]), ([0, 33_554_283], [1, 2])])
def test_peak_memory_of_a_tiny_log_with_spread_ids_stays_small(tmp_path, user, item):
    """_KeyIndex made a dense lookup table whenever the ids spanned at most 2**25, however few they were: two ids
    2**25 apart made a 128 MiB table (a 2-event log peaked at 256 MiB). Its size now follows the number of ids."""
    params = PreprocessParams(min_item_count=0, min_user_count=0, max_user_count=None)
    tracemalloc.start()
    try:
        preprocess(ArraySource(user, item, [0.0, 1.0]), tmp_path, params, chunk_size=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a 2-event log"
