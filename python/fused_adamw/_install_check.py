"""One warning at import when a GPU is visible but the install cannot run the CUDA kernel.

setup.py's build warnings (nvcc not found, ``FUSED_ADAMW_NO_CUDA=1``, a failed compile) go to
the build log, which pip hides unless run with ``-v``; ``backend="auto"`` then falls back to
Triton or torch without a word. So at the first ``import fused_adamw`` this module warns once,
with a :class:`BuildWarning`, when torch sees a CUDA GPU but the compiled module ``_C`` is
missing or was built without CUDA, saying why and how to rebuild.

It asks the CUDA driver nothing beyond ``torch.cuda.is_available()``, and only when the build
itself lacks the kernel: whether an installed kernel runs on a given GPU (arch, driver
version) is a per-device query that would create a CUDA context on every GPU at import, so
that is left to ``python -m fused_adamw`` and to ``backend="cuda"``'s error. Set
``FUSED_ADAMW_NO_BUILD_WARNING=1`` to silence the warning.
"""

from __future__ import annotations

import os
import warnings

REBUILD = (
    "To build the CUDA kernel, install a CUDA toolkit (nvcc) and reinstall from source with "
    "CUDA_HOME set and neither FUSED_ADAMW_NO_EXT=1 nor FUSED_ADAMW_NO_CUDA=1: "
    "`pip install -v --no-build-isolation --no-deps --force-reinstall <fused_adamw source>` "
    "(in a checkout: `pip install -v --no-build-isolation -e .`); -v shows the build's "
    "warnings. `python -m fused_adamw` reports how the installed _C was built. "
    "FUSED_ADAMW_NO_BUILD_WARNING=1 silences this warning."
)

_warned = False


class BuildWarning(UserWarning):
    """The installed fused_adamw cannot run its CUDA kernel on the GPUs torch sees."""


def cuda_build_problem() -> str | None:
    """Why the installed build has no usable CUDA kernel for any GPU, or None when it has one
    (whether it runs on a particular GPU is not checked here: see the module docstring).

    Never queries the driver: a missing ``_C`` and a ``_C`` built without CUDA are known from
    the module itself.
    """
    from . import _ext

    reason = _ext.unavailable_reason()
    if reason is None and not getattr(_ext.C, "has_cuda", False):
        # _C is loaded but has no CUDA kernel: device 0's answer needs no driver call then.
        reason = _ext.cuda_unavailable_reason(0)
    if reason is None:
        return None
    why = _build_config_reason()
    return f"{reason} ({why})" if why else reason


def _build_config_reason() -> str | None:
    """What setup.py recorded about why CUDA was not built (fused_adamw._build_config)."""
    try:
        from ._build_config import BUILD_CONFIG  # type: ignore[import-not-found]
    except ImportError:
        return None
    if BUILD_CONFIG.get("ext") != "built":
        return f"build config: _C {BUILD_CONFIG.get('ext')}: {BUILD_CONFIG.get('ext_reason')}"
    if not BUILD_CONFIG.get("cuda"):
        return f"build config: CUDA not compiled in: {BUILD_CONFIG.get('cuda_reason')}"
    return None


def visible_cuda_gpus() -> int:
    """How many CUDA GPUs torch sees (0 for a CPU-only or ROCm torch, without asking)."""
    import torch

    if torch.version.cuda is None or getattr(torch.version, "hip", None):
        return 0  # a CPU-only torch sees no GPU; on ROCm the CUDA kernel is not expected
    if not torch.cuda.is_available():
        return 0
    return max(1, torch.cuda.device_count())


def message() -> str | None:
    """The warning's text, or None when there is nothing to warn about."""
    if os.environ.get("FUSED_ADAMW_NO_BUILD_WARNING") == "1":
        return None
    problem = cuda_build_problem()
    if problem is None:
        return None
    n = visible_cuda_gpus()
    if n == 0:
        return None
    return (f"fused_adamw: torch sees {n} CUDA GPU{'s' if n > 1 else ''}, but fused_adamw's "
            f"CUDA kernel cannot run: {problem}. backend='auto' uses the Triton kernel (or the "
            f"slower torch backend) there instead. {REBUILD}")


def warn_once() -> None:
    """Emits the warning the first time it is called in a process (at ``import fused_adamw``).

    Never raises: a failure of the check itself must not break the import.
    """
    global _warned
    if _warned:
        return
    _warned = True
    try:
        text = message()
    except Exception:  # noqa: BLE001 - the check is advice; the import must go on
        return
    if text is not None:
        warnings.warn(text, BuildWarning, stacklevel=2)
