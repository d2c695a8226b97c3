"""torch.amp.GradScaler's sync-free path (``_step_supports_amp_scaling``): the kernels unscale
the grads in place and skip a step with infs on the device.

The oracles: (1) the same optimizer through GradScaler's generic path (its own
``unscale_`` and ``found_inf.item()`` skip), which must give the same params and state bit for
bit on every backend: GradScaler's scales are powers of two (init 2**k, growth 2, backoff
0.5), so its multiply by 1/scale and our division by scale give the same grads; (2) torch's
``AdamW(fused=True)`` under the same scaler (its sync-free path on CPU), for the scale history,
the skipped steps, the step counts and p.grad after each step.
"""

from __future__ import annotations

import pytest
import torch

from _oracle import atol_for
from conftest import backend_cells
from fused_adamw import FusedAdamW

INF_STEPS = (4, 11, 12)  # steps whose batch makes the loss (and the grads) infinite
STEPS = 24


def _model(dtype, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4)).to(device, dtype)


def _train(make_opt, dtype, device, user_unscale, steps=STEPS):
    """A GradScaler loop (growth every 3 steps, infs at INF_STEPS). Returns the model, the
    optimizer and per step: the scale after update, the grads before and after step()."""
    model = _model(dtype, device)
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 14, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    history = []
    for i in range(steps):
        x = torch.randn(5, 8, generator=gen).to(device, dtype)
        if i in INF_STEPS:
            x[0, 0] = float("inf")
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if user_unscale:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        history.append((scaler.get_scale(), before, [p.grad.clone() for p in model.parameters()]))
    return model, opt, history


def _taken(history) -> list[bool]:
    """Whether each step was taken: GradScaler halves the scale after a skipped step."""
    out, prev = [], 2.0 ** 14
    for scale, _, _ in history:
        out.append(scale >= prev)
        prev = scale
    return out


@pytest.mark.parametrize("user_unscale", [False, True], ids=["scaled", "unscale_+clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend,device", backend_cells())
def test_fast_path_equals_gradscalers_own_path(backend, device, dtype, user_unscale):
    def fused(params):
        return FusedAdamW(params, lr=1e-2, backend=backend)

    def generic(params):
        opt = FusedAdamW(params, lr=1e-2, backend=backend)
        opt._step_supports_amp_scaling = False  # GradScaler unscales and skips on the host
        return opt

    m1, o1, h1 = _train(fused, dtype, device, user_unscale)
    m2, o2, h2 = _train(generic, dtype, device, user_unscale)
    taken = _taken(h1)
    assert [s for s, _, _ in h1] == [s for s, _, _ in h2]
    assert taken.count(False) == len(INF_STEPS), taken
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for k in s2:
        for name in s2[k]:
            assert torch.equal(s1[k][name], s2[k][name]), (k, name)
        assert s1[k]["step"].item() == taken.count(True)  # steps advance only when taken
    for i, ((_, before, after), (_, _, after2)) in enumerate(zip(h1, h2)):
        for g_before, g, g2 in zip(before, after, after2):
            if taken[i]:
                assert torch.equal(g, g2), f"step {i}: p.grad is not the unscaled grad"
            else:  # skipped: torch leaves the grads as they were (scaled, with the inf)
                assert torch.equal(g.nan_to_num(), g_before.nan_to_num()), f"step {i}"


@pytest.mark.parametrize("user_unscale", [False, True], ids=["scaled", "unscale_+clip"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matches_torch_fused_adamw_under_the_same_scaler(backend, user_unscale):
    """torch's fused CPU AdamW takes the same sync-free path: same scale history, same
    skipped steps and step counts; params and p.grad agree to atol_for (the two kernels
    round differently: see tests/_oracle.py)."""
    m1, o1, h1 = _train(lambda p: FusedAdamW(p, lr=1e-2, backend=backend), torch.float32,
                        "cpu", user_unscale)
    m2, o2, h2 = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), torch.float32,
                        "cpu", user_unscale)
    assert [s for s, _, _ in h1] == [s for s, _, _ in h2]
    theirs = list(m2.parameters())
    atol = atol_for(theirs)
    for a, b in zip(m1.parameters(), theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for (_, _, g1), (_, _, g2) in zip(h1, h2):
        for a, b in zip(g1, g2):
            # grads of params atol apart, through a 2-layer tanh net: measured up to 1.3e-3
            # relative (cancellation in a few elements); a grad left scaled, or unscaled twice,
            # is off by a factor of 2**10 or more
            torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-2, atol=1e-5)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for k in s2:
        assert s1[k]["step"].item() == s2[k]["step"].item()


@pytest.mark.parametrize("backend,device", backend_cells())
def test_inf_in_one_of_two_buckets_skips_both(backend, device):
    """An fp32 and a bf16 layer (two tables): an inf in the bf16 grads only. GradScaler's
    found_inf covers the whole optimizer, so neither table steps; the fp32 grads stay scaled
    too. The next step (finite) is taken by both."""
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 6).to(device)
    b = torch.nn.Linear(6, 6).to(device, torch.bfloat16)
    params = list(a.parameters()) + list(b.parameters())
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params],
                                lr=1e-2, fused=True) if device == "cpu" else None
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    for step in range(2):
        x = torch.randn(3, 6, device=device)
        loss = a(x).sum() + b(x.bfloat16()).float().sum()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 0:
            b.weight.grad[0, 0] = float("inf")
        values = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if step == 0:
            for p, v, g in zip(params, values, grads):
                assert torch.equal(p, v)
                assert torch.equal(p.grad, g)
            assert all(opt.state[p]["step"].item() == 0 for p in params)
            assert scaler.get_scale() == 512.0
        else:
            for p, v, g in zip(params, values, grads):
                assert not torch.equal(p, v)
                assert torch.equal(p.grad, (g.float() / 512.0).to(g.dtype))
            assert all(opt.state[p]["step"].item() == 1 for p in params)


@pytest.mark.parametrize("backend,device", backend_cells())
def test_found_inf_two_still_skips(backend, device):
    """found_inf is GradScaler's sum over devices: infs on two GPUs give 2.0. torch's kernels
    test == 1 and step there (their step counts go to -1); ours skip on any non-zero."""
    p = torch.nn.Parameter(torch.randn(1000, device=device))
    opt = FusedAdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.randn(1000, device=device) * 8
    opt.step()  # state exists
    before, grad = p.detach().clone(), p.grad.clone()
    exp_avg = opt.state[p]["exp_avg"].clone()
    for found in (2.0, 1.0, float("inf")):
        opt.grad_scale = torch.tensor(8.0, device=device)
        opt.found_inf = torch.tensor(found, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert torch.equal(p, before) and torch.equal(p.grad, grad)
        assert torch.equal(opt.state[p]["exp_avg"], exp_avg)
        assert opt.state[p]["step"].item() == 1
    opt.grad_scale = torch.tensor(8.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    assert torch.equal(p.grad, grad / 8) and opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("backend,device", backend_cells())
def test_unscaled_grad_written_back_through_a_staged_copy(backend, device):
    """A grad with other strides than its param is read through a scratch copy (staged):
    the unscaled grad still reaches p.grad, which stays the same tensor."""
    p = torch.nn.Parameter(torch.randn(6, 40, device=device))
    grad = torch.randn(40, 6, device=device).t()  # same shape, transposed strides
    p.grad = grad
    opt = FusedAdamW([p], lr=1e-2, backend=backend)
    want = grad / 3.0  # a scale that is not a power of two: the division rounds
    opt.grad_scale = torch.tensor(3.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    assert p.grad is grad and torch.equal(grad, want)


def test_bad_grad_scale_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = FusedAdamW([p])
    before = p.detach().clone()
    opt.grad_scale = 2.0
    with pytest.raises(TypeError, match=r"optimizer.grad_scale must be None or a one-element "
                       r"float Tensor"):
        opt.step()
    opt.grad_scale = torch.ones(2)
    with pytest.raises(TypeError, match="grad_scale"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state[p]) == 0


def test_grad_scale_and_found_inf_are_not_class_attributes():
    """GradScaler deletes them after the step (``del optimizer.grad_scale``): they must be
    instance attributes it set, and must not survive into pickles or state_dicts."""
    assert FusedAdamW._step_supports_amp_scaling is True
    assert not hasattr(FusedAdamW, "grad_scale") and not hasattr(FusedAdamW, "found_inf")
    p = torch.nn.Parameter(torch.randn(4))
    opt = FusedAdamW([p])
    opt.grad_scale = torch.tensor(2.0)
    assert "grad_scale" not in opt.__getstate__()
    assert "grad_scale" not in opt.state_dict()["param_groups"][0]
