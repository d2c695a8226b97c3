"""Loads the compiled module ``fused_adamw._C`` once, and says why when it cannot be used.

``_C`` has no torch inside (raw pointers in, see csrc/bindings.cpp), so any torch 2.x works
with it; what can go wrong is a missing build, a stale build from another version of the
package, or (for CUDA) a driver or GPU the build cannot run on. Every such case is a reason
string here, never an exception at import time: backends turn it into "unavailable".
"""

from __future__ import annotations

from types import ModuleType

from ._version import __version__

C: ModuleType | None = None
REASON: str | None = None  # why C is None

try:
    from . import _C as C  # type: ignore[attr-defined, no-redef]
except ImportError as e:
    C = None
    REASON = (f"the compiled module fused_adamw._C is not available ({e}); reinstall with a "
              "C++ compiler (and nvcc for CUDA), without FUSED_ADAMW_NO_EXT=1")
else:
    if getattr(C, "__version__", None) != __version__:
        REASON = (f"fused_adamw._C was built for version {getattr(C, '__version__', '?')} but "
                  f"the package is {__version__}; rebuild it (pip install -e . / pip install .)")
        C = None

_cuda_device_reasons: dict[int, str | None] = {}


def unavailable_reason() -> str | None:
    """None when ``_C`` is loaded and of this package's version, else why not."""
    return REASON


def cuda_unavailable_reason(device_index: int) -> str | None:
    """None when ``_C`` has the CUDA kernel and it can run on CUDA device ``device_index``.

    Asks the driver once per device (a missing kernel image for the device's arch, or a driver
    older than the CUDA runtime linked in, come back as the reason) and caches the answer.
    """
    if C is None:
        return REASON
    if not C.has_cuda:
        return "fused_adamw._C was built without CUDA (no nvcc found at build time)"
    if device_index not in _cuda_device_reasons:
        err = C.cuda_device_error(int(device_index))
        _cuda_device_reasons[device_index] = err or None
    return _cuda_device_reasons[device_index]


def build_info() -> dict:
    """What was compiled in: version, CUDA archs and runtime/driver versions, CPU loop ISA."""
    if C is None:
        return {"available": False, "reason": REASON}
    return {
        "available": True,
        "version": C.__version__,
        "has_cuda": C.has_cuda,
        "cuda_archs": list(C.cuda_archs),
        "cuda_runtime_version": C.cuda_runtime_version(),
        "cuda_driver_version": C.cuda_driver_version() if C.has_cuda else 0,
        "cpu_loop_isa": C.cpu_loop_isa,
    }


# ------------------------------------------------------------------------------------------
# tensors -> the integer arguments of _C.step_cpu / _C.step_cuda
# ------------------------------------------------------------------------------------------

DTYPE_CODES = {}  # torch dtype -> kernels/adamw_params.h DType; filled lazily (torch import)


def _dtype_codes() -> dict:
    if not DTYPE_CODES:
        import torch

        DTYPE_CODES.update({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2})
    return DTYPE_CODES


def bucket_args(bucket) -> tuple:
    """The 15 leading arguments of ``_C.step_cpu``/``_C.step_cuda`` for ``bucket``, after
    checking every buffer and table against ``kernels/adamw_params.h``.

    Raises ValueError naming the buffer and what is wrong. The checks read tensor metadata
    only (no device read, no sync), at a cost independent of the number of params; the result
    is cached on the bucket and reused while the buffers (identity and data pointer) stay the
    same. The contents of ``tiles`` and ``param_group`` are trusted: ``_flat.build_bucket``
    writes them.
    """
    from . import _flat

    bufs = (bucket.param, bucket.grad, bucket.exp_avg, bucket.exp_avg_sq, bucket.max_exp_avg_sq,
            bucket.tiles, bucket.param_group, bucket.steps, bucket.active, bucket.hparams)
    uses_amsgrad = any(row[_flat.HP_AMSGRAD] for row in bucket.host_hparams)
    key = (uses_amsgrad,) + tuple((id(t), t.data_ptr()) if t is not None else None
                                  for t in bufs)
    cached = bucket.ext_args
    if cached is not None and cached[0] == key:
        return cached[1]
    args = _validate(bucket, uses_amsgrad)
    bucket.ext_args = (key, args)
    return args


def _validate(bucket, uses_amsgrad: bool) -> tuple:
    import torch

    from . import _flat

    codes = _dtype_codes()
    device, dtype = bucket.device, bucket.dtype
    if dtype not in codes:
        raise ValueError(f"bucket.dtype is {dtype}; the compiled loops take float32, bfloat16 "
                         "and float16")
    n_params = bucket.n_params

    def check(name, t, want_dtype, shape=None, aligned=False):
        if t is None:
            raise ValueError(f"bucket.{name} is None")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"bucket.{name} is a {type(t).__name__}, not a Tensor")
        if t.device != device:
            raise ValueError(f"bucket.{name} is on {t.device}, the bucket on {device}")
        if t.dtype != want_dtype:
            raise ValueError(f"bucket.{name} has dtype {t.dtype}, expected {want_dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"bucket.{name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_contiguous():
            raise ValueError(f"bucket.{name} is not contiguous")
        if aligned and t.data_ptr() % 16 != 0:
            raise ValueError(f"bucket.{name} is not 16-byte aligned (data_ptr "
                             f"{t.data_ptr():#x}); the loops use 16-byte vectors")

    # ---------------------------------- the flat buffers ----------------------------------
    numel = bucket.numel
    for name in ("param", "grad", "exp_avg", "exp_avg_sq"):
        check(name, getattr(bucket, name), dtype, (numel,), aligned=True)
    if uses_amsgrad:
        if bucket.max_exp_avg_sq is None:
            raise ValueError("bucket.max_exp_avg_sq is None but a param group uses amsgrad")
        check("max_exp_avg_sq", bucket.max_exp_avg_sq, dtype, (numel,), aligned=True)
    # ------------------------------------- the tables -------------------------------------
    tiles = bucket.tiles
    check("tiles", tiles, torch.int64)
    if tiles.dim() != 2 or tiles.shape[1] != 3:
        raise ValueError(f"bucket.tiles has shape {tuple(tiles.shape)}, expected (n_tiles, 3)")
    check("param_group", bucket.param_group, torch.int32, (n_params,))
    check("steps", bucket.steps, torch.float32, (n_params,))
    check("active", bucket.active, torch.uint8, (n_params,))
    hparams = bucket.hparams
    check("hparams", hparams, torch.float32)
    n_groups = len(bucket.host_hparams)
    if tuple(hparams.shape) != (n_groups, _flat.HPARAM_COLS):
        raise ValueError(f"bucket.hparams has shape {tuple(hparams.shape)}, expected "
                         f"({n_groups}, {_flat.HPARAM_COLS}) (one row per param group)")
    # The kernel never touches max_exp_avg_sq for a group without amsgrad; without any such
    # group it gets no pointer at all.
    max_ptr = bucket.max_exp_avg_sq.data_ptr() if uses_amsgrad else 0
    return (bucket.param.data_ptr(), bucket.grad.data_ptr(), bucket.exp_avg.data_ptr(),
            bucket.exp_avg_sq.data_ptr(), max_ptr, tiles.data_ptr(),
            bucket.param_group.data_ptr(), bucket.steps.data_ptr(), bucket.active.data_ptr(),
            hparams.data_ptr(), numel, tiles.shape[0], n_params, n_groups, codes[dtype])
