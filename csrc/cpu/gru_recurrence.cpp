// The GRU recurrences: one GRU layer over a whole sequence (which is also the cell, at one step) and
// HierTCN's session-level update, forward and backward through time.
//
// These are drivers, written once for both devices and registered for CPU and CUDA tensors: the
// matrix products go to ATen (MKL/oneDNN, cuBLAS), the element-wise work to the fused kernels of
// hiertcn/gru_kernels.h for the tensors' device. The loop over time runs here, in C++: one op call
// per layer and sequence, not one Python call per step.
//
// Layouts (the buffers the ops take are allocated by the caller, contiguous):
//   layer:          x (batch, time, input), h0 (batch, hidden), output (batch, time, hidden),
//                   gates (time, batch, 4 * hidden): each step's saved gates (hiertcn/gru_gates.h: r, z, n and
//                   hn = W_hn h + b_hn per row; pre-activations in half types), all the gates' backward reads. Scratch inside the forward: gi (batch, time,
//                   3 * hidden) = x W_ih^T + b_ih for all steps (one matrix product) and gh (batch, 3 * hidden)
//                   = h_{t-1} W_hh^T + b_hh for the step at hand.
//   session update: h, out, states (layers, batch, hidden); gates (layers, batch, 4 * hidden).
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "hiertcn/checks.h"
#include "hiertcn/gru_gates_host.h"
#include "hiertcn/gru_kernels.h"

namespace hiertcn {

const GruKernels& gru_kernels_for(const at::Device& device) {
  static const GruKernels cpu{launch_gru_gates_cpu, launch_gru_gates_backward_cpu, launch_session_mean_cpu,
                              launch_session_mean_backward_cpu};
#ifdef HIERTCN_WITH_CUDA
  static const GruKernels cuda{launch_gru_gates_cuda, launch_gru_gates_backward_cuda, launch_session_mean_cuda,
                               launch_session_mean_backward_cuda};
  if (device.is_cuda()) return cuda;
#endif
  TORCH_CHECK(device.is_cpu(), "hiertcn_fast GRU ops: no kernels for tensors on ", device);
  return cpu;
}

namespace {

using OptTensor = std::optional<at::Tensor>;

// out = bias + a b^T, or a b^T without a bias.
void affine_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& weight, const OptTensor& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, weight.t());
  } else {
    at::mm_out(out, a, weight.t());
  }
}

// One layer's weights: w_ih (3 * hidden, input), w_hh (3 * hidden, hidden), biases (3 * hidden) or none.
void check_layer_weights(const at::Tensor& ref, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, int64_t input, int64_t hidden) {
  check_same_device_dtype(ref, w_ih, "the activations", "w_ih");
  check_same_device_dtype(ref, w_hh, "the activations", "w_hh");
  check_shape(w_ih, {3 * hidden, input}, "w_ih (3 * hidden, input)");
  check_shape(w_hh, {3 * hidden, hidden}, "w_hh (3 * hidden, hidden)");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "b_ih and b_hh must be given together or not at all");
  if (b_ih.has_value()) {
    check_same_device_dtype(ref, *b_ih, "the activations", "b_ih");
    check_same_device_dtype(ref, *b_hh, "the activations", "b_hh");
    check_shape(*b_ih, {3 * hidden}, "b_ih (3 * hidden)");
    check_shape(*b_hh, {3 * hidden}, "b_hh (3 * hidden)");
  }
}

void check_buffer(const at::Tensor& ref, const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  check_same_device_dtype(ref, t, "the activations", name);
  check_shape(t, shape, name);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// h' = gates(gi, gh, h) for one step, the saved gates (rows of 4 * hidden) into saved; every
// argument is (batch, ...) with unit-stride rows.
void step_gates(const GruKernels& k, const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h, at::Tensor out,
                const at::Tensor& saved) {
  k.gates(make_gru_gates_saving_params(gi, gh, h, out, saved), h.scalar_type());
}

// The gates' backward for one step from the forward's saved gates.
void step_gates_backward_saved(const GruKernels& k, const at::Tensor& grad, const at::Tensor& saved,
                               const at::Tensor& h, at::Tensor grad_gi, at::Tensor grad_gh, at::Tensor grad_h) {
  k.gates_backward(make_gru_gates_backward_saved_params(grad, saved, h, grad_gi, grad_gh, grad_h), h.scalar_type());
}

// ---- CPU single steps ----------------------------------------------------------------------------
//
// The cell (a layer at time 1) and session_update take these paths on CPU tensors. At HierTCN's sizes
// (batch 32..256, hidden 128) a step is a few small matrix products, and fork/join and per-call
// overheads cost as much as the arithmetic, so:
// - two independent products run at once, one per thread, each single-threaded in BLAS (called inside
//   a parallel region), rather than one after the other, each split across the threads: half the
//   fork/join round trips, and no split of a product too small to share well;
// - products are called through at::cpu:: (no dispatcher, no autograd layer: they also run on the
//   worker thread, which carries none of the caller's thread-local dispatch state);
// - the biases are added by the gates kernel while the rows are in cache (addmm would first copy them,
//   broadcast, into the output), and the masks of session_update are one pass.

// Pairs of products run concurrently only with exactly two threads in the intra-op pool: with more,
// BLAS's own split of each product uses them better than two single-threaded products. Tiny steps stay
// serial (a fork costs a few microseconds), and so do big ones, which BLAS splits well. Measured on the
// 2-core VM, hidden 128, fwd+bwd against nn.GRUCell: 1.40x -> 1.59x at batch 32, 1.42x -> 1.67x at 256.
bool run_pairs_concurrently(int64_t macs_per_pair) {
  return at::get_num_threads() == 2 && !at::in_parallel_region() && macs_per_pair >= (int64_t{1} << 17) &&
         macs_per_pair <= (int64_t{1} << 25);
}

template <typename First, typename Second>
void run_pair(bool concurrently, const First& first, const Second& second) {
  if (!concurrently) {
    first();
    second();
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (task == 0) {
        first();
      } else {
        second();
      }
    }
  });
}

// Scratch gi = x W_ih^T, gh = h W_hh^T, then h' = gates(gi + b_ih, gh + b_hh, h) and the saved gates (batch,
// 4 * hidden) the backward reads. Every tensor is 2-D (batch, ...); gi, gh, out and saved contiguous.
void step_forward_cpu(bool concurrently, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, at::Tensor gi,
                      at::Tensor gh, at::Tensor out, const at::Tensor& saved) {
  run_pair(
      concurrently, [&] { at::cpu::mm_out(gi, x, w_ih.t()); }, [&] { at::cpu::mm_out(gh, h, w_hh.t()); });
  const GruGatesParams gates = make_gru_gates_saving_params(gi, gh, h, out, saved);
  if (!b_ih.has_value()) {
    launch_gru_gates_cpu(gates, h.scalar_type());
    return;
  }
  const at::Tensor b_ih_rows = b_ih->contiguous(), b_hh_rows = b_hh->contiguous();
  launch_gru_gates_bias_cpu(GruGatesBiasParams{gates, b_ih_rows.data_ptr(), b_hh_rows.data_ptr()}, h.scalar_type());
}

// Products and column sums into out: through at::cpu:: for CPU tensors (no dispatcher round trip; a step
// makes a dozen, and on a worker thread of a concurrent pair there is no caller's dispatch state), through the
// dispatcher for the others.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.is_cpu()) {
    at::cpu::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void addmm_into(at::Tensor out, const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (out.is_cpu()) {
    at::cpu::addmm_out(out, c, a, b);
  } else {
    at::addmm_out(out, c, a, b);
  }
}

void add_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.is_cpu()) {
    at::cpu::add_out(out, a, b);
  } else {
    at::add_out(out, a, b);
  }
}

void sum_rows_into(at::Tensor out, const at::Tensor& a) {
  if (out.is_cpu()) {
    at::cpu::sum_out(out, a, {0});
  } else {
    at::sum_out(out, a, {0});
  }
}

// The weight gradients of one step, given dL/d gi and dL/d gh (batch, 3 * hidden):
//   input side:  input_side_extra(), grad_w_ih = grad_gi^T x, grad_b_ih = sum grad_gi;
//   state side:  grad_h += grad_gh W_hh, grad_w_hh = grad_gh^T h, grad_b_hh = sum grad_gh.
// grad_h holds the gates' direct part dL/dh' * z on entry. concurrently: the two sides at once (CPU only). A
// gradient not given (a frozen weight, or a state that wants no gradient) costs no product.
void step_weight_grads(bool concurrently, const at::Tensor& grad_gi, const at::Tensor& grad_gh, const at::Tensor& x,
                       const at::Tensor& h, const at::Tensor& w_hh, const OptTensor& grad_h, const OptTensor& grad_w_ih,
                       const OptTensor& grad_w_hh, const OptTensor& grad_b_ih, const OptTensor& grad_b_hh,
                       const std::function<void()>& input_side_extra) {
  run_pair(
      concurrently,
      [&] {
        input_side_extra();
        if (grad_w_ih.has_value()) mm_into(*grad_w_ih, grad_gi.t(), x);
        if (grad_b_ih.has_value()) sum_rows_into(*grad_b_ih, grad_gi);
      },
      [&] {
        if (grad_h.has_value()) addmm_into(*grad_h, *grad_h, grad_gh, w_hh);
        if (grad_w_hh.has_value()) mm_into(*grad_w_hh, grad_gh.t(), h);
        if (grad_b_hh.has_value()) sum_rows_into(*grad_b_hh, grad_gh);
      });
}

// ---- one layer over a sequence -----------------------------------------------------------------

void gru_layer_forward_out(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const OptTensor& b_ih, const OptTensor& b_hh, at::Tensor& output, at::Tensor& gates) {
  TORCH_CHECK(x.dim() == 3, "x must be (batch, time, input), got ", x.dim(), "-D");
  const c10::DeviceGuard guard(x.device());
  check_rows_unit_stride(h0, "h0");
  const int64_t batch = x.size(0), time = x.size(1), input = x.size(2), hidden = h0.size(1);
  TORCH_CHECK(time >= 1, "x must hold at least one time step");
  check_shape(h0, {batch, hidden}, "h0 (batch, hidden)");
  check_same_device_dtype(x, h0, "x", "h0");
  check_layer_weights(x, w_ih, w_hh, b_ih, b_hh, input, hidden);
  check_buffer(x, output, {batch, time, hidden}, "output");
  check_buffer(x, gates, {time, batch, 4 * hidden}, "gates");
  if (batch == 0 || hidden == 0) return;
  // The products go to scratch; the backward reads each step's saved gates.
  at::Tensor gh = at::empty({batch, 3 * hidden}, h0.options());
  if (x.is_cpu() && time == 1) {
    step_forward_cpu(run_pairs_concurrently(batch * 3 * hidden * std::max(input, hidden)), x.select(1, 0), h0, w_ih,
                     w_hh, b_ih, b_hh, at::empty_like(gh), gh, output.select(1, 0), gates.select(0, 0));
    return;
  }
  const GruKernels& k = gru_kernels_for(x.device());

  const at::Tensor gi = at::empty({batch, time, 3 * hidden}, h0.options());
  at::Tensor gi_rows = gi.view({batch * time, 3 * hidden});
  affine_out(gi_rows, x.reshape({batch * time, input}), w_ih, b_ih);
  for (int64_t t = 0; t < time; ++t) {
    const at::Tensor h_prev = t == 0 ? h0 : output.select(1, t - 1);
    affine_out(gh, h_prev, w_hh, b_hh);
    step_gates(k, gi.select(1, t), gh, h_prev, output.select(1, t), gates.select(0, t));
  }
}

// Backward through time. grad_output (batch, time, hidden) holds dL/d output at every step (the
// gradient of h_n arrives through its last step). Each step's dL/d gh lands in a time-major buffer and
// dL/d gi in a batch-major one, so the weight gradients are one matrix product each over all steps.
void gru_layer_backward_out(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                            const at::Tensor& gates, const OptTensor& grad_x, const OptTensor& grad_h0,
                            const OptTensor& grad_w_ih, const OptTensor& grad_w_hh, const OptTensor& grad_b_ih,
                            const OptTensor& grad_b_hh) {
  TORCH_CHECK(x.dim() == 3, "x must be (batch, time, input), got ", x.dim(), "-D");
  const c10::DeviceGuard guard(x.device());
  check_rows_unit_stride(h0, "h0");
  const int64_t batch = x.size(0), time = x.size(1), input = x.size(2), hidden = h0.size(1);
  TORCH_CHECK(time >= 1, "x must hold at least one time step");
  check_layer_weights(x, w_ih, w_hh, std::nullopt, std::nullopt, input, hidden);
  check_buffer(x, grad_output, {batch, time, hidden}, "grad_output");
  check_buffer(x, output, {batch, time, hidden}, "output");
  check_buffer(x, gates, {time, batch, 4 * hidden}, "gates");
  // Every gradient is optional: one not given (an input wanting no gradient) is not computed.
  if (grad_h0.has_value()) check_buffer(x, *grad_h0, {batch, hidden}, "grad_h0");
  if (grad_w_ih.has_value()) check_buffer(x, *grad_w_ih, {3 * hidden, input}, "grad_w_ih");
  if (grad_w_hh.has_value()) check_buffer(x, *grad_w_hh, {3 * hidden, hidden}, "grad_w_hh");
  if (grad_x.has_value()) check_buffer(x, *grad_x, {batch, time, input}, "grad_x");
  TORCH_CHECK(grad_b_ih.has_value() == grad_b_hh.has_value(), "grad_b_ih and grad_b_hh go together");
  if (grad_b_ih.has_value()) {
    check_buffer(x, *grad_b_ih, {3 * hidden}, "grad_b_ih");
    check_buffer(x, *grad_b_hh, {3 * hidden}, "grad_b_hh");
  }
  if (batch == 0 || hidden == 0) {
    for (const OptTensor* t : {&grad_x, &grad_h0, &grad_w_ih, &grad_w_hh, &grad_b_ih, &grad_b_hh})
      if (t->has_value()) (*t)->zero_();
    return;
  }
  const GruKernels& k = gru_kernels_for(x.device());
  if (x.is_cpu() && time == 1) {
    // The cell: dL/dh0 receives the gates' direct part, then the W_hh product adds onto it (with no dL/dh0
    // wanted, the direct part goes to scratch and the product is skipped).
    const at::Tensor grad_gi_step = at::empty({batch, 3 * hidden}, gates.options());
    const at::Tensor grad_gh_step = at::empty_like(grad_gi_step);
    const at::Tensor x_step = x.select(1, 0);
    step_gates_backward_saved(k, grad_output.select(1, 0), gates.select(0, 0), h0, grad_gi_step, grad_gh_step,
                              grad_h0.has_value() ? *grad_h0 : at::empty({batch, hidden}, gates.options()));
    step_weight_grads(
        run_pairs_concurrently(batch * 3 * hidden * std::max(input, hidden)), grad_gi_step, grad_gh_step, x_step,
        h0, w_hh, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, [&] {
          if (grad_x.has_value()) {
            at::Tensor grad_x_step = grad_x->select(1, 0);
            at::cpu::mm_out(grad_x_step, grad_gi_step, w_ih);
          }
        });
    return;
  }

  at::Tensor grad_gi = at::empty({batch, time, 3 * hidden}, gates.options());
  at::Tensor grad_gh = at::empty({time, batch, 3 * hidden}, gates.options());
  at::Tensor grad_h_direct = at::empty({batch, hidden}, gates.options());  // dL/dh_{t-1} through the gates alone
  at::Tensor grad_h_carry = at::empty_like(grad_h_direct);  // dL/dh_{t-1} in full: gates plus W_hh path
  at::Tensor grad_step = at::empty_like(grad_h_direct);     // dL/dh_t: from the output plus from step t + 1
  for (int64_t t = time - 1; t >= 0; --t) {
    at::Tensor grad_h_t = grad_output.select(1, t);
    if (t < time - 1) {
      at::add_out(grad_step, grad_h_t, grad_h_carry);
      grad_h_t = grad_step;
    }
    const at::Tensor h_prev = t == 0 ? h0 : output.select(1, t - 1);
    at::Tensor grad_gh_t = grad_gh.select(0, t);
    step_gates_backward_saved(k, grad_h_t, gates.select(0, t), h_prev, grad_gi.select(1, t), grad_gh_t,
                              grad_h_direct);
    if (t > 0) {
      at::addmm_out(grad_h_carry, grad_h_direct, grad_gh_t, w_hh);
    } else if (grad_h0.has_value()) {
      at::Tensor grad_h0_out = *grad_h0;
      at::addmm_out(grad_h0_out, grad_h_direct, grad_gh_t, w_hh);
    }
  }

  const at::Tensor grad_gi_rows = grad_gi.view({batch * time, 3 * hidden});
  const at::Tensor grad_gh_rows = grad_gh.view({time * batch, 3 * hidden});
  if (grad_x.has_value()) {
    at::Tensor grad_x_rows = grad_x->view({batch * time, input});
    at::mm_out(grad_x_rows, grad_gi_rows, w_ih);
  }
  if (grad_w_ih.has_value()) mm_into(*grad_w_ih, grad_gi_rows.t(), x.reshape({batch * time, input}));
  if (grad_w_hh.has_value()) {
    // The states each step started from, time-major like grad_gh: h0, then the outputs of steps 0..time-2.
    const at::Tensor h_prev_all = at::cat({h0.unsqueeze(0), output.narrow(1, 0, time - 1).transpose(0, 1)}, 0);
    mm_into(*grad_w_hh, grad_gh_rows.t(), h_prev_all.reshape({time * batch, hidden}));
  }
  if (grad_b_ih.has_value()) {
    sum_rows_into(*grad_b_ih, grad_gi_rows);
    sum_rows_into(*grad_b_hh, grad_gh_rows);
  }
}

// ---- HierTCN's session-level update ------------------------------------------------------------

struct SessionUpdateShapes {
  int64_t layers, batch, time, dim, hidden, input;
  bool bias;
};

// Validates the arguments both directions share; weights holds per layer (w_ih, w_hh[, b_ih, b_hh]).
SessionUpdateShapes check_session_update(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                         const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                         const OptTensor& proj_bias) {
  TORCH_CHECK(items.dim() == 3, "item_embeddings must be (batch, time, dim), got ", items.dim(), "-D");
  TORCH_CHECK(has_unit_stride(items, 2), "item_embeddings must have unit stride along dim, got strides ",
              items.strides());
  TORCH_CHECK(h.dim() == 3, "h must be (layers, batch, hidden), got ", h.dim(), "-D");
  SessionUpdateShapes s;
  s.layers = h.size(0);
  s.batch = items.size(0);
  s.time = items.size(1);
  s.dim = items.size(2);
  s.hidden = h.size(2);
  TORCH_CHECK(s.layers >= 1, "h must hold at least one layer");
  check_same_device_dtype(items, h, "item_embeddings", "h");
  check_shape(h, {s.layers, s.batch, s.hidden}, "h (layers, batch, hidden)");
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.device() == items.device(),
              "lengths must be int64 on the device of item_embeddings");
  check_shape(lengths, {s.batch}, "lengths (batch,)");
  TORCH_CHECK(lengths.is_contiguous(), "lengths must be contiguous");
  check_same_device_dtype(items, keep, "item_embeddings", "keep");
  check_shape(keep, {s.batch}, "keep (batch,)");
  if (lengths.is_cpu() && s.batch > 0) {
    const int64_t* values = lengths.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(values, values + s.batch);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= s.time, "lengths must lie in [0, time = ", s.time, "], got values in [",
                      *lo, ", ", *hi, "]");
  }
  TORCH_CHECK(weights.size() == static_cast<size_t>(2 * s.layers) ||
                  weights.size() == static_cast<size_t>(4 * s.layers),
              "weights must hold 2 (no bias) or 4 tensors per layer for ", s.layers, " layers, got ", weights.size());
  s.bias = weights.size() == static_cast<size_t>(4 * s.layers);
  s.input = s.dim;
  if (proj_weight.has_value()) {
    check_same_device_dtype(items, *proj_weight, "item_embeddings", "proj_weight");
    TORCH_CHECK(proj_weight->dim() == 2 && proj_weight->size(1) == s.dim,
                "proj_weight must be (projected, dim = ", s.dim, "), got ", proj_weight->sizes());
    s.input = proj_weight->size(0);
    if (proj_bias.has_value()) {
      check_same_device_dtype(items, *proj_bias, "item_embeddings", "proj_bias");
      check_shape(*proj_bias, {s.input}, "proj_bias (projected,)");
    }
  } else {
    TORCH_CHECK(!proj_bias.has_value(), "proj_bias needs proj_weight");
  }
  const int64_t per_layer = s.bias ? 4 : 2;
  for (int64_t l = 0; l < s.layers; ++l) {
    const at::TensorList w = weights.slice(l * per_layer, per_layer);
    check_layer_weights(items, w[0], w[1], s.bias ? OptTensor(w[2]) : std::nullopt,
                        s.bias ? OptTensor(w[3]) : std::nullopt, l == 0 ? s.input : s.hidden, s.hidden);
  }
  return s;
}

// The tensors the forward saves for the backward (written by one, read by the other).
void check_session_update_saved(const at::Tensor& items, const SessionUpdateShapes& s, const OptTensor& proj_weight,
                                const at::Tensor& states, const at::Tensor& session_mean, const OptTensor& projected,
                                const at::Tensor& gates) {
  check_buffer(items, states, {s.layers, s.batch, s.hidden}, "states");
  check_buffer(items, session_mean, {s.batch, s.dim}, "session_mean");
  TORCH_CHECK(projected.has_value() == proj_weight.has_value(), "projected is needed exactly with proj_weight");
  if (projected.has_value()) check_buffer(items, *projected, {s.batch, s.input}, "projected");
  check_buffer(items, gates, {s.layers, s.batch, 4 * s.hidden}, "gates");
}

struct LayerWeights {
  at::Tensor w_ih, w_hh;
  OptTensor b_ih, b_hh;
};

LayerWeights layer_weights(at::TensorList weights, const SessionUpdateShapes& s, int64_t l) {
  const int64_t per_layer = s.bias ? 4 : 2;
  const at::TensorList w = weights.slice(l * per_layer, per_layer);
  return {w[0], w[1], s.bias ? OptTensor(w[2]) : std::nullopt, s.bias ? OptTensor(w[3]) : std::nullopt};
}

void run_session_mean(const GruKernels& k, const at::Tensor& items, const at::Tensor& lengths,
                      const SessionUpdateShapes& s, const at::Tensor& session_mean) {
  SessionMeanParams p;
  p.batch = s.batch;
  p.time = s.time;
  p.dim = s.dim;
  p.items_batch_stride = items.stride(0);
  p.items_time_stride = items.stride(1);
  p.mean_row_stride = s.dim;
  p.lengths = lengths.data_ptr<int64_t>();
  p.items = items.data_ptr();
  p.mean = session_mean.data_ptr();
  k.session_mean(p, items.scalar_type());
}

void run_session_mean_backward(const GruKernels& k, const at::Tensor& lengths, const SessionUpdateShapes& s,
                               const at::Tensor& grad_mean, const at::Tensor& grad_items) {
  SessionMeanBackwardParams p;
  p.batch = s.batch;
  p.time = s.time;
  p.dim = s.dim;
  p.grad_mean_row_stride = s.dim;
  p.lengths = lengths.data_ptr<int64_t>();
  p.grad_mean = grad_mean.data_ptr();
  p.grad_items = grad_items.data_ptr();
  k.session_mean_backward(p, grad_items.scalar_type());
}

// The keep step's arguments (hiertcn/gru_kernels.h SessionKeepParams says what states, h, out and grad_h are
// in each direction). keep must be contiguous (the callers hold a contiguous copy while the kernel runs).
SessionKeepParams session_keep_params(const SessionUpdateShapes& s, const at::Tensor& lengths, const at::Tensor& keep,
                                      const at::Tensor& states, const at::Tensor* h, const at::Tensor& out,
                                      const at::Tensor* grad_h) {
  SessionKeepParams p{};
  p.layers = s.layers;
  p.batch = s.batch;
  p.hidden = s.hidden;
  p.lengths = lengths.data_ptr<int64_t>();
  p.keep = keep.data_ptr();
  p.states = states.data_ptr();
  p.h = h ? h->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.grad_h = grad_h ? grad_h->data_ptr() : nullptr;
  return p;
}

// (1, batch, 1) views that broadcast a per-row value over (layers, batch, hidden).
at::Tensor per_row(const at::Tensor& t) { return t.view({1, t.size(0), 1}); }

void session_update_forward_out(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                const OptTensor& proj_bias, at::Tensor& out, at::Tensor& states,
                                at::Tensor& session_mean, const OptTensor& projected, at::Tensor& gates) {
  const SessionUpdateShapes s = check_session_update(items, lengths, h, keep, weights, proj_weight, proj_bias);
  const c10::DeviceGuard guard(items.device());
  check_buffer(items, out, h.sizes(), "out");
  check_session_update_saved(items, s, proj_weight, states, session_mean, projected, gates);
  // Nothing to compute: no rows, or a state of no units (out is empty; the backward returns zero gradients).
  if (s.batch == 0 || s.hidden == 0) return;
  const GruKernels& k = gru_kernels_for(items.device());
  // Each layer's products go to scratch gi and gh, shared by the layers; what the backward reads of the
  // gates is their saved rows (4 * hidden per row, where gi and gh are 6).
  at::Tensor gi = at::empty({s.batch, 3 * s.hidden}, h.options());
  at::Tensor gh = at::empty_like(gi);
  if (items.is_cpu()) {
    // The session mean first, split over the rows on every thread (a pass over up to batch x time x dim
    // inputs: on one thread beside layer 0's state product it was the longer side of that pair), then the
    // projection, then each layer's pair of products.
    const bool concurrently = run_pairs_concurrently(s.batch * 3 * s.hidden * std::max(s.input, s.hidden));
    run_session_mean(k, items, lengths, s, session_mean);
    if (projected.has_value()) {
      at::Tensor projected_out = *projected;
      if (proj_bias.has_value()) {
        at::cpu::addmm_out(projected_out, *proj_bias, session_mean, proj_weight->t());
      } else {
        at::cpu::mm_out(projected_out, session_mean, proj_weight->t());
      }
    }
    const at::Tensor first_input = projected.has_value() ? *projected : session_mean;
    for (int64_t l = 0; l < s.layers; ++l) {
      const LayerWeights w = layer_weights(weights, s, l);
      step_forward_cpu(concurrently, l == 0 ? first_input : states.select(0, l - 1), h.select(0, l), w.w_ih, w.w_hh,
                       w.b_ih, w.b_hh, gi, gh, states.select(0, l), gates.select(0, l));
    }
    const at::Tensor keep_values = keep.contiguous();
    launch_session_keep_cpu(session_keep_params(s, lengths, keep_values, states, &h, out, nullptr), h.scalar_type());
    return;
  }

  run_session_mean(k, items, lengths, s, session_mean);
  at::Tensor layer_input = session_mean;
  if (projected.has_value()) {
    at::Tensor projected_out = *projected;
    affine_out(projected_out, session_mean, *proj_weight, proj_bias);
    layer_input = projected_out;
  }
  for (int64_t l = 0; l < s.layers; ++l) {
    const LayerWeights w = layer_weights(weights, s, l);
    affine_out(gi, layer_input, w.w_ih, w.b_ih);
    affine_out(gh, h.select(0, l), w.w_hh, w.b_hh);
    step_gates(k, gi, gh, h.select(0, l), states.select(0, l), gates.select(0, l));
    layer_input = states.select(0, l);
  }
  // Rows without a session keep their state; then ended users' rows are zeroed.
  at::mul_out(out, at::where(per_row(lengths.gt(0)), states, h), per_row(keep));
}

// The weight and projection gradients' buffers, as both session backwards take them: grad_weights one per weight,
// or empty where no weight of the GRU wants a gradient; each projection gradient optional.
void check_weight_grads(const at::Tensor& items, const SessionUpdateShapes& s, at::TensorList weights,
                        const OptTensor& proj_weight, at::TensorList grad_weights, const OptTensor& grad_proj_weight,
                        const OptTensor& grad_proj_bias) {
  TORCH_CHECK(grad_weights.empty() || grad_weights.size() == weights.size(),
              "grad_weights must match weights one to one, or be empty (the GRU's weights want no gradient)");
  for (size_t i = 0; i < grad_weights.size(); ++i)
    check_buffer(items, grad_weights[i], weights[i].sizes(), "grad_weights");
  TORCH_CHECK(proj_weight.has_value() || !(grad_proj_weight.has_value() || grad_proj_bias.has_value()),
              "grad_proj_weight and grad_proj_bias need proj_weight");
  if (grad_proj_weight.has_value()) check_buffer(items, *grad_proj_weight, proj_weight->sizes(), "grad_proj_weight");
  if (grad_proj_bias.has_value()) check_buffer(items, *grad_proj_bias, {s.input}, "grad_proj_bias");
}

// Weight gradient i of grad_weights, none where it is empty.
OptTensor weight_grad(at::TensorList grad_weights, int64_t i) {
  return grad_weights.empty() ? OptTensor() : OptTensor(grad_weights[i]);
}

// Whether the session ops' backward needs dL/d layer 0's input: for the items' gradient or the projection's.
bool input_grad_wanted(const OptTensor& grad_items, const OptTensor& grad_proj_weight,
                       const OptTensor& grad_proj_bias) {
  return grad_items.has_value() || grad_proj_weight.has_value() || grad_proj_bias.has_value();
}

// Both session backwards' last part, from dL/d layer 0's input (rows, input): the projection's gradients and the
// items' (through the session mean), each where wanted. s.batch counts the rows (steps x batch for the steps op);
// session_mean is (rows, dim).
void session_input_backward(const GruKernels& k, const at::Tensor& lengths, const SessionUpdateShapes& s,
                            const at::Tensor& grad_input, const at::Tensor& session_mean, const OptTensor& proj_weight,
                            const OptTensor& grad_proj_weight, const OptTensor& grad_proj_bias,
                            const OptTensor& grad_items) {
  if (grad_proj_weight.has_value()) mm_into(*grad_proj_weight, grad_input.t(), session_mean);
  if (grad_proj_bias.has_value()) sum_rows_into(*grad_proj_bias, grad_input);
  if (!grad_items.has_value() || grad_items->numel() == 0) return;
  at::Tensor grad_mean = grad_input;
  if (proj_weight.has_value()) {
    grad_mean = at::empty({s.batch, s.dim}, grad_input.options());
    mm_into(grad_mean, grad_input, *proj_weight);
  }
  run_session_mean_backward(k, lengths, s, grad_mean, *grad_items);
}

// An empty batch's gradients.
void zero_grads(const OptTensor& grad_h, at::TensorList grad_weights, const OptTensor& grad_proj_weight,
                const OptTensor& grad_proj_bias) {
  for (const at::Tensor& g : grad_weights) at::Tensor(g).zero_();
  for (const OptTensor* t : {&grad_h, &grad_proj_weight, &grad_proj_bias})
    if (t->has_value()) (*t)->zero_();
}

void session_update_backward_out(const at::Tensor& grad_out, const at::Tensor& items, const at::Tensor& lengths,
                                 const at::Tensor& h, const at::Tensor& keep, at::TensorList weights,
                                 const OptTensor& proj_weight, const at::Tensor& session_mean,
                                 const OptTensor& projected, const at::Tensor& states, const at::Tensor& gates,
                                 const OptTensor& grad_items, const OptTensor& grad_h,
                                 at::TensorList grad_weights, const OptTensor& grad_proj_weight,
                                 const OptTensor& grad_proj_bias) {
  const SessionUpdateShapes s = check_session_update(items, lengths, h, keep, weights, proj_weight, std::nullopt);
  const c10::DeviceGuard guard(items.device());
  check_buffer(items, grad_out, h.sizes(), "grad_out");
  check_session_update_saved(items, s, proj_weight, states, session_mean, projected, gates);
  if (grad_items.has_value()) check_buffer(items, *grad_items, items.sizes(), "grad_item_embeddings");
  if (grad_h.has_value()) check_buffer(items, *grad_h, h.sizes(), "grad_h");
  check_weight_grads(items, s, weights, proj_weight, grad_weights, grad_proj_weight, grad_proj_bias);
  if (s.batch == 0 || s.hidden == 0) {  // (with no units, nothing reaches out from the items or the weights)
    zero_grads(grad_h, grad_weights, grad_proj_weight, grad_proj_bias);
    if (grad_items.has_value()) at::Tensor(*grad_items).zero_();
    return;
  }
  const GruKernels& k = gru_kernels_for(items.device());

  // out = keep * (active ? states : h): split dL/d out between the GRU states and the kept-old states (h's part
  // to scratch when h wants no gradient: then nothing more of dL/dh is computed).
  const at::Tensor grad_states = at::empty_like(states);
  if (items.is_cpu()) {
    const at::Tensor keep_values = keep.contiguous();
    const at::Tensor grad_kept_old = grad_h.has_value() ? *grad_h : at::empty_like(states);
    launch_session_keep_backward_cpu(
        session_keep_params(s, lengths, keep_values, grad_out, nullptr, grad_states, &grad_kept_old),
        h.scalar_type());
  } else {
    const at::Tensor active = per_row(lengths.gt(0));
    const at::Tensor grad_kept = grad_out * per_row(keep);
    const at::Tensor zero = at::zeros({}, grad_out.options());
    if (grad_h.has_value()) {
      at::Tensor grad_h_out = *grad_h;
      at::where_out(grad_h_out, active, zero, grad_kept);
    }
    at::Tensor grad_states_out = grad_states;
    at::where_out(grad_states_out, active, grad_kept, zero);
  }

  // The layers from the top: each one gates backward, then its products in two halves, concurrent on the
  // CPU (input side: its weight gradient and the gradient passed below; state side: dL/dh and its weight
  // gradient), each product only where its gradient is wanted.
  const bool concurrently =
      items.is_cpu() && run_pairs_concurrently(s.batch * 3 * s.hidden * std::max(s.input, s.hidden));
  const at::Tensor grad_gi = at::empty({s.batch, 3 * s.hidden}, grad_out.options());
  const at::Tensor grad_gh = at::empty_like(grad_gi);
  const at::Tensor grad_h_direct = at::empty({s.batch, s.hidden}, grad_out.options());
  const at::Tensor grad_below = s.layers > 1 ? at::empty_like(grad_h_direct) : at::Tensor();
  const at::Tensor grad_input = at::empty({s.batch, s.input}, grad_out.options());  // dL/d layer 0's input
  at::Tensor grad_layer_output = grad_states.select(0, s.layers - 1);                // dL/d states[l], in full
  const int64_t per_layer = s.bias ? 4 : 2;
  const bool input_wanted = input_grad_wanted(grad_items, grad_proj_weight, grad_proj_bias);
  for (int64_t l = s.layers - 1; l >= 0; --l) {
    const LayerWeights w = layer_weights(weights, s, l);
    const at::Tensor h_l = h.select(0, l);
    const at::Tensor layer_input =
        l > 0 ? states.select(0, l - 1) : (projected.has_value() ? *projected : session_mean);
    step_gates_backward_saved(k, grad_layer_output, gates.select(0, l), h_l, grad_gi, grad_gh, grad_h_direct);
    OptTensor grad_h_l;
    if (grad_h.has_value()) {
      grad_h_l = grad_h->select(0, l);
      add_into(*grad_h_l, *grad_h_l, grad_h_direct);
    }
    step_weight_grads(concurrently, grad_gi, grad_gh, layer_input, h_l, w.w_hh, grad_h_l,
                      weight_grad(grad_weights, l * per_layer), weight_grad(grad_weights, l * per_layer + 1),
                      s.bias ? weight_grad(grad_weights, l * per_layer + 2) : std::nullopt,
                      s.bias ? weight_grad(grad_weights, l * per_layer + 3) : std::nullopt, [&] {
                        // Below layer 0 the input is the previous layer's state, whose own gradient joins.
                        if (l > 0) {
                          addmm_into(grad_below, grad_states.select(0, l - 1), grad_gi, w.w_ih);
                        } else if (input_wanted) {
                          mm_into(grad_input, grad_gi, w.w_ih);
                        }
                      });
    if (l > 0) grad_layer_output = grad_below;
  }
  if (input_wanted) {
    session_input_backward(k, lengths, s, grad_input, session_mean, proj_weight, grad_proj_weight, grad_proj_bias,
                           grad_items);
  }
}

// ---- all of a lane batch's session steps in one op -----------------------------------------------
//
// session_update_steps: out[0] = h, out[s + 1] = session_update(items[s], lengths[s], out[s], keep[s]) for the
// steps s of a lane batch. The high level reads only item embeddings, so every step's input is known before the
// first step runs, and the steps go layer by layer as a sequence GRU does: one session-mean pass over all steps'
// rows, one input product per layer over steps x batch rows, and per step only the state product, the gates and
// the masks. The backward takes each layer back through the steps, then its weight gradients and its input's
// gradient as one product each over all steps. The results equal session_update's step by step up to rounding
// (the products are summed in another order).
// Layouts (contiguous): out (steps + 1, layers, batch, hidden); cells (layers, steps, batch, hidden): each step's
// GRU output before the masks (the next layer's input); session_mean (steps, batch, dim); projected (steps,
// batch, input); gates (layers, steps, batch, 4 * hidden).

struct StepsShapes {
  int64_t steps;
  SessionUpdateShapes s;  // one step's
};

StepsShapes check_session_update_steps(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                       const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                       const OptTensor& proj_bias) {
  TORCH_CHECK(items.dim() == 4, "item_embeddings must be (steps, batch, time, dim), got ", items.dim(), "-D");
  const int64_t steps = items.size(0);
  TORCH_CHECK(steps >= 1, "item_embeddings must hold at least one step");
  TORCH_CHECK(lengths.dim() == 2 && lengths.size(0) == steps && keep.dim() == 2 && keep.size(0) == steps,
              "lengths and keep must be (steps = ", steps, ", batch), got ", lengths.sizes(), " and ", keep.sizes());
  TORCH_CHECK(keep.is_contiguous(), "keep must be contiguous");
  // Step 0 checks the shapes, dtypes, devices and weights, and its own lengths' range.
  StepsShapes r{steps, check_session_update(items.select(0, 0), lengths.select(0, 0), h, keep.select(0, 0), weights,
                                            proj_weight, proj_bias)};
  TORCH_CHECK(lengths.is_contiguous(), "lengths must be contiguous");
  TORCH_CHECK(items.size(1) == r.s.batch && keep.size(1) == r.s.batch, "item_embeddings, lengths and keep must "
              "have h's batch ", r.s.batch);
  if (lengths.is_cpu() && lengths.numel() > 0) {
    const int64_t* values = lengths.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(values, values + lengths.numel());
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= r.s.time, "lengths must lie in [0, time = ", r.s.time,
                      "], got values in [", *lo, ", ", *hi, "]");
  }
  return r;
}

// gates may hold one step (forward only: scratch that each step overwrites) where the backward needs all of them.
void check_session_update_steps_saved(const at::Tensor& items, const StepsShapes& ss, const OptTensor& proj_weight,
                                      const at::Tensor& out, const at::Tensor& cells, const at::Tensor& session_mean,
                                      const OptTensor& projected, const at::Tensor& gates, bool gates_of_one_step) {
  const SessionUpdateShapes& s = ss.s;
  check_buffer(items, out, {ss.steps + 1, s.layers, s.batch, s.hidden}, "out");
  check_buffer(items, cells, {s.layers, ss.steps, s.batch, s.hidden}, "cells");
  check_buffer(items, session_mean, {ss.steps, s.batch, s.dim}, "session_mean");
  TORCH_CHECK(projected.has_value() == proj_weight.has_value(), "projected is needed exactly with proj_weight");
  if (projected.has_value()) check_buffer(items, *projected, {ss.steps, s.batch, s.input}, "projected");
  check_buffer(items, gates, {s.layers, gates_of_one_step ? 1 : ss.steps, s.batch, 4 * s.hidden}, "gates");
}

// out = bias + a w^T (or a w^T), through at::cpu:: for CPU tensors.
void affine_into(at::Tensor out, const at::Tensor& a, const at::Tensor& weight, const OptTensor& bias) {
  if (!out.is_cpu()) {
    affine_out(out, a, weight, bias);
  } else if (bias.has_value()) {
    at::cpu::addmm_out(out, *bias, a, weight.t());
  } else {
    at::cpu::mm_out(out, a, weight.t());
  }
}

// One layer's masks at one step: next = keep * (lengths > 0 ? cell : prev), every tensor (batch, hidden).
void steps_keep_forward(const StepsShapes& ss, const at::Tensor& lengths, const at::Tensor& keep, int64_t step,
                        const at::Tensor& cell, const at::Tensor& prev, at::Tensor next) {
  const SessionUpdateShapes& s = ss.s;
  if (cell.is_cpu()) {
    SessionUpdateShapes one = s;
    one.layers = 1;
    const at::Tensor keep_step = keep.select(0, step), lengths_step = lengths.select(0, step);
    launch_session_keep_cpu(session_keep_params(one, lengths_step, keep_step, cell, &prev, next, nullptr),
                            cell.scalar_type());
    return;
  }
  at::mul_out(next, at::where(lengths.select(0, step).gt(0).unsqueeze(1), cell, prev),
              keep.select(0, step).unsqueeze(1));
}

// Its backward: from grad_next = dL/d next, grad_cell = keep * grad_next on rows with a session (else 0) and
// grad_prev = keep * grad_next on rows without (else 0).
void steps_keep_backward(const StepsShapes& ss, const at::Tensor& lengths, const at::Tensor& keep, int64_t step,
                         const at::Tensor& grad_next, at::Tensor grad_cell, at::Tensor grad_prev) {
  const SessionUpdateShapes& s = ss.s;
  if (grad_next.is_cpu()) {
    SessionUpdateShapes one = s;
    one.layers = 1;
    const at::Tensor keep_step = keep.select(0, step), lengths_step = lengths.select(0, step);
    launch_session_keep_backward_cpu(
        session_keep_params(one, lengths_step, keep_step, grad_next, nullptr, grad_cell, &grad_prev),
        grad_next.scalar_type());
    return;
  }
  const at::Tensor active = lengths.select(0, step).gt(0).unsqueeze(1);
  const at::Tensor kept = grad_next * keep.select(0, step).unsqueeze(1);
  const at::Tensor zero = at::zeros({}, grad_next.options());
  at::where_out(grad_cell, active, kept, zero);
  at::where_out(grad_prev, active, zero, kept);
}

// The session mean of every step's rows: one pass over steps x batch rows where the steps' rows lie at one
// stride (HierTCN's padded batch), else one per step.
void steps_session_mean(const GruKernels& k, const at::Tensor& items, const at::Tensor& lengths, const StepsShapes& ss,
                        const at::Tensor& session_mean) {
  SessionUpdateShapes all = ss.s;
  if (ss.steps == 1 || items.stride(0) == ss.s.batch * items.stride(1)) {
    all.batch = ss.steps * ss.s.batch;
    run_session_mean(k, items.as_strided({all.batch, all.time, all.dim}, {items.stride(1), items.stride(2), 1}),
                     lengths, all, session_mean);
    return;
  }
  for (int64_t step = 0; step < ss.steps; ++step)
    run_session_mean(k, items.select(0, step), lengths.select(0, step), all, session_mean.select(0, step));
}

void session_update_steps_forward_out(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                      const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                      const OptTensor& proj_bias, at::Tensor& out, at::Tensor& cells,
                                      at::Tensor& session_mean, const OptTensor& projected, at::Tensor& gates) {
  const StepsShapes ss = check_session_update_steps(items, lengths, h, keep, weights, proj_weight, proj_bias);
  const SessionUpdateShapes& s = ss.s;
  const c10::DeviceGuard guard(items.device());
  // gates (layers, 1, batch, 4 * hidden): a forward only, whose gates nothing reads after their step.
  const bool gates_of_one_step = gates.dim() == 4 && gates.size(1) == 1 && ss.steps > 1;
  check_session_update_steps_saved(items, ss, proj_weight, out, cells, session_mean, projected, gates,
                                   gates_of_one_step);
  out.select(0, 0).copy_(h);
  if (s.batch == 0) return;
  const GruKernels& k = gru_kernels_for(items.device());
  const int64_t rows = ss.steps * s.batch;
  steps_session_mean(k, items, lengths, ss, session_mean);
  at::Tensor layer_input = session_mean.view({rows, s.dim});
  if (projected.has_value()) {
    at::Tensor projected_rows = projected->view({rows, s.input});
    affine_into(projected_rows, layer_input, *proj_weight, proj_bias);
    layer_input = projected_rows;
  }
  at::Tensor gi = at::empty({rows, 3 * s.hidden}, h.options());  // scratch: every step's input product
  at::Tensor gh = at::empty({s.batch, 3 * s.hidden}, h.options());
  for (int64_t l = 0; l < s.layers; ++l) {
    const LayerWeights w = layer_weights(weights, s, l);
    affine_into(gi, layer_input, w.w_ih, w.b_ih);
    for (int64_t step = 0; step < ss.steps; ++step) {
      const at::Tensor prev = out.select(0, step).select(0, l), cell = cells.select(0, l).select(0, step);
      affine_into(gh, prev, w.w_hh, w.b_hh);
      step_gates(k, gi.narrow(0, step * s.batch, s.batch), gh, prev, cell,
                 gates.select(0, l).select(0, gates_of_one_step ? 0 : step));
      steps_keep_forward(ss, lengths, keep, step, cell, prev, out.select(0, step + 1).select(0, l));
    }
    layer_input = cells.select(0, l).view({rows, s.hidden});
  }
}

void session_update_steps_backward_out(const at::Tensor& grad_out, const at::Tensor& items, const at::Tensor& lengths,
                                       const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                       const at::Tensor& session_mean, const OptTensor& projected,
                                       const at::Tensor& out, const at::Tensor& cells, const at::Tensor& gates,
                                       const OptTensor& grad_items, const OptTensor& grad_h,
                                       at::TensorList grad_weights, const OptTensor& grad_proj_weight,
                                       const OptTensor& grad_proj_bias, const OptTensor& grad_keep) {
  TORCH_CHECK(out.dim() == 4, "out must be (steps + 1, layers, batch, hidden), got ", out.dim(), "-D");
  const at::Tensor h = out.select(0, 0);
  const StepsShapes ss = check_session_update_steps(items, lengths, h, keep, weights, proj_weight, std::nullopt);
  const SessionUpdateShapes& s = ss.s;
  const c10::DeviceGuard guard(items.device());
  check_session_update_steps_saved(items, ss, proj_weight, out, cells, session_mean, projected, gates, false);
  check_buffer(items, grad_out, out.sizes(), "grad_out");
  if (grad_items.has_value()) check_buffer(items, *grad_items, items.sizes(), "grad_item_embeddings");
  if (grad_h.has_value()) check_buffer(items, *grad_h, h.sizes(), "grad_h");
  check_weight_grads(items, s, weights, proj_weight, grad_weights, grad_proj_weight, grad_proj_bias);
  if (grad_keep.has_value()) check_buffer(items, *grad_keep, {ss.steps, s.batch}, "grad_keep");
  if (grad_keep.has_value()) (*grad_keep).zero_();
  if (s.batch == 0) {
    zero_grads(grad_h, grad_weights, grad_proj_weight, grad_proj_bias);
    return;
  }
  const GruKernels& k = gru_kernels_for(items.device());
  const int64_t rows = ss.steps * s.batch;
  const at::TensorOptions options = grad_out.options();
  const at::Tensor grad_gi = at::empty({rows, 3 * s.hidden}, options);
  const at::Tensor grad_gh = at::empty({rows, 3 * s.hidden}, options);
  const at::Tensor grad_cell = at::empty({s.batch, s.hidden}, options);    // dL/d the step's GRU output
  const at::Tensor grad_passed = at::empty_like(grad_cell);               // dL/d prev through the masks
  const at::Tensor grad_direct = at::empty_like(grad_cell);               // dL/d prev through the gates alone
  const at::Tensor grad_input = at::empty({rows, s.input}, options);     // dL/d layer 0's input
  // dL/d layer l's cells from layer l + 1's input product (none above the top layer).
  const at::Tensor grad_from_above = s.layers > 1 ? at::empty({rows, s.hidden}, options) : at::Tensor();
  // The states each step started from, for the W_hh gradients.
  const at::Tensor prev_states =
      grad_weights.empty() ? at::Tensor() : at::empty({ss.steps, s.batch, s.hidden}, out.options());
  const bool input_wanted = input_grad_wanted(grad_items, grad_proj_weight, grad_proj_bias);
  // Where h wants no gradient, the carries live in scratch of h's shape and their last update (step 0's, dL/d h)
  // is skipped. (Each layer's carry then lies at the same offset as in grad_h: BLAS's rounding may depend on an
  // operand's alignment, and the other gradients must not depend on whether h wants one.)
  const at::Tensor carries = grad_h.has_value() ? *grad_h : at::empty_like(h, at::MemoryFormat::Contiguous);
  const int64_t per_layer = s.bias ? 4 : 2;
  for (int64_t l = s.layers - 1; l >= 0; --l) {
    const LayerWeights w = layer_weights(weights, s, l);
    // dL/d out[step + 1][l] in full, then dL/d h[l]
    at::Tensor carry = carries.select(0, l);
    carry.copy_(grad_out.select(0, ss.steps).select(0, l));
    for (int64_t step = ss.steps - 1; step >= 0; --step) {
      const at::Tensor prev = out.select(0, step).select(0, l), cell = cells.select(0, l).select(0, step);
      if (grad_keep.has_value()) {
        const at::Tensor kept = at::where(lengths.select(0, step).gt(0).unsqueeze(1), cell, prev);
        at::Tensor grad_keep_step = grad_keep->select(0, step);
        grad_keep_step.add_((carry * kept).sum(at::IntArrayRef{1}));
      }
      steps_keep_backward(ss, lengths, keep, step, carry, grad_cell, grad_passed);
      if (l < s.layers - 1) add_into(grad_cell, grad_cell, grad_from_above.narrow(0, step * s.batch, s.batch));
      at::Tensor grad_gh_step = grad_gh.narrow(0, step * s.batch, s.batch);
      step_gates_backward_saved(k, grad_cell, gates.select(0, l).select(0, step), prev,
                                grad_gi.narrow(0, step * s.batch, s.batch), grad_gh_step, grad_direct);
      if (step == 0 && !grad_h.has_value()) break;  // dL/d h unwanted
      add_into(carry, grad_passed, grad_direct);
      add_into(carry, carry, grad_out.select(0, step).select(0, l));
      addmm_into(carry, carry, grad_gh_step, w.w_hh);
    }
    // The weight gradients (where wanted) and the input's, each one product over all steps.
    if (!grad_weights.empty()) {
      const at::Tensor layer_input = l > 0 ? cells.select(0, l - 1).view({rows, s.hidden})
                                           : (projected.has_value() ? *projected : session_mean).view({rows, s.input});
      mm_into(grad_weights[l * per_layer], grad_gi.t(), layer_input);
      at::Tensor prev_states_l = prev_states;
      prev_states_l.copy_(out.narrow(0, 0, ss.steps).select(1, l));
      mm_into(grad_weights[l * per_layer + 1], grad_gh.t(), prev_states.view({rows, s.hidden}));
      if (s.bias) {
        sum_rows_into(grad_weights[l * per_layer + 2], grad_gi);
        sum_rows_into(grad_weights[l * per_layer + 3], grad_gh);
      }
    }
    if (l > 0) {
      mm_into(grad_from_above, grad_gi, w.w_ih);
    } else if (input_wanted) {
      mm_into(grad_input, grad_gi, w.w_ih);
    }
  }
  if (input_wanted) {
    SessionUpdateShapes all = s;
    all.batch = rows;
    session_input_backward(k, lengths, all, grad_input, session_mean.view({rows, s.dim}), proj_weight,
                           grad_proj_weight, grad_proj_bias, grad_items);
  }
}

// ---- the cell as one op, differentiated in C++ ------------------------------------------------------
//
// gru_cell is the layer ops at time 1 behind one autograd node written in C++: at HierTCN's sizes a
// Python autograd.Function around them (its forward and backward in the interpreter, outputs allocated
// from Python) costs about as much as the step's arithmetic. The layer ops are called through the
// dispatcher, so that either device's kernels (and fake tensors, for opcheck) serve.

void call_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, at::Tensor& output, at::Tensor& gates) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hiertcn_fast::gru_layer_forward_out", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, at::Tensor&, at::Tensor&)>();
  op.call(x, h0, w_ih, w_hh, b_ih, b_hh, output, gates);
}

void call_layer_backward(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& h0,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                         const at::Tensor& gates, const OptTensor& grad_x, const OptTensor& grad_h0,
                         const OptTensor& grad_w_ih, const OptTensor& grad_w_hh, const OptTensor& grad_b_ih,
                         const OptTensor& grad_b_hh) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hiertcn_fast::gru_layer_backward_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, const OptTensor&)>();
  op.call(grad_output, x, h0, w_ih, w_hh, output, gates, grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh);
}

// h' (batch, hidden) for x (batch, input), h (batch, hidden); the saved gates into gates ((1, batch,
// 4 * hidden), the layer op's time-1 layout).
at::Tensor cell_forward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, at::Tensor& gates) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2, "gru_cell: x and h must be 2-D (batch, features), got ", x.dim(),
              "-D and ", h.dim(), "-D");
  const int64_t batch = h.size(0), hidden = h.size(1);
  at::Tensor out = at::empty({batch, hidden}, h.options());
  gates = at::empty({1, batch, 4 * hidden}, h.options());
  at::Tensor output = out.unsqueeze(1);
  call_layer_forward(x.unsqueeze(1), h, w_ih, w_hh, b_ih, b_hh, output, gates);
  return out;
}

// The layer op's kernels index h by rows with unit stride.
at::Tensor unit_stride_rows(const at::Tensor& t) { return has_unit_stride(t, -1) ? t : t.contiguous(); }

// The backward of a layer's node (the cell's is one step of it): grad_out (batch, time, hidden) contiguous, x
// (batch, time, input), h0 (batch, hidden), out the states the forward ran through (read for the steps before
// the last), gates as saved. The gradients of x, h0, w_ih, w_hh, b_ih and b_hh, each undefined where none is
// wanted: an input that wants none (a frozen weight or bias pair, an x or h0 without one) costs no product.
torch::autograd::variable_list layer_node_backward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_out,
                                                   const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                   const at::Tensor& w_hh, const at::Tensor& out,
                                                   const at::Tensor& gates, bool bias) {
  OptTensor grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh;
  if (ctx->needs_input_grad(0)) grad_x = at::empty(x.sizes(), x.options());
  if (ctx->needs_input_grad(1)) grad_h0 = at::empty_like(h0, at::MemoryFormat::Contiguous);
  if (ctx->needs_input_grad(2)) grad_w_ih = at::empty_like(w_ih, at::MemoryFormat::Contiguous);
  if (ctx->needs_input_grad(3)) grad_w_hh = at::empty_like(w_hh, at::MemoryFormat::Contiguous);
  // (Without biases the node has four edges: asked only with them.)
  if (bias && (ctx->needs_input_grad(4) || ctx->needs_input_grad(5))) {
    grad_b_ih = at::empty({w_ih.size(0)}, w_ih.options());
    grad_b_hh = at::empty({w_hh.size(0)}, w_hh.options());
  }
  call_layer_backward(grad_out, x, h0, w_ih, w_hh, out, gates, grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih,
                      grad_b_hh);
  return {grad_x.value_or(at::Tensor()), grad_h0.value_or(at::Tensor()), grad_w_ih.value_or(at::Tensor()),
          grad_w_hh.value_or(at::Tensor()), grad_b_ih.value_or(at::Tensor()), grad_b_hh.value_or(at::Tensor())};
}

class GruCellFunction : public torch::autograd::Function<GruCellFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                            const OptTensor& b_hh) {
    at::Tensor gates;
    const at::Tensor h_rows = unit_stride_rows(h);
    at::Tensor out = cell_forward(x, h_rows, w_ih, w_hh, b_ih, b_hh, gates);
    // The output is not kept: the backward of one step reads h and the gates only, and a kept output would make
    // an in-place edit of the result (h[done] = 0, as after nn.GRUCell) an error at the backward.
    ctx->save_for_backward({x, h_rows, w_ih, w_hh, gates});
    ctx->saved_data["bias"] = b_ih.has_value();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_graph_of_gradient("gru_cell");
    refuse_batched_gradient("gru_cell", grads[0]);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h = saved[1], &w_ih = saved[2], &w_hh = saved[3], &gates = saved[4];
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(h);
    // The layer op's output argument: of one step it reads none (only the steps before the last), so an unfilled
    // buffer of its shape stands in.
    const at::Tensor out = at::empty({h.size(0), 1, h.size(1)}, h.options());
    torch::autograd::variable_list result = layer_node_backward(ctx, grad_out.unsqueeze(1), x.unsqueeze(1), h, w_ih,
                                                                w_hh, out, gates, ctx->saved_data["bias"].toBool());
    if (result[0].defined()) result[0] = result[0].squeeze(1);
    return result;
  }
};

at::Tensor gru_cell_autograd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const OptTensor& b_ih, const OptTensor& b_hh) {
  return GruCellFunction::apply(x, h, w_ih, w_hh, b_ih, b_hh);
}

// Below autograd (inference mode, or no input needing a gradient there): the forward alone.
at::Tensor gru_cell_forward_only(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  at::Tensor gates;
  return cell_forward(x, unit_stride_rows(h), w_ih, w_hh, b_ih, b_hh, gates);
}

// ---- one layer over a sequence as one op, differentiated in C++ ----------------------------------------------
//
// gru_layer is the layer ops behind one autograd node written in C++, as the cell is: hiertcn_fast.ops.gru runs
// one per layer. At a few short sequences (one user's sessions) a Python autograd.Function per layer and the
// outputs allocated from Python cost about as much as the recurrence. What the caller gets is never what the
// backward keeps, so that it may edit the result in place: one step keeps no output (its backward reads h0 and
// the gates only); a sequence keeps the states it ran through and returns a copy of them.

// output (batch, time, hidden) and the saved gates (time, batch, 4 * hidden) for x (batch, time, input), h0
// (batch, hidden) with unit-stride rows.
at::Tensor layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, at::Tensor& gates) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2, "gru_layer: x must be 3-D (batch, time, input) and h0 2-D (batch, "
              "hidden), got ", x.dim(), "-D and ", h0.dim(), "-D");
  const int64_t batch = x.size(0), time = x.size(1), hidden = h0.size(1);
  TORCH_CHECK(time >= 1, "gru_layer: x must hold at least one time step, got shape ", x.sizes());
  at::Tensor output = at::empty({batch, time, hidden}, h0.options());
  gates = at::empty({time, batch, 4 * hidden}, h0.options());
  call_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, output, gates);
  return output;
}

class GruLayerFunction : public torch::autograd::Function<GruLayerFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                            const OptTensor& b_hh) {
    at::Tensor gates;
    const at::Tensor h_rows = unit_stride_rows(h0);
    at::Tensor output = layer_forward(x, h_rows, w_ih, w_hh, b_ih, b_hh, gates);
    const bool one_step = output.size(1) == 1;
    ctx->save_for_backward({x, h_rows, w_ih, w_hh, one_step ? at::Tensor() : output, gates});
    ctx->saved_data["bias"] = b_ih.has_value();
    return one_step ? output : output.clone();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_graph_of_gradient("gru");
    refuse_batched_gradient("gru", grads[0]);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h0 = saved[1], &w_ih = saved[2], &w_hh = saved[3], &gates = saved[5];
    const int64_t batch = x.size(0), time = x.size(1), hidden = h0.size(1);
    // One step: the op reads no output (only those of the steps before the last).
    const at::Tensor output = saved[4].defined() ? saved[4] : at::empty({batch, 1, hidden}, h0.options());
    const at::Tensor grad_out =
        grads[0].defined() ? grads[0].contiguous() : at::zeros({batch, time, hidden}, h0.options());
    return layer_node_backward(ctx, grad_out, x, h0, w_ih, w_hh, output, gates, ctx->saved_data["bias"].toBool());
  }
};

// Below autograd (inference mode), or with no gradient to compute: the forward alone (no copy of the output).
at::Tensor gru_layer_forward_only(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  at::Tensor gates;
  return layer_forward(x, unit_stride_rows(h0), w_ih, w_hh, b_ih, b_hh, gates);
}

at::Tensor gru_layer_autograd(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  if (!records_graph(x, h0, w_ih, w_hh, b_ih, b_hh)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gru_layer_forward_only(x, h0, w_ih, w_hh, b_ih, b_hh);
  }
  return GruLayerFunction::apply(x, h0, w_ih, w_hh, b_ih, b_hh);
}

// ---- session_update as one op, differentiated in C++ ------------------------------------------------
//
// The same for session_update: its out ops behind one C++ autograd node. lengths must be int64 and keep
// in h's dtype (the Python entry point converts them).

void call_session_forward(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                          const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                          const OptTensor& proj_bias, at::Tensor& out, at::Tensor& states, at::Tensor& session_mean,
                          const OptTensor& projected, at::Tensor& gates) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hiertcn_fast::session_update_forward_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                      const OptTensor&, const OptTensor&, at::Tensor&, at::Tensor&, at::Tensor&, const OptTensor&,
                      at::Tensor&)>();
  op.call(items, lengths, h, keep, weights, proj_weight, proj_bias, out, states, session_mean, projected, gates);
}

void call_session_backward(const at::Tensor& grad_out, const at::Tensor& items, const at::Tensor& lengths,
                           const at::Tensor& h, const at::Tensor& keep, at::TensorList weights,
                           const OptTensor& proj_weight, const at::Tensor& session_mean, const OptTensor& projected,
                           const at::Tensor& states, const at::Tensor& gates,
                           const OptTensor& grad_items, const OptTensor& grad_h, at::TensorList grad_weights,
                           const OptTensor& grad_proj_weight, const OptTensor& grad_proj_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hiertcn_fast::session_update_backward_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      at::TensorList, const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                      const at::Tensor&, const OptTensor&, const OptTensor&, at::TensorList,
                      const OptTensor&, const OptTensor&)>();
  op.call(grad_out, items, lengths, h, keep, weights, proj_weight, session_mean, projected, states, gates,
          grad_items, grad_h, grad_weights, grad_proj_weight, grad_proj_bias);
}

// The buffers the forward fills and the backward reads.
struct SessionSaved {
  at::Tensor out, states, session_mean, gates;
  OptTensor projected;
};

SessionSaved session_forward(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                             const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                             const OptTensor& proj_bias) {
  TORCH_CHECK(items.dim() == 3 && h.dim() == 3, "session_update: item_embeddings and h must be 3-D, got ",
              items.dim(), "-D and ", h.dim(), "-D");
  const int64_t layers = h.size(0), batch = h.size(1), hidden = h.size(2);
  SessionSaved r;
  r.out = at::empty_like(h, at::MemoryFormat::Contiguous);
  r.states = at::empty_like(r.out);
  r.session_mean = at::empty({batch, items.size(2)}, h.options());
  if (proj_weight.has_value()) r.projected = at::empty({batch, proj_weight->size(0)}, h.options());
  r.gates = at::empty({layers, batch, 4 * hidden}, h.options());
  call_session_forward(items, lengths, h, keep, weights, proj_weight, proj_bias, r.out, r.states, r.session_mean,
                       r.projected, r.gates);
  return r;
}

class SessionUpdateFunction : public torch::autograd::Function<SessionUpdateFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& items, const at::Tensor& lengths,
                            const at::Tensor& h, const at::Tensor& keep, at::TensorList weights,
                            const OptTensor& proj_weight, const OptTensor& proj_bias) {
    const at::Tensor items_rows = unit_stride_rows(items), h_contiguous = h.contiguous();
    SessionSaved r = session_forward(items_rows, lengths, h_contiguous, keep, weights, proj_weight, proj_bias);
    // The backward needs the item embeddings' shape only (a mean's gradient does not depend on what was
    // averaged): keeping them would hold the whole padded batch of sessions, of which each step's rows are a
    // view, until the backward.
    torch::autograd::variable_list saved{at::Tensor(), lengths, h_contiguous, keep, r.states, r.gates, r.session_mean,
                                         proj_weight.value_or(at::Tensor()), r.projected.value_or(at::Tensor())};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["proj_bias"] = proj_bias.has_value();
    ctx->saved_data["time"] = items.size(1);
    return r.out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_graph_of_gradient("session_update");
    refuse_batched_gradient("session_update", grads[0]);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &lengths = saved[1], &h = saved[2], &keep = saved[3], &states = saved[4], &gates = saved[5],
                     &session_mean = saved[6];
    // A stand-in with the item embeddings' shape, dtype and device (the backward op reads nothing else).
    const int64_t dim = session_mean.size(1);
    const at::Tensor items =
        at::empty({dim}, h.options()).as_strided({h.size(1), ctx->saved_data["time"].toInt(), dim}, {0, 0, 1});
    const OptTensor proj_weight = saved[7].defined() ? OptTensor(saved[7]) : std::nullopt;
    const OptTensor projected = saved[8].defined() ? OptTensor(saved[8]) : std::nullopt;
    const std::vector<at::Tensor> weights(saved.begin() + 9, saved.end());
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(h);

    // Only what wants a gradient is computed: the GRU's weights all or none (none when every one is frozen), the
    // projection's weight and bias each (the autograd inputs: items, lengths, h, keep, the weights, then
    // proj_weight and proj_bias where given).
    OptTensor grad_items, grad_h, grad_proj_weight, grad_proj_bias;
    if (ctx->needs_input_grad(0)) grad_items = at::empty(items.sizes(), items.options());
    if (ctx->needs_input_grad(2)) grad_h = at::empty_like(h);
    const size_t first_weight = 4, after_weights = first_weight + weights.size();
    bool weights_wanted = false;
    for (size_t i = first_weight; i < after_weights; ++i) weights_wanted = weights_wanted || ctx->needs_input_grad(i);
    std::vector<at::Tensor> grad_weights;
    if (weights_wanted) {
      grad_weights.reserve(weights.size());
      for (const at::Tensor& w : weights) grad_weights.push_back(at::empty(w.sizes(), w.options()));
    }
    if (proj_weight.has_value()) {
      if (ctx->needs_input_grad(after_weights)) grad_proj_weight = at::empty(proj_weight->sizes(), proj_weight->options());
      if (ctx->saved_data["proj_bias"].toBool() && ctx->needs_input_grad(after_weights + 1))
        grad_proj_bias = at::empty({proj_weight->size(0)}, h.options());
    }
    call_session_backward(grad_out, items, lengths, h, keep, weights, proj_weight, session_mean, projected, states,
                          gates, grad_items, grad_h, grad_weights, grad_proj_weight, grad_proj_bias);
    at::Tensor grad_keep;
    if (ctx->needs_input_grad(3)) {
      const at::Tensor active = lengths.gt(0).view({1, -1, 1});
      grad_keep = (grad_out * at::where(active, states, h)).sum(at::IntArrayRef{0, 2});
    }
    torch::autograd::variable_list result{grad_items.value_or(at::Tensor()), at::Tensor(),
                                          grad_h.value_or(at::Tensor()), grad_keep};
    if (weights_wanted) {
      result.insert(result.end(), grad_weights.begin(), grad_weights.end());
    } else {
      result.resize(result.size() + weights.size());
    }
    result.push_back(grad_proj_weight.value_or(at::Tensor()));
    result.push_back(grad_proj_bias.value_or(at::Tensor()));
    return result;
  }
};

at::Tensor session_update_autograd(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                   const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                   const OptTensor& proj_bias) {
  return SessionUpdateFunction::apply(items, lengths, h, keep, weights, proj_weight, proj_bias);
}

at::Tensor session_update_forward_only(const at::Tensor& items, const at::Tensor& lengths, const at::Tensor& h,
                                       const at::Tensor& keep, at::TensorList weights, const OptTensor& proj_weight,
                                       const OptTensor& proj_bias) {
  return session_forward(unit_stride_rows(items), lengths, h.contiguous(), keep, weights, proj_weight, proj_bias).out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiertcn_fast, Autograd, m) {
  m.impl("gru_cell", &gru_cell_autograd);
  m.impl("gru_layer", &gru_layer_autograd);
  m.impl("session_update", &session_update_autograd);
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CompositeExplicitAutograd, m) {
  m.impl("gru_cell", &gru_cell_forward_only);
  m.impl("gru_layer", &gru_layer_forward_only);
  m.impl("session_update", &session_update_forward_only);
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("gru_layer_forward_out", &gru_layer_forward_out);
  m.impl("gru_layer_backward_out", &gru_layer_backward_out);
  m.impl("session_update_forward_out", &session_update_forward_out);
  m.impl("session_update_backward_out", &session_update_backward_out);
  m.impl("session_update_steps_forward_out", &session_update_steps_forward_out);
  m.impl("session_update_steps_backward_out", &session_update_steps_backward_out);
}

#ifdef HIERTCN_WITH_CUDA
// The same drivers for CUDA tensors: ATen runs the matrix products on the tensors' device and current
// stream, and gru_kernels_for picks the CUDA kernels.
TORCH_LIBRARY_IMPL(hiertcn_fast, CUDA, m) {
  m.impl("gru_layer_forward_out", &gru_layer_forward_out);
  m.impl("gru_layer_backward_out", &gru_layer_backward_out);
  m.impl("session_update_forward_out", &session_update_forward_out);
  m.impl("session_update_backward_out", &session_update_backward_out);
  m.impl("session_update_steps_forward_out", &session_update_steps_forward_out);
  m.impl("session_update_steps_backward_out", &session_update_steps_backward_out);
}
#endif

}  // namespace hiertcn
