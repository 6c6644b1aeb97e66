"""GRU op family. So far: ``gru_gates``, the fused gate math of one GRU step (nn.GRU semantics).

Each op here has a public function (validation and backend dispatch), a plain-PyTorch reference,
an autograd.Function around the compiled or Triton kernels, and the torch.library registrations
(fake kernels for the C++ schemas in csrc/ops.cpp, triton_op for the Triton kernels).
"""

import torch

from .. import _extension
from ..backends import resolve
from ._common import FLOATING, check_like, check_shape, check_tensor, new_output, unit_stride_rows

GRU_GATES_DTYPES = {
    "cuda": {torch.float16, torch.bfloat16, torch.float32, torch.float64},
    "triton": {torch.float16, torch.bfloat16, torch.float32},
    "cpu": {torch.float32, torch.float64},
    "reference": set(FLOATING),
}


def gru_gates_reference(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch gru_gates: the definition every backend is tested against (half types in float32)."""
    compute = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    i_r, i_z, i_n = gi.to(compute).chunk(3, dim=-1)
    h_r, h_z, h_n = gh.to(compute).chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h.to(compute)).to(h.dtype)


def _check_gru_gates(gi, gh, h):
    check_tensor(h, "h", 2)
    check_tensor(gi, "gi", 2)
    check_tensor(gh, "gh", 2)
    check_like(gi, "gi", h, "h")
    check_like(gh, "gh", h, "h")
    batch, hidden = h.shape
    check_shape(gi, "gi (batch, 3 * hidden)", (batch, 3 * hidden))
    check_shape(gh, "gh (batch, 3 * hidden)", (batch, 3 * hidden))


def gru_gates(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, *, backend=None) -> torch.Tensor:
    """One GRU step's gate math, fused: h' = (1 - z) * n + z * h.

    gi: (batch, 3 * hidden) = x W_ih^T + b_ih; gh: (batch, 3 * hidden) = h W_hh^T + b_hh;
    h: (batch, hidden). Gate order r, z, n as nn.GRU; n = tanh(gi_n + r * gh_n). Returns
    (batch, hidden). Differentiable in gi, gh and h.
    """
    _check_gru_gates(gi, gh, h)
    name = resolve("gru_gates", backend, h.device, h.dtype, GRU_GATES_DTYPES)
    if name == "reference":
        return gru_gates_reference(gi, gh, h)
    return _GruGatesFunction.apply(unit_stride_rows(gi), unit_stride_rows(gh), unit_stride_rows(h), name)


def _gru_gates_kernel(name, gi, gh, h, out):
    if name == "triton":
        torch.ops.hiertcn_fast.gru_gates_triton_out(gi, gh, h, out)
    else:
        torch.ops.hiertcn_fast.gru_gates_out(gi, gh, h, out=out)


def _gru_gates_backward_kernel(name, grad_out, gi, gh, h, grad_gi, grad_gh, grad_h):
    if name == "triton":
        torch.ops.hiertcn_fast.gru_gates_backward_triton_out(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h)
    else:
        torch.ops.hiertcn_fast.gru_gates_backward_out(grad_out, gi, gh, h, grad_gi=grad_gi, grad_gh=grad_gh,
                                                      grad_h=grad_h)


class _GruGatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, h, name):
        out = new_output(h.shape, h)
        _gru_gates_kernel(name, gi, gh, h, out)
        ctx.save_for_backward(gi, gh, h)
        ctx.backend = name
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gi, gh, h = ctx.saved_tensors
        grad_gi, grad_gh, grad_h = new_output(gi.shape, gi), new_output(gh.shape, gh), new_output(h.shape, h)
        _gru_gates_backward_kernel(ctx.backend, unit_stride_rows(grad_out), gi, gh, h, grad_gi, grad_gh, grad_h)
        return grad_gi, grad_gh, grad_h, None


# ---- registrations -------------------------------------------------------------------------------

@_extension.register_fake("gru_gates_out")
def _gru_gates_out_fake(gi, gh, h, *, out):
    return None


@_extension.register_fake("gru_gates_backward_out")
def _gru_gates_backward_out_fake(grad_out, gi, gh, h, *, grad_gi, grad_gh, grad_h):
    return None


@torch.library.triton_op("hiertcn_fast::gru_gates_triton_out", mutates_args={"out"})
def _gru_gates_triton_out(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
    from ..triton import gru_gates as kernels

    kernels.gru_gates_forward(gi, gh, h, out)


@torch.library.triton_op("hiertcn_fast::gru_gates_backward_triton_out",
                         mutates_args={"grad_gi", "grad_gh", "grad_h"})
def _gru_gates_backward_triton_out(grad_out: torch.Tensor, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
                                   grad_gi: torch.Tensor, grad_gh: torch.Tensor, grad_h: torch.Tensor) -> None:
    from ..triton import gru_gates as kernels

    kernels.gru_gates_backward(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h)
