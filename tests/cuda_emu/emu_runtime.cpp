// The CPU emulation's runtime: CUDA's built-in index variables, the grid runner behind
// FUSED_ADAMW_LAUNCH, and the CUDA runtime functions kernels/adamw_kernel.cu's launcher calls,
// over fake devices. Test controls: emu_control.h. No CUDA library is linked: the toolkit's
// headers declare these functions and this file defines them.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_emu.h"
#include "emu_control.h"

#include <cstdio>
#include <sstream>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace fused_adamw_emu {
namespace {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxBlockThreads = 1024;

struct State {
  std::mutex mu;
  std::string order = "forward";
  uint64_t seed = 0;
  int host_threads = 1;
  int device_count = 1;
  int sm_count = 132;
  int cc_major = 9, cc_minor = 0;
  int driver_version = CUDART_VERSION;
  int64_t launches = 0;
  std::vector<LaunchRecord> log;
  std::vector<std::tuple<std::string, int, int>> injections;  // site, code, skip
  int64_t filter_launch = -1;
  std::vector<int64_t> filter_blocks;
  std::atomic<bool> trace_on{false};
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> trace;
  int64_t current_launch = -1;
  // Devices whose primary context is active (bit d), as the driver reports them to
  // cuDevicePrimaryCtxGetState; cudaSetDevice activates one, as CUDA 12+ does.
  uint64_t contexts = 1;
};

State& state() {
  static State* s = new State();  // never destroyed: launches may outlive static destruction
  return *s;
}

thread_local int tl_device = 0;
thread_local cudaError_t tl_last_error = cudaSuccess;

// The injected error for `site`, if one is due (consumes it).
cudaError_t injected(const char* site) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto it = s.injections.begin(); it != s.injections.end(); ++it) {
    if (std::get<0>(*it) != site) continue;
    if (std::get<2>(*it) > 0) {
      --std::get<2>(*it);
      return cudaSuccess;
    }
    const int code = std::get<1>(*it);
    s.injections.erase(it);
    return static_cast<cudaError_t>(code);
  }
  return cudaSuccess;
}

cudaError_t fail(cudaError_t err) {
  if (err != cudaSuccess) tl_last_error = err;
  return err;
}

int device_count() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.device_count;
}

void set_indices(int64_t grid, int64_t block, int64_t b, int64_t t) {
  gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  blockIdx = make_uint3(static_cast<unsigned>(b), 0, 0);
  threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// the grid runner
// ------------------------------------------------------------------------------------------

void launch(const char* kernel, const char* signature, int64_t grid, int64_t block,
            cudaStream_t stream, const std::function<void()>& body) {
  State& s = state();
  LaunchRecord rec;
  rec.kernel = kernel;
  rec.signature = signature;
  rec.grid = grid;
  rec.block = block;
  rec.stream = static_cast<uint64_t>(reinterpret_cast<std::uintptr_t>(stream));
  rec.device = tl_device;
  rec.error = cudaSuccess;
  rec.blocks_run = 0;
  std::vector<int64_t> blocks;
  bool filtered = false;
  std::string order;
  uint64_t seed;
  int host_threads;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    rec.index = s.launches++;
    if (rec.index == s.filter_launch) {
      filtered = true;
      for (int64_t b : s.filter_blocks) {
        if (b >= 0 && b < grid) blocks.push_back(b);
      }
      s.filter_launch = -1;
    }
    order = s.order;
    seed = s.seed;
    host_threads = s.host_threads;
    s.current_launch = rec.index;
  }
  cudaError_t err = injected("launch");
  if (err == cudaSuccess &&
      (grid < 1 || grid > kMaxGridX || block < 1 || block > kMaxBlockThreads)) {
    err = cudaErrorInvalidConfiguration;
  }
  if (err == cudaSuccess && (tl_device < 0 || tl_device >= device_count())) {
    err = cudaErrorInvalidDevice;
  }
  if (err != cudaSuccess) {
    rec.error = err;
    tl_last_error = err;
    std::lock_guard<std::mutex> lock(s.mu);
    s.log.push_back(rec);
    return;
  }
  if (!filtered) {
    blocks.resize(static_cast<size_t>(grid));
    for (int64_t b = 0; b < grid; ++b) blocks[static_cast<size_t>(b)] = b;
  }
  rec.blocks_run = static_cast<int64_t>(blocks.size());

  if (order == "forward" || order == "reverse") {
    const bool rev = order == "reverse";
    const int64_t nb = static_cast<int64_t>(blocks.size());
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t b = blocks[static_cast<size_t>(rev ? nb - 1 - i : i)];
      for (int64_t j = 0; j < block; ++j) {
        set_indices(grid, block, b, rev ? block - 1 - j : j);
        body();
      }
    }
  } else {
    std::vector<std::pair<int64_t, int64_t>> pairs;
    pairs.reserve(blocks.size() * static_cast<size_t>(block));
    for (int64_t b : blocks) {
      for (int64_t t = 0; t < block; ++t) pairs.emplace_back(b, t);
    }
    if (order == "shuffle" || seed != 0) {
      std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(rec.index));
      std::shuffle(pairs.begin(), pairs.end(), rng);
    }
    if (order == "shuffle" || host_threads <= 1) {
      for (const auto& bt : pairs) {
        set_indices(grid, block, bt.first, bt.second);
        body();
      }
    } else {
      std::atomic<size_t> next{0};
      auto worker = [&]() {
        for (size_t i = next.fetch_add(1); i < pairs.size(); i = next.fetch_add(1)) {
          set_indices(grid, block, pairs[i].first, pairs[i].second);
          body();
        }
      };
      std::vector<std::thread> pool;
      for (int h = 1; h < host_threads; ++h) pool.emplace_back(worker);
      worker();
      for (auto& th : pool) th.join();
    }
  }
  std::lock_guard<std::mutex> lock(s.mu);
  s.log.push_back(rec);
}

void on_tile(int64_t tile) {
  State& s = state();
  if (!s.trace_on.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(s.mu);
  s.trace.emplace_back(s.current_launch, static_cast<int64_t>(blockIdx.x),
                       static_cast<int64_t>(threadIdx.x), tile);
}

// ------------------------------------------------------------------------------------------
// test controls (emu_control.h)
// ------------------------------------------------------------------------------------------

void set_order(const std::string& mode, uint64_t seed, int host_threads) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.order = mode;
  s.seed = seed;
  s.host_threads = host_threads < 1 ? 1 : host_threads;
}

std::string order() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.order;
}

std::vector<LaunchRecord> launch_log() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.log;
}

void clear_launch_log() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.log.clear();
}

void set_device_count(int n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.device_count = n;
}

void set_sm_count(int n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.sm_count = n;
}

void set_compute_capability(int major, int minor) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.cc_major = major;
  s.cc_minor = minor;
}

void set_driver_version(int v) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.driver_version = v;
}

int current_device() { return tl_device; }

uint64_t contexts() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.contexts;
}

void set_contexts(uint64_t mask) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.contexts = mask;
}

int set_current_device(int device) { return static_cast<int>(cudaSetDevice(device)); }

void inject_error(const std::string& site, int code, int skip) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.injections.emplace_back(site, code, skip);
}

void clear_injections() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.injections.clear();
}

void set_block_filter(const std::vector<int64_t>& blocks, int nth) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.filter_launch = s.launches + (nth < 0 ? 0 : nth);
  s.filter_blocks = blocks;
}

void set_tile_trace(bool on) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.trace.clear();
  s.trace_on.store(on);
}

std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> tile_trace() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.trace;
}

void reset() {
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.order = "forward";
    s.seed = 0;
    s.host_threads = 1;
    s.device_count = 1;
    s.sm_count = 132;
    s.cc_major = 9;
    s.cc_minor = 0;
    s.driver_version = CUDART_VERSION;
    s.launches = 0;
    s.log.clear();
    s.injections.clear();
    s.filter_launch = -1;
    s.filter_blocks.clear();
    s.trace_on.store(false);
    s.trace.clear();
    s.current_launch = -1;
    s.contexts = 1;  // device 0 in use, as in a process that has touched cuda:0
  }
  tl_device = 0;
  tl_last_error = cudaSuccess;
}

}  // namespace fused_adamw_emu

// ------------------------------------------------------------------------------------------
// the CUDA runtime functions the launcher calls, over the fake devices
// ------------------------------------------------------------------------------------------

using fused_adamw_emu::fail;
using fused_adamw_emu::injected;
using fused_adamw_emu::state;
using fused_adamw_emu::tl_device;
using fused_adamw_emu::tl_last_error;

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  if (cudaError_t e = injected("cudaGetDeviceCount")) return fail(e);
  const int n = fused_adamw_emu::device_count();
  if (n <= 0) {
    *count = 0;
    return fail(cudaErrorNoDevice);
  }
  *count = n;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  if (cudaError_t e = injected("cudaGetDevice")) return fail(e);
  if (fused_adamw_emu::device_count() <= 0) return fail(cudaErrorNoDevice);
  *device = tl_device;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) {
  if (cudaError_t e = injected("cudaSetDevice")) return fail(e);
  const int n = fused_adamw_emu::device_count();
  if (n <= 0) return fail(cudaErrorNoDevice);
  if (device < 0 || device >= n) return fail(cudaErrorInvalidDevice);
  tl_device = device;
  // CUDA 12+: cudaSetDevice creates the context
  fused_adamw_emu::set_contexts(fused_adamw_emu::contexts() | (uint64_t{1} << device));
  return cudaSuccess;
}

// The driver's cuDevicePrimaryCtxGetState over the fake devices (CUresult 0: success, 101:
// CUDA_ERROR_INVALID_DEVICE).
static int emu_primary_ctx_get_state(int device, unsigned int* flags, int* active) {
  const int n = fused_adamw_emu::device_count();
  if (device < 0 || device >= n) return 101;
  *flags = 0;
  *active = (fused_adamw_emu::contexts() >> device) & 1u ? 1 : 0;
  return 0;
}

cudaError_t CUDARTAPI cudaGetDriverEntryPointByVersion(const char* symbol, void** funcPtr,
                                                       unsigned int, unsigned long long,
                                                       cudaDriverEntryPointQueryResult* status) {
  if (std::string(symbol) == "cuDevicePrimaryCtxGetState") {
    *funcPtr = reinterpret_cast<void*>(&emu_primary_ctx_get_state);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  *funcPtr = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return tl_last_error; }

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (cudaError_t e = injected("cudaDeviceGetAttribute")) return fail(e);
  const int n = fused_adamw_emu::device_count();
  if (device < 0 || device >= n) return fail(cudaErrorInvalidDevice);
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = s.cc_major;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = s.cc_minor;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = s.sm_count;
      break;
    case cudaDevAttrMaxGridDimX:
      *value = static_cast<int>(fused_adamw_emu::kMaxGridX);
      break;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = static_cast<int>(fused_adamw_emu::kMaxBlockThreads);
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    default:
      return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  if (cudaError_t e = injected("cudaFuncGetAttributes")) return fail(e);
  if (func == nullptr || attr == nullptr) return fail(cudaErrorInvalidDeviceFunction);
  if (tl_device < 0 || tl_device >= fused_adamw_emu::device_count()) {
    return fail(cudaErrorInvalidDevice);
  }
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = static_cast<int>(fused_adamw_emu::kMaxBlockThreads);
  attr->numRegs = 64;
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  attr->binaryVersion = attr->ptxVersion = s.cc_major * 10 + s.cc_minor;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDriverGetVersion(int* v) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  *v = s.driver_version;
  return cudaSuccess;
}

#define FUSED_ADAMW_EMU_ERRORS(X)                                                         \
  X(cudaSuccess, "no error")                                                              \
  X(cudaErrorInvalidValue, "invalid argument")                                            \
  X(cudaErrorMemoryAllocation, "out of memory")                                           \
  X(cudaErrorInitializationError, "initialization error")                                 \
  X(cudaErrorInvalidConfiguration, "invalid configuration argument")                      \
  X(cudaErrorInsufficientDriver,                                                          \
    "CUDA driver version is insufficient for CUDA runtime version")                       \
  X(cudaErrorInvalidDeviceFunction, "invalid device function")                            \
  X(cudaErrorNoDevice, "no CUDA-capable device is detected")                              \
  X(cudaErrorInvalidDevice, "invalid device ordinal")                                     \
  X(cudaErrorNoKernelImageForDevice, "no kernel image is available for execution on the device") \
  X(cudaErrorIllegalAddress, "an illegal memory access was encountered")                  \
  X(cudaErrorLaunchOutOfResources, "too many resources requested for launch")             \
  X(cudaErrorLaunchFailure, "unspecified launch failure")                                 \
  X(cudaErrorUnknown, "unknown error")

const char* CUDARTAPI cudaGetErrorName(cudaError_t error) {
#define X(name, text) \
  case name:          \
    return #name;
  switch (error) { FUSED_ADAMW_EMU_ERRORS(X) default: break; }
#undef X
  return "cudaErrorUnknown";
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t error) {
#define X(name, text) \
  case name:          \
    return text;
  switch (error) { FUSED_ADAMW_EMU_ERRORS(X) default: break; }
#undef X
  return "unrecognized error code";
}

}  // extern "C"

// ------------------------------------------------------------------------------------------
// the C API of the controls (tests/cuda_emu/build.py binds it with ctypes)
// ------------------------------------------------------------------------------------------

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

thread_local std::string tl_text;  // what the last *_json call returned

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void fused_adamw_emu_set_order(const char* mode,
                                                                      uint64_t seed,
                                                                      int host_threads) {
  fused_adamw_emu::set_order(mode, seed, host_threads);
}

__attribute__((visibility("default"))) const char* fused_adamw_emu_launch_log_json() {
  std::ostringstream o;
  o << "[";
  bool first = true;
  for (const auto& r : fused_adamw_emu::launch_log()) {
    o << (first ? "" : ",") << "{\"index\":" << r.index
      << ",\"kernel\":" << json_string(r.kernel)
      << ",\"signature\":" << json_string(r.signature) << ",\"grid\":" << r.grid
      << ",\"block\":" << r.block << ",\"stream\":" << r.stream << ",\"device\":" << r.device
      << ",\"error\":" << r.error << ",\"blocks_run\":" << r.blocks_run << "}";
    first = false;
  }
  o << "]";
  tl_text = o.str();
  return tl_text.c_str();
}

__attribute__((visibility("default"))) void fused_adamw_emu_clear_launch_log() {
  fused_adamw_emu::clear_launch_log();
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_device_count(int n) {
  fused_adamw_emu::set_device_count(n);
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_sm_count(int n) {
  fused_adamw_emu::set_sm_count(n);
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_compute_capability(int major,
                                                                                   int minor) {
  fused_adamw_emu::set_compute_capability(major, minor);
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_driver_version(int v) {
  fused_adamw_emu::set_driver_version(v);
}
__attribute__((visibility("default"))) int fused_adamw_emu_current_device() {
  return fused_adamw_emu::current_device();
}
__attribute__((visibility("default"))) int fused_adamw_emu_set_current_device(int device) {
  return fused_adamw_emu::set_current_device(device);
}
__attribute__((visibility("default"))) void fused_adamw_emu_inject_error(const char* site,
                                                                         int code, int skip) {
  fused_adamw_emu::inject_error(site, code, skip);
}
__attribute__((visibility("default"))) void fused_adamw_emu_clear_injections() {
  fused_adamw_emu::clear_injections();
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_block_filter(
    const int64_t* blocks, int64_t n, int nth) {
  fused_adamw_emu::set_block_filter(std::vector<int64_t>(blocks, blocks + n), nth);
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_tile_trace(int on) {
  fused_adamw_emu::set_tile_trace(on != 0);
}
// Copies up to `cap` records of 4 int64 (launch, block, thread, tile) into out; returns how many
// there are.
__attribute__((visibility("default"))) int64_t fused_adamw_emu_tile_trace(int64_t* out,
                                                                           int64_t cap) {
  const auto t = fused_adamw_emu::tile_trace();
  const int64_t n = static_cast<int64_t>(t.size());
  for (int64_t i = 0; i < n && i < cap; ++i) {
    out[4 * i] = std::get<0>(t[static_cast<size_t>(i)]);
    out[4 * i + 1] = std::get<1>(t[static_cast<size_t>(i)]);
    out[4 * i + 2] = std::get<2>(t[static_cast<size_t>(i)]);
    out[4 * i + 3] = std::get<3>(t[static_cast<size_t>(i)]);
  }
  return n;
}
__attribute__((visibility("default"))) const char* fused_adamw_emu_error_name(int code) {
  return cudaGetErrorName(static_cast<cudaError_t>(code));
}
// The code of the error called `name` (cudaGetErrorName's spelling); -1 if not in the table.
__attribute__((visibility("default"))) int fused_adamw_emu_error_code(const char* name) {
#define X(code, text) \
  if (std::string(name) == #code) return static_cast<int>(code);
  FUSED_ADAMW_EMU_ERRORS(X)
#undef X
  return -1;
}
__attribute__((visibility("default"))) int fused_adamw_emu_runtime_version() {
  return CUDART_VERSION;
}
__attribute__((visibility("default"))) void fused_adamw_emu_reset() { fused_adamw_emu::reset(); }
__attribute__((visibility("default"))) uint64_t fused_adamw_emu_contexts() {
  return fused_adamw_emu::contexts();
}
__attribute__((visibility("default"))) void fused_adamw_emu_set_contexts(uint64_t mask) {
  fused_adamw_emu::set_contexts(mask);
}

}  // extern "C"
