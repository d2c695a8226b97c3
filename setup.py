"""Builds fused_adamw and its compiled module fused_adamw._C.

What is compiled is chosen from the toolkit found, never from a visible GPU:

* nvcc found (``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on PATH, then /usr/local/cuda): the CUDA
  kernel (kernels/*.cu) for the archs in ``FUSED_ADAMW_CUDA_ARCHS`` (e.g. ``"90"`` or
  ``"80;90;120+PTX"``; default by nvcc version, PTX for the newest), linked with the CUDA
  runtime statically, plus the CPU loop. No torch headers, no libtorch: one build serves every
  torch 2.x.
* no nvcc: the CPU loop only, with a warning.
* ``FUSED_ADAMW_NO_CUDA=1``: the same, on a machine that has nvcc.
* ``FUSED_ADAMW_NO_EXT=1``, or a compiler error: no compiled module, a warning, and a working
  pure-Python install (the torch and Triton backends).

``MAX_JOBS`` bounds parallel compilation (nvcc ``--threads`` over archs; nvcc runs alongside
the host compiler).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
CSRC = ROOT / "csrc"

# Default archs by nvcc version (CUDA 13 dropped sm_50..72; 12.8 added sm_100/120).
_DEFAULT_ARCHS = [
    ((12, 8), "80;86;89;90;100;120"),
    ((11, 8), "80;86;89;90"),
    ((11, 1), "70;75;80;86"),
]


def _warn(msg: str) -> None:
    print(f"\nWARNING (fused_adamw setup.py): {msg}\n", file=sys.stderr, flush=True)


def _version() -> str:
    """__version__ from python/fused_adamw/_version.py, read as text (nothing is imported)."""
    text = (ROOT / "python" / "fused_adamw" / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if not match:
        raise RuntimeError("no __version__ = '...' line in python/fused_adamw/_version.py")
    return match.group(1)


def _find_nvcc() -> str | None:
    if os.environ.get("FUSED_ADAMW_NO_CUDA") == "1":  # a CPU-only build on a machine with nvcc
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    if cuda_home:
        candidates.append(Path(cuda_home) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _nvcc_version(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _nvcc_archs(nvcc: str) -> set[str] | None:
    """The compute capabilities nvcc can target ("80", ...), or None if it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(re.findall(r"compute_(\d+a?)", out))


def _arch_list(nvcc: str) -> list[tuple[str, bool]]:
    """[(arch, with_ptx)] from FUSED_ADAMW_CUDA_ARCHS or the default for this nvcc."""
    env = os.environ.get("FUSED_ADAMW_CUDA_ARCHS", "").strip()
    supported = _nvcc_archs(nvcc)
    if env:
        raw = [a for a in re.split(r"[;, ]+", env) if a]
    else:
        version = _nvcc_version(nvcc)
        default = next((archs for v, archs in _DEFAULT_ARCHS if version >= v), "70;75;80")
        raw = default.split(";")
        if supported:
            raw = [a for a in raw if a in supported]
        if raw:
            raw[-1] += "+PTX"  # PTX of the newest: runs (JIT) on GPUs newer than the list
    archs = []
    for a in raw:
        ptx = a.upper().endswith("+PTX")
        a = a[:-4] if ptx else a
        a = a.replace(".", "").replace("sm_", "").replace("compute_", "")
        if not re.fullmatch(r"\d+[af]?", a):
            raise RuntimeError(f"FUSED_ADAMW_CUDA_ARCHS: cannot read arch {a!r}")
        if supported is not None and a not in supported and a.rstrip("af") not in supported:
            raise RuntimeError(f"FUSED_ADAMW_CUDA_ARCHS: this nvcc cannot build sm_{a} "
                               f"(it lists {', '.join(sorted(supported))})")
        archs.append((a, ptx))
    if not archs:
        raise RuntimeError("FUSED_ADAMW_CUDA_ARCHS names no arch")
    return archs


def _max_jobs() -> int:
    try:
        return max(1, int(os.environ["MAX_JOBS"]))
    except (KeyError, ValueError):
        return max(1, os.cpu_count() or 1)


class BuildExt(build_ext):
    """Compiles kernels/*.cu with nvcc (in a thread, alongside the host compiler), links the
    objects into fused_adamw._C, and turns any failure into a warning: the package then
    installs without its compiled module (or without CUDA, if only nvcc failed)."""

    def run(self):
        if os.environ.get("FUSED_ADAMW_NO_EXT") == "1":
            _warn("FUSED_ADAMW_NO_EXT=1: fused_adamw._C is not built (pure-Python install).")
            self.extensions = []
            return
        super().run()

    def build_extension(self, ext):
        try:
            self._build_with_optional_cuda(ext)
        except Exception as e:  # noqa: BLE001 - any failure leaves a pure-Python install
            _warn(f"building fused_adamw._C failed, installing without it "
                  f"(the torch and Triton backends still work): {e}")
            self._failed = True

    # A module that failed to build is not an output (pip and editable installs look for it).
    def get_outputs(self):
        return [] if getattr(self, "_failed", False) else super().get_outputs()

    def get_output_mapping(self):
        return {} if getattr(self, "_failed", False) else super().get_output_mapping()

    def _build_with_optional_cuda(self, ext):
        nvcc = _find_nvcc()
        cu_sources = sorted(str(p) for p in KERNELS.glob("*.cu"))
        if nvcc is None or not cu_sources:
            _warn("nvcc not found (set CUDA_HOME): building fused_adamw._C without CUDA; "
                  "the 'cuda' backend will be unavailable.")
            return super().build_extension(ext)
        cpu_ext = _copy_ext(ext)
        try:
            archs = _arch_list(nvcc)
            self._cuda_setup(ext, archs, nvcc, cu_sources)
        except Exception as e:  # noqa: BLE001
            _warn(f"nvcc cannot be used ({e}); building fused_adamw._C without CUDA.")
            return super().build_extension(cpu_ext)
        thread, errors = self._start_nvcc(nvcc, cu_sources, archs)
        # The host sources compile while nvcc runs; the link waits for nvcc.
        link = self.compiler.link_shared_object

        def link_after_nvcc(*args, **kwargs):
            thread.join()
            if errors:
                raise RuntimeError(errors[0])
            return link(*args, **kwargs)

        self.compiler.link_shared_object = link_after_nvcc
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            thread.join()
            if not errors:
                raise
            _warn(f"nvcc failed, building fused_adamw._C without CUDA:\n{e}")
            self.compiler.link_shared_object = link
            super().build_extension(cpu_ext)
        finally:
            thread.join()  # also when setuptools found the module up to date and linked nothing
            self.compiler.link_shared_object = link

    # -- nvcc --------------------------------------------------------------------------------

    def _start_nvcc(self, nvcc, cu_sources, archs):
        gencode = []
        for a, ptx in archs:
            code = f"[sm_{a},compute_{a}]" if ptx else f"sm_{a}"
            gencode += ["-gencode", f"arch=compute_{a},code={code}"]
        arch_macro = ";".join(a + ("+PTX" if ptx else "") for a, ptx in archs)
        cmds = [
            [nvcc, "-c", src, "-o", obj, "-std=c++17", "-O3", "--fmad=false",
             "-Xcompiler", "-fPIC", "--threads", str(min(_max_jobs(), len(archs))),
             f"-I{KERNELS}", f'-DFUSED_ADAMW_CUDA_ARCHS="{arch_macro}"', *gencode]
            for src, obj in zip(cu_sources, self._cu_objects)
        ]
        errors: list[str] = []

        def compile_all():
            for cmd in cmds:
                print(" ".join(cmd), flush=True)
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    errors.append(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
                    return

        thread = threading.Thread(target=compile_all)
        thread.start()
        return thread, errors

    def _cuda_setup(self, ext, archs, nvcc, cu_sources):
        build_temp = Path(self.build_temp) / "cuda"
        build_temp.mkdir(parents=True, exist_ok=True)
        self._cu_objects = [str(build_temp / (Path(s).stem + ".o")) for s in cu_sources]
        # nvcc may be a wrapper script (/usr/local/bin/nvcc): look where the toolkit can be.
        homes = [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
        homes += [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
        libdirs = [d for h in homes for d in (h / "lib64", h / "lib",
                                               *sorted((h / "targets").glob("*/lib")))
                   if (d / "libcudart_static.a").exists()]
        if not libdirs:
            raise RuntimeError("libcudart_static.a not found (set CUDA_HOME)")
        arch_macro = ";".join(a + ("+PTX" if ptx else "") for a, ptx in archs)
        ext.define_macros += [("FUSED_ADAMW_WITH_CUDA", "1"),
                              ("FUSED_ADAMW_CUDA_ARCHS", f'"{arch_macro}"')]
        ext.extra_objects += self._cu_objects
        ext.library_dirs += [str(d) for d in libdirs[:1]]
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]


def _copy_ext(ext: Extension) -> Extension:
    return Extension(ext.name, list(ext.sources), include_dirs=list(ext.include_dirs),
                     depends=list(ext.depends), optional=ext.optional,
                     define_macros=list(ext.define_macros),
                     extra_compile_args=list(ext.extra_compile_args),
                     extra_link_args=list(ext.extra_link_args), language=ext.language)


def _extension() -> Extension:
    try:
        import pybind11
    except ImportError:
        _warn("pybind11 is not installed: fused_adamw._C is not built.")
        return None
    cflags = ["-std=c++17", "-O3", "-fvisibility=hidden", "-ffp-contract=off",
              "-fno-math-errno"]
    ldflags = []
    if sys.platform != "win32" and sysconfig.get_platform().startswith(("linux", "macosx")):
        if _compiler_accepts("-fopenmp"):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        else:
            _warn("the C++ compiler does not take -fopenmp: the CPU loop uses std::thread.")
    headers = sorted(str(p) for d in (KERNELS, CSRC) for p in d.iterdir()
                     if p.suffix in (".h", ".cuh", ".cu"))
    return Extension(
        "fused_adamw._C",
        depends=headers,
        sources=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")),
        include_dirs=[str(KERNELS), str(CSRC), pybind11.get_include()],
        define_macros=[("FUSED_ADAMW_VERSION", f'"{_version()}"')],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        language="c++",
        optional=True,  # a failed build warns and leaves a pure-Python install
    )


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        r = subprocess.run([*cxx.split(), flag, "-x", "c++", "-E", "-"], input="",
                           capture_output=True, text=True)
    except OSError:
        return False
    return r.returncode == 0


ext = None if os.environ.get("FUSED_ADAMW_NO_EXT") == "1" else _extension()
setup(
    ext_modules=[ext] if ext is not None else [],
    cmdclass={"build_ext": BuildExt},
)
