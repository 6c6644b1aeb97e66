// CPU kernels for the fused GRU gate math: parallel over batch rows, a straight loop over hidden
// units that the compiler vectorises (float: the branch-free exp_poly of hiertcn/gru_gates.h).
// (hiertcn/cpu_clones.h: vectorised, and compiled for AVX-512, AVX2 and the baseline.)
#include "hiertcn/cpu_clones.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hiertcn/gru_gates_host.h"
#include "hiertcn/gru_kernels.h"

namespace hiertcn {
namespace {

// Rows per parallel task: small batches stay on one thread, where the fork costs more than the work.
int64_t rows_per_task(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)); }

// One batch row. The pointers are __restrict (outputs never overlap inputs: the callers allocate them)
// and the sizes plain values: without both, the compiler does not vectorise the loops over units.
template <typename T>
HIERTCN_CPU_CLONES void forward_row(const T* __restrict gi, const T* __restrict gh, const T* __restrict h,
                                    T* __restrict out, int64_t H) {
  for (int64_t j = 0; j < H; ++j) out[j] = gru_gate_forward_row<T, acc_t<T>>(gi, gh, h, j, H);
}

// forward_row that also writes the row's saved gates.
template <typename T>
HIERTCN_CPU_CLONES void forward_row_save(const T* __restrict gi, const T* __restrict gh, const T* __restrict h,
                                         T* __restrict saved, T* __restrict out, int64_t H) {
  for (int64_t j = 0; j < H; ++j) out[j] = gru_gate_forward_save_row<T, acc_t<T>>(gi, gh, h, saved, j, H);
}

// forward_row_save with the biases added to the pre-activations on the way in (in T, as a product's output
// with its bias would be rounded); gi and gh are left as they are.
template <typename T>
HIERTCN_CPU_CLONES void forward_row_bias_save(const T* __restrict gi, const T* __restrict gh,
                                              const T* __restrict b_ih, const T* __restrict b_hh,
                                              const T* __restrict h, T* __restrict saved, T* __restrict out,
                                              int64_t H) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    const T gi_r = gi[j] + b_ih[j], gi_z = gi[H + j] + b_ih[H + j], gi_n = gi[2 * H + j] + b_ih[2 * H + j];
    const T gh_r = gh[j] + b_hh[j], gh_z = gh[H + j] + b_hh[H + j], gh_n = gh[2 * H + j] + b_hh[2 * H + j];
    out[j] = gru_gate_forward_save<T, A>(A(gi_r), A(gi_z), A(gi_n), A(gh_r), A(gh_z), gh_n, A(h[j]), saved, j, H);
  }
}

template <typename T>
HIERTCN_CPU_CLONES void backward_row_saved(const T* __restrict g, const T* __restrict saved, const T* __restrict h,
                                           T* __restrict d_gi, T* __restrict d_gh, T* __restrict d_h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) gru_gate_backward_saved_row<T, acc_t<T>>(g, saved, h, d_gi, d_gh, d_h, j, H);
}

template <typename T>
HIERTCN_CPU_CLONES void backward_row(const T* __restrict g, const T* __restrict gi, const T* __restrict gh,
                                     const T* __restrict h, T* __restrict d_gi, T* __restrict d_gh,
                                     T* __restrict d_h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) gru_gate_backward_row<T, acc_t<T>>(g, gi, gh, h, d_gi, d_gh, d_h, j, H);
}

template <typename T>
void gru_gates_cpu_kernel(const GruGatesParams& p) {
  const T* gi = static_cast<const T*>(p.gi);
  const T* gh = static_cast<const T*>(p.gh);
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  T* saved = static_cast<T*>(p.saved);
  at::parallel_for(0, p.batch, rows_per_task(p.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (saved) {
        forward_row_save<T>(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, h + b * p.h_row_stride,
                            saved + b * p.saved_row_stride, out + b * p.out_row_stride, p.hidden);
      } else {
        forward_row<T>(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, h + b * p.h_row_stride,
                       out + b * p.out_row_stride, p.hidden);
      }
    }
  });
}

template <typename T>
void gru_gates_bias_cpu_kernel(const GruGatesBiasParams& bp) {
  const GruGatesParams& p = bp.gates;
  const T* gi = static_cast<const T*>(p.gi);
  const T* gh = static_cast<const T*>(p.gh);
  const T* b_ih = static_cast<const T*>(bp.b_ih);
  const T* b_hh = static_cast<const T*>(bp.b_hh);
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  T* saved = static_cast<T*>(p.saved);
  TORCH_CHECK(saved != nullptr, "gru_gates_bias_cpu: the saved gates are required");
  at::parallel_for(0, p.batch, rows_per_task(p.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      forward_row_bias_save<T>(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, b_ih, b_hh, h + b * p.h_row_stride,
                               saved + b * p.saved_row_stride, out + b * p.out_row_stride, p.hidden);
    }
  });
}

template <typename T>
void gru_gates_backward_cpu_kernel(const GruGatesBackwardParams& p) {
  const T* g = static_cast<const T*>(p.grad_out);
  const T* gi = static_cast<const T*>(p.gi);
  const T* gh = static_cast<const T*>(p.gh);
  const T* h = static_cast<const T*>(p.h);
  T* d_gi = static_cast<T*>(p.grad_gi);
  T* d_gh = static_cast<T*>(p.grad_gh);
  T* d_h = static_cast<T*>(p.grad_h);
  const T* saved = static_cast<const T*>(p.saved);
  at::parallel_for(0, p.batch, rows_per_task(p.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (saved) {
        backward_row_saved<T>(g + b * p.grad_out_row_stride, saved + b * p.saved_row_stride, h + b * p.h_row_stride,
                              d_gi + b * p.grad_gi_row_stride, d_gh + b * p.grad_gh_row_stride,
                              d_h + b * p.grad_h_row_stride, p.hidden);
        continue;
      }
      backward_row<T>(g + b * p.grad_out_row_stride, gi + b * p.gi_row_stride, gh + b * p.gh_row_stride,
                                h + b * p.h_row_stride, d_gi + b * p.grad_gi_row_stride,
                                d_gh + b * p.grad_gh_row_stride, d_h + b * p.grad_h_row_stride, p.hidden);
    }
  });
}

void gru_gates_out_cpu(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h, at::Tensor& out) {
  launch_gru_gates_cpu(make_gru_gates_params(gi, gh, h, out), h.scalar_type());
}

void gru_gates_backward_out_cpu(const at::Tensor& grad_out, const at::Tensor& gi, const at::Tensor& gh,
                                const at::Tensor& h, at::Tensor& grad_gi, at::Tensor& grad_gh, at::Tensor& grad_h) {
  launch_gru_gates_backward_cpu(make_gru_gates_backward_params(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h),
                                h.scalar_type());
}

}  // namespace

void launch_gru_gates_cpu(const GruGatesParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_gates_cpu", [&] { gru_gates_cpu_kernel<scalar_t>(p); });
}

void launch_gru_gates_bias_cpu(const GruGatesBiasParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_gates_bias_cpu", [&] { gru_gates_bias_cpu_kernel<scalar_t>(p); });
}

void launch_gru_gates_backward_cpu(const GruGatesBackwardParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_gates_backward_cpu", [&] { gru_gates_backward_cpu_kernel<scalar_t>(p); });
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("gru_gates_out", &gru_gates_out_cpu);
  m.impl("gru_gates_backward_out", &gru_gates_backward_out_cpu);
}

}  // namespace hiertcn
