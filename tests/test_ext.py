"""fused_adamw._C: the build, and the C++ CPU loop (backend "cpu") against the header's
arithmetic, the torch backend and torch.optim.AdamW. CPU only; the CUDA twin is
tests/test_cuda_kernel.py.

Every run goes through the public API (``FusedAdamW(..., backend="cpu")``); the tests that
need the param table read it from ``opt._tables`` ((device, dtype) -> fused_adamw._table.Table).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _trajectory import real as as_real
from _trajectory import run as run_trajectory
from conftest import ODD_SIZES, make_params

from fused_adamw import FusedAdamW, __version__, _ext, _table
from fused_adamw.backends.cpu import BACKEND as CPU
from fused_adamw.backends.cuda import BACKEND as CUDA

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

needs_ext = pytest.mark.skipif(_ext.C is None, reason=f"fused_adamw._C: {_ext.REASON}")

# Two groups that differ in every hyperparameter, params interleaved between them.
GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-1),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
]
OPTIONS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(amsgrad=True), id="amsgrad"),
    pytest.param(dict(maximize=True), id="maximize"),
    pytest.param(dict(amsgrad=True, maximize=True, weight_decay=0.0), id="amsgrad-maximize-wd0"),
]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def diff_report(ours: torch.Tensor, ref: torch.Tensor) -> str:
    """How many elements differ, the first indices, NaN/inf counted separately."""
    ours, ref = ours.flatten().double(), ref.flatten().double()
    nan = (ours.isnan() != ref.isnan()).sum().item()
    inf = (ours.isinf() != ref.isinf()).sum().item()
    bad = (ours != ref) & ~(ours.isnan() & ref.isnan())
    idx = bad.nonzero().flatten()[:5].tolist()
    d = (ours - ref).abs()[bad]
    worst = d.max().item() if d.numel() else 0
    return (f"{bad.sum().item()}/{ours.numel()} differ (max abs {worst:.3g}),"
            f" first at {idx}: ours {ours[idx].tolist()} ref {ref[idx].tolist()};"
            f" NaN mismatches {nan}, inf mismatches {inf}")


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in ulps of their storage dtype (a and b of the same dtype: float32, bfloat16
    or float16): difference of the order-preserving integer keys."""
    bits = _BITS[a.dtype]
    sign = torch.iinfo(bits).min

    def key(x):
        i = x.detach().contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & ~sign), i)

    return (key(a) - key(b)).abs()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN with the same payload)."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if a.dtype == torch.float64:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def grouped(params, groups, group_of):
    """torch-style param groups: param i goes to groups[group_of[i]]."""
    return [dict(g, params=[p for p, gi in zip(params, group_of) if gi == k])
            for k, g in enumerate(groups)]


def snapshot(opt, p) -> dict:
    """Copies of a param and every state tensor it has (step included)."""
    out = {"param": p.detach().clone()}
    for key, value in opt.state[p].items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
    return out


def run_pair(sizes, dtype, groups, group_of, steps, backend_a, backend_b, skip_every=0):
    """The same trajectory on two optimizers stepped by two backends. skip_every: param i has
    no grad in steps where (step + i) % skip_every == 0; whenever it has none, both
    optimizers must leave its param and state (step count included) bit for bit as they were.
    After the first step each param's step count is set to 3 * i + 1 in both, so that the
    params run at different steps and different bias corrections reach the loop."""
    torch.manual_seed(0)
    pa = make_params(sizes, dtype)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa = FusedAdamW(grouped(pa, groups, group_of), backend=backend_a)
    ob = FusedAdamW(grouped(pb, groups, group_of), backend=backend_b)
    skipped = 0
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        has_grad = [not skip_every or (step + i) % skip_every != 0 for i in range(len(sizes))]
        for i, (a, b) in enumerate(zip(pa, pb)):
            g = torch.randn(a.shape, generator=gen).to(dtype) if has_grad[i] else None
            a.grad = g
            b.grad = None if g is None else g.clone()
        before = [(snapshot(oa, a), snapshot(ob, b)) if not has_grad[i] else None
                  for i, (a, b) in enumerate(zip(pa, pb))]
        oa.step()
        ob.step()
        for i, (a, b) in enumerate(zip(pa, pb)):
            if before[i] is None:
                continue
            skipped += 1
            for opt, p, snap in ((oa, a, before[i][0]), (ob, b, before[i][1])):
                now = snapshot(opt, p)
                assert now.keys() == snap.keys()
                for key in snap:
                    assert same_bits(now[key], snap[key]), (
                        f"step {step}: {key} of param {i} (no grad) changed ({opt.backend})")
        if step == 0:
            for i, (a, b) in enumerate(zip(pa, pb)):
                if has_grad[i]:
                    oa.state[a]["step"].fill_(3 * i + 1)
                    ob.state[b]["step"].fill_(3 * i + 1)
    assert not skip_every or skipped > 0
    return (oa, pa), (ob, pb)


# ------------------------------------------------------------------------------------------
# the build
# ------------------------------------------------------------------------------------------


def test_module_builds_and_imports():
    assert _ext.C is not None, _ext.REASON
    assert _ext.C.__version__ == __version__
    assert isinstance(_ext.C.has_cuda, bool)
    archs = list(_ext.C.cuda_archs)
    assert all(re.fullmatch(r"\d+[af]?(\+PTX)?", a) for a in archs), archs
    assert bool(archs) == _ext.C.has_cuda, archs
    info = _ext.build_info()
    assert info["available"] and info["version"] == __version__
    if _ext.C.has_cuda:
        assert info["cuda_runtime_version"] >= 11000
    assert isinstance(info["cpu_loop_isa"], str)
    # The table layout the compiled loops read (kernels/adamw_params.h) is the one
    # fused_adamw._table writes.
    assert _ext.C.tile_elems == _table.TILE_ELEMS
    assert _ext.C.row_cols == _table.ROW_COLS
    assert _ext.C.hparam_cols == _table.HPARAM_COLS


@needs_ext
def test_cuda_reasons_without_a_device():
    assert CUDA.unavailable_reason(torch.device("cpu"), torch.float32) is not None
    if not torch.cuda.is_available():
        reason = CUDA.unavailable_reason(torch.device("cuda", 0), torch.float32)
        assert reason  # a sentence, not an exception
        if _ext.C.has_cuda:
            assert _ext.C.cuda_device_error(0)  # driver missing or no device: a reason


def test_cpu_backend_reasons():
    assert "float32" in CPU.unavailable_reason(torch.device("cpu"), torch.float64)
    assert CPU.unavailable_reason(torch.device("meta"), torch.float32) is not None
    assert "int32" in CPU.unavailable_reason(torch.device("cpu"), torch.int32)
    if _ext.C is not None:
        for dtype in DTYPES:
            assert CPU.unavailable_reason(torch.device("cpu"), dtype) is None


# ------------------------------------------------------------------------------------------
# the arithmetic: one step against the header, emulated exactly
# ------------------------------------------------------------------------------------------


def _fma(a, b, c):
    """fmaf on float32 arrays, correctly rounded: a*b is exact in float64 (24 + 24 bits); the
    float64 sum s = a*b + c rounds once, TwoSum gives its exact error e, and where e != 0 s is
    moved to its odd float64 neighbour on e's side (round to odd). Rounding that to float32
    (53 >= 24 + 2 bits) is the correctly rounded a*b + c, with no double-rounding ties."""
    a, b, c = np.broadcast_arrays(*(np.asarray(x, dtype=np.float32) for x in (a, b, c)))
    prod = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = prod + c64
    bb = s - prod
    e = (prod - (s - bb)) + (c64 - bb)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((e != 0) & even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def test_fma_emulation_rounds_once():
    """The emulation itself, where plain float64 evaluation rounds twice: a*b = 1 + 2**-11 +
    2**-24 lies exactly between two fp32 values; with c = 2**-60 the true sum is just above
    that tie (fmaf rounds up) but its float64 rounding is the tie itself (which rounds to even,
    down)."""
    a = b = np.float32(1 + 2**-12)
    low = np.float32(1 + 2**-11)
    high = np.nextafter(low, np.float32(2))
    c = np.float32(2**-60)
    assert (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32) == low  # naive
    assert _fma(a, b, c) == high
    assert _fma(a, b, np.float32(0)) == low  # the exact tie: to even
    assert _fma(a, b, -c) == low
    assert _fma(-a, b, -c) == -high  # signs: round to nearest is symmetric


def _header_step(p, g, m, v, vmax, hp, step):
    """kernels/adamw_math.cuh (adamw_scalars, then adamw_update), op for op, in numpy float32
    (IEEE operations, one rounding each; fmaf emulated exactly by _fma). ``hp``: the param's
    group row of the hyperparameter table (Table.host_hparams, columns _table.HP_*).
    Storage-dtype tensors in (upcast exactly to float32, as the loop loads them), float32
    tensors out.

    NOTE on numpy: torch's own float32 CPU kernels are not all one-rounding-per-operation (a
    division by a 0-d tensor may become a multiplication by its reciprocal), so the oracle of
    this exact test is numpy.
    """
    p, g, m, v, vmax = (t.detach().float().numpy() for t in (p, g, m, v, vmax))
    lr, b1, b2, eps, wd, max_lr = (np.float32(hp[c]) for c in (
        _table.HP_LR, _table.HP_BETA1, _table.HP_BETA2, _table.HP_EPS, _table.HP_WEIGHT_DECAY,
        _table.HP_MAX_LR))
    maximize, amsgrad = hp[_table.HP_MAXIMIZE] != 0, hp[_table.HP_AMSGRAD] != 0
    step = np.float32(step)
    # adamw_scalars
    decay = (lr / max_lr) * wd if max_lr != 0 else lr * wd
    # powf: float64 pow then one rounding, the correctly rounded powf (glibc's powf is
    # within 0.52 ulp of it, equal in all but rare hard cases).
    one = np.float32(1)
    bc1 = one - np.float32(np.float64(b1) ** np.float64(step))
    bc2_sqrt = np.sqrt(one - np.float32(np.float64(b2) ** np.float64(step)))
    l2 = hp[_table.HP_DECAY_MODE] != 0 and wd != 0
    # adamw_update
    if maximize:
        g = -g
    if l2:
        g = _fma(p, wd, g)
    elif wd != 0:
        p = _fma(-decay, p, p)
    m = _fma(b1, m, _fma(-b1, g, g))
    gsq = g * g
    v = _fma(b2, v, _fma(-b2, gsq, gsq))
    second = v
    if amsgrad:
        vmax = np.where(vmax < v, v, vmax)
        second = vmax
    denom = np.sqrt(second) / bc2_sqrt + eps
    p = p - ((lr / bc1) * m) / denom
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                 for x in (p, m, v, vmax))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_cpu_loop_is_the_header_arithmetic(options, dtype):
    """One step from random mid-training state (set in place after a first step, a different
    step count per param, some far from 1), every element against _header_step."""
    groups = [dict(g, **options) for g in GROUPS]
    sizes = [4 * _table.TILE_ELEMS + 4465, 1025, 7, 4097]  # 5 tiles, 1, 1, 1
    group_of = [0, 1, 0, 1]
    start_steps = [0, 3, 999, 123455]  # the step reads them + 1
    params = make_params(sizes, dtype)
    opt = FusedAdamW(grouped(params, groups, group_of), backend="cpu")
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()  # creates the state
    for p, k in zip(params, start_steps):
        st = opt.state[p]
        st["step"].fill_(k)
        st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        if "max_exp_avg_sq" in st:
            st["max_exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    before = [snapshot(opt, p) for p in params]
    opt.step()
    (table,) = opt._tables.values()
    for i, (p, k) in enumerate(zip(params, start_steps)):
        group = opt.param_groups[group_of[i]]
        b = before[i]
        st = opt.state[p]
        assert st["step"].item() == k + 1
        has_max = "max_exp_avg_sq" in b
        assert has_max == bool(group["amsgrad"])
        vmax0 = b["max_exp_avg_sq"] if has_max else torch.zeros(p.shape)
        hp = table.host_hparams[group_of[i]]
        assert hp[_table.HP_LR] == group["lr"] and hp[_table.HP_AMSGRAD] == group["amsgrad"]
        want = _header_step(b["param"], p.grad, b["exp_avg"], b["exp_avg_sq"], vmax0, hp, k + 1)
        got = [p, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] if has_max else None]
        for name, x, y in zip(("param",) + STATE_KEYS, got, want):
            if x is None:
                continue
            y = y.to(dtype)  # the loop's one rounding to storage (round to nearest even)
            ulps = ulp_distance(x, y)
            # Bit for bit but for powf: the emulation rounds the float64 pow once, glibc's
            # powf is within 0.52 ulp and may differ in rare hard cases, moving a bias
            # correction by 1 ulp and the param by at most 1 ulp. Hence <= 1 ulp, and exact
            # in (far) more than 99.9% of the elements.
            what = f"param {i} {name}: {diff_report(x, y)}"
            assert ulps.max().item() <= 1, what
            assert (ulps != 0).float().mean().item() < 1e-3, what


# ------------------------------------------------------------------------------------------
# trajectories: the torch backend, torch.optim.AdamW
# ------------------------------------------------------------------------------------------


# ODD_SIZES with a smaller multi-tile param (3 tiles, the last one partial) in place of
# 278011: the trajectories run the torch backend 50 times, and the C++ loop's big tiles are
# covered by the header test and the thread test.
TRAJECTORY_SIZES = [s for s in ODD_SIZES if s < _table.TILE_ELEMS] + [2 * _table.TILE_ELEMS + 8193]


@needs_ext
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_loop_matches_torch_backend(dtype, options):
    """50 steps of the C++ loop and the torch backend, two groups, params at different steps,
    every param without a grad in one step of five (untouched then: run_pair checks it)."""
    groups = [dict(g, **options) for g in GROUPS]
    group_of = [i % 2 for i in range(len(TRAJECTORY_SIZES))]
    (oa, pa), (ob, pb) = run_pair(TRAJECTORY_SIZES, dtype, groups, group_of, 50, "cpu",
                                  "torch", skip_every=5)
    assert oa.backend == "cpu" and ob.backend == "torch"
    buffers: dict[str, list] = {}
    for i, (p, q) in enumerate(zip(pa, pb)):
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys(), i
        assert ("max_exp_avg_sq" in sa) == bool(options.get("amsgrad", False)), i
        assert torch.equal(sa["step"], sb["step"]), f"param {i}: steps differ"
        buffers.setdefault("param", []).append((p.detach(), q.detach()))
        for key in STATE_KEYS:
            if key in sa:
                buffers.setdefault(key, []).append((sa[key], sb[key]))
    for name, pairs in buffers.items():
        # Every param's values of one buffer side by side, as the flat buckets of earlier
        # versions held them: the 16-bit fractions below are over all elements.
        a = torch.cat([x.flatten() for x, _ in pairs])
        b = torch.cat([y.flatten() for _, y in pairs])
        assert not a.isnan().any(), f"{name}: NaN in the C++ loop's result"
        if dtype == torch.float32:
            # The torch backend writes each fmaf of the header as a*b + c (two roundings), so
            # every step may differ by a couple of ulp, and near-cancelling updates (p close
            # to 0) turn that into more ulp of a small result. So the bound is in ulp of the
            # scale of that buffer of that param: measured max ~19 eps * max|ref| after
            # 50 steps; bound 64.
            for i, (x, y) in enumerate(pairs):
                if x.numel():
                    tol = 64 * torch.finfo(torch.float32).eps * y.abs().max()
                    assert ((x - y).abs() <= tol).all(), f"param {i} {name}: {diff_report(x, y)}"
        else:
            # 16-bit storage: one ulp flips of a rounding propagate (an fp32 difference of an
            # ulp flips the storage rounding near a midpoint, more often than 2**-16 of the
            # time because 16-bit inputs make near-ties common, and a flipped moment decays by
            # beta but rounds back to a whole ulp for many steps); almost all elements agree
            # exactly, the rest within a few storage ulps. Measured: > 99.93% close (exp_avg,
            # the lowest), > 99.3% equal.
            eps = torch.finfo(dtype).eps
            close = (a.float() - b.float()).abs() <= 4 * eps * b.float().abs() + 1e-6
            assert close.float().mean().item() > 0.999, f"{name}: {diff_report(a, b)}"
            assert (a == b).float().mean().item() > 0.95, f"{name}: {diff_report(a, b)}"


@needs_ext
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_loop_vs_torch_adamw_against_fp64(dtype, options):
    """Our error against the fp64 oracle is at most a small multiple of torch.optim.AdamW's."""
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-1)
    kw.update(options)
    sizes = [1, 7, 1023, 1025, 4097, 30011]
    ours, theirs, oracle, opt, _ = run_trajectory(
        sizes, steps=50, backend="cpu", dtype=dtype, skip=lambda k, i: (k + i) % 7 == 0,
        opt_kwargs=kw)
    assert opt.backend == "cpu"
    for i in range(len(sizes)):
        ref = oracle[i]
        err_ours = (as_real(ours[i]) - ref).abs().max().item()
        err_torch = (as_real(theirs[i]) - ref).abs().max().item()
        scale = ref.abs().max().item()
        # fp32: both are a few ulp of the largest value off; 16-bit: both are dominated by
        # the storage rounding of params and moments, ours no worse than twice torch's.
        floor = 8 * torch.finfo(dtype).eps * scale
        assert err_ours <= 2 * err_torch + floor, (
            f"param {i} ({sizes[i]}): ours {err_ours:.3g}, torch {err_torch:.3g}, "
            f"scale {scale:.3g}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_params_without_grad_untouched(dtype):
    """A param whose grad is None is neither read nor written, even when its param and state
    are NaN (a read would spread them), and its step does not advance; in one table an
    amsgrad group's rows update max_exp_avg_sq while a group without amsgrad has none."""
    groups = [dict(amsgrad=True), dict(amsgrad=False)]
    group_of = [0, 1, 0, 1]
    params = make_params([1025, 4097, 7, 33], dtype)
    opt = FusedAdamW(grouped(params, groups, group_of), backend="cpu")
    assert len(opt.param_groups) == 2
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # every param has state and a row
    nan = float("nan")
    for i in (2, 3):  # one param of each group loses its grad and is poisoned
        params[i].grad = None
        params[i].data.fill_(nan)
        for key in STATE_KEYS:
            if key in opt.state[params[i]]:
                opt.state[params[i]][key].fill_(nan)
    for i in (0, 1):
        params[i].grad = torch.randn_like(params[i])
    before = [snapshot(opt, p) for p in params]
    opt.step()
    for i in (2, 3):
        now = snapshot(opt, params[i])
        for key, value in before[i].items():
            assert same_bits(now[key], value), f"{key} of param {i} (no grad) was written"
        assert opt.state[params[i]]["step"].item() == 1
    for i in (0, 1):
        st = opt.state[params[i]]
        assert st["step"].item() == 2
        assert torch.isfinite(params[i]).all() and not torch.equal(params[i], before[i]["param"])
        for key in STATE_KEYS:
            if key in st:
                assert not torch.equal(st[key], before[i][key]), f"{key} of param {i} is stale"
                assert torch.isfinite(st[key]).all()
    assert "max_exp_avg_sq" in opt.state[params[0]]
    assert "max_exp_avg_sq" not in opt.state[params[1]]  # torch's keys: none without amsgrad
    (table,) = opt._tables.values()
    assert table.n_rows == 2 and table.has_max


@needs_ext
def test_thread_counts_agree():
    """The tiles spread over threads: 1, 2 or 3 threads give the same bits (3 params, 23
    tiles, enough elements that the loop does use several threads)."""
    sizes = [278011, 70000, 5]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            params = make_params(sizes)
            opt = FusedAdamW(params, backend="cpu", amsgrad=True)
            for k in range(3):
                gen = torch.Generator().manual_seed(k)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            (table,) = opt._tables.values()
            assert table.n_tiles == 23
            results.append([snapshot(opt, p) for p in params])
    finally:
        torch.set_num_threads(old)
    for threads, other in zip((2, 3), results[1:]):
        for i, (a, b) in enumerate(zip(results[0], other)):
            for key in a:
                assert same_bits(a[key], b[key]), f"{threads} threads: param {i} {key} differs"


@needs_ext
def test_steady_state_keeps_the_table():
    """The same grads again: the same table arguments, no rebuild. A fresh grad tensor (the
    default zero_grad()) only patches its address into the row, in place of a rebuild."""
    params = make_params([1025, 7])
    opt = FusedAdamW(params, backend="cpu", amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (table,) = opt._tables.values()
    args, rebuilds = _ext.table_args(table), table.rebuilds
    opt.step()
    assert _ext.table_args(table) == args and table.rebuilds == rebuilds
    params[0].grad = params[0].grad.clone()  # new address
    opt.step()
    assert table.rebuilds == rebuilds
    assert table.packed[_table.ROW_GRAD].item() == params[0].grad.data_ptr()
    assert opt.state[params[0]]["step"].item() == 3


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _stepped_table(groups=2):
    """The table of a valid optimizer after one step (2 params in `groups` groups)."""
    params = make_params([1025, 7])
    if groups == 2:
        opt = FusedAdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 1e-2}],
                         backend="cpu")
    else:
        opt = FusedAdamW(params, backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (table,) = opt._tables.values()
    _ext.table_args(table)  # valid as built
    return table


H = _table.HPARAM_COLS


def _set(name, value):
    return lambda t: setattr(t, name, value(t) if callable(value) else value)


@needs_ext
@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(_set("dtype", torch.float64), r"table dtype is torch\.float64",
                     id="table-dtype"),
        pytest.param(_set("packed", None), r"packed table is missing or not an int64 tensor",
                     id="packed-none"),
        pytest.param(_set("packed", lambda t: t.packed.to(torch.int32)),
                     r"packed table is missing or not an int64 tensor", id="packed-dtype"),
        pytest.param(_set("packed", lambda t: t.packed.to("meta")),
                     r"packed table is missing or not an int64 tensor on the table's device",
                     id="packed-device"),
        pytest.param(_set("packed", lambda t: t.packed[:-1]),
                     rf"the packed table has {2 * (_table.ROW_COLS + 1)} entries for 2 rows",
                     id="packed-size"),
        pytest.param(_set("n_rows", 3),
                     rf"the packed table has {2 * (_table.ROW_COLS + 1) + 1} entries for 3 rows",
                     id="n_rows"),
        pytest.param(_set("hparams", None),
                     rf"hparams must be a contiguous \[2, {H}\] tensor on cpu",
                     id="hparams-none"),
        pytest.param(_set("hparams", lambda t: t.hparams[:, :7]),
                     rf"hparams must be a contiguous \[2, {H}\] tensor on cpu", id="hparams-shape"),
        pytest.param(_set("hparams", lambda t: torch.zeros(H, 2).t()),
                     rf"hparams must be a contiguous \[2, {H}\] tensor", id="hparams-strides"),
        pytest.param(_set("hparams", lambda t: t.hparams.to("meta")),
                     rf"hparams must be a contiguous \[2, {H}\] tensor on cpu",
                     id="hparams-device"),
        pytest.param(_set("hparams", lambda t: t.hparams.double()),
                     r"hparams has dtype torch\.float64, expected float32", id="hparams-dtype"),
        pytest.param(_set("host_hparams", lambda t: t.host_hparams[:1]),
                     rf"hparams must be a contiguous \[1, {H}\] tensor", id="n_groups"),
    ],
)
def test_table_args_names_what_is_wrong(mutate, match):
    table = _stepped_table()
    mutate(table)
    with pytest.raises(ValueError, match=match):
        _ext.table_args(table)
    with pytest.raises(ValueError, match=match):  # the backend checks before it calls _C
        CPU.step(table)


@needs_ext
def test_cpu_backend_refuses_other_devices():
    table = _stepped_table(groups=1)
    table.device = torch.device("meta")
    with pytest.raises(ValueError, match="backend 'cpu' steps CPU tables; this one is on meta"):
        CPU.step(table)


@needs_ext
def test_binding_rejects_bad_arguments():
    step = _ext.C.step_cpu
    #   rows, tile_starts, hparams, n_rows, n_tiles, n_groups, dtype, num_threads
    for code in (7, -1, 3):
        with pytest.raises(ValueError, match=rf"dtype code must be 0 \(float32\), 1 "
                                             rf"\(bfloat16\) or 2 \(float16\), got {code}"):
            step(0, 0, 0, 0, 0, 0, code, 1)
    for counts in ((-1, 0, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(ValueError, match="n_rows, n_tiles and n_groups must be >= 0"):
            step(0, 0, 0, *counts, 0, 1)
    for ptrs in ((0, 64, 64), (64, 0, 64), (64, 64, 0)):
        with pytest.raises(ValueError, match="rows, tile_starts and hparams must be non-null"):
            step(*ptrs, 1, 1, 1, 0, 1)
    for ptrs in ((12, 64, 64), (64, 4, 64), (64, 64, 2)):
        with pytest.raises(ValueError, match="rows and tile_starts must be 8-byte aligned, "
                                             "hparams 4-byte aligned"):
            step(*ptrs, 1, 1, 1, 0, 1)
    with pytest.raises(TypeError):  # pybind11's own check: pointers are non-negative ints
        step(-8, 64, 64, 1, 1, 1, 0, 1)
    step(0, 0, 0, 0, 0, 0, 0, 1)  # an empty table is a valid no-op, null pointers and all
    if _ext.C.has_cuda:  # step_cuda validates the same way before it touches a device
        with pytest.raises(ValueError, match="dtype code must be"):
            _ext.C.step_cuda(0, 0, 0, 0, 0, 0, 7, False, 0, 0)
        with pytest.raises(ValueError, match="must be non-null"):
            _ext.C.step_cuda(0, 64, 64, 1, 1, 1, 0, False, 0, 0)
