"""FusedAdamW against torch.optim.AdamW (for-loop) and the float64 oracle, on every backend.

Every test of this file runs for each (backend, device) cell of conftest.backend_cells():
torch and cpu here; triton under TRITON_INTERPRET=1; cuda and triton on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from _trajectory import assert_trajectory_matches, describe, make, run
from conftest import backend_cells

CELLS = backend_cells()

# Sizes of the issue (0, 1, 7, 1023, 1024, 1025, 4097, 278011), a scalar, 2-D and 3-D params,
# transposed and channels_last (non-contiguous) params and a complex one, in one model.
SHAPES = [0, 1, 7, 1023, 1024, 1025, 4097, 278011, (), (33, 17), (5, 6, 7), ("T", (31, 9)),
          ("CL", (4, 3, 5, 5)), ("C", (13,))]
# The Triton interpreter runs each program in numpy: the big size would take minutes there.
SMALL_SHAPES = [s for s in SHAPES if s != 278011]


def shapes_for(backend, device):
    return SMALL_SHAPES if (backend == "triton" and device == "cpu") else SHAPES


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("options", [
    {},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.0},
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True, "maximize": True},
], ids=["default", "amsgrad", "maximize", "no-decay", "all-options"])
def test_trajectory_fp32(backend, device, options):
    ours, theirs, oracle, opt, _ = run(shapes_for(backend, device), backend=backend,
                                       device=device, opt_kwargs=options)
    assert opt.backend == backend
    assert_trajectory_matches(ours, theirs, oracle)


@pytest.mark.parametrize("backend,device", CELLS)
def test_tensor_lr(backend, device):
    """lr as a 0-d Tensor is read on the device each step, and changes take effect."""
    ours, theirs, oracle, opt, ref = run([7, 1025], backend=backend, device=device,
                                         lr_tensor=True, steps=10)
    assert_trajectory_matches(ours, theirs, oracle)
    for o in (opt, ref):
        o.param_groups[0]["lr"].fill_(0.0)  # a scheduler's in-place update
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ours]
    opt.step()
    for b, p in zip(before, ours):
        assert torch.equal(b, p.detach()), "lr=0 must leave params unchanged"


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_trajectory_low_precision(backend, device, dtype):
    """bf16/fp16 params, states in the param dtype as torch: we compute in float32 and round
    once per step, torch's for-loop rounds after every operation, so our error against the
    float64 oracle must stay within torch's own (factor 1.5: rounding noise between the two)."""
    shapes = [7, 1025, 4097, (33, 17)]
    ours, theirs, oracle, _, _ = run(shapes, backend=backend, device=device, dtype=dtype,
                                     opt_kwargs={"lr": 1e-3})
    assert_trajectory_matches(ours, theirs, oracle, dtype=dtype, factor=1.5)


@pytest.mark.parametrize("backend,device", CELLS)
def test_none_grads_skip_exactly(backend, device):
    """A param with no grad in a step is not decayed, its moments do not move and its step
    count does not advance, so its bias corrections differ from its neighbours'."""
    def skip(step, i):
        return (i == 0 and step % 3 == 1) or (i == 2 and step < 10) or (i == 3)

    shapes = [7, 1025, 33, 64]
    ours, theirs, oracle, opt, ref = run(shapes, backend=backend, device=device, skip=skip,
                                         opt_kwargs={"amsgrad": True})
    assert_trajectory_matches(ours, theirs, oracle)
    for p, q in zip(ours, theirs):
        if q in ref.state:
            assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
        else:
            assert p not in opt.state, "a param that never had a grad has no state, as in torch"
    assert float(opt.state[ours[0]]["step"]) == 50 - 17


@pytest.mark.parametrize("backend,device", CELLS)
def test_param_groups_and_add_param_group(backend, device):
    """Each group's own hyperparameters apply; a group added mid-training joins in."""
    a, b = make([1025, 7, 40], device=device), make([1025, 7, 40])
    kw = [dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True),
          dict(lr=3e-3, eps=1e-4, weight_decay=0.0, maximize=True)]
    opt = torch.optim.AdamW
    ours = __import__("fused_adamw").FusedAdamW(
        [{"params": [a[0]], **kw[0]}, {"params": [a[1]], **kw[1]}], backend=backend)
    ref = opt([{"params": [b[0]], **kw[0]}, {"params": [b[1]], **kw[1]}], foreach=False)
    g = torch.Generator().manual_seed(3)
    for step in range(30):
        if step == 10:
            ours.add_param_group({"params": [a[2]], "lr": 5e-2})
            ref.add_param_group({"params": [b[2]], "lr": 5e-2})
        for p, q in zip(a, b):
            gr = torch.randn(q.shape, generator=g)
            p.grad, q.grad = gr.to(device), gr
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        # Same arithmetic as test_trajectory_fp32 over 30 steps: within 64 ulp of |p| ~ 1.
        assert torch.allclose(p.detach().cpu(), q.detach(), rtol=0, atol=64 * 1.2e-7 * 4), \
            describe(p, q)


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("schedule", ["warmup", "cosine", "onecycle"])
def test_schedulers(backend, device, schedule):
    """A changed lr (and OneCycle's changed beta1) takes effect at the very next step."""
    S = torch.optim.lr_scheduler
    a, b = make([1025, 7], device=device), make([1025, 7])
    from fused_adamw import FusedAdamW
    opts = [FusedAdamW(a, lr=1e-2, backend=backend), torch.optim.AdamW(b, lr=1e-2,
                                                                        foreach=False)]
    make_sched = {
        "warmup": lambda o: S.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)),
        "cosine": lambda o: S.CosineAnnealingLR(o, T_max=20),
        "onecycle": lambda o: S.OneCycleLR(o, max_lr=5e-2, total_steps=40),
    }[schedule]
    scheds = [make_sched(o) for o in opts]
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        for p, q in zip(a, b):
            gr = torch.randn(q.shape, generator=g)
            p.grad, q.grad = gr.to(device), gr
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    for p, q in zip(a, b):
        # 30 steps of the same arithmetic as test_trajectory_fp32: within 64 ulp of |p| ~ 4.
        assert torch.allclose(p.detach().cpu(), q.detach(), rtol=0, atol=64 * 1.2e-7 * 4), \
            describe(p, q)


@pytest.mark.parametrize("backend,device", CELLS)
def test_lr_change_takes_effect_next_step(backend, device):
    a = make([64], device=device)
    from fused_adamw import FusedAdamW
    opt = FusedAdamW(a, lr=1e-2, weight_decay=0.0, backend=backend)
    a[0].grad = torch.ones_like(a[0])
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = a[0].detach().clone()
    opt.step()
    assert torch.equal(before, a[0].detach())
