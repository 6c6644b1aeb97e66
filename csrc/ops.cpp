// Every schema of the hiertcn_fast operator library, in one place. Kernels register their
// implementations per dispatch key next to their code (cpu/*.cpp, cuda/*.cu); fake (meta) kernels,
// autograd and backend selection live in Python (hiertcn_fast/ops/).
//
// Convention: compiled ops write into outputs allocated by the caller (`*_out`, mutated arguments
// annotated `(a!)`), so Python owns every allocation and tests can poison fresh outputs with NaN.
#include <torch/library.h>

#include <string>

namespace hiertcn {

// "cuda=1" when the CUDA kernels were compiled into this build, else "cuda=0".
std::string build_info() {
#ifdef HIERTCN_WITH_CUDA
  return "cuda=1";
#else
  return "cuda=0";
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

  // Dilated causal convolution (hiertcn/causal_conv.h): x (batch, time, in), weight (out, in/groups, k),
  // context_table (batch, k, out) per-tap suffix sums of the context term, activation 0 none, 1 relu,
  // 2 gelu, 3 tanh. pre, when given, receives the pre-activation z that the backward needs.
  m.def(
      "causal_conv1d_out(Tensor x, Tensor weight, Tensor? bias, Tensor? context_table, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) out, Tensor(b!)? pre) -> ()");
  m.def(
      "causal_conv1d_backward_out(Tensor grad_out, Tensor x, Tensor weight, Tensor? pre, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) grad_pre, Tensor(b!) grad_x, "
      "Tensor(c!) grad_weight, Tensor(d!)? grad_residual) -> ()");
  // One step: x (batch, in), history (batch, (k-1)*dilation, in) circular buffer and position (batch) int64,
  // both updated in place; out (batch, out).
  m.def(
      "causal_conv1d_step_out(Tensor x, Tensor weight, Tensor? bias, Tensor? context_table, Tensor? residual, "
      "int dilation, int groups, int activation, *, Tensor(a!) history, Tensor(b!) position, Tensor(c!) out) -> ()");
}
