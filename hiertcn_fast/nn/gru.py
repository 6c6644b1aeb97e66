"""Drop-ins for torch.nn.GRUCell and torch.nn.GRU on hiertcn_fast's GRU ops.

They subclass the torch.nn modules, so the constructor arguments, parameter names (weight_ih_l0, ...),
initialisation and state_dicts are exactly torch's; only forward runs on hiertcn_fast.ops.
"""

import torch
import torch.nn.functional as F

from ..ops import gru, gru_cell


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell on hiertcn_fast.ops.gru_cell.

    input (batch, input_size) or (input_size,), hx (batch, hidden_size) or (hidden_size,) or None (zeros)
    -> (batch, hidden_size) or (hidden_size,). ``backend`` picks the op backend (None: the usual selection).
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: expected input to be 1-D or 2-D, got {input.dim()}-D")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h = hx if batched else hx.unsqueeze(0)
        out = gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, backend=self.backend)
        return out if batched else out.squeeze(0)


class GRU(torch.nn.GRU):
    """torch.nn.GRU on hiertcn_fast.ops.gru; ``step()`` advances it by one time step.

    Same arguments as torch.nn.GRU (bidirectional=True is not supported). batch_first=True is the
    ops' native layout; with batch_first=False input and output are transposed around the op.
    forward(input (batch, time, input_size) if batch_first else (time, batch, input_size), or
    unbatched (time, input_size); hx (num_layers, batch, hidden_size) or None) -> (output, h_n).
    """

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bidirectional:
            raise ValueError("hiertcn_fast.nn.GRU does not support bidirectional=True; use torch.nn.GRU")
        self.backend = backend

    def _layers(self, x, h0):
        """x (batch, time, input), h0 (num_layers, batch, hidden) or None -> (output, h_n), dropout between layers."""
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        if self.dropout == 0 or not self.training:
            return gru(x, h0, self.all_weights, num_layers=self.num_layers, backend=self.backend)
        last_states = []
        for layer, weights in enumerate(self.all_weights):
            if layer > 0:
                x = F.dropout(x, self.dropout, training=True)
            x, h_n = gru(x, h0[layer:layer + 1], [weights], num_layers=1, backend=self.backend)
            last_states.append(h_n)
        return x, torch.cat(last_states)

    def forward(self, input, hx=None):
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: expected input to be 2-D or 3-D, got {input.dim()}-D")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if hx is not None and not batched:
            hx = hx.unsqueeze(1)
        output, h_n = self._layers(x, hx)
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output, h_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    def step(self, input, hx=None):
        """One time step: input (batch, input_size), hx (num_layers, batch, hidden_size) or None (zeros)
        -> (output (batch, hidden_size), h_n (num_layers, batch, hidden_size))."""
        if input.dim() != 2:
            raise ValueError(f"GRU.step: expected input (batch, input_size), got shape {tuple(input.shape)}")
        output, h_n = self._layers(input.unsqueeze(1), hx)
        return output[:, 0], h_n
