"""The Triton backend: one launch per table of :func:`adamw_kernel`, one program per tile, over
the same param table as the CUDA kernel and the CPU loop (params and grads where they live).

:func:`adamw_scalars` and :func:`adamw_update` mirror ``kernels/adamw_math.cuh`` line for line
(same names, same order, the same explicit fmas); ``tests/test_triton.py`` holds them to the
header's text and to a float64 evaluation of its formulas.

NOTE on IEEE division and sqrt: on NVIDIA GPUs Triton lowers ``a / b`` on fp32 to
``div.full.f32`` (about 2 ulp) and ``tl.sqrt`` to ``sqrt.approx.f32``, while nvcc's ``/`` and
``sqrtf`` round correctly (its default ``-prec-div=true -prec-sqrt=true``). The helpers use
``tl.div_rn`` and ``tl.sqrt_rn`` (Triton >= 3.0; the interpreter runs them as numpy's IEEE
``divide`` and ``sqrt``). A test fails if a bare ``/`` or ``tl.sqrt`` appears in the helper.

NOTE on contraction: Triton lets LLVM/ptxas fuse an fp32 multiply and add into an fma
(``enable_fp_fusion`` defaults to True). The helpers contain no such pair: every fma of the
header is an explicit ``tl.fma``, ``grad * grad`` only feeds fmas, and the other products feed
``tl.div_rn`` or (the decay factor of :func:`adamw_scalars`) the multiplicand of an fma, neither
of which is contracted. Keep it that way when editing (or launch with
``enable_fp_fusion=False``).

NOTE on pow: the header's ``powf(beta, step)`` is, under nvcc, libdevice's ``__nv_powf``. On a
GPU the kernel calls the same function (``libdevice.pow``, ``__ocml_pow_f32`` on ROCm), so its
bias corrections are those of the CUDA kernel bit for bit. Triton's interpreter cannot run
libdevice (``extern_elementwise not supported in interpreter mode``), so there the kernel
computes ``exp2(step * log2(beta))`` in float64 and rounds once to float32: the float64 error
(about ``|step * log2(beta)| * 2**-52`` relative) is far below half an fp32 ulp for any step
count, so the result is the correctly rounded powf in all but rare ties, as glibc's powf (what
the torch backend calls on CPU) is. We avoid fp32 ``exp2``/``log2`` on purpose: ``tl.exp2``
lowers to ``ex2.approx.f32`` and the fp32 rounding of ``log2(beta)`` alone, multiplied by the
step, costs ``|step * log2(beta)| * 2**-24`` relative (for beta2 = 0.999 at step 1e5 that is
about 9e-6, ~70 ulp of beta2^step, and 1 - beta2^step at small steps magnifies any error by
1 / (1 - beta2)).

Imports triton at module level; without it the import fails with the install hint, and
``fused_adamw._dispatch`` reports that as the reason the backend is unavailable.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('Triton is not installed: pip install "fused-adamw[triton]"') from e

from .. import _table

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Read once, at import, like triton.jit itself: it decides there whether kernels are compiled
# or interpreted, so flipping the variable later cannot change how this kernel runs.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------
# The per-element math: kernels/adamw_math.cuh, line for line.
# ------------------------------------------------------------------------------------------


@triton.jit
def adamw_scalars(lr, beta1, beta2, eps, weight_decay, max_lr, step, l2,
                  LIBDEVICE_POW: tl.constexpr):
    """Mirror of ``adamw_scalars`` in adamw_math.cuh (maximize and amsgrad pass through).
    ``max_lr`` is 0 for torch's decay ``lr * wd``, else decouple_lr's max_lr; ``l2`` the
    group's decay mode (Adam's L2)."""
    # NOTE on rounding: lr * weight_decay on the default path, as the header.
    if l2:
        decay = weight_decay
    elif max_lr != 0.0:
        decay = tl.div_rn(lr, max_lr) * weight_decay
    else:
        decay = lr * weight_decay
    if LIBDEVICE_POW:
        bias_correction1 = 1.0 - libdevice.pow(beta1, step)
        bias_correction2_sqrt = tl.sqrt_rn(1.0 - libdevice.pow(beta2, step))
    else:
        # NOTE on pow in the interpreter: see the module docstring.
        step64 = step.to(tl.float64)
        pow1 = tl.exp2(step64 * tl.log2(beta1.to(tl.float64))).to(tl.float32)
        pow2 = tl.exp2(step64 * tl.log2(beta2.to(tl.float64))).to(tl.float32)
        bias_correction1 = 1.0 - pow1
        bias_correction2_sqrt = tl.sqrt_rn(1.0 - pow2)
    l2 = l2 & (weight_decay != 0.0)  # torch adds wd * p only when wd != 0 (0 * inf = NaN)
    return (lr, beta1, beta2, eps, weight_decay, decay, bias_correction1, bias_correction2_sqrt,
            l2)


@triton.jit
def adamw_unscale(grad, grad_scale):
    """Mirror of ``adamw_unscale`` in adamw_math.cuh: GradScaler's division, in fp32."""
    return tl.div_rn(grad, grad_scale)


@triton.jit
def adamw_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                 lr, beta1, beta2, eps, weight_decay, decay, bias_correction1,
                 bias_correction2_sqrt, maximize, amsgrad, l2):
    """Mirror of ``adamw_update`` in adamw_math.cuh on fp32 blocks; returns the new
    (param, exp_avg, exp_avg_sq, max_exp_avg_sq). ``max_exp_avg_sq`` is meaningful only when
    ``amsgrad``."""
    if maximize:
        grad = -grad
    # Adam's L2: torch's fused CUDA Adam writes grad += param * weight_decay, an fma (decay is
    # weight_decay here); a select, as the header (see its NOTE on the select).
    grad = tl.where(l2, tl.fma(param, decay, grad), grad)
    if (not l2) and (weight_decay != 0.0):
        param = tl.fma(-decay, param, param)  # p - decay*p (decay: lr*wd, or wd*lr/max_lr)
    exp_avg = tl.fma(beta1, exp_avg, tl.fma(-beta1, grad, grad))  # b1*m + (1-b1)*g
    grad_sq = grad * grad
    exp_avg_sq = tl.fma(beta2, exp_avg_sq, tl.fma(-beta2, grad_sq, grad_sq))
    second_moment = exp_avg_sq
    if amsgrad:
        # std::max's order, as kernels/adamw_math.cuh and torch: a NaN already in
        # max_exp_avg_sq stays there.
        max_exp_avg_sq = tl.where(max_exp_avg_sq < exp_avg_sq, exp_avg_sq, max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    param = param - tl.div_rn(tl.div_rn(lr, bias_correction1) * exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


# ------------------------------------------------------------------------------------------
# Low-precision params: the mode helpers at the end of kernels/adamw_math.cuh, line for line.
# All integer work is on uint32 blocks (wrapping multiplies, logical shifts, as the header's
# uint32_t); the float ones contain no product that feeds an add other than exact ones
# (round_f16_stochastic's x * inv_ulp scales by a power of two), so contraction cannot
# change them.
# ------------------------------------------------------------------------------------------

MASTER_NONE: tl.constexpr = tl.constexpr(0)  # _table.MASTER_MODES, adamw_math.cuh kMaster*
MASTER_FP32: tl.constexpr = tl.constexpr(1)
MASTER_REMAINDER: tl.constexpr = tl.constexpr(2)
MASTER_KAHAN: tl.constexpr = tl.constexpr(3)
MASTER_STOCHASTIC: tl.constexpr = tl.constexpr(4)


@triton.jit
def f32_bits(f):
    return f.to(tl.uint32, bitcast=True)


@triton.jit
def bits_f32(u):
    return u.to(tl.float32, bitcast=True)


@triton.jit
def sr_mix(x):
    """Mirror of ``sr_mix`` (x: uint32)."""
    x ^= x >> 16
    x *= tl.full((), 0x7feb352d, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x5bd1e995, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def sr_key(seed, step):
    """Mirror of ``sr_key``: seed int64, step the float32 step count."""
    # int64 -> uint32 keeps the low 32 bits; the arithmetic shift of the int64 has the same
    # low 32 bits as the header's shift of the uint64
    s = seed.to(tl.int64)
    return sr_mix(s.to(tl.uint32) ^
                  sr_mix((s >> 32).to(tl.uint32) ^ sr_mix(step.to(tl.uint32))))


@triton.jit
def sr_bits(key, i):
    """Mirror of ``sr_bits``: key uint32, i the int64 element indices."""
    u = i.to(tl.int64)  # as in sr_key: the low 32 bits of each half
    return sr_mix(sr_mix(key ^ u.to(tl.uint32)) ^ (u >> 32).to(tl.uint32))


@triton.jit
def round_bf16_stochastic(x, r):
    """Mirror of ``round_bf16_stochastic`` (a select for the header's early return)."""
    b = f32_bits(x)
    y = (b + (r & 0xffff)) & tl.full((), 0xffff0000, tl.uint32)
    over = ((y & 0x7f800000) == 0x7f800000) & ((b & 0x7fffffff) < 0x7f7f8000)  # overflow NOTE
    y = tl.where(over, (b & tl.full((), 0x80000000, tl.uint32)) | 0x7f7f0000, y)
    return tl.where((b & 0x7f800000) == 0x7f800000, x, bits_f32(y))


@triton.jit
def round_f16_stochastic(x, r):
    """Mirror of ``round_f16_stochastic`` (a select for the header's early return)."""
    e = (f32_bits(x) >> 23) & 0xff  # biased exponent
    ee = tl.maximum(e, tl.full((), 113, tl.uint32))  # 113: 2^-14, float16's smallest normal
    inv_ulp = bits_f32((264 - ee) << 23)  # 2^(137 - ee)
    ulp = bits_f32((ee - 10) << 23)  # 2^(ee - 137)
    q = x * inv_ulp
    fl = tl.floor(q)
    u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 0x1p-24f
    rounded = (fl + tl.where(u < q - fl, 1.0, 0.0)) * ulp
    over = (tl.abs(rounded) > 65504.0) & (tl.abs(x) < 65520.0)  # the header's NOTE on overflow
    rounded = tl.where(over, tl.where(x < 0.0, -65504.0, 65504.0), rounded)
    return tl.where(e == 0xff, x, rounded)


@triton.jit
def remainder_join(p, rem):
    """Mirror of ``remainder_join``: p the param's bits (uint16), rem int16; float32."""
    pu = p.to(tl.uint32)
    hi = pu - tl.where((rem < 0) & ((pu & 0x7fff) != 0), 1, 0).to(tl.uint32)
    return bits_f32(((hi & 0xffff) << 16) | rem.to(tl.uint16, bitcast=True).to(tl.uint32))


@triton.jit
def remainder_split(m):
    """Mirror of ``remainder_split``: returns (p as uint16 bits, rem as int16)."""
    b = f32_bits(m)
    rem = (b & 0xffff).to(tl.uint16).to(tl.int16, bitcast=True)
    p = ((b >> 16) + tl.where(rem < 0, 1, 0).to(tl.uint32)).to(tl.uint16)
    return p, rem


@triton.jit
def kahan_sum(p0, p1, c):
    """Mirror of ``kahan_sum``: returns (p0 + y, y)."""
    y = (p1 - p0) + c
    return p0 + y, y


@triton.jit
def kahan_residual(y, p0, ps):
    """Mirror of ``kahan_residual``."""
    return y - (ps - p0)


# ------------------------------------------------------------------------------------------
# The kernel.
# ------------------------------------------------------------------------------------------


@triton.jit
def to_storage(x, ptr, BF16_BY_HAND: tl.constexpr):
    """fp32 block -> ``ptr``'s element type, rounding to nearest even (torch's ``.to()``).

    NOTE on bf16 in the interpreter: Triton 3.9's interpreter converts fp32 -> bf16 by
    truncation (``cast_impl`` calls ``_convert_float`` with no rounding mode), while the
    compiled kernel (``cvt.rn.bf16.f32``) rounds to nearest even. Truncation biased a
    20-step bf16 trajectory by 0.3 against the torch backend. Under the interpreter the
    kernel therefore rounds by hand with the usual integer trick; NaN is kept as NaN.
    """
    if BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(ptr.dtype.element_ty)


# NOTE on configuration: one fixed config per variant, no autotuning. The kernel updates the
# user's tensors in place, so benchmarking configs on them would apply the update many times,
# and a table of scratch rows per dtype is not worth it for the backend that stands in when the
# CUDA kernel cannot run. 4 warps; a body block gives each thread one 16-byte vector of the
# narrower buffers (block_size: 512 positions for float32 tables, 1024 when a buffer is 16-bit),
# an edge block one element (EDGE_SIZE). Both divide the tile (16384). Registers are capped
# per variant (max_registers), as the CUDA kernel's launch bounds.
_EDGE_SIZE = 128
_NUM_WARPS = 4


@triton.jit
def row_of_tile(tile_starts_ptr, n_rows, tile):
    """Mirror of ``row_of_tile`` in adamw_tile.cuh: the last row whose first tile <= tile."""
    lo = tl.zeros((), dtype=tl.int64)
    hi = n_rows.to(tl.int64)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if tl.load(tile_starts_ptr + mid) <= tile:
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------
# Norms (issue #19): kernels/adamw_math.cuh's lane order (the norm pass, backends/triton_norm.py,
# and track_norms in adamw_kernel).
# ------------------------------------------------------------------------------------------

_NORM_LANES = 256  # adamw_math.cuh kNormLanes
NORM_LANES: tl.constexpr = tl.constexpr(_NORM_LANES)


@triton.jit
def norm_max(acc, x):
    """adamw_norm_max: max(acc, x) that keeps a NaN once seen."""
    return tl.where(((x > acc) | (x != x)) & (acc == acc), x, acc)


@triton.jit
def fold(x, H: tl.constexpr, INF: tl.constexpr):
    """One level of adamw_norm_tree: [2H] -> [H], lane l with lane l + H."""
    a, b = tl.split(tl.permute(tl.reshape(x, [2, H]), (1, 0)))
    if INF:
        return norm_max(a, b)
    return a + b


@triton.jit
def norm_tree(x, INF: tl.constexpr):
    """adamw_norm_tree over NORM_LANES (256) lanes: [256] -> [1]."""
    x = fold(x, 128, INF)
    x = fold(x, 64, INF)
    x = fold(x, 32, INF)
    x = fold(x, 16, INF)
    x = fold(x, 8, INF)
    x = fold(x, 4, INF)
    x = fold(x, 2, INF)
    return fold(x, 1, INF)


@triton.jit
def lanes_add(acc, x, N: tl.constexpr):
    """One lane round of lanes_add (csrc/cpu_adamw.cpp) over a body block: ``x`` holds the
    NORM_LANES * N positions of a round (from a multiple of NORM_LANES * N of the tile); lane
    l of ``acc`` ([NORM_LANES]) adds x[l * N + e] for e = 0, 1, ... N - 1, one at a time, in
    that order. The reshape keeps the order and each split takes the lowest remaining bit of
    e; a thread holds its lanes' 16-byte vectors, so all of it stays within the thread."""
    if N == 4:
        a, b = tl.split(tl.reshape(x, [NORM_LANES, 2, 2]))  # a: e = 0, 2; b: e = 1, 3
        e0, e2 = tl.split(a)
        e1, e3 = tl.split(b)
        acc = (((acc + e0) + e1) + e2) + e3
    else:
        tl.static_assert(N == 8, "lanes_add takes 4 or 8 elements a lane")
        a, b = tl.split(tl.reshape(x, [NORM_LANES, 2, 2, 2]))  # a: e even; b: e odd
        a0, a1 = tl.split(a)  # e = 0, 4; e = 2, 6
        b0, b1 = tl.split(b)  # e = 1, 5; e = 3, 7
        e0, e4 = tl.split(a0)
        e2, e6 = tl.split(a1)
        e1, e5 = tl.split(b0)
        e3, e7 = tl.split(b1)
        acc = (((((((acc + e0) + e1) + e2) + e3) + e4) + e5) + e6) + e7
    return acc


# NOTE on specialisation: Triton compiles a kernel per value of what it specialises on, and
# besides constexprs and None arguments it specialises on integers equal to 1 (a constexpr),
# integers divisible by 16 and pointers aligned to 16 bytes. n_rows and the tables' addresses
# change with the params (tile_starts sits 80 * n_rows bytes into `packed`: 16-byte aligned for
# even n_rows only), so a CUDA-graph capture of a step could compile a kernel that no eager
# step compiled (capture_problem keys on `variant`). They are therefore not specialised: n_rows
# is int64 whatever its value, the pointers carry no alignment, and a variant is exactly
# `variant()` (tests/test_triton_compile.py checks that with Triton's own binder). The kernel
# reads them as scalars, so nothing is lost; the buffers' alignment is the row's business.
#
# NOTE on vector width: the addresses come from the int64 table, so Triton knows nothing of
# their alignment and would access every element alone (a 32- or 16-bit access each; 118 to
# 222 registers, 64-bit addresses per element). As the CUDA kernel (adamw_tile), a tile
# walks positions u = phase + i on the param's 16-byte grid (i the element index, phase the
# param's element offset in its 16-byte vector): buffers are addressed from `base = addr -
# phase` elements, which is 16-byte aligned for every buffer of the row at the param's element
# phase (the table allocates state and master buffers there; a user's state tensor or a grad
# may sit elsewhere). For such a row the whole blocks of BLOCK_SIZE positions are the body,
# unmasked, with the bases and positions declared aligned and contiguous (tl.multiple_of,
# tl.max_contiguous: 128-bit accesses); the partial blocks at the ends are the edges, masked
# (scalar). A row with any buffer off the grid runs all its blocks as edges. The update of an
# element is the same in both (adamw_block), so is its result.
@triton.jit(do_not_specialize=["n_rows"],
            do_not_specialize_on_alignment=["rows_ptr", "tile_starts_ptr", "hparams_ptr",
                                            "grad_scale_ptr", "found_inf_ptr",
                                            "clip_coef_ptr", "tile_norms_ptr"])
def adamw_kernel(
    rows_ptr,  # *int64 [n_rows, ROW_COLS]: addresses of param, grad, exp_avg, exp_avg_sq, max, step; numel; group
    tile_starts_ptr,  # *int64 [n_rows + 1]: the first tile of each row
    hparams_ptr,  # *fp32 [n_groups, HPARAM_COLS]: lr, beta1, beta2, eps, wd, maximize, amsgrad,
    #               decay mode, max_lr, master mode (column 9, 16-bit tables)
    n_rows: tl.int64,  # rows in the table
    grad_scale_ptr,  # *fp32 GradScaler's scale (grads divided by it and written back), or None
    found_inf_ptr,  # *fp32 GradScaler's found_inf (!= 0: nothing is written), or None
    clip_coef_ptr,  # *fp32 the clip coefficient (fused_adamw._clip; adamw_clip), or None
    tile_norms_ptr,  # *fp32 [n_tiles, 3]: each tile's sums of squares (track_norms), or None
    DTYPE: tl.constexpr,  # the params' (and grads') storage type (tl.float32, bfloat16, float16)
    STATE_DTYPE: tl.constexpr,  # the moments' (state_dtype; DTYPE by default)
    ELEM_BYTES: tl.constexpr,  # DTYPE's size
    STATE_BYTES: tl.constexpr,  # STATE_DTYPE's size
    HAS_MAX: tl.constexpr,  # some row uses amsgrad
    HAS_MASTER: tl.constexpr,  # 16-bit params: rows may have a master mode (hparams column 9)
    ROW_COLS: tl.constexpr,  # _table.ROW_COLS
    HPARAM_COLS: tl.constexpr,  # _table.HPARAM_COLS
    TILE_ELEMS: tl.constexpr,  # _table.TILE_ELEMS
    LIBDEVICE_POW: tl.constexpr,  # libdevice powf (GPU) or float64 exp2/log2 (interpreter)
    BF16_BY_HAND: tl.constexpr,  # DTYPE is bf16 rounded with integer ops (interpreter, to_storage)
    STATE_BF16_BY_HAND: tl.constexpr,  # the same for STATE_DTYPE
    BLOCK_SIZE: tl.constexpr,  # positions per body block (a divisor of TILE_ELEMS)
    EDGE_SIZE: tl.constexpr,  # positions per edge block (a divisor of BLOCK_SIZE)
):
    # NOTE on track_norms (tile_norms_ptr given): the tile also leaves, per column (grad as
    # used: after the unscale, before the clip; param after the step; param after - param
    # before; both as stored), the sum of squares in the CPU loop's order (tile_with_norms in
    # csrc/cpu_adamw.cpp, kernels/adamw_math.cuh's lane order), so bit for bit its sums:
    # position u goes to lane (u / N) % NORM_LANES (N elements of a 16-byte param vector),
    # each lane adds its elements in increasing u, one at a time, in float32, then the
    # pairwise tree over lanes (norm_tree). The variant's blocks are whole lane rounds
    # (BLOCK_SIZE = EDGE_SIZE = NORM_LANES * N positions, aligned to the tile, which rounds
    # divide), walked head, body, tail: increasing u. A body round gives each thread its
    # lanes' 16-byte vectors (lanes_add, within the thread). An edge round (masked) runs as
    # N blocks of NORM_LANES positions, block e holding element e of every lane (u = start +
    # l * N + e), so that a lane's adds stay in one thread and in order; a lane-major masked
    # block was accessed an element a thread, and Triton moved its values through shared
    # memory into the body's layout (130 registers for the fp32 variant, 90 this way).
    # The param before and after the step is read back from memory (before the block's
    # stores, and after them: the thread's own store, a cache hit) rather than kept live
    # through the update, which cost up to 16 registers and spills at 128 (bf16 params, fp32
    # amsgrad moments, GradScaler). The grad's square enters its lanes before the clip.
    # Masked positions add +0.0, which leaves a sum of squares (never -0.0) unchanged. Each
    # tile writes its three partials to its own slot of tile_norms (no atomics); the rows sum
    # their tiles in order in float64 (adamw_row_norms_kernel), so the result does not depend
    # on the grid. Launched with enable_fp_fusion=False on a GPU: `acc + g * g` must round
    # the product first, as the CPU loop (built without contraction) does; adamw_update has
    # no pair that fusion would contract (the module's NOTE on contraction), so the step is
    # unchanged.
    # ---------------------------------------------------------------- map program id to tile
    # tile_work_in_row (adamw_tile.cuh): positions [u_begin, u_end) of row r.
    tile = tl.program_id(0).to(tl.int64)
    r = row_of_tile(tile_starts_ptr, n_rows, tile)
    row = rows_ptr + r * ROW_COLS
    param_addr = tl.load(row + 0)  # _table.ROW_PARAM
    phase = (param_addr % 16) // ELEM_BYTES
    numel = tl.load(row + 6)  # _table.ROW_NUMEL
    j = tile - tl.load(tile_starts_ptr + r)
    u_begin = tl.maximum(j * TILE_ELEMS, phase)
    u_end = tl.minimum((j + 1) * TILE_ELEMS, phase + numel)
    if found_inf_ptr is not None:  # adamw_step_skipped: an empty range writes nothing
        u_end = tl.where(tl.load(found_inf_ptr) != 0.0, u_begin, u_end)
    grad_scale = 1.0
    if grad_scale_ptr is not None:
        grad_scale = tl.load(grad_scale_ptr)
    clip_coef = 1.0
    if clip_coef_ptr is not None:  # tile_work_in_row: the table's coefficient, else 1.0f
        clip_coef = tl.load(clip_coef_ptr)
    grad_addr = tl.load(row + 1)  # _table.ROW_GRAD
    exp_avg_addr = tl.load(row + 2)  # _table.ROW_EXP_AVG
    exp_avg_sq_addr = tl.load(row + 3)  # _table.ROW_EXP_AVG_SQ
    step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))  # _table.ROW_STEP, after
    #                                               this step's increment (adamw_steps_kernel)
    # Off the grid: a buffer whose base (its address minus phase elements) is not 16-byte
    # aligned (the param's is, by the definition of phase).
    off_grid = (grad_addr - phase * ELEM_BYTES) | (exp_avg_addr - phase * STATE_BYTES) | (
        exp_avg_sq_addr - phase * STATE_BYTES)

    # ---------------------------------------------------------------- load this param's scalars
    hp = hparams_ptr + tl.load(row + 7) * HPARAM_COLS  # _table.ROW_GROUP
    (lr, beta1, beta2, eps, weight_decay, decay, bias_correction1, bias_correction2_sqrt,
     l2) = adamw_scalars(
        tl.load(hp + 0).to(tl.float32),  # _table.HP_LR
        tl.load(hp + 1).to(tl.float32),  # _table.HP_BETA1
        tl.load(hp + 2).to(tl.float32),  # _table.HP_BETA2
        tl.load(hp + 3).to(tl.float32),  # _table.HP_EPS
        tl.load(hp + 4).to(tl.float32),  # _table.HP_WEIGHT_DECAY
        tl.load(hp + 8).to(tl.float32),  # _table.HP_MAX_LR
        step,
        tl.load(hp + 7) != 0.0,  # _table.HP_DECAY_MODE
        LIBDEVICE_POW,
    )
    maximize = tl.load(hp + 5) != 0.0  # _table.HP_MAXIMIZE
    # ---------------------------------------------------------------- the master mode's buffer
    # master_mode_of (adamw_tile.cuh): float32 tables ignore the column. The extra buffer is
    # typed per mode (float master, int16 remainder, DTYPE compensation) in adamw_block; the
    # stochastic key is computed once per tile from the row's seed and step count, as the CPU
    # loop.
    mode = MASTER_NONE
    extra_addr = param_addr  # unused without a master mode
    key = tl.zeros((), dtype=tl.uint32)
    if HAS_MASTER:
        mode = tl.load(hp + 9).to(tl.int32)  # _table.HP_MASTER_MODE
        extra_addr = tl.load(row + 8)  # _table.ROW_EXTRA
        key = sr_key(tl.load(row + 9), step)  # _table.ROW_SEED
        extra_bytes = tl.where(mode == MASTER_FP32, 4, ELEM_BYTES)  # remainder: int16
        has_extra = (mode == MASTER_FP32) | (mode == MASTER_REMAINDER) | (mode == MASTER_KAHAN)
        off_grid |= tl.where(has_extra, extra_addr - phase * extra_bytes, 0)
    amsgrad = False
    max_addr = exp_avg_sq_addr  # unused without amsgrad
    if HAS_MAX:
        max_addr = tl.load(row + 4)  # _table.ROW_MAX_EXP_AVG_SQ, 0 without amsgrad
        amsgrad = (tl.load(hp + 6) != 0.0) & (max_addr != 0)  # _table.HP_AMSGRAD
        off_grid |= tl.where(amsgrad, max_addr - phase * STATE_BYTES, 0)

    # ---------------------------------------------------------------- the tile's blocks
    # Body: the whole blocks of BLOCK_SIZE positions in [u_begin, u_end) (none when off the
    # grid); edges: the positions before and after it, in masked blocks of EDGE_SIZE.
    body_lo = tl.where((off_grid & 15) == 0,
                       (u_begin + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE, u_end)
    body_hi = tl.maximum(u_end - u_end % BLOCK_SIZE, body_lo)
    first = u_begin - u_begin % EDGE_SIZE
    n_head = (tl.minimum(body_lo, u_end) - first + EDGE_SIZE - 1) // EDGE_SIZE
    n_tail = (tl.maximum(u_end - body_hi, 0) + EDGE_SIZE - 1) // EDGE_SIZE
    if tile_norms_ptr is None:
        for start in tl.range(body_lo, body_hi, BLOCK_SIZE):
            adamw_block(start, u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr,
                        exp_avg_sq_addr, max_addr, extra_addr, grad_scale, clip_coef, lr,
                        beta1, beta2, eps, weight_decay, decay, bias_correction1,
                        bias_correction2_sqrt, maximize, amsgrad, l2, mode, key,
                        grad_scale_ptr is not None, clip_coef_ptr is not None,
                        DTYPE, STATE_DTYPE, HAS_MAX, HAS_MASTER, BF16_BY_HAND,
                        STATE_BF16_BY_HAND, BLOCK_SIZE, False, 0.0, 0.0, 0.0, False, 1)
        for k in tl.range(0, n_head + n_tail):
            start = tl.where(k < n_head, first + k * EDGE_SIZE,
                             body_hi + (k - n_head) * EDGE_SIZE)
            adamw_block(start, u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr,
                        exp_avg_sq_addr, max_addr, extra_addr, grad_scale, clip_coef, lr,
                        beta1, beta2, eps, weight_decay, decay, bias_correction1,
                        bias_correction2_sqrt, maximize, amsgrad, l2, mode, key,
                        grad_scale_ptr is not None, clip_coef_ptr is not None,
                        DTYPE, STATE_DTYPE, HAS_MAX, HAS_MASTER, BF16_BY_HAND,
                        STATE_BF16_BY_HAND, EDGE_SIZE, True, 0.0, 0.0, 0.0, False, 1)
    else:  # track_norms: head, body, tail (increasing u: the lanes' order)
        N: tl.constexpr = 16 // ELEM_BYTES
        g_acc = tl.zeros([NORM_LANES], tl.float32)
        p_acc = tl.zeros([NORM_LANES], tl.float32)
        d_acc = tl.zeros([NORM_LANES], tl.float32)
        for k in tl.range(0, n_head * N):  # edge rounds: N blocks each, element k % N
            g_acc, p_acc, d_acc = adamw_block(
                first + (k // N) * BLOCK_SIZE + k % N,
                u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr, exp_avg_sq_addr,
                max_addr, extra_addr, grad_scale, clip_coef, lr, beta1, beta2, eps,
                weight_decay, decay, bias_correction1, bias_correction2_sqrt, maximize, amsgrad,
                l2, mode, key, grad_scale_ptr is not None, clip_coef_ptr is not None, DTYPE,
                STATE_DTYPE, HAS_MAX, HAS_MASTER, BF16_BY_HAND, STATE_BF16_BY_HAND,
                NORM_LANES, True, g_acc, p_acc, d_acc, True, N)
        for start in tl.range(body_lo, body_hi, BLOCK_SIZE):
            g_acc, p_acc, d_acc = adamw_block(
                start, u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr, exp_avg_sq_addr,
                max_addr, extra_addr, grad_scale, clip_coef, lr, beta1, beta2, eps,
                weight_decay, decay, bias_correction1, bias_correction2_sqrt, maximize, amsgrad,
                l2, mode, key, grad_scale_ptr is not None, clip_coef_ptr is not None, DTYPE,
                STATE_DTYPE, HAS_MAX, HAS_MASTER, BF16_BY_HAND, STATE_BF16_BY_HAND,
                BLOCK_SIZE, False, g_acc, p_acc, d_acc, True, N)
        for k in tl.range(0, n_tail * N):
            g_acc, p_acc, d_acc = adamw_block(
                body_hi + (k // N) * BLOCK_SIZE + k % N,
                u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr, exp_avg_sq_addr,
                max_addr, extra_addr, grad_scale, clip_coef, lr, beta1, beta2, eps,
                weight_decay, decay, bias_correction1, bias_correction2_sqrt, maximize, amsgrad,
                l2, mode, key, grad_scale_ptr is not None, clip_coef_ptr is not None, DTYPE,
                STATE_DTYPE, HAS_MAX, HAS_MASTER, BF16_BY_HAND, STATE_BF16_BY_HAND,
                NORM_LANES, True, g_acc, p_acc, d_acc, True, N)
        out = tile_norms_ptr + tile * 3 + tl.arange(0, 1)
        tl.store(out, norm_tree(g_acc, False))
        tl.store(out + 1, norm_tree(p_acc, False))
        tl.store(out + 2, norm_tree(d_acc, False))


@triton.jit
def grid_base(addr, phase, ty: tl.constexpr, ON_GRID: tl.constexpr):
    """Position 0 of a buffer of element type ``ty`` at ``addr`` whose element 0 sits at
    position ``phase``; declared 16-byte aligned when ``ON_GRID`` (the body)."""
    base = addr.to(tl.pointer_type(ty)) - phase
    if ON_GRID:
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def adamw_block(start, u_begin, u_end, phase, param_addr, grad_addr, exp_avg_addr,
                exp_avg_sq_addr, max_addr, extra_addr, grad_scale, clip_coef, lr, beta1, beta2,
                eps, weight_decay, decay, bias_correction1, bias_correction2_sqrt, maximize,
                amsgrad, l2, mode, key, SCALED: tl.constexpr, CLIPPED: tl.constexpr,
                DTYPE: tl.constexpr,
                STATE_DTYPE: tl.constexpr, HAS_MAX: tl.constexpr, HAS_MASTER: tl.constexpr,
                BF16_BY_HAND: tl.constexpr, STATE_BF16_BY_HAND: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, g_acc, p_acc, d_acc,
                NORMS: tl.constexpr, N: tl.constexpr):
    """Positions [start, start + BLOCK_SIZE) of a row: a body block (MASKED false: all of them
    in the row, every buffer on the 16-byte grid) or an edge block (masked to [u_begin,
    u_end)). With NORMS (track_norms: the block is one lane round, adamw_kernel's NOTE on
    track_norms) returns the lanes (g_acc, p_acc, d_acc) plus this block's squares; without,
    returns them unchanged."""
    if MASKED and NORMS:  # element e of every lane of a round (adamw_kernel's NOTE)
        u = start + tl.arange(0, BLOCK_SIZE) * N
    else:
        u = start + tl.arange(0, BLOCK_SIZE)
    if MASKED:
        mask = (u >= u_begin) & (u < u_end)
    else:
        mask = None
        u = tl.max_contiguous(tl.multiple_of(u, BLOCK_SIZE), BLOCK_SIZE)
    on_grid: tl.constexpr = not MASKED
    param_ptrs = grid_base(param_addr, phase, DTYPE, on_grid) + u
    grad_ptrs = grid_base(grad_addr, phase, DTYPE, on_grid) + u
    exp_avg_ptrs = grid_base(exp_avg_addr, phase, STATE_DTYPE, on_grid) + u
    exp_avg_sq_ptrs = grid_base(exp_avg_sq_addr, phase, STATE_DTYPE, on_grid) + u

    # ---------------------------------------------------------------- load, storage -> fp32
    param_raw = tl.load(param_ptrs, mask=mask)
    param = param_raw.to(tl.float32)
    if HAS_MASTER:  # the float the update starts from (adamw_math.cuh's table of modes)
        if mode == MASTER_FP32:
            m = tl.load(grid_base(extra_addr, phase, tl.float32, on_grid) + u, mask=mask)
            # a written param wins: the header compares the stored bits
            same = (to_storage(m, param_ptrs, BF16_BY_HAND).to(tl.uint16, bitcast=True)
                    == param_raw.to(tl.uint16, bitcast=True))
            param = tl.where(same, m, param)
        elif mode == MASTER_REMAINDER:
            param = remainder_join(param_raw.to(tl.uint16, bitcast=True),
                                   tl.load(grid_base(extra_addr, phase, tl.int16, on_grid) + u,
                                           mask=mask))
    p0 = param
    grad = tl.load(grad_ptrs, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptrs, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptrs, mask=mask).to(tl.float32)
    if HAS_MAX:  # read and written for amsgrad rows only (masked off: no traffic)
        max_ptrs = grid_base(max_addr, phase, STATE_DTYPE, on_grid) + u
        # NOTE on the block of a scalar bool: Triton 3.9's interpreter takes neither a
        # broadcast int1 scalar as a mask nor `mask & amsgrad` (numpy bitwise_and on int1).
        max_mask = tl.broadcast_to(amsgrad.to(tl.int32), [BLOCK_SIZE]) != 0
        if MASKED:
            max_mask = max_mask & mask
        max_exp_avg_sq = tl.load(max_ptrs, mask=max_mask, other=0.0).to(tl.float32)
    else:
        max_exp_avg_sq = exp_avg_sq  # unused: amsgrad is the constant False

    # ---------------------------------------------------------------- compute in fp32
    if SCALED:  # adamw_unscale, written back to the grad
        grad = adamw_unscale(grad, grad_scale)
        tl.store(grad_ptrs, to_storage(grad, grad_ptrs, BF16_BY_HAND), mask=mask)
    if NORMS:  # the grad as used: unscaled, not clipped (tile_with_norms's g_used)
        g_sq = grad * grad
        if MASKED:  # +0.0 outside the row: the lanes' sums do not change
            g_acc += tl.where(mask, g_sq, 0.0)  # one element of each lane
        else:
            g_acc = lanes_add(g_acc, g_sq, N)
    if CLIPPED:  # adamw_clip, after the write-back: p.grad stays unclipped
        # NOTE on contraction: the product only feeds adamw_update's fmas as an operand (or
        # its negation), never an add, so it is not fused; the CPU loop rounds it alone too.
        grad = grad * clip_coef
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = adamw_update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
        lr, beta1, beta2, eps, weight_decay, decay, bias_correction1, bias_correction2_sqrt,
        maximize, amsgrad, l2,
    )

    # ---------------------------------------------------------------- store, fp32 -> storage
    if NORMS:  # the param before the step as stored: adamw_kernel's NOTE on track_norms
        p_before = tl.load(param_ptrs, mask=mask).to(tl.float32)
    if HAS_MASTER:
        store_param(param, p0, u - phase, mask, param_ptrs, mode,
                    grid_base(extra_addr, phase, tl.float32, on_grid) + u,
                    grid_base(extra_addr, phase, tl.int16, on_grid) + u,
                    grid_base(extra_addr, phase, DTYPE, on_grid) + u, key, BF16_BY_HAND)
    else:
        tl.store(param_ptrs, to_storage(param, param_ptrs, BF16_BY_HAND), mask=mask)
    tl.store(exp_avg_ptrs, to_storage(exp_avg, exp_avg_ptrs, STATE_BF16_BY_HAND), mask=mask)
    tl.store(exp_avg_sq_ptrs, to_storage(exp_avg_sq, exp_avg_sq_ptrs, STATE_BF16_BY_HAND),
             mask=mask)
    if HAS_MAX:
        tl.store(max_ptrs, to_storage(max_exp_avg_sq, max_ptrs, STATE_BF16_BY_HAND),
                 mask=max_mask)

    # ---------------------------------------------------------------- track_norms' lanes
    if NORMS:  # the values as stored, in float32 (D::load in tile_with_norms)
        p_after = tl.load(param_ptrs, mask=mask).to(tl.float32)  # this thread's own store
        delta = p_after - p_before  # the stored param, not a master
        p_sq = p_after * p_after
        d_sq = delta * delta
        if MASKED:
            p_acc += tl.where(mask, p_sq, 0.0)
            d_acc += tl.where(mask, d_sq, 0.0)
        else:
            p_acc = lanes_add(p_acc, p_sq, N)
            d_acc = lanes_add(d_acc, d_sq, N)
    return g_acc, p_acc, d_acc


@triton.jit
def store_param(param, p0, i, mask, param_ptrs, mode, master_ptrs, rem_ptrs, comp_ptrs, key,
                BF16_BY_HAND: tl.constexpr):
    """The param's store under its row's master mode (tile_loop_master in csrc/cpu_adamw.cpp):
    ``param`` is adamw_update's result, ``p0`` the float it started from, ``i`` the element
    indices (the stochastic rounding's counter)."""
    if mode == MASTER_FP32:
        tl.store(master_ptrs, param, mask=mask)
        tl.store(param_ptrs, to_storage(param, param_ptrs, BF16_BY_HAND), mask=mask)
    elif mode == MASTER_REMAINDER:  # bfloat16 only (the optimizer refuses it for float16)
        p, rem = remainder_split(param)
        tl.store(param_ptrs, p.to(param_ptrs.dtype.element_ty, bitcast=True), mask=mask)
        tl.store(rem_ptrs, rem, mask=mask)
    elif mode == MASTER_KAHAN:
        s, y = kahan_sum(p0, param, tl.load(comp_ptrs, mask=mask).to(tl.float32))
        ps = to_storage(s, param_ptrs, BF16_BY_HAND)
        tl.store(param_ptrs, ps, mask=mask)
        tl.store(comp_ptrs,
                 to_storage(kahan_residual(y, p0, ps.to(tl.float32)), comp_ptrs, BF16_BY_HAND),
                 mask=mask)
    elif mode == MASTER_STOCHASTIC:
        r = sr_bits(key, i)
        if param_ptrs.dtype.element_ty == tl.bfloat16:
            param = round_bf16_stochastic(param, r)
        else:
            param = round_f16_stochastic(param, r)
        tl.store(param_ptrs, to_storage(param, param_ptrs, BF16_BY_HAND), mask=mask)
    else:  # MASTER_NONE
        tl.store(param_ptrs, to_storage(param, param_ptrs, BF16_BY_HAND), mask=mask)


@triton.jit(do_not_specialize=["n_rows"],  # as adamw_kernel's NOTE on specialisation
            do_not_specialize_on_alignment=["rows_ptr", "found_inf_ptr"])
def adamw_steps_kernel(
    rows_ptr,  # *int64 [n_rows, ROW_COLS]
    n_rows: tl.int64,  # rows in the table (not specialised either)
    found_inf_ptr,  # *fp32 GradScaler's found_inf, or None
    ROW_COLS: tl.constexpr,  # _table.ROW_COLS
    BLOCK_SIZE: tl.constexpr,  # rows per program
):
    """Advances every row's step count by one, before adamw_kernel reads it (as the CUDA
    launcher's first kernel)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = rows < n_rows
    step_ptrs = tl.load(rows_ptr + rows * ROW_COLS + 5, mask=mask, other=0)  # _table.ROW_STEP
    step_ptrs = step_ptrs.to(tl.pointer_type(tl.float32))
    increment = 1.0
    if found_inf_ptr is not None:  # GradScaler found an inf: no step count moves (step + 0)
        increment = tl.where(tl.load(found_inf_ptr) != 0.0, 0.0, 1.0)
    tl.store(step_ptrs, tl.load(step_ptrs, mask=mask) + increment, mask=mask)


@triton.jit(do_not_specialize=["n_rows"],  # as adamw_kernel's NOTE on specialisation
            do_not_specialize_on_alignment=["tiles_ptr", "tile_starts_ptr", "out_ptr"])
def adamw_row_norms_kernel(
    tiles_ptr,  # *fp32 [n_tiles, 3]: adamw_kernel's tile_norms
    tile_starts_ptr,  # *int64 [n_rows + 1]
    out_ptr,  # *fp32 [n_rows, 3]: table.row_norms
    n_rows: tl.int64,  # rows in the table (each program takes one; unused but for the key)
):
    """track_norms' rows, after adamw_kernel: per row and column its tiles' sums in order, in
    float64, rounded once to float32 (adamw_step_cpu's loop). One program per row: the order
    is the row's, whatever the grid."""
    r = tl.program_id(0).to(tl.int64)
    t0 = tl.load(tile_starts_ptr + r)
    t1 = tl.load(tile_starts_ptr + r + 1)
    for c in tl.static_range(3):
        acc = tl.zeros([1], tl.float64)
        for t in range(t0, t1):
            acc += tl.load(tiles_ptr + t * 3 + c + tl.arange(0, 1)).to(tl.float64)
        tl.store(out_ptr + r * 3 + c + tl.arange(0, 1), acc.to(tl.float32))


# ------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_STEPS_BLOCK = 256


def has_master(table: _table.Table) -> bool:
    """16-bit params and some group with a master mode: only then are the mode branches
    compiled in (the plain bf16/fp16 kernel stays the one without them)."""
    return table.dtype != torch.float32 and any(
        row[_table.HP_MASTER_MODE] != 0 for row in table.host_hparams)


# The moments' dtypes each param dtype takes (_lowp.check_low_precision: its own, float32,
# or bfloat16 beside float32 params).
_STATE_DTYPES = {torch.float32: (torch.float32, torch.bfloat16),
                 torch.bfloat16: (torch.bfloat16, torch.float32),
                 torch.float16: (torch.float16, torch.float32)}


class Variant(NamedTuple):
    """What Triton compiles a separate :func:`adamw_kernel` for on one device: its constexprs
    (:func:`kernel_constexprs`) and which of its pointer arguments are None."""

    dtype: torch.dtype  # the params' (and grads')
    state_dtype: torch.dtype  # the moments'
    has_max: bool  # some row uses amsgrad
    has_master: bool  # 16-bit params, some group with a master mode
    scaled: bool  # GradScaler's grad_scale is given
    skippable: bool  # GradScaler's found_inf is given
    clipped: bool = False  # a clip coefficient is given (max_grad_norm, fused_adamw._clip)
    norms: bool = False  # track_norms: the tiles' sums of squares (table.row_norms)


def variant(table: _table.Table) -> tuple:
    """The key of the kernels a step of ``table`` launches: (device, :class:`Variant`)."""
    return (table.device, Variant(table.dtype, table.state_dtype, table.has_max,
                                  has_master(table), table.grad_scale is not None,
                                  table.found_inf is not None, clip_coef(table) is not None,
                                  row_norms(table) is not None))


def variants(all_norms: bool = False) -> list[Variant]:
    """The variants tests/test_triton_compile.py compiles: every one without track_norms that
    :func:`launch` can compile (160) and :data:`NORMS_SAMPLE`, the track_norms twins that
    stand for the others (a sweep of all of them, ``all_norms``, set max_registers;
    kernels/NOTES.md)."""
    plain = [Variant(dtype, state_dtype, has_max, has_master, scaled, skippable, clipped)
             for dtype in _SUPPORTED_DTYPES for state_dtype in _STATE_DTYPES[dtype]
             for has_max in (False, True)
             for has_master in ((False, True) if dtype != torch.float32 else (False,))
             for scaled in (False, True) for skippable in (False, True)
             for clipped in (False, True)]
    if all_norms:
        return plain + [v._replace(norms=True) for v in plain]
    return plain + list(NORMS_SAMPLE)


# The track_norms variants compiled in CI: the common fp32 step and the heaviest of each lane
# layout (fp32 params with 16-bit moments take 4 warps, the others 8; block_size) and of each
# register cap (96, 128, 168: max_registers).
NORMS_SAMPLE = (
    Variant(torch.float32, torch.float32, False, False, False, False, True, True),
    Variant(torch.float32, torch.float32, True, False, True, True, True, True),
    Variant(torch.float32, torch.bfloat16, True, False, True, True, True, True),
    Variant(torch.bfloat16, torch.bfloat16, True, False, True, True, True, True),
    Variant(torch.bfloat16, torch.float32, True, True, True, True, True, True),
)


def max_registers(v: Variant) -> int:
    """ptxas's register cap (maxnreg) for variant ``v``: the CUDA kernel's 64 (32 warps per SM)
    where the kernel fits in it without spilling, else the smallest of 80, 96 and 128 that
    does, measured with Triton 3.9's ptxas for sm_90 (a sweep of the four caps over every
    variant; ptxas is not monotone here: some spill at 96 and not at 80). 16-bit params hold
    8 elements a thread (one 16-byte vector), as fp32 moments and masters 8 more registers
    each. tests/test_triton_compile.py fails on any spill; kernels/NOTES.md has the counts.

    track_norms variants hold three lanes and the squares besides (and run whole lane
    rounds: 8 warps, 4 for float32 params with 16-bit moments): 96 for float32 tables, else
    128 (16 warps per SM either way), but 168 for 16-bit params with a master mode, or with
    fp32 amsgrad moments: those spill 8-64 bytes at 128 (139-158 registers uncapped), and
    168 fits them at one block of 8 warps per SM (a sweep of all 160, ``--all-norms``;
    kernels/NOTES.md). A leaner kernel (4-warp half rounds) is left to do."""
    if v.norms:
        if v.dtype == v.state_dtype == torch.float32:
            return 96
        if v.dtype != torch.float32 and (
                v.has_master or (v.has_max and v.state_dtype == torch.float32)):
            return 168
        return 128
    if v.dtype == torch.float32:
        if v.state_dtype == torch.float32:
            # amsgrad with GradScaler or the clip coefficient: spills at 64 and 80
            return 96 if v.has_max and (v.scaled or v.clipped) else 64
        return 96 if v.scaled and not v.has_max else 80
    if v.state_dtype == torch.float32:  # 16-bit params, fp32 moments
        if v.has_max or (v.has_master and v.dtype == torch.float16):
            return 128
        return 96 if v.has_master else 80
    return 96 if v.has_master and (v.has_max or v.dtype == torch.float16) else 80


def launch_options(v: Variant, interpret: bool = _INTERPRET) -> dict:
    """:func:`adamw_kernel`'s compile options for variant ``v`` (track_norms: no fp fusion,
    adamw_kernel's NOTE on track_norms; the interpreter never fuses)."""
    opts = dict(num_warps=num_warps(v), maxnreg=max_registers(v))
    if v.norms and not interpret:
        opts["enable_fp_fusion"] = False
    return opts


def block_size(v: Variant) -> int:
    """Body positions per block: one 16-byte vector per thread of the narrower buffers (see
    the NOTE on configuration); with track_norms one lane round, NORM_LANES 16-byte vectors
    of params (adamw_kernel's NOTE on track_norms)."""
    if v.norms:
        return _NORM_LANES * 16 // v.dtype.itemsize
    return 32 * _NUM_WARPS * 16 // min(v.dtype.itemsize, v.state_dtype.itemsize)


def num_warps(v: Variant) -> int:
    """Warps per program: a thread holds one 16-byte vector of the narrower buffers, so 4
    without track_norms; with it the block is a lane round (1024 positions for float32
    params, 2048 for 16-bit ones): 8 warps, or 4 for float32 params with 16-bit moments."""
    return block_size(v) * min(v.dtype.itemsize, v.state_dtype.itemsize) // (32 * 16)


def kernel_constexprs(v: Variant, interpret: bool = _INTERPRET) -> dict:
    """:func:`adamw_kernel`'s constexpr arguments for variant ``v`` (compiled, or run by the
    interpreter)."""
    return dict(
        DTYPE=_TL_DTYPES[v.dtype],
        STATE_DTYPE=_TL_DTYPES[v.state_dtype],
        ELEM_BYTES=v.dtype.itemsize,
        STATE_BYTES=v.state_dtype.itemsize,
        HAS_MAX=v.has_max,
        HAS_MASTER=v.has_master,
        ROW_COLS=_table.ROW_COLS,
        HPARAM_COLS=_table.HPARAM_COLS,
        TILE_ELEMS=_table.TILE_ELEMS,
        LIBDEVICE_POW=not interpret,
        BF16_BY_HAND=interpret and v.dtype == torch.bfloat16,
        STATE_BF16_BY_HAND=interpret and v.state_dtype == torch.bfloat16,
        BLOCK_SIZE=block_size(v),
        EDGE_SIZE=block_size(v) if v.norms else _EDGE_SIZE,
    )


# Variants launched at least once in this process: a CUDA-graph capture of a step whose kernel
# Triton has not compiled yet is refused (compiling under capture is not capturable work).
_launched: set = set()


def launch(table: _table.Table) -> None:
    """The two launches over ``table`` (step counts, then the update); no host sync."""
    if table.n_rows == 0:
        return
    key = variant(table)
    _launched.add(key)
    steps_args, update_args = kernel_args(table)
    adamw_steps_kernel[(triton.cdiv(table.n_rows, _STEPS_BLOCK),)](
        *steps_args, ROW_COLS=_table.ROW_COLS, BLOCK_SIZE=_STEPS_BLOCK)
    if table.n_tiles:
        adamw_kernel[(table.n_tiles,)](*update_args, **kernel_constexprs(key[1]),
                                       **launch_options(key[1]))
    if key[1].norms:  # rows without a tile (no elements) get 0, as in the CPU loop
        adamw_row_norms_kernel[(table.n_rows,)](update_args[-1], update_args[1],
                                                table.row_norms, table.n_rows)


def kernel_args(table: _table.Table) -> tuple[tuple, tuple]:
    """The runtime (non-constexpr) arguments of :func:`adamw_steps_kernel` and
    :func:`adamw_kernel` for a launch over ``table``."""
    packed = table.packed
    rows = packed[: table.n_rows * _table.ROW_COLS]
    tile_starts = packed[table.n_rows * _table.ROW_COLS:]
    return ((rows, table.n_rows, table.found_inf),
            (rows, tile_starts, table.hparams, table.n_rows, table.grad_scale, table.found_inf,
             clip_coef(table), tile_norms(table)))


def clip_coef(table: _table.Table):
    """The table's clip coefficient (float32 scalar on its device, fused_adamw._clip), or None
    when the step does not clip."""
    return getattr(table, "clip_coef", None)


def row_norms(table: _table.Table):
    """track_norms' output (float32 [n_rows, 3], fused_adamw._clip), or None."""
    return getattr(table, "row_norms", None)


def tile_norms(table: _table.Table):
    """adamw_kernel's scratch for track_norms, float32 [max(n_tiles, 1), 3] on the table's
    device (allocated when the table's tiles change, reused every step), or None."""
    if row_norms(table) is None:
        return None
    buf = getattr(table, "triton_tile_norms", None)
    n = max(table.n_tiles, 1)
    if buf is None or buf.shape[0] != n or buf.device != table.device:
        buf = table.triton_tile_norms = torch.empty(n, 3, dtype=torch.float32,
                                                    device=table.device)
    return buf


class TritonBackend:
    name = "triton"
    clips = True  # grad_norm_rows (backends/triton_norm.py) and table.clip_coef
    tracks_norms = True  # table.row_norms: adamw_kernel's NOTE on track_norms

    def grad_norm_rows(self, table: _table.Table) -> None:
        """The norm pass (fused_adamw._clip): ``table.clip_rows`` (float64 [n_rows + 1])."""
        from . import triton_norm

        if table.device.type == "cuda":
            with torch.cuda.device(table.device):
                triton_norm.grad_norm_rows(table, _INTERPRET)
        else:
            triton_norm.grad_norm_rows(table, _INTERPRET)

    def capture_problem(self, table: _table.Table) -> str | None:
        """Why a step of ``table`` cannot be captured into a CUDA graph now, or None (the
        key is all Triton specialises on: see adamw_kernel's NOTE on specialisation)."""
        if table.n_rows and variant(table) not in _launched:
            return ("the Triton kernel for this table (dtypes, amsgrad, master modes, GradScaler "
                    "use, clipping, track_norms) has not "
                    "been compiled yet: run one eager step the way the graph will (with or "
                    "without the scaler) before capturing")
        return None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype == torch.float64:
            return "the Triton kernel computes in float32; float64 uses the torch backend"
        if dtype not in _SUPPORTED_DTYPES:
            return f"the Triton kernel supports float32, bfloat16 and float16, not {dtype}"
        if device.type == "cuda":  # NVIDIA, and AMD under ROCm (HIP devices are "cuda")
            return None
        if device.type == "cpu":
            if _INTERPRET:
                return None
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
        return f"Triton does not run on {device.type} devices"

    def step(self, table: _table.Table) -> None:
        if table.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"table dtype is {table.dtype}; the Triton kernel takes "
                             "float32, bfloat16 or float16")
        if table.hparams is None or table.hparams.dtype != torch.float32:
            raise ValueError("table.hparams must be a float32 [n_groups, HPARAM_COLS] tensor")
        norms = row_norms(table)
        if norms is not None and (norms.dtype != torch.float32 or not norms.is_contiguous()
                                  or tuple(norms.shape) != (table.n_rows, 3)
                                  or norms.device != table.device):
            raise ValueError(f"table.row_norms must be a contiguous float32 [{table.n_rows}, 3] "
                             f"tensor on {table.device}")
        if table.device.type == "cuda":
            with torch.cuda.device(table.device):
                launch(table)
        else:
            launch(table)


    def feature_reason(self, dtype: torch.dtype, state_dtype: torch.dtype,
                       modes: frozenset) -> str | None:
        """Every master mode and state_dtype pair of the optimizer runs here (issue #13)."""
        return None


BACKEND = TritonBackend()
