"""nn.Module drop-ins for their torch.nn cousins, built on hiertcn_fast.ops."""

from .gru import GRU, GRUCell

__all__ = ["GRU", "GRUCell"]
