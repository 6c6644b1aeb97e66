"""The public ops. Every op takes ``backend=`` (see hiertcn_fast.backends) and has a plain-PyTorch
``<op>_reference`` that defines it."""

from .gru import gru_gates, gru_gates_reference

__all__ = ["gru_gates", "gru_gates_reference"]
