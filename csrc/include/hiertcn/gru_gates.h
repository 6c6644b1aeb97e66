// Fused GRU gate math (nn.GRU semantics, gate order r, z, n; reset applied to W_hn h + b_hn).
//
//   gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh          (batch, 3 * hidden), computed outside
//   r  = sigmoid(gi_r + gh_r)
//   z  = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n)
//   h' = (1 - z) * n + z * h
//
// The backward either recomputes r, z, n from gi, gh, h (the gru_gates op, whose autograd keeps gi and gh),
// or reads a saved row of 4 * hidden values per row instead of gi and gh's 6 (the layer ops and
// session_update): at j, H + j, 2H + j, 3H + j
// - where the storage type is the math type (float, double): r, z, n and hn = gh_n (W_hn h + b_hn), and the
//   backward recomputes nothing;
// - in half types: gi_r + gh_r, gi_z + gh_z, gi_n and hn, from which the backward recomputes r, z, n in
//   float. Gates rounded to a half type would lose the gradients near saturation: a z within 2^-9 of 1
//   rounds to 1 in bfloat16, and z (1 - z) to 0.
#pragma once

#include <math.h>

#include <type_traits>

#include "hiertcn/common.h"

namespace hiertcn {

struct GruGatesParams {
  int64_t batch;
  int64_t hidden;
  // Row strides in elements; the last dimension has unit stride.
  int64_t gi_row_stride;
  int64_t gh_row_stride;
  int64_t h_row_stride;
  int64_t out_row_stride;
  const void* gi;
  const void* gh;
  const void* h;
  void* out;
  // Optional: rows of 4 * hidden that receive the saved gates (see the top of this file) for the backward.
  void* saved = nullptr;
  int64_t saved_row_stride = 0;
};

struct GruGatesBackwardParams {
  int64_t batch;
  int64_t hidden;
  int64_t grad_out_row_stride;
  int64_t gi_row_stride;
  int64_t gh_row_stride;
  int64_t h_row_stride;
  // The gradients are written with row strides too: the recurrence writes each step's grad_gi
  // straight into its slice of a (batch, time, 3 * hidden) buffer.
  int64_t grad_gi_row_stride;
  int64_t grad_gh_row_stride;
  int64_t grad_h_row_stride;
  const void* grad_out;
  const void* gi;
  const void* gh;
  const void* h;
  void* grad_gi;
  void* grad_gh;
  void* grad_h;
  // When set, the gates are read from these rows of 4 * hidden (a forward's saved gates) and gi, gh are not
  // read.
  const void* saved = nullptr;
  int64_t saved_row_stride = 0;
};

// Precision-matched math: float stays in float (expf, not the double exp) on host and device.
//
// On the host, float uses exp_poly below instead of libm's expf and tanhf: those are scalar calls
// that keep the gate loops from vectorising, and the gates then cost more than the matrix products
// around them. exp_poly is branch-free, so the compiler vectorises the loops over hidden units.
// double (the precision the tests compare in) keeps libm.
#if !defined(__CUDA_ARCH__)
// e^x in float to about 2 ulp: e^x = 2^n e^r with n = round(x log2 e), |r| <= ln 2 / 2, e^r by a
// degree-6 polynomial (Cephes' coefficients), 2^n built in the exponent bits. x is clamped to
// [-80, 80], which is all sigmoid and tanh need (their results are then within 2e-35 of 0 or 1), and
// keeps every lane far from denormal floats: a tighter bound near e^-87 made the compiler's
// vectorised code multiply by a near-denormal constant in the clamped branch of every lane, which
// is five times slower on x86 even where that branch is discarded.
inline float exp_poly(float x) {
  x = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);
  // Round x log2 e to the nearest integer with the magic number 1.5 * 2^23 (exact without
  // -ffast-math): the sum's low mantissa bits then hold n itself, which gives 2^n's exponent bits
  // by integer shifts alone.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const uint32_t two_n_bits = (__builtin_bit_cast(uint32_t, shifted) + 127u) << 23;
  return e_r * __builtin_bit_cast(float, two_n_bits);
}
#endif

HIERTCN_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}
HIERTCN_HD double exp_acc(double x) { return exp(x); }
HIERTCN_HD float tanh_acc(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  // 1 - 2 / (e^2|x| + 1) is exact at both tails, but near 0 it cancels to an absolute error of a float ulp of 1
  // (tanh(1e-5) came out 1.00136e-5, tanh(1e-30) 0): below |x| = 0.4, the first 7 terms of Taylor's series (within
  // 4e-9 of tanh there). Both are computed and one selected, so that the gate loops still vectorise.
  const float s = x * x;
  const float near_zero =
      x * (1.0f + s * (-1.0f / 3 + s * (2.0f / 15 + s * (-17.0f / 315 + s * (62.0f / 2835 + s * (
               -1382.0f / 155925 + s * (21844.0f / 6081075)))))));
  const float a = __builtin_fabsf(x);
  const float far = __builtin_copysignf(1.0f - 2.0f / (exp_poly(2.0f * a) + 1.0f), x);
  return a < 0.4f ? near_zero : far;
#endif
}
HIERTCN_HD double tanh_acc(double x) { return tanh(x); }

template <typename A>
HIERTCN_HD A sigmoid_acc(A x) {
  return A(1) / (A(1) + exp_acc(-x));
}

// One hidden unit's activations, from its pre-activations.
template <typename A>
struct GruGateActivations {
  A r, z, n;
};

template <typename A>
HIERTCN_HD GruGateActivations<A> gru_gate_activations(A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, A gh_n) {
  GruGateActivations<A> a;
  a.r = sigmoid_acc(gi_r + gh_r);
  a.z = sigmoid_acc(gi_z + gh_z);
  a.n = tanh_acc(gi_n + a.r * gh_n);
  return a;
}

// One hidden unit's forward: returns h'.
template <typename A>
HIERTCN_HD A gru_gate_forward(A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, A gh_n, A h) {
  const GruGateActivations<A> a = gru_gate_activations(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n);
  return (A(1) - a.z) * a.n + a.z * h;
}

// One hidden unit's backward from its activations and hn = gh_n, given g = dL/dh'.
template <typename A>
HIERTCN_HD void gru_gate_backward_from(A g, A r, A z, A n, A hn, A h, A* d_gi_r, A* d_gi_z, A* d_gi_n, A* d_gh_n,
                                       A* d_h) {
  const A d_pre_n = g * (A(1) - z) * (A(1) - n * n);
  const A d_r = d_pre_n * hn;
  *d_gi_r = d_r * r * (A(1) - r);
  *d_gi_z = g * (h - n) * z * (A(1) - z);
  *d_gi_n = d_pre_n;
  *d_gh_n = d_pre_n * r;
  *d_h = g * z;
}

// One hidden unit's backward, given g = dL/dh': the activations recomputed from the pre-activations.
template <typename A>
HIERTCN_HD void gru_gate_backward(A g, A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, A gh_n, A h, A* d_gi_r,
                                  A* d_gi_z, A* d_gi_n, A* d_gh_n, A* d_h) {
  const GruGateActivations<A> a = gru_gate_activations(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n);
  gru_gate_backward_from(g, a.r, a.z, a.n, gh_n, h, d_gi_r, d_gi_z, d_gi_n, d_gh_n, d_h);
}

// Unit j of one row, read from and written to row pointers, shared by the CPU and CUDA kernels:
// gi and gh hold the gates r, z, n at j, H + j, 2H + j. Math in A, storage in T.
template <typename T, typename A>
HIERTCN_HD T gru_gate_forward_row(const T* gi, const T* gh, const T* h, int64_t j, int64_t H) {
  return static_cast<T>(gru_gate_forward<A>(A(gi[j]), A(gi[H + j]), A(gi[2 * H + j]), A(gh[j]), A(gh[H + j]),
                                            A(gh[2 * H + j]), A(h[j])));
}

// Whether a saved row holds the activations (T is the math type) or the pre-activations (half types).
template <typename T, typename A>
constexpr bool saves_activations() {
  return std::is_same<T, A>::value;
}

// The forward from pre-activations already summed with their biases, that also writes the unit's saved
// gates at j, H + j, 2H + j, 3H + j of saved (see the top of this file for what they are). h' comes from the
// unrounded activations, as in gru_gate_forward_row.
template <typename T, typename A>
HIERTCN_HD T gru_gate_forward_save(A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, T gh_n, A h, T* saved, int64_t j,
                                   int64_t H) {
  const GruGateActivations<A> a = gru_gate_activations(gi_r, gi_z, gi_n, gh_r, gh_z, A(gh_n));
  if constexpr (saves_activations<T, A>()) {
    saved[j] = a.r;
    saved[H + j] = a.z;
    saved[2 * H + j] = a.n;
  } else {
    saved[j] = static_cast<T>(gi_r + gh_r);
    saved[H + j] = static_cast<T>(gi_z + gh_z);
    saved[2 * H + j] = static_cast<T>(gi_n);
  }
  saved[3 * H + j] = gh_n;
  return static_cast<T>((A(1) - a.z) * a.n + a.z * h);
}

template <typename T, typename A>
HIERTCN_HD T gru_gate_forward_save_row(const T* gi, const T* gh, const T* h, T* saved, int64_t j, int64_t H) {
  return gru_gate_forward_save<T, A>(A(gi[j]), A(gi[H + j]), A(gi[2 * H + j]), A(gh[j]), A(gh[H + j]),
                                     gh[2 * H + j], A(h[j]), saved, j, H);
}

template <typename T, typename A>
HIERTCN_HD void store_gate_grads(T* d_gi, T* d_gh, T* d_h, int64_t j, int64_t H, A d_r, A d_z, A d_n, A d_hn,
                                 A dh) {
  d_gi[j] = static_cast<T>(d_r);
  d_gi[H + j] = static_cast<T>(d_z);
  d_gi[2 * H + j] = static_cast<T>(d_n);
  d_gh[j] = static_cast<T>(d_r);
  d_gh[H + j] = static_cast<T>(d_z);
  d_gh[2 * H + j] = static_cast<T>(d_hn);
  d_h[j] = static_cast<T>(dh);
}

// The gradient of gh's r and z parts equals gi's: both enter the same sigmoid.
template <typename T, typename A>
HIERTCN_HD void gru_gate_backward_row(const T* g, const T* gi, const T* gh, const T* h, T* d_gi, T* d_gh, T* d_h,
                                      int64_t j, int64_t H) {
  A d_r, d_z, d_n, d_hn, dh;
  gru_gate_backward<A>(A(g[j]), A(gi[j]), A(gi[H + j]), A(gi[2 * H + j]), A(gh[j]), A(gh[H + j]), A(gh[2 * H + j]),
                       A(h[j]), &d_r, &d_z, &d_n, &d_hn, &dh);
  store_gate_grads<T, A>(d_gi, d_gh, d_h, j, H, d_r, d_z, d_n, d_hn, dh);
}

// The same from a saved row.
template <typename T, typename A>
HIERTCN_HD void gru_gate_backward_saved_row(const T* g, const T* saved, const T* h, T* d_gi, T* d_gh, T* d_h,
                                            int64_t j, int64_t H) {
  const A hn = A(saved[3 * H + j]);
  GruGateActivations<A> a;
  if constexpr (saves_activations<T, A>()) {
    a.r = saved[j];
    a.z = saved[H + j];
    a.n = saved[2 * H + j];
  } else {
    a.r = sigmoid_acc(A(saved[j]));
    a.z = sigmoid_acc(A(saved[H + j]));
    a.n = tanh_acc(A(saved[2 * H + j]) + a.r * hn);
  }
  A d_r, d_z, d_n, d_hn, dh;
  gru_gate_backward_from<A>(A(g[j]), a.r, a.z, a.n, hn, A(h[j]), &d_r, &d_z, &d_n, &d_hn, &dh);
  store_gate_grads<T, A>(d_gi, d_gh, d_h, j, H, d_r, d_z, d_n, d_hn, dh);
}

}  // namespace hiertcn
