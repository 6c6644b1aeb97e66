"""Triton kernels for the dilated causal convolution (semantics: csrc/include/hiertcn/causal_conv.h).

The forward and step kernels take the weight packed as in the C++ kernels (hiertcn_fast.ops.conv.pack_weight),
packed[j][ci][ol] (k, in_channels, out_channels / groups).
Dense convolutions (groups == 1) run each tap as tl.dot over channel blocks; grouped ones (depthwise
included) gather each output column's input channels and multiply elementwise. The same forward
kernel with DIRECTION = -1 and the transposed packing computes the input gradient. The weight
gradient sums all rows of one weight block inside one program, in order: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from . import checked_grid, launcher
from ._math import tanh

# One fixed configuration (no autotuning: the kernels also run in the interpreter, in tests).
BLOCK_TIME = 32
BLOCK_OUT = 64
BLOCK_IN = 32
BLOCK_ROWS = 32
BLOCK_ELEMENTS = 128

ACT_NONE, ACT_RELU, ACT_GELU, ACT_TANH = 0, 1, 2, 3


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as torch.relu's (tl.maximum leaves NaN unspecified)
    elif ACTIVATION == 2:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACTIVATION == 3:
        v = tanh(v)
    return v


@triton.jit
def _activation_grad(v, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        d = tl.where(v <= 0.0, 0.0, 1.0)  # torch.relu's: 1 at NaN as well
    elif ACTIVATION == 2:
        d = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476)) + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACTIVATION == 3:
        y = tanh(v)
        d = 1.0 - y * y
    else:
        d = tl.full(v.shape, 1.0, tl.float32)
    return d


@triton.jit
def _epilogue(z, res, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    out = _activate(z, ACTIVATION)
    if HAS_RESIDUAL:
        out = _activate(out + res, ACTIVATION)
    return out


@triton.jit
def _conv_kernel(inp, packed, bias, table, residual, out, pre,
                 time, in_channels, out_channels, in_per_group, out_per_group, kernel_size, dilation, direction,
                 in_batch_stride, in_time_stride, res_batch_stride, res_time_stride,
                 DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 WRITE_PRE: tl.constexpr, PRE_BITS: tl.constexpr, ACTIVATION: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    # pre receives z, or with PRE_BITS (relu) uint8 sign bits: bit 0 not z <= 0, bit 1 not out <= 0
    # (hiertcn/causal_conv.h).
    tiles = (time - 1) // BLOCK_T + 1  # time >= 1 here; tl.cdiv's time + BLOCK_T - 1 would wrap past 2^31 - 1
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    # int64 offsets: a tap's lag ((k - 1 - j) * dilation) and a step's offset (t * stride) pass 2^31 at large
    # dilations and long sequences, where int32 arithmetic would wrap.
    t = ((pid % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok = t < time
    o_ok = o < out_channels
    row_base = inp + b * in_batch_stride
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for j in range(0, kernel_size):
        s = t - direction * ((kernel_size - 1 - j).to(tl.int64) * dilation)
        s_ok = t_ok & (s >= 0) & (s < time)
        # int64 weight offsets: a dense layer's packed weight may pass 2^31 elements (the same below).
        w_tap = packed + tl.cast(j, tl.int64) * in_channels * out_per_group
        if DENSE:
            for c0 in range(0, in_channels, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_ok = c < in_channels
                xs = tl.load(row_base + s[:, None] * in_time_stride + c[None, :], mask=s_ok[:, None] & c_ok[None, :],
                             other=0.0)
                w = tl.load(w_tap + c[:, None].to(tl.int64) * out_per_group + o[None, :],
                            mask=c_ok[:, None] & o_ok[None, :], other=0.0)
                acc += tl.dot(xs, w, input_precision=DOT_PRECISION)
        else:
            g = o // out_per_group
            ol = o % out_per_group
            for cl in range(0, in_per_group):
                ci = g * in_per_group + cl
                xs = tl.load(row_base + s[:, None] * in_time_stride + ci[None, :], mask=s_ok[:, None] & o_ok[None, :],
                             other=0.0)
                w = tl.load(w_tap + ci.to(tl.int64) * out_per_group + ol, mask=o_ok, other=0.0)
                acc += xs.to(tl.float32) * w.to(tl.float32)[None, :]
    mask = t_ok[:, None] & o_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_TABLE:
        m = tl.minimum(t // dilation, kernel_size - 1)
        acc += tl.load(table + (b * kernel_size + m[:, None]) * out_channels + o[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    dst = (b * time + t[:, None]) * out_channels + o[None, :]
    if WRITE_PRE and not PRE_BITS:
        tl.store(pre + dst, acc.to(pre.dtype.element_ty), mask=mask)
    res = acc
    if HAS_RESIDUAL:
        res = tl.load(residual + b * res_batch_stride + t[:, None] * res_time_stride + o[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    y = _epilogue(acc, res, HAS_RESIDUAL, ACTIVATION)
    tl.store(out + dst, y.to(out.dtype.element_ty), mask=mask)
    if WRITE_PRE and PRE_BITS:
        tl.store(pre + dst, tl.where(acc <= 0, 0, 1).to(tl.uint8) | tl.where(y <= 0, 0, 2).to(tl.uint8), mask=mask)


@triton.jit
def _epilogue_backward_kernel(grad_out, pre, residual, grad_pre, grad_residual, time, channels,
                              g_batch_stride, g_time_stride, res_batch_stride, res_time_stride,
                              HAS_PRE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                              PRE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    # PRE_BITS (relu): pre holds the forward's sign bits, and the residual is not read; HAS_RESIDUAL then says
    # whether grad_residual is written.
    row = tl.program_id(0).to(tl.int64)
    b = row // time
    t = row % time
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < channels
    g = tl.load(grad_out + b * g_batch_stride + t * g_time_stride + c, mask=ok, other=0.0).to(tl.float32)
    if PRE_BITS:
        bits = tl.load(pre + row * channels + c, mask=ok, other=0)
        if HAS_RESIDUAL:
            g = tl.where((bits & 2) != 0, g, 0.0)
            tl.store(grad_residual + row * channels + c, g.to(grad_residual.dtype.element_ty), mask=ok)
        g = tl.where((bits & 1) != 0, g, 0.0)
        tl.store(grad_pre + row * channels + c, g.to(grad_pre.dtype.element_ty), mask=ok)
        return
    z = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_PRE:
        z = tl.load(pre + row * channels + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual + b * res_batch_stride + t * res_time_stride + c, mask=ok, other=0.0).to(tl.float32)
        g = g * _activation_grad(_activate(z, ACTIVATION) + res, ACTIVATION)
        tl.store(grad_residual + row * channels + c, g.to(grad_residual.dtype.element_ty), mask=ok)
    g = g * _activation_grad(z, ACTIVATION)
    tl.store(grad_pre + row * channels + c, g.to(grad_pre.dtype.element_ty), mask=ok)


@triton.jit
def _source_rows(r0, rows, time, lag, BLOCK_R: tl.constexpr):
    """Rows r0.. of the flattened (batch, time) grid: the row, its batch, the step tap ``lag`` reads, and
    whether that step exists."""
    row = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    b = row // time
    s = row % time - lag
    return row, b, s, (row < rows) & (s >= 0)


# The weight gradient sums over every (batch, time) row: its rows are split into chunks of about this many,
# summed by separate programs into float32 partial gradients, then added in chunk order (_sum_chunks_kernel).
# The chunks follow from the shape alone (at most MAX_WEIGHT_GRAD_CHUNKS), so the result does not depend on the
# launch: deterministic run to run.
WEIGHT_GRAD_ROWS_PER_CHUNK = 512
MAX_WEIGHT_GRAD_CHUNKS = 64


def _weight_grad_chunks(rows: int) -> tuple[int, int]:
    """(chunks, rows per chunk) of the weight gradient's row split."""
    chunks = min(MAX_WEIGHT_GRAD_CHUNKS, max(1, triton.cdiv(rows, WEIGHT_GRAD_ROWS_PER_CHUNK)))
    return chunks, triton.cdiv(rows, chunks)


@triton.jit
def _weight_grad_dense_kernel(x, grad_pre, grad_weight, rows, time, in_channels, out_channels, kernel_size,
                              dilation, x_batch_stride, x_time_stride, chunks, chunk_rows, size,
                              DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
                              BLOCK_R: tl.constexpr):
    # Axis 0: tap j, row chunk and input-channel block (CUDA caps axis 1 at 65535 blocks, which cdiv(in_channels,
    # BLOCK_C) passes first); axis 1: output-channel block. grad_weight: (chunks, out, in, k) partials (one chunk:
    # the gradient itself), size elements each. rows = batch * time and size come from the host: no .to() of an
    # argument here, since an int argument equal to 1 is compiled as a constexpr, which has none (tl.cast takes one).
    c_blocks = tl.cdiv(in_channels, BLOCK_C)
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = (tl.program_id(0) // c_blocks) % chunks
    j = tl.program_id(0) // c_blocks // chunks
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    c_ok = c < in_channels
    o_ok = o < out_channels
    lag = (kernel_size - 1 - j).to(tl.int64) * dilation  # int64: (k - 1) * dilation may pass 2^31
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    first = chunk.to(tl.int64) * chunk_rows
    end = tl.minimum(first + chunk_rows, rows)
    for r0 in range(first, end, BLOCK_R):
        row, b, s, s_ok = _source_rows(r0, end, time, lag, BLOCK_R)
        xt = tl.load(x + b[None, :] * x_batch_stride + s[None, :] * x_time_stride + c[:, None],
                     mask=c_ok[:, None] & s_ok[None, :], other=0.0)
        gz = tl.load(grad_pre + row[:, None] * out_channels + o[None, :], mask=(row < end)[:, None] & o_ok[None, :],
                     other=0.0)
        acc += tl.dot(xt, gz, input_precision=DOT_PRECISION)
    tl.store(grad_weight + chunk.to(tl.int64) * size + (o[None, :].to(tl.int64) * in_channels + c[:, None]) * kernel_size
             + j, acc.to(grad_weight.dtype.element_ty), mask=c_ok[:, None] & o_ok[None, :])


@triton.jit
def _sum_chunks_kernel(partials, out, chunks, size, BLOCK: tl.constexpr):
    """out[e] = the sum over chunks of partials[chunk, e], in chunk order, in float32."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    offset = e  # int64, stepped by size: no product of the loop counter (int32 when compiled) and size
    for _ in range(0, chunks):
        acc += tl.load(partials + offset, mask=ok, other=0.0)
        offset += size
    tl.store(out + e, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _weight_grad_grouped_kernel(x, grad_pre, grad_weight, rows, time, in_channels, out_channels, in_per_group,
                                out_per_group, kernel_size, dilation, x_batch_stride, x_time_stride, chunks,
                                chunk_rows, size, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    # Elements e of the packed layout (ci, ol) for tap j, and the row chunk, all from grid axis 0 (CUDA caps axis 1
    # at 65535 blocks, which in_channels * out_per_group / BLOCK_E passes for wide grouped layers). grad_weight:
    # (chunks, out, in / groups, k) partials of size elements (one chunk: the gradient itself).
    per_tap = tl.cast(in_channels, tl.int64) * out_per_group  # int64: a tap's elements may pass 2^31
    blocks = (per_tap - 1) // BLOCK_E + 1
    chunk = tl.program_id(0) % chunks
    tap_block = tl.program_id(0) // chunks
    j = tap_block // blocks
    e = (tap_block % blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < per_tap
    ci = e // out_per_group
    ol = e % out_per_group
    g = ci // in_per_group
    o = g * out_per_group + ol
    lag = (kernel_size - 1 - j).to(tl.int64) * dilation  # int64: (k - 1) * dilation may pass 2^31
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    first = chunk.to(tl.int64) * chunk_rows
    end = tl.minimum(first + chunk_rows, rows)
    for r0 in range(first, end, BLOCK_R):
        row, b, s, s_ok = _source_rows(r0, end, time, lag, BLOCK_R)
        mask = s_ok[:, None] & e_ok[None, :]
        xv = tl.load(x + b[:, None] * x_batch_stride + s[:, None] * x_time_stride + ci[None, :], mask=mask, other=0.0)
        gz = tl.load(grad_pre + row[:, None] * out_channels + o[None, :], mask=mask, other=0.0)
        acc += tl.sum(xv.to(tl.float32) * gz.to(tl.float32), axis=0)
    tl.store(grad_weight + chunk.to(tl.int64) * size + (o * in_per_group + ci % in_per_group) * kernel_size + j,
             acc.to(grad_weight.dtype.element_ty), mask=e_ok)


@triton.jit
def _step_tap(src, w_tap, valid, o, o_ok, in_channels, in_per_group, out_per_group, DENSE: tl.constexpr,
              BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tap's contribution to one row's outputs o: src (in_channels,) times packed w_tap (in, out/groups)."""
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if DENSE:
        for c0 in range(0, in_channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = (c < in_channels) & valid
            xs = tl.load(src + c, mask=c_ok, other=0.0).to(tl.float32)
            w = tl.load(w_tap + c[:, None].to(tl.int64) * out_per_group + o[None, :],
                        mask=c_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xs[:, None] * w, axis=0)
    else:
        g = o // out_per_group
        ol = o % out_per_group
        for cl in range(0, in_per_group):
            ci = g * in_per_group + cl
            xs = tl.load(src + ci, mask=o_ok & valid, other=0.0).to(tl.float32)
            w = tl.load(w_tap + ci.to(tl.int64) * out_per_group + ol, mask=o_ok, other=0.0).to(tl.float32)
            acc += xs * w
    return acc


@triton.jit
def _step_kernel(x, packed, bias, table, residual, history, position, out,
                 in_channels, out_channels, in_per_group, out_per_group, kernel_size, dilation, history_length,
                 x_row_stride, res_row_stride,
                 DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 ACTIVATION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < out_channels
    pos = tl.load(position + b)
    tap_size = tl.cast(in_channels, tl.int64) * out_per_group  # int64: the packed weight may pass 2^31 elements
    # The current step's tap reads x; the earlier ones read the circular history.
    acc = _step_tap(x + b * x_row_stride, packed + (kernel_size - 1) * tap_size, pos >= 0, o, o_ok, in_channels,
                    in_per_group, out_per_group, DENSE, BLOCK_O, BLOCK_C)
    for j in range(0, kernel_size - 1):
        lag = (kernel_size - 1 - j).to(tl.int64) * dilation
        valid = lag <= pos
        slot = tl.where(valid, pos - lag, 0) % history_length
        acc += _step_tap(history + (b * history_length + slot) * in_channels, packed + j * tap_size, valid, o, o_ok,
                         in_channels, in_per_group, out_per_group, DENSE, BLOCK_O, BLOCK_C)
    if HAS_BIAS:
        acc += tl.load(bias + o, mask=o_ok, other=0.0).to(tl.float32)
    if HAS_TABLE:
        m = tl.maximum(tl.minimum(pos // dilation, kernel_size - 1), 0)
        acc += tl.load(table + (b * kernel_size + m) * out_channels + o, mask=o_ok, other=0.0).to(tl.float32)
    res = acc
    if HAS_RESIDUAL:
        res = tl.load(residual + b * res_row_stride + o, mask=o_ok, other=0.0).to(tl.float32)
    # A negative position (a state written from outside) gives a NaN row and leaves the row's state alone
    # (_step_update_kernel): checking on the host would cost a device sync per step.
    result = tl.where(pos >= 0, _epilogue(acc, res, HAS_RESIDUAL, ACTIVATION), float("nan"))
    tl.store(out + b * out_channels + o, result.to(out.dtype.element_ty), mask=o_ok)


@triton.jit
def _step_update_kernel(x, history, position, in_channels, history_length, x_row_stride, BLOCK_C: tl.constexpr):
    # A separate launch: every program of _step_kernel for this row must have read the slot first.
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(position + b)
    live = pos >= 0  # a negative position: the row's state is left as it is (see _step_kernel)
    if history_length > 0:
        slot = tl.where(live, pos, 0) % history_length
        for c0 in range(0, in_channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < in_channels) & live
            tl.store(history + (b * history_length + slot) * in_channels + c,
                     tl.load(x + b * x_row_stride + c, mask=ok), mask=ok)
    tl.store(position + b, pos + 1, mask=live)


def _dot_precision(dtype):
    # float32 must not silently drop to tf32: the reference comparison (and users) expect float32 accuracy.
    # Half types have one precision; None leaves tl.dot's default.
    return "ieee" if dtype == torch.float32 else None


def _launch_conv(inp, packed, groups, kernel_size, dilation, direction, out, *, bias=None, table=None, residual=None,
                 pre=None, activation=ACT_NONE):
    batch, time, in_channels = inp.shape
    out_channels = out.shape[2]
    if batch * time * out_channels == 0:
        return
    grid = checked_grid((batch * triton.cdiv(time, BLOCK_TIME), triton.cdiv(out_channels, BLOCK_OUT)),
                        "causal_conv1d (triton)")
    res = residual if residual is not None else out
    launcher(_conv_kernel)[grid](
        inp, packed, bias if bias is not None else out, table if table is not None else out, res, out,
        pre if pre is not None else out,
        time, in_channels, out_channels, in_channels // groups, out_channels // groups, kernel_size, dilation,
        direction, inp.stride(0), inp.stride(1), res.stride(0), res.stride(1),
        DENSE=groups == 1, HAS_BIAS=bias is not None, HAS_TABLE=table is not None, HAS_RESIDUAL=residual is not None,
        WRITE_PRE=pre is not None, PRE_BITS=pre is not None and pre.dtype == torch.uint8, ACTIVATION=activation,
        DOT_PRECISION=_dot_precision(inp.dtype),
        BLOCK_T=BLOCK_TIME, BLOCK_O=BLOCK_OUT, BLOCK_C=BLOCK_IN)


def causal_conv_forward(x, packed_weight, bias, table, residual, dilation, groups, activation, out, pre) -> None:
    """packed_weight: (k, in_channels, out/groups), hiertcn_fast.ops.conv.pack_weight's layout."""
    _launch_conv(x, packed_weight, groups, packed_weight.shape[0], dilation, 1, out, bias=bias, table=table,
                 residual=residual, pre=pre, activation=activation)


def causal_conv_backward(grad_out, x, weight, pre, residual, dilation, groups, activation, grad_pre, grad_x,
                         grad_weight, grad_residual) -> None:
    batch, time, in_channels = x.shape
    out_channels, in_per_group, kernel_size = weight.shape
    if batch * time * out_channels:
        res = residual if residual is not None else grad_out
        bits = pre is not None and pre.dtype == torch.uint8  # relu's sign bits: the residual is not read
        grid = checked_grid((batch * time, triton.cdiv(out_channels, BLOCK_ELEMENTS)),
                            "causal_conv1d backward (triton)")
        launcher(_epilogue_backward_kernel)[grid](
            grad_out, pre if pre is not None else grad_out, res, grad_pre,
            grad_residual if grad_residual is not None else grad_pre, time, out_channels,
            grad_out.stride(0), grad_out.stride(1), res.stride(0), res.stride(1),
            HAS_PRE=pre is not None, HAS_RESIDUAL=(grad_residual if bits else residual) is not None,
            ACTIVATION=activation, PRE_BITS=bits, BLOCK=BLOCK_ELEMENTS)
    # The input gradient: an anti-causal conv of grad_pre with the transposed packing (k, out, in/groups).
    # grad_x and grad_weight are each None where that input wants no gradient: its work is skipped.
    if grad_x is not None:
        _launch_conv(grad_pre, weight.permute(2, 0, 1).contiguous(), groups, kernel_size, dilation, -1, grad_x)
    if grad_weight is None:
        return
    chunks, chunk_rows = _weight_grad_chunks(batch * time)
    # Several chunks: float32 partial gradients, added in chunk order below; one: the gradient written directly.
    target = grad_weight if chunks == 1 else grad_weight.new_empty((chunks, *grad_weight.shape), dtype=torch.float32)
    if groups == 1:
        grid = checked_grid((kernel_size * chunks * triton.cdiv(in_channels, BLOCK_IN),
                             triton.cdiv(out_channels, BLOCK_OUT)), "causal_conv1d weight gradient (triton)")
        launcher(_weight_grad_dense_kernel)[grid](
            x, grad_pre, target, batch * time, time, in_channels, out_channels, kernel_size, dilation, x.stride(0),
            x.stride(1), chunks, chunk_rows, grad_weight.numel(), DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_C=BLOCK_IN, BLOCK_O=BLOCK_OUT, BLOCK_R=BLOCK_ROWS)
    else:
        out_per_group = out_channels // groups
        grid = checked_grid((kernel_size * triton.cdiv(in_channels * out_per_group, BLOCK_ELEMENTS) * chunks,),
                            "causal_conv1d weight gradient (triton)")
        launcher(_weight_grad_grouped_kernel)[grid](
            x, grad_pre, target, batch * time, time, in_channels, out_channels, in_per_group, out_per_group,
            kernel_size, dilation, x.stride(0), x.stride(1), chunks, chunk_rows, grad_weight.numel(),
            BLOCK_E=BLOCK_ELEMENTS, BLOCK_R=BLOCK_ROWS)
    if chunks > 1:
        size = grad_weight.numel()
        launcher(_sum_chunks_kernel)[(triton.cdiv(size, BLOCK_ELEMENTS),)](
            target, grad_weight, chunks, size, BLOCK=BLOCK_ELEMENTS)


def causal_conv_step(x, packed_weight, bias, table, residual, dilation, groups, activation, history, position,
                     out) -> None:
    batch, in_channels = x.shape
    kernel_size, _, out_per_group = packed_weight.shape
    out_channels = out_per_group * groups
    if batch == 0:
        return
    res = residual if residual is not None else out
    grid = checked_grid((batch, triton.cdiv(out_channels, BLOCK_OUT)), "causal_conv1d_step (triton)")
    launcher(_step_kernel)[grid](
        x, packed_weight, bias if bias is not None else out, table if table is not None else out, res,
        history, position, out, in_channels, out_channels, in_channels // groups, out_per_group,
        kernel_size, dilation, (kernel_size - 1) * dilation, x.stride(0), res.stride(0),
        DENSE=groups == 1, HAS_BIAS=bias is not None, HAS_TABLE=table is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation, BLOCK_O=BLOCK_OUT, BLOCK_C=BLOCK_IN)
    launcher(_step_update_kernel)[(batch,)](
        x, history, position, in_channels, (kernel_size - 1) * dilation, x.stride(0), BLOCK_C=BLOCK_ELEMENTS)
