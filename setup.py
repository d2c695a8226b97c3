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

Every build writes ``fused_adamw/_build_config.py`` (generated, git-ignored): what was built or
why not, the host compiler, nvcc and its version, the archs, the flags and the build's
``FUSED_ADAMW_*`` variables, for ``python -m fused_adamw``. A build without ``_C`` removes a
``_C`` left in python/fused_adamw/ by an earlier in-place (editable) build, so that it is not
loaded.

Nothing runs on import: ``setup()`` is called under ``if __name__ == "__main__"`` (as pip,
``python -m build`` and ``python setup.py`` run this file), so tests can import the helpers.
"""

from __future__ import annotations

import datetime
import os
import platform
import pprint
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
CSRC = ROOT / "csrc"
PACKAGE = ROOT / "python" / "fused_adamw"  # where an in-place (editable) build puts _C
BUILD_CONFIG = "_build_config.py"  # written into the package by every build
# Environment variables that change a build, recorded in the build config when set.
_TOOLCHAIN_ENV = ("CUDA_HOME", "CUDA_PATH", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS",
                  "MAX_JOBS")

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
    """nvcc from $CUDA_HOME/bin (or $CUDA_PATH/bin), then PATH, then /usr/local/cuda/bin."""
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


def _cuda_toolkit() -> tuple[str | None, str | None]:
    """(nvcc, None) when the CUDA kernel is to be built, else (None, why not).

    ``FUSED_ADAMW_NO_CUDA=1`` is checked first and named as the reason: nvcc is only blamed
    when it was looked for and not found.
    """
    if os.environ.get("FUSED_ADAMW_NO_CUDA") == "1":  # a CPU-only build on a machine with nvcc
        return None, "FUSED_ADAMW_NO_CUDA=1 is set"
    if not _cu_sources():
        return None, f"there are no CUDA sources (*.cu) in {KERNELS}"
    nvcc = _find_nvcc()
    if nvcc is None:
        return None, ("nvcc was not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, on PATH and "
                      "in /usr/local/cuda/bin; set CUDA_HOME to the CUDA toolkit)")
    return nvcc, None


def _no_cuda_message(reason: str) -> str:
    """The build warning for a build without the CUDA kernel, ``reason`` from _cuda_toolkit."""
    return (f"{reason}: building fused_adamw._C without CUDA (the CPU loop only); the 'cuda' "
            "backend will be unavailable.")


def _cu_sources() -> list[str]:
    return sorted(str(p) for p in KERNELS.glob("*.cu"))


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
    installs without its compiled module (or without CUDA, if only nvcc failed). Records what
    it did in the build config (``fused_adamw/_build_config.py``)."""

    def run(self):
        in_place = bool(self.inplace or self.editable_mode)
        self._config = _base_config(editable=in_place)
        no_ext = os.environ.get("FUSED_ADAMW_NO_EXT") == "1"  # main() leaves no extension then
        if no_ext:
            _warn("FUSED_ADAMW_NO_EXT=1: fused_adamw._C is not built (pure-Python install).")
            self.extensions = []
            self._config.update(ext="not built", ext_reason="FUSED_ADAMW_NO_EXT=1 is set")
        else:
            super().run()
        if in_place and (no_ext or getattr(self, "_failed", False)):
            for path in _remove_stale_ext(PACKAGE):  # an older _C must not be loaded instead
                _warn(f"removed {path}, left by an earlier in-place build.")
        target = PACKAGE if in_place else Path(self.build_lib) / "fused_adamw"
        _write_build_config(target / BUILD_CONFIG, self._config)

    def build_extension(self, ext):
        try:
            self._build_with_optional_cuda(ext)
        except Exception as e:  # noqa: BLE001 - any failure leaves a pure-Python install
            _warn(f"building fused_adamw._C failed, installing without it "
                  f"(the torch and Triton backends still work): {e}")
            self._failed = True
            self._config.update(ext="failed", ext_reason=f"the build failed: {e}")
        else:
            self._config.update(ext="built", ext_reason=None)

    # A module that failed to build is not an output (pip and editable installs look for it).
    def get_outputs(self):
        return [] if getattr(self, "_failed", False) else super().get_outputs()

    def get_output_mapping(self):
        return {} if getattr(self, "_failed", False) else super().get_output_mapping()

    def _record_host(self, ext) -> None:
        """The host compiler command, its version and the extension's flags, for the config."""
        cmd = list(getattr(self.compiler, "compiler_so_cxx", None) or
                   getattr(self.compiler, "compiler_so", None) or [])
        self._config.update(
            host_compiler=" ".join(cmd) or None,
            host_compiler_version=_tool_version(cmd[0]) if cmd else None,
            linker=" ".join(getattr(self.compiler, "linker_so_cxx", None) or
                            getattr(self.compiler, "linker_so", None) or []) or None,
            cflags=list(ext.extra_compile_args), ldflags=list(ext.extra_link_args),
            define_macros=[[name, value] for name, value in ext.define_macros],
            libraries=list(ext.libraries),
        )

    def _build_with_optional_cuda(self, ext):
        nvcc, no_cuda = _cuda_toolkit()
        cu_sources = _cu_sources()
        if nvcc is None:
            _warn(_no_cuda_message(no_cuda))
            self._config.update(cuda=False, cuda_reason=no_cuda)
            self._record_host(ext)
            return super().build_extension(ext)
        self._config.update(nvcc=nvcc, nvcc_version=_tool_version(nvcc, "release"))
        cpu_ext = _copy_ext(ext)
        try:
            archs = _arch_list(nvcc)
            self._cuda_setup(ext, archs, nvcc, cu_sources)
        except Exception as e:  # noqa: BLE001
            _warn(f"nvcc cannot be used ({e}); building fused_adamw._C without CUDA.")
            self._config.update(cuda=False, cuda_reason=f"nvcc cannot be used: {e}")
            self._record_host(cpu_ext)
            return super().build_extension(cpu_ext)
        thread, errors = self._start_nvcc(nvcc, cu_sources, archs)
        self._config.update(cuda=True, cuda_reason=None,
                            cuda_archs=";".join(a + ("+PTX" if ptx else "") for a, ptx in archs),
                            nvcc_flags=_nvcc_flags(archs))
        self._record_host(ext)
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
            self._config.update(cuda=False, cuda_reason=f"nvcc failed: {e}")
            self._record_host(cpu_ext)
            self.compiler.link_shared_object = link
            super().build_extension(cpu_ext)
        finally:
            thread.join()  # also when setuptools found the module up to date and linked nothing
            self.compiler.link_shared_object = link

    # -- nvcc --------------------------------------------------------------------------------

    def _start_nvcc(self, nvcc, cu_sources, archs):
        flags = _nvcc_flags(archs)
        cmds = [[nvcc, "-c", src, "-o", obj, *flags]
                for src, obj in zip(cu_sources, self._cu_objects)]
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


def _nvcc_flags(archs: list[tuple[str, bool]]) -> list[str]:
    """nvcc's flags after ``-c SRC -o OBJ`` for ``archs`` (from _arch_list)."""
    gencode = []
    for a, ptx in archs:
        code = f"[sm_{a},compute_{a}]" if ptx else f"sm_{a}"
        gencode += ["-gencode", f"arch=compute_{a},code={code}"]
    arch_macro = ";".join(a + ("+PTX" if ptx else "") for a, ptx in archs)
    return ["-std=c++17", "-O3", "--fmad=false", "-Xcompiler", "-fPIC",
            "--threads", str(min(_max_jobs(), len(archs))), f"-I{KERNELS}",
            f'-DFUSED_ADAMW_CUDA_ARCHS="{arch_macro}"', *gencode]


class BuildPy(build_py):
    """build_py, plus what a build without ``_C`` must do (``FUSED_ADAMW_NO_EXT=1``, or no
    pybind11): remove a ``_C`` left in python/fused_adamw/ by an earlier in-place build (an
    editable install would load it), and write a build config saying why there is no ``_C``.
    With an extension to build, BuildExt writes the config instead."""

    no_ext_reason: str | None = None  # set by main() when ext_modules is empty

    def run(self):
        reason = self.no_ext_reason
        config = None
        if reason is not None:
            if reason.startswith("FUSED_ADAMW_NO_EXT"):  # (no pybind11 warned already)
                _warn(f"{reason}: fused_adamw._C is not built (pure-Python install: the torch "
                      "and Triton backends).")
            for path in _remove_stale_ext(PACKAGE):
                _warn(f"removed {path}: a compiled module left by an earlier in-place build, "
                      "which would otherwise be loaded although this build has no _C.")
            config = _base_config(editable=bool(self.editable_mode))
            config.update(ext="not built", ext_reason=reason, cuda=False, cuda_reason=reason)
        super().run()
        if config is not None:
            target = PACKAGE if self.editable_mode else Path(self.build_lib) / "fused_adamw"
            _write_build_config(target / BUILD_CONFIG, config)


_STALE_EXT = re.compile(r"_C(\.[^/\\]*)?\.(so|pyd|dylib)")


def _remove_stale_ext(package_dir: Path) -> list[Path]:
    """Deletes the compiled modules ``_C*.so`` (``.pyd``) in ``package_dir``; returns them."""
    removed = []
    if package_dir.is_dir():
        for path in sorted(package_dir.iterdir()):
            if path.is_file() and _STALE_EXT.fullmatch(path.name):
                path.unlink()
                removed.append(path)
    return removed


def _tool_version(exe: str, marker: str | None = None) -> str | None:
    """The first line of ``exe --version`` (the first line containing ``marker``, if given)."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if marker is not None:
        lines = [line for line in lines if marker in line] or lines
    return lines[0] if lines else None


def _base_config(editable: bool) -> dict:
    """The build config's fields that do not depend on what was compiled."""
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith("FUSED_ADAMW_") or k in _TOOLCHAIN_ENV}
    return {
        "version": _version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": sysconfig.get_platform(),
        "editable": editable,
        "env": env,
        "ext": "not built",
        "ext_reason": None,
        "cuda": False,
        "cuda_reason": None,
        "nvcc": None,
        "nvcc_version": None,
        "cuda_archs": None,
        "nvcc_flags": None,
        "host_compiler": None,
        "host_compiler_version": None,
        "linker": None,
        "cflags": None,
        "ldflags": None,
        "define_macros": None,
        "libraries": None,
    }


def _write_build_config(path: Path, config: dict) -> None:
    """Writes ``config`` as the module fused_adamw._build_config (a dict literal)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '"""How fused_adamw._C was built: written by setup.py, do not edit (not in git)."""\n\n'
        f"BUILD_CONFIG = {pprint.pformat(config, width=96, sort_dicts=True)}\n")


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


def main() -> None:
    if os.environ.get("FUSED_ADAMW_NO_EXT") == "1":
        ext, BuildPy.no_ext_reason = None, "FUSED_ADAMW_NO_EXT=1 is set"
    else:
        ext = _extension()
        BuildPy.no_ext_reason = None if ext is not None else "pybind11 is not installed"
    setup(
        ext_modules=[ext] if ext is not None else [],
        cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    )


if __name__ == "__main__":  # pip, python -m build and python setup.py all run it as __main__
    main()
