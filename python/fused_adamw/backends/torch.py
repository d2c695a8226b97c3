"""The pure-torch backend: the fallback on CPU and MPS, and on any device without a kernel.

Walks the bucket in *runs*: consecutive params that share a param group and a step count, so
one set of scalars serves the whole run. In the usual case (every param has a grad every
step) a bucket is one run per param group; a Python loop over params happens only when the
run structure changes, never in the steady state. Each run is processed in chunks of
``CHUNK_ELEMS`` to bound temporaries and stay in cache.
"""

from __future__ import annotations

import torch

from .. import _flat
from ..reference import adamw_scalars, adamw_update_

CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32 per temporary: measured 1.5x faster than 1 << 20 on CPU


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type == "mps" and dtype == torch.float64:
            return "MPS has no float64"
        return None

    def step(self, bucket: _flat.FlatBucket) -> None:
        runs = getattr(bucket, "torch_runs", None)
        if runs is None:
            runs = bucket.torch_runs = _plan_runs(bucket)
        op = _flat.opmath_dtype(bucket.dtype)
        hp = bucket.hparams
        for start, end, first, group in runs:
            row = bucket.host_hparams[group]
            s = adamw_scalars(
                hp[group, _flat.HP_LR], hp[group, _flat.HP_BETA1], hp[group, _flat.HP_BETA2],
                hp[group, _flat.HP_EPS], hp[group, _flat.HP_WEIGHT_DECAY],
                bucket.steps[first].to(op),
            )
            flags = dict(
                maximize=bool(row[_flat.HP_MAXIMIZE]),
                amsgrad=bool(row[_flat.HP_AMSGRAD]),
                decay=row[_flat.HP_WEIGHT_DECAY] != 0,
            )
            for a in range(start, end, CHUNK_ELEMS):
                b = min(a + CHUNK_ELEMS, end)
                _step_chunk(bucket, a, b, op, s, **flags)


def _plan_runs(bucket: _flat.FlatBucket) -> list[tuple[int, int, int, int]]:
    """(start, end, first param, group) for each maximal run of active params alike."""
    runs: list[tuple[int, int, int, int]] = []
    key = None
    active = bucket.host_active
    for i, seg in enumerate(bucket.segments):
        if seg.padded == 0:
            continue  # no elements: neither joins nor breaks a run
        if active is not None and not active[i]:
            key = None
            continue
        k = (bucket.groups[i], bucket.host_steps[i])
        if k == key:
            start, _, first, group = runs[-1]
            runs[-1] = (start, seg.offset + seg.padded, first, group)
        else:
            runs.append((seg.offset, seg.offset + seg.padded, i, bucket.groups[i]))
            key = k
    return runs


def _step_chunk(bucket, a, b, op, s, *, maximize, amsgrad, decay):
    bufs = [bucket.param[a:b], bucket.exp_avg[a:b], bucket.exp_avg_sq[a:b]]
    if amsgrad:
        bufs.append(bucket.max_exp_avg_sq[a:b])
    work = [t if t.dtype == op else t.to(op) for t in bufs]
    grad = bucket.grad[a:b].to(op)
    adamw_update_(work[0], grad, work[1], work[2], work[3] if amsgrad else None, s,
                  maximize=maximize, amsgrad=amsgrad, decay=decay)
    for t, w in zip(bufs, work):
        if t is not w:
            t.copy_(w)


BACKEND = TorchBackend()
