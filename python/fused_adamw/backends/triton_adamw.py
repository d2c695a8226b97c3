"""The Triton backend: one launch per bucket of :func:`adamw_kernel`, a grid over tiles.

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
``tl.div_rn``, which is not contracted. Keep it that way when editing (or launch with
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

from .. import _flat

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Read once, at import, like triton.jit itself: it decides there whether kernels are compiled
# or interpreted, so flipping the variable later cannot change how this kernel runs.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------
# The per-element math: kernels/adamw_math.cuh, line for line.
# ------------------------------------------------------------------------------------------


@triton.jit
def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, LIBDEVICE_POW: tl.constexpr):
    """Mirror of ``adamw_scalars`` in adamw_math.cuh (maximize and amsgrad pass through)."""
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
    return lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt


@triton.jit
def adamw_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                 lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
                 maximize, amsgrad):
    """Mirror of ``adamw_update`` in adamw_math.cuh on fp32 blocks; returns the new
    (param, exp_avg, exp_avg_sq, max_exp_avg_sq). ``max_exp_avg_sq`` is meaningful only when
    ``amsgrad``."""
    if maximize:
        grad = -grad
    if weight_decay != 0.0:
        param = tl.fma(-(lr * weight_decay), param, param)  # p - (lr*wd)*p
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


def _configs() -> list:
    """Autotuning candidates; a single one under the interpreter, where timing means nothing
    and every extra config would be a full interpreted run."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_SIZE": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK_SIZE": block}, num_warps=warps)
        for block in (1024, 2048, 4096)
        for warps in (4, 8)
    ]


# NOTE on autotuning: the key is AMSGRAD_BUFFER plus, added by triton.autotune itself, the
# dtype of every tensor argument; never a size, so it tunes once per (dtype, amsgrad) and the
# choice is cached for the process. Benchmarking runs the kernel many times on its arguments,
# which would apply the update many times, so the kernel is never tuned on a user's buffers:
# TritonBackend.step() first launches it on a zero-filled scratch bucket of the same dtypes
# (zeros are a fixed point of the update, see _flat.py), which also keeps the autotuner from
# cloning multi-GB buffers for restore_value.
@triton.autotune(configs=_configs(), key=["AMSGRAD_BUFFER"])
@triton.jit
def adamw_kernel(
    param_ptr,  # *dtype [numel]: params, updated in place
    grad_ptr,  # *dtype [numel]: this step's grads
    exp_avg_ptr,  # *dtype [numel]: first moments, updated in place
    exp_avg_sq_ptr,  # *dtype [numel]: second moments, updated in place
    max_exp_avg_sq_ptr,  # *dtype [numel]: amsgrad maxima (any valid pointer if not AMSGRAD_BUFFER)
    tiles_ptr,  # *int64 [n_tiles, 3]: {start, end, param_index}
    param_group_ptr,  # *int32 [n_params]: each param's row of hparams
    steps_ptr,  # *fp32 [n_params]: each param's step, already advanced
    active_ptr,  # *uint8 [n_params]: 0 = leave this param untouched
    hparams_ptr,  # *fp32 [n_groups, HPARAM_COLS]: lr, beta1, beta2, eps, wd, maximize, amsgrad
    n_tiles,  # number of tiles (= the grid)
    AMSGRAD_BUFFER: tl.constexpr,  # whether max_exp_avg_sq_ptr is a real buffer
    HPARAM_COLS: tl.constexpr,  # row stride of hparams (_flat.HPARAM_COLS)
    VEC: tl.constexpr,  # elements per 16 bytes: tile bounds are multiples of it
    LIBDEVICE_POW: tl.constexpr,  # libdevice powf (GPU) or float64 exp2/log2 (interpreter)
    BF16_BY_HAND: tl.constexpr,  # round fp32 -> bf16 with integer ops (interpreter, see to_storage)
    BLOCK_SIZE: tl.constexpr,  # elements per iteration of the tile loop (autotuned)
):
    # ---------------------------------------------------------------- map program id to tile
    tile = tl.program_id(0).to(tl.int64)
    if tile >= n_tiles:
        return
    start = tl.multiple_of(tl.load(tiles_ptr + tile * 3 + 0), VEC)
    end = tl.multiple_of(tl.load(tiles_ptr + tile * 3 + 1), VEC)
    param_index = tl.load(tiles_ptr + tile * 3 + 2)
    if tl.load(active_ptr + param_index) == 0:
        return

    # ---------------------------------------------------------------- load this param's scalars
    row = hparams_ptr + tl.load(param_group_ptr + param_index).to(tl.int64) * HPARAM_COLS
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt = adamw_scalars(
        tl.load(row + 0).to(tl.float32),  # _flat.HP_LR
        tl.load(row + 1).to(tl.float32),  # _flat.HP_BETA1
        tl.load(row + 2).to(tl.float32),  # _flat.HP_BETA2
        tl.load(row + 3).to(tl.float32),  # _flat.HP_EPS
        tl.load(row + 4).to(tl.float32),  # _flat.HP_WEIGHT_DECAY
        tl.load(steps_ptr + param_index).to(tl.float32),
        LIBDEVICE_POW,
    )
    maximize = tl.load(row + 5) != 0.0  # _flat.HP_MAXIMIZE
    if AMSGRAD_BUFFER:
        amsgrad = tl.load(row + 6) != 0.0  # _flat.HP_AMSGRAD
        # The max buffer is read and written only for the params of amsgrad groups: masked off
        # (no memory traffic) elsewhere. NOTE on the integer bound: `mask & amsgrad` with a
        # scalar bool fails in the interpreter of triton 3.9 (numpy bitwise_and on int1).
        amsgrad_end = tl.where(amsgrad, end, start)
    else:
        amsgrad = False

    # ---------------------------------------------------------------- loop over the tile
    for block_start in tl.range(start, end, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < end
        # ------------------------------------------------------------ load, storage dtype -> fp32
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        if AMSGRAD_BUFFER:
            amsgrad_mask = offsets < amsgrad_end
            max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=amsgrad_mask,
                                     other=0.0).to(tl.float32)
        else:
            max_exp_avg_sq = exp_avg_sq  # unused: amsgrad is the constant False

        # ------------------------------------------------------------ compute in fp32
        param, exp_avg, exp_avg_sq, max_exp_avg_sq = adamw_update(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
            lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
            maximize, amsgrad,
        )

        # ------------------------------------------------------------ store, fp32 -> storage dtype
        tl.store(param_ptr + offsets, to_storage(param, param_ptr, BF16_BY_HAND), mask=mask)
        tl.store(exp_avg_ptr + offsets, to_storage(exp_avg, exp_avg_ptr, BF16_BY_HAND), mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, to_storage(exp_avg_sq, exp_avg_sq_ptr, BF16_BY_HAND),
                 mask=mask)
        if AMSGRAD_BUFFER:
            tl.store(max_exp_avg_sq_ptr + offsets,
                     to_storage(max_exp_avg_sq, max_exp_avg_sq_ptr, BF16_BY_HAND),
                     mask=amsgrad_mask)


# ------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------

_SCRATCH_TILES = 512  # 8M elements: well past L2 on current GPUs, so tuning sees DRAM speed


def launch(bucket: _flat.FlatBucket) -> None:
    """One launch of :func:`adamw_kernel` over every tile of ``bucket``; no host sync."""
    n_tiles = bucket.tiles.shape[0]
    if n_tiles == 0:
        return
    amsgrad_buffer = bucket.max_exp_avg_sq is not None
    adamw_kernel[(n_tiles,)](
        bucket.param,
        bucket.grad,
        bucket.exp_avg,
        bucket.exp_avg_sq,
        bucket.max_exp_avg_sq if amsgrad_buffer else bucket.exp_avg_sq,
        bucket.tiles,
        bucket.param_group,
        bucket.steps,
        bucket.active,
        bucket.hparams,
        n_tiles,
        AMSGRAD_BUFFER=amsgrad_buffer,
        HPARAM_COLS=_flat.HPARAM_COLS,
        VEC=_flat.ALIGN_BYTES // bucket.param.element_size(),
        LIBDEVICE_POW=not _INTERPRET,
        BF16_BY_HAND=_INTERPRET and bucket.dtype == torch.bfloat16,
    )


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        self._tuned: set[tuple] = set()

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

    def step(self, bucket: _flat.FlatBucket) -> None:
        # Validation: a handful of attribute reads, independent of n_params and numel.
        if bucket.grad is None:
            raise ValueError("bucket.grad is None: call bucket.ensure_grad() and fill it first")
        if bucket.hparams is None or bucket.hparams.dtype != torch.float32:
            raise ValueError("bucket.hparams must be a float32 [n_groups, HPARAM_COLS] tensor")
        if bucket.hparams.device != bucket.device:
            raise ValueError(f"bucket.hparams is on {bucket.hparams.device}, the bucket on "
                             f"{bucket.device}")
        if bucket.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"bucket.dtype is {bucket.dtype}; the Triton kernel takes "
                             "float32, bfloat16 or float16")
        self._ensure_tuned(bucket)
        launch(bucket)

    def _ensure_tuned(self, bucket: _flat.FlatBucket) -> None:
        """Runs the autotuner for this bucket's key on a zero scratch bucket (once per key)."""
        if _INTERPRET:
            return  # a single config: nothing is benchmarked
        amsgrad_buffer = bucket.max_exp_avg_sq is not None
        key = (bucket.device, bucket.dtype, amsgrad_buffer)
        if key in self._tuned:
            return
        launch(_scratch_bucket(bucket.device, bucket.dtype, amsgrad_buffer))
        self._tuned.add(key)


def _scratch_bucket(device: torch.device, dtype: torch.dtype, amsgrad: bool):
    """A zero-filled bucket with the dtypes of a real one: one param, _SCRATCH_TILES tiles."""
    numel = _SCRATCH_TILES * _flat.TILE_ELEMS

    def zeros():
        return torch.zeros(numel, dtype=dtype, device=device)

    starts = torch.arange(0, numel, _flat.TILE_ELEMS, dtype=torch.int64)
    tiles = torch.stack([starts, starts + _flat.TILE_ELEMS, torch.zeros_like(starts)], dim=1)
    row = [0.0] * _flat.HPARAM_COLS
    row[_flat.HP_LR], row[_flat.HP_BETA1], row[_flat.HP_BETA2] = 1e-3, 0.9, 0.999
    row[_flat.HP_EPS], row[_flat.HP_AMSGRAD] = 1e-8, float(amsgrad)
    scratch = _flat.FlatBucket(
        device=device, dtype=dtype, params=[], groups=[0], segments=[], numel=numel,
        param=zeros(), exp_avg=zeros(), exp_avg_sq=zeros(),
        max_exp_avg_sq=zeros() if amsgrad else None,
        tiles=tiles.to(device),
        param_group=torch.zeros(1, dtype=torch.int32, device=device),
        steps=torch.ones(1, dtype=torch.float32, device=device),
        active=torch.ones(1, dtype=torch.uint8, device=device),
        grad=zeros(),
        hparams=torch.tensor([row], dtype=torch.float32, device=device),
    )
    return scratch


BACKEND = TritonBackend()
