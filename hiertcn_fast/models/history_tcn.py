"""The single-level baseline: a TCN over each user's WHOLE history (NextItNet-like: HierTCN's residual blocks
without the context, not NextItNet's two-conv blocks with layer norm), and the
batches it needs.

A :class:`HistoryBatch` holds whole users: row u is [0, x_1, ..., x_n] (start token, then every
event of the user in the split, sessions concatenated in time order), padded to the batch's
longest user. The model predicts x_t from x_1..x_{t-1}, so its prediction events are exactly the
split's events, the same as the lane batches' and the rules' (first-of-session events included:
they are just the next position of the history). The price is the paper's point: a batch must hold
every user's whole history and every layer's activations over it, where HierTCN holds S sessions
of each lane and a small state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .._ints import is_int
from ..data import SessionCache
from ..data.batcher import checked_flag, checked_index, checked_position, saved_position
from ..nn import TCN
from .base import NextItemModel, check_positive

__all__ = ["HistoryBatch", "UserHistoryBatcher", "HistoryTCN"]


@dataclasses.dataclass
class HistoryBatch:
    """A batch of whole user histories.

    items int64 (users, time): [0, x_1..x_n, 0 padding], time >= 1 + max length; lengths int64
    (users,): events of each user; first_in_session bool (users, time - 1): position t (predicting
    x_{t+1}) is the first event of a session; user int64 (users,): dense user index.
    context_lengths int64 (users,) or None: the first context_lengths events of a row are history
    from earlier splits (a warm split's evaluation), read by the model but not predicted.
    """

    items: torch.Tensor
    lengths: torch.Tensor
    first_in_session: torch.Tensor
    user: torch.Tensor
    epoch: int
    index: int
    context_lengths: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "HistoryBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("items", "lengths", "first_in_session", "user", "context_lengths"):
            if moved[name] is not None:
                moved[name] = moved[name].to(device, non_blocking=non_blocking)
        return HistoryBatch(**moved)

    def rows(self, rows) -> "HistoryBatch":
        """The batch restricted to some users (a rank's share)."""
        context = None if self.context_lengths is None else self.context_lengths[rows]
        return HistoryBatch(self.items[rows], self.lengths[rows], self.first_in_session[rows], self.user[rows],
                            self.epoch, self.index, context)

    def predicted(self, width: int) -> torch.Tensor:
        """bool (users, width): the positions whose next event is predicted (not padding, not context)."""
        positions = torch.arange(width, device=self.items.device)
        mask = positions < self.lengths[:, None]
        if self.context_lengths is not None:
            mask &= positions >= self.context_lengths[:, None]
        return mask

    def targets(self) -> dict[str, torch.Tensor]:
        """The prediction events, as :func:`hiertcn_fast.evaluate.batch_targets` gives for lane batches."""
        time = self.items.shape[1]
        mask = self.predicted(time - 1)
        return {"mask": mask, "targets": self.items[:, 1:][mask],
                "users": self.user[:, None].expand(-1, time - 1)[mask],
                "first_in_session": self.first_in_session[mask]}


class UserHistoryBatcher:
    """Batches of ``users_per_batch`` whole users of one split of a :class:`SessionCache`.

    ``by_length`` (default) groups users of similar history length into a batch, which cuts the
    padding several-fold (ml-100k: mean 33 events, longest 254); with ``shuffle`` the order of the
    batches (and of equal-length users) is a permutation that is a function of (seed, epoch). A short batch
    (users % users_per_batch of them) holds the shortest users and comes last, so the longest users fill a whole
    batch: the memory a batch needs peaks at users_per_batch users of the longest histories.
    ``max_session_length`` truncates sessions as the lane batcher does (None: none).
    ``context_splits``: splits whose sessions of the same users come first as read-only history (a
    warm split's evaluation: train and valid before test); their events are not predicted.
    Position (epoch, next_index) and :meth:`state_dict` / :meth:`load_state_dict` as the lane
    batcher's, so the training loop resumes both the same way.
    """

    def __init__(self, cache: SessionCache, split: str = "train", users_per_batch: int = 32,
                 max_session_length: int | None = None, shuffle: bool = False, seed: int = 0,
                 by_length: bool = True, context_splits=()):
        if not isinstance(cache, SessionCache):
            raise TypeError(f"cache must be a SessionCache, got {type(cache).__name__}")
        (users_per_batch,) = check_positive(users_per_batch=users_per_batch)
        if max_session_length is not None and (not is_int(max_session_length) or max_session_length < 1):
            raise ValueError(f"max_session_length must be None (the cache's) or a positive integer, got "
                             f"{max_session_length!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(context_splits, str):  # (once: a generator would be used up by the check below)
            context_splits = tuple(context_splits)
        if isinstance(context_splits, str) or split in context_splits:
            raise ValueError(f"context_splits must be a sequence of splits other than the batched one ({split!r}), "
                             f"got {context_splits!r}")
        self.cache, self.split = cache, split
        self.users_per_batch, self.shuffle, self.seed = users_per_batch, checked_flag(shuffle, "shuffle"), int(seed)
        self.by_length = checked_flag(by_length, "by_length")
        self.max_session_length = int(max_session_length or max(cache.max_session_length, 1))
        self.epoch, self.next_index = 0, 0
        self.context_splits = tuple(context_splits)
        session_split = np.asarray(cache.session_split)
        user_session_offsets = np.asarray(cache.user_session_offsets)
        in_split = session_split == cache.split_code(split)
        self.users = np.unique(np.searchsorted(user_session_offsets, np.flatnonzero(in_split), side="right") - 1)
        in_context = np.isin(session_split, [cache.split_code(s) for s in self.context_splits])
        # Sessions are stored by user, then time: a user's sessions of the split and of the context
        # splits, in time order, are a subsequence of that user's sessions.
        sessions = np.flatnonzero(in_split | in_context)
        session_user = np.searchsorted(user_session_offsets, sessions, side="right") - 1
        keep = np.isin(session_user, self.users)
        sessions, session_user = sessions[keep], session_user[keep]
        offsets = np.asarray(cache.session_offsets)
        lengths = np.minimum(offsets[sessions + 1] - offsets[sessions], self.max_session_length)
        item = np.asarray(cache.item)
        # Per user of the split: its events (sessions concatenated), which of them open a session, and
        # how many lead as context.
        self._events, self._first, self._context = [], [], []
        bounds = np.searchsorted(session_user, self.users, side="left").tolist() + [sessions.shape[0]]
        for k in range(self.users.shape[0]):
            user_sessions = sessions[bounds[k]:bounds[k + 1]]
            user_lengths = lengths[bounds[k]:bounds[k + 1]]
            context = in_context[user_sessions]
            if context.any() and context.argmin() < np.flatnonzero(context).max():
                raise ValueError(f"context_splits {self.context_splits}: a session of user {self.users[k]} in "
                                 f"split {split!r} precedes one of the context splits; they must come first "
                                 "(a warm, by-time split)")
            self._context.append(int(user_lengths[context].sum()))
            self._events.append(np.concatenate([item[offsets[s]:offsets[s] + n]
                                                for s, n in zip(user_sessions, user_lengths)]).astype(np.int64))
            first = np.zeros(int(user_lengths.sum()), dtype=bool)
            first[np.cumsum(user_lengths) - user_lengths] = True
            self._first.append(first)
        self._lengths = np.array([e.shape[0] for e in self._events], dtype=np.int64)
        self.num_events = int(self._lengths.sum()) - sum(self._context)
        self.max_user_length = max((e.shape[0] for e in self._events), default=0)

    def num_batches(self, epoch: int | None = None) -> int:
        if epoch is not None:
            checked_position(epoch, "epoch")
        return -(-self.users.shape[0] // self.users_per_batch)

    def _order(self, epoch: int) -> np.ndarray:
        epoch = checked_position(epoch, "epoch")
        count = self.users.shape[0]
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        order = rng.permutation(count) if rng is not None else np.arange(count)
        if not self.by_length:
            return order
        order = order[np.argsort(self._lengths[order], kind="stable")]
        # The remainder (count % users_per_batch users) is the SHORTEST users' batch, so the longest users fill a
        # whole batch: the largest batch, what the memory peak is, holds users_per_batch users whatever the count.
        # It comes last: batch(index) slices this order every users_per_batch users, and a short batch anywhere
        # else would make every later slice straddle two length groups.
        short = count % self.users_per_batch
        batches = [order[i:i + self.users_per_batch] for i in range(short, count, self.users_per_batch)]
        if rng is not None:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if short:
            batches.append(order[:short])
        return np.concatenate(batches) if batches else order

    def batch(self, index: int, epoch: int | None = None) -> HistoryBatch:
        epoch = self.epoch if epoch is None else checked_position(epoch, "epoch")
        index = checked_index(index)
        if not 0 <= index < self.num_batches():
            raise IndexError(f"index {index} out of range: {self.num_batches()} batches per epoch")
        chosen = self._order(epoch)[index * self.users_per_batch:(index + 1) * self.users_per_batch]
        lengths = np.array([self._events[k].shape[0] for k in chosen], dtype=np.int64)
        time = int(lengths.max()) + 1
        items = np.zeros((chosen.shape[0], time), dtype=np.int64)
        first = np.zeros((chosen.shape[0], time - 1), dtype=bool)
        for row, k in enumerate(chosen):
            items[row, 1:lengths[row] + 1] = self._events[k]
            first[row, :lengths[row]] = self._first[k]
        context = None
        if self.context_splits:
            context = torch.tensor([self._context[k] for k in chosen], dtype=torch.int64)
        return HistoryBatch(torch.from_numpy(items), torch.from_numpy(lengths), torch.from_numpy(first),
                            torch.from_numpy(self.users[chosen].astype(np.int64)), epoch, index, context)

    def __iter__(self):
        """The remaining batches of the current epoch; the epoch advances at the end."""
        # A finished epoch (a position restored at its end) is left first; an epoch without batches (an empty split)
        # is not: the end below advances past it, one epoch per iteration as the lane batcher.
        if self.next_index > 0 and self.next_index >= self.num_batches():
            self.epoch, self.next_index = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.next_index < self.num_batches():
            index = self.next_index
            batch = self.batch(index, epoch)  # built before it counts: a batch that fails to build is not skipped
            self.next_index = index + 1
            yield batch
        if self.epoch == epoch and self.next_index >= self.num_batches():
            self.epoch, self.next_index = epoch + 1, 0

    def _identity(self) -> dict:
        return {"cache_key": self.cache.key, "split": self.split, "users_per_batch": self.users_per_batch,
                "max_session_length": self.max_session_length, "shuffle": self.shuffle, "seed": self.seed,
                "by_length": self.by_length, "context_splits": list(self.context_splits)}

    def state_dict(self) -> dict:
        return {**self._identity(), "epoch": self.epoch, "next_index": self.next_index, "state": None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position saved by :meth:`state_dict`, checked as the lane batcher checks its own: a foreign,
        malformed or out-of-range one raises and leaves this batcher as it was."""
        position = saved_position(state_dict, self._identity(), self.num_batches)
        if state_dict["state"] is not None:
            raise ValueError("state_dict: a user-history batcher has no state cache, got a state")
        self.epoch, self.next_index = position["epoch"], position["next_index"]


class HistoryTCN(NextItemModel):
    """NextItNet-like: a TCN over each user's whole history, no state and no sessions. Its blocks are HierTCN's
    (one causal conv and a residual each, no context), not NextItNet's (two convs with layer norm, kernel 3).

    Defaults: 128-d embeddings, four 128-channel blocks with dilations 1, 2, 4, 8 (receptive field
    61 events), kernel 5. forward(batch: HistoryBatch, state=None) -> (features (events,
    channels[-1]), None).
    """

    input_kind = "history"

    def __init__(self, num_items: int, embedding_dim: int = 128, channels=(128, 128, 128, 128), kernel_size: int = 5,
                 dilations=None, max_session_length: int = 20, dropout: float = 0.0, backend=None):
        channels = list(channels)
        if not channels:
            raise ValueError("channels must list at least one block")
        embedding_dim, kernel_size, max_session_length = check_positive(
            embedding_dim=embedding_dim, kernel_size=kernel_size, max_session_length=max_session_length)
        super().__init__(num_items, embedding_dim, channels[-1], dropout)
        self.max_session_length = max_session_length
        self.tcn = TCN(embedding_dim, channels, kernel_size, dilations, backend=backend)

    def forward(self, batch: HistoryBatch, state=None):
        if state is not None:
            raise ValueError("HistoryTCN has no state across batches; pass state=None")
        lengths, time = batch.lengths, batch.items.shape[1]
        if lengths.shape != (batch.items.shape[0],):
            raise ValueError(f"batch.lengths must be (users,) = ({batch.items.shape[0]},), got shape "
                             f"{tuple(lengths.shape)}")
        low, width = torch.stack(torch.aminmax(lengths)).tolist() if lengths.numel() else (0, 0)
        if low < 0 or width > time - 1:
            raise ValueError(f"batch.lengths must lie in [0, {time - 1}] (the events a row of items holds after its "
                             f"start token), got lengths in [{low}, {width}]")
        if batch.context_lengths is not None and bool(((batch.context_lengths < 0) |
                                                       (batch.context_lengths > lengths)).any()):
            raise ValueError("batch.context_lengths must lie in [0, lengths] (context events are a row's first)")
        if width == 0:
            return self.item_embedding.weight.new_zeros(0, self.output.in_features), None
        inputs = self.dropout(self.embed(batch.items[:, :width]))
        outputs = self.tcn(inputs)                                          # (users, width, channels)
        return outputs[batch.predicted(width)], None
