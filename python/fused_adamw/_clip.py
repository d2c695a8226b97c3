"""Gradient clipping and per-param norms inside the fused step (issue #19).

``FusedAdamW(..., max_grad_norm=M)`` does what ``torch.nn.utils.clip_grad_norm_(params, M,
norm_type)`` does just before ``step()``, without its second pass over the grads:

1. one norm pass per table (``backend.grad_norm_rows``): every row's sum of squares (or max
   |g| for the inf norm) of its grad as the step will read it (after GradScaler's unscale),
   into ``table.clip_rows`` (float64 ``[n_rows + 1]``, the last entry the table's total);
2. here, on the device and without a host sync: the tables' totals are combined (DTensor rows
   reduced over their mesh, then the optional ``grad_norm_process_group``), giving
   ``opt.grad_norm`` (the total norm, float32 0-d, what ``clip_grad_norm_`` returns) and the
   coefficient ``clamp(M / (total + 1e-6), max=1)``, computed by the same tensor operations as
   torch's (``reciprocal(total + 1e-6) * M``, then the clamp), so it is bitwise torch's for a
   given total;
3. the step reads each grad once, unscales it, multiplies it by the coefficient
   (``adamw_clip`` in kernels/adamw_math.cuh) and updates; with ``track_norms`` it also
   leaves per-row sums of squares of (grad as used before clipping, param after, param after
   - param before, as stored) in ``table.row_norms`` (float32 ``[n_rows, 3]``), which become
   ``opt.norms`` after the same mesh reduction and a square root.

NOTE on what p.grad holds after a clipped step: the grad *unclipped*. Without a GradScaler it
is untouched; under ``scaler.step(opt)`` (no user ``unscale_``) it holds the unscaled grad, as
after an unclipped step (the kernels write the quotient back, as before). Clipping is applied
to the value the update reads only: writing the clipped grad back would be the second pass
this feature removes.

NOTE on rounding against torch's ``unscale_`` + ``clip_grad_norm_`` + ``step``: torch rounds
the unscaled grad and then the clipped grad to the grad's dtype; here both stay in float32
(the update reads the float quotient times the coefficient). For float32 grads that is the
same arithmetic (g * inv_scale equals g / scale for GradScaler's power-of-two scales, then
one rounded multiply by the coefficient). For 16-bit grads ours skips two roundings to 16
bits. The total norm itself is summed in another order than torch's (per-tile float32
partials, then float64; torch takes a norm of per-tensor norms), so it agrees to rounding,
not bitwise; each backend's own sum is deterministic (fixed order, no atomics).

NOTE on the inf norm: ``grad_norm_type=inf`` takes max |g| per tile, per row and over tables
(``max``, which is exact and order-free; a NaN anywhere makes it NaN, as torch's), and the
mesh and process-group reductions use MAX instead of SUM. ``opt.norms`` stays L2 whatever
the norm type.

NOTE on collectives under FSDP2 (DTensor params): the rows of DTensor params are grouped by
(mesh, the mesh dims whose placement is not Replicate); each group's local sum is all-reduced
over those dims (SUM; MAX for the inf norm), one collective of one float64 per such dim.
Replicate dims are not summed (each replica holds the same values). For FSDP2's 1-D mesh that
is exactly one all-reduce of 8 bytes per step before the update, whatever the number of
params; HSDP (Replicate, Shard) also one. With ``track_norms`` a second all-reduce after the
step carries every DTensor row's three sums (float32 [n, 3]), one per group. With
``grad_norm_process_group`` the total (only: per-param norms are of whole local params) is
all-reduced once more over that group. Without DTensors and without a group: none. Every rank
must step the same DTensor params (FSDP2 does), or the collectives do not match.

NOTE on backends: cpu (the C++ loop), cuda (kernels/adamw_norm.cuh; the coefficient in the
GradScaler kernels outside amsgrad, see the NOTE on clipping in kernels/adamw_kernel.cu, and
in the NORMS kernels for amsgrad and low-precision tables) and triton
(backends/triton_norm.py; the coefficient in adamw_kernel, bitwise the CPU loop under the
interpreter) run the norm pass and the coefficient; the cpu, cuda (the NORMS kernels' own
per-thread partials, bitwise the CPU loop's under tests/test_kernel_emulation.py), triton
(inside adamw_kernel, its NOTE on track_norms: the CPU loop's lane order, bitwise under the
interpreter) and torch backends also the per-row norms of ``track_norms``. ``backend_of``
still steps a table whose backend lacks a part on the torch backend (correct, slower); no
backend lacks one now.

NOTE on GradScaler's skipped steps: ``opt.grad_norm`` holds the non-finite norm torch's
``clip_grad_norm_`` would return; no param stepped, so every ``opt.norms`` entry is NaN.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import _table

_FLT_MAX = float(torch.finfo(torch.float32).max)
NORMS = 3  # columns of Table.row_norms: grad (as used, before clipping), param after, delta


def check_args(max_grad_norm, grad_norm_type, track_norms, grad_norm_process_group) -> None:
    """The constructor's checks: ValueError naming the argument."""
    if max_grad_norm is not None:
        if (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real)
                or not max_grad_norm > 0 or math.isinf(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be None or a positive finite number, got "
                             f"{max_grad_norm!r}")
    if (isinstance(grad_norm_type, bool) or not isinstance(grad_norm_type, numbers.Real)
            or not grad_norm_type > 0):
        raise ValueError(f"grad_norm_type must be a positive number or inf, got "
                         f"{grad_norm_type!r}")
    if float(grad_norm_type) not in (2.0, math.inf):
        raise ValueError(f"grad_norm_type must be 2.0 or float('inf'), got {grad_norm_type!r} "
                         "(other p-norms are not implemented in the fused step)")
    if not isinstance(track_norms, bool):
        raise ValueError(f"track_norms must be a bool, got {track_norms!r}")
    if grad_norm_process_group is not None and not _is_process_group(grad_norm_process_group):
        raise ValueError(f"grad_norm_process_group must be a torch.distributed process group "
                         f"(e.g. dist.group.WORLD), got {grad_norm_process_group!r}")
    if grad_norm_process_group is not None and max_grad_norm is None and not track_norms:
        raise ValueError("grad_norm_process_group is given but neither max_grad_norm nor "
                         "track_norms is set: there is no norm to reduce")


def _is_process_group(group) -> bool:
    try:
        from torch.distributed import ProcessGroup
    except ImportError:  # torch built without distributed: nothing could be one
        return False
    return isinstance(group, ProcessGroup)


def _same_setting(a, b) -> bool:
    if a is b:
        return True
    try:
        return a is not None and b is not None and float(a) == float(b)
    except (TypeError, ValueError):
        return False


OPTIMIZER_WIDE = ("max_grad_norm", "grad_norm_type", "track_norms", "grad_norm_process_group")


def check_groups(opt, groups) -> None:
    """Clipping and norms are optimizer-wide and come out of the fused kernels: a group with
    differentiable=True (stepped by torch's single-tensor Adam) is refused with them, and so is
    a group whose own value of one of them differs from the optimizer's (it would be ignored).
    The same value is accepted: ZeroRedundancyOptimizer passes its keyword arguments both to
    the constructor and, as defaults, into every group."""
    for index, group in groups:
        for key in OPTIMIZER_WIDE:
            if key in group and not _same_setting(group[key], opt.__dict__.get("_" + key)):
                raise ValueError(
                    f"param group {index} has {key}={group[key]!r}, but {key} is "
                    f"optimizer-wide (one norm over every group's grads; the optimizer's is "
                    f"{opt.__dict__.get('_' + key)!r}): give it to the constructor instead")
    if opt.__dict__.get("_max_grad_norm") is None and not opt.__dict__.get("_track_norms"):
        return
    for index, group in groups:
        if group.get("differentiable"):
            which = "max_grad_norm" if opt._max_grad_norm is not None else "track_norms"
            raise ValueError(
                f"param group {index}: {which} is not available with differentiable=True "
                "(those groups are stepped by torch's differentiable Adam, outside the fused "
                "step that clips); clip with torch.nn.utils.clip_grad_norm_ instead")


def wanted(opt) -> bool:
    return opt._max_grad_norm is not None or opt._track_norms


def backend_of(opt, table):
    """The backend that steps ``table`` when norms are wanted: its own when it implements the
    norm pass and the clip coefficient (``clips = True``) and, with track_norms, the per-row
    norms (``tracks_norms = True``), else the torch backend (correct everywhere, slower)."""
    b = table.backend
    clips_table = getattr(b, "clips_table", None)
    if (getattr(b, "clips", False) and (not opt._track_norms or getattr(b, "tracks_norms", False))
            and (clips_table is None or clips_table(table))):
        return b
    from . import _dispatch

    return _dispatch._load("torch")


def check_tables(opt, tables: list) -> None:
    """Before anything changes (called after the tables' prepare, before their commit)."""
    if opt.__dict__.get("_grad_norm_process_group_lost"):
        raise RuntimeError(
            "this FusedAdamW was copied or unpickled, and its grad_norm_process_group (a "
            "process group, which does not pickle) was left behind: stepping would clip by "
            "this rank's norm only. Build a new optimizer with grad_norm_process_group=... and "
            "load_state_dict(old.state_dict())")
    if opt._grad_norm_type != math.inf:
        return
    for t in tables:
        if getattr(t, "complex_checked", None) == t.rebuilds:
            continue
        for p, name in zip(t.params, t.names):
            if p.is_complex():
                # The kernels see complex params as (re, im) pairs: max |re|, |im| is not
                # torch's max |z| (the L2 norm is the same either way).
                raise ValueError(
                    f"{name} is complex ({p.dtype}): grad_norm_type=inf is not available for "
                    "complex params (the fused norm pass reads them as real pairs); use "
                    "grad_norm_type=2.0, or clip them with torch.nn.utils.clip_grad_norm_")
        t.complex_checked = t.rebuilds


# ------------------------------------------------------------------------------------------
# reductions over DTensor meshes
# ------------------------------------------------------------------------------------------


def _mesh_key(p) -> tuple | None:
    """(mesh, the mesh dims whose placement shards or partially holds p) for a DTensor param
    whose full-tensor norm needs a reduction, else None."""
    if not _table.is_dtensor(p):
        return None
    dims = tuple(i for i, pl in enumerate(p.placements) if not pl.is_replicate())
    return (p.device_mesh, dims) if dims else None


def _plan(table) -> list:
    """Per reduction key, the table's rows under it: [(key, row indices tensor or None)]
    (None: every row, the table's own total)."""
    keys: dict = {}
    order = []
    for k, row in enumerate(table.rows):
        key = _mesh_key(table.params[row.index])
        if key not in keys:
            keys[key] = []
            order.append(key)
        keys[key].append(k)
    if order == [None]:
        return [(None, None)]
    return [(key, torch.tensor(keys[key], dtype=torch.int64, device=table.device))
            for key in order]


def _all_reduce(t: Tensor, key, op) -> None:
    import torch.distributed as dist

    mesh, dims = key
    for d in dims:
        dist.all_reduce(t, op=op, group=mesh.get_group(d))


# ------------------------------------------------------------------------------------------
# per step
# ------------------------------------------------------------------------------------------


def _buffers(opt, table) -> None:
    """The table's persistent buffers (allocated at a rebuild only, reused every step)."""
    shape = (table.n_rows, table.n_tiles)
    if getattr(table, "clip_shape", None) == shape and table.clip_rows is not None:
        return
    table.clip_shape = shape
    table.clip_rows = torch.zeros(table.n_rows + 1, dtype=torch.float64, device=table.device)
    table.row_norms = (torch.zeros(table.n_rows, NORMS, dtype=torch.float32,
                                   device=table.device) if opt._track_norms else None)
    table.clip_plan = _plan(table)
    table.clip_coef = None


def _state(opt, device: torch.device) -> dict:
    st = opt.__dict__.get("_clip_state")
    if st is None or st["device"] != device:
        st = opt._clip_state = {
            "device": device,
            "total": torch.zeros((), dtype=torch.float64, device=device),
            "norm": torch.zeros((), dtype=torch.float32, device=device),
            "coef": torch.ones((), dtype=torch.float32, device=device),
            "over": torch.zeros((), dtype=torch.bool, device=device),
            "keys": None,
        }
    return st


def before_step(opt, tables: list) -> None:
    """The norm pass of every table with rows, the total norm (``opt.grad_norm``) and the clip
    coefficient each table's step reads (``table.clip_coef``). No host sync."""
    if not tables:
        return
    live = [t for t in tables if t.n_rows]
    inf = opt._grad_norm_type == math.inf
    for t in live:
        _buffers(opt, t)
        t.norm_inf = inf
        backend_of(opt, t).grad_norm_rows(t)
    st = _state(opt, (live or tables)[0].device)
    total = st["total"]
    combine = torch.maximum if inf else torch.add
    tables = live
    if not tables:
        # No param has a grad: torch's clip_grad_norm_ of an empty list is 0; the process
        # group's collective is still taken (the other ranks wait for it).
        total.zero_()
    elif all(t.clip_plan == [(None, None)] and t.device == total.device for t in tables):
        # No DTensor rows (the common case): in place on persistent buffers, no allocation.
        total.copy_(tables[0].clip_rows[tables[0].n_rows])
        for t in tables[1:]:
            combine(total, t.clip_rows[t.n_rows], out=total)
    else:
        _combine_meshes(tables, total, inf)
    if opt._grad_norm_process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                        group=opt._grad_norm_process_group)
    norm, coef = st["norm"], st["coef"]
    if not inf:
        # NOTE on overflow: torch's clip_grad_norm_ squares and sums in float32, so a total
        # norm past sqrt(FLT_MAX) (1.8e19) is inf there (coef 0: the step sees zero grads);
        # the float64 sum here is marked inf past FLT_MAX alike (persistent out=: no
        # allocation).
        torch.gt(total, _FLT_MAX, out=st["over"])
        total.masked_fill_(st["over"], math.inf)
        torch.sqrt(total, out=total)  # in float64, then rounded once to float32
    norm.copy_(total)
    # NOTE on keeping grad_norm: torch's clip_grad_norm_ returns a new tensor each call, so a
    # loop that keeps them unread (logging without a sync) sees every step's value; so does
    # opt.grad_norm: a copy per step (a 0-d tensor). Under capture (capturable groups) it is
    # the buffer the graph writes, overwritten by each replay (no allocation once warm).
    capturable = any(g.get("capturable") for g in opt.param_groups)
    opt.grad_norm = norm if capturable else norm.clone()
    if opt._max_grad_norm is None:
        for t in tables:
            t.clip_coef = None
        return
    # torch.nn.utils.clip_grad_norm_: clamp(max_norm / (total_norm + 1e-6), max=1.0), where
    # float / Tensor is reciprocal(Tensor) * float (Tensor.__rdiv__): the same operations.
    _coefficient(norm, float(opt._max_grad_norm), out=coef)
    coef64 = None
    if any(t.dtype == torch.float64 for t in tables):
        # float64 params (the torch backend): torch takes their norm and coefficient in
        # float64; a float32 coefficient would cost them 1e-7 relative per clipped step.
        coef64 = st.get("coef64")
        if coef64 is None:
            coef64 = st["coef64"] = torch.ones((), dtype=torch.float64, device=total.device)
        _coefficient(total, float(opt._max_grad_norm), out=coef64)
    for t in tables:
        c = coef64 if t.dtype == torch.float64 else coef
        t.clip_coef = c if t.device == c.device else c.to(t.device, non_blocking=True)


def _coefficient(norm: Tensor, max_norm: float, out: Tensor) -> None:
    torch.add(norm, 1e-6, out=out)
    torch.reciprocal(out, out=out)
    out.mul_(max_norm)
    out.clamp_(max=1.0)


def _combine_meshes(tables: list, total: Tensor, inf: bool) -> None:
    """The total over tables with DTensor rows: each (mesh, dims) key's local part reduced
    over its mesh (all keys of one reduction in one collective), plus the local rows."""
    parts: dict = {}
    for t in tables:
        rows = t.clip_rows
        for key, idx in t.clip_plan:
            if idx is None:
                v = rows[t.n_rows]
            elif inf:
                v = rows.index_select(0, idx).max()
            else:
                v = rows.index_select(0, idx).sum()
            v = v.to(total.device, non_blocking=True)
            if key in parts:
                parts[key] = torch.maximum(parts[key], v) if inf else parts[key] + v
            else:
                parts[key] = v
    meshes = [k for k in parts if k is not None]
    if meshes:
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        for k in meshes:  # one collective per (mesh, dims) key: usually exactly one
            part = parts[k].reshape(1).clone()
            _all_reduce(part, k, op)
            parts[k] = part[0]
    total.zero_()
    for v in parts.values():
        if inf:
            torch.maximum(total, v, out=total)
        else:
            total.add_(v)


def after_step(opt, tables: list, found_inf: Tensor | None) -> None:
    """``opt.norms`` from the tables' ``row_norms`` (track_norms): the DTensor rows of every
    table reduced over their mesh (one collective per mesh key), square roots, one float32
    [3] view per stepped param (overwritten by the next step: clone to keep)."""
    for t in tables:
        t.clip_coef = None
    if not opt._track_norms:
        return
    tables = [t for t in tables if t.n_rows and t.row_norms is not None]
    by_key: dict = {}
    for t in tables:
        for key, idx in t.clip_plan:
            if key is not None:
                by_key.setdefault(key, []).append((t, idx))
    if by_key:
        import torch.distributed as dist

        for key, parts in by_key.items():
            device = parts[0][0].device
            buf = torch.cat([t.row_norms.index_select(0, idx).to(device) for t, idx in parts])
            _all_reduce(buf, key, dist.ReduceOp.SUM)
            start = 0
            for t, idx in parts:
                n = idx.numel()
                t.row_norms.index_copy_(0, idx, buf[start:start + n].to(t.device))
                start += n
    norms: dict = {}
    for t in tables:
        rn = t.row_norms
        torch.sqrt(rn, out=rn)
        if found_inf is not None:  # a skipped step: no param stepped
            rn.masked_fill_(found_inf.to(rn.device, non_blocking=True) != 0, math.nan)
        # One view per row, made when the rows or the buffer change, not every step (a Python
        # pass over the params and a view per param were the steady step's cost here).
        views = getattr(t, "norm_views", None)
        if views is None or views[0] is not rn or views[1] != t.rebuilds:
            views = t.norm_views = (rn, t.rebuilds, {t.params[row.index]: rn[k]
                                                     for k, row in enumerate(t.rows)})
        norms.update(views[2])
    opt.norms = norms


def refuse_capture_reason(opt, tables: list) -> str | None:
    """What a captured clipped step could not repeat, or None."""
    for t in tables:
        if t.n_rows and getattr(t, "clip_shape", None) != (t.n_rows, t.n_tiles):
            return "the clipping buffers are not built yet for these params (run one eager step)"
        if t.n_rows and any(key is not None for key, _ in getattr(t, "clip_plan", ())):
            return "DTensor params need a collective for the grad norm"
    return None


def state_keys() -> tuple[str, ...]:
    return ("_max_grad_norm", "_grad_norm_type", "_track_norms")


def getstate(opt, state: dict[str, Any]) -> None:
    for k in state_keys():
        state[k] = opt.__dict__.get(k)
    state.pop("_grad_norm_process_group", None)  # a process group does not pickle
    state["_grad_norm_process_group_lost"] = (
        opt.__dict__.get("_grad_norm_process_group") is not None
        or bool(opt.__dict__.get("_grad_norm_process_group_lost")))
    state.pop("_clip_state", None)
    state.pop("grad_norm", None)
    state.pop("norms", None)
