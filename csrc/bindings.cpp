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

AdamWParams make_params(std::uintptr_t rows, std::uintptr_t tile_starts, std::uintptr_t hparams,
                        int64_t n_rows, int64_t n_tiles, int64_t n_groups, int dtype,
                        int state_dtype, std::uintptr_t grad_scale, std::uintptr_t found_inf) {
  if (dtype < 0 || dtype > 2) {
    throw py::value_error("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                          std::to_string(dtype));
  }
  if (state_dtype == -1) state_dtype = dtype;  // the default: moments of the params' dtype
  if (state_dtype < 0 || state_dtype > 2 ||
      !fused_adamw::state_pair_supported(static_cast<DType>(dtype),
                                         static_cast<DType>(state_dtype))) {
    throw py::value_error("state_dtype code " + std::to_string(state_dtype) +
                          " is not supported with dtype code " + std::to_string(dtype) +
                          " (the same dtype, float32 moments for 16-bit params, or bfloat16 "
                          "moments for float32 params)");
  }
  if (n_rows < 0 || n_tiles < 0 || n_groups < 0) {
    throw py::value_error("n_rows, n_tiles and n_groups must be >= 0");
  }
  if (n_rows > 0 && (rows == 0 || tile_starts == 0 || hparams == 0)) {
    throw py::value_error("rows, tile_starts and hparams must be non-null");
  }
  if (rows % 8 != 0 || tile_starts % 8 != 0 || hparams % 4 != 0) {
    throw py::value_error("rows and tile_starts must be 8-byte aligned, hparams 4-byte aligned");
  }
  if (grad_scale % 4 != 0 || found_inf % 4 != 0) {
    throw py::value_error("grad_scale and found_inf must be 4-byte aligned float32 addresses or 0");
  }
  AdamWParams p;
  p.rows = reinterpret_cast<const int64_t*>(rows);
  p.tile_starts = reinterpret_cast<const int64_t*>(tile_starts);
  p.hparams = reinterpret_cast<const float*>(hparams);
  p.n_rows = n_rows;
  p.n_tiles = n_tiles;
  p.n_groups = n_groups;
  p.dtype = static_cast<DType>(dtype);
  p.state_dtype = static_cast<DType>(state_dtype);
  p.grad_scale = reinterpret_cast<const float*>(grad_scale);
  p.found_inf = reinterpret_cast<const float*>(found_inf);
  p.clip_coef = nullptr;
  p.tile_norms = nullptr;
  return p;
}

void step_cpu(std::uintptr_t rows, std::uintptr_t tile_starts, std::uintptr_t hparams,
              int64_t n_rows, int64_t n_tiles, int64_t n_groups, int dtype, int num_threads,
              int state_dtype, std::uintptr_t grad_scale, std::uintptr_t found_inf,
              std::uintptr_t clip_coef, std::uintptr_t row_norms) {
  AdamWParams p = make_params(rows, tile_starts, hparams, n_rows, n_tiles, n_groups, dtype,
                              state_dtype, grad_scale, found_inf);
  if (clip_coef % 4 != 0 || row_norms % 4 != 0) {
    throw py::value_error("clip_coef and row_norms must be 4-byte aligned float32 addresses or 0");
  }
  p.clip_coef = reinterpret_cast<const float*>(clip_coef);
  py::gil_scoped_release release;
  fused_adamw::adamw_step_cpu(p, num_threads, reinterpret_cast<float*>(row_norms));
}

void grad_norm_cpu(std::uintptr_t rows, std::uintptr_t tile_starts, int64_t n_rows,
                   int64_t n_tiles, int dtype, int num_threads, bool inf,
                   std::uintptr_t grad_scale, std::uintptr_t out) {
  // hparams are not read: any non-null aligned address passes make_params' checks.
  AdamWParams p = make_params(rows, tile_starts, out, n_rows, n_tiles, 0, dtype, -1,
                              grad_scale, 0);
  if (out == 0 || out % 8 != 0) {
    throw py::value_error("out must be the 8-byte aligned address of n_rows + 1 float64");
  }
  py::gil_scoped_release release;
  fused_adamw::adamw_grad_norm_cpu(p, num_threads, inf, reinterpret_cast<double*>(out));
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

void step_cuda(std::uintptr_t rows, std::uintptr_t tile_starts, std::uintptr_t hparams,
               int64_t n_rows, int64_t n_tiles, int64_t n_groups, int dtype, bool has_max,
               int device, std::uintptr_t stream, int state_dtype, std::uintptr_t grad_scale,
               std::uintptr_t found_inf, bool master_modes, std::uintptr_t clip_coef) {
  AdamWParams p = make_params(rows, tile_starts, hparams, n_rows, n_tiles, n_groups, dtype,
                              state_dtype, grad_scale, found_inf);
  if (clip_coef % 4 != 0) throw py::value_error("clip_coef must be a 4-byte aligned address or 0");
  p.clip_coef = reinterpret_cast<const float*>(clip_coef);
  std::string err;
  {
    py::gil_scoped_release release;
    err = fused_adamw::launch_adamw_cuda(p, has_max, device, stream, master_modes);
  }
  if (!err.empty()) throw std::runtime_error("fused_adamw CUDA step failed: " + err);
}

void grad_norm_cuda(std::uintptr_t rows, std::uintptr_t tile_starts, int64_t n_rows,
                    int64_t n_tiles, int dtype, bool inf, std::uintptr_t grad_scale,
                    std::uintptr_t scratch, std::uintptr_t out, int device,
                    std::uintptr_t stream) {
  const AdamWParams p = make_params(rows, tile_starts, out, n_rows, n_tiles, 0, dtype, -1,
                                    grad_scale, 0);
  if (out == 0 || out % 8 != 0 || (n_tiles > 0 && (scratch == 0 || scratch % 4 != 0))) {
    throw py::value_error("out (float64 [n_rows + 1]) and scratch (float32 "
                          "[n_tiles * 257]) must be aligned device addresses");
  }
  std::string err;
  {
    py::gil_scoped_release release;
    err = fused_adamw::launch_grad_norm_cuda(p, device, stream, inf,
                                             reinterpret_cast<float*>(scratch),
                                             reinterpret_cast<double*>(out));
  }
  if (!err.empty()) throw std::runtime_error("fused_adamw CUDA grad norm failed: " + err);
}

void set_grid_cap(int64_t cap) { fused_adamw::set_grid_cap_for_testing(cap); }

std::string device_error(int device) {
  py::gil_scoped_release release;
  return fused_adamw::cuda_device_error(device);
}
int runtime_version() { return fused_adamw::cuda_runtime_version(); }
int driver_version() { return fused_adamw::cuda_driver_version(); }
#else
constexpr bool kHasCuda = false;
constexpr const char* kNoCuda =
    "fused_adamw._C was built without CUDA (no nvcc at build time, or FUSED_ADAMW_NO_CUDA=1)";

void step_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t, int64_t, int,
               bool, int, std::uintptr_t, int, std::uintptr_t, std::uintptr_t, bool,
               std::uintptr_t) {
  throw std::runtime_error(kNoCuda);
}
void grad_norm_cuda(std::uintptr_t, std::uintptr_t, int64_t, int64_t, int, bool, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, int, std::uintptr_t) {
  throw std::runtime_error(kNoCuda);
}
void set_grid_cap(int64_t) {}
std::string device_error(int) { return kNoCuda; }
int runtime_version() { return 0; }
int driver_version() { return 0; }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fused_adamw's compiled loops: the CUDA kernel (kernels/adamw_kernel.cu) and the CPU loop "
      "(csrc/cpu_adamw.cpp) over one param table. No torch inside: pointers are ints.";
  m.attr("__version__") = FUSED_ADAMW_VERSION;
  m.attr("has_cuda") = kHasCuda;
  m.attr("cuda_archs") = split_archs(FUSED_ADAMW_CUDA_ARCHS);
  m.attr("cpu_loop_isa") = std::string(fused_adamw::cpu_loop_isa());

  m.attr("tile_elems") = fused_adamw::kTileElems;
  m.attr("row_cols") = fused_adamw::kRowCols;
  m.attr("hparam_cols") = fused_adamw::kHparamCols;

  const char* args_doc =
      "Arguments: data pointers (int) of rows (int64 [n_rows, 10]: per param the addresses of "
      "its param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad) and step "
      "tensors, its numel, its group, its master mode's extra buffer (0 if none) and its "
      "stochastic rounding seed), tile_starts (int64 [n_rows + 1]) and hparams "
      "(float32 [n_groups, 16]); n_rows, n_tiles, n_groups, the dtype code (0 float32, "
      "1 bfloat16, 2 float16). Layout: kernels/adamw_params.h. Nothing is checked beyond "
      "nulls and alignment: the caller (fused_adamw._table) validates the tensors. Every "
      "row's step count advances by one, then its elements are updated. Keywords grad_scale "
      "and found_inf: addresses of GradScaler's float32 scalars on the table's device, or 0 "
      "(grads divided by *grad_scale and written back; everything skipped when *found_inf != 0).";

  m.def("step_cpu", &step_cpu,
        (std::string("One AdamW step over a table in host memory, on num_threads threads "
                     "(the GIL released). ") +
         args_doc + " Then num_threads; state_dtype: the moments' dtype code (-1: dtype); "
                    "clip_coef: the address of the float32 clip coefficient the update "
                    "multiplies each unscaled grad by (issue #19), or 0; row_norms: the "
                    "address of float32 [n_rows, 3] that receives each row's sums of squares "
                    "of the grad as used, the param after and the delta, or 0.")
            .c_str(),
        py::arg("rows"), py::arg("tile_starts"), py::arg("hparams"), py::arg("n_rows"),
        py::arg("n_tiles"), py::arg("n_groups"), py::arg("dtype"), py::arg("num_threads"),
        py::arg("state_dtype") = -1, py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
        py::arg("clip_coef") = 0, py::arg("row_norms") = 0);
  m.def("grad_norm_cpu", &grad_norm_cpu,
        "The norm pass of gradient clipping (issue #19) over a table in host memory: out "
        "(float64 [n_rows + 1]) receives each row's sum of squares of grad / *grad_scale "
        "(inf=True: max |.|) and their total, in kernels/adamw_math.cuh's fixed order (bitwise "
        "the same for any num_threads). The GIL released.",
        py::arg("rows"), py::arg("tile_starts"), py::arg("n_rows"), py::arg("n_tiles"),
        py::arg("dtype"), py::arg("num_threads"), py::arg("inf"), py::arg("grad_scale"),
        py::arg("out"));
  m.def("step_cuda", &step_cuda,
        (std::string("Launches one AdamW step over a table in device memory on `stream` "
                     "(cudaStream_t as int; 0 = legacy default) of `device`; asynchronous, "
                     "the GIL released. Raises RuntimeError with the CUDA error. ") +
         args_doc + " Then has_max (some row uses amsgrad), device, stream; state_dtype: "
                    "the moments' dtype code (-1: dtype); master_modes: some group of a "
                    "16-bit table may have a master mode (hparams column 9), so the "
                    "low-precision kernel runs (it reads each row's mode).")
            .c_str(),
        py::arg("rows"), py::arg("tile_starts"), py::arg("hparams"), py::arg("n_rows"),
        py::arg("n_tiles"), py::arg("n_groups"), py::arg("dtype"), py::arg("has_max"),
        py::arg("device"), py::arg("stream"), py::arg("state_dtype") = -1,
        py::arg("grad_scale") = 0, py::arg("found_inf") = 0, py::arg("master_modes") = false,
        py::arg("clip_coef") = 0);
  m.def("grad_norm_cuda", &grad_norm_cuda,
        "The norm pass of gradient clipping (issue #19) over a table in device memory, on "
        "`stream` of `device`, asynchronous: out (float64 [n_rows + 1]) receives each row's "
        "sum of squares of grad / *grad_scale (inf=True: max |.|) and their total, bitwise "
        "grad_norm_cpu's; scratch: float32 [n_tiles * 257] device memory.",
        py::arg("rows"), py::arg("tile_starts"), py::arg("n_rows"), py::arg("n_tiles"),
        py::arg("dtype"), py::arg("inf"), py::arg("grad_scale"), py::arg("scratch"),
        py::arg("out"), py::arg("device"), py::arg("stream"));
  m.def("_set_grid_cap", &set_grid_cap,
        "Tests only: caps the CUDA update's grid so that its tile loop strides (<= 0: no cap).",
        py::arg("cap"));
  m.def("cuda_device_error", &device_error,
        "'' when the kernel can run on CUDA device `device` (driver new enough, a kernel image "
        "for its compute capability), else the reason. Asks the driver; cache the answer.",
        py::arg("device"));
  m.def("cuda_runtime_version", &runtime_version,
        "The CUDA runtime version linked in (e.g. 13000), 0 without CUDA.");
  m.def("cuda_driver_version", &driver_version,
        "The installed driver's CUDA version (e.g. 13000), 0 without a driver or CUDA.");
}
