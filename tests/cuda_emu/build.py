"""Builds and loads the CPU emulation of the CUDA kernel (tests/test_kernel_emulation.py).

kernels/adamw_kernel.cu is compiled by g++ as host C++ (``-x c++``) with
tests/cuda_emu/cuda_emu.h force-included, and linked with the UNCHANGED csrc/bindings.cpp and
csrc/cpu_adamw.cpp (with ``FUSED_ADAMW_WITH_CUDA``: the module's ``step_cuda`` runs the real
launcher, whose launches the emulator executes on the host) and tests/cuda_emu/emu_runtime.cpp
(the fake CUDA runtime and the test controls), under ``-fsanitize=address,undefined
-fno-sanitize-recover=all -g``, the kernel at -O1 (bindings.cpp at -O0, the CPU loop at -O2 for
this machine's ISA only: see _flags).

The result is one shared library, ``_C.so``, in ``tests/cuda_emu/build/<key>/`` (git-ignored),
keyed by a hash of every input (sources, headers, flags, compiler, Python, pybind11, CUDA
headers): built once, then reused. Objects are cached the same way, so a mutated kernel
(:func:`build_mutant`) compiles one translation unit and links.

ASan must be the first library of the process: the library is loaded in a subprocess started
with :func:`child_env` (``LD_PRELOAD`` of g++'s libasan and libstdc++). :func:`load` imports
it there as the module ``fused_adamw_emu._C`` (bindings.cpp's ``PYBIND11_MODULE(_C, m)``) and
opens the same file with ctypes for the controls (:class:`Emu`); one library, so one emulator
state.

Before compiling, :func:`check_source` refuses a kernel that uses what the execution model
cannot represent (shared memory, barriers, warp intrinsics, atomics, and inline PTX holding
any of them); cuda_emu.h also turns each of them (but PTX) into a compile error.

``python tests/cuda_emu/build.py [--run [pytest args]]``: builds (and runs the checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
CSRC = ROOT / "csrc"
KERNEL = KERNELS / "adamw_kernel.cu"
BUILD = Path(os.environ.get("FUSED_ADAMW_EMU_BUILD_DIR", EMU / "build"))

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]
# -ffp-contract=off and -fno-math-errno as setup.py builds the CPU loop (no contraction: the
# fp16 conversion relies on separate roundings, and the explicit fmaf's are the only fma's).
COMMON = ["-std=c++17", "-fPIC", "-g", *SANITIZE, "-ffp-contract=off", "-fno-math-errno"]
OPT = "-O1"

# What the execution model (every (block, thread) runs to completion in some order) cannot
# represent, as regular expressions over the source with comments and strings blanked.
FORBIDDEN = [
    (r"\b__shared__\b", "__shared__ memory"),
    (r"\b__syncthreads\w*\b", "a block barrier (__syncthreads)"),
    (r"\b__syncwarp\b", "a warp barrier (__syncwarp)"),
    (r"\b__shfl\w*\b", "a warp shuffle (__shfl*)"),
    (r"\b__ballot\w*\b", "a warp vote (__ballot*)"),
    (r"\b__(any|all|uni)(_sync)?\b", "a warp vote (__any/__all/__uni)"),
    (r"\b__activemask\b", "__activemask"),
    (r"\b__match_\w+_sync\b", "a warp match (__match_*_sync)"),
    (r"\b__reduce_\w+_sync\b", "a warp reduction (__reduce_*_sync)"),
    (r"\b__threadfence\w*\b", "a memory fence (__threadfence*)"),
    (r"\batomic[A-Z]\w*\b", "an atomic (atomic*)"),
    (r"\bcooperative_groups\b|\bcg::", "cooperative groups"),
]
# Inline PTX is allowed (a device-only ld.global / st.global, with a C++ form for the host),
# unless its text holds one of these instructions (barriers, shuffles, votes, atomics and
# reductions, fences, shared memory, async copies).
FORBIDDEN_PTX = (r"\b(bar|barrier|bar\.warp|shfl|vote|atom|red|redux|membar|fence|activemask|"
                 r"match|elect|mbarrier|cp\.async\w*|ld\.shared|st\.shared)\b|\.shared\b")


class Unavailable(RuntimeError):
    """The toolchain for the emulation (g++, libasan, the CUDA headers, pybind11) is missing."""


class NotEmulable(RuntimeError):
    """The kernel uses something the emulation cannot model."""


# ------------------------------------------------------------------------------------------
# the source check
# ------------------------------------------------------------------------------------------

def blank_comments_and_strings(text: str, strings: bool = True) -> str:
    """``text`` with comments and (``strings``) string and character literals replaced by
    spaces (newlines kept, so line numbers hold)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            if strings:
                out.append(c + " " * (j - i - 2) + c if j - i >= 2 else " " * (j - i))
            else:
                out.append(text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def local_sources(kernel: Path, include_dirs=(KERNELS,)) -> list[Path]:
    """The kernel and the project headers it includes with ``#include "..."``, recursively
    (resolved next to the including file first, then in include_dirs, as the compiler does)."""
    seen, todo = [], [kernel.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M):
            for d in (path.parent, *include_dirs):
                if (d / name).is_file():
                    todo.append((d / name).resolve())
                    break
    return seen


def _asm_statements(code: str):
    """(line, text) of every asm statement of ``code`` (comments blanked, strings kept)."""
    for m in re.finditer(r"\b(asm|__asm__|__asm)\b", code):
        depth, j = 0, m.end()
        while j < len(code):
            ch = code[j]
            if ch in "\"'":  # skip a literal
                k = j + 1
                while k < len(code) and code[k] != ch:
                    k += 2 if code[k] == "\\" else 1
                j = k
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            elif ch == ";" and depth == 0:
                break
            j += 1
        yield code.count("\n", 0, m.start()) + 1, code[m.start():j + 1]


def forbidden_uses(paths) -> list[str]:
    """``path:line: construct`` for every use of a FORBIDDEN construct in ``paths``, and for
    every asm statement whose PTX holds a FORBIDDEN_PTX instruction."""
    hits = []
    for path in paths:
        text = Path(path).read_text()
        code = blank_comments_and_strings(text)
        for lineno, line in enumerate(code.splitlines(), 1):
            for pattern, what in FORBIDDEN:
                if re.search(pattern, line):
                    hits.append(f"{path}:{lineno}: {what}: {line.strip()}")
        for lineno, stmt in _asm_statements(blank_comments_and_strings(text, strings=False)):
            ptx = " ".join(re.findall(r'"((?:[^"\\]|\\.)*)"', stmt))
            m = re.search(FORBIDDEN_PTX, ptx)
            if m:
                hits.append(f"{path}:{lineno}: inline PTX with {m.group(0)!r}: "
                            f"{' '.join(stmt.split())[:120]}")
    return hits


def check_source(kernel: Path = KERNEL) -> None:
    """Raises NotEmulable, naming each use, when the kernel (or a project header it includes)
    uses something the CPU emulation cannot model."""
    hits = forbidden_uses(local_sources(kernel))
    if hits:
        raise NotEmulable(
            "the CPU emulation of the CUDA kernel runs every (block, thread) to completion in "
            "some order, which is faithful only for a kernel whose threads never share memory, "
            "wait for or talk to each other; refusing to build it because of:\n  "
            + "\n  ".join(hits))


# ------------------------------------------------------------------------------------------
# the toolchain
# ------------------------------------------------------------------------------------------

def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def gxx() -> str:
    exe = os.environ.get("FUSED_ADAMW_EMU_CXX") or shutil.which("g++")
    if not exe:
        raise Unavailable("g++ not found on PATH (the CUDA emulation is built with g++)")
    return exe


def _runtime_library(name: str) -> str:
    path = _run([gxx(), f"-print-file-name={name}"]).stdout.strip()
    if not path or not os.path.isabs(path) or not os.path.exists(path):
        raise Unavailable(f"g++ has no {name} (got {path!r})")
    return os.path.realpath(path)


def preload() -> str:
    """LD_PRELOAD of the emulation's subprocess: g++'s libasan (ASan must be the first
    library of the process), then libstdc++, so that ASan finds the real __cxa_throw when it
    starts (python itself does not link libstdc++; without it the first C++ exception aborts
    in ASan's interceptor)."""
    return f"{_runtime_library('libasan.so')} {_runtime_library('libstdc++.so')}"


def cuda_include() -> Path:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h)."""
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    homes += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for home in filter(None, homes):
        for inc in (Path(home) / "include", *sorted(Path(home).glob("targets/*/include"))):
            if (inc / "cuda_runtime.h").is_file() and (inc / "cuda_bf16.h").is_file():
                return inc
    if nvcc:  # nvcc may be a wrapper script: ask it where its headers are
        out = _run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]).stderr
        for inc in re.findall(r'INCLUDES="-I([^"]+)"', out):
            if (Path(inc) / "cuda_runtime.h").is_file():
                return Path(inc).resolve()
    raise Unavailable("the CUDA toolkit headers (cuda_runtime.h, cuda_bf16.h) were not found "
                      "(set CUDA_HOME)")


def pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as e:
        raise Unavailable("pybind11 is not installed") from e
    return pybind11.get_include()


def _version() -> str:
    text = (ROOT / "python" / "fused_adamw" / "_version.py").read_text()
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else "0"


# ------------------------------------------------------------------------------------------
# the build
# ------------------------------------------------------------------------------------------

def _flags() -> dict[str, list[str]]:
    cuda = str(cuda_include())
    includes = [f"-I{KERNELS}", f"-I{CSRC}", f"-I{EMU}"]
    defines = [f'-DFUSED_ADAMW_VERSION="{_version()}+emu"', "-DFUSED_ADAMW_WITH_CUDA=1",
               '-DFUSED_ADAMW_CUDA_ARCHS="emu"']
    return {
        # bindings.cpp is glue (pybind11 templates, slow to compile): -O0 halves its build time.
        "bindings": [*COMMON, "-O0", *includes, f"-I{sysconfig.get_paths()['include']}",
                     f"-I{pybind11_include()}", *defines],
        # The CPU loop, the oracle: -O2 vectorizes it (as the real -O3 build), 12x faster
        # under the sanitizers than -O1. One ISA, this machine's (-march=native, no
        # target_clones: the real build compiles the loop three times, for a portable wheel),
        # less than half the compile time. Its results do not depend on the ISA (no
        # contraction, explicit fmaf): test_emulated_cpu_loop_is_the_real_one holds it to
        # the installed module's bits.
        "cpu": [*COMMON, "-O2", "-march=native", "-DFUSED_ADAMW_NO_CLONES", *includes,
                *defines],
        "runtime": [*COMMON, OPT, *includes, f"-I{cuda}", "-Wall", "-Wextra"],
        "kernel": [*COMMON, OPT, *includes, f"-I{cuda}", *defines, "-x", "c++",
                   "-include", str(EMU / "cuda_emu.h"), "-Wall", "-Wextra",
                   "-Wno-unknown-pragmas"],
    }


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _toolchain_key() -> str:
    cxx = gxx()
    version = _run([cxx, "--version"]).stdout
    cuda = cuda_include()
    api = (cuda / "cuda_runtime_api.h").read_bytes()
    import pybind11
    return _digest(cxx, version, sys.version, pybind11.__version__, cuda, api)


def _headers() -> bytes:
    """Every project header a translation unit may include (a change rebuilds everything)."""
    files = sorted([*KERNELS.glob("*.h"), *KERNELS.glob("*.cuh"), *CSRC.glob("*.h"),
                    *EMU.glob("*.h")])
    return b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)


@contextlib.contextmanager
def _locked():
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile_all(jobs: list[tuple[list[str], Path, Path]]) -> None:
    """Compiles (flags, source, object) jobs, two at a time (longest first), into the cache."""
    todo = [(flags, src, obj) for flags, src, obj in jobs if not obj.exists()]
    running: list[tuple[subprocess.Popen, Path, Path, list[str]]] = []
    width = max(1, min(len(os.sched_getaffinity(0)), 4))
    errors = []

    def reap(block: bool):
        for item in list(running):
            proc, src, obj, cmd = item
            if block or proc.poll() is not None:
                out, err = proc.communicate()
                running.remove(item)
                tmp = obj.with_suffix(".tmp.o")
                if proc.returncode != 0:
                    errors.append(f"$ {' '.join(cmd)}\n{out}{err}")
                    tmp.unlink(missing_ok=True)
                else:
                    tmp.replace(obj)
                if block:
                    return

    for flags, src, obj in todo:
        while len(running) >= width:
            reap(block=True)
        obj.parent.mkdir(parents=True, exist_ok=True)
        cmd = [gxx(), *flags, "-c", str(src), "-o", str(obj.with_suffix(".tmp.o"))]
        running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True), src, obj, cmd))
    while running:
        reap(block=True)
    if errors:
        raise RuntimeError("building the CUDA emulation failed:\n" + "\n".join(errors))


def _link(objects: list[Path], out: Path) -> Path:
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.so")
    r = _run([gxx(), "-shared", *SANITIZE, *map(str, objects), "-o", str(tmp), "-lpthread"])
    if r.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulation failed:\n{r.stdout}{r.stderr}")
    tmp.replace(out)
    return out


def _base_objects(flags: dict[str, list[str]], key: str) -> dict[str, tuple]:
    headers = _headers()
    srcs = {"bindings": CSRC / "bindings.cpp", "cpu": CSRC / "cpu_adamw.cpp",
            "runtime": EMU / "emu_runtime.cpp"}
    out = {}
    for name, src in srcs.items():
        k = _digest(key, flags[name], src.read_bytes(), headers)
        out[name] = (flags[name], src, BUILD / "obj" / f"{name}-{k}.o")
    return out


def build(kernel: Path = KERNEL, kernel_opt: str = OPT) -> Path:
    """The emulation library for ``kernel`` (default: kernels/adamw_kernel.cu; its translation
    unit at ``kernel_opt``), built once per source hash. Raises Unavailable (toolchain
    missing), NotEmulable, or RuntimeError (a compiler error, with its output)."""
    kernel = Path(kernel).resolve()
    check_source(kernel)
    key = _toolchain_key()
    flags = _flags()
    flags["kernel"] = [kernel_opt if f == OPT else f for f in flags["kernel"]]
    objs = _base_objects(flags, key)
    kernel_text = b"".join(p.read_bytes() for p in local_sources(kernel))
    kk = _digest(key, flags["kernel"], kernel_text, _headers())
    objs["kernel"] = (flags["kernel"], kernel, BUILD / "obj" / f"kernel-{kk}.o")
    so = BUILD / _digest(*(o[2].name for o in objs.values())) / "_C.so"
    with _locked():
        if not so.exists():
            _compile_all(sorted(objs.values(), key=lambda o: -len(o[0])))
            _link([o[2] for o in objs.values()], so)
        for path in (so, so.parent, *(o[2] for o in objs.values())):
            os.utime(path)  # in use: kept by _prune
        _prune()
    return so


def _prune(max_age_s: float = 24 * 3600) -> None:
    """Removes builds, objects and mutant copies not used for a day (each source change
    leaves a new set behind)."""
    import time
    cutoff = time.time() - max_age_s
    for path in [*BUILD.glob("*/_C.so"), *(BUILD / "obj").glob("*.o"),
                 *(BUILD / "mutants").glob("*")]:
        target = path.parent if path.name == "_C.so" else path
        try:
            if target.stat().st_mtime < cutoff:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        except FileNotFoundError:
            pass


def build_mutant(name: str, edits: list[tuple[str, str, str]], kernel_opt: str = "-O0") -> Path:
    """A library whose kernel is a copy of kernels/adamw_kernel.cu (and of the kernel headers)
    with ``edits`` applied: (file name in kernels/, old text, new text), each old text present
    exactly once. Only the kernel translation unit is compiled, at -O0 (half the compile time
    of -O1; the checks that catch a mutant are small). The other objects are the unchanged
    ones: an edit must be in code only the kernel uses, since an inline function the CPU loop
    (the oracle) also uses is kept once, from either object, by the linker."""
    texts = {p.name: p.read_text() for p in local_sources(KERNEL)}
    for fname, old, new in edits:
        count = texts[fname].count(old)
        if count != 1:
            raise ValueError(f"mutant {name}: {old!r} occurs {count} times in {fname}")
        texts[fname] = texts[fname].replace(old, new)
    d = BUILD / "mutants" / f"{name}-{_digest(*sorted(texts.items()))}"
    d.mkdir(parents=True, exist_ok=True)
    os.utime(d)
    for fname, text in texts.items():  # next to the .cu: #include "..." finds them first
        if not (d / fname).exists() or (d / fname).read_text() != text:
            (d / fname).write_text(text)
    return build(d / KERNEL.name, kernel_opt)


# ------------------------------------------------------------------------------------------
# running it
# ------------------------------------------------------------------------------------------

def child_env(so: Path, extra: dict | None = None) -> dict:
    """The environment of a subprocess that loads ``so``: ASan preloaded, leaks not checked
    (CPython and torch keep allocations to exit), every sanitizer report fatal."""
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": preload(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:"
                        "allocator_may_return_null=1:detect_odr_violation=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "FUSED_ADAMW_EMU_SO": str(so),
    })
    env.update(extra or {})
    return env


class Emu:
    """The emulator's test controls (emu_control.h), through ctypes."""

    def __init__(self, so: Path):
        lib = ctypes.CDLL(str(so))
        self._lib = lib
        i64, i32, u64, s = ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p
        sig = {
            "set_order": ([s, u64, i32], None), "launch_log_json": ([], s),
            "clear_launch_log": ([], None), "set_device_count": ([i32], None),
            "set_sm_count": ([i32], None), "set_compute_capability": ([i32, i32], None),
            "set_driver_version": ([i32], None), "current_device": ([], i32),
            "set_current_device": ([i32], i32), "inject_error": ([s, i32, i32], None),
            "clear_injections": ([], None),
            "set_block_filter": ([ctypes.POINTER(i64), i64, i32], None),
            "set_tile_trace": ([i32], None), "tile_trace": ([ctypes.POINTER(i64), i64], i64),
            "error_name": ([i32], s), "error_code": ([s], i32), "runtime_version": ([], i32),
            "reset": ([], None), "contexts": ([], u64), "set_contexts": ([u64], None),
        }
        for name, (args, res) in sig.items():
            fn = getattr(lib, f"fused_adamw_emu_{name}")
            fn.argtypes, fn.restype = args, res
            setattr(self, f"_{name}", fn)

    def set_order(self, mode: str, seed: int = 0, host_threads: int = 1) -> None:
        if mode not in ("forward", "reverse", "shuffle", "threads"):
            raise ValueError(mode)
        self._set_order(mode.encode(), seed, host_threads)

    def launch_log(self) -> list[dict]:
        """Every launch since the last clear: index, kernel (the launch expression's kernel
        name), params (its parameter types), grid, block, stream, device, error, blocks_run."""
        log = json.loads(self._launch_log_json().decode())
        for r in log:
            m = re.search(r"Args = \{(.*)\}\]", r.pop("signature"))
            r["params"] = m.group(1) if m else ""
        return log

    def clear_launch_log(self) -> None:
        self._clear_launch_log()

    def set_device_count(self, n: int) -> None:
        self._set_device_count(n)

    def set_sm_count(self, n: int) -> None:
        self._set_sm_count(n)

    def set_compute_capability(self, major: int, minor: int) -> None:
        self._set_compute_capability(major, minor)

    def set_driver_version(self, v: int) -> None:
        self._set_driver_version(v)

    def current_device(self) -> int:
        return self._current_device()

    def set_current_device(self, d: int) -> int:
        return self._set_current_device(d)

    def contexts(self) -> int:
        """Devices with an active primary context, as a bit mask (bit d: device d)."""
        return self._contexts()

    def set_contexts(self, mask: int) -> None:
        self._set_contexts(mask)

    def inject_error(self, site: str, error: str, skip: int = 0) -> None:
        self._inject_error(site.encode(), self.code(error), skip)

    def clear_injections(self) -> None:
        self._clear_injections()

    def set_block_filter(self, blocks, nth: int = 0) -> None:
        arr = (ctypes.c_int64 * len(blocks))(*blocks)
        self._set_block_filter(arr, len(blocks), nth)

    def set_tile_trace(self, on: bool) -> None:
        self._set_tile_trace(int(on))

    def tile_trace(self) -> list[tuple[int, int, int, int]]:
        """(launch index, block, thread, tile) per FUSED_ADAMW_TILE_HOOK call."""
        n = self._tile_trace(None, 0)
        buf = (ctypes.c_int64 * (4 * n))()
        self._tile_trace(buf, n)
        return [tuple(buf[4 * i:4 * i + 4]) for i in range(n)]

    def code(self, name: str) -> int:
        c = self._error_code(name.encode())
        if c < 0:
            raise ValueError(f"{name} is not in emu_runtime.cpp's error table")
        return c

    def error_name(self, code: int) -> str:
        return self._error_name(code).decode()

    def runtime_version(self) -> int:
        return self._runtime_version()

    def reset(self) -> None:
        self._reset()


def load(so: Path | str | None = None):
    """(the emulated ``_C`` module, :class:`Emu`) from ``so`` (default: $FUSED_ADAMW_EMU_SO).
    Only in a process where ASan came first (:func:`child_env`)."""
    so = Path(so or os.environ["FUSED_ADAMW_EMU_SO"])
    name = "fused_adamw_emu._C"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(so):
        mod = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod, Emu(so)


def main(argv: list[str]) -> int:
    """``python tests/cuda_emu/build.py``: builds, prints the library's path.
    ``python tests/cuda_emu/build.py --run [pytest args]``: builds, then runs the checks of
    tests/test_kernel_emulation.py in a subprocess with ASan preloaded."""
    so = build()
    print(so, flush=True)
    if argv[:1] != ["--run"]:
        return 0
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_kernel_emulation.py"),
           "-p", "no:cacheprovider", "--noconftest", "--capture=sys", "-o", "addopts=",
           *argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=child_env(so))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
