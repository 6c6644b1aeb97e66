// Every schema of the hiertcn_fast operator library, in one place. Kernels register their
// implementations per dispatch key next to their code (cpu/*.cpp, cuda/*.cu); fake (meta) kernels,
// autograd and backend selection live in Python (hiertcn_fast/ops/).
//
// Convention: compiled ops write into outputs allocated by the caller (`*_out`, mutated arguments
// annotated `(a!)`), so Python owns every allocation and tests can poison fresh outputs with NaN.
#include <torch/library.h>

#include <string>

namespace hiertcn {

// "cuda=1" when the CUDA kernels were compiled into this build, else "cuda=0"; then "openmp=1" when the CPU
// kernels were compiled with OpenMP (else at::parallel_for runs them on one thread), else "openmp=0".
std::string build_info() {
#ifdef HIERTCN_WITH_CUDA
  std::string info = "cuda=1";
#else
  std::string info = "cuda=0";
#endif
#ifdef _OPENMP
  return info + " openmp=1";
#else
  return info + " openmp=0";
#endif
}

}  // namespace hiertcn

TORCH_LIBRARY(hiertcn_fast, m) {
  m.def("build_info() -> str", &hiertcn::build_info);

  // Fused GRU gate math (hiertcn/gru_gates.h): gi, gh (batch, 3*hidden), h and out (batch, hidden).
  m.def("gru_gates_out(Tensor gi, Tensor gh, Tensor h, *, Tensor(a!) out) -> ()");
  m.def(
      "gru_gates_backward_out(Tensor grad_out, Tensor gi, Tensor gh, Tensor h, *, Tensor(a!) grad_gi, "
      "Tensor(b!) grad_gh, Tensor(c!) grad_h) -> ()");

  // One GRU layer over a whole sequence (cpu/gru_recurrence.cpp): x (batch, time, input), h0 (batch,
  // hidden), nn.GRU's weights; output (batch, time, hidden), and for the backward each step's gates
  // (time, batch, 4*hidden): r, z, n and hn = W_hn h + b_hn per row (pre-activations in half types; see
  // hiertcn/gru_gates.h). grad_output holds dL/d output per step. A gradient output not given (None: that input
  // wants no gradient) is not computed, nor the product that would make it.
  m.def(
      "gru_layer_forward_out(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, *, "
      "Tensor(a!) output, Tensor(b!) gates) -> ()");
  m.def(
      "gru_layer_backward_out(Tensor grad_output, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor gates, *, Tensor(a!)? grad_x, Tensor(b!)? grad_h0, Tensor(c!)? grad_w_ih, Tensor(d!)? grad_w_hh, "
      "Tensor(e!)? grad_b_ih, Tensor(f!)? grad_b_hh) -> ()");
  // The cell (cpu/gru_recurrence.cpp): the layer ops at time 1 behind one autograd node written in C++.
  m.def("gru_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor");
  // One layer over a sequence, x (batch, time, input), h0 (batch, hidden) -> (batch, time, hidden), with its
  // autograd node in C++ (cpu/gru_recurrence.cpp), as gru_cell.
  m.def("gru_layer(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor");

  // HierTCN's session-level update (cpu/gru_recurrence.cpp): masked session mean of item_embeddings
  // (batch, time, dim) over lengths (batch,) int64, optional projection, one step of a multi-layer GRU
  // from h (layers, batch, hidden), rows of length 0 unchanged, then times keep (batch,). weights: per
  // layer w_ih, w_hh[, b_ih, b_hh]. Saved for the backward: states (the GRU's new states before
  // masking), session_mean (batch, dim), projected (batch, projected), gates (layers, batch, 4*hidden): each
  // row's r, z, n and hn = W_hn h + b_hn (pre-activations in half types), all the gates' backward reads. In the
  // backward (here and in the steps op) only what is given is computed: grad_item_embeddings, grad_h,
  // grad_proj_weight and grad_proj_bias may each be None, and grad_weights empty (no weight of the GRU wants a
  // gradient) instead of one per weight.
  m.def(
      "session_update_forward_out(Tensor item_embeddings, Tensor lengths, Tensor h, Tensor keep, Tensor[] weights, "
      "Tensor? proj_weight, Tensor? proj_bias, *, Tensor(a!) out, Tensor(b!) states, Tensor(c!) session_mean, "
      "Tensor(d!)? projected, Tensor(e!) gates) -> ()");
  m.def(
      "session_update_backward_out(Tensor grad_out, Tensor item_embeddings, Tensor lengths, Tensor h, Tensor keep, "
      "Tensor[] weights, Tensor? proj_weight, Tensor session_mean, Tensor? projected, Tensor states, Tensor gates, "
      "*, Tensor(a!)? grad_item_embeddings, Tensor(b!)? grad_h, Tensor(c!)[] grad_weights, "
      "Tensor(d!)? grad_proj_weight, Tensor(e!)? grad_proj_bias) -> ()");
  // All of a lane batch's session steps in one op (cpu/gru_recurrence.cpp): out (steps + 1, layers, batch, hidden)
  // with out[0] = h and out[s + 1] = session_update(item_embeddings[s], lengths[s], out[s], keep[s]), for
  // item_embeddings (steps, batch, time, dim), lengths and keep (steps, batch). Saved for the backward: cells
  // (layers, steps, batch, hidden), each step's GRU output before the masks; session_mean (steps, batch, dim);
  // projected (steps, batch, projected); gates (layers, steps, batch, 4*hidden), or (layers, 1, batch, 4*hidden) for
  // a forward only (scratch). grad_out is the gradient of every state in out; grad_keep (steps, batch), when
  // given, receives keep's.
  m.def(
      "session_update_steps_forward_out(Tensor item_embeddings, Tensor lengths, Tensor h, Tensor keep, "
      "Tensor[] weights, Tensor? proj_weight, Tensor? proj_bias, *, Tensor(a!) out, Tensor(b!) cells, "
      "Tensor(c!) session_mean, Tensor(d!)? projected, Tensor(e!) gates) -> ()");
  m.def(
      "session_update_steps_backward_out(Tensor grad_out, Tensor item_embeddings, Tensor lengths, Tensor keep, "
      "Tensor[] weights, Tensor? proj_weight, Tensor session_mean, Tensor? projected, Tensor out, Tensor cells, "
      "Tensor gates, *, Tensor(a!)? grad_item_embeddings, Tensor(b!)? grad_h, Tensor(c!)[] grad_weights, "
      "Tensor(d!)? grad_proj_weight, Tensor(e!)? grad_proj_bias, Tensor(f!)? grad_keep) -> ()");
  // session_update as one op (cpu/gru_recurrence.cpp): the out ops above behind one C++ autograd node;
  // lengths int64, keep in h's dtype.
  m.def(
      "session_update(Tensor item_embeddings, Tensor lengths, Tensor h, Tensor keep, Tensor[] weights, "
      "Tensor? proj_weight, Tensor? proj_bias) -> Tensor");

  // Dilated causal convolution (hiertcn/causal_conv.h): x (batch, time, in), weight (out, in/groups, k),
  // context_table (batch, k, out) per-tap suffix sums of the context term, activation 0 none, 1 relu,
  // 2 gelu, 3 tanh. pre, when given, receives the pre-activation z that the backward needs. The backward computes
  // grad_x and grad_weight only where given (None: that input wants no gradient, and its product is skipped).
  m.def(
      "causal_conv1d_out(Tensor x, Tensor weight, Tensor? bias, Tensor? context_table, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) out, Tensor(b!)? pre) -> ()");
  m.def(
      "causal_conv1d_backward_out(Tensor grad_out, Tensor x, Tensor weight, Tensor? pre, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) grad_pre, Tensor(b!)? grad_x, "
      "Tensor(c!)? grad_weight, Tensor(d!)? grad_residual) -> ()");
  // One step: x (batch, in), packed_weight (k, in, out/groups) (the forward kernels' packing, cached by the
  // caller), history (batch, (k-1)*dilation, in) circular buffer and position (batch) int64, both updated in
  // place; out (batch, out).
  m.def(
      "causal_conv1d_step_out(Tensor x, Tensor packed_weight, Tensor? bias, Tensor? context_table, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) history, Tensor(b!) position, Tensor(c!) out) -> ()");
  // One step of a whole TCN stack (hiertcn/causal_conv.h, TcnStepParams): per layer a dense packed weight
  // (k, in, out) or column-blocked (out / block, k, in, block) (CPU only), optional bias, optional residual
  // projection proj_weight (in, out) or (out / block, in, block) + proj_bias, dilation,
  // history and position (updated in place); context_table for the first layer only, and context_residual
  // (batch, out) added to the first layer's residual (its projection of the context); out (batch, out).
  m.def(
      "tcn_step_out(Tensor x, Tensor[] packed_weights, Tensor?[] biases, Tensor?[] proj_weights, "
      "Tensor?[] proj_biases, Tensor? context_table, Tensor? context_residual, int[] dilations, int activation, *, Tensor(a!)[] histories, "
      "Tensor(b!)[] positions, Tensor(c!) out) -> ()");
  // A context weight's cumulative packing (cpu only; context_table is one product with it): weight (out, ctx, k),
  // out (ctx, k, out) with out[c][m][o] = sum over j >= k-1-m of weight[o][c][j]. And the weight's gradient from
  // the packing's: taps (k, out, ctx) the packing's gradient by tap; out (out, ctx, k) in the weight's layout,
  // out[o][c][j] = sum over m >= k-1-j of taps[m][o][c].
  m.def("context_weight_pack_out(Tensor weight, *, Tensor(a!) out) -> ()");
  m.def("context_weight_grad_out(Tensor taps, *, Tensor(a!) out) -> ()");

  // The full-softmax cross-entropy's row pass (cpu/softmax_xent.cpp): logits (rows, classes) get bias added,
  // and become softmax - one_hot(targets) in place; loss[r] = logsumexp(row r) - logit[r][targets[r]].
  m.def("softmax_xent_out(Tensor(a!) logits, Tensor targets, Tensor? bias, *, Tensor(b!) loss) -> ()");
  // The whole loss (cpu/softmax_xent.cpp): sum over rows of cross_entropy(features @ weight^T + bias, targets),
  // with an autograd node in C++; block_rows bounds the rows of logits held at once.
  m.def("linear_cross_entropy(Tensor features, Tensor weight, Tensor? bias, Tensor targets, int block_rows) -> Tensor");
}
