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
               std::uintptr_t found_inf, bool master_modes, std::uintptr_t clip_coef,
               std::uintptr_t row_norms, std::uintptr_t norm_scratch) {
  AdamWParams p = make_params(rows, tile_starts, hparams, n_rows, n_tiles, n_groups, dtype,
                              state_dtype, grad_scale, found_inf);
  if (clip_coef % 4 != 0) throw py::value_error("clip_coef must be a 4-byte aligned address or 0");
  if (row_norms % 4 != 0 || norm_scratch % 4 != 0 || (row_norms == 0) != (norm_scratch == 0)) {
    throw py::value_error("row_norms (float32 [n_rows, 3]) and norm_scratch (float32 "
                          "[n_tiles * 3 * 257]) must be 4-byte aligned device addresses, both "
                          "set or both 0");
  }
  p.clip_coef = reinterpret_cast<const float*>(clip_coef);
  p.tile_norms = reinterpret_cast<float*>(norm_scratch);
  std::string err;
  {
    py::gil_scoped_release release;
    err = fused_adamw::launch_adamw_cuda(p, has_max, device, stream, master_modes,
                                         reinterpret_cast<float*>(row_norms));
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
               std::uintptr_t, std::uintptr_t, std::uintptr_t) {
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

// ------------------------------------------------------------------------------------------
// tensor addresses for the table's change detection (python/fused_adamw/_table.py, prepare)
// ------------------------------------------------------------------------------------------
// Every step compares the addresses of every param, grad and state tensor with what the table
// holds: a Python call per tensor (Tensor.data_ptr, 50-90 ns) was most of the host time. torch
// exports a C entry point that reads a Tensor's data pointer from its Python object (the one
// Inductor's compiled wrappers call, torch._C._dynamo.guards
// ._torchinductor_pyobject_tensor_data_ptr); Python hands its address in as an int, so _C
// still links no torch and builds without it. Python checks it against data_ptr() before use
// and keeps its own pass where torch lacks it.

namespace addresses {

using DataPtrFn = void* (*)(PyObject*);

struct Reader {
  DataPtrFn fn;
  PyTypeObject* tensor_type;
};

Reader reader(std::uintptr_t fn, py::handle tensor_type) {
  if (fn == 0 || !PyType_Check(tensor_type.ptr())) {
    throw py::type_error("addresses: fn must be a function address, tensor_type a type");
  }
  return {reinterpret_cast<DataPtrFn>(fn), reinterpret_cast<PyTypeObject*>(tensor_type.ptr())};
}

void* address_of(const Reader& r, PyObject* t, Py_ssize_t i) {
  if (!PyObject_TypeCheck(t, r.tensor_type)) {
    throw py::type_error("addresses: item " + std::to_string(i) + " is not a Tensor");
  }
  try {
    return r.fn(t);
  } catch (const std::exception& e) {  // e.g. a tensor without storage: the caller's own pass
    throw py::value_error(std::string("addresses: item ") + std::to_string(i) + ": " +
                          e.what());
  } catch (...) {
    throw py::value_error("addresses: item " + std::to_string(i) + ": not readable");
  }
}

PyObject* checked_list(py::handle l, const char* name) {
  if (!PyList_Check(l.ptr())) {
    throw py::type_error(std::string("addresses: ") + name + " must be a list");
  }
  return l.ptr();
}

// [t.data_ptr() for t in tensors]
py::list tensor_addresses(std::uintptr_t fn, py::handle tensor_type, py::handle tensors) {
  Reader r = reader(fn, tensor_type);
  PyObject* ts = checked_list(tensors, "tensors");
  Py_ssize_t n = PyList_GET_SIZE(ts);
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyLong_FromVoidPtr(address_of(r, PyList_GET_ITEM(ts, i), i));
    if (v == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, v);
  }
  return out;
}

// [t.data_ptr() for t in tensors] == expected, without building the list
bool addresses_equal(std::uintptr_t fn, py::handle tensor_type, py::handle tensors,
                     py::handle expected) {
  Reader r = reader(fn, tensor_type);
  PyObject* ts = checked_list(tensors, "tensors");
  PyObject* ex = checked_list(expected, "expected");
  Py_ssize_t n = PyList_GET_SIZE(ts);
  if (PyList_GET_SIZE(ex) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    void* want = PyLong_AsVoidPtr(PyList_GET_ITEM(ex, i));
    if (want == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (address_of(r, PyList_GET_ITEM(ts, i), i) != want) return false;
  }
  return true;
}

// The steady step's pass over the params of a table whose rows cover every param (one call,
// each param's and grad's objects touched once: at 100,000 params they no longer fit in the
// caches, and each Python pass paid its misses again). accessors: torch._C.TensorBase's
// descriptors of grad, dtype, shape (getters), numel and is_contiguous (methods), called
// through their C functions; types: the exact types this pass accepts (Tensor, Parameter:
// their accessors are TensorBase's; anything else returns None and Python does it).
// Returns None, or (grads, params_same, grads_same, fresh): params_same: every param's address,
// numel and dtype are the recorded ones and it is contiguous; grads_same: every grad is the
// recorded object (id) at the recorded address; fresh (only when not grads_same): the grads'
// addresses when every grad is a contiguous tensor of the recorded shape and of dtype, else
// None.

PyObject* call_accessor(PyObject* descr, PyObject* obj, PyObject* empty) {
  if (PyObject_TypeCheck(descr, &PyGetSetDescr_Type)) {
    PyGetSetDef* g = reinterpret_cast<PyGetSetDescrObject*>(descr)->d_getset;
    if (g->get != nullptr) return g->get(obj, g->closure);
  } else if (PyObject_TypeCheck(descr, &PyMethodDescr_Type)) {
    PyMethodDef* d = reinterpret_cast<PyMethodDescrObject*>(descr)->d_method;
    int flags = d->ml_flags & ~METH_COEXIST;
    void (*f)(void) = reinterpret_cast<void (*)(void)>(d->ml_meth);
    if (flags == METH_NOARGS) return d->ml_meth(obj, nullptr);
    if (flags == (METH_VARARGS | METH_KEYWORDS)) {
      return reinterpret_cast<PyCFunctionWithKeywords>(f)(obj, empty, nullptr);
    }
    if (flags == (METH_FASTCALL | METH_KEYWORDS)) {
      return reinterpret_cast<_PyCFunctionFastWithKeywords>(f)(obj, nullptr, 0, nullptr);
    }
    if (flags == METH_FASTCALL) return reinterpret_cast<_PyCFunctionFast>(f)(obj, nullptr, 0);
  }
  return PyObject_CallOneArg(descr, obj);  // any other kind: the generic call
}

struct Ref {  // an owned reference, released at scope exit
  PyObject* p;
  explicit Ref(PyObject* o) : p(o) {
    if (p == nullptr) throw py::error_already_set();
  }
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
};

bool same_int(PyObject* value, PyObject* expected) {
  int eq = PyObject_RichCompareBool(value, expected, Py_EQ);
  if (eq < 0) throw py::error_already_set();
  return eq == 1;
}

py::object scan(std::uintptr_t fn, py::handle tensor_type, py::tuple accessors,
                py::tuple types, py::handle dtype, py::handle params, py::handle grad_ids,
                py::handle grad_ptrs, py::handle data_ptrs, py::handle numels,
                py::handle dtypes, py::handle shapes) {
  Reader r = reader(fn, tensor_type);
  if (accessors.size() != 5) throw py::value_error("scan_params: 5 accessors");
  PyObject* get_grad = accessors[0].ptr();
  PyObject* get_dtype = accessors[1].ptr();
  PyObject* get_shape = accessors[2].ptr();
  PyObject* numel = accessors[3].ptr();
  PyObject* is_contiguous = accessors[4].ptr();
  PyObject* ps = checked_list(params, "params");
  Py_ssize_t n = PyList_GET_SIZE(ps);
  PyObject* lists[] = {checked_list(grad_ids, "grad_ids"), checked_list(grad_ptrs, "grad_ptrs"),
                       checked_list(data_ptrs, "data_ptrs"), checked_list(numels, "numels"),
                       checked_list(dtypes, "dtypes"), checked_list(shapes, "shapes")};
  for (PyObject* l : lists) {
    if (PyList_GET_SIZE(l) != n) return py::none();
  }
  auto accepted = [&](PyObject* o) {
    for (auto t : types) {
      if (Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(t.ptr())) return true;
    }
    return false;
  };
  Ref empty(PyTuple_New(0));
  py::list grads(n);
  bool params_same = true, grads_same = true;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(ps, i);
    if (!accepted(p)) return py::none();
    PyObject* g = call_accessor(get_grad, p, empty.p);
    if (g == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(grads.ptr(), i, g);  // the list owns it
    if (params_same) {
      params_same =
          address_of(r, p, i) == PyLong_AsVoidPtr(PyList_GET_ITEM(data_ptrs.ptr(), i)) &&
          same_int(Ref(call_accessor(numel, p, empty.p)).p, PyList_GET_ITEM(numels.ptr(), i));
      if (params_same) {
        Ref d(call_accessor(get_dtype, p, empty.p));
        params_same = d.p == PyList_GET_ITEM(dtypes.ptr(), i) &&
                      Ref(call_accessor(is_contiguous, p, empty.p)).p == Py_True;
      }
    }
    if (grads_same) {
      grads_same = reinterpret_cast<std::uintptr_t>(g) ==
                       PyLong_AsSize_t(PyList_GET_ITEM(grad_ids.ptr(), i)) &&
                   g != Py_None && accepted(g) &&
                   address_of(r, g, i) == PyLong_AsVoidPtr(PyList_GET_ITEM(grad_ptrs.ptr(), i));
      if (PyErr_Occurred()) throw py::error_already_set();
    }
  }
  if (grads_same) return py::make_tuple(grads, params_same, true, py::none());
  // Fresh grads: contiguous, of the rows' shapes and the table's dtype; their addresses.
  py::list fresh(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* g = PyList_GET_ITEM(grads.ptr(), i);
    if (g == Py_None || !accepted(g)) return py::make_tuple(grads, params_same, false, py::none());
    Ref d(call_accessor(get_dtype, g, empty.p));
    if (d.p != dtype.ptr() || Ref(call_accessor(is_contiguous, g, empty.p)).p != Py_True) {
      return py::make_tuple(grads, params_same, false, py::none());
    }
    Ref shape(call_accessor(get_shape, g, empty.p));
    int eq = PyObject_RichCompareBool(shape.p, PyList_GET_ITEM(shapes.ptr(), i), Py_EQ);
    if (eq < 0) throw py::error_already_set();
    if (eq == 0) return py::make_tuple(grads, params_same, false, py::none());
    PyObject* v = PyLong_FromVoidPtr(address_of(r, g, i));
    if (v == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(fresh.ptr(), i, v);
  }
  return py::make_tuple(grads, params_same, false, fresh);
}

// Anything the pass cannot read (an accessor that raises, as is_contiguous does for a sparse
// grad): None, and Python's passes meet it and say what is wrong.
py::object scan_params(std::uintptr_t fn, py::handle tensor_type, py::tuple accessors,
                       py::tuple types, py::handle dtype, py::handle params,
                       py::handle grad_ids, py::handle grad_ptrs, py::handle data_ptrs,
                       py::handle numels, py::handle dtypes, py::handle shapes) {
  try {
    return scan(fn, tensor_type, accessors, types, dtype, params, grad_ids, grad_ptrs,
                data_ptrs, numels, dtypes, shapes);
  } catch (const std::exception&) {  // py::error_already_set too: the error is dropped
    PyErr_Clear();
    return py::none();
  }
}

void define(py::module_& m) {
  m.def("tensor_addresses", &tensor_addresses,
        "[t.data_ptr() for t in tensors] through fn, torch's C function void *(PyObject *) "
        "that reads a Tensor's data pointer (its address as an int); tensor_type: "
        "torch._C.TensorBase (items of other types raise TypeError; a tensor fn refuses, "
        "ValueError).",
        py::arg("fn"), py::arg("tensor_type"), py::arg("tensors"));
  m.def("addresses_equal", &addresses_equal,
        "tensor_addresses(fn, tensor_type, tensors) == expected (a list of ints), stopping at "
        "the first difference.",
        py::arg("fn"), py::arg("tensor_type"), py::arg("tensors"), py::arg("expected"));
  m.def("scan_params", &scan_params,
        "The steady step's one pass over a table's params and grads (see the comment above "
        "scan_params in csrc/bindings.cpp): None, or (grads, params_same, grads_same, fresh).",
        py::arg("fn"), py::arg("tensor_type"), py::arg("accessors"), py::arg("types"),
        py::arg("dtype"), py::arg("params"), py::arg("grad_ids"), py::arg("grad_ptrs"),
        py::arg("data_ptrs"), py::arg("numels"), py::arg("dtypes"), py::arg("shapes"));
}

}  // namespace addresses

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
                    "low-precision kernel runs (it reads each row's mode); clip_coef: the "
                    "address of the float32 clip coefficient (issue #19), or 0; row_norms: "
                    "float32 [n_rows, 3] that receives step_cpu's row_norms bit for bit, with "
                    "norm_scratch: float32 [n_tiles * 3 * 257], or both 0.")
            .c_str(),
        py::arg("rows"), py::arg("tile_starts"), py::arg("hparams"), py::arg("n_rows"),
        py::arg("n_tiles"), py::arg("n_groups"), py::arg("dtype"), py::arg("has_max"),
        py::arg("device"), py::arg("stream"), py::arg("state_dtype") = -1,
        py::arg("grad_scale") = 0, py::arg("found_inf") = 0, py::arg("master_modes") = false,
        py::arg("clip_coef") = 0, py::arg("row_norms") = 0, py::arg("norm_scratch") = 0);
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

  addresses::define(m);  // the table's change detection (block above)
}
