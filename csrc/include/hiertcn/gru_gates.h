// Fused GRU gate math (nn.GRU semantics, gate order r, z, n; reset applied to W_hn h + b_hn).
//
//   gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh          (batch, 3 * hidden), computed outside
//   r  = sigmoid(gi_r + gh_r)
//   z  = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n)
//   h' = (1 - z) * n + z * h
//
// The backward recomputes r, z, n from gi, gh, h instead of saving them: three extra
// transcendental evaluations per element are cheaper than writing and reading 3 * hidden floats.
#pragma once

#include <math.h>

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
};

// Precision-matched math: float stays in float (expf, not the double exp) on host and device.
HIERTCN_HD float exp_acc(float x) { return expf(x); }
HIERTCN_HD double exp_acc(double x) { return exp(x); }
HIERTCN_HD float tanh_acc(float x) { return tanhf(x); }
HIERTCN_HD double tanh_acc(double x) { return tanh(x); }

template <typename A>
HIERTCN_HD A sigmoid_acc(A x) {
  return A(1) / (A(1) + exp_acc(-x));
}

// One hidden unit's forward: returns h'.
template <typename A>
HIERTCN_HD A gru_gate_forward(A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, A gh_n, A h) {
  const A r = sigmoid_acc(gi_r + gh_r);
  const A z = sigmoid_acc(gi_z + gh_z);
  const A n = tanh_acc(gi_n + r * gh_n);
  return (A(1) - z) * n + z * h;
}

// One hidden unit's backward, given g = dL/dh'.
template <typename A>
HIERTCN_HD void gru_gate_backward(A g, A gi_r, A gi_z, A gi_n, A gh_r, A gh_z, A gh_n, A h, A* d_gi_r,
                                  A* d_gi_z, A* d_gi_n, A* d_gh_n, A* d_h) {
  const A r = sigmoid_acc(gi_r + gh_r);
  const A z = sigmoid_acc(gi_z + gh_z);
  const A n = tanh_acc(gi_n + r * gh_n);
  const A d_pre_n = g * (A(1) - z) * (A(1) - n * n);
  const A d_r = d_pre_n * gh_n;
  *d_gi_r = d_r * r * (A(1) - r);
  *d_gi_z = g * (h - n) * z * (A(1) - z);
  *d_gi_n = d_pre_n;
  *d_gh_n = d_pre_n * r;
  *d_h = g * z;
}

}  // namespace hiertcn
