// C++ test of the operator library through the dispatcher, against libtorch's own autograd.
// Exit status 0 when every check passes; each failed check prints what differed.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

namespace {

int failures = 0;

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const char* what) {
  if (!at::allclose(actual, expected, 1e-10, 1e-10)) {
    std::cerr << "FAIL " << what << ": max abs difference " << (actual - expected).abs().max().item<double>()
              << "\n";
    ++failures;
  } else {
    std::cout << "ok   " << what << "\n";
  }
}

void test_gru_gates() {
  const int64_t batch = 5, hidden = 7;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  auto gi = torch::randn({batch, 3 * hidden}, options).requires_grad_();
  auto gh = torch::randn({batch, 3 * hidden}, options).requires_grad_();
  auto h = torch::randn({batch, hidden}, options).requires_grad_();

  auto gi_parts = gi.chunk(3, 1), gh_parts = gh.chunk(3, 1);
  auto r = torch::sigmoid(gi_parts[0] + gh_parts[0]);
  auto z = torch::sigmoid(gi_parts[1] + gh_parts[1]);
  auto n = torch::tanh(gi_parts[2] + r * gh_parts[2]);
  auto expected = (1 - z) * n + z * h;
  auto grad_out = torch::randn({batch, hidden}, options);
  auto expected_grads = torch::autograd::grad({expected}, {gi, gh, h}, {grad_out});

  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("hiertcn_fast::gru_gates_out", "")
                     .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  torch::NoGradGuard no_grad;
  auto out = torch::full({batch, hidden}, NAN, options);
  forward.call(gi, gh, h, out);
  expect_close(out, expected.detach(), "gru_gates_out forward");

  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("hiertcn_fast::gru_gates_backward_out", "")
                      .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  at::Tensor&, at::Tensor&, at::Tensor&)>();
  auto grad_gi = torch::full_like(gi, NAN), grad_gh = torch::full_like(gh, NAN), grad_h = torch::full_like(h, NAN);
  backward.call(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h);
  expect_close(grad_gi, expected_grads[0], "gru_gates_backward_out grad_gi");
  expect_close(grad_gh, expected_grads[1], "gru_gates_backward_out grad_gh");
  expect_close(grad_h, expected_grads[2], "gru_gates_backward_out grad_h");

  bool rejected = false;
  try {
    auto wrong = torch::empty({batch + 1, hidden}, options);
    forward.call(gi, gh, h, wrong);
  } catch (const c10::Error&) {
    rejected = true;
  }
  if (!rejected) {
    std::cerr << "FAIL gru_gates_out accepted an output of the wrong shape\n";
    ++failures;
  } else {
    std::cout << "ok   gru_gates_out rejects a wrong output shape\n";
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  test_gru_gates();
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all checks passed\n";
  return 0;
}
