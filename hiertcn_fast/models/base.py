"""What every neural next-item model of hiertcn_fast shares: the item embedding, the output layer
over the whole catalogue, and the contract with the training loop.

Contract. ``model(batch, state) -> (features, new_state)``:

- ``batch``: a :class:`~hiertcn_fast.data.SessionBatch` (``input_kind == "sessions"``) or a
  :class:`~hiertcn_fast.models.history_tcn.HistoryBatch` (``input_kind == "history"``);
- ``state``: the high-level state carried between batches, (layers, lanes, hidden) as in
  :class:`~hiertcn_fast.data.LaneStateCache` (``state_shape == (layers, hidden)``), or None for
  models without one;
- ``features``: (events, feature_dim), one row per prediction event of the batch, in the order of
  :func:`hiertcn_fast.evaluate.batch_targets` (row-major over (steps, lanes, position));
- ``new_state``: the state after the batch (not detached: truncated BPTT is the loop's job).

``model.scores(features)`` -> (events, num_items + 1) logits, column i for item id i (column 0 is
the padding/start token, never a target). Keeping the output layer apart lets the loop run it under
bf16 autocast while the fused kernels run in float32, and lets a sampled softmax read only the
rows of the output layer it needs.
"""

from __future__ import annotations

import bisect
import functools
import math

import torch
from torch import nn

from .._ints import is_int

__all__ = ["NextItemModel", "SessionInputs", "flat_context", "length_groups", "session_event_mask", "check_positive"]


def check_positive(**values) -> tuple:
    """Raise ValueError unless every keyword is a positive integer (a Python or NumPy one, not a bool); returns
    the values as plain ints, in the keywords' order."""
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return tuple(int(value) for value in values.values())


def session_event_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """lengths (...,) -> bool (..., width): position t of a session is a prediction event iff t < length."""
    return torch.arange(width, device=lengths.device) < lengths[..., None]


class NextItemModel(nn.Module):
    """Base class: ``item_embedding`` (num_items + 1, embedding_dim), padding row 0 (the zero start
    token), and ``output`` Linear(feature_dim -> num_items + 1).

    Subclasses set ``input_kind`` and ``state_shape`` and implement ``forward``.
    """

    input_kind = "sessions"

    def __init__(self, num_items: int, embedding_dim: int, feature_dim: int, dropout: float = 0.0):
        super().__init__()
        num_items, embedding_dim, feature_dim = check_positive(num_items=num_items, embedding_dim=embedding_dim,
                                                               feature_dim=feature_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_items = num_items
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        # nn.Embedding's N(0, 1) makes a 128-d session mean ~10x larger than the conv and GRU inputs
        # they were initialised for; a Linear-like scale keeps the first steps of Adam stable.
        nn.init.normal_(self.item_embedding.weight, std=embedding_dim ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(feature_dim, num_items + 1)

    @property
    def state_shape(self) -> tuple[int, int] | None:
        """(layers, hidden) of the state carried between batches, or None."""
        return None

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """features (events, feature_dim) -> logits (events, num_items + 1)."""
        return self.output(self.dropout(features))

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) int64 -> (..., embedding_dim); the start/padding id 0 embeds to zeros."""
        if items.dtype != torch.int64:
            raise TypeError(f"items must be int64 item ids, got {items.dtype}")
        if items.numel():  # (the embedding's own error would not say which ids are wrong; on CUDA, an assert)
            low, high = torch.stack(torch.aminmax(items)).tolist()
            if low < 0 or high > self.num_items:
                raise ValueError(f"items must be item ids in 1..{self.num_items} (0: the start/padding id), got "
                                 f"ids in [{low}, {high}]")
        return self.item_embedding(items)

    def _check_state(self, state, lanes: int, like: torch.Tensor) -> torch.Tensor:
        """The state to start from: ``state`` checked, or zeros when None."""
        layers, hidden = self.state_shape
        if state is None:
            return like.new_zeros(layers, lanes, hidden)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor or None, got {type(state).__name__}")
        if state.shape != (layers, lanes, hidden):
            raise ValueError(f"state must be (layers, lanes, hidden) = {(layers, lanes, hidden)}, "
                             f"got {tuple(state.shape)}")
        if state.dtype != like.dtype or state.device != like.device:
            raise TypeError(f"state has dtype {state.dtype} on {state.device} but the model's activations have "
                            f"{like.dtype} on {like.device}; pass a state made like them (or None)")
        return state


class _EmbeddingReads(torch.autograd.Function):
    """The two reads of a lane batch's embeddings (steps, lanes, width + 1, dim): rows ``positions`` of them seen
    as a (steps * lanes * (width + 1), dim) matrix (the low level's inputs), and the session items, positions
    1..width of every step's sessions (a view: what the high level averages). Its backward fills one
    embeddings-sized gradient: the items' gradient copied in, position 0 zeroed, the rows' gradient added.
    Autograd's own backward of a gather and a slice zero-fills a buffer of that size for each and adds them."""

    @staticmethod
    def forward(ctx, embedded, positions):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(positions)
        ctx.embedded_shape = embedded.shape
        return embedded.reshape(-1, embedded.shape[-1]).index_select(0, positions), embedded[:, :, 1:]

    @staticmethod
    def backward(ctx, grad_rows, grad_items):
        positions, = ctx.saved_tensors
        given = [g for g in (grad_rows, grad_items) if g is not None]
        if not given:
            return None, None
        grad = given[0].new_empty(ctx.embedded_shape)
        grad[:, :, :1].zero_()
        if grad_items is not None:
            grad[:, :, 1:].copy_(grad_items)
        else:
            grad[:, :, 1:].zero_()
        if grad_rows is not None:
            grad.view(-1, grad.shape[-1]).index_add_(0, positions, grad_rows)
        return grad, None


class _GatherEvents(torch.autograd.Function):
    """The events of the low level's groups in the batch's order: row ``sources[g][i]`` of group g's outputs
    (rows, width, features), seen as (rows * width, features), becomes row ``destinations[g][i]`` of the
    (total, features) result (destinations None: one group, in its own order). Every event comes from exactly
    one position, so the backward copies the gradient's rows back (the padding's gradient zero) where
    autograd's backward of a boolean-mask read, a cat and a permuting index_select accumulates through a
    sorting index_put and adds the groups' buffers."""

    @staticmethod
    def forward(ctx, total, sources, destinations, *outputs):
        ctx.set_materialize_grads(False)
        ctx.index = (sources, destinations)
        ctx.shapes = [o.shape for o in outputs]
        features = outputs[0].shape[-1]
        if destinations[0] is None:
            return outputs[0].reshape(-1, features).index_select(0, sources[0])
        out = outputs[0].new_empty(total, features)
        for output, source, destination in zip(outputs, sources, destinations):
            out.index_copy_(0, destination, output.reshape(-1, features).index_select(0, source))
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * (3 + len(ctx.shapes))
        grads = []
        for shape, source, destination in zip(ctx.shapes, *ctx.index):
            g = grad.new_zeros(shape.numel() // shape[-1], shape[-1])
            g.index_copy_(0, source, grad if destination is None else grad.index_select(0, destination))
            grads.append(g.view(shape))
        return None, None, None, *grads


class SessionInputs:
    """The embedded sessions of a lane batch, trimmed to its longest session, and the rows worth running.

    embedded: (steps, lanes, width + 1, embedding_dim): position 0 the start token, then the items
    (``embedded_steps``: its per-step views);
    the low level reads positions 0..width-1 (``low_level``), ``session_items()`` positions 1..width (what
    the session aggregate reads). mask: bool (steps, lanes, width), the prediction
    events. rows: int64 (active rows,) indices into steps * lanes of the sessions with >= 1 event,
    so the low level never runs on empty lanes (the last batches of an epoch have many).
    """

    def __init__(self, model: NextItemModel, batch):
        self.lengths = batch.lengths                                        # (steps, lanes)
        self.steps, self.lanes = self.lengths.shape
        if self.steps == 0:
            raise ValueError(f"a batch needs at least one step, got lengths of shape {tuple(self.lengths.shape)}")
        low, self.width = torch.stack(torch.aminmax(self.lengths)).tolist() if self.lengths.numel() else (0, 0)
        if low < 0 or self.width > batch.items.shape[-1] - 1:
            raise ValueError(f"batch.lengths must lie in [0, {batch.items.shape[-1] - 1}] (the events a session's row "
                             f"of items holds after its start token), got lengths in [{low}, {self.width}]")
        self.embedded = model.embed(batch.items[..., :self.width + 1])
        self.mask = session_event_mask(self.lengths, self.width)
        self.rows = torch.nonzero(self.lengths.reshape(-1) > 0)[:, 0]
        self._reads = None  # see _read()

    def _gather_with_items(self, row_groups: list[torch.Tensor], widths: list[int]):
        """Per group, (len(rows), width, embedding_dim): positions 0..width-1 of the sessions ``rows`` (indices
        into steps * lanes), all groups in one gather from the embeddings seen as a matrix and split into views;
        and the session items (steps, lanes, width, embedding_dim). Both reads go through one autograd node
        (_EmbeddingReads), whose backward fills one embeddings-sized gradient buffer."""
        dim = self.embedded.shape[-1]
        stride = self.embedded.shape[-2]                          # width + 1 positions per session
        positions = [(rows[:, None] * stride + torch.arange(width, device=rows.device)).reshape(-1)
                     for rows, width in zip(row_groups, widths)]
        gathered, items = _EmbeddingReads.apply(self.embedded, torch.cat(positions))
        groups = [chunk.view(rows.numel(), width, dim)
                  for chunk, rows, width in zip(gathered.split([p.numel() for p in positions]), row_groups, widths)]
        return groups, items

    def _read(self):
        """What the high level and the low level read of the embeddings, read once, on first need: (the active
        sessions' lengths, the group widths, each group's members (indices into the active rows; None: one
        group of every active row at the batch's width), each group's inputs, the session items (steps, lanes,
        width, embedding_dim))."""
        grad_mode = torch.is_grad_enabled()  # reads made without gradients would give the embeddings none
        if self._reads is None or self._reads[0] != grad_mode:
            lengths = self.lengths.reshape(-1).index_select(0, self.rows)
            widths = length_groups(lengths.tolist())
            member_groups = None
            if len(widths) <= 1:
                row_groups, widths = [self.rows], [self.width]
            else:
                group = torch.bucketize(lengths, torch.tensor(widths, device=lengths.device))
                members = torch.argsort(group, stable=True)
                counts = torch.bincount(group, minlength=len(widths)).tolist()
                member_groups = members.split(counts)
                row_groups = [self.rows.index_select(0, rows) for rows in member_groups]
            group_inputs, items = self._gather_with_items(row_groups, widths)
            self._reads = (grad_mode, lengths, widths, member_groups, group_inputs, items)
        return self._reads[1:]

    @functools.cached_property
    def embedded_steps(self) -> tuple:
        """Per-step views of ``embedded`` through one unbind (made on first use: only HRNN reads them): its backward
        stacks the steps' gradients once, where indexing embedded[step] at each step would zero-fill and add a
        whole-batch gradient per step."""
        return self.embedded.unbind(0)

    def session_items(self) -> torch.Tensor:
        """(steps, lanes, width, embedding_dim): the items of every step's sessions (padding beyond lengths)."""
        return self._read()[4]

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """values (steps, lanes, ...) -> (active rows, ...)."""
        return values.reshape(self.steps * self.lanes, *values.shape[2:]).index_select(0, self.rows)

    def events(self, outputs: torch.Tensor) -> torch.Tensor:
        """outputs (active rows, width, features) -> (events, features) in batch_targets' order."""
        sources = torch.nonzero(self.per_row(self.mask).reshape(-1))[:, 0]
        return _GatherEvents.apply(sources.numel(), [sources], [None], outputs)

    def low_level(self, network, *row_values: torch.Tensor) -> torch.Tensor:
        """The within-session network over every active session, in groups of similar length.

        ``network(inputs (rows, w, embedding_dim), *values (rows, ...)) -> (rows, w, features)`` must be causal
        over positions (output t reads inputs 0..t only, as the TCN and the GRUs are), so a session's events
        do not depend on how far its input is padded. row_values are (active rows, ...) per-session inputs
        (e.g. the high-level context). Sessions shorter than the batch's longest run trimmed to the longest of
        their group (:func:`length_groups`) instead of all being padded to ``width``: on ml-100k's lane batches
        43% of the padded positions are padding, and the long-history benchmark's two thirds. Returns (events,
        features) in batch_targets' order.
        """
        # Each group's sessions gathered at the group's width (no group keeps another's padding).
        lengths, widths, member_groups, group_inputs, _ = self._read()
        if member_groups is None:
            return self.events(network(group_inputs[0], *row_values))
        starts = torch.cumsum(lengths, 0) - lengths                # each active session's first event
        outputs, sources, destinations = [], [], []
        for width, rows, inputs in zip(widths, member_groups, group_inputs):
            outputs.append(network(inputs, *(value.index_select(0, rows) for value in row_values)))
            position = torch.arange(width, device=lengths.device)
            # The group's events: where in its (rows * width) outputs they are, and where in the batch's order.
            mask = (position < lengths.index_select(0, rows)[:, None]).reshape(-1)
            sources.append(torch.nonzero(mask)[:, 0])
            destinations.append((starts.index_select(0, rows)[:, None] + position).reshape(-1).index_select(
                0, sources[-1]))
        return _GatherEvents.apply(int(lengths.sum()), sources, destinations, *outputs)


# What a group costs beyond its positions (its calls, gathers and the scatter back), in positions, and at most
# this many groups. Chosen by measurement: training events/s on ml-100k at width 128, one thread, 3 epochs
# each, with an overhead of 16 / 64 / 256 positions against no grouping: hiertcn 31.4k / 32.9k / 33.0k against
# 29.4k, hiergru 32.5k / 32.9k / 32.5k against 27.3k, session_gru 47.7k / 47.9k / 48.8k against 39.9k.
GROUP_OVERHEAD_POSITIONS = 64
MAX_LENGTH_GROUPS = 4
_MAX_CANDIDATE_WIDTHS = 32


def length_groups(lengths: list[int]) -> list[int]:
    """The widths of the groups that sessions of these lengths (each >= 1) are run in: at most
    MAX_LENGTH_GROUPS groups of consecutive lengths, each run at its longest, chosen to minimise the positions
    run plus GROUP_OVERHEAD_POSITIONS per group. Ascending; the last is the longest length. Deterministic."""
    if not lengths:
        return []
    ordered = sorted(lengths)
    distinct = sorted(set(ordered))
    if len(distinct) > _MAX_CANDIDATE_WIDTHS:  # groups end only at quantiles of the sessions, and at the longest
        last = len(ordered) - 1
        distinct = sorted({ordered[last * i // (_MAX_CANDIDATE_WIDTHS - 1)] for i in range(_MAX_CANDIDATE_WIDTHS)})
    below = [bisect.bisect_right(ordered, end) for end in distinct]  # sessions no longer than each candidate
    m = len(distinct)
    # best[g][i]: the least cost of running the sessions up to distinct[i] in g + 1 groups, the last ending at
    # distinct[i]; previous[g][i]: where the group before it ends (-1: none).
    best = [[below[i] * distinct[i] + GROUP_OVERHEAD_POSITIONS for i in range(m)]]
    previous = [[-1] * m]
    for g in range(1, MAX_LENGTH_GROUPS):
        row, back = [math.inf] * m, [-1] * m
        for i in range(m):
            for j in range(i):
                cost = best[g - 1][j] + (below[i] - below[j]) * distinct[i] + GROUP_OVERHEAD_POSITIONS
                if cost < row[i]:
                    row[i], back[i] = cost, j
        best.append(row)
        previous.append(back)
    g = min(range(MAX_LENGTH_GROUPS), key=lambda k: (best[k][m - 1], k))
    widths, i = [], m - 1
    while i >= 0:
        widths.append(distinct[i])
        i, g = previous[g][i], g - 1
    return widths[::-1]


def flat_context(states) -> torch.Tensor:
    """Per-step high-level states, each (layers, lanes, hidden), as a list or stacked (steps, layers, lanes,
    hidden) -> (steps, lanes, layers * hidden): the concatenation of the layer states that a session's low level
    sees at every event."""
    stacked = states if isinstance(states, torch.Tensor) else torch.stack(states)
    steps, layers, lanes, hidden = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(steps, lanes, layers * hidden)
