// CUDA kernels for the fused GRU gate math: one thread per (row, hidden unit), the same per-element
// math as the CPU kernels (hiertcn/gru_gates.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hiertcn/gru_gates_host.h"
#include "hiertcn/gru_kernels.h"

namespace hiertcn {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void gru_gates_cuda_kernel(GruGatesParams p) {
  const int64_t H = p.hidden;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * H) return;
  const int64_t b = idx / H, j = idx % H;
  T* out = static_cast<T*>(p.out) + b * p.out_row_stride;
  const T* gi = static_cast<const T*>(p.gi) + b * p.gi_row_stride;
  const T* gh = static_cast<const T*>(p.gh) + b * p.gh_row_stride;
  const T* h = static_cast<const T*>(p.h) + b * p.h_row_stride;
  if (p.saved != nullptr) {
    out[j] = gru_gate_forward_save_row<T, acc_t<T>>(gi, gh, h, static_cast<T*>(p.saved) + b * p.saved_row_stride, j,
                                                    H);
  } else {
    out[j] = gru_gate_forward_row<T, acc_t<T>>(gi, gh, h, j, H);
  }
}

template <typename T>
__global__ void gru_gates_backward_cuda_kernel(GruGatesBackwardParams p) {
  const int64_t H = p.hidden;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * H) return;
  const int64_t b = idx / H, j = idx % H;
  if (p.saved != nullptr) {
    gru_gate_backward_saved_row<T, acc_t<T>>(
        static_cast<const T*>(p.grad_out) + b * p.grad_out_row_stride,
        static_cast<const T*>(p.saved) + b * p.saved_row_stride, static_cast<const T*>(p.h) + b * p.h_row_stride,
        static_cast<T*>(p.grad_gi) + b * p.grad_gi_row_stride, static_cast<T*>(p.grad_gh) + b * p.grad_gh_row_stride,
        static_cast<T*>(p.grad_h) + b * p.grad_h_row_stride, j, H);
    return;
  }
  gru_gate_backward_row<T, acc_t<T>>(
      static_cast<const T*>(p.grad_out) + b * p.grad_out_row_stride, static_cast<const T*>(p.gi) + b * p.gi_row_stride,
      static_cast<const T*>(p.gh) + b * p.gh_row_stride, static_cast<const T*>(p.h) + b * p.h_row_stride,
      static_cast<T*>(p.grad_gi) + b * p.grad_gi_row_stride, static_cast<T*>(p.grad_gh) + b * p.grad_gh_row_stride,
      static_cast<T*>(p.grad_h) + b * p.grad_h_row_stride, j, H);
}

void gru_gates_out_cuda(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(h.device());
  launch_gru_gates_cuda(make_gru_gates_params(gi, gh, h, out), h.scalar_type());
}

void gru_gates_backward_out_cuda(const at::Tensor& grad_out, const at::Tensor& gi, const at::Tensor& gh,
                                 const at::Tensor& h, at::Tensor& grad_gi, at::Tensor& grad_gh, at::Tensor& grad_h) {
  const c10::cuda::CUDAGuard guard(h.device());
  launch_gru_gates_backward_cuda(make_gru_gates_backward_params(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h),
                                 h.scalar_type());
}

}  // namespace

// The launchers run on the current device and stream: the callers (the op entry points above and
// the recurrence drivers, whose tensors ATen already placed) set the device.
void launch_gru_gates_cuda(const GruGatesParams& p, at::ScalarType dtype) {
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gru_gates_cuda", [&] {
    gru_gates_cuda_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_gru_gates_backward_cuda(const GruGatesBackwardParams& p, at::ScalarType dtype) {
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gru_gates_backward_cuda", [&] {
    gru_gates_backward_cuda_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CUDA, m) {
  m.impl("gru_gates_out", &gru_gates_out_cuda);
  m.impl("gru_gates_backward_out", &gru_gates_backward_out_cuda);
}

}  // namespace hiertcn
