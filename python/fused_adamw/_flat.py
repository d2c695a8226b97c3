"""Flat buffers: layout, alignment, views and the tables every backend reads.

A :class:`FlatBucket` holds the params of one ``(device, storage dtype)`` from every param
group. Each param's segment starts on a 16-byte boundary and is zero-padded to the next one,
so that every tile is a whole number of 16-byte vectors and kernels need no tail handling.
The contract with the kernels is ``kernels/adamw_params.h``; the names below mirror it.

The padding stays zero forever: with p = g = m = v = 0 the AdamW update yields 0 again
(decay of 0 is 0, the moments stay 0, and 0 / (0 + eps) is 0), so tiles may cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN_BYTES = 16
TILE_ELEMS = 16384  # kernels/adamw_params.h kTileElems

# Columns of the hyperparameter table (kernels/adamw_params.h kHp*).
HP_LR = 0
HP_BETA1 = 1
HP_BETA2 = 2
HP_EPS = 3
HP_WEIGHT_DECAY = 4
HP_MAXIMIZE = 5
HP_AMSGRAD = 6
HPARAM_COLS = 8

_COMPLEX_TO_REAL = {
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
    torch.complex32: torch.float16,
}


def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The real dtype a param is stored as in its bucket (complex params as real pairs)."""
    return _COMPLEX_TO_REAL.get(t.dtype, t.dtype)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _real_shape_and_strides(p: torch.Tensor) -> tuple[list[int], list[int]]:
    """Size and strides, in real elements, that the param's view in its segment gets.

    Dense params (contiguous, transposed, channels_last, ...) keep their strides, so that
    flattening changes no memory format. A param with holes or overlaps is laid out contiguous.
    """
    t = torch.view_as_real(p) if p.is_complex() else p
    size, stride = list(t.shape), list(t.stride())
    expected = 1
    for st, sz in sorted(zip(stride, size)):
        if sz == 1:
            continue
        if st != expected:
            return size, list(torch.empty(size, device="meta").stride())
        expected *= sz
    if t.numel() == 0:
        return size, list(torch.empty(size, device="meta").stride())
    return size, stride


@dataclass
class Segment:
    """Where one param lives in its bucket, in real elements."""

    offset: int
    numel: int  # real elements: twice the param's numel for complex params
    padded: int  # numel rounded up to whole 16-byte vectors
    size: list[int]
    stride: list[int]
    is_complex: bool


def plan_segments(params: Sequence[torch.Tensor], itemsize: int) -> tuple[list[Segment], int]:
    """Lays params out back to back, each on a 16-byte boundary. Returns segments and numel."""
    vec = ALIGN_BYTES // itemsize
    segments, offset = [], 0
    for p in params:
        size, stride = _real_shape_and_strides(p)
        numel = p.numel() * (2 if p.is_complex() else 1)
        padded = -(-numel // vec) * vec
        segments.append(Segment(offset, numel, padded, size, stride, p.is_complex()))
        offset += padded
    return segments, offset


def plan_tiles(segments: Sequence[Segment]) -> list[tuple[int, int, int]]:
    """Splits every segment into tiles of at most TILE_ELEMS: (start, end, param_index)."""
    tiles = []
    for i, s in enumerate(segments):
        for start in range(s.offset, s.offset + s.padded, TILE_ELEMS):
            tiles.append((start, min(start + TILE_ELEMS, s.offset + s.padded), i))
    return tiles


def segment_view(flat: torch.Tensor, s: Segment) -> torch.Tensor:
    """A view of one segment of a flat buffer with the param's size, strides and complexness."""
    v = flat.as_strided(s.size, s.stride, flat.storage_offset() + s.offset)
    return torch.view_as_complex(v) if s.is_complex else v


@dataclass
class FlatBucket:
    """The flat buffers and tables of one (device, storage dtype).

    Attributes mirror ``kernels/adamw_params.h``. ``params`` are in bucket order: by param
    group, then by position in the group. ``hparams`` is the optimizer's table for the device
    (all groups, one row each), refreshed before every step.
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    groups: list[int]
    segments: list[Segment]
    numel: int
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    tiles: torch.Tensor  # int64 [n_tiles, 3]
    param_group: torch.Tensor  # int32 [n_params]
    steps: torch.Tensor  # float32 [n_params]
    active: torch.Tensor  # uint8 [n_params]
    grad: torch.Tensor | None = None  # allocated on first need
    hparams: torch.Tensor | None = None  # [n_groups, HPARAM_COLS], opmath dtype, on device
    host_hparams: list[list[float]] = field(default_factory=list)  # the same rows on the host
    # Host-side bookkeeping (no device reads in step()).
    param_views: list[torch.Tensor] = field(default_factory=list)
    grad_views: list[torch.Tensor] = field(default_factory=list)
    data_ptrs: list[int] = field(default_factory=list)
    host_steps: list[float] = field(default_factory=list)
    host_active: list[bool] | None = None  # what `active` holds; None when all ones
    torch_runs: list | None = None  # the torch backend's plan; None when it must be redone
    stated: list[bool] = field(default_factory=list)  # whether optimizer.state has param i
    all_stated: bool = False
    backend: Any = None  # the backend object that steps this bucket
    ext_args: tuple | None = None  # fused_adamw._ext's validated kernel arguments (cached)
    _group_set: frozenset | None = None

    @property
    def group_set(self) -> frozenset[int]:
        """The param groups with a param in this bucket."""
        if self._group_set is None:
            self._group_set = frozenset(self.groups)
        return self._group_set

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def n_tiles(self) -> int:
        return self.tiles.shape[0]

    def state_views(self, i: int) -> dict[str, torch.Tensor]:
        """The torch.optim.AdamW state of param i, as views into this bucket."""
        s = self.segments[i]
        state = {
            "step": self.steps[i],
            "exp_avg": segment_view(self.exp_avg, s),
            "exp_avg_sq": segment_view(self.exp_avg_sq, s),
        }
        if self.max_exp_avg_sq is not None:
            state["max_exp_avg_sq"] = segment_view(self.max_exp_avg_sq, s)
        return state

    def ensure_grad(self) -> torch.Tensor:
        """The flat grad buffer, allocated (zeroed, padding included) on first use."""
        if self.grad is None:
            self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.grad_views = [segment_view(self.grad, s) for s in self.segments]
        return self.grad


def build_bucket(
    params: Sequence[torch.nn.Parameter],
    groups: Sequence[int],
    states: Sequence[dict],
    amsgrad: bool,
) -> FlatBucket:
    """Moves params and their state into fresh flat buffers and repoints them there.

    ``states[i]`` is param i's current state dict (empty when it has taken no step). After the
    call ``params[i].data`` is a view into the bucket's param buffer; the caller puts
    :meth:`FlatBucket.state_views` into ``optimizer.state``.
    """
    p0 = params[0]
    device, dtype = p0.device, storage_dtype(p0)
    segments, numel = plan_segments(params, torch.empty((), dtype=dtype).element_size())

    def zeros():
        return torch.zeros(numel, dtype=dtype, device=device)

    flat_param, exp_avg, exp_avg_sq = zeros(), zeros(), zeros()
    max_exp_avg_sq = zeros() if amsgrad else None
    steps = torch.zeros(len(params), dtype=torch.float32, device=device)
    host_steps = []
    with torch.no_grad():
        for i, (p, s, st) in enumerate(zip(params, segments, states)):
            segment_view(flat_param, s).copy_(p.detach())
            step = st.get("step", 0.0)
            step = float(step) if isinstance(step, torch.Tensor) else float(step)
            host_steps.append(step)
            for name, buf in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                              ("max_exp_avg_sq", max_exp_avg_sq)):
                if buf is not None and name in st:
                    segment_view(buf, s).copy_(st[name])
        steps.copy_(torch.tensor(host_steps, dtype=torch.float32))
    tiles = plan_tiles(segments)
    tiles_t = torch.tensor(tiles, dtype=torch.int64).reshape(len(tiles), 3).to(device)
    bucket = FlatBucket(
        device=device,
        dtype=dtype,
        params=list(params),
        groups=list(groups),
        segments=segments,
        numel=numel,
        param=flat_param,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        max_exp_avg_sq=max_exp_avg_sq,
        tiles=tiles_t,
        param_group=torch.tensor(list(groups), dtype=torch.int32).to(device),
        steps=steps,
        active=torch.ones(len(params), dtype=torch.uint8, device=device),
        host_steps=host_steps,
    )
    for p, s in zip(params, segments):
        view = segment_view(flat_param, s)
        p.data = view
        bucket.param_views.append(view)
    bucket.data_ptrs = [p.data_ptr() for p in params]
    return bucket


def hparam_row(group: dict) -> list[float]:
    """One row of the hyperparameter table from a param group (Tensor values as NaN: the
    optimizer copies those on the device)."""

    def num(x):
        return float("nan") if isinstance(x, torch.Tensor) else float(x)

    beta1, beta2 = group["betas"]
    row = [0.0] * HPARAM_COLS
    row[HP_LR] = num(group["lr"])
    row[HP_BETA1] = num(beta1)
    row[HP_BETA2] = num(beta2)
    row[HP_EPS] = num(group["eps"])
    row[HP_WEIGHT_DECAY] = num(group["weight_decay"])
    row[HP_MAXIMIZE] = float(bool(group["maximize"]))
    row[HP_AMSGRAD] = float(bool(group["amsgrad"]))
    return row
