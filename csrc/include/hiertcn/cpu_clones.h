// Include first in a CPU kernel file whose element-wise loops must vectorise (gru_gates.cpp,
// softmax_xent.cpp).
//
// GCC if-converts the clamps in exp_poly (hiertcn/gru_gates.h), and so vectorises the loops, only when
// floating-point comparisons may not trap; nothing here reads the floating-point exception flags.
//
// HIERTCN_CPU_VERSIONS(ret, name, params, call) defines the non-template function `ret name params` three times,
// for AVX-512, for AVX2 with FMA, and for the baseline, each with the body `return call;` (GCC's function
// multiversioning: the running CPU's version is picked at load time). call is typically an always-inline
// template, which each version compiles for its instruction set. The build flags target the baseline x86-64,
// whose 4-wide SSE loops run the element-wise math three to four times slower than AVX2's.
// GCC's target_clones cannot make the AVX2 version: it makes one clone per comma-separated name, so
// target_clones("avx2,fma") is an AVX2 clone without FMA and an AVX clone with it, and an AVX2 CPU ran the
// former (each polynomial step a multiply and an add in turn). Function multiversioning does not take
// templates, hence the macro.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#ifndef HIERTCN_ALWAYS_INLINE
#define HIERTCN_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HIERTCN_CPU_VERSIONS(ret, name, params, call) \
  __attribute__((target("avx512f"))) ret name params { \
    return call;                                        \
  }                                                     \
  __attribute__((target("avx2,fma"))) ret name params { \
    return call;                                        \
  }                                                     \
  __attribute__((target("default"))) ret name params { \
    return call;                                        \
  }
#else
#define HIERTCN_CPU_VERSIONS(ret, name, params, call) \
  ret name params { return call; }
#endif
