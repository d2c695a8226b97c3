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
  Inductor's compiled wrappers call; 8-15 ns a tensor). Handed to ``_C`` as an int: ``_C``
  links no torch and builds without its headers.
* :class:`Watch`: the steady step's whole comparison for a table whose rows cover every param
  (``_C.scan_table``): per param its grad, its address and its grad's, the geometry of both
  through torch's ``TensorGuards`` (Dynamo's C++ check of a tensor's type, dtype, device,
  sizes and strides, one call per chunk of params, no Python call per tensor), and every state
  tensor's address. Its answer is "nothing changed", "only the grads are new (and fit the
  rows)" or "ask Python", which then names what is wrong, or rebuilds.

Both are torch's private API: a torch without them (or whose probe disagrees) steps through the
Python passes, slower and the same.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

_data_ptr = torch.Tensor.data_ptr


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

CHUNK = 256  # params per TensorGuards check: their objects stay in cache for the scan after
_SCAN: Any = False  # not looked up yet


def compiled_scan():
    """``(scan, guard)``: ``_C.scan_table`` bound to torch's entry points and ``guard(tensors)``,
    a check that ``check(*tensors)`` is True while each tensor keeps its type, dtype, device,
    requires_grad, sizes and strides; None where either is missing or fails its probe."""
    global _SCAN
    if _SCAN is False:
        _SCAN = _compiled_scan()
    return _SCAN


def _tensor_guard(tensors: list):
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors],
                        tensor_check_names=[str(i) for i in range(len(tensors))]).check


def _compiled_scan():
    from . import _ext

    entry = _entry_point()
    if entry is None or _compiled_readers() is None or not hasattr(_ext.C, "scan_table"):
        return None
    fn, base = entry
    get_grad = base.__dict__.get("grad")
    types = (torch.Tensor, torch.nn.Parameter)
    # The C pass calls TensorBase's grad getter: only for types that do not override it.
    import inspect

    if get_grad is None or any(inspect.getattr_static(t, "grad", None) is not get_grad
                               for t in types):
        return None
    scan_table = _ext.C.scan_table

    def scan(params, param_checks, grad_checks, record, state_tensors, state_ptrs, out):
        return scan_table(fn, base, get_grad, types, params, param_checks, grad_checks, record,
                          state_tensors, state_ptrs, out, CHUNK)

    # A probe: what it says must be what the Python passes say.
    try:
        with torch.no_grad():
            ps = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
            for p in ps:
                p.grad = torch.zeros(p.shape)
            grads = [p.grad for p in ps]
            state = [torch.zeros(()), torch.zeros(4)]
            watch = Watch()
            watch.arm((scan, _tensor_guard), ps, grads, state)
            same = watch.scan(ps)
            ps[1].grad = torch.ones(4)
            fresh = watch.scan(ps)
            fresh_ok = [int(x) for x in watch.out[1::2]] == [grads[0].data_ptr(),
                                                             ps[1].grad.data_ptr()]
            ps[1].grad = torch.ones(8)[::2]  # strided
            bad_grad = watch.scan(ps)
            ps[1].grad = grads[1]
            ps[0].data = ps[0].data.t()  # a re-view at the same address
            moved = watch.scan(ps)
            ps[0].data = ps[0].data.t()
            state[1].data = torch.zeros(4)
            state_moved = watch.scan(ps)
    except Exception:  # noqa: BLE001 - any failure: the Python passes
        return None
    ok = (same is not None and same[0] == grads and same[1] is True
          and fresh is not None and fresh[1] is False
          and fresh_ok
          and bad_grad is None and moved is None and state_moved is None)
    return (scan, _tensor_guard) if ok else None


class Watch:
    """A table's record for the compiled pass: built (``arm``) from the params, grads and state
    tensors the rows were built from, refreshed when fresh grads are patched in (``took``)."""

    MAX_MISSES = 3  # re-arms after the guards refused what Python found unchanged

    def __init__(self) -> None:
        self.armed = False
        self.misses = 0  # how often Python found nothing changed where the guards said no
        self.record = self.out = self.state_ptrs = None
        self.param_checks: list = []
        self.grad_checks: list = []
        self.state_tensors: list = []
        self.fns: tuple | None = None

    def arm(self, fns: tuple, params: list, grads: list, state_tensors: list) -> None:
        scan, guard = self.fns = fns
        n = len(params)
        readers = address_readers()
        addresses = readers[0]
        record = np.empty((n, 3), dtype=np.uint64)
        record[:, 0] = addresses(params)
        record[:, 1] = list(map(id, grads))
        record[:, 2] = addresses(grads)
        self.record = record.reshape(-1)
        self.out = np.empty(2 * n, dtype=np.uint64)
        self.state_tensors = state_tensors
        self.state_ptrs = np.array(addresses(state_tensors), dtype=np.uint64)
        chunks = range(0, n, CHUNK)
        self.param_checks = [guard(params[i:i + CHUNK]) for i in chunks]
        self.grad_checks = [guard(grads[i:i + CHUNK]) for i in chunks]
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.record = self.out = self.state_ptrs = None
        self.param_checks, self.grad_checks, self.state_tensors = [], [], []

    def scan(self, params: list):
        """None (ask Python), or ``(grads, same)``; with ``same`` False, ``out`` holds the
        fresh grads' ids and addresses (see csrc/bindings.cpp, ``scan``)."""
        return self.fns[0](params, self.param_checks, self.grad_checks, self.record,
                           self.state_tensors, self.state_ptrs, self.out)

    def took(self) -> None:
        """The fresh grads of the last scan are now the rows' grads."""
        record = self.record.reshape(-1, 3)
        out = self.out.reshape(-1, 2)
        record[:, 1] = out[:, 0]
        record[:, 2] = out[:, 1]

    def grad_ptrs(self) -> np.ndarray:
        """The last scan's grad addresses (a view of ``out``)."""
        return self.out[1::2]
