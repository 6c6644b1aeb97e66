"""The on-disk session cache: flat numpy memmaps plus a JSON manifest.

Layout of a cache directory (all arrays raw little-endian binary, opened with ``np.memmap``)::

    manifest.json                 counts, preprocessing params, source fingerprint, checksums
    item.bin             int32    (events,)      dense item ids >= 1 (0 = padding/start token)
    timestamp.bin        float64  (events,)      seconds
    session_offsets.bin  int64    (sessions+1,)  session s = events [off[s], off[s+1])
    session_split.bin    int8     (sessions,)    0 train, 1 validation, 2 test
    user_session_offsets.bin int64 (users+1,)    user u = sessions [off[u], off[u+1])
    user_raw_id.bin      int64    (users,)       raw id of each dense user
    item_raw_id.bin      int64    (items+1,)     raw id of each dense item; entry 0 is -1
    partition_user_offsets.bin int64 (partitions+1,) partition p = users [off[p], off[p+1])

Events are sorted by user, then time (ties keep source order). A partition is a contiguous
range of users, so it covers contiguous sessions and events and can be streamed on its own.

Integrity: the manifest carries a SHA-256 of its own content and a CRC-32 per array
(user-, item- and partition-level arrays) and per partition (event- and session-level arrays).
Opening checks the manifest, every file's exact size (truncation), the small arrays' CRCs and the
offsets' end points, which keeps it far below a second at any scale; the per-partition CRCs are
checked the first time event- or session-level data is read (any of ``item``, ``timestamp``,
``session_offsets``, ``session_split``: these attributes verify every partition once per opened
cache before they return the array, so no reader can see unverified data; every reader scans the
split labels of all partitions anyway), or at open with ``verify="full"``, or explicitly with
:meth:`SessionCache.verify_partitions`. Any mismatch raises :class:`CacheCorruptError`.

Pickling a :class:`SessionCache` stores its path (and what it has verified), not its arrays:
unpickling reopens the directory, memory-mapped again, and refuses a cache whose manifest changed
meanwhile.

Writes are atomic: a cache is built in a temporary sibling directory, every file and the
directory are fsync'ed, the manifest is written last, and the directory is renamed into place.
A crash leaves only a ``.tmp-*`` directory, which is never opened as a cache.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from .._ints import is_int

__all__ = ["SessionCache", "CacheCorruptError", "CACHE_FORMAT", "CACHE_VERSION", "SPLITS"]

CACHE_FORMAT = "hiertcn_fast.session_cache"
CACHE_VERSION = 4  # bumped whenever the content for the same source and params changes
VERIFY_MODES = ("lazy", "full", "none")
MANIFEST_NAME = "manifest.json"
TEMP_PREFIX = ".tmp-"
SPLITS = {"train": 0, "valid": 1, "test": 2}

# name -> dtype, and which checksum granularity protects it.
ARRAY_DTYPES = {
    "item": np.int32,
    "timestamp": np.float64,
    "session_offsets": np.int64,
    "session_split": np.int8,
    "user_session_offsets": np.int64,
    "user_raw_id": np.int64,
    "item_raw_id": np.int64,
    "partition_user_offsets": np.int64,
}
GLOBAL_ARRAYS = ("user_session_offsets", "user_raw_id", "item_raw_id", "partition_user_offsets")
# (In the order they are checked: a partition's events are found through its session offsets, so damaged offsets are
# reported as such, not as a mismatch of the events they point at.)
PARTITIONED_ARRAYS = ("session_offsets", "session_split", "item", "timestamp")
CRC_BLOCK_BYTES = 64 << 20


# The way out that a checksum error found at a first read names (preprocess's own refusals add theirs).
LAZY_REBUILD_ADVICE = "preprocess(..., rebuild=True) replaces the cache"


class CacheCorruptError(RuntimeError):
    """The cache on disk is truncated, modified or otherwise not what its manifest says."""


def crc32_of(array: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's bytes, in blocks so a memmap is never copied whole; ``crc`` continues an earlier one."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.shape[0], CRC_BLOCK_BYTES):
        crc = zlib.crc32(flat[start:start + CRC_BLOCK_BYTES], crc)
    return crc


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partition_slices(partition_user_offsets, user_session_offsets, session_offsets, partition: int) -> dict:
    """Index ranges of one partition, per array name (session_offsets overlaps by one entry)."""
    user_lo, user_hi = int(partition_user_offsets[partition]), int(partition_user_offsets[partition + 1])
    session_lo, session_hi = int(user_session_offsets[user_lo]), int(user_session_offsets[user_hi])
    event_lo, event_hi = int(session_offsets[session_lo]), int(session_offsets[session_hi])
    return {
        "item": slice(event_lo, event_hi),
        "timestamp": slice(event_lo, event_hi),
        "session_offsets": slice(session_lo, session_hi + 1),
        "session_split": slice(session_lo, session_hi),
    }


def open_array(path: Path, dtype, length: int, mode: str = "r") -> np.ndarray:
    if length == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=(length,))


def host_label() -> str:
    """This machine's name as it goes into a temporary folder's name (no '-', which separates the fields)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "unknown"


def new_temp_dir(final_path: Path) -> Path:
    """A new build folder beside ``final_path``: ``.tmp-<name>-<host>-<pid>-<random>``. The host is in the name
    because a pid means something on one machine only: a cache folder on a disk shared by several machines (the
    ranks of a multi-node job) must not have one machine's build removed by another as 'left by a dead process'."""
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temp = final_path.parent / f"{TEMP_PREFIX}{final_path.name}-{host_label()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    return temp


def left_by_dead_process(host: str, pid_text: str) -> bool:
    """Whether a temporary file or folder named with ``host`` and ``pid_text`` was left by a process of this machine
    that no longer exists (another machine's are never judged here: a pid means something on one machine only)."""
    if host != host_label() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return False


def remove_stale_temp_dirs(final_path: Path) -> list[Path]:
    """Remove unfinished builds of ``final_path`` left by processes of this machine that no longer exist (those of
    other machines are theirs to remove; a folder named before the host was part of the name counts as local)."""
    removed = []
    prefix = f"{TEMP_PREFIX}{final_path.name}-"
    if not final_path.parent.is_dir():
        return removed
    for candidate in final_path.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        fields = candidate.name[len(prefix):].rsplit("-", 2)
        host, pid_text = (fields[0], fields[1]) if len(fields) == 3 else (host_label(), fields[0])
        if left_by_dead_process(host, pid_text):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def seal_temp_dir(temp: Path, manifest: dict) -> None:
    """Make the build in ``temp`` a complete cache: fsync its arrays, then write the manifest last, and fsync it."""
    for name in ARRAY_DTYPES:
        fsync_path(temp / f"{name}.bin")
    manifest = dict(manifest, manifest_sha256=manifest_digest(manifest))
    manifest_path = temp / MANIFEST_NAME
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(temp)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two directory entries of one file system in one atomic step (Linux's renameat2 with RENAME_EXCHANGE):
    a process looking at either path sees the one folder or the other, never none. False where the C library,
    kernel or file system cannot; FileNotFoundError if either path is gone."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE (linux/fcntl.h, linux/fs.h)
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    if error == errno.ENOENT:
        raise FileNotFoundError(error, os.strerror(error), str(second))
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def publish_temp_dir(temp: Path, final_path: Path, manifest: dict) -> bool:
    """Write the manifest last, fsync everything and rename ``temp`` to ``final_path``.

    Returns False (and removes ``temp``) if another process published the same cache first.
    """
    seal_temp_dir(temp, manifest)
    try:
        os.rename(temp, final_path)
    except OSError:
        if (final_path / MANIFEST_NAME).exists():
            shutil.rmtree(temp, ignore_errors=True)
            return False
        raise
    fsync_path(final_path.parent)
    return True


def _verified_array(name: str) -> property:
    """A partition-checked array attribute: the first read verifies every partition's CRCs."""

    def get(self: "SessionCache") -> np.ndarray:
        if len(self._verified_partitions) < self.num_partitions:
            self.verify()
        return self._arrays[name]

    return property(get, doc=f"``{name}.bin`` (memmap); reading it first verifies every partition's checksums.")


class SessionCache:
    """A read-only view of a cache directory. Open with :meth:`open`.

    Attributes (numpy memmaps, see the module docstring for shapes): ``item``, ``timestamp``,
    ``session_offsets``, ``session_split`` (the first read of any of these verifies every
    partition's checksums), ``user_session_offsets``, ``user_raw_id``, ``item_raw_id``,
    ``partition_user_offsets``; and ``manifest``, ``params``, ``stats``, ``num_events``,
    ``num_sessions``, ``num_users``, ``num_items`` (dense ids are 1..num_items),
    ``num_partitions``, ``max_session_length``. Pickles by path (see the module docstring).
    """

    item = _verified_array("item")
    timestamp = _verified_array("timestamp")
    session_offsets = _verified_array("session_offsets")
    session_split = _verified_array("session_split")

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray], verify: str = "lazy"):
        self.path = path
        self._verify_mode = verify
        self.manifest = manifest
        self.params = manifest["params"]
        self.stats = manifest["stats"]
        counts = manifest["counts"]
        self.num_events = counts["events"]
        self.num_sessions = counts["sessions"]
        self.num_users = counts["users"]
        self.num_items = counts["items"]
        self.num_partitions = counts["partitions"]
        self.max_session_length = counts["max_session_length"]
        self._arrays = dict(arrays)
        for name in GLOBAL_ARRAYS:
            setattr(self, name, arrays[name])
        self._verified_partitions: set[int] = set()

    def __getstate__(self) -> dict:
        # By path: the arrays are the files (a pickled copy must not carry the whole cache).
        return {"path": os.path.abspath(self.path), "verify": self._verify_mode,
                "manifest_sha256": self.manifest["manifest_sha256"],
                "verified_partitions": sorted(self._verified_partitions)}

    def __setstate__(self, state: dict) -> None:
        # "full" need not re-read everything: what the pickled cache verified stays verified below.
        if not (Path(state["path"]) / MANIFEST_NAME).is_file():
            raise CacheCorruptError(f"{state['path']}: the cache this SessionCache was pickled from is no longer "
                                    "there (moved or removed since); open it where it is now")
        opened = SessionCache.open(state["path"], verify="none" if state["verify"] == "none" else "lazy")
        if opened.manifest["manifest_sha256"] != state["manifest_sha256"]:
            raise CacheCorruptError(f"{state['path']}: the cache changed on disk since this SessionCache was "
                                    "pickled (rebuilt or replaced); open it again")
        self.__dict__.update(opened.__dict__)
        self._verify_mode = state["verify"]
        # Same manifest, same file sizes: what the pickled cache verified stays verified, as it would
        # in the process that pickled it.
        self._verified_partitions = set(state["verified_partitions"])

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def __repr__(self) -> str:
        return (f"SessionCache({str(self.path)!r}, events={self.num_events}, sessions={self.num_sessions}, "
                f"users={self.num_users}, items={self.num_items}, partitions={self.num_partitions})")

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "lazy") -> "SessionCache":
        """Open a cache directory.

        path: the cache directory (``~`` is expanded).
        verify: ``"lazy"`` (manifest, sizes, small arrays now; the partitions on the first read of
        event- or session-level data), ``"full"`` (everything now) or ``"none"`` (sizes and
        manifest only; the partitions are still checked on the first read of their data).
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}")
        path = Path(path).expanduser().absolute()  # absolute: a pickled cache reopens it from any directory
        if path.name.startswith(TEMP_PREFIX):
            raise CacheCorruptError(f"{path}: an unfinished cache build (temporary directory), not a cache")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheCorruptError(f"{path}: no {MANIFEST_NAME}; not a complete session cache")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CacheCorruptError(f"{manifest_path}: unreadable manifest ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise CacheCorruptError(f"{manifest_path}: not a {CACHE_FORMAT} manifest")
        if manifest.get("version") != CACHE_VERSION:
            raise CacheCorruptError(f"{manifest_path}: format version {manifest.get('version')!r}, "
                                    f"this code reads version {CACHE_VERSION}; rebuild the cache")
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise CacheCorruptError(f"{manifest_path}: manifest checksum mismatch (edited or corrupted)")
        missing = [key for key in ("files", "counts", "checksums", "params", "stats", "key") if key not in manifest]
        missing += [name for name in ARRAY_DTYPES if name not in manifest.get("files", {})]
        if missing:
            raise CacheCorruptError(f"{manifest_path}: manifest lacks {missing}")
        arrays = {}
        try:
            for name, dtype in ARRAY_DTYPES.items():
                file_path = path / f"{name}.bin"
                length = manifest["files"][name]["length"]
                expected = length * np.dtype(dtype).itemsize
                actual = file_path.stat().st_size if file_path.is_file() else None
                if actual != expected:
                    raise CacheCorruptError(f"{file_path}: expected {expected} bytes, found "
                                            f"{'no file' if actual is None else actual} (truncated or replaced)")
                arrays[name] = open_array(file_path, dtype, length)
            cache = cls(path, manifest, arrays, verify)
            if verify != "none":
                for name in GLOBAL_ARRAYS:
                    if crc32_of(arrays[name]) != manifest["checksums"]["global"][name]:
                        raise CacheCorruptError(f"{path / (name + '.bin')}: checksum mismatch (corrupted)")
            cache._check_structure()
            if verify == "full":
                cache.verify()
        except CacheCorruptError as error:
            # The error's traceback kept this frame and those below it, and with them every map of the refused
            # cache and its file descriptor, for as long as the error was held. Its message names the file and
            # the fault: it goes on without the frames below, and without the maps.
            arrays = cache = None
            raise error.with_traceback(None)
        return cache

    def _check_structure(self) -> None:
        ends = (("session_offsets", self.num_events), ("user_session_offsets", self.num_sessions),
                ("partition_user_offsets", self.num_users))
        for name, end in ends:
            offsets = self._arrays[name]
            if int(offsets[0]) != 0 or int(offsets[-1]) != end:
                raise CacheCorruptError(f"{self.path / (name + '.bin')}: offsets do not span 0..{end} (corrupted)")

    def verify_partitions(self, partitions: Iterable[int]) -> None:
        """Check the CRCs of the given partitions (each once per process); raise on mismatch. Each partition is an
        integer index in 0..num_partitions - 1 (TypeError, IndexError otherwise: what was verified is what the
        first read of the arrays counts on)."""
        expected = self.manifest["checksums"]["partitions"]
        for p in partitions:
            if not is_int(p):
                raise TypeError(f"partitions must be integer partition indices, got {p!r}")
            if not 0 <= p < self.num_partitions:
                raise IndexError(f"partition {p} is not a partition of this cache (0..{self.num_partitions - 1})")
            p = int(p)
            if p in self._verified_partitions:
                continue
            ranges = partition_slices(self.partition_user_offsets, self.user_session_offsets,
                                      self._arrays["session_offsets"], p)
            for name in PARTITIONED_ARRAYS:
                if crc32_of(self._arrays[name][ranges[name]]) != expected[p][name]:
                    raise CacheCorruptError(f"{self.path / (name + '.bin')}: checksum mismatch in partition "
                                            f"{p} (corrupted); {LAZY_REBUILD_ADVICE}")
            self._verified_partitions.add(p)

    def verify(self) -> None:
        """Check every partition's CRCs now."""
        self.verify_partitions(range(self.num_partitions))

    def partition_of_users(self, users: np.ndarray) -> np.ndarray:
        """Partition index of dense user indices. users: (n,) -> (n,)."""
        return np.searchsorted(self.partition_user_offsets, users, side="right") - 1

    def split_code(self, split: str) -> int:
        if not isinstance(split, str) or split not in SPLITS:  # (a list was "unhashable type")
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        return SPLITS[split]
