// Argument checks shared by the op entry points (host only; kernels never see at::Tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <optional>

namespace hiertcn {

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t, const char* ref_name,
                                    const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// Whether the kernels can read t with unit stride along dim (what they assume of a row). A dimension of one
// element has no stride to speak of, and an empty tensor has no element to read: its strides are whatever made
// it (autograd's gradient of a sum over a batch of 0 is an expanded zero with all strides 0, and .contiguous()
// hands an empty tensor back unchanged, as it counts as contiguous), so it passes whatever they are. (Asked
// last and as a SymInt: the ops also run on fake tensors with symbolic sizes, traced, where numel() throws.)
inline bool has_unit_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) <= 1 || t.stride(dim) == 1 || t.sym_numel() == 0;
}

// Kernels index rows with an element stride and assume unit stride along the last dimension.
inline void check_rows_unit_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(has_unit_stride(t, 1), name,
              " must have unit stride along its last dimension, got strides ", t.strides());
}

// Whether a call with these inputs (tensors, or optional ones) records an autograd node: grad mode on and one of
// them requiring grad. Without one, the ops' C++ autograd kernels run their forward alone: a node without edges
// cannot answer needs_input_grad, and would keep tensors for a backward that never comes.
inline bool requires_grad_of(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad_of(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad_of(*t); }
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad_of(tensors) || ...);
}

// Under create_graph=True the kernels' gradients would have no graph, so higher derivatives through them would
// silently lack these terms: refused (the reference backend builds the graph).
inline void refuse_graph_of_gradient(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": its backward is once differentiable (the gradients come from fused kernels), so create_graph=True "
              "would give higher derivatives without these terms; use backend='reference' where you need a graph "
              "of the gradient");
}

// A batched gradient (torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True),
// gradcheck(check_batched_grad=True)) would reach the kernels' out ops, which have no batching rule: refused in
// words that name the way out, not in the dispatcher's (which name an internal op).
inline void refuse_batched_gradient(const char* op, const at::Tensor& grad) {
  TORCH_CHECK(!grad.defined() || !grad.key_set().has(c10::DispatchKey::Batched), op,
              ": its backward runs fused kernels, which take no batched gradient (is_grads_batched=True, "
              "jacobian(vectorize=True), gradcheck(check_batched_grad=True)); use backend='reference' there, or "
              "unbatched gradients");
}

}  // namespace hiertcn
