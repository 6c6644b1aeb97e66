// C++ test of the operator library through the dispatcher, against libtorch's own autograd.
// Exit status 0 when every check passes; each failed check prints what differed.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <vector>

#include "hiertcn/gru_gates.h"

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

// The gates' backward from saved rows (hiertcn/gru_gates.h), in every storage type, against the backward in
// double from the same stored inputs. Half types keep pre-activations, so that gates near saturation keep
// their gradients: a z within 2^-9 of 1, saved as itself, would round to 1 in bfloat16 and z (1 - z) to 0.
// The CPU ops take float and double only: the half types run here through the header's functions on the
// host, as the CUDA kernels run them on a GPU. An error is relative to the value, or to floor times the
// largest value of that gradient where the value is smaller (cancellation in h - n or 1 - n^2 leaves values
// near 0 that no storage type keeps to a relative precision).
template <typename T>
void check_saved_gates(const char* type, double tolerance, double floor) {
  const int64_t H = 41;
  std::vector<T> gi(3 * H), gh(3 * H), h(H), g(H), saved(4 * H), d_gi(3 * H), d_gh(3 * H), d_h(H);
  for (int64_t j = 0; j < H; ++j) {
    const double u = static_cast<double>(j) / (H - 1);  // 0..1
    gi[j] = static_cast<T>(2.5 * std::sin(3.0 * j));      // r's pre-activation, partly saturated
    gh[j] = static_cast<T>(0.25 * std::cos(5.0 * j));
    gi[H + j] = static_cast<T>(-9.0 + 18.0 * u);         // z's, from -9 to 9: through saturation at both ends
    gh[H + j] = static_cast<T>(0.125 * std::sin(7.0 * j));
    gi[2 * H + j] = static_cast<T>(1.5 * std::cos(2.0 * j));
    gh[2 * H + j] = static_cast<T>(0.75 * std::sin(11.0 * j));
    h[j] = static_cast<T>(0.9 * std::cos(13.0 * j));
    g[j] = static_cast<T>(1.0 + 0.5 * std::sin(17.0 * j));
  }
  // got[i][j], want[i][j]: d gi_r, d gi_z, d gi_n, d gh_n, d h of unit j.
  std::vector<double> got[5], want[5];
  for (int64_t j = 0; j < H; ++j) {
    hiertcn::gru_gate_forward_save_row<T, hiertcn::acc_t<T>>(gi.data(), gh.data(), h.data(), saved.data(), j, H);
    hiertcn::gru_gate_backward_saved_row<T, hiertcn::acc_t<T>>(g.data(), saved.data(), h.data(), d_gi.data(),
                                                               d_gh.data(), d_h.data(), j, H);
    double w[5];
    hiertcn::gru_gate_backward<double>(double(g[j]), double(gi[j]), double(gi[H + j]), double(gi[2 * H + j]),
                                       double(gh[j]), double(gh[H + j]), double(gh[2 * H + j]), double(h[j]), &w[0],
                                       &w[1], &w[2], &w[3], &w[4]);
    const double o[5] = {double(d_gi[j]), double(d_gi[H + j]), double(d_gi[2 * H + j]), double(d_gh[2 * H + j]),
                         double(d_h[j])};
    for (int i = 0; i < 5; ++i) {
      got[i].push_back(o[i]);
      want[i].push_back(w[i]);
    }
  }
  int bad = 0;
  double worst = 0;
  for (int i = 0; i < 5; ++i) {
    double largest = 0;
    for (double w : want[i]) largest = std::max(largest, std::abs(w));
    for (int64_t j = 0; j < H; ++j) {
      const double error = std::abs(got[i][j] - want[i][j]) / std::max(std::abs(want[i][j]), floor * largest);
      worst = std::max(worst, error);
      if (!(error <= tolerance)) ++bad;
    }
  }
  if (bad) {
    std::cerr << "FAIL saved gates backward in " << type << ": " << bad << " gradient values beyond relative error "
              << tolerance << " (worst " << worst << ")\n";
    ++failures;
  } else {
    std::cout << "ok   saved gates backward in " << type << " (worst relative error " << worst << ")\n";
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  test_gru_gates();
  check_saved_gates<double>("double", 1e-12, 1e-12);
  check_saved_gates<float>("float", 1e-3, 1e-4);
  check_saved_gates<c10::Half>("float16", 0.02, 1e-3);
  check_saved_gates<c10::BFloat16>("bfloat16", 0.04, 1e-3);
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all checks passed\n";
  return 0;
}
