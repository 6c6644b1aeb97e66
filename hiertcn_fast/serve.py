"""Streaming inference with a trained :class:`~hiertcn_fast.models.HierTCN`.

:class:`StreamingRecommender` keeps, per user, everything HierTCN needs of the past, and updates it
in O(1) work per event:

- ``state`` (layers, users, hidden): the high-level GRU state (the TCN's context);
- the TCN's step state (per layer a circular buffer of the last (k - 1) * dilation inputs,
  :class:`~hiertcn_fast.nn.TCNState`): the open session, as far as the convolution can see;
- ``session_sum`` (users, embedding_dim) and ``session_count``: the running sum of the open
  session's item embeddings, so closing a session (the session mean into the GRU) costs one
  GRU step, never a pass over the session;
- ``features`` (users, channels): the TCN output at the latest position, what the next item is
  predicted from; ``last_time``: the time of the user's latest event (or the ``now`` that closed their session).

An event at least ``session_gap`` seconds (default 30 min, the preprocessing's rule) after the
user's previous one closes the open session first: GRU step with the session mean, conv state
reset, and the new session's start token stepped with the new state. Events past
``max_session_length`` in a session are ignored, as the preprocessing drops them from training
data (they do not start a session either). Recommendations for a user with at least one event therefore
equal a full forward pass of the model over the same history (tests/test_serve.py); a user without one is
unknown (KeyError), not predicted from the start token.

The model must stay in eval mode and on the device and dtype it had when the recommender was made: every call
that runs the model (observing, scoring, recommending) checks, and refuses otherwise before anything changes (in
training mode its dropout would make the stored states and the scores random). A call that fails part way
through (out of memory, an interrupt) changes nothing either: what it may have changed by then is put back
(``_all_or_nothing``; for a known user's single event on the CPU, the row's copy its view keeps,
``_RowView.keep``).

Users live in rows ("slots") of these tensors, which grow by doubling and never shrink; :meth:`forget_users`
frees the rows of users who left for new users; ``state_dict`` / ``load_state_dict`` save and restore every
user (or a chosen subset with :meth:`export_users`); ``copy.deepcopy`` and pickle give an independent recommender
that goes on exactly as the original.

Every call may run inside ``torch.inference_mode()`` or outside it, in any mix: the stored tensors are made as
normal tensors either way (an inference tensor could not be updated in place outside inference mode later).

A recommender may be shared by threads (a server's pool, say): each public method, and a copy, holds the
recommender's lock for the whole call, so calls from several threads run one at a time, each as if alone (their
shared scratch states and the growth of the per-user tensors would otherwise mix users' states silently). The
model's kernels still run on torch's intra-op threads inside each call. For calls that overlap, give each thread its
own recommender over the same model, with its own users.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import functools
import math
import numbers
import threading

import numpy as np
import torch

from ._ints import is_int
from .models import HierTCN
from .models.base import NextItemModel
from .nn import TCNState
from .ops import CausalConvState

__all__ = ["StreamingRecommender"]

STATE_FORMAT = "hiertcn_fast.streaming_state/1"


def _numbers(values, name: str, dtype=None, device=None) -> torch.Tensor:
    """torch.as_tensor of an argument of numbers, with its name in the errors torch's own would leave unnamed: a
    reversed NumPy view is copied (torch takes no negative strides), and a number too large for its dtype is an
    error that names the argument."""
    if isinstance(values, np.ndarray) and any(stride < 0 for stride in values.strides):
        values = values.copy()
    try:
        return torch.as_tensor(values, dtype=dtype, device=device)
    except (OverflowError, RuntimeError, ValueError) as error:  # (a Python int past int64: "Overflow when unpacking")
        if "verflow" not in str(error):
            raise
        raise ValueError(f"{name} holds a number too large for {dtype or 'int64'}: {error}") from None


def _as_rows(values, dtype, device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype).reshape(-1).to(device)


def _storage_mode():
    """Where the recommender makes what it keeps between calls (its per-user tensors, scratch states, row views):
    outside inference mode even when called inside it. An inference tensor has no version counter (which
    _conv_step reads) and cannot be updated in place outside inference mode, so one made by a call under
    torch.inference_mode() would break every later call outside it. (Grad mode is on in there: make tensors only,
    compute nothing of the model.)"""
    return torch.inference_mode(False)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a normal tensor (a copy made outside inference mode if it is an inference tensor)."""
    if not t.is_inference():
        return t
    with _storage_mode():
        return t.clone()


def _refuse_non_numbers(values, name: str, what: str = "numbers, one per event", what_not_bool=None) -> None:
    """A clear word for text or truth values where numbers belong (torch.as_tensor would say "too many dimensions
    'str'", and would take True for 1 without a word)."""
    listed = isinstance(values, (list, tuple))
    if values is None or (listed and any(value is None for value in values)):
        raise TypeError(f"{name} must be {what}, got None")
    if isinstance(values, collections.abc.Iterator):
        raise TypeError(f"{name} must be {what} in a list, tuple, tensor or array, got a {type(values).__name__}")
    if isinstance(values, (str, bytes)) or (listed and any(isinstance(value, (str, bytes)) for value in values)):
        raise TypeError(f"{name} must be {what}, got text")
    if (isinstance(values, (bool, np.bool_)) or (isinstance(values, torch.Tensor) and values.dtype == torch.bool)
            or (isinstance(values, np.ndarray) and values.dtype == np.bool_)
            or (listed and any(isinstance(value, (bool, np.bool_)) for value in values))):
        raise TypeError(f"{name} must be {what_not_bool or what}, got a bool")


def _top_k(scores: torch.Tensor, k: int):
    """(values, indices) of the ``k`` best scores per row of (rows, items), best first, exact ties in the order of
    the item ids (lower first): the same items, in the same order, on every call and device, and top-``k`` a prefix
    of top-``(k + 1)``. torch.topk alone leaves the order of ties (and which tied item makes the cut) to its
    kernel. Only the items that score at least the k-th best value are sorted, not the catalogue, except in a row
    that has a NaN score: NaN sorts above everything and equals nothing (so the ties cannot be found by comparing
    with the k-th value), and that row's catalogue is sorted whole, its NaNs first in the order of the ids, then
    the rest as in any row. The other rows of the call are not affected."""
    top = scores.topk(k, dim=1)
    nan_rows = torch.isnan(top.values).any(1)  # (topk puts a row's NaNs first: none in its top k, none in the row)
    if bool(nan_rows.any()):
        values, indices = top.values.clone(), top.indices.clone()
        with_nan = nan_rows.nonzero().squeeze(1)
        whole = torch.sort(scores[with_nan], dim=1, descending=True, stable=True)
        values[with_nan], indices[with_nan] = whole.values[:, :k], whole.indices[:, :k]
        clean = (~nan_rows).nonzero().squeeze(1)
        if clean.numel():
            values[clean], indices[clean] = _top_k(scores[clean], k)
        return values, indices
    kth = top.values[:, -1:]
    candidate = scores >= kth
    counts = candidate.sum(1)
    if bool((counts == k).all()) and not bool((top.values[:, 1:] == top.values[:, :-1]).any()):
        return top.values, top.indices  # no tie anywhere in the top k: topk's order is the only one
    rows, items = torch.nonzero(candidate, as_tuple=True)  # row-major: item ids ascending within a row
    values = scores[rows, items]
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]  # grouped by row; score, then id, within it
    starts = torch.cumsum(counts, 0) - counts
    pick = order[(starts[:, None] + torch.arange(k, device=scores.device)).reshape(-1)]
    return values[pick].view(-1, k), items[pick].view(-1, k)


def _user_key(user):
    """A user id as the key it is stored under: a tensor or NumPy scalar by its value (a 0-d tensor hashes by
    identity, so it would be a new user at every call)."""
    if isinstance(user, (torch.Tensor, np.ndarray)):
        values = user.size if isinstance(user, np.ndarray) else user.numel()
        if values != 1:
            raise TypeError(f"a user id must be one value, got an array of shape {tuple(user.shape)}")
        return user.item()
    return user.item() if isinstance(user, np.generic) else user


def _user_keys(users, ordered: bool = True) -> list:
    """A sequence of user ids (a list, a 1-d tensor or array) as keys (see _user_key). Unless ``ordered`` is
    False (the order does not matter to the caller), a set or a mapping is refused: entries are paired with
    users by position, and a set's order is its hash order."""
    if isinstance(users, (str, bytes)):
        raise TypeError(f"users must be a sequence of user ids (a list, tuple, 1-d tensor or array), got the "
                        f"{type(users).__name__} {users!r}: pass [{users!r}] for one user")
    if ordered and isinstance(users, (collections.abc.Set, collections.abc.Mapping)):
        raise TypeError(f"users must be in order (a list, tuple, 1-d tensor or array), got a "
                        f"{type(users).__name__}, whose order is arbitrary: users would be paired with other "
                        f"arguments and results in hash order")
    if isinstance(users, (torch.Tensor, np.ndarray)):
        if users.ndim != 1:
            raise ValueError(f"users must be one-dimensional, got shape {tuple(users.shape)}")
        return users.tolist()
    return [_user_key(user) for user in users]


@dataclasses.dataclass
class _Scratch:
    """Where StreamingRecommender steps a set of rows: their conv state and TCN context, copied in."""

    conv: TCNState
    context: torch.Tensor
    # What context holds: (the state tensor, its version, the rows) it was copied from, or None.
    context_source: tuple | None = None


@dataclasses.dataclass
class _RowView:
    """One user's row: its conv state, running session sum and features as views of the recommender's tensors
    (stepped in place, nothing copied in or out), and its own TCN context, kept while the user's GRU state is
    unchanged. Single events of that user then take TCN.step's prepared step (csrc/python/tcn_step_plan.cpp)
    with the context term already computed."""

    conv: TCNState
    session_sum: torch.Tensor
    features: torch.Tensor
    context: torch.Tensor
    context_fresh: bool = False
    # What an event's update writes in place (the conv state, the session sum, the features), and a copy of it
    # taken before each event, put back should the update fail part way (an interrupt after the conv step).
    written: list = dataclasses.field(default_factory=list)
    backup: list = dataclasses.field(default_factory=list)

    def keep(self) -> None:
        if not self.written:
            # written is set last: should the copies fail (out of memory, an interrupt), the next event
            # tries again (a written list without its backup failed every later event of the user).
            written = [t for layer in self.conv.layers for t in (layer.history, layer.position)]
            written += [self.session_sum, self.features]
            with _storage_mode():
                self.backup = [t.clone() for t in written]
            self.written = written
        else:
            torch._foreach_copy_(self.backup, self.written)  # one call: a few microseconds per event

    def put_back(self) -> None:
        torch._foreach_copy_(self.written, self.backup)


def _locked(method):
    """The method run holding the recommender's lock (see the module docstring)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class StreamingRecommender:
    """Per-user streaming state over a trained HierTCN; see the module docstring.

    Args:
        model: a HierTCN (put in eval mode; its parameters are not changed).
        session_gap: seconds of inactivity that close a session (a gap equal to it closes it).
        max_session_length: events per session that count (default: the model's).
        initial_capacity: user rows allocated up front.
    """

    def __init__(self, model: HierTCN, session_gap: float = 1800.0, max_session_length: int | None = None,
                 initial_capacity: int = 64):
        if not isinstance(model, HierTCN):
            raise TypeError(f"StreamingRecommender needs a HierTCN (conv step state + GRU state), "
                            f"got {type(model).__name__}")
        if (not isinstance(session_gap, numbers.Real) or isinstance(session_gap, bool)
                or not 0 < session_gap < math.inf):
            raise ValueError(f"session_gap must be a positive, finite number of seconds, got {session_gap!r}")
        if not is_int(initial_capacity) or initial_capacity < 0:
            raise ValueError(f"initial_capacity must be an integer >= 0, got {initial_capacity!r}")
        self.model = model.eval()
        self.session_gap = float(session_gap)
        if max_session_length is None:
            max_session_length = model.max_session_length
        elif not is_int(max_session_length) or max_session_length < 1:
            raise ValueError(f"max_session_length must be an integer >= 1 (or None: the model's), got "
                             f"{max_session_length!r}")
        self.max_session_length = int(max_session_length)
        weight = model.output.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.user_slot: dict = {}
        self.capacity = 0
        layers, hidden = model.state_shape
        with _storage_mode():
            self.state = torch.zeros(layers, 0, hidden, device=self.device, dtype=self.dtype)
            self.conv = model.tcn.init_state(0)
            self.session_sum = torch.zeros(0, model.item_embedding.embedding_dim, device=self.device,
                                           dtype=self.dtype)
            self.session_count = torch.zeros(0, dtype=torch.int64, device=self.device)
            self.features = torch.zeros(0, model.output.in_features, device=self.device, dtype=self.dtype)
            self.last_time = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._lock = threading.RLock()
        self._scratches: dict = {}
        # Single events of a user on the CPU: that user's row views (least recently used first) and NumPy views
        # of the per-user counters, read and written as Python numbers (see _observe_one).
        self._row_views: collections.OrderedDict = collections.OrderedDict()
        self._counters = None
        # An item's embedding is a row of the embedding table unless the model changed how it embeds.
        embedding = model.item_embedding
        self._embedding_rows = (type(model).embed is NextItemModel.embed and type(embedding) is torch.nn.Embedding
                                and embedding.max_norm is None)
        self._grow(int(initial_capacity))

    # Copies (copy.deepcopy, pickle) keep the per-user tensors, not what is derived from them (rebuilt on use):
    # a copied NumPy view of the counters is an array of its own (the single-event path's updates through it
    # would miss the copy's tensors), a row view holds prepared steps, and a scratch state's context source
    # names the state by identity and version (a copy's version counter starts again).
    _DERIVED = ("_counters", "_row_views", "_scratches", "_lock")

    @_locked
    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key not in self._DERIVED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        # Copied or loaded inside inference mode, the tensors came back as inference tensors.
        for name in ("state", "session_sum", "session_count", "features", "last_time"):
            setattr(self, name, _normal(getattr(self, name)))
        if any(t.is_inference() for layer in self.conv.layers for t in (layer.history, layer.position)):
            self.conv = TCNState(CausalConvState(_normal(layer.history), _normal(layer.position), layer.kernel_size,
                                                 layer.dilation) for layer in self.conv.layers)
        self._scratches = {}
        self._row_views = collections.OrderedDict()
        self._storage_replaced()

    def _check_model(self) -> None:
        """The model as it was when the recommender was made: in eval mode (dropout off), on the device and in
        the dtype of the stored states."""
        if self.model.training:
            raise RuntimeError("the model is in training mode, whose dropout would make the stored states and the "
                               "scores random: call model.eval() before serving (the recommender put it in eval "
                               "mode when it was made)")
        weight = self.model._modules["output"]._parameters["weight"]
        if weight.dtype != self.dtype or weight.device != self.device:
            raise RuntimeError(f"the model's parameters are now {weight.dtype} on {weight.device}, but this "
                               f"recommender's states are {self.dtype} on {self.device}: move the model back, or "
                               f"make a new StreamingRecommender")

    # ---- storage ---------------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return

        def padded(t, dim=0):
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        with _storage_mode():
            state = padded(self.state, 1)
            session_sum, session_count = padded(self.session_sum), padded(self.session_count)
            features, last_time = padded(self.features), padded(self.last_time)
            conv = TCNState(CausalConvState(padded(layer.history), padded(layer.position), layer.kernel_size,
                                            layer.dilation) for layer in self.conv.layers)
        # Replaced together once all are made: a failure above (out of memory) leaves the storage as it was.
        self.state, self.session_sum, self.session_count = state, session_sum, session_count
        self.features, self.last_time, self.conv = features, last_time, conv
        self.capacity = capacity
        self._storage_replaced()

    def _storage_replaced(self) -> None:
        """Forget everything that views the per-user tensors (after they were reallocated or overwritten)."""
        self._row_views.clear()
        self._counters = ((self.session_count.numpy(), self.last_time.numpy()) if self.device.type == "cpu"
                          else None)

    def _states_changed(self, rows: torch.Tensor) -> None:
        """The GRU state of ``rows`` was written: their row views' contexts are stale."""
        for row in rows.tolist():
            view = self._row_views.get(row)
            if view is not None:
                view.context_fresh = False

    def _slots(self, users, create: bool) -> torch.Tensor:
        """Rows of ``users``; new users get fresh rows (their first session opened) when ``create``."""
        rows, fresh = [], []
        for user in users:
            slot = self.user_slot.get(user)
            if slot is None:
                if not create:
                    raise KeyError(f"unknown user {user!r}: observe() an event of it first")
                slot = len(self.user_slot)
                self.user_slot[user] = slot
                fresh.append(slot)
            rows.append(slot)
        if len(self.user_slot) > self.capacity:
            self._grow(max(2 * self.capacity, len(self.user_slot)))
        if fresh:
            self._open_sessions(torch.tensor(fresh, dtype=torch.int64, device=self.device))
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    # ---- the model's steps, for a set of rows ---------------------------------------------------------

    def _conv_step(self, rows: torch.Tensor, inputs: torch.Tensor) -> None:
        """Step the TCN of ``rows`` (distinct) with inputs (rows, embedding_dim); store the outputs.

        The rows' conv state and context are copied into a scratch state kept per row count and stepped there,
        then copied back: the same state and context tensors from call to call let TCN.step run its prepared
        step (csrc/python/tcn_step_plan.cpp) instead of the op's argument handling."""
        scratch = self._scratch(rows.shape[0])
        for layer, held in zip(self.conv.layers, scratch.conv.layers):
            torch.index_select(layer.history, 0, rows, out=held.history)
            torch.index_select(layer.position, 0, rows, out=held.position)
        # The context changes only when a session closes: left as it is (and so its cached context term with
        # it) while the same users step again and no state was written since.
        source = (self.state, self.state._version, rows.tolist())
        held = scratch.context_source
        if held is None or held[0] is not source[0] or held[1:] != source[1:]:
            scratch.context.copy_(self.model.context_of(self.state[:, rows]))
            scratch.context_source = source
        self.features[rows] = self.model.tcn.step(inputs, scratch.conv, scratch.context)
        for layer, stepped in zip(self.conv.layers, scratch.conv.layers):
            layer.history[rows] = stepped.history
            layer.position[rows] = stepped.position

    # Row counts whose scratch state is kept (observe() steps one row; observe_many's rounds their users).
    _SCRATCH_SIZES = 8

    def _scratch(self, count: int) -> "_Scratch":
        """The scratch state for ``count`` rows, made on first use for that count."""
        scratch = self._scratches.pop(count, None)
        if scratch is None:
            with _storage_mode():
                conv = TCNState(CausalConvState(layer.history.new_empty(count, *layer.history.shape[1:]),
                                                layer.position.new_empty(count), layer.kernel_size, layer.dilation)
                                for layer in self.conv.layers)
                scratch = _Scratch(conv, self.state.new_empty(count, self.model.context_dim))
            if len(self._scratches) >= self._SCRATCH_SIZES:
                del self._scratches[next(iter(self._scratches))]  # the least recently used count
        self._scratches[count] = scratch
        return scratch

    def _open_sessions(self, rows: torch.Tensor) -> None:
        """Start a session in ``rows``: empty conv history, then the start token (a zero embedding)."""
        for layer in self.conv.layers:
            layer.reset(rows)
        self.session_sum[rows] = 0
        self.session_count[rows] = 0
        self._conv_step(rows, self.session_sum.new_zeros(rows.shape[0], self.session_sum.shape[1]))

    def _close_sessions(self, rows: torch.Tensor) -> None:
        """The high-level step for the open sessions of ``rows`` (each with >= 1 event), then a new session."""
        self.state[:, rows] = self.model.close_sessions(self.session_sum[rows], self.session_count[rows],
                                                        self.state[:, rows])
        self._states_changed(rows)
        self._open_sessions(rows)

    # ---- single events of one user on the CPU ---------------------------------------------------------------

    # Users whose row views are kept: each holds a prepared step and its context term (a few KiB).
    _ROW_VIEWS = 4096

    def _row_view(self, row: int) -> _RowView:
        view = self._row_views.get(row)
        if view is None:
            rows = slice(row, row + 1)
            with _storage_mode():  # views made in inference mode could not be written outside it
                conv = TCNState(CausalConvState(layer.history[rows], layer.position[rows], layer.kernel_size,
                                                layer.dilation) for layer in self.conv.layers)
                view = _RowView(conv, self.session_sum[row], self.features[rows],
                                self.state.new_empty(1, self.model.context_dim))
            self._row_views[row] = view
            if len(self._row_views) > self._ROW_VIEWS:
                self._row_views.popitem(last=False)
        else:
            self._row_views.move_to_end(row)
        if not view.context_fresh:
            view.context.copy_(self.model.context_of(self.state[:, row:row + 1]))
            view.context_fresh = True
        return view

    def _close_one(self, view: _RowView, row: int) -> None:
        """_close_sessions for one row: the GRU step with its session mean, then its new session's start token."""
        rows = slice(row, row + 1)
        # The new state and its context are computed before anything is written: a failure there leaves the
        # user as it was (not with its GRU advanced and its session still open).
        state = self.model.close_sessions(self.session_sum[rows], self.session_count[rows], self.state[:, rows])
        context = self.model.context_of(state)
        view.context_fresh = False  # until the state is written too
        view.context.copy_(context)
        self.state[:, rows] = state
        view.context_fresh = True
        for layer in view.conv.layers:
            layer.reset()
        view.session_sum.zero_()
        self._counters[0][row] = 0
        view.features.copy_(self.model.tcn.step(view.session_sum.new_zeros(1, view.session_sum.shape[0]), view.conv,
                                                view.context))

    def _observe_one(self, user, item, timestamp) -> bool:
        """observe() of a known user on the CPU, with Python numbers where observe_many uses tensors of one
        element: False (nothing done) where that path must run (a new user, a tensor argument, other device)."""
        row = self.user_slot.get(user)
        if (row is None or self._counters is None or not is_int(item)
                or not isinstance(timestamp, numbers.Real) or isinstance(timestamp, bool)):
            return False
        if not 1 <= item <= self.model.num_items:
            raise ValueError(f"items must be item ids in 1..{self.model.num_items}")
        timestamp = float(timestamp)
        if not math.isfinite(timestamp):
            raise ValueError("timestamps must be finite numbers of seconds")
        count, last_time = self._counters
        if timestamp < last_time[row]:
            raise ValueError("timestamps must not decrease within a user's stream")
        view = self._row_view(row)
        closing = count[row] > 0 and timestamp - last_time[row] >= self.session_gap
        if closing:
            # The row is put back if the event fails after the GRU step was written (as observe_many's).
            with self._all_or_nothing(torch.tensor([row], device=self.device)):
                self._close_one(view, row)
                self._step_one(view, row, item, timestamp)
            return True
        # The conv step changes the row in place, and its sum, count and features follow: an interrupt between
        # them would leave the conv state an event ahead. So what the event writes is kept first, and put back.
        view.keep()
        kept = count[row], last_time[row]
        try:
            self._step_one(view, row, item, timestamp)
        except BaseException:
            view.put_back()
            count[row], last_time[row] = kept
            raise
        return True

    def _step_one(self, view: _RowView, row: int, item, timestamp: float) -> None:
        count, last_time = self._counters
        if count[row] < self.max_session_length:
            item = int(item)
            if self._embedding_rows:
                embedded = self.model.item_embedding.weight[item:item + 1]
            else:
                embedded = self.model.embed(torch.tensor([item], device=self.device))
            view.features.copy_(self.model.tcn.step(embedded, view.conv, view.context))
            view.session_sum += embedded[0]
            count[row] += 1
        last_time[row] = timestamp

    # ---- events ----------------------------------------------------------------------------------------

    @_locked
    @torch.no_grad()
    def observe(self, user, item: int, timestamp: float) -> None:
        """One event of ``user``: item id (1..num_items) at ``timestamp`` seconds (non-decreasing per user, and
        not before a ``now`` that closed the user's session)."""
        user = _user_key(user)
        self._check_model()
        if not self._observe_one(user, item, timestamp):
            self.observe_many([user], [item], [timestamp])

    @_locked
    @torch.no_grad()
    def observe_many(self, users, items, timestamps) -> None:
        """Events of many users at once (sequences of equal length, in time order per user). Vectorised
        over rounds in which every user appears at most once."""
        users = _user_keys(users)
        self._check_model()
        _refuse_non_numbers(items, "items", what_not_bool="integer item ids")
        _refuse_non_numbers(timestamps, "timestamps")
        given = _numbers(items, "items")
        if given.dim() > 1:
            raise ValueError(f"items must be one item id per event (one-dimensional), got shape {tuple(given.shape)}")
        times = _numbers(timestamps, "timestamps", torch.float64)
        if times.dim() > 1:
            raise ValueError(f"timestamps must be one time per event (one-dimensional), got shape "
                             f"{tuple(times.shape)}")
        if not users and given.numel() == 0 and times.numel() == 0:
            return
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
            raise TypeError(f"items must be integer item ids, got {given.dtype}")
        items = _as_rows(given, torch.int64, self.device)
        timestamps = _as_rows(times, torch.float64, self.device)
        if not len(users) == items.shape[0] == timestamps.shape[0]:
            raise ValueError(f"users, items and timestamps must have one entry per event, got {len(users)}, "
                             f"{items.shape[0]} and {timestamps.shape[0]}")
        if items.numel() and (int(items.min()) < 1 or int(items.max()) > self.model.num_items):
            raise ValueError(f"items must be item ids in 1..{self.model.num_items}")
        if not bool(torch.isfinite(timestamps).all()):
            raise ValueError("timestamps must be finite numbers of seconds")
        # Every check before the first change: a refused call changes nothing.
        known_rows, _ = self._check_time_order(users, timestamps)
        known = len(self.user_slot)
        # A call that fails part way through (out of memory, an interrupt) changes nothing: it puts back the known
        # users' rows as they are now, rather than leave some rounds or half a round applied (a round writes the conv
        # state and features, then the session sums and counts, and for closing sessions first the GRU state: an
        # interrupt can land between any two), and drops the new users it registered.
        touched = known_rows
        pending = list(range(len(users)))
        try:
            with self._all_or_nothing(touched) if touched is not None else contextlib.nullcontext():
                while pending:
                    seen, this_round, later = set(), [], []
                    for i in pending:
                        (later if users[i] in seen else this_round).append(i)
                        seen.add(users[i])
                    self._observe_round([users[i] for i in this_round], items[this_round], timestamps[this_round])
                    pending = later
        except BaseException:
            self._unregister_from(known)
            raise

    @contextlib.contextmanager
    def _all_or_nothing(self, rows: torch.Tensor):
        """Runs the block with ``rows`` saved as they are now, and puts them back if it fails (out of memory, an
        interrupt): for the steps that close sessions, whose GRU step is written before the new session's start
        token is stepped (a row left between the two would score every later event of its session wrongly)."""
        saved = self._save_rows(rows)
        try:
            yield
        except BaseException:
            self._restore_rows(rows, saved)
            raise

    def _save_rows(self, rows: torch.Tensor) -> list:
        with _storage_mode():
            return [t.index_select(0, rows) for t in self._per_user_tensors()]

    def _restore_rows(self, rows: torch.Tensor, saved: list) -> None:
        """Write back ``saved`` (the per-user tensors' ``rows``, taken by index_select) into the current storage
        (grown since, perhaps: rows keep their place when it grows)."""
        for t, values in zip(self._per_user_tensors(), saved):
            t.index_copy_(0, rows, values)
        self._states_changed(rows)

    def _unregister_from(self, first: int) -> None:
        """Drop the users in rows >= ``first``: those a failed call added (new users get the next rows, and
        nothing frees rows during a call), so none is left registered without its first event applied (it
        would be scored from an unopened session instead of refused as unknown)."""
        for user in [user for user, row in self.user_slot.items() if row >= first]:
            row = self.user_slot.pop(user)
            self._row_views.pop(row, None)
            if row < self.capacity:  # a failed growth did not make it
                self._clear_row(row)

    def _check_time_order(self, users, timestamps: torch.Tensor) -> tuple:
        """Each user's events in time order: within the call, and not before the user's latest event so far (or
        the ``now`` that closed the user's last session). Returns the rows of the known users in the call and
        the time of their first event in it (tensors), or (None, None) when it has no known user."""
        first, latest = {}, {}
        for user, t in zip(users, timestamps.tolist()):
            if t < latest.get(user, t):
                raise ValueError("timestamps must not decrease within a user's stream")
            latest[user] = t
            first.setdefault(user, t)
        known = [user for user in first if user in self.user_slot]
        if known:
            rows = torch.tensor([self.user_slot[user] for user in known], dtype=torch.int64, device=self.device)
            times = torch.tensor([first[user] for user in known], dtype=torch.float64, device=self.device)
            if bool((times < self.last_time[rows]).any()):
                raise ValueError("timestamps must not decrease within a user's stream")
            return rows, times
        return None, None

    def _observe_round(self, users, items: torch.Tensor, timestamps: torch.Tensor) -> None:
        rows = self._slots(users, create=True)
        count, last = self.session_count[rows], self.last_time[rows]
        opened = count > 0
        gap = opened & (timestamps - last >= self.session_gap)
        if bool(gap.any()):
            self._close_sessions(rows[gap])
            count = count.masked_fill(gap, 0)  # their new sessions are empty
        counted = count < self.max_session_length
        stepped = rows
        if not bool(counted.all()):
            stepped, items = rows[counted], items[counted]
        if stepped.numel():
            embedded = self.model.embed(items)
            self._conv_step(stepped, embedded)
            self.session_sum[stepped] += embedded
            self.session_count[stepped] += 1
        self.last_time[rows] = timestamps

    # ---- recommendations -------------------------------------------------------------------------------

    @_locked
    @torch.no_grad()
    def scores_many(self, users, now=None) -> torch.Tensor:
        """Logits (users, num_items + 1) of each user's next item (column 0, the padding id, is -inf), float32 (float64
        for a float64 model).
        With ``now`` (seconds, one per user or one for all), users idle for >= session_gap get
        first-of-session predictions (their open session is closed, as the next event would)."""
        users = _user_keys(users)
        self._check_model()
        rows = self._slots(users, create=False)
        if now is not None:
            _refuse_non_numbers(now, "now", "seconds, one time for all users or one per user")
            now = _numbers(now, "now", torch.float64, self.device)
            if now.dim() > 1 or now.numel() not in (1, rows.shape[0]):
                raise ValueError(f"now must be one time for all users or one per user ({rows.shape[0]}), got shape "
                                 f"{tuple(now.shape)}")
            if not bool(torch.isfinite(now).all()):
                raise ValueError("now must be a finite number of seconds")
            if now.numel() > 1 and len(set(users)) < len(users):
                times: dict = {}
                for user, t in zip(users, now.tolist()):
                    if times.setdefault(user, t) != t:
                        raise ValueError(f"user {user!r} is listed more than once with different times now")
            now = now.reshape(-1).expand(rows.shape[0])
            idle = (self.session_count[rows] > 0) & (now - self.last_time[rows] >= self.session_gap)
            if bool(idle.any()):
                closing = torch.unique(rows[idle])
                with self._all_or_nothing(closing):
                    self._close_sessions(closing)
                    # Their time is now that: a later event before it would contradict the closing.
                    self.last_time[rows[idle]] = now[idle]
        return self._logits(self.features[rows])

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """The model's scores of ``features`` (users, ...) with the padding id's column at -inf: in the model's
        dtype, half types in float32 (a float64 model is ranked on its float64 scores, as its full forward is)."""
        logits = self.model.scores(features)
        if logits.dtype != torch.float64:
            logits = logits.float()
        logits[:, 0] = -math.inf
        return logits

    @_locked
    @torch.no_grad()
    def scores(self, user, now=None) -> torch.Tensor:
        """Logits (num_items + 1,) of ``user``'s next item; see :meth:`scores_many`."""
        user = _user_key(user)
        self._check_model()
        row = self.user_slot.get(user)
        if (row is None or self._counters is None
                or not (now is None or (isinstance(now, numbers.Real) and not isinstance(now, bool)))):
            return self.scores_many([user], None if now is None else [now])[0]
        if now is not None:
            if not math.isfinite(now):
                raise ValueError("now must be a finite number of seconds")
            count, last_time = self._counters
            if count[row] > 0 and now - last_time[row] >= self.session_gap:
                with self._all_or_nothing(torch.tensor([row], device=self.device)):
                    self._close_one(self._row_view(row), row)
                    last_time[row] = now  # a later event before it would contradict the closing
        return self._logits(self.features[row:row + 1])[0]

    def _check_k(self, k) -> None:
        if not is_int(k) or not 1 <= k <= self.model.num_items:
            raise ValueError(f"k must be an integer in 1..{self.model.num_items}, got {k!r}")

    @_locked
    def recommend_many(self, users, k: int = 10, now=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items per user: (item ids (users, k) int64, scores (users, k)), best first; items of exactly
        equal scores in the order of their ids (so the top k are a prefix of the top k + 1)."""
        self._check_k(k)
        values, indices = _top_k(self.scores_many(users, now), int(k))
        return indices, values

    @_locked
    def recommend(self, user, k: int = 10, now=None) -> list[int]:
        """The top-``k`` item ids for ``user``'s next event, best first; ties as in :meth:`recommend_many`."""
        self._check_k(k)
        return _top_k(self.scores(user, now)[None], int(k))[1][0].tolist()

    # ---- forgetting users ---------------------------------------------------------------------------

    @_locked
    @torch.no_grad()
    def forget_users(self, users) -> None:
        """Drop everything held for ``users`` (known users; listing one twice is allowed): their rows are freed
        for new users, so the rows in use follow the users served rather than every user ever seen (the
        tensors keep their capacity: they never shrink). The last users' rows move into the freed ones (the
        others' recommendations do not change). An unknown user is refused before anything changes."""
        keys = list(dict.fromkeys(_user_keys(users, ordered=False)))
        unknown = [user for user in keys if user not in self.user_slot]
        if unknown:
            raise KeyError(f"unknown user {unknown[0]!r}: only users with events can be forgotten")
        # The plan first (where each remaining user's row goes), then the rows, saved to be put back on failure,
        # and the users' rows last, in one assignment: an interrupt anywhere leaves every user with its own state.
        slots, owner, steps = dict(self.user_slot), {row: user for user, row in self.user_slot.items()}, []
        for user in keys:
            row = slots.pop(user)
            last = len(slots)  # the last occupied row, which moves into the freed one
            if row != last:
                moved = owner.pop(last)
                slots[moved] = row
                owner[row] = moved
            else:
                owner.pop(row)
            steps.append((row, last))
        touched = sorted({row for step in steps for row in step})
        rows, previous = torch.tensor(touched, dtype=torch.int64, device=self.device), self.user_slot
        saved = self._save_rows(rows)
        try:  # (not _all_or_nothing's with: its exit, after the users' rows are replaced, could still put rows back)
            for row in touched:
                self._row_views.pop(row, None)  # (views cache a row's user's context)
            for row, last in steps:
                if row != last:
                    self._copy_row(last, row)
                self._clear_row(last)
            self.user_slot = slots
        except BaseException:
            self.user_slot = previous
            self._restore_rows(rows, saved)
            raise

    def _per_user_tensors(self) -> list:
        """Every per-user tensor, users along dim 0 (the GRU state seen as (users, layers, hidden))."""
        return [self.state.transpose(0, 1), self.session_sum, self.session_count, self.features, self.last_time,
                *[t for layer in self.conv.layers for t in (layer.history, layer.position)]]

    def _copy_row(self, source: int, target: int) -> None:
        for t in self._per_user_tensors():
            t[target] = t[source]

    def _clear_row(self, row: int) -> None:
        """A freed row back to what a new user's row holds before its first event (zeros)."""
        for t in self._per_user_tensors():
            t[row] = 0

    # ---- saving and restoring --------------------------------------------------------------------------

    @_locked
    def export_users(self, users=None) -> dict:
        """Every per-user tensor of ``users`` (default: all), on the CPU, with their ids. A user listed more than
        once is exported once, at its first place (as forget_users takes it), so that the state loads."""
        users = list(self.user_slot) if users is None else list(dict.fromkeys(_user_keys(users)))
        rows = self._slots(users, create=False)
        return {"format": STATE_FORMAT, "users": users, "session_gap": self.session_gap,
                "max_session_length": self.max_session_length, "state": self.state[:, rows].cpu(),
                "conv_history": [layer.history[rows].cpu() for layer in self.conv.layers],
                "conv_position": [layer.position[rows].cpu() for layer in self.conv.layers],
                "session_sum": self.session_sum[rows].cpu(), "session_count": self.session_count[rows].cpu(),
                "features": self.features[rows].cpu(), "last_time": self.last_time[rows].cpu()}

    @_locked
    def state_dict(self) -> dict:
        return self.export_users()

    @_locked
    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        """Restore users saved by :meth:`state_dict` / :meth:`export_users` (replacing their current
        state; other users are kept). The model must be the one they were made with, and the session rules
        (session_gap, max_session_length) the ones they were saved with. Everything is checked before anything
        is changed: a refused state leaves the recommender as it was. A load that fails part way through (out of
        memory, an interrupt) changes nothing either: the known users' rows are put back and the new users dropped,
        so no user is left half loaded (its GRU state written, its session not)."""
        values = self._checked_saved(saved)
        users = values.pop("users")
        known = len(self.user_slot)
        replaced = [self.user_slot[user] for user in users if user in self.user_slot]
        try:
            for user in users:  # (inside the try: an interrupt between two leaves none registered)
                if user not in self.user_slot:
                    self.user_slot[user] = len(self.user_slot)
            if len(self.user_slot) > self.capacity:
                self._grow(max(2 * self.capacity, len(self.user_slot)))
            rows = torch.tensor([self.user_slot[u] for u in users], dtype=torch.int64, device=self.device)
            at_risk = torch.tensor(replaced, dtype=torch.int64, device=self.device)
            with self._all_or_nothing(at_risk) if replaced else contextlib.nullcontext():
                self.state[:, rows] = values["state"]
                self._states_changed(rows)
                for layer, history, position in zip(self.conv.layers, values["conv_history"],
                                                    values["conv_position"]):
                    layer.history[rows] = history
                    layer.position[rows] = position
                for name in ("session_sum", "session_count", "features", "last_time"):
                    getattr(self, name)[rows] = values[name]
        except BaseException:
            self._unregister_from(known)
            raise

    def _checked_saved(self, saved) -> dict:
        """The tensors of a saved state, checked against this recommender and converted to its device and dtypes."""
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            format_ = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"not a streaming state (format {format_!r}, expected {STATE_FORMAT!r})")
        missing = [key for key in ("users", "session_gap", "max_session_length", "state", "conv_history",
                                   "conv_position", "session_sum", "session_count", "features", "last_time")
                   if key not in saved]
        if missing:
            raise ValueError(f"the saved state lacks {', '.join(missing)}")
        for key in ("session_gap", "max_session_length"):
            if saved[key] != getattr(self, key):
                raise ValueError(f"the state was saved with {key} = {saved[key]!r}, this recommender has "
                                 f"{getattr(self, key)!r}: its sessions would be cut differently")
        users = _user_keys(saved["users"])  # by value, as every other call takes them (a 0-d tensor by identity)
        if len(set(users)) != len(users):
            raise ValueError("the saved state lists a user more than once")
        n = len(users)
        layers = self.conv.layers
        if not (isinstance(saved["conv_history"], (list, tuple)) and isinstance(saved["conv_position"], (list, tuple))
                and len(saved["conv_history"]) == len(saved["conv_position"]) == len(layers)):
            raise ValueError(f"the saved state must have conv_history and conv_position lists of one entry per TCN "
                             f"layer ({len(layers)})")
        expected = {"state": (self.state.shape[0], n, self.state.shape[2]),
                    "session_sum": (n, self.session_sum.shape[1]), "session_count": (n,),
                    "features": (n, self.features.shape[1]), "last_time": (n,)}
        expected.update({f"conv_history[{l}]": (n, *layer.history.shape[1:]) for l, layer in enumerate(layers)})
        expected.update({f"conv_position[{l}]": (n,) for l in range(len(layers))})
        given = {key: saved[key] for key in ("state", "session_sum", "session_count", "features", "last_time")}
        given.update({f"conv_history[{l}]": t for l, t in enumerate(saved["conv_history"])})
        given.update({f"conv_position[{l}]": t for l, t in enumerate(saved["conv_position"])})
        counts = ("session_count", *(f"conv_position[{l}]" for l in range(len(layers))))
        for key, t in given.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"saved {key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected[key]:
                raise ValueError(f"saved {key} must have shape {expected[key]} for {n} users, got {tuple(t.shape)}")
            integral = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
            if integral != (key in counts):
                raise TypeError(f"saved {key} has dtype {t.dtype}: expected {'integers' if key in counts else 'floats'}")
        if any(bool((given[key] < 0).any()) for key in counts):
            raise ValueError("saved session counts and conv positions must be >= 0")
        if bool((given["session_count"] > self.max_session_length).any()):
            raise ValueError(f"saved session counts must be <= max_session_length ({self.max_session_length})")
        if not bool(torch.isfinite(given["last_time"]).all()):
            raise ValueError("saved last_time must hold finite times")
        for key, t in given.items():  # a NaN state would make every later score of its user NaN
            if key not in counts and key != "last_time" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"saved {key} holds NaN or infinite values")
        to = dict(device=self.device)
        values = {key: given[key].to(**to, dtype=torch.int64 if key in counts
                                     else torch.float64 if key == "last_time" else self.dtype)
                  for key in given}
        values["conv_history"] = [values.pop(f"conv_history[{l}]") for l in range(len(layers))]
        values["conv_position"] = [values.pop(f"conv_position[{l}]") for l in range(len(layers))]
        values["users"] = users
        return values
