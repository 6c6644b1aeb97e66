// Dilated causal convolution over time, channels-last, with a fused epilogue.
//
//   x: (batch, time, in_channels); weight: (out_channels, in_channels / groups, k) as nn.Conv1d
//   conv[t] = sum_j W[:, :, j] x[t - (k - 1 - j) * dilation]      (zero before the start)
//   z = conv + bias + context_table[min(k - 1, t / dilation)]
//   out = act(z)                      without residual
//   out = act(act(z) + residual)      with residual (the TCN block)
//
// The context term of a time-constant input c concatenated to every step is, at step t,
// sum over the taps that land at or after the start of C_j c. Those taps are always the last
// min(k, t / dilation + 1) ones, so it is one row of a per-tap suffix sum, context_table
// (batch, k, out_channels), which the caller computes once per sequence (cheap: batch x k rows).
//
// Kernels see the weight packed as k shifted (grouped) matrices, packed[j][ci][ol] (see
// pack_conv_weight in causal_conv_host.h). The same kernel with direction -1 and the transposed
// packing computes the input gradient: grad_x[s] = sum_j grad_z[s + (k - 1 - j) * dilation] W_j.
#pragma once

#include <cmath>
#include <cstdint>

#include "hiertcn/common.h"

namespace hiertcn {

// Activation codes shared with hiertcn_fast/ops/conv.py (ACTIVATIONS).
enum ActivationCode : int64_t { kActNone = 0, kActRelu = 1, kActGelu = 2, kActTanh = 3 };

struct CausalConvParams {
  int64_t batch;
  int64_t time;
  int64_t in_channels;
  int64_t out_channels;
  int64_t groups;
  int64_t kernel_size;
  int64_t dilation;
  // +1: out[t] reads in[t - (k-1-j) * dilation] (forward); -1: in[t + (k-1-j) * dilation] (input gradient).
  int64_t direction;
  int64_t activation;
  // Element strides of `in` and `residual` along batch and time; channels have unit stride.
  int64_t in_batch_stride;
  int64_t in_time_stride;
  int64_t residual_batch_stride;
  int64_t residual_time_stride;
  const void* in;
  // (kernel_size, in_channels, out_channels / groups), contiguous.
  const void* packed_weight;
  // Optional (nullptr when absent): bias (out_channels), context_table (batch, kernel_size,
  // out_channels) contiguous, residual (batch, time, out_channels).
  const void* bias;
  const void* context_table;
  const void* residual;
  // (batch, time, out_channels), contiguous. pre (optional) receives z, the pre-activation value; with
  // pre_bits (relu only) it is uint8 and receives relu_sign_bits(z, out) instead.
  void* out;
  void* pre;
  int64_t pre_bits;
};

struct CausalConvBackwardParams {
  int64_t batch;
  int64_t time;
  int64_t in_channels;
  int64_t out_channels;
  int64_t groups;
  int64_t kernel_size;
  int64_t dilation;
  int64_t activation;
  int64_t grad_out_batch_stride;
  int64_t grad_out_time_stride;
  int64_t x_batch_stride;
  int64_t x_time_stride;
  int64_t residual_batch_stride;
  int64_t residual_time_stride;
  // Row chunks of the weight-gradient reduction (weight_grad_chunks): fixed by the shape alone,
  // so the summation order, and hence the result, never depends on the thread count. (Not so on the
  // CPU's BLAS path of dense layers, whose products split their sums by the thread count.)
  int64_t weight_grad_chunks;
  const void* grad_out;
  const void* x;
  const void* pre;       // z from the forward; nullptr when activation is none
  // 1: pre holds relu_sign_bits (uint8), all relu's backward needs; the residual is then not read (nullptr),
  // and grad_residual, when given, receives the residual's gradient.
  int64_t pre_bits;
  const void* residual;  // nullptr when absent
  void* grad_pre;        // (batch, time, out_channels) contiguous: dL/dz
  void* grad_residual;   // (batch, time, out_channels) contiguous, or nullptr
  void* grad_weight;     // (out_channels, in_channels / groups, kernel_size) contiguous, or nullptr: not wanted
  // (weight_grad_chunks, kernel_size, in_channels, out_channels / groups) accumulation-type scratch.
  void* grad_weight_partials;
};

struct CausalConvStepParams {
  int64_t batch;
  int64_t in_channels;
  int64_t out_channels;
  int64_t groups;
  int64_t kernel_size;
  int64_t dilation;
  int64_t activation;
  int64_t x_row_stride;
  int64_t residual_row_stride;
  const void* x;              // (batch, in_channels): this step's input
  const void* packed_weight;  // as in CausalConvParams
  const void* bias;
  const void* context_table;
  const void* residual;  // (batch, out_channels) or nullptr
  // history (batch, (kernel_size - 1) * dilation, in_channels) contiguous: a circular buffer, the
  // input of step p stored at slot p % history_length. position (batch) int64: steps taken per row.
  void* history;
  void* position;
  void* out;  // (batch, out_channels) contiguous
};

// A whole TCN stack stepped at once (the TCN module's step): layer l is a dense (groups == 1) causal conv
// step of kernel_size[l] taps at dilation[l] with the block epilogue out = act(act(z) + residual), where
// the residual is the layer's input, or proj_weight x + proj_bias when the channel counts differ; layer
// l + 1 reads layer l's output. Every layer keeps its own history and position, advanced as by
// causal_conv1d_step. Only the first layer may have a context table.
constexpr int kMaxStackLayers = 32;

struct TcnStepLayer {
  int64_t in_channels;
  int64_t out_channels;
  int64_t kernel_size;
  int64_t dilation;
  // Column blocks of weight_block output channels (out_channels a multiple of it): packed_weight is
  // (out_channels / weight_block, kernel_size, in_channels, weight_block) and proj_weight
  // (out_channels / weight_block, in_channels, weight_block), contiguous, so that a thread stepping one block
  // of every layer reads (and keeps in its cache) one contiguous run per layer. weight_block == out_channels is
  // the plain (kernel_size, in_channels, out_channels) and (in_channels, out_channels) packing, the only one
  // the CUDA kernel takes. Blocks that are multiples of the CPU vector width (16 floats, 8 doubles) give
  // bitwise the plain packing's results.
  int64_t weight_block;
  const void* packed_weight;
  const void* bias;         // (out_channels) or nullptr
  const void* proj_weight;  // nn.Linear's weight transposed, column-blocked as above, or nullptr
  const void* proj_bias;      // (out_channels) or nullptr
  void* history;              // (batch, (kernel_size - 1) * dilation, in_channels), contiguous
  void* position;             // (batch) int64
};

struct TcnStepParams {
  int64_t batch;
  int64_t layers;
  int64_t activation;
  int64_t x_row_stride;
  int64_t max_channels;  // the widest layer input or output
  const void* x;              // (batch, layer[0].in_channels)
  const void* context_table;  // (batch, layer[0].kernel_size, layer[0].out_channels) or nullptr
  // (batch, layer[0].out_channels) or nullptr: the context's term of layer 0's residual (HierTCN's first block
  // projects concat(x, context) on its residual path), added to the residual after its projection and bias.
  const void* context_residual;
  void* out;                  // (batch, layer[layers - 1].out_channels), contiguous
  TcnStepLayer layer[kMaxStackLayers];
};

// How many chunks the weight-gradient reduction splits its batch * time rows into, about rows_per_chunk
// each (a backend's choice: more chunks, more parallelism, more partial sums to add), at most 64; a pure
// function of the shape, so the summation order never depends on the thread count.
HIERTCN_HD int64_t weight_grad_chunks(int64_t rows, int64_t rows_per_chunk) {
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  return chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
}

HIERTCN_HD int64_t weight_grad_chunk_rows(int64_t rows, int64_t chunks) { return (rows + chunks - 1) / chunks; }

// Which suffix sum of the context table applies at step t: the number of in-range taps minus one.
HIERTCN_HD int64_t context_tap_index(int64_t t, int64_t dilation, int64_t kernel_size) {
  const int64_t m = t / dilation;
  return m < kernel_size - 1 ? m : kernel_size - 1;
}

template <typename A>
HIERTCN_HD A activate(A v, int64_t activation) {
  switch (activation) {
    case kActRelu:
      return v < A(0) ? A(0) : v;  // NaN stays NaN, as torch.relu's (v > 0 ? v : 0 would make it 0)
    case kActGelu:
      return A(0.5) * v * (A(1) + erf(v * A(0.70710678118654752440)));
    case kActTanh:
      return tanh(v);
    default:
      return v;
  }
}

// d act(v) / dv.
template <typename A>
HIERTCN_HD A activation_grad(A v, int64_t activation) {
  switch (activation) {
    case kActRelu:
      // torch.relu's: 1 unless v <= 0, so 1 at NaN as well. A conversion, not a branch: vectorises, no
      // mispredictions on random signs.
      return A(!(v <= A(0)));
    case kActGelu:
      return A(0.5) * (A(1) + erf(v * A(0.70710678118654752440))) +
             v * exp(A(-0.5) * v * v) * A(0.39894228040143267794);
    case kActTanh: {
      const A y = tanh(v);
      return A(1) - y * y;
    }
    default:
      return A(1);
  }
}

// out from z (and the residual when has_residual).
template <typename A>
HIERTCN_HD A epilogue_forward(A z, bool has_residual, A residual, int64_t activation) {
  const A a = activate(z, activation);
  return has_residual ? activate(a + residual, activation) : a;
}

// relu's two derivatives as bits of one byte: bit 0 not z <= 0 (the inner relu), bit 1 not out <= 0, which is
// act(z) + residual > 0 (the outer one, with a residual); "not <= 0" rather than "> 0" so that a NaN passes the
// gradient, as torch.relu's backward does. What the backward keeps of a relu block instead of z and the residual.
template <typename A>
HIERTCN_HD uint8_t relu_sign_bits(A z, A out) {
  return static_cast<uint8_t>((z <= A(0) ? 0 : 1) | (out <= A(0) ? 0 : 2));
}

// epilogue_backward for relu from relu_sign_bits: dL/dz, and dL/dresidual into *grad_residual (with_residual).
template <typename A>
HIERTCN_HD A relu_bits_backward(A g, uint8_t bits, bool with_residual, A* grad_residual) {
  if (with_residual) {
    g = (bits & 2) ? g : A(0);
    *grad_residual = g;
  }
  return (bits & 1) ? g : A(0);
}

// Given g = dL/dout: dL/dz, and dL/dresidual into *grad_residual.
template <typename A>
HIERTCN_HD A epilogue_backward(A g, A z, bool has_residual, A residual, int64_t activation, A* grad_residual) {
  if (has_residual) {
    g *= activation_grad(activate(z, activation) + residual, activation);
    *grad_residual = g;
  }
  return g * activation_grad(z, activation);
}

}  // namespace hiertcn
