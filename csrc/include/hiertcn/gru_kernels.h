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

// CPU only, for the single-step fast paths of cpu/gru_recurrence.cpp: the gates of gi + b_ih and gh + b_hh,
// the biases added row by row on the way in (while the rows are in cache, instead of addmm's broadcast copy
// of them into the output before the product), and the saved gates written for the backward.
struct GruGatesBiasParams {
  // The gates' params: gi and gh hold x W_ih^T and h W_hh^T (left as they are); gates.saved is required.
  GruGatesParams gates;
  const void* b_ih;  // (3 * hidden,)
  const void* b_hh;
};
void launch_gru_gates_bias_cpu(const GruGatesBiasParams& p, at::ScalarType dtype);

// CPU only: session_update's last step over (layers, batch, hidden), contiguous, and its backward:
//   out = keep * (lengths > 0 ? states : h)
//   grad_states = keep * (lengths > 0 ? grad_out : 0),  grad_h = keep * (lengths > 0 ? 0 : grad_out)
// One pass instead of ATen's comparison, where and multiply, each with its own temporary.
struct SessionKeepParams {
  int64_t layers;
  int64_t batch;
  int64_t hidden;
  const int64_t* lengths;  // (batch,)
  const void* keep;        // (batch,)
  const void* states;      // forward: the GRU's new states; backward: grad_out
  const void* h;           // forward: the old states; backward: unused
  void* out;               // forward: out; backward: grad_states
  void* grad_h;            // backward only
};
void launch_session_keep_cpu(const SessionKeepParams& p, at::ScalarType dtype);
void launch_session_keep_backward_cpu(const SessionKeepParams& p, at::ScalarType dtype);

// Blocks of `threads` threads covering n elements, one element per thread.
inline unsigned blocks_for(int64_t n, int64_t threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= int64_t{0x7fffffff}, "a GRU kernel over ", n, " elements needs ", blocks,
              " CUDA blocks, more than a grid holds (2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

// The kernels for tensors on `device`.
const GruKernels& gru_kernels_for(const at::Device& device);

}  // namespace hiertcn
