"""Full-catalogue ranking metrics for next-item prediction, accumulated chunk by chunk.

Every event is scored against the WHOLE item catalogue (no sampled negatives: sampled metrics
can reverse model rankings, Krichene & Rendle 2020). Item ids are dense and item 0 is the
padding/start token (see :mod:`hiertcn_fast.data`), so by default column 0 of the scores is not
part of the catalogue.

Rank of the target (1 = best), with ``higher`` = catalogue items scoring strictly higher than the
target and ``tied`` = other catalogue items scoring exactly the same:

- ``ties="optimistic"`` (default, the HierTCN paper's convention): ``rank = 1 + higher``;
- ``ties="pessimistic"``: ``rank = 1 + higher + tied``;
- ``ties="average"``: ``rank = 1 + higher + tied / 2`` (the expected rank under random tie breaking). The
  metrics are then those of that expected rank, not the expected metrics under random tie breaking: a target
  tied with three other items at the top has rank 2.5, so Recall@1 0 and MRR 0.4, where breaking the tie at
  random would give 0.25 and about 0.52 on average.

The optimistic policy rewards a model that scores many items the same (a constant model gets
rank 1 everywhere), so the result also counts the events whose target was tied with another item.

Metrics per event from the rank r: ``Recall@k = [r <= k]``, ``MRR = 1/r`` (uncut),
``MRR@k = [r <= k] / r``, ``NDCG@k = [r <= k] / log2(r + 1)`` (one relevant item, so IDCG = 1).
They are averaged two ways: per event (every event weighs the same) and per user (the mean over
each user's events, then the mean over users, the paper's unit), and separately for the first
event of each session (predicted from long-term state alone) and for the other events.
"""

from __future__ import annotations

import collections.abc
import math

import numpy as np
import torch

from ._ints import is_int
from .data import SessionBatch

__all__ = ["RankingMetrics", "TIE_POLICIES", "DEFAULT_RECALL_KS", "DEFAULT_MRR_CUTOFFS", "DEFAULT_NDCG_KS",
           "target_ranks", "batch_targets"]

TIE_POLICIES = {
    "optimistic": "rank = 1 + number of catalogue items scoring strictly higher than the target "
                  "(items tied with the target do not hurt it)",
    "pessimistic": "rank = 1 + number of catalogue items scoring higher than or equal to the target "
                   "(every tied item counts as ranked above it)",
    "average": "rank = 1 + items scoring strictly higher + half the items tied with the target "
               "(expected rank under random tie breaking)",
}
DEFAULT_RECALL_KS = (1, 5, 10, 20)
DEFAULT_MRR_CUTOFFS = (None, 20)
DEFAULT_NDCG_KS = (10,)
GROUPS = ("first_in_session", "rest")
# Bound on the temporary (rows x items) comparison masks built per block of rows.
ROW_BLOCK_ELEMENTS = 1 << 24
# Per-user partial sums are merged into the sorted table once this many rows are pending
# (or more rows than the table has), which keeps merging amortised O(n log n).
MIN_PENDING_ROWS = 1 << 16
# Cutoffs compare with ranks as at most this (float64 holds every integer up to it).
CUTOFF_CAP = 1 << 53


def _check_cutoffs(name: str, values, allow_none: bool = False) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, collections.abc.Iterable):
        raise TypeError(f"{name} must be a sequence of cutoffs, e.g. (5, 10), got {values!r}")
    values = tuple(values)
    for value in values:
        if value is None and allow_none:
            continue
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must hold positive integers{' or None' if allow_none else ''}, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {values!r}")
    return tuple(None if value is None else int(value) for value in values)


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a numpy array of numbers or bools, got dtype {value.dtype}")
        if any(stride < 0 for stride in value.strides):  # (a reversed view: torch takes no negative strides)
            value = value.copy()
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype torch's comparisons and reductions take: the float8 kinds as float32 (exactly, so ties
    and order are kept)."""
    if scores.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return scores
    return scores.float()


def _int64_targets(targets: torch.Tensor) -> torch.Tensor:
    """Integer item ids as int64 (torch compares only some integer dtypes: not uint16, uint32 or uint64). A uint64 id
    past int64's range is refused by its value (the conversion would make it negative)."""
    if targets.dtype == torch.uint64:
        past = targets.view(torch.int64) < 0  # (the top bit: >= 2**63)
        if bool(past.any()):
            first = int(torch.nonzero(past)[0, 0])
            value = int(targets[first:first + 1].cpu().numpy()[0])
            raise ValueError(f"targets: item id {value} at event {first} is not in the catalogue (past int64's range)")
    return targets.to(torch.int64)


def _check_targets(targets: torch.Tensor, num_columns: int, padding_item: int | None) -> None:
    """Every target an item of the catalogue: a column of the scores other than ``padding_item``."""
    bad_target = (targets < 0) | (targets >= num_columns)
    if padding_item is not None:
        bad_target |= targets == padding_item
    if bool(bad_target.any()):
        first_bad = int(torch.nonzero(bad_target)[0, 0])
        raise ValueError(f"targets: item id {int(targets[first_bad])} at event {first_bad} is not in the "
                         f"catalogue (ids 0..{num_columns - 1}, padding item {padding_item} excluded)")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, padding_item: int | None = 0):
    """Counts of catalogue items scoring strictly higher than, and tied with, each target.

    scores: (events, items) floating point; targets: (events,) integer item ids of the catalogue, on the scores'
    device (ValueError otherwise). Column ``padding_item`` (None: none) is not part of the catalogue. Returns
    ``(higher, tied)``, both int64 (events,) on the scores' device; ``tied`` excludes the target. A target
    scoring NaN has no rank: ValueError.
    Works in blocks of rows so the temporary masks stay small.
    """
    for name, value in (("scores", scores), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be (events, items) floating point, got shape {tuple(scores.shape)} and "
                         f"dtype {scores.dtype}")
    scores = _rankable(scores)
    n, num_columns = scores.shape
    if padding_item is not None:
        if not is_int(padding_item) or not 0 <= padding_item < num_columns:
            raise ValueError(f"padding_item must be a column of the scores (0..{num_columns - 1}) or None, got "
                             f"{padding_item!r}")
        padding_item = int(padding_item)
    if targets.shape != (n,) or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be (events,) = ({n},) integer item ids, got shape {tuple(targets.shape)} "
                         f"and dtype {targets.dtype}")
    if targets.device != scores.device:
        raise ValueError(f"targets must be on the scores' device ({scores.device}), got {targets.device}; "
                         f"move them with .to(scores.device)")
    targets = _int64_targets(targets)  # (also gather's index: int8 or int16 ids would fail inside it)
    _check_targets(targets, num_columns, padding_item)
    higher = torch.empty(n, dtype=torch.int64, device=scores.device)
    tied = torch.empty(n, dtype=torch.int64, device=scores.device)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(num_columns, 1))
    for start in range(0, n, rows):
        block = scores[start:start + rows]
        target_score = block.gather(1, targets[start:start + rows, None])
        if bool(torch.isnan(target_score).any()):  # (it would count as tied with -1 items)
            first = start + int(torch.nonzero(torch.isnan(target_score[:, 0]))[0, 0])
            raise ValueError(f"scores: the target of event {first} scores NaN; its rank is undefined")
        # int32 counts are enough for any catalogue and reduce about twice as fast as int64.
        block_higher = (block > target_score).sum(1, dtype=torch.int32)
        block_tied = (block == target_score).sum(1, dtype=torch.int32) - 1
        if padding_item is not None:
            pad_score = block[:, padding_item]
            block_higher -= (pad_score > target_score[:, 0]).int()
            block_tied -= (pad_score == target_score[:, 0]).int()
        higher[start:start + rows] = block_higher
        tied[start:start + rows] = block_tied
    return higher, tied


def batch_targets(batch: SessionBatch) -> dict[str, torch.Tensor]:
    """The prediction events of a lane mini-batch, for :meth:`RankingMetrics.update`.

    A model reads ``batch.items[..., :-1]`` and predicts ``batch.items[..., 1:]``; position t of
    a session is an event iff t < its length. Returns, on the batch's device:
    ``mask`` bool (steps, lanes, time - 1), True at the events; ``targets`` int64 (events,),
    ``users`` int64 (events,), ``first_in_session`` bool (events,), in the mask's (row-major) order.
    Scores shaped (steps, lanes, time - 1, items) give the matching (events, items) as
    ``scores[mask]``.
    """
    if not isinstance(batch, SessionBatch):
        raise TypeError(f"batch must be a SessionBatch, got {type(batch).__name__}")
    steps, lanes, time = batch.items.shape
    position = torch.arange(time - 1, device=batch.items.device)
    mask = position < batch.lengths[..., None]
    return {
        "mask": mask,
        "targets": batch.items[..., 1:][mask],
        "users": batch.user[..., None].expand(steps, lanes, time - 1)[mask],
        "first_in_session": (position == 0).expand(steps, lanes, time - 1)[mask],
    }


class _UserSums:
    """Per-user column sums over a stream: sorted int64 keys with a (users, columns) float64 table.

    Chunks are reduced by user on arrival and merged into the table lazily (see MIN_PENDING_ROWS). All of it is
    one tuple, ``state`` = (keys, table, pending chunks, pending rows), never changed in place: :meth:`added` and
    :meth:`merged` compute a new one, which the caller stores together with its own sums in one assignment, so an
    interrupt leaves the accumulator before or after a chunk, never part way. The pending chunks are a chain,
    (earlier chain, (keys, sums)) or None, so that adding one copies nothing (a tuple of them copied them all:
    quadratic in their number, which MIN_PENDING_ROWS lets reach tens of thousands).
    """

    def __init__(self, columns: int):
        self.columns = columns
        self.state = (np.empty(0, np.int64), np.empty((0, columns), np.float64), None, 0)

    @staticmethod
    def _reduce(keys: np.ndarray, values: np.ndarray):
        unique, inverse = np.unique(keys, return_inverse=True)
        sums = np.zeros((unique.shape[0], values.shape[1]), np.float64)
        np.add.at(sums, inverse, values)
        return unique, sums

    @classmethod
    def _compacted(cls, state: tuple) -> tuple:
        keys, table, pending, _ = state
        if pending is None:
            return state
        chunks = []
        while pending is not None:
            pending, chunk = pending
            chunks.append(chunk)
        chunks.reverse()  # in arrival order: the sums as they were added
        keys, table = cls._reduce(np.concatenate([keys] + [k for k, _ in chunks]),
                                  np.concatenate([table] + [v for _, v in chunks]))
        return keys, table, None, 0

    def _with_pending(self, keys: np.ndarray, sums: np.ndarray) -> tuple:
        table_keys, table, pending, rows = self.state
        state = (table_keys, table, (pending, (keys, sums)), rows + keys.shape[0])
        return self._compacted(state) if state[3] > max(MIN_PENDING_ROWS, table_keys.shape[0]) else state

    def added(self, keys: np.ndarray, values: np.ndarray) -> tuple:
        """The state with a chunk's rows added (this object unchanged)."""
        return self._with_pending(*self._reduce(keys, values))

    def merged(self, other: "_UserSums") -> tuple:
        """The state with another's sums added (both objects unchanged)."""
        keys, table, _, _ = self._compacted(other.state)
        return self._compacted(self._with_pending(keys, table))

    def compact(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pending chunk into the table (the same sums, in one assignment); the (keys, table)."""
        self.state = self._compacted(self.state)
        keys, table, _, _ = self.state
        return keys, table


class RankingMetrics:
    """Streaming full-catalogue ranking metrics; feed it chunk by chunk with :meth:`update`.

    Args:
        recall_ks: cut-offs of Recall@k.
        mrr_cutoffs: cut-offs of MRR@k; None is the uncut MRR.
        ndcg_ks: cut-offs of NDCG@k.
        ties: ``"optimistic"`` (default), ``"pessimistic"`` or ``"average"``; see the module docstring.
        padding_item: the score column that is not a catalogue item (default 0, the padding/start
            token); None when every column is an item.

    Only per-event metric values leave the scores' device (a few floats per event), and only
    per-user sums are kept, so memory does not grow with the number of events.
    """

    def __init__(self, recall_ks=DEFAULT_RECALL_KS, mrr_cutoffs=DEFAULT_MRR_CUTOFFS, ndcg_ks=DEFAULT_NDCG_KS,
                 ties: str = "optimistic", padding_item: int | None = 0):
        if not isinstance(ties, str) or ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {tuple(TIE_POLICIES)}, got {ties!r}")
        if padding_item is not None and (not is_int(padding_item) or padding_item < 0):
            raise ValueError(f"padding_item must be a non-negative integer or None, got {padding_item!r}")
        self.recall_ks = _check_cutoffs("recall_ks", recall_ks)
        self.mrr_cutoffs = _check_cutoffs("mrr_cutoffs", mrr_cutoffs, allow_none=True)
        self.ndcg_ks = _check_cutoffs("ndcg_ks", ndcg_ks)
        if not (self.recall_ks or self.mrr_cutoffs or self.ndcg_ks):
            raise ValueError("RankingMetrics needs at least one metric: recall_ks, mrr_cutoffs and ndcg_ks are all "
                             "empty")
        self.ties = ties
        self.padding_item = None if padding_item is None else int(padding_item)
        self.metric_names = ([f"Recall@{k}" for k in self.recall_ks]
                             + ["MRR" if k is None else f"MRR@{k}" for k in self.mrr_cutoffs]
                             + [f"NDCG@{k}" for k in self.ndcg_ks])
        self.num_columns: int | None = None
        m = len(self.metric_names)
        # Per group: [event count, metric sums...]; per user, the same for both groups side by side.
        self._event_sums = {group: np.zeros(1 + m, np.float64) for group in GROUPS}
        self._tie_events = 0
        self._tied_items = 0
        self._users = _UserSums(2 * (1 + m))

    def _metric_values(self, rank: np.ndarray) -> np.ndarray:
        """rank: (n,) float64 -> (n, metrics) float64."""
        # A rank is at most the catalogue's size, far below 2**53: a cutoff above that (a Python int too big
        # for a float) cuts nothing, and compares as 2**53.
        recall_ks, mrr_cutoffs, ndcg_ks = ([None if k is None else min(k, CUTOFF_CAP) for k in ks]
                                          for ks in (self.recall_ks, self.mrr_cutoffs, self.ndcg_ks))
        columns = [(rank <= k).astype(np.float64) for k in recall_ks]
        columns += [(1.0 / rank) * (1.0 if k is None else (rank <= k)) for k in mrr_cutoffs]
        columns += [(rank <= k) / np.log2(rank + 1.0) for k in ndcg_ks]
        return np.stack(columns, axis=1)

    def update(self, scores, targets, users, first_in_session) -> None:
        """Add a chunk of events.

        scores: (events, items) floating point, any device; column i scores item id i.
        targets: (events,) integer item ids in the catalogue (never ``padding_item``).
        users: (events,) integer user ids (any integers that fit in int64; dense indices from the cache are
            typical).
        first_in_session: (events,) bool, True for the first event of its session.
        The targets are moved to the scores' device; ranks are computed there.
        """
        scores = _as_tensor("scores", scores)
        targets = _as_tensor("targets", targets)
        users = _as_tensor("users", users)
        first_in_session = _as_tensor("first_in_session", first_in_session)
        if scores.dim() != 2:
            raise ValueError(f"scores: expected shape (events, items), got {tuple(scores.shape)}")
        if not scores.is_floating_point():
            raise TypeError(f"scores: expected a floating point dtype, got {scores.dtype}")
        scores = _rankable(scores)
        n, num_columns = scores.shape
        for name, value in (("targets", targets), ("users", users), ("first_in_session", first_in_session)):
            if value.shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},) to match scores {tuple(scores.shape)}, "
                                 f"got {tuple(value.shape)}")
        for name, value in (("targets", targets), ("users", users)):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
        if first_in_session.dtype != torch.bool:
            raise TypeError(f"first_in_session: expected dtype torch.bool, got {first_in_session.dtype}")
        if self.num_columns is None:
            if self.padding_item is not None and self.padding_item >= num_columns:
                raise ValueError(f"scores: padding_item {self.padding_item} is not a column of scores "
                                 f"with {num_columns} columns")
        elif num_columns != self.num_columns:
            raise ValueError(f"scores: expected {self.num_columns} item columns as in earlier updates, got {num_columns}")
        if n == 0:
            self.num_columns = num_columns
            return
        user_keys = users.cpu().numpy()
        if user_keys.dtype == np.uint64 and int(user_keys.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"users: user ids must fit in int64, got {int(user_keys.max())}")
        user_keys = user_keys.astype(np.int64)
        targets = _int64_targets(targets).to(scores.device)
        _check_targets(targets, num_columns, self.padding_item)
        # A row sum is a fast vectorised reduction and is NaN if the row holds a NaN (or both infinities,
        # hence the exact check on the suspect rows only). The padding column is never ranked, so a NaN
        # there is harmless: only the catalogue columns are checked.
        row_sums = scores.sum(1, dtype=torch.float32) if scores.element_size() < 4 else scores.sum(1)
        suspect = torch.nonzero(torch.isnan(row_sums))[:, 0]
        if suspect.numel():
            nan_scores = torch.isnan(scores[suspect])
            if self.padding_item is not None:
                nan_scores[:, self.padding_item] = False
            rows = suspect[nan_scores.any(1)]
            if rows.numel():
                raise ValueError(f"scores: NaN in {rows.numel()} of {n} events (first at event {int(rows[0])}); "
                                 "ranks of NaN scores are undefined")

        higher, tied = target_ranks(scores, targets, self.padding_item)
        higher = higher.cpu().numpy().astype(np.float64)
        tied = tied.cpu().numpy().astype(np.float64)
        if self.ties == "optimistic":
            rank = 1.0 + higher
        elif self.ties == "pessimistic":
            rank = 1.0 + higher + tied
        else:
            rank = 1.0 + higher + tied / 2.0
        values = self._metric_values(rank)
        first = first_in_session.cpu().numpy()

        m = values.shape[1]
        per_user = np.zeros((n, 2 * (1 + m)), np.float64)
        event_sums = dict(self._event_sums)
        for g, mask in enumerate((first, ~first)):
            block = np.concatenate([np.ones((n, 1)), values], axis=1) * mask[:, None]
            event_sums[GROUPS[g]] = event_sums[GROUPS[g]] + block.sum(0)
            per_user[:, g * (1 + m):(g + 1) * (1 + m)] = block
        user_state = self._users.added(user_keys, per_user)
        # All of the chunk in one assignment: an interrupt before it leaves the accumulator as it was (a retry counts
        # the chunk once), never with some of its sums. Only a chunk that passed every check fixes the width.
        (self.num_columns, self._event_sums, self._tie_events, self._tied_items, self._users.state) = (
            num_columns, event_sums, self._tie_events + int((tied > 0).sum()), self._tied_items + int(tied.sum()),
            user_state)

    def merge(self, other: "RankingMetrics") -> None:
        """Add another accumulator's events (e.g. from another process) to this one."""
        if not isinstance(other, RankingMetrics):
            raise TypeError(f"other must be a RankingMetrics, got {type(other).__name__}")
        if (other.metric_names, other.ties, other.padding_item) != (self.metric_names, self.ties, self.padding_item):
            raise ValueError("other: metrics, tie policy or padding item differ from this accumulator's")
        if None not in (self.num_columns, other.num_columns) and self.num_columns != other.num_columns:
            raise ValueError(f"other: scored {other.num_columns} item columns, this accumulator {self.num_columns}")
        event_sums = {group: self._event_sums[group] + other._event_sums[group] for group in GROUPS}
        user_state = self._users.merged(other._users)
        # In one assignment, as update's.
        (self.num_columns, self._event_sums, self._tie_events, self._tied_items, self._users.state) = (
            self.num_columns if self.num_columns is not None else other.num_columns, event_sums,
            self._tie_events + other._tie_events, self._tied_items + other._tied_items, user_state)

    def _averages(self, count: float, sums: np.ndarray) -> dict:
        return {name: (float(value / count) if count else math.nan) for name, value in zip(self.metric_names, sums)}

    def result(self) -> dict:
        """The metrics as a plain (JSON-able) dict.

        ``per_event[group]`` and ``per_user[group]`` for group in ``all``, ``first_in_session``,
        ``rest`` map metric names to values (NaN where the group is empty) plus ``events`` /
        ``users`` (how many were averaged). A user enters a group's per-user average iff it has
        events in that group. ``tie_policy`` and ``averaging`` say how the numbers were made.
        """
        m = len(self.metric_names)
        events = {group: self._event_sums[group] for group in GROUPS}
        events["all"] = events["first_in_session"] + events["rest"]
        _, table = self._users.compact()
        user_groups = {GROUPS[g]: table[:, g * (1 + m):(g + 1) * (1 + m)] for g in range(2)}
        user_groups["all"] = user_groups["first_in_session"] + user_groups["rest"]
        per_event, per_user = {}, {}
        for group in ("all", *GROUPS):
            count = events[group][0]
            per_event[group] = self._averages(count, events[group][1:]) | {"events": int(count)}
            rows = user_groups[group]
            present = rows[:, 0] > 0
            user_means = rows[present, 1:] / rows[present, :1]
            per_user[group] = self._averages(int(present.sum()), user_means.sum(0)) | {"users": int(present.sum())}
        total = int(events["all"][0])
        return {
            "metrics": list(self.metric_names),
            "per_event": per_event,
            "per_user": per_user,
            "counts": {"events": total, "users": int(table.shape[0]),
                       "first_in_session_events": int(events["first_in_session"][0]),
                       "rest_events": int(events["rest"][0]),
                       "catalogue_items": (None if self.num_columns is None
                                           else self.num_columns - (self.padding_item is not None))},
            "tie_policy": f"{self.ties}: {TIE_POLICIES[self.ties]}",
            "ties": {"events_with_tied_target": self._tie_events,
                     "fraction_events_with_tied_target": (self._tie_events / total) if total else math.nan,
                     "mean_items_tied_with_target": (self._tied_items / total) if total else math.nan},
            "averaging": {
                "per_event": "mean over events: every event weighs the same",
                "per_user": "mean over each user's events, then mean over users (users with no event in a "
                            "group are left out of that group)",
            },
            "catalogue": ("all score columns" if self.padding_item is None
                          else f"all score columns except the padding item {self.padding_item}"),
        }
