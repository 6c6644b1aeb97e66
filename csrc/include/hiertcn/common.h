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

// A step state's position after one more event. 2^63 - 1 goes to -2^63, as the reference's int64 addition does,
// without a signed overflow (undefined behaviour: a build without -fwrapv, such as the CMake one, need not wrap);
// the CPU step then refuses the negative position.
HIERTCN_HD int64_t next_position(int64_t position) {
  return static_cast<int64_t>(static_cast<uint64_t>(position) + 1u);
}

}  // namespace hiertcn
