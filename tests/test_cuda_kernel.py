"""The CUDA kernel on a real GPU: ``_C.step_cuda`` against ``_C.step_cpu`` (the CPU loop) on
copies of the same buffers, and both against a float64 oracle.

tests/test_kernel_emulation.py proves kernels/adamw_kernel.cu bit for bit against the CPU loop
on every CI run, compiled as host C++. This file checks what only a GPU can: nvcc's compilation
of it (device math, the bf16/fp16 conversion instructions, the 16-byte global loads and stores)
and the launcher against the real runtime (streams, devices). Same layouts as the emulation
(tests/cuda_emu/cases.py): params at every 16-byte phase inside bigger allocations, grads at
the same and at another phase, guard regions, NaN-poisoned buffers that must stay untouched.

How close must the GPU be to the CPU loop? Both run adamw_math.cuh in float32 with the same
explicit fmaf's (nvcc builds with --fmad=false), so every operation is correctly rounded on both
except powf in the bias corrections: CUDA's powf is within 4 ulp (CUDA C Programming Guide,
single-precision functions) and glibc's within 1 ulp, and for most (beta, step) they agree.
Hence:
  * exp_avg, exp_avg_sq and max_exp_avg_sq of decoupled-decay groups do not depend on powf
    (nor on the param): bit for bit;
  * the param's update u = lr/bc1 * m / (sqrt(v)/bc2s + eps) moves by a relative
    (A1 + A2) * 5 * 2^-23 at most, A1 = b1^t / (1 - b1^t) and A2 = b2^t / (2 (1 - b2^t)) being
    how much 1 - b^t amplifies a relative error of b^t, and the stored param by one more unit
    of its dtype's last place where the two sides round on either side of a tie. Per element,
    per step, the bound is ulp(p) + |u| (A1 + A2) 5 2^-23, summed over the steps (the
    difference carries over): usually below one ulp of the param, and zero where the powf's
    agree. The bit-exact fraction is printed, for information only (-rA or -s shows it).
  * Adam's L2 decay (grad += wd * p) passes a param difference into the moments: 2 ulp of
    their dtype per step.
Against the float64 oracle (this file's oracle_step, the header's formula in float64 from each
side's own state before the step), each side must be within one ulp of the stored dtype plus a
few float32 roundings of the terms involved, the update's term widened by the powf bound.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_emu.cases import (GROUPS, ITEMSIZE, TILE, Case, Spec, bits, check_covered,
                            check_guards, check_untouched, compare, first_difference, hparams,
                            phases)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
SIZES = [0, 1, 7, 1023, 1024, 1025, 4097, 16383, 16384, 16385, 278011]
POWF_ULPS = 4 + 1  # CUDA's powf bound plus glibc's
STORAGE_EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
AMSGRAD = {"none": lambda i: False, "some": lambda i: i % 2 == 1, "all": lambda i: True}


def _groups():
    from fused_adamw import _table
    groups = [dict(g) for g in GROUPS]
    if hasattr(_table, "HP_DECAY_MODE") and hasattr(_table, "HP_MAX_LR"):
        groups[2]["max_lr"] = 2e-2
        groups.append(dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05,
                           maximize=True, decay_mode=1.0))
    return groups


def groups_with(amsgrad):
    return [dict(g, amsgrad=AMSGRAD[amsgrad](i)) for i, g in enumerate(_groups())]


# -- the device (one place, so that the checks can be dry-run on the CPU emulation) ----------

def sync():
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def stream_handle() -> int:
    return torch.cuda.current_stream().cuda_stream


def current_device() -> int:
    return torch.cuda.current_device()


@pytest.fixture
def C():
    try:
        from fused_adamw import _C
    except ImportError as e:
        pytest.skip(f"fused_adamw._C is not built: {e}")
    if not _C.has_cuda:
        pytest.skip("fused_adamw._C was built without CUDA")
    reason = _C.cuda_device_error(current_device())
    if reason:
        pytest.skip(reason)
    _C._set_grid_cap(0)
    yield _C
    _C._set_grid_cap(0)


# -- the float64 oracle -------------------------------------------------------------------

def _f64(t):
    return t.detach().to("cpu", torch.float64)


def _hp(group):
    """The group's hyperparameters as the kernel reads them (float32), as Python floats."""
    row = hparams([group])[0].tolist()
    from fused_adamw import _table as T
    get = lambda name, default=0.0: row[getattr(T, name)] if hasattr(T, name) else default
    return dict(lr=row[T.HP_LR], b1=row[T.HP_BETA1], b2=row[T.HP_BETA2], eps=row[T.HP_EPS],
                wd=row[T.HP_WEIGHT_DECAY], maximize=row[T.HP_MAXIMIZE] != 0,
                l2=get("HP_DECAY_MODE") != 0 and row[T.HP_WEIGHT_DECAY] != 0,
                max_lr=get("HP_MAX_LR"))


def oracle_step(pre: dict, group: dict, step: float, amsgrad: bool):
    """kernels/adamw_math.cuh's update in float64 from the state `pre` (float64 tensors);
    returns the new state, |update|, the powf amplification A1 + A2 and, per result, the
    magnitude of the terms it is computed from (its float32 rounding errors scale with it)."""
    h = _hp(group)
    p, g, m, v = pre["param"], pre["grad"], pre["exp_avg"], pre["exp_avg_sq"]
    bc1 = 1.0 - h["b1"] ** step
    bc2s = math.sqrt(1.0 - h["b2"] ** step)
    if h["maximize"]:
        g = -g
    if h["l2"]:
        g = g + h["wd"] * p
    elif h["wd"] != 0.0:
        decay = (h["lr"] / h["max_lr"]) * h["wd"] if h["max_lr"] else h["lr"] * h["wd"]
        p = p - decay * p
    m_new = h["b1"] * m + (1.0 - h["b1"]) * g
    v_new = h["b2"] * v + (1.0 - h["b2"]) * g * g
    out = {"exp_avg": m_new, "exp_avg_sq": v_new}
    second = v_new
    if amsgrad:
        second = torch.maximum(pre["max_exp_avg_sq"], v_new)
        out["max_exp_avg_sq"] = second
    upd = (h["lr"] / bc1) * m_new / (second.sqrt() / bc2s + h["eps"])
    out["param"] = p - upd
    amp = (h["b1"] ** step / bc1) + 0.5 * (h["b2"] ** step) / (bc2s * bc2s)
    terms = {  # magnitudes of the float32 terms each result is rounded from
        "param": pre["param"].abs() + upd.abs() * (1.0 + amp * POWF_ULPS),
        "exp_avg": (h["b1"] * m).abs() + ((1.0 - h["b1"]) * g).abs(),
        "exp_avg_sq": h["b2"] * v + (1.0 - h["b2"]) * g * g,
    }
    terms["max_exp_avg_sq"] = terms["exp_avg_sq"]
    return out, upd.abs(), amp, terms


def _state(case: Case, i: int) -> dict:
    return {k: _f64(b.view) for k, b in case.params[i].bufs.items()}


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of |x| in `dtype` (float64; the smallest normal's below it)."""
    tiny = torch.finfo(dtype).tiny
    e = torch.floor(torch.log2(x.abs().clamp_min(tiny)))
    return torch.exp2(e) * STORAGE_EPS[dtype]


def check_against_oracle(case: Case, pre: list, who: str):
    """Each param of the table (just stepped) against oracle_step from its state `pre`."""
    bad = []
    for i, p in enumerate(case.params):
        if not p.spec.in_table or not p.spec.numel:
            continue
        group = case.groups[p.spec.group]
        want, _, _, terms = oracle_step(pre[i], group, p.step.item(), group["amsgrad"])
        for name, o in want.items():
            got = _f64(p.bufs[name].view)
            tol = _ulp(o, case.dtype) + 16 * 2.0 ** -24 * terms[name]
            err = (got - o).abs()
            if not bool((err <= tol).all()):
                k = int((err - tol).argmax())
                bad.append(f"param {i} ({p.spec}) {name}: {got[k].item()!r} vs oracle "
                           f"{o[k].item()!r} (tolerance {tol[k].item():.3g})")
    assert not bad, f"{who} vs the float64 oracle:\n  " + "\n  ".join(bad[:12])


class Bounds:
    """The per-element bound on |GPU - CPU loop| of every param, carried over the steps."""

    def __init__(self, case: Case):
        self.case = case
        self.param = {i: torch.zeros(p.spec.numel, dtype=torch.float64)
                      for i, p in enumerate(case.params) if p.spec.in_table}
        self.steps = 0
        self.exact = self.total = 0
        self.max_ulps = 0.0  # the largest param difference seen, in ulps of the CPU's param

    def step(self, ref: Case, pre_ref: list):
        """Widens the bounds by this step's (from the CPU side's state before the step)."""
        self.steps += 1
        for i in self.param:
            p = ref.params[i]
            group = ref.groups[p.spec.group]
            _, upd, amp, _ = oracle_step(pre_ref[i], group, p.step.item(), group["amsgrad"])
            now = _f64(p.bufs["param"].view)
            self.param[i] += _ulp(now, ref.dtype) + upd * amp * POWF_ULPS * 2.0 ** -23

    def check(self, gpu: Case, cpu: Case, what: str):
        bad = []
        for i, (a, b) in enumerate(zip(gpu.params, cpu.params)):
            if not a.spec.in_table:
                continue
            group = gpu.groups[a.spec.group]
            l2 = _hp(group)["l2"]
            for name in a.bufs:
                if name == "grad" or (name == "max_exp_avg_sq" and not group["amsgrad"]):
                    continue
                x, y = a.bufs[name].view.cpu(), b.bufs[name].view
                same = bits(x) == bits(y)
                self.exact += int(same.sum())
                self.total += same.numel()
                if name != "param" and not l2:
                    if not bool(same.all()):
                        k = int((~same).nonzero()[0])
                        bad.append(f"param {i} ({a.spec}) {name}: not bit-exact (no powf in "
                                   f"it): {x[k].item()!r} vs {y[k].item()!r}")
                    continue
                diff = (_f64(x) - _f64(y)).abs()
                tol = (self.param[i] if name == "param"
                       else 2 * self.steps * _ulp(_f64(y), gpu.dtype))
                if name == "param" and diff.numel():
                    ulps = float((diff / _ulp(_f64(y), gpu.dtype)).max())
                    self.max_ulps = max(self.max_ulps, ulps)
                if not bool((diff <= tol).all()):
                    k = int((diff - tol).argmax())
                    bad.append(f"param {i} ({a.spec}) {name}: {x[k].item()!r} vs "
                               f"{y[k].item()!r}, bound {tol[k].item():.3g}")
            if a.step.item() != b.step.item():
                bad.append(f"param {i}: step {a.step.item()} vs {b.step.item()}")
        assert not bad, f"GPU vs CPU loop ({what}):\n  " + "\n  ".join(bad[:12])

    def report(self, label: str):
        print(f"{label}: {self.exact}/{self.total} elements bit-exact "
              f"({100.0 * self.exact / max(self.total, 1):.4f}%), largest param difference "
              f"{self.max_ulps:.0f} ulp")


def run_steps(C, case: Case, caps, label: str, cpu_threads=2, launch=None):
    """Steps `case` on the GPU and its CPU copy with the CPU loop, once per cap; checks
    guards, poison, the bound between them and each against the oracle. `launch(case)`
    replaces the default launch (current device and stream)."""
    ref = case.clone(device="cpu")
    bounds = Bounds(case)
    gen = torch.Generator().manual_seed(21)
    for k, cap in enumerate(caps):
        if k:
            ref.new_grads(gen)
            case.copy_grads_from(ref)
        pre_gpu = [_state(case, i) if p.spec.in_table else None
                   for i, p in enumerate(case.params)]
        pre_ref = [_state(ref, i) if p.spec.in_table else None
                   for i, p in enumerate(ref.params)]
        before = case.snapshot()
        C._set_grid_cap(cap)
        if launch is None:
            case.step_cuda(C, device=current_device(), stream=stream_handle())
        else:
            launch(case)
        C._set_grid_cap(0)
        ref.step_cpu(C, cpu_threads)
        sync()
        check_guards(case)
        check_untouched(case, before)
        if k == 0:
            check_covered(case)
        bounds.step(ref, pre_ref)
        bounds.check(case, ref, f"{label}, step {k + 1}, cap {cap}")
        check_against_oracle(case, pre_gpu, f"GPU ({label}, step {k + 1})")
        check_against_oracle(ref, pre_ref, f"CPU loop ({label}, step {k + 1})")
    bounds.report(label)
    return ref


def matrix_specs(dtype, n_groups):
    nph = phases(dtype)
    specs = []
    for i, n in enumerate(SIZES):
        ph = (3 * i + 1) % nph
        gph = [ph, (ph + 1) % nph, (ph + nph // 2) % nph][i % 3]
        specs.append(Spec(n, group=i % n_groups, phase=ph, grad_phase=gph,
                          max_in_row=i % 2 == 1, step0=[0, 2, 9][i % 3]))
    specs.insert(3, Spec(1025, group=1, phase=1, in_table=False))
    specs.append(Spec(7, group=0, phase=0, in_table=False))
    return specs


# -- the checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["exact", "guarded"])
@pytest.mark.parametrize("amsgrad", list(AMSGRAD))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_cpu_loop(C, dtype, amsgrad, layout):
    groups = groups_with(amsgrad)
    case = Case.new(dtype, matrix_specs(dtype, len(groups)), groups, layout, seed=1,
                    device=DEVICE)
    run_steps(C, case, [0, 3, 1], f"{dtype} amsgrad {amsgrad} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_track_norms_matches_cpu_loop(C, dtype):
    """track_norms and the clip coefficient on the NORMS kernels (issue #19), amsgrad on some
    groups: with betas (0.5, 0.5) every powf(beta, t) is exact on both sides, so the step and
    row_norms are bit for bit the CPU loop's (as tests/test_kernel_emulation.py proves for the
    source), on a full grid and a grid of 3; GradScaler (3.0) on the second step."""
    groups = [dict(g, beta1=0.5, beta2=0.5, amsgrad=i % 2 == 1) for i, g in enumerate(_groups())]
    case = Case.new(dtype, matrix_specs(dtype, len(groups)), groups, "guarded", seed=41,
                    device=DEVICE)
    ref = case.clone(device="cpu")
    n_rows, n_tiles = case.args()[3], case.args()[4]
    gen = torch.Generator().manual_seed(42)
    for k, cap in enumerate((0, 3)):
        if k:
            ref.new_grads(gen)
            case.copy_grads_from(ref)
        dev = dict(clip_coef=torch.tensor(0.37, device=DEVICE))
        cpu = dict(clip_coef=torch.tensor(0.37))
        if k:
            dev["grad_scale"], cpu["grad_scale"] = torch.tensor(3.0, device=DEVICE), torch.tensor(3.0)
        rn = torch.full((n_rows, 3), float("nan"), device=DEVICE)
        rc = torch.full((n_rows, 3), float("nan"))
        scratch = torch.empty(max(n_tiles * 3 * 257, 1), device=DEVICE)
        before = case.snapshot()
        C._set_grid_cap(cap)
        case.step_cuda(C, device=current_device(), stream=stream_handle(),
                       row_norms=rn.data_ptr(), norm_scratch=scratch.data_ptr(),
                       **{key: v.data_ptr() for key, v in dev.items()})
        C._set_grid_cap(0)
        ref.step_cpu(C, 2, row_norms=rc.data_ptr(), **{key: v.data_ptr() for key, v in cpu.items()})
        sync()
        check_guards(case)
        check_untouched(case, before)
        compare(case, ref, f"track_norms, step {k + 1}, cap {cap}: GPU vs CPU loop")
        assert torch.equal(bits(rn.cpu()), bits(rc)), first_difference(rn.cpu().flatten(),
                                                                       rc.flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_phase(C, dtype):
    nph = phases(dtype)
    specs = []
    for n in (1, 7, 9, 1025, 16385):
        for ph in range(nph):
            other = (ph + 1 + n % (nph - 1)) % nph
            specs += [Spec(n, 0, ph), Spec(n, 1, ph), Spec(n, 0, ph, grad_phase=other),
                      Spec(n, 1, ph, grad_phase=other), Spec(n, 0, ph, max_phase=other)]
    groups = [dict(GROUPS[0], amsgrad=True), dict(GROUPS[1], amsgrad=False)]
    case = Case.new(dtype, specs, groups, "guarded", seed=3, device=DEVICE)
    run_steps(C, case, [0, 2], f"{dtype} every phase")


@pytest.mark.parametrize("cap", [1, 2, 5, 7, 64])
def test_capped_grids_stride(C, cap):
    specs = [Spec(n, i % 2, phase=(i * 3) % 4, grad_phase=i % 4)
             for i, n in enumerate([278011, 0, 1, 16384, 16385, 1023, 0, 40000])]
    case = Case.new(torch.float32, specs, groups_with("some")[:2], "exact", seed=8,
                    device=DEVICE)
    run_steps(C, case, [cap, cap], f"cap {cap}")


def test_steps_kernel_strided(C):
    specs = [Spec(i % 5, i % 2, phase=i % 4, step0=float(i % 7)) for i in range(600)]
    for cap in (0, 1, 2):
        case = Case.new(torch.float32, specs, groups_with("some")[:2], "exact", seed=10,
                        device=DEVICE)
        run_steps(C, case, [cap], f"600 rows, cap {cap}")
        assert [p.step.item() for p in case.params] == [p.spec.step0 + 1 for p in case.params]


def test_side_stream(C):
    case = Case.new(torch.bfloat16, [Spec(278011, phase=3), Spec(4097, 1, 5, grad_phase=1)],
                    groups_with("some")[:2], seed=13, device=DEVICE)

    def on_a_side_stream(c):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            c.step_cuda(C, device=current_device(), stream=s.cuda_stream)
        s.synchronize()

    run_steps(C, case, [0, 0], "side stream", launch=on_a_side_stream)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_second_device_and_current_device_restored(C):
    torch.cuda.set_device(0)
    case = Case.new(torch.float32, [Spec(1025, phase=1), Spec(278011, 1, 2)],
                    groups_with("some")[:2], seed=14, device="cuda:1")

    def on_device_1(c):
        with torch.cuda.device(1):
            stream = torch.cuda.current_stream().cuda_stream
        c.step_cuda(C, device=1, stream=stream)
        assert torch.cuda.current_device() == 0

    run_steps(C, case, [0, 0], "cuda:1 while cuda:0 is current", launch=on_device_1)


def test_invalid_device_raises(C):
    case = Case.new(torch.float32, [Spec(100)], groups_with("none")[:1], device=DEVICE)
    before = current_device()
    with pytest.raises(RuntimeError, match="cudaSetDevice: cudaErrorInvalidDevice"):
        case.step_cuda(C, device=torch.cuda.device_count(), stream=stream_handle())
    assert current_device() == before


def test_step_after_a_failed_device_switch(C):
    case = Case.new(torch.float32, [Spec(100)], groups_with("none")[:1], device=DEVICE)
    with pytest.raises(RuntimeError):
        case.step_cuda(C, device=torch.cuda.device_count(), stream=stream_handle())
    case.step_cuda(C, device=current_device(), stream=stream_handle())
    sync()


def test_empty_tables(C):
    C.step_cuda(0, 0, 0, 0, 0, 0, 0, False, current_device(), stream_handle())
    case = Case.new(torch.float16, [Spec(0), Spec(0, phase=3)], groups_with("all")[:1],
                    device=DEVICE)
    assert case.n_tiles == 0
    case.step_cuda(C, device=current_device(), stream=stream_handle())
    sync()
    assert [p.step.item() for p in case.params] == [1.0, 1.0]


@pytest.mark.slow
def test_offsets_past_2_31_and_2_32_elements(C):
    """A bf16 param of 2^32 + 5003 elements (amsgrad; 40 GiB with its state) and one of
    2^31 + 3001 with its grad at another phase: the tiles around element 2^31, 2^32 and the
    ends equal the CPU loop's on copies of them (within the bounds above)."""
    dtype = torch.bfloat16
    nA, nB = (1 << 32) + 5003, (1 << 31) + 3001
    need = (5 * nA + 4 * nB) * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    groups = [dict(GROUPS[0], amsgrad=True), dict(GROUPS[2], amsgrad=False)]
    specs = [Spec(nA, 0, phase=3), Spec(nB, 1, phase=5, grad_phase=1)]
    gen = torch.Generator().manual_seed(15)
    # Buffers by hand (Case.new would fill 50 GiB from the CPU): zeros, random windows.
    from cuda_emu.cases import Buf, Param
    params = []
    for s in specs:
        bufs = {}
        for name in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name == "max_exp_avg_sq" and not groups[s.group]["amsgrad"]:
                continue
            ph = s.grad_phase if name == "grad" and s.grad_phase is not None else s.phase
            isz = ITEMSIZE[dtype]
            store = torch.zeros(64 // isz + ph + s.numel, dtype=dtype, device=DEVICE)
            bufs[name] = Buf(store, 64 // isz + ph, s.numel, "exact")
        params.append(Param(s, bufs, torch.tensor(3.0, device=DEVICE)))
    case = Case(dtype, params, groups, DEVICE)
    windows = []
    for i, s in enumerate(specs):
        for at in (0, (1 << 31) - TILE, (1 << 32) - TILE, s.numel - 2 * TILE):
            if 0 <= at < s.numel:
                windows.append((i, at, min(s.numel, at + 2 * TILE)))
    for i, a, b in windows:
        for name, buf in case.params[i].bufs.items():
            v = torch.randn(b - a, generator=gen)
            buf.view[a:b] = (v.abs() if "sq" in name else v).to(dtype)
    # The windows as a case of their own (views into the big buffers), and CPU copies.
    win = Case(dtype, [Param(Spec(b - a, specs[i].group, max_in_row=False),
                             {name: Buf(buf.store, buf.front + a, b - a, "exact")
                              for name, buf in case.params[i].bufs.items()},
                             case.params[i].step) for i, a, b in windows], groups, DEVICE)
    twin = Case.new(dtype, [Spec(b - a, specs[i].group, max_in_row=False, step0=3.0)
                            for i, a, b in windows], groups, seed=16)
    for t, w in zip(twin.params, win.params):
        for name, buf in t.bufs.items():
            buf.view.copy_(w.bufs[name].view)
    pre_win = [_state(win, k) for k in range(len(windows))]
    pre_twin = [_state(twin, k) for k in range(len(windows))]
    case.step_cuda(C, device=current_device(), stream=stream_handle())
    sync()
    twin.step_cpu(C, 2)
    bounds = Bounds(win)
    bounds.step(twin, pre_twin)
    bounds.check(win, twin, "windows of params past 2^31 and 2^32 elements")
    check_against_oracle(win, pre_win, "GPU (windows past 2^31 and 2^32)")
    check_against_oracle(twin, pre_twin, "CPU loop (the same windows)")
    bounds.report("past 2^31 and 2^32 elements")
