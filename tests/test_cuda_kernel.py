"""The CUDA kernel (backend "cuda") against its CPU twin, the C++ loop (backend "cpu").

Both run kernels/adamw_math.cuh in float32 with the same fmaf's; they can differ only through
powf in the bias corrections (CUDA's powf is within 2 ulp, glibc's within 1), so trajectories
agree bit for bit almost everywhere and within a few ulp of the scale elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (ODD_SIZES, check_untouched_where_it_must_be, fill_grads, make_bucket,
                      make_params)
from test_ext import DTYPE_IDS, DTYPES, GROUPS, OPTIONS, diff_report

from fused_adamw.backends.cpu import BACKEND as CPU
from fused_adamw.backends.cuda import BACKEND as CUDA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _reason(device="cuda"):
    if not torch.cuda.is_available():
        return "no CUDA device"
    return CUDA.unavailable_reason(torch.device(device), torch.float32)


@pytest.fixture(autouse=True)
def _needs_kernel():
    reason = _reason()
    if reason:
        pytest.skip(reason)


def _twin_buckets(sizes, dtype, groups, group_of, device="cuda"):
    torch.manual_seed(0)
    cpu_params = make_params(sizes, dtype)
    gpu_params = [torch.nn.Parameter(p.detach().to(device)) for p in cpu_params]
    states = [{"step": float(i)} for i in range(len(sizes))]
    bc = make_bucket(cpu_params, groups, group_of=group_of, states=[dict(s) for s in states])
    bg = make_bucket(gpu_params, groups, group_of=group_of, states=[dict(s) for s in states])
    return bc, bg


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_cpu_loop(dtype, options):
    groups = [dict(g, **options) for g in GROUPS]
    group_of = [i % 2 for i in range(len(ODD_SIZES))]
    bc, bg = _twin_buckets(ODD_SIZES, dtype, groups, group_of)
    for step in range(60):
        fill_grads(bc, torch.Generator().manual_seed(step))
        bg.grad.copy_(bc.grad)
        bg.steps.copy_(bc.steps)
        bg.host_steps = list(bc.host_steps)
        active = [(step + i) % 5 != 0 for i in range(len(ODD_SIZES))]
        for b in (bc, bg):
            b.active.copy_(torch.tensor(active, dtype=torch.uint8))
            b.host_active = active
        CPU.step(bc)
        CUDA.step(bg)
    torch.cuda.synchronize()
    names = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if bc.max_exp_avg_sq is not None else [])
    for name in names:
        a, b = getattr(bg, name).cpu(), getattr(bc, name)
        exact = (a == b).float().mean().item()
        close = ((a.float() - b.float()).abs()
                 <= 8 * torch.finfo(dtype).eps * b.float().abs().max()).all()
        assert exact > 0.99 and close, f"{name}: {diff_report(a, b)}"


def test_poison_unwritten():
    """Inactive params and non-amsgrad groups' max_exp_avg_sq are never written."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_untouched_where_it_must_be(CUDA, dtype, "cuda")


def test_runs_on_a_side_stream_and_current_device():
    b = make_bucket(make_params([4097], device="cuda"), [dict()])
    fill_grads(b)
    before = b.param.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        CUDA.step(b)
    s.synchronize()
    assert not torch.equal(before, b.param)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_second_device():
    bc, bg = _twin_buckets([1025, 278011], torch.float32, [dict()], [0, 0], device="cuda:1")
    torch.cuda.set_device(0)
    fill_grads(bc)
    bg.grad.copy_(bc.grad)
    bg.steps.copy_(bc.steps)
    CPU.step(bc)
    CUDA.step(bg)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert (bg.param.cpu() == bc.param).float().mean().item() > 0.99


def test_validation_wrong_device():
    b = make_bucket(make_params([1025], device="cuda"), [dict()])
    fill_grads(b)
    b.grad = b.grad.cpu()
    with pytest.raises(ValueError, match=r"bucket\.grad is on cpu"):
        CUDA.step(b)


@pytest.mark.slow
def test_more_than_2_31_elements_bf16():
    """A bucket past 2^31 elements (64-bit indexing): the last tiles are updated."""
    n = (1 << 31) + (1 << 20)
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * 2:
        pytest.skip(f"needs {6 * n * 2 / 2**30:.0f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    b = make_bucket([p], [dict(lr=1e-2, weight_decay=0.0)])
    b.grad.fill_(1.0)
    b.steps.add_(1)
    CUDA.step(b)
    torch.cuda.synchronize()
    # Step 1 with g = 1: m = 0.1, v = 0.001, update = lr * (m/0.1) / (sqrt(v/0.001) + eps) = lr.
    for where in (slice(0, 1024), slice((1 << 31) - 512, (1 << 31) + 512), slice(n - 1024, n)):
        got = b.param[where].float()
        assert torch.allclose(got, torch.full_like(got, -1e-2), rtol=1e-2), where
