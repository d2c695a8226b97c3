"""Low-precision training (issue #13): master_weights and state_dtype, per param group.

The checks of both options against a group's params, and their part of load_state_dict: torch's
load casts every state tensor of a floating-point param to the param's dtype, which would turn
bfloat16 moments of float32 params into float32, an fp32 master into the param's 16 bits and
an int16 remainder into bfloat16 by value."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._table import EXTRA_KEYS, LOW_PRECISION, MASTER_MODES, extra_dtype, local, storage_dtype


_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def check_master_weights(value, where: str) -> None:
    if not isinstance(value, (str, type(None))) or value not in MASTER_MODES:
        raise ValueError(f"{where}: master_weights must be None, 'fp32', 'remainder', 'kahan' "
                         f"or 'stochastic', got {value!r}")


def check_state_dtype(value, where: str) -> None:
    if not any(value is d for d in _STATE_DTYPES):
        raise ValueError(f"{where}: state_dtype must be None (the param's dtype), "
                         f"torch.float32 or torch.bfloat16, got {value!r}")


def lowp_of(group: dict, dtype: torch.dtype) -> tuple[torch.dtype, frozenset]:
    """(the moments' dtype, the master modes) of a param of storage ``dtype`` in ``group``."""
    sd = group.get("state_dtype")
    mode = group.get("master_weights")
    return (dtype if sd is None else sd,
            frozenset((mode,)) if mode is not None and dtype in LOW_PRECISION
            else frozenset())


def check_low_precision(group: dict, index: int) -> None:
    """A group's master_weights and state_dtype against its params: ValueError naming the
    group and the param (when a group is added and at every table build)."""
    where = f"param group {index}"
    mode, sd = group.get("master_weights"), group.get("state_dtype")
    check_master_weights(mode, where)
    check_state_dtype(sd, where)
    if mode is None and sd is None:
        return
    if group.get("differentiable"):
        raise ValueError(f"{where}: master_weights and state_dtype are not available with "
                         "differentiable=True (torch's differentiable Adam steps those groups)")
    for j, p in enumerate(group["params"]):
        if isinstance(p, tuple):
            p = p[1]
        if not isinstance(p, Tensor):
            continue
        dtype = storage_dtype(p)
        name = f"param {j} of {where}"
        if p.is_complex() and ((mode is not None and dtype in LOW_PRECISION)
                               or sd not in (None, dtype)):
            raise ValueError(f"{where}: master_weights and state_dtype do not take complex "
                             f"16-bit params or other state dtypes; {name} is {p.dtype}")
        if mode == "remainder" and dtype == torch.float16:
            raise ValueError(
                f"{where}: master_weights='remainder' keeps the 16 low bits a bfloat16 param "
                f"drops from its fp32 master; {name} is float16, whose bits are not the high "
                "half of a float32. Use 'fp32', 'kahan' or 'stochastic' for float16 params")
        if sd is torch.bfloat16 and dtype == torch.float16:
            raise ValueError(
                f"{where}: state_dtype=torch.bfloat16 with float16 params ({name}) is not "
                "supported (moments in the param's dtype, float32 or bfloat16 for float32 "
                "params); use state_dtype=torch.float32 or None")
        if sd is not None and dtype == torch.float64 and sd != dtype:
            raise ValueError(f"{where}: state_dtype={sd} with float64 params ({name}) is not "
                             "supported; use None")


def keep_group_options(param_groups: list[dict], state_dict: dict) -> dict:
    """``state_dict`` with each group's own master_weights / state_dtype where the checkpoint
    lacks the key (torch's, or one saved before the group had it): __setstate__ only knows the
    constructor's values, which a group may have overridden."""
    kept = [{k: g[k] for k in ("master_weights", "state_dtype") if k in g}
            for g in param_groups]
    groups = state_dict.get("param_groups", [])
    if len(groups) == len(kept) and any(k not in sg for kg, sg in zip(kept, groups)
                                        for k in kg):
        state_dict = {**state_dict, "param_groups": [
            {**{k: v for k, v in kg.items() if k not in sg}, **sg}
            for kg, sg in zip(kept, groups)]}
    return state_dict


def restore_state_dtypes(param_groups: list[dict], state, state_dict: dict, saved: dict) -> None:
    """After torch's load: the moments back in the group's state_dtype (from the checkpoint's
    own tensors, ``saved``, so nothing is lost); a master or remainder that reached us in
    another dtype (the checkpoint went through torch's AdamW, which cast it) is dropped with a
    warning and rebuilt from the param at the next step."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    group_of = {id(p): g for g in param_groups for p in g["params"]}
    for pid, p in zip(ids, params):
        st = dict.get(state, p)
        src = saved.get(pid)
        if not st or not src:
            continue
        group = group_of[id(p)]
        dtype = storage_dtype(p)
        state_dtype, modes = lowp_of(group, dtype)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = src.get(key)
            if isinstance(t, Tensor) and not p.is_complex() and state_dtype != p.dtype:
                st[key] = t.to(device=st[key].device, dtype=state_dtype, copy=True)
        for mode, key in EXTRA_KEYS.items():
            t = src.get(key)
            if not isinstance(t, Tensor):
                continue
            want = extra_dtype(mode, dtype)
            if want is None or t.dtype != want or t.shape != p.shape:
                st.pop(key, None)
                if want is not None and mode in modes:
                    warnings.warn(
                        f"FusedAdamW.load_state_dict: {key!r} of a {p.dtype} param is "
                        f"{t.dtype} in the checkpoint, not {want} (it went through "
                        "another optimizer's load, e.g. torch.optim.AdamW, which casts "
                        "state to the param's dtype): it is rebuilt from the param at "
                        "the next step", stacklevel=3)
            else:
                st[key] = t.to(device=local(p).device, copy=True)


def sync_master(state) -> None:
    """Every master buffer in ``state`` made to agree with its param exactly (see
    FusedAdam.sync_master)."""
    for p, st in state.items():
        if not isinstance(p, Tensor):
            continue
        lp = local(p)
        if "master_param" in st:
            local(st["master_param"]).copy_(lp)
        for key in ("param_remainder", "kahan_compensation"):
            if key in st:
                local(st[key]).zero_()
