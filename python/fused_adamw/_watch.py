"""What a table's rows were built from, compared with the live tensors every step.

A step where nothing changed must still see every change the kernel depends on: a param, grad
or state tensor that moved (``.data = t``, ``.set_(t)``), was re-viewed at the same address
(``p.data = p.data[:k]``, ``.t()``), changed dtype or was swapped for another object. That is
a pass over every param, grad and state tensor, every step; in Python it was most of a steady
step's host time (a call per tensor attribute, 30-90 ns each).

Two compiled helpers make it one call (csrc/bindings.cpp, namespace ``addresses``), each used
only where it exists and, on a probe, reads what Python reads; otherwise the Python passes of
``_table.Table.prepare`` run, as before:

* ``address_readers``: every address in one call, through torch's C entry point for a Tensor's
  data pointer (``torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr``, the one
  Inductor's compiled wrappers call). Handed to ``_C`` as an int: ``_C`` links no torch and
  builds without its headers.
* :class:`Watch`: the steady step's whole comparison for a table whose rows cover every param
  (``_C.scan_table``): per param its grad, then the address, dtype, device, sizes and strides
  of the param, its grad and every state tensor, read through torch's stable C functions
  (``aoti_torch_get_*``, the AOTInductor shim that compiled models call across torch
  versions; looked up in torch's library with ctypes) from the ``at::Tensor`` each Tensor's
  Python object holds (found by a probe, :func:`_cdata_offset`). No Python call per tensor.
  Its answer is "nothing changed", "only the grads are new (and fit the rows)" or "ask
  Python", which then names what is wrong, or rebuilds.

Both rest on torch's internals: a torch without them (or whose probe disagrees) steps through
the Python passes, slower and the same.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any

import numpy as np
import torch

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg
_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")
_numel = torch.Tensor.numel
_stride = torch.Tensor.stride
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")


def _python_addresses(tensors: list) -> list[int]:
    return list(map(_data_ptr, tensors))


def _python_same_addresses(tensors: list, expected: list[int]) -> bool:
    return list(map(_data_ptr, tensors)) == expected


def _python_same_items(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


_READERS: tuple | None = None


def address_readers() -> tuple:
    """``(addresses, same_addresses, same_items)``: ``addresses(tensors)`` is ``[t.data_ptr()
    for t in tensors]``, ``same_addresses(tensors, expected)`` is ``addresses(tensors) ==
    expected``, ``same_items(a, b)``: lists a and b hold the same objects in order. Compiled
    where the probe passes (see the module docstring), else Python; a tensor the compiled
    reader refuses (no storage) goes to the Python pass, which raises as before."""
    global _READERS
    if _READERS is None:
        _READERS = _compiled_readers() or (_python_addresses, _python_same_addresses,
                                           _python_same_items)
    return _READERS


def _entry_point():
    """(torch's data pointer function as an int, torch._C.TensorBase), or None."""
    try:
        from torch._C._dynamo.guards import _torchinductor_pyobject_tensor_data_ptr as fn
    except ImportError:
        return None
    base = getattr(torch._C, "TensorBase", None) or getattr(torch._C, "_TensorBase", None)
    if not isinstance(fn, int) or not fn or base is None:
        return None
    return fn, base


def _compiled_readers() -> tuple | None:
    from . import _ext

    C, entry = _ext.C, _entry_point()
    if entry is None or C is None or not hasattr(C, "addresses_equal"):
        return None
    fn, base = entry
    flat = torch.zeros(8)
    probe = [flat, flat[3:], flat[1::2], torch.nn.Parameter(torch.ones(2)), torch.empty(0)]
    try:
        ok = (C.tensor_addresses(fn, base, probe) == _python_addresses(probe)
              and C.addresses_equal(fn, base, probe, _python_addresses(probe))
              and not C.addresses_equal(fn, base, probe[:2], _python_addresses(probe[1:3]))
              and C.same_items(probe, list(probe)) and not C.same_items(probe, probe[::-1]))
    except Exception:  # noqa: BLE001 - any failure: the Python pass
        return None
    if not ok:
        return None
    tensor_addresses, addresses_equal = C.tensor_addresses, C.addresses_equal

    def addresses(tensors: list) -> list[int]:
        try:
            return tensor_addresses(fn, base, tensors)
        except (TypeError, ValueError):
            return _python_addresses(tensors)

    def same_addresses(tensors: list, expected: list[int]) -> bool:
        try:
            return addresses_equal(fn, base, tensors, expected)
        except (TypeError, ValueError):
            return _python_same_addresses(tensors, expected)

    def same_items(a: list, b: list) -> bool:
        try:
            return C.same_items(a, b)
        except TypeError:  # not lists
            return _python_same_items(a, b)

    return addresses, same_addresses, same_items


# ------------------------------------------------------------------------------------------
# the steady step's compiled pass
# ------------------------------------------------------------------------------------------

CHUNK = 256  # params per loop of the compiled pass: their objects stay in cache between loops
_SCAN: Any = False  # not looked up yet
# torch's stable C functions the compiled pass reads tensors through (aoti_torch_get_*)
SHIM_FUNCTIONS = ("layout", "data_ptr", "dtype", "device_type", "device_index", "dim", "sizes",
                  "strides")


def compiled_scan():
    """``(scan, record)``: ``_C.scan_table`` and ``_C.record_geometry`` bound to torch's
    stable C functions and to where a Tensor's Python object holds its ``at::Tensor``
    (:func:`_shim`); None where either is missing or fails its probe."""
    global _SCAN
    if _SCAN is False:
        _SCAN = _compiled_scan()
    return _SCAN


def _torch_library():
    """torch's CPU library (where the AOTInductor shim lives), opened through ctypes (it is
    loaded already: this only finds it), or None."""
    import ctypes
    import os

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _cdata_offset(probes: list) -> int | None:
    """Where a Tensor's Python object holds its ``at::Tensor`` (``THPVariable::cdata``: right
    after the object header in torch 2.x, after a flag word in some): the one word offset at
    which every probe holds its ``TensorImpl`` address (``Tensor._cdata``), or None. Every
    read of the compiled pass goes through it (the checks after it read through it too):
    only a word that holds the impl's address for every probe, and no other word, is taken."""
    import ctypes
    import platform

    base = getattr(torch._C, "TensorBase", None) or getattr(torch._C, "_TensorBase", None)
    if platform.python_implementation() != "CPython" or base is None:
        return None  # id() is the object's address only in CPython
    word = ctypes.sizeof(ctypes.c_void_p)
    found = [k for k in range(2 * word, base.__basicsize__ - word + 1, word)
             if all(ctypes.c_void_p.from_address(id(t) + k).value == t._cdata for t in probes)]
    return found[0] if len(found) == 1 else None


def _shim() -> tuple | None:
    """What ``_C``'s compiled pass reads tensors with: (cdata offset, the strided layout's
    code, ``torch._C.TensorBase``, the addresses of ``aoti_torch_get_<f>`` for f in
    SHIM_FUNCTIONS), or None where torch lacks any of them."""
    import ctypes

    lib = _torch_library()
    base = getattr(torch._C, "TensorBase", None) or getattr(torch._C, "_TensorBase", None)
    if lib is None or base is None:
        return None
    try:
        fns = tuple(ctypes.cast(getattr(lib, "aoti_torch_get_" + f), ctypes.c_void_p).value
                    for f in SHIM_FUNCTIONS)
        strided = lib.aoti_torch_layout_strided
        strided.restype = ctypes.c_int32
        strided_code = int(strided())
    except (AttributeError, OSError):
        return None
    probes = [torch.zeros(3), torch.nn.Parameter(torch.ones(2)), torch.zeros(8)[2::2],
              torch.zeros((), dtype=torch.bfloat16), torch.zeros(2, 3).t()]
    offset = _cdata_offset(probes)
    if offset is None or not all(fns):
        return None
    return (offset, strided_code, base) + fns


def _records_agree(record, shim) -> bool:
    """record_geometry reads what Python reads (addresses, dims, sizes, strides; one key per
    dtype and device)."""
    flat = torch.zeros(40)
    ts = [flat, flat[7:], flat.view(5, 8).t(), flat[1::3], torch.nn.Parameter(torch.ones(3)),
          torch.empty(0), torch.zeros((), dtype=torch.bfloat16),
          torch.arange(6.0).view(2, 3)[:, 1],
          torch.zeros(2, 1, 3, dtype=torch.float16), torch.zeros(6, dtype=torch.float64)]
    found = record(shim, ts)
    if found is None:
        return False
    geo, at = (np.frombuffer(b, dtype=np.int64) for b in found)
    keys = {}
    for i, t in enumerate(ts):
        r = geo[at[i]:at[i + 1]].tolist()
        d = t.dim()
        if r[0] != t.data_ptr() or r[2] != d or r[3:3 + d] != list(t.shape) \
                or r[3 + d:] != list(t.stride()):
            return False
        keys.setdefault(r[1], set()).add(t.dtype)
    return len(keys) == 4 and all(len(v) == 1 for v in keys.values())


def _compiled_scan():
    from . import _ext

    C = _ext.C
    if C is None or not hasattr(C, "scan_table") or not hasattr(C, "record_geometry"):
        return None
    base = getattr(torch._C, "TensorBase", None) or getattr(torch._C, "_TensorBase", None)
    get_grad = base.__dict__.get("grad") if base is not None else None
    types = (torch.Tensor, torch.nn.Parameter)
    # The C pass calls TensorBase's grad getter: only for types that do not override it.
    import inspect

    if get_grad is None or any(inspect.getattr_static(t, "grad", None) is not get_grad
                               for t in types):
        return None
    shim = _shim()
    if shim is None:
        return None
    scan_table, record_geometry = C.scan_table, C.record_geometry
    is_neg = base.__dict__.get("is_neg")
    try:
        if not _records_agree(record_geometry, shim):
            return None
    except Exception:  # noqa: BLE001 - any failure: the Python passes
        return None

    def scan(params, param_geo, param_at, record, state_tensors, state_geo, state_at, out):
        return scan_table(shim, get_grad, is_neg, types, params, param_geo, param_at, record,
                          state_tensors, state_geo, state_at, out, CHUNK)

    def record(tensors: list):
        return record_geometry(shim, tensors)

    # A probe: what it says must be what the Python passes say.
    try:
        with torch.no_grad():
            ps = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
            for p in ps:
                p.grad = torch.zeros(p.shape)
            grads = [p.grad for p in ps]
            state = [torch.zeros(()), torch.zeros(4)]
            watch = Watch()
            watch.arm((scan, record), ps, grads, state)
            same = watch.scan(ps)
            ps[1].grad = torch.ones(4)
            fresh = watch.scan(ps)
            fresh_ok = [int(x) for x in watch.out[1::2]] == [grads[0].data_ptr(),
                                                             ps[1].grad.data_ptr()]
            ps[1].grad = torch.ones(8)[::2]  # strided
            bad_grad = watch.scan(ps)
            ps[1].grad = torch._neg_view(torch.ones(4))  # contiguous, the negation bit
            negated = watch.scan(ps)
            ps[1].grad = grads[1]
            ps[0].data = ps[0].data.t()  # a re-view at the same address
            reviewed = watch.scan(ps)
            ps[0].data = ps[0].data.t()
            kept = ps[1].data
            ps[1].data = torch.zeros(4)  # moved
            moved = watch.scan(ps)
            ps[1].data = kept
            grads[0].t_()  # a kept grad re-viewed at its own address
            grad_reviewed = watch.scan(ps)
            grads[0].t_()
            state[1].data = state[1].data.view(2, 2)  # a state tensor re-viewed in place
            state_reviewed = watch.scan(ps)
            state[1].data = torch.zeros(4)
            state_moved = watch.scan(ps)
    except Exception:  # noqa: BLE001 - any failure: the Python passes
        return None
    ok = (same is not None and same[0] == grads and same[1] is True
          and fresh is not None and fresh[1] is False
          and fresh_ok
          and all(x is None for x in (bad_grad, negated, reviewed, moved, grad_reviewed,
                                      state_reviewed, state_moved)))
    return (scan, record) if ok else None


class Watch:
    """A table's record for the compiled pass: built (``arm``) from the params, grads and state
    tensors the rows were built from, refreshed when fresh grads are patched in (``took``)."""

    MAX_MISSES = 3  # re-arms after the pass refused what Python found unchanged

    def __init__(self) -> None:
        self.armed = False
        self.misses = 0  # how often Python found nothing changed where the pass said no
        self.record = self.out = None
        self.param_geo = self.state_geo = None  # _C.record_geometry's (geo, at)
        self.state_tensors: list = []
        self.fns: tuple | None = None

    def arm(self, fns: tuple, params: list, grads: list, state_tensors: list) -> None:
        """Records what the pass compares; stays disarmed where a tensor cannot be read."""
        self.fns = fns
        record_geometry = fns[1]
        self.param_geo = record_geometry(params)
        self.state_geo = record_geometry(state_tensors)
        if self.param_geo is None or self.state_geo is None:
            self.disarm()
            return
        n = len(params)
        record = np.empty((n, 2), dtype=np.uint64)
        record[:, 0] = list(map(id, grads))
        record[:, 1] = address_readers()[0](grads)
        self.record = record.reshape(-1)
        self.out = np.empty(2 * n, dtype=np.uint64)
        self.state_tensors = state_tensors
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.record = self.out = self.param_geo = self.state_geo = None
        self.state_tensors = []

    def scan(self, params: list):
        """None (ask Python), or ``(grads, same)``; with ``same`` False, ``out`` holds the
        fresh grads' ids and addresses (see csrc/bindings.cpp, ``scan``)."""
        return self.fns[0](params, *self.param_geo, self.record, self.state_tensors,
                           *self.state_geo, self.out)

    def took(self) -> None:
        """The fresh grads of the last scan are now the rows' grads."""
        self.record[:] = self.out

    def grad_ptrs(self) -> np.ndarray:
        """The last scan's grad addresses (a view of ``out``)."""
        return self.out[1::2]


# ------------------------------------------------------------------------------------------
# a table's step: what changed, as a plan
# ------------------------------------------------------------------------------------------


@dataclass
class RowPlan:
    """A row to build, validated; nothing allocated yet."""

    index: int
    group: int
    param: object  # the user's param object
    local: torch.Tensor  # its local tensor (the DTensor's shard, or the param)
    grad: torch.Tensor  # its grad's local tensor
    state: dict | None  # None: torch creates state at the first step with a grad: so do we
    amsgrad: bool
    fix_step: bool  # the step entry is not a 0-d float32 tensor on the param's device
    mode: str | None = None  # the group's master_weights (16-bit params only; else None)


@dataclass
class Plan:
    """What one step must do to a table before the launch (Table.prepare makes it,
    Table.commit carries it out)."""

    kind: str  # "idle" (no grad), "same", "grads" (only grad addresses moved), "rebuild"
    grads: list = field(default_factory=list)  # every param's grad (local), None for no grad
    mask: list = field(default_factory=list)
    active_grads: list = field(default_factory=list)
    grad_ptrs: list = field(default_factory=list)
    data_ptrs: list = field(default_factory=list)
    locals: list = field(default_factory=list)
    rows: list[RowPlan] = field(default_factory=list)
    grad_ids: list | None = None  # ids of ``grads`` when prepare had them ("grads")
    scanned: bool = False  # decided by the compiled pass (Watch)


def _grads_fit(table, grads: list) -> bool:
    """``grads`` (the rows' params' grads) are what a fast table's rows assume: contiguous
    like their params, of their shapes and of the table's dtype, without torch's lazy
    negation bit."""
    return (all(map(_is_contiguous, grads)) and list(map(_shape_of, grads)) == table.shapes
            and list(map(_dtype_of, grads)).count(table.dtype) == len(grads)
            and not any(map(_is_neg, grads)))  # the kernels read memory as it is


def detect(table, rebuild: bool, amsgrad_sig: tuple) -> Plan:
    """What changed in ``table`` since its rows were built: a plan "same", "grads",
    "idle", or "rebuild" (the grads and params the rebuild will validate). The compiled pass
    where it is armed; otherwise Python passes (C-level ones where ``_C`` reads addresses).
    ``rebuild``: the optimizer knows the rows are stale (state or param groups edited)."""
    params = table.params
    watch = table.watch
    if watch.armed and not (rebuild or table.has_dtensor) and amsgrad_sig == table.amsgrad_sig:
        # Every param, grad and state tensor as the rows hold them, or only the grads new
        # and fitting the rows (one compiled pass: what the Python passes below check).
        found = watch.scan(params)
        if found is not None:
            grads, same = found
            if same:
                return Plan("same", grads, table.mask, grads, scanned=True)
            return Plan("grads", grads, table.mask, grads, watch.grad_ptrs(), scanned=True)
        # Otherwise the passes below decide (and name what is wrong).
    from ._table import describe, local

    addresses, same_addresses = address_readers()[:2]
    geometry = table.geometry
    if table.grads_in_watch:  # the last fresh grads were recorded by the compiled pass
        table.grad_ids = watch.record[0::2].tolist()
        table.grad_ptrs = watch.record[1::2].tolist()
        table.grads_in_watch = False
    if table.has_dtensor:
        locals_ = list(map(local, params))
        grads = [None if g is None else local(g) for g in map(_grad_of, params)]
    else:
        locals_ = params
        grads = list(map(_grad_of, params))
    # NOTE on staleness: what the kernel relies on for each param is compared with what
    # the rows were built from: its address, numel, dtype and strides. The address alone
    # misses a `p.data = t` of another size or dtype that the caching allocator placed
    # where the old storage was, and a re-view at the same address (p.data = p.data[:k],
    # p.data = p.data.t()). Strides: a fast table's params are contiguous, and then numel
    # and contiguity fix the walk (one cheap pass); other tables compare the strides. The
    # shape too (p.data = p.data.view(3, 4) of a (4, 3) param walks the same memory, but its
    # state no longer fits it: torch raises, so does the rebuild).
    if (table.data_ptrs is None or not same_addresses(locals_, table.data_ptrs)
            or list(map(_numel, locals_)) != geometry[0]
            or list(map(_dtype_of, locals_)) != geometry[1]
            or (table.fast_grads and (not all(map(_is_contiguous, locals_))
                                      or list(map(_shape_of, locals_)) != geometry[3]))
            or (not table.fast_grads and list(map(_stride, locals_)) != geometry[2])
            or (table.has_dtensor and not all(map(operator.is_, locals_, table.locals)))
            # A state tensor whose storage was swapped (state["exp_avg"].data = t) or that
            # was re-viewed at its own address (.data = .data.t()).
            or not same_addresses(table.state_tensors, table.state_ptrs)
            or list(map(_shape_of, table.state_tensors)) != table.state_geometry[0]
            or list(map(_stride, table.state_tensors)) != table.state_geometry[1]
            or list(map(_dtype_of, table.state_tensors)) != table.state_geometry[2]):
        rebuild = True
    rebuild = rebuild or amsgrad_sig != table.amsgrad_sig
    # NOTE on ids: the table keeps the ids and addresses of last step's grads, not the
    # grads (holding them would keep a grad-sized buffer alive through the next forward
    # and backward). A new grad may get a freed one's id; it is then taken as the same
    # only if it also has the same address, which makes the row right as it is.
    grad_ids = list(map(id, grads))
    if not rebuild and grad_ids == table.grad_ids:
        # The same grads as last step (zero_grad(set_to_none=False), DDP bucket views).
        # A row per param: every param has its grad (no pass to pick them).
        active_grads = (grads if table.n_rows == len(grads)
                        else list(compress(grads, table.mask)))
        # A kept grad re-viewed at its own address (p.grad.t_(), p.grad.data =
        # p.grad.data.view(...)) has the same id and address: a fast table's rows also
        # assume its layout, which is checked as for fresh grads.
        if same_addresses(active_grads, table.grad_ptrs) and (
                not table.fast_grads or _grads_fit(table, active_grads)):
            return Plan("same" if table.rows else "idle", grads, table.mask, active_grads,
                        table.grad_ptrs)
        # Same objects, new storage or layout (p.grad.data = t): checked like fresh grads.
    mask = list(map(operator.is_not, grads, repeat(None)))
    if not any(mask):
        return Plan("idle", grads, mask)
    active_grads = grads if all(mask) else list(compress(grads, mask))
    if not rebuild and mask == table.mask and table.fast_grads and _grads_fit(table, active_grads):
        # Fresh grads (the default zero_grad()): contiguous like their params (a sparse
        # grad is not), of their shapes and dtype (a grad swapped by p.grad.data = t may
        # be neither: the rebuild below refuses it, naming the param), new addresses.
        return Plan("grads", grads, mask, active_grads, addresses(active_grads),
                    grad_ids=grad_ids)
    if any(map(_is_sparse, active_grads)):
        i = next(i for i, g in enumerate(grads) if g is not None and g.is_sparse)
        raise RuntimeError(
            f"FusedAdamW does not support sparse gradients: "
            f"{describe(table.names[i], local(params[i]))} has a sparse grad; use "
            "torch.optim.SparseAdam for sparse params")
    return Plan("rebuild", grads, mask, active_grads, [], addresses(locals_), locals_)


def arm_after(table, plan: Plan) -> None:
    """After a step the Python passes decided for ``table``: the compiled pass's record, for
    a table whose rows cover every param with grads read in place (else none). Guards that
    said "changed" where Python found nothing that matters (a requires_grad toggled, another
    dispatch context) are re-armed a few times, then the table stays on the Python passes."""
    watch, fns = table.watch, compiled_scan()
    if (fns is None or not table.fast_grads or not table.n_rows or table.has_dtensor
            or table.n_rows != len(table.params) or watch.misses >= watch.MAX_MISSES):
        watch.disarm()
        return
    if watch.armed and plan.kind != "rebuild":
        watch.misses += 1
    watch.arm(fns, table.params, plan.grads, table.state_tensors)
