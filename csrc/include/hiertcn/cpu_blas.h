// Row-major matrix products on raw pointers through the BLAS that torch itself links (its Fortran entry
// points sgemm_ / dgemm_, exported by libtorch_cpu when torch uses MKL), for the CPU kernels that issue many
// products on sub-blocks of one buffer: at::mm would build a tensor view, dispatch and check per product. The
// entry points are looked up once at run time; where this torch does not export them, `available()` is false
// and callers use at::mm instead.
#pragma once

#include <dlfcn.h>

#include <cstdint>

namespace hiertcn {
namespace cpu_blas {

template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                        const T*, const int*, const T*, T*, const int*);

template <typename T>
GemmFn<T> lookup(const char* name) {
  // libtorch_cpu is already loaded (this library links it); RTLD_NOLOAD only finds it, never loads anything.
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* symbol = torch_cpu ? dlsym(torch_cpu, name) : nullptr;
  return reinterpret_cast<GemmFn<T>>(symbol);
}

template <typename T>
GemmFn<T> gemm_fn();
template <>
inline GemmFn<float> gemm_fn<float>() {
  static const GemmFn<float> fn = lookup<float>("sgemm_");
  return fn;
}
template <>
inline GemmFn<double> gemm_fn<double>() {
  static const GemmFn<double> fn = lookup<double>("dgemm_");
  return fn;
}

template <typename T>
bool available() {
  return gemm_fn<T>() != nullptr;
}

// C (m x n, row stride ldc) = op(A) (m x k) op(B) (k x n) + beta C, all row-major; op(A) = A^T when trans_a (A
// then stored k x m with row stride lda). Sizes must fit in int (the BLAS's integer type).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same buffers, operands swapped.
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const T one = T(1);
  gemm_fn<T>()(trans_b ? "T" : "N", trans_a ? "T" : "N", &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace cpu_blas
}  // namespace hiertcn
