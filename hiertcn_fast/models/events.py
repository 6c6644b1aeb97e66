"""Per-event evaluation streams over one split of a :class:`~hiertcn_fast.data.SessionCache`.

Every event of the split is one prediction: the target is the event's item, the input is the
user's history before it. The cache stores events sorted by user, then time, so a history is a
slice ``cache.item[history_start:event]`` of the flat item log: a stream hands out indices,
never copies of histories.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from .._ints import is_int
from ..data import SessionCache

__all__ = ["EvalEvents", "iter_split_events", "HISTORY_SCOPES"]

HISTORY_SCOPES = {
    "user": "all earlier events of the user, in any split (warm splits: the training sessions too)",
    "split": "earlier events of the user in the evaluated split only",
    "session": "earlier events of the same session only",
}


@dataclasses.dataclass(frozen=True)
class EvalEvents:
    """A chunk of prediction events, in the cache's order (user, then time).

    user: int64 (n,) dense user index; target: int64 (n,) item id (>= 1);
    first_in_session: bool (n,); session: int64 (n,) session index in the cache;
    event: int64 (n,) index of the event in ``item_log``; history_start: int64 (n,), the history
    of event i is ``item_log[history_start[i]:event[i]]`` (possibly empty);
    item_log: the cache's flat (events,) item array (shared, not copied); num_items: catalogue
    size (ids 1..num_items; 0 is padding).
    """

    user: np.ndarray
    target: np.ndarray
    first_in_session: np.ndarray
    session: np.ndarray
    event: np.ndarray
    history_start: np.ndarray
    item_log: np.ndarray
    num_items: int

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def history_length(self) -> np.ndarray:
        """int64 (n,): events in each history."""
        return self.event - self.history_start

    def previous_item(self) -> np.ndarray:
        """int64 (n,): the last item of each history, 0 (the start token) where it is empty."""
        has_history = self.event > self.history_start
        return np.where(has_history, np.asarray(self.item_log[np.maximum(self.event - 1, 0)], np.int64), 0)


def iter_split_events(cache: SessionCache, split: str = "test", history: str = "user",
                      chunk_size: int = 4096) -> Iterator[EvalEvents]:
    """Yield the events of ``split`` in chunks of at most ``chunk_size``, each with its history.

    history: which earlier events are visible, one of :data:`HISTORY_SCOPES`. In a cold (by user)
    split ``"user"`` and ``"split"`` coincide. Memory is O(sessions in the split) plus O(chunk_size).
    """
    if not isinstance(cache, SessionCache):
        raise TypeError(f"cache must be a SessionCache, got {type(cache).__name__}")
    if history not in HISTORY_SCOPES:
        raise ValueError(f"history must be one of {tuple(HISTORY_SCOPES)}, got {history!r}")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    code = cache.split_code(split)
    session_offsets = np.asarray(cache.session_offsets)
    user_session_offsets = np.asarray(cache.user_session_offsets)
    sessions = np.flatnonzero(np.asarray(cache.session_split) == code)            # (split sessions,)
    session_user = np.searchsorted(user_session_offsets, sessions, side="right") - 1
    lengths = session_offsets[sessions + 1] - session_offsets[sessions]
    split_position = np.concatenate(([0], np.cumsum(lengths)))                    # (split sessions + 1,)
    if history == "split":
        # A user's earliest session in the split starts its history.
        run_start = np.flatnonzero(np.concatenate(([True], session_user[1:] != session_user[:-1]))) \
            if sessions.shape[0] else np.empty(0, np.int64)
        starts_run = np.zeros(sessions.shape[0], dtype=np.int64)
        starts_run[run_start] = 1
        run_of_session = np.cumsum(starts_run) - 1
        history_session = sessions[run_start][run_of_session]
    elif history == "user":
        history_session = user_session_offsets[session_user]
    else:
        history_session = sessions
    history_first_event = session_offsets[history_session]
    item_log = cache.item
    total = int(split_position[-1])
    for start in range(0, total, chunk_size):
        position = np.arange(start, min(start + chunk_size, total), dtype=np.int64)
        k = np.searchsorted(split_position, position, side="right") - 1           # split session of each event
        offset_in_session = position - split_position[k]
        event = session_offsets[sessions[k]] + offset_in_session
        yield EvalEvents(
            user=session_user[k].astype(np.int64),
            target=np.asarray(item_log[event], dtype=np.int64),
            first_in_session=offset_in_session == 0,
            session=sessions[k].astype(np.int64),
            event=event,
            history_start=history_first_event[k].astype(np.int64),
            item_log=item_log,
            num_items=int(cache.num_items),
        )
