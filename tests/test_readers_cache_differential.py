"""Differential fuzz tests of the log readers (readers.py) and the on-disk session cache (cache.py).

Every reader result is compared with an independent peer written here from the documented contract (a
line splitter with universal line ends, regular expressions for the integer and decimal syntaxes, Python's csv
module for ml-100k, a dict-of-lists model of what a cache holds), on many small randomized inputs with fixed seeds
and on edge cases (line ends, BOM, blank lines, extra and missing columns, bad and huge ids, unicode, chunk sizes 1
and larger than the file). The cache side flips, truncates and extends its files, edits the source after caching,
races builders, and checks that error paths leave no open file and no temporary directory.
"""

import collections
import csv
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from hiertcn_fast.data import (ArraySource, CacheCorruptError, DelimitedSource, MalformedRecordError,
                               PreprocessParams, ReadStats, RecBoleInterSource, SessionCache, XingSource, cache_key,
                               load_dataset, preprocess, recbole_example_path)
from hiertcn_fast.data.cache import ARRAY_DTYPES, GLOBAL_ARRAYS, PARTITIONED_ARRAYS, host_label

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


# ================================================================================================================
# The peer: a reader written from the documented contract.

INT_SYNTAX = re.compile(r"[ \t]*[+-]?[0-9]+[ \t]*")
DECIMAL_SYNTAX = re.compile(r"[ \t]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*")
LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def peer_int(cell):
    """An integer id (plain decimal digits, optional sign, surrounding blanks) in the int64 range, else None."""
    if not INT_SYNTAX.fullmatch(cell):
        return None
    value = int(cell.strip(" \t"))
    return value if INT64_MIN <= value <= INT64_MAX else None


def peer_seconds(cell):
    """A finite decimal number of seconds, else None."""
    if not DECIMAL_SYNTAX.fullmatch(cell):
        return None
    value = float(cell.strip(" \t"))
    return value if math.isfinite(value) else None


def peer_lines(text):
    """(line number, content without its end) of a text: universal line ends (LF, CRLF, CR), a BOM ignored."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return [(number, line.rstrip("\r\n")) for number, line in enumerate(LINE.findall(text), start=1)]


def peer_read(text, delimiter, columns, header=True, drop=(), known=None):
    """What a reader of the contract yields: events, malformed line numbers, blank lines, records and drops.

    columns: role -> header name (header=True) or 0-based index."""
    lines = peer_lines(text)
    if header:
        names = [cell.strip() for cell in lines[0][1].split(delimiter)]
        index = {role: names.index(name) for role, name in columns.items()}
        lines = lines[1:]
    else:
        index = dict(columns)
    needed = max(index.values()) + 1
    events, malformed, dropped = [], [], collections.Counter()
    blank = records = 0
    for number, content in lines:
        if not content.strip():  # (blank: only whitespace, Python's unicode whitespace included, e.g. U+0085)
            blank += 1
            continue
        records += 1
        row = content.split(delimiter)
        if len(row) < needed:
            malformed.append(number)
            continue
        user, item = peer_int(row[index["user"]]), peer_int(row[index["item"]])
        seconds = peer_seconds(row[index["timestamp"]])
        if user is None or item is None or seconds is None:
            malformed.append(number)
            continue
        if "event_type" in index:
            event_type = peer_int(row[index["event_type"]])
            if event_type is None or (known is not None and event_type not in known):
                malformed.append(number)
                continue
            if event_type in drop:
                dropped[event_type] += 1
                continue
        events.append((user, item, seconds))
    return {"events": events, "malformed": malformed, "blank": blank, "records": records, "dropped": dropped}


def package_read(source, chunk_size):
    """The package's reading of ``source``, in the peer's terms; also checks each chunk's shape and dtypes."""
    stats = ReadStats()
    events = []
    for chunk in source.iter_chunks(chunk_size, stats):
        assert 0 < len(chunk) <= chunk_size
        assert chunk.user.dtype == np.int64 and chunk.item.dtype == np.int64 and chunk.timestamp.dtype == np.float64
        assert chunk.user.shape == chunk.item.shape == chunk.timestamp.shape
        events += list(zip(chunk.user.tolist(), chunk.item.tolist(), chunk.timestamp.tolist()))
    lines = [int(re.match(r".*:(\d+): ", example).group(1)) for example in stats.examples]
    assert stats.records == stats.events + stats.malformed_total + stats.dropped_event_type_total
    return {"events": events, "malformed_total": stats.malformed_total, "example_lines": lines,
            "blank": stats.blank_lines, "records": stats.records, "dropped": collections.Counter(
                stats.dropped_event_type)}, stats


def assert_same_reading(got, expected, context):
    assert got["events"] == expected["events"], context
    assert got["malformed_total"] == len(expected["malformed"]), context
    assert got["example_lines"] == expected["malformed"][:20], context
    assert got["blank"] == expected["blank"] and got["records"] == expected["records"], context
    assert got["dropped"] == expected["dropped"], context


# ---- random cells ------------------------------------------------------------------------------------------------

BAD_IDS = ["", "x", "1.0", "1e3", "0x1f", "1_0", "\uff11\uff12", "\u0663", "9223372036854775808",
           "-9223372036854775809", '"7"', "5 5", "nan", "--1", "+-1", "1-", "\u00e9", "12345678901234567890123",
           "\x007"]
BAD_SECONDS = ["", "abc", "1e400", "-1e400", "nan", "inf", "-Infinity", "1_0", "0x10", "\uff11", "1.2.3", "e5", ".",
               "1e", "+", "\u00bd"]
EXTRA_VALUES = ["", "x", "na\u00efve", "a b", "\U0001f4a1", "x\u2028y", "\x85", "1", "-", "\u00e9t\u00e9", "'q'"]


def good_id(rng):
    value = rng.choice([rng.randint(-10, 60), rng.randint(INT64_MIN, INT64_MAX), INT64_MAX, INT64_MIN, 0])
    text = str(value)
    style = rng.random()
    if style < 0.1 and value >= 0:
        text = "+" + text
    elif style < 0.2 and value >= 0:
        text = "00" + text
    elif style < 0.3:
        text = " " + text + " "
    return text


def good_seconds(rng):
    return rng.choice([
        repr(rng.uniform(-2e9, 2e9)), str(rng.randint(-10**9, 2 * 10**9)), "1e3", ".5", "5.", "-2.5e-3", "+7",
        " 3 ", "1e308", "-0", "1700000000.125", repr(rng.random() * 10 ** rng.randint(-300, 300)),
    ])


def random_log_text(rng, delimiter, order, bad_rate=0.2, event_types=None):
    """A random delimited body (no header) for the columns in ``order`` (roles or 'extra')."""
    end_style = rng.choice(["\n", "\r\n", "\r", "mixed"])
    lines = []
    for _ in range(rng.randint(0, 25)):
        r = rng.random()
        if r < 0.07:
            lines.append(rng.choice(["", " ", "\t", "  \t "]))
            continue
        if r < 0.12 and lines:
            lines.append(rng.choice(lines))  # a duplicate row
            continue
        cells = []
        for role in order:
            if role == "user" or role == "item":
                cells.append(good_id(rng))
            elif role == "timestamp":
                cells.append(good_seconds(rng))
            elif role == "event_type":
                cells.append(str(rng.choice(event_types)))
            else:
                cells.append(rng.choice(EXTRA_VALUES))
        if rng.random() < bad_rate:
            position = rng.randrange(len(order))
            role = order[position]
            if role == "timestamp":
                cells[position] = rng.choice(BAD_SECONDS)
            elif role in ("user", "item"):
                cells[position] = rng.choice(BAD_IDS)
            elif role == "event_type":  # (types outside int64: a test of their own below)
                cells[position] = rng.choice([cell for cell in BAD_IDS if "9223" not in cell and "123456" not in cell])
        if rng.random() < 0.05:
            cells = cells[:rng.randrange(len(cells))]  # a short row
        if rng.random() < 0.1:
            cells += rng.sample(EXTRA_VALUES, 2)  # more cells than the header names
        cells = [cell for cell in cells if delimiter not in cell]  # (a cell never holds the delimiter here)
        lines.append(delimiter.join(cells))
    ends = [rng.choice(["\n", "\r\n"]) if end_style == "mixed" else end_style for _ in lines]
    body = "".join(line + end for line, end in zip(lines, ends))
    if lines and rng.random() < 0.3:
        body = body.rstrip("\r\n")  # the last line without its end
    return body, end_style


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# ================================================================================================================
# DelimitedSource against the peer.

def test_delimited_source_matches_the_peer_on_random_files_with_any_column_layout(tmp_path):
    """Random column orders and names, extra (unicode) columns, every line end, BOM, duplicate rows, bad cells,
    huge and negative ids, blank lines; the same events, malformed line numbers and counts for every chunk size."""
    rng = random.Random(20240611)
    for trial in range(250):
        delimiter = rng.choice([",", "\t", ";", "|"])
        header = rng.random() < 0.75
        order = ["user", "item", "timestamp"] + ["extra"] * rng.randint(0, 2)
        rng.shuffle(order)
        body, end_style = random_log_text(rng, delimiter, order)
        end = "\n" if end_style == "mixed" else end_style
        names = {"user": "user_id", "item": "item_id", "timestamp": "ts"}
        text = ""
        if header:
            extra_names = iter(["caf\u00e9", " note ", "r\u00e9sum\u00e9"])
            text = delimiter.join(f" {names[r]} " if r in names and rng.random() < 0.2 else
                                  names.get(r) or next(extra_names) for r in order) + end
        text += body
        if rng.random() < 0.3:
            text = "\ufeff" + text
        if not header and not body:
            continue  # (an empty headerless file is an error: tested below)
        path = tmp_path / f"log{trial}.csv"
        write_text(path, text)
        if header:
            columns = {role: names[role] for role in names}
        else:
            columns = {role: order.index(role) for role in names}
        expected = peer_read(text, delimiter, columns, header=header)
        kwargs = dict(user=columns["user"], item=columns["item"], timestamp=columns["timestamp"],
                      delimiter=delimiter, header=header)
        source = DelimitedSource(path, on_malformed="skip", **kwargs)
        for chunk_size in (1, rng.randint(2, 6), len(text) + 10):
            got, _ = package_read(source, chunk_size)
            assert_same_reading(got, expected, (trial, chunk_size, text))
        # "fail": the first malformed line is the error, naming the file and that line; otherwise the same events.
        strict = DelimitedSource(path, on_malformed="fail", **kwargs)
        chunk_size = rng.choice([1, 3, 1 << 20])
        if expected["malformed"]:
            with pytest.raises(MalformedRecordError) as error:
                package_read(strict, chunk_size)
            assert f"{path}:{expected['malformed'][0]}: " in str(error.value), (trial, text)
        else:
            assert package_read(strict, chunk_size)[0]["events"] == expected["events"], (trial, text)


def test_delimited_source_reads_every_valid_cell_as_written(tmp_path):
    """One valid record per line (no bad cell anywhere): every id and time back exactly, chunk by chunk, with
    unicode in an unused column forcing the line-by-line parser on some chunks and not on others."""
    rng = random.Random(7)
    for trial in range(30):
        rows, expected = [], []
        for k in range(rng.randint(1, 40)):
            user, item = good_id(rng), good_id(rng)
            seconds = good_seconds(rng)
            note = rng.choice(["plain", "caf\u00e9", "\u65e5\u672c"]) if rng.random() < 0.2 else "plain"
            rows.append(f"{note},{seconds},{item},{user}")
            expected.append((peer_int(user), peer_int(item), peer_seconds(seconds)))
        path = tmp_path / f"valid{trial}.csv"
        write_text(path, "note,t,i,u\r\n" + "\r\n".join(rows))
        source = DelimitedSource(path, user="u", item="i", timestamp="t")
        for chunk_size in (1, 2, 5, 1000):
            got, stats = package_read(source, chunk_size)
            assert got["events"] == expected and stats.malformed_total == 0 and stats.blank_lines == 0


@pytest.mark.parametrize("text, expected", [
    ("user_id,item_id,timestamp\r\n1,2,3\r\n", [(1, 2, 3.0)]),
    ("user_id,item_id,timestamp\r\n1,2,3", [(1, 2, 3.0)]),
    ("\ufeffuser_id,item_id,timestamp\n-9223372036854775808,9223372036854775807,-1e300\n",
     [(INT64_MIN, INT64_MAX, -1e300)]),
    ("user_id,item_id,timestamp\n1,2,3\n1,2,3\n1,2,3\n", [(1, 2, 3.0)] * 3),  # duplicates kept, all of them
    ("user_id,item_id,timestamp,note\n1,2,-5.5,\u00e9\u00e8\n3,4,-0.25,\u2028\n", [(1, 2, -5.5), (3, 4, -0.25)]),
    ("user_id,item_id,timestamp\n\n\n1,2,3\n\n", [(1, 2, 3.0)]),
    ("user_id,item_id,timestamp\n", []),
])
def test_delimited_source_edge_files(tmp_path, text, expected):
    path = tmp_path / "log.csv"
    write_text(path, text)
    for chunk_size in (1, 2, 100):
        got, stats = package_read(DelimitedSource(path), chunk_size)
        assert got["events"] == expected and stats.malformed_total == 0


@pytest.mark.parametrize("end", ["\r\n", "\r", "\n"])
def test_a_large_file_reads_like_the_peer_across_io_buffer_boundaries(tmp_path, end):
    """~300 KiB of lines of random lengths: line ends (a CRLF split by the reader's buffer included), records and
    line numbers of malformed ones as the peer says, for chunk sizes that do and do not divide the line count."""
    rng = random.Random(len(end))
    rows = []
    for k in range(12_000):
        note = "n" * rng.randint(0, 30)
        rows.append(f"{rng.randint(-99, 10**12)},{rng.randint(0, 10**6)},{rng.randint(-10**9, 10**9) / 8},{note}"
                    if rng.random() > 0.01 else rng.choice(["", f"x,1,2,{note}", f"1,2,{note}"]))
    text = "user_id,item_id,timestamp,note" + end + end.join(rows) + end
    path = tmp_path / "big.csv"
    write_text(path, text)
    expected = peer_read(text, ",", {"user": "user_id", "item": "item_id", "timestamp": "timestamp"})
    for chunk_size in (997, 4096, 1 << 20):
        got, _ = package_read(DelimitedSource(path, on_malformed="skip"), chunk_size)
        assert_same_reading(got, expected, chunk_size)


def test_headerless_line_numbers_count_from_the_first_line_even_after_a_bom(tmp_path):
    path = tmp_path / "log.tsv"
    write_text(path, "\ufeff1\t2\t3\n\n4\tx\t6\n7\t8\n")
    source = DelimitedSource(path, user=0, item=1, timestamp=2, header=False, on_malformed="skip")
    for chunk_size in (1, 2, 10):
        got, stats = package_read(source, chunk_size)
        assert got["events"] == [(1, 2, 3.0)] and got["example_lines"] == [3, 4] and stats.blank_lines == 1
    with pytest.raises(MalformedRecordError, match=rf"{re.escape(str(path))}:3: "):
        package_read(DelimitedSource(path, user=0, item=1, timestamp=2, header=False), 10)


def test_quoted_cells_are_malformed_never_read_as_another_value(tmp_path):
    """The readers do not unquote: a quoted id is a malformed record with its line, not silently an id."""
    path = tmp_path / "log.csv"
    write_text(path, 'user_id,item_id,timestamp\n"1",2,3\n4,"5",6\n7,8,"9"\n10,11,12\n')
    for chunk_size in (1, 4):
        got, stats = package_read(DelimitedSource(path, on_malformed="skip"), chunk_size)
        assert got["events"] == [(10, 11, 12.0)] and got["example_lines"] == [2, 3, 4]


def test_examples_keep_the_first_twenty_and_every_malformed_record_is_counted(tmp_path):
    rng = random.Random(3)
    rows, bad = [], []
    for number in range(2, 200):
        if rng.random() < 0.3:
            rows.append(f"{number},x,{number}")
            bad.append(number)
        else:
            rows.append(f"{number},{number},{number}")
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    for chunk_size in (1, 7, 1000):
        got, stats = package_read(DelimitedSource(path, on_malformed="skip"), chunk_size)
        assert got["malformed_total"] == len(bad) and got["example_lines"] == bad[:20]
        assert len(got["events"]) == 198 - len(bad)
        report = stats.to_json()
        assert report["malformed"] == {"user or item id is not an integer": len(bad)}
        assert report["records"] == 198 and report["events"] == 198 - len(bad)
        assert all(str(path) in example for example in report["examples"])


def test_the_same_source_reads_the_same_twice_and_stats_accumulate(tmp_path):
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp\n1,2,3\nx,2,3\n4,5,6\n")
    source = DelimitedSource(path, on_malformed="skip")
    stats = ReadStats()
    first = [tuple(c.user.tolist()) for c in source.iter_chunks(2, stats)]
    second = [tuple(c.user.tolist()) for c in source.iter_chunks(2, stats)]
    assert first == second == [(1,), (4,)]
    assert stats.records == 6 and stats.events == 4 and stats.malformed_total == 2


# ---- event types ---------------------------------------------------------------------------------------------------

def test_event_type_filters_match_the_peer(tmp_path):
    rng = random.Random(11)
    for trial in range(100):
        delimiter = rng.choice([",", "\t"])
        order = ["user", "item", "timestamp", "event_type"] + ["extra"] * rng.randint(0, 1)
        rng.shuffle(order)
        body, _ = random_log_text(rng, delimiter, order, event_types=[0, 1, 2, 3, 4, 5, 6, -1, "+2", " 3"])
        names = {"user": "u", "item": "i", "timestamp": "t", "event_type": "e", "extra": "x"}
        text = delimiter.join(names[r] for r in order) + "\n" + body
        path = tmp_path / f"typed{trial}.csv"
        write_text(path, text)
        known = rng.choice([None, (1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5, 6, -1)])
        drop = rng.choice([(), (4,), (1, 4)])
        expected = peer_read(text, delimiter, {r: names[r] for r in ("user", "item", "timestamp", "event_type")},
                             drop=set(drop), known=None if known is None else set(known))
        source = DelimitedSource(path, user="u", item="i", timestamp="t", event_type="e", delimiter=delimiter,
                                 drop_event_types=drop, known_event_types=known, on_malformed="skip")
        for chunk_size in (1, 4, 1000):
            got, _ = package_read(source, chunk_size)
            assert_same_reading(got, expected, (trial, chunk_size, text))


def test_xing_source_matches_the_peer(tmp_path):
    rng = random.Random(12)
    for trial in range(30):
        order = ["user", "item", "event_type", "timestamp"]
        body, _ = random_log_text(rng, "\t", order, event_types=[1, 2, 3, 4, 5, 0, 6, 7])
        text = "user_id\titem_id\tinteraction_type\tcreated_at\n" + body
        path = tmp_path / f"interactions{trial}.csv"
        write_text(path, text)
        expected = peer_read(text, "\t", {"user": "user_id", "item": "item_id", "timestamp": "created_at",
                                          "event_type": "interaction_type"}, drop={4}, known={1, 2, 3, 4, 5})
        for chunk_size in (1, 3, 1000):
            got, _ = package_read(XingSource(path, on_malformed="skip"), chunk_size)
            assert_same_reading(got, expected, (trial, chunk_size, text))


# An event type outside int64 (no known_event_types given) crashed every read with a bare OverflowError (no file,
# no line), even with on_malformed="skip"; it is a malformed record now.
@pytest.mark.parametrize("drop", [(), (4,)])
def test_an_event_type_outside_int64_is_a_malformed_record_naming_file_and_line(tmp_path, drop):
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp,type\n1,2,3,1\n4,5,6,99999999999999999999\n7,8,9,2\n")
    for chunk_size in (1, 10):
        with pytest.raises(MalformedRecordError, match=rf"{re.escape(str(path))}:3: "):
            package_read(DelimitedSource(path, event_type="type", drop_event_types=drop), chunk_size)
        got, _ = package_read(DelimitedSource(path, event_type="type", drop_event_types=drop, on_malformed="skip"),
                              chunk_size)
        assert got["events"] == [(1, 2, 3.0), (7, 8, 9.0)] and got["example_lines"] == [3]


# Filter values outside int64 were accepted by the constructor, and then every read died with an OverflowError.
@pytest.mark.parametrize("kwargs", [dict(drop_event_types=(1 << 64,)), dict(known_event_types=(1, 2, 1 << 64)),
                                    dict(drop_event_types=(INT64_MIN - 1,), known_event_types=(1, 2, INT64_MIN - 1))])
def test_event_type_filters_outside_int64_are_refused_up_front(tmp_path, kwargs):
    """The constructor refuses the value, naming its argument (the package's rule for bad arguments)."""
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp,type\n1,2,3,1\n4,5,6,2\n")
    with pytest.raises(ValueError, match="|".join(kwargs)):
        DelimitedSource(path, event_type="type", **kwargs)


# ---- RecBole and the built-in data set ---------------------------------------------------------------------------

def test_recbole_inter_source_matches_the_peer(tmp_path):
    rng = random.Random(13)
    for trial in range(25):
        order = ["user", "item", "timestamp"] + ["extra"] * rng.randint(0, 2)
        rng.shuffle(order)
        body, _ = random_log_text(rng, "\t", order)
        extra_cells = iter(["rating:float", "review:token_seq", "tags:float_seq"])
        names = {"user": "uid:token", "item": "iid:token", "timestamp": "when:float"}
        text = "\t".join(names.get(r) or next(extra_cells) for r in order) + "\n" + body
        path = tmp_path / f"d{trial}.inter"
        write_text(path, text)
        expected = peer_read(text, "\t", {r: n for r, n in names.items()})
        for chunk_size in (1, 5, 1000):
            got, _ = package_read(RecBoleInterSource(path, user="uid", item="iid", timestamp="when",
                                                     on_malformed="skip"), chunk_size)
            assert_same_reading(got, expected, (trial, chunk_size, text))


def test_load_dataset_ml100k_matches_the_csv_module():
    with open(recbole_example_path("ml-100k"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = [cell.split(":")[0] for cell in rows[0]]
    u, i, t = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    expected_user = np.array([int(r[u]) for r in rows[1:]], dtype=np.int64)
    expected_item = np.array([int(r[i]) for r in rows[1:]], dtype=np.int64)
    expected_time = np.array([float(r[t]) for r in rows[1:]], dtype=np.float64)
    source = load_dataset("ml-100k", on_malformed="skip")
    for chunk_size in (4096, 1 << 20):
        stats = ReadStats()
        chunks = list(source.iter_chunks(chunk_size, stats))
        np.testing.assert_array_equal(np.concatenate([c.user for c in chunks]), expected_user)
        np.testing.assert_array_equal(np.concatenate([c.item for c in chunks]), expected_item)
        np.testing.assert_array_equal(np.concatenate([c.timestamp for c in chunks]), expected_time)
        assert stats.malformed_total == 0 and stats.events == len(rows) - 1
    with pytest.raises(ValueError, match="on_malformed"):
        load_dataset("ml-100k", on_malformed="ignore")
    with pytest.raises(ValueError, match="ml-100k"):
        load_dataset("ML-100K")


# ---- ArraySource -------------------------------------------------------------------------------------------------

def test_array_source_matches_the_peer_for_every_dtype_and_chunk_size():
    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(0, 30))
        id_dtype = rng.choice(["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", "float32", "float64",
                               "list"])
        if id_dtype == "list":
            user = [int(v) for v in rng.integers(INT64_MIN, INT64_MAX, size=n, endpoint=True)]
            item = [int(v) for v in rng.integers(-5, 5, size=n)]
        else:
            info = np.iinfo(id_dtype) if id_dtype[0] in "iu" else None
            low, high = (info.min, min(info.max, INT64_MAX)) if info else (-1 << 24, 1 << 24)
            user = rng.integers(low, high, size=n, endpoint=True).astype(id_dtype)
            item = rng.integers(max(low, -100), min(high, 100), size=n, endpoint=True).astype(id_dtype)
        seconds_dtype = rng.choice(["float32", "float64"])
        scale = 10.0 ** rng.integers(-5, 30 if seconds_dtype == "float32" else 300)
        seconds = (rng.normal(size=n) * scale).astype(seconds_dtype)
        if trial % 3 == 0:
            seconds = rng.integers(-1 << 40, 1 << 40, size=n)
        expected = [(int(a), int(b), float(c)) for a, b, c in zip(user, item, seconds)]
        source = ArraySource(user, item, seconds)
        for chunk_size in (1, 4, n + 7):
            stats = ReadStats()
            got = []
            for chunk in source.iter_chunks(chunk_size, stats):
                assert 0 < len(chunk) <= chunk_size and chunk.user.dtype == np.int64
                got += list(zip(chunk.user.tolist(), chunk.item.tolist(), chunk.timestamp.tolist()))
            assert got == expected and stats.records == stats.events == n
        # The fingerprint follows the data.
        assert source.fingerprint() == ArraySource(user, item, seconds).fingerprint()
        if n:
            changed = np.array(expected, dtype=object)[:, 1].astype(np.int64)
            changed[int(rng.integers(0, n))] += 1
            assert ArraySource(user, changed, seconds).fingerprint() != source.fingerprint()


@pytest.mark.parametrize("user, item, seconds, message", [
    ([1, 2], [3], [0.0, 1.0], "equal length"),
    ([1.5], [3], [0.0], "user"),
    ([1], [np.nan], [0.0], "item"),
    ([1], [2.0 ** 63], [0.0], "item"),
    (np.array([1 << 63], dtype=np.uint64), [1], [0.0], "user"),
    ([1], [2], [np.inf], "timestamp"),
    (["1"], [2], [0.0], "user"),
    ([1], [2], ["0"], "timestamp"),
    ([[1]], [[2]], [[0.0]], "1-D"),
])
def test_array_source_refuses_what_is_not_an_interaction_log(user, item, seconds, message):
    with pytest.raises(ValueError, match=message):
        ArraySource(user, item, seconds)


# Whole-number float16 ids (a floating dtype the docstring accepts) made ArraySource warn "overflow encountered in
# cast" (an error under -W error).
def test_float16_whole_number_ids_are_accepted_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = ArraySource(np.array([1, 2, 2048], np.float16), np.array([-3, 0, 65504], np.float16), [0.0, 1.0, 2.0])
    assert source.user.tolist() == [1, 2, 2048] and source.item.tolist() == [-3, 0, 65504]


def test_bad_chunk_sizes_are_refused_by_every_reader(tmp_path):
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp\n1,2,3\n")
    for source in (ArraySource([1], [2], [3.0]), DelimitedSource(path)):
        for chunk_size in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="chunk_size"):
                list(source.iter_chunks(chunk_size))
        assert [len(c) for c in source.iter_chunks(np.int64(1))] == [1]


# ---- resources on the readers' error paths ---------------------------------------------------------------------

def open_files_under(directory):
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.parametrize("content, error", [
    ("user_id,item_id,timestamp\n1,2,3\n4,x,6\n", MalformedRecordError),
    ("user_id,item_id\n1,2\n", ValueError),
    (b"user_id,item_id,timestamp,caf\xe9\n1,2,3,4\n", MalformedRecordError),
    ("", ValueError),
])
def test_a_failed_read_closes_the_file(tmp_path, content, error):
    path = tmp_path / "log.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_text(path, content)
    with pytest.raises(error) as caught:
        package_read(DelimitedSource(path), 1)
    assert caught.value.__traceback__ is not None and str(path) in str(caught.value)
    assert open_files_under(tmp_path) == []


def test_an_abandoned_read_closes_the_file_when_closed(tmp_path):
    path = tmp_path / "log.csv"
    write_text(path, "user_id,item_id,timestamp\n" + "".join(f"{k},{k},{k}\n" for k in range(10)))
    chunks = DelimitedSource(path).iter_chunks(2)
    assert next(chunks).user.tolist() == [0, 1]
    assert open_files_under(tmp_path) == [str(path)]
    chunks.close()
    assert open_files_under(tmp_path) == []


# ================================================================================================================
# The session cache against a dict-of-lists model.

LOOSE = dict(min_item_count=1, min_user_count=1, max_user_count=None)


def model_sessions(events, params):
    """raw user -> [[(raw item, seconds), ...] per session]: the preprocessing steps of the docstring, in lists."""
    item_count = collections.Counter(item for _, item, _ in events)
    kept = [(position, u, i, t) for position, (u, i, t) in enumerate(events)
            if item_count[i] >= params.min_item_count]
    user_count = collections.Counter(u for _, u, _, _ in kept)
    high = math.inf if params.max_user_count is None else params.max_user_count
    by_user = collections.defaultdict(list)
    for position, u, i, t in kept:
        if params.min_user_count <= user_count[u] <= high:
            by_user[u].append((t, position, i))
    result = {}
    for u, rows in by_user.items():
        rows.sort()
        sessions, last = [], None
        for t, _, i in rows:
            if last is None or t - last >= params.session_gap:
                sessions.append([])
            sessions[-1].append((i, t))
            last = t
        if params.max_session_length is not None:
            sessions = [s[:params.max_session_length] for s in sessions]
        result[u] = sessions
    return result


def cache_sessions(cache):
    item_raw = cache.item_raw_id.tolist()
    item, seconds = cache.item.tolist(), cache.timestamp.tolist()
    session_offsets, user_offsets = cache.session_offsets.tolist(), cache.user_session_offsets.tolist()
    result = {}
    for u, raw_user in enumerate(cache.user_raw_id.tolist()):
        result[raw_user] = [[(item_raw[item[e]], seconds[e]) for e in range(session_offsets[s], session_offsets[s + 1])]
                            for s in range(user_offsets[u], user_offsets[u + 1])]
    return result


def assert_cache_is_the_model(cache, events, params):
    expected = model_sessions(events, params)
    assert cache_sessions(cache) == expected
    present = sorted({i for sessions in expected.values() for s in sessions for i, _ in s})
    assert cache.item_raw_id.tolist() == [-1] + present and cache.num_items == len(present)
    assert cache.num_users == len(expected) and cache.num_events == sum(
        len(s) for sessions in expected.values() for s in sessions)
    assert cache.num_sessions == sum(len(sessions) for sessions in expected.values())
    assert cache.max_session_length == max(len(s) for sessions in expected.values() for s in sessions)
    offsets = cache.partition_user_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == cache.num_users and offsets == sorted(offsets)
    assert set(cache.session_split.tolist()) <= {0, 1, 2}
    if cache.params["split"] == "cold":  # whole users: a user's sessions share one label
        for u in range(cache.num_users):
            lo, hi = cache.user_session_offsets[u], cache.user_session_offsets[u + 1]
            assert len(set(cache.session_split[lo:hi].tolist())) == 1


def random_events(rng, n, extreme=False):
    users = [rng.randint(0, 12) for _ in range(4)] + ([INT64_MIN, INT64_MAX] if extreme else [])
    items = [rng.randint(0, 40) for _ in range(15)] + ([INT64_MIN, INT64_MAX, -1] if extreme else [])
    events = []
    for _ in range(n):
        seconds = rng.choice([rng.randint(-5000, 5000) * 60.0, rng.uniform(-1e9, 1e9)])
        if extreme and rng.random() < 0.05:
            seconds = rng.choice([1e300, -1e300, 0.0])
        events.append((rng.choice(users), rng.choice(items), seconds))
    if rng.random() < 0.5 and events:
        events += rng.sample(events, min(5, len(events)))  # duplicate rows
    return events


def events_csv(events, end="\n"):
    return "user_id,item_id,timestamp" + end + "".join(f"{u},{i},{t!r}{end}" for u, i, t in events)


def test_a_file_read_and_cached_is_the_model_of_its_peer_reading(tmp_path):
    """Random files (with malformed and blank lines, skipped): the cache holds exactly the model of the events the
    peer reads, whatever the chunk size, and two chunk sizes give the same bytes (the same checksums)."""
    rng = random.Random(21)
    for trial in range(6):
        events = random_events(rng, rng.randint(20, 120), extreme=trial % 2 == 1)
        lines = events_csv(events, end=rng.choice(["\n", "\r\n"])).splitlines(keepends=True)
        for _ in range(rng.randint(0, 4)):
            lines.insert(rng.randint(1, len(lines)), rng.choice(["\n", "1,x,3\n", "1,2\n", "\u00e9,1,2\n"]))
        text = "".join(lines)
        path = tmp_path / f"log{trial}.csv"
        write_text(path, text)
        expected = peer_read(text, ",", {"user": "user_id", "item": "item_id", "timestamp": "timestamp"})
        assert expected["events"] == events
        params = PreprocessParams(min_item_count=rng.choice([1, 2, 3]), min_user_count=rng.choice([1, 3]),
                                  max_user_count=rng.choice([None, 60]), session_gap=rng.choice([60.0, 1e6, 1.5]),
                                  max_session_length=rng.choice([None, 1, 3]), num_partitions=rng.choice([1, 2, 5]),
                                  split=rng.choice(["cold", "warm"]))
        caches = []
        for chunk_size in (1 if trial < 2 else 3, 1 << 20):
            cache = preprocess(DelimitedSource(path, on_malformed="skip"), tmp_path / f"c{trial}-{chunk_size}",
                               params, chunk_size=chunk_size, verify="full")
            assert_cache_is_the_model(cache, events, params)
            assert cache.stats["events_read"] == len(events)
            assert sum(cache.stats["read"]["malformed"].values()) == len(expected["malformed"])
            caches.append(cache)
        assert caches[0].key == caches[1].key
        assert caches[0].manifest["checksums"] == caches[1].manifest["checksums"]


# ---- corruption: every flipped byte is caught, or it changed nothing ---------------------------------------------

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    rng = random.Random(31)
    events = random_events(rng, 1500)
    root = tmp_path_factory.mktemp("built")
    user, item, seconds = (np.array(column) for column in zip(*events))
    params = PreprocessParams(**LOOSE, session_gap=600.0, max_session_length=5, num_partitions=4)
    cache = preprocess(ArraySource(user, item, seconds, name="fuzz"), root / "caches", params, verify="full")
    snapshot = {name: np.array(getattr(cache, name)) for name in ARRAY_DTYPES}
    return cache.path, snapshot, events, params


def copy_of(cache_path, destination):
    shutil.copytree(cache_path, destination)
    return destination


def read_everything(path, verify):
    """Open and read every array (so every check the mode promises has run); the arrays as plain copies."""
    cache = SessionCache.open(path, verify=verify)
    return {name: np.array(getattr(cache, name)) for name in ARRAY_DTYPES}


def flip(path, offset, mask):
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ mask]))


def faults_found(path, verify):
    """Open ``path`` and read each event- and session-level array: [the open's CacheCorruptError message], or the
    messages of those reads that raised (each read of unverified data must)."""
    try:
        cache = SessionCache.open(path, verify=verify)
    except CacheCorruptError as error:
        return [str(error)]
    found = []
    for name in PARTITIONED_ARRAYS * 2:  # a second read of a refused array is refused again
        try:
            getattr(cache, name)
        except CacheCorruptError as error:
            found.append(str(error))
    return found


def test_every_flipped_byte_of_an_array_is_caught(tmp_path, built_cache):
    """Any byte of any array changed: the open (global arrays, offsets) or every read of event- and session-level
    data (partitions) raises CacheCorruptError naming the cache; never is the changed data returned."""
    cache_path, snapshot, _, _ = built_cache
    rng = random.Random(41)
    names = list(ARRAY_DTYPES)
    for trial in range(120):
        name = names[trial % len(names)]
        copy = copy_of(cache_path, tmp_path / f"t{trial}")
        file_path = copy / f"{name}.bin"
        flip(file_path, rng.randrange(file_path.stat().st_size), rng.randint(1, 255))
        modes = ("lazy", "full") + (("none",) if name in PARTITIONED_ARRAYS else ())
        for verify in modes:
            found = faults_found(copy, verify)
            assert len(found) in (1, 2 * len(PARTITIONED_ARRAYS)), (name, verify, found)
            assert all(str(copy) in message for message in found), (name, verify, found)
        assert open_files_under(copy) == []
        shutil.rmtree(copy)
    assert faults_found(cache_path, "lazy") == faults_found(cache_path, "none") == []


def test_a_flipped_manifest_byte_is_caught_unless_the_manifest_means_the_same(tmp_path, built_cache):
    cache_path, snapshot, _, _ = built_cache
    original_bytes = (cache_path / "manifest.json").read_bytes()
    original = json.loads(original_bytes)
    rng = random.Random(43)
    harmless = caught = 0
    for trial in range(150):
        copy = copy_of(cache_path, tmp_path / f"m{trial}")
        offset, mask = rng.randrange(len(original_bytes)), rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 0x20, 0x0b])
        data = bytearray(original_bytes)
        data[offset] ^= mask
        (copy / "manifest.json").write_bytes(bytes(data))
        try:
            same = json.loads(bytes(data).decode("utf-8")) == original
        except (ValueError, UnicodeDecodeError):
            same = False
        if same:
            arrays = read_everything(copy, "full")
            assert all(np.array_equal(arrays[n], snapshot[n]) for n in snapshot)
            harmless += 1
        else:
            with pytest.raises(CacheCorruptError, match=re.escape(str(copy))):
                read_everything(copy, rng.choice(["lazy", "full", "none"]))
            caught += 1
        shutil.rmtree(copy)
    assert caught > 100
    # Appended bytes: whitespace means the same manifest, anything else is refused.
    copy = copy_of(cache_path, tmp_path / "appended")
    (copy / "manifest.json").write_bytes(original_bytes + b" \n\t")
    assert read_everything(copy, "full").keys() == snapshot.keys()
    (copy / "manifest.json").write_bytes(original_bytes + b"x")
    with pytest.raises(CacheCorruptError, match="unreadable manifest"):
        SessionCache.open(copy)
    for cut in sorted(rng.sample(range(len(original_bytes)), 20)):
        (copy / "manifest.json").write_bytes(original_bytes[:cut])
        with pytest.raises(CacheCorruptError):
            SessionCache.open(copy, verify="none")


@pytest.mark.parametrize("verify", ["lazy", "full", "none"])
def test_truncated_extended_missing_or_replaced_arrays_are_refused_at_open(tmp_path, built_cache, verify):
    cache_path, _, _, _ = built_cache
    rng = random.Random(47)
    for name in ARRAY_DTYPES:
        copy = copy_of(cache_path, tmp_path / name)
        file_path = copy / f"{name}.bin"
        size = file_path.stat().st_size
        for new_size in (0, rng.randrange(size), size - 1, size + 1, size + rng.randint(2, 64)):
            if new_size > size:
                with open(file_path, "ab") as f:
                    f.write(os.urandom(new_size - size))
            else:
                os.truncate(file_path, new_size)
            with pytest.raises(CacheCorruptError, match=rf"{re.escape(str(file_path))}: expected {size} bytes"):
                SessionCache.open(copy, verify=verify)
            shutil.copyfile(cache_path / f"{name}.bin", file_path)
        file_path.unlink()
        with pytest.raises(CacheCorruptError, match="no file"):
            SessionCache.open(copy, verify=verify)
        file_path.mkdir()
        with pytest.raises(CacheCorruptError, match="no file"):
            SessionCache.open(copy, verify=verify)
        assert open_files_under(copy) == []
        shutil.rmtree(copy)


def test_an_array_replaced_by_another_caches_array_of_the_same_size_is_caught(tmp_path, built_cache):
    """Same sizes, other content (e.g. a file copied from another build): caught by the checksums."""
    cache_path, _, events, params = built_cache
    rng = random.Random(53)
    shuffled = events[:]
    rng.shuffle(shuffled)
    moved = [(u, i, t + 1.0) for u, i, t in shuffled]  # every timestamp 1 s later: same structure, other bytes
    user, item, seconds = (np.array(column) for column in zip(*moved))
    other = preprocess(ArraySource(user, item, seconds, name="fuzz"), tmp_path / "other", params)
    assert (other.path / "timestamp.bin").stat().st_size == (cache_path / "timestamp.bin").stat().st_size
    copy = copy_of(cache_path, tmp_path / "mixed")
    shutil.copyfile(other.path / "timestamp.bin", copy / "timestamp.bin")
    with pytest.raises(CacheCorruptError, match="timestamp.bin: checksum mismatch"):
        read_everything(copy, "lazy")


# ---- the source changes after caching ----------------------------------------------------------------------------

def edit_same_size_keep_mtime(path, rng):
    text = path.read_text()
    st = path.stat()
    positions = [k for k, ch in enumerate(text) if ch.isdigit() and k > text.index("\n")]
    k = rng.choice(positions)
    text = text[:k] + str((int(text[k]) + 1) % 10) + text[k + 1:]
    write_text(path, text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("edit", ["same_size_same_mtime", "append", "truncate", "rewrite_identical", "reorder"])
def test_a_source_file_changed_after_caching_gives_a_cache_of_its_new_content(tmp_path, edit):
    rng = random.Random(hash(edit) % 1000)
    events = random_events(rng, 150)
    path = tmp_path / "log.csv"
    write_text(path, events_csv(events))
    params = PreprocessParams(**LOOSE, session_gap=1800.0, max_session_length=None, num_partitions=2)
    source = DelimitedSource(path)
    first = preprocess(source, tmp_path / "caches", params)
    assert_cache_is_the_model(first, events, params)
    first_manifest = dict(first.manifest)
    if edit == "same_size_same_mtime":
        edit_same_size_keep_mtime(path, rng)
    elif edit == "append":
        with open(path, "a") as f:
            f.write("99,98,97.5\n")
    elif edit == "truncate":
        write_text(path, events_csv(events[:100]))
    elif edit == "rewrite_identical":
        st = path.stat()
        write_text(path, events_csv(events))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif edit == "reorder":
        write_text(path, events_csv(events[::-1]))
    new_events = peer_read(path.read_text(), ",", {"user": "user_id", "item": "item_id",
                                                    "timestamp": "timestamp"})["events"]
    for reader in (source, DelimitedSource(path)):  # the same source object, and a new one
        again = preprocess(reader, tmp_path / "caches", params)
        assert_cache_is_the_model(again, new_events, params)
        assert again.path != first.path and again.key != first.key
    # The first cache is untouched and still opens, as it was.
    assert SessionCache.open(first.path, verify="full").manifest == first_manifest


def test_an_edit_in_the_middle_of_a_large_file_changes_the_key(tmp_path):
    """A > 2 MiB file edited between its first and last MiB (the size kept, the mtime moved as any write moves it)."""
    path = tmp_path / "big.csv"
    rows = "".join(f"{k % 977},{k % 499},{1600000000 + k}\n" for k in range(170_000))
    write_text(path, "user_id,item_id,timestamp\n" + rows)
    assert path.stat().st_size > 2 << 20
    params = PreprocessParams(**LOOSE)
    before = cache_key(DelimitedSource(path), params)
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        chunk = f.read(64)
        k = next(i for i, b in enumerate(chunk) if chr(b).isdigit())
        f.seek(st.st_size // 2 + k)
        f.write(b"0" if chunk[k:k + 1] != b"0" else b"1")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    assert cache_key(DelimitedSource(path), params) != before


# ---- concurrent builders and stale temporary directories -------------------------------------------------------

class GatedSource(ArraySource):
    """An in-memory log whose first chunk waits on ``gate`` (a Barrier's wait, or an Event's wait) so that several
    builders are inside their build at once."""

    def __init__(self, events, gate, announce=None):
        user, item, seconds = (np.array(column) for column in zip(*events))
        super().__init__(user, item, seconds, name="shared")
        self.gate, self.announce = gate, announce

    def iter_chunks(self, chunk_size=1 << 20, stats=None):
        for index, chunk in enumerate(super().iter_chunks(chunk_size, stats)):
            if index == 0:
                if self.announce is not None:
                    self.announce.set()
                self.gate()
            yield chunk


def _build_in_child(events, params, cache_dir, gate, announce, results):
    try:
        cache = preprocess(GatedSource(events, gate, announce), cache_dir, params, chunk_size=50)
        results.put(("ok", str(cache.path), cache.manifest["manifest_sha256"], os.getpid()))
    except BaseException as error:  # reported to the parent, which fails the test
        results.put(("error", repr(error), None, os.getpid()))


def assert_one_clean_cache(cache_dir, events, params):
    entries = sorted(p.name for p in Path(cache_dir).iterdir())
    assert len(entries) == 1 and not entries[0].startswith("."), entries
    cache = SessionCache.open(Path(cache_dir) / entries[0], verify="full")
    assert_cache_is_the_model(cache, events, params)
    return cache


def test_concurrent_builder_processes_share_one_cache(tmp_path):
    context = multiprocessing.get_context("fork")
    events = random_events(random.Random(61), 400)
    params = PreprocessParams(**LOOSE, num_partitions=3)
    cache_dir = tmp_path / "caches"
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_build_in_child,
                               args=(events, params, cache_dir, lambda: barrier.wait(30), None, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert all(status == "ok" for status, *_ in outcomes), outcomes
    cache = assert_one_clean_cache(cache_dir, events, params)
    assert {path for _, path, _, _ in outcomes} == {str(cache.path)}
    assert {digest for _, _, digest, _ in outcomes} == {cache.manifest["manifest_sha256"]}


def test_a_live_builders_temp_dir_survives_a_concurrent_build_which_it_then_joins(tmp_path):
    """A child is inside its build (its temp dir exists) while the parent builds the same cache: the parent must not
    remove the child's live build as stale, and the child, publishing second, opens the parent's cache."""
    context = multiprocessing.get_context("fork")
    events = random_events(random.Random(62), 300)
    params = PreprocessParams(**LOOSE, num_partitions=2)
    cache_dir = tmp_path / "caches"
    started, release, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_build_in_child,
                            args=(events, params, cache_dir, lambda: release.wait(60), started, results))
    child.start()
    try:
        assert started.wait(60)
        temps = [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
        assert len(temps) == 1 and f"-{host_label()}-{child.pid}-" in temps[0].name
        mine = preprocess(GatedSource(events, lambda: None), cache_dir, params)
        assert temps[0].exists()  # the live build was left alone
    finally:
        release.set()
    status, path, digest, _ = results.get(timeout=60)
    child.join(30)
    assert status == "ok" and path == str(mine.path) and digest == mine.manifest["manifest_sha256"]
    assert_one_clean_cache(cache_dir, events, params)


def test_concurrent_builder_threads_share_one_cache(tmp_path):
    events = random_events(random.Random(63), 300)
    params = PreprocessParams(**LOOSE, num_partitions=2)
    barrier = threading.Barrier(4)
    outcomes = []

    def build():
        try:
            cache = preprocess(GatedSource(events, lambda: barrier.wait(30)), tmp_path, params, chunk_size=40)
            outcomes.append(("ok", cache.manifest["manifest_sha256"]))
        except BaseException as error:
            outcomes.append(("error", repr(error)))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [status for status, _ in outcomes] == ["ok"] * 4, outcomes
    cache = assert_one_clean_cache(tmp_path, events, params)
    assert {digest for _, digest in outcomes} == {cache.manifest["manifest_sha256"]}
    assert open_files_under(tmp_path) == [] or all(p.endswith(".bin") for p in open_files_under(tmp_path))


def _exit_now():
    os._exit(0)


def test_stale_temp_dirs_of_a_dead_builder_go_and_nothing_else_does(tmp_path):
    context = multiprocessing.get_context("fork")
    dead = context.Process(target=_exit_now)
    dead.start()
    dead.join()
    dead_pid = dead.pid
    events = random_events(random.Random(64), 200)
    params = PreprocessParams(**LOOSE, num_partitions=2)
    source = ArraySource(*(np.array(c) for c in zip(*events)), name="log")
    final = tmp_path / f"log-{cache_key(source, params)}"
    other_key = tmp_path / f".tmp-log-{'0' * 20}-{host_label()}-{dead_pid}-aaaaaaaa"
    stale = tmp_path / f".tmp-{final.name}-{host_label()}-{dead_pid}-bbbbbbbb"
    stale_aside = tmp_path / f".tmp-{final.name}-{host_label()}-{dead_pid}-cccccccc"
    alive_parent = tmp_path / f".tmp-{final.name}-{host_label()}-{os.getppid()}-dddddddd"
    elsewhere = tmp_path / f".tmp-{final.name}-other_host-{dead_pid}-eeeeeeee"
    unrelated = tmp_path / "notes"
    for folder in (other_key, stale, stale_aside, alive_parent, elsewhere, unrelated):
        folder.mkdir()
        (folder / "payload.bin").write_bytes(b"x" * 10)
    (stale_aside / "replaced").mkdir()
    cache = preprocess(source, tmp_path, params)
    assert cache.path == final
    assert not stale.exists() and not stale_aside.exists()
    assert other_key.exists() and alive_parent.exists() and elsewhere.exists() and unrelated.exists()
    assert (other_key / "payload.bin").read_bytes() == b"x" * 10
    assert_cache_is_the_model(cache, events, params)


def test_a_malformed_record_mid_build_releases_everything_and_names_file_and_line(tmp_path):
    rng = random.Random(65)
    events = random_events(rng, 120)
    lines = events_csv(events).splitlines(keepends=True)
    lines.insert(97, "5,6,not-a-time\n")
    path = tmp_path / "data" / "log.csv"
    path.parent.mkdir()
    write_text(path, "".join(lines))
    cache_dir = tmp_path / "caches"
    params = PreprocessParams(**LOOSE, num_partitions=2)
    for chunk_size in (1, 10, 1 << 20):
        with pytest.raises(MalformedRecordError, match=rf"{re.escape(str(path))}:98: timestamp is not a number"):
            preprocess(DelimitedSource(path), cache_dir, params, chunk_size=chunk_size)
        assert open_files_under(tmp_path) == []
        assert list(cache_dir.iterdir()) == []
    cache = preprocess(DelimitedSource(path, on_malformed="skip"), cache_dir, params, chunk_size=10)
    assert_cache_is_the_model(cache, events, params)
    assert cache.stats["read"]["malformed"] == {"timestamp is not a number": 1}
    assert f"{path}:98" in cache.stats["read"]["examples"][0]
