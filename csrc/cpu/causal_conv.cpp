// CPU kernels for the dilated causal convolution (hiertcn/causal_conv.h): parallel over
// (batch, time tile) tasks; inside a tile, tap by tap, each packed weight row is loaded once and
// applied to every row of the tile (an outer-product update the compiler vectorises over output
// channels), accumulating in a tile-local buffer before the fused epilogue.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hiertcn/causal_conv_host.h"

namespace hiertcn {
namespace {

constexpr int64_t kTimeTile = 8;

// acc[r][:] += in_rows[r] (one tap's input row per tile row) times packed tap matrix w_tap, for
// the rows whose source is in range (in_rows[r] == nullptr otherwise).
template <typename T, typename A>
void accumulate_tap(const T* const* in_rows, int64_t rows, const T* w_tap, A* acc, int64_t in_channels,
                    int64_t out_channels, int64_t groups) {
  const int64_t in_g = in_channels / groups, out_g = out_channels / groups;
  if (in_g == 1 && out_g == 1) {  // depthwise: vectorise across channels
    for (int64_t r = 0; r < rows; ++r) {
      if (in_rows[r] == nullptr) continue;
      const T* x = in_rows[r];
      A* a = acc + r * out_channels;
      for (int64_t c = 0; c < in_channels; ++c) a[c] += A(x[c]) * A(w_tap[c]);
    }
    return;
  }
  for (int64_t ci = 0; ci < in_channels; ++ci) {
    const int64_t g = ci / in_g;
    const T* w = w_tap + ci * out_g;
    for (int64_t r = 0; r < rows; ++r) {
      if (in_rows[r] == nullptr) continue;
      const A xv = A(in_rows[r][ci]);
      A* a = acc + r * out_channels + g * out_g;
      for (int64_t ol = 0; ol < out_g; ++ol) a[ol] += xv * A(w[ol]);
    }
  }
}

template <typename T>
void causal_conv_cpu_kernel(const CausalConvParams& p) {
  using A = acc_t<T>;
  const T* in = static_cast<const T*>(p.in);
  const T* packed = static_cast<const T*>(p.packed_weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t tiles = (p.time + kTimeTile - 1) / kTimeTile;
  // Group tasks so that each parallel chunk does at least ~32k multiply-adds.
  const int64_t task_flops = std::max<int64_t>(1, kTimeTile * C_in * (C_out / p.groups) * K);
  const int64_t grain = std::max<int64_t>(1, 32768 / task_flops);
  at::parallel_for(0, p.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kTimeTile * C_out);
    const T* in_rows[kTimeTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, t0 = (task % tiles) * kTimeTile;
      const int64_t rows = std::min(kTimeTile, p.time - t0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < K; ++j) {
        const int64_t offset = p.direction * (K - 1 - j) * p.dilation;
        bool any = false;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t s = t0 + r - offset;
          const bool valid = s >= 0 && s < p.time;
          in_rows[r] = valid ? in + b * p.in_batch_stride + s * p.in_time_stride : nullptr;
          any |= valid;
        }
        if (any) accumulate_tap(in_rows, rows, packed + j * C_in * (C_out / p.groups), acc.data(), C_in, C_out,
                                p.groups);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r;
        const A* a = acc.data() + r * C_out;
        const T* table_row = table ? table + (b * K + context_tap_index(t, p.dilation, K)) * C_out : nullptr;
        const T* res_row = residual ? residual + b * p.residual_batch_stride + t * p.residual_time_stride : nullptr;
        T* out_row = out + (b * p.time + t) * C_out;
        T* pre_row = pre ? pre + (b * p.time + t) * C_out : nullptr;
        for (int64_t o = 0; o < C_out; ++o) {
          A z = a[o];
          if (bias) z += A(bias[o]);
          if (table_row) z += A(table_row[o]);
          if (pre_row) pre_row[o] = T(z);
          out_row[o] = T(epilogue_forward<A>(z, res_row != nullptr, res_row ? A(res_row[o]) : A(0), p.activation));
        }
      }
    }
  });
}

template <typename T>
void epilogue_backward_cpu_kernel(const CausalConvBackwardParams& p) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* pre = static_cast<const T*>(p.pre);
  const T* residual = static_cast<const T*>(p.residual);
  T* grad_pre = static_cast<T*>(p.grad_pre);
  T* grad_residual = static_cast<T*>(p.grad_residual);
  const int64_t C = p.out_channels;
  at::parallel_for(0, p.batch * p.time, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.time, t = row % p.time;
      const T* g_row = g + b * p.grad_out_batch_stride + t * p.grad_out_time_stride;
      const T* res_row = residual ? residual + b * p.residual_batch_stride + t * p.residual_time_stride : nullptr;
      for (int64_t o = 0; o < C; ++o) {
        A grad_res = A(0);
        const A z = pre ? A(pre[row * C + o]) : A(0);
        grad_pre[row * C + o] =
            T(epilogue_backward<A>(A(g_row[o]), z, res_row != nullptr, res_row ? A(res_row[o]) : A(0), p.activation,
                                   &grad_res));
        if (grad_residual) grad_residual[row * C + o] = T(grad_res);
      }
    }
  });
}

// grad_weight[o, cl, j] = sum over (b, t) of grad_pre[b, t, o] x[b, t - (k-1-j) d, g * in_g + cl]: each chunk
// of rows sums into its own partial buffer (packed layout), then the chunks are added in order.
template <typename T>
void weight_grad_cpu_kernel(const CausalConvBackwardParams& p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* gz = static_cast<const T*>(p.grad_pre);
  A* partials = static_cast<A*>(p.grad_weight_partials);
  T* grad_weight = static_cast<T*>(p.grad_weight);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = C_out / p.groups;
  const int64_t packed_size = K * C_in * out_g;
  const int64_t rows = p.batch * p.time;
  const int64_t chunk_rows = weight_grad_chunk_rows(rows, p.weight_grad_chunks);
  at::parallel_for(0, p.weight_grad_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* part = partials + chunk * packed_size;
      std::fill(part, part + packed_size, A(0));
      const int64_t row_end = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
        const int64_t b = row / p.time, t = row % p.time;
        const T* gz_row = gz + row * C_out;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t s = t - (K - 1 - j) * p.dilation;
          if (s < 0) continue;
          const T* x_row = x + b * p.x_batch_stride + s * p.x_time_stride;
          A* part_tap = part + j * C_in * out_g;
          if (in_g == 1 && out_g == 1) {
            for (int64_t c = 0; c < C_in; ++c) part_tap[c] += A(x_row[c]) * A(gz_row[c]);
            continue;
          }
          for (int64_t ci = 0; ci < C_in; ++ci) {
            const A xv = A(x_row[ci]);
            const T* gz_group = gz_row + (ci / in_g) * out_g;
            A* w = part_tap + ci * out_g;
            for (int64_t ol = 0; ol < out_g; ++ol) w[ol] += xv * A(gz_group[ol]);
          }
        }
      }
    }
  });
  // Sum the chunks in order and scatter from the packed layout [j][ci][ol] to (out, in/groups, k).
  at::parallel_for(0, packed_size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      A sum = A(0);
      for (int64_t chunk = 0; chunk < p.weight_grad_chunks; ++chunk) sum += partials[chunk * packed_size + e];
      const int64_t j = e / (C_in * out_g), ci = (e / out_g) % C_in, ol = e % out_g;
      const int64_t g = ci / in_g, cl = ci % in_g;
      grad_weight[((g * out_g + ol) * in_g + cl) * K + j] = T(sum);
    }
  });
}

template <typename T>
void causal_conv_step_cpu_kernel(const CausalConvStepParams& p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* packed = static_cast<const T*>(p.packed_weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  T* history = static_cast<T*>(p.history);
  int64_t* position = static_cast<int64_t*>(p.position);
  T* out = static_cast<T*>(p.out);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t history_length = (K - 1) * p.dilation;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C_out);
    const T* in_row[1];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t pos = position[b];
      const T* x_row = x + b * p.x_row_stride;
      T* hist = history + b * history_length * C_in;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < K; ++j) {
        const int64_t lag = (K - 1 - j) * p.dilation;
        if (lag > pos) continue;
        in_row[0] = lag == 0 ? x_row : hist + ((pos - lag) % history_length) * C_in;
        accumulate_tap(in_row, 1, packed + j * C_in * (C_out / p.groups), acc.data(), C_in, C_out, p.groups);
      }
      const T* table_row = table ? table + (b * K + context_tap_index(pos, p.dilation, K)) * C_out : nullptr;
      const T* res_row = residual ? residual + b * p.residual_row_stride : nullptr;
      for (int64_t o = 0; o < C_out; ++o) {
        A z = acc[o];
        if (bias) z += A(bias[o]);
        if (table_row) z += A(table_row[o]);
        out[b * C_out + o] = T(epilogue_forward<A>(z, res_row != nullptr, res_row ? A(res_row[o]) : A(0),
                                                   p.activation));
      }
      if (history_length > 0) std::copy(x_row, x_row + C_in, hist + (pos % history_length) * C_in);
      position[b] = pos + 1;
    }
  });
}

void causal_conv1d_out_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& context_table, const std::optional<at::Tensor>& residual,
                           int64_t dilation, int64_t groups, int64_t activation, at::Tensor& out,
                           const std::optional<at::Tensor>& pre) {
  const ConvShape s = check_conv_args(x, weight, bias, context_table, dilation, groups, activation, false);
  const at::Tensor packed = pack_conv_weight(weight, groups);
  const CausalConvParams p = make_causal_conv_params(s, x, packed, bias, context_table, residual, out, pre);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_out_cpu", [&] { causal_conv_cpu_kernel<scalar_t>(p); });
}

void causal_conv1d_backward_out_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& residual,
                                    int64_t dilation, int64_t groups, int64_t activation, at::Tensor& grad_pre,
                                    at::Tensor& grad_x, at::Tensor& grad_weight,
                                    const std::optional<at::Tensor>& grad_residual) {
  const ConvShape s = check_conv_args(x, weight, std::nullopt, std::nullopt, dilation, groups, activation, false);
  CausalConvBackwardParams p =
      make_causal_conv_backward_params(s, grad_out, x, pre, residual, grad_pre, grad_x, grad_weight, grad_residual);
  const at::Tensor partials = new_grad_weight_partials(p, x);
  p.grad_weight_partials = partials.data_ptr();
  const at::Tensor packed_transposed = pack_conv_weight_transposed(weight);
  const CausalConvParams input_grad = make_input_grad_params(s, grad_pre, packed_transposed, grad_x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward_out_cpu", [&] {
    epilogue_backward_cpu_kernel<scalar_t>(p);
    causal_conv_cpu_kernel<scalar_t>(input_grad);
    weight_grad_cpu_kernel<scalar_t>(p);
  });
}

void causal_conv1d_step_out_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& context_table,
                                const std::optional<at::Tensor>& residual, int64_t dilation, int64_t groups,
                                int64_t activation, at::Tensor& history, at::Tensor& position, at::Tensor& out) {
  const ConvShape s = check_conv_args(x, weight, bias, context_table, dilation, groups, activation, true);
  const at::Tensor packed = pack_conv_weight(weight, groups);
  const CausalConvStepParams p =
      make_causal_conv_step_params(s, x, packed, bias, context_table, residual, history, position, out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_step_out_cpu",
                             [&] { causal_conv_step_cpu_kernel<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("causal_conv1d_out", &causal_conv1d_out_cpu);
  m.impl("causal_conv1d_backward_out", &causal_conv1d_backward_out_cpu);
  m.impl("causal_conv1d_step_out", &causal_conv1d_step_out_cpu);
}

}  // namespace hiertcn
