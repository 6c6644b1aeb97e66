// CPU kernel of the fused full-softmax cross-entropy (hiertcn_fast.ops.linear_cross_entropy): one pass per
// row, in cache, over logits a matrix product has just written. Per row: add the bias, take the max, turn
// the row into e^(z - max) while summing it, then loss = log(sum) - (z[target] - max) and the row into
// softmax - one_hot(target), the gradient of the loss with respect to the logits, which the backward
// multiplies out with two matrix products. Parallel over rows; every row's sums run in a fixed order, so
// the result does not depend on the thread count.
#include "hiertcn/cpu_clones.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
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
  // One pass over the ids (a few tensor ops here cost more than the row pass at one event).
  const int64_t* ids = targets.data_ptr<int64_t>();
  int64_t low = ids[0], high = ids[0];
  for (int64_t r = 1; r < rows; ++r) {
    low = std::min(low, ids[r]);
    high = std::max(high, ids[r]);
  }
  TORCH_CHECK(low >= 0 && high < classes, "targets must lie in [0, ", classes, "), got values in [", low, ", ", high,
              "]");
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_xent_out_cpu", [&] {
    softmax_xent_rows<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                                bias ? bias->data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(), rows,
                                classes);
  });
}

// ---- the whole loss as one op, differentiated in C++ -----------------------------------------------------
//
// linear_cross_entropy(features, weight, bias, targets, block_rows): the summed cross-entropy of
// features @ weight^T + bias, what hiertcn_fast.ops.linear_cross_entropy runs on its cpu backend. One op with
// an autograd node written in C++: at a few events a Python autograd.Function and the Python loop around the
// blocks cost more than the product and the row pass (at one event, 1,683 classes, three times PyTorch's whole
// forward). The row pass goes through the dispatcher (softmax_xent_out), so fake tensors (opcheck, tracing) take
// its fake kernel.
//
// With a gradient to compute, the forward goes one of two ways (the caller's block_rows, at least 1, is the
// rows per block):
// - a batch of no more events than features, in one block (few rows): it keeps the (events, classes) gradient
//   of its logits, no larger than the weight's gradient, and the backward runs the two products on it scaled
//   by the incoming gradient;
// - otherwise, block by block: each block's logits (product), the row pass, and at once that block's share of
//   the gradients for a unit loss gradient (two products and a column sum). It keeps the gradients, never an
//   (events, classes) buffer, and the backward scales them.
// Without one (no_grad, inference mode, no input needing it), the loss alone, block by block.

using OptTensor = std::optional<at::Tensor>;

void call_softmax_xent_out(at::Tensor& logits, const at::Tensor& targets, const OptTensor& bias, at::Tensor& loss) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hiertcn_fast::softmax_xent_out", "")
                             .typed<void(at::Tensor&, const at::Tensor&, const OptTensor&, at::Tensor&)>();
  op.call(logits, targets, bias, loss);
}

void check_loss_arguments(const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias,
                          const at::Tensor& targets, int64_t block_rows) {
  TORCH_CHECK(features.dim() == 2, "linear_cross_entropy: features must be 2-D (events, dim), got shape ",
              features.sizes());
  TORCH_CHECK(features.device().is_cpu() || features.device().is_meta(),
              "linear_cross_entropy: this op runs on CPU tensors, got features on ", features.device());
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "linear_cross_entropy: features must be float32 or float64, got ", features.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features.size(1), "linear_cross_entropy: weight must be "
              "(classes, ", features.size(1), "), got shape ", weight.sizes());
  check_same_device_dtype(features, weight, "features", "weight");
  if (bias) {
    check_shape(*bias, {weight.size(0)}, "bias");
    check_same_device_dtype(features, *bias, "features", "bias");
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == features.size(0) &&
                  targets.device() == features.device(),
              "linear_cross_entropy: targets must be a 1-D int64 tensor of one class id per row of features (",
              features.size(0), ") on its device, got ", targets.scalar_type(), " of shape ", targets.sizes(),
              " on ", targets.device());
  TORCH_CHECK(block_rows >= 1, "linear_cross_entropy: block_rows must be >= 1, got ", block_rows);
}

struct LossParts {
  at::Tensor loss, grad_features, grad_weight, grad_bias;  // a gradient not asked for is undefined
};

// Block by block: the loss and, for a unit loss gradient, the gradients asked for.
LossParts blocked_loss_and_gradients(const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias,
                                     const at::Tensor& targets, int64_t block_rows, bool need_features,
                                     bool need_weight, bool need_bias) {
  const int64_t events = features.size(0), classes = weight.size(0);
  at::Tensor loss_rows = at::empty({events}, features.options());
  LossParts parts;
  if (need_features) parts.grad_features = at::empty_like(features);
  if (need_weight) parts.grad_weight = at::zeros_like(weight);
  if (need_bias) parts.grad_bias = at::zeros_like(*bias);
  at::Tensor block = at::empty({std::min(block_rows, events), classes}, features.options());
  const at::Tensor weight_t = weight.t();
  for (int64_t start = 0; start < events; start += block_rows) {
    const int64_t stop = std::min(start + block_rows, events);
    const at::Tensor x = features.slice(0, start, stop);
    at::Tensor logits = block.slice(0, 0, stop - start);
    at::Tensor loss_part = loss_rows.slice(0, start, stop);
    at::mm_out(logits, x, weight_t);
    call_softmax_xent_out(logits, targets.slice(0, start, stop), bias, loss_part);
    if (need_features) {
      at::Tensor grad_part = parts.grad_features.slice(0, start, stop);
      at::mm_out(grad_part, logits, weight);
    }
    if (need_weight) parts.grad_weight.addmm_(logits.t(), x);
    if (need_bias) parts.grad_bias.add_(logits.sum(0));
  }
  parts.loss = loss_rows.sum();
  return parts;
}

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features_in,
                            const at::Tensor& weight_in, const OptTensor& bias_in, const at::Tensor& targets_in,
                            int64_t block_rows) {
    check_loss_arguments(features_in, weight_in, bias_in, targets_in, block_rows);
    const at::Tensor features = features_in.contiguous(), weight = weight_in.contiguous();
    const at::Tensor targets = targets_in.contiguous();
    const OptTensor bias = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
    const bool need_features = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    // (An absent bias has no edge: then edge 2 is the targets'.)
    const bool need_bias = bias.has_value() && ctx->needs_input_grad(2);
    ctx->saved_data["need_bias"] = need_bias;
    const int64_t events = features.size(0), dim = features.size(1);
    const bool few_rows = (need_features || need_weight || need_bias) && events <= std::min(dim, block_rows);
    ctx->saved_data["few_rows"] = few_rows;
    if (few_rows) {
      at::Tensor grad_logits = at::mm(features, weight.t());
      at::Tensor loss_rows = at::empty({events}, features.options());
      // The row pass turns the logits into their gradient, softmax - one_hot, in place.
      call_softmax_xent_out(grad_logits, targets, bias, loss_rows);
      ctx->save_for_backward({grad_logits, need_features ? weight : at::Tensor(), need_weight ? features : at::Tensor()});
      return loss_rows.sum();
    }
    LossParts parts = blocked_loss_and_gradients(features, weight, bias, targets, block_rows, need_features,
                                                 need_weight, need_bias);
    ctx->save_for_backward({parts.grad_features, parts.grad_weight, parts.grad_bias});
    return parts.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_graph_of_gradient("linear_cross_entropy");
    refuse_batched_gradient("linear_cross_entropy", grads[0]);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    torch::autograd::variable_list result(5);
    if (!grads[0].defined()) return result;  // no gradient reached the loss: none for the inputs
    const at::Tensor& grad_loss = grads[0];
    if (!ctx->saved_data["few_rows"].toBool()) {
      for (int i = 0; i < 3; ++i) {
        if (saved[i].defined()) result[i] = saved[i] * grad_loss;
      }
      return result;
    }
    // Each product only where this backward asks for its gradient (autograd.grad of some of the inputs).
    const at::Tensor &grad_logits = saved[0], &weight = saved[1], &features = saved[2];
    const at::Tensor scaled = grad_logits * grad_loss;
    if (weight.defined() && ctx->needs_input_grad(0)) result[0] = at::mm(scaled, weight);
    if (features.defined() && ctx->needs_input_grad(1)) result[1] = at::mm(scaled.t(), features);
    if (ctx->saved_data["need_bias"].toBool() && ctx->needs_input_grad(2)) result[2] = scaled.sum(0);
    return result;
  }
};

// Below autograd (inference mode), or with no gradient to compute: the loss alone.
at::Tensor linear_cross_entropy_forward_only(const at::Tensor& features, const at::Tensor& weight,
                                             const OptTensor& bias, const at::Tensor& targets, int64_t block_rows) {
  check_loss_arguments(features, weight, bias, targets, block_rows);
  const OptTensor b = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  return blocked_loss_and_gradients(features.contiguous(), weight.contiguous(), b, targets.contiguous(), block_rows,
                                    false, false, false)
      .loss;
}

at::Tensor linear_cross_entropy_autograd(const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias,
                                         const at::Tensor& targets, int64_t block_rows) {
  if (!records_graph(features, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return linear_cross_entropy_forward_only(features, weight, bias, targets, block_rows);
  }
  return LinearCrossEntropyFunction::apply(features, weight, bias, targets, block_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("softmax_xent_out", &softmax_xent_out_cpu);
  m.impl("linear_cross_entropy", &linear_cross_entropy_forward_only);
}

TORCH_LIBRARY_IMPL(hiertcn_fast, Autograd, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_autograd); }

}  // namespace hiertcn
