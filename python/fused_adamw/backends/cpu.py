"""The C++ CPU loop (csrc/cpu_adamw.cpp over kernels/adamw_math.cuh) as a backend.

One call into ``fused_adamw._C`` per bucket: tiles spread over ``torch.get_num_threads()``
threads, the element loop vectorized (AVX-512, AVX2+FMA or baseline, chosen at run time).
It computes in float32, so it takes float32, bfloat16 and float16 buckets; float64 stays on the
torch backend. Measurements against torch's fused CPU AdamW: kernels/NOTES.md.
"""

from __future__ import annotations

import torch

from .. import _ext, _table

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"the C++ loop runs on CPU tensors, not {device.type}"
        if dtype == torch.float64:
            return "the C++ loop computes in float32; float64 uses the torch backend"
        if dtype not in _DTYPES:
            return f"the C++ loop takes float32, bfloat16 and float16, not {dtype}"
        return _ext.unavailable_reason()

    clips = True  # grad_norm_rows and table.clip_coef (fused_adamw._clip)
    tracks_norms = True  # table.row_norms

    def step(self, table: _table.Table) -> None:
        if table.device.type != "cpu":
            raise ValueError(f"backend 'cpu' steps CPU tables; this one is on {table.device}")
        coef = getattr(table, "clip_coef", None)
        norms = getattr(table, "row_norms", None)
        _ext.C.step_cpu(*_ext.table_args(table), torch.get_num_threads(),
                        _table.DTYPE_CODES[table.state_dtype], **_ext.amp_args(table),
                        clip_coef=0 if coef is None else coef.data_ptr(),
                        row_norms=0 if norms is None else norms.data_ptr())

    def grad_norm_rows(self, table: _table.Table) -> None:
        """The norm pass (fused_adamw._clip): ``table.clip_rows`` (float64 [n_rows + 1])."""
        out = table.clip_rows
        if out.dtype != torch.float64 or out.numel() != table.n_rows + 1 or not out.is_contiguous():
            raise ValueError(f"table.clip_rows must be a contiguous float64 [{table.n_rows + 1}]")
        args = _ext.table_args(table)
        scale = table.grad_scale
        _ext.C.grad_norm_cpu(args[0], args[1], table.n_rows, table.n_tiles, args[6],
                             torch.get_num_threads(), bool(table.norm_inf),
                             0 if scale is None else scale.data_ptr(), out.data_ptr())

    def feature_reason(self, dtype: torch.dtype, state_dtype: torch.dtype,
                       modes: frozenset) -> str | None:
        """Every master mode and state_dtype pair of the optimizer runs here."""
        return None


BACKEND = CpuBackend()
