"""Triton kernels for the fused GRU gate math (the same per-element math as csrc/include/hiertcn/gru_gates.h)."""

import torch
import triton
import triton.language as tl

from . import checked_grid, launcher
from ._math import tanh

BLOCK_HIDDEN = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gates(gi, gh, h, b, j, mask, hidden, gi_row, gh_row, h_row):
    """Row b, units j: the gates r, z, n, and gh_n and h (float32), which the backward needs too."""
    gi_r = tl.load(gi + b * gi_row + j, mask=mask).to(tl.float32)
    gi_z = tl.load(gi + b * gi_row + hidden + j, mask=mask).to(tl.float32)
    gi_n = tl.load(gi + b * gi_row + 2 * hidden + j, mask=mask).to(tl.float32)
    gh_r = tl.load(gh + b * gh_row + j, mask=mask).to(tl.float32)
    gh_z = tl.load(gh + b * gh_row + hidden + j, mask=mask).to(tl.float32)
    gh_n = tl.load(gh + b * gh_row + 2 * hidden + j, mask=mask).to(tl.float32)
    hv = tl.load(h + b * h_row + j, mask=mask).to(tl.float32)
    r = _sigmoid(gi_r + gh_r)
    z = _sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)
    return r, z, n, gh_n, hv


@triton.jit
def _gru_gates_fwd_kernel(gi, gh, h, out, hidden, gi_row, gh_row, h_row, out_row, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < hidden
    r, z, n, gh_n, hv = _gates(gi, gh, h, b, j, mask, hidden, gi_row, gh_row, h_row)
    result = (1.0 - z) * n + z * hv
    tl.store(out + b * out_row + j, result.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gru_gates_bwd_kernel(grad_out, gi, gh, h, d_gi, d_gh, d_h, hidden, g_row, gi_row, gh_row, h_row,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < hidden
    g = tl.load(grad_out + b * g_row + j, mask=mask).to(tl.float32)
    r, z, n, gh_n, hv = _gates(gi, gh, h, b, j, mask, hidden, gi_row, gh_row, h_row)
    d_pre_n = g * (1.0 - z) * (1.0 - n * n)
    d_r = d_pre_n * gh_n * r * (1.0 - r)
    d_z = g * (hv - n) * z * (1.0 - z)
    ty = d_gi.dtype.element_ty
    row3 = b * 3 * hidden
    tl.store(d_gi + row3 + j, d_r.to(ty), mask=mask)
    tl.store(d_gi + row3 + hidden + j, d_z.to(ty), mask=mask)
    tl.store(d_gi + row3 + 2 * hidden + j, d_pre_n.to(ty), mask=mask)
    tl.store(d_gh + row3 + j, d_r.to(ty), mask=mask)
    tl.store(d_gh + row3 + hidden + j, d_z.to(ty), mask=mask)
    tl.store(d_gh + row3 + 2 * hidden + j, (d_pre_n * r).to(ty), mask=mask)
    # d_h in its own dtype: float32 where the caller carries the state in float32 under half gi and gh.
    tl.store(d_h + b * hidden + j, (g * z).to(d_h.dtype.element_ty), mask=mask)


def _grid(batch, hidden):
    return checked_grid((batch, triton.cdiv(hidden, BLOCK_HIDDEN)), "gru_gates (triton)")


def gru_gates_forward(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
    batch, hidden = h.shape
    if batch * hidden == 0:
        return
    launcher(_gru_gates_fwd_kernel)[_grid(batch, hidden)](
        gi, gh, h, out, hidden, gi.stride(0), gh.stride(0), h.stride(0), out.stride(0), BLOCK=BLOCK_HIDDEN)


def gru_gates_backward(grad_out, gi, gh, h, d_gi, d_gh, d_h) -> None:
    batch, hidden = h.shape
    if batch * hidden == 0:
        return
    launcher(_gru_gates_bwd_kernel)[_grid(batch, hidden)](
        grad_out, gi, gh, h, d_gi, d_gh, d_h, hidden, grad_out.stride(0), gi.stride(0), gh.stride(0), h.stride(0),
        BLOCK=BLOCK_HIDDEN)
