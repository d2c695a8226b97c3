"""Corners of gradient clipping (issue #19) found by an adversarial review: each failed before
its fix. The oracle is torch: ``clip_grad_norm_`` then ``torch.optim.AdamW`` (for-loop)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.nn.utils import clip_grad_norm_

from fused_adamw import FusedAdamW


def _pair(n=4, backend="cpu", **kw):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref, FusedAdamW(ours, lr=1e-2, backend=backend, **kw), \
        torch.optim.AdamW(ref, lr=1e-2, foreach=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_clipping(how):
    """A deepcopy or an unpickled copy steps exactly as the original (it stepped unclipped)."""
    ours, _, opt, _ = _pair(max_grad_norm=0.5, grad_norm_type=float("inf"), track_norms=True)
    for p in ours:
        p.grad = torch.full_like(p, 100.0)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for o in (opt, twin):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 100.0)
        o.step()
    assert float(twin.grad_norm) == 100.0 and len(twin.norms) == 3
    for a, b in zip(opt.param_groups[0]["params"], twin.param_groups[0]["params"]):
        assert torch.equal(a, b)  # same arithmetic on the same values: bit for bit


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_step_without_grads_has_norm_zero(backend):
    """torch's clip_grad_norm_ of no grads is 0: grad_norm is not last step's."""
    ours, _, opt, _ = _pair(backend=backend, max_grad_norm=1.0)
    for p in ours:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    assert float(opt.grad_norm) > 0
    for p in ours:
        p.grad = None
    opt.step()
    assert float(opt.grad_norm) == 0.0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("grads", [[1e30, -2e30, 3e30, 1.0], [1.5e19] * 4])
def test_a_norm_past_float32_is_inf_as_torchs(backend, grads):
    """torch squares and sums in float32: a total norm past sqrt(FLT_MAX) is inf there (clip
    coefficient 0), and so it is here; the params then follow torch's."""
    ours, ref, opt, ref_opt = _pair(backend=backend, max_grad_norm=1.0)
    for a, b in zip(ours, ref):
        a.grad = torch.tensor(grads)
        b.grad = torch.tensor(grads)
    total = clip_grad_norm_(ref, 1.0)
    ref_opt.step()
    opt.step()
    assert float(opt.grad_norm) == float(total) == float("inf")
    for a, b in zip(ours, ref):
        # An ulp: our arithmetic is torch's fused AdamW's, an ulp off its for-loop even
        # unclipped; a step with the grads unclipped moves the params by about lr (1e-2).
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_complex_params_with_the_inf_norm_are_refused_before_anything_changes():
    """The norm pass reads complex params as (re, im) pairs: max(|re|, |im|) is not torch's
    max |z| (5 for 3+4j, not 4). Refused, naming the param, with nothing changed."""
    p = torch.nn.Parameter(torch.tensor([3 + 4j, 0j]))
    p.grad = torch.tensor([3 + 4j, 0j])
    before = p.detach().clone()
    opt = FusedAdamW([p], backend="cpu", max_grad_norm=1.0, grad_norm_type=float("inf"))
    with pytest.raises(ValueError, match="param 0 of param group 0 is complex"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0
    # The L2 norm is the same over real pairs: it clips as torch.
    q = torch.nn.Parameter(before.clone())
    q.grad = p.grad.clone()
    FusedAdamW([q], backend="cpu", max_grad_norm=1.0).step()
    r = torch.nn.Parameter(before.clone())
    r.grad = p.grad.clone()
    clip_grad_norm_([r], 1.0)
    torch.optim.AdamW([r], foreach=False).step()
    torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-7)  # float32 rounding of one step


def test_optimizer_wide_keys_in_a_group_are_refused_unless_the_same():
    """A group's own clipping setting would be ignored: refused when it differs from the
    optimizer's; the same value passes (ZeroRedundancyOptimizer puts its keyword arguments
    into every group as defaults: tests/test_distributed.py runs it)."""
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="max_grad_norm is optimizer-wide"):
        FusedAdamW([{"params": [p], "max_grad_norm": 1.0}])
    opt = FusedAdamW([p])
    with pytest.raises(ValueError, match="track_norms is optimizer-wide"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                             "track_norms": True})
    FusedAdamW([{"params": [p], "max_grad_norm": 1.0, "track_norms": False}],
               max_grad_norm=1.0)


def test_grad_norm_process_group_must_be_one_and_is_not_lost_silently(tmp_path):
    import torch.distributed as dist

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="grad_norm_process_group must be"):
        FusedAdamW([p], max_grad_norm=1.0, grad_norm_process_group=5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)
    try:
        opt = FusedAdamW([p], backend="cpu", max_grad_norm=1.0,
                         grad_norm_process_group=dist.group.WORLD)
        p.grad = torch.ones(2)
        opt.step()
        twin = pickle.loads(pickle.dumps(opt))
        q = twin.param_groups[0]["params"][0]
        q.grad = torch.ones(2)
        before = q.detach().clone()
        with pytest.raises(RuntimeError, match="grad_norm_process_group .* was left behind"):
            twin.step()
        assert torch.equal(q, before)
    finally:
        dist.destroy_process_group()


def test_grad_norm_is_a_new_tensor_each_step():
    """Kept without .item() (logging without a sync), each step's opt.grad_norm keeps its
    value, as clip_grad_norm_'s return values do; the review found one buffer overwritten."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = FusedAdamW([p], lr=1e-2, max_grad_norm=1.0)
    kept, want = [], []
    for s in range(3):
        p.grad = torch.randn(10) * (s + 1)
        want.append(p.grad.norm())
        opt.step()
        kept.append(opt.grad_norm)
    # float32 sums of 10 squares in two orders: an ulp or two.
    torch.testing.assert_close(torch.stack(kept), torch.stack(want), rtol=1e-6, atol=0)


def test_float64_params_clip_in_float64():
    """float64 params (the torch backend) take torch's float64 coefficient: params match
    torch's AdamW + clip_grad_norm_ to float64 rounding, not float32's (1e-7 relative)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(50, dtype=torch.float64)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedAdamW(ps, lr=1e-2, max_grad_norm=0.3)
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    for _ in range(5):
        gs = [torch.randn(50, dtype=torch.float64) for _ in ps]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clip_grad_norm_(qs, 0.3)
        ref.step()
    for p, q in zip(ps, qs):
        # float64 arithmetic in another order: ~1e-15 relative; a float32 coefficient: ~1e-7.
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
