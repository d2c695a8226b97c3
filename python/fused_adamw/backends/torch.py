"""The pure-torch backend: the fallback on MPS, for float64, and on any device without a kernel.

Steps a table's rows (params and grads where they live) with ``reference.adamw_update_``:
``torch._foreach_*`` ops over the rows of each param group, so the number of torch calls per
step depends on the number of groups, not of params. 16-bit rows are computed on float32
copies and stored back once (by the group's master mode: rounded to nearest, through an fp32
master, a remainder, a Kahan compensation or stochastic rounding), moments of another
state_dtype likewise. The per-group lists are built when the table's rows are and
reused every step; fresh grads swap in without a Python loop over params.
"""

from __future__ import annotations

import operator

import torch

from .. import _table
from ..reference import (adamw_scalars, adamw_update_, kahan_residual, kahan_sum,
                         remainder_join, remainder_split, round_bf16_stochastic,
                         round_f16_stochastic, sr_bits, sr_key)


class TorchBackend:
    name = "torch"
    clips = True  # grad_norm_rows and table.clip_coef (fused_adamw._clip)
    tracks_norms = True  # table.row_norms

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type == "mps" and dtype == torch.float64:
            return "MPS has no float64"
        return None

    def step(self, table: _table.Table) -> None:
        plan = table.torch_lists
        if plan is None:
            plan = table.torch_lists = _plan(table)
        found_inf = table.found_inf
        if found_inf is None:
            self._step(table, plan)
            return
        # GradScaler's skip without a host read: the step runs, then every tensor it wrote
        # takes back its old value where found_inf != 0 (torch.where: infs and NaNs of the
        # discarded update cannot leak, as they would through arithmetic masking). That
        # includes the master mode's buffers (master, remainder, Kahan compensation); the
        # stochastic mode's counter is the step count, restored with the steps.
        written = list(plan["steps"]) + [t for _, _, lists in plan["groups"]
                                         for k in ("param", "exp_avg", "exp_avg_sq",
                                                   "max_exp_avg_sq", "extra")
                                         if lists[k] is not None for t in lists[k]
                                         if t is not None]
        if table.grad_scale is not None:
            written += list(table.kernel_grads)
        if getattr(table, "row_norms", None) is not None:
            written.append(table.row_norms)  # NaN after the step anyway (_clip.after_step)
        saved = torch._foreach_mul(written, 1)  # copies (a fallback backend: memory for no sync)
        self._step(table, plan)
        skip = found_inf != 0
        for t, old in zip(written, saved):
            torch.where(skip, old, t, out=t)

    def grad_norm_rows(self, table: _table.Table) -> None:
        """Each row's sum of squares (max |g| with ``table.norm_inf``) of its grad as the step
        reads it (unscaled), into ``table.clip_rows[:n_rows]``, and their total (sum or max)
        into ``table.clip_rows[n_rows]``: float64, no host sync (fused_adamw._clip)."""
        op = _table.opmath_dtype(table.dtype)
        grads = list(table.kernel_grads)
        if table.grad_scale is not None:
            grads = torch._foreach_div([g.to(op) for g in grads], table.grad_scale.to(op))
        out, n = table.clip_rows, table.n_rows
        if table.norm_inf:
            out[:n].copy_(torch.stack(torch._foreach_norm(grads, float("inf"))))
            torch.amax(out[:n], dim=0, out=out[n])
        else:
            torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64), out=out[:n])
            out[:n].square_()
            torch.sum(out[:n], dim=0, out=out[n])

    def _step(self, table: _table.Table, plan: dict) -> None:
        torch._foreach_add_(plan["steps"], 1)
        op = _table.opmath_dtype(table.dtype)
        hp = table.hparams
        grads = table.kernel_grads
        for group, idx, lists in plan["groups"]:
            row = table.host_hparams[group]
            g = list(operator.itemgetter(*idx)(grads)) if len(idx) > 1 else [grads[idx[0]]]
            steps = torch.stack(lists["steps"]).to(op)
            s = adamw_scalars(hp[group, _table.HP_LR], hp[group, _table.HP_BETA1],
                              hp[group, _table.HP_BETA2], hp[group, _table.HP_EPS],
                              hp[group, _table.HP_WEIGHT_DECAY], steps,
                              hp[group, _table.HP_MAX_LR] if row[_table.HP_MAX_LR] else None,
                              bool(row[_table.HP_DECAY_MODE]))
            amsgrad = lists["max_exp_avg_sq"] is not None
            mode = int(row[_table.HP_MASTER_MODE]) if table.dtype in _table.LOW_PRECISION else 0
            params = lists["param"]
            moments = [lists["exp_avg"], lists["exp_avg_sq"]]
            if amsgrad:
                moments.append(lists["max_exp_avg_sq"])
            grads_in = g
            if table.dtype != op:
                g = [t.to(op) for t in g]
            if table.grad_scale is not None:  # adamw_unscale, written back to the grads
                g = torch._foreach_div(g, table.grad_scale.to(op))
                torch._foreach_copy_(grads_in, g)
            g_seen = g  # as used, before clipping (track_norms)
            coef = getattr(table, "clip_coef", None)
            if coef is not None:  # adamw_clip: the update reads grad * coef; p.grad unclipped
                g = torch._foreach_mul(g, coef.to(op))
            row_norms = getattr(table, "row_norms", None)
            before = [p.to(op, copy=True) for p in params] if row_norms is not None else None
            # The float each param steps from (adamw_math.cuh, "Low-precision params").
            if mode == _FP32:
                work_p = [torch.where(p.view(torch.int16) == m.to(p.dtype).view(torch.int16),
                                      m, p.to(op))  # a written param wins
                          for p, m in zip(params, lists["extra"])]
            elif mode == _REMAINDER:
                work_p = [remainder_join(p, r) for p, r in zip(params, lists["extra"])]
            elif table.dtype != op:
                work_p = [p.to(op) for p in params]
            else:
                work_p = params
            p0 = [w.clone() for w in work_p] if mode == _KAHAN else None
            work_m = (moments if table.state_dtype == op
                      else [[t.to(op) for t in b] for b in moments])
            adamw_update_(work_p, g, work_m[0], work_m[1], work_m[2] if amsgrad else None, s,
                          maximize=bool(row[_table.HP_MAXIMIZE]), amsgrad=amsgrad,
                          decay=row[_table.HP_WEIGHT_DECAY] != 0,
                          l2=bool(row[_table.HP_DECAY_MODE]))
            if work_m is not moments:
                for b, w in zip(moments, work_m):
                    torch._foreach_copy_(b, w)
            if mode == _FP32:
                torch._foreach_copy_(lists["extra"], work_p)
                torch._foreach_copy_(params, work_p)
            elif mode == _REMAINDER:
                for p, r, w in zip(params, lists["extra"], work_p):
                    pn, rn = remainder_split(w)
                    p.copy_(pn)
                    r.copy_(rn)
            elif mode == _KAHAN:
                for p, c, a, w in zip(params, lists["extra"], p0, work_p):
                    total, y = kahan_sum(a, w, c.to(op))
                    ps = total.to(p.dtype)
                    p.copy_(ps)
                    c.copy_(kahan_residual(y, a, ps.to(op)))
            elif mode == _STOCHASTIC:
                rnd = round_bf16_stochastic if table.dtype == torch.bfloat16 else \
                    round_f16_stochastic
                for p, w, seed, step in zip(params, work_p, lists["seeds"], lists["steps"]):
                    index = torch.arange(p.numel(), device=p.device).as_strided(
                        p.shape, p.stride())
                    p.copy_(rnd(w, sr_bits(sr_key(seed, step), index)))
            elif work_p is not params:
                torch._foreach_copy_(params, work_p)
            if row_norms is not None:  # sums of squares of grad, param after, delta (stored)
                after = [p.to(op) for p in params]
                delta = torch._foreach_sub(after, before)
                cols = [torch.stack(torch._foreach_norm(x, 2, dtype=torch.float64))
                        for x in (g_seen, after, delta)]
                sq = torch.stack(cols, dim=1).square_().to(row_norms.dtype)
                row_norms.index_copy_(0, torch.tensor(idx, device=row_norms.device), sq)


_FP32, _REMAINDER, _KAHAN, _STOCHASTIC = (_table.MASTER_MODES[m] for m in
                                          ("fp32", "remainder", "kahan", "stochastic"))


def _plan(table: _table.Table) -> dict:
    """Per param group with rows: the rows' indices and their tensors as lists."""
    by_group: dict[int, list[int]] = {}
    for k, r in enumerate(table.rows):
        by_group.setdefault(r.group, []).append(k)
    groups = []
    for group, idx in by_group.items():
        rows = [table.rows[k] for k in idx]
        amsgrad = rows[0].max_exp_avg_sq is not None
        lists = {
            "param": [r.param for r in rows],
            "exp_avg": [r.exp_avg for r in rows],
            "exp_avg_sq": [r.exp_avg_sq for r in rows],
            "max_exp_avg_sq": [r.max_exp_avg_sq for r in rows] if amsgrad else None,
            "steps": [r.step for r in rows],
            "extra": [r.extra for r in rows],
            "seeds": [r.seed for r in rows],
        }
        groups.append((group, idx, lists))
    return {"groups": groups, "steps": [r.step for r in table.rows]}


BACKEND = TorchBackend()
