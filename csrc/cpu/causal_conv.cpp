// CPU kernels for the dilated causal convolution (hiertcn/causal_conv.h): parallel over
// (batch, time tile) tasks, accumulating a tile in a local buffer before the fused epilogue.
// Dense convolutions (groups == 1) run register-blocked micro-kernels (kRowBlock rows x one vector
// block of output channels held in registers across every tap and input channel), compiled for
// several instruction sets and picked for the running CPU at load time (target_clones). Grouped
// and depthwise ones apply each packed weight row to every row of the tile, vectorised over channels.
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "hiertcn/causal_conv_host.h"
#include "hiertcn/cpu_blas.h"

// The 64-byte vector types below pass between inlined helpers only; no ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace hiertcn {
namespace {

constexpr int64_t kTimeTile = 8;
// Rows per weight-gradient chunk: few chunks (each adds a whole partial weight gradient at the end),
// still several per thread.
constexpr int64_t kWeightGradRowsPerChunk = 512;
constexpr int kRowBlock = 4;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HIERTCN_CPU_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define HIERTCN_CPU_CLONES
#endif
#define HIERTCN_ALWAYS_INLINE inline __attribute__((always_inline))

// The dense micro-kernels' versions (GCC's function multiversioning, picked at load time): AVX-512 with 64-byte
// register blocks, AVX2 with FMA and 32-byte ones, the baseline. target_clones cannot make the AVX2 one: it makes a
// clone per comma-separated name, and its "fma" clone (AVX without AVX2) was the one such a CPU ran. impl is
// called as impl<VB> args.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HIERTCN_DENSE_VERSIONS(name, params, impl, args)     \
  __attribute__((target("avx512f"))) void name params {     \
    impl<64> args;                                           \
  }                                                          \
  __attribute__((target("avx2,fma"))) void name params {    \
    impl<32> args;                                           \
  }                                                          \
  __attribute__((target("default"))) void name params {     \
    impl<64> args;                                           \
  }
#else
#define HIERTCN_DENSE_VERSIONS(name, params, impl, args) \
  void name params {                                     \
    impl<64> args;                                       \
  }
#endif

// Output channels per register block: VB bytes, one vector register of the instruction set the dense kernels
// are compiled for (dense_tile_f32 and the others below): 64 for AVX-512 (and the baseline), 32 for AVX2.
// Accumulators are GCC vector-extension values, which the compiler keeps in registers (plain arrays it spills).
// 64-byte vectors on a CPU with AVX2 but no AVX-512 (AMD's Zen, many Intel client parts) went through the stack:
// a step of 3 dense layers at batch 1 took 168 us there, against about 12 us on an AVX-512 machine.
template <int VB, typename T>
constexpr int kOutBlock = VB / sizeof(T);
// Register blocks sized to the instruction set's 16 (AVX2) or 32 (AVX-512) vector registers. An AVX2 core has two
// FMA pipes of 4 cycles' latency, so it needs about 8 independent accumulators, and 16 registers hold at most
// 12 of them beside the loaded weight vectors and the broadcast input.
// - kBlockVectors: vectors of output channels per row of the forward tile's kRowBlock-row blocks and per input
//   channel of the weight gradient's blocks: 3 on AVX2, 2 on AVX-512 (whose vectors are twice as wide).
// - kChannelBlock: input channels per weight-gradient block: 4 x 3 accumulators on AVX2, 8 x 2 on AVX-512. On
//   AVX2, 8 x 2 (16 accumulators) went through the stack.
template <int VB>
constexpr int kBlockVectors = VB == 32 ? 3 : 2;
template <int VB>
constexpr int kChannelBlock = VB == 32 ? 4 : 8;

template <int VB, typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <int VB, typename T>
using Vec = typename VecOf<VB, T>::type;

template <int VB, typename T>
HIERTCN_ALWAYS_INLINE Vec<VB, T> load_vec(const T* p) {
  Vec<VB, T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int VB, typename T>
HIERTCN_ALWAYS_INLINE void store_vec(T* p, Vec<VB, T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// acc[r * ldacc + o0 : ... + NV * kOutBlock] += sum over taps j and input channels ci of rows[j][r][ci] times
// w[(j * C_in + ci) * ldw + o0 + o], r < R, with NV vectors of accumulators per row. rows has kTimeTile entries
// per tap; a tap whose rows are all out of range has tap_used[j] false. ldw is the weights' row stride: C_out
// for the (k, C_in, C_out) packing, the block width for a column block of the blocked one.
template <int VB, typename T, int R, int NV>
HIERTCN_ALWAYS_INLINE void dense_row_block(const T* const* rows, const bool* tap_used, const T* w_base, int64_t K,
                                           int64_t C_in, int64_t ldw, int64_t o0, T* acc, int64_t ldacc) {
  constexpr int B = kOutBlock<VB, T>;
  Vec<VB, T> sum[R][NV] = {};
  for (int64_t j = 0; j < K; ++j) {
    if (!tap_used[j]) continue;
    const T* const* tap_rows = rows + j * kTimeTile;
    const T* w = w_base + j * C_in * ldw + o0;
    for (int64_t ci = 0; ci < C_in; ++ci, w += ldw) {
      Vec<VB, T> wv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) wv[v] = load_vec<VB>(w + v * B);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const T xv = tap_rows[r][ci];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) sum[r][v] += xv * wv[v];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T* dst = acc + r * ldacc + o0 + v * B;
      store_vec<VB>(dst, load_vec<VB>(dst) + sum[r][v]);
    }
}

// The same for the last, narrower block of output channels [o0, width) (width - o0 < kOutBlock).
template <typename T, int R>
HIERTCN_ALWAYS_INLINE void dense_row_block_tail(const T* const* rows, const bool* tap_used, const T* w_base,
                                                int64_t K, int64_t C_in, int64_t ldw, int64_t o0, int64_t width,
                                                T* acc, int64_t ldacc) {
  for (int64_t j = 0; j < K; ++j) {
    if (!tap_used[j]) continue;
    const T* const* tap_rows = rows + j * kTimeTile;
    const T* w = w_base + j * C_in * ldw;
    for (int64_t ci = 0; ci < C_in; ++ci, w += ldw)
      for (int r = 0; r < R; ++r) {
        const T xv = tap_rows[r][ci];
        for (int64_t o = o0; o < width; ++o) acc[r * ldacc + o] += xv * w[o];
      }
  }
}

// Output channels [0, width) of R rows.
template <int VB, typename T, int R>
HIERTCN_ALWAYS_INLINE void dense_rows(const T* const* rows, const bool* tap_used, const T* w, int64_t K, int64_t C_in,
                                      int64_t ldw, int64_t width, T* acc, int64_t ldacc) {
  constexpr int B = kOutBlock<VB, T>;
  int64_t o0 = 0;
  // A single row has one multiply-add per weight load: four or eight vectors of accumulators (independent
  // chains) keep the FMA units busy and read each weight row as one contiguous run.
  if (R == 1) {
    for (; o0 + 8 * B <= width; o0 += 8 * B) dense_row_block<VB, T, R, 8>(rows, tap_used, w, K, C_in, ldw, o0, acc, ldacc);
    for (; o0 + 4 * B <= width; o0 += 4 * B) dense_row_block<VB, T, R, 4>(rows, tap_used, w, K, C_in, ldw, o0, acc, ldacc);
  }
  constexpr int NW = kBlockVectors<VB>;
  if constexpr (NW > 2)
    for (; o0 + NW * B <= width; o0 += NW * B)
      dense_row_block<VB, T, R, NW>(rows, tap_used, w, K, C_in, ldw, o0, acc, ldacc);
  for (; o0 + 2 * B <= width; o0 += 2 * B) dense_row_block<VB, T, R, 2>(rows, tap_used, w, K, C_in, ldw, o0, acc, ldacc);
  for (; o0 + B <= width; o0 += B) dense_row_block<VB, T, R, 1>(rows, tap_used, w, K, C_in, ldw, o0, acc, ldacc);
  if (o0 < width) dense_row_block_tail<T, R>(rows, tap_used, w, K, C_in, ldw, o0, width, acc, ldacc);
}

template <int VB, typename T>
HIERTCN_ALWAYS_INLINE void dense_tile_impl(const T* const* rows, const bool* tap_used, const T* w, int64_t K,
                                           int64_t C_in, int64_t ldw, int64_t width, int64_t valid_rows, T* acc,
                                           int64_t ldacc) {
  // Blocks of kRowBlock rows share every weight load; the last one or two valid rows of a tile (a small step
  // batch above all) go one at a time instead of as a block padded with zero rows. Either way a row's sum
  // runs over the same taps and channels in the same order, so the result does not depend on the blocking.
  int64_t r0 = 0;
  for (; valid_rows - r0 >= kRowBlock - 1; r0 += kRowBlock)
    dense_rows<VB, T, kRowBlock>(rows + r0, tap_used, w, K, C_in, ldw, width, acc + r0 * ldacc, ldacc);
  for (; r0 < valid_rows; ++r0) dense_rows<VB, T, 1>(rows + r0, tap_used, w, K, C_in, ldw, width, acc + r0 * ldacc, ldacc);
}

// One time tile of a dense convolution: acc[r * ldacc + o] += the tile's conv for output channels o < width,
// from the weights w[(j * C_in + ci) * ldw + o], for its first valid_rows rows (a block of kRowBlock may cover
// one row past them, whose source rows must then be readable).
HIERTCN_DENSE_VERSIONS(dense_tile_f32,
                       (const float* const* rows, const bool* tap_used, const float* w, int64_t K, int64_t C_in,
                        int64_t ldw, int64_t width, int64_t valid_rows, float* acc, int64_t ldacc),
                       dense_tile_impl, (rows, tap_used, w, K, C_in, ldw, width, valid_rows, acc, ldacc))
HIERTCN_DENSE_VERSIONS(dense_tile_f64,
                       (const double* const* rows, const bool* tap_used, const double* w, int64_t K, int64_t C_in,
                        int64_t ldw, int64_t width, int64_t valid_rows, double* acc, int64_t ldacc),
                       dense_tile_impl, (rows, tap_used, w, K, C_in, ldw, width, valid_rows, acc, ldacc))
void dense_tile(const float* const* rows, const bool* tap_used, const float* w, int64_t K, int64_t C_in, int64_t ldw,
                int64_t width, int64_t valid_rows, float* acc, int64_t ldacc) {
  dense_tile_f32(rows, tap_used, w, K, C_in, ldw, width, valid_rows, acc, ldacc);
}
void dense_tile(const double* const* rows, const bool* tap_used, const double* w, int64_t K, int64_t C_in, int64_t ldw,
                int64_t width, int64_t valid_rows, double* acc, int64_t ldacc) {
  dense_tile_f64(rows, tap_used, w, K, C_in, ldw, width, valid_rows, acc, ldacc);
}

// part[ci0 + c][o0 + o] += sum over rows [row_begin, row_end) of x[b, t - lag, ci0 + c] gz[row, o0 + o], for
// c < kChannelBlock<VB> and NV vectors of output channels, accumulated in vector registers.
template <int VB, typename T, int NV>
HIERTCN_ALWAYS_INLINE void dense_weight_grad_block(const T* x, int64_t x_batch_stride, int64_t x_time_stride,
                                                   const T* gz, int64_t C_out, int64_t time, int64_t row_begin,
                                                   int64_t row_end, int64_t lag, int64_t ci0, int64_t o0, T* part) {
  constexpr int B = kOutBlock<VB, T>;
  constexpr int CB = kChannelBlock<VB>;
  Vec<VB, T> sum[CB][NV] = {};
  int64_t b = row_begin / time, t = row_begin % time;
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (t >= lag) {
      const T* xr = x + b * x_batch_stride + (t - lag) * x_time_stride + ci0;
      const T* g = gz + row * C_out + o0;
      Vec<VB, T> gv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) gv[v] = load_vec<VB>(g + v * B);
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        const T xv = xr[c];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sum[c][v] += xv * gv[v];
      }
    }
    if (++t == time) t = 0, ++b;
  }
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      T* dst = part + (ci0 + c) * C_out + o0 + v * B;
      store_vec<VB>(dst, load_vec<VB>(dst) + sum[c][v]);
    }
}

// The same for a block narrower than kChannelBlock<VB> input or kOutBlock output channels.
template <typename T>
HIERTCN_ALWAYS_INLINE void dense_weight_grad_block_tail(const T* x, int64_t x_batch_stride, int64_t x_time_stride,
                                                        const T* gz, int64_t C_out, int64_t time, int64_t row_begin,
                                                        int64_t row_end, int64_t lag, int64_t ci0, int64_t c_count,
                                                        int64_t o0, int64_t width, T* part) {
  int64_t b = row_begin / time, t = row_begin % time;
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (t >= lag) {
      const T* xr = x + b * x_batch_stride + (t - lag) * x_time_stride + ci0;
      const T* g = gz + row * C_out + o0;
      for (int64_t c = 0; c < c_count; ++c)
        for (int64_t o = 0; o < width; ++o) part[(ci0 + c) * C_out + o0 + o] += xr[c] * g[o];
    }
    if (++t == time) t = 0, ++b;
  }
}

template <int VB, typename T>
HIERTCN_ALWAYS_INLINE void dense_weight_grad_impl(const T* x, int64_t x_batch_stride, int64_t x_time_stride,
                                                  const T* gz, int64_t C_in, int64_t C_out, int64_t K, int64_t dilation,
                                                  int64_t time, int64_t row_begin, int64_t row_end, T* part) {
  constexpr int B = kOutBlock<VB, T>;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t lag = (K - 1 - j) * dilation;
    T* part_tap = part + j * C_in * C_out;
    for (int64_t ci0 = 0; ci0 < C_in; ci0 += kChannelBlock<VB>) {
      const int64_t c_count = std::min<int64_t>(kChannelBlock<VB>, C_in - ci0);
      int64_t o0 = 0;
      if (c_count == kChannelBlock<VB>) {
        constexpr int NW = kBlockVectors<VB>;
        if constexpr (NW > 2)
          for (; o0 + NW * B <= C_out; o0 += NW * B)
            dense_weight_grad_block<VB, T, NW>(x, x_batch_stride, x_time_stride, gz, C_out, time, row_begin, row_end,
                                               lag, ci0, o0, part_tap);
        for (; o0 + 2 * B <= C_out; o0 += 2 * B)
          dense_weight_grad_block<VB, T, 2>(x, x_batch_stride, x_time_stride, gz, C_out, time, row_begin, row_end, lag,
                                        ci0, o0, part_tap);
        for (; o0 + B <= C_out; o0 += B)
          dense_weight_grad_block<VB, T, 1>(x, x_batch_stride, x_time_stride, gz, C_out, time, row_begin, row_end, lag,
                                        ci0, o0, part_tap);
      }
      if (o0 < C_out)
        dense_weight_grad_block_tail<T>(x, x_batch_stride, x_time_stride, gz, C_out, time, row_begin, row_end, lag,
                                        ci0, c_count, o0, C_out - o0, part_tap);
    }
  }
}

HIERTCN_DENSE_VERSIONS(dense_weight_grad_f32,
                       (const float* x, int64_t xb, int64_t xt, const float* gz, int64_t C_in, int64_t C_out,
                        int64_t K, int64_t dilation, int64_t time, int64_t row_begin, int64_t row_end, float* part),
                       dense_weight_grad_impl, (x, xb, xt, gz, C_in, C_out, K, dilation, time, row_begin, row_end, part))
HIERTCN_DENSE_VERSIONS(dense_weight_grad_f64,
                       (const double* x, int64_t xb, int64_t xt, const double* gz, int64_t C_in, int64_t C_out,
                        int64_t K, int64_t dilation, int64_t time, int64_t row_begin, int64_t row_end, double* part),
                       dense_weight_grad_impl, (x, xb, xt, gz, C_in, C_out, K, dilation, time, row_begin, row_end, part))
void dense_weight_grad(const float* x, int64_t xb, int64_t xt, const float* gz, int64_t C_in, int64_t C_out, int64_t K,
                       int64_t dilation, int64_t time, int64_t row_begin, int64_t row_end, float* part) {
  dense_weight_grad_f32(x, xb, xt, gz, C_in, C_out, K, dilation, time, row_begin, row_end, part);
}
void dense_weight_grad(const double* x, int64_t xb, int64_t xt, const double* gz, int64_t C_in, int64_t C_out,
                       int64_t K, int64_t dilation, int64_t time, int64_t row_begin, int64_t row_end, double* part) {
  dense_weight_grad_f64(x, xb, xt, gz, C_in, C_out, K, dilation, time, row_begin, row_end, part);
}

// acc[r][:] += in_rows[r] (one tap's input row per tile row) times packed tap matrix w_tap, for
// the rows whose source is in range (in_rows[r] == nullptr otherwise).
template <typename T, typename A>
void accumulate_tap(const T* const* in_rows, int64_t rows, const T* w_tap, A* acc, int64_t in_channels,
                    int64_t out_channels, int64_t groups) {
  const int64_t in_g = in_channels / groups, out_g = out_channels / groups;
  if (in_g == 1 && out_g == 1) {  // depthwise: vectorise across channels
    for (int64_t r = 0; r < rows; ++r) {
      if (in_rows[r] == nullptr) continue;
      const T* x = in_rows[r];
      A* a = acc + r * out_channels;
      for (int64_t c = 0; c < in_channels; ++c) a[c] += A(x[c]) * A(w_tap[c]);
    }
    return;
  }
  for (int64_t ci = 0; ci < in_channels; ++ci) {
    const int64_t g = ci / in_g;
    const T* w = w_tap + ci * out_g;
    for (int64_t r = 0; r < rows; ++r) {
      if (in_rows[r] == nullptr) continue;
      const A xv = A(in_rows[r][ci]);
      A* a = acc + r * out_channels + g * out_g;
      for (int64_t ol = 0; ol < out_g; ++ol) a[ol] += xv * A(w[ol]);
    }
  }
}

// The activation part of the epilogue and its backward, one row at a time, with the activation and the
// residual as compile-time constants, compiled per instruction set: the selects of relu and the
// residual vectorise (as scalar code they are branches, mispredicted half the time on random signs).
template <typename T, int64_t kAct, bool kResidual>
HIERTCN_ALWAYS_INLINE void activation_row_loop(const T* z, const T* res_row, T* out_row, int64_t C) {
  for (int64_t o = 0; o < C; ++o) out_row[o] = epilogue_forward<T>(z[o], kResidual, kResidual ? res_row[o] : T(0), kAct);
}

template <typename T, int64_t kAct, bool kResidual>
HIERTCN_ALWAYS_INLINE void activation_backward_row_loop(const T* g_row, const T* pre_row, const T* res_row,
                                                        T* grad_pre_row, T* grad_res_row, int64_t C) {
  for (int64_t o = 0; o < C; ++o) {
    T grad_res = T(0);
    // pre is absent only without an activation, where z is not read.
    grad_pre_row[o] = epilogue_backward<T>(g_row[o], kAct == kActNone ? T(0) : pre_row[o], kResidual,
                                           kResidual ? res_row[o] : T(0), kAct, &grad_res);
    if (kResidual) grad_res_row[o] = grad_res;
  }
}

// Instantiates `loop<T, activation, residual>(args...)` for the runtime activation code and residual flag.
#define HIERTCN_ACTIVATION_SWITCH(loop, T, activation, residual, ...)                              \
  switch ((activation) * 2 + ((residual) ? 1 : 0)) {                                              \
    case kActRelu * 2: return loop<T, kActRelu, false>(__VA_ARGS__);                               \
    case kActRelu * 2 + 1: return loop<T, kActRelu, true>(__VA_ARGS__);                            \
    case kActGelu * 2: return loop<T, kActGelu, false>(__VA_ARGS__);                               \
    case kActGelu * 2 + 1: return loop<T, kActGelu, true>(__VA_ARGS__);                            \
    case kActTanh * 2: return loop<T, kActTanh, false>(__VA_ARGS__);                               \
    case kActTanh * 2 + 1: return loop<T, kActTanh, true>(__VA_ARGS__);                            \
    case kActNone * 2 + 1: return loop<T, kActNone, true>(__VA_ARGS__);                            \
    default: return loop<T, kActNone, false>(__VA_ARGS__);                                         \
  }

HIERTCN_CPU_CLONES void activation_row_f32(const float* z, const float* res_row, float* out_row, int64_t C,
                                           int64_t activation) {
  HIERTCN_ACTIVATION_SWITCH(activation_row_loop, float, activation, res_row != nullptr, z, res_row, out_row, C)
}
HIERTCN_CPU_CLONES void activation_row_f64(const double* z, const double* res_row, double* out_row, int64_t C,
                                           int64_t activation) {
  HIERTCN_ACTIVATION_SWITCH(activation_row_loop, double, activation, res_row != nullptr, z, res_row, out_row, C)
}
void activation_row(const float* z, const float* res_row, float* out_row, int64_t C, int64_t activation) {
  activation_row_f32(z, res_row, out_row, C, activation);
}
void activation_row(const double* z, const double* res_row, double* out_row, int64_t C, int64_t activation) {
  activation_row_f64(z, res_row, out_row, C, activation);
}

HIERTCN_CPU_CLONES void activation_backward_row_f32(const float* g_row, const float* pre_row, const float* res_row,
                                                    float* grad_pre_row, float* grad_res_row, int64_t C,
                                                    int64_t activation) {
  HIERTCN_ACTIVATION_SWITCH(activation_backward_row_loop, float, activation, res_row != nullptr, g_row, pre_row,
                            res_row, grad_pre_row, grad_res_row, C)
}
HIERTCN_CPU_CLONES void activation_backward_row_f64(const double* g_row, const double* pre_row, const double* res_row,
                                                    double* grad_pre_row, double* grad_res_row, int64_t C,
                                                    int64_t activation) {
  HIERTCN_ACTIVATION_SWITCH(activation_backward_row_loop, double, activation, res_row != nullptr, g_row, pre_row,
                            res_row, grad_pre_row, grad_res_row, C)
}
void activation_backward_row(const float* g_row, const float* pre_row, const float* res_row, float* grad_pre_row,
                             float* grad_res_row, int64_t C, int64_t activation) {
  activation_backward_row_f32(g_row, pre_row, res_row, grad_pre_row, grad_res_row, C, activation);
}
void activation_backward_row(const double* g_row, const double* pre_row, const double* res_row,
                             double* grad_pre_row, double* grad_res_row, int64_t C, int64_t activation) {
  activation_backward_row_f64(g_row, pre_row, res_row, grad_pre_row, grad_res_row, C, activation);
}

// One output row of the fused epilogue; z (C) holds the conv and becomes conv + bias + context term. Separate
// simple loops, because the compiler vectorises each of them but not one loop with optional operands.
// relu_sign_bits of a row, and relu's backward from them (with_residual: also the residual's gradient), branch-free
// and compiled per instruction set like the activation rows above.
template <typename T>
HIERTCN_ALWAYS_INLINE void relu_bits_row_loop(const T* z, const T* out_row, uint8_t* bits, int64_t C) {
  for (int64_t o = 0; o < C; ++o) bits[o] = relu_sign_bits<T>(z[o], out_row[o]);
}

template <typename T>
HIERTCN_ALWAYS_INLINE void relu_bits_backward_row_loop(const T* g_row, const uint8_t* bits, T* grad_pre_row,
                                                       T* grad_res_row, int64_t C) {
  if (grad_res_row) {
    for (int64_t o = 0; o < C; ++o) grad_pre_row[o] = relu_bits_backward<T>(g_row[o], bits[o], true, grad_res_row + o);
  } else {
    T unused;
    for (int64_t o = 0; o < C; ++o) grad_pre_row[o] = relu_bits_backward<T>(g_row[o], bits[o], false, &unused);
  }
}

HIERTCN_CPU_CLONES void relu_bits_row(const float* z, const float* out_row, uint8_t* bits, int64_t C) {
  relu_bits_row_loop(z, out_row, bits, C);
}
HIERTCN_CPU_CLONES void relu_bits_row(const double* z, const double* out_row, uint8_t* bits, int64_t C) {
  relu_bits_row_loop(z, out_row, bits, C);
}
HIERTCN_CPU_CLONES void relu_bits_backward_row(const float* g_row, const uint8_t* bits, float* grad_pre_row,
                                               float* grad_res_row, int64_t C) {
  relu_bits_backward_row_loop(g_row, bits, grad_pre_row, grad_res_row, C);
}
HIERTCN_CPU_CLONES void relu_bits_backward_row(const double* g_row, const uint8_t* bits, double* grad_pre_row,
                                               double* grad_res_row, int64_t C) {
  relu_bits_backward_row_loop(g_row, bits, grad_pre_row, grad_res_row, C);
}

// pre_row: z (T), or with pre_bits relu_sign_bits (uint8), or nullptr.
template <typename T>
void epilogue_row(T* z, const T* bias, const T* table_row, const T* res_row, void* pre_row, bool pre_bits,
                  T* out_row, int64_t C, int64_t activation) {
  if (bias)
    for (int64_t o = 0; o < C; ++o) z[o] += bias[o];
  if (table_row)
    for (int64_t o = 0; o < C; ++o) z[o] += table_row[o];
  if (pre_row && !pre_bits) std::copy(z, z + C, static_cast<T*>(pre_row));
  activation_row(z, res_row, out_row, C, activation);
  if (pre_row && pre_bits) relu_bits_row(z, out_row, static_cast<uint8_t*>(pre_row), C);
}

// Element `index` of the forward's pre buffer: T z, or uint8 sign bits.
template <typename T>
void* pre_at(const CausalConvParams& p, int64_t index) {
  if (!p.pre) return nullptr;
  return p.pre_bits ? static_cast<void*>(static_cast<uint8_t*>(p.pre) + index)
                    : static_cast<void*>(static_cast<T*>(p.pre) + index);
}

// The fused epilogue of rows t0 .. t0 + rows - 1 of batch row b, from the accumulated conv acc (rows, C_out).
template <typename T>
void epilogue_tile(const CausalConvParams& p, int64_t b, int64_t t0, int64_t rows, T* acc) {
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  const int64_t C_out = p.out_channels, K = p.kernel_size;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r, row = b * p.time + t;
    epilogue_row<T>(acc + r * C_out, static_cast<const T*>(p.bias),
                    table ? table + (b * K + context_tap_index(t, p.dilation, K)) * C_out : nullptr,
                    residual ? residual + b * p.residual_batch_stride + t * p.residual_time_stride : nullptr,
                    pre_at<T>(p, row * C_out), p.pre_bits, static_cast<T*>(p.out) + row * C_out, C_out,
                    p.activation);
  }
}

// The fused epilogue of every output row from a precomputed conv z in time-major order (row t * batch + b
// of (time * batch, out_channels)); z is scratch and is overwritten.
template <typename T>
void epilogue_time_major_cpu_kernel(const CausalConvParams& p, T* z) {
  const int64_t C_out = p.out_channels;
  at::parallel_for(0, p.batch * p.time, std::max<int64_t>(1, 16384 / std::max<int64_t>(C_out, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.time, t = row % p.time;
      const T* table = static_cast<const T*>(p.context_table);
      const T* residual = static_cast<const T*>(p.residual);
      epilogue_row<T>(z + (t * p.batch + b) * C_out, static_cast<const T*>(p.bias),
                      table ? table + (b * p.kernel_size + context_tap_index(t, p.dilation, p.kernel_size)) * C_out
                            : nullptr,
                      residual ? residual + b * p.residual_batch_stride + t * p.residual_time_stride : nullptr,
                      pre_at<T>(p, row * C_out), p.pre_bits, static_cast<T*>(p.out) + row * C_out, C_out,
                      p.activation);
    }
  });
}

template <typename T>
void causal_conv_cpu_kernel(const CausalConvParams& p) {
  using A = acc_t<T>;
  static_assert(std::is_same_v<A, T>, "the CPU kernels run float and double, which accumulate in themselves");
  const T* in = static_cast<const T*>(p.in);
  const T* packed = static_cast<const T*>(p.packed_weight);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t tiles = (p.time + kTimeTile - 1) / kTimeTile;
  // Group tasks so that each parallel chunk does at least ~32k multiply-adds.
  const int64_t task_flops = std::max<int64_t>(1, kTimeTile * C_in * (C_out / p.groups) * K);
  const int64_t grain = std::max<int64_t>(1, 32768 / task_flops);
  const bool dense = p.groups == 1;
  // Out-of-range source rows of the dense micro-kernels read zeros instead of branching.
  const std::vector<T> zero_row(dense ? C_in : 0, T(0));
  at::parallel_for(0, p.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kTimeTile * C_out);
    std::vector<const T*> in_rows(K * kTimeTile);
    std::unique_ptr<bool[]> tap_used(new bool[K]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, t0 = (task % tiles) * kTimeTile;
      const int64_t rows = std::min(kTimeTile, p.time - t0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < K; ++j) {
        const int64_t offset = p.direction * (K - 1 - j) * p.dilation;
        const T** tap_rows = in_rows.data() + j * kTimeTile;
        tap_used[j] = false;
        for (int64_t r = 0; r < kTimeTile; ++r) {
          const int64_t s = t0 + r - offset;
          const bool valid = r < rows && s >= 0 && s < p.time;
          tap_rows[r] = valid ? in + b * p.in_batch_stride + s * p.in_time_stride : (dense ? zero_row.data() : nullptr);
          tap_used[j] = tap_used[j] || valid;
        }
        if (!dense && tap_used[j])
          accumulate_tap(tap_rows, rows, packed + j * C_in * (C_out / p.groups), acc.data(), C_in, C_out, p.groups);
      }
      if (dense) dense_tile(in_rows.data(), tap_used.get(), packed, K, C_in, C_out, C_out, rows, acc.data(), C_out);
      epilogue_tile<T>(p, b, t0, rows, acc.data());
    }
  });
}

template <typename T>
void epilogue_backward_cpu_kernel(const CausalConvBackwardParams& p) {
  const T* g = static_cast<const T*>(p.grad_out);
  const T* pre = static_cast<const T*>(p.pre);
  const T* residual = static_cast<const T*>(p.residual);
  T* grad_pre = static_cast<T*>(p.grad_pre);
  T* grad_residual = static_cast<T*>(p.grad_residual);
  const int64_t C = p.out_channels;
  if (p.pre_bits) {  // relu from its sign bits: no z, no residual read
    const uint8_t* bits = static_cast<const uint8_t*>(p.pre);
    at::parallel_for(0, p.batch * p.time, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / p.time, t = row % p.time;
        relu_bits_backward_row(g + b * p.grad_out_batch_stride + t * p.grad_out_time_stride, bits + row * C,
                               grad_pre + row * C, grad_residual ? grad_residual + row * C : nullptr, C);
      }
    });
    return;
  }
  at::parallel_for(0, p.batch * p.time, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.time, t = row % p.time;
      activation_backward_row(g + b * p.grad_out_batch_stride + t * p.grad_out_time_stride,
                              pre ? pre + row * C : nullptr,
                              residual ? residual + b * p.residual_batch_stride + t * p.residual_time_stride : nullptr,
                              grad_pre + row * C, grad_residual ? grad_residual + row * C : nullptr, C, p.activation);
    }
  });
}

template <typename T>
void weight_grad_cpu_kernel(const CausalConvBackwardParams& p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* gz = static_cast<const T*>(p.grad_pre);
  A* partials = static_cast<A*>(p.grad_weight_partials);
  T* grad_weight = static_cast<T*>(p.grad_weight);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t in_g = C_in / p.groups, out_g = C_out / p.groups;
  const int64_t packed_size = K * C_in * out_g;
  const int64_t rows = p.batch * p.time;
  const int64_t chunk_rows = weight_grad_chunk_rows(rows, p.weight_grad_chunks);
  at::parallel_for(0, p.weight_grad_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* part = partials + chunk * packed_size;
      std::fill(part, part + packed_size, A(0));
      const int64_t row_end = std::min(rows, (chunk + 1) * chunk_rows);
      if (p.groups == 1) {
        dense_weight_grad(x, p.x_batch_stride, p.x_time_stride, gz, C_in, C_out, K, p.dilation, p.time,
                          chunk * chunk_rows, row_end, part);
        continue;
      }
      for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
        const int64_t b = row / p.time, t = row % p.time;
        const T* gz_row = gz + row * C_out;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t s = t - (K - 1 - j) * p.dilation;
          if (s < 0) continue;
          const T* x_row = x + b * p.x_batch_stride + s * p.x_time_stride;
          A* part_tap = part + j * C_in * out_g;
          if (in_g == 1 && out_g == 1) {
            for (int64_t c = 0; c < C_in; ++c) part_tap[c] += A(x_row[c]) * A(gz_row[c]);
            continue;
          }
          for (int64_t ci = 0; ci < C_in; ++ci) {
            const A xv = A(x_row[ci]);
            const T* gz_group = gz_row + (ci / in_g) * out_g;
            A* w = part_tap + ci * out_g;
            for (int64_t ol = 0; ol < out_g; ++ol) w[ol] += xv * A(gz_group[ol]);
          }
        }
      }
    }
  });
  // Sum the chunks in order and scatter from the packed layout [j][ci][ol] to (out, in/groups, k). An item is
  // (group, run of kRun output channels): the chunks' sums for a run are read as rows and vectorised, and its
  // kRun rows of the weight gradient are written in order, so the writes stay in a few cache lines (with a division
  // per element and a write at a stride of in * k per channel, this scatter cost 0.75 ms for a 128-channel, k = 5
  // weight, ten times the products of a one-step backward).
  constexpr int64_t kRun = 16;
  const int64_t chunks = p.weight_grad_chunks;
  const int64_t runs = (out_g + kRun - 1) / kRun;
  at::parallel_for(0, p.groups * runs, std::max<int64_t>(1, 4096 / std::max<int64_t>(in_g * K * kRun, 1)),
                   [&](int64_t begin, int64_t end) {
    A sums[kRun];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / runs, o0 = (item % runs) * kRun;
      const int64_t run = std::min(kRun, out_g - o0);
      T* dst = grad_weight + (g * out_g + o0) * in_g * K;
      for (int64_t cl = 0; cl < in_g; ++cl) {
        for (int64_t j = 0; j < K; ++j) {
          const A* src = partials + (j * C_in + g * in_g + cl) * out_g + o0;
          std::fill(sums, sums + run, A(0));
          for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            const A* part = src + chunk * packed_size;
            for (int64_t o = 0; o < run; ++o) sums[o] += part[o];
          }
          for (int64_t o = 0; o < run; ++o) dst[(o * in_g + cl) * K + j] = T(sums[o]);
        }
      }
    }
  });
}

template <typename T>
void causal_conv_step_cpu_kernel(const CausalConvStepParams& p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* packed = static_cast<const T*>(p.packed_weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* table = static_cast<const T*>(p.context_table);
  const T* residual = static_cast<const T*>(p.residual);
  T* history = static_cast<T*>(p.history);
  int64_t* position = static_cast<int64_t*>(p.position);
  T* out = static_cast<T*>(p.out);
  const int64_t C_in = p.in_channels, C_out = p.out_channels, K = p.kernel_size;
  const int64_t history_length = (K - 1) * p.dilation;
  // kTimeTile batch rows at a time go through the same tile kernels as the forward, row r's tap j
  // reading x (lag 0), its history slot, or nothing (before the row's start).
  const bool dense = p.groups == 1;
  const std::vector<T> zero_row(dense ? C_in : 0, T(0));
  const int64_t tiles = (p.batch + kTimeTile - 1) / kTimeTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kTimeTile * C_out);
    std::vector<const T*> in_rows(K * kTimeTile);
    std::unique_ptr<bool[]> tap_used(new bool[K]);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b0 = tile * kTimeTile, rows = std::min(kTimeTile, p.batch - b0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < K; ++j) {
        const int64_t lag = (K - 1 - j) * p.dilation;
        const T** tap_rows = in_rows.data() + j * kTimeTile;
        tap_used[j] = false;
        for (int64_t r = 0; r < kTimeTile; ++r) {
          const int64_t b = b0 + r;
          const bool valid = r < rows && lag <= position[b];
          if (!valid)
            tap_rows[r] = dense ? zero_row.data() : nullptr;
          else if (lag == 0)
            tap_rows[r] = x + b * p.x_row_stride;
          else
            tap_rows[r] = history + (b * history_length + (position[b] - lag) % history_length) * C_in;
          tap_used[j] = tap_used[j] || valid;
        }
        if (!dense && tap_used[j])
          accumulate_tap(tap_rows, rows, packed + j * C_in * (C_out / p.groups), acc.data(), C_in, C_out, p.groups);
      }
      if (dense) dense_tile(in_rows.data(), tap_used.get(), packed, K, C_in, C_out, C_out, rows, acc.data(), C_out);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = b0 + r;
        epilogue_row<T>(acc.data() + r * C_out, bias,
                        table ? table + (b * K + context_tap_index(position[b], p.dilation, K)) * C_out : nullptr,
                        residual ? residual + b * p.residual_row_stride : nullptr, nullptr, false, out + b * C_out,
                        C_out, p.activation);
      }
      for (int64_t b = b0; b < b0 + rows; ++b) {
        const T* x_row = x + b * p.x_row_stride;
        if (history_length > 0)
          std::copy(x_row, x_row + C_in, history + (b * history_length + position[b] % history_length) * C_in);
        position[b] = next_position(position[b]);
      }
    }
  });
}

// The whole TCN stack for one step, with the same tile kernels, tap order and epilogue as
// causal_conv_step_cpu_kernel, so a layer's output equals that op's bitwise when its residual is the layer
// input. Rows never interact, so a task may take kTimeTile batch rows through every layer; a batch with fewer
// tiles than threads instead splits each layer's output channels between the threads (each thread then
// keeps its share of every layer's weights in its own cache from step to step).
template <typename T>
struct StackTile {
  // One thread's scratch: acc and res (kTimeTile, C_out) hold the conv and the residual projection of the
  // channels it computes; tap_rows the (K_max, kTimeTile) source rows per tap; cur the layer's input rows.
  std::vector<T> acc, res;
  std::vector<const T*> tap_rows, cur;
  std::unique_ptr<bool[]> tap_used;
  StackTile(int64_t C_max, int64_t K_max)
      : acc(kTimeTile * C_max), res(kTimeTile * C_max), tap_rows(K_max * kTimeTile), cur(kTimeTile),
        tap_used(new bool[K_max]) {}
};

// Points the tile's tap rows at layer l's sources for batch rows [b0, b0 + rows).
template <typename T>
void stack_layer_taps(const TcnStepParams& p, int64_t l, int64_t b0, int64_t rows, const T* zero_row,
                      StackTile<T>& s) {
  const TcnStepLayer& L = p.layer[l];
  const int64_t K = L.kernel_size, history_length = (K - 1) * L.dilation;
  const T* history = static_cast<const T*>(L.history);
  const int64_t* position = static_cast<const int64_t*>(L.position);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t lag = (K - 1 - j) * L.dilation;
    const T** tap_rows = s.tap_rows.data() + j * kTimeTile;
    s.tap_used[j] = false;
    for (int64_t r = 0; r < kTimeTile; ++r) {
      const int64_t b = b0 + r;
      const bool valid = r < rows && lag <= position[b];
      if (!valid)
        tap_rows[r] = zero_row;
      else if (lag == 0)
        tap_rows[r] = s.cur[r];
      else
        tap_rows[r] = history + (b * history_length + (position[b] - lag) % history_length) * L.in_channels;
      s.tap_used[j] = s.tap_used[j] || valid;
    }
  }
}

// acc[r * ldacc + o] += the conv of output channels [o_begin, o_end) of a layer whose packed weights are
// column blocks of `block` channels (block == C_out: the plain packing), one dense_tile call per block spanned.
template <typename T>
void blocked_dense_tile(const T* const* rows, const bool* tap_used, const T* packed, int64_t K, int64_t C_in,
                        int64_t block, int64_t valid_rows, T* acc, int64_t ldacc, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end;) {
    const int64_t b = o / block, within = o % block, width = std::min(o_end - o, block - within);
    dense_tile(rows, tap_used, packed + b * K * C_in * block + within, K, C_in, block, width, valid_rows, acc + o,
               ldacc);
    o += width;
  }
}

// Output channels [o_begin, o_end) of layer l for the tile's rows: conv, residual projection, epilogue.
template <typename T>
void stack_layer_outputs(const TcnStepParams& p, int64_t l, int64_t b0, int64_t rows, int64_t o_begin, int64_t o_end,
                         StackTile<T>& s, T* out_buf) {
  const TcnStepLayer& L = p.layer[l];
  const int64_t C_in = L.in_channels, C_out = L.out_channels, K = L.kernel_size;
  const int64_t* position = static_cast<const int64_t*>(L.position);
  const T* table = l == 0 ? static_cast<const T*>(p.context_table) : nullptr;
  const T* bias = static_cast<const T*>(L.bias);
  const T* proj_bias = static_cast<const T*>(L.proj_bias);
  const T* context_residual = l == 0 ? static_cast<const T*>(p.context_residual) : nullptr;
  const bool last = l == p.layers - 1;
  const int64_t width = o_end - o_begin;
  for (int64_t r = 0; r < kTimeTile; ++r) std::fill_n(s.acc.data() + r * C_out + o_begin, width, T(0));
  blocked_dense_tile(s.tap_rows.data(), s.tap_used.get(), static_cast<const T*>(L.packed_weight), K, C_in,
                     L.weight_block, rows, s.acc.data(), C_out, o_begin, o_end);
  if (L.proj_weight) {
    const bool used = true;
    for (int64_t r = 0; r < kTimeTile; ++r) std::fill_n(s.res.data() + r * C_out + o_begin, width, T(0));
    blocked_dense_tile(s.cur.data(), &used, static_cast<const T*>(L.proj_weight), 1, C_in, L.weight_block, rows,
                       s.res.data(), C_out, o_begin, o_end);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    const T* res_row = s.cur[r] + o_begin;
    if (L.proj_weight) {
      T* row = s.res.data() + r * C_out + o_begin;
      if (proj_bias)
        for (int64_t o = 0; o < width; ++o) row[o] += proj_bias[o_begin + o];
      res_row = row;
    }
    if (context_residual) {  // the context's term of the residual, after the projection and its bias
      T* row = s.res.data() + r * C_out + o_begin;
      const T* term = context_residual + b * C_out + o_begin;
      for (int64_t o = 0; o < width; ++o) row[o] = res_row[o] + term[o];
      res_row = row;
    }
    T* out_row = last ? static_cast<T*>(p.out) + b * C_out : out_buf + r * p.max_channels;
    epilogue_row<T>(s.acc.data() + r * C_out + o_begin, bias ? bias + o_begin : nullptr,
                    table ? table + (b * K + context_tap_index(position[b], L.dilation, K)) * C_out + o_begin
                          : nullptr,
                    res_row, nullptr, false, out_row + o_begin, width, p.activation);
  }
}

// The few-rows team's barrier, one per layer of a step (see stack_tile_layers). OpenMP's cost about 0.5 us a
// layer here (7 layers at batch 1: 18.9 us a step with it, 15.3 us with none at all, on the 2-core VM); this one
// is an arrival count and a generation on their own cache lines. A member spins on the generation a short while
// (the others are a fraction of a microsecond behind), then yields its core: a team member the OS took off its
// core (more threads than cores) still gets to arrive. Acquire/release order the layer's outputs, written
// before the arrival, before every read after the wait.
class TeamBarrier {
 public:
  void wait(int64_t members) {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == members) {
      arrived_.store(0, std::memory_order_relaxed);  // before the release below: the next wait counts from 0
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpins) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int64_t kSpins = 4096;
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
};

// One tile of rows [b0, b0 + rows) through every layer, by thread tid of a team of nt (nt == 1: alone). Layer
// l writes its output rows into bufs slot l % 3 (row stride max_channels; the last layer into out). In a
// team each thread computes a fixed share of every layer's output channels (whole column blocks of its
// weights, so its cache keeps its share from step to step) and one barrier per layer publishes the outputs
// before anyone reads them. After the barrier each thread copies its share of the layer's input channels into
// the history slot (position % length), which the layer's oldest tap read before the barrier; three row
// buffers keep a slow thread's copy of layer l's input clear of layer l + 1's outputs. The positions are
// advanced by the caller, after every layer.
template <typename T>
void stack_tile_layers(const TcnStepParams& p, int64_t b0, int64_t rows, StackTile<T>& s, T* bufs, const T* zero_row,
                       int64_t tid, int64_t nt, TeamBarrier* barrier) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t r = 0; r < kTimeTile; ++r) s.cur[r] = r < rows ? x + (b0 + r) * p.x_row_stride : zero_row;
  for (int64_t l = 0; l < p.layers; ++l) {
    const TcnStepLayer& L = p.layer[l];
    const int64_t C_in = L.in_channels, C_out = L.out_channels;
    T* out_buf = bufs + (l % 3) * kTimeTile * p.max_channels;
    stack_layer_taps(p, l, b0, rows, zero_row, s);
    const int64_t unit = L.weight_block < C_out ? L.weight_block : 2 * kOutBlock<64, T>;
    const int64_t units = (C_out + unit - 1) / unit;
    const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
    if (u0 < u1) stack_layer_outputs(p, l, b0, rows, u0 * unit, std::min(C_out, u1 * unit), s, out_buf);
    if (nt > 1) barrier->wait(nt);
    const int64_t history_length = (L.kernel_size - 1) * L.dilation;
    if (history_length > 0) {
      const int64_t c0 = C_in * tid / nt, c1 = C_in * (tid + 1) / nt;
      T* history = static_cast<T*>(L.history);
      const int64_t* position = static_cast<const int64_t*>(L.position);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = b0 + r;
        std::copy(s.cur[r] + c0, s.cur[r] + c1, history + (b * history_length + position[b] % history_length) * C_in + c0);
      }
    }
    for (int64_t r = 0; r < rows; ++r) s.cur[r] = out_buf + r * p.max_channels;
  }
}

template <typename T>
void advance_positions(const TcnStepParams& p, int64_t b0, int64_t rows) {
  for (int64_t l = 0; l < p.layers; ++l) {
    int64_t* position = static_cast<int64_t*>(p.layer[l].position);
    for (int64_t r = 0; r < rows; ++r) position[b0 + r] = next_position(position[b0 + r]);
  }
}

// A team pays a barrier per layer (about a microsecond); it wins when the stack's weights overflow one core's
// private cache, which the team's shares then fit (measured at batch 1 with 128 channels and k = 5 on a
// 2-core VM with 2 MiB of L2 per core: 3 layers, 1 MB, 11 us alone against 13 in a team of two; 7 layers,
// 2.3 MB, 105 us alone against 20).
constexpr int64_t kStackTeamMinWeightBytes = int64_t(1) << 20;

// The few-rows path's buffers, kept by each calling thread from step to step and grown as needed: at batch 1
// a step is a few microseconds of arithmetic, and allocating and zeroing them on every call cost a tenth of
// it. zero_row stays zero (it is only read); the rest is written before it is read.
template <typename T>
struct StackScratch {
  int64_t channels = 0, taps = 0, threads = 0;
  std::vector<StackTile<T>> tiles;
  std::vector<T> bufs, zero_row;
  TeamBarrier barrier;  // the team's, which a region leaves with every member past its last wait

  void fit(int64_t C, int64_t K, int64_t nt) {
    if (C <= channels && K <= taps && nt <= threads) return;
    channels = std::max(channels, C);
    taps = std::max(taps, K);
    threads = std::max(threads, nt);
    tiles.clear();
    for (int64_t t = 0; t < threads; ++t) tiles.emplace_back(channels, taps);
    bufs.assign(3 * kTimeTile * channels, T(0));
    zero_row.assign(channels, T(0));
  }
};

template <typename T>
StackScratch<T>& stack_scratch() {
  static thread_local StackScratch<T> scratch;
  return scratch;
}

template <typename T>
void tcn_step_cpu_kernel(const TcnStepParams& p) {
  int64_t K_max = 1, multiply_adds = 0;
  for (int64_t l = 0; l < p.layers; ++l) {
    const TcnStepLayer& L = p.layer[l];
    K_max = std::max(K_max, L.kernel_size);
    multiply_adds += L.kernel_size * L.in_channels * L.out_channels;
  }
  const int64_t tiles = (p.batch + kTimeTile - 1) / kTimeTile;
  at::internal::lazy_init_num_threads();
  const int64_t threads = at::get_num_threads();
  if (tiles >= threads) {
    // Many rows: tiles of rows go to the threads, each through the whole stack alone.
    const std::vector<T> zero_row(p.max_channels, T(0));
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      StackTile<T> s(p.max_channels, K_max);
      std::vector<T> bufs(3 * kTimeTile * p.max_channels);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b0 = tile * kTimeTile, rows = std::min(kTimeTile, p.batch - b0);
        stack_tile_layers(p, b0, rows, s, bufs.data(), zero_row.data(), 0, 1, nullptr);
        advance_positions<T>(p, b0, rows);
      }
    });
    return;
  }
  // Few rows: one parallel region per tile, whose team splits each layer's output channels (see
  // stack_tile_layers). A share always goes to the same thread for a given shape and thread count, and a sum
  // does not depend on which thread computes it.
#ifdef _OPENMP
  const bool team = threads > 1 && multiply_adds * int64_t(sizeof(T)) >= kStackTeamMinWeightBytes &&
                    !at::in_parallel_region();
#else
  const bool team = false;
#endif
  // Bound here, outside the parallel region: there every thread would name its own thread_local.
  StackScratch<T>& scratch = stack_scratch<T>();
  scratch.fit(p.max_channels, K_max, team ? threads : 1);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t b0 = tile * kTimeTile, rows = std::min(kTimeTile, p.batch - b0);
    if (team) {
#pragma omp parallel
      {
        // The team has at most omp_get_max_threads() == threads members (no num_threads clause, as in
        // at::parallel_for); every member passes the same barriers.
        const int64_t nt = std::min<int64_t>(omp_get_num_threads(), threads), tid = omp_get_thread_num();
        if (tid < nt)
          stack_tile_layers(p, b0, rows, scratch.tiles[tid], scratch.bufs.data(), scratch.zero_row.data(), tid, nt,
                            &scratch.barrier);
      }
    } else {
      stack_tile_layers(p, b0, rows, scratch.tiles[0], scratch.bufs.data(), scratch.zero_row.data(), 0, 1, nullptr);
    }
    advance_positions<T>(p, b0, rows);
  }
}

// Dense convolutions big enough for BLAS run through it in this op entry layer: k shifted matrix products on
// time-major (time * batch, channels) copies, where a shift by s steps is a shift by s * batch rows and never
// crosses into another batch row; our kernels do the element-wise epilogues. The register-blocked
// micro-kernels keep grouped, narrow and tiny convolutions, where the copies and BLAS calls cost more than
// they save (measured at HierTCN's shapes, 1 and 2 threads).
// Where the BLAS is slower than the micro-kernels (conv_blas_auto_choice), every size stays with them.
constexpr int64_t kBlasMinChannels = 32;
constexpr int64_t kBlasMinMultiplyAdds = int64_t(1) << 19;

std::atomic<int64_t> conv_blas_setting{kConvBlasAuto};

bool use_blas(const ConvShape& s) {
  const int64_t mode = conv_blas_setting.load(std::memory_order_relaxed);
  if (mode == kConvBlasNever || (mode == kConvBlasAuto && !conv_blas_auto_choice())) return false;
  return s.groups == 1 && s.in_channels >= kBlasMinChannels && s.out_channels >= kBlasMinChannels &&
         s.batch * s.time * s.in_channels * s.out_channels * s.kernel_size >= kBlasMinMultiplyAdds;
}

// ---- weight layouts -----------------------------------------------------------------------------------------
// ATen's permuting copies between a weight's (out, in, k) layout and the kernels' packings run at a few GB/s on
// these shapes (a last axis of k = 5 read or written one element at a time); these loops move whole runs.

// dst[m * stride_m + i * stride_i + o] = w[o][i][m] (cumulative: sum over j >= k-1-m of w[o][i][j]) for w
// (out, in, k) contiguous: the forward packing (k, in, out) and the context weight's cumulative one (in, k, out).
// Items are (block of 16 output channels, input channel) pairs; a whole block's 16 values of a tap are read at
// a stride (a gather where the CPU has one) and written as one 16-channel run.
template <typename T>
HIERTCN_ALWAYS_INLINE void pack_taps_items(const T* w, T* dst, int64_t out_channels, int64_t in_channels, int64_t k,
                                           int64_t stride_m, int64_t stride_i, int64_t first, int64_t last,
                                           bool cumulative) {
  constexpr int64_t kBlock = 16;
  const int64_t row = in_channels * k;
  for (int64_t item = first; item < last; ++item) {
    const int64_t o_begin = item / in_channels * kBlock, i = item % in_channels;
    const int64_t count = std::min(kBlock, out_channels - o_begin);
    const T* src = w + o_begin * row + i * k;
    T* out = dst + i * stride_i + o_begin;
    T sums[kBlock] = {};
    if (count == kBlock) {
      for (int64_t m = 0; m < k; ++m) {
        const int64_t j = cumulative ? k - 1 - m : m;
        T* run = out + m * stride_m;
        if (cumulative) {
          for (int64_t o = 0; o < kBlock; ++o) run[o] = sums[o] += src[o * row + j];
        } else {
          for (int64_t o = 0; o < kBlock; ++o) run[o] = src[o * row + j];
        }
      }
    } else {
      for (int64_t m = 0; m < k; ++m) {
        const int64_t j = cumulative ? k - 1 - m : m;
        for (int64_t o = 0; o < count; ++o) {
          T v = src[o * row + j];
          if (cumulative) v = sums[o] += v;
          out[m * stride_m + o] = v;
        }
      }
    }
  }
}

HIERTCN_CPU_CLONES void pack_taps_items_f32(const float* w, float* dst, int64_t out_channels, int64_t in_channels,
                                            int64_t k, int64_t stride_m, int64_t stride_i, int64_t first, int64_t last,
                                            bool cumulative) {
  pack_taps_items(w, dst, out_channels, in_channels, k, stride_m, stride_i, first, last, cumulative);
}
HIERTCN_CPU_CLONES void pack_taps_items_f64(const double* w, double* dst, int64_t out_channels, int64_t in_channels,
                                            int64_t k, int64_t stride_m, int64_t stride_i, int64_t first, int64_t last,
                                            bool cumulative) {
  pack_taps_items(w, dst, out_channels, in_channels, k, stride_m, stride_i, first, last, cumulative);
}

template <typename T>
void pack_taps_kernel(const T* w, T* dst, int64_t out_channels, int64_t in_channels, int64_t k, int64_t stride_m,
                      int64_t stride_i, bool cumulative) {
  const int64_t blocks = (out_channels + 15) / 16;
  at::parallel_for(0, blocks * in_channels, 256, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<T, float>) {
      pack_taps_items_f32(w, dst, out_channels, in_channels, k, stride_m, stride_i, first, last, cumulative);
    } else {
      pack_taps_items_f64(w, dst, out_channels, in_channels, k, stride_m, stride_i, first, last, cumulative);
    }
  });
}

// Blocks [first, last) of 256 of the (n, k) <-> (k, n) transposes below; taps_first: dst (k, n) = src (n, k)
// transposed; else dst (n, k) from src (k, n), dst[i][j] = src[j][i] (cumulative: sum over m >= k-1-j of
// src[m][i]). The reads (taps_first) or writes (else) at a stride of k are gathers or scatters where the CPU has
// them.
template <typename T>
HIERTCN_ALWAYS_INLINE void transpose_taps_blocks(const T* src, T* dst, int64_t n, int64_t k, int64_t first,
                                                 int64_t last, bool taps_first, bool cumulative) {
  constexpr int64_t kBlock = 256;
  T sums[kBlock];
  for (int64_t block = first; block < last; ++block) {
    const int64_t begin = block * kBlock, count = std::min(kBlock, n - begin);
    if (taps_first) {
      const T* in = src + begin * k;
      for (int64_t j = 0; j < k; ++j) {
        T* out = dst + j * n + begin;
        for (int64_t i = 0; i < count; ++i) out[i] = in[i * k + j];
      }
      continue;
    }
    T* out = dst + begin * k;
    if (!cumulative) {
      for (int64_t j = 0; j < k; ++j) {
        const T* in = src + j * n + begin;
        for (int64_t i = 0; i < count; ++i) out[i * k + j] = in[i];
      }
      continue;
    }
    std::fill(sums, sums + count, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const T* in = src + (k - 1 - j) * n + begin;
      for (int64_t i = 0; i < count; ++i) out[i * k + j] = sums[i] += in[i];
    }
  }
}

HIERTCN_CPU_CLONES void transpose_taps_blocks_f32(const float* src, float* dst, int64_t n, int64_t k, int64_t first,
                                                  int64_t last, bool taps_first, bool cumulative) {
  transpose_taps_blocks(src, dst, n, k, first, last, taps_first, cumulative);
}
HIERTCN_CPU_CLONES void transpose_taps_blocks_f64(const double* src, double* dst, int64_t n, int64_t k, int64_t first,
                                                  int64_t last, bool taps_first, bool cumulative) {
  transpose_taps_blocks(src, dst, n, k, first, last, taps_first, cumulative);
}

// The input gradient's packing (k, out, in) of a weight (out, in, k) (taps_first), and a weight gradient
// computed by tap, (k, out, in), back in the weight's layout (else), with suffix sums (cumulative).
template <typename T>
void transpose_taps(const T* src, T* dst, int64_t n, int64_t k, bool taps_first, bool cumulative) {
  at::parallel_for(0, (n + 255) / 256, 16, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<T, float>) {
      transpose_taps_blocks_f32(src, dst, n, k, first, last, taps_first, cumulative);
    } else {
      transpose_taps_blocks_f64(src, dst, n, k, first, last, taps_first, cumulative);
    }
  });
}

bool fast_layout(const at::Tensor& t) {
  return t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// pack_conv_weight (causal_conv_host.h) for CPU tensors.
at::Tensor pack_conv_weight_cpu(const at::Tensor& weight, int64_t groups) {
  if (groups != 1 || !fast_layout(weight)) return pack_conv_weight(weight, groups);
  const int64_t out = weight.size(0), in = weight.size(1), k = weight.size(2);
  at::Tensor packed = at::empty({k, in, out}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pack_conv_weight_cpu", [&] {
    pack_taps_kernel<scalar_t>(weight.data_ptr<scalar_t>(), packed.data_ptr<scalar_t>(), out, in, k, in * out, out,
                               false);
  });
  return packed;
}

// pack_conv_weight_transposed (causal_conv_host.h) for CPU tensors.
at::Tensor pack_conv_weight_transposed_cpu(const at::Tensor& weight) {
  if (!fast_layout(weight)) return pack_conv_weight_transposed(weight);
  const int64_t k = weight.size(2);
  at::Tensor packed = at::empty({k, weight.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pack_conv_weight_transposed_cpu", [&] {
    transpose_taps<scalar_t>(weight.data_ptr<scalar_t>(), packed.data_ptr<scalar_t>(), weight.numel() / k, k, true,
                             false);
  });
  return packed;
}

// grad_weight (out, in, k) = by_tap (k, out, in) in the weight's layout.
void copy_taps_last(const at::Tensor& by_tap, const at::Tensor& grad_weight) {
  if (!fast_layout(by_tap) || !fast_layout(grad_weight) || by_tap.scalar_type() != grad_weight.scalar_type()) {
    grad_weight.copy_(by_tap.permute({1, 2, 0}));
    return;
  }
  const int64_t k = by_tap.size(0);
  AT_DISPATCH_FLOATING_TYPES(by_tap.scalar_type(), "copy_taps_last", [&] {
    transpose_taps<scalar_t>(by_tap.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), by_tap.numel() / k, k,
                             false, false);
  });
}

// (batch, time, C) channels-last -> contiguous (time * batch, C).
at::Tensor time_major(const at::Tensor& t) {
  return t.transpose(0, 1).contiguous().view({t.size(0) * t.size(1), t.size(2)});
}

// Steps [first_step, first_step + steps) of the time-major a (time * batch, .).
at::Tensor rows_from(const at::Tensor& a, int64_t batch, int64_t first_step, int64_t steps) {
  return a.narrow(0, first_step * batch, steps * batch);
}

// z (time * batch, C_out) = sum over taps j of x shifted by (k - 1 - j) * dilation steps, times mats[j];
// mats (k, C_in, C_out). direction 1 shifts towards later steps (the forward), -1 towards earlier ones
// (the input gradient). Taps are added in a fixed order: deterministic for a fixed thread count.
// Whether the raw BLAS entry points serve this dtype and these sizes (the BLAS counts in int).
bool raw_blas(const at::Tensor& t, int64_t largest) {
  if (largest > std::numeric_limits<int>::max()) return false;
  if (t.scalar_type() == at::kFloat) return cpu_blas::available<float>();
  if (t.scalar_type() == at::kDouble) return cpu_blas::available<double>();
  return false;
}

at::Tensor time_major_conv(const ConvShape& s, const at::Tensor& x_tm, const at::Tensor& mats, int64_t direction) {
  const int64_t B = s.batch, T = s.time, K = s.kernel_size;
  const int64_t C_in = mats.size(1), C_out = mats.size(2);
  if (raw_blas(x_tm, B * T * std::max(C_in, C_out))) {
    at::Tensor z = at::empty({B * T, C_out}, x_tm.options());
    AT_DISPATCH_FLOATING_TYPES(x_tm.scalar_type(), "time_major_conv", [&] {
      const scalar_t* x = x_tm.data_ptr<scalar_t>();
      const scalar_t* w = mats.data_ptr<scalar_t>();
      scalar_t* out = z.data_ptr<scalar_t>();
      cpu_blas::gemm<scalar_t>(false, false, B * T, C_out, C_in, x, C_in, w + (K - 1) * C_in * C_out, C_out,
                               scalar_t(0), out, C_out);
      for (int64_t j = K - 2; j >= 0; --j) {
        const int64_t shift = (K - 1 - j) * s.dilation;
        if (shift >= T) continue;
        const int64_t dst_row = (direction > 0 ? shift : 0) * B, src_row = (direction > 0 ? 0 : shift) * B;
        cpu_blas::gemm<scalar_t>(false, false, (T - shift) * B, C_out, C_in, x + src_row * C_in, C_in,
                                 w + j * C_in * C_out, C_out, scalar_t(1), out + dst_row * C_out, C_out);
      }
    });
    return z;
  }
  at::Tensor z = at::mm(x_tm, mats.select(0, K - 1));
  for (int64_t j = K - 2; j >= 0; --j) {
    const int64_t shift = (K - 1 - j) * s.dilation;
    if (shift >= T) continue;
    const int64_t steps = T - shift;
    at::Tensor dst = rows_from(z, B, direction > 0 ? shift : 0, steps);
    dst.addmm_(rows_from(x_tm, B, direction > 0 ? 0 : shift, steps), mats.select(0, j));
  }
  return z;
}

// grad_w (k, C_out, C_in): tap j = gz rows [shift, T)^T x rows [0, T - shift), time-major, B batch rows.
void time_major_weight_grad(const ConvShape& s, int64_t B, const at::Tensor& gz_tm, const at::Tensor& x_tm,
                            at::Tensor grad_w) {
  const int64_t T = s.time, K = s.kernel_size, C_in = s.in_channels, C_out = s.out_channels;
  const bool raw = raw_blas(x_tm, B * T * std::max(C_in, C_out));
  for (int64_t j = 0; j < K; ++j) {
    const int64_t shift = (K - 1 - j) * s.dilation;
    at::Tensor dst = grad_w.select(0, j);
    if (shift >= T) {
      dst.zero_();
    } else if (raw) {
      AT_DISPATCH_FLOATING_TYPES(x_tm.scalar_type(), "time_major_weight_grad", [&] {
        cpu_blas::gemm<scalar_t>(true, false, C_out, C_in, (T - shift) * B, gz_tm.data_ptr<scalar_t>() + shift * B * C_out,
                                 C_out, x_tm.data_ptr<scalar_t>(), C_in, scalar_t(0), dst.data_ptr<scalar_t>(), C_in);
      });
    } else {
      at::mm_out(dst, rows_from(gz_tm, B, shift, T - shift).t(), rows_from(x_tm, B, 0, T - shift));
    }
  }
}

// grad_x and grad_weight (each where wanted) of the dense conv from grad_pre = dL/dz, through BLAS.
void blas_conv_backward(const ConvShape& s, const at::Tensor& grad_pre, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_weight) {
  const int64_t B = s.batch, T = s.time, K = s.kernel_size;
  if (!grad_x && !grad_weight) return;
  const at::Tensor gz_tm = time_major(grad_pre);
  if (grad_x) {
    const at::Tensor gx_tm = time_major_conv(s, gz_tm, pack_conv_weight_transposed_cpu(weight), -1);
    grad_x->copy_(gx_tm.view({T, B, s.in_channels}).transpose(0, 1));
  }
  if (grad_weight) {
    at::Tensor grad_w = at::empty({K, s.out_channels, s.in_channels}, x.options());
    time_major_weight_grad(s, B, gz_tm, time_major(x), grad_w);
    copy_taps_last(grad_w, *grad_weight);
  }
}

void causal_conv1d_out_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& context_table, const std::optional<at::Tensor>& residual,
                           int64_t dilation, int64_t groups, int64_t activation, at::Tensor& out,
                           const std::optional<at::Tensor>& pre) {
  const ConvShape s = check_conv_args(x, weight, bias, context_table, dilation, groups, activation, false);
  const at::Tensor packed = pack_conv_weight_cpu(weight, groups);
  const CausalConvParams p = make_causal_conv_params(s, x, packed, bias, context_table, residual, out, pre);
  if (use_blas(s)) {
    at::Tensor z = time_major_conv(s, time_major(x), packed, 1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_out_cpu",
                               [&] { epilogue_time_major_cpu_kernel<scalar_t>(p, z.data_ptr<scalar_t>()); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_out_cpu", [&] { causal_conv_cpu_kernel<scalar_t>(p); });
}

void causal_conv1d_backward_out_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& residual,
                                    int64_t dilation, int64_t groups, int64_t activation, at::Tensor& grad_pre,
                                    const std::optional<at::Tensor>& grad_x,
                                    const std::optional<at::Tensor>& grad_weight,
                                    const std::optional<at::Tensor>& grad_residual) {
  const ConvShape s = check_conv_args(x, weight, std::nullopt, std::nullopt, dilation, groups, activation, false);
  CausalConvBackwardParams p =
      make_causal_conv_backward_params(s, kWeightGradRowsPerChunk, grad_out, x, pre, residual, grad_pre, grad_x,
                                       grad_weight, grad_residual);
  if (use_blas(s)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward_out_cpu",
                               [&] { epilogue_backward_cpu_kernel<scalar_t>(p); });
    blas_conv_backward(s, grad_pre, x, weight, grad_x, grad_weight);
    return;
  }
  const ConvBackwardScratch scratch =
      make_conv_backward_scratch(s, p, x, weight, grad_pre, grad_x, grad_weight, pack_conv_weight_transposed_cpu);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward_out_cpu", [&] {
    epilogue_backward_cpu_kernel<scalar_t>(p);
    if (grad_x) causal_conv_cpu_kernel<scalar_t>(scratch.input_grad);
    if (grad_weight) weight_grad_cpu_kernel<scalar_t>(p);
  });
}

// A row's position indexes its circular history: a negative one (a state corrupted or written by hand) would
// read and write outside it.
void check_positions(const void* position, int64_t batch, int64_t layer) {
  const int64_t* steps = static_cast<const int64_t*>(position);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(steps[b] >= 0, "the step state's position must be >= 0 (steps taken since the row's reset); ",
                      layer >= 0 ? "layer " + std::to_string(layer) + ", " : std::string(), "row ", b, " has ",
                      steps[b]);
}

void causal_conv1d_step_out_cpu(const at::Tensor& x, const at::Tensor& packed_weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& context_table,
                                const std::optional<at::Tensor>& residual, int64_t dilation, int64_t groups,
                                int64_t activation, at::Tensor& history, at::Tensor& position, at::Tensor& out) {
  const ConvShape s = check_conv_args(x, packed_weight, bias, context_table, dilation, groups, activation, true);
  const CausalConvStepParams p =
      make_causal_conv_step_params(s, x, packed_weight, bias, context_table, residual, history, position, out);
  check_positions(p.position, p.batch, -1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_step_out_cpu",
                             [&] { causal_conv_step_cpu_kernel<scalar_t>(p); });
}

void tcn_step_out_cpu(const at::Tensor& x, at::TensorList packed_weights, const OptionalTensorList& biases,
                      const OptionalTensorList& proj_weights, const OptionalTensorList& proj_biases,
                      const std::optional<at::Tensor>& context_table,
                      const std::optional<at::Tensor>& context_residual, at::IntArrayRef dilations, int64_t activation,
                      at::TensorList histories, at::TensorList positions, at::Tensor& out) {
  const TcnStepParams p = make_tcn_step_params(x, packed_weights, biases, proj_weights, proj_biases, context_table,
                                               context_residual, dilations, activation, histories, positions, out);
  tcn_step_cpu(p, x.scalar_type());
}

void context_weight_pack_out_cpu(const at::Tensor& weight, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 3, "context_weight_pack_out: weight must be (out_channels, ctx_channels, k), got ",
              weight.dim(), " dimensions");
  const int64_t out_channels = weight.size(0), ctx_channels = weight.size(1), k = weight.size(2);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({ctx_channels, k, out_channels}),
              "context_weight_pack_out: out must have shape (", ctx_channels, ", ", k, ", ", out_channels, "), got ",
              out.sizes());
  TORCH_CHECK(fast_layout(weight) && fast_layout(out) && out.scalar_type() == weight.scalar_type(),
              "context_weight_pack_out: weight and out must be contiguous, of one dtype, float32 or float64; got ",
              weight.scalar_type(), " and ", out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "context_weight_pack_out_cpu", [&] {
    pack_taps_kernel<scalar_t>(weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out_channels, ctx_channels, k,
                               out_channels, k * out_channels, true);
  });
}

void context_weight_grad_out_cpu(const at::Tensor& taps, at::Tensor& out) {
  TORCH_CHECK(taps.dim() == 3, "context_weight_grad_out: taps must be (k, out_channels, ctx_channels), got ",
              taps.dim(), " dimensions");
  const int64_t k = taps.size(0), out_channels = taps.size(1), ctx_channels = taps.size(2);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({out_channels, ctx_channels, k}),
              "context_weight_grad_out: out must have shape (", out_channels, ", ", ctx_channels, ", ", k,
              "), got ", out.sizes());
  TORCH_CHECK(fast_layout(taps) && fast_layout(out) && out.scalar_type() == taps.scalar_type(),
              "context_weight_grad_out: taps and out must be contiguous, of one dtype, float32 or float64; got ",
              taps.scalar_type(), " and ", out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(taps.scalar_type(), "context_weight_grad_out_cpu", [&] {
    transpose_taps<scalar_t>(taps.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out_channels * ctx_channels, k,
                             false, true);
  });
}

}  // namespace

// torch's x86 wheels link MKL, which runs its AVX-512 products only on Intel CPUs: on an AMD CPU with AVX-512 (Zen 4,
// Zen 5) it takes its AVX2 kernels while the micro-kernels here run their AVX-512 version. Measured on a Zen 5 VM
// (2 threads, benchmarks/RESULTS.md, session 38): a dense HierTCN layer, b=32, t=21, 128 channels, k=5, forward in
// 285 us through the micro-kernels against 470 us through the BLAS. Elsewhere (Intel, or no AVX-512: the AVX2
// micro-kernels against MKL's AVX2 ones) the BLAS route was the faster one at these sizes.
bool conv_blas_auto_choice() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool choice = [] {
    __builtin_cpu_init();
    return !(__builtin_cpu_supports("avx512f") && __builtin_cpu_is("amd"));
  }();
  return choice;
#else
  return true;
#endif
}

void set_conv_blas_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode == kConvBlasAuto || mode == kConvBlasAlways || mode == kConvBlasNever,
                    "the conv BLAS mode must be 0 (auto), 1 (always) or 2 (never), got ", mode);
  conv_blas_setting.store(mode, std::memory_order_relaxed);
}

int64_t conv_blas_mode() { return conv_blas_setting.load(std::memory_order_relaxed); }

void tcn_step_cpu(const TcnStepParams& p, at::ScalarType dtype) {
  for (int64_t l = 0; l < p.layers; ++l) check_positions(p.layer[l].position, p.batch, l);
  AT_DISPATCH_FLOATING_TYPES(dtype, "tcn_step_cpu", [&] { tcn_step_cpu_kernel<scalar_t>(p); });
}

TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {
  m.impl("causal_conv1d_out", &causal_conv1d_out_cpu);
  m.impl("causal_conv1d_backward_out", &causal_conv1d_backward_out_cpu);
  m.impl("causal_conv1d_step_out", &causal_conv1d_step_out_cpu);
  m.impl("tcn_step_out", &tcn_step_out_cpu);
  m.impl("context_weight_pack_out", &context_weight_pack_out_cpu);
  m.impl("context_weight_grad_out", &context_weight_grad_out_cpu);
}

}  // namespace hiertcn
