"""Triton kernels for the session mean (the same math as csrc/include/hiertcn/gru_session.h).

mean[b, d] = sum_{t < lengths[b]} items[b, t, d] / max(lengths[b], 1), lengths clamped to [0, time].
The sum in blocks of SESSION_BLOCK steps, each in float32, the blocks' sums added in float64, as the C++ kernels.
"""

import torch
import triton
import triton.language as tl

from . import checked_grid, launcher

BLOCK_DIM = 128
SESSION_BLOCK = 64  # csrc/include/hiertcn/gru_session.h's kSessionMeanBlock


@triton.jit
def _session_length(lengths, b, time):
    length = tl.load(lengths + b)
    return tl.minimum(tl.maximum(length, 0), time)


@triton.jit
def _session_mean_fwd_kernel(items, lengths, mean, time, dim, items_batch, items_time, mean_row, BLOCK: tl.constexpr,
                             STEPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < dim
    length = _session_length(lengths, b, time)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, length, STEPS):
        part = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(start, tl.minimum(length, start + STEPS)):
            part += tl.load(items + b * items_batch + t * items_time + d, mask=mask, other=0.0).to(tl.float32)
        total += part.to(tl.float64)
    scale = 1.0 / tl.maximum(length, 1).to(tl.float32)
    tl.store(mean + b * mean_row + d, (total.to(tl.float32) * scale).to(mean.dtype.element_ty), mask=mask)


@triton.jit
def _session_mean_bwd_kernel(grad_mean, lengths, grad_items, time, dim, grad_mean_row, BLOCK: tl.constexpr):
    # Rows (b, t) on grid axis 0: CUDA caps axes 1 and 2 at 65535 blocks, which a long padded session passes.
    row = tl.program_id(0).to(tl.int64)
    b = row // time
    t = row % time
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < dim
    length = _session_length(lengths, b, time)
    scale = 1.0 / tl.maximum(length, 1).to(tl.float32)
    g = tl.load(grad_mean + b * grad_mean_row + d, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(t < length, g * scale, 0.0)
    tl.store(grad_items + (b * time + t) * dim + d, value.to(grad_items.dtype.element_ty), mask=mask)


def session_mean_forward(items: torch.Tensor, lengths: torch.Tensor, mean: torch.Tensor) -> None:
    """items (batch, time, dim), unit stride along dim; lengths (batch,) int64; mean (batch, dim)."""
    batch, time, dim = items.shape
    if batch * dim == 0:
        return
    grid = checked_grid((batch, triton.cdiv(dim, BLOCK_DIM)), "session mean (triton)")
    launcher(_session_mean_fwd_kernel)[grid](
        items, lengths, mean, time, dim, items.stride(0), items.stride(1), mean.stride(0), BLOCK=BLOCK_DIM,
        STEPS=SESSION_BLOCK)


def session_mean_backward(grad_mean: torch.Tensor, lengths: torch.Tensor, grad_items: torch.Tensor) -> None:
    """grad_mean (batch, dim), unit stride along dim; grad_items (batch, time, dim), contiguous."""
    batch, time, dim = grad_items.shape
    if batch * time * dim == 0:
        return
    grid = checked_grid((batch * time, triton.cdiv(dim, BLOCK_DIM)), "session mean backward (triton)")
    launcher(_session_mean_bwd_kernel)[grid](
        grad_mean, lengths, grad_items, time, dim, grad_mean.stride(0), BLOCK=BLOCK_DIM)
