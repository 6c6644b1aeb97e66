"""HierTCN (You et al., WWW 2019): a GRU carries each user's state across sessions, a dilated TCN
predicts within a session from the items so far and that state.

For step j of a lane batch (session j of every lane), with s_j the high-level state before it:

    s_j     = concat of the GRU layer states h_j (layers, lanes, hidden) -> (lanes, layers * hidden)
    y_j     = TCN([0, emb(x_1), ..., emb(x_{n-1})], context=s_j)  (start token first; s_j enters
              every step through the fused conv's time-constant context, never concatenated)
    logits  = output(y_j) over all items, at every position
    h_{j+1} = keep_j * GRU(mean(emb(x_1..x_n)), h_j)     (session_update; zero after a user's last session)

As in the official code, the first block's input is concat(emb(x_t), s_j) (384 wide), never made: s_j enters
its conv as the time-constant context, and its residual path, a linear projection 384 -> 128 of the
concatenation, is the embedding's projection plus the state's (TemporalBlock's context_projection), a per-session
term added after the inner ReLU.

The high-level recursion reads only item embeddings, never the TCN, so the S states of a batch are
computed first (one session_update_steps call: the GRU layer by layer over the S steps) and the TCN then runs
ONCE over all S x lanes sessions: that is why HierTCN is faster than hierarchical RNNs, whose session networks have to
wait for each other.
"""

from __future__ import annotations

import torch

from ..nn import GRU, TCN
from ..ops import session_update, session_update_steps
from .base import NextItemModel, SessionInputs, check_positive, flat_context

__all__ = ["HierTCN", "high_level_states"]


def high_level_states(sessions: SessionInputs, state: torch.Tensor, keep: torch.Tensor, gru: GRU,
                      backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the high-level GRU over the steps of a batch, all steps in one op (session_update_steps).

    state (layers, lanes, hidden): before step 0; keep (steps, lanes) bool. Returns
    (contexts (steps, lanes, layers * hidden): the state each step's sessions see, final state
    (layers, lanes, hidden): after the last step).
    """
    states = session_update_steps(sessions.session_items(), sessions.lengths, state, keep, gru.all_weights,
                                  backend=backend)
    return flat_context(states[:-1]), states[-1]


class HierTCN(NextItemModel):
    """HierTCN with the paper's defaults.

    Args:
        num_items: catalogue size (item ids 1..num_items; 0 is the start/padding token).
        embedding_dim: item embedding size (128).
        state_layers, state_hidden: the high-level GRU (2 x 128); the TCN's context is their
            concatenation (256).
        tcn_channels: output channels of each TCN block ([128, 128]).
        kernel_size: conv taps (5). dilations: per block (default 2**i: 1, 2).
        max_session_length: events per session the model is trained on (20); the data path
            truncates to it, and the streaming recommender follows the same rule.
        dropout: on the TCN input and the output layer's input (0: the paper has none).
        backend: op backend for the conv and GRU ops (None: the usual selection).

    forward(batch: SessionBatch, state (layers, lanes, hidden) or None) -> (features (events,
    tcn_channels[-1]), new state (layers, lanes, hidden)).
    """

    def __init__(self, num_items: int, embedding_dim: int = 128, state_layers: int = 2, state_hidden: int = 128,
                 tcn_channels=(128, 128), kernel_size: int = 5, dilations=None, max_session_length: int = 20,
                 dropout: float = 0.0, backend=None):
        tcn_channels = list(tcn_channels)
        if not tcn_channels:
            raise ValueError("tcn_channels must list at least one block")
        embedding_dim, state_layers, state_hidden, kernel_size, max_session_length, *tcn_channels = check_positive(
            embedding_dim=embedding_dim, state_layers=state_layers, state_hidden=state_hidden, kernel_size=kernel_size,
            max_session_length=max_session_length, **{f"tcn_channels[{i}]": c for i, c in enumerate(tcn_channels)})
        super().__init__(num_items, embedding_dim, tcn_channels[-1], dropout)
        self.max_session_length = max_session_length
        self.backend = backend
        self.state_gru = GRU(embedding_dim, state_hidden, num_layers=state_layers, batch_first=True, backend=backend)
        self.tcn = TCN(embedding_dim, tcn_channels, kernel_size, dilations, context_channels=state_layers * state_hidden,
                       backend=backend)

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.state_gru.num_layers, self.state_gru.hidden_size

    @property
    def context_dim(self) -> int:
        return self.state_gru.num_layers * self.state_gru.hidden_size

    def forward(self, batch, state=None):
        sessions, contexts, new_state = self.run_high_level(batch, state)
        if sessions.rows.numel() == 0:
            return sessions.embedded.new_zeros(0, self.output.in_features), new_state
        features = sessions.low_level(lambda inputs, context: self.tcn(self.dropout(inputs), context),
                                      sessions.per_row(contexts))
        return features, new_state

    def run_high_level(self, batch, state):
        """Embed ``batch`` and run the high-level GRU over its steps: (SessionInputs, contexts (steps,
        lanes, layers * hidden), state after the batch). Shared with HierGRU."""
        sessions = SessionInputs(self, batch)
        state = self._check_state(state, sessions.lanes, sessions.embedded)
        contexts, new_state = high_level_states(sessions, state, batch.keep, self.state_gru, self.backend)
        return sessions, contexts, new_state

    # ---- streaming (hiertcn_fast.serve) ------------------------------------------------------------

    def context_of(self, state: torch.Tensor) -> torch.Tensor:
        """state (layers, users, hidden) -> the TCN context (users, layers * hidden)."""
        return flat_context([state])[0]

    def close_sessions(self, session_sum: torch.Tensor, session_count: torch.Tensor,
                       state: torch.Tensor) -> torch.Tensor:
        """The high-level step for finished sessions given as a running sum of their item embeddings.

        session_sum (users, embedding_dim), session_count (users,) int64 >= 1, state (layers, users,
        hidden) -> new state. Same result as session_update on the sessions' items.
        """
        users = session_sum.shape[0]
        mean = (session_sum / session_count.clamp(min=1).to(session_sum.dtype)[:, None])[:, None]
        ones = torch.ones(users, dtype=torch.int64, device=state.device)
        keep = torch.ones(users, dtype=torch.bool, device=state.device)
        return session_update(mean, ones, state, keep, self.state_gru.all_weights, backend=self.backend)
