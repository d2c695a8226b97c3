"""The one place that probes hardware and imports optional backends.

``backend="auto"`` walks :data:`AUTO_ORDER` for the device type and takes the first backend
that can run, quietly. A backend asked for by name that cannot run raises
:class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Fastest first. "cpu" is the C++ loop over kernels/adamw_math.cuh; it leads on CPU only if
# it beats the torch backend (see backends/cpu.py for the measurement).
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
_DEFAULT_ORDER = ("torch",)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


# Backend name -> module under fused_adamw.backends.
_MODULES = {"cuda": "cuda", "triton": "triton_adamw", "cpu": "cpu", "torch": "torch"}

_loaded: dict[str, Any] = {}
_import_errors: dict[str, str] = {}


def _load(name: str):
    """The backend module's BACKEND object, or None (with the reason kept) when it won't import."""
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = importlib.import_module(f"fused_adamw.backends.{_MODULES[name]}").BACKEND
        except ImportError as e:
            _import_errors[name] = f"it could not be imported ({e})"
    return _loaded.get(name)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` can step (device, dtype) here, else why not."""
    backend = _load(name)
    if backend is None:
        return _import_errors[name]
    return backend.unavailable_reason(device, dtype)


def check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def feature_reason(name: str, dtype: torch.dtype, state_dtype: torch.dtype | None,
                   modes) -> str | None:
    """None when backend ``name`` computes params of ``dtype`` with moments of ``state_dtype``
    (None: dtype) under master modes ``modes`` (issue #13), else why not."""
    backend = _load(name)
    state_dtype = dtype if state_dtype is None else state_dtype
    modes = frozenset(m for m in modes if m is not None)
    if backend is None or (not modes and state_dtype == dtype):
        return None
    fn = getattr(backend, "feature_reason", None)
    return None if fn is None else fn(dtype, state_dtype, modes)


def choose(name: str, device: torch.device, dtype: torch.dtype,
           state_dtype: torch.dtype | None = None, modes=()):
    """The backend object that will step a bucket of (device, dtype), with moments of
    ``state_dtype`` and params under the master modes ``modes`` (16-bit params only)."""
    if name == "auto":
        why = []
        for candidate in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
            reason = unavailable_reason(candidate, device, dtype)
            if (reason is None and candidate == "triton" and device.type != "cpu"
                    and (any(m is not None for m in modes)
                         or state_dtype not in (None, dtype))):
                # NOTE on never wrong: the Triton kernel's low-precision paths match the CPU
                # loop bit for bit in the interpreter but have never been compiled for or run
                # on a GPU; auto skips them until they have been (backend="triton" runs
                # them). The CUDA kernel, first in the order, does take these tables: its
                # low-precision kernel carries the same evidence as its plain ones (compiled
                # source run bit for bit against the CPU loop under emulation, SASS checked),
                # so auto goes cuda, then torch.
                reason = "its low-precision paths are not yet validated on a GPU"
            if reason is None:
                reason = feature_reason(candidate, dtype, state_dtype, modes)
                if reason is None:
                    return _loaded[candidate]
                why.append(f"{candidate}: {reason}")
                continue
            if candidate == "cuda" and device.type == "cuda":
                _warn_cuda_kernel_missing(device, reason)
        raise BackendUnavailableError(f"no backend can run on {device} with {dtype}"
                                      + (f" ({'; '.join(why)})" if why else ""))
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f'backend="{name}" cannot run on {device} with {dtype}: {reason}'
        )
    reason = feature_reason(name, dtype, state_dtype, modes)
    if reason is not None:
        raise BackendUnavailableError(f'backend="{name}" on {device}: {reason}')
    return _loaded[name]


_warned_devices: set = set()


def _warn_cuda_kernel_missing(device: torch.device, reason: str) -> None:
    """Once per GPU, at the first optimizer that uses it: auto falls back quietly, but a user
    with a GPU should learn that the CUDA kernel cannot run there (a build for other archs, an
    old driver, no CUDA in the build). The import-time check (``_install_check``) covers
    builds without CUDA without touching any GPU; this one runs where a context exists."""
    if "dtype" in reason or os.environ.get("FUSED_ADAMW_NO_BUILD_WARNING") == "1":
        return  # a dtype the kernel never takes (float64): nothing is missing
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key in _warned_devices:
        return
    _warned_devices.add(key)
    from ._install_check import REBUILD, BuildWarning

    warnings.warn(f"fused_adamw: the CUDA kernel cannot run on cuda:{key} ({reason}); "
                  f"backend='auto' uses the next backend instead. {REBUILD}", BuildWarning,
                  stacklevel=4)


def report() -> dict[str, dict[str, str | None]]:
    """For each device type present, each backend's unavailable reason (None = available)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(torch.device("mps"))
    return {
        str(d): {n: unavailable_reason(n, d, torch.float32) for n in BACKENDS if n != "auto"}
        for d in devices
    }
