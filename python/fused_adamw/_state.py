"""A param's optimizer state, allocated where a table row needs it: torch's keys (step 0, zero
moments in the table's state_dtype) at the param's 16-byte phase, and the master mode's buffer
or seed. Nothing here counts a step."""

from __future__ import annotations

import torch

from ._table import (ALIGN_BYTES, EXTRA_KEYS, SEED_KEY, dtensor_class, extra_dtype, is_dense,
                     is_dtensor, local, zeros_at_phase)


def new_state(state, param, st, amsgrad: bool, dtype: torch.dtype, state_dtype: torch.dtype,
              like=None, phase=None, mode: str | None = None) -> dict:
    """``param``'s entry of ``state`` (the optimizer's), with torch's keys allocated where
    missing: step 0 and zero moments in ``state_dtype`` at the param's 16-byte phase
    (``like``/``phase`` as Table._build_rows computes them), and the master mode's buffer or
    seed (master_state) for a table of ``dtype``."""
    lp = local(param)
    if like is None:
        dense = is_dense(lp)
        like = lp if dense else torch.empty_like(lp)
        phase = lp.data_ptr() % ALIGN_BYTES if dense else 0
    sd = None if state_dtype == dtype else state_dtype
    if st is None:
        # An entry that tracks edits (unless opt.state was replaced by a dict of the user's:
        # then the optimizer re-reads state every step).
        try:
            st = state[param]
        except KeyError:  # a plain dict
            st = state[param] = {}
        st["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
        st["exp_avg"] = wrap(param, zeros_at_phase(like, phase, sd))
        st["exp_avg_sq"] = wrap(param, zeros_at_phase(like, phase, sd))
    if amsgrad and "max_exp_avg_sq" not in st:
        # amsgrad switched on after the first steps: the maxima start at zero (torch raises a
        # KeyError here).
        st["max_exp_avg_sq"] = wrap(param, zeros_at_phase(like, phase, sd))
    master_state(param, mode, st, lp, like, phase, dtype)
    return st


def master_state(param, mode: str | None, st: dict, lp: torch.Tensor, like: torch.Tensor,
                 phase: int, dtype: torch.dtype) -> tuple:
    """The row's master-mode buffer and seed, created when missing: the fp32 master from the
    param (a torch checkpoint, a mode switched on, a mangled buffer dropped at load), a zero
    remainder or compensation (param and master are then equal), a seed drawn from torch's
    default generator (torch.manual_seed makes it reproducible)."""
    if mode is None:
        return None, 0
    if mode == "stochastic":
        seed = st.get(SEED_KEY)
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = st[SEED_KEY] = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return None, seed
    key = EXTRA_KEYS[mode]
    if key not in st:
        buf = zeros_at_phase(like, phase, extra_dtype(mode, dtype))
        if mode == "fp32":
            buf.copy_(lp)
        st[key] = wrap(param, buf)
    return st[key], 0


def wrap(param, t: torch.Tensor):
    """State of a DTensor param is a DTensor with its mesh and placements (as torch's)."""
    if not is_dtensor(param):
        return t
    return dtensor_class().from_local(t, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
