"""The neural baselines HierTCN is compared with, on the same lane batches and training loop.

- :class:`HierGRU`: HierTCN's hierarchy with a GRU inside sessions (input concat(emb(x_t), s) at
  every step, s the high-level state): isolates what the TCN buys over a recurrent low level.
- :class:`HRNN` (Quadrana et al., RecSys 2017): a user GRU whose state initialises each session
  GRU (h0 = tanh(W s + b)) and is updated with the session GRU's final state when the session
  ends. Session j's network needs the user state after session j - 1, which needs session j - 1's
  network: the steps of a batch run one after another.
- :class:`SessionGRU` (GRU4Rec-style): a GRU over each session from a zero state, no user state.

The single-level TCN over the whole user history lives in :mod:`.history_tcn` (it needs its own
batches).
"""

from __future__ import annotations

import torch

from ..nn import GRU
from ..ops import session_update
from .base import NextItemModel, SessionInputs, check_positive
from .hiertcn import HierTCN

__all__ = ["HierGRU", "HRNN", "SessionGRU"]


class HierGRU(NextItemModel):
    """The HierTCN hierarchy (same high-level GRU, same session mean aggregate) with a GRU of
    ``session_hidden`` units inside sessions reading concat(emb(x_t), s) at every step.

    forward(batch, state (layers, lanes, hidden) or None) -> (features (events, session_hidden), new state).
    """

    def __init__(self, num_items: int, embedding_dim: int = 128, state_layers: int = 2, state_hidden: int = 128,
                 session_hidden: int = 128, session_layers: int = 1, max_session_length: int = 20,
                 dropout: float = 0.0, backend=None):
        (embedding_dim, state_layers, state_hidden, session_hidden, session_layers,
         max_session_length) = check_positive(embedding_dim=embedding_dim, state_layers=state_layers,
                                              state_hidden=state_hidden, session_hidden=session_hidden,
                                              session_layers=session_layers, max_session_length=max_session_length)
        super().__init__(num_items, embedding_dim, session_hidden, dropout)
        self.max_session_length = max_session_length
        self.backend = backend
        self.state_gru = GRU(embedding_dim, state_hidden, num_layers=state_layers, batch_first=True, backend=backend)
        self.session_gru = GRU(embedding_dim + state_layers * state_hidden, session_hidden, num_layers=session_layers,
                               batch_first=True, backend=backend)

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.state_gru.num_layers, self.state_gru.hidden_size

    run_high_level = HierTCN.run_high_level

    def forward(self, batch, state=None):
        sessions, contexts, new_state = self.run_high_level(batch, state)
        if sessions.rows.numel() == 0:
            return sessions.embedded.new_zeros(0, self.output.in_features), new_state

        def network(inputs, context):
            context = context[:, None].expand(-1, inputs.shape[1], -1)
            return self.session_gru(torch.cat([self.dropout(inputs), context], dim=-1))[0]

        return sessions.low_level(network, sessions.per_row(contexts)), new_state


class HRNN(NextItemModel):
    """Hierarchical RNN: user GRU (``user_layers`` x ``user_hidden``) -> session GRU initial state.

    The session representation fed to the user GRU is the session GRU's state after the session's
    last item. forward(batch, state (user_layers, lanes, user_hidden) or None) -> (features
    (events, session_hidden), new state).
    """

    def __init__(self, num_items: int, embedding_dim: int = 128, user_layers: int = 1, user_hidden: int = 128,
                 session_hidden: int = 128, max_session_length: int = 20, dropout: float = 0.0, backend=None):
        embedding_dim, user_layers, user_hidden, session_hidden, max_session_length = check_positive(
            embedding_dim=embedding_dim, user_layers=user_layers, user_hidden=user_hidden,
            session_hidden=session_hidden, max_session_length=max_session_length)
        super().__init__(num_items, embedding_dim, session_hidden, dropout)
        self.max_session_length = max_session_length
        self.backend = backend
        self.user_gru = GRU(session_hidden, user_hidden, num_layers=user_layers, batch_first=True, backend=backend)
        self.session_init = torch.nn.Linear(user_hidden, session_hidden)
        self.session_gru = GRU(embedding_dim, session_hidden, batch_first=True, backend=backend)

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.user_gru.num_layers, self.user_gru.hidden_size

    def forward(self, batch, state=None):
        sessions = SessionInputs(self, batch)
        state = self._check_state(state, sessions.lanes, sessions.embedded)
        lanes = torch.arange(sessions.lanes, device=state.device)
        # Each step's sessions run to that step's longest, not the batch's (the session GRU is causal).
        step_widths = sessions.lengths.amax(1).tolist() if sessions.lengths.numel() else [0] * sessions.steps
        events = []
        for step in range(sessions.steps):
            lengths, width = sessions.lengths[step], step_widths[step]
            h0 = torch.tanh(self.session_init(state[-1]))
            # One step past the last input so that the final state has read the session's last item.
            outputs, _ = self.session_gru(self.dropout(sessions.embedded_steps[step][:, :width + 1]), h0[None])
            events.append(outputs[:, :width][sessions.mask[step, :, :width]])
            # (lanes, session_hidden), in the state's dtype: under autocast the session GRU may run in another.
            last = outputs[lanes, lengths].to(state.dtype)
            # The user GRU's step, rows without a session unchanged, ended users zeroed: session_update
            # with a length-1 "session" whose mean is the session representation.
            state = session_update(last[:, None], (lengths > 0).to(torch.int64), state, batch.keep[step],
                                   self.user_gru.all_weights, backend=self.backend)
        if not events:
            return sessions.embedded.new_zeros(0, self.output.in_features), state
        return torch.cat(events), state


class SessionGRU(NextItemModel):
    """GRU4Rec-style: one GRU (``layers`` x ``hidden``) over each session from a zero state; no
    user state. forward(batch, state=None) -> (features (events, hidden), None)."""

    def __init__(self, num_items: int, embedding_dim: int = 128, hidden: int = 128, layers: int = 1,
                 max_session_length: int = 20, dropout: float = 0.0, backend=None):
        embedding_dim, hidden, layers, max_session_length = check_positive(
            embedding_dim=embedding_dim, hidden=hidden, layers=layers, max_session_length=max_session_length)
        super().__init__(num_items, embedding_dim, hidden, dropout)
        self.max_session_length = max_session_length
        self.session_gru = GRU(embedding_dim, hidden, num_layers=layers, batch_first=True, backend=backend)

    def forward(self, batch, state=None):
        if state is not None:
            raise ValueError("SessionGRU has no state across sessions; pass state=None")
        sessions = SessionInputs(self, batch)
        if sessions.rows.numel() == 0:
            return sessions.embedded.new_zeros(0, self.output.in_features), None
        return sessions.low_level(lambda inputs: self.session_gru(self.dropout(inputs))[0]), None
