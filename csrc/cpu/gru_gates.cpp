// CPU kernels for the fused GRU gate math: parallel over batch rows, a straight loop over hidden
// units that the compiler vectorises where the math library allows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hiertcn/gru_gates_host.h"
#include "hiertcn/gru_kernels.h"

namespace hiertcn {
namespace {

// Rows per parallel task: small batches stay on one thread, where the fork costs more than the work.
int64_t rows_per_task(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)); }

template <typename T>
void gru_gates_cpu_kernel(const GruGatesParams& p) {
  using A = acc_t<T>;
  const T* gi = static_cast<const T*>(p.gi);
  const T* gh = static_cast<const T*>(p.gh);
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.hidden;
  at::parallel_for(0, p.batch, rows_per_task(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* gi_row = gi + b * p.gi_row_stride;
      const T* gh_row = gh + b * p.gh_row_stride;
      const T* h_row = h + b * p.h_row_stride;
      T* out_row = out + b * p.out_row_stride;
      for (int64_t j = 0; j < H; ++j) {
        out_row[j] = static_cast<T>(gru_gate_forward<A>(gi_row[j], gi_row[H + j], gi_row[2 * H + j], gh_row[j],
                                                        gh_row[H + j], gh_row[2 * H + j], h_row[j]));
      }
    }
  });
}

template <typename T>
void gru_gates_backward_cpu_kernel(const GruGatesBackwardParams& p) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* gi = static_cast<const T*>(p.gi);
  const T* gh = static_cast<const T*>(p.gh);
  const T* h = static_cast<const T*>(p.h);
  T* d_gi = static_cast<T*>(p.grad_gi);
  T* d_gh = static_cast<T*>(p.grad_gh);
  T* d_h = static_cast<T*>(p.grad_h);
  const int64_t H = p.hidden;
  at::parallel_for(0, p.batch, rows_per_task(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* g_row = g + b * p.grad_out_row_stride;
      const T* gi_row = gi + b * p.gi_row_stride;
      const T* gh_row = gh + b * p.gh_row_stride;
      const T* h_row = h + b * p.h_row_stride;
      T* d_gi_row = d_gi + b * p.grad_gi_row_stride;
      T* d_gh_row = d_gh + b * p.grad_gh_row_stride;
      T* d_h_row = d_h + b * p.grad_h_row_stride;
      for (int64_t j = 0; j < H; ++j) {
        A d_r, d_z, d_n, d_hn, dh;
        gru_gate_backward<A>(g_row[j], gi_row[j], gi_row[H + j], gi_row[2 * H + j], gh_row[j], gh_row[H + j],
                             gh_row[2 * H + j], h_row[j], &d_r, &d_z, &d_n, &d_hn, &dh);
        d_gi_row[j] = static_cast<T>(d_r);
        d_gi_row[H + j] = static_cast<T>(d_z);
        d_gi_row[2 * H + j] = static_cast<T>(d_n);
        d_gh_row[j] = static_cast<T>(d_r);
        d_gh_row[H + j] = static_cast<T>(d_z);
        d_gh_row[2 * H + j] = static_cast<T>(d_hn);
        d_h_row[j] = static_cast<T>(dh);
      }
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

void launch_gru_gates_backward_cpu(const GruGatesBackwardParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_gates_backward_cpu", [&] { gru_gates_backward_cpu_kernel<scalar_t>(p); });
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("gru_gates_out", &gru_gates_out_cpu);
  m.impl("gru_gates_backward_out", &gru_gates_backward_out_cpu);
}

}  // namespace hiertcn
