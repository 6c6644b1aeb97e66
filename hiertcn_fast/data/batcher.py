"""The lane mini-batch generator of HierTCN (``SessionBatcher``) and its high-level state cache.

The paper's generator keeps ``lanes`` queues of sessions. Users, in epoch order, are appended
whole to the lane that currently holds the fewest sessions (ties: lowest lane index) until every
lane holds at least ``sessions_per_batch`` (S) sessions; a mini-batch then pops S sessions from
every lane. When users run out, lanes are drained; a lane with no session left at a step is
marked invalid there.

While users remain every lane pops exactly S sessions per batch, so the pending counts of all
lanes differ from their cumulative counts by the same amount and "fewest pending" is "fewest
assigned so far". The epoch's whole schedule is therefore a greedy assignment of users to lanes by
cumulative session count, computed once per epoch (O(users log lanes), no data touched): batch k,
step j, lane b is lane b's session number k*S + j. That gives random access to any batch (what
the DataLoader baseline and the multi-producer queue need) and makes resuming exact.
The tests check this against a literal simulation of the queues.

A batch (``SessionBatch``; steps = S):

- ``items`` int64 (steps, lanes, time): ``items[j, b, 0]`` is the start token 0, then the
  session's item ids, then 0 padding. ``time`` is ``1 + max_session_length`` in the batches of
  ``iter_queued()`` and ``fill()`` (fixed-size buffers); ``batch()``, and so iterating the batcher,
  trims it to ``step_widths.max()``, the widest step of that batch.
- ``lengths`` int64 (steps, lanes): events in the session (0 where not valid). Inputs are
  ``items[..., :-1]``, targets ``items[..., 1:]``, a target at position t counts iff t < length.
- ``step_widths`` int64 (steps,): 1 + the longest session at that step (0 if the step is empty):
  step j is padded to ``items[j, :, :step_widths[j]]``, its own longest session.
- ``valid`` bool (steps, lanes): the lane holds a session at that step.
- ``keep`` bool (steps, lanes): False after a user's last session (and where not valid): the
  high-level state is multiplied by it after step j, so the lane's next user starts from zero.
- ``user`` int64 (steps, lanes): dense user index in the cache (-1 where not valid).
- ``session`` int64 (steps, lanes): session index in the cache (-1 where not valid).
- ``continues`` bool (lanes,): step 0 continues the user of the previous batch's last step in
  that lane. :meth:`SessionBatcher.begin_state` zeroes the cached state where it is False.
- ``epoch``, ``index``: Python ints, the batch's position.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
from typing import Iterator

import numpy as np
import torch

from .._ints import is_int
from .cache import SessionCache

__all__ = ["SessionBatch", "SessionBatcher", "LaneStateCache", "BATCH_FIELDS"]

# name -> (dtype, shape in terms of steps/lanes/time): the contract with the model and the queue.
BATCH_FIELDS = {
    "items": torch.int64,
    "lengths": torch.int64,
    "step_widths": torch.int64,
    "valid": torch.bool,
    "keep": torch.bool,
    "user": torch.int64,
    "session": torch.int64,
    "continues": torch.bool,
}


NUMPY_DTYPES = {torch.int64: np.int64, torch.bool: np.bool_}


def checked_position(value, name: str) -> int:
    """A batch index or epoch: a non-negative integer of any kind but a bool, as a plain int (what a batch records
    and a checkpoint stores)."""
    if not is_int(value):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def saved_position(state_dict: dict, identity: dict, num_batches) -> dict[str, int]:
    """The position (epoch, next_index) of a batcher's saved state_dict, checked: made by a batcher of this
    ``identity`` (its settings and cache), with every key, non-negative integers, next_index at most
    ``num_batches(epoch)`` (there, a finished epoch, which the next iteration moves past)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    mismatched = {k: (state_dict.get(k), v) for k, v in identity.items() if state_dict.get(k) != v}
    if mismatched:
        raise ValueError(f"state_dict: made by a different batcher or cache: {mismatched} (saved, here)")
    missing = [k for k in ("epoch", "next_index", "state") if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict: missing {missing}")
    position = {}
    for name in ("epoch", "next_index"):
        value = state_dict[name]
        if not is_int(value) or value < 0:
            raise ValueError(f"state_dict: {name} must be a non-negative integer, got {value!r}")
        position[name] = int(value)
    batches = num_batches(position["epoch"])
    if position["next_index"] > batches:
        raise ValueError(f"state_dict: next_index {position['next_index']} is past the end of epoch "
                         f"{position['epoch']}, which has {batches} batches")
    return position


def checked_index(value) -> int:
    """A batch index: an integer of any kind but a bool, as a plain int (the range is the caller's to check: out of
    it, an IndexError)."""
    if not is_int(value):
        raise TypeError(f"index must be an integer, got {value!r}")
    return int(value)


def checked_flag(value, name: str) -> bool:
    """A switch: a bool (Python's or NumPy's). Anything else is refused: bool("no") is True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


@dataclasses.dataclass
class SessionBatch:
    """One mini-batch; see the module docstring for every field's shape and meaning."""

    items: torch.Tensor
    lengths: torch.Tensor
    step_widths: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    user: torch.Tensor
    session: torch.Tensor
    continues: torch.Tensor
    epoch: int
    index: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BATCH_FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], epoch: int, index: int) -> "SessionBatch":
        return cls(**{name: tensors[name] for name in BATCH_FIELDS}, epoch=epoch, index=index)

    def to(self, device, non_blocking: bool = False) -> "SessionBatch":
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return SessionBatch.from_tensors(moved, self.epoch, self.index)

    @classmethod
    def of_sessions(cls, sessions, device=None) -> "SessionBatch":
        """One lane holding one user's ``sessions`` (non-empty lists of item ids), in order, as the batcher lays
        a user out: the state carried from session to session, the user ending with the last one (user 0,
        sessions 0, 1, ...). What a model's full forward over a known history takes (e.g. to check a
        StreamingRecommender against it)."""
        if not sessions or any(len(session) == 0 for session in sessions):
            raise ValueError("sessions must be a non-empty list of non-empty sessions (lists of item ids)")
        steps, longest = len(sessions), max(len(session) for session in sessions)
        items = torch.zeros(steps, 1, longest + 1, dtype=torch.int64)
        lengths = torch.zeros(steps, 1, dtype=torch.int64)
        for step, session in enumerate(sessions):
            items[step, 0, 1:1 + len(session)] = _session_item_ids(step, session)
            lengths[step, 0] = len(session)
        keep = torch.ones(steps, 1, dtype=torch.bool)
        keep[-1] = False
        batch = cls(items, lengths, lengths.max(1).values + 1, torch.ones(steps, 1, dtype=torch.bool), keep,
                    torch.zeros(steps, 1, dtype=torch.int64), torch.arange(steps)[:, None],
                    torch.zeros(1, dtype=torch.bool), 0, 0)
        return batch if device is None else batch.to(device)


def _session_item_ids(step: int, session) -> torch.Tensor:
    """A session of SessionBatch.of_sessions as int64 item ids: integers >= 1 (0 is the padding and start id; a
    float or a bool would be truncated or taken for 0 or 1 without a word)."""
    refused = ValueError(f"session {step} must be a list of integer item ids >= 1 (0 is the padding id), got "
                         f"{session!r}")
    if isinstance(session, (str, bytes)) or (isinstance(session, (list, tuple)) and
                                             any(isinstance(value, (bool, np.bool_)) for value in session)):
        raise refused
    try:
        ids = torch.as_tensor(session)
    except (TypeError, ValueError, RuntimeError):
        raise refused from None
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise refused
    ids = ids.to(torch.int64)  # (first: an unsigned id past int64's range turns negative, and is refused below)
    if bool((ids < 1).any()):
        raise refused
    return ids


class LaneStateCache:
    """The high-level (across-session) state carried between mini-batches.

    state: (layers, lanes, hidden) on ``device``; zero at creation.
    """

    def __init__(self, layers: int, lanes: int, hidden: int, device="cpu", dtype=torch.float32):
        for name, value in (("layers", layers), ("lanes", lanes), ("hidden", hidden)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype (a GRU state), got {dtype!r}")
        self.state = torch.zeros(int(layers), int(lanes), int(hidden), device=device, dtype=dtype)

    def reset_lanes(self, continues: torch.Tensor) -> torch.Tensor:
        """Zero the lanes where ``continues`` (lanes,) is False; returns the state."""
        if not isinstance(continues, torch.Tensor) or continues.dtype != torch.bool:
            found = f"a {continues.dtype} tensor" if isinstance(continues, torch.Tensor) else type(continues).__name__
            raise TypeError(f"continues must be a bool tensor (lanes,), got {found}: another dtype would scale the "
                            f"state rather than keep or zero it")
        if continues.shape != (self.state.shape[1],):
            raise ValueError(f"continues: expected shape ({self.state.shape[1]},), got {tuple(continues.shape)}")
        # Asynchronous only from the host: a device-to-host copy made non_blocking may not have arrived when
        # the CPU's mul_ reads it.
        mask = continues.to(device=self.state.device, dtype=self.state.dtype,
                            non_blocking=continues.device.type == "cpu")
        self.state.mul_(mask.view(1, -1, 1))
        return self.state

    def store(self, new_state: torch.Tensor) -> None:
        if not isinstance(new_state, torch.Tensor):
            raise TypeError(f"new_state must be a torch.Tensor, got {type(new_state).__name__}")
        if new_state.shape != self.state.shape:
            raise ValueError(f"new_state: expected shape {tuple(self.state.shape)}, got {tuple(new_state.shape)}")
        self.state.copy_(new_state.detach())

    def zero_(self) -> None:
        self.state.zero_()


@dataclasses.dataclass
class _EpochPlan:
    """Schedule of one epoch. All matrices are (batches * steps, lanes); -1 / False = empty."""

    epoch: int
    session: np.ndarray
    user: np.ndarray
    keep: np.ndarray
    num_batches: int


class SessionBatcher:
    """HierTCN's lane mini-batch generator over one split of a :class:`SessionCache`.

    Args:
        cache: an opened cache.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        lanes: batch rows (B).
        sessions_per_batch: S, consecutive sessions per lane in a batch (the batch's steps).
        max_session_length: sessions are truncated to this many events (default: the cache's
            longest session, i.e. no truncation, so every event of the split is delivered once).
        shuffle: permute users each epoch (partition order, then users within a partition, which
            keeps reads local); the permutation is a function of (seed, epoch).
        seed: see ``shuffle``; a non-negative integer.
        state_shape: (layers, hidden) of the high-level state cache, or None for no cache.
        device, state_dtype: where and how the state cache lives.

    Iterating yields the remaining batches of the current epoch and then advances the epoch.
    Every event of the split is delivered exactly once per epoch, in time order within its user,
    except events beyond ``max_session_length`` (counted in ``truncated_events``).
    Construction verifies the cache's checksums (once per opened cache).
    A pickled batcher holds its cache's path, its settings, position and state cache, not the data
    or anything derived from it: unpickling memory-maps the cache again and rebuilds the rest.
    """

    def __init__(self, cache: SessionCache, split: str = "train", lanes: int = 32, sessions_per_batch: int = 10,
                 max_session_length: int | None = None, shuffle: bool = False, seed: int = 0,
                 state_shape: tuple[int, int] | None = None, device="cpu", state_dtype=torch.float32):
        if not isinstance(cache, SessionCache):
            raise TypeError(f"cache must be a SessionCache, got {type(cache).__name__}")
        for name, value in (("lanes", lanes), ("sessions_per_batch", sessions_per_batch)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_session_length is None:
            max_session_length = max(cache.max_session_length, 1)
        if not is_int(max_session_length) or max_session_length < 1:
            raise ValueError(f"max_session_length must be a positive integer or None, got {max_session_length!r}")
        self.cache = cache
        self.split = split
        self.split_code = cache.split_code(split)
        self.lanes = int(lanes)
        self.sessions_per_batch = int(sessions_per_batch)
        self.max_session_length = int(max_session_length)
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.shuffle = checked_flag(shuffle, "shuffle")
        self.seed = int(seed)
        self.epoch = 0
        self.next_index = 0
        self._plan: _EpochPlan | None = None
        self._plan_lock = threading.Lock()
        self.state_cache = None
        if state_shape is not None:
            if not isinstance(state_shape, (tuple, list, torch.Size)) or len(state_shape) != 2:
                raise ValueError(f"state_shape must be (layers, hidden), got {state_shape!r}")
            self.state_cache = LaneStateCache(state_shape[0], lanes, state_shape[1], device, state_dtype)

        # The split labels of every partition are read right here: check them all first (once per
        # opened cache), so corruption is reported as such and never read as data.
        cache.verify()
        self._derive()

    # Built from the cache by _derive(): never pickled, rebuilt on unpickling (a pickled batcher
    # must not carry copies of the cache; _plan is rebuilt on first use).
    _DERIVED = ("split_users", "user_first_session", "user_session_count", "_user_partition", "_item",
                "_session_offsets", "_spec", "num_sessions", "num_events", "truncated_events", "_plan")

    def _derive(self) -> None:
        """The per-user index of the split and the plain views of the cache's arrays."""
        cache, split, max_session_length = self.cache, self.split, self.max_session_length
        # Each user's sessions in the split are contiguous (cold: all of them; warm: a time range).
        in_split = np.flatnonzero(np.asarray(cache.session_split) == self.split_code)
        session_user = np.searchsorted(cache.user_session_offsets, in_split, side="right") - 1
        starts = np.flatnonzero(np.concatenate(([True], session_user[1:] != session_user[:-1]))) \
            if in_split.shape[0] else np.empty(0, np.int64)
        self.split_users = session_user[starts]                          # (users_in_split,)
        self.user_first_session = in_split[starts]                       # (users_in_split,)
        self.user_session_count = np.diff(np.append(starts, in_split.shape[0]))
        if self.split_users.shape[0] and not np.array_equal(
                in_split, np.repeat(self.user_first_session - starts, self.user_session_count)
                + np.arange(in_split.shape[0])):
            raise ValueError(f"split {split!r}: a user's sessions in the split are not contiguous; "
                             "the cache is not one this batcher understands")
        self._user_partition = cache.partition_of_users(self.split_users)
        # Plain ndarray views: indexing a np.memmap subclass costs more per call.
        self._item = np.asarray(cache.item)
        self._session_offsets = np.asarray(cache.session_offsets)
        self._spec = self.batch_spec()
        session_lengths = np.diff(np.asarray(cache.session_offsets))[in_split]
        self.num_sessions = int(in_split.shape[0])
        self.num_events = int(np.minimum(session_lengths, max_session_length).sum())
        # Events beyond max_session_length are never delivered; say how many.
        self.truncated_events = int(session_lengths.sum()) - self.num_events

    # ---- the schedule ------------------------------------------------------------------------

    def user_order(self, epoch: int) -> np.ndarray:
        """Positions into ``split_users`` in the order users enter the lanes in ``epoch``."""
        epoch = checked_position(epoch, "epoch")
        count = self.split_users.shape[0]
        if not self.shuffle:
            return np.arange(count)
        rng = np.random.default_rng([self.seed, epoch])
        partitions = np.unique(self._user_partition)
        rank = np.empty(self.cache.num_partitions, dtype=np.int64)
        rank[rng.permutation(partitions)] = np.arange(partitions.shape[0])
        within = rng.permutation(count)
        # Sort by (partition rank, random key): users grouped by partition, shuffled inside.
        random_key = np.empty(count, dtype=np.int64)
        random_key[within] = np.arange(count)
        return np.lexsort((random_key, rank[self._user_partition]))

    def _plan_for(self, epoch: int) -> _EpochPlan:
        """The schedule of ``epoch`` (a plain int: the public methods check what they are given)."""
        plan = self._plan
        if plan is not None and plan.epoch == epoch:
            return plan
        with self._plan_lock:  # producer threads may ask at once; plan once
            if self._plan is None or self._plan.epoch != epoch:
                self._plan = self._build_plan(epoch)
            return self._plan

    def _build_plan(self, epoch: int) -> _EpochPlan:
        order = self.user_order(epoch)
        counts = self.user_session_count[order]
        lane_of_user, first_row = [], []
        # The lane with the fewest sessions so far, ties to the lowest index: a heap of (filled, lane).
        heap = [(0, lane) for lane in range(self.lanes)]
        for count in counts.tolist():
            filled, lane = heap[0]
            lane_of_user.append(lane)
            first_row.append(filled)
            heapq.heapreplace(heap, (filled + count, lane))
        lane_of_user = np.asarray(lane_of_user, dtype=np.int64)
        first_row = np.asarray(first_row, dtype=np.int64)
        rows = max(filled for filled, _ in heap)
        steps = self.sessions_per_batch
        num_batches = -(-rows // steps)
        session = np.full((num_batches * steps, self.lanes), -1, dtype=np.int64)
        user = np.full_like(session, -1)
        keep = np.zeros(session.shape, dtype=bool)
        total = int(counts.sum())
        user_start = np.cumsum(counts) - counts
        within_user = np.arange(total) - np.repeat(user_start, counts)
        row = np.repeat(first_row, counts) + within_user
        lane = np.repeat(lane_of_user, counts)
        session[row, lane] = np.repeat(self.user_first_session[order], counts) + within_user
        user[row, lane] = np.repeat(self.split_users[order], counts)
        keep[row, lane] = within_user < np.repeat(counts, counts) - 1
        return _EpochPlan(epoch, session, user, keep, num_batches)

    def __getstate__(self) -> dict:  # e.g. DataLoader workers under the spawn start method
        # The cache pickles by path; everything derived from its data is rebuilt by __setstate__.
        return {k: v for k, v in self.__dict__.items() if k != "_plan_lock" and k not in self._DERIVED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plan_lock = threading.Lock()
        self._plan = None
        self._derive()

    def num_batches(self, epoch: int | None = None) -> int:
        return self._plan_for(self.epoch if epoch is None else checked_position(epoch, "epoch")).num_batches

    # ---- building batches --------------------------------------------------------------------

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Fixed shapes of :meth:`fill`'s output: name -> (shape, dtype), for queue slots."""
        steps, lanes, time = self.sessions_per_batch, self.lanes, 1 + self.max_session_length
        shapes = {"items": (steps, lanes, time), "lengths": (steps, lanes), "step_widths": (steps,),
                  "valid": (steps, lanes), "keep": (steps, lanes), "user": (steps, lanes),
                  "session": (steps, lanes), "continues": (lanes,)}
        return {name: (shapes[name], dtype) for name, dtype in BATCH_FIELDS.items()}

    def _allocate(self, width: int) -> dict[str, np.ndarray]:
        arrays = {}
        for name, (shape, dtype) in self._spec.items():
            arrays[name] = np.empty(shape if name != "items" else shape[:2] + (width,), dtype=NUMPY_DTYPES[dtype])
        return arrays

    def _write(self, epoch: int, index: int, out: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch`` as numpy arrays, written into ``out`` when given."""
        plan = self._plan_for(epoch)
        if not 0 <= index < plan.num_batches:
            raise IndexError(f"index {index} out of range: epoch {epoch} has {plan.num_batches} batches")
        rows = slice(index * self.sessions_per_batch, (index + 1) * self.sessions_per_batch)
        session = plan.session[rows]
        valid = session >= 0
        safe_session = np.where(valid, session, 0)
        offsets = self._session_offsets
        start = offsets[safe_session]
        lengths = np.where(valid, np.minimum(offsets[safe_session + 1] - start, self.max_session_length), 0)
        step_widths = np.where(valid.any(axis=1), lengths.max(axis=1) + 1, 0)
        width = int(step_widths.max()) if out is None else out["items"].shape[2]
        arrays = out if out is not None else self._allocate(width)
        items = arrays["items"]
        items.fill(0)
        positions = np.arange(width - 1)
        present = positions < lengths[..., None]
        items[..., 1:][present] = self._item[(start[..., None] + positions)[present]]
        arrays["lengths"][...] = lengths
        arrays["step_widths"][...] = step_widths
        arrays["valid"][...] = valid
        arrays["keep"][...] = plan.keep[rows]
        arrays["user"][...] = plan.user[rows]
        arrays["session"][...] = session
        arrays["continues"][...] = plan.keep[rows.start - 1] if index > 0 else False
        return arrays

    def batch(self, index: int, epoch: int | None = None) -> SessionBatch:
        """Batch ``index`` of ``epoch`` (default: the current epoch), freshly allocated, with
        ``items`` as wide as its longest step. Does not move the position."""
        epoch = self.epoch if epoch is None else checked_position(epoch, "epoch")
        index = checked_index(index)
        arrays = self._write(epoch, index, None)
        return SessionBatch.from_tensors({k: torch.from_numpy(v) for k, v in arrays.items()}, epoch, index)

    def fill(self, index: int, out: dict[str, torch.Tensor], epoch: int | None = None) -> bool:
        """Write batch ``index`` into preallocated CPU tensors shaped by :meth:`batch_spec`.
        Returns False (writing nothing) when the epoch has no batch ``index``."""
        for name, (shape, dtype) in self._spec.items():  # all checked before any is written
            tensor = out.get(name) if isinstance(out, dict) else None
            if (not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.dtype != dtype
                    or tuple(tensor.shape) != shape or not tensor.is_contiguous()):
                found = ("missing" if tensor is None else type(tensor).__name__ if not isinstance(tensor, torch.Tensor)
                         else f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)} on {tensor.device}"
                              f"{'' if tensor.is_contiguous() else ', not contiguous'}")
                raise ValueError(f"out[{name!r}] must be a contiguous CPU {dtype} tensor of shape {shape} "
                                 f"(batch_spec()), got {found}")
        epoch = self.epoch if epoch is None else checked_position(epoch, "epoch")
        index = checked_index(index)
        if index >= self._plan_for(epoch).num_batches:
            return False
        self._write(epoch, index, {name: out[name].numpy() for name in self._spec})
        return True

    # ---- iteration, state and resume ---------------------------------------------------------

    def _normalise_position(self, finished_only: bool = False) -> None:
        """Move past a fully consumed epoch. With ``finished_only``, an epoch with no batch at all
        is not skipped (so that iterating it advances the epoch exactly once)."""
        if (self.next_index > 0 or not finished_only) and self.next_index >= self.num_batches(self.epoch):
            self.epoch += 1
            self.next_index = 0

    def _hand_out(self, batch: SessionBatch, index: int) -> Iterator[SessionBatch]:
        """Yield ``batch``, counted as handed out (next_index = index + 1) as it goes. Raised here before the yield
        (an interrupt between the count and the yield), the count is taken back: the batch reached nobody. Closed
        while suspended at the yield (GeneratorExit), the consumer has it: it stays counted."""
        try:
            self.next_index = index + 1
            yield batch
        except GeneratorExit:
            raise
        except BaseException:
            self.next_index = index
            raise

    def __iter__(self) -> Iterator[SessionBatch]:
        """The remaining batches of the current epoch; the epoch advances at the end."""
        self._normalise_position(finished_only=True)
        epoch = self.epoch
        while self.epoch == epoch and self.next_index < self.num_batches(epoch):
            index = self.next_index
            batch = self.batch(index, epoch)  # built before it counts: a batch that fails to build is not skipped
            yield from self._hand_out(batch, index)  # handed out = consumed, for checkpoints taken in the loop
        self._normalise_position()

    def iter_queued(self, num_producers: int = 2, num_slots: int = 4, device=None) -> Iterator[SessionBatch]:
        """Like iteration, but batches are built by ``num_producers`` threads into a
        :class:`PinnedRingQueue` and arrive on ``device`` (default: the state cache's device)."""
        from .ring_queue import PinnedRingQueue

        self._normalise_position(finished_only=True)
        epoch, first = self.epoch, self.next_index
        if device is None:
            device = self.state_cache.state.device if self.state_cache is not None else "cpu"

        def produce(sequence: int, slot: dict[str, torch.Tensor]) -> bool:
            return self.fill(first + sequence, slot, epoch)

        # Not a with statement: an interrupt landing as __enter__ starts would leave the queue's producers running
        # (the held traceback keeps the queue alive). Nothing that can be interrupted lies between the
        # constructor's return and the try; should the interrupt land as the constructor returns, the queue is
        # dropped at once, and its finalizer stops the producers.
        queue = PinnedRingQueue(self.batch_spec(), produce, num_producers=num_producers, num_slots=num_slots,
                                device=device)
        try:
            for sequence, tensors in queue:
                index = first + sequence
                batch = SessionBatch.from_tensors(tensors, epoch, index)
                yield from self._hand_out(batch, index)  # counted once made: an interrupt before leaves it
        except BaseException:
            queue.close_after_error()
            raise
        queue.close(timeout=None)
        self._normalise_position()

    def begin_state(self, batch: SessionBatch) -> torch.Tensor:
        """The state (layers, lanes, hidden) to start ``batch`` from: the cached state with lanes
        that start a new user zeroed (in the cache too). A new tensor, not the cache's buffer, so
        :meth:`end_state` may overwrite the cache before the loss's ``backward()``."""
        if self.state_cache is None:
            raise RuntimeError("this SessionBatcher has no state cache; pass state_shape=(layers, hidden)")
        return self.state_cache.reset_lanes(batch.continues).clone()

    def end_state(self, batch: SessionBatch, new_state: torch.Tensor) -> None:
        """Store the state after ``batch`` (detached) and record ``batch`` as consumed."""
        if self.state_cache is None:
            raise RuntimeError("this SessionBatcher has no state cache; pass state_shape=(layers, hidden)")
        self.state_cache.store(new_state)
        self.epoch, self.next_index = batch.epoch, batch.index + 1

    def _identity(self) -> dict:
        return {"cache_key": self.cache.key, "split": self.split, "lanes": self.lanes,
                "sessions_per_batch": self.sessions_per_batch, "max_session_length": self.max_session_length,
                "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict:
        """Position (next batch to consume) and the state cache, for checkpoints."""
        state = None if self.state_cache is None else self.state_cache.state.detach().cpu().clone()
        return {**self._identity(), "epoch": self.epoch, "next_index": self.next_index, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position and state cache saved by :meth:`state_dict`. Everything is checked
        before anything changes: a malformed or foreign dict raises and leaves this batcher as it
        was (a resume that fails must not leave a half-restored position)."""
        position = saved_position(state_dict, self._identity(), self.num_batches)
        state = state_dict["state"]
        if (state is None) != (self.state_cache is None):
            raise ValueError("state_dict: state cache presence differs from this batcher's")
        if self.state_cache is not None:
            expected = tuple(self.state_cache.state.shape)
            if not (isinstance(state, torch.Tensor) and state.is_floating_point() and tuple(state.shape) == expected):
                got = (f"{state.dtype} tensor of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor)
                       else type(state).__name__)
                raise ValueError(f"state_dict: state must be a floating-point tensor of shape {expected}, got {got}")
        # All or nothing, interrupts included: the position goes with the state, and both back on a failure.
        lanes = None if self.state_cache is None else self.state_cache.state.clone()
        epoch, next_index = self.epoch, self.next_index
        try:
            if lanes is not None:
                self.state_cache.store(state.to(self.state_cache.state.device))
            self.epoch, self.next_index = position["epoch"], position["next_index"]
        except BaseException:
            if lanes is not None:
                self.state_cache.state.copy_(lanes)
            self.epoch, self.next_index = epoch, next_index
            raise

