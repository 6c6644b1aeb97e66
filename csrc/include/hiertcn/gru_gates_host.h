// Host-side validation and params filling for the gru_gates ops, shared by the CPU and CUDA entry
// points so that both backends accept exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include "hiertcn/checks.h"
#include "hiertcn/gru_gates.h"

namespace hiertcn {

inline GruGatesParams make_gru_gates_params(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h,
                                            const at::Tensor& out) {
  check_rows_unit_stride(h, "h");
  const int64_t batch = h.size(0), hidden = h.size(1);
  check_shape(gi, {batch, 3 * hidden}, "gi");
  check_shape(gh, {batch, 3 * hidden}, "gh");
  check_shape(out, {batch, hidden}, "out");
  check_rows_unit_stride(gi, "gi");
  check_rows_unit_stride(gh, "gh");
  check_rows_unit_stride(out, "out");
  check_same_device_dtype(h, gi, "h", "gi");
  check_same_device_dtype(h, gh, "h", "gh");
  check_same_device_dtype(h, out, "h", "out");
  GruGatesParams p;
  p.batch = batch;
  p.hidden = hidden;
  p.gi_row_stride = gi.stride(0);
  p.gh_row_stride = gh.stride(0);
  p.h_row_stride = h.stride(0);
  p.out_row_stride = out.stride(0);
  p.gi = gi.data_ptr();
  p.gh = gh.data_ptr();
  p.h = h.data_ptr();
  p.out = out.data_ptr();
  return p;
}

// The fields every gates backward shares, checked against h: dL/dh' (grad_out) and the gradients' rows.
inline GruGatesBackwardParams gate_gradient_params(const at::Tensor& grad_out, const at::Tensor& h,
                                                   const at::Tensor& grad_gi, const at::Tensor& grad_gh,
                                                   const at::Tensor& grad_h) {
  check_rows_unit_stride(h, "h");
  const int64_t batch = h.size(0), hidden = h.size(1);
  const auto check_rows = [&](const at::Tensor& t, int64_t width, const char* name) {
    check_shape(t, {batch, width}, name);
    check_rows_unit_stride(t, name);
    check_same_device_dtype(h, t, "h", name);
  };
  check_rows(grad_out, hidden, "grad_out");
  check_rows(grad_gi, 3 * hidden, "grad_gi");
  check_rows(grad_gh, 3 * hidden, "grad_gh");
  check_rows(grad_h, hidden, "grad_h");
  GruGatesBackwardParams p{};
  p.batch = batch;
  p.hidden = hidden;
  p.grad_out_row_stride = grad_out.stride(0);
  p.h_row_stride = h.stride(0);
  p.grad_gi_row_stride = grad_gi.stride(0);
  p.grad_gh_row_stride = grad_gh.stride(0);
  p.grad_h_row_stride = grad_h.stride(0);
  p.grad_out = grad_out.data_ptr();
  p.h = h.data_ptr();
  p.grad_gi = grad_gi.data_ptr();
  p.grad_gh = grad_gh.data_ptr();
  p.grad_h = grad_h.data_ptr();
  return p;
}

inline GruGatesBackwardParams make_gru_gates_backward_params(const at::Tensor& grad_out, const at::Tensor& gi,
                                                             const at::Tensor& gh, const at::Tensor& h,
                                                             const at::Tensor& grad_gi, const at::Tensor& grad_gh,
                                                             const at::Tensor& grad_h) {
  const GruGatesParams fwd = make_gru_gates_params(gi, gh, h, grad_out);
  GruGatesBackwardParams p = gate_gradient_params(grad_out, h, grad_gi, grad_gh, grad_h);
  p.gi_row_stride = fwd.gi_row_stride;
  p.gh_row_stride = fwd.gh_row_stride;
  p.gi = fwd.gi;
  p.gh = fwd.gh;
  return p;
}

// Checks saved, (batch, 4 * hidden) rows of h's device and dtype with unit stride, for saved gates.
inline void check_saved_gates(const at::Tensor& saved, const at::Tensor& h) {
  check_shape(saved, {h.size(0), 4 * h.size(1)}, "saved gates");
  check_rows_unit_stride(saved, "saved gates");
  check_same_device_dtype(h, saved, "h", "saved gates");
}

// The gates' params that also write the saved gates (hiertcn/gru_gates.h) into saved.
inline GruGatesParams make_gru_gates_saving_params(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h,
                                                   const at::Tensor& out, const at::Tensor& saved) {
  GruGatesParams p = make_gru_gates_params(gi, gh, h, out);
  check_saved_gates(saved, h);
  p.saved = saved.data_ptr();
  p.saved_row_stride = saved.stride(0);
  return p;
}

// The backward's params from saved gates instead of gi and gh.
inline GruGatesBackwardParams make_gru_gates_backward_saved_params(const at::Tensor& grad_out, const at::Tensor& saved,
                                                                   const at::Tensor& h, const at::Tensor& grad_gi,
                                                                   const at::Tensor& grad_gh,
                                                                   const at::Tensor& grad_h) {
  GruGatesBackwardParams p = gate_gradient_params(grad_out, h, grad_gi, grad_gh, grad_h);
  check_saved_gates(saved, h);
  p.saved = saved.data_ptr();
  p.saved_row_stride = saved.stride(0);
  return p;
}

}  // namespace hiertcn
