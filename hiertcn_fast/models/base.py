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

import torch
from torch import nn

__all__ = ["NextItemModel", "SessionInputs", "flat_context", "session_event_mask", "check_positive"]


def check_positive(**values) -> None:
    """Raise ValueError unless every keyword is a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
        check_positive(num_items=num_items, embedding_dim=embedding_dim, feature_dim=feature_dim)
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
        return self.item_embedding(items)

    def _check_state(self, state, lanes: int, like: torch.Tensor) -> torch.Tensor:
        """The state to start from: ``state`` checked, or zeros when None."""
        layers, hidden = self.state_shape
        if state is None:
            return like.new_zeros(layers, lanes, hidden)
        if state.shape != (layers, lanes, hidden):
            raise ValueError(f"state must be (layers, lanes, hidden) = {(layers, lanes, hidden)}, "
                             f"got {tuple(state.shape)}")
        return state


class SessionInputs:
    """The embedded sessions of a lane batch, trimmed to its longest session, and the rows worth running.

    embedded: (steps, lanes, width + 1, embedding_dim): position 0 the start token, then the items
    (``embedded_steps``: its per-step views);
    ``inputs()`` are positions 0..width-1 (what the low level reads), ``session_items()`` positions
    1..width (what the session aggregate reads). mask: bool (steps, lanes, width), the prediction
    events. rows: int64 (active rows,) indices into steps * lanes of the sessions with >= 1 event,
    so the low level never runs on empty lanes (the last batches of an epoch have many).
    """

    def __init__(self, model: NextItemModel, batch):
        self.lengths = batch.lengths                                        # (steps, lanes)
        self.steps, self.lanes = self.lengths.shape
        self.width = int(self.lengths.max()) if self.lengths.numel() else 0
        self.embedded = model.embed(batch.items[..., :self.width + 1])
        # Per-step views through one unbind: its backward stacks the steps' gradients once, where indexing
        # embedded[step] at each step would zero-fill and add a whole-batch gradient per step.
        self.embedded_steps = self.embedded.unbind(0)
        self._session_items = self.embedded[:, :, 1:].unbind(0)
        self.mask = session_event_mask(self.lengths, self.width)
        self.rows = torch.nonzero(self.lengths.reshape(-1) > 0)[:, 0]

    def inputs(self) -> torch.Tensor:
        """(active rows, width, embedding_dim): start token then items, one row per active session."""
        flat = self.embedded[:, :, :self.width].reshape(self.steps * self.lanes, self.width, -1)
        return flat.index_select(0, self.rows)

    def session_items(self, step: int) -> torch.Tensor:
        """(lanes, width, embedding_dim): the items of step ``step``'s sessions (padding beyond lengths)."""
        return self._session_items[step]

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """values (steps, lanes, ...) -> (active rows, ...)."""
        return values.reshape(self.steps * self.lanes, *values.shape[2:]).index_select(0, self.rows)

    def events(self, outputs: torch.Tensor) -> torch.Tensor:
        """outputs (active rows, width, features) -> (events, features) in batch_targets' order."""
        return outputs[self.per_row(self.mask)]


def flat_context(states: list[torch.Tensor]) -> torch.Tensor:
    """Per-step high-level states, each (layers, lanes, hidden) -> (steps, lanes, layers * hidden):
    the concatenation of the layer states that a session's low level sees at every event."""
    stacked = torch.stack(states)                                           # (steps, layers, lanes, hidden)
    steps, layers, lanes, hidden = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(steps, lanes, layers * hidden)
