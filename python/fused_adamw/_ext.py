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
    else:
        # A build from other sources of the same version (an editable install not rebuilt
        # after a header change) would read the tables with another layout: refuse it.
        from . import _table

        layout = {"tile_elems": _table.TILE_ELEMS, "row_cols": _table.ROW_COLS,
                  "hparam_cols": _table.HPARAM_COLS}
        built = {k: getattr(C, k, None) for k in layout}
        if built != layout:
            REASON = (f"fused_adamw._C was built with table layout {built} but the Python "
                      f"package expects {layout}; rebuild it (pip install -e . / pip install .)")
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
        return ("fused_adamw._C was built without CUDA (no nvcc found at build time, or "
                "FUSED_ADAMW_NO_CUDA=1; `python -m fused_adamw` says which)")
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
# a table -> the integer arguments of _C.step_cpu / _C.step_cuda
# ------------------------------------------------------------------------------------------


def amp_args(table) -> dict:
    """The ``grad_scale``/``found_inf`` keywords of ``_C.step_cpu``/``_C.step_cuda``: addresses
    of the table's GradScaler scalars (float32, on its device) or 0."""
    scale, found = table.grad_scale, table.found_inf
    return {"grad_scale": 0 if scale is None else scale.data_ptr(),
            "found_inf": 0 if found is None else found.data_ptr()}


def table_args(table) -> tuple:
    """The 7 leading arguments of ``_C.step_cpu``/``_C.step_cuda`` for ``table``
    (a ``fused_adamw._table.Table``): rows, tile_starts and hparams addresses, n_rows, n_tiles,
    n_groups, dtype code.

    Raises ValueError naming what is wrong. The checks read metadata of the two small tables
    only (no device read, no sync); the rows' contents are trusted: ``_table`` builds them from
    validated tensors.
    """
    import torch

    from . import _table

    code = _table.DTYPE_CODES.get(table.dtype)
    if code is None:
        raise ValueError(f"table dtype is {table.dtype}; the compiled loops take float32, "
                         "bfloat16 and float16")
    packed, hparams = table.packed, table.hparams
    n_groups = len(table.host_hparams)
    if packed is None or packed.device != table.device or packed.dtype != torch.int64:
        raise ValueError("the packed table is missing or not an int64 tensor on the table's "
                         "device")
    if packed.numel() != table.n_rows * (_table.ROW_COLS + 1) + 1:
        raise ValueError(f"the packed table has {packed.numel()} entries for {table.n_rows} rows")
    if hparams is None or hparams.device != table.device or tuple(hparams.shape) != (
            n_groups, _table.HPARAM_COLS) or not hparams.is_contiguous():
        raise ValueError(f"hparams must be a contiguous [{n_groups}, {_table.HPARAM_COLS}] "
                         f"tensor on {table.device}")
    if hparams.dtype != torch.float32:
        raise ValueError(f"hparams has dtype {hparams.dtype}, expected float32")
    return (table.rows_ptr(), table.tile_starts_ptr(), hparams.data_ptr(), table.n_rows,
            table.n_tiles, n_groups, code)
