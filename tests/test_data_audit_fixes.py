"""Defects of the data path found by an audit; each test fails on the code before its fix."""

import pickle

import numpy as np
import pytest
import torch

from hiertcn_fast.data import (ArraySource, CacheCorruptError, DelimitedSource, MalformedRecordError, PinnedRingQueue,
                               PreprocessParams, ReadStats, SessionBatcher, SessionCache, SyntheticSource, cache_key,
                               preprocess)
from hiertcn_fast.models import UserHistoryBatcher
from hiertcn_fast.train import _split_users, user_lane_batches
from test_data_preprocess import flip_byte

LOOSE = dict(min_item_count=1, min_user_count=1, max_user_count=None)


def small_cache(tmp_path, split="cold", num_partitions=2, events=3000, seed=1, rebuild=False):
    params = PreprocessParams(min_item_count=1, min_user_count=2, num_partitions=num_partitions, split=split)
    return preprocess(SyntheticSource(events, num_items=100, seed=seed), tmp_path, params, rebuild=rebuild)


# ---- 1. ArraySource ids --------------------------------------------------------------------------

@pytest.mark.parametrize("role,user,item,index", [
    ("user", [1.0, 1.5, 2.0], [5, 6, 7], 1),
    ("item", [1, 2, 3], [5.0, 6.0, 7.9], 2),
    ("user", [1.0, np.nan, 2.0], [5, 6, 7], 1),
    ("item", [1, 2, 3], [5.0, np.inf, 7.0], 1),
    ("item", [1, 2, 3], [-np.inf, 6.0, 7.0], 0),
    ("user", [1.0, 2.0, 2.0 ** 63], [5, 6, 7], 2),
])
def test_array_source_refuses_ids_that_are_not_whole_numbers(role, user, item, index):
    with pytest.raises(ValueError, match=rf"{role}: .*index {index}"):
        ArraySource(user, item, [0.0, 1.0, 2.0])


def test_array_source_refuses_non_numeric_ids_and_accepts_whole_floats():
    with pytest.raises(ValueError, match="user: .*dtype"):
        ArraySource(["1", "2"], [5, 6], [0.0, 1.0])
    with pytest.raises(ValueError, match="item: .*dtype"):
        ArraySource([1, 2], [True, False], [0.0, 1.0])
    with pytest.raises(ValueError, match="user: .*index 0"):
        ArraySource(np.array([2 ** 64 - 1, 1], dtype=np.uint64), [5, 6], [0.0, 1.0])
    source = ArraySource(np.array([1.0, -2.0]), np.array([5, 6], dtype=np.uint8), [0.0, 1.0])
    assert source.user.dtype == np.int64 and source.user.tolist() == [1, -2]
    assert source.item.dtype == np.int64 and source.item.tolist() == [5, 6]
    empty = ArraySource([], [], [])
    assert empty.user.dtype == np.int64 and empty.user.shape == (0,)


# ---- 2. every reader of the cache checks the partitions' checksums -------------------------------

@pytest.mark.parametrize("verify", ["lazy", "none"])
def test_corrupted_events_are_reported_on_every_read_path(tmp_path, verify):
    cache = small_cache(tmp_path, split="warm")
    users = _split_users(cache, "test")
    assert users.shape[0] > 0
    flip_byte(cache.path / "item.bin", 40)
    with pytest.raises(CacheCorruptError, match=r"item.bin: checksum mismatch in partition 0 \(corrupted\); "
                                                r"preprocess\(\.\.\., rebuild=True\) replaces the cache"):
        UserHistoryBatcher(SessionCache.open(cache.path, verify=verify), "train", users_per_batch=8)
    opened = SessionCache.open(cache.path, verify=verify)
    with pytest.raises(CacheCorruptError, match="item.bin: checksum mismatch"):
        list(user_lane_batches(opened, ("train",), users, 8, 20))
    with pytest.raises(CacheCorruptError, match="item.bin: checksum mismatch"):
        SessionCache.open(cache.path, verify=verify).item
    with pytest.raises(CacheCorruptError, match="item.bin: checksum mismatch"):
        SessionBatcher(SessionCache.open(cache.path, verify=verify), "train", lanes=4)


def test_intact_cache_is_verified_once_on_first_read(tmp_path):
    cache = small_cache(tmp_path)
    opened = SessionCache.open(cache.path)
    assert not opened._verified_partitions  # opening stays cheap
    assert int(opened.session_offsets[-1]) == opened.num_events
    assert opened._verified_partitions == set(range(opened.num_partitions))
    np.testing.assert_array_equal(opened.item, cache.item)


# ---- 3. begin_state -> model -> end_state -> backward --------------------------------------------

def test_end_state_before_backward_works(tmp_path):
    cache = small_cache(tmp_path, seed=2)
    torch.manual_seed(0)
    train = SessionBatcher(cache, "train", lanes=4, sessions_per_batch=3, state_shape=(1, 8))
    embedding = torch.nn.Embedding(cache.num_items + 1, 8)
    cell = torch.nn.GRUCell(8, 8)
    for step, batch in enumerate(train):
        state = train.begin_state(batch)
        h = state[0]
        loss = 0
        for j in range(batch.items.shape[0]):
            h = cell(embedding(batch.items[j, :, 1]), h) * batch.keep[j].float()[:, None]
            loss = loss + h.square().mean()
        train.end_state(batch, h[None])
        loss.backward()  # raised "modified by an inplace operation" when begin_state returned the cache itself
        assert torch.equal(train.state_cache.state, h[None].detach())
        assert not train.state_cache.state.requires_grad
        if step == 2:
            break
    assert cell.weight_hh.grad is not None and torch.isfinite(cell.weight_hh.grad).all()


# ---- 4. encodings ---------------------------------------------------------------------------------

def latin1_log(tmp_path):
    path = tmp_path / "log.csv"
    with open(path, "wb") as f:
        f.write(b"user_id,item_id,timestamp,comment\n1,2,3,ok\n")
        for i in range(5):
            f.write(b"1,2,%d,fine\n" % (4 + i))
        f.write(b"4,5,6,caf\xe9\n")
        f.write(b"7,8,9,ok\n")
    return path


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_non_utf8_record_is_malformed(tmp_path, chunk_size):
    path = latin1_log(tmp_path)
    with pytest.raises(MalformedRecordError, match=rf"{path}:8: not valid UTF-8"):
        list(DelimitedSource(path).iter_chunks(chunk_size))
    stats = ReadStats()
    chunks = list(DelimitedSource(path, on_malformed="skip").iter_chunks(chunk_size, stats))
    assert np.concatenate([c.user for c in chunks]).tolist() == [1] * 6 + [7]
    assert dict(stats.malformed) == {"not valid UTF-8": 1} and stats.records == 8 and stats.events == 7
    assert f"{path}:8" in stats.examples[0]


def test_non_utf8_header_names_the_file(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"user_id,item_id,timestamp,caf\xe9\n1,2,3,x\n")
    with pytest.raises(MalformedRecordError, match=rf"{path}:1: .*not valid UTF-8"):
        list(DelimitedSource(path, on_malformed="skip").iter_chunks())


@pytest.mark.parametrize("header", [True, False])
def test_utf8_byte_order_mark_is_ignored(tmp_path, header):
    path = tmp_path / "log.csv"
    path.write_text(("\ufeffuser_id,item_id,timestamp\n" if header else "\ufeff") + "1,2,3\n4,5,6\n",
                    encoding="utf-8")
    columns = {} if header else dict(user=0, item=1, timestamp=2)
    (chunk,) = DelimitedSource(path, header=header, **columns).iter_chunks()
    assert chunk.user.tolist() == [1, 4] and chunk.item.tolist() == [2, 5] and chunk.timestamp.tolist() == [3, 6]


# ---- 5. pickling by path --------------------------------------------------------------------------

def test_pickled_batcher_is_small_and_memory_maps(tmp_path):
    cache = small_cache(tmp_path, events=60_000, num_partitions=3)
    batcher = SessionBatcher(cache, "train", lanes=8, sessions_per_batch=3, shuffle=True, seed=4,
                             state_shape=(1, 2))
    first = batcher.batch(1)
    blob = pickle.dumps(batcher)
    assert len(blob) < 10_000, len(blob)
    copy = pickle.loads(blob)
    assert isinstance(copy.cache.item, np.memmap) and np.shares_memory(copy._item, copy.cache.item)
    assert copy.num_batches() == batcher.num_batches()
    for name, value in copy.batch(1).tensors().items():
        assert torch.equal(value, first.tensors()[name]), name
    assert copy.cache.key == cache.key and copy.num_events == batcher.num_events
    np.testing.assert_array_equal(copy.split_users, batcher.split_users)
    assert copy.cache._verified_partitions == set(range(cache.num_partitions))
    copy.load_state_dict(batcher.state_dict())


def test_unpickled_cache_reopens_and_refuses_a_changed_cache(tmp_path):
    cache = small_cache(tmp_path)
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000
    copy = pickle.loads(blob)
    assert isinstance(copy.timestamp, np.memmap) and copy.key == cache.key
    np.testing.assert_array_equal(copy.timestamp, cache.timestamp)
    flip_byte(cache.path / "item.bin", 40)
    with pytest.raises(CacheCorruptError, match="item.bin: checksum mismatch"):
        pickle.loads(blob).item  # nothing was verified before pickling: the copy checks on first read
    small_cache(tmp_path, rebuild=True)  # same key, a new manifest
    with pytest.raises(CacheCorruptError, match="changed on disk since this SessionCache was pickled"):
        pickle.loads(blob)


# ---- 6. "~" in paths ------------------------------------------------------------------------------

def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cache = preprocess(ArraySource([1, 1, 2], [5, 6, 7], [0.0, 1.0, 2.0]), "~/cache",
                       PreprocessParams(**LOOSE, num_partitions=2))
    assert cache.path.parent == tmp_path / "cache"
    assert not (tmp_path / "cwd" / "~").exists()
    assert SessionCache.open(f"~/cache/{cache.path.name}").num_events == 3
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    assert DelimitedSource("~/log.csv").path == tmp_path / "log.csv"


# ---- 7. PreprocessParams --------------------------------------------------------------------------

@pytest.mark.parametrize("fractions", [(float("nan"), 0.5, 0.5), (float("nan"),) * 3, (0.8, 0.1, float("nan"))])
def test_split_fractions_must_be_finite(fractions):
    with pytest.raises(ValueError, match="split_fractions"):
        PreprocessParams(split_fractions=fractions)


def test_session_gap_takes_any_finite_positive_real():
    gap = PreprocessParams(session_gap=np.float32(1800)).session_gap
    assert gap == 1800.0 and type(gap) is float
    assert PreprocessParams(session_gap=np.int64(60)).session_gap == 60
    source = ArraySource([1], [2], [0.0])
    assert cache_key(source, PreprocessParams(session_gap=np.float32(1800))) == cache_key(source, PreprocessParams())
    assert cache_key(source, PreprocessParams(min_item_count=np.int64(50))) == cache_key(source, PreprocessParams())
    for bad in (float("nan"), float("inf"), 0, -1.0, True, "1800"):
        with pytest.raises(ValueError, match="session_gap"):
            PreprocessParams(session_gap=bad)


# ---- 8. negative column indices -------------------------------------------------------------------

@pytest.mark.parametrize("columns", [(0, 1, -1), (-3, -2, -1), (0, 1, 2, -1)])
def test_negative_column_indices_are_refused(tmp_path, columns):
    path = tmp_path / "log.csv"
    path.write_text("1,10,100,1\n2,20,200,1\n")
    role = {0: "user", 1: "item", 2: "timestamp", 3: "event_type"}[min(k for k, c in enumerate(columns) if c < 0)]
    with pytest.raises(ValueError, match=rf"{role}: .*non-negative.*-\d"):
        DelimitedSource(path, *columns[:3], event_type=columns[3] if len(columns) > 3 else None, header=False)


def test_boolean_column_is_refused(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("1,10,100\n")
    with pytest.raises(TypeError, match="user"):
        DelimitedSource(path, user=True, item=1, timestamp=2, header=False)


# ---- 9. the batcher's seed ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, None])
def test_batcher_seed_must_be_a_non_negative_integer(tmp_path, seed):
    cache = preprocess(ArraySource([1, 2, 3], [5, 6, 7], [0.0, 1.0, 2.0]), tmp_path,
                       PreprocessParams(**LOOSE, num_partitions=2))
    with pytest.raises(ValueError, match="seed"):
        SessionBatcher(cache, "train", lanes=2, sessions_per_batch=2, shuffle=True, seed=seed)
    assert SessionBatcher(cache, "train", lanes=2, shuffle=True, seed=np.int64(3)).seed == 3


# ---- 10. pin_memory without CUDA ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works with CUDA")
def test_pin_memory_without_cuda_is_refused_up_front():
    with pytest.raises(ValueError, match="pin_memory"):
        PinnedRingQueue({"x": ((2,), torch.int64)}, lambda seq, slot: False, pin_memory=True)
    with PinnedRingQueue({"x": ((2,), torch.int64)}, lambda seq, slot: False) as queue:
        assert not queue.pin_memory and queue.get() is None


def test_a_cache_opened_by_a_relative_path_unpickles_from_another_directory(tmp_path, monkeypatch):
    """The cache keeps the absolute path it was opened at: a pickled copy reopens it after a change of directory;
    a cache moved or removed since is said to be so, not to be corrupt."""
    cache = small_cache(tmp_path / "caches")
    monkeypatch.chdir(cache.path.parent)
    relative = SessionCache.open(cache.path.name)
    assert relative.path.is_absolute()
    blob = pickle.dumps(relative)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(pickle.loads(blob).item, cache.item)
    cache.path.rename(tmp_path / "moved")
    with pytest.raises(CacheCorruptError, match="no longer there"):
        pickle.loads(blob)


# ---- Second audit (session 13) ---------------------------------------------------------------------------

def test_fill_refuses_out_tensors_that_do_not_match_the_batch_spec_before_writing(tmp_path):
    """fill() took the width from out['items'] and checked nothing else: too narrow an items tensor dropped events
    that lengths still counted; a missing field was a bare KeyError after the others had been written."""
    batcher = SessionBatcher(small_cache(tmp_path), "train", lanes=4, sessions_per_batch=3)
    spec = batcher.batch_spec()

    def slots(fill_value=7):
        return {name: torch.full(shape, fill_value, dtype=dtype) for name, (shape, dtype) in spec.items()}

    narrow = slots()
    narrow["items"] = torch.zeros(spec["items"][0][:2] + (3,), dtype=torch.int64)
    missing = slots()
    del missing["continues"]
    other_dtype = slots()
    other_dtype["lengths"] = other_dtype["lengths"].int()
    for out, message in ((narrow, r"out\['items'\] must be a contiguous CPU torch.int64 tensor of shape \(3, 4, "),
                         (missing, r"out\['continues'\] .* got missing"),
                         (other_dtype, r"out\['lengths'\] .* got a torch.int32 tensor")):
        before = {name: t.clone() for name, t in out.items()}
        with pytest.raises(ValueError, match=message):
            batcher.fill(0, out)
        assert all(torch.equal(t, before[name]) for name, t in out.items()), "written before refused"
    out = slots()
    assert batcher.fill(0, out)
    expected = batcher.batch(0)
    assert torch.equal(out["lengths"], expected.lengths)
    width = expected.items.shape[2]
    assert torch.equal(out["items"][..., :width], expected.items)


def test_a_produce_that_returns_none_is_an_error_not_the_end_of_the_stream():
    """bool(None) ended the stream: batch 0 was filled and dropped, and the consumer saw an empty stream."""
    def forgetful(seq, slot):
        slot["value"].fill_(seq)  # no return

    with PinnedRingQueue({"value": ((2,), torch.int64)}, forgetful, num_producers=1, num_slots=2) as queue:
        with pytest.raises(TypeError, match=r"must return True .* or False .*got None for batch 0"):
            next(iter(queue))
    numpy_true = PinnedRingQueue({"value": ((2,), torch.int64)}, lambda seq, slot: np.bool_(seq < 3),
                                 num_producers=1, num_slots=2)
    assert [seq for seq, _ in numpy_true] == [0, 1, 2]


@pytest.mark.parametrize("shape", [(2.9,), "34", (True, 2), (2, -1), 5])
def test_a_queue_spec_shape_must_be_a_tuple_of_non_negative_ints(shape):
    """int() read 2.9 as 2, the string '34' as (3, 4) and True as 1."""
    with pytest.raises(TypeError, match="must be \\(shape: a tuple of non-negative ints"):
        PinnedRingQueue({"x": (shape, torch.int64)}, lambda seq, slot: False)
    queue = PinnedRingQueue({"x": ([2, np.int64(3)], torch.int64)}, lambda seq, slot: False, num_producers=1)
    assert queue.spec["x"] == ((2, 3), torch.int64)
    queue.close()


def test_a_cpu_consumers_queue_is_not_pinned_where_cuda_is_available(monkeypatch):
    """pin_memory=None pinned whenever CUDA was available, whatever the device: a CPU run on a GPU machine paid for
    pinned memory it only clones and made a CUDA context. (CUDA is simulated here: pinning would need its driver.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    queue = PinnedRingQueue({"x": ((4,), torch.int64)}, lambda seq, slot: False, num_producers=1, device="cpu")
    assert not queue.pin_memory and not queue._ring.slots[0]["x"].is_pinned()
    queue.close()


def test_event_type_filters_without_an_event_type_column_are_refused(tmp_path):
    """drop_event_types / known_event_types without event_type= were ignored: every record was kept."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,type\n1,10,100,1\n1,11,200,4\n2,12,300,9\n")
    for kwargs in (dict(drop_event_types=(4,)), dict(known_event_types=(1, 4)),
                   dict(drop_event_types=(4,), known_event_types=(1, 4))):
        with pytest.raises(ValueError, match="name its column with event_type="):
            DelimitedSource(path, **kwargs)
    stats = ReadStats()
    source = DelimitedSource(path, event_type="type", drop_event_types=(4,), known_event_types=(1, 4, 9))
    assert sum(len(chunk[0]) for chunk in source.iter_chunks(stats=stats)) == 2
    assert dict(stats.dropped_event_type) == {4: 1}


def test_the_lane_state_must_be_a_floating_point_pair_of_sizes(tmp_path):
    """state_dtype=int64 was accepted, and then the batcher's own state_dict could not be loaded; state_shape=128
    was a TypeError about len()."""
    cache = small_cache(tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        SessionBatcher(cache, "train", lanes=4, sessions_per_batch=3, state_shape=(2, 8), state_dtype=torch.int64)
    with pytest.raises(ValueError, match=r"state_shape must be \(layers, hidden\), got 128"):
        SessionBatcher(cache, "train", lanes=4, sessions_per_batch=3, state_shape=128)
    batcher = SessionBatcher(cache, "train", lanes=4, sessions_per_batch=3, state_shape=(2, 8),
                             state_dtype=torch.float64)
    batcher.load_state_dict(batcher.state_dict())


@pytest.mark.parametrize("size_mib", [1.5, 3.0])
def test_an_edit_past_the_first_mib_changes_the_cache_key(tmp_path, size_mib):
    """The fingerprint hashed the first MiB and, only above 2 MiB, the last: in a 1-2 MiB file an edit after the
    first MiB that keeps the size and the mtime (cp -p, rsync -a, tar) kept the key, and the stale cache was
    reused."""
    import os

    from hiertcn_fast.data.preprocess import cache_key

    path = tmp_path / "log.csv"
    rows = ["user_id,item_id,timestamp"]
    size = len(rows[0])
    while size < size_mib * (1 << 20):
        k = len(rows)
        rows.append(f"{10000 + k % 997},{20000 + k % 503},{1600000000 + k}")
        size += len(rows[-1]) + 1
    path.write_text("\n".join(rows) + "\n")
    before = cache_key(DelimitedSource(path), PreprocessParams())
    st = path.stat()
    with open(path, "r+b") as f:  # one item id near the end, the size kept
        f.seek(st.st_size - 5000)
        offset = st.st_size - 5000 + f.read(100).index(b",2") + 1
        f.seek(offset)
        f.write(b"9")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(DelimitedSource(path), PreprocessParams()) != before


def test_a_source_name_must_be_a_plain_folder_name_and_a_custom_source_must_say_its_fingerprint(tmp_path):
    """A name '.tmp-log' built the whole cache and then refused to open it as an unfinished build, for ever; 'a/../..'
    wrote outside cache_dir; a source without fingerprint() raised NotImplementedError('')."""
    from hiertcn_fast.data import InteractionSource

    source = ArraySource([1, 1, 2, 2], [5, 6, 5, 6], [0.0, 1.0, 2.0, 3.0])
    for name in (".tmp-log", "a/../../escaped", "", ".hidden"):
        source.name = name
        with pytest.raises(ValueError, match="source.name must be a plain folder name"):
            preprocess(source, tmp_path / "cache", PreprocessParams(**LOOSE))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "escaped").exists()

    class NoFingerprint(InteractionSource):
        name = "custom"

        def iter_chunks(self, chunk_size=1, stats=None):
            return iter(())

    with pytest.raises(NotImplementedError, match="NoFingerprint must implement fingerprint()"):
        preprocess(NoFingerprint(), tmp_path / "cache", PreprocessParams(**LOOSE))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_session_length=0), "max_session_length must be None"),
    (dict(max_session_length=True), "max_session_length must be None"),
    (dict(max_session_length=2.5), "max_session_length must be None"),
    (dict(seed=-1, shuffle=True), "seed must be a non-negative integer"),
    (dict(seed=1.5), "seed must be a non-negative integer"),
    (dict(context_splits=("train",)), "context_splits must be a sequence of splits other than"),
    (dict(context_splits="valid"), "context_splits must be a sequence"),
])
def test_the_history_batcher_checks_its_arguments(tmp_path, kwargs, message):
    """max_session_length=True truncated every session to one event, 0 meant no limit, seed=1.5 became 1: now each
    is refused, as SessionBatcher refuses them."""
    with pytest.raises(ValueError, match=message):
        UserHistoryBatcher(small_cache(tmp_path), "train", **kwargs)


def test_the_rule_report_says_no_truncation_when_sessions_are_not_truncated(tmp_path):
    import json

    from hiertcn_fast.rule_report import evaluate_rules

    params = PreprocessParams(min_item_count=1, min_user_count=2, max_session_length=None)
    cache = preprocess(SyntheticSource(2000, num_items=50, seed=3), tmp_path / "cache", params)
    evaluate_rules(cache, "test", out_dir=tmp_path / "report")
    notes = json.loads((tmp_path / "report" / "results.json").read_text())["notes"]
    assert "no session truncation" in notes[0] and "None" not in notes[0]


def test_a_refused_cache_is_not_kept_mapped_by_its_error(tmp_path):
    """A cache refused as corrupt was memory-mapped before the checks, and the error's traceback kept every map and
    its file descriptor for as long as the error was held (preprocess's 'pass rebuild=True' error too, through its
    context)."""
    import shutil

    cache = small_cache(tmp_path / "good")
    bad = tmp_path / "bad" / cache.path.name
    shutil.copytree(cache.path, bad)
    flip_byte(bad / "item_raw_id.bin", 8)

    def maps_of_bad():
        with open("/proc/self/maps") as maps:
            return sum(str(bad) in line for line in maps)

    errors = []
    for _ in range(5):
        with pytest.raises(CacheCorruptError) as refused:
            SessionCache.open(bad)
        errors.append(refused.value)
    with pytest.raises(CacheCorruptError, match="pass rebuild=True") as refused:
        preprocess(SyntheticSource(3000, num_items=100, seed=1), tmp_path / "bad",
                   PreprocessParams(min_item_count=1, min_user_count=2, num_partitions=2, split="cold"))
    errors.append(refused.value)
    assert refused.value.__context__ is None
    assert maps_of_bad() == 0, "the refused cache is still mapped while its errors are held"


# ---- session 30's audit ---------------------------------------------------------------------------

@pytest.mark.parametrize("partition,error", [(-1, IndexError), (3, IndexError), (1.7, TypeError), ("1", TypeError),
                                             (True, TypeError)])
def test_verify_partitions_takes_partition_indices_only(tmp_path, partition, error):
    """-1 was reported as a checksum mismatch of an intact cache, 3 as numpy's IndexError, 1.7 and '1' were taken
    for partition 1; and a refused index counted towards "every partition verified", so a later first read of the
    arrays skipped the check of a corrupted partition."""
    cache = small_cache(tmp_path, num_partitions=3)
    with pytest.raises(error, match="partition"):
        cache.verify_partitions([partition])
    assert cache._verified_partitions == set()
    cache.verify_partitions([np.int64(1), 2])  # NumPy integers are integers
    flip_byte(cache.path / "item.bin", 4)  # partition 0's first event, not verified yet
    with pytest.raises(CacheCorruptError, match="partition 0"):
        cache.item[:3]


def test_damaged_session_offsets_are_reported_as_such(tmp_path):
    """The events' checksums were checked first, over a range read from the damaged offsets: the error named
    item.bin."""
    cache = small_cache(tmp_path, num_partitions=3)
    first_session = int(cache.user_session_offsets[int(cache.partition_user_offsets[1])])
    offsets = np.memmap(cache.path / "session_offsets.bin", dtype=np.int64, mode="r+")
    offsets[first_session] += 1
    offsets.flush()
    del offsets
    with pytest.raises(CacheCorruptError, match=r"session_offsets\.bin: checksum mismatch in partition 0"):
        SessionCache.open(cache.path).verify()


def test_leaving_a_with_block_by_an_error_waits_and_warns_once():
    """The queue's iterator and the with block around it each waited a second for a slow produce and warned: two
    seconds and two warnings where the docstring promises about one."""
    import threading
    import warnings

    release = threading.Event()

    def slow(seq, slot):
        if seq >= 1:
            release.wait(30)
        slot["x"].fill_(seq)
        return True

    queue = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError):
            with PinnedRingQueue({"x": ((2,), torch.int64)}, slow, num_producers=2, num_slots=2) as queue:
                for _ in queue:
                    raise KeyError("the training step failed")
    release.set()
    still_running = [str(w.message) for w in caught if "still running" in str(w.message)]
    assert len(still_running) == 1, still_running
    queue.close(timeout=None)
    assert queue.alive_producers == 0


def test_produce_cannot_replace_the_slots_tensors():
    """produce got the ring's own dict: rebinding slot['x'] (instead of writing into it) replaced the preallocated
    tensor for good, and the consumer got whatever shape and dtype produce made."""
    def rebinds(seq, slot):
        if seq >= 3:
            return False
        slot["x"] = torch.full((5,), seq, dtype=torch.float32)
        return True

    spec = {"x": ((3,), torch.int64)}
    with PinnedRingQueue(spec, rebinds, num_producers=1, num_slots=2) as queue:
        with pytest.raises(TypeError, match=r"in place .*batch 0 changed \['x'\]"):
            next(iter(queue))
        assert all(slot["x"].shape == (3,) and slot["x"].dtype == torch.int64 for slot in queue._ring.slots)

    def adds(seq, slot):
        slot["extra"] = torch.zeros(1)
        return seq < 2

    with PinnedRingQueue(spec, adds, num_producers=1, num_slots=2) as queue:
        with pytest.raises(TypeError, match=r"changed \['extra'\]"):
            next(iter(queue))

    def writes(seq, slot):
        slot["x"][:] = seq
        return seq < 3

    with PinnedRingQueue(spec, writes, num_producers=2, num_slots=2) as queue:
        assert [tensors["x"].tolist() for _, tensors in queue] == [[0] * 3, [1] * 3, [2] * 3]


@pytest.mark.parametrize("sessions", [[[3, 0, 2]], [[-5, 2]], [[1.9, 2.2]], [[True, 2]], ["ab"], [[4], [[1, 2]]],
                                      [[2 ** 70]], [torch.tensor([2 ** 63 + 3], dtype=torch.uint64)]])
def test_of_sessions_refuses_what_is_not_an_item_id(sessions):
    """The padding id 0, negative ids, floats (truncated) and bools (taken for 0 and 1) made a batch without a word."""
    from hiertcn_fast.data import SessionBatch

    with pytest.raises(ValueError, match=r"session \d must be a list of integer item ids >= 1"):
        SessionBatch.of_sessions(sessions)


def test_of_sessions_takes_integer_ids_of_any_kind():
    from hiertcn_fast.data import SessionBatch

    batch = SessionBatch.of_sessions([np.array([3, 4], dtype=np.uint8), (5,), torch.tensor([7], dtype=torch.uint32)])
    assert batch.items.dtype == torch.int64
    assert batch.items[:, 0].tolist() == [[0, 3, 4], [0, 5, 0], [0, 7, 0]]
    assert batch.lengths[:, 0].tolist() == [2, 1, 1]


def test_a_split_that_is_not_a_name_and_a_state_that_is_not_a_tensor_get_clear_errors(tmp_path):
    """A list as the split was "unhashable type: 'list'"; a NumPy state stored in the lane cache an AttributeError."""
    cache = small_cache(tmp_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'valid', 'test'\), got \['train'\]"):
        SessionBatcher(cache, ["train"])
    batcher = SessionBatcher(cache, "train", lanes=2, state_shape=(1, 2))
    with pytest.raises(TypeError, match="new_state must be a torch.Tensor, got ndarray"):
        batcher.state_cache.store(np.zeros((1, 2, 2)))
    batcher.state_cache.store(torch.ones(1, 2, 2))
    assert torch.equal(batcher.state_cache.state, torch.ones(1, 2, 2))


def test_a_rebuild_never_shows_other_processes_a_missing_or_mixed_cache(tmp_path):
    """A rebuild renamed the healthy cache aside, then fsynced and renamed the new one in: a process opening it in
    between got "found no file (truncated or replaced)", a bare FileNotFoundError or "no manifest.json", on a healthy
    cache. Here one thread rebuilds in a loop while another opens (the folder swap is atomic where the system can, and
    an open that met a swap is retried)."""
    import threading
    import time

    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 50, 3000), rng.integers(0, 30, 3000), rng.integers(0, 10 ** 5, 3000))
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, num_partitions=2)
    first = preprocess(source, tmp_path, params)
    stop, rebuilds, errors = threading.Event(), [], []

    def rebuild():
        try:
            while not stop.is_set():
                preprocess(source, tmp_path, params, rebuild=True)
                rebuilds.append(1)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"rebuild: {type(error).__name__}: {error}")

    thread = threading.Thread(target=rebuild)
    thread.start()
    opened = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and not errors:
            try:
                cache = preprocess(source, tmp_path, params, verify="full")
                assert cache.num_events == first.num_events
                opened += 1
            except Exception as error:  # noqa: BLE001
                errors.append(f"open: {type(error).__name__}: {error}")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(rebuilds) >= 3 and opened >= 3, (len(rebuilds), opened)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp dir left
    assert SessionCache.open(first.path, verify="full").num_events == first.num_events


def test_a_column_named_twice_or_read_for_two_roles_is_refused(tmp_path):
    """The first of two 'timestamp' columns was read without a word, and item='user_id' read the users as items."""
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("user_id,item_id,timestamp,timestamp\n1,2,100,5\n")
    with pytest.raises(ValueError, match=r"names column 'timestamp' \(timestamp\) 2 times; pass its index"):
        list(DelimitedSource(doubled).iter_chunks())
    assert [c.timestamp.tolist() for c in DelimitedSource(doubled, timestamp=3).iter_chunks()] == [[5.0]]
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id,item_id,timestamp\n1,2,100\n")
    with pytest.raises(ValueError, match="user and item are read from one column"):
        list(DelimitedSource(plain, item="user_id").iter_chunks())
    headless = tmp_path / "headless.csv"
    headless.write_text("1,2,100\n")
    with pytest.raises(ValueError, match="user and timestamp are read from one column"):
        list(DelimitedSource(headless, user=0, item=1, timestamp=0, header=False).iter_chunks())


@pytest.mark.parametrize("suffix,delimiter", [(".tsv", "\t"), (".TSV", "\t"), (".Inter", "\t"), (".txt", "\t"),
                                              (".csv", ","), (".log", ",")])
def test_the_default_delimiter_follows_the_suffix_in_any_case(tmp_path, suffix, delimiter):
    """.TSV read as comma-separated (the suffix was compared case-sensitively)."""
    path = tmp_path / f"log{suffix}"
    path.write_text(delimiter.join(["user_id", "item_id", "timestamp"]) + "\n" + delimiter.join(["1", "2", "3"]) + "\n")
    source = DelimitedSource(path)
    assert source.delimiter == delimiter
    assert [c.item.tolist() for c in source.iter_chunks()] == [[2]]


@pytest.mark.parametrize("fractions", [(True, False, False), "100", ("0.8", "0.1", "0.1"), (0.8, 0.1, None)])
def test_split_fractions_must_be_numbers(fractions):
    """A bool was taken for 1.0 or 0.0, and "100" for the three fractions 1, 0, 0."""
    with pytest.raises(ValueError, match="split_fractions must be three finite non-negative numbers"):
        PreprocessParams(split_fractions=fractions)
    assert PreprocessParams(split_fractions=[np.float32(0.5), 0.25, 0.25]).split_fractions == (0.5, 0.25, 0.25)


def test_a_source_name_too_long_for_the_build_folder_is_refused_before_the_build(tmp_path):
    """A name the file system takes for the cache's folder but not for its longer build folder failed as a raw
    "File name too long" once the build had started."""
    source = ArraySource([1, 1, 2], [5, 6, 7], [0.0, 1.0, 2.0], name="n" * 220)
    with pytest.raises(ValueError, match=r"source.name is too long: .* past the 255 a file name may have"):
        preprocess(source, tmp_path, PreprocessParams(**LOOSE))
    assert list(tmp_path.iterdir()) == []
