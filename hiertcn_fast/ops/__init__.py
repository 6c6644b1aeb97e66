"""The public ops. Every op takes ``backend=`` (see hiertcn_fast.backends), and every op but ``tcn_step`` has a
plain-PyTorch ``<op>_reference`` that defines it (``tcn_step``'s is ``backend="reference"``, which applies
``causal_conv1d_step_reference`` layer by layer)."""

from .conv import (CausalConvState, causal_conv1d, causal_conv1d_reference, causal_conv1d_step,
                   causal_conv1d_step_reference, context_table, cpu_conv_blas, forget_weight_caches,
                   set_cpu_conv_blas, tcn_step)
from .gru import (gru, gru_cell, gru_cell_reference, gru_gates, gru_gates_reference, gru_reference, session_update,
                  session_update_reference, session_update_steps, session_update_steps_reference)
from .loss import linear_cross_entropy, linear_cross_entropy_reference

__all__ = ["CausalConvState", "causal_conv1d", "causal_conv1d_reference", "causal_conv1d_step",
           "causal_conv1d_step_reference", "context_table", "cpu_conv_blas", "forget_weight_caches", "gru", "gru_cell",
           "gru_cell_reference", "gru_gates", "gru_gates_reference", "gru_reference", "linear_cross_entropy",
           "linear_cross_entropy_reference", "session_update", "session_update_reference",
           "session_update_steps", "session_update_steps_reference", "set_cpu_conv_blas", "tcn_step"]
