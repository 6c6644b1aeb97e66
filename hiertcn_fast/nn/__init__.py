"""nn.Module wrappers around hiertcn_fast.ops (drop-ins for their torch.nn cousins)."""

from .conv import TCN, CausalConv1d, TCNState, TemporalBlock
from .gru import GRU, GRUCell

__all__ = ["CausalConv1d", "GRU", "GRUCell", "TCN", "TCNState", "TemporalBlock"]
