"""Rule baselines: most popular item, repeat the previous item, first-order item transitions.

Every rule has the scoring interface of the neural models: ``fit`` on the training split of a
:class:`~hiertcn_fast.data.SessionCache`, then ``score(events)`` returns, for each event of an
:class:`~hiertcn_fast.models.events.EvalEvents` chunk, a score over the whole catalogue from the
history before that event: a float64 tensor (events, num_items + 1) whose column i scores item
id i, with column 0 (padding/start) set to -inf.

Ties: evaluation counts a tie in the target's favour (rank = 1 + items scoring strictly higher),
so a rule that leaves most items tied would look far better than it is. Every rule therefore adds
a popularity key: a distinct number in (0, 1) per item, larger for items more frequent in the
training split (equal counts: smaller item id first). The rules' own signals are integer counts,
so ``count + key`` orders by the rule first and by popularity among equals, and no two items ever
tie.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import SessionCache
from .events import EvalEvents, iter_split_events

__all__ = ["RuleModel", "MostPopular", "RepeatPrevious", "TransitionCounts", "RULES"]


class RuleModel:
    """Base class: fits item counts on a split, scores events from their histories.

    After :meth:`fit`: ``num_items``, ``item_counts`` int64 (num_items + 1,) (entry 0 is 0),
    ``popularity_key`` float64 (num_items + 1,) (entry 0 is -inf).
    """

    name = "rule"

    def __init__(self):
        self.num_items: int | None = None
        self.item_counts: np.ndarray | None = None
        self.popularity_key: np.ndarray | None = None

    def fit(self, cache: SessionCache, split: str = "train", history: str = "user",
            chunk_size: int = 1 << 16) -> "RuleModel":
        """Count the events of ``split`` (streamed in chunks); ``history`` as in :func:`iter_split_events`
        decides what the "previous item" of a training event is. Returns self."""
        if not isinstance(cache, SessionCache):
            raise TypeError(f"cache must be a SessionCache, got {type(cache).__name__}")
        # All or nothing: everything is counted into locals and set in one update at the end, so a fit that
        # raises (a bad split, history or chunk_size is found only as the stream starts; an interrupt) leaves
        # the rule as it was: unfitted, or fitted as before, never the new catalogue with the old counts.
        num_items = int(cache.num_items)
        counts = np.zeros(num_items + 1, np.int64)
        fitting = self._begin_fit(num_items)
        for events in iter_split_events(cache, split, history=history, chunk_size=chunk_size):
            counts += np.bincount(events.target, minlength=num_items + 1)
            self._fit_chunk(fitting, num_items, events)
        fitted = self._end_fit(fitting, num_items)
        # Most frequent first, then smaller id: position 0 gets the largest key.
        order = np.lexsort((np.arange(1, num_items + 1), -counts[1:])) + 1
        key = np.empty(num_items + 1, np.float64)
        key[order] = (num_items - np.arange(num_items)) / (num_items + 1.0)
        key[0] = -np.inf
        self.__dict__.update(fitted, num_items=num_items, item_counts=counts, popularity_key=key)
        return self

    def _begin_fit(self, num_items: int):
        """The rule's own accumulator for a fit (None: the rule keeps nothing beyond the item counts)."""
        return None

    def _fit_chunk(self, fitting, num_items: int, events: EvalEvents) -> None:
        pass

    def _end_fit(self, fitting, num_items: int) -> dict:
        """The rule's own fitted attributes, from its accumulator: set on the rule with the counts."""
        return {}

    def score(self, events: EvalEvents) -> torch.Tensor:
        """Scores (len(events), num_items + 1) float64 on the CPU; see the module docstring."""
        if self.popularity_key is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        if not isinstance(events, EvalEvents):
            raise TypeError(f"events must be an EvalEvents chunk, got {type(events).__name__}")
        if events.num_items != self.num_items:
            raise ValueError(f"events: catalogue of {events.num_items} items, the rule was fitted on "
                             f"{self.num_items}")
        scores = np.tile(self.popularity_key, (len(events), 1))
        self._add_signal(scores, events)
        return torch.from_numpy(scores)

    def _add_signal(self, scores: np.ndarray, events: EvalEvents) -> None:
        """Add the rule's integer-valued signal to ``scores`` (n, num_items + 1) in place."""
        raise NotImplementedError


class MostPopular(RuleModel):
    """The same ranking for every event: items by their count in the training split."""

    name = "most_popular"

    def _add_signal(self, scores, events):
        pass


class RepeatPrevious(RuleModel):
    """The previous item of the history first (the session's or, across sessions, the user's last
    item, depending on the stream's history scope), then the rest by popularity."""

    name = "repeat_previous"

    def _add_signal(self, scores, events):
        previous = events.previous_item()
        rows = np.flatnonzero(previous > 0)
        scores[rows, previous[rows]] += 1.0


class TransitionCounts(RuleModel):
    """First-order transition counts ("most frequent next item after the current one").

    Fitting counts, over the training events, how often item b followed item a (a = the previous
    item of b's history; a = 0, the start token, for an event with an empty history, so the first
    events of users are modelled too). Scoring puts the items that most often followed the
    previous item first, the rest by popularity. Counts are stored sparsely (CSR by previous item).
    """

    name = "transitions"

    def _begin_fit(self, num_items):
        return []  # (unique pair keys, their counts) per chunk

    def _fit_chunk(self, fitting, num_items, events):
        pair = events.previous_item() * (num_items + 1) + events.target
        fitting.append(np.unique(pair, return_counts=True))

    def _end_fit(self, fitting, num_items):
        keys = np.concatenate([k for k, _ in fitting]) if fitting else np.empty(0, np.int64)
        counts = np.concatenate([c for _, c in fitting]) if fitting else np.empty(0, np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        summed = np.zeros(unique.shape[0], np.int64)
        np.add.at(summed, inverse, counts)
        width = num_items + 1
        return {"next_item": unique % width,                                    # (pairs,) CSR columns
                "pair_count": summed,                                           # (pairs,)
                "row_offsets": np.searchsorted(unique // width, np.arange(width + 1))}  # (num_items + 2,)

    def _add_signal(self, scores, events):
        previous = events.previous_item()
        begin, end = self.row_offsets[previous], self.row_offsets[previous + 1]
        lengths = end - begin
        rows = np.repeat(np.arange(len(events)), lengths)
        # Entry j of the flattened rows: its row's CSR start plus its rank within the row.
        within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        entries = begin[rows] + within
        scores[rows, self.next_item[entries]] += self.pair_count[entries]


RULES = {rule.name: rule for rule in (MostPopular, RepeatPrevious, TransitionCounts)}
