// The one-pass AdamW kernel over a flat bucket, and its launcher.
//
// One launch per bucket. Blocks stride over the tiles table (kernels/adamw_params.h); each
// tile is a range of one param, a whole number of 16-byte vectors. Per tile a block reads the
// tile row, skips it when the param is inactive, reads its group's hyperparameters and
// computes the bias corrections once (adamw_scalars, in registers), then walks the tile in
// 16-byte vectors (4 x fp32 or 8 x bf16/fp16) calling adamw_update per element in float and
// storing back with round-to-nearest-even. 64-bit indices everywhere; no atomics (tiles are
// disjoint).
//
// Register and spill counts (nvcc -Xptxas -v): kernels/NOTES.md.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "adamw_kernel.h"
#include "adamw_math.cuh"
#include "adamw_params.h"
#include "adamw_tile.cuh"

#ifndef FUSED_ADAMW_CUDA_ARCHS
#define FUSED_ADAMW_CUDA_ARCHS "unknown"
#endif

namespace fused_adamw {
namespace {

constexpr int kThreads = 256;
// NOTE on occupancy: at most 64 registers, so 4 blocks of 256 fit an SM (50% occupancy on
// sm_80/sm_90). Without the bound a harmless-looking refactor (tile setup moved into
// adamw_tile.cuh) took fp16+amsgrad from 64 to 78 registers and 3 blocks per SM, the creep
// that halved torch's fused AdamW occupancy (pytorch PR #123566). ptxas -v: no spills.
constexpr int kMinBlocksPerSm = 4;
constexpr int kMaxDevices = 64;

// ------------------------------------------------------------------------------------------
// 16-byte vectors <-> float[N]
// ------------------------------------------------------------------------------------------

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[N]) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[N]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

// Two 16-bit elements per 32-bit word, element 2k in the low half (little endian).
template <typename Half16>
struct Vec16 {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[N]) {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = Half16::to_float(static_cast<unsigned short>(w[k] & 0xffffu));
      f[2 * k + 1] = Half16::to_float(static_cast<unsigned short>(w[k] >> 16));
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[N]) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<unsigned int>(Half16::from_float(f[2 * k])) |
             (static_cast<unsigned int>(Half16::from_float(f[2 * k + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

struct BF16Bits {
  __device__ __forceinline__ static float to_float(unsigned short b) {
    return __uint_as_float(static_cast<unsigned int>(b) << 16);  // exact
  }
  __device__ __forceinline__ static unsigned short from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

struct F16Bits {
  __device__ __forceinline__ static float to_float(unsigned short b) {
    return __half2float(__ushort_as_half(b));  // exact
  }
  __device__ __forceinline__ static unsigned short from_float(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

template <>
struct Vec<__nv_bfloat16> : Vec16<BF16Bits> {};
template <>
struct Vec<__half> : Vec16<F16Bits> {};

// ------------------------------------------------------------------------------------------
// the kernel
// ------------------------------------------------------------------------------------------

// One tile [start, end) of one param. AMSGRAD: this param's group uses amsgrad (then, and only
// then, max_exp_avg_sq is read and written).
template <typename T, bool AMSGRAD>
__device__ __forceinline__ void adamw_tile(const AdamWParams& p, int64_t start, int64_t end,
                                           AdamWScalars s) {
  using V = Vec<T>;
  constexpr int N = V::N;
  s.amsgrad = AMSGRAD;  // a compile-time constant from here on
  uint4* __restrict__ param = reinterpret_cast<uint4*>(p.param);
  const uint4* __restrict__ grad = reinterpret_cast<const uint4*>(p.grad);
  uint4* __restrict__ exp_avg = reinterpret_cast<uint4*>(p.exp_avg);
  uint4* __restrict__ exp_avg_sq = reinterpret_cast<uint4*>(p.exp_avg_sq);
  uint4* __restrict__ max_exp_avg_sq = reinterpret_cast<uint4*>(p.max_exp_avg_sq);
  const int64_t v_end = end / N;  // start and end are multiples of N (whole 16-byte vectors)

  for (int64_t v = start / N + threadIdx.x; v < v_end; v += kThreads) {
    // -------------------------------- load --------------------------------
    const uint4 rp = param[v];
    const uint4 rg = __ldg(grad + v);
    const uint4 rm = exp_avg[v];
    const uint4 rv = exp_avg_sq[v];
    uint4 rx = make_uint4(0, 0, 0, 0);
    if (AMSGRAD) rx = max_exp_avg_sq[v];
    float fp[N], fg[N], fm[N], fv[N], fx[N];
    V::unpack(rp, fp);
    V::unpack(rg, fg);
    V::unpack(rm, fm);
    V::unpack(rv, fv);
    if (AMSGRAD) V::unpack(rx, fx);
    // ------------------------------- compute ------------------------------
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float unused = 0.0f;
      adamw_update(fp[k], fg[k], fm[k], fv[k], AMSGRAD ? fx[k] : unused, s);
    }
    // -------------------------------- store -------------------------------
    param[v] = V::pack(fp);
    exp_avg[v] = V::pack(fm);
    exp_avg_sq[v] = V::pack(fv);
    if (AMSGRAD) max_exp_avg_sq[v] = V::pack(fx);
  }
}

// HAS_MAX: the bucket has a max_exp_avg_sq buffer (some group uses amsgrad).
template <typename T, bool HAS_MAX>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    adamw_kernel(const AdamWParams p) {  // every pointer a device pointer; see adamw_params.h
  for (int64_t tile = blockIdx.x; tile < p.n_tiles; tile += gridDim.x) {
    TileWork w;
    if (!tile_work(p, tile, HAS_MAX, w)) continue;  // no grad in this step: torch skips it
    if (HAS_MAX && w.s.amsgrad) {
      adamw_tile<T, true>(p, w.start, w.end, w.s);
    } else {
      adamw_tile<T, false>(p, w.start, w.end, w.s);
    }
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------

using KernelFn = void (*)(AdamWParams);

KernelFn kernel_for(DType dtype, bool has_max) {
  switch (dtype) {
    case DType::kFloat32:
      return has_max ? adamw_kernel<float, true> : adamw_kernel<float, false>;
    case DType::kBFloat16:
      return has_max ? adamw_kernel<__nv_bfloat16, true> : adamw_kernel<__nv_bfloat16, false>;
    case DType::kFloat16:
      return has_max ? adamw_kernel<__half, true> : adamw_kernel<__half, false>;
  }
  return nullptr;
}

constexpr KernelFn kAllKernels[] = {
    adamw_kernel<float, false>,         adamw_kernel<float, true>,
    adamw_kernel<__nv_bfloat16, false>, adamw_kernel<__nv_bfloat16, true>,
    adamw_kernel<__half, false>,        adamw_kernel<__half, true>,
};

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// Makes `device` current for this scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&prev_);
    if (err_ == cudaSuccess && prev_ != device) {
      err_ = cudaSetDevice(device);
      switched_ = err_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }

 private:
  int prev_ = 0;
  bool switched_ = false;
  cudaError_t err_;
};

// Resident blocks the grid is sized to, per device and kernel: SMs x blocks per SM. Queried
// once (the occupancy API costs microseconds), then read without a driver call.
int grid_limit(int device, DType dtype, bool has_max, KernelFn fn) {
  static std::mutex mutex;
  static int cache[kMaxDevices][6] = {};
  const int k = static_cast<int>(dtype) * 2 + (has_max ? 1 : 0);
  if (device < 0 || device >= kMaxDevices) return 0;
  std::lock_guard<std::mutex> lock(mutex);
  if (cache[device][k] == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();  // clear; the launch reports what is wrong
      return 1024;
    }
    cache[device][k] = sms * (per_sm > 0 ? per_sm : 1);
  }
  return cache[device][k];
}

}  // namespace

std::string launch_adamw_cuda(const AdamWParams& p, int device, std::uintptr_t stream) {
  if (p.n_tiles <= 0) return "";
  KernelFn fn = kernel_for(p.dtype, p.max_exp_avg_sq != nullptr);
  if (fn == nullptr) return "launch_adamw_cuda: unknown dtype code " +
                            std::to_string(static_cast<int>(p.dtype));
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return cuda_error("cudaSetDevice", guard.error());
  const int64_t limit = grid_limit(device, p.dtype, p.max_exp_avg_sq != nullptr, fn);
  const unsigned int grid = static_cast<unsigned int>(p.n_tiles < limit ? p.n_tiles : limit);
  fn<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("adamw_kernel launch", err);
  return "";
}

std::string cuda_device_error(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error("cudaGetDeviceCount", err);
  }
  if (device < 0 || device >= count) {
    return "device index " + std::to_string(device) + " out of range (" +
           std::to_string(count) + " devices)";
  }
  if (device >= kMaxDevices) return "device index " + std::to_string(device) + " >= 64";
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return cuda_error("cudaSetDevice", guard.error());
  for (KernelFn fn : kAllKernels) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, fn);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return "the kernel cannot run on sm_" + std::to_string(major * 10 + minor) +
             " (compiled for " FUSED_ADAMW_CUDA_ARCHS "): " +
             cuda_error("cudaFuncGetAttributes", err);
    }
  }
  return "";
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace fused_adamw
