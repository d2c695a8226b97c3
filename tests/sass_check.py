#!/usr/bin/env python3
"""Checks the compiled CUDA kernel's SASS, without a GPU.

For every instantiation of kernels/adamw_kernel.cu (``adamw_kernel<float|__nv_bfloat16|__half,
HAS_MAX false|true, SCALED false|true>``, the low-precision ``adamw_lowp_kernel<T, S>`` and
``adamw_steps_kernel``) and every arch in a binary, from
``cuobjdump -sass``, ``-res-usage``, ``-elf`` and ``-ptx``:

* **local**: no local memory: no LDL/STL instruction, ``STACK:0`` and ``LOCAL:0`` (no spill, no
  stack frame);
* **regs**: registers within the launch bound: ``REG <= 65536 / (256 * minBlocksPerSm)`` with
  minBlocksPerSm the one this script expects (4 without a max buffer, 3 with: EXPECTED_MIN_BLOCKS)
  and the one the source declares (PTX ``.minnctapersm``) equal to it, so that neither a register
  creep nor a quietly loosened bound passes;
* **vec128**: every access to global memory in the vector main loop is 128 bits wide, and the
  loop loads 4 and stores 3 16-byte vectors per iteration (param, grad, exp_avg, exp_avg_sq in;
  param, exp_avg, exp_avg_sq out), or 5 and 4 with amsgrad (max_exp_avg_sq), times the unroll;
* **global**: those 128-bit accesses are global-space instructions (LDG/STG, any modifiers such
  as .CONSTANT, .STRONG.GPU, .EF), not generic ones (LD/ST through a generic address);
* **bytes**: global bytes per element in the loop = 16 x accesses / (N x unroll) with N = 4
  elements per vector for fp32 and 8 for 16-bit: 28 (fp32) / 14 (16-bit), 36 / 18 with amsgrad.
  ``HAS_MAX=true`` must hold both loops (amsgrad rows and plain rows of the same table),
  ``HAS_MAX=false`` only the plain one.
* the low-precision kernels: one such loop per master mode over groups of 8 elements, each
  stream in whole 16-byte vectors (one per 16-bit stream, two per fp32 one), counts and bytes
  per element by :func:`lowp_streams` (e.g. bf16 params with fp32 moments and an fp32 master:
  8 loads / 7 stores, 30 B/elem), held to vec128, global and bytes as above.

The vector main loop is found in the SASS as an innermost loop (a backward BRA to an earlier
address; the body is [target, branch]) that holds a 128-bit global or generic access.

Usage::

    python tests/sass_check.py --so python/fused_adamw/_C*.so   # a built extension
    python tests/sass_check.py --compile 80;86;89;90;100;120      # nvcc -c with setup.py's flags
    python tests/sass_check.py --compile 90 --write-notes        # also rewrite kernels/NOTES.md

Exit status 1 when a check fails. Needs ``cuobjdump`` and ``nvdisasm`` (the CUDA toolkit's, the
``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels', or the copies Triton ships in
triton/backends/nvidia/bin); ``--compile`` needs nvcc.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SRC = ROOT / "kernels" / "adamw_kernel.cu"
NOTES = ROOT / "kernels" / "NOTES.md"
NOTES_BEGIN = "<!-- sass-table:begin -->"
NOTES_END = "<!-- sass-table:end -->"

REGS_PER_SM = 65536  # every arch from sm_80 to sm_120
THREADS = 256        # kThreads
# The occupancy the design (and tests/test_work_split.py) assumes: resident blocks of 256
# threads per SM by register file, per HAS_MAX. A change here is a design change.
# Keyed by (HAS_MAX, SCALED): GradScaler's kernels keep the unscaled grad vector and the scale
# live through the update and are bounded one block lower (kernels/adamw_kernel.cu).
EXPECTED_MIN_BLOCKS = {(False, False): 4, (True, False): 3, (False, True): 3, (True, True): 2}
# Streams of 16-byte vectors per element update: (loads, stores).
# Keyed by (amsgrad, scaled): scaled is GradScaler's path, which also stores the unscaled grad
# (one more store). Each kernel has a loop per (amsgrad, scaled) it supports.
STREAMS = {(False, False): (4, 3), (True, False): (5, 4), (False, True): (4, 4),
           (True, True): (5, 5)}
ELEMS_PER_VECTOR = {"float": 4, "__nv_bfloat16": 8, "__half": 8}
ELEM_SIZE = {"float": 4, "__nv_bfloat16": 2, "__half": 2}
SHORT = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}

# The low-precision kernels (issue #13: master modes, state_dtype), one per supported
# (param, state) pair (kernels/adamw_params.h state_pair_supported): adamw_lowp_kernel<T, S>.
# Their vector loops (kernels/adamw_kernel.cu adamw_lowp_vector_range) step groups of
# LOWP_GROUP elements, every stream in whole 16-byte vectors: one per 16-bit stream, two per
# fp32 one. One loop per master mode the param dtype takes (LOWP_MODES) and per (amsgrad,
# GradScaler) combination of LOWP_VECTOR_KINDS; a row of another combination runs the scalar
# loop. They are held to every check of the plain kernels' loops: vec128 (only 128-bit
# accesses, in the counts of lowp_streams), global (LDG/STG), bytes (the formula's).
LOWP_PAIRS = [("float", "__nv_bfloat16"), ("__nv_bfloat16", "__nv_bfloat16"),
              ("__nv_bfloat16", "float"), ("__half", "__half"), ("__half", "float")]
LOWP_MIN_BLOCKS = 4  # (256, 4): 64 registers, as the plain kernels without amsgrad
LOWP_GROUP = 8
LOWP_MODES = {"float": ("none",),
              "__nv_bfloat16": ("none", "fp32", "remainder", "kahan", "stochastic"),
              "__half": ("none", "fp32", "kahan", "stochastic")}  # remainder: bfloat16 only
# Bytes per element of a mode's extra buffer (kRowExtra): None: the param's dtype.
LOWP_EXTRA_SIZE = {"none": 0, "stochastic": 0, "fp32": 4, "remainder": 2, "kahan": None}
# (amsgrad, GradScaler) with a vector loop: the kernel's kLowpVectorised. amsgrad and
# GradScaler rows of a low-precision table run scalar: vectorised, they spilled at 64
# registers (kernels/adamw_kernel.cu "NOTE on amsgrad and GradScaler").
LOWP_VECTOR_KINDS = ((False, False),)


def lowp_streams(t: str, s: str, mode: str, amsgrad: bool, scaled: bool) -> tuple[int, int]:
    """(loads, stores) of 16-byte vectors per group of LOWP_GROUP elements: param and grad in,
    the moments (and max_exp_avg_sq) in and out, the mode's extra buffer in and out, the param
    out and, under GradScaler, the grad out."""
    def vecs(size: int) -> int:
        return LOWP_GROUP * size // 16
    p, m = vecs(ELEM_SIZE[t]), vecs(ELEM_SIZE[s])
    xs = LOWP_EXTRA_SIZE[mode]
    x = vecs(ELEM_SIZE[t] if xs is None else xs) if xs != 0 else 0
    moments = (3 if amsgrad else 2) * m
    return 2 * p + moments + x, p + (p if scaled else 0) + moments + x


def lowp_expected(t: str, s: str) -> dict[tuple[str, bool, bool], tuple[int, int]]:
    """{(mode, amsgrad, scaled): (loads, stores)} of every vector loop adamw_lowp_kernel<t, s>
    must hold."""
    return {(mode, a, sc): lowp_streams(t, s, mode, a, sc) for mode in LOWP_MODES[t]
            for a, sc in LOWP_VECTOR_KINDS}


# issue #19: track_norms and clipping where the kernels above do not clip (amsgrad,
# low-precision tables): the NORMS kernels, bounded at NORMS_MIN_BLOCKS (128 registers).
# adamw_norms_kernel<T> runs amsgrad as a runtime branch, so it holds both GradScaler-form
# vector loops (the grad stored back when the scale is not 1: STREAMS[a, True]), walked in
# the norm's lane order; adamw_lowp_kernel<T, S, true> runs every row scalar (no vector loop:
# kernels/adamw_kernel.cu "NOTE on the vector loop" of adamw_lowp_norms_tile).
NORMS_MIN_BLOCKS = 2
NORMS_TYPES = ("float", "__nv_bfloat16", "__half")

EXPECTED_KERNELS = [f"adamw_kernel<{t}, {m}, {sc}>" for t in ("float", "__nv_bfloat16", "__half")
                    for m in ("false", "true") for sc in ("false", "true")] + [
                        f"adamw_lowp_kernel<{t}, {st}, false>" for t, st in LOWP_PAIRS] + [
                        f"adamw_norms_kernel<{t}>" for t in NORMS_TYPES] + [
                        f"adamw_lowp_kernel<{t}, {st}, true>" for t, st in LOWP_PAIRS] + [
                        "adamw_step_norms_tiles_kernel", "adamw_step_norms_rows_kernel"] + [
                        "adamw_steps_kernel"] + [
                        # issue #19: the norm pass (kernels/adamw_norm.cuh), held to the steps
                        # kernel's checks: no local memory, registers within (256) bounds.
                        f"adamw_norm_lanes_kernel<{t}, {sc}, {inf}>"
                        for t in ("float", "__nv_bfloat16", "__half")
                        for sc in ("false", "true") for inf in ("false", "true")] + [
                        f"adamw_norm_{k}_kernel" for k in ("tiles", "rows", "total")]

_MANGLED_T = {"f": "float", "13__nv_bfloat16": "__nv_bfloat16", "6__half": "__half"}


# ------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------

def _site_bins() -> list[Path]:
    """bin/ folders of CUDA tool wheels and of Triton in this interpreter's site-packages."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += [Path(p) for p in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin")))]
        dirs += [Path(p) for p in sorted(glob.glob(os.path.join(sp, "nvidia", "cuda_*", "bin")))]
        dirs.append(Path(sp) / "triton" / "backends" / "nvidia" / "bin")
    return dirs


def _candidate_dirs() -> list[Path]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    dirs += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    nvcc = find_nvcc()
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
    dirs.append(Path("/usr/local/cuda/bin"))
    return dirs + _site_bins()


def _find_tool(name: str) -> str | None:
    for d in _candidate_dirs():
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def find_tools() -> tuple[str | None, str | None]:
    """(cuobjdump, nvdisasm), from one folder where one has both (cuobjdump -sass runs nvdisasm,
    which it finds on PATH or NVDISASM_PATH: _cuobjdump sets both)."""
    for d in _candidate_dirs():
        pair = [d / "cuobjdump", d / "nvdisasm"]
        if all(p.is_file() and os.access(p, os.X_OK) for p in pair):
            return str(pair[0]), str(pair[1])
    return _find_tool("cuobjdump"), _find_tool("nvdisasm")


def _load_setup():
    """setup.py as a module (its helpers; nothing runs on import, and it imports no torch)."""
    spec = importlib.util.spec_from_file_location("_fused_adamw_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_nvcc() -> str | None:
    try:
        return _load_setup()._find_nvcc()
    except Exception:  # noqa: BLE001 - setup.py unimportable (no setuptools): look on PATH
        return shutil.which("nvcc")


def default_archs() -> list[str]:
    """setup.py's default arch list for the nvcc found (FUSED_ADAMW_CUDA_ARCHS ignored)."""
    setup = _load_setup()
    nvcc = setup._find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    saved = os.environ.pop("FUSED_ADAMW_CUDA_ARCHS", None)
    try:
        return [a for a, _ in setup._arch_list(nvcc)]
    finally:
        if saved is not None:
            os.environ["FUSED_ADAMW_CUDA_ARCHS"] = saved


def parse_archs(text: str) -> list[tuple[str, bool]]:
    out = []
    for a in re.split(r"[;, ]+", text.strip()):
        if not a:
            continue
        ptx = a.upper().endswith("+PTX")
        a = a[:-4] if ptx else a
        out.append((a.replace("sm_", "").replace(".", ""), ptx))
    return out


def compile_kernel(archs: list[tuple[str, bool]], out: Path, src: Path = KERNEL_SRC,
                   extra_flags: tuple[str, ...] = ()) -> Path:
    """nvcc -c ``src`` -o ``out`` with setup.py's flags (``_nvcc_flags``) for ``archs``."""
    setup = _load_setup()
    nvcc = setup._find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    cmd = [nvcc, "-c", str(src), "-o", str(out), *setup._nvcc_flags(archs), *extra_flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return out


def _cuobjdump(cuobjdump: str, nvdisasm: str | None, binary: Path, *opts: str) -> str:
    env = dict(os.environ)
    if nvdisasm:
        env["NVDISASM_PATH"] = str(Path(nvdisasm).parent)
        env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([cuobjdump, *opts, str(binary)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(opts)} {binary} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Insn:
    addr: int
    pred: str
    op: str        # opcode with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str


_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_ARCH = re.compile(r"^arch = (sm_\d+[af]?)")
_FUNC = re.compile(r"^\s*Function : (\S+)")


def kernel_label(mangled: str) -> tuple[str, str | None, bool | None]:
    """('adamw_kernel<float, false, true>', 'float', False) or ('adamw_steps_kernel', None,
    None): the label, the element type and HAS_MAX (SCALED: :func:`kernel_scaled`)."""
    m = re.search(r"adamw_kernelI(f|13__nv_bfloat16|6__half)Lb([01])ELb([01])E", mangled)
    if m:
        t, has_max = _MANGLED_T[m.group(1)], m.group(2) == "1"
        scaled = m.group(3) == "1"
        return (f"adamw_kernel<{t}, {'true' if has_max else 'false'}, "
                f"{'true' if scaled else 'false'}>", t, has_max)
    lp = kernel_lowp(mangled)
    if lp:
        norms = "true" if kernel_norms(mangled) else "false"
        return f"adamw_lowp_kernel<{lp[0]}, {lp[1]}, {norms}>", lp[0], None
    m = re.search(r"adamw_norms_kernelI(f|13__nv_bfloat16|6__half)E", mangled)
    if m:  # amsgrad and not, GradScaler's loop form (NORMS_MIN_BLOCKS)
        return f"adamw_norms_kernel<{_MANGLED_T[m.group(1)]}>", _MANGLED_T[m.group(1)], True
    for k in ("tiles", "rows"):
        if f"adamw_step_norms_{k}_kernel" in mangled:
            return f"adamw_step_norms_{k}_kernel", None, None
    if "adamw_steps_kernel" in mangled:
        return "adamw_steps_kernel", None, None
    m = re.search(r"adamw_norm_lanes_kernelI(f|13__nv_bfloat16|6__half)Lb([01])ELb([01])E",
                  mangled)
    if m:
        flag = {"0": "false", "1": "true"}
        return (f"adamw_norm_lanes_kernel<{_MANGLED_T[m.group(1)]}, {flag[m.group(2)]}, "
                f"{flag[m.group(3)]}>", None, None)
    for k in ("tiles", "rows", "total"):
        if f"adamw_norm_{k}_kernel" in mangled:
            return f"adamw_norm_{k}_kernel", None, None
    return mangled, None, None


def kernel_lowp(mangled: str) -> tuple[str, str] | None:
    """(T, S) of an adamw_lowp_kernel<T, S>, else None (S2_: the same type as T)."""
    m = re.search(r"adamw_lowp_kernelI(f|13__nv_bfloat16|6__half)(f|13__nv_bfloat16|6__half|"
                  r"S\d*_)(?:Lb[01])?E", mangled)
    if not m:
        return None
    t = _MANGLED_T[m.group(1)]
    return t, _MANGLED_T.get(m.group(2), t)


def kernel_scaled(mangled: str) -> bool:
    """The SCALED template argument (GradScaler's kernels) of an adamw_kernel; true for the
    NORMS kernels (adamw_norms_kernel: GradScaler's loop form)."""
    if "adamw_norms_kernel" in mangled:
        return True
    m = re.search(r"adamw_kernelI(?:f|13__nv_bfloat16|6__half)Lb[01]ELb([01])E", mangled)
    return bool(m) and m.group(1) == "1"


def kernel_norms(mangled: str) -> bool:
    """The NORMS kernels (issue #19): adamw_norms_kernel<T>, adamw_lowp_kernel<T, S, true>."""
    return "adamw_norms_kernel" in mangled or bool(
        re.search(r"adamw_lowp_kernelI.*Lb1E", mangled))


def parse_sass(text: str) -> dict[tuple[str, str], list[Insn]]:
    """{(arch, mangled name): instructions} from ``cuobjdump -sass``."""
    out: dict[tuple[str, str], list[Insn]] = {}
    arch = None
    cur: list[Insn] | None = None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault((arch, m.group(1)), [])
            continue
        if cur is not None:
            m = _INSN.match(line)
            if m:
                cur.append(Insn(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                                m.group(4).strip()))
    return out


def parse_res_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled name): {"REG": .., "STACK": .., "LOCAL": .., ...}}."""
    out = {}
    arch = fn = None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"^\s*Function (\S+):\s*$", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            out[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}
            fn = None
    return out


def parse_elf_maxreg(text: str) -> dict[tuple[str, str], int]:
    """{(arch, mangled name): EIATTR_MAXREG_COUNT} (ptxas's cap from the launch bounds)."""
    out = {}
    arch = fn = None
    attr = None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"^\.nv\.info\.(\S+)\s*$", line)
        if m:
            fn, attr = m.group(1), None
            continue
        if fn is None:
            continue
        m = re.match(r"^\s*Attribute:\s*(\S+)", line)
        if m:
            attr = m.group(1)
            continue
        m = re.match(r"^\s*Value:\s*(0x[0-9a-f]+)", line)
        if m and attr == "EIATTR_MAXREG_COUNT":
            out[(arch, fn)] = int(m.group(1), 16)
    return out


def parse_ptx_bounds(text: str) -> dict[str, tuple[int | None, int | None]]:
    """{mangled name: (maxntid, minnctapersm)} from PTX."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+?)\s*\((.*?)\{", text, re.S):
        head = m.group(2)
        nt = re.search(r"\.maxntid\s+(\d+)", head)
        mb = re.search(r"\.minnctapersm\s+(\d+)", head)
        out[m.group(1)] = (int(nt.group(1)) if nt else None, int(mb.group(1)) if mb else None)
    return out


# ------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------

_MEM_GLOBAL = ("LDG", "STG")
_MEM_GENERIC = ("LD", "ST")
_MEM_LOCAL = ("LDL", "STL")


def _base(op: str) -> str:
    return op.split(".", 1)[0]


def access_bytes(op: str) -> int:
    mods = op.split(".")[1:]
    if "128" in mods:
        return 16
    if "64" in mods:
        return 8
    if "U16" in mods or "S16" in mods:
        return 2
    if "U8" in mods or "S8" in mods:
        return 1
    return 4


def is_memory(op: str) -> bool:
    return _base(op) in _MEM_GLOBAL + _MEM_GENERIC


def is_load(op: str) -> bool:
    return _base(op) in ("LDG", "LD")


def _branch_target(insn: Insn) -> int | None:
    if _base(insn.op) != "BRA":
        return None
    m = re.search(r"0x([0-9a-f]+)", insn.operands)
    return int(m.group(1), 16) if m else None


@dataclasses.dataclass
class Loop:
    start: int  # the backward branch's target
    end: int    # the backward branch's address
    insns: list[Insn]
    load128: int = 0
    store128: int = 0
    generic128: int = 0   # of load128 + store128: LD/ST through a generic address
    narrow: list[str] = dataclasses.field(default_factory=list)  # other-width accesses
    bytes: int = 0        # all global/generic bytes per iteration
    lowp_unroll: int = 0  # a low-precision loop's unroll (check_lowp_loops), 0: not one

    @property
    def kind(self) -> tuple[bool, int] | None:
        """((amsgrad, scaled), unroll) when the 128-bit counts are a multiple of a STREAMS
        entry (4:3, 5:4, 4:4 or 5:5)."""
        for kind, (ld, st) in STREAMS.items():
            if self.load128 and self.load128 % ld == 0 and self.store128 * ld == self.load128 * st:
                return kind, self.load128 // ld
        return None


def _kind_text(kind: tuple[bool, bool]) -> str:
    amsgrad, scaled = kind
    return ("amsgrad" if amsgrad else "non-amsgrad") + (" GradScaler" if scaled else "")


def find_loops(insns: list[Insn]) -> list[Loop]:
    loops = []
    for i, insn in enumerate(insns):
        t = _branch_target(insn)
        if t is not None and t <= insn.addr:
            body = [x for x in insns[: i + 1] if x.addr >= t]
            loops.append(Loop(t, insn.addr, body))
    return loops


def vector_loops(insns: list[Insn]) -> list[Loop]:
    """Innermost loops holding a 128-bit global or generic access, with their counts."""
    cand = []
    for lp in find_loops(insns):
        if any(is_memory(x.op) and access_bytes(x.op) == 16 for x in lp.insns):
            cand.append(lp)
    inner = [lp for lp in cand
             if not any(o is not lp and lp.start <= o.start and o.end <= lp.end and
                        (o.start, o.end) != (lp.start, lp.end) for o in cand)]
    # Two backward branches to one target (a loop with a continue): keep the widest.
    by_start: dict[int, Loop] = {}
    for lp in inner:
        if lp.start not in by_start or lp.end > by_start[lp.start].end:
            by_start[lp.start] = lp
    out = []
    for lp in sorted(by_start.values(), key=lambda x: x.start):
        for x in lp.insns:
            if not is_memory(x.op):
                continue
            b = access_bytes(x.op)
            lp.bytes += b
            if b == 16:
                if is_load(x.op):
                    lp.load128 += 1
                else:
                    lp.store128 += 1
                if _base(x.op) in _MEM_GENERIC:
                    lp.generic128 += 1
            else:
                lp.narrow.append(x.op)
        out.append(lp)
    return out


@dataclasses.dataclass
class Result:
    arch: str
    mangled: str
    kernel: str
    regs: int
    bound: int            # 65536 / (256 * expected min blocks), or 255 without min blocks
    ptxas_cap: int | None  # EIATTR_MAXREG_COUNT
    min_blocks: int | None  # .minnctapersm in the PTX
    stack: int
    local: int
    local_insns: int      # LDL/STL instructions
    loops: list[Loop]
    elems: int | None     # per 16-byte vector
    has_max: bool | None
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def lowp(self) -> bool:
        return kernel_lowp(self.mangled) is not None

    def loops_text(self) -> str:
        if self.has_max is None and not self.lowp:
            return "-"
        parts = []
        for lp in self.loops:
            s = f"{lp.load128} ld / {lp.store128} st"
            if lp.generic128:
                s += f" ({lp.generic128} generic)"
            if lp.narrow:
                s += f" +{len(lp.narrow)} narrow"
            parts.append(s)
        return ", ".join(parts) or "none"

    def bytes_text(self) -> str:
        if self.has_max is None and not self.lowp:
            return "-"
        parts = []
        for lp in self.loops:
            k = lp.kind
            u = k[1] if k else max(1, lp.load128 // 4)
            if self.lowp:
                u = lp.lowp_unroll or 1
            v = lp.bytes / (self.elems * u)
            parts.append(f"{v:g}")
        return ", ".join(parts) or "-"


def ptxas_cap_of(min_blocks: int, threads: int = THREADS) -> int:
    """The register cap ptxas derives from __launch_bounds__(threads, min_blocks): the register
    file split over the threads, rounded down to the allocation unit (8 per thread)."""
    return min(255, REGS_PER_SM // (threads * min_blocks) // 8 * 8)


def min_blocks_of_cap(cap: int | None) -> int | None:
    found = [mb for mb in range(1, 33) if ptxas_cap_of(mb) == cap]
    return found[0] if len(found) == 1 else None


def check_function(arch: str, mangled: str, insns: list[Insn], res: dict[str, int],
                   ptxas_cap: int | None, bounds: tuple[int | None, int | None] | None) -> Result:
    kernel, t, has_max = kernel_label(mangled)
    failures = []
    if bounds is not None:  # the PTX's .maxntid / .minnctapersm: the source's launch bounds
        maxntid, min_blocks = bounds
    else:  # no PTX in the binary: the min blocks that give ptxas's register cap
        maxntid, min_blocks = None, min_blocks_of_cap(ptxas_cap)
    local_insns = sum(1 for x in insns if _base(x.op) in _MEM_LOCAL)
    stack, local = res.get("STACK", -1), res.get("LOCAL", -1)
    if local_insns or stack != 0 or local != 0:
        failures.append(f"local memory: {local_insns} LDL/STL, STACK:{stack}, LOCAL:{local}")
    regs = res.get("REG", -1)
    lowp = kernel_lowp(mangled) is not None
    if lowp:
        want = NORMS_MIN_BLOCKS if kernel_norms(mangled) else LOWP_MIN_BLOCKS
        bound = REGS_PER_SM // (THREADS * want)
        if min_blocks != want:
            failures.append(f"launch bound: min blocks per SM {min_blocks}, expected {want} "
                            "(tests/sass_check.py LOWP_MIN_BLOCKS, NORMS_MIN_BLOCKS)")
        if maxntid is not None and maxntid != THREADS:
            failures.append(f"launch bound: .maxntid {maxntid}, expected {THREADS}")
    elif has_max is None:  # the steps kernel: (256) only
        bound = min(255, REGS_PER_SM // THREADS)
    else:
        want = (NORMS_MIN_BLOCKS if kernel_norms(mangled)
                else EXPECTED_MIN_BLOCKS[has_max, kernel_scaled(mangled)])
        bound = REGS_PER_SM // (THREADS * want)
        if min_blocks != want:
            failures.append(f"launch bound: min blocks per SM {min_blocks}, expected {want} "
                            "(tests/sass_check.py EXPECTED_MIN_BLOCKS, tests/test_work_split.py)")
        if maxntid is not None and maxntid != THREADS:
            failures.append(f"launch bound: .maxntid {maxntid}, expected {THREADS}")
    if not 0 < regs <= bound:
        failures.append(f"registers: {regs} > {bound}")
    loops: list[Loop] = []
    elems = ELEMS_PER_VECTOR.get(t) if t else None
    if lowp:
        loops = vector_loops(insns)
        elems = LOWP_GROUP
        if kernel_norms(mangled):  # scalar throughout: no 128-bit loop expected
            failures += [f"vec128: loop {lp.start:#x}-{lp.end:#x} in a scalar NORMS kernel"
                         for lp in loops]
        else:
            failures += check_lowp_loops(kernel_lowp(mangled), loops)
    elif has_max is not None:
        loops = vector_loops(insns)
        kinds = []
        for lp in loops:
            where = f"loop {lp.start:#x}-{lp.end:#x}"
            if lp.narrow:
                failures.append(f"vec128: {where} has non-128-bit accesses "
                                f"{sorted(set(lp.narrow))}")
            k = lp.kind
            if k is None:
                failures.append(f"vec128: {where} has {lp.load128} 128-bit loads and "
                                f"{lp.store128} stores (want a multiple of 4/3 or 5/4)")
                continue
            kind, unroll = k
            kinds.append(kind)
            if lp.generic128:
                failures.append(f"global: {where}: {lp.generic128} of {lp.load128 + lp.store128}"
                                " 128-bit accesses are generic LD/ST, not LDG/STG")
            want_b = sum(STREAMS[kind]) * ELEM_SIZE[t]
            got_b = lp.bytes / (elems * unroll)
            if got_b != want_b:
                failures.append(f"bytes: {where}: {got_b:g} B/elem, expected {want_b}")
        if not loops:
            failures.append("vec128: no loop with a 128-bit global access")
        scaled = kernel_scaled(mangled)
        want = {(a, scaled) for a in ((False, True) if has_max else (False,))}
        for kind in sorted(want - set(kinds)):
            failures.append(f"vec128: no {_kind_text(kind)} vector loop "
                            f"({STREAMS[kind][0]} loads / {STREAMS[kind][1]} stores)")
        if not has_max and any(a for a, _ in kinds):
            failures.append("vec128: an amsgrad loop in a HAS_MAX=false kernel")
        if any(sc != scaled for _, sc in kinds):
            failures.append(f"vec128: a {'non-' if scaled else ''}GradScaler loop in a "
                            f"SCALED={'true' if scaled else 'false'} kernel")
    return Result(arch, mangled, kernel, regs, bound, ptxas_cap, min_blocks, stack, local,
                  local_insns, loops, elems, has_max, failures)


def check_lowp_loops(pair: tuple[str, str], loops: list[Loop]) -> list[str]:
    """vec128, global and bytes of an adamw_lowp_kernel<T, S>'s vector loops: each loop makes
    only 128-bit global accesses in the counts of some (mode, amsgrad, scaled) of lowp_expected
    (times an unroll), moving its formula's bytes per element, and every expected loop is there
    (loops of equal counts matched by number: the bfloat16 kahan and remainder loops move the
    same vectors)."""
    t, s = pair
    expected = lowp_expected(t, s)
    signatures = set(expected.values())
    failures, found = [], []
    for lp in loops:
        where = f"loop {lp.start:#x}-{lp.end:#x}"
        if lp.narrow:
            failures.append(f"vec128: {where} has non-128-bit accesses {sorted(set(lp.narrow))}")
        if lp.generic128:
            failures.append(f"global: {where}: {lp.generic128} of {lp.load128 + lp.store128} "
                            "128-bit accesses are generic LD/ST, not LDG/STG")
        unroll = next((u for u in range(1, 9) if lp.load128 % u == 0 and lp.store128 % u == 0
                       and (lp.load128 // u, lp.store128 // u) in signatures), None)
        if unroll is None:
            failures.append(f"vec128: {where} has {lp.load128} 128-bit loads and {lp.store128} "
                            f"stores: no low-precision loop of {SHORT[t]}/{SHORT[s]} has "
                            f"those (want one of {sorted(signatures)}, times an unroll)")
            continue
        ld, st = lp.load128 // unroll, lp.store128 // unroll
        found.append((ld, st))
        lp.lowp_unroll = unroll
        want_b = 16 * (ld + st) / LOWP_GROUP
        got_b = lp.bytes / (LOWP_GROUP * unroll)
        if got_b != want_b:
            failures.append(f"bytes: {where}: {got_b:g} B/elem, expected {want_b:g}")
    for sig in sorted(signatures):
        kinds = sorted(k for k, v in expected.items() if v == sig)
        have = found.count(sig)
        if have < len(kinds):
            names = ", ".join(f"{m}{' amsgrad' if a else ''}{' GradScaler' if sc else ''}"
                              for m, a, sc in kinds)
            failures.append(f"vec128: {have} vector loop(s) of {sig[0]} loads / {sig[1]} stores,"
                            f" expected {len(kinds)} ({names})")
    return failures


def check_binary(binary: Path, cuobjdump: str, nvdisasm: str | None,
                 archs: list[str] | None = None, ptx_text: str | None = None) -> list[Result]:
    """Every kernel of every SASS arch in ``binary`` (restricted to ``archs``, e.g. ["sm_90"])."""
    sass = parse_sass(_cuobjdump(cuobjdump, nvdisasm, binary, "-sass"))
    res = parse_res_usage(_cuobjdump(cuobjdump, nvdisasm, binary, "-res-usage"))
    maxreg = parse_elf_maxreg(_cuobjdump(cuobjdump, nvdisasm, binary, "-elf"))
    if ptx_text is None:
        try:
            ptx_text = _cuobjdump(cuobjdump, nvdisasm, binary, "-ptx")
        except RuntimeError:
            ptx_text = ""
    bounds = parse_ptx_bounds(ptx_text)
    results = []
    for (arch, fn), insns in sass.items():
        if archs is not None and arch not in archs:
            continue
        if "adamw" not in fn:
            continue
        results.append(check_function(arch, fn, insns, res.get((arch, fn), {}),
                                      maxreg.get((arch, fn)), bounds.get(fn) if bounds else None))
    for arch in sorted({r.arch for r in results}, key=_arch_key):
        have = {r.kernel for r in results if r.arch == arch}
        for k in EXPECTED_KERNELS:
            if k not in have:
                results.append(Result(arch, k, k, -1, 0, None, None, -1, -1, 0, [], None, None,
                                      [f"missing: no SASS for {k}"]))
    if not results:
        raise RuntimeError(f"no adamw kernel SASS in {binary}" +
                           (f" for {', '.join(archs)}" if archs else ""))
    order = {k: i for i, k in enumerate(EXPECTED_KERNELS)}
    results.sort(key=lambda r: (_arch_key(r.arch), order.get(r.kernel, len(order)), r.kernel))
    return results


def _arch_key(arch: str) -> int:
    m = re.search(r"(\d+)", arch or "")
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def _kernel_cell(r: Result) -> str:
    if r.has_max is None or not r.kernel.startswith("adamw_kernel<"):
        return r.kernel
    t, _, scaled = r.kernel[len("adamw_kernel<"):-1].split(", ")
    return f"{SHORT[t]}, HAS_MAX={'true' if r.has_max else 'false'}, SCALED={scaled}"


def table(results: list[Result]) -> str:
    head = ("| arch | kernel | regs | bound | stack | LDL/STL | vector loop(s): 128-bit accesses "
            "| B/elem | result |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bound = f"{r.bound}" + (f" (ptxas {r.ptxas_cap})" if r.ptxas_cap is not None and
                                r.ptxas_cap != r.bound else "")
        result = "ok" if r.ok else "FAIL: " + "; ".join(f.split(":")[0] for f in r.failures)
        lines.append(f"| {r.arch} | {_kernel_cell(r)} | {r.regs} | {bound} | {r.stack} | "
                     f"{r.local_insns} | {r.loops_text()} | {r.bytes_text()} | {result} |")
    return "\n".join(lines)


def notes_block(results: list[Result], how: str) -> str:
    return (f"{NOTES_BEGIN}\n<!-- generated by `{how}`; do not edit by hand -->\n\n"
            f"{table(results)}\n\n{NOTES_END}")


def write_notes(results: list[Result], how: str, path: Path = NOTES) -> None:
    text = path.read_text()
    block = notes_block(results, how)
    if NOTES_BEGIN in text and NOTES_END in text:
        a = text.index(NOTES_BEGIN)
        b = text.index(NOTES_END) + len(NOTES_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def run(binary: Path | None, compile_archs: str | None, archs: list[str] | None = None,
        work: Path | None = None) -> tuple[list[Result], str]:
    cuobjdump, nvdisasm = find_tools()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit, pip install nvidia-cuda-cuobjdump, "
                           "or triton)")
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found (cuobjdump -sass needs it: CUDA toolkit, pip install"
                           " nvidia-cuda-nvdisasm, or triton)")
    if compile_archs is not None:
        parsed = parse_archs(compile_archs)
        if not any(p for _, p in parsed):  # PTX of one arch, for the declared launch bounds
            parsed[-1] = (parsed[-1][0], True)  # (free: nvcc makes it for ptxas anyway)
        with tempfile.TemporaryDirectory() as d:
            obj = compile_kernel(parsed, (work or Path(d)) / "adamw_kernel.o")
            results = check_binary(obj, cuobjdump, nvdisasm, archs)
        how = f"python tests/sass_check.py --compile \"{compile_archs}\" --write-notes"
    else:
        results = check_binary(binary, cuobjdump, nvdisasm, archs)
        how = f"python tests/sass_check.py --so {binary.name} --write-notes"
    return results, how


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--so", type=Path, help="a binary holding the kernel (the built _C*.so, .o)")
    src.add_argument("--compile", metavar="ARCHS",
                     help='compile kernels/adamw_kernel.cu with setup.py\'s flags, e.g. "90" or '
                          '"80;86;89;90;100;120" ("default": setup.py\'s default list)')
    ap.add_argument("--arch", action="append", help="only these SASS archs (e.g. 90); repeatable")
    ap.add_argument("--write-notes", action="store_true",
                    help=f"write the table into {NOTES.relative_to(ROOT)} between "
                         f"{NOTES_BEGIN} and {NOTES_END}")
    args = ap.parse_args(argv)
    compile_archs = args.compile
    if compile_archs == "default":
        compile_archs = ";".join(default_archs())
    archs = [f"sm_{a.replace('sm_', '')}" for a in args.arch] if args.arch else None
    results, how = run(args.so, compile_archs, archs)
    print(table(results))
    bad = [r for r in results if not r.ok]
    for r in bad:
        for f in r.failures:
            print(f"FAIL {r.arch} {r.kernel}: {f}")
    if args.write_notes:
        write_notes(results, how)
        print(f"wrote {NOTES.relative_to(ROOT)}")
    print(f"{len(results) - len(bad)}/{len(results)} kernel images pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
