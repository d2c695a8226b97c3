// Force-included (g++ -include) before kernels/adamw_kernel.cu when that file is compiled as
// host C++ (-x c++) for the CPU emulation of the CUDA kernel (tests/test_kernel_emulation.py).
//
// The execution model: every (block, thread) of a launch runs to completion, one after the
// other or on a few host threads, in an order the test chooses. That is a faithful model of
// the GPU only for a kernel without shared memory, __syncthreads, warp intrinsics or atomics
// (no thread waits for or communicates with another): kernels/adamw_kernel.cu promises that,
// tests/cuda_emu/build.py greps for them before compiling, and this header turns every one of
// them into a compile error with the reason.
//
// What comes from the CUDA toolkit, unchanged: cuda_runtime.h (types: uint4, make_uint4, dim3,
// cudaError_t, the runtime API declarations), cuda_bf16.h and cuda_fp16.h (NVIDIA's own host
// implementations of __float2bfloat16_rn, __float2half_rn, __half2float...). What this header
// adds: the CUDA built-ins the kernel uses (threadIdx, blockIdx, blockDim, gridDim as host
// thread-locals, __ldg, __uint_as_float, __float_as_uint, __launch_bounds__) and
// FUSED_ADAMW_LAUNCH, the kernel's one launch syntax, which hands the grid to the emulator in
// tests/cuda_emu/emu_runtime.cpp. The runtime functions the launcher calls (cudaSetDevice,
// cudaGetLastError, ...) are defined there too, over fake devices.
#pragma once

#if defined(__CUDACC__)
#error "tests/cuda_emu/cuda_emu.h is for host compilers (g++ -x c++), not nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>

// ------------------------------------------------------------------------------------------
// built-ins
// ------------------------------------------------------------------------------------------

// Set by the emulator before each (block, thread) runs; per host thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// The read-only data cache path is a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// cuda_runtime.h declares this C++ overload for nvcc only.
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// ------------------------------------------------------------------------------------------
// what the emulation cannot model: a compile error with the reason
// ------------------------------------------------------------------------------------------

#define FUSED_ADAMW_EMU_REFUSE(what)                                                          \
  ([]() {                                                                                     \
    static_assert(sizeof(int) == 0,                                                           \
                  "tests/cuda_emu: the kernel uses " what                                     \
                  ", which the CPU emulation cannot model: it runs every (block, thread) to " \
                  "completion in some order, so threads must not share memory, wait for or "  \
                  "talk to each other");                                                      \
  }(),                                                                                        \
   0)

// A declaration specifier: valid at namespace and at block scope.
#undef __shared__
#define __shared__                                                                      \
  static_assert(sizeof(int) == 0,                                                       \
                "tests/cuda_emu: the kernel uses __shared__ memory, which the CPU "     \
                "emulation cannot model: it runs every (block, thread) to completion in " \
                "some order, so threads must not share memory, wait for or talk to each " \
                "other");
#define __syncthreads(...) FUSED_ADAMW_EMU_REFUSE("__syncthreads")
#define __syncthreads_count(...) FUSED_ADAMW_EMU_REFUSE("__syncthreads_count")
#define __syncthreads_and(...) FUSED_ADAMW_EMU_REFUSE("__syncthreads_and")
#define __syncthreads_or(...) FUSED_ADAMW_EMU_REFUSE("__syncthreads_or")
#define __syncwarp(...) FUSED_ADAMW_EMU_REFUSE("__syncwarp")
#define __shfl(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl)")
#define __shfl_up(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_up)")
#define __shfl_down(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_down)")
#define __shfl_xor(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_xor)")
#define __shfl_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_sync)")
#define __shfl_up_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_up_sync)")
#define __shfl_down_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_down_sync)")
#define __shfl_xor_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp shuffle (__shfl_xor_sync)")
#define __ballot(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__ballot)")
#define __ballot_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__ballot_sync)")
#define __any(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__any)")
#define __all(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__all)")
#define __any_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__any_sync)")
#define __all_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__all_sync)")
#define __uni_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp vote (__uni_sync)")
#define __activemask(...) FUSED_ADAMW_EMU_REFUSE("__activemask")
#define __match_any_sync(...) FUSED_ADAMW_EMU_REFUSE("__match_any_sync")
#define __match_all_sync(...) FUSED_ADAMW_EMU_REFUSE("__match_all_sync")
#define __reduce_add_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __reduce_min_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __reduce_max_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __reduce_and_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __reduce_or_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __reduce_xor_sync(...) FUSED_ADAMW_EMU_REFUSE("a warp reduction (__reduce_*_sync)")
#define __threadfence(...) FUSED_ADAMW_EMU_REFUSE("__threadfence")
#define __threadfence_block(...) FUSED_ADAMW_EMU_REFUSE("__threadfence_block")
#define __threadfence_system(...) FUSED_ADAMW_EMU_REFUSE("__threadfence_system")
#define atomicAdd(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicAdd)")
#define atomicSub(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicSub)")
#define atomicExch(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicExch)")
#define atomicMin(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicMin)")
#define atomicMax(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicMax)")
#define atomicInc(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicInc)")
#define atomicDec(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicDec)")
#define atomicCAS(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicCAS)")
#define atomicAnd(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicAnd)")
#define atomicOr(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicOr)")
#define atomicXor(...) FUSED_ADAMW_EMU_REFUSE("an atomic (atomicXor)")

// ------------------------------------------------------------------------------------------
// launches
// ------------------------------------------------------------------------------------------

namespace fused_adamw_emu {

// Runs `body` once per (block, thread) of a grid x block launch in the order set by the test
// (emu_runtime.cpp), after recording the launch and the current device. An injected error, or
// an invalid configuration as CUDA would reject it, runs nothing and is returned by the next
// cudaGetLastError, as a failed <<<>>> launch.
void launch(const char* kernel, const char* signature, int64_t grid, int64_t block,
            cudaStream_t stream, const std::function<void()>& body);

// The kernel's parameter types, as text (tells the steps kernel from the update kernel).
template <typename... Args>
const char* signature_of(void (*)(Args...)) {
  return __PRETTY_FUNCTION__;
}

// kernels/adamw_kernel.cu's FUSED_ADAMW_TILE_HOOK: records (launch, block, tile) when tracing.
void on_tile(int64_t tile);

}  // namespace fused_adamw_emu

// `kernel` is a function name or a function pointer; the arguments are evaluated per
// (block, thread), as each GPU thread reads its own copy of the kernel parameters.
#define FUSED_ADAMW_LAUNCH(kernel, grid, block, stream, ...)                                 \
  ::fused_adamw_emu::launch(#kernel, ::fused_adamw_emu::signature_of(kernel), (grid), (block), \
                            (stream), [&]() { kernel(__VA_ARGS__); })

#define FUSED_ADAMW_TILE_HOOK(tile) ::fused_adamw_emu::on_tile(tile)
