// fused_adamw._C: the compiled half of fused_adamw, with no torch inside.
//
// It takes raw pointers (ints), sizes, dtype codes, the device index and the CUDA stream
// handle from Python, so one build works with every torch 2.x: nothing here depends on
// torch's C++ ABI. The CUDA runtime is linked statically (nvcc's default, -cudart static);
// device pointers and stream handles are driver-level objects that torch's runtime and ours
// share through the primary context.
//
// Macros from setup.py: FUSED_ADAMW_VERSION, FUSED_ADAMW_WITH_CUDA (when the kernel is
// compiled in), FUSED_ADAMW_CUDA_ARCHS ("80;90" style list of the compiled archs).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adamw_params.h"
#include "cpu_adamw.h"
#if defined(FUSED_ADAMW_WITH_CUDA)
#include "adamw_kernel.h"
#endif

#ifndef FUSED_ADAMW_VERSION
#error "setup.py passes FUSED_ADAMW_VERSION (from python/fused_adamw/_version.py)"
#endif
#ifndef FUSED_ADAMW_CUDA_ARCHS
#define FUSED_ADAMW_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using fused_adamw::AdamWParams;
using fused_adamw::DType;

namespace {

// ------------------------------------------------------------------------------------------
// validation shared by both entry points (Python validates the tensors; this guards the ABI)
// ------------------------------------------------------------------------------------------

AdamWParams make_params(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
                        std::uintptr_t exp_avg_sq, std::uintptr_t max_exp_avg_sq,
                        std::uintptr_t tiles, std::uintptr_t param_group, std::uintptr_t steps,
                        std::uintptr_t active, std::uintptr_t hparams, int64_t numel,
                        int64_t n_tiles, int64_t n_params, int64_t n_groups, int dtype) {
  if (dtype < 0 || dtype > 2) {
    throw py::value_error("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                          std::to_string(dtype));
  }
  if (numel < 0 || n_tiles < 0 || n_params < 0 || n_groups < 0) {
    throw py::value_error("numel, n_tiles, n_params and n_groups must be >= 0");
  }
  if (n_tiles > 0) {
    const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
    const std::uintptr_t ptrs[] = {param, grad, exp_avg, exp_avg_sq};
    for (int i = 0; i < 4; ++i) {
      if (ptrs[i] == 0) throw py::value_error(std::string(names[i]) + " is a null pointer");
      if (ptrs[i] % 16 != 0) {
        throw py::value_error(std::string(names[i]) + " is not 16-byte aligned");
      }
    }
    if (max_exp_avg_sq % 16 != 0) throw py::value_error("max_exp_avg_sq is not 16-byte aligned");
    if (tiles == 0 || param_group == 0 || steps == 0 || active == 0 || hparams == 0) {
      throw py::value_error("tiles, param_group, steps, active and hparams must be non-null");
    }
  }
  AdamWParams p;
  p.param = reinterpret_cast<void*>(param);
  p.grad = reinterpret_cast<const void*>(grad);
  p.exp_avg = reinterpret_cast<void*>(exp_avg);
  p.exp_avg_sq = reinterpret_cast<void*>(exp_avg_sq);
  p.max_exp_avg_sq = reinterpret_cast<void*>(max_exp_avg_sq);
  p.tiles = reinterpret_cast<const int64_t*>(tiles);
  p.param_group = reinterpret_cast<const int32_t*>(param_group);
  p.steps = reinterpret_cast<const float*>(steps);
  p.active = reinterpret_cast<const uint8_t*>(active);
  p.hparams = reinterpret_cast<const float*>(hparams);
  p.numel = numel;
  p.n_tiles = n_tiles;
  p.n_params = n_params;
  p.n_groups = n_groups;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

void step_cpu(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
              std::uintptr_t exp_avg_sq, std::uintptr_t max_exp_avg_sq, std::uintptr_t tiles,
              std::uintptr_t param_group, std::uintptr_t steps, std::uintptr_t active,
              std::uintptr_t hparams, int64_t numel, int64_t n_tiles, int64_t n_params,
              int64_t n_groups, int dtype, int num_threads) {
  const AdamWParams p = make_params(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, tiles,
                                    param_group, steps, active, hparams, numel, n_tiles,
                                    n_params, n_groups, dtype);
  py::gil_scoped_release release;
  fused_adamw::adamw_step_cpu(p, num_threads);
}

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s + ";") {
    if (c == ';') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  return out;
}

#if defined(FUSED_ADAMW_WITH_CUDA)
constexpr bool kHasCuda = true;

void step_cuda(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
               std::uintptr_t exp_avg_sq, std::uintptr_t max_exp_avg_sq, std::uintptr_t tiles,
               std::uintptr_t param_group, std::uintptr_t steps, std::uintptr_t active,
               std::uintptr_t hparams, int64_t numel, int64_t n_tiles, int64_t n_params,
               int64_t n_groups, int dtype, int device, std::uintptr_t stream) {
  const AdamWParams p = make_params(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, tiles,
                                    param_group, steps, active, hparams, numel, n_tiles,
                                    n_params, n_groups, dtype);
  std::string err;
  {
    py::gil_scoped_release release;
    err = fused_adamw::launch_adamw_cuda(p, device, stream);
  }
  if (!err.empty()) throw std::runtime_error("fused_adamw CUDA step failed: " + err);
}

std::string device_error(int device) {
  py::gil_scoped_release release;
  return fused_adamw::cuda_device_error(device);
}
int runtime_version() { return fused_adamw::cuda_runtime_version(); }
int driver_version() { return fused_adamw::cuda_driver_version(); }
#else
constexpr bool kHasCuda = false;
constexpr const char* kNoCuda = "fused_adamw._C was built without CUDA (no nvcc at build time)";

void step_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
               std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
               int64_t, int64_t, int64_t, int64_t, int, int, std::uintptr_t) {
  throw std::runtime_error(kNoCuda);
}
std::string device_error(int) { return kNoCuda; }
int runtime_version() { return 0; }
int driver_version() { return 0; }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fused_adamw's compiled loops: the CUDA kernel (kernels/adamw_kernel.cu) and the CPU loop "
      "(csrc/cpu_adamw.cpp) over one flat bucket. No torch inside: pointers are ints.";
  m.attr("__version__") = FUSED_ADAMW_VERSION;
  m.attr("has_cuda") = kHasCuda;
  m.attr("cuda_archs") = split_archs(FUSED_ADAMW_CUDA_ARCHS);
  m.attr("cpu_loop_isa") = std::string(fused_adamw::cpu_loop_isa());

  const char* args_doc =
      "Arguments: data pointers (int) of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq "
      "(0 when no group uses amsgrad), tiles (int64 [n_tiles, 3]), param_group (int32), steps "
      "(float32), active (uint8), hparams (float32 [n_groups, 8]); then numel, n_tiles, "
      "n_params, n_groups, dtype code (0 float32, 1 bfloat16, 2 float16). Layout: "
      "kernels/adamw_params.h. Nothing is checked beyond nulls and alignment: the caller "
      "(fused_adamw.backends) validates the tensors.";

  m.def("step_cpu", &step_cpu,
        (std::string("One AdamW step over a bucket in host memory, on num_threads threads "
                     "(the GIL released). ") +
         args_doc + " Last: num_threads.")
            .c_str(),
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("tiles"), py::arg("param_group"), py::arg("steps"),
        py::arg("active"), py::arg("hparams"), py::arg("numel"), py::arg("n_tiles"),
        py::arg("n_params"), py::arg("n_groups"), py::arg("dtype"), py::arg("num_threads"));
  m.def("step_cuda", &step_cuda,
        (std::string("Launches one AdamW step over a bucket in device memory on `stream` "
                     "(cudaStream_t as int; 0 = legacy default) of `device`; asynchronous, "
                     "the GIL released. Raises RuntimeError with the CUDA error. ") +
         args_doc + " Last: device, stream.")
            .c_str(),
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("tiles"), py::arg("param_group"), py::arg("steps"),
        py::arg("active"), py::arg("hparams"), py::arg("numel"), py::arg("n_tiles"),
        py::arg("n_params"), py::arg("n_groups"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("cuda_device_error", &device_error,
        "'' when the kernel can run on CUDA device `device` (driver new enough, a kernel image "
        "for its compute capability), else the reason. Asks the driver; cache the answer.",
        py::arg("device"));
  m.def("cuda_runtime_version", &runtime_version,
        "The CUDA runtime version linked in (e.g. 13000), 0 without CUDA.");
  m.def("cuda_driver_version", &driver_version,
        "The installed driver's CUDA version (e.g. 13000), 0 without a driver or CUDA.");
}
