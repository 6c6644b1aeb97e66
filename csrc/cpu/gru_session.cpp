// CPU kernels for the session mean (hiertcn/gru_session.h): parallel over batch rows; each row sums
// its session's items time step by time step into a row accumulator, so the inner loop runs over
// contiguous embedding elements and vectorises.
#include <ATen/Parallel.h>

#include <vector>

#include "hiertcn/gru_kernels.h"

namespace hiertcn {
namespace {

template <typename T>
void session_mean_cpu_kernel(const SessionMeanParams& p) {
  using A = acc_t<T>;
  const T* items = static_cast<const T*>(p.items);
  T* mean = static_cast<T*>(p.mean);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> sum(p.dim);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sum.begin(), sum.end(), A(0));
      const int64_t length = session_length(p.lengths, b, p.time);
      for (int64_t t = 0; t < length; ++t) {
        const T* item = items + b * p.items_batch_stride + t * p.items_time_stride;
        for (int64_t d = 0; d < p.dim; ++d) sum[d] += static_cast<A>(item[d]);
      }
      const A scale = session_mean_scale<A>(length);
      T* mean_row = mean + b * p.mean_row_stride;
      for (int64_t d = 0; d < p.dim; ++d) mean_row[d] = static_cast<T>(sum[d] * scale);
    }
  });
}

template <typename T>
void session_mean_backward_cpu_kernel(const SessionMeanBackwardParams& p) {
  using A = acc_t<T>;
  const T* grad_mean = static_cast<const T*>(p.grad_mean);
  T* grad_items = static_cast<T*>(p.grad_items);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t length = session_length(p.lengths, b, p.time);
      const A scale = session_mean_scale<A>(length);
      const T* g = grad_mean + b * p.grad_mean_row_stride;
      for (int64_t t = 0; t < p.time; ++t) {
        T* row = grad_items + (b * p.time + t) * p.dim;
        for (int64_t d = 0; d < p.dim; ++d) row[d] = t < length ? static_cast<T>(static_cast<A>(g[d]) * scale) : T(0);
      }
    }
  });
}

}  // namespace

void launch_session_mean_cpu(const SessionMeanParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_mean_cpu", [&] { session_mean_cpu_kernel<scalar_t>(p); });
}

void launch_session_mean_backward_cpu(const SessionMeanBackwardParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_mean_backward_cpu",
                             [&] { session_mean_backward_cpu_kernel<scalar_t>(p); });
}

}  // namespace hiertcn
