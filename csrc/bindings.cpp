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

#include <algorithm>
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
// tensor addresses for the table's change detection (python/fused_adamw/_watch.py)
// ------------------------------------------------------------------------------------------
// Every step compares every param, grad and state tensor with what the table holds: a Python
// call per tensor attribute (Tensor.data_ptr, 50-90 ns) was most of the host time. Two
// compiled readers, each handed torch's C functions as ints by Python, so _C still links no
// torch and builds without it (Python probes each against what it reads itself and keeps its
// own pass where torch lacks them):
// * tensor_addresses / addresses_equal: addresses through the C entry point Inductor's
//   compiled wrappers call (torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr);
// * scan_table (below): the steady step's whole comparison, through torch's stable C shim.

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

// The address of t, a Tensor (its type checked by the caller).
void* read(const Reader& r, PyObject* t, Py_ssize_t i) {
  try {
    return r.fn(t);
  } catch (const std::exception& e) {  // e.g. a tensor without storage: the caller's own pass
    throw py::value_error(std::string("addresses: item ") + std::to_string(i) + ": " +
                          e.what());
  } catch (...) {
    throw py::value_error("addresses: item " + std::to_string(i) + ": not readable");
  }
}

void* address_of(const Reader& r, PyObject* t, Py_ssize_t i) {
  if (!PyObject_TypeCheck(t, r.tensor_type)) {
    throw py::type_error("addresses: item " + std::to_string(i) + " is not a Tensor");
  }
  return read(r, t, i);
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

// The steady step's one pass over a table whose rows cover every param (csrc's half of
// python/fused_adamw/_watch.py). What it compares, per tensor: its address, dtype, device,
// sizes and strides (strided layout only), read through torch's stable C functions (the
// AOTInductor shim, torch/csrc/inductor/aoti_torch/c/shim.h: aoti_torch_get_data_ptr and
// kin, the entry points AOTInductor's compiled models call across torch versions). Python
// looks them up in torch's library and hands their addresses in as ints, with the offset of
// the at::Tensor inside a Tensor's Python object (THPVariable::cdata in torch's
// torch/csrc/autograd/python_variable.h), which it finds by probing: _C still links no
// torch and builds without it. No Python call per tensor.

struct Buffer {  // a buffer-protocol view of n items of `item` bytes, released at scope exit
  Py_buffer view{};
  Buffer(py::handle obj, Py_ssize_t n, Py_ssize_t item, bool writable, const char* name) {
    if (PyObject_GetBuffer(obj.ptr(), &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) {
      throw py::error_already_set();
    }
    if (view.len != n * item) {
      PyBuffer_Release(&view);
      throw py::value_error(std::string("scan_table: ") + name + " has the wrong size");
    }
  }
  ~Buffer() { PyBuffer_Release(&view); }
  template <class T>
  T* data() const { return static_cast<T*>(view.buf); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

using Handle = void*;  // AtenTensorHandle: an at::Tensor*
struct Shim {
  Py_ssize_t cdata;  // where a Tensor's Python object holds its at::Tensor
  int32_t strided;   // the strided layout's code
  PyTypeObject* tensor_type;  // torch._C.TensorBase
  int32_t (*layout)(Handle, int32_t*);
  int32_t (*data_ptr)(Handle, void**);
  int32_t (*dtype)(Handle, int32_t*);
  int32_t (*device_type)(Handle, int32_t*);
  int32_t (*device_index)(Handle, int32_t*);
  int32_t (*dim)(Handle, int64_t*);
  int32_t (*sizes)(Handle, int64_t**);
  int32_t (*strides)(Handle, int64_t**);
};

// shim: (cdata offset, strided layout code, torch._C.TensorBase, then the addresses of
// aoti_torch_get_layout, _data_ptr, _dtype, _device_type, _device_index, _dim, _sizes and
// _strides)
Shim shim_of(py::tuple t) {
  if (t.size() != 11 || !PyType_Check(t[2].ptr())) {
    throw py::value_error("scan_table: shim must be (offset, code, type, 8 function addresses)");
  }
  Shim s{};
  s.cdata = t[0].cast<Py_ssize_t>();
  s.strided = t[1].cast<int32_t>();
  s.tensor_type = reinterpret_cast<PyTypeObject*>(t[2].ptr());
  std::uintptr_t f[8];
  for (int i = 0; i < 8; ++i) {
    f[i] = t[i + 3].cast<std::uintptr_t>();
    if (f[i] == 0) throw py::value_error("scan_table: a null shim function");
  }
  if (s.cdata < static_cast<Py_ssize_t>(sizeof(PyObject))) {
    throw py::value_error("scan_table: the cdata offset is inside the object header");
  }
  s.layout = reinterpret_cast<int32_t (*)(Handle, int32_t*)>(f[0]);
  s.data_ptr = reinterpret_cast<int32_t (*)(Handle, void**)>(f[1]);
  s.dtype = reinterpret_cast<int32_t (*)(Handle, int32_t*)>(f[2]);
  s.device_type = reinterpret_cast<int32_t (*)(Handle, int32_t*)>(f[3]);
  s.device_index = reinterpret_cast<int32_t (*)(Handle, int32_t*)>(f[4]);
  s.dim = reinterpret_cast<int32_t (*)(Handle, int64_t*)>(f[5]);
  s.sizes = reinterpret_cast<int32_t (*)(Handle, int64_t**)>(f[6]);
  s.strides = reinterpret_cast<int32_t (*)(Handle, int64_t**)>(f[7]);
  return s;
}

// A tensor as the kernels see it. Recorded as int64s: address, key (dtype, device type and
// index), dim, then dim sizes and dim strides.
struct Geo {
  void* data = nullptr;
  int64_t key = 0, dim = 0;
  int64_t* sizes = nullptr;
  int64_t* strides = nullptr;
};

// obj (a Tensor, its type checked by the caller) read through the shim; false: not strided,
// or a read failed (no storage: the Python passes meet it and say what is wrong). full false
// (state tensors): no layout or device, which cannot change while the address stays (another
// layout has no storage; another device another address space): 5 calls instead of 8, on
// three tensors a param.
constexpr int64_t kDtypeBits = 0xffff;  // the key's dtype part
bool read(const Shim& s, PyObject* obj, Geo& g, bool full = true) {
  Handle h = reinterpret_cast<char*>(obj) + s.cdata;
  int32_t layout = 0, dtype = 0, dev_type = 0, dev_index = 0;
  if (full && (s.layout(h, &layout) != 0 || layout != s.strided)) return false;
  if (s.data_ptr(h, &g.data) != 0 || s.dtype(h, &dtype) != 0 || s.dim(h, &g.dim) != 0 ||
      s.sizes(h, &g.sizes) != 0 || s.strides(h, &g.strides) != 0) {
    return false;
  }
  if (full && (s.device_type(h, &dev_type) != 0 || s.device_index(h, &dev_index) != 0)) {
    return false;
  }
  g.key = (static_cast<int64_t>(dtype) & kDtypeBits) |
          ((static_cast<int64_t>(dev_type) & 0xffff) << 16) |
          ((static_cast<int64_t>(dev_index) & 0xffff) << 32);
  return true;
}

// g is rec[0:] (an address, key, dim, sizes, strides record); with_address false: all but
// the address (a grad read against its param's record); key_bits: the part of the key read
bool matches(const Geo& g, const int64_t* rec, bool with_address, int64_t key_bits = -1) {
  if ((with_address && reinterpret_cast<int64_t>(g.data) != rec[0]) ||
      g.key != (rec[1] & key_bits) || g.dim != rec[2]) {
    return false;
  }
  for (int64_t d = 0; d < g.dim; ++d) {
    // A dim of size 1 is never stepped over: its stride is free (as for is_contiguous, and
    // autograd's layout contract, which stashes grads with any stride there).
    if (g.sizes[d] != rec[3 + d] || (g.sizes[d] != 1 && g.strides[d] != rec[3 + g.dim + d])) {
      return false;
    }
  }
  return true;
}

// The records of tensors (a list): (geo, at), int64 buffers as bytes: tensor i's record is
// geo[at[i]:at[i + 1]]; None when one cannot be read (not a strided Tensor with storage).
py::object record_geometry(py::tuple shim, py::handle tensors) {
  Shim s = shim_of(shim);
  PyObject* ts = checked_list(tensors, "tensors");
  Py_ssize_t n = PyList_GET_SIZE(ts);
  std::vector<int64_t> geo, at{0};
  geo.reserve(5 * n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = PyList_GET_ITEM(ts, i);
    Geo g;
    if (!PyObject_TypeCheck(t, s.tensor_type) || !read(s, t, g)) {
      return py::none();
    }
    geo.push_back(reinterpret_cast<int64_t>(g.data));
    geo.push_back(g.key);
    geo.push_back(g.dim);
    geo.insert(geo.end(), g.sizes, g.sizes + g.dim);
    geo.insert(geo.end(), g.strides, g.strides + g.dim);
    at.push_back(static_cast<int64_t>(geo.size()));
  }
  return py::make_tuple(
      py::bytes(reinterpret_cast<const char*>(geo.data()), geo.size() * sizeof(int64_t)),
      py::bytes(reinterpret_cast<const char*>(at.data()), at.size() * sizeof(int64_t)));
}
// A method descriptor's C function, called as obj.method() (METH_NOARGS only).
PyMethodDef* noargs_method(py::handle descr, const char* name) {
  if (!PyObject_TypeCheck(descr.ptr(), &PyMethodDescr_Type)) {
    throw py::type_error(std::string("scan_table: ") + name + " must be a method descriptor");
  }
  PyMethodDef* m = reinterpret_cast<PyMethodDescrObject*>(descr.ptr())->d_method;
  if ((m->ml_flags & (METH_VARARGS | METH_KEYWORDS | METH_FASTCALL | METH_O)) != 0 ||
      (m->ml_flags & METH_NOARGS) == 0) {
    throw py::type_error(std::string("scan_table: ") + name + " must take no arguments");
  }
  return m;
}

// Per chunk of `chunk` params: each param (of one of `types`) with its grad (get_grad:
// TensorBase's getter of .grad) and both read as record_geometry's params' records
// (param_geo, param_at) say: the param all of it, the grad all but its address (a fast
// table's grad is its param's shape, strides, dtype and device). A grad that is not the
// recorded one must also not carry torch's lazy negation bit (is_neg: TensorBase.is_neg, which
// the shim does not read; z.conj().imag is such a view): the kernels read memory as it is. record: uint64 [2n], the
// grad ids and addresses the rows hold; out: writable uint64 [2n], this step's. Then every
// state tensor against its record (state_geo, state_at). Returns None when Python must
// decide (a param or grad of another type, moved, re-viewed or retyped; a grad None; a state
// tensor moved or re-viewed; a read that failed), or (grads, same): same: every grad is the
// recorded object at the recorded address; else the fresh grads' ids and addresses are in out.
py::object scan(py::tuple shim, py::handle get_grad, py::handle is_neg, py::tuple types,
                py::handle params, py::handle param_geo, py::handle param_at,
                py::handle record, py::handle state_tensors, py::handle state_geo,
                py::handle state_at, py::handle out, Py_ssize_t chunk) {
  Shim s = shim_of(shim);
  PyMethodDef* neg = noargs_method(is_neg, "is_neg");
  if (!PyObject_TypeCheck(get_grad.ptr(), &PyGetSetDescr_Type) ||
      reinterpret_cast<PyGetSetDescrObject*>(get_grad.ptr())->d_getset->get == nullptr) {
    throw py::type_error("scan_table: get_grad must be a getset descriptor");
  }
  if (chunk <= 0) throw py::value_error("scan_table: chunk must be > 0");
  PyObject* ps = checked_list(params, "params");
  PyObject* sts = checked_list(state_tensors, "state_tensors");
  Py_ssize_t n = PyList_GET_SIZE(ps), n_state = PyList_GET_SIZE(sts);
  Buffer pat(param_at, n + 1, 8, false, "param_at");
  Buffer sat(state_at, n_state + 1, 8, false, "state_at");
  const int64_t* pa = pat.data<int64_t>();
  const int64_t* sa = sat.data<int64_t>();
  Buffer pgeo(param_geo, pa[n], 8, false, "param_geo");
  Buffer sgeo(state_geo, sa[n_state], 8, false, "state_geo");
  Buffer rec(record, 2 * n, 8, false, "record");
  Buffer o(out, 2 * n, 8, true, "out");
  const int64_t* pg = pgeo.data<int64_t>();
  const int64_t* sg = sgeo.data<int64_t>();
  const std::uint64_t* want = rec.data<std::uint64_t>();
  std::uint64_t* got = o.data<std::uint64_t>();
  auto accepted = [&](PyObject* obj) {
    for (auto t : types) {
      if (Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(t.ptr())) return true;
    }
    return false;
  };
  PyGetSetDef* getter = reinterpret_cast<PyGetSetDescrObject*>(get_grad.ptr())->d_getset;
  py::list grads(n);
  // The list holds only tensors and never joins a cycle: untracked, the collector need not
  // walk its n grads at every young collection while a step holds it.
  PyObject_GC_UnTrack(grads.ptr());
  bool same = true;
  Geo g;
  for (Py_ssize_t lo = 0; lo < n; lo += chunk) {
    Py_ssize_t hi = std::min(n, lo + chunk);
    // One kind of read per loop: the reads of neighbouring tensors then overlap in the core
    // (a loop mixing a getter and pointer chases waits on each cache miss in turn).
    for (Py_ssize_t i = lo; i < hi; ++i) {
      PyObject* p = PyList_GET_ITEM(ps, i);
      if (!accepted(p)) return py::none();
      PyObject* grad = getter->get(p, getter->closure);
      if (grad == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(grads.ptr(), i, grad);  // the list owns it
    }
    for (Py_ssize_t i = lo; i < hi; ++i) {  // params: types checked above
      if (!read(s, PyList_GET_ITEM(ps, i), g) || !matches(g, pg + pa[i], true)) {
        return py::none();
      }
    }
    for (Py_ssize_t i = lo; i < hi; ++i) {
      PyObject* grad = PyList_GET_ITEM(grads.ptr(), i);
      if (grad == Py_None || !accepted(grad)) return py::none();
    }
    bool chunk_same = true;
    for (Py_ssize_t i = lo; i < hi; ++i) {  // grads: types checked above
      PyObject* grad = PyList_GET_ITEM(grads.ptr(), i);
      // The grad's layout, kept grads included: one re-viewed at its own address
      // (p.grad.t_(), p.grad.data = p.grad.data.view(...)) keeps its id and address.
      if (!read(s, grad, g) || !matches(g, pg + pa[i], false)) return py::none();
      std::uint64_t id = reinterpret_cast<std::uint64_t>(grad);
      std::uint64_t at = reinterpret_cast<std::uint64_t>(g.data);
      got[2 * i] = id;
      got[2 * i + 1] = at;
      if (id != want[2 * i] || at != want[2 * i + 1]) {
        chunk_same = false;
        PyObject* bit = neg->ml_meth(grad, nullptr);
        if (bit == nullptr) throw py::error_already_set();
        const bool negated = bit != Py_False;
        Py_DECREF(bit);
        if (negated) return py::none();
      }
    }
    same = same && chunk_same;
  }
  for (Py_ssize_t i = 0; i < n_state; ++i) {
    PyObject* t = PyList_GET_ITEM(sts, i);
    if (!PyObject_TypeCheck(t, s.tensor_type) || !read(s, t, g, false) ||
        !matches(g, sg + sa[i], true, kDtypeBits)) {
      return py::none();
    }
  }
  return py::make_tuple(grads, same);
}

// Anything the pass cannot read (a getter that raises, a buffer of the wrong size): None, and
// Python's passes meet it and say what is wrong.
py::object scan_table(py::tuple shim, py::handle get_grad, py::handle is_neg, py::tuple types,
                      py::handle params, py::handle param_geo, py::handle param_at,
                      py::handle record, py::handle state_tensors, py::handle state_geo,
                      py::handle state_at, py::handle out, Py_ssize_t chunk) {
  try {
    return scan(shim, get_grad, is_neg, types, params, param_geo, param_at, record,
                state_tensors, state_geo, state_at, out, chunk);
  } catch (const std::exception&) {  // py::error_already_set too: the error is dropped
    PyErr_Clear();
    return py::none();
  }
}

// a and b (lists) hold the same objects in the same order
bool same_items(py::handle a, py::handle b) {
  PyObject* la = checked_list(a, "a");
  PyObject* lb = checked_list(b, "b");
  Py_ssize_t n = PyList_GET_SIZE(la);
  if (PyList_GET_SIZE(lb) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(la, i) != PyList_GET_ITEM(lb, i)) return false;
  }
  return true;
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
  m.def("record_geometry", &record_geometry,
        "The records scan_table compares tensors (a list) with: (geo, at), int64 buffers as "
        "bytes (tensor i: address, key, dim, sizes, strides at geo[at[i]:at[i + 1]]), or None "
        "when one is not a strided Tensor the shim reads (see the comment above scan in "
        "csrc/bindings.cpp for shim).",
        py::arg("shim"), py::arg("tensors"));
  m.def("scan_table", &scan_table,
        "The steady step's one pass over a table's params, grads and state tensors (see the "
        "comment above scan in csrc/bindings.cpp): None, or (grads, same).",
        py::arg("shim"), py::arg("get_grad"), py::arg("is_neg"), py::arg("types"),
        py::arg("params"),
        py::arg("param_geo"), py::arg("param_at"), py::arg("record"),
        py::arg("state_tensors"), py::arg("state_geo"), py::arg("state_at"), py::arg("out"),
        py::arg("chunk"));
  m.def("same_items", &same_items, "Lists a and b hold the same objects in the same order.",
        py::arg("a"), py::arg("b"));
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
