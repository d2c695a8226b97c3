"""The CUDA kernel's SASS, checked on every CI run without a GPU (tests/sass_check.py).

For sm_90 and every arch of setup.py's default list, every instantiation: no local memory,
registers within the launch bound, a 128-bit vector main loop of global loads and stores, and
the loop's global bytes per element equal to the formula (28 / 14 B per fp32 / 16-bit element,
36 / 18 with amsgrad); the low-precision kernels one such loop per master mode, each with its
streams' counts and bytes (sass_check.lowp_streams). The binary is the built extension (CI
installs the wheel, built for the default archs) where it holds those archs; archs it lacks are
compiled here with setup.py's nvcc flags. Two deliberately broken copies of the kernel show that the checker can fail.

Skips with the reason when cuobjdump / nvdisasm (CUDA toolkit, the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels, or Triton's copies) or nvcc is missing.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_check as sc  # noqa: E402

CUOBJDUMP, NVDISASM = sc.find_tools()
NVCC = sc.find_nvcc()
NO_TOOLS = ("cuobjdump not found" if CUOBJDUMP is None else
            "nvdisasm not found (cuobjdump -sass needs it)" if NVDISASM is None else None)
needs_tools = pytest.mark.skipif(NO_TOOLS is not None, reason=NO_TOOLS or "")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
MUTANT_ARCH = "90"


def _extension() -> Path | None:
    """The compiled module fused_adamw._C that `import fused_adamw` would load, else the one in
    python/fused_adamw/ (an in-place build)."""
    try:
        spec = importlib.util.find_spec("fused_adamw._C")
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            return Path(spec.origin)
    except Exception:  # noqa: BLE001 - the package does not import: look in the tree
        pass
    found = sorted((sc.ROOT / "python" / "fused_adamw").glob("_C*.so"))
    return found[0] if found else None


def _sass_archs(binary: Path) -> set[str]:
    """The archs ("90") with SASS in ``binary`` (cuobjdump -lelf)."""
    r = subprocess.run([CUOBJDUMP, "-lelf", str(binary)], capture_output=True, text=True)
    return set(re.findall(r"\.sm_(\d+[af]?)\.cubin", r.stdout))


def _results(tmp: Path) -> tuple[list[sc.Result] | None, str]:
    """(every kernel's Result, the printed table), or (None, why it cannot run here)."""
    if NO_TOOLS:
        return None, NO_TOOLS
    so = _extension()
    have = _sass_archs(so) if so else set()
    if NVCC is not None:
        want = set(sc.default_archs()) | {"90"}
    elif have:
        want = have | {"90"}
    else:
        return None, "nvcc not found and no built extension with CUDA"
    out: list[sc.Result] = []
    from_so = sorted(want & have, key=int)
    missing = sorted(want - have, key=int)
    if missing and NVCC is None:
        return None, f"nvcc not found, and {so} lacks sm_{', sm_'.join(missing)}"
    if from_so:
        out += sc.check_binary(so, CUOBJDUMP, NVDISASM, archs=[f"sm_{a}" for a in from_so])
    if missing:
        archs = [(a, a == missing[-1]) for a in missing]  # PTX of one, for the launch bounds
        obj = sc.compile_kernel(archs, tmp / "adamw_kernel.o")
        out += sc.check_binary(obj, CUOBJDUMP, NVDISASM)
    printed = (f"SASS of {so if from_so else 'nvcc -c'} for sm_{', sm_'.join(from_so)}"
               + (f"; compiled here: sm_{', sm_'.join(missing)}" if missing else "")
               + "\n" + sc.table(out))
    return out, printed


def _job() -> dict:
    """What the fixtures check, computed in one process: ``python tests/test_sass.py
    --background`` (started with the session: tests/_background.py). Results are pickled."""
    import base64
    import pickle
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results, printed = _results(Path(d))
        mutants = mutant_results(Path(d)) if NO_TOOLS is None and NVCC is not None else None
    blob = base64.b64encode(pickle.dumps((results, printed, mutants))).decode()
    return {"pickle": blob}


@pytest.fixture(scope="module")
def sass_job() -> tuple:
    import base64
    import pickle

    import _background
    return pickle.loads(base64.b64decode(_background.run("sass", timeout=1200)["pickle"]))


@pytest.fixture(scope="module")
def results(sass_job) -> list[sc.Result]:
    out, printed = sass_job[0], sass_job[1]
    if out is None:
        pytest.skip(printed)
    print()
    print(printed)
    return out


def _failures(results, *prefixes: str) -> list[str]:
    return [f"{r.arch} {r.kernel}: {f}" for r in results for f in r.failures
            if f.startswith(prefixes)]


def _assert_none(results, *prefixes: str) -> None:
    fails = _failures(results, *prefixes)
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails)


@needs_tools
def test_every_kernel_of_every_arch(results):
    archs = {r.arch for r in results}
    assert "sm_90" in archs
    if NVCC is not None:
        assert {f"sm_{a}" for a in sc.default_archs()} <= archs
    for arch in archs:
        kernels = sorted(r.kernel for r in results if r.arch == arch and r.regs >= 0)
        assert kernels == sorted(sc.EXPECTED_KERNELS), arch
    _assert_none(results, "missing")


@needs_tools
def test_no_local_memory(results):
    """No spill, no stack frame: no LDL/STL, STACK:0, LOCAL:0."""
    _assert_none(results, "local memory")


@needs_tools
def test_registers_within_launch_bound(results):
    """REG <= 65536 / (256 x min blocks per SM), min blocks 4 (3 with a max buffer), and the
    source declares exactly that bound."""
    _assert_none(results, "registers", "launch bound")


@needs_tools
def test_vector_loop_is_128_bit(results):
    """The vector main loop: only 128-bit accesses, 4 loads / 3 stores (5 / 4 with amsgrad)."""
    _assert_none(results, "vec128")


@needs_tools
def test_vector_loop_bytes_per_element(results):
    _assert_none(results, "bytes")
    for r in results:
        if r.has_max is None:
            continue
        size = 4 if r.elems == 4 else 2
        got = sorted({float(b) for b in r.bytes_text().split(", ")})
        # SCALED and the NORMS kernels (GradScaler's loop form): the grad stored back
        extra = 1.0 if r.kernel.endswith(", true>") or sc.kernel_norms(r.mangled) else 0.0
        want = sorted({(7.0 + extra) * size, (9.0 + extra) * size} if r.has_max
                      else {(7.0 + extra) * size})
        assert got == want, (r.arch, r.kernel, got)


@needs_tools
def test_lowp_vector_loops(results):
    """Each low-precision kernel has one 128-bit loop per master mode its params take, moving
    that mode's bytes per element (e.g. bf16 params, fp32 moments, fp32 master: 30 B)."""
    lowp = [r for r in results if r.lowp and not sc.kernel_norms(r.mangled)]
    assert {r.kernel for r in lowp} == {f"adamw_lowp_kernel<{t}, {s}, false>"
                                        for t, s in sc.LOWP_PAIRS}
    for r in lowp:
        t, s = sc.kernel_lowp(r.mangled)
        want = sorted(16 * (ld + st) / sc.LOWP_GROUP for ld, st in sc.lowp_expected(t, s).values())
        got = sorted(float(b) for b in r.bytes_text().split(", "))
        assert got == want, (r.arch, r.kernel, got, r.failures)


@needs_tools
def test_vector_loop_is_global_space(results):
    """LDG/STG (any modifiers), not generic LD/ST: the 128-bit accesses of the vector loop go to
    global memory by instruction, not through a generic address."""
    _assert_none(results, "global")


# ------------------------------------------------------------------------------------------
# the checker must be able to fail: two broken copies of the kernel
# ------------------------------------------------------------------------------------------

_BOUNDS = re.compile(r"__launch_bounds__\(")


def _launch_bounds_span(src: str) -> tuple[int, int]:
    """[start, end) of adamw_kernel's ``__launch_bounds__(...)`` in the source."""
    for m in _BOUNDS.finditer(src):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
            if depth == 0:
                break
        if re.match(r"\s*adamw_kernel\(", src[i:]):
            return m.start(), i
    raise AssertionError("tests/test_sass.py: no `__launch_bounds__(...) adamw_kernel(` in "
                         "kernels/adamw_kernel.cu any more: update the mutations")


def mutant_spills(src: str) -> str:
    """adamw_kernel bounded at 8 blocks of 256 per SM: 32 registers, which must spill."""
    a, b = _launch_bounds_span(src)
    return src[:a] + "__launch_bounds__(256, 8)" + src[b:]


def mutant_narrow_store(src: str) -> str:
    """adamw_kernel without launch bounds, and the vector loop's param store done as four 32-bit
    (volatile, so not merged back) stores; so are the low-precision loops' stores (Lanes)."""
    a, b = _launch_bounds_span(src)
    src = src[:a] + src[b:]
    store = re.compile(r"^(\s*)store_global\(param \+ v, rp\);", re.M)
    if not store.search(src):
        raise AssertionError("tests/test_sass.py: no `store_global(param + v, rp);` in "
                             "kernels/adamw_kernel.cu any more: update the mutation")
    src = store.sub(
        r"\1{ volatile unsigned int* p32 = reinterpret_cast<volatile unsigned int*>(param + v);"
        r" p32[0] = rp.x; p32[1] = rp.y; p32[2] = rp.z; p32[3] = rp.w; }", src, count=1)
    lanes = "      store_global(p + k, r[k]);\n"
    if src.count(lanes) != 1:
        raise AssertionError("tests/test_sass.py: no `store_global(p + k, r[k]);` (Lanes) in "
                             "kernels/adamw_kernel.cu any more: update the mutation")
    return src.replace(lanes, "      { volatile unsigned int* p32 = reinterpret_cast<volatile "
                       "unsigned int*>(p + k); p32[0] = r[k].x; p32[1] = r[k].y; "
                       "p32[2] = r[k].z; p32[3] = r[k].w; }\n")


def mutant_results(d: Path) -> dict[str, list[sc.Result]]:
    src = sc.KERNEL_SRC.read_text()
    jobs = {}
    for name, mutate in (("spills", mutant_spills), ("narrow", mutant_narrow_store)):
        cu = d / f"{name}.cu"  # its includes resolve through setup.py's -I kernels/
        cu.write_text(mutate(src))
        jobs[name] = cu

    def build(name):
        obj = sc.compile_kernel([(MUTANT_ARCH, True)], d / f"{name}.o", src=jobs[name])
        return sc.check_binary(obj, CUOBJDUMP, NVDISASM)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two nvcc at once
        return dict(zip(jobs, pool.map(build, jobs)))


@pytest.fixture(scope="module")
def mutants(sass_job) -> dict[str, list[sc.Result]]:
    if NO_TOOLS:
        pytest.skip(NO_TOOLS)
    if NVCC is None:
        pytest.skip("nvcc not found")
    return sass_job[2]


@needs_tools
@needs_nvcc
def test_checker_reports_spills(mutants):
    res = mutants["spills"]
    print("\n" + sc.table(res))
    for r in res:
        if r.has_max is None or sc.kernel_norms(r.mangled):  # not mutated
            assert r.ok, r.failures
            continue
        assert any(f.startswith("local memory") for f in r.failures), (r.kernel, r.failures)
        assert any(f.startswith("launch bound") for f in r.failures), (r.kernel, r.failures)
        assert r.local_insns > 0 and r.stack > 0


@needs_tools
@needs_nvcc
def test_checker_reports_narrow_stores_and_a_missing_bound(mutants):
    res = mutants["narrow"]
    print("\n" + sc.table(res))
    for r in res:
        if sc.kernel_norms(r.mangled):  # bounds kept; the plain one shares the vector loop
            assert r.ok if r.lowp else any("non-128-bit" in f for f in r.failures), (
                r.kernel, r.failures)
            continue
        if r.lowp:
            assert any(f.startswith("vec128") and "non-128-bit" in f for f in r.failures), (
                r.kernel, r.failures)
            continue
        if r.has_max is None:
            assert r.ok, r.failures
            continue
        vec = [f for f in r.failures if f.startswith("vec128")]
        assert any("non-128-bit" in f for f in vec), (r.kernel, r.failures)
        # The stores left 128-bit count 3: a ratio no kernel may have (or, in GradScaler's
        # kernels, the 4:3 of a loop that does not store the grad back).
        assert any("want a multiple of 4/3 or 5/4" in f
                   or "non-GradScaler loop in a SCALED=true kernel" in f
                   for f in vec), (r.kernel, r.failures)
        assert any(f.startswith("launch bound") for f in r.failures), (r.kernel, r.failures)


# ------------------------------------------------------------------------------------------
# the SASS parser on a hand-written listing (runs without any CUDA tool)
# ------------------------------------------------------------------------------------------

_LISTING = """
Fatbin elf code:
================
arch = sm_90

\t\tFunction : _ZN11fused_adamw12adamw_kernelIfLb0ELb0EEEvNS_11AdamWParamsE
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x0 */
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;         /* 0x0 */
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R8.64] ;   /* 0x0 */
        /*0030*/                   LDG.E.128 R12, desc[UR4][R10.64] ;      /* 0x0 */
        /*0040*/                   LDG.E.128 R16, desc[UR4][R20.64] ;      /* 0x0 */
        /*0050*/                   LDG.E.128 R24, desc[UR4][R22.64] ;      /* 0x0 */
        /*0060*/                   FFMA R4, R4, R5, R6 ;                   /* 0x0 */
        /*0070*/                   STG.E.128.STRONG.GPU desc[UR4][R10.64], R12 ;  /* 0x0 */
        /*0080*/                   STG.E.128 desc[UR4][R20.64], R16 ;      /* 0x0 */
        /*0090*/                   STG.E.128 desc[UR4][R22.64], R24 ;      /* 0x0 */
        /*00a0*/               @!P0 BRA 0x20 ;                             /* 0x0 */
        /*00b0*/                   LDG.E R4, desc[UR4][R8.64] ;            /* 0x0 */
        /*00c0*/                   STG.E desc[UR4][R8.64], R4 ;            /* 0x0 */
        /*00d0*/               @P1 BRA 0xb0 ;                              /* 0x0 */
        /*00e0*/                   EXIT ;                                  /* 0x0 */
"""


def test_parser_finds_the_vector_loop():
    (key, insns), = sc.parse_sass(_LISTING).items()
    assert key[0] == "sm_90"
    loops = sc.vector_loops(insns)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0xa0)]  # not the scalar loop
    (lp,) = loops
    assert (lp.load128, lp.store128, lp.generic128, lp.narrow, lp.bytes) == (4, 3, 0, [], 112)
    assert lp.kind == ((False, False), 1)
    r = sc.check_function("sm_90", key[1], insns, {"REG": 40, "STACK": 0, "LOCAL": 0}, 64,
                          (256, 4))
    assert r.ok, r.failures
    assert r.bytes_text() == "28"
    # GradScaler's kernel (SCALED=true) must store the grad back: 4 loads / 4 stores
    scaled_name = key[1].replace("Lb0ELb0E", "Lb0ELb1E")
    r = sc.check_function("sm_90", scaled_name, insns, {"REG": 40, "STACK": 0, "LOCAL": 0}, 85,
                          (256, 3))  # one block less per SM (EXPECTED_MIN_BLOCKS)
    assert "vec128: no non-amsgrad GradScaler vector loop (4 loads / 4 stores)" in r.failures
    assert "vec128: a non-GradScaler loop in a SCALED=true kernel" in r.failures
    stored = _LISTING.replace("        /*0090*/", "        /*0088*/                   "
                              "STG.E.128 desc[UR4][R8.64], R4 ;   /* 0x0 */\n        /*0090*/")
    (_, insns), = sc.parse_sass(stored).items()
    r = sc.check_function("sm_90", scaled_name, insns, {"REG": 40, "STACK": 0, "LOCAL": 0}, 85,
                          (256, 3))  # one block less per SM (EXPECTED_MIN_BLOCKS)
    assert r.ok, r.failures
    assert r.bytes_text() == "32"
    # a generic store, a spill and a narrow access are each reported
    bad = (_LISTING.replace("STG.E.128 desc[UR4][R20.64]", "ST.E.128 desc[UR4][R20.64]")
           .replace("FFMA R4, R4, R5, R6", "STL [R1], R4"))
    (key, insns), = sc.parse_sass(bad).items()
    r = sc.check_function("sm_90", key[1], insns, {"REG": 70, "STACK": 8, "LOCAL": 0}, 64,
                          (256, 4))
    kinds = sorted({f.split(":")[0] for f in r.failures})
    assert kinds == ["global", "local memory", "registers"], r.failures
    narrow = _LISTING.replace("STG.E.128 desc[UR4][R22.64], R24", "STG.E.64 desc[UR4][R22.64], R24")
    (key, insns), = sc.parse_sass(narrow).items()
    r = sc.check_function("sm_90", key[1], insns, {"REG": 40, "STACK": 0, "LOCAL": 0}, 64,
                          (256, 4))
    assert any("non-128-bit" in f for f in r.failures), r.failures


def test_lowp_loop_check():
    """check_lowp_loops on made-up loops of adamw_lowp_kernel<__nv_bfloat16, __nv_bfloat16>
    (runs without any CUDA tool): the expected set passes; a missing loop, a loop of another
    stream count, a narrow access and a generic access are each reported."""
    def loop(ld, st, narrow=(), generic=0):
        lp = sc.Loop(0x100, 0x200, [], ld, st, generic, list(narrow))
        lp.bytes = 16 * (ld + st) + sum(sc.access_bytes(op) for op in narrow)
        return lp

    pair = ("__nv_bfloat16", "__nv_bfloat16")
    want = sc.lowp_expected(*pair)
    assert want[("fp32", False, False)] == (6, 5)  # + two fp32 master vectors in and out
    assert want[("kahan", False, False)] == want[("remainder", False, False)] == (5, 4)
    loops = [loop(*v) for v in want.values()]
    assert sc.check_lowp_loops(pair, loops) == []
    assert [lp.lowp_unroll for lp in loops] == [1] * len(loops)
    assert sc.check_lowp_loops(pair, [loop(2 * ld, 2 * st) for ld, st in want.values()]) == []
    fails = sc.check_lowp_loops(pair, [lp for lp in loops if (lp.load128, lp.store128) != (5, 4)]
                                + [loop(5, 4)])  # kahan's and remainder's: one of two
    assert fails == ["vec128: 1 vector loop(s) of 5 loads / 4 stores, expected 2 (kahan, "
                     "remainder)"], fails
    fails = sc.check_lowp_loops(pair, loops + [loop(7, 3)])
    assert len(fails) == 1 and fails[0].startswith("vec128: loop 0x100-0x200 has 7 128-bit "
                                                   "loads and 3 stores"), fails
    fails = sc.check_lowp_loops(pair, loops[:-1] + [loop(4, 3, narrow=["STG.E"])])
    assert sorted(f.split(":")[0] for f in fails) == ["bytes", "vec128"], fails
    fails = sc.check_lowp_loops(pair, loops[:-1] + [loop(4, 3, generic=2)])
    assert [f.split(":")[0] for f in fails] == ["global"], fails
    # fp32 params with bf16 moments: two vectors of param and grad, one of each moment
    assert sc.lowp_expected("float", "__nv_bfloat16") == {("none", False, False): (6, 4)}


if __name__ == "__main__" and sys.argv[1:] == ["--background"]:
    import json
    print(json.dumps(_job()))
