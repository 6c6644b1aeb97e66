// Argument checks shared by the op entry points (host only; kernels never see at::Tensor).
#pragma once

#include <ATen/ATen.h>

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

}  // namespace hiertcn
