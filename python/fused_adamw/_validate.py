"""The checks of a table rebuild: every param, grad and state entry that will be a row, before
anything is allocated or changed (each error names the param and what is wrong)."""

from __future__ import annotations

from itertools import compress

import torch

from ._table import (EXTRA_KEYS, Repartition, _share_elements, describe, extra_dtype, is_dtensor,
                     local, span, storage_dtype)
from ._watch import Plan, RowPlan


def plan_rebuild(table, state, groups: list[dict], grads, mask, active_grads, data_ptrs,
                 locals_) -> Plan:
    """The rows ``table`` must be rebuilt with, each param, grad and state entry validated
    (raises, naming the param and what is wrong, before anything changes; Repartition when a
    param left the table's dtype or device)."""
    check_overlaps(table.names, table.params, locals_)
    rows = []
    for i in compress(range(len(grads)), mask):
        p, lp, g = table.params[i], locals_[i], grads[i]
        name = table.names[i]
        if storage_dtype(lp) != table.dtype or lp.device != table.device:
            raise Repartition()
        if g.dtype != lp.dtype or g.shape != lp.shape or g.device != lp.device:
            raise RuntimeError(
                f"{describe(name, lp)} on {lp.device} has a grad of shape "
                f"{tuple(g.shape)}, {g.dtype} on {g.device}; they must match")
        gi = table.groups[i]
        amsgrad = bool(groups[gi]["amsgrad"])
        mode = table.mode_of(groups[gi])
        st = dict.get(state, p)
        fix_step = False
        if st:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key not in st:
                    raise KeyError(f"the optimizer state of {name} has no {key!r} (it has "
                                   f"{sorted(map(str, st))}); torch.optim.AdamW needs it too")
            keys = ("exp_avg", "exp_avg_sq") + (
                ("max_exp_avg_sq",) if amsgrad and "max_exp_avg_sq" in st else ())
            for key in keys:
                check_state_tensor(name, lp, key, st[key], table.state_dtype, table.dtype)
            xkey = EXTRA_KEYS.get(mode)
            if xkey is not None and xkey in st:
                check_state_tensor(name, lp, xkey, st[xkey], extra_dtype(mode, table.dtype),
                                   table.dtype)
            step = st["step"]
            fix_step = not (isinstance(step, torch.Tensor) and step.dtype == torch.float32
                            and step.dim() == 0 and step.device == lp.device
                            and not is_dtensor(step))
            if fix_step:
                try:
                    ok = torch.as_tensor(local(step) if is_dtensor(step) else step,
                                         dtype=torch.float32).numel() == 1
                except (TypeError, ValueError, RuntimeError):
                    ok = False
                if not ok:
                    raise TypeError(
                        f"the optimizer state 'step' of {name} is {step!r}; it must be a "
                        "number or a one-element tensor")
        rows.append(RowPlan(i, gi, p, lp, g, st or None, amsgrad, fix_step, mode))
    check_shared_steps(table.names, rows)
    return Plan("rebuild", grads, mask, active_grads, [], data_ptrs, locals_, rows)


def check_shared_steps(names: list[str], rows: list[RowPlan]) -> None:
    """Two rows of one launch cannot count one step tensor (state[p1]["step"] is
    state[p2]["step"]): the kernel's count is a read-modify-write per row, not atomic, so a
    GPU would add 1 or 2 by chance and the CPU loop always 2. Refused, naming both."""
    seen: dict[int, int] = {}
    for rp in rows:
        step = rp.state.get("step") if rp.state else None
        if not isinstance(step, torch.Tensor):
            continue  # a number: fix_step makes the row its own tensor
        step = local(step)
        key = step.data_ptr() or id(step)  # no address (meta tensors): the object
        first = seen.setdefault(key, rp.index)
        if first != rp.index:
            raise RuntimeError(
                f"{names[first]} and {names[rp.index]} share one optimizer "
                "state 'step' tensor (state[p]['step'] is the same tensor for both): one "
                "fused step cannot count it once per param. Give each param its own, "
                "e.g. opt.state[p]['step'] = opt.state[p]['step'].clone()")


def check_state_tensor(name: str, lp: torch.Tensor, key: str, t, dtype: torch.dtype,
                       table_dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"the optimizer state {key!r} of {name} is a {type(t).__name__}, "
                        "not a Tensor")
    lt = local(t)
    expected = lp.dtype if dtype == table_dtype else dtype  # complex params: complex state
    if lt.dtype != expected and lt.dtype == lp.dtype:
        raise RuntimeError(
            f"{name} is {lp.dtype} and its param group keeps {key!r} in {expected} "
            f"(state_dtype or master_weights), but the state holds {lt.dtype} (was the "
            "setting changed after steps?). FusedAdamW does not convert state silently: to "
            "convert it on purpose, call opt.load_state_dict(opt.state_dict())")
    if lt.dtype != expected:
        raise RuntimeError(
            f"{name} is {lp.dtype} but its optimizer state {key!r} is {lt.dtype}, not "
            f"{expected} (did the model change dtype after the optimizer stepped, e.g. "
            "model.half()? or was the group's state_dtype changed after steps?). FusedAdamW "
            "does not convert state silently: to convert it on "
            "purpose, call opt.load_state_dict(opt.state_dict()), which casts state to the "
            "params' dtype as torch does (state_dtype and master buffers to their own)")
    if lt.device != lp.device:
        raise RuntimeError(
            f"{name} is on {lp.device} but its optimizer state {key!r} is on {lt.device}; "
            "opt.load_state_dict(opt.state_dict()) moves state to the params' device")
    if lt.shape != lp.shape:
        raise RuntimeError(f"{describe(name, lp)}: its optimizer state {key!r} has shape "
                           f"{tuple(lt.shape)}")


def check_overlaps(names: list[str], params: list, locals_: list) -> None:
    """Two params whose memory overlaps cannot be updated in one launch: refuse, naming both."""
    spans = []
    for i, lp in enumerate(locals_):
        if lp.numel() == 0:
            continue
        if torch._debug_has_internal_overlap(lp) == 1:
            raise RuntimeError(
                f"{describe(table.names[i], lp)} has elements that share memory (an expanded "
                "view): it cannot be updated in place (torch refuses it too)")
        start, end = span(lp)
        spans.append((start, end, i))
    spans.sort()
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0 and _share_elements(locals_[i0], locals_[i1]):
            a, b = sorted((i0, i1))
            if params[a] is params[b]:
                raise RuntimeError(
                    f"{describe(names[a], locals_[a])} is given to the optimizer "
                    f"twice (again as {names[b]}); one fused step cannot update it "
                    "twice (torch warns and does). Give each param once.")
            raise RuntimeError(
                f"{describe(names[a], locals_[a])} and "
                f"{describe(names[b], locals_[b])} overlap in memory: one fused step "
                "cannot update both (torch's for-loop would update them one after the "
                "other). Give the optimizer params that do not share memory.")
