// The emulator's controls, and kernels for its own tests, as ops of the emulated library. Written in CUDA's
// syntax: build.py rewrites it as it does csrc/cuda's kernels.

namespace {

// Threads between barriers, and blocks, in descending index order (true) or ascending (false).
void set_reverse(bool reverse) {
  std::lock_guard<std::recursive_mutex> lock(cuda_emu::state().mutex);
  cuda_emu::state().reverse = reverse;
}

// The first launch error that no launch check raised, and forgets it ("" when none).
std::string take_pending_error() {
  std::lock_guard<std::recursive_mutex> lock(cuda_emu::state().mutex);
  std::string error;
  std::swap(error, cuda_emu::state().error);
  return error;
}

// Launches, blocks and barriers run so far.
std::vector<int64_t> counters() {
  const cuda_emu::State& s = cuda_emu::state();
  return {s.launches, s.blocks, s.barriers};
}

// Kernels that break the rules the emulator checks, for its own tests (tests/test_cuda_emulated.py): each
// must be caught.
__global__ void racy_kernel(float* out) {
  __shared__ float cells[64];
  // Each thread writes its cell, then reads its neighbour's without a barrier between: on a GPU the value
  // read depends on which thread ran first; here on the run order.
  cells[threadIdx.x] = static_cast<float>(threadIdx.x) + 0.5f * static_cast<float>(blockIdx.x);
  out[threadIdx.x] = cells[(threadIdx.x + 1) % 64];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const float* values = reinterpret_cast<const float*>(smem);
  out[threadIdx.x] = values[threadIdx.x];  // never written: the emulator's poison (NaN)
}

__global__ void static_shared_kernel(float* out) {
  __shared__ float cells[64];
  out[threadIdx.x] = cells[threadIdx.x];  // never written: the emulator's poison (NaN)
}

// 32 KiB of static shared memory, and the launch's dynamic shared memory: together over 48 KiB with 20 KiB.
__global__ void static_and_dynamic_shared_kernel(float* out) {
  __shared__ float cells[8192];
  extern __shared__ __align__(16) unsigned char smem[];
  cells[threadIdx.x] = 1.0f;
  reinterpret_cast<float*>(smem)[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = cells[threadIdx.x] + reinterpret_cast<const float*>(smem)[threadIdx.x];
}

__global__ void barrier_kernel(float* out) {
  __shared__ float cells[64];
  cells[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = cells[blockDim.x - 1 - threadIdx.x];
}

// Runs one of the kernels above ("racy", "divergent", "shared_poison", "static_shared_poison", "shared_too_big",
// "shared_opt_in", "static_and_dynamic_too_big", "static_and_dynamic_opt_in", "empty_grid", "too_many_threads",
// "barrier") writing into out (float32, contiguous, at least 128 elements), with its launch check; raises what the
// check raises.
void self_test(const std::string& which, at::Tensor out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 128, "out: 128 floats");
  float* data = out.data_ptr<float>();
  if (which == "racy") {
    racy_kernel<<<1, 64>>>(data);
  } else if (which == "divergent") {
    divergent_barrier_kernel<<<1, 64>>>(data);
  } else if (which == "shared_poison") {
    ::cuda_emu::launch(dynamic_shared_kernel, 1, 64, 64 * sizeof(float))(data);
  } else if (which == "static_shared_poison") {
    barrier_kernel<<<1, 64>>>(data);  // leaves its own (other) static array written
    static_shared_kernel<<<1, 64>>>(data);
  } else if (which == "shared_too_big") {
    dynamic_shared_kernel<<<1, 64, 49 * 1024>>>(data);
  } else if (which == "shared_opt_in") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    dynamic_shared_kernel<<<1, 64, 64 * 1024>>>(data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024));
  } else if (which == "static_and_dynamic_too_big") {
    static_and_dynamic_shared_kernel<<<1, 64, 20 * 1024>>>(data);
  } else if (which == "static_and_dynamic_opt_in") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(static_and_dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        20 * 1024));
    static_and_dynamic_shared_kernel<<<1, 64, 20 * 1024>>>(data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "empty_grid") {
    barrier_kernel<<<0, 64>>>(data);
  } else if (which == "too_many_threads") {
    barrier_kernel<<<1, 2048>>>(data);
  } else if (which == "barrier") {
    barrier_kernel<<<2, 64>>>(data);
  } else {
    TORCH_CHECK(false, "unknown self test ", which);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hiertcn_fast_emu, m) {
  m.def("emu_set_reverse(bool reverse) -> ()", &set_reverse);
  m.def("emu_take_pending_error() -> str", &take_pending_error);
  m.def("emu_counters() -> int[]", &counters);
  m.def("emu_self_test(str which, Tensor(a!) out) -> ()", &self_test);
}
