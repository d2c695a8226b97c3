"""The CUDA kernel (kernels/adamw_kernel.cu) as a backend: one launch per bucket.

``fused_adamw._C`` takes raw pointers, the device index and the stream handle, so it links no
torch and works with any torch 2.x. Host cost per step: a few metadata checks, the current stream, one call.
"""

from __future__ import annotations

import torch

from .. import _ext, _table

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_ONES: dict = {}  # device -> a float32 1.0 there (clipped steps without a GradScaler)


def _scratch(table: _table.Table, name: str, need: int, device: torch.device) -> torch.Tensor:
    """``table.<name>``: float32 scratch of at least ``need`` elements on ``device`` that this
    launch writes on the current stream. Replaced when too small; the old buffer's memory is
    then reused only after the work of every stream that wrote it (the caching allocator
    knows only the stream it was allocated on: the NOTE on streams in _table.py)."""
    users = table.__dict__.setdefault(name + "_users", [])
    buf = getattr(table, name, None)
    if buf is None or buf.numel() < need or buf.device != device:
        _table.retire(buf, users)
        buf = torch.empty(max(need, 1), dtype=torch.float32, device=device)
        setattr(table, name, buf)
        users.clear()
    _table.used_on(users, _table.current_stream(device))
    return buf


class CudaBackend:
    name = "cuda"
    clips = True  # grad_norm_rows and table.clip_coef (fused_adamw._clip)
    # Issue #19: every table clips and tracks norms in the kernels. The plain kernels clip
    # under GradScaler (or a scale of 1.0, below) outside amsgrad; clipped amsgrad and
    # low-precision tables and any table with track_norms run the NORMS kernels
    # (kernels/adamw_kernel.cu adamw_norms_kernel, adamw_lowp_kernel<T, S, true>), bit for bit
    # the CPU loop's under tests/test_kernel_emulation.py.
    clips_amsgrad = True
    tracks_norms = True  # table.row_norms, from the step kernel's own partials

    def clips_table(self, table: _table.Table) -> bool:
        """Whether the kernels apply the clip coefficient to ``table``: every table (the NORMS
        kernels where the plain ones do not clip)."""
        return True

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"the CUDA kernel runs on CUDA tensors, not {device.type}"
        if dtype not in _DTYPES:
            return f"the CUDA kernel takes float32, bfloat16 and float16, not {dtype}"
        reason = _ext.unavailable_reason()
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _ext.cuda_unavailable_reason(index)

    def step(self, table: _table.Table) -> None:
        device = table.device
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' steps CUDA tables; this one is on {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        args = (*_ext.table_args(table), table.has_max, index)
        amp = _ext.amp_args(table)
        coef = getattr(table, "clip_coef", None)
        amp["clip_coef"] = 0 if coef is None else coef.data_ptr()
        if coef is not None and table.grad_scale is None:
            # The plain kernels clip in their SCALED form (NOTE on clipping in
            # kernels/adamw_kernel.cu): a scale of 1.0 on the device, for which they write no
            # grad back (the launcher takes the NORMS kernels where those do not clip).
            one = _ONES.get(device)
            if one is None:
                one = _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
            amp["grad_scale"] = one.data_ptr()
        # The moments' dtype, and whether a 16-bit table's groups may carry a master mode:
        # then the launcher runs the low-precision kernel, which reads each row's mode (the
        # hparams are on the device; their host copy says which kernel to launch).
        amp["state_dtype"] = _table.DTYPE_CODES[table.state_dtype]
        amp["master_modes"] = table.dtype != torch.float32 and any(
            row[_table.HP_MASTER_MODE] != 0 for row in table.host_hparams)
        norms = getattr(table, "row_norms", None)
        if norms is not None:  # track_norms: the kernel's per-thread partials, then rows
            need = table.n_tiles * 3 * 257  # 3 x (kNormLanes lanes + 1 partial) per tile
            scratch = _scratch(table, "norm_scratch", need, norms.device)
            amp["row_norms"] = norms.data_ptr()
            amp["norm_scratch"] = scratch.data_ptr()
        if torch.cuda.current_device() != index:
            # torch's guard: on exit it restores the previous device without creating a
            # context there (c10::cuda::MaybeExchangeDevice); the launcher's own guard then
            # finds the device current. The launch goes to that device's current stream.
            with torch.cuda.device(index):
                _ext.C.step_cuda(*args, torch.cuda.current_stream(index).cuda_stream, **amp)
        else:
            _ext.C.step_cuda(*args, torch.cuda.current_stream(index).cuda_stream, **amp)


    def grad_norm_rows(self, table: _table.Table) -> None:
        """The norm pass (fused_adamw._clip): ``table.clip_rows`` (float64 [n_rows + 1]),
        asynchronous on the current stream."""
        device = table.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        need = table.n_tiles * 257  # kNormLanes lanes + 1 partial per tile
        scratch = _scratch(table, "clip_scratch", need, device)
        args = _ext.table_args(table)
        scale = table.grad_scale
        with torch.cuda.device(index):
            _ext.C.grad_norm_cuda(args[0], args[1], table.n_rows, table.n_tiles, args[6],
                                  bool(table.norm_inf), 0 if scale is None else scale.data_ptr(),
                                  scratch.data_ptr(), table.clip_rows.data_ptr(), index,
                                  torch.cuda.current_stream(index).cuda_stream)

    def feature_reason(self, dtype: torch.dtype, state_dtype: torch.dtype,
                       modes: frozenset) -> str | None:
        """Every master mode and state_dtype pair of the optimizer runs here (issue #13): the
        low-precision kernels (kernels/adamw_kernel.cu adamw_lowp_kernel), proven bit for bit
        against the CPU loop by tests/test_kernel_emulation.py and spill-free by
        tests/test_sass.py, as the rest of the kernel."""
        return None


BACKEND = CudaBackend()
