// A CPU emulator for this project's CUDA kernels, for the tests only (tests/cuda_emu/build.py).
//
// No GPU has run the kernels of csrc/cuda/. This header lets their source, unchanged but for the
// rewrites build.py makes (the launch syntax, the CUDA includes, the dispatch key), compile as C++
// and run on CPU tensors, so that their indexing, tiling, shared memory and barriers are tested on
// every machine:
//   - every CUDA thread of a block is a fiber with its own stack; __syncthreads() switches back to the
//     block's scheduler, which resumes the next fiber; a barrier completes when every
//     live thread of the block has reached it, the exited ones counting as arrived;
//   - the threads between two barriers run one after another in the order set_order() names
//     (ascending, or descending thread and block indices): a kernel that reads what another thread
//     of the same barrier interval writes gives different results in the two orders;
//   - all threads of a block that reach a barrier in the same round must be at the same
//     __syncthreads() (file and line), else the launch fails (a divergent barrier hangs or is
//     undefined on a GPU);
//   - a block's shared memory, dynamic and static, starts filled with 0xFF bytes (NaN in float and double),
//     and 64 KiB of 0xFF bytes after the dynamic part must stay so (a write past it fails the launch);
//   - the GRU drivers' CUDA branches may not call what only their CPU branches may (at::cpu::, the CPU
//     launchers): build.py makes such a call raise;
//   - a launch checks what the CUDA runtime refuses: an empty grid, more than 1024 threads a block,
//     grid limits, more than 48 KiB of shared memory (dynamic and static together) without
//     cudaFuncSetAttribute's opt-in, more than the opt-in limit. The error is raised by the launch check
//     that follows the launch (C10_CUDA_KERNEL_LAUNCH_CHECK), or, if none does, by the next launch and
//     by pending_error().
// Blocks run one at a time, so a kernel's static arrays (its __shared__ ones, rewritten by build.py) are its
// block's shared memory.
// Not emulated: warps (no kernel here uses warp intrinsics), atomics, streams (everything is
// synchronous), device math intrinsics (the headers take their host paths without __CUDA_ARCH__).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's min and max for device code, for the kernels' operands of one type.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace cuda_emu {

constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr int kOptInSharedLimit = 227 * 1024;  // sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedCanary = 64 * 1024;  // 0xFF bytes after a launch's dynamic shared memory, checked per block

struct Fiber {
  ucontext_t context;  // its first entry
  void* resume[5];     // where it waits at a barrier (__builtin_setjmp's buffer)
  std::unique_ptr<char[]> stack;
  bool started = false;
  bool done = false;
  int64_t barriers = 0;
  const char* file = "";
  int line = 0;
};

struct State {
  std::recursive_mutex mutex;  // one launch at a time (the kernels' static shared arrays are global)
  bool reverse = false;
  std::vector<Fiber> fibers;
  void* scheduler[5];  // the block's scheduler, waiting for the running fiber (__builtin_setjmp's buffer)
  int current = -1;
  std::function<void()> body;
  std::vector<unsigned char> dynamic_shared;  // 16-byte aligned start below
  std::map<const void*, int> opt_in;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  size_t launch_dynamic = 0;          // the running launch's dynamic shared memory, bytes
  int launch_opt_in = -1;             // its kernel's opt-in (MaxDynamicSharedMemorySize), -1 if none
  std::map<void*, size_t> launch_static;  // the static __shared__ arrays its threads have reached, and their bytes
  std::string error;                  // the first launch error not yet raised
  bool block_failed = false;
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t barriers = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline void fail(const std::string& message) {
  State& s = state();
  if (s.error.empty()) s.error = message;
}

// Switching between fibers: a fiber's first entry through setcontext, every later switch (to a barrier and
// back) through GCC's __builtin_setjmp / __builtin_longjmp, which save and restore only the registers the
// switch needs: swapcontext's signal mask system calls made the emulator several times slower. A jump is
// made from a function of its own (GCC's rule for __builtin_longjmp).
[[gnu::noinline]] inline void jump_to(void** buffer) { __builtin_longjmp(buffer, 1); }

inline void fiber_main() {
  State& s = state();
  s.body();
  s.fibers[s.current].done = true;
  jump_to(s.scheduler);
}

[[gnu::noinline]] inline void syncthreads(const char* file, int line) {
  State& s = state();
  Fiber& f = s.fibers[s.current];
  f.file = file;
  f.line = line;
  ++f.barriers;
  ++s.barriers;
  if (__builtin_setjmp(f.resume) == 0) jump_to(s.scheduler);
}

// Runs fiber i until it reaches a barrier or ends.
[[gnu::noinline]] inline void resume(int64_t i) {
  State& s = state();
  Fiber& f = s.fibers[i];
  s.current = static_cast<int>(i);
  if (__builtin_setjmp(s.scheduler) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.context);
    }
    jump_to(f.resume);
  }
}

// A kernel's static __shared__ array (build.py rewrites each declaration into a static array and a call of this):
// filled with 0xFF bytes when the first thread of a block reaches its declaration, as dynamic shared memory is.
// Its bytes count toward the launch's shared memory, as on a GPU: static and dynamic together at most 48 KiB,
// or the opt-in limit for a kernel that opted in, and static alone at most 48 KiB. (An array counts once a thread
// reaches its declaration; on a GPU every static array of the kernel counts.)
inline void poison_static_shared(void* array, size_t bytes) {
  State& s = state();
  if (s.launch_static.emplace(array, bytes).second) {
    size_t total = 0;
    for (const auto& entry : s.launch_static) total += entry.second;
    if (total > kDefaultDynamicShared)
      fail("kernel launch with " + std::to_string(total) + " bytes of static shared memory, more than 48 KiB");
    else if (s.launch_opt_in < 0 && total + s.launch_dynamic > kDefaultDynamicShared)
      fail("kernel launch with " + std::to_string(total) + " bytes of static and " + std::to_string(s.launch_dynamic) +
           " of dynamic shared memory, more than 48 KiB together (beyond it a kernel must opt in with "
           "cudaFuncSetAttribute)");
    else if (s.launch_opt_in >= 0 && total + s.launch_opt_in > kOptInSharedLimit)
      fail("kernel launch with " + std::to_string(total) + " bytes of static shared memory and an opt-in of " +
           std::to_string(s.launch_opt_in) + " dynamic, more than the " + std::to_string(kOptInSharedLimit) +
           " a block may have");
  }
  static std::map<void*, int64_t> poisoned;  // array -> the block (serial number) it was last filled for
  int64_t& block = poisoned[array];
  if (block != state().blocks) {
    block = state().blocks;
    std::memset(array, 0xFF, bytes);
  }
}

inline void* dynamic_shared() {
  State& s = state();
  auto address = reinterpret_cast<uintptr_t>(s.dynamic_shared.data());
  return reinterpret_cast<void*>((address + 15) & ~uintptr_t{15});
}

inline dim3 unflatten(int64_t i, const dim3& d) {
  return dim3(static_cast<unsigned>(i % d.x), static_cast<unsigned>((i / d.x) % d.y),
              static_cast<unsigned>(i / (int64_t{d.x} * d.y)));
}

// Runs one block of n threads through s.body.
inline void run_block(int64_t n) {
  State& s = state();
  if (static_cast<int64_t>(s.fibers.size()) < n) s.fibers.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    f.started = false;
    f.done = false;
    f.barriers = 0;
    f.file = "";
    f.line = 0;
  }
  std::fill(s.dynamic_shared.begin(), s.dynamic_shared.end(), static_cast<unsigned char>(0xFF));
  for (;;) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = s.reverse ? n - 1 - k : k;
      if (s.fibers[i].done) continue;
      threadIdx = unflatten(i, blockDim);
      resume(i);
    }
    const Fiber* first = nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const Fiber& f = s.fibers[i];
      if (f.done) continue;
      if (first == nullptr) {
        first = &f;
      } else if (f.barriers != first->barriers || f.line != first->line || std::strcmp(f.file, first->file) != 0) {
        fail("divergent __syncthreads in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
             "): thread " + std::to_string(&f - s.fibers.data()) + " waits at " + f.file + ":" +
             std::to_string(f.line) + " (barrier " + std::to_string(f.barriers) + "), thread " +
             std::to_string(first - s.fibers.data()) + " at " + first->file + ":" + std::to_string(first->line) +
             " (barrier " + std::to_string(first->barriers) + ")");
        s.block_failed = true;
        return;  // the block's fibers are abandoned; their stacks are reset by the next block
      }
    }
    if (first == nullptr) return;
  }
}

inline std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;

  template <typename... Args>
  void operator()(Args&&... args) const {
    State& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mutex);
    if (!s.error.empty()) return;  // an unchecked earlier failure: raised by the next check
    ++s.launches;
    const int64_t threads = int64_t{block.x} * block.y * block.z;
    const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
    std::string bad;
    if (blocks == 0) bad = "an empty grid " + dims(grid) + " (invalid configuration argument)";
    if (threads == 0 || threads > 1024 || block.z > 64) bad = "a block of " + dims(block) + " threads";
    if (grid.y > 65535 || grid.z > 65535) bad = "a grid of " + dims(grid) + " blocks (y and z at most 65535)";
    const auto opt_in = s.opt_in.find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = opt_in == s.opt_in.end() ? kDefaultDynamicShared : static_cast<size_t>(opt_in->second);
    if (shared > allowed)
      bad = std::to_string(shared) + " bytes of dynamic shared memory, more than the " + std::to_string(allowed) +
            " allowed (beyond 48 KiB a kernel must opt in with cudaFuncSetAttribute)";
    if (!bad.empty()) {
      fail("kernel launch with " + bad);
      return;
    }
    std::tuple<std::decay_t<Args>...> copied(std::forward<Args>(args)...);  // by value, as CUDA passes them
    s.body = [this, &copied] { std::apply(kernel, copied); };
    s.dynamic_shared.assign(shared + 16 + kSharedCanary, 0);
    s.launch_dynamic = shared;
    s.launch_opt_in = opt_in == s.opt_in.end() ? -1 : opt_in->second;
    s.launch_static.clear();
    gridDim = grid;
    blockDim = block;
    for (int64_t k = 0; k < blocks && !s.block_failed; ++k) {
      blockIdx = unflatten(s.reverse ? blocks - 1 - k : k, grid);
      ++s.blocks;
      run_block(threads);
      const auto* end = static_cast<const unsigned char*>(dynamic_shared()) + shared;
      const auto* buffer_end = s.dynamic_shared.data() + s.dynamic_shared.size();
      if (std::any_of(end, buffer_end, [](unsigned char c) { return c != 0xFF; })) {
        fail("a write past the " + std::to_string(shared) + " bytes of dynamic shared memory of the launch");
        break;
      }
    }
    s.block_failed = false;
    s.body = nullptr;
  }
};

template <typename... Params, typename Grid, typename Block>
Launch<Params...> launch(void (*kernel)(Params...), Grid grid, Block block, size_t shared = 0, void* = nullptr) {
  return Launch<Params...>{kernel, dim3(grid), dim3(block), shared};
}

// Raises (as a c10::Error) the first launch error not raised yet, and forgets it.
inline void check_launch() {
  State& s = state();
  std::string error;
  std::swap(error, s.error);
  TORCH_CHECK(error.empty(), "CUDA emulator: ", error);
}

// A CPU-only call (at::cpu::, a CPU launcher) reached on the drivers' CUDA path: on a GPU it would get device pointers.
[[noreturn]] inline void forbid(const char* what) {
  TORCH_CHECK(false, "CUDA emulator: the CUDA path of the GRU drivers called the CPU-only ", what);
}
namespace host_only {
inline at::Tensor& mm_out(at::Tensor& out, const at::Tensor&, const at::Tensor&) { forbid("at::cpu::mm_out"); }
inline at::Tensor& addmm_out(at::Tensor& out, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  forbid("at::cpu::addmm_out");
}
inline at::Tensor& add_out(at::Tensor& out, const at::Tensor&, const at::Tensor&) { forbid("at::cpu::add_out"); }
inline at::Tensor& sum_out(at::Tensor& out, const at::Tensor&, at::OptionalIntArrayRef) { forbid("at::cpu::sum_out"); }
}  // namespace host_only

// The GRU drivers (csrc/cpu/gru_recurrence.cpp) branch on the device: built for the emulator, every tensor
// takes the CUDA branches.
template <typename T>
inline bool on_cpu(const T&) {
  return false;
}
template <typename T>
inline bool on_cuda(const T&) {
  return true;
}

}  // namespace cuda_emu

// The CUDA runtime and ATen/c10 CUDA calls the kernels' host code makes.
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) return 1;
  *value = cuda_emu::kOptInSharedLimit;
  return cudaSuccess;
}

template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > cuda_emu::kOptInSharedLimit)
    return 1;
  cuda_emu::state().opt_in[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

namespace at::cuda {
struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace c10::cuda

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA emulator: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::check_launch()

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
