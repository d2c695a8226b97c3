"""The Triton kernels' compiled GPU form, without a GPU (issue #18 item 4).

Triton compiles for a target with no device present (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``, its bundled ptxas and cuobjdump). Every variant that
``triton_adamw.launch`` can compile without track_norms, and a sample of those with it
(``triton_adamw.variants()``, with the constexprs launch passes, ``kernel_constexprs``; all
track_norms variants with ``--all-norms``) is compiled for sm_90 and checked:

- **spills**: no local memory and no stack frame (cuobjdump ``-res-usage``: ``LOCAL:0``,
  ``STACK:0``);
- **occupancy**: its registers let at least ``MIN_WARPS_PER_SM`` warps (blocks of ``num_warps``)
  reside on an SM, the CUDA kernel's 50% (4 blocks of 256 threads, kernels/adamw_kernel.cu), or
  ``occupancy_note`` says why not (and at least ``MIN_WARPS_NOTED``);
- **vector width**: the PTX's global accesses counted by width; the aligned body must use
  128-bit ones (``ld.global.v4.b32`` and the like, issue #21 item 2).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (CI runs the suite interpreted,
and an interpreted module has no compilable kernels), in parallel, once per session.
``python tests/test_triton_compile.py --report`` prints the table; ``--write-notes`` rewrites
it in kernels/NOTES.md (the Triton section).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "kernels" / "NOTES.md"
TARGET = ("cuda", 90, 32)  # sm_90 (H100/H200), 32 threads per warp

# H100 (sm_90): 65536 registers and 64 warps per SM, registers allocated per warp in units of
# 256 (8 per thread).
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS, REG_UNIT = 65536, 64, 32, 256
MIN_WARPS_PER_SM = 32  # the CUDA kernel's plain launch bounds: 4 blocks x 8 warps, 50%

MIN_WARPS_NOTED = 16  # the floor of the variants occupancy_note excuses (25%)
# track_norms with 16-bit params and a master mode (or fp32 amsgrad moments): 139-158
# registers, one block of 8 warps (12.5%) rather than spills at 128 (triton_adamw.max_registers)
MIN_WARPS_NORMS_HEAVY = 8


def occupancy_note(v: list[str]) -> str | None:
    """Why variant ``v`` (variant_key) may reside with fewer than MIN_WARPS_PER_SM warps, or
    None: it may not. The numbers are in kernels/NOTES.md's Triton table."""
    dtype, state_dtype, has_max, _, scaled = v[:5]
    if v[7] == "True":
        return ("track_norms: the param before the step and three lanes stay live beside the "
                "update, in whole lane rounds (8 warps, 4 for float32 params with 16-bit "
                "moments): 96-128 registers without spills (triton_adamw.max_registers), 16 "
                "warps, or 168 and 8 warps for 16-bit params with a master mode or fp32 "
                "amsgrad moments; the variant runs only when norms are asked for")
    if dtype == state_dtype == "torch.float32":
        if has_max == scaled == "True":
            return ("amsgrad with GradScaler: 5 buffers in and the unscaled grad out; ptxas "
                    "spills at 64 and 80 registers, fits 96 (20 warps); the CUDA kernel's own "
                    "bound for it is 2 blocks of 8 warps (16)")
        if has_max == v[6] == "True":
            return ("amsgrad with the clip coefficient: ptxas spills at 64 and 80 registers, "
                    "fits 96 (20 warps), as amsgrad with GradScaler")
        return None
    return ("a 16-bit buffer: a thread holds one 16-byte vector of it, 8 elements, and Triton "
            "converts all of them to fp32 at once (8 registers per buffer; the CUDA kernel "
            "updates a vector one 32-bit word at a time in place): 73-80 registers without "
            "spills, 24 warps (37.5%, the CUDA kernel's amsgrad bound); master modes, or fp32 "
            "moments beside 16-bit params with amsgrad, need 96-128 (20-16 warps)")


def warps_per_sm(regs: int, num_warps: int) -> int:
    """Warps of blocks of ``num_warps`` warps that fit an SM with ``regs`` registers a thread."""
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(SM_MAX_BLOCKS, SM_MAX_WARPS // num_warps,
                 SM_REGISTERS // (per_warp * num_warps))
    return blocks * num_warps


def variant_key(v) -> list[str]:
    """A Variant as JSON can hold it (its fields as strings)."""
    return [str(x) for x in v]


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")


def access_widths(ptx: str) -> Counter:
    """Global loads and stores of ``ptx`` by width in bits: {("ld", 128): n, ...}."""
    out = Counter()
    for op, mods in _ACCESS.findall(ptx):
        parts = mods.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu](8|16|32|64)", p)), 0)
        out[(op, vec * bits)] += 1
    return out


# ---------------------------------------------------------------- the compiles (subprocess)


def _cases(all_norms: bool = False):
    """(name, kernel name, variant_key or None, signature, constexprs, options) of every
    compile (``all_norms``: every track_norms variant, not only ``NORMS_SAMPLE``)."""
    import torch
    import triton.language as tl

    from fused_adamw.backends import triton_adamw as ta
    from fused_adamw import _table

    cases = []
    for found in (False, True):
        sig = {"rows_ptr": "*i64", "n_rows": "i64",
               "found_inf_ptr": "*fp32" if found else "constexpr",
               "ROW_COLS": "constexpr", "BLOCK_SIZE": "constexpr"}
        const = dict(ROW_COLS=_table.ROW_COLS, BLOCK_SIZE=ta._STEPS_BLOCK)
        if not found:
            const["found_inf_ptr"] = None
        cases.append((f"steps{', found_inf' if found else ''}", "adamw_steps_kernel", None,
                      sig, const, {}))
    cases.append(("row norms", "adamw_row_norms_kernel", None,
                  {"tiles_ptr": "*fp32", "tile_starts_ptr": "*i64", "out_ptr": "*fp32",
                   "n_rows": "i64"}, {}, {}))
    # Clipping's norm pass (backends/triton_norm.py, launched as grad_norm_rows does): each
    # grad dtype, GradScaler's pointer or not, the L2 and the inf norm, in 4 compiles, and
    # its two reductions.
    from fused_adamw.backends import triton_norm as tn
    tls = {"fp32": (tl.float32, 4), "bf16": (tl.bfloat16, 2), "fp16": (tl.float16, 2)}
    for dname, scaled, inf in (("fp32", False, False), ("fp32", True, True),
                               ("bf16", True, False), ("fp16", False, True)):
        dtype, size = tls[dname]
        sig = {"rows_ptr": "*i64", "tile_starts_ptr": "*i64", "n_rows": "i64",
               "grad_scale_ptr": "*fp32" if scaled else "constexpr", "out_ptr": "*fp32"}
        const = dict(DTYPE=dtype, ELEM_BYTES=size, N=16 // size, INF=inf,
                     ROW_COLS=_table.ROW_COLS, TILE_ELEMS=_table.TILE_ELEMS, LANES=tn.LANES)
        sig.update({k: "constexpr" for k in const})
        if not scaled:
            const["grad_scale_ptr"] = None
        cases.append((f"norm pass, {dname}" + (", grad_scale" if scaled else "")
                      + (", inf" if inf else ""), "triton_norm.adamw_norm_lanes_kernel", None,
                      sig, const, {"enable_fp_fusion": False}))
    for inf in (False, True):
        cases.append((f"norm rows{', inf' if inf else ''}", "triton_norm.adamw_norm_rows_kernel",
                      None, {"tiles_ptr": "*fp32", "tile_starts_ptr": "*i64", "out_ptr": "*fp64",
                             "INF": "constexpr"}, {"INF": inf}, {}))
        cases.append((f"norm total{', inf' if inf else ''}",
                      "triton_norm.adamw_norm_total_kernel", None,
                      {"out_ptr": "*fp64", "n_rows": "i64", "INF": "constexpr"}, {"INF": inf},
                      {}))
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for v in ta.variants(all_norms):
        const = ta.kernel_constexprs(v, interpret=False)
        sig = {"rows_ptr": "*i64", "tile_starts_ptr": "*i64", "hparams_ptr": "*fp32",
               "n_rows": "i64",
               "grad_scale_ptr": "*fp32" if v.scaled else "constexpr",
               "found_inf_ptr": "*fp32" if v.skippable else "constexpr",
               "clip_coef_ptr": "*fp32" if v.clipped else "constexpr",
               "tile_norms_ptr": "*fp32" if v.norms else "constexpr"}
        sig.update({k: "constexpr" for k in const})
        if not v.scaled:
            const["grad_scale_ptr"] = None
        if not v.skippable:
            const["found_inf_ptr"] = None
        if not v.clipped:
            const["clip_coef_ptr"] = None
        if not v.norms:
            const["tile_norms_ptr"] = None
        name = (f"{names[v.dtype]}" + (f" / {names[v.state_dtype]} state"
                                       if v.state_dtype != v.dtype else "")
                + (", amsgrad" if v.has_max else "") + (", master" if v.has_master else "")
                + (", grad_scale" if v.scaled else "") + (", found_inf" if v.skippable else "")
                + (", clip" if v.clipped else "") + (", track_norms" if v.norms else ""))
        cases.append((name, "adamw_kernel", variant_key(v), sig, const,
                      ta.launch_options(v, interpret=False)))
    return cases


def _compile(i: int, all_norms: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_adamw.backends import triton_adamw as ta

    name, kernel, v, sig, const, options = _cases(all_norms)[i]
    module, _, attr = kernel.rpartition(".")
    fn = getattr(importlib.import_module(f"fused_adamw.backends.{module}") if module else ta,
                 attr)
    compiled = triton.compile(ASTSource(fn, sig, const), target=GPUTarget(*TARGET),
                              options=options)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"fused_adamw_triton_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()
    res = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    widths = access_widths(compiled.asm["ptx"])
    return dict(name=name, kernel=kernel, variant=v, num_warps=compiled.metadata.num_warps,
                maxnreg=options.get("maxnreg"),
                regs=int(res["REG"]), stack=int(res["STACK"]), local=int(res["LOCAL"]),
                widths={f"{op}{bits}": n for (op, bits), n in sorted(widths.items())})


def compile_all(jobs: int | None = None, all_norms: bool = False) -> list[dict]:
    """Compiles every case, ``jobs`` processes at a time (default: the CPUs)."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(_cases(all_norms))
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile(i, all_norms) for i in range(n)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(functools.partial(_compile, all_norms=all_norms), range(n)))


def report(results: list[dict]) -> str:
    """The markdown table of kernels/NOTES.md's Triton section."""
    cols = ["ld16", "ld32", "ld64", "ld128", "st16", "st32", "st64", "st128"]
    lines = ["| kernel | regs (cap) | warps/SM | stack+local | "
             + " | ".join(c.replace("ld", "ld ").replace("st", "st ") for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for r in results:
        cap = f" ({r['maxnreg']})" if r["maxnreg"] else ""
        lines.append(f"| {r['name']} | {r['regs']}{cap} | "
                     f"{warps_per_sm(r['regs'], r['num_warps'])}"
                     f" | {r['stack'] + r['local']} | "
                     + " | ".join(str(r["widths"].get(c, 0)) for c in cols) + " |")
    return "\n".join(lines)


_BEGIN, _END = "<!-- triton-table:begin -->", "<!-- triton-table:end -->"


def write_notes(results: list[dict]) -> None:
    text = NOTES.read_text()
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    body = ("\n<!-- generated by `python tests/test_triton_compile.py --write-notes`; do not "
            "edit by hand -->\n\n" + report(results) + "\n\n")
    NOTES.write_text(text[:start] + body + text[end:])


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    results = compile_all(all_norms="--all-norms" in argv)
    if "--json" in argv or "--background" in argv:  # --background: tests/_background.py
        print(json.dumps(results))
        return 0
    if "--write-notes" in argv:
        write_notes(results)
    print(report(results))
    print(f"\n{len(results)} kernels compiled for sm_{TARGET[1]} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        import fused_adamw  # noqa: F401  (installed, or on PYTHONPATH)
    except ImportError:
        sys.path.insert(0, str(ROOT / "python"))
    raise SystemExit(main(sys.argv[1:]))


# ---------------------------------------------------------------- the tests

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install "
                    "\"fused-adamw[triton]\"): nothing to compile")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    # `python this_file --background` without TRITON_INTERPRET, started when the session
    # started (tests/_background.py), or now.
    import _background
    return _background.run("triton_compile", timeout=900)


def test_every_variant_compiles(compiled):
    from fused_adamw.backends import triton_adamw as ta

    got = {tuple(r["variant"]) for r in compiled if r["kernel"] == "adamw_kernel"}
    assert got == {tuple(variant_key(v)) for v in ta.variants()}
    # 6 (dtype, state dtype) pairs x amsgrad x GradScaler's 2 pointers, x master for the 4
    # 16-bit pairs (80), x clipping; and the track_norms sample (not 160 more: CI time)
    assert len(got) == 160 + len(ta.NORMS_SAMPLE) == 165
    assert {r["kernel"] for r in compiled} == {
        "adamw_kernel", "adamw_steps_kernel", "adamw_row_norms_kernel",
        "triton_norm.adamw_norm_lanes_kernel", "triton_norm.adamw_norm_rows_kernel",
        "triton_norm.adamw_norm_total_kernel"}


def test_no_spills(compiled):
    bad = [(r["name"], r["stack"], r["local"]) for r in compiled if r["stack"] or r["local"]]
    assert not bad, f"stack frame / local memory (spills): {bad}"


def test_registers_allow_occupancy(compiled):
    """MIN_WARPS_PER_SM warps per SM, or the variant's occupancy_note and MIN_WARPS_NOTED
    (MIN_WARPS_NORMS_HEAVY for the track_norms variants capped above 128)."""
    bad = []
    for r in compiled:
        warps = warps_per_sm(r["regs"], r["num_warps"])
        need = MIN_WARPS_NOTED if r["variant"] and occupancy_note(r["variant"]) else \
            MIN_WARPS_PER_SM
        if r["variant"] and r["variant"][7] == "True" and r["maxnreg"] > 128:
            need = MIN_WARPS_NORMS_HEAVY
        if warps < need:
            bad.append((r["name"], r["regs"], warps, need))
    assert not bad, f"(kernel, registers, warps per SM, needed): {bad}"


def test_body_accesses_are_128_bit(compiled):
    """Issue #21 item 2: the aligned body reads and writes every buffer 16 bytes at a time:
    at least one 128-bit load per buffer read (param, grad, moments, amsgrad's max) and one
    128-bit store per buffer written (the grad too under GradScaler). Without the alignment
    hints (tl.multiple_of on the grid bases) there are none (tried)."""
    bad = []
    for r in compiled:
        if r["kernel"] != "adamw_kernel":
            continue
        _, _, has_max, _, scaled = r["variant"][:5]
        loads = 4 + (has_max == "True")
        stores = 3 + (has_max == "True") + (scaled == "True")
        got = (r["widths"].get("ld128", 0), r["widths"].get("st128", 0))
        if got[0] < loads or got[1] < stores:
            bad.append((r["name"], got, (loads, stores)))
    assert not bad, f"(kernel, 128-bit (loads, stores), at least): {bad}"


def test_occupancy_model():
    """The register model against the CUDA kernel's numbers (NOTES.md's SASS table: 64
    registers for 4 blocks of 256 threads, 80 for 3)."""
    assert warps_per_sm(64, 8) == 32 and warps_per_sm(65, 8) == 24
    assert warps_per_sm(80, 8) == 24 and warps_per_sm(32, 4) == 64
    assert warps_per_sm(118, 4) == 16


def test_access_widths_parser():
    ptx = ("ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n"
           "@%p1 ld.global.L1::evict_last.b64 %rd2, [%rd3];\n"
           "st.global.b16 [%rd4], %rs1;\n st.global.v2.b32 [%rd5], {%r5, %r6};")
    assert access_widths(ptx) == Counter({("ld", 128): 1, ("ld", 64): 1, ("st", 16): 1,
                                          ("st", 64): 1})


# ---------------------------------------------------------------- what Triton specialises on


def _binder(kernel):
    """Triton's own argument binder of ``kernel`` for sm_90: returns, for a call's arguments,
    its specialisation, the key of the compiled kernel (JITFunction.run)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # interpreted: the same decorator arguments
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(kernel.signature, kernel.params,
                                          make_backend(GPUTarget(*TARGET)))


def _fake_table(dtype, n_rows: int, odd_hparams: bool, odd_amp: bool, amp: bool,
                norms: bool = False):
    """A table of ``n_rows`` rows (fake addresses, never launched) whose tensors' alignment
    varies: hparams, GradScaler's values and the clip coefficient 4 bytes past a 16-byte
    boundary when ``odd_*``."""
    import torch

    from fused_adamw import _table

    t = _table.Table(torch.device("cpu"), dtype, [], [], [])
    rows = [(4096 * (i + 1), 8192 * (i + 1), 0, 0, 0, 0, 16 + i, 0) for i in range(n_rows)]
    t.packed, t.n_tiles = _table.pack_table(rows, t.itemsize)
    t.n_rows = n_rows
    t.host_hparams = [[0.0] * _table.HPARAM_COLS]
    t.hparams = torch.zeros(1 + _table.HPARAM_COLS)[int(odd_hparams):][:_table.HPARAM_COLS]
    if amp:
        buf = torch.ones(8)
        t.grad_scale, t.found_inf = buf[int(odd_amp):][:1], buf[4:][:1] * 0
        t.clip_coef = buf[4 + int(odd_amp):][:1]
    if norms:  # track_norms: row_norms (and the kernel's scratch, triton_adamw.tile_norms)
        t.row_norms = torch.zeros(n_rows, 3)
    return t


def test_variant_is_what_triton_specialises_on():
    """Issue #18's capture hazard: Triton compiles another kernel for n_rows == 1, integers
    divisible by 16 and 16-byte aligned pointers (tile_starts is aligned for even n_rows only).
    Tables of one variant() in every such shape must bind to one specialisation (one compiled
    kernel), else a capture could compile. Fails without the kernels' do_not_specialize
    arguments (tried: 6 specialisations of the plain fp32 variant without adamw_kernel's)."""
    import torch

    from fused_adamw.backends import triton_adamw as ta

    steps, update = _binder(ta.adamw_steps_kernel), _binder(ta.adamw_kernel)
    rows = _binder(ta.adamw_row_norms_kernel)
    for dtype in (torch.float32, torch.bfloat16):
        for amp, norms in ((False, False), (True, False), (True, True)):
            keys = {}
            for n_rows in (1, 2, 3, 16, 17, 32):
                for odd_hparams in (False, True):
                    for odd_amp in ((False, True) if amp else (False,)):
                        t = _fake_table(dtype, n_rows, odd_hparams, odd_amp, amp, norms)
                        v = ta.variant(t)
                        steps_args, update_args = ta.kernel_args(t)
                        key = (str(steps(*steps_args, ROW_COLS=ta._table.ROW_COLS,
                                         BLOCK_SIZE=ta._STEPS_BLOCK)[1]),
                               str(update(*update_args, **ta.kernel_constexprs(v[1], False))[1]))
                        if norms:
                            key += (str(rows(update_args[-1], update_args[1], t.row_norms,
                                             t.n_rows)[1]),)
                        keys.setdefault(v, set()).add(key)
            assert len(keys) == 1, keys.keys()
            (v, specs), = keys.items()
            assert len(specs) == 1, f"{v}: {len(specs)} specialisations: {sorted(specs)}"
