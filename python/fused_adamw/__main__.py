"""``python -m fused_adamw``: what a user or a bug report needs to know about this install."""

from __future__ import annotations

import platform
import sys

import torch

from . import _dispatch, _ext
from ._version import __version__


def _triton_version() -> str:
    try:
        import triton
    except ImportError as e:
        return f"not installed ({e})"
    return triton.__version__


def lines() -> list[str]:
    info = _ext.build_info()
    out = [
        f"fused_adamw {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton {_triton_version()}",
    ]
    if info["available"]:
        archs = ", ".join(f"sm_{a}" for a in info["cuda_archs"]) or "none"
        out += [
            f"_C {info['version']}: CUDA {'compiled in' if info['has_cuda'] else 'not compiled'}"
            f", archs {archs}, CPU loop {info['cpu_loop_isa']}",
            f"CUDA runtime linked in: {_fmt_cuda(info['cuda_runtime_version'])}, driver: "
            f"{_fmt_cuda(info['cuda_driver_version'])}",
        ]
    else:
        out.append(f"_C: not available: {info['reason']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        out.append("GPU: none visible to torch")
    for device, reasons in _dispatch.report().items():
        try:
            auto = _dispatch.choose("auto", torch.device(device), torch.float32).name
        except _dispatch.BackendUnavailableError as e:
            auto = f"none ({e})"
        out.append(f"{device}: auto picks {auto} for float32")
        for name, reason in reasons.items():
            out.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return out


def _fmt_cuda(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def main() -> None:
    print("\n".join(lines()))


if __name__ == "__main__":
    main()
