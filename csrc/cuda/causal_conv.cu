// CUDA kernels for the dilated causal convolution (hiertcn/causal_conv.h), the same algorithm and
// packed-weight indexing as the CPU kernels (csrc/cpu/causal_conv.cpp):
//   forward / input gradient: a block owns a tile of kTimeTile steps of one batch row and up to
//     kThreads output channels (one per thread, kTimeTile accumulators in registers); tap by tap
//     the tile's source rows are staged in shared memory, kChannelChunk input channels at a time,
//     and every weight element loaded is applied to the whole tile.
//   weight gradient: one thread per packed weight element and row chunk sums its rows in order;
//     a second kernel adds the chunks in order (deterministic, no atomics).
//   step: one block per batch row; the history slot it overwrites is read first (tap 0), so the
//     write waits for a block barrier.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hiertcn/causal_conv_host.h"

namespace hiertcn {
namespace {

constexpr int kThreads = 128;
constexpr int kTimeTile = 16;
constexpr int kChannelChunk = 64;
// Rows per weight-gradient chunk: many chunks, so that the partial sums fill the GPU.
constexpr int64_t kWeightGradRowsPerChunk = 128;

template <typename T>
__global__ void causal_conv_cuda_kernel(CausalConvParams p) {
  using A = acc_t<T>;
  __shared__ A staged[kTimeTile][kChannelChunk];
  const int64_t tiles = (p.time + kTimeTile - 1) / kTimeTile;
  const int64_t b = blockIdx.x / tiles, t0 = (blockIdx.x % tiles) * kTimeTile;
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = C_out / p.groups;
  const int64_t o_first = static_cast<int64_t>(blockIdx.y) * kThreads;
  const int64_t o_last = min(o_first + kThreads, C_out) - 1;
  const int64_t o = o_first + threadIdx.x;
  const bool active = o < C_out;
  const int64_t g = (active ? o : o_last) / out_g, ol = (active ? o : o_last) % out_g;
  // Input channels any thread of this block reads: those of the groups its output channels span.
  const int64_t ci_begin = (o_first / out_g) * in_g, ci_end = (o_last / out_g + 1) * in_g;
  const T* in = static_cast<const T*>(p.in) + b * p.in_batch_stride;
  const T* packed = static_cast<const T*>(p.packed_weight);
  A acc[kTimeTile];
#pragma unroll
  for (int r = 0; r < kTimeTile; ++r) acc[r] = A(0);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t offset = p.direction * (K - 1 - j) * p.dilation;
    const int64_t s_first = t0 - offset, s_last = t0 + kTimeTile - 1 - offset;
    if (s_last < 0 || s_first >= p.time) continue;  // uniform across the block
    const T* w_tap = packed + j * C_in * out_g;
    for (int64_t c0 = ci_begin; c0 < ci_end; c0 += kChannelChunk) {
      const int64_t chunk = min(static_cast<int64_t>(kChannelChunk), ci_end - c0);
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < kTimeTile * kChannelChunk; idx += kThreads) {
        const int64_t r = idx / kChannelChunk, c = idx % kChannelChunk, s = s_first + r;
        staged[r][c] = (c < chunk && s >= 0 && s < p.time) ? A(in[s * p.in_time_stride + c0 + c]) : A(0);
      }
      __syncthreads();
      if (!active) continue;
      const int64_t lo = max(c0, g * in_g), hi = min(c0 + chunk, (g + 1) * in_g);
      for (int64_t ci = lo; ci < hi; ++ci) {
        const A w = A(w_tap[ci * out_g + ol]);
#pragma unroll
        for (int r = 0; r < kTimeTile; ++r) acc[r] += staged[r][ci - c0] * w;
      }
    }
  }
  if (!active) return;
  const T* bias = static_cast<const T*>(p.bias);
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* pre = p.pre_bits ? nullptr : static_cast<T*>(p.pre);
  uint8_t* pre_bits = p.pre_bits ? static_cast<uint8_t*>(p.pre) : nullptr;
#pragma unroll
  for (int r = 0; r < kTimeTile; ++r) {
    const int64_t t = t0 + r;
    if (t >= p.time) break;
    A z = acc[r];
    if (bias) z += A(bias[o]);
    if (table) z += A(table[(b * K + context_tap_index(t, p.dilation, K)) * C_out + o]);
    const int64_t idx = (b * p.time + t) * C_out + o;
    if (pre) pre[idx] = T(z);
    const A res = residual ? A(residual[b * p.residual_batch_stride + t * p.residual_time_stride + o]) : A(0);
    const A y = epilogue_forward<A>(z, residual != nullptr, res, p.activation);
    out[idx] = T(y);
    if (pre_bits) pre_bits[idx] = relu_sign_bits<A>(z, y);
  }
}

template <typename T>
__global__ void epilogue_backward_cuda_kernel(CausalConvBackwardParams p) {
  using A = acc_t<T>;
  const int64_t C = p.out_channels;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.time * C) return;
  const int64_t row = idx / C, o = idx % C, b = row / p.time, t = row % p.time;
  const T* g = static_cast<const T*>(p.grad_out);
  const A g_value = A(g[b * p.grad_out_batch_stride + t * p.grad_out_time_stride + o]);
  A grad_res = A(0);
  if (p.pre_bits) {  // relu from its sign bits: no z, no residual read
    const A grad_z = relu_bits_backward<A>(g_value, static_cast<const uint8_t*>(p.pre)[idx],
                                           p.grad_residual != nullptr, &grad_res);
    static_cast<T*>(p.grad_pre)[idx] = T(grad_z);
    if (p.grad_residual) static_cast<T*>(p.grad_residual)[idx] = T(grad_res);
    return;
  }
  const T* pre = static_cast<const T*>(p.pre);
  const T* residual = static_cast<const T*>(p.residual);
  const A res = residual ? A(residual[b * p.residual_batch_stride + t * p.residual_time_stride + o]) : A(0);
  const A grad_z = epilogue_backward<A>(g_value, pre ? A(pre[idx]) : A(0), residual != nullptr, res, p.activation,
                                        &grad_res);
  static_cast<T*>(p.grad_pre)[idx] = T(grad_z);
  if (p.grad_residual) static_cast<T*>(p.grad_residual)[idx] = T(grad_res);
}

// partials[chunk][j][ci][ol] = sum over the chunk's rows of x[b, t - (k-1-j) d, ci] grad_pre[b, t, g * out_g + ol].
template <typename T>
__global__ void weight_grad_partials_cuda_kernel(CausalConvBackwardParams p) {
  using A = acc_t<T>;
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = C_out / p.groups;
  const int64_t packed_size = K * C_in * out_g;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= packed_size) return;
  const int64_t chunk = blockIdx.y;
  const int64_t j = e / (C_in * out_g), ci = (e / out_g) % C_in, ol = e % out_g;
  const int64_t o = (ci / in_g) * out_g + ol, lag = (K - 1 - j) * p.dilation;
  const T* x = static_cast<const T*>(p.x);
  const T* gz = static_cast<const T*>(p.grad_pre);
  const int64_t rows = p.batch * p.time;
  const int64_t chunk_rows = weight_grad_chunk_rows(rows, p.weight_grad_chunks);
  const int64_t row_end = min(rows, (chunk + 1) * chunk_rows);
  A sum = A(0);
  for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
    const int64_t b = row / p.time, s = row % p.time - lag;
    if (s < 0) continue;
    sum += A(x[b * p.x_batch_stride + s * p.x_time_stride + ci]) * A(gz[row * C_out + o]);
  }
  static_cast<A*>(p.grad_weight_partials)[chunk * packed_size + e] = sum;
}

template <typename T>
__global__ void weight_grad_reduce_cuda_kernel(CausalConvBackwardParams p) {
  using A = acc_t<T>;
  const int64_t C_in = p.in_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = p.out_channels / p.groups;
  const int64_t packed_size = K * C_in * out_g;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= packed_size) return;
  const A* partials = static_cast<const A*>(p.grad_weight_partials);
  A sum = A(0);
  for (int64_t chunk = 0; chunk < p.weight_grad_chunks; ++chunk) sum += partials[chunk * packed_size + e];
  const int64_t j = e / (C_in * out_g), ci = (e / out_g) % C_in, ol = e % out_g;
  const int64_t g = ci / in_g, cl = ci % in_g;
  static_cast<T*>(p.grad_weight)[((g * out_g + ol) * in_g + cl) * K + j] = T(sum);
}

// A row whose position is negative (a state written from outside, e.g. restored wrongly) would address its
// history before the row's start. The CPU kernels raise; here raising would cost a device sync per step, so the
// row's output is NaN (visible downstream) and none of its state is touched.
template <typename T>
__device__ void poison_row(T* out, int64_t channels) {
  for (int64_t o = threadIdx.x; o < channels; o += blockDim.x) out[o] = T(NAN);
}

template <typename T>
__global__ void causal_conv_step_cuda_kernel(CausalConvStepParams p) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = C_out / p.groups;
  const int64_t history_length = (K - 1) * p.dilation;
  int64_t* position = static_cast<int64_t*>(p.position);
  const int64_t pos = position[b];
  if (pos < 0) {  // the same for the whole block: see poison_row
    poison_row<T>(static_cast<T*>(p.out) + b * C_out, C_out);
    return;
  }
  const T* x = static_cast<const T*>(p.x) + b * p.x_row_stride;
  T* history = static_cast<T*>(p.history) + b * history_length * C_in;
  const T* packed = static_cast<const T*>(p.packed_weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  for (int64_t o = threadIdx.x; o < C_out; o += blockDim.x) {
    const int64_t g = o / out_g, ol = o % out_g;
    A z = A(0);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t lag = (K - 1 - j) * p.dilation;
      if (lag > pos) continue;
      const T* src = lag == 0 ? x : history + ((pos - lag) % history_length) * C_in;
      const T* w_tap = packed + j * C_in * out_g;
      for (int64_t ci = g * in_g; ci < (g + 1) * in_g; ++ci) z += A(src[ci]) * A(w_tap[ci * out_g + ol]);
    }
    if (bias) z += A(bias[o]);
    if (table) z += A(table[(b * K + context_tap_index(pos, p.dilation, K)) * C_out + o]);
    const A res = residual ? A(residual[b * p.residual_row_stride + o]) : A(0);
    static_cast<T*>(p.out)[b * C_out + o] = T(epilogue_forward<A>(z, residual != nullptr, res, p.activation));
  }
  __syncthreads();
  if (history_length > 0) {
    T* slot = history + (pos % history_length) * C_in;
    for (int64_t c = threadIdx.x; c < C_in; c += blockDim.x) slot[c] = x[c];
  }
  if (threadIdx.x == 0) position[b] = next_position(pos);
}

// The whole TCN stack in one launch: one block per batch row takes it through every layer. The layer input
// and output live in shared memory (float accumulation type); each output channel's sum over taps and input
// channels is split into `splits` contiguous slices, one thread each, whose partial sums are added in slice
// order (deterministic). A layer writes its history slot and position after a barrier, when every read of
// its history is done.
// Enough threads that a batch-1 step splits each output channel's sum several ways. The kernel declares it as
// its launch bound, so that the compiler keeps it launchable at this size (at most 128 registers a thread on
// sm_90): without the bound a debug build or a change that used more registers would fail only at launch.
constexpr int kStackThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kStackThreads) tcn_step_cuda_kernel(TcnStepParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char tcn_smem[];  // read as the accumulation type, double included
  A* in_buf = reinterpret_cast<A*>(tcn_smem);
  A* out_buf = in_buf + p.max_channels;
  A* partial = out_buf + p.max_channels;  // blockDim.x entries
  const int64_t b = blockIdx.x;
  const int64_t final_channels = p.layer[p.layers - 1].out_channels;
  for (int64_t l = 0; l < p.layers; ++l) {
    if (static_cast<const int64_t*>(p.layer[l].position)[b] < 0) {  // before any layer's state changes
      poison_row<T>(static_cast<T*>(p.out) + b * final_channels, final_channels);
      return;
    }
  }
  const T* x = static_cast<const T*>(p.x) + b * p.x_row_stride;
  const T* table = static_cast<const T*>(p.context_table);
  const T* context_residual = static_cast<const T*>(p.context_residual);
  for (int64_t c = threadIdx.x; c < p.layer[0].in_channels; c += blockDim.x) in_buf[c] = A(x[c]);
  __syncthreads();
  for (int64_t l = 0; l < p.layers; ++l) {
    const TcnStepLayer& L = p.layer[l];
    const int64_t C_in = L.in_channels, C_out = L.out_channels, K = L.kernel_size;
    const int64_t history_length = (K - 1) * L.dilation;
    T* history = static_cast<T*>(L.history) + b * history_length * C_in;
    int64_t* position = static_cast<int64_t*>(L.position);
    const int64_t pos = position[b];
    const T* packed = static_cast<const T*>(L.packed_weight);
    const T* bias = static_cast<const T*>(L.bias);
    const T* proj = static_cast<const T*>(L.proj_weight);
    const T* proj_bias = static_cast<const T*>(L.proj_bias);
    // Reduction index e = j * C_in + ci over every tap and input channel, plus C_in more for the projection.
    const int64_t conv_terms = K * C_in, terms = conv_terms + (proj ? C_in : 0);
    const int64_t splits = C_out >= blockDim.x ? 1 : blockDim.x / C_out;
    const int64_t slice = (terms + splits - 1) / splits;
    for (int64_t o0 = 0; o0 < C_out; o0 += blockDim.x) {
      const int64_t o = o0 + threadIdx.x % min(C_out - o0, static_cast<int64_t>(blockDim.x));
      const int64_t s = splits == 1 ? 0 : threadIdx.x / C_out;
      const bool active = s < splits && (splits > 1 || o0 + threadIdx.x < C_out);
      // Two partial sums: the conv (slot 0) and the projection (slot 1), kept apart for the epilogue.
      A conv = A(0), res = A(0);
      if (active) {
        const int64_t e_end = min(terms, (s + 1) * slice);
        for (int64_t e = s * slice; e < e_end; ++e) {
          if (e < conv_terms) {
            const int64_t j = e / C_in, ci = e % C_in, lag = (K - 1 - j) * L.dilation;
            if (lag > pos) continue;
            const A v = lag == 0 ? in_buf[ci] : A(history[((pos - lag) % history_length) * C_in + ci]);
            conv += v * A(packed[(j * C_in + ci) * C_out + o]);
          } else {
            const int64_t ci = e - conv_terms;
            res += in_buf[ci] * A(proj[ci * C_out + o]);
          }
        }
      }
      if (splits > 1) {
        // Two passes through `partial`: the conv sums, then the projection sums.
        for (int pass = 0; pass < (proj ? 2 : 1); ++pass) {
          __syncthreads();
          partial[threadIdx.x] = pass == 0 ? conv : res;
          __syncthreads();
          if (threadIdx.x < C_out) {
            A sum = A(0);
            for (int64_t k = 0; k < splits; ++k) sum += partial[k * C_out + threadIdx.x];
            if (pass == 0) conv = sum; else res = sum;
          }
        }
      }
      if (active && (splits == 1 || threadIdx.x < C_out)) {
        A z = conv;
        if (bias) z += A(bias[o]);
        if (table && l == 0) z += A(table[(b * K + context_tap_index(pos, L.dilation, K)) * C_out + o]);
        // The projection with its bias rounded to T once, as F.linear (and cuBLAS's addmm) gives it.
        A residual = proj ? A(T(res + (proj_bias ? A(proj_bias[o]) : A(0)))) : in_buf[o];
        // The context's term of layer 0's residual (its projection of the context), added to T as F.linear's
        // sum of the two parts is.
        if (context_residual && l == 0) residual = A(T(residual + A(context_residual[b * C_out + o])));
        // Rounded to T as every path stores a layer's output (the next layer and the history read it so).
        out_buf[o] = A(T(epilogue_forward<A>(z, true, residual, p.activation)));
      }
    }
    __syncthreads();  // every read of in_buf and of the history is done
    if (history_length > 0) {
      T* slot = history + (pos % history_length) * C_in;
      for (int64_t c = threadIdx.x; c < C_in; c += blockDim.x) slot[c] = T(in_buf[c]);
    }
    if (threadIdx.x == 0) position[b] = next_position(pos);
    A* swap = in_buf;
    in_buf = out_buf;
    out_buf = swap;
    __syncthreads();  // the new in_buf is complete, the old one free to overwrite
  }
  T* out = static_cast<T*>(p.out) + b * p.layer[p.layers - 1].out_channels;
  for (int64_t c = threadIdx.x; c < p.layer[p.layers - 1].out_channels; c += blockDim.x) out[c] = T(in_buf[c]);
}

// A grid's x extent (at most 2^31 - 1 blocks): a clear error beyond it rather than a narrowed count.
unsigned grid_x(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= int64_t{0x7fffffff}, what, " needs ", blocks, " CUDA blocks, more than a grid holds (2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

unsigned blocks_for(int64_t n) { return grid_x((n + kThreads - 1) / kThreads, "causal_conv1d"); }

template <typename T>
void launch_causal_conv(const CausalConvParams& p, cudaStream_t stream) {
  if (p.batch * p.time == 0 || p.out_channels == 0) return;
  // The channel blocks go on the grid's y axis, at most 65535 blocks (8,388,480 channels; the input gradient
  // runs this launch with the input channels in that role): a clear error beyond it, not a failed launch.
  const int64_t channel_blocks = (p.out_channels + kThreads - 1) / kThreads;
  TORCH_CHECK(channel_blocks <= 65535, "causal_conv1d on CUDA takes at most ", int64_t{65535} * kThreads,
              " channels on each side of the conv, got ", p.out_channels);
  const dim3 grid(grid_x(p.batch * ((p.time + kTimeTile - 1) / kTimeTile), "causal_conv1d (batch * time tiles)"),
                  static_cast<unsigned>(channel_blocks));
  causal_conv_cuda_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void causal_conv1d_out_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& context_table, const std::optional<at::Tensor>& residual,
                            int64_t dilation, int64_t groups, int64_t activation, at::Tensor& out,
                            const std::optional<at::Tensor>& pre) {
  const ConvShape s = check_conv_args(x, weight, bias, context_table, dilation, groups, activation, false);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor packed = pack_conv_weight(weight, groups);
  const CausalConvParams p = make_causal_conv_params(s, x, packed, bias, context_table, residual, out, pre);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_out_cuda",
                                  [&] { launch_causal_conv<scalar_t>(p, stream); });
}

void causal_conv1d_backward_out_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& residual,
                                     int64_t dilation, int64_t groups, int64_t activation, at::Tensor& grad_pre,
                                     const std::optional<at::Tensor>& grad_x,
                                     const std::optional<at::Tensor>& grad_weight,
                                     const std::optional<at::Tensor>& grad_residual) {
  const ConvShape s = check_conv_args(x, weight, std::nullopt, std::nullopt, dilation, groups, activation, false);
  const c10::cuda::CUDAGuard guard(x.device());
  CausalConvBackwardParams p =
      make_causal_conv_backward_params(s, kWeightGradRowsPerChunk, grad_out, x, pre, residual, grad_pre, grad_x,
                                       grad_weight, grad_residual);
  const ConvBackwardScratch scratch =
      make_conv_backward_scratch(s, p, x, weight, grad_pre, grad_x, grad_weight, pack_conv_weight_transposed);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t elements = s.batch * s.time * s.out_channels;
  const int64_t packed_size = grad_weight ? s.kernel_size * s.in_channels * (s.out_channels / s.groups) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_backward_out_cuda", [&] {
    if (elements > 0) {
      epilogue_backward_cuda_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_x) launch_causal_conv<scalar_t>(scratch.input_grad, stream);
    if (packed_size > 0) {
      const dim3 grid(blocks_for(packed_size), static_cast<unsigned>(p.weight_grad_chunks));
      weight_grad_partials_cuda_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      weight_grad_reduce_cuda_kernel<scalar_t><<<blocks_for(packed_size), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void causal_conv1d_step_out_cuda(const at::Tensor& x, const at::Tensor& packed_weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& context_table,
                                 const std::optional<at::Tensor>& residual, int64_t dilation, int64_t groups,
                                 int64_t activation, at::Tensor& history, at::Tensor& position, at::Tensor& out) {
  const ConvShape s = check_conv_args(x, packed_weight, bias, context_table, dilation, groups, activation, true);
  const c10::cuda::CUDAGuard guard(x.device());
  const CausalConvStepParams p =
      make_causal_conv_step_params(s, x, packed_weight, bias, context_table, residual, history, position, out);
  if (s.batch == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_step_out_cuda", [&] {
    causal_conv_step_cuda_kernel<scalar_t><<<grid_x(s.batch, "causal_conv1d_step"), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void tcn_step_out_cuda(const at::Tensor& x, at::TensorList packed_weights, const OptionalTensorList& biases,
                       const OptionalTensorList& proj_weights, const OptionalTensorList& proj_biases,
                       const std::optional<at::Tensor>& context_table,
                       const std::optional<at::Tensor>& context_residual, at::IntArrayRef dilations,
                       int64_t activation, at::TensorList histories, at::TensorList positions, at::Tensor& out) {
  const TcnStepParams p = make_tcn_step_params(x, packed_weights, biases, proj_weights, proj_biases, context_table,
                                               context_residual, dilations, activation, histories, positions, out);
  for (int64_t l = 0; l < p.layers; ++l)
    TORCH_CHECK(p.layer[l].weight_block == p.layer[l].out_channels, "tcn_step on CUDA takes the (k, in, out) weight "
                "packing; packed_weights[", l, "] is column-blocked in blocks of ", p.layer[l].weight_block);
  if (p.batch == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tcn_step_out_cuda", [&] {
    using A = acc_t<scalar_t>;
    const size_t smem = (2 * p.max_channels + kStackThreads) * sizeof(A);
    if (smem > 48 * 1024) {
      // Beyond the default 48 KiB of dynamic shared memory a kernel must opt in, up to the device's limit
      // (227 KiB on Hopper).
      int limit = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
      TORCH_CHECK(smem <= static_cast<size_t>(limit), "tcn_step on CUDA supports up to ",
                  (static_cast<size_t>(limit) / sizeof(A) - kStackThreads) / 2, " channels per layer on this device, "
                  "got ", p.max_channels);
      C10_CUDA_CHECK(cudaFuncSetAttribute(tcn_step_cuda_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    tcn_step_cuda_kernel<scalar_t><<<grid_x(p.batch, "tcn_step"), kStackThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hiertcn_fast, CUDA, m) {
  m.impl("causal_conv1d_out", &causal_conv1d_out_cuda);
  m.impl("causal_conv1d_backward_out", &causal_conv1d_backward_out_cuda);
  m.impl("causal_conv1d_step_out", &causal_conv1d_step_out_cuda);
  m.impl("tcn_step_out", &tcn_step_out_cuda);
}

}  // namespace hiertcn
