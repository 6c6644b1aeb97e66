// Host-side validation, weight packing and params filling for the causal_conv1d ops, shared by the
// CPU and CUDA entry points so that both backends accept exactly the same inputs and index the
// packed weights the same way.
#pragma once

#include <ATen/ATen.h>

#include <ATen/core/List.h>

#include <algorithm>
#include <optional>
#include <string>

#include "hiertcn/causal_conv.h"
#include "hiertcn/checks.h"

namespace hiertcn {

// Channels-last activations: unit stride along channels (empty tensors aside), any batch and time strides.
inline void check_channels_last(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  check_shape(t, expected, name);
  TORCH_CHECK(has_unit_stride(t, 2), name, " must have unit stride along channels, got strides ",
              t.strides());
}

struct ConvShape {
  int64_t batch, time, in_channels, out_channels, groups, kernel_size, dilation, activation;
};

// The fields every conv params struct takes unchanged from the problem's shape (time aside: the
// step has none).
template <typename Params>
void set_shape_fields(Params& p, const ConvShape& s) {
  p.batch = s.batch;
  p.in_channels = s.in_channels;
  p.out_channels = s.out_channels;
  p.groups = s.groups;
  p.kernel_size = s.kernel_size;
  p.dilation = s.dilation;
  p.activation = s.activation;
}

// Validates the arguments every causal_conv1d op shares and returns the problem's shape. The step op
// takes its weight already packed (pack_conv_weight's layout, cached by the caller's state); the others
// take nn.Conv1d's layout.
// The reach of a layer, (k - 1) * dilation, is kept below 2^62 so that no tap offset or history length
// computed from it overflows int64 (a wrapped offset would address memory before the input).
constexpr int64_t kMaxReach = int64_t{1} << 62;

inline void check_reach(int64_t kernel_size, int64_t dilation, const char* what) {
  TORCH_CHECK(kernel_size <= 1 || dilation <= kMaxReach / (kernel_size - 1), what,
              ": (k - 1) * dilation must be below 2^62, got k = ", kernel_size, " and dilation = ", dilation);
}

inline ConvShape check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& context_table, int64_t dilation, int64_t groups,
                                 int64_t activation, bool step) {
  TORCH_CHECK(x.dim() == (step ? 2 : 3), "x must be ", (step ? "(batch, in_channels)" : "(batch, time, in_channels)"),
              ", got shape ", x.sizes());
  const char* weight_layout =
      step ? "packed_weight must be (k, in_channels, out_channels / groups)" : "weight must be (out_channels, "
                                                                              "in_channels / groups, k)";
  TORCH_CHECK(weight.dim() == 3, weight_layout, ", got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);
  TORCH_CHECK(dilation >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK(activation >= kActNone && activation <= kActTanh, "activation code must be 0..3, got ", activation);
  ConvShape s;
  s.batch = x.size(0);
  s.time = step ? 1 : x.size(1);
  s.in_channels = x.size(-1);
  s.out_channels = step ? weight.size(2) * groups : weight.size(0);
  s.groups = groups;
  s.kernel_size = step ? weight.size(0) : weight.size(2);
  s.dilation = dilation;
  s.activation = activation;
  TORCH_CHECK(s.kernel_size >= 1, weight_layout, " with k >= 1, got shape ", weight.sizes());
  check_reach(s.kernel_size, dilation, "causal conv");
  TORCH_CHECK(s.in_channels % groups == 0 && s.out_channels % groups == 0, "groups (", groups,
              ") must divide in_channels (", s.in_channels, ") and out_channels (", s.out_channels, ")");
  TORCH_CHECK((step ? weight.size(1) : weight.size(1) * groups) == s.in_channels, weight_layout, " for ",
              s.in_channels, " input channels and groups = ", groups, ", got shape ", weight.sizes());
  TORCH_CHECK(!step || weight.is_contiguous(), "packed_weight must be contiguous");
  TORCH_CHECK(has_unit_stride(x, -1), "x must have unit stride along channels, got strides ", x.strides());
  check_same_device_dtype(x, weight, "x", "weight");
  if (bias) {
    check_shape(*bias, {s.out_channels}, "bias");
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous, got strides ", bias->strides());
    check_same_device_dtype(x, *bias, "x", "bias");
  }
  if (context_table) {
    check_shape(*context_table, {s.batch, s.kernel_size, s.out_channels}, "context_table");
    TORCH_CHECK(context_table->is_contiguous(), "context_table must be contiguous");
    check_same_device_dtype(x, *context_table, "x", "context_table");
  }
  return s;
}

inline void check_output(const at::Tensor& out, const at::Tensor& x, at::IntArrayRef expected, const char* name) {
  check_shape(out, expected, name);
  TORCH_CHECK(out.is_contiguous(), name, " must be contiguous");
  check_same_device_dtype(x, out, "x", name);
}

// weight (out, in/groups, k) -> packed[j][ci][ol] = W[g * out_g + ol, ci - g * in_g, j], g = ci / in_g:
// (k, in_channels, out_channels / groups), so that tap j is a plain (grouped) matrix from x rows to out rows.
inline at::Tensor pack_conv_weight(const at::Tensor& weight, int64_t groups) {
  const int64_t out = weight.size(0), in_g = weight.size(1), k = weight.size(2);
  return weight.reshape({groups, out / groups, in_g, k}).permute({3, 0, 2, 1}).reshape({k, groups * in_g, out / groups})
      .contiguous();
}

// The transposed packing used by the input gradient: packed[j][o][cl] = W[o, cl, j]: (k, out_channels, in/groups).
inline at::Tensor pack_conv_weight_transposed(const at::Tensor& weight) {
  return weight.permute({2, 0, 1}).contiguous();
}

// pre is z in x's dtype, or (relu only) uint8 relu_sign_bits: returns whether it is the bits.
inline bool check_pre(const std::optional<at::Tensor>& pre, const at::Tensor& x, const ConvShape& s) {
  if (!pre) return false;
  if (pre->scalar_type() != at::kByte) {
    check_output(*pre, x, {s.batch, s.time, s.out_channels}, "pre");
    return false;
  }
  TORCH_CHECK(s.activation == kActRelu, "pre as uint8 sign bits is for relu only, got activation code ", s.activation);
  check_shape(*pre, {s.batch, s.time, s.out_channels}, "pre");
  TORCH_CHECK(pre->is_contiguous(), "pre must be contiguous");
  TORCH_CHECK(pre->device() == x.device(), "pre must be on the device of x (", x.device(), "), got ", pre->device());
  return true;
}

inline CausalConvParams make_causal_conv_params(const ConvShape& s, const at::Tensor& x, const at::Tensor& packed,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& context_table,
                                                const std::optional<at::Tensor>& residual, const at::Tensor& out,
                                                const std::optional<at::Tensor>& pre) {
  check_output(out, x, {s.batch, s.time, s.out_channels}, "out");
  const bool pre_bits = check_pre(pre, x, s);
  CausalConvParams p{};
  p.pre_bits = pre_bits;
  set_shape_fields(p, s);
  p.time = s.time;
  p.direction = 1;
  p.in_batch_stride = x.stride(0);
  p.in_time_stride = x.stride(1);
  p.in = x.data_ptr();
  p.packed_weight = packed.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.context_table = context_table ? context_table->data_ptr() : nullptr;
  if (residual) {
    check_channels_last(*residual, {s.batch, s.time, s.out_channels}, "residual");
    check_same_device_dtype(x, *residual, "x", "residual");
    p.residual_batch_stride = residual->stride(0);
    p.residual_time_stride = residual->stride(1);
    p.residual = residual->data_ptr();
  }
  p.out = out.data_ptr();
  p.pre = pre ? pre->data_ptr() : nullptr;
  return p;
}

// The input gradient as a plain (epilogue-free) anti-causal conv of grad_pre with the transposed packing:
// in_channels and out_channels swap roles.
inline CausalConvParams make_input_grad_params(const ConvShape& s, const at::Tensor& grad_pre,
                                               const at::Tensor& packed_transposed, const at::Tensor& grad_x) {
  CausalConvParams p{};
  p.batch = s.batch;
  p.time = s.time;
  p.in_channels = s.out_channels;
  p.out_channels = s.in_channels;
  p.groups = s.groups;
  p.kernel_size = s.kernel_size;
  p.dilation = s.dilation;
  p.direction = -1;
  p.activation = kActNone;
  p.in_batch_stride = grad_pre.stride(0);
  p.in_time_stride = grad_pre.stride(1);
  p.in = grad_pre.data_ptr();
  p.packed_weight = packed_transposed.data_ptr();
  p.out = grad_x.data_ptr();
  return p;
}

// Validates the backward op's arguments; returns its params (the caller allocates the partials scratch
// with grad_weight_partials_shape and sets grad_weight_partials).
inline CausalConvBackwardParams make_causal_conv_backward_params(
    const ConvShape& s, int64_t weight_grad_rows_per_chunk, const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& pre,
    const std::optional<at::Tensor>& residual, const at::Tensor& grad_pre, const std::optional<at::Tensor>& grad_x,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_residual) {
  check_channels_last(grad_out, {s.batch, s.time, s.out_channels}, "grad_out");
  check_same_device_dtype(x, grad_out, "x", "grad_out");
  TORCH_CHECK(s.activation == kActNone || pre.has_value(), "pre (the forward's z) is required with an activation");
  const bool pre_bits = check_pre(pre, x, s);
  if (pre_bits) {
    TORCH_CHECK(!residual.has_value(), "with pre as sign bits the residual is not read: pass None (and grad_residual "
                "where the forward had a residual)");
  } else {
    TORCH_CHECK(residual.has_value() == grad_residual.has_value(),
                "grad_residual must be given exactly when residual is");
  }
  check_output(grad_pre, x, {s.batch, s.time, s.out_channels}, "grad_pre");
  // grad_x and grad_weight are optional: an input that wants no gradient costs no product.
  if (grad_x) check_output(*grad_x, x, {s.batch, s.time, s.in_channels}, "grad_x");
  if (grad_weight)
    check_output(*grad_weight, x, {s.out_channels, s.in_channels / s.groups, s.kernel_size}, "grad_weight");
  CausalConvBackwardParams p{};
  set_shape_fields(p, s);
  p.time = s.time;
  p.grad_out_batch_stride = grad_out.stride(0);
  p.grad_out_time_stride = grad_out.stride(1);
  p.x_batch_stride = x.stride(0);
  p.x_time_stride = x.stride(1);
  p.weight_grad_chunks = weight_grad_chunks(s.batch * s.time, weight_grad_rows_per_chunk);
  p.grad_out = grad_out.data_ptr();
  p.x = x.data_ptr();
  p.pre = pre ? pre->data_ptr() : nullptr;
  p.pre_bits = pre_bits;
  if (pre_bits && grad_residual) {
    check_output(*grad_residual, x, {s.batch, s.time, s.out_channels}, "grad_residual");
    p.grad_residual = grad_residual->data_ptr();
  }
  if (residual) {
    check_channels_last(*residual, {s.batch, s.time, s.out_channels}, "residual");
    check_same_device_dtype(x, *residual, "x", "residual");
    check_output(*grad_residual, x, {s.batch, s.time, s.out_channels}, "grad_residual");
    p.residual_batch_stride = residual->stride(0);
    p.residual_time_stride = residual->stride(1);
    p.residual = residual->data_ptr();
    p.grad_residual = grad_residual->data_ptr();
  }
  p.grad_pre = grad_pre.data_ptr();
  p.grad_weight = grad_weight ? grad_weight->data_ptr() : nullptr;
  return p;
}

inline at::Tensor new_grad_weight_partials(const CausalConvBackwardParams& p, const at::Tensor& x) {
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({p.weight_grad_chunks, p.kernel_size * p.in_channels * (p.out_channels / p.groups)},
                   x.options().dtype(acc_dtype));
}

// What the backward allocates for the gradients wanted: the weight gradient's partial sums (when grad_weight is
// given; p.grad_weight_partials points at them) and the input gradient's transposed packing, made by pack(weight),
// with its conv's params (when grad_x is given).
struct ConvBackwardScratch {
  at::Tensor partials;
  at::Tensor packed_transposed;
  CausalConvParams input_grad{};
};

template <typename Pack>
inline ConvBackwardScratch make_conv_backward_scratch(const ConvShape& s, CausalConvBackwardParams& p,
                                                      const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& grad_pre,
                                                      const std::optional<at::Tensor>& grad_x,
                                                      const std::optional<at::Tensor>& grad_weight, Pack pack) {
  ConvBackwardScratch scratch;
  if (grad_weight) {  // (not p.grad_weight: an empty tensor's data pointer may be null)
    scratch.partials = new_grad_weight_partials(p, x);
    p.grad_weight_partials = scratch.partials.data_ptr();
  }
  if (grad_x) {
    scratch.packed_transposed = pack(weight);
    scratch.input_grad = make_input_grad_params(s, grad_pre, scratch.packed_transposed, *grad_x);
  }
  return scratch;
}

inline CausalConvStepParams make_causal_conv_step_params(const ConvShape& s, const at::Tensor& x,
                                                         const at::Tensor& packed_weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& context_table,
                                                         const std::optional<at::Tensor>& residual,
                                                         const at::Tensor& history, const at::Tensor& position,
                                                         const at::Tensor& out) {
  const int64_t history_length = (s.kernel_size - 1) * s.dilation;
  check_shape(history, {s.batch, history_length, s.in_channels}, "history");
  TORCH_CHECK(history.is_contiguous(), "history must be contiguous");
  check_same_device_dtype(x, history, "x", "history");
  check_shape(position, {s.batch}, "position");
  TORCH_CHECK(position.scalar_type() == at::kLong && position.is_contiguous(),
              "position must be a contiguous int64 tensor, got a ", position.scalar_type(), " tensor with strides ",
              position.strides());
  TORCH_CHECK(position.device() == x.device(), "position must be on the device of x (", x.device(), "), got ",
              position.device());
  check_output(out, x, {s.batch, s.out_channels}, "out");
  CausalConvStepParams p{};
  set_shape_fields(p, s);
  p.x_row_stride = x.stride(0);
  p.x = x.data_ptr();
  p.packed_weight = packed_weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.context_table = context_table ? context_table->data_ptr() : nullptr;
  if (residual) {
    check_rows_unit_stride(*residual, "residual");
    check_shape(*residual, {s.batch, s.out_channels}, "residual");
    check_same_device_dtype(x, *residual, "x", "residual");
    p.residual_row_stride = residual->stride(0);
    p.residual = residual->data_ptr();
  }
  p.history = history.data_ptr();
  p.position = position.data_ptr();
  p.out = out.data_ptr();
  return p;
}

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// Whether the cpu backend's dense causal convolutions big enough for BLAS go through it (cpu/causal_conv.cpp):
// kConvBlasAuto decides by the CPU (conv_blas_auto_choice), kConvBlasAlways and kConvBlasNever force a route. One
// setting for the process; either route gives the same results to rounding, and each is deterministic.
constexpr int64_t kConvBlasAuto = 0, kConvBlasAlways = 1, kConvBlasNever = 2;
void set_conv_blas_mode(int64_t mode);
int64_t conv_blas_mode();
bool conv_blas_auto_choice();

// The CPU stack step on filled params (cpu/causal_conv.cpp): what tcn_step_out runs after its checks, for the
// prepared step of the Python module (csrc/python/tcn_step_plan.cpp), which checks once and reuses the params.
void tcn_step_cpu(const TcnStepParams& p, at::ScalarType dtype);

// Validates the stack step's arguments (one entry per layer in every list) and fills its params.
inline TcnStepParams make_tcn_step_params(const at::Tensor& x, at::TensorList packed_weights,
                                          const OptionalTensorList& biases, const OptionalTensorList& proj_weights,
                                          const OptionalTensorList& proj_biases,
                                          const std::optional<at::Tensor>& context_table,
                                          const std::optional<at::Tensor>& context_residual, at::IntArrayRef dilations,
                                          int64_t activation, at::TensorList histories, at::TensorList positions,
                                          const at::Tensor& out) {
  const int64_t layers = static_cast<int64_t>(packed_weights.size());
  TORCH_CHECK(layers >= 1 && layers <= kMaxStackLayers, "a TCN stack step takes 1 to ", kMaxStackLayers,
              " layers, got ", layers);
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == layers && static_cast<int64_t>(proj_weights.size()) == layers &&
                  static_cast<int64_t>(proj_biases.size()) == layers &&
                  static_cast<int64_t>(dilations.size()) == layers &&
                  static_cast<int64_t>(histories.size()) == layers && static_cast<int64_t>(positions.size()) == layers,
              "packed_weights, biases, proj_weights, proj_biases, dilations, histories and positions need one entry "
              "per layer (", layers, ")");
  TORCH_CHECK(x.dim() == 2, "x must be (batch, in_channels), got shape ", x.sizes());
  TORCH_CHECK(has_unit_stride(x, 1), "x must have unit stride along channels, got strides ", x.strides());
  TORCH_CHECK(activation >= kActNone && activation <= kActTanh, "activation code must be 0..3, got ", activation);
  TcnStepParams p{};
  p.batch = x.size(0);
  p.layers = layers;
  p.activation = activation;
  p.x_row_stride = x.stride(0);
  p.x = x.data_ptr();
  int64_t channels = x.size(1);
  p.max_channels = channels;
  for (int64_t l = 0; l < layers; ++l) {
    // "name[l]" with this layer's index, for the messages.
    const auto named = [l](const char* name, const char* more = "") {
      return std::string(name) + "[" + std::to_string(l) + "]" + more;
    };
    const at::Tensor& w = packed_weights[l];
    // (k, in, out), or column-blocked (out / block, k, in, block).
    const bool blocked = w.dim() == 4;
    const int64_t tap_dim = blocked ? 1 : 0;
    TORCH_CHECK((w.dim() == 3 || blocked) && w.size(tap_dim) >= 1 && w.size(tap_dim + 1) == channels &&
                    w.size(tap_dim + 2) >= 1 && w.is_contiguous(),
                "packed_weights[", l, "] must be a contiguous (k >= 1, ", channels, ", out_channels) tensor or a "
                "column-blocked (out_channels / block, k >= 1, ", channels, ", block >= 1) one, got shape ",
                w.sizes());
    check_same_device_dtype(x, w, "x", named("packed_weights").c_str());
    TcnStepLayer& layer = p.layer[l];
    layer.in_channels = channels;
    layer.weight_block = w.size(tap_dim + 2);
    layer.out_channels = blocked ? w.size(0) * layer.weight_block : layer.weight_block;
    layer.kernel_size = w.size(tap_dim);
    layer.dilation = dilations[l];
    TORCH_CHECK(layer.dilation >= 1, "dilations[", l, "] must be >= 1, got ", layer.dilation);
    check_reach(layer.kernel_size, layer.dilation, "a TCN stack layer");
    layer.packed_weight = w.data_ptr();
    const std::optional<at::Tensor> bias = biases[l];
    if (bias) {
      check_shape(*bias, {layer.out_channels}, named("biases").c_str());
      TORCH_CHECK(bias->is_contiguous(), "biases[", l, "] must be contiguous");
      check_same_device_dtype(x, *bias, "x", named("biases").c_str());
      layer.bias = bias->data_ptr();
    }
    const std::optional<at::Tensor> proj = proj_weights[l];
    const std::optional<at::Tensor> proj_bias = proj_biases[l];
    TORCH_CHECK(proj.has_value() || layer.out_channels == channels, "layer ", l, " maps ", channels, " to ",
                layer.out_channels, " channels, so its residual needs proj_weights[", l, "]");
    TORCH_CHECK(proj.has_value() || !proj_bias.has_value(), "proj_biases[", l, "] is given without proj_weights[", l,
                "]");
    if (proj) {
      if (blocked)
        check_shape(*proj, {w.size(0), channels, layer.weight_block},
                    named("proj_weights", " (column-blocked like the packed weights: out_channels / block, in_channels, "
                                          "block)").c_str());
      else
        check_shape(*proj, {channels, layer.out_channels}, named("proj_weights", " (in_channels, out_channels)").c_str());
      TORCH_CHECK(proj->is_contiguous(), "proj_weights[", l, "] must be contiguous");
      check_same_device_dtype(x, *proj, "x", named("proj_weights").c_str());
      layer.proj_weight = proj->data_ptr();
    }
    if (proj_bias) {
      check_shape(*proj_bias, {layer.out_channels}, named("proj_biases").c_str());
      TORCH_CHECK(proj_bias->is_contiguous(), "proj_biases[", l, "] must be contiguous");
      check_same_device_dtype(x, *proj_bias, "x", named("proj_biases").c_str());
      layer.proj_bias = proj_bias->data_ptr();
    }
    const at::Tensor& history = histories[l];
    check_shape(history, {p.batch, (layer.kernel_size - 1) * layer.dilation, channels}, named("histories").c_str());
    TORCH_CHECK(history.is_contiguous(), "histories[", l, "] must be contiguous");
    check_same_device_dtype(x, history, "x", named("histories").c_str());
    layer.history = history.data_ptr();
    const at::Tensor& position = positions[l];
    check_shape(position, {p.batch}, named("positions").c_str());
    TORCH_CHECK(position.scalar_type() == at::kLong && position.is_contiguous() && position.device() == x.device(),
                "positions[", l, "] must be a contiguous int64 tensor on the device of x");
    layer.position = position.data_ptr();
    channels = layer.out_channels;
    p.max_channels = std::max(p.max_channels, channels);
  }
  if (context_table) {
    check_shape(*context_table, {p.batch, p.layer[0].kernel_size, p.layer[0].out_channels}, "context_table");
    TORCH_CHECK(context_table->is_contiguous(), "context_table must be contiguous");
    check_same_device_dtype(x, *context_table, "x", "context_table");
    p.context_table = context_table->data_ptr();
  }
  if (context_residual) {
    check_shape(*context_residual, {p.batch, p.layer[0].out_channels}, "context_residual");
    TORCH_CHECK(context_residual->is_contiguous(), "context_residual must be contiguous");
    check_same_device_dtype(x, *context_residual, "x", "context_residual");
    p.context_residual = context_residual->data_ptr();
  }
  check_output(out, x, {p.batch, channels}, "out");
  p.out = out.data_ptr();
  return p;
}

}  // namespace hiertcn
