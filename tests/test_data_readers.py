"""Readers: round trips, column mapping, malformed records, built-in and synthetic data."""

import importlib.util

import numpy as np
import pytest

from hiertcn_fast.data import (DelimitedSource, MalformedRecordError, ReadStats, RecBoleInterSource,
                               SyntheticSource, XingSource, load_dataset)
from hiertcn_fast.data import readers as readers_module


def read_all(source, chunk_size=1 << 20, stats=None):
    chunks = list(source.iter_chunks(chunk_size, stats))
    if not chunks:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    return tuple(np.concatenate(arrays) for arrays in zip(*chunks))


def random_log(rng, n):
    user = rng.integers(-5, 1 << 40, size=n)
    item = rng.integers(0, 1 << 35, size=n)
    timestamp = rng.integers(0, 2_000_000_000, size=n).astype(np.float64) + rng.choice([0.0, 0.5], size=n)
    return user, item, timestamp


@pytest.mark.parametrize("delimiter", [",", "\t"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_delimited_round_trip_with_column_mapping(tmp_path, delimiter, chunk_size):
    rng = np.random.default_rng(0)
    user, item, timestamp = random_log(rng, 101)
    path = tmp_path / "log.csv"
    with open(path, "w") as f:
        f.write(delimiter.join(["ts", "extra", "item", "who"]) + "\n")
        for u, i, t in zip(user, item, timestamp):
            f.write(delimiter.join([repr(float(t)), "x", str(i), str(u)]) + "\n")
    source = DelimitedSource(path, user="who", item="item", timestamp="ts", delimiter=delimiter)
    stats = ReadStats()
    got = read_all(source, chunk_size, stats)
    np.testing.assert_array_equal(got[0], user)
    np.testing.assert_array_equal(got[1], item)
    np.testing.assert_array_equal(got[2], timestamp)
    assert stats.records == stats.events == 101 and stats.malformed_total == 0


def test_headerless_file_uses_column_indices(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("5\t10\t100\n6\t11\t200\n")
    user, item, timestamp = read_all(DelimitedSource(path, user=0, item=1, timestamp=2, header=False))
    assert user.tolist() == [5, 6] and item.tolist() == [10, 11] and timestamp.tolist() == [100.0, 200.0]
    with pytest.raises(TypeError, match="user"):
        DelimitedSource(path, user="user_id", item=1, timestamp=2, header=False)


def test_missing_column_and_empty_file(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ValueError, match="missing column 'timestamp'"):
        read_all(DelimitedSource(path))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_all(DelimitedSource(empty))
    with pytest.raises(ValueError, match="empty file"):
        read_all(DelimitedSource(empty, user=0, item=1, timestamp=2, header=False))
    header_only = tmp_path / "header.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    assert read_all(DelimitedSource(header_only))[0].shape == (0,)
    with pytest.raises(FileNotFoundError, match="path"):
        DelimitedSource(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="on_malformed"):
        DelimitedSource(path, on_malformed="ignore")


BAD_LINES = [
    ("7,8", "expected at least 3 fields"),
    ("x,8,100", "not an integer"),
    ("7,8,abc", "timestamp is not a number"),
    ("7,8,nan", "not finite"),
    ("7,8.5,100", "not an integer"),
]


@pytest.mark.parametrize("bad_line,reason", BAD_LINES)
def test_malformed_record_fail_reports_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n1,2,3\n{bad_line}\n4,5,6\n")
    with pytest.raises(MalformedRecordError, match=rf"log\.csv:3: .*{reason}"):
        read_all(DelimitedSource(path, on_malformed="fail"))


def test_malformed_records_skip_counts_every_reason(tmp_path):
    path = tmp_path / "log.csv"
    good = [f"{u},{u + 100},{u * 10}" for u in range(1, 6)]
    lines = [good[0], BAD_LINES[0][0], good[1], BAD_LINES[1][0], "", good[2], BAD_LINES[2][0], good[3],
             BAD_LINES[3][0], good[4], BAD_LINES[4][0]]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    for chunk_size in (1, 4, 100):
        stats = ReadStats()
        user, item, timestamp = read_all(DelimitedSource(path, on_malformed="skip"), chunk_size, stats)
        assert user.tolist() == [1, 2, 3, 4, 5]
        assert item.tolist() == [101, 102, 103, 104, 105]
        assert stats.malformed_total == 5 and stats.blank_lines == 1 and stats.events == 5
        assert stats.records == 10
        assert any("log.csv:3:" in example for example in stats.examples)
        assert any("log.csv:12:" in example for example in stats.examples)


def test_recbole_inter_header_types(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t5\t100\n3\t4\t1\t200\n")
    user, item, timestamp = read_all(RecBoleInterSource(path))
    assert user.tolist() == [1, 3] and item.tolist() == [2, 4] and timestamp.tolist() == [100.0, 200.0]
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(ValueError, match="name:type"):
        read_all(RecBoleInterSource(bad))
    bad.write_text("user_id:token\titem_id:token\ttimestamp:date\n1\t2\t3\n")
    with pytest.raises(ValueError, match="name:type"):
        read_all(RecBoleInterSource(bad))


def test_xing_drops_deletes_and_rejects_unknown_types(tmp_path):
    path = tmp_path / "interactions.csv"
    rows = ["1\t10\t1\t1000", "1\t11\t4\t1001", "2\t12\t2\t1002", "2\t12\t4\t1003", "3\t13\t5\t1004",
            "3\t14\t7\t1005"]
    path.write_text("user_id\titem_id\tinteraction_type\tcreated_at\n" + "\n".join(rows) + "\n")
    with pytest.raises(MalformedRecordError, match=r"interactions\.csv:7: unknown event type 7"):
        read_all(XingSource(path))
    stats = ReadStats()
    user, item, _ = read_all(XingSource(path, on_malformed="skip"), 2, stats)
    assert user.tolist() == [1, 2, 3] and item.tolist() == [10, 12, 13]
    assert stats.dropped_event_type == {4: 2}
    assert stats.malformed == {"unknown event type 7": 1}


def test_load_ml100k_from_installed_recbole():
    source = load_dataset("ml-100k")
    user, item, timestamp = read_all(source)
    assert user.shape == (100_000,)
    assert np.unique(user).shape[0] == 943 and np.unique(item).shape[0] == 1682
    assert timestamp.min() > 8e8
    with pytest.raises(ValueError, match="name"):
        load_dataset("ml-1m")


def test_load_dataset_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(readers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "recbole" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps recbole==1.2.1"):
        load_dataset("ml-100k")


def test_synthetic_is_exact_deterministic_and_chunk_independent():
    source = SyntheticSource(50_003, seed=5, users_per_block=64)
    a = read_all(source, 997)
    b = read_all(source, 1 << 20)
    assert a[0].shape == (50_003,)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = read_all(SyntheticSource(50_003, seed=6, users_per_block=64))
    assert not np.array_equal(a[1], c[1])


def test_synthetic_has_planted_structure():
    source = SyntheticSource(200_000, num_items=2000, num_topics=20, seed=1)
    user, item, timestamp = read_all(source)
    order = np.lexsort((timestamp, user))
    user, item, timestamp = user[order], item[order], timestamp[order]
    same_user = user[1:] == user[:-1]
    gap = np.diff(timestamp)
    in_session = same_user & (gap < 1800)
    # Sessions are separated by more than an hour, events within a session by < 25 min.
    assert ((gap[same_user] < 1500) | (gap[same_user] >= 3600)).all()
    topic = source.topic_of_raw_item(item)
    # Short-term: consecutive in-session events stay in the topic (and mostly step by one item).
    assert (topic[1:][in_session] == topic[:-1][in_session]).mean() == 1.0
    # Long-term: a user's sessions concentrate on few topics (3 favourites out of 20).
    topics_per_user = [np.unique(topic[user == u]).shape[0] for u in np.unique(user)[:200]]
    assert np.mean(topics_per_user) <= 3.0
    with pytest.raises(ValueError, match="num_events"):
        SyntheticSource(0)


def _read_all(path, chunk_size, on_malformed):
    stats = ReadStats()
    events = []
    for chunk in DelimitedSource(path, on_malformed=on_malformed).iter_chunks(chunk_size, stats):
        events += list(zip(chunk.user.tolist(), chunk.item.tolist(), chunk.timestamp.tolist()))
    return events, stats


@pytest.mark.parametrize("cell", ["1\u2500", "\u01fe1", "1\u30e0", "\u0661\u0662x"])
def test_a_non_ascii_character_in_an_id_is_a_malformed_record_not_another_id(tmp_path, cell):
    """An id cell with a character that is not a digit ("1" and a box-drawing sign) is a malformed record, reported
    with its file and line, whatever the chunk: numpy's parser, behind the fast path, read "1\u2500" as the id
    9434 (1 * 10 + 0x2500 - ord("0")) and merged the event into another user, even with on_malformed="fail"."""
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n{cell},5,100\n2,6,200\n", encoding="utf-8")
    for chunk_size in (1, 2, 4):
        with pytest.raises(MalformedRecordError, match=r"log\.csv:2:"):
            _read_all(path, chunk_size, "fail")
        events, stats = _read_all(path, chunk_size, "skip")
        assert events == [(2, 6, 200.0)] and stats.malformed_total == 1


@pytest.mark.parametrize("control", ["\x1c", "\x1d", "\x1e", "\x1f", "\x00", "\x7f"])
def test_a_record_is_read_the_same_whatever_the_chunk_size(tmp_path, control):
    """Whether a record is accepted does not depend on its neighbours in the chunk (chunk_size never changes the
    result): "1" followed by a control character was id 1 to the fast path but malformed to the line-by-line
    parser, which reads a whole chunk once any of its lines is malformed. Both now give int()'s answer."""
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n1{control},5,100\nx,6,200\n3,7,300\n", encoding="utf-8")
    results = [_read_all(path, chunk_size, "skip") for chunk_size in (1, 2, 3)]
    for events, stats in results:
        assert events == results[0][0] and stats.malformed_total == results[0][1].malformed_total
    first = [] if _int_or_none(f"1{control}") is None else [(1, 5, 100.0)]
    assert results[0][0] == first + [(3, 7, 300.0)]


def _int_or_none(text):
    try:
        return int(text)
    except ValueError:
        return None
