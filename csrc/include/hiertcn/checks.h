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

// Kernels index rows with an element stride and assume unit stride along the last dimension.
inline void check_rows_unit_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
              " must have unit stride along its last dimension, got strides ", t.strides());
}

}  // namespace hiertcn
