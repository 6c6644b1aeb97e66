// Shared by the CPU and CUDA kernels: host/device qualifiers and the accumulation type.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HIERTCN_HD __host__ __device__ __forceinline__
#else
#define HIERTCN_HD inline
#endif

namespace hiertcn {

// Half types accumulate in float; float and double accumulate in themselves.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace hiertcn
