"""Differential fuzzing of the session-lane mini-batch generator (SessionBatcher, LaneStateCache,
train.user_lane_batches, train._Source's lane sharding) against a slow, literal re-implementation of
what their docstrings promise, on many small random caches written directly (every corner chosen on
purpose: users with one session, sessions of one event and of the longest length, lanes outnumbering
users, truncation, cold and warm split labels, empty partitions, empty splits).

The reference below never reads the batcher's arrays: it works from the Python description the cache
was written from. Only the shuffled user order is taken from ``user_order`` (the permutation itself is
the batcher's choice); its documented properties are checked separately.
"""

import hashlib
import io
import json
import pickle
import types
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from hiertcn_fast.data import BATCH_FIELDS, LaneStateCache, SessionBatch, SessionBatcher, SessionCache
from hiertcn_fast.data.cache import (ARRAY_DTYPES, CACHE_FORMAT, CACHE_VERSION, GLOBAL_ARRAYS, PARTITIONED_ARRAYS,
                                     crc32_of, manifest_digest, partition_slices)
from hiertcn_fast.evaluate import batch_targets
from hiertcn_fast.train import TrainConfig, _Source, user_lane_batches

SPLIT_NAMES = ("train", "valid", "test")


# ---- a cache written straight from a Python description ----------------------------------------------------------

class Spec:
    """users[u] = list of (split_code, [item ids]) in time order; partition_sizes: users per partition."""

    def __init__(self, users, partition_sizes, num_items):
        self.users = users
        self.partition_sizes = partition_sizes
        self.num_items = num_items
        # Global session numbering: users in order, sessions in order.
        self.session_ids = []
        next_id = 0
        for sessions in users:
            self.session_ids.append(list(range(next_id, next_id + len(sessions))))
            next_id += len(sessions)
        self.session_items = [items for sessions in users for _, items in sessions]
        self.partition_of_user = [p for p, size in enumerate(partition_sizes) for _ in range(size)]

    def split_sessions(self, user, code):
        return [(sid, items) for sid, (c, items) in zip(self.session_ids[user], self.users[user]) if c == code]

    def split_users(self, code):
        return [u for u in range(len(self.users)) if self.split_sessions(u, code)]

    @property
    def longest(self):
        return max(len(items) for items in self.session_items)


def write_cache(path, spec):
    path = Path(path)
    path.mkdir(parents=True)
    lengths = [len(items) for items in spec.session_items]
    session_offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    user_session_offsets = np.concatenate(([0], np.cumsum([len(s) for s in spec.users]))).astype(np.int64)
    arrays = {
        "item": np.asarray([i for items in spec.session_items for i in items], dtype=np.int32),
        "timestamp": np.arange(int(session_offsets[-1]), dtype=np.float64),
        "session_offsets": session_offsets,
        "session_split": np.asarray([c for sessions in spec.users for c, _ in sessions], dtype=np.int8),
        "user_session_offsets": user_session_offsets,
        "user_raw_id": np.arange(len(spec.users), dtype=np.int64) + 100,
        "item_raw_id": np.concatenate(([-1], np.arange(spec.num_items) + 1000)).astype(np.int64),
        "partition_user_offsets": np.concatenate(([0], np.cumsum(spec.partition_sizes))).astype(np.int64),
    }
    for name, array in arrays.items():
        array.astype(ARRAY_DTYPES[name]).tofile(path / f"{name}.bin")
    partitions = []
    for p in range(len(spec.partition_sizes)):
        ranges = partition_slices(arrays["partition_user_offsets"], user_session_offsets, session_offsets, p)
        partitions.append({name: crc32_of(arrays[name][ranges[name]]) for name in PARTITIONED_ARRAYS})
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "key": hashlib.sha256(str(path).encode()).hexdigest()[:20], "source_name": "fuzz", "source": {},
        "params": {"split": "cold"}, "stats": {},
        "counts": {"events": int(session_offsets[-1]), "sessions": len(lengths), "users": len(spec.users),
                   "items": spec.num_items, "partitions": len(spec.partition_sizes),
                   "max_session_length": max(lengths), "splits": {}},
        "files": {name: {"dtype": np.dtype(dtype).str, "length": int(arrays[name].shape[0])}
                  for name, dtype in ARRAY_DTYPES.items()},
        "checksums": {"global": {name: crc32_of(arrays[name]) for name in GLOBAL_ARRAYS}, "partitions": partitions},
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return SessionCache.open(path)


def with_first_user(spec, sessions):
    """``spec`` with its first user's sessions replaced (a fresh Spec: session numbering follows)."""
    return Spec([sessions] + spec.users[1:], spec.partition_sizes, spec.num_items)


def random_spec(rng, max_users=9):
    num_users = int(rng.integers(1, max_users + 1))
    max_length = int(rng.integers(1, 7))
    warm = bool(rng.integers(0, 2))
    num_items = 40
    users = []
    for _ in range(num_users):
        count = int(rng.choice([1, 1, 2, 3, 5]))
        if warm:  # a time cut: split codes non-decreasing within a user
            codes = sorted(int(c) for c in rng.choice(3, size=count, p=[0.6, 0.2, 0.2]))
        else:
            codes = [int(rng.choice(3, p=[0.6, 0.2, 0.2]))] * count
        sessions = []
        for code in codes:
            length = int(rng.choice([1, max_length, int(rng.integers(1, max_length + 1))]))
            sessions.append((code, [int(i) for i in rng.integers(1, num_items + 1, size=length)]))
        users.append(sessions)
    # Partitions: contiguous user ranges, some of them empty.
    num_partitions = int(rng.integers(1, 5))
    cuts = np.sort(rng.integers(0, num_users + 1, size=num_partitions - 1))
    sizes = np.diff(np.concatenate(([0], cuts, [num_users]))).tolist()
    return Spec(users, sizes, num_items)


# ---- the reference: the paper's lane queues, the slow obvious way ------------------------------------------------

def reference_epoch(spec, code, lanes, steps, max_length, user_order, width=None):
    """List of batches (dicts of numpy arrays) as the module docstring describes them. ``width``: items'
    last dimension (None: the batch's widest step, as ``batch()`` makes it)."""
    queues = [deque() for _ in range(lanes)]
    pending = deque(user_order)
    previous_last = [None] * lanes
    batches = []
    while True:
        while pending and min(len(q) for q in queues) < steps:
            user = pending.popleft()
            lane = min(range(lanes), key=lambda b: (len(queues[b]), b))
            sessions = spec.split_sessions(user, code)
            assert sessions, "user_order holds a user without a session in the split"
            for k, (sid, items) in enumerate(sessions):
                queues[lane].append((user, sid, items, k == len(sessions) - 1))
        if not any(queues):
            break
        cells = [[queues[b].popleft() if queues[b] else None for b in range(lanes)] for _ in range(steps)]
        length = [[0 if c is None else min(len(c[2]), max_length) for c in row] for row in cells]
        step_widths = [1 + max(length[j]) if any(c is not None for c in cells[j]) else 0 for j in range(steps)]
        time = max(step_widths) if width is None else width
        batch = {
            "items": np.zeros((steps, lanes, time), np.int64),
            "lengths": np.asarray(length, np.int64).reshape(steps, lanes),
            "step_widths": np.asarray(step_widths, np.int64),
            "valid": np.zeros((steps, lanes), bool),
            "keep": np.zeros((steps, lanes), bool),
            "user": np.full((steps, lanes), -1, np.int64),
            "session": np.full((steps, lanes), -1, np.int64),
            "continues": np.asarray([c is not None and not c[3] for c in previous_last], bool),
        }
        for j in range(steps):
            for b in range(lanes):
                c = cells[j][b]
                if c is None:
                    continue
                user, sid, items, last = c
                for t in range(length[j][b]):
                    batch["items"][j, b, 1 + t] = items[t]
                batch["valid"][j, b] = True
                batch["keep"][j, b] = not last
                batch["user"][j, b] = user
                batch["session"][j, b] = sid
        previous_last = cells[-1]
        batches.append(batch)
    return batches


def assert_batch_equal(got, want, where):
    tensors = got.tensors() if isinstance(got, SessionBatch) else got
    assert set(tensors) == set(BATCH_FIELDS)
    for name, value in want.items():
        actual = tensors[name]
        assert actual.dtype == BATCH_FIELDS[name], f"{where}: {name} dtype {actual.dtype}"
        np.testing.assert_array_equal(actual.cpu().numpy(), value, err_msg=f"{where}: {name}")


def checked_order(spec, batcher, code, epoch):
    """Dense users in entry order for ``epoch``: in ascending order without shuffle; with it, the
    batcher's permutation after checking what its docstring promises of it."""
    users = spec.split_users(code)
    if not batcher.shuffle:
        order = batcher.split_users[batcher.user_order(epoch)].tolist()
        assert order == users
        return users
    positions = batcher.user_order(epoch)
    assert sorted(positions.tolist()) == list(range(len(users)))
    order = batcher.split_users[positions].tolist()
    # Grouped by partition: each partition's users form one run.
    partitions = [spec.partition_of_user[u] for u in order]
    runs = [p for k, p in enumerate(partitions) if k == 0 or partitions[k - 1] != p]
    assert len(runs) == len(set(runs)), f"users not grouped by partition: {partitions}"
    return order


def make_case(rng, tmp_path, index):
    spec = random_spec(rng, max_users=int(rng.choice([3, 9, 24])))
    cache = write_cache(tmp_path / f"cache{index}", spec)
    code = int(rng.integers(0, 3))
    lanes = int(rng.choice([1, 2, 3, 5, 8, len(spec.users) + 2]))
    steps = int(rng.choice([1, 2, 3, 4, 7]))
    max_length = None if rng.random() < 0.4 else int(rng.integers(1, spec.longest + 2))
    shuffle = bool(rng.integers(0, 2))
    seed = int(rng.integers(0, 1000))
    return spec, cache, code, lanes, steps, max_length, shuffle, seed


FUZZ_SEEDS = range(24)


# ---- the schedule and the batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS)
def test_batches_match_the_lane_queue_reference(tmp_path, fuzz_seed):
    rng = np.random.default_rng(fuzz_seed)
    for case in range(4):
        spec, cache, code, lanes, steps, max_length, shuffle, seed = make_case(rng, tmp_path, case)
        batcher = SessionBatcher(cache, SPLIT_NAMES[code], lanes=lanes, sessions_per_batch=steps,
                                 max_session_length=max_length, shuffle=shuffle, seed=seed)
        effective = spec.longest if max_length is None else max_length
        where = f"case {fuzz_seed}.{case} split={SPLIT_NAMES[code]} lanes={lanes} S={steps} L={max_length}"
        assert batcher.max_session_length == effective
        # Counts the docstring names: every event once, except those beyond max_session_length.
        split_lengths = [len(items) for u in spec.split_users(code) for _, items in spec.split_sessions(u, code)]
        assert batcher.num_sessions == len(split_lengths), where
        assert batcher.num_events == sum(min(n, effective) for n in split_lengths), where
        assert batcher.truncated_events == sum(max(n - effective, 0) for n in split_lengths), where
        spec_shapes = batcher.batch_spec()
        assert spec_shapes["items"] == ((steps, lanes, 1 + effective), torch.int64)
        slots = {name: torch.full(shape, 7, dtype=dtype) if dtype == torch.int64 else torch.ones(shape, dtype=dtype)
                 for name, (shape, dtype) in spec_shapes.items()}
        for epoch in range(2):
            order = checked_order(spec, batcher, code, epoch)
            expected = reference_epoch(spec, code, lanes, steps, effective, order)
            padded = reference_epoch(spec, code, lanes, steps, effective, order, width=1 + effective)
            assert batcher.num_batches(epoch) == len(expected), where
            for index, want in enumerate(expected):
                got = batcher.batch(index, epoch)
                assert (got.epoch, got.index) == (epoch, index)
                assert_batch_equal(got, want, f"{where} epoch {epoch} batch {index}")
                assert batcher.fill(index, slots, epoch) is True
                assert_batch_equal(slots, padded[index], f"{where} fill epoch {epoch} batch {index}")
            # No batch past the end: fill returns False and writes nothing.
            before = {name: t.clone() for name, t in slots.items()}
            assert batcher.fill(len(expected), slots, epoch) is False
            assert all(torch.equal(before[name], slots[name]) for name in slots)
            with pytest.raises(IndexError):
                batcher.batch(len(expected), epoch)


@pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS)
def test_iteration_delivers_every_event_once_per_epoch_across_epochs(tmp_path, fuzz_seed):
    rng = np.random.default_rng(1000 + fuzz_seed)
    spec, cache, code, lanes, steps, max_length, shuffle, seed = make_case(rng, tmp_path, 0)
    batcher = SessionBatcher(cache, SPLIT_NAMES[code], lanes=lanes, sessions_per_batch=steps,
                             max_session_length=max_length, shuffle=shuffle, seed=seed)
    effective = spec.longest if max_length is None else max_length
    for epoch in range(3):
        assert (batcher.epoch, batcher.next_index) == (epoch, 0)
        expected = reference_epoch(spec, code, lanes, steps, effective, checked_order(spec, batcher, code, epoch))
        got = list(batcher)
        assert [(b.epoch, b.index) for b in got] == [(epoch, i) for i in range(len(expected))]
        for index, (batch, want) in enumerate(zip(got, expected)):
            assert_batch_equal(batch, want, f"epoch {epoch} batch {index}")
        # Every event of the split once, each user's in time order, a user in one lane.
        delivered = {}
        for batch in got:
            # The prediction events: position t of a valid session counts iff t < its length (row-major order).
            targets = batch_targets(batch)
            want_targets, want_users, want_first = [], [], []
            for j in range(steps):
                for b in range(lanes):
                    if batch.valid[j, b]:
                        sid = int(batch.session[j, b])
                        cut = spec.session_items[sid][:effective]
                        want_targets += cut
                        want_users += [int(batch.user[j, b])] * len(cut)
                        want_first += [True] + [False] * (len(cut) - 1)
            assert targets["targets"].tolist() == want_targets
            assert targets["users"].tolist() == want_users
            assert targets["first_in_session"].tolist() == want_first
            for j, b in zip(*np.nonzero(batch.valid.numpy())):
                delivered.setdefault(int(batch.user[j, b]), []).append(
                    (int(batch.session[j, b]), b, batch.items[j, b, 1:1 + batch.lengths[j, b]].tolist()))
        assert sorted(delivered) == spec.split_users(code)
        for user, seen in delivered.items():
            sessions = spec.split_sessions(user, code)
            assert [s for s, _, _ in seen] == [sid for sid, _ in sessions]
            assert [items for _, _, items in seen] == [items[:effective] for _, items in sessions]
            assert len({lane for _, lane, _ in seen}) == 1
    assert batcher.epoch == 3


def test_queued_iteration_matches_the_reference(tmp_path):
    rng = np.random.default_rng(77)
    for case in range(5):
        spec, cache, code, lanes, steps, max_length, shuffle, seed = make_case(rng, tmp_path, case)
        batcher = SessionBatcher(cache, SPLIT_NAMES[code], lanes=lanes, sessions_per_batch=steps,
                                 max_session_length=max_length, shuffle=shuffle, seed=seed)
        effective = spec.longest if max_length is None else max_length
        for epoch in range(2):
            order = checked_order(spec, batcher, code, epoch)
            expected = reference_epoch(spec, code, lanes, steps, effective, order, width=1 + effective)
            got = list(batcher.iter_queued(num_producers=2, num_slots=2))
            assert [(b.epoch, b.index) for b in got] == [(epoch, i) for i in range(len(expected))]
            for index, (batch, want) in enumerate(zip(got, expected)):
                assert_batch_equal(batch, want, f"case {case} queued epoch {epoch} batch {index}")
        assert batcher.epoch == 2


def test_queued_iteration_resumes_mid_epoch_and_mixes_with_plain_iteration(tmp_path):
    rng = np.random.default_rng(78)
    spec = random_spec(rng, max_users=24)
    spec = with_first_user(spec, [(0, [1, 2]), (0, [3]), (0, [4, 5]), (0, [6])])
    cache = write_cache(tmp_path / "c", spec)

    def make():
        return SessionBatcher(cache, "train", lanes=2, sessions_per_batch=1, shuffle=True, seed=2)

    batcher = make()
    expected = [reference_epoch(spec, 0, 2, 1, spec.longest, checked_order(spec, batcher, 0, epoch),
                                width=1 + spec.longest) for epoch in range(2)]
    flat = [(e, i, want) for e in range(2) for i, want in enumerate(expected[e])]
    assert len(flat) >= 4
    got = []
    stream = iter(batcher)
    got.append(next(stream))
    stream.close()
    queued = batcher.iter_queued(num_producers=2, num_slots=2)
    got.append(next(queued))
    queued.close()
    resumed = make()
    resumed.load_state_dict(batcher.state_dict())
    while len(got) < len(flat):
        got += list(resumed.iter_queued(num_producers=1, num_slots=3))
    assert [(b.epoch, b.index) for b in got] == [(e, i) for e, i, _ in flat]
    for batch, (e, i, want) in zip(got, flat):
        width = int(batch.items.shape[2])
        assert_batch_equal(batch, dict(want, items=want["items"][..., :width]), f"epoch {e} batch {i}")


def test_shuffle_is_a_function_of_seed_and_epoch(tmp_path):
    users = [[(0, [1 + (u % 30)])] for u in range(60)]
    spec = Spec(users, [10, 0, 25, 25], 40)
    cache = write_cache(tmp_path / "c", spec)
    a = SessionBatcher(cache, "train", lanes=3, sessions_per_batch=2, shuffle=True, seed=5)
    b = SessionBatcher(cache, "train", lanes=7, sessions_per_batch=1, shuffle=True, seed=5)  # other lanes, same seed
    c = SessionBatcher(cache, "train", lanes=3, sessions_per_batch=2, shuffle=True, seed=6)
    orders = [checked_order(spec, a, 0, epoch) for epoch in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    for epoch in (2, 0, 1):  # in any order of asking
        assert checked_order(spec, b, 0, epoch) == orders[epoch]
        assert pickle.loads(pickle.dumps(a)).user_order(epoch).tolist() == a.user_order(epoch).tolist()
    assert checked_order(spec, c, 0, 0) != orders[0]
    assert SessionBatcher(cache, "train", seed=np.int64(5), shuffle=True).user_order(1).tolist() == \
        a.user_order(1).tolist()


# ---- the lane state: reset at user boundaries, carried across batches, saved and restored -------------------------

def session_signal(batch, step):
    """(lanes,) float64: a per-session value a fake model adds to the state (integer-valued: exact sums)."""
    return (batch.items[step].double().sum(1) + batch.lengths[step].double() * 1000.0) * batch.valid[step].double()


def run_fake_model(batcher, batches, log):
    """State after each step += the session's signal, then *= keep: records (user, session, state) per valid cell."""
    for batch in batches:
        state = batcher.begin_state(batch)
        for step in range(batch.items.shape[0]):
            state = state + session_signal(batch, step).view(1, -1, 1)
            for lane in np.flatnonzero(batch.valid[step].numpy()):
                log.append((batch.epoch, int(batch.user[step, lane]), int(batch.session[step, lane]),
                            state[:, lane].clone()))
            state = state * batch.keep[step].view(1, -1, 1).double()
        batcher.end_state(batch, state)


def expected_states(spec, code, effective, layers, hidden):
    """user -> the state after each of its sessions: the sum over that user's sessions so far only."""
    want = {}
    for user in spec.split_users(code):
        total = 0.0
        for sid, items in spec.split_sessions(user, code):
            cut = items[:effective]
            total += sum(cut) + 1000.0 * len(cut)
            want[(user, sid)] = torch.full((layers, hidden), total, dtype=torch.float64)
    return want


@pytest.mark.parametrize("fuzz_seed", range(10))
def test_state_resets_exactly_at_user_boundaries_and_resume_is_exact(tmp_path, fuzz_seed):
    rng = np.random.default_rng(2000 + fuzz_seed)
    spec, cache, code, lanes, steps, max_length, shuffle, seed = make_case(rng, tmp_path, 0)
    effective = spec.longest if max_length is None else max_length

    def make():
        return SessionBatcher(cache, SPLIT_NAMES[code], lanes=lanes, sessions_per_batch=steps,
                              max_session_length=max_length, shuffle=shuffle, seed=seed, state_shape=(2, 3),
                              state_dtype=torch.float64)

    whole = make()
    log = []
    for _ in range(2):
        run_fake_model(whole, whole, log)
    want = expected_states(spec, code, effective, 2, 3)
    assert len(log) == 2 * len(want)
    for epoch, user, sid, state in log:
        assert torch.equal(state, want[(user, sid)]), f"epoch {epoch} user {user} session {sid}: {state} vs " \
                                                      f"{want[(user, sid)][0, 0]}"

    # Stop after k batches (mid epoch, at an epoch's end, in the next one), save, restore elsewhere, go on.
    per_epoch = whole.num_batches(0)
    total = per_epoch + whole.num_batches(1)
    for stop in sorted({0, 1, per_epoch // 2, per_epoch, per_epoch + 1, total}):
        if stop > total:
            continue
        first = make()
        head = []
        remaining = stop
        while remaining:
            for batch in first:
                run_fake_model(first, [batch], head)
                remaining -= 1
                if not remaining:
                    break
        saved = first.state_dict()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        for resumed in (make(), pickle.loads(pickle.dumps(first))):
            buffer.seek(0)
            resumed.load_state_dict(torch.load(buffer))
            assert resumed.state_dict()["epoch"] == saved["epoch"]
            assert resumed.state_dict()["next_index"] == saved["next_index"]
            assert torch.equal(resumed.state_dict()["state"], saved["state"])
            tail = []
            while len(head) + len(tail) < len(log):
                epoch_before = resumed.epoch
                run_fake_model(resumed, resumed, tail)
                assert resumed.epoch > epoch_before or resumed.num_batches(epoch_before) == 0
            combined = head + tail
            assert [(e, u, s) for e, u, s, _ in combined] == [(e, u, s) for e, u, s, _ in log], f"stop {stop}"
            for (_, _, _, a), (_, _, _, b) in zip(combined, log):
                assert torch.equal(a, b), f"stop {stop}"


def test_lane_state_cache_reset_store_zero():
    cache = LaneStateCache(2, 4, 3, dtype=torch.float64)
    assert cache.state.shape == (2, 4, 3) and not cache.state.any()
    cache.store(torch.arange(24, dtype=torch.float32).view(2, 4, 3).requires_grad_())
    assert not cache.state.requires_grad and cache.state.dtype == torch.float64
    before = cache.state.clone()
    state = cache.reset_lanes(torch.tensor([True, False, True, False]))
    assert state is cache.state
    assert torch.equal(state[:, [0, 2]], before[:, [0, 2]]) and not state[:, [1, 3]].any()
    cache.zero_()
    assert not cache.state.any()
    with pytest.raises(ValueError, match="new_state"):
        cache.store(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="continues"):
        cache.reset_lanes(torch.ones(2, 4, dtype=torch.bool))
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError):
            LaneStateCache(bad, 4, 3)
    with pytest.raises(ValueError, match="dtype"):
        LaneStateCache(1, 4, 3, dtype=torch.int32)


def test_begin_state_returns_a_copy_and_zeroes_new_users_in_the_cache(tmp_path):
    spec = Spec([[(0, [1, 2]), (0, [3])], [(0, [4])], [(0, [5]), (0, [6]), (0, [7])]], [3], 10)
    cache = write_cache(tmp_path / "c", spec)
    batcher = SessionBatcher(cache, "train", lanes=2, sessions_per_batch=1, state_shape=(1, 2),
                             state_dtype=torch.float64)
    batches = list(batcher)
    assert [b.continues.tolist() for b in batches] == [[False, False], [True, False], [False, True], [False, True]]
    batcher.state_cache.state.fill_(3.0)
    state = batcher.begin_state(batches[1])
    assert state.data_ptr() != batcher.state_cache.state.data_ptr()
    assert state[0].tolist() == [[3.0, 3.0], [0.0, 0.0]] == batcher.state_cache.state[0].tolist()


# ---- positions, state dicts, pickling ----------------------------------------------------------------------------

def test_state_dict_round_trips_and_foreign_dicts_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    spec = random_spec(rng, max_users=9)
    spec = with_first_user(spec, [(0, [1, 2]), (0, [3])])  # at least one training user
    cache = write_cache(tmp_path / "c", spec)
    batcher = SessionBatcher(cache, "train", lanes=2, sessions_per_batch=1, shuffle=True, seed=3, state_shape=(1, 2))
    iterator = iter(batcher)
    first = next(iterator)
    batcher.end_state(first, torch.ones(1, 2, 2))
    saved = batcher.state_dict()
    assert (saved["epoch"], saved["next_index"]) == (0, 1)
    iterator.close()
    other = SessionBatcher(cache, "train", lanes=2, sessions_per_batch=1, shuffle=True, seed=3, state_shape=(1, 2))
    other.load_state_dict(saved)
    assert other.state_dict().keys() == saved.keys()
    for key in saved:
        value = other.state_dict()[key]
        assert torch.equal(value, saved[key]) if isinstance(value, torch.Tensor) else value == saved[key]
    assert next(iter(other)).index == 1
    # numpy integers for the position are plain ints once loaded
    other.load_state_dict(dict(saved, epoch=np.int64(2), next_index=np.int32(0)))
    assert type(other.epoch) is int and type(other.next_index) is int and other.epoch == 2
    for changed in ({"seed": 4}, {"shuffle": False}, {"split": "valid"}, {"sessions_per_batch": 2},
                    {"max_session_length": batcher.max_session_length + 1}, {"cache_key": "x"}):
        with pytest.raises(ValueError, match="different batcher"):
            other.load_state_dict(dict(saved, **changed))


def test_pickled_batcher_resumes_where_it_was(tmp_path):
    rng = np.random.default_rng(11)
    spec = random_spec(rng, max_users=9)
    spec = with_first_user(spec, [(0, [1]), (0, [2]), (0, [3]), (0, [4])])
    cache = write_cache(tmp_path / "c", spec)
    batcher = SessionBatcher(cache, "train", lanes=1, sessions_per_batch=1, shuffle=True, seed=8,
                             state_shape=(1, 1))
    it = iter(batcher)
    next(it)
    next(it)
    it.close()
    blob = pickle.dumps(batcher)
    assert len(blob) < 20_000  # no data carried
    clone = pickle.loads(blob)
    assert (clone.epoch, clone.next_index) == (batcher.epoch, batcher.next_index) == (0, 2)
    rest, rest_clone = list(batcher), list(clone)
    assert [b.index for b in rest] == [b.index for b in rest_clone]
    for a, b in zip(rest, rest_clone):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))


def test_empty_split_has_no_batches_and_each_pass_advances_one_epoch(tmp_path):
    spec = Spec([[(0, [1, 2])], [(2, [3])]], [1, 1], 5)  # no validation sessions
    cache = write_cache(tmp_path / "c", spec)
    batcher = SessionBatcher(cache, "valid", lanes=3, sessions_per_batch=2, shuffle=True, state_shape=(1, 2))
    assert batcher.num_batches() == 0 and batcher.num_sessions == batcher.num_events == 0
    assert batcher.split_users.shape == (0,)
    spec_items = batcher.batch_spec()["items"][0]
    assert spec_items == (2, 3, 1 + 2)  # the cache's longest session
    assert list(batcher) == [] and batcher.epoch == 1
    assert list(batcher.iter_queued(num_producers=1, num_slots=2)) == [] and batcher.epoch == 2
    with pytest.raises(IndexError):
        batcher.batch(0)
    saved = batcher.state_dict()
    fresh = SessionBatcher(cache, "valid", lanes=3, sessions_per_batch=2, shuffle=True, state_shape=(1, 2))
    fresh.load_state_dict(saved)
    assert fresh.epoch == 2


def test_non_contiguous_split_is_refused(tmp_path):
    spec = Spec([[(0, [1]), (1, [2]), (0, [3])]], [1], 5)
    cache = write_cache(tmp_path / "c", spec)
    with pytest.raises(ValueError, match="not contiguous"):
        SessionBatcher(cache, "train")
    SessionBatcher(cache, "valid")  # the valid split alone is contiguous


# ---- one user per lane: train.user_lane_batches ------------------------------------------------------------------

def reference_user_lanes(spec, codes, users, per_batch, max_length):
    out = []
    for start in range(0, len(users), per_batch):
        chosen = users[start:start + per_batch]
        per_user = [[(sid, items) for sid, (c, items) in zip(spec.session_ids[u], spec.users[u]) if c in codes]
                    for u in chosen]
        steps = max(1, max(len(s) for s in per_user))
        lanes = len(chosen)
        lengths = np.zeros((steps, lanes), np.int64)
        session = np.full((steps, lanes), -1, np.int64)
        user = np.full((steps, lanes), -1, np.int64)
        for b, sessions in enumerate(per_user):
            for j, (sid, items) in enumerate(sessions):
                lengths[j, b] = min(len(items), max_length)
                session[j, b], user[j, b] = sid, chosen[b]
        valid = session >= 0
        items = np.zeros((steps, lanes, 1 + lengths.max()), np.int64)
        for b, sessions in enumerate(per_user):
            for j, (sid, its) in enumerate(sessions):
                items[j, b, 1:1 + lengths[j, b]] = its[:lengths[j, b]]
        widths = np.where(valid.any(1), lengths.max(1) + 1, 0)
        out.append((chosen, {"items": items, "lengths": lengths, "step_widths": widths, "valid": valid,
                             "keep": np.ones((steps, lanes), bool), "user": user, "session": session,
                             "continues": np.zeros(lanes, bool)}))
    return out


@pytest.mark.parametrize("fuzz_seed", range(12))
def test_user_lane_batches_match_the_reference(tmp_path, fuzz_seed):
    rng = np.random.default_rng(3000 + fuzz_seed)
    spec = random_spec(rng)
    cache = write_cache(tmp_path / "c", spec)
    for codes in ((0,), (1,), (2,), (0, 1), (0, 1, 2)):
        users = rng.permutation(len(spec.users))[:int(rng.integers(1, len(spec.users) + 1))].tolist()
        per_batch = int(rng.integers(1, len(users) + 2))
        max_length = int(rng.integers(1, spec.longest + 2))
        got = list(user_lane_batches(cache, tuple(SPLIT_NAMES[c] for c in codes), np.asarray(users, np.int64),
                                     per_batch, max_length))
        want = reference_user_lanes(spec, codes, users, per_batch, max_length)
        assert len(got) == len(want)
        for (chosen, batch), (want_chosen, fields) in zip(got, want):
            assert chosen.tolist() == want_chosen
            assert_batch_equal(batch, fields, f"codes {codes} users {users} per_batch {per_batch}")


def test_user_lane_batches_user_field_is_int64_for_any_integer_user_array(tmp_path):
    # The user field followed the dtype of ``users`` (np.where(valid, chosen, -1)): int32 in, int32 out, while
    # BATCH_FIELDS says int64; with an unsigned array the -1 marker of a step without a session wrapped (uint8: 255).
    spec = Spec([[(0, [1, 2])], [(0, [3]), (0, [4])], [(1, [5])]], [3], 5)
    cache = write_cache(tmp_path / "c", spec)
    (_, batch), = user_lane_batches(cache, ("train",), np.array([0, 2], dtype=np.uint8), 2, 5)
    assert batch.user.tolist() == [[0, -1]], batch.user.tolist()  # observed: [[0, 255]] (torch.uint8)
    (_, batch), = user_lane_batches(cache, ("train",), np.array([0, 1], dtype=np.int32), 2, 5)
    assert batch.user.dtype == BATCH_FIELDS["user"], batch.user.dtype  # observed: torch.int32


def test_user_lane_batches_refuses_users_outside_the_cache(tmp_path):
    # A negative user index was not refused: -1 read user_session_offsets[-1] .. [0], an empty range, so the user
    # silently got an empty lane; one past the end was a bare numpy IndexError, floats numpy's indexing error.
    spec = Spec([[(0, [1, 2])], [(0, [3]), (0, [4])]], [2], 5)
    cache = write_cache(tmp_path / "c", spec)
    for bad in ([-1], [0, 2]):
        with pytest.raises(ValueError, match=r"users must be user indices in 0\.\.1 of this cache"):
            list(user_lane_batches(cache, ("train",), np.array(bad), 2, 5))
    for bad in (np.array([0.0]), np.array([[0, 1]]), np.array([True])):
        with pytest.raises(TypeError, match="users must be a 1-D array of user indices"):
            list(user_lane_batches(cache, ("train",), bad, 2, 5))


# ---- train._Source: lanes sharded across ranks ------------------------------------------------------------------

def test_source_shards_lanes_across_ranks(tmp_path):
    rng = np.random.default_rng(9)
    spec = random_spec(rng, max_users=9)
    spec = with_first_user(spec, [(0, [1, 2]), (0, [3]), (0, [4, 5, 6])])
    cache = write_cache(tmp_path / "c", spec)
    model = types.SimpleNamespace(input_kind="sessions", state_shape=(1, 2), max_session_length=3)
    config = TrainConfig(lanes=4, sessions_per_batch=2, num_producers=0)
    whole = _Source(model, cache, "train", config, "cpu", shuffle=True)
    full = [(batch, events) for batch, events in whole.batches()]
    assert whole.epoch == 1
    per_rank = []
    for rank in range(2):
        source = _Source(model, cache, "train", config, "cpu", shuffle=True, rank=rank, world_size=2)
        assert source.state_cache.state.shape == (1, 2, 2)
        per_rank.append(list(source.batches()))
    assert len(per_rank[0]) == len(per_rank[1]) == len(full)
    for (batch, events), (a, ea), (b, eb) in zip(full, per_rank[0], per_rank[1]):
        assert events == ea == eb == int(batch.lengths.sum())
        for name in ("items", "lengths", "valid", "keep", "user", "session", "continues"):
            dim = 0 if name == "continues" else 1
            assert torch.equal(torch.cat([getattr(a, name), getattr(b, name)], dim), getattr(batch, name)), name
    with pytest.raises(ValueError, match="multiple of the world size"):
        _Source(model, cache, "train", TrainConfig(lanes=3, num_producers=0), "cpu", shuffle=False, rank=0,
                world_size=2)


# ---- bad input -----------------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    spec = Spec([[(0, [1, 2]), (0, [3])], [(0, [4])], [(0, [5]), (0, [6, 7, 8])], [(1, [9])]], [2, 2], 10)
    return write_cache(tmp_path / "small", spec)


def test_constructor_refuses_bad_arguments_with_named_errors(small):
    for name, bad in (("lanes", 0), ("lanes", -2), ("lanes", True), ("lanes", 2.0), ("lanes", "4"),
                      ("sessions_per_batch", 0), ("sessions_per_batch", np.bool_(True)),
                      ("max_session_length", 0), ("max_session_length", False), ("max_session_length", 1.0),
                      ("seed", -1), ("seed", True), ("seed", 1.5)):
        with pytest.raises(ValueError, match=name):
            SessionBatcher(small, "train", **{name: bad})
    with pytest.raises(ValueError, match="split"):
        SessionBatcher(small, "validation")
    with pytest.raises(TypeError, match="cache"):
        SessionBatcher(str(small.path))
    with pytest.raises(ValueError, match="state_shape"):
        SessionBatcher(small, "train", state_shape=(1, 2, 3))
    with pytest.raises(ValueError, match="hidden"):
        SessionBatcher(small, "train", state_shape=(1, 0))
    # numpy integers are taken and stored as plain ints
    b = SessionBatcher(small, "train", lanes=np.int8(2), sessions_per_batch=np.uint16(2),
                       max_session_length=np.int64(2), seed=np.int32(4))
    assert all(type(v) is int for v in (b.lanes, b.sessions_per_batch, b.max_session_length, b.seed))


def test_fill_refuses_wrong_slots_before_writing(small):
    batcher = SessionBatcher(small, "train", lanes=2, sessions_per_batch=2)
    good = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in batcher.batch_spec().items()}
    for name in good:
        for bad in (None, good[name].to(torch.int32 if good[name].dtype != torch.int32 else torch.int64),
                    torch.zeros((9,) + tuple(good[name].shape), dtype=good[name].dtype), good[name].numpy()):
            out = dict(good)
            if bad is None:
                del out[name]
            else:
                out[name] = bad
            snapshot = {k: v.clone() for k, v in good.items()}
            with pytest.raises(ValueError, match=repr(name)):
                batcher.fill(0, out)
            assert all(torch.equal(snapshot[k], good[k]) for k in good)
    with pytest.raises(ValueError):
        batcher.fill(0, [])


def test_batch_index_and_epoch_are_plain_ints(small):
    # The module docstring says "``epoch``, ``index``: Python ints", but batch() stored whatever integer it was
    # given: a numpy index leaked into SessionBatch.index as np.int64, and through end_state into state_dict(),
    # which torch.load (weights_only=True, the default since torch 2.6) then refused to read.
    batcher = SessionBatcher(small, "train", lanes=2, sessions_per_batch=1, state_shape=(1, 2))
    batch = batcher.batch(np.int64(1), epoch=np.int64(0))
    batcher.end_state(batch, torch.zeros(1, 2, 2))
    buffer = io.BytesIO()
    torch.save(batcher.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # observed: UnpicklingError (numpy.int64 not an allowed global)
    assert loaded["next_index"] == 2
    assert type(batch.index) is int and type(batch.epoch) is int, (type(batch.index), type(batch.epoch))


def test_batch_refuses_a_bool_index(small):
    # Every integer argument of the package refuses bools (_ints.is_int), but batch(True) returned batch 1 (with
    # index=True) and fill(True, ...) wrote batch 1.
    batcher = SessionBatcher(small, "train", lanes=2, sessions_per_batch=1)
    assert batcher.num_batches() > 1
    slots = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in batcher.batch_spec().items()}
    with pytest.raises(TypeError, match="index must be an integer, got True"):
        batcher.batch(True)
    with pytest.raises(TypeError, match="index must be an integer, got True"):
        batcher.fill(True, slots)
    with pytest.raises(IndexError, match="index -1 out of range"):
        batcher.fill(-1, slots)
    assert not any(t.any() for t in slots.values())


def test_batch_refuses_an_epoch_that_is_not_a_non_negative_integer(small):
    # Without shuffle, epoch was never checked: batch(0, epoch="x") and num_batches(-3) answered as if for a real
    # epoch (SessionBatch.epoch == "x"); with shuffle, a negative epoch failed inside numpy's SeedSequence.
    for shuffle in (False, True):
        batcher = SessionBatcher(small, "train", lanes=2, sessions_per_batch=1, shuffle=shuffle)
        for bad in ("x", -3, 1.5, True):
            for call in (lambda: batcher.batch(0, epoch=bad), lambda: batcher.num_batches(bad),
                         lambda: batcher.user_order(bad)):
                with pytest.raises((TypeError, ValueError), match=f"epoch must be a non-negative integer, got "
                                                                  f"{bad!r}"):
                    call()


def test_reset_lanes_refuses_non_boolean_masks():
    # reset_lanes is documented as "Zero the lanes where continues is False", but a non-bool tensor was taken as a
    # multiplier: an int mask of 2 doubled the state, a float 0.5 halved it.
    cache = LaneStateCache(1, 2, 1, dtype=torch.float64)
    cache.store(torch.ones(1, 2, 1, dtype=torch.float64))
    for bad in (torch.tensor([2, 1]), torch.tensor([0.5, 1.0]), [True, False], np.array([True, False])):
        with pytest.raises(TypeError, match="continues must be a bool tensor"):
            cache.reset_lanes(bad)
    assert torch.equal(cache.state, torch.ones(1, 2, 1, dtype=torch.float64))
    assert cache.reset_lanes(torch.tensor([False, True])).flatten().tolist() == [0.0, 1.0]


def test_fill_refuses_a_slot_whose_elements_overlap(small):
    """An expanded (stride-0) slot would take several values in one memory cell without a word."""
    batcher = SessionBatcher(small, "train", lanes=2, sessions_per_batch=2)
    slots = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in batcher.batch_spec().items()}
    slots["lengths"] = torch.zeros(1, 2, dtype=torch.int64).expand(2, 2)
    with pytest.raises(ValueError, match="out\\['lengths'\\] must be a contiguous CPU torch.int64 tensor .* not "
                                         "contiguous"):
        batcher.fill(0, slots)


def test_shuffle_must_be_a_bool(small):
    """bool("no") is True: a string (or a number) for a switch is refused, by both batchers."""
    from hiertcn_fast.models.history_tcn import UserHistoryBatcher
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match=f"shuffle must be a bool, got {bad!r}"):
            SessionBatcher(small, "train", lanes=2, sessions_per_batch=1, shuffle=bad)
        with pytest.raises(TypeError, match=f"shuffle must be a bool, got {bad!r}"):
            UserHistoryBatcher(small, "train", users_per_batch=2, shuffle=bad)
    with pytest.raises(TypeError, match="by_length must be a bool, got 'yes'"):
        UserHistoryBatcher(small, "train", users_per_batch=2, by_length="yes")
    assert SessionBatcher(small, "train", lanes=2, sessions_per_batch=1, shuffle=np.bool_(True)).shuffle is True


def test_history_batcher_checks_its_position_and_builds_before_it_counts(small):
    """The user-history batcher's load_state_dict took any position (past the end, negative: a run then skipped
    the rest of its epoch or ran an epoch -1); its batch() took bools and numpy numbers as the lane batcher did."""
    from hiertcn_fast.models.history_tcn import UserHistoryBatcher
    batcher = UserHistoryBatcher(small, "train", users_per_batch=1)
    saved = batcher.state_dict()
    count = batcher.num_batches()
    for name, bad, message in (("next_index", count + 1, "is past the end of epoch 0"),
                               ("epoch", -1, "epoch must be a non-negative integer"),
                               ("next_index", 1.0, "next_index must be a non-negative integer"),
                               ("state", torch.zeros(1), "has no state cache")):
        with pytest.raises(ValueError, match=message):
            batcher.load_state_dict({**saved, name: bad})
        assert (batcher.epoch, batcher.next_index) == (0, 0)
    with pytest.raises(ValueError, match="missing"):
        batcher.load_state_dict({k: v for k, v in saved.items() if k != "epoch"})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        batcher.load_state_dict([saved])
    batcher.load_state_dict({**saved, "next_index": np.int64(count)})
    assert type(batcher.next_index) is int and batcher.next_index == count
    batch = batcher.batch(np.int64(0), epoch=np.int64(2))
    assert type(batch.index) is int and type(batch.epoch) is int
    with pytest.raises(TypeError, match="index must be an integer, got True"):
        batcher.batch(True)
    # A batch that fails to build is not counted as handed out.
    batcher.load_state_dict(saved)

    def broken(index, epoch=None):
        raise RuntimeError("cannot build")

    batcher.batch = broken
    with pytest.raises(RuntimeError, match="cannot build"):
        next(iter(batcher))
    assert (batcher.epoch, batcher.next_index) == (0, 0)
