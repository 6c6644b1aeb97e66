// CPU kernels for the session mean (hiertcn/gru_session.h): parallel over batch rows; each row sums
// its session's items time step by time step into a row accumulator, so the inner loop runs over
// contiguous embedding elements and vectorises.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
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
    std::vector<double> total(p.dim);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      const int64_t length = session_length(p.lengths, b, p.time);
      for (int64_t start = 0; start < length; start += kSessionMeanBlock) {
        std::fill(sum.begin(), sum.end(), A(0));
        const int64_t stop = std::min(length, start + kSessionMeanBlock);
        for (int64_t t = start; t < stop; ++t) {
          const T* item = items + b * p.items_batch_stride + t * p.items_time_stride;
          for (int64_t d = 0; d < p.dim; ++d) sum[d] += static_cast<A>(item[d]);
        }
        for (int64_t d = 0; d < p.dim; ++d) total[d] += static_cast<double>(sum[d]);
      }
      const A scale = session_mean_scale<A>(length);
      T* mean_row = mean + b * p.mean_row_stride;
      for (int64_t d = 0; d < p.dim; ++d) mean_row[d] = static_cast<T>(static_cast<A>(total[d]) * scale);
    }
  });
}

template <typename T>
void session_mean_backward_cpu_kernel(const SessionMeanBackwardParams& p) {
  using A = acc_t<T>;
  const T* grad_mean = static_cast<const T*>(p.grad_mean);
  T* grad_items = static_cast<T*>(p.grad_items);
  // Each row's gradient is computed once, then copied to its session's steps; the padding steps are zeroed in one
  // stretch (a row's steps are contiguous). The pass is a write of batch x time x dim values: memory-bound.
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t length = session_length(p.lengths, b, p.time);
      const A scale = session_mean_scale<A>(length);
      const T* g = grad_mean + b * p.grad_mean_row_stride;
      T* rows = grad_items + b * p.time * p.dim;
      if (length > 0) {
        for (int64_t d = 0; d < p.dim; ++d) rows[d] = static_cast<T>(static_cast<A>(g[d]) * scale);
        for (int64_t t = 1; t < length; ++t) std::memcpy(rows + t * p.dim, rows, p.dim * sizeof(T));
      }
      std::memset(static_cast<void*>(rows + length * p.dim), 0, (p.time - length) * p.dim * sizeof(T));
    }
  });
}

// Serial: (layers, batch, hidden) is a few thousand elements at HierTCN's sizes, less than a fork costs.
template <typename T>
void session_keep_cpu_kernel(const SessionKeepParams& p) {
  const T* states = static_cast<const T*>(p.states);
  const T* h = static_cast<const T*>(p.h);
  const T* keep = static_cast<const T*>(p.keep);
  T* out = static_cast<T*>(p.out);
  for (int64_t l = 0; l < p.layers; ++l) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t row = (l * p.batch + b) * p.hidden;
      const T* from = (p.lengths[b] > 0 ? states : h) + row;
      const T scale = keep[b];
      for (int64_t j = 0; j < p.hidden; ++j) out[row + j] = scale * from[j];
    }
  }
}

template <typename T>
void session_keep_backward_cpu_kernel(const SessionKeepParams& p) {
  const T* grad_out = static_cast<const T*>(p.states);
  const T* keep = static_cast<const T*>(p.keep);
  T* grad_states = static_cast<T*>(p.out);
  T* grad_h = static_cast<T*>(p.grad_h);
  for (int64_t l = 0; l < p.layers; ++l) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t row = (l * p.batch + b) * p.hidden;
      const bool active = p.lengths[b] > 0;
      const T scale = keep[b];
      T* to = (active ? grad_states : grad_h) + row;
      T* zeroed = (active ? grad_h : grad_states) + row;
      for (int64_t j = 0; j < p.hidden; ++j) {
        to[j] = scale * grad_out[row + j];
        zeroed[j] = T(0);
      }
    }
  }
}

}  // namespace

void launch_session_keep_cpu(const SessionKeepParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_keep_cpu", [&] { session_keep_cpu_kernel<scalar_t>(p); });
}

void launch_session_keep_backward_cpu(const SessionKeepParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_keep_backward_cpu",
                             [&] { session_keep_backward_cpu_kernel<scalar_t>(p); });
}

void launch_session_mean_cpu(const SessionMeanParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_mean_cpu", [&] { session_mean_cpu_kernel<scalar_t>(p); });
}

void launch_session_mean_backward_cpu(const SessionMeanBackwardParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "session_mean_backward_cpu",
                             [&] { session_mean_backward_cpu_kernel<scalar_t>(p); });
}

}  // namespace hiertcn
