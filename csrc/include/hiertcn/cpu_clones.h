// Include first in a CPU kernel file whose element-wise loops must vectorise (gru_gates.cpp,
// softmax_xent.cpp).
//
// GCC if-converts the clamps in exp_poly (hiertcn/gru_gates.h), and so vectorises the loops, only when
// floating-point comparisons may not trap; nothing here reads the floating-point exception flags.
//
// HIERTCN_CPU_CLONES compiles a function for AVX-512, AVX2 and the baseline, picked at load time for the CPU
// at hand (GCC target_clones): the build flags target the baseline x86-64, whose 4-wide SSE loops run the
// element-wise math three to four times slower. (target_clones makes a clone per comma-separated name, so
// "avx2,fma" is an AVX2 clone and an AVX-with-FMA one, not one with both; an AVX2 CPU runs the AVX2 clone, without
// FMA. The dense conv kernels, whose register blocks depend on the vector width, use function multiversioning
// instead: csrc/cpu/causal_conv.cpp, HIERTCN_DENSE_VERSIONS.)
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HIERTCN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define HIERTCN_CPU_CLONES
#endif
