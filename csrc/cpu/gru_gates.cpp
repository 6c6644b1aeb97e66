// CPU kernels for the fused GRU gate math: parallel over batch rows, a straight loop over hidden
// units that the compiler vectorises (float: the branch-free exp_poly of hiertcn/gru_gates.h).
// (hiertcn/cpu_clones.h: vectorised, and compiled for AVX-512, AVX2 with FMA, and the baseline.)
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
// and the sizes plain values: without both, the compiler does not vectorise the loops over units. Each row
// function is an always-inline template (T the storage type) compiled into the versions of
// HIERTCN_CPU_VERSIONS, one per dtype, below.

// Pass 1 of a row's chunk of n units from j0: the reset and update gates' sigmoids, r and z, into r[0..n) and
// z[0..n). The row functions compute a chunk in two passes, the sigmoids then the rest: with all of one unit's
// math in one loop body, its exp and divide chains were longer than the out-of-order window, and the loop ran
// at their latency (the forward of 256 rows of 128 units took 70 us on two Zen 2 cores, in two passes 56 us).
template <typename T, typename A>
HIERTCN_ALWAYS_INLINE void reset_update_chunk(const T* __restrict gi, const T* __restrict gh, int64_t H, int64_t j0,
                                              int64_t n, A* __restrict r, A* __restrict z) {
  for (int64_t j = 0; j < n; ++j) {
    r[j] = sigmoid_acc(A(gi[j0 + j]) + A(gh[j0 + j]));
    z[j] = sigmoid_acc(A(gi[H + j0 + j]) + A(gh[H + j0 + j]));
  }
}

constexpr int64_t kChunk = 64;  // units per two-pass chunk

template <typename T>
HIERTCN_ALWAYS_INLINE void forward_row_impl(const T* __restrict gi, const T* __restrict gh, const T* __restrict h,
                                            T* __restrict out, int64_t H) {
  using A = acc_t<T>;
  A r[kChunk], z[kChunk];
  for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
    const int64_t n = std::min(kChunk, H - j0);
    reset_update_chunk<T, A>(gi, gh, H, j0, n, r, z);
    for (int64_t j = 0; j < n; ++j) {
      const A nn = tanh_acc(A(gi[2 * H + j0 + j]) + r[j] * A(gh[2 * H + j0 + j]));
      out[j0 + j] = static_cast<T>((A(1) - z[j]) * nn + z[j] * A(h[j0 + j]));
    }
  }
}

// forward_row that also writes the row's saved gates. On the CPU the math type is the storage type, so the saved
// gates are the activations r, z, n and gh_n (hiertcn/gru_gates.h), and passes 1 and 2 of forward_row can keep
// r and z in the saved row itself: the same math as gru_gate_forward_save.
template <typename T>
HIERTCN_ALWAYS_INLINE void forward_row_save_impl(const T* __restrict gi, const T* __restrict gh,
                                                 const T* __restrict h, T* __restrict saved, T* __restrict out,
                                                 int64_t H) {
  using A = acc_t<T>;
  static_assert(saves_activations<T, A>(), "the CPU kernels save the activations");
  for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
    const int64_t e = std::min(kChunk, H - j0) + j0;
    reset_update_chunk<T, A>(gi, gh, H, j0, e - j0, saved + j0, saved + H + j0);
    for (int64_t j = j0; j < e; ++j) {
      const T gh_n = gh[2 * H + j];
      const A r = saved[j], z = saved[H + j];
      const A nn = tanh_acc(A(gi[2 * H + j]) + r * A(gh_n));
      saved[2 * H + j] = nn;
      saved[3 * H + j] = gh_n;
      out[j] = static_cast<T>((A(1) - z) * nn + z * A(h[j]));
    }
  }
}

// forward_row_save with the biases added to the pre-activations on the way in (in T, as a product's output
// with its bias would be rounded); gi and gh are left as they are.
template <typename T>
HIERTCN_ALWAYS_INLINE void forward_row_bias_save_impl(const T* __restrict gi, const T* __restrict gh,
                                                      const T* __restrict b_ih, const T* __restrict b_hh,
                                                      const T* __restrict h, T* __restrict saved,
                                                      T* __restrict out, int64_t H) {
  using A = acc_t<T>;
  static_assert(saves_activations<T, A>(), "the CPU kernels save the activations");
  for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
    const int64_t e = std::min(kChunk, H - j0) + j0;
    for (int64_t j = j0; j < e; ++j) {
      const T gi_r = gi[j] + b_ih[j], gi_z = gi[H + j] + b_ih[H + j];
      const T gh_r = gh[j] + b_hh[j], gh_z = gh[H + j] + b_hh[H + j];
      saved[j] = sigmoid_acc(A(gi_r) + A(gh_r));
      saved[H + j] = sigmoid_acc(A(gi_z) + A(gh_z));
    }
    for (int64_t j = j0; j < e; ++j) {
      const T gi_n = gi[2 * H + j] + b_ih[2 * H + j], gh_n = gh[2 * H + j] + b_hh[2 * H + j];
      const A r = saved[j], z = saved[H + j];
      const A nn = tanh_acc(A(gi_n) + r * A(gh_n));
      saved[2 * H + j] = nn;
      saved[3 * H + j] = gh_n;
      out[j] = static_cast<T>((A(1) - z) * nn + z * A(h[j]));
    }
  }
}

template <typename T>
HIERTCN_ALWAYS_INLINE void backward_row_saved_impl(const T* __restrict g, const T* __restrict saved,
                                                   const T* __restrict h, T* __restrict d_gi, T* __restrict d_gh,
                                                   T* __restrict d_h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) gru_gate_backward_saved_row<T, acc_t<T>>(g, saved, h, d_gi, d_gh, d_h, j, H);
}

template <typename T>
HIERTCN_ALWAYS_INLINE void backward_row_impl(const T* __restrict g, const T* __restrict gi, const T* __restrict gh,
                                             const T* __restrict h, T* __restrict d_gi, T* __restrict d_gh,
                                             T* __restrict d_h, int64_t H) {
  // Two passes per chunk of units, as forward_row: the gradients of gru_gate_backward_row.
  using A = acc_t<T>;
  A r[kChunk], z[kChunk];
  for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
    const int64_t n = std::min(kChunk, H - j0);
    reset_update_chunk<T, A>(gi, gh, H, j0, n, r, z);
    for (int64_t j = 0; j < n; ++j) {
      const A hn = A(gh[2 * H + j0 + j]);
      const A nn = tanh_acc(A(gi[2 * H + j0 + j]) + r[j] * hn);
      A d_r, d_z, d_n, d_hn, dh;
      gru_gate_backward_from<A>(A(g[j0 + j]), r[j], z[j], nn, hn, A(h[j0 + j]), &d_r, &d_z, &d_n, &d_hn, &dh);
      store_gate_grads<T, A>(d_gi, d_gh, d_h, j0 + j, H, d_r, d_z, d_n, d_hn, dh);
    }
  }
}

#define HIERTCN_GATE_ROWS(T)                                                                                        \
  HIERTCN_CPU_VERSIONS(void, forward_row,                                                                          \
                       (const T* __restrict gi, const T* __restrict gh, const T* __restrict h, T* __restrict out,  \
                        int64_t H),                                                                                \
                       forward_row_impl<T>(gi, gh, h, out, H))                                                     \
  HIERTCN_CPU_VERSIONS(void, forward_row_save,                                                                     \
                       (const T* __restrict gi, const T* __restrict gh, const T* __restrict h,                     \
                        T* __restrict saved, T* __restrict out, int64_t H),                                        \
                       forward_row_save_impl<T>(gi, gh, h, saved, out, H))                                         \
  HIERTCN_CPU_VERSIONS(void, forward_row_bias_save,                                                                \
                       (const T* __restrict gi, const T* __restrict gh, const T* __restrict b_ih,                  \
                        const T* __restrict b_hh, const T* __restrict h, T* __restrict saved, T* __restrict out,   \
                        int64_t H),                                                                                \
                       forward_row_bias_save_impl<T>(gi, gh, b_ih, b_hh, h, saved, out, H))                        \
  HIERTCN_CPU_VERSIONS(void, backward_row_saved,                                                                   \
                       (const T* __restrict g, const T* __restrict saved, const T* __restrict h,                   \
                        T* __restrict d_gi, T* __restrict d_gh, T* __restrict d_h, int64_t H),                     \
                       backward_row_saved_impl<T>(g, saved, h, d_gi, d_gh, d_h, H))                                \
  HIERTCN_CPU_VERSIONS(void, backward_row,                                                                         \
                       (const T* __restrict g, const T* __restrict gi, const T* __restrict gh,                     \
                        const T* __restrict h, T* __restrict d_gi, T* __restrict d_gh, T* __restrict d_h,          \
                        int64_t H),                                                                                \
                       backward_row_impl<T>(g, gi, gh, h, d_gi, d_gh, d_h, H))
HIERTCN_GATE_ROWS(float)
HIERTCN_GATE_ROWS(double)
#undef HIERTCN_GATE_ROWS

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
        forward_row_save(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, h + b * p.h_row_stride,
                            saved + b * p.saved_row_stride, out + b * p.out_row_stride, p.hidden);
      } else {
        forward_row(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, h + b * p.h_row_stride,
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
      forward_row_bias_save(gi + b * p.gi_row_stride, gh + b * p.gh_row_stride, b_ih, b_hh, h + b * p.h_row_stride,
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
        backward_row_saved(g + b * p.grad_out_row_stride, saved + b * p.saved_row_stride, h + b * p.h_row_stride,
                              d_gi + b * p.grad_gi_row_stride, d_gh + b * p.grad_gh_row_stride,
                              d_h + b * p.grad_h_row_stride, p.hidden);
        continue;
      }
      backward_row(g + b * p.grad_out_row_stride, gi + b * p.gi_row_stride, gh + b * p.gh_row_stride,
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
