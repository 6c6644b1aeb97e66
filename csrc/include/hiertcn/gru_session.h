// Masked mean over each row's session, HierTCN's AGG(session): shared by the CPU and CUDA kernels.
//
//   mean[b, d] = sum_{t < lengths[b]} items[b, t, d] / max(lengths[b], 1)
//
// The sum runs in blocks of kSessionMeanBlock steps: each block's sum in the accumulation type (float for
// the half types and float), the blocks' sums added in double, then rounded to the accumulation type. A
// sequential float sum over a long session lost digits (relative error about 2e-5 at a million steps, against
// 3e-7 for torch.sum); sessions up to one block long (HierTCN's, at most 21 steps) are summed as before.
//
// A row of length 0 has mean 0 (its GRU step is discarded by session_update anyway), so no NaN can
// reach the weights' gradients through it.
#pragma once

#include "hiertcn/common.h"

namespace hiertcn {

struct SessionMeanParams {
  int64_t batch;
  int64_t time;
  int64_t dim;
  // items (batch, time, dim): element strides of the batch and time dimensions; dim has unit stride.
  int64_t items_batch_stride;
  int64_t items_time_stride;
  int64_t mean_row_stride;
  const int64_t* lengths;  // (batch,), each in [0, time]
  const void* items;
  void* mean;
};

struct SessionMeanBackwardParams {
  int64_t batch;
  int64_t time;
  int64_t dim;
  int64_t grad_mean_row_stride;
  const int64_t* lengths;
  const void* grad_mean;  // (batch, dim)
  void* grad_items;       // (batch, time, dim), contiguous
};

// A row's session length clamped to [0, time]: the CPU entry point rejects lengths outside that range,
// the CUDA one cannot without a device synchronisation, so the kernels never read past a row.
HIERTCN_HD int64_t session_length(const int64_t* lengths, int64_t b, int64_t time) {
  const int64_t length = lengths[b];
  return length < 0 ? 0 : (length > time ? time : length);
}

constexpr int64_t kSessionMeanBlock = 64;

// 1 / max(length, 1): the mean's scale, and the gradient's per item.
template <typename A>
HIERTCN_HD A session_mean_scale(int64_t length) {
  return A(1) / A(length > 1 ? length : 1);
}

}  // namespace hiertcn
