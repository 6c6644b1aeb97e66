// CPU kernel of the fused full-softmax cross-entropy (hiertcn_fast.ops.linear_cross_entropy): one pass per
// row, in cache, over logits a matrix product has just written. Per row: add the bias, take the max, turn
// the row into e^(z - max) while summing it, then loss = log(sum) - (z[target] - max) and the row into
// softmax - one_hot(target), the gradient of the loss with respect to the logits, which the backward
// multiplies out with two matrix products. Parallel over rows; every row's sums run in a fixed order, so
// the result does not depend on the thread count.
#include "hiertcn/cpu_clones.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "hiertcn/checks.h"
#include "hiertcn/gru_gates.h"

namespace hiertcn {
namespace {

// The reductions keep 16 interleaved partial results (one vector's lanes), combined pairwise at the end: a
// single running max or sum would be one long dependency chain the compiler may not reorder.
constexpr int kLanes = 16;

template <typename T>
HIERTCN_ALWAYS_INLINE T row_max_impl(const T* __restrict z, int64_t n) {
  T part[kLanes];
  for (int l = 0; l < kLanes; ++l) part[l] = z[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] = z[j + l] > part[l] ? z[j + l] : part[l];
  for (; j < n; ++j) part[0] = z[j] > part[0] ? z[j] : part[0];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) part[l] = part[l + width] > part[l] ? part[l + width] : part[l];
  return part[0];
}

template <typename T>
HIERTCN_ALWAYS_INLINE void add_bias_impl(T* __restrict z, const T* __restrict bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
}

// e^x for x = z - max <= 0. In float, exp_acc clamps x at -80 (all the GRU gates need): here a class 80 or more
// below the row's max, a -inf logit (a masked class) included, gets exactly 0 (it got e^-80 ~ 1.8e-35, so a masked
// class kept a probability and a gradient, and an infinite weight gave an infinite feature gradient where torch's
// is NaN). What is dropped is below 1.8e-35 of the max's term. A select, so the loops still vectorise.
template <typename T>
inline T exp_shifted(T x) {
  if constexpr (std::is_same_v<T, float>) return x < -80.0f ? 0.0f : exp_acc(x);
  return exp_acc(x);
}

// z <- e^(z - m); returns the sum.
template <typename T>
HIERTCN_ALWAYS_INLINE T exp_shift_sum_impl(T* __restrict z, T m, int64_t n) {
  T part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_shifted(z[j + l] - m);
      z[j + l] = e;
      part[l] += e;
    }
  for (; j < n; ++j) {
    const T e = exp_shifted(z[j] - m);
    z[j] = e;
    part[0] += e;
  }
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

template <typename T>
HIERTCN_ALWAYS_INLINE void scale_row_impl(T* __restrict z, T s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] *= s;
}

// The row functions' versions (hiertcn/cpu_clones.h), one per dtype.
#define HIERTCN_SOFTMAX_ROWS(T)                                                                                    \
  HIERTCN_CPU_VERSIONS(T, row_max, (const T* __restrict z, int64_t n), row_max_impl<T>(z, n))                      \
  HIERTCN_CPU_VERSIONS(void, add_bias, (T* __restrict z, const T* __restrict bias, int64_t n),                     \
                       add_bias_impl<T>(z, bias, n))                                                               \
  HIERTCN_CPU_VERSIONS(T, exp_shift_sum, (T* __restrict z, T m, int64_t n), exp_shift_sum_impl<T>(z, m, n))        \
  HIERTCN_CPU_VERSIONS(void, scale_row, (T* __restrict z, T s, int64_t n), scale_row_impl<T>(z, s, n))
HIERTCN_SOFTMAX_ROWS(float)
HIERTCN_SOFTMAX_ROWS(double)
#undef HIERTCN_SOFTMAX_ROWS

template <typename T>
void softmax_xent_rows(T* logits, const int64_t* targets, const T* bias, T* loss, int64_t rows, int64_t classes) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* z = logits + r * classes;
      if (bias) add_bias(z, bias, classes);
      const int64_t t = targets[r];
      const T target_logit = z[t];
      const T m = row_max(z, classes);
      const T sum = exp_shift_sum(z, m, classes);
      // log(sum) - (z[t] - max), torch's order: (max + log(sum)) - z[t] would round log(sum) away at a large max
      // (every logit shifted by 1e8 in float32 gave a loss of 0, not log(classes)).
      loss[r] = std::log(sum) - (target_logit - m);
      scale_row(z, T(1) / sum, classes);
      z[t] -= T(1);
    }
  });
}

void softmax_xent_out_cpu(at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                          at::Tensor& loss) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous (rows, classes) tensor, got "
              "shape ", logits.sizes());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  TORCH_CHECK(classes >= 1 || rows == 0, "logits need at least one class");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == rows &&
                  targets.is_contiguous() && targets.device() == logits.device(),
              "targets must be a contiguous int64 (", rows, ",) tensor on the device of logits, got ",
              targets.scalar_type(), " of shape ", targets.sizes());
  if (bias) {
    check_shape(*bias, {classes}, "bias");
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
    check_same_device_dtype(logits, *bias, "logits", "bias");
  }
  check_shape(loss, {rows}, "loss");
  TORCH_CHECK(loss.is_contiguous(), "loss must be contiguous");
  check_same_device_dtype(logits, loss, "logits", "loss");
  if (rows == 0) return;
  const at::Tensor bad = targets.lt(0).logical_or_(targets.ge(classes));
  TORCH_CHECK(!bad.any().item<bool>(), "targets must lie in [0, ", classes, ")");
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_xent_out_cpu", [&] {
    softmax_xent_rows<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                                bias ? bias->data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(), rows,
                                classes);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) { m.impl("softmax_xent_out", &softmax_xent_out_cpu); }

}  // namespace hiertcn
