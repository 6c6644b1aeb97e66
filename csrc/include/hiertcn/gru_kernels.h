// The GRU family's device kernels behind one table, so that the recurrence drivers
// (cpu/gru_recurrence.cpp) are written once for both devices: they do the matrix products with
// ATen (MKL/oneDNN on the CPU, cuBLAS on the GPU) and call the fused kernels through this table.
#pragma once

#include <ATen/ATen.h>

#include "hiertcn/gru_gates.h"
#include "hiertcn/gru_session.h"

namespace hiertcn {

struct GruKernels {
  void (*gates)(const GruGatesParams&, at::ScalarType);
  void (*gates_backward)(const GruGatesBackwardParams&, at::ScalarType);
  void (*session_mean)(const SessionMeanParams&, at::ScalarType);
  void (*session_mean_backward)(const SessionMeanBackwardParams&, at::ScalarType);
};

// The launchers, defined next to their kernels (cpu/gru_gates.cpp, cpu/gru_session.cpp, cuda/ likewise).
// The CUDA ones launch on the current stream of the device that holds the data.
void launch_gru_gates_cpu(const GruGatesParams& p, at::ScalarType dtype);
void launch_gru_gates_backward_cpu(const GruGatesBackwardParams& p, at::ScalarType dtype);
void launch_session_mean_cpu(const SessionMeanParams& p, at::ScalarType dtype);
void launch_session_mean_backward_cpu(const SessionMeanBackwardParams& p, at::ScalarType dtype);
#ifdef HIERTCN_WITH_CUDA
void launch_gru_gates_cuda(const GruGatesParams& p, at::ScalarType dtype);
void launch_gru_gates_backward_cuda(const GruGatesBackwardParams& p, at::ScalarType dtype);
void launch_session_mean_cuda(const SessionMeanParams& p, at::ScalarType dtype);
void launch_session_mean_backward_cuda(const SessionMeanBackwardParams& p, at::ScalarType dtype);
#endif

// Blocks of `threads` threads covering n elements, one element per thread.
inline int64_t blocks_for(int64_t n, int64_t threads) { return (n + threads - 1) / threads; }

// The kernels for tensors on `device`.
const GruKernels& gru_kernels_for(const at::Device& device);

}  // namespace hiertcn
