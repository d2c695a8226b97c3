"""The norm pass of gradient clipping (issue #19) in Triton, bitwise the CPU loop's.

Mirrors kernels/adamw_norm.cuh in kernels/adamw_math.cuh's norm order: per tile, lane l of
LANES accumulates |g / scale|^2 (or the NaN-sticky max of |g / scale|) over the positions of
the tile's vectors l, l + LANES, ... in increasing position, in float32; the tile's partial is
the pairwise tree over lanes (each fold adds lane l and lane l + H: a sum of two, exact in
any order); rows sum their tiles in order in float64, the total sums the rows in order.
Launched with ``enable_fp_fusion=False`` on a GPU, so that ``acc + g * g`` is not contracted
into an fma (the CPU loop and nvcc, built with --fmad=false, round the product first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _table
from .triton_adamw import norm_max, norm_tree, row_of_tile

LANES = 256  # kernels/adamw_math.cuh kNormLanes


@triton.jit
def adamw_norm_lanes_kernel(
    rows_ptr,  # *int64 [n_rows, ROW_COLS]
    tile_starts_ptr,  # *int64 [n_rows + 1]
    n_rows,  # rows in the table
    grad_scale_ptr,  # *fp32 GradScaler's scale, or None
    out_ptr,  # *fp32 [n_tiles]: each tile's partial
    DTYPE: tl.constexpr,  # the grads' storage type
    ELEM_BYTES: tl.constexpr,  # its size
    N: tl.constexpr,  # elements of a 16-byte vector (16 // ELEM_BYTES)
    INF: tl.constexpr,  # the inf norm (max) instead of the sum of squares
    ROW_COLS: tl.constexpr,  # _table.ROW_COLS
    TILE_ELEMS: tl.constexpr,  # _table.TILE_ELEMS
    LANES: tl.constexpr,  # kNormLanes
):
    # ---------------------------------------------------------------- map program id to tile
    tile = tl.program_id(0).to(tl.int64)
    r = row_of_tile(tile_starts_ptr, n_rows, tile)
    row = rows_ptr + r * ROW_COLS
    phase = (tl.load(row + 0) % 16) // ELEM_BYTES  # _table.ROW_PARAM
    numel = tl.load(row + 6)  # _table.ROW_NUMEL
    base = (tile - tl.load(tile_starts_ptr + r)) * TILE_ELEMS
    u_begin = tl.maximum(base, phase)
    u_end = tl.minimum(base + TILE_ELEMS, phase + numel)
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))  # _table.ROW_GRAD
    if grad_scale_ptr is not None:
        scale = tl.load(grad_scale_ptr)
    lanes = tl.arange(0, LANES).to(tl.int64)
    acc = tl.zeros([LANES], tl.float32)
    # ---------------------------------------------------------------- lanes, in position order
    for rnd in range(0, TILE_ELEMS // (LANES * N)):
        for e in tl.static_range(N):
            u = base + rnd * (LANES * N) + lanes * N + e
            m = (u >= u_begin) & (u < u_end)
            g = tl.load(grad_ptr + (u - phase), mask=m, other=0.0).to(tl.float32)
            if grad_scale_ptr is not None:
                g = tl.div_rn(g, scale)  # adamw_unscale
            if INF:
                acc = tl.where(m, norm_max(acc, tl.abs(g)), acc)
            else:
                acc = tl.where(m, acc + g * g, acc)
    # ---------------------------------------------------------------- the tree over lanes
    tl.store(out_ptr + tile + tl.arange(0, 1), norm_tree(acc, INF))


@triton.jit
def norm_combine(acc, v, INF: tl.constexpr):
    if INF:
        return tl.where(((v > acc) | (v != v)) & (acc == acc), v, acc)
    return acc + v


@triton.jit
def adamw_norm_rows_kernel(
    tiles_ptr,  # *fp32 [n_tiles]
    tile_starts_ptr,  # *int64 [n_rows + 1]
    out_ptr,  # *fp64 [n_rows + 1]
    INF: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([1], tl.float64)
    for t in range(tl.load(tile_starts_ptr + r), tl.load(tile_starts_ptr + r + 1)):
        acc = norm_combine(acc, tl.load(tiles_ptr + t + tl.arange(0, 1)).to(tl.float64), INF)
    tl.store(out_ptr + r + tl.arange(0, 1), acc)


@triton.jit
def adamw_norm_total_kernel(out_ptr, n_rows, INF: tl.constexpr):
    acc = tl.zeros([1], tl.float64)
    for r in range(0, n_rows):
        acc = norm_combine(acc, tl.load(out_ptr + r + tl.arange(0, 1)), INF)
    tl.store(out_ptr + n_rows + tl.arange(0, 1), acc)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def grad_norm_rows(table: _table.Table, interpret: bool) -> None:
    """``table.clip_rows`` (float64 [n_rows + 1]) from the grads the table points to."""
    out = table.clip_rows
    packed = table.packed
    rows = packed[: table.n_rows * _table.ROW_COLS]
    tile_starts = packed[table.n_rows * _table.ROW_COLS:]
    scratch = getattr(table, "clip_scratch", None)
    if scratch is None or scratch.numel() < max(table.n_tiles, 1) or scratch.device != out.device:
        scratch = table.clip_scratch = torch.empty(max(table.n_tiles, 1), dtype=torch.float32,
                                                   device=out.device)
    opts = {} if interpret else {"enable_fp_fusion": False}
    inf = bool(table.norm_inf)
    if table.n_tiles:
        adamw_norm_lanes_kernel[(table.n_tiles,)](
            rows, tile_starts, table.n_rows, table.grad_scale, scratch,
            DTYPE=_TL[table.dtype], ELEM_BYTES=table.itemsize, N=16 // table.itemsize, INF=inf,
            ROW_COLS=_table.ROW_COLS, TILE_ELEMS=_table.TILE_ELEMS, LANES=LANES, **opts)
    adamw_norm_rows_kernel[(table.n_rows,)](scratch, tile_starts, out, INF=inf)
    adamw_norm_total_kernel[(1,)](out, table.n_rows, INF=inf)
