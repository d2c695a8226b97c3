// The test controls of the CUDA emulation (emu_runtime.cpp). Python reaches them through the
// extern "C" fused_adamw_emu_* wrappers at the end of emu_runtime.cpp (ctypes, in
// tests/cuda_emu/build.py), in the same shared library as the emulated fused_adamw `_C`.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace fused_adamw_emu {

// One launch as the launcher made it.
struct LaunchRecord {
  int64_t index;          // launches since the process started (or reset())
  std::string kernel;     // the launch expression's kernel, as written ("adamw_steps_kernel", "fn")
  std::string signature;  // the kernel's parameter types (signature_of)
  int64_t grid;
  int64_t block;
  uint64_t stream;      // the cudaStream_t, as an integer
  int device;           // the current device of the launching host thread at launch time
  int error;            // the cudaError_t the launch produced (0: it ran)
  int64_t blocks_run;   // blocks executed (fewer than grid under set_block_filter)
};

// How the (block, thread) pairs of each launch run:
//   "forward":  block 0 thread 0, block 0 thread 1, ..., block grid-1 thread block-1;
//   "reverse":  the opposite;
//   "shuffle":  every (block, thread) pair in a random order (seeded by seed and the launch);
//   "threads":  on host_threads host threads taking pairs from a shared queue, the queue
//               shuffled as "shuffle" when seed != 0, else forward.
void set_order(const std::string& mode, uint64_t seed, int host_threads);
std::string order();

std::vector<LaunchRecord> launch_log();
void clear_launch_log();

// The fake devices: how many, their SM count and compute capability, the driver version.
void set_device_count(int n);
void set_sm_count(int n);
void set_compute_capability(int major, int minor);
void set_driver_version(int v);

// The calling host thread's current device (cudaGetDevice / cudaSetDevice).
int current_device();
int set_current_device(int device);  // returns the cudaError_t

// Devices whose primary context is active (bit d): what cuDevicePrimaryCtxGetState reports;
// cudaSetDevice(d) sets bit d (CUDA 12+ creates the context there). reset(): device 0 only.
uint64_t contexts();
void set_contexts(uint64_t mask);

// The next call of `site` after `skip` calls returns `code` (once). Sites: "launch",
// "cudaSetDevice", "cudaGetDevice", "cudaGetDeviceCount", "cudaFuncGetAttributes",
// "cudaDeviceGetAttribute".
void inject_error(const std::string& site, int code, int skip);
void clear_injections();

// The launch `nth` launches from now (0: the next one) runs only `blocks` (those < grid).
void set_block_filter(const std::vector<int64_t>& blocks, int nth);

// FUSED_ADAMW_TILE_HOOK calls: (launch index, blockIdx.x, threadIdx.x, tile), recorded while on.
void set_tile_trace(bool on);
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> tile_trace();

// Back to the defaults: 1 device (132 SMs, sm_90), forward order, empty log, no injection,
// no filter, no trace, device 0 current on the calling thread.
void reset();

}  // namespace fused_adamw_emu
