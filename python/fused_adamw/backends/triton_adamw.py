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


# NOTE on configuration: one fixed config, no autotuning. The kernel updates the user's tensors
# in place, so benchmarking configs on them would apply the update many times, and a table of
# scratch rows per dtype is not worth it for the backend that stands in when the CUDA kernel
# cannot run. BLOCK_SIZE divides the tile (16384 elements): 16 iterations per tile.
_BLOCK_SIZE = 1024
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


@triton.jit
def adamw_kernel(
    rows_ptr,  # *int64 [n_rows, ROW_COLS]: addresses of param, grad, exp_avg, exp_avg_sq, max, step; numel; group
    tile_starts_ptr,  # *int64 [n_rows + 1]: the first tile of each row
    hparams_ptr,  # *fp32 [n_groups, HPARAM_COLS]: lr, beta1, beta2, eps, wd, maximize, amsgrad,
    #               decay mode, max_lr
    n_rows,  # rows in the table
    grad_scale_ptr,  # *fp32 GradScaler's scale (grads divided by it and written back), or None
    found_inf_ptr,  # *fp32 GradScaler's found_inf (!= 0: nothing is written), or None
    DTYPE: tl.constexpr,  # the storage element type of every row (tl.float32, bfloat16, float16)
    ELEM_BYTES: tl.constexpr,  # its size
    HAS_MAX: tl.constexpr,  # some row uses amsgrad
    ROW_COLS: tl.constexpr,  # _table.ROW_COLS
    HPARAM_COLS: tl.constexpr,  # _table.HPARAM_COLS
    TILE_ELEMS: tl.constexpr,  # _table.TILE_ELEMS
    LIBDEVICE_POW: tl.constexpr,  # libdevice powf (GPU) or float64 exp2/log2 (interpreter)
    BF16_BY_HAND: tl.constexpr,  # round fp32 -> bf16 with integer ops (interpreter, see to_storage)
    BLOCK_SIZE: tl.constexpr,  # elements per iteration of the tile loop
):
    # ---------------------------------------------------------------- map program id to tile
    tile = tl.program_id(0).to(tl.int64)
    r = row_of_tile(tile_starts_ptr, n_rows, tile)
    row = rows_ptr + r * ROW_COLS
    param_addr = tl.load(row + 0)  # _table.ROW_PARAM
    phase = (param_addr % 16) // ELEM_BYTES
    numel = tl.load(row + 6)  # _table.ROW_NUMEL
    j = tile - tl.load(tile_starts_ptr + r)
    begin = tl.maximum(j * TILE_ELEMS, phase) - phase  # element indices [begin, end)
    end = tl.minimum((j + 1) * TILE_ELEMS, phase + numel) - phase
    if found_inf_ptr is not None:  # adamw_step_skipped: an empty range writes nothing
        end = tl.where(tl.load(found_inf_ptr) != 0.0, begin, end)
    if grad_scale_ptr is not None:
        grad_scale = tl.load(grad_scale_ptr)
    param_ptr = param_addr.to(tl.pointer_type(DTYPE))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))  # _table.ROW_GRAD
    exp_avg_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))  # _table.ROW_EXP_AVG
    exp_avg_sq_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))  # _table.ROW_EXP_AVG_SQ
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))  # _table.ROW_STEP

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
        tl.load(step_ptr),
        tl.load(hp + 7) != 0.0,  # _table.HP_DECAY_MODE
        LIBDEVICE_POW,
    )
    maximize = tl.load(hp + 5) != 0.0  # _table.HP_MAXIMIZE
    if HAS_MAX:
        max_addr = tl.load(row + 4)  # _table.ROW_MAX_EXP_AVG_SQ, 0 without amsgrad
        amsgrad = (tl.load(hp + 6) != 0.0) & (max_addr != 0)  # _table.HP_AMSGRAD
        # The max buffer is read and written only for amsgrad rows: masked off (no memory
        # traffic, and the param's address stands in for a null one) elsewhere. NOTE on the
        # integer bound: `mask & amsgrad` with a scalar bool fails in the interpreter of
        # triton 3.9 (numpy bitwise_and on int1).
        max_exp_avg_sq_ptr = tl.where(amsgrad, max_addr, param_addr).to(tl.pointer_type(DTYPE))
        amsgrad_end = tl.where(amsgrad, end, begin)
    else:
        amsgrad = False

    # ---------------------------------------------------------------- loop over the tile
    for block_start in tl.range(begin, end, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < end
        # ------------------------------------------------------------ load, storage dtype -> fp32
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_MAX:
            amsgrad_mask = offsets < amsgrad_end
            max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=amsgrad_mask,
                                     other=0.0).to(tl.float32)
        else:
            max_exp_avg_sq = exp_avg_sq  # unused: amsgrad is the constant False

        # ------------------------------------------------------------ compute in fp32
        if grad_scale_ptr is not None:  # adamw_unscale, written back to the grad
            grad = adamw_unscale(grad, grad_scale)
            tl.store(grad_ptr + offsets, to_storage(grad, grad_ptr, BF16_BY_HAND), mask=mask)
        param, exp_avg, exp_avg_sq, max_exp_avg_sq = adamw_update(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
            lr, beta1, beta2, eps, weight_decay, decay, bias_correction1, bias_correction2_sqrt,
            maximize, amsgrad, l2,
        )

        # ------------------------------------------------------------ store, fp32 -> storage dtype
        tl.store(param_ptr + offsets, to_storage(param, param_ptr, BF16_BY_HAND), mask=mask)
        tl.store(exp_avg_ptr + offsets, to_storage(exp_avg, exp_avg_ptr, BF16_BY_HAND), mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, to_storage(exp_avg_sq, exp_avg_sq_ptr, BF16_BY_HAND),
                 mask=mask)
        if HAS_MAX:
            tl.store(max_exp_avg_sq_ptr + offsets,
                     to_storage(max_exp_avg_sq, max_exp_avg_sq_ptr, BF16_BY_HAND),
                     mask=amsgrad_mask)


@triton.jit
def adamw_steps_kernel(
    rows_ptr,  # *int64 [n_rows, ROW_COLS]
    n_rows,  # rows in the table
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


# ------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_STEPS_BLOCK = 256


def variant(table: _table.Table) -> tuple:
    """What Triton compiles a separate kernel for (its constexprs and None arguments)."""
    return (table.device, table.dtype, table.has_max, table.grad_scale is None,
            table.found_inf is None)


# Variants launched at least once in this process: a CUDA-graph capture of a step whose kernel
# Triton has not compiled yet is refused (compiling under capture is not capturable work).
_launched: set = set()


def launch(table: _table.Table) -> None:
    """The two launches over ``table`` (step counts, then the update); no host sync."""
    if table.n_rows == 0:
        return
    _launched.add(variant(table))
    packed = table.packed
    rows = packed[: table.n_rows * _table.ROW_COLS]
    tile_starts = packed[table.n_rows * _table.ROW_COLS:]
    adamw_steps_kernel[(triton.cdiv(table.n_rows, _STEPS_BLOCK),)](
        rows, table.n_rows, table.found_inf, ROW_COLS=_table.ROW_COLS, BLOCK_SIZE=_STEPS_BLOCK)
    if table.n_tiles == 0:
        return
    adamw_kernel[(table.n_tiles,)](
        rows, tile_starts, table.hparams, table.n_rows, table.grad_scale, table.found_inf,
        DTYPE=_TL_DTYPES[table.dtype],
        ELEM_BYTES=table.itemsize,
        HAS_MAX=table.has_max,
        ROW_COLS=_table.ROW_COLS,
        HPARAM_COLS=_table.HPARAM_COLS,
        TILE_ELEMS=_table.TILE_ELEMS,
        LIBDEVICE_POW=not _INTERPRET,
        BF16_BY_HAND=_INTERPRET and table.dtype == torch.bfloat16,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )


class TritonBackend:
    name = "triton"

    def capture_problem(self, table: _table.Table) -> str | None:
        """Why a step of ``table`` cannot be captured into a CUDA graph now, or None."""
        if table.n_rows and variant(table) not in _launched:
            return ("the Triton kernel for this table (dtype, amsgrad, GradScaler use) has not "
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
        if table.device.type == "cuda":
            with torch.cuda.device(table.device):
                launch(table)
        else:
            launch(table)


    def feature_reason(self, dtype: torch.dtype, state_dtype: torch.dtype,
                       modes: frozenset) -> str | None:
        """Low-precision features the Triton kernel does not have yet (issue #13): refused by name,
        never computed as something else."""
        if modes:
            return (f"the Triton kernel does not support master_weights="
                    f"{', '.join(map(repr, sorted(modes)))} yet (backends 'cpu' and 'torch' do)")
        if state_dtype != dtype:
            return (f"the Triton kernel does not support state_dtype={state_dtype} with {dtype} params "
                    "yet (backends 'cpu' and 'torch' do)")
        return None

BACKEND = TritonBackend()
