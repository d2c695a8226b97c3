"""fused_adamw._C: the build, and the C++ CPU loop (backend "cpu") against the header's
arithmetic, the torch backend and torch.optim.AdamW. CPU only; the CUDA twin is
tests/test_cuda_kernel.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import (ODD_SIZES, check_untouched_where_it_must_be, fill_grads, make_bucket,
                      make_params)

from fused_adamw import __version__, _ext, _flat
from fused_adamw.backends.cpu import BACKEND as CPU
from fused_adamw.backends.cuda import BACKEND as CUDA
from fused_adamw.backends.torch import BACKEND as TORCH
from fused_adamw.reference import adamw_reference_fp64

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


def diff_report(ours: torch.Tensor, ref: torch.Tensor) -> str:
    """How many elements differ, the first indices, NaN/inf counted separately."""
    ours, ref = ours.flatten().double(), ref.flatten().double()
    nan = (ours.isnan() != ref.isnan()).sum().item()
    inf = (ours.isinf() != ref.isinf()).sum().item()
    bad = (ours != ref) & ~(ours.isnan() & ref.isnan())
    idx = bad.nonzero().flatten()[:5].tolist()
    d = (ours - ref).abs()[bad]
    return (f"{bad.sum().item()}/{ours.numel()} differ (max abs {d.max().item() if d.numel() else 0:.3g}),"
            f" first at {idx}: ours {ours[idx].tolist()} ref {ref[idx].tolist()};"
            f" NaN mismatches {nan}, inf mismatches {inf}")


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 ulps (both float32): difference of the order-preserving integer keys."""
    def key(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (key(a) - key(b)).abs()


def run_pair(sizes, dtype, groups, group_of, steps, backend_a, backend_b, skip_every=0):
    """The same trajectory on two buckets stepped by two backends. skip_every: param i is
    inactive in steps where (step + i) % skip_every == 0 (its grad is None in torch terms)."""
    torch.manual_seed(0)
    pa = make_params(sizes, dtype)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    # Different steps per param: param i starts as if it had taken i steps already.
    states = [{"step": float(i)} for i in range(len(sizes))]
    ba = make_bucket(pa, groups, group_of=group_of, states=[dict(s) for s in states])
    bb = make_bucket(pb, groups, group_of=group_of, states=[dict(s) for s in states])
    for step in range(steps):
        for b in (ba, bb):
            fill_grads(b, torch.Generator().manual_seed(step))
            if skip_every:
                active = [(step + i) % skip_every != 0 for i in range(len(sizes))]
                b.active.copy_(torch.tensor(active, dtype=torch.uint8))
                b.host_active = active
                b.torch_runs = None
                # A param without a grad does not advance its step (undo fill_grads' +1).
                b.steps.sub_(1 - b.active.float())
                b.host_steps = [s - (not a) for s, a in zip(b.host_steps, active)]
        backend_a.step(ba)
        backend_b.step(bb)
    return ba, bb


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
    if _ext.C is not None:
        for dtype in DTYPES:
            assert CPU.unavailable_reason(torch.device("cpu"), dtype) is None


# ------------------------------------------------------------------------------------------
# the arithmetic: one step against the header, emulated exactly
# ------------------------------------------------------------------------------------------


def _fma(a, b, c):
    # float32 a*b is exact in float64; one rounding of the sum to float64 and one to float32.
    # That double rounding differs from a true fmaf in rare ties only (checked below: <= 1 ulp).
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _header_step(p, g, m, v, vmax, hp, step):
    """kernels/adamw_math.cuh, op for op, in numpy float32 (IEEE operations, one rounding
    each; fmaf emulated via float64). Tensors in, tensors out.

    NOTE on numpy: torch's own float32 CPU kernels are not all one-rounding-per-operation (a
    division by a 0-d tensor may become a multiplication by its reciprocal), so the oracle of
    this exact test is numpy.
    """
    p, g, m, v, vmax = (t.numpy().astype(np.float32) for t in (p, g, m, v, vmax))
    lr, b1, b2, eps, wd = (np.float32(hp[c]) for c in (0, 1, 2, 3, 4))
    maximize, amsgrad = hp[_flat.HP_MAXIMIZE] != 0, hp[_flat.HP_AMSGRAD] != 0
    step = np.float32(step)
    # powf: float64 pow then one rounding (glibc's powf agrees but in rare hard cases).
    one = np.float32(1)
    bc1 = one - np.float32(np.float64(b1) ** np.float64(step))
    bc2_sqrt = np.sqrt(one - np.float32(np.float64(b2) ** np.float64(step)))
    if maximize:
        g = -g
    if wd != 0:
        p = _fma(np.full_like(p, -(lr * wd)), p, p)
    m = _fma(np.full_like(m, b1), m, _fma(np.full_like(g, -b1), g, g))
    gsq = g * g
    v = _fma(np.full_like(v, b2), v, _fma(np.full_like(g, -b2), gsq, gsq))
    second = v
    if amsgrad:
        vmax = np.where(vmax < v, v, vmax)
        second = vmax
    denom = np.sqrt(second) / bc2_sqrt + eps
    p = p - ((lr / bc1) * m) / denom
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (p, m, v, vmax))


@needs_ext
@pytest.mark.parametrize("options", OPTIONS)
def test_cpu_loop_is_the_header_arithmetic(options):
    groups = [dict(g, **options) for g in GROUPS]
    sizes = [278011, 1025, 7, 4097]
    params = make_params(sizes)
    states = [{"step": float(3 * i)} for i in range(len(sizes))]
    b = make_bucket(params, groups, group_of=[0, 1, 0, 1], states=states)
    fill_grads(b, torch.Generator().manual_seed(1))
    b.exp_avg.copy_(torch.randn(b.numel) * 0.1)
    b.exp_avg_sq.copy_(torch.rand(b.numel) * 0.01)
    if b.max_exp_avg_sq is not None:
        b.max_exp_avg_sq.copy_(torch.rand(b.numel) * 0.01)
    before = {n: getattr(b, n).clone() for n in ("param", "exp_avg", "exp_avg_sq")}
    before["max"] = b.max_exp_avg_sq.clone() if b.max_exp_avg_sq is not None else None
    CPU.step(b)
    for i, s in enumerate(b.segments):
        sl = slice(s.offset, s.offset + s.numel)
        hp = b.host_hparams[b.groups[i]]
        vmax0 = before["max"][sl] if before["max"] is not None else torch.zeros(s.numel)
        want = _header_step(before["param"][sl], b.grad[sl], before["exp_avg"][sl],
                            before["exp_avg_sq"][sl], vmax0, hp, b.host_steps[i])
        got = [b.param[sl], b.exp_avg[sl], b.exp_avg_sq[sl],
               b.max_exp_avg_sq[sl] if b.max_exp_avg_sq is not None else want[3]]
        for name, x, y in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, want):
            ulps = ulp_distance(x, y)
            # Exact but for the emulation's rare double rounding of fmaf: at most 1 ulp, and in
            # (far) fewer than 0.1% of the elements.
            assert ulps.max().item() <= 1, f"param {i} {name}: {diff_report(x, y)}"
            assert (ulps != 0).float().mean().item() < 1e-3, f"param {i} {name}: {diff_report(x, y)}"


# ------------------------------------------------------------------------------------------
# trajectories: the torch backend, torch.optim.AdamW
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_loop_matches_torch_backend(dtype, options):
    groups = [dict(g, **options) for g in GROUPS]
    group_of = [i % 2 for i in range(len(ODD_SIZES))]
    ba, bb = run_pair(ODD_SIZES, dtype, groups, group_of, 50, CPU, TORCH, skip_every=5)
    names = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if ba.max_exp_avg_sq is not None else [])
    for name in names:
        a, b = getattr(ba, name), getattr(bb, name)
        assert not a.isnan().any(), f"{name}: NaN in the C++ loop's result"
        if dtype == torch.float32:
            # The torch backend writes each fmaf of the header as a*b + c (two roundings), so
            # every step may differ by a couple of ulp, and near-cancelling updates (p close to
            # 0) turn that into more ulp of a small result. So the bound is in ulp of the
            # buffer's scale: measured max ~17 eps * max|ref| after 50 steps; bound 64.
            tol = 64 * torch.finfo(torch.float32).eps * b.abs().max()
            assert ((a - b).abs() <= tol).all(), f"{name}: {diff_report(a, b)}"
        else:
            # 16-bit storage: one ulp flips of a rounding propagate; almost all elements agree
            # exactly, the rest within a few storage ulps.
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
    steps = 50
    torch.manual_seed(0)
    init = make_params(sizes, dtype)
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, generator=gen).to(dtype) if (k + i) % 7 else None
              for i, s in enumerate(sizes)] for k in range(steps)]
    # torch.optim.AdamW, for-loop
    tp = [torch.nn.Parameter(p.detach().clone()) for p in init]
    opt = torch.optim.AdamW(tp, foreach=False, **kw)
    # ours
    ours = [torch.nn.Parameter(p.detach().clone()) for p in init]
    b = make_bucket(ours, [kw])
    for k in range(steps):
        for p, g in zip(tp, grads[k]):
            p.grad = None if g is None else g.clone()
        opt.step()
        for i, g in enumerate(grads[k]):
            if g is not None:
                b.grad_views[i].copy_(g)
        active = [g is not None for g in grads[k]]
        b.active.copy_(torch.tensor(active, dtype=torch.uint8))
        b.steps.add_(b.active.float())
        b.host_active, b.host_steps = active, [s + a for s, a in zip(b.host_steps, active)]
        CPU.step(b)
    ref, *_ = adamw_reference_fp64(init, grads, **kw)
    for i in range(len(sizes)):
        err_ours = (b.param_views[i].double() - ref[i]).abs().max().item()
        err_torch = (tp[i].detach().double() - ref[i]).abs().max().item()
        scale = ref[i].abs().max().item()
        # fp32: both are a few ulp of the largest value off; 16-bit: both are dominated by
        # the storage rounding of params and moments, ours no worse than twice torch's.
        floor = 8 * torch.finfo(dtype).eps * scale
        assert err_ours <= 2 * err_torch + floor, (
            f"param {i} ({sizes[i]}): ours {err_ours:.3g}, torch {err_torch:.3g}, "
            f"scale {scale:.3g}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inactive_params_and_other_groups_untouched(dtype):
    """An inactive param is not read or written; max_exp_avg_sq only for amsgrad groups."""
    check_untouched_where_it_must_be(CPU, dtype)


@needs_ext
def test_thread_counts_agree():
    results = []
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        b = make_bucket(make_params([278011, 70000, 5]), [dict()])
        fill_grads(b, torch.Generator().manual_seed(0))
        args = _ext.bucket_args(b)
        _ext.C.step_cpu(*args, threads)
        results.append(b.param.clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _bucket(dtype=torch.float32, amsgrad=False):
    b = make_bucket(make_params([1025, 7], dtype), [dict(amsgrad=amsgrad)])
    fill_grads(b)
    return b


@needs_ext
@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(lambda b: setattr(b, "grad", b.grad.to(torch.float16)),
                     r"bucket\.grad has dtype torch\.float16", id="grad-dtype"),
        pytest.param(lambda b: setattr(b, "grad", None), r"bucket\.grad is None", id="grad-none"),
        pytest.param(lambda b: setattr(b, "exp_avg", b.exp_avg[:-4]),
                     r"bucket\.exp_avg has shape", id="exp_avg-shape"),
        pytest.param(lambda b: setattr(b, "exp_avg_sq",
                                       torch.zeros(b.numel + 1)[1:]),
                     r"bucket\.exp_avg_sq is not 16-byte aligned", id="exp_avg_sq-align"),
        pytest.param(lambda b: setattr(b, "param", torch.zeros(2 * b.numel)[::2]),
                     r"bucket\.param is not contiguous", id="param-contiguous"),
        pytest.param(lambda b: setattr(b, "tiles", b.tiles.to(torch.int32)),
                     r"bucket\.tiles has dtype torch\.int32", id="tiles-dtype"),
        pytest.param(lambda b: setattr(b, "tiles", b.tiles[:, :2].contiguous()),
                     r"bucket\.tiles has shape", id="tiles-shape"),
        pytest.param(lambda b: setattr(b, "steps", b.steps.double()),
                     r"bucket\.steps has dtype torch\.float64", id="steps-dtype"),
        pytest.param(lambda b: setattr(b, "active", b.active[:1]),
                     r"bucket\.active has shape", id="active-shape"),
        pytest.param(lambda b: setattr(b, "param_group", b.param_group.long()),
                     r"bucket\.param_group has dtype", id="param_group-dtype"),
        pytest.param(lambda b: setattr(b, "hparams", b.hparams[:, :7].contiguous()),
                     r"bucket\.hparams has shape", id="hparams-shape"),
        pytest.param(lambda b: setattr(b, "grad", b.grad.to("meta")),
                     r"bucket\.grad is on meta", id="grad-device"),
        pytest.param(lambda b: (b.host_hparams[0].__setitem__(_flat.HP_AMSGRAD, 1.0)),
                     r"bucket\.max_exp_avg_sq is None but a param group uses amsgrad",
                     id="max_exp_avg_sq-missing"),
    ],
)
def test_validation_names_the_buffer(mutate, match):
    b = _bucket()
    CPU.step(b)  # valid: caches the arguments; a change of buffer must re-validate
    mutate(b)
    with pytest.raises(ValueError, match=match):
        CPU.step(b)


@needs_ext
def test_step_keeps_buffers_and_cache():
    b = _bucket(amsgrad=True)
    CPU.step(b)
    key1 = b.ext_args[0]
    CPU.step(b)
    assert b.ext_args[0] == key1
    b.grad = b.grad.clone()  # a new buffer: new pointers
    CPU.step(b)
    assert b.ext_args[0] != key1


@needs_ext
def test_binding_rejects_bad_codes():
    with pytest.raises(ValueError, match="dtype code"):
        _ext.C.step_cpu(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 1)
    with pytest.raises(ValueError, match="param is a null pointer"):
        _ext.C.step_cpu(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 1, 1, 1, 0, 1)
