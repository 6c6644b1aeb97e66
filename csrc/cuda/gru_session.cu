// CUDA kernels for the session mean (hiertcn/gru_session.h): one thread per (row, embedding element)
// summing over the row's session in blocks, the same order of additions as the CPU kernel.
#include <ATen/cuda/CUDAContext.h>

#include "hiertcn/gru_kernels.h"

namespace hiertcn {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void session_mean_cuda_kernel(SessionMeanParams p) {
  using A = acc_t<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int64_t b = idx / p.dim, d = idx % p.dim;
  const int64_t length = session_length(p.lengths, b, p.time);
  const T* items = static_cast<const T*>(p.items) + b * p.items_batch_stride + d;
  double total = 0.0;
  for (int64_t start = 0; start < length; start += kSessionMeanBlock) {
    const int64_t stop = length < start + kSessionMeanBlock ? length : start + kSessionMeanBlock;
    A sum = A(0);
    for (int64_t t = start; t < stop; ++t) sum += static_cast<A>(items[t * p.items_time_stride]);
    total += static_cast<double>(sum);
  }
  static_cast<T*>(p.mean)[b * p.mean_row_stride + d] =
      static_cast<T>(static_cast<A>(total) * session_mean_scale<A>(length));
}

template <typename T>
__global__ void session_mean_backward_cuda_kernel(SessionMeanBackwardParams p) {
  using A = acc_t<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.time * p.dim) return;
  const int64_t d = idx % p.dim, t = (idx / p.dim) % p.time, b = idx / (p.dim * p.time);
  const int64_t length = session_length(p.lengths, b, p.time);
  const A g = static_cast<A>(static_cast<const T*>(p.grad_mean)[b * p.grad_mean_row_stride + d]);
  static_cast<T*>(p.grad_items)[idx] = t < length ? static_cast<T>(g * session_mean_scale<A>(length)) : T(0);
}

}  // namespace

void launch_session_mean_cuda(const SessionMeanParams& p, at::ScalarType dtype) {
  const int64_t n = p.batch * p.dim;
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "session_mean_cuda", [&] {
    session_mean_cuda_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_session_mean_backward_cuda(const SessionMeanBackwardParams& p, at::ScalarType dtype) {
  const int64_t n = p.batch * p.time * p.dim;
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "session_mean_backward_cuda", [&] {
    session_mean_backward_cuda_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hiertcn
