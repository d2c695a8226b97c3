"""``python -m fused_adamw``: what a user or a bug report needs to know about this install.

    python -m fused_adamw           # the report, as text: paste it into a bug report
    python -m fused_adamw --json    # the same facts as one JSON object

The report: fused_adamw's version, where it is installed and how (editable or not), the OS,
CPU and thread counts, Python, torch, Triton, the compiled module ``_C`` and how it was built
(compiler, nvcc, archs, flags: recorded by setup.py), the GPUs torch sees, every
``FUSED_ADAMW_*`` and ``TRITON_INTERPRET`` variable that is set, and per device which backend
``backend="auto"`` picks for each dtype and why each other backend cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from . import _dispatch, _ext
from ._version import __version__

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = tuple(n for n in _dispatch.BACKENDS if n != "auto")
NO_BUILD_CONFIG = "unknown (built before build config was recorded)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _triton_version() -> str:
    try:
        import triton
    except ImportError as e:
        return f"not installed ({e})"
    except Exception as e:  # noqa: BLE001 - a broken triton install is worth reporting
        return f"cannot be imported ({type(e).__name__}: {e})"
    return triton.__version__


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def install_info() -> dict[str, Any]:
    """How fused_adamw is installed: editable or not, from where, and where it is imported from.

    Reads the distribution's metadata (``direct_url.json``, PEP 610): an editable install has
    ``dir_info.editable``; a wheel or sdist installed from a file or folder has its URL; one
    from an index has no ``direct_url.json``.
    """
    package = Path(__file__).resolve().parent
    info: dict[str, Any] = {"package_path": str(package), "kind": "unknown", "url": None,
                            "dist_path": None}
    try:
        from importlib import metadata

        dist = metadata.distribution("fused-adamw")
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or broken metadata
        info["kind"] = "not installed (imported from a source tree on sys.path)"
        return info
    info["dist_path"] = str(getattr(dist, "_path", "")) or None
    direct = None
    try:
        text = dist.read_text("direct_url.json")
        direct = json.loads(text) if text else None
    except (OSError, ValueError):
        direct = None
    if direct is None:
        info["kind"] = "installed from a package index (wheel or sdist)"
    elif direct.get("dir_info", {}).get("editable"):
        info["kind"] = "editable (pip install -e)"
        info["url"] = direct.get("url")
    elif "archive_info" in direct:
        info["kind"] = "installed from a file (wheel or sdist)"
        info["url"] = direct.get("url")
    else:
        info["kind"] = "installed from a local folder or VCS URL (not editable)"
        info["url"] = direct.get("url")
    located = Path(str(dist.locate_file("fused_adamw"))).resolve()
    if info["kind"].startswith("editable"):
        pass  # the files stay in the source tree the URL names
    elif located != package:
        info["kind"] += (f"; but this import comes from {package}, not from the installed "
                         f"copy at {located}")
    return info


def build_config() -> dict[str, Any] | None:
    """The build config setup.py wrote next to ``_C`` (fused_adamw._build_config), or None."""
    try:
        module = importlib.import_module("fused_adamw._build_config")
    except ImportError:
        return None
    config = getattr(module, "BUILD_CONFIG", None)
    return dict(config) if isinstance(config, dict) else None


def environment_variables() -> dict[str, str]:
    """Every FUSED_ADAMW_* variable and TRITON_INTERPRET that is set."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("FUSED_ADAMW_") or k == "TRITON_INTERPRET"}


def _probe(fn, *args) -> Any:
    """fn(*args), or the error as a string: the report must never fail."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"


def backend_choices() -> dict[str, dict[str, Any]]:
    """Per device present: the backend "auto" picks per dtype, and each backend's reason it
    cannot run per dtype (None: it can)."""
    out: dict[str, dict[str, Any]] = {}
    devices = _probe(_dispatch.report)
    if isinstance(devices, str):
        return {"error": {"auto": devices, "backends": {}}}
    for device in devices:
        dev = torch.device(device)
        auto: dict[str, str] = {}
        reasons: dict[str, dict[str, str | None]] = {name: {} for name in BACKENDS}
        for dtype in DTYPES:
            try:
                auto[_dtype_name(dtype)] = _dispatch.choose("auto", dev, dtype).name
            except _dispatch.BackendUnavailableError as e:
                auto[_dtype_name(dtype)] = f"none ({e})"
            except Exception as e:  # noqa: BLE001
                auto[_dtype_name(dtype)] = f"error: {type(e).__name__}: {e}"
            for name in BACKENDS:
                reasons[name][_dtype_name(dtype)] = _probe(_dispatch.unavailable_reason, name,
                                                           dev, dtype)
        out[device] = {"auto": auto, "backends": reasons}
    return out


def gpus() -> list[dict[str, Any]]:
    if _probe(torch.cuda.is_available) is not True:
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        cap = _probe(torch.cuda.get_device_capability, i)
        found.append({"index": i, "name": _probe(torch.cuda.get_device_name, i),
                      "capability": f"sm_{cap[0]}{cap[1]}" if isinstance(cap, tuple) else cap,
                      "cuda_kernel": _probe(_ext.cuda_unavailable_reason, i) or "can run"})
    return found


def collect() -> dict[str, Any]:
    """Every fact of the report, as a JSON-serializable dict."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    ext = _probe(_ext.build_info)
    ext_path = getattr(_ext.C, "__file__", None)
    return {
        "fused_adamw": __version__,
        "install": _probe(install_info),
        "os": {"platform": platform.platform(), "system": platform.system(),
               "release": platform.release(), "machine": platform.machine()},
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(),
                "usable_cpus": affinity, "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "hip": getattr(torch.version, "hip", None),
                  "cuda_available": _probe(torch.cuda.is_available)},
        "triton": _triton_version(),
        "ext": {**ext, "path": ext_path} if isinstance(ext, dict) else {"error": ext},
        "build_config": _probe(build_config),
        "environment": environment_variables(),
        "gpus": _probe(gpus),
        "backends": backend_choices(),
    }


def _fmt_cuda(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _build_lines(config: dict[str, Any] | None) -> list[str]:
    if config is None:
        return [f"_C build config: {NO_BUILD_CONFIG}"]
    if not isinstance(config, dict):
        return [f"_C build config: {config}"]
    out = [f"_C build config ({config.get('date', '?')}, fused_adamw {config.get('version')}"
           f"{', editable' if config.get('editable') else ''}): {config.get('ext')}"
           + (f" ({config['ext_reason']})" if config.get("ext_reason") else "")]
    if config.get("version") not in (None, __version__):
        out.append(f"  note: recorded for version {config.get('version')}, the package is "
                   f"{__version__}: rebuild")
    if config.get("ext") == "built":
        out.append(f"  host compiler: {config.get('host_compiler_version') or '?'}: "
                   f"{config.get('host_compiler') or '?'}")
        out.append(f"  flags: {' '.join(config.get('cflags') or [])}; link: "
                   f"{' '.join(config.get('ldflags') or []) or '(none)'}")
        if config.get("cuda"):
            out.append(f"  CUDA: nvcc {config.get('nvcc')} ({config.get('nvcc_version')}), "
                       f"archs {config.get('cuda_archs')}")
            out.append(f"  nvcc flags: {' '.join(config.get('nvcc_flags') or [])}")
        else:
            out.append(f"  CUDA: not compiled in: {config.get('cuda_reason')}")
    env = config.get("env") or {}
    out.append("  build environment: " + (", ".join(f"{k}={v}" for k, v in env.items())
                                          or "no FUSED_ADAMW_* or compiler variables set"))
    return out


def lines(info: dict[str, Any] | None = None) -> list[str]:
    """The report as text lines (``info`` from :func:`collect`, collected if not given)."""
    info = collect() if info is None else info
    inst, cpu, tv = info["install"], info["cpu"], info["torch"]
    out = [f"fused_adamw {info['fused_adamw']}"]
    if isinstance(inst, dict):
        out.append(f"install: {inst['kind']}" + (f" from {inst['url']}" if inst["url"] else ""))
        out.append(f"package: {inst['package_path']}")
    else:
        out.append(f"install: {inst}")
    o = info["os"]
    out += [
        f"os: {o['platform']} ({o['machine']})",
        f"cpu: {cpu['model']}; {cpu['logical_cpus']} logical CPUs, {cpu['usable_cpus']} usable "
        f"by this process; torch threads {cpu['torch_threads']} (interop "
        f"{cpu['torch_interop_threads']}); OMP_NUM_THREADS={cpu['OMP_NUM_THREADS'] or 'unset'}"
        f", MKL_NUM_THREADS={cpu['MKL_NUM_THREADS'] or 'unset'}",
        f"python {info['python']['version']} ({info['python']['executable']})",
        f"torch {tv['version']} (CUDA {tv['cuda'] or 'none'}"
        + (f", HIP {tv['hip']}" if tv.get("hip") else "") + ")",
        f"triton {info['triton']}",
    ]
    ext = info["ext"]
    if ext.get("available"):
        archs = ", ".join(f"sm_{a}" for a in ext["cuda_archs"]) or "none"
        out += [
            f"_C {ext['version']} ({ext.get('path')}): CUDA "
            f"{'compiled in' if ext['has_cuda'] else 'not compiled'}, archs {archs}, CPU loop "
            f"{ext['cpu_loop_isa']}",
            f"CUDA runtime linked in: {_fmt_cuda(ext['cuda_runtime_version'])}, driver: "
            f"{_fmt_cuda(ext['cuda_driver_version'])}",
        ]
    else:
        out.append(f"_C: not available: {ext.get('reason') or ext.get('error')}")
    out += _build_lines(info["build_config"])
    env = info["environment"]
    out.append("environment: " + (", ".join(f"{k}={v}" for k, v in env.items())
                                  or "no FUSED_ADAMW_* or TRITON_INTERPRET set"))
    found = info["gpus"]
    if isinstance(found, str):
        out.append(f"GPU: {found}")
    elif found:
        for g in found:
            out.append(f"GPU {g['index']}: {g['name']} ({g['capability']}); fused_adamw CUDA "
                       f"kernel: {g['cuda_kernel']}")
    else:
        out.append("GPU: none visible to torch")
    for device, row in info["backends"].items():
        picks = row["auto"]
        if isinstance(picks, str):
            out.append(f"{device}: {picks}")
            continue
        out.append(f"{device}: auto picks "
                   + ", ".join(f"{name} for {dtype}" for dtype, name in picks.items()))
        for name, by_dtype in row["backends"].items():
            groups: dict[Any, list[str]] = {}  # reason -> dtypes
            for dtype, reason in by_dtype.items():
                groups.setdefault(reason, []).append(dtype)
            if len(groups) == 1:
                reason = next(iter(groups))
                text = "available" if reason is None else f"unavailable: {reason}"
            else:
                text = "; ".join(
                    f"available for {', '.join(dts)}" if reason is None else
                    f"unavailable for {', '.join(dts)}: {reason}"
                    for reason, dts in sorted(groups.items(), key=lambda kv: kv[0] is not None))
            out.append(f"  {name:<7} {text}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_adamw",
        description="Prints what a bug report about fused_adamw needs: versions, install, "
                    "OS and CPU, how fused_adamw._C was built, GPUs, the FUSED_ADAMW_* and "
                    "TRITON_INTERPRET variables set, and which backend 'auto' picks per "
                    "device and dtype (and why the others cannot run).")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False, default=str))
    else:
        print("\n".join(lines(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
