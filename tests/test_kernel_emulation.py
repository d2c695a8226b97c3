"""The CUDA kernel, proven on every CI run without a GPU: kernels/adamw_kernel.cu run on the CPU.

kernels/adamw_kernel.cu has no shared memory, no __syncthreads, no warp intrinsics and no
atomics, so running every (block, thread) of a launch to completion, in any order, is a
faithful execution model. tests/cuda_emu/ compiles the unchanged file with g++ as host C++
against the CUDA toolkit's own headers (NVIDIA's host bf16/fp16 conversions), links it with the
unchanged csrc/bindings.cpp and csrc/cpu_adamw.cpp under ASan and UBSan, and runs the real
launcher: `step_cuda` launches the steps kernel and the update kernel, and the emulator runs
their grids in a chosen order (forward, reverse, shuffled, on several host threads), records
every launch (kernel, grid, block, stream, current device) and can inject launch errors or run
only some blocks. The emulated device memory is host memory: CPU tensors.

Checked here: bit-for-bit equality with the CPU loop (the emulation module's own step_cpu,
the same csrc/cpu_adamw.cpp) over several steps for fp32, bf16 and fp16, amsgrad on some, all
or no groups, maximize, weight decay 0 and not, sizes 0..278011, params at every element
offset inside bigger allocations with the grad (or max_exp_avg_sq) at the same or another
16-byte phase; capped grids (the tile loop strides); every execution order giving the same
bits; every tile run once by the block the stride assigns; nothing written outside the
buffers (guard patterns, and ASan on allocations that end with the buffer), nor to params
without a grad or to the max buffers of groups without amsgrad (NaN poison); offsets past
2^31 and 2^32 elements (a sparse mapping of 56 GiB); and the launcher (stream, device switch
and restore, launch configuration, launch errors as RuntimeError, the steps kernel first).
Issue #19: the norm pass, the clip coefficient, and track_norms' row_norms from the NORMS
kernels (clipped, GradScaler, found_inf-skipped and unclipped steps; amsgrad and
low-precision tables), bit for bit with the CPU loop for every grid and order.

How it runs: a plain ``pytest`` collects the PARENT half of this file: it builds the
emulation once (tests/cuda_emu/build.py, cached under tests/cuda_emu/build/), runs this file
again in a subprocess with ASan preloaded (the CHILD half: the checks), builds mutated copies
of the kernel and shows that the checks catch each, and shows that a kernel using shared
memory, barriers, warp intrinsics or atomics is refused. By hand:

    pytest tests/test_kernel_emulation.py             # everything (about a minute)
    python tests/cuda_emu/build.py --run -x -k phase  # the child checks only, pytest args
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()
ROOT = THIS.parents[1]
if str(THIS.parent) not in sys.path:
    sys.path.insert(0, str(THIS.parent))

from cuda_emu import build as emu_build  # noqa: E402

CHILD = bool(os.environ.get("FUSED_ADAMW_EMU_SO"))


def _child_cmd(*pytest_args) -> list[str]:
    # --noconftest: the checks need nothing from tests/conftest.py. --capture=sys: a
    # sanitizer report is written to file descriptor 2 just before the process exits, where
    # pytest's default fd capture would swallow it.
    return [sys.executable, "-m", "pytest", str(THIS), "-q", "-p", "no:cacheprovider",
            "--noconftest", "--capture=sys", "-o", "addopts=", *pytest_args]


if not CHILD:
    # ======================================================================================
    # PARENT: build, run the checks under ASan, mutation checks, refusal
    # ======================================================================================

    def _emu_library() -> tuple[Path | None, str | None, str | None]:
        """(the emulation library, None, None), or (None, why it is unavailable here, None),
        or (None, None, why it is broken: not a skip, CI has the toolchain)."""
        try:
            emu_build.preload()  # libasan and libstdc++ are there
            so = emu_build.build()
        except emu_build.Unavailable as e:
            return None, f"CUDA emulation unavailable: {e}", None
        r = subprocess.run([sys.executable, "-c", "pass"], env=emu_build.child_env(so),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return None, None, ("ASan cannot start a process here (a kernel with "
                                "vm.mmap_rnd_bits > 28 breaks GCC <= 13's ASan: sysctl "
                                "vm.mmap_rnd_bits=28 fixes it):\n" + r.stderr[-3000:])
        return so, None, None

    def _run_child(so: Path, *args, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run(_child_cmd(*args), cwd=ROOT, env=emu_build.child_env(so),
                              capture_output=True, text=True, timeout=timeout)

    def _job() -> dict:
        """Everything the parent's fixtures check, in one process: ``python
        tests/test_kernel_emulation.py --background`` (started with the session:
        tests/_background.py): the build, the checks in a child under ASan, every mutant
        built and checked (two at a time). Outputs keep their last 20,000 characters."""
        so, skip, fail = _emu_library()
        out = {"skip": skip, "fail": fail, "checks": None, "mutants": None}
        if so is None:
            return out
        r = _run_child(so, "-ra")
        out["checks"] = [r.returncode, (r.stdout + r.stderr)[-20000:]]

        def one(name):
            t0 = time.monotonic()
            m = emu_build.build_mutant(name, MUTANTS[name])
            t1 = time.monotonic()
            r = _run_child(m, "-x", "-k", MUTANT_CHECKS, timeout=600)
            return [r.returncode, f"(built in {t1 - t0:.0f} s, checked in "
                    f"{time.monotonic() - t1:.0f} s)\n" + (r.stdout + r.stderr)[-20000:]]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(one, name) for name in MUTANTS}
            out["mutants"] = {name: f.result() for name, f in futures.items()}
        return out

    @pytest.fixture(scope="module")
    def emu_job() -> dict:
        import _background
        job = _background.run("emulation", timeout=3600)
        if job["fail"]:
            pytest.fail(job["fail"])
        if job["skip"]:
            pytest.skip(job["skip"])
        return job

    def test_kernel_under_emulation(emu_job):
        """Every CHILD check below, in one subprocess with ASan and UBSan."""
        rc, out = emu_job["checks"]
        print(out[-6000:])
        assert rc == 0, f"the emulated kernel failed its checks:\n{out[-20000:]}"

    # Each mutant must make the checks fail (a bit mismatch, a guard or poison written, a
    # sanitizer report or a crash): the checks of MUTANT_CHECKS, which pass on the real
    # kernel (test_kernel_under_emulation), run with -x on each mutant. "tile <= p.n_tiles"
    # runs one extra tile whose element range is empty (u_begin = (n_tiles - start) * 16384 >
    # u_end): no data can show it, only the tile trace (FUSED_ADAMW_TILE_HOOK) can.
    KERNEL_CU = "adamw_kernel.cu"
    MUTANTS = {
        "tile_bound_le": [(KERNEL_CU, "tile < p.n_tiles;", "tile <= p.n_tiles;")],
        "stride_plus_1": [(KERNEL_CU, "tile += gridDim.x)", "tile += gridDim.x + 1)")],
        "vector_end_plus_1": [(KERNEL_CU, "v1 = w.u_end / N;", "v1 = w.u_end / N + 1;")],
        "tail_start_minus_1": [(KERNEL_CU, "(r, w.phase, v1 * N, w.u_end, w.s, scale);",
                                "(r, w.phase, v1 * N - 1, w.u_end, w.s, scale);")],
        "grad_phase_ignored": [("adamw_tile.cuh",
                                "uint64_t x = (a ^ static_cast<uint64_t>(r[kRowGrad])) |",
                                "uint64_t x = (a ^ a) |")],
        "amsgrad_ignores_group": [(KERNEL_CU, "if (HAS_MAX && w.s.amsgrad) {",
                                   "if (HAS_MAX) {")],
        "steps_bound_le": [(KERNEL_CU, "i < n_rows;", "i <= n_rows;")],
        "offset_32_bit": [(KERNEL_CU, "const int64_t off = (u - phase) * kSize;",
                           "const int64_t off = static_cast<int32_t>(u - phase) * kSize;")],
        # GradScaler and the device guard (the header's mutants change the CPU loop too: the
        # checks hold both to torch's arithmetic and to "nothing written", not only to each
        # other).
        "unscale_by_reciprocal": [("adamw_math.cuh", "return grad / grad_scale;",
                                   "return grad * (1.0f / grad_scale);")],
        "found_inf_eq_1": [("adamw_math.cuh", "*found_inf != 0.0f;", "*found_inf == 1.0f;")],
        "grad_not_written_back": [(KERNEL_CU, "if (SCALED && scale != 1.0f) store_global(grad + v, rg);",
                                   "")],
        "restore_without_context": [(KERNEL_CU, "restore_ = primary_context_active(prev_) != 0;",
                                     "restore_ = true;")],
        # Low-precision tables (issue #13): the fp32 master always taken (a param the user
        # wrote is lost), the stochastic bits drawn by position instead of element index
        # (shifted by the param's phase; the vector loop's index serves nothing else), the
        # Kahan compensation dropped.
        "master_always_wins": [(KERNEL_CU, "fp = Vec<T>::one_from_float(m) == pb ? m : "
                                "Vec<T>::one_to_float(pb);", "fp = m;")],
        "sr_bits_by_position": [(KERNEL_CU, "int64_t i0 = first * G - phase;",
                                 "int64_t i0 = first * G;")],
        "kahan_ignores_compensation": [(KERNEL_CU, "Vec<T>::one_to_float(xb), y)",
                                        "0.0f, y)")],
        # The low-precision vector loop (issue #21): a wrong element of the group (the first
        # moment of its neighbour in the same 32-bit word or vector), a tile whose extra
        # buffer is off the param's grid taken as aligned (its vectors straddle the group).
        "lowp_vector_wrong_lane": [(KERNEL_CU, "float fm = rm.get(e);",
                                    "float fm = rm.get(e ^ 1);")],
        "lowp_extra_phase_ignored": [("adamw_tile.cuh",
                                      "if (extra_size != 0) x |= ", "if (false) x |= ")],
        # Gradient clipping (issue #19): the coefficient skipped on the vector path; the norm
        # pass's lanes walked element by element instead of vector by vector (another order:
        # the same sum to rounding, other bits); the last element of a tile left out.
        "clip_coef_skipped_in_vectors": [(KERNEL_CU,
                                          "if ((SCALED && !AMSGRAD) || NORMS) fg = adamw_clip(fg, s.clip_coef);",
                                          "")],
        # track_norms (the NORMS kernels): the vector loop's threads not rotated onto their
        # lanes (thread t takes v0 + t: another summation order, other bits where v0 is not a
        # multiple of 256, i.e. behind a scalar head); the rows' reduction run on a skipped
        # step (found_inf: row_norms must stay as they were).
        "norms_lanes_not_rotated": [(KERNEL_CU,
                                     "NORMS ? v0 + ((static_cast<int64_t>(threadIdx.x) - v0) & "
                                     "(kThreads - 1)) : v0 + threadIdx.x;",
                                     "v0 + threadIdx.x;")],
        "norms_rows_on_skipped_step": [("adamw_norm.cuh",
                                        "                                 const float* found_inf, "
                                        "float* row_norms) {\n  if (adamw_step_skipped(found_inf)) "
                                        "return;",
                                        "                                 const float* found_inf, "
                                        "float* row_norms) {")],
        "norm_lanes_by_element": [("adamw_norm.cuh", "const int64_t u = base + v * N + e;",
                                   "const int64_t u = base + e * kTileElems / N + v;")],
        "norm_tile_end_minus_1": [("adamw_norm.cuh", "if (u < u_begin || u >= u_end) continue;",
                                   "if (u < u_begin || u >= u_end - 1) continue;")],
    }
    MUTANT_CHECKS = ("(matches_cpu_loop and fp32-some-exact) or (every_phase and bf16-exact) "
                     "or tiles_run_once_on_their_block[5] or untouched or steps_kernel "
                     "or offsets_past or grad_scaler or found_inf or restore_creates "
                     "or lowp_matches or lowp_every_phase or clip or track_norms")

    def _detection(out: str) -> str | None:
        """How a failed child run caught the mutant, or None if it did not fail on a check."""
        for marker, kind in (("ERROR: AddressSanitizer", "ASan"), ("runtime error:", "UBSan"),
                             ("Fatal Python error", "crash")):
            if marker in out:
                line = next(ln for ln in out.splitlines() if marker in ln)
                return f"{kind}: {line.strip()[:160]}"
        failed = re.findall(r"^FAILED (\S+)", out, re.M)
        if failed:
            return f"check failed: {failed[0].split('::')[-1]}"
        return None

    @pytest.fixture(scope="module")
    def mutant_runs(emu_job) -> dict:
        """Every mutant (one translation unit each) built and checked by _job."""
        return emu_job["mutants"]

    @pytest.mark.parametrize("name", list(MUTANTS))
    def test_mutant_is_caught(name, mutant_runs):
        rc, out = mutant_runs[name]
        how = _detection(out)
        print(f"{name}: exit {rc}, {how} {out.splitlines()[0]}")
        assert rc != 0 and how is not None, (
            f"the checks did not catch mutant {name} {MUTANTS[name]} (exit {rc}):\n"
            f"{out[-6000:]}")

    def test_kernel_source_is_emulable():
        # The kernel's comments say "no __syncthreads": comments and strings do not count.
        emu_build.check_source(emu_build.KERNEL)
        assert "__syncthreads" in emu_build.KERNEL.read_text()

    def test_refuses_a_kernel_whose_threads_cooperate(tmp_path):
        """A kernel with shared memory, a barrier, warp intrinsics or an atomic is refused by
        the source check, and, past it, by the shim at compile time."""
        try:
            flags = emu_build._flags()["kernel"]
            gxx = emu_build.gxx()
        except emu_build.Unavailable as e:
            pytest.skip(f"CUDA emulation unavailable: {e}")
        constructs = {
            "__shared__": "__shared__ float emu_probe[kThreads];",
            "__syncthreads": "__syncthreads();",
            "atomicAdd": "atomicAdd(reinterpret_cast<float*>(r[kRowStep]), 1.0f);",
            "__shfl_xor_sync": "(void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);",
            "__ballot_sync": "(void)__ballot_sync(0xffffffffu, 1);",
            "__any_sync": "(void)__any_sync(0xffffffffu, 1);",
            "__activemask": "(void)__activemask();",
        }
        for f in emu_build.local_sources(emu_build.KERNEL):
            (tmp_path / f.name).write_text(f.read_text())
        anchor = "const int64_t* r = p.rows + w.row * kRowCols;\n"
        text = emu_build.KERNEL.read_text()
        assert text.count(anchor) == 1
        ptx = 'asm volatile("bar.sync 0;");'  # a barrier in inline PTX: refused by the grep
        bad = tmp_path / emu_build.KERNEL.name
        bad.write_text(text.replace(anchor, anchor + "\n".join(constructs.values()) + "\n"))
        with pytest.raises(emu_build.NotEmulable) as e:
            emu_build.check_source(bad)
        msg = str(e.value)
        first = text[:text.index(anchor)].count("\n") + 2
        for i, code in enumerate(constructs.values()):
            assert f"{bad}:{first + i}:" in msg and code in msg, msg
        (tmp_path / "ptx.cu").write_text(text.replace(anchor, anchor + ptx + "\n"))
        with pytest.raises(emu_build.NotEmulable, match=r"ptx.cu:\d+: inline PTX with 'bar'"):
            emu_build.check_source(tmp_path / "ptx.cu")
        # Past the grep (a construct it does not know, say): the shim makes each an error.
        r = subprocess.run([gxx, *flags, "-fsyntax-only", str(bad)], capture_output=True,
                           text=True)
        assert r.returncode != 0
        for name in constructs:
            assert re.search(r"tests/cuda_emu: the kernel uses [^\n]*" + re.escape(name),
                             r.stderr), (name, r.stderr[-3000:])

else:
    # ======================================================================================
    # CHILD: the checks, on the emulated kernel (ASan and UBSan in this process)
    # ======================================================================================

    import torch
    from cuda_emu.cases import (GROUPS, TILE, Case, Spec, bits, check_covered, check_guards,
                                check_untouched, compare, first_difference, hparams, phases)

    from fused_adamw import _table

    DTYPES = [torch.float32, torch.bfloat16, torch.float16]
    DTYPE_IDS = ["fp32", "bf16", "fp16"]
    SIZES = [0, 1, 7, 1023, 1024, 1025, 4097, 16383, 16384, 16385, 278011]

    # The matrix's groups: decoupled decay and none, maximize and not, other betas; and, when
    # the table has the columns, the paper's decoupled decay (max_lr) and Adam's L2 decay
    # (after maximize).
    MATRIX_GROUPS = [dict(g) for g in GROUPS]
    if hasattr(_table, "HP_DECAY_MODE") and hasattr(_table, "HP_MAX_LR"):
        MATRIX_GROUPS[2]["max_lr"] = 2e-2
        MATRIX_GROUPS.append(dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05,
                                  maximize=True, decay_mode=1.0))
    AMSGRAD = {"none": lambda i: False, "some": lambda i: i % 2 == 1, "all": lambda i: True}

    _C, _EMU = emu_build.load()  # the emulated fused_adamw._C and the emulator's controls

    @pytest.fixture(autouse=True)
    def _fresh_emulator():
        _EMU.reset()
        _C._set_grid_cap(0)
        yield
        _EMU.reset()
        _C._set_grid_cap(0)

    def groups_with(amsgrad) -> list[dict]:
        return [dict(g, amsgrad=AMSGRAD[amsgrad](i)) for i, g in enumerate(MATRIX_GROUPS)]

    def run_step(case, ref, cap=0, order=("forward",), cpu_threads=1):
        """One step: the kernel on `case` (grid capped at `cap`, blocks in `order`), the CPU
        loop on `ref`; then every buffer compared bit for bit, guards and poison checked."""
        before = case.snapshot()
        _EMU.set_order(*order)
        _C._set_grid_cap(cap)
        _EMU.clear_launch_log()
        case.step_cuda(_C)
        _C._set_grid_cap(0)
        ref.step_cpu(_C, cpu_threads)
        check_guards(case)
        check_untouched(case, before)
        compare(case, ref, f"kernel (cap {cap}, order {order}) vs CPU loop")
        return _EMU.launch_log()

    def matrix_specs(dtype, n_groups=len(MATRIX_GROUPS)):
        nph = phases(dtype)
        specs = []
        for i, n in enumerate(SIZES):
            ph = (3 * i + 1) % nph
            gph = [ph, (ph + 1) % nph, (ph + nph // 2) % nph][i % 3]
            specs.append(Spec(n, group=i % n_groups, phase=ph, grad_phase=gph,
                              max_in_row=i % 2 == 1, step0=[0, 2, 9][i % 3]))
        specs.insert(3, Spec(1025, group=1, phase=1, in_table=False))  # no grad: untouched
        specs.append(Spec(7, group=0, phase=0, in_table=False))
        return specs

    # -- the arithmetic, over every path ---------------------------------------------------

    @pytest.mark.parametrize("layout", ["exact", "guarded"])
    @pytest.mark.parametrize("amsgrad", list(AMSGRAD))
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_matches_cpu_loop(dtype, amsgrad, layout):
        """Three steps, bit for bit with the CPU loop: a full grid, a grid of 3 and a grid
        of 1 (the tile loop strides), in forward, reverse and shuffled-threaded order."""
        case = Case.new(dtype, matrix_specs(dtype), groups_with(amsgrad), layout, seed=1)
        ref = case.clone()
        gen = torch.Generator().manual_seed(2)
        schedule = [(0, ("forward",), 1), (3, ("reverse",), 2), (1, ("threads", 11, 2), 1)]
        for k, (cap, order, threads) in enumerate(schedule):
            if k:
                case.new_grads(gen)
                ref.copy_grads_from(case)
            log = run_step(case, ref, cap, order, threads)
            assert [r["kernel"] for r in log] == ["adamw_steps_kernel", "fn"]
            if k == 0:
                check_covered(case)
        for p in case.params:
            assert p.step.item() == p.spec.step0 + (3 if p.spec.in_table else 0)

    @pytest.mark.parametrize("layout", ["exact", "guarded"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_every_phase(dtype, layout):
        """Every element offset of the param inside its 16-byte vector, with the grad at the
        same and at another phase, and (amsgrad) max_exp_avg_sq at another phase: the vector
        path with scalar head and tail, and the all-scalar path, at every tile edge."""
        nph = phases(dtype)
        specs = []
        for n in (1, 2, 7, 9, 1023, 1025, 16383, 16385):
            for ph in range(nph):
                other = (ph + 1 + n % (nph - 1)) % nph
                specs += [Spec(n, 0, ph), Spec(n, 1, ph), Spec(n, 0, ph, grad_phase=other),
                          Spec(n, 1, ph, grad_phase=other), Spec(n, 0, ph, max_phase=other)]
        groups = [dict(GROUPS[0], amsgrad=True), dict(GROUPS[1], amsgrad=False)]
        case = Case.new(dtype, specs, groups, layout, seed=3)
        ref = case.clone()
        run_step(case, ref)
        check_covered(case)
        case.new_grads(torch.Generator().manual_seed(4))
        ref.copy_grads_from(case)
        run_step(case, ref, cap=2, order=("shuffle", 5))

    def test_every_order_gives_the_same_bits():
        """Forward, reverse, shuffled and multi-threaded execution, with full and capped
        grids: identical bits, equal to the CPU loop's."""
        specs = [Spec(n, i % 3, phase=i % 8, grad_phase=(i * 5) % 8)
                 for i, n in enumerate([7, 1025, 4097, 16385, 49153, 33000])]
        base = Case.new(torch.float16, specs, groups_with("some"), "exact", seed=6)
        ref = base.clone()
        ref.step_cpu(_C)
        orders = [("forward",), ("reverse",), ("shuffle", 1), ("shuffle", 2),
                  ("threads", 0, 3), ("threads", 9, 4)]
        for cap in (0, 2):
            for order in orders:
                case = base.clone()
                _EMU.set_order(*order)
                _C._set_grid_cap(cap)
                case.step_cuda(_C)
                compare(case, ref, f"order {order}, cap {cap}")

    def test_emulated_cpu_loop_is_the_real_one():
        """The oracle here is the emulation module's CPU loop (csrc/cpu_adamw.cpp under the
        sanitizers); it matches the installed fused_adamw._C's bit for bit."""
        try:
            from fused_adamw import _C as real
        except ImportError as e:
            pytest.skip(f"fused_adamw._C is not built: {e}")
        built = (getattr(real, "hparam_cols", None), getattr(real, "row_cols", None))
        if built != (_table.HPARAM_COLS, _table.ROW_COLS) or not hasattr(real, "step_cpu"):
            pytest.skip(f"fused_adamw._C is stale (hparam and row columns {built}, the sources "
                        f"say {(_table.HPARAM_COLS, _table.ROW_COLS)}): rebuild it")
        for dtype in DTYPES:
            case = Case.new(dtype, matrix_specs(dtype), groups_with("some"), seed=7)
            ref = case.clone()
            case.step_cpu(_C)
            ref.step_cpu(real, 2)
            compare(case, ref, f"{dtype}: emulation module's CPU loop vs fused_adamw._C's")

    # -- low-precision tables (issue #13): master modes and state_dtype ---------------------

    BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32
    # Every supported (param, state) pair (kernels/adamw_params.h state_pair_supported) under
    # every master mode its params take ("remainder": bfloat16 only; float32 params ignore the
    # mode, so their group's column is set anyway and must change nothing). None with the
    # same dtype is the plain kernel (the matrix above).
    LOWP = ([(BF, BF, m) for m in ("fp32", "remainder", "kahan", "stochastic")]
            + [(BF, F32, m) for m in (None, "fp32", "remainder", "kahan", "stochastic")]
            + [(F16, F16, m) for m in ("fp32", "kahan", "stochastic")]
            + [(F16, F32, m) for m in (None, "fp32", "kahan", "stochastic")]
            + [(F32, BF, m) for m in (None, "fp32")])
    SHORT = {BF: "bf16", F16: "fp16", F32: "fp32"}

    def lowp_groups(dtype, mode) -> list[dict]:
        """The matrix's groups, amsgrad on some, with `mode` on groups 0 and 2, none on
        group 1 and another mode on group 3: rows of several modes in one launch."""
        other = "kahan" if mode == "stochastic" else "stochastic"
        masters = [mode, None, mode, other if mode is not None else None]
        return [dict(g, master=masters[i]) for i, g in enumerate(groups_with("some"))]

    @pytest.mark.parametrize("dtype,sdtype,mode", LOWP,
                             ids=[f"{SHORT[a]}-{SHORT[b]}-{m}" for a, b, m in LOWP])
    def test_lowp_matches_cpu_loop(dtype, sdtype, mode):
        """Three steps of a low-precision table, bit for bit with the CPU loop (params,
        moments, the modes' buffers, grads, guards; poisoned extra and max pointers of rows
        that have no such buffer untouched): a full grid forward, a grid of 3 reversed with
        GradScaler (scale 3.0: the grad written back), a grid of 1 shuffled on threads."""
        layout = "exact" if LOWP.index((dtype, sdtype, mode)) % 2 else "guarded"
        case = Case.new(dtype, matrix_specs(dtype), lowp_groups(dtype, mode), layout, seed=21,
                        state_dtype=sdtype)
        assert case.lowp
        ref = case.clone()
        gen = torch.Generator().manual_seed(22)
        sc, fi = torch.tensor(3.0), torch.zeros(())
        schedule = [(0, ("forward",), 1, {}),
                    (3, ("reverse",), 2, dict(grad_scale=sc.data_ptr(), found_inf=fi.data_ptr())),
                    (1, ("threads", 11, 2), 1, {})]
        for k, (cap, order, threads, amp) in enumerate(schedule):
            if k:
                case.new_grads(gen)
                ref.copy_grads_from(case)
            before = case.snapshot()
            _EMU.set_order(*order)
            _C._set_grid_cap(cap)
            case.step_cuda(_C, **amp)
            _C._set_grid_cap(0)
            ref.step_cpu(_C, threads, **amp)
            check_guards(case)
            check_untouched(case, before)
            compare(case, ref, f"lowp {dtype}/{sdtype} {mode}: step {k}, cap {cap}, {order}")
            if k == 0:
                check_covered(case)
            for p, b in zip(case.params, before):  # the param moved where it steps
                if p.spec.in_table and p.spec.numel > 100:
                    assert not torch.equal(bits(p.bufs["param"].store), bits(b["param"])), p.spec
        for p in case.params:
            assert p.step.item() == p.spec.step0 + (3 if p.spec.in_table else 0)

    def test_lowp_found_inf_skips_everything():
        """A skipped GradScaler step writes nothing in a low-precision table either: no
        master, remainder, compensation, moment, grad or step count (the stochastic key's
        step stays too); with found_inf 0 the same table steps, bit for bit with the CPU."""
        for dtype, sdtype in ((BF, F32), (BF, BF), (F16, F32)):
            mode = "remainder" if dtype == BF else "fp32"
            case = Case.new(dtype, matrix_specs(dtype), lowp_groups(dtype, mode), "guarded",
                            seed=23, state_dtype=sdtype)
            groups = case.groups
            groups[1]["master"] = "kahan"
            case = Case.new(dtype, matrix_specs(dtype), groups, "guarded", seed=23,
                            state_dtype=sdtype)
            ref = case.clone()
            before = case.snapshot()
            steps = [p.step.item() for p in case.params]
            sc, fi = torch.tensor(1024.0), torch.tensor(1.0)
            amp = dict(grad_scale=sc.data_ptr(), found_inf=fi.data_ptr())
            case.step_cuda(_C, **amp)
            ref.step_cpu(_C, **amp)
            compare(case, ref, "lowp found_inf: kernel vs CPU loop")
            for i, p in enumerate(case.params):
                assert p.step.item() == steps[i]
                for name, b in p.bufs.items():
                    assert torch.equal(bits(b.store), bits(before[i][name])), (p.spec, name)
            fi.zero_()
            run_step(case, ref)  # now taken (no scaler): equal again
            assert all(p.step.item() == steps[i] + 1 for i, p in enumerate(case.params)
                       if p.spec.in_table)

    def test_lowp_every_phase():
        """Low-precision rows at every element phase of the param, grad at the same and at
        another phase, moments and the mode's buffer at theirs (the vector loop over groups of
        8 with scalar head and tail) or the max or mode's buffer at another (scalar
        throughout): every tile edge, two steps (the second capped and shuffled)."""
        for dtype, sdtype, modes in ((BF, F32, ("fp32", "remainder")),
                                     (F16, F16, ("stochastic", "kahan")),
                                     (F32, BF, (None, None))):
            nph = phases(dtype)
            specs = []
            for n in (1, 9, 1025, 16385):
                for ph in range(nph):
                    other = (ph + 1 + n % (nph - 1)) % nph
                    specs += [Spec(n, 0, ph), Spec(n, 1, ph), Spec(n, 1, ph, grad_phase=other),
                              Spec(n, 0, ph, max_phase=other), Spec(n, 1, ph, extra_phase=other)]
            groups = [dict(GROUPS[0], amsgrad=True, master=modes[0]),
                      dict(GROUPS[1], amsgrad=False, master=modes[1])]
            case = Case.new(dtype, specs, groups, "exact", seed=24, state_dtype=sdtype)
            ref = case.clone()
            run_step(case, ref)
            check_covered(case)
            case.new_grads(torch.Generator().manual_seed(25))
            ref.copy_grads_from(case)
            run_step(case, ref, cap=2, order=("shuffle", 5))

    # -- coverage: tiles, blocks, untouched memory -----------------------------------------

    @pytest.mark.parametrize("cap", [0, 1, 2, 5, 7, 64])
    def test_tiles_run_once_on_their_block(cap):
        """Every tile in [0, n_tiles) is run by all 256 threads of block tile % grid, once;
        grid = min(n_tiles, cap), block = 256 (the kernel strides by kThreads)."""
        specs = [Spec(n, i % 2, phase=(i * 3) % 4, grad_phase=i % 4)
                 for i, n in enumerate([278011, 0, 1, 16384, 16385, 1023, 0, 40000])]
        case = Case.new(torch.float32, specs, groups_with("some")[:2], "exact", seed=8)
        ref = case.clone()
        _EMU.set_tile_trace(True)
        log = run_step(case, ref, cap, ("shuffle", cap + 1))
        n_tiles = case.n_tiles
        grid = min(n_tiles, cap) if cap else n_tiles
        update = log[1]
        assert (update["grid"], update["block"], update["blocks_run"]) == (grid, 256, grid)
        seen = {}
        for launch, block, thread, tile in _EMU.tile_trace():
            assert launch == update["index"], "the tile hook ran in the steps kernel"
            seen.setdefault(tile, []).append((block, thread))
        assert sorted(seen) == list(range(n_tiles)), (
            f"tiles run: {sorted(set(seen) ^ set(range(n_tiles)))} differ from 0..{n_tiles - 1}")
        for tile, runs in seen.items():
            assert sorted(t for _, t in runs) == list(range(256)), f"tile {tile}: threads"
            assert {b for b, _ in runs} == {tile % grid}, f"tile {tile}: blocks"

    def test_sm_load_model():
        """kernels/adamw_kernel.cu's claim: one block per tile lets the hardware spread the
        work so that the busiest SM does about the average. Modelled on the recorded launch:
        the blocks (their work: the elements of the tiles the trace says they ran) dispatched
        in order, across the SMs first, to the first free of 8 SMs x 4 resident blocks; the
        busiest SM's work stays within 4 tiles of the average (list scheduling: each of the
        32 slots within one tile of its share), where one block per param would leave the
        big param's SM with 5x the average."""
        sizes = [1_000_000] + [7, 1025, 4097, 16385, 40000] * 6
        specs = [Spec(n, 0, phase=i % 4) for i, n in enumerate(sizes)]
        case = Case.new(torch.float32, specs, groups_with("none")[:1], "exact", seed=17)
        ref = case.clone()
        _EMU.set_tile_trace(True)
        update = run_step(case, ref)[1]
        rows = [p.spec for p in case.params]
        starts = case.table()[0][len(rows) * _table.ROW_COLS:].tolist()
        work = {}
        for _, block, thread, tile in _EMU.tile_trace():
            if thread == 0:
                r = max(i for i in range(len(rows)) if starts[i] <= tile)
                j, ph = tile - starts[r], rows[r].phase
                n = min(rows[r].numel, (j + 1) * TILE - ph) - max(0, j * TILE - ph)
                work[block] = work.get(block, 0) + n
        assert sorted(work) == list(range(update["grid"])) and sum(work.values()) == sum(sizes)

        def busiest(jobs, sms=8, per_sm=4):
            free = [(0, k, sm) for k in range(per_sm) for sm in range(sms)]
            load = [0] * sms
            for w in jobs:
                t, k, sm = min(free)
                free.remove((t, k, sm))
                free.append((t + w, k, sm))
                load[sm] += w
            return max(load), sum(load) / sms

        most, mean = busiest([work[b] for b in range(update["grid"])])
        assert most <= mean + 4 * TILE, (most, mean)
        per_param, _ = busiest(sizes)
        assert per_param > 5 * mean > most

    def test_untouched_without_grad_and_without_amsgrad():
        """Params not in the table and max_exp_avg_sq of groups without amsgrad (pointer in
        the row or 0) keep their NaN poison bit for bit, through a capped, reversed step."""
        specs = [Spec(1025, 0, 1), Spec(4097, 1, 2, in_table=False), Spec(16385, 1, 3),
                 Spec(7, 0, 0, in_table=False), Spec(33, 1, 1, max_in_row=False),
                 Spec(16384, 1, 0, grad_phase=2)]
        for dtype in DTYPES:
            groups = [dict(GROUPS[0], amsgrad=True), dict(GROUPS[1], amsgrad=False)]
            case = Case.new(dtype, specs, groups, "guarded", seed=9)
            ref = case.clone()
            before = case.snapshot()
            run_step(case, ref, cap=2, order=("reverse",))
            check_untouched(case, before)
            assert sum(1 for _ in case.untouchable()) == 5 + 5 + 1 + 1  # poisoned buffers
            for i, p in enumerate(case.params):
                for name in ("param", "exp_avg"):
                    if p.spec.in_table:
                        assert not p.bufs[name].view.isnan().any(), (i, name)

    # -- the launcher ------------------------------------------------------------------------

    def test_steps_kernel_first_and_strided():
        """600 rows: the steps kernel (grid ceil(600/256) = 3, or the cap) runs before the
        update and adds 1 to every row's step once, also when its grid strides."""
        specs = [Spec(i % 5, i % 2, phase=i % 4, step0=float(i % 7)) for i in range(600)]
        for cap in (0, 1, 2):
            case = Case.new(torch.float32, specs, groups_with("some")[:2], "exact", seed=10)
            ref = case.clone()
            log = run_step(case, ref, cap)
            assert [r["kernel"] for r in log] == ["adamw_steps_kernel", "fn"]
            assert log[0]["params"] == "const long int*, long int, const float*"
            assert log[1]["params"] == "fused_adamw::AdamWParams"
            assert log[0]["grid"] == (min(3, cap) if cap else 3) and log[0]["block"] == 256
            assert log[1]["grid"] == (min(case.n_tiles, cap) if cap else case.n_tiles)
            for p in case.params:
                assert p.step.item() == p.spec.step0 + 1

    def test_launch_configuration_and_stream():
        for sizes, cap in (([1], 0), ([278011, 5], 0), ([278011, 5], 4), ([16384] * 3, 100)):
            specs = [Spec(n) for n in sizes]
            case = Case.new(torch.bfloat16, specs, groups_with("none")[:1], seed=11)
            ref = case.clone()
            stream = 0x7F00DEADBEE0 + cap
            _C._set_grid_cap(cap)
            case.step_cuda(_C, device=0, stream=stream)
            _C._set_grid_cap(0)
            ref.step_cpu(_C)
            compare(case, ref)
            steps, update = _EMU.launch_log()[-2:]
            assert steps["kernel"] == "adamw_steps_kernel" and steps["index"] < update["index"]
            assert (steps["stream"], update["stream"]) == (stream, stream)
            assert (steps["block"], update["block"]) == (256, 256)
            assert update["grid"] == (min(case.n_tiles, cap) if cap else case.n_tiles)

    def test_device_is_current_during_launch_and_restored():
        _EMU.set_device_count(4)
        assert _EMU.set_current_device(2) == 0
        for device in (3, 2, 0):
            case = Case.new(torch.float32, [Spec(4097, phase=1)], groups_with("all")[:1])
            ref = case.clone()
            _EMU.clear_launch_log()
            case.step_cuda(_C, device=device)
            ref.step_cpu(_C)
            compare(case, ref)
            assert [r["device"] for r in _EMU.launch_log()] == [device, device]
            assert _EMU.current_device() == 2

    @pytest.mark.parametrize("scale", [65536.0, 3.0])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_grad_scaler_unscales_in_place(dtype, scale):
        """GradScaler's grad_scale: the kernel divides every grad by it, writes the quotient
        back in the grad's dtype and steps with the float quotient, bit for bit with the CPU
        loop (grads compared too), at every phase and on the vector and scalar paths; the
        written grads are torch's (g.float() / scale).to(dtype). 3.0 is not a power of two,
        so the division rounds and a multiply by 1/scale would differ."""
        case = Case.new(dtype, matrix_specs(dtype), groups_with("some"), "guarded", seed=5)
        ref = case.clone()
        grads = [p.bufs["grad"].view.clone() for p in case.params]
        sc = torch.tensor(scale, dtype=torch.float32)
        fi = torch.zeros((), dtype=torch.float32)
        amp = dict(grad_scale=sc.data_ptr(), found_inf=fi.data_ptr())
        before = case.snapshot()
        _EMU.set_order("threads", 3, 2)
        case.step_cuda(_C, **amp)
        ref.step_cpu(_C, **amp)
        check_guards(case)
        check_untouched(case, before)
        compare(case, ref, "GradScaler: kernel vs CPU loop")
        for p, g in zip(case.params, grads):
            if p.spec.in_table:
                want = (g.float() / scale).to(dtype)
                assert torch.equal(bits(p.bufs["grad"].view), bits(want)), p.spec
                assert p.step.item() == p.spec.step0 + 1

    @pytest.mark.parametrize("found", [1.0, 2.0, float("inf")])
    def test_found_inf_skips_everything(found):
        """found_inf != 0 (2.0: infs on two devices, where torch's == 1 test would step):
        neither kernel writes anything, step counts included; the CPU loop the same."""
        case = Case.new(torch.bfloat16, matrix_specs(torch.bfloat16), groups_with("all"),
                        "guarded", seed=6)
        ref = case.clone()
        before = case.snapshot()
        steps = [p.step.item() for p in case.params]
        sc = torch.tensor(1024.0)
        fi = torch.tensor(found)
        amp = dict(grad_scale=sc.data_ptr(), found_inf=fi.data_ptr())
        case.step_cuda(_C, **amp)
        ref.step_cpu(_C, **amp)
        compare(case, ref, "found_inf: kernel vs CPU loop")
        for i, p in enumerate(case.params):
            assert p.step.item() == steps[i]
            for name, b in p.bufs.items():
                assert torch.equal(bits(b.store), bits(before[i][name])), (p.spec, name)
        # The same table with found_inf 0 steps.
        fi.zero_()
        case.step_cuda(_C, **amp)
        assert any(p.step.item() == steps[i] + 1 for i, p in enumerate(case.params))

    # -- gradient clipping (issue #19) -------------------------------------------------------

    def grad_norms(case, kernel: bool, inf: bool, scale=None, cap=0, threads=1):
        """The norm pass's float64 [n_rows + 1] out, by the kernels or the CPU loop."""
        args = case.args()
        n_rows, n_tiles = args[3], args[4]
        out = torch.full((n_rows + 1,), float("nan"), dtype=torch.float64)
        sc = 0 if scale is None else scale.data_ptr()
        if kernel:
            scratch = torch.full((max(n_tiles * 257, 1),), float("nan"))
            _C._set_grid_cap(cap)
            _C.grad_norm_cuda(args[0], args[1], n_rows, n_tiles, args[6], inf, sc,
                              scratch.data_ptr(), out.data_ptr(), 0, 0)
            _C._set_grid_cap(0)
        else:
            _C.grad_norm_cpu(args[0], args[1], n_rows, n_tiles, args[6], threads, inf, sc,
                             out.data_ptr())
        return out

    @pytest.mark.parametrize("inf", [False, True], ids=["l2", "inf"])
    @pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_clip_norm_pass_matches_cpu_loop(dtype, scaled, inf):
        """The norm pass (kernels/adamw_norm.cuh) gives bitwise the CPU loop's row sums and
        total, at every size and phase of the matrix (grads at other phases too), for any grid
        (full, 3 and 1 blocks), block order and CPU thread count; and it is the norm: within
        float32 rounding of a float64 oracle (rows with no grad count nothing)."""
        case = Case.new(dtype, matrix_specs(dtype), groups_with("none"), "guarded", seed=7)
        scale = torch.tensor(3.0) if scaled else None
        ref = grad_norms(case, False, inf, scale)
        for cap, order in ((0, ("forward",)), (3, ("reverse",)), (1, ("threads", 5, 2))):
            _EMU.set_order(*order)
            got = grad_norms(case, True, inf, scale, cap=cap)
            assert torch.equal(got, ref), f"cap {cap}: {first_difference(got, ref)}"
        assert torch.equal(grad_norms(case, False, inf, scale, threads=2), ref)
        grads = [p.bufs["grad"].view.double() / (3.0 if scaled else 1.0)
                 for p in case.params if p.spec.in_table]
        zero = torch.zeros((), dtype=torch.float64)
        want = torch.stack([zero if not g.numel() else g.abs().max() if inf else g.square().sum()
                            for g in grads])
        torch.testing.assert_close(ref[:-1], want, rtol=1e-5, atol=0)
        total = want.max() if inf else want.sum()
        torch.testing.assert_close(ref[-1], total, rtol=1e-5, atol=0)

    @pytest.mark.parametrize("scale", [3.0, 1.0])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_clip_coef_matches_cpu_loop(dtype, scale):
        """The step with a clip coefficient (and under GradScaler) is bitwise the CPU loop's
        on every path, the grads written back unscaled and unclipped, and the coefficient is
        applied (every exp_avg differs from an unclipped step's; the params need not: Adam's
        first step is nearly invariant to a common scale of the grads)."""
        # No amsgrad: the CUDA backend steps clipped amsgrad tables on torch (NOTE in the .cu)
        case = Case.new(dtype, matrix_specs(dtype), groups_with("none"), "guarded", seed=8)
        ref = case.clone()
        plain = case.clone()
        coef = torch.tensor(0.37)
        sc = torch.tensor(scale)
        # scale 1.0: how backends/cuda.py runs a clipped table without a GradScaler (the
        # SCALED kernels with a scale of 1, which write no grad); the CPU loop takes no scale.
        amp = dict(grad_scale=sc.data_ptr(), clip_coef=coef.data_ptr())
        cpu = amp if scale != 1.0 else dict(clip_coef=coef.data_ptr())
        before = case.snapshot()
        _EMU.set_order("threads", 3, 2)
        case.step_cuda(_C, **amp)
        ref.step_cpu(_C, **cpu)
        plain.step_cpu(_C, **{k: v for k, v in cpu.items() if k != "clip_coef"})
        check_guards(case)
        check_untouched(case, before)
        compare(case, ref, "clip coefficient: kernel vs CPU loop")
        changed = [not torch.equal(bits(p.bufs["exp_avg"].view), bits(q.bufs["exp_avg"].view))
                   for p, q in zip(case.params, plain.params) if p.spec.numel and p.spec.in_table]
        assert all(changed), "the clip coefficient left some exp_avg unchanged"
        for p, q in zip(case.params, plain.params):  # the grads: unscaled, not clipped
            assert torch.equal(bits(p.bufs["grad"].view), bits(q.bufs["grad"].view))

    # -- track_norms and the NORMS kernels (issue #19) ---------------------------------------

    def step_with_norms(case, kernel: bool, cap=0, order=("forward",), threads=1, norms=True,
                        **amp):
        """One step with track_norms (norms=False: clipped only) by the kernels or the CPU
        loop; returns row_norms (float32 [n_rows, 3], NaN where nothing was written)."""
        n_rows, n_tiles = case.args()[3], case.args()[4]
        rn = torch.full((n_rows, 3), float("nan"))
        extra = dict(amp, row_norms=rn.data_ptr()) if norms else dict(amp)
        if kernel:
            scratch = torch.full((max(n_tiles * 3 * 257, 1),), float("nan"))
            if norms:
                extra["norm_scratch"] = scratch.data_ptr()
            _EMU.set_order(*order)
            _C._set_grid_cap(cap)
            _EMU.clear_launch_log()
            case.step_cuda(_C, **extra)
            _C._set_grid_cap(0)
        else:
            case.step_cpu(_C, threads, **extra)
        return rn

    def check_row_norms(case, before, rn, scale=1.0):
        """row_norms are the sums of squares they claim, to float32 summation (a float64
        oracle): the grad as used (unscaled, before clipping: p.grad after a scaled step holds
        the quotient rounded to its dtype, so the oracle divides the grad as it was), the param
        after and (param after - param before), as stored."""
        rows = [i for i, p in enumerate(case.params) if p.spec.in_table]
        want = []
        for i in rows:
            p, b = case.params[i], before[i]
            f = p.bufs["param"].front
            n = p.spec.numel
            g = b["grad"][p.bufs["grad"].front:p.bufs["grad"].front + n].double() / scale
            after = p.bufs["param"].view.double()
            prev = b["param"][f:f + n].double()
            want.append(torch.stack([g.square().sum(), after.square().sum(),
                                     (after - prev).square().sum()]))
        # float32 lanes of at most 64 elements each (16384 / 256), then a float32 tree of 256
        # and float64 over tiles: a relative error far below 1e-5.
        torch.testing.assert_close(rn.double(), torch.stack(want), rtol=1e-5, atol=1e-30)

    NORM_CELLS = [(torch.float32, "some"), (torch.bfloat16, "all"), (torch.float16, "none")]

    @pytest.mark.parametrize("dtype,amsgrad", NORM_CELLS, ids=["fp32-some", "bf16-all", "fp16-none"])
    def test_track_norms_matches_cpu_loop(dtype, amsgrad):
        """track_norms on the NORMS kernels (kernels/adamw_kernel.cu adamw_norms_kernel): the
        step and row_norms bit for bit with the CPU loop over four steps: clipped, full grid
        forward; GradScaler (scale 3) reversed on a grid of 3; a GradScaler step with
        found_inf (nothing written, row_norms untouched); unclipped, a grid of 1 on threads.
        Every size and phase of the matrix (vector body with scalar head and tail in lane
        order, rows off the grid lane by lane); row_norms are the norms (float64 oracle)."""
        case = Case.new(dtype, matrix_specs(dtype), groups_with(amsgrad), "guarded", seed=31)
        ref = case.clone()
        gen = torch.Generator().manual_seed(32)
        coef, sc = torch.tensor(0.37), torch.tensor(3.0)
        fi, inf = torch.zeros(()), torch.ones(())
        schedule = [(0, ("forward",), dict(clip_coef=coef.data_ptr())),
                    (3, ("reverse",), dict(clip_coef=coef.data_ptr(), grad_scale=sc.data_ptr(),
                                           found_inf=fi.data_ptr())),
                    (2, ("shuffle", 4), dict(grad_scale=sc.data_ptr(), found_inf=inf.data_ptr())),
                    (1, ("threads", 7, 2), {})]
        for k, (cap, order, amp) in enumerate(schedule):
            if k:
                case.new_grads(gen)
                ref.copy_grads_from(case)
            before = case.snapshot()
            got = step_with_norms(case, True, cap, order, **amp)
            assert [r["kernel"] for r in _EMU.launch_log()] == [
                "adamw_steps_kernel", "fn", "adamw_step_norms_tiles_kernel",
                "adamw_step_norms_rows_kernel"]
            want = step_with_norms(ref, False, threads=2, **amp)
            check_guards(case)
            check_untouched(case, before)
            compare(case, ref, f"track_norms step {k}: kernel vs CPU loop")
            assert torch.equal(bits(got), bits(want)), (
                f"step {k}: row_norms {first_difference(got.flatten(), want.flatten())}")
            if "found_inf" in amp and amp["found_inf"] == inf.data_ptr():
                assert got.isnan().all(), "a skipped step wrote row_norms"
            else:
                check_row_norms(case, before, got, 3.0 if "grad_scale" in amp else 1.0)

    LOWP_NORM_CELLS = [(BF, F32, "fp32"), (BF, BF, "remainder"), (F16, F16, "stochastic"),
                       (F32, BF, None)]

    @pytest.mark.parametrize("dtype,sdtype,mode", LOWP_NORM_CELLS,
                             ids=[f"{SHORT[a]}-{SHORT[b]}-{m}" for a, b, m in LOWP_NORM_CELLS])
    def test_lowp_track_norms_matches_cpu_loop(dtype, sdtype, mode):
        """The low-precision NORMS kernels (adamw_lowp_kernel<T, S, true>, lane by lane): a
        clipped step with track_norms (GradScaler 3, grid of 3 reversed), then a clipped step
        without (the coefficient alone, a full grid), bit for bit with the CPU loop (row_norms:
        the param as stored, the 16-bit one under a master mode)."""
        case = Case.new(dtype, matrix_specs(dtype), lowp_groups(dtype, mode), "guarded",
                        seed=33, state_dtype=sdtype)
        ref = case.clone()
        coef, sc, fi = torch.tensor(0.37), torch.tensor(3.0), torch.zeros(())
        for k, norms in enumerate((True, False)):
            if k:
                case.new_grads(torch.Generator().manual_seed(34))
                ref.copy_grads_from(case)
            amp = dict(clip_coef=coef.data_ptr())
            if norms:
                amp.update(grad_scale=sc.data_ptr(), found_inf=fi.data_ptr())
            before = case.snapshot()
            got = step_with_norms(case, True, 3 if norms else 0, ("reverse",), norms=norms, **amp)
            want = step_with_norms(ref, False, norms=norms, **amp)
            check_guards(case)
            check_untouched(case, before)
            compare(case, ref, f"lowp {SHORT[dtype]}/{SHORT[sdtype]} {mode} step {k}")
            assert torch.equal(bits(got), bits(want)), first_difference(got.flatten(),
                                                                      want.flatten())
            if norms:
                check_row_norms(case, before, got, 3.0)

    def test_clip_amsgrad_matches_cpu_loop():
        """A clipped amsgrad table without GradScaler (grad_scale null: the NORMS kernel, no
        row_norms) is bitwise the CPU loop's, and the coefficient is applied in the amsgrad
        loop (exp_avg differs from an unclipped step's everywhere)."""
        case = Case.new(torch.float32, matrix_specs(torch.float32), groups_with("all"),
                        "guarded", seed=35)
        ref, plain = case.clone(), case.clone()
        coef = torch.tensor(0.37)
        step_with_norms(case, True, 2, ("shuffle", 3), norms=False, clip_coef=coef.data_ptr())
        assert [r["kernel"] for r in _EMU.launch_log()] == ["adamw_steps_kernel", "fn"]
        step_with_norms(ref, False, norms=False, clip_coef=coef.data_ptr())
        plain.step_cpu(_C)
        compare(case, ref, "clipped amsgrad: kernel vs CPU loop")
        changed = [not torch.equal(bits(p.bufs["exp_avg"].view), bits(q.bufs["exp_avg"].view))
                   for p, q in zip(case.params, plain.params) if p.spec.numel and p.spec.in_table]
        assert all(changed), "the clip coefficient left some exp_avg unchanged"

    def test_restore_creates_no_context_on_an_unused_device():
        """A thread whose current device (0) has no context: stepping a table on device 1
        must not restore device 0 with cudaSetDevice, which creates a context there since
        CUDA 12 (~500 MB on GPU 0 of every rank). With a context on 0, 0 is restored."""
        _EMU.set_device_count(2)
        case = Case.new(torch.float32, [Spec(300)], groups_with("none")[:1])
        _EMU.set_contexts(0)
        case.step_cuda(_C, device=1)
        assert _EMU.contexts() == 0b10, bin(_EMU.contexts())
        assert _EMU.current_device() == 1
        _EMU.set_current_device(0)  # the user now uses device 0: it has a context
        case.step_cuda(_C, device=1)
        assert _EMU.current_device() == 0 and _EMU.contexts() == 0b11

    def test_launch_errors_surface_as_runtime_error():
        _EMU.set_device_count(2)
        case = Case.new(torch.float32, [Spec(5000, phase=2)], groups_with("none")[:1])
        p0, s0 = case.params[0].bufs["param"].store.clone(), case.params[0].step.item()
        # The update kernel's launch fails (after the steps kernel ran): named, with the text.
        _EMU.inject_error("launch", "cudaErrorLaunchOutOfResources", skip=1)
        with pytest.raises(RuntimeError, match=r"fused_adamw CUDA step failed: adamw_kernel "
                           r"launch: cudaErrorLaunchOutOfResources \(too many resources "
                           r"requested for launch\)"):
            case.step_cuda(_C, device=1)
        assert _EMU.current_device() == 0, "the previous device was not restored"
        assert torch.equal(bits(case.params[0].bufs["param"].store), bits(p0))
        assert case.params[0].step.item() == s0 + 1
        assert [r["error"] for r in _EMU.launch_log()] == [
            0, _EMU.code("cudaErrorLaunchOutOfResources")]
        # The steps kernel's launch fails: nothing runs.
        _EMU.inject_error("launch", "cudaErrorLaunchFailure")
        with pytest.raises(RuntimeError, match="adamw_steps_kernel launch: "
                           "cudaErrorLaunchFailure"):
            case.step_cuda(_C)
        assert case.params[0].step.item() == s0 + 1
        # The error is not sticky: the next step runs.
        case.step_cuda(_C)
        assert case.params[0].step.item() == s0 + 2
        assert not torch.equal(bits(case.params[0].bufs["param"].store), bits(p0))
        # Switching to the device fails: no launch, the current device unchanged.
        _EMU.clear_launch_log()
        with pytest.raises(RuntimeError, match="cudaSetDevice: cudaErrorInvalidDevice"):
            case.step_cuda(_C, device=2)
        _EMU.inject_error("cudaSetDevice", "cudaErrorInitializationError")
        with pytest.raises(RuntimeError, match="cudaSetDevice: cudaErrorInitializationError"):
            case.step_cuda(_C, device=1)
        assert _EMU.launch_log() == [] and _EMU.current_device() == 0

    def test_failed_device_switch_leaves_no_stale_error():
        """A step whose device switch fails must not poison the next step: cudaSetDevice's
        error is also the thread's last error (CUDA records every runtime error for
        cudaGetLastError), and the launcher's post-launch cudaGetLastError of the next step
        would report it. The launcher should clear it (cudaGetLastError) when the guard
        fails, as cuda_device_error does after its failures."""
        _EMU.set_device_count(2)
        case = Case.new(torch.float32, [Spec(100)], groups_with("none")[:1])
        with pytest.raises(RuntimeError, match="cudaSetDevice: cudaErrorInvalidDevice"):
            case.step_cuda(_C, device=2)
        case.step_cuda(_C, device=1)  # a valid step right after

    def test_device_checks():
        _EMU.set_device_count(2)
        assert _C.cuda_device_error(0) == "" and _C.cuda_device_error(1) == ""
        assert _C.cuda_device_error(5) == "device index 5 out of range (2 devices)"
        _EMU.set_compute_capability(12, 0)
        _EMU.inject_error("cudaFuncGetAttributes", "cudaErrorNoKernelImageForDevice", skip=2)
        msg = _C.cuda_device_error(1)
        assert msg.startswith("the kernel cannot run on sm_120 (compiled for emu): "
                              "cudaFuncGetAttributes: cudaErrorNoKernelImageForDevice"), msg
        assert _EMU.current_device() == 0
        _EMU.set_device_count(0)
        assert _C.cuda_device_error(0).startswith("cudaGetDeviceCount: cudaErrorNoDevice")
        assert _C.cuda_runtime_version() == _EMU.runtime_version() >= 12000
        _EMU.set_driver_version(12080)
        assert _C.cuda_driver_version() == 12080
        assert _C.has_cuda and _C.cuda_archs == ["emu"]

    def test_empty_tables():
        _C.step_cuda(0, 0, 0, 0, 0, 0, 0, False, 0, 0)  # no rows: no launch
        assert _EMU.launch_log() == []
        case = Case.new(torch.float16, [Spec(0), Spec(0, phase=3)], groups_with("all")[:1])
        assert case.n_tiles == 0
        case.step_cuda(_C)
        assert [r["kernel"] for r in _EMU.launch_log()] == ["adamw_steps_kernel"]
        assert [p.step.item() for p in case.params] == [1.0, 1.0]

    def test_binding_validation():
        case = Case.new(torch.float32, [Spec(10)], groups_with("none")[:1])
        rows, starts, hp, n_rows, n_tiles, n_groups, _ = case.args()
        with pytest.raises(ValueError, match="dtype code"):
            _C.step_cuda(rows, starts, hp, n_rows, n_tiles, n_groups, 3, False, 0, 0)
        with pytest.raises(ValueError, match="aligned"):
            _C.step_cuda(rows + 4, starts, hp, n_rows, n_tiles, n_groups, 0, False, 0, 0)
        with pytest.raises(ValueError, match=">= 0"):
            _C.step_cuda(rows, starts, hp, -1, n_tiles, n_groups, 0, False, 0, 0)
        assert _EMU.launch_log() == []

    # -- 64-bit offsets --------------------------------------------------------------------

    def test_offsets_past_2_31_and_2_32_elements():
        """A bf16 param of 2^32 + 5003 elements (vector path, amsgrad) and one of
        2^31 + 3001 (grad at another phase: scalar path) in a sparse anonymous mapping of
        56 GiB (MAP_NORESERVE: only touched pages exist). Only the tiles around element 2^31,
        2^32 and the ends run (block filter; then a capped grid whose blocks stride over the
        rows), and their elements must equal the CPU loop's on copies; the elements next to
        them keep their poison."""
        import gc

        isz, page = 2, 1 << 16
        nA, nB = (1 << 32) + 5003, (1 << 31) + 3001
        # (numel, phase of param and states, phase of grad, group)
        layout = [(1025, 2, 2, 0), (nA, 3, 3, 0), (nB, 5, 1, 1)]
        groups = [dict(GROUPS[0], amsgrad=True), dict(GROUPS[2], amsgrad=False)]
        regions, total = [], 0  # per row: buffer name -> byte offset of element 0 in the map
        for numel, ph, gph, grp in layout:
            names = ["param", "grad", "exp_avg", "exp_avg_sq"] + (
                ["max_exp_avg_sq"] if groups[grp]["amsgrad"] else [])
            bufs = {}
            for name in names:
                bufs[name] = total + page + (gph if name == "grad" else ph) * isz
                total += page + ((numel + 16) * isz + page - 1) // page * page
            regions.append(bufs)
        total += page
        assert total > 48 << 30
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        mm = mmap.mmap(-1, total, flags=flags)
        try:
            _check_big_rows(mm, layout, groups, regions)
        finally:
            gc.collect()
            try:
                mm.close()
            except BufferError:  # a failure's traceback still holds a view: unmapped at exit
                pass

    def _check_big_rows(mm, layout, groups, regions):
        from fused_adamw._table import pack_table

        dtype, isz = torch.bfloat16, 2
        addr0 = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()

        def window(off, start, count):
            return torch.frombuffer(mm, dtype=dtype, count=count, offset=off + start * isz)

        steps = [torch.tensor(3.0) for _ in layout]
        rows = []
        for i, r in enumerate(regions):
            mx = addr0 + r["max_exp_avg_sq"] if "max_exp_avg_sq" in r else 0
            rows.append((addr0 + r["param"], addr0 + r["grad"], addr0 + r["exp_avg"],
                         addr0 + r["exp_avg_sq"], mx, steps[i].data_ptr(), layout[i][0],
                         layout[i][3]))
        packed, n_tiles = pack_table(rows, isz)
        starts = packed[len(rows) * _table.ROW_COLS:].tolist()
        hp = hparams(groups)

        def tile_of(row, i):  # the tile holding element i of a row
            return starts[row] + (layout[row][1] + i) // TILE

        def span(tile):  # (row, first element, end) of a tile
            row = max(r for r in range(len(layout)) if starts[r] <= tile)
            ph, j = layout[row][1], tile - starts[row]
            return row, max(0, j * TILE - ph), min(layout[row][0], (j + 1) * TILE - ph)

        nA, nB = layout[1][0], layout[2][0]
        chosen = {0, tile_of(1, 0), tile_of(1, (1 << 31) - 1), tile_of(1, 1 << 31),
                  tile_of(1, (1 << 32) - 1), tile_of(1, 1 << 32), tile_of(1, nA - 1),
                  tile_of(2, 0), tile_of(2, (1 << 31) - 1), tile_of(2, 1 << 31),
                  tile_of(2, nB - 1)}
        gen = torch.Generator().manual_seed(12)
        for cap in (0, 100_003):
            grid = min(n_tiles, cap) if cap else n_tiles
            blocks = sorted({t % grid for t in chosen})
            tiles = [t for t in range(n_tiles) if t % grid in blocks]
            assert len(tiles) < 64
            merged = []  # the tiles' element ranges, adjacent ones merged
            for t in tiles:
                row, a, b = span(t)
                if merged and merged[-1][0] == row and merged[-1][2] == a:
                    merged[-1][2] = b
                else:
                    merged.append([row, a, b])
            # Fill each range, poison 64 elements on each side, copy it for the CPU loop.
            twin_rows, checks = [], []
            for row, a, b in merged:
                n, buf = b - a, {}
                lo, hi = max(0, a - 64), min(layout[row][0], b + 64)
                for name, off in regions[row].items():
                    around = window(off, lo, hi - lo)
                    around.fill_(float("nan"))
                    v = torch.randn(n, generator=gen)
                    around[a - lo:b - lo] = v.abs() if "sq" in name else v
                    buf[name] = (around, a - lo, around[a - lo:b - lo].clone(), around.clone())
                twin_step = torch.tensor(steps[row].item())
                twin_rows.append((buf["param"][2].data_ptr(), buf["grad"][2].data_ptr(),
                                  buf["exp_avg"][2].data_ptr(), buf["exp_avg_sq"][2].data_ptr(),
                                  buf["max_exp_avg_sq"][2].data_ptr()
                                  if "max_exp_avg_sq" in buf else 0,
                                  twin_step.data_ptr(), n, layout[row][3]))
                checks.append((row, a, b, buf, twin_step))
            _EMU.set_block_filter(blocks, nth=1)  # launch 0, the steps kernel, runs whole
            _C._set_grid_cap(cap)
            _C.step_cuda(packed.data_ptr(), packed.data_ptr() + 8 * _table.ROW_COLS * len(rows), hp.data_ptr(),
                         len(rows), n_tiles, len(groups), 1, True, 0, 0)
            _C._set_grid_cap(0)
            update = _EMU.launch_log()[-1]
            assert (update["grid"], update["blocks_run"]) == (grid, len(blocks))
            tpacked, tn = pack_table(twin_rows, isz)
            _C.step_cpu(tpacked.data_ptr(), tpacked.data_ptr() + 8 * _table.ROW_COLS * len(twin_rows),
                        hp.data_ptr(), len(twin_rows), tn, len(groups), 1, 1)
            for row, a, b, buf, _ in checks:
                for name, (around, at, want, poison) in buf.items():
                    where = f"cap {cap}, row {row} elements [{a}, {b}) {name}"
                    got = around[at:at + b - a]
                    assert torch.equal(bits(got), bits(want)), (
                        f"{where}: {first_difference(got, want)}")
                    assert torch.equal(bits(around[:at]), bits(poison[:at])) and torch.equal(
                        bits(around[at + b - a:]), bits(poison[at + b - a:])), (
                        f"{where}: the poison next to it was written")
        assert [s.item() for s in steps] == [5.0, 5.0, 5.0]


if __name__ == "__main__" and sys.argv[1:] == ["--background"]:
    import json
    print(json.dumps(_job()))
