"""Readers that turn interaction logs into chunks of (user, item, timestamp) arrays.

Every reader is an :class:`InteractionSource`: it can be iterated several times, yields
:class:`InteractionChunk` objects of at most ``chunk_size`` events, and fills a
:class:`ReadStats` with everything it read, dropped or found malformed. Nothing is dropped
silently: a malformed record is either fatal (``on_malformed="fail"``, raising
:class:`MalformedRecordError` naming the file and line) or counted by reason
(``on_malformed="skip"``), with the first few offending lines kept as examples.

User and item ids must be integers (they are the raw ids; preprocessing re-indexes them).
Timestamps are seconds as float64 (integers and decimals both parse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from .._ints import is_int

__all__ = [
    "InteractionChunk",
    "ReadStats",
    "MalformedRecordError",
    "InteractionSource",
    "ArraySource",
    "DelimitedSource",
    "RecBoleInterSource",
    "XingSource",
    "load_dataset",
    "recbole_example_path",
]

ON_MALFORMED_POLICIES = ("skip", "fail")
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_EXAMPLES = 20


class MalformedRecordError(ValueError):
    """A record could not be parsed and the policy is ``on_malformed="fail"``."""


class InteractionChunk(NamedTuple):
    """A block of events in source order. All arrays have shape (events,).

    user: int64 raw user ids; item: int64 raw item ids; timestamp: float64 seconds.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.user.shape[0])


@dataclasses.dataclass
class ReadStats:
    """What a reader saw. ``malformed`` counts dropped records by reason; ``dropped_event_type``
    counts well-formed records removed on purpose (e.g. XING deletes), by event type."""

    records: int = 0
    events: int = 0
    blank_lines: int = 0
    malformed: Counter = dataclasses.field(default_factory=Counter)
    dropped_event_type: Counter = dataclasses.field(default_factory=Counter)
    examples: list = dataclasses.field(default_factory=list)

    @property
    def malformed_total(self) -> int:
        return int(sum(self.malformed.values()))

    @property
    def dropped_event_type_total(self) -> int:
        return int(sum(self.dropped_event_type.values()))

    def note_malformed(self, where: str, reason: str, line: str, policy: str) -> None:
        message = f"{where}: {reason}: {line[:200]!r}"
        if policy == "fail":
            raise MalformedRecordError(message)
        self.malformed[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def to_json(self) -> dict:
        return {
            "records": self.records,
            "events": self.events,
            "blank_lines": self.blank_lines,
            "malformed": dict(self.malformed),
            "dropped_event_type": {str(k): v for k, v in self.dropped_event_type.items()},
            "examples": list(self.examples),
        }


class InteractionSource:
    """Base class of readers: re-iterable, chunked, with a fingerprint for cache keys."""

    name: str = "source"

    def iter_chunks(
        self, chunk_size: int = DEFAULT_CHUNK_SIZE, stats: ReadStats | None = None
    ) -> Iterator[InteractionChunk]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-able description that changes whenever the data this source yields may change."""
        raise NotImplementedError(f"{type(self).__name__} must implement fingerprint(): a JSON-able dict that "
                                  f"changes whenever its data may change (the session cache's key is made from it)")


def _check_chunk_size(chunk_size: int) -> int:
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


INT64_LIMIT = 2.0 ** 63


def _integer_ids(values, role: str) -> np.ndarray:
    """``values`` as contiguous int64, refusing anything that is not an integer id: integer
    dtypes pass (unsigned ones up to the int64 maximum), floating ones only if every value is
    finite and whole (a cast would truncate 1.7 to 1 and make NaN a garbage id)."""
    array = np.asarray(values)
    kind = array.dtype.kind
    if kind not in "iuf":
        raise ValueError(f"{role}: ids must be integers (an integer dtype, or floats holding whole numbers), "
                         f"got dtype {array.dtype}")
    flat = array.reshape(-1)
    if kind == "u":
        bad = flat > np.iinfo(np.int64).max
    elif kind == "f":
        # (in float64: float16 has no 2**63, and the comparison's cast of it would overflow with a warning)
        wide = flat.astype(np.float64)
        bad = ~np.isfinite(wide) | (wide != np.trunc(wide)) | (wide < -INT64_LIMIT) | (wide >= INT64_LIMIT)
    else:
        bad = None
    if bad is not None and bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{role}: ids must be whole numbers in the int64 range; index {first} is "
                         f"{flat[first].item()!r}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _event_types(values, role: str) -> frozenset:
    """A collection of event types as a set of ints, refusing anything that is not a whole number (int(4.7) would
    silently filter type 4)."""
    types = []
    for value in values:
        if not is_int(value):
            raise ValueError(f"{role} must hold integer event types, got {value!r}")
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"{role} must hold event types in the int64 range (the column's type), got {value!r}")
        types.append(int(value))
    return frozenset(types)


class ArraySource(InteractionSource):
    """An in-memory log of equal-length arrays (user, item: integers; timestamp: seconds).

    ``user`` and ``item`` may have any integer dtype, or a floating one whose values are all finite
    whole numbers; a value such as 1.5, NaN or inf raises ValueError naming the argument and its
    index, and a non-numeric dtype (strings, bools, objects) one naming the argument and the dtype.
    """

    def __init__(self, user, item, timestamp, name: str = "arrays"):
        self.user = _integer_ids(user, "user")
        self.item = _integer_ids(item, "item")
        timestamp = np.asarray(timestamp)
        if timestamp.dtype.kind not in "iuf":  # a cast would read "10" or True as a time
            raise ValueError(f"timestamp must be numeric (an integer or floating dtype), got dtype {timestamp.dtype}")
        self.timestamp = np.ascontiguousarray(timestamp, dtype=np.float64)
        if not (self.user.ndim == self.item.ndim == self.timestamp.ndim == 1
                and self.user.shape == self.item.shape == self.timestamp.shape):
            raise ValueError(f"user, item, timestamp must be 1-D of equal length, got shapes {self.user.shape}, "
                             f"{self.item.shape}, {self.timestamp.shape}")
        if not np.isfinite(self.timestamp).all():
            raise ValueError("timestamp must be finite")
        self.name = name

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for array in (self.user, self.item, self.timestamp):
            digest.update(array.tobytes())
        return {"reader": type(self).__name__, "events": int(self.user.shape[0]), "sha256": digest.hexdigest()}

    def iter_chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE, stats: ReadStats | None = None):
        chunk_size = _check_chunk_size(chunk_size)
        stats = stats if stats is not None else ReadStats()
        for start in range(0, self.user.shape[0], chunk_size):
            piece = slice(start, start + chunk_size)
            chunk = InteractionChunk(self.user[piece], self.item[piece], self.timestamp[piece])
            stats.records += len(chunk)
            stats.events += len(chunk)
            yield chunk


def _file_fingerprint(path: Path) -> dict:
    """Size, mtime and a hash of the first and last MiB: cheap, yet sees edits and truncation."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if st.st_size > 1 << 20:  # the last MiB, or what follows the first (a 1-2 MiB file is hashed whole)
            f.seek(max(1 << 20, st.st_size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256_ends": digest.hexdigest()}


_UNDECODABLE = re.compile("[\udc80-\udcff]")
# What the fast parser (np.loadtxt) may see: printable ASCII, tab and line ends. Its number parsing takes other
# characters beside digits (numpy 2.4 reads "1\u2500" as 9434, and "1\x1f" as 1, which int() refuses): a block with
# any of them is parsed line by line, by int() and float() alone, so a record reads the same whatever its chunk.
_NOT_PLAIN_ASCII = re.compile("[^\t\n\r\x20-\x7e]")


def _plain_number(cell: str) -> str:
    """The cell, when it is written in the numbers' plain ASCII syntax that numpy's parser (the fast path) takes;
    ValueError otherwise. int() and float() also take Python's literal syntax and any script's digits: "1_2" and
    full-width "\uff11\uff12" were read as 12, another id."""
    if "_" in cell or not cell.isascii():
        raise ValueError(f"not a plain number: {cell!r}")
    return cell


def _undecodable(text: str) -> bool:
    """Whether ``text`` (decoded with ``errors="surrogateescape"``) held bytes that are not UTF-8."""
    return not text.isascii() and _UNDECODABLE.search(text) is not None


class DelimitedSource(InteractionSource):
    """A CSV/TSV file of interactions with a column mapping.

    Args:
        path: the file (``~`` is expanded). It is read as UTF-8; a byte order mark at its start is
            ignored, and a line that is not valid UTF-8 is a malformed record.
        user, item, timestamp: column names (when ``header=True``) or 0-based (non-negative) column
            indices.
        event_type: optional column of integer event types.
        delimiter: field separator; default tab for ``.tsv``, ``.inter`` and ``.txt`` files (any case of the
            suffix), comma otherwise.
        header: whether the first line names the columns.
        drop_event_types: event types whose records are removed (counted in
            ``ReadStats.dropped_event_type``).
        known_event_types: if given, any other event type is a malformed record.
        on_malformed: ``"skip"`` (count and continue) or ``"fail"`` (raise with file:line).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        user: str | int = "user_id",
        item: str | int = "item_id",
        timestamp: str | int = "timestamp",
        event_type: str | int | None = None,
        delimiter: str | None = None,
        header: bool = True,
        drop_event_types: Sequence[int] = (),
        known_event_types: Sequence[int] | None = None,
        on_malformed: str = "fail",
        name: str | None = None,
    ):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"path: no such file {str(self.path)!r}")
        if on_malformed not in ON_MALFORMED_POLICIES:
            raise ValueError(f"on_malformed must be one of {ON_MALFORMED_POLICIES}, got {on_malformed!r}")
        if delimiter is None:
            delimiter = "\t" if self.path.suffix.lower() in (".tsv", ".inter", ".txt") else ","
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"delimiter must be a single character, got {delimiter!r}")
        self.columns = {"user": user, "item": item, "timestamp": timestamp}
        if event_type is not None:
            self.columns["event_type"] = event_type
        for role, column in self.columns.items():
            if not (isinstance(column, str) and header) and not is_int(column):
                raise TypeError(f"{role}: expected a column {'name or ' if header else ''}index, got {column!r}")
            if is_int(column):
                if column < 0:
                    raise ValueError(f"{role}: a column index must be non-negative (0 is the first column), "
                                     f"got {column}")
                self.columns[role] = int(column)  # (kept as Python's int: the fingerprint is JSON)
        self.delimiter = delimiter
        self.header = header
        self.drop_event_types = _event_types(drop_event_types, "drop_event_types")
        self.known_event_types = None if known_event_types is None else _event_types(known_event_types,
                                                                                     "known_event_types")
        if self.known_event_types is not None and not self.drop_event_types <= self.known_event_types:
            raise ValueError("drop_event_types must be a subset of known_event_types")
        if event_type is None and (self.drop_event_types or self.known_event_types is not None):
            raise ValueError("drop_event_types and known_event_types filter by the event type: name its column "
                             "with event_type= (without it every record would be kept, unfiltered)")
        self.on_malformed = on_malformed
        self.name = name or self.path.stem

    def fingerprint(self) -> dict:
        return {
            "reader": type(self).__name__,
            "file": _file_fingerprint(self.path),
            "columns": {k: v for k, v in self.columns.items()},
            "delimiter": self.delimiter,
            "header": self.header,
            "drop_event_types": sorted(self.drop_event_types),
            "known_event_types": None if self.known_event_types is None else sorted(self.known_event_types),
            "on_malformed": self.on_malformed,
        }

    def _header_cell_name(self, cell: str) -> str:
        return cell.strip()

    def _resolve_columns(self, header_cells: list[str] | None) -> dict[str, int]:
        resolved = self._named_columns(header_cells)
        roles_of = {}
        for role, index in resolved.items():
            roles_of.setdefault(index, []).append(role)
        shared = [roles for roles in roles_of.values() if len(roles) > 1]
        if shared:
            raise ValueError(f"{self.path}: {' and '.join(shared[0])} are read from one column; each needs its own")
        return resolved

    def _named_columns(self, header_cells: list[str] | None) -> dict[str, int]:
        if header_cells is None:
            return dict(self.columns)  # type: ignore[arg-type]
        names = [self._header_cell_name(c) for c in header_cells]
        resolved = {}
        for role, column in self.columns.items():
            if isinstance(column, int):
                if not 0 <= column < len(names):
                    raise ValueError(f"{self.path}:1: {role} column index {column} out of range "
                                     f"(header has {len(names)} columns)")
                resolved[role] = column
            elif names.count(column) > 1:  # (the first of them was read, without a word)
                raise ValueError(f"{self.path}:1: the header names column {column!r} ({role}) "
                                 f"{names.count(column)} times; pass its index instead")
            elif column in names:
                resolved[role] = names.index(column)
            else:
                raise ValueError(f"{self.path}:1: missing column {column!r} for {role}; header has {names}")
        return resolved

    def iter_chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE, stats: ReadStats | None = None):
        chunk_size = _check_chunk_size(chunk_size)
        stats = stats if stats is not None else ReadStats()
        # utf-8-sig: a byte order mark at the start is not part of the first cell. surrogateescape:
        # an undecodable byte becomes a lone surrogate, so its line is reported (or skipped) as
        # malformed with its file and line instead of ending the read with a bare UnicodeDecodeError.
        with open(self.path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            first_line_number = 1
            header_cells = None
            if self.header:
                header = f.readline()
                if not header:
                    raise ValueError(f"{self.path}: empty file (expected a header line)")
                if _undecodable(header):
                    raise MalformedRecordError(f"{self.path}:1: header line is not valid UTF-8: "
                                               f"{header[:200]!r}")
                header_cells = header.rstrip("\r\n").split(self.delimiter)
                first_line_number = 2
            columns = self._resolve_columns(header_cells)
            lines: list[str] = []
            line_number = first_line_number
            for line in f:
                lines.append(line)
                if len(lines) == chunk_size:
                    chunk = self._parse_lines(lines, line_number, columns, stats)
                    line_number += len(lines)
                    lines = []
                    if len(chunk):
                        yield chunk
            if lines:
                chunk = self._parse_lines(lines, line_number, columns, stats)
                if len(chunk):
                    yield chunk
            elif line_number == first_line_number and not self.header:
                raise ValueError(f"{self.path}: empty file")

    def _parse_lines(self, lines: list[str], first_line: int, columns: dict[str, int], stats: ReadStats):
        """Parse a block of lines with numpy's C parser; on any failure, re-parse line by line to
        report (or skip) exactly the bad records."""
        blank_lines = sum(1 for line in lines if not line.strip())
        parsed = self._parse_fast(lines, len(lines) - blank_lines, columns)
        if parsed is None:
            parsed = self._parse_slow(lines, first_line, columns, stats)
        else:
            stats.blank_lines += blank_lines
            stats.records += len(lines) - blank_lines
        user, item, timestamp, event_type = parsed
        if event_type is not None and self.drop_event_types:
            drop = np.isin(event_type, np.fromiter(self.drop_event_types, dtype=np.int64))
            if drop.any():
                types, counts = np.unique(event_type[drop], return_counts=True)
                for t, c in zip(types.tolist(), counts.tolist()):
                    stats.dropped_event_type[int(t)] += int(c)
                keep_mask = ~drop
                user, item, timestamp = user[keep_mask], item[keep_mask], timestamp[keep_mask]
        stats.events += int(user.shape[0])
        return InteractionChunk(user, item, timestamp)

    def _parse_fast(self, lines, records, columns):
        roles = list(columns)
        if records == 0:
            empty = np.empty(0, np.int64)
            return empty, empty, np.empty(0, np.float64), (empty if "event_type" in columns else None)
        dtype = np.dtype([(role, np.float64 if role == "timestamp" else np.int64) for role in roles])
        text = "".join(lines)
        if _NOT_PLAIN_ASCII.search(text) is not None:  # (undecodable bytes included)
            return None
        try:
            table = np.loadtxt(io.StringIO(text), delimiter=self.delimiter, dtype=dtype,
                               usecols=[columns[role] for role in roles], comments=None, ndmin=1)
        except (ValueError, OverflowError, IndexError):
            return None
        if table.shape[0] != records or not np.isfinite(table["timestamp"]).all():
            return None
        event_type = table["event_type"] if "event_type" in columns else None
        if event_type is not None and self.known_event_types is not None:
            if not np.isin(event_type, np.fromiter(self.known_event_types, dtype=np.int64)).all():
                return None
        return (np.ascontiguousarray(table["user"]), np.ascontiguousarray(table["item"]),
                np.ascontiguousarray(table["timestamp"]), None if event_type is None else np.ascontiguousarray(event_type))

    def _parse_slow(self, lines, first_line, columns, stats):
        users, items, timestamps, event_types = [], [], [], []
        needed = max(columns.values()) + 1
        for line_number, text in enumerate(lines, start=first_line):
            if not text.strip():
                stats.blank_lines += 1
                continue
            stats.records += 1
            where = f"{self.path}:{line_number}"
            if _undecodable(text):
                stats.note_malformed(where, "not valid UTF-8", text, self.on_malformed)
                continue
            row = text.rstrip("\r\n").split(self.delimiter)
            if len(row) < needed:
                stats.note_malformed(where, f"expected at least {needed} fields, found {len(row)}", text,
                                     self.on_malformed)
                continue
            try:
                user = int(_plain_number(row[columns["user"]]))
                item = int(_plain_number(row[columns["item"]]))
            except ValueError:
                stats.note_malformed(where, "user or item id is not an integer", text, self.on_malformed)
                continue
            try:
                timestamp = float(_plain_number(row[columns["timestamp"]]))
            except ValueError:
                stats.note_malformed(where, "timestamp is not a number", text, self.on_malformed)
                continue
            if not np.isfinite(timestamp):
                stats.note_malformed(where, "timestamp is not finite", text, self.on_malformed)
                continue
            if not (-(1 << 63) <= user < (1 << 63) and -(1 << 63) <= item < (1 << 63)):
                stats.note_malformed(where, "id out of int64 range", text, self.on_malformed)
                continue
            if "event_type" in columns:
                try:
                    event_type = int(_plain_number(row[columns["event_type"]]))
                except ValueError:
                    stats.note_malformed(where, "event type is not an integer", text, self.on_malformed)
                    continue
                if not -(1 << 63) <= event_type < (1 << 63):
                    stats.note_malformed(where, "event type out of int64 range", text, self.on_malformed)
                    continue
                if self.known_event_types is not None and event_type not in self.known_event_types:
                    stats.note_malformed(where, f"unknown event type {event_type}", text, self.on_malformed)
                    continue
                event_types.append(event_type)
            users.append(user)
            items.append(item)
            timestamps.append(timestamp)
        return (
            np.asarray(users, dtype=np.int64),
            np.asarray(items, dtype=np.int64),
            np.asarray(timestamps, dtype=np.float64),
            np.asarray(event_types, dtype=np.int64) if "event_type" in columns else None,
        )


RECBOLE_FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


class RecBoleInterSource(DelimitedSource):
    """A RecBole atomic ``.inter`` file: tab-separated, header cells ``name:type``.

    The user, item and timestamp fields are named without their ``:type`` suffix
    (defaults ``user_id``, ``item_id``, ``timestamp``).
    """

    def __init__(self, path, user="user_id", item="item_id", timestamp="timestamp",
                 on_malformed="fail", name=None):
        super().__init__(path, user=user, item=item, timestamp=timestamp, delimiter="\t", header=True,
                         on_malformed=on_malformed, name=name)

    def _header_cell_name(self, cell: str) -> str:
        cell = cell.strip()
        field, sep, field_type = cell.partition(":")
        if not sep or field_type not in RECBOLE_FIELD_TYPES:
            raise ValueError(f"{self.path}:1: header cell {cell!r} is not 'name:type' with type one of "
                             f"{RECBOLE_FIELD_TYPES}")
        return field


XING_EVENT_TYPES = (1, 2, 3, 4, 5)
XING_DELETE = 4


class XingSource(DelimitedSource):
    """The XING RecSys Challenge 2016 ``interactions.csv``: tab-separated
    ``user_id item_id interaction_type created_at``; deletes (type 4) are dropped and counted,
    types outside 1..5 are malformed."""

    def __init__(self, path, on_malformed="fail", name="xing"):
        super().__init__(path, user="user_id", item="item_id", timestamp="created_at",
                         event_type="interaction_type", delimiter="\t", header=True,
                         drop_event_types=(XING_DELETE,), known_event_types=XING_EVENT_TYPES,
                         on_malformed=on_malformed, name=name)


def recbole_example_path(name: str) -> Path:
    """Path of ``recbole/dataset_example/<name>/<name>.inter`` in the installed (not imported)
    recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"data set {name!r} ships inside the 'recbole' wheel, which is not installed; "
            "install it without its dependencies: pip install --no-deps recbole==1.2.1"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / name / f"{name}.inter"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recbole is installed but has no dataset_example/{name}/{name}.inter; "
                            "reinstall it: pip install --no-deps --force-reinstall recbole==1.2.1")


BUILTIN_DATASETS = ("ml-100k",)


def load_dataset(name: str, on_malformed: str = "fail") -> InteractionSource:
    """A built-in data set as a source. ``"ml-100k"``: MovieLens-100k from the recbole wheel."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"name must be one of {BUILTIN_DATASETS}, got {name!r}")
    return RecBoleInterSource(recbole_example_path(name), on_malformed=on_malformed, name=name)

