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
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any

import numpy as np
import torch

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
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
    like their params, of their shapes and of the table's dtype."""
    return (all(map(_is_contiguous, grads)) and list(map(_shape_of, grads)) == table.shapes
            and list(map(_dtype_of, grads)).count(table.dtype) == len(grads))


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
        table.grad_ids = watch.record[1::3].tolist()
        table.grad_ptrs = watch.record[2::3].tolist()
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
    # and contiguity fix the walk (one cheap pass); other tables compare the strides.
    if (table.data_ptrs is None or not same_addresses(locals_, table.data_ptrs)
            or list(map(_numel, locals_)) != geometry[0]
            or list(map(_dtype_of, locals_)) != geometry[1]
            or (table.fast_grads and not all(map(_is_contiguous, locals_)))
            or (not table.fast_grads and list(map(_stride, locals_)) != geometry[2])
            or (table.has_dtensor and not all(map(operator.is_, locals_, table.locals)))
            # A state tensor whose storage was swapped (state["exp_avg"].data = t).
            or not same_addresses(table.state_tensors, table.state_ptrs)):
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
