"""Gradient clipping and per-param norms inside the fused step (issue #19, fused_adamw/_clip.py).

Two oracles. (1) The same FusedAdamW without clipping, after torch's own
``clip_grad_norm_``: the update arithmetic is then identical and only the total norm's
summation order differs (ours: per-tile float32 partials, float64 above; torch: a norm of
per-tensor norms), so params agree to a few ulp of the update, and bitwise whenever the clip
is inactive (the coefficient is then exactly 1). (2) torch.optim.AdamW(foreach=False) +
clip_grad_norm_, as the issue states the contract, within the distributed tests' CLOSE
(tests/test_distributed.py explains it: rounding of two correct orders of the same
arithmetic).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TRITON_INTERPRET, backend_cells
from fused_adamw import FusedAdam, FusedAdamW

# FusedAdamW vs torch's for-loop AdamW on these params and grads *without* clipping differ by up
# to 7.6e-6 after 20 steps at lr 2e-3 (measured: the fused float32 form vs the for-loop's
# double hyperparameters, see tests/test_distributed.py); clipping adds nothing to that. 2e-5
# keeps 2.6x headroom; a step that ignores the clip moves params by > 1e-3 here (checked).
CLOSE = dict(rtol=0, atol=2e-5)
# The same arithmetic with coefficients an ulp or two apart (the norm's summation order): a
# param's last bit flips now and then (measured: 1 ulp of |p| <= 4, 2.4e-7). rtol 1e-6 is ~4
# ulp; the clip's effect is three orders larger.
SAME_MATH = dict(rtol=1e-6, atol=1e-7)
STEPS = 20

_INF = float("inf")


def _params(seed=0, sizes=((64, 33), (33,), (300, 70), (5,))):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s)) for s in sizes]


def _grads(params, step, seed=1, drop=None):
    """This step's grads: a function of the step only; param ``drop(step)`` gets none."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = [torch.randn(p.shape, generator=g) * (1 + step % 3) for p in params]
    if drop is not None and drop(step) is not None:
        out[drop(step)] = None
    return out


def _set(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _groups(params, two):
    if not two:
        return params
    return [{"params": params[:2], "lr": 1e-3, "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]


def _torch_run(max_norm, norm_type, two, drop, steps=STEPS, seed=0):
    """torch.optim.AdamW(foreach=False) + clip_grad_norm_: params and returned norms."""
    ps = _params(seed)
    opt = torch.optim.AdamW(_groups(ps, two), lr=2e-3, foreach=False)
    norms = []
    for s in range(steps):
        _set(ps, _grads(ps, s, drop=drop))
        norms.append(torch.nn.utils.clip_grad_norm_(
            [p for p in ps if p.grad is not None], max_norm, norm_type=norm_type))
        opt.step()
    return ps, norms


def _ours(backend, max_norm, norm_type, two, drop, steps=STEPS, seed=0, clip_in_step=True):
    ps = _params(seed)
    kw = dict(max_grad_norm=max_norm, grad_norm_type=norm_type) if clip_in_step else {}
    opt = FusedAdamW(_groups(ps, two), lr=2e-3, backend=backend, **kw)
    norms, coefs = [], []
    for s in range(steps):
        _set(ps, _grads(ps, s, drop=drop))
        before = [None if p.grad is None else p.grad.clone() for p in ps]
        if not clip_in_step:
            norms.append(torch.nn.utils.clip_grad_norm_(
                [p for p in ps if p.grad is not None], max_norm, norm_type=norm_type))
        opt.step()
        if clip_in_step:
            norms.append(opt.grad_norm.clone())
            coefs.append(min(1.0, max_norm / (opt.grad_norm.item() + 1e-6)))
            for p, g in zip(ps, before):  # p.grad is left unclipped (no GradScaler: untouched)
                assert (p.grad is None) == (g is None)
                if g is not None:
                    assert torch.equal(p.grad, g), "p.grad changed by a clipped step"
    return ps, norms, coefs


CASES = {
    # max_norm, norm_type, two groups, which param has no grad at a step
    "clip-most-steps": (5.0, 2.0, False, None),
    "never-active": (1e6, 2.0, False, None),
    "inf-norm": (1.5, _INF, False, None),
    "two-groups": (5.0, 2.0, True, None),
    "no-grads": (5.0, 2.0, True, lambda s: s % 4 if s % 2 else None),
}


# Triton's clipped steps are bitwise the CPU loop's (test_triton_clipped_steps_match_the_cpu_
# loop_bitwise, every dtype, norm, amsgrad and GradScaler form; 4 of its cells the inf norm),
# and the CPU loop runs every case here, so against torch Triton runs one: each of its
# trajectories costs 20-40 s in the interpreter (the inf norm's was CI's second slowest test).
TRITON_CASES = ("clip-most-steps",)


@pytest.mark.parametrize("backend,device,case", [
    pytest.param(*c.values, case, marks=c.marks, id=f"{c.id}-{case}")
    for c in backend_cells() if c.values[1] == "cpu"
    for case in CASES if c.values[0] != "triton" or case in TRITON_CASES])
def test_clip_matches_torch_over_many_steps(backend, device, case):
    """Over STEPS steps with fresh grads: the grad_norm each step equals torch's
    clip_grad_norm_'s return value to float32 rounding, params equal (1) the same optimizer
    after torch's clip within SAME_MATH (bitwise when the clip never acts) and (2) torch's
    AdamW + clip within CLOSE, and p.grad is never modified. The clip acts on most steps of
    the clipping cases (checked), so a step that ignores it fails."""
    max_norm, norm_type, two, drop = CASES[case]
    ours, norms, coefs = _ours(backend, max_norm, norm_type, two, drop)
    same, same_norms, _ = _ours(backend, max_norm, norm_type, two, drop, clip_in_step=False)
    ref, ref_norms = _torch_run(max_norm, norm_type, two, drop)
    active = sum(c < 1.0 for c in coefs)
    if case == "never-active":
        assert active == 0
    else:
        assert active >= STEPS * 3 // 4, f"the clip acted on {active} of {STEPS} steps only"
    for s, (a, b) in enumerate(zip(norms, ref_norms)):
        assert a.dtype == torch.float32 and a.shape == () and a.device.type == device
        # float32 sums in two orders of ~25k squares: a few ulp (measured <= 1.2e-7 rel).
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"grad_norm of step {s}")
    for i, (p, q, r) in enumerate(zip(ours, same, ref)):
        if case == "never-active":
            assert torch.equal(p, q), f"param {i}: the inactive clip changed the step"
        else:
            torch.testing.assert_close(p, q, **SAME_MATH, msg=f"param {i} vs same + torch clip")
        torch.testing.assert_close(p, r, **CLOSE, msg=f"param {i} vs torch AdamW + clip")


def _scaler_run(make_opt, user_clip, max_norm=0.05, steps=16, inf_steps=(3, 9, 10)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    hist = []
    for i in range(steps):
        x = torch.randn(5, 8, generator=gen)
        if i in inf_steps:
            x[0, 0] = float("inf")
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        norm = None
        used_scale = scaler.get_scale()
        scaled = [p.grad.clone() for p in model.parameters()]
        if user_clip:
            scaler.unscale_(opt)
            unscaled = [p.grad.clone() for p in model.parameters()]
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)
        scaler.update()
        if not user_clip:
            norm = opt.grad_norm.clone()
            unscaled = [p.grad.clone() for p in model.parameters()]
        hist.append((scaler.get_scale(), norm, unscaled, scaled, used_scale))
    return model, opt, hist


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradscaler_equals_unscale_clip_step(backend):
    """``scaler.step(opt)`` with max_grad_norm and no user unscale_ equals torch's
    ``scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt)`` with torch's AdamW: the
    same scale history, the norm of the unscaled grads each taken step, the inf steps skipped
    whole (params, moments and step counts unchanged: the step counts equal torch's), and
    p.grad holds the unscaled, unclipped grad."""
    m1, o1, h1 = _scaler_run(lambda p: FusedAdamW(p, lr=1e-2, max_grad_norm=0.05,
                                                   backend=backend), user_clip=False)
    m2, o2, h2 = _scaler_run(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
                             user_clip=True)
    m3, o3, h3 = _scaler_run(lambda p: FusedAdamW(p, lr=1e-2, backend=backend),
                             user_clip=True)
    assert [h[0] for h in h1] == [h[0] for h in h2]
    skipped = [i for i in range(1, len(h1)) if h1[i][0] < h1[i - 1][0]]
    assert skipped == [3, 9, 10]
    active = 0
    for i, ((_, n1, g1, s1, scale), (_, n2, *_), (_, n3, *_)) in enumerate(zip(h1, h2, h3)):
        if i in skipped:
            assert not torch.isfinite(n1), f"step {i}: an inf step's norm is {n1}"
            continue
        active += bool(n1 > 0.05)
        # Against the same optimizer after torch's clip: the summation order only (measured
        # <= 4.8e-7 relative). Against torch's AdamW: its params, hence its grads, differ by
        # the rounding of the two AdamW forms from step 1 on (measured <= 1.6e-6).
        torch.testing.assert_close(n1, n3, rtol=1e-6, atol=0, msg=f"grad_norm of step {i}")
        torch.testing.assert_close(n1, n2, rtol=5e-6, atol=0, msg=f"grad_norm of step {i}")
        for a, b in zip(g1, s1):  # p.grad: unscaled (as torch's unscale_ writes it), unclipped
            assert torch.equal(a, b * (1.0 / scale)), f"step {i}: p.grad is not grad / scale"
    assert active >= 10
    for p, q, r in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        torch.testing.assert_close(p, r, **SAME_MATH)
        torch.testing.assert_close(p, q, **CLOSE)
        assert o1.state[p]["step"].item() == o2.state[q]["step"].item() == 16 - 3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_track_norms(backend):
    """opt.norms: for every param that stepped, float32 [3] on its device: the L2 norms of
    the grad as used (after unscale, before clipping), of the param after the step, and of
    (param after - param before) as stored, checked against the tensors themselves; a param
    without a grad is absent; grad_norm is set even without max_grad_norm."""
    ps = _params()
    opt = FusedAdamW(ps, lr=1e-2, track_norms=True, max_grad_norm=1.0, backend=backend)
    assert opt.grad_norm is None and opt.norms == {}
    for s in range(4):
        grads = _grads(ps, s, drop=lambda s: 1 if s == 2 else None)
        _set(ps, grads)
        before = [p.detach().clone() for p in ps]
        opt.step()
        assert set(map(id, opt.norms)) == {id(p) for p, g in zip(ps, grads) if g is not None}
        for p, g, b in zip(ps, grads, before):
            if g is None:
                continue
            n = opt.norms[p]
            assert n.dtype == torch.float32 and n.shape == (3,)
            want = torch.stack([g.norm(), p.detach().norm(), (p.detach() - b).norm()])
            # float64 sums in another order, rounded to float32: an ulp or two.
            torch.testing.assert_close(n, want, rtol=1e-6, atol=0)
            assert n[2] > 0
    opt2 = FusedAdamW(_params(), lr=1e-2, track_norms=True, backend=backend)
    _set(opt2.param_groups[0]["params"], _grads(ps, 0))
    opt2.step()
    assert opt2.grad_norm is not None


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_track_norms_under_gradscaler(backend):
    """A skipped step (infs) leaves every opt.norms entry NaN (nothing stepped) and
    grad_norm non-finite; a taken one has the unscaled grad's norm."""
    ps = _params()
    opt = FusedAdamW(ps, lr=1e-2, track_norms=True, backend=backend)
    scale = torch.tensor(1024.0)
    grads = _grads(ps, 0)
    _set(ps, [g * 1024 for g in grads])
    opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
    opt.step()
    for p, g in zip(ps, grads):
        torch.testing.assert_close(opt.norms[p][0], g.norm(), rtol=1e-6, atol=0)
    bad = [g * 1024 for g in grads]
    bad[0][0, 0] = float("inf")
    _set(ps, bad)
    before = [p.detach().clone() for p in ps]
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert not torch.isfinite(opt.grad_norm)
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
        assert opt.norms[p].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_checkpoint_round_trip_is_bitwise_and_loads_into_torch(backend):
    """A clipped run saved after 6 steps and resumed in a fresh FusedAdamW continues bit for
    bit; its state_dict has torch's keys only and loads into torch.optim.AdamW."""
    def run(resume_at=None):
        ps = _params()
        opt = FusedAdamW(_groups(ps, True), lr=2e-3, max_grad_norm=5.0, backend=backend)
        for s in range(12):
            if s == resume_at:
                sd = opt.state_dict()
                opt = FusedAdamW(_groups(ps, True), lr=2e-3, max_grad_norm=5.0,
                                 backend=backend)
                opt.load_state_dict(sd)
            _set(ps, _grads(ps, s))
            opt.step()
        return ps, opt

    a, _ = run()
    b, opt = run(resume_at=6)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    ref = torch.optim.AdamW(_groups(_params(), True), lr=2e-3)
    assert {k for g in sd["param_groups"] for k in g} == {
        k for g in ref.state_dict()["param_groups"] for k in g}
    ref.load_state_dict(sd)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_norm_is_deterministic(backend):
    """The same grads give bitwise the same grad_norm and params, run to run (and, for the
    CPU loop, whatever the number of threads)."""
    out = []
    for threads in (1, 2, 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ps, norms, _ = _ours(backend, 5.0, 2.0, True, None, steps=3)
        finally:
            torch.set_num_threads(old)
        out.append((ps, norms))
    for ps, norms in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(norms, out[0][1]))
        assert all(torch.equal(a, b) for a, b in zip(ps, out[0][0]))


def test_no_clip_is_unchanged():
    """Without max_grad_norm and track_norms nothing is computed: grad_norm stays None."""
    ps = _params()
    opt = FusedAdamW(ps, lr=1e-2)
    _set(ps, _grads(ps, 0))
    opt.step()
    assert opt.grad_norm is None and opt.norms == {}


@pytest.mark.parametrize("kw,name", [
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(max_grad_norm=True), "max_grad_norm"),
    (dict(max_grad_norm="1"), "max_grad_norm"),
    (dict(max_grad_norm=1.0, grad_norm_type=0.0), "grad_norm_type"),
    (dict(max_grad_norm=1.0, grad_norm_type=-2.0), "grad_norm_type"),
    (dict(max_grad_norm=1.0, grad_norm_type=float("nan")), "grad_norm_type"),
    (dict(max_grad_norm=1.0, grad_norm_type="2"), "grad_norm_type"),
    (dict(max_grad_norm=1.0, grad_norm_type=1.0), "grad_norm_type"),
    (dict(track_norms=1), "track_norms"),
    (dict(max_grad_norm=1.0, differentiable=True), "max_grad_norm"),
    (dict(track_norms=True, differentiable=True), "track_norms"),
])
@pytest.mark.parametrize("cls", [FusedAdamW, FusedAdam])
def test_bad_arguments_raise_at_construction(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(_params(), **kw)


def test_differentiable_group_added_later_is_refused():
    opt = FusedAdamW(_params()[:2], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="param group 1: max_grad_norm"):
        opt.add_param_group({"params": _params()[2:], "differentiable": True})
    assert len(opt.param_groups) == 1


def test_grad_norm_matches_torch_coefficient_bitwise():
    """The coefficient is computed by torch's own operations: given torch's total norm, the
    step equals the unclipped step on torch's clipped grads bitwise (a single-param table,
    whose norm is torch's to the bit here)."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    q = torch.nn.Parameter(p.detach().clone())
    o1 = FusedAdamW([p], lr=1e-1, max_grad_norm=1.0, backend="torch")
    o2 = FusedAdamW([q], lr=1e-1, backend="torch")
    p.grad = torch.tensor([3.0, 4.0])
    q.grad = p.grad.clone()
    n = torch.nn.utils.clip_grad_norm_([q], 1.0)
    o1.step()
    o2.step()
    assert torch.equal(o1.grad_norm, n)
    assert torch.equal(p, q)


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch < 2.4: no operator")
def test_compiled_step_stays_one_operator():
    """Under torch.compile(fullgraph=True) (one graph, no break) a clipped step with
    track_norms is the operator fused_adamw::step and gives the eager result bit for bit,
    grad_norm and norms included."""
    results = []
    for compiled in (True, False):
        ps = _params()
        opt = FusedAdamW(ps, lr=1e-2, max_grad_norm=5.0, track_norms=True)

        def step():
            opt.step()

        fn = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
        for s in range(3):
            _set(ps, _grads(ps, s))
            fn()
        results.append((ps, opt.grad_norm.clone(), [n.clone() for n in opt.norms.values()]))
    (a, na, ta), (b, nb, tb) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(na, nb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.skipif(not TRITON_INTERPRET,
                    reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1")
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("inf", [False, True], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_norm_pass_matches_the_cpu_loop_bitwise(dtype, inf, scaled):
    """The Triton norm pass (backends/triton_norm.py) gives bitwise the CPU loop's row sums
    and total over one table, for params at odd element offsets (other lane phases), sizes
    across tile edges and a param with no elements."""
    from fused_adamw.backends import cpu, triton_norm

    torch.manual_seed(0)
    buf = torch.randn(60000, dtype=dtype) * 8
    ps = [torch.nn.Parameter(buf[1:8]), torch.nn.Parameter(buf[9:16394]),
          torch.nn.Parameter(buf[20001:20001 + 33000]), torch.nn.Parameter(buf[:0])]
    for p in ps:
        p.grad = torch.randn(p.shape).to(dtype) * 64
    opt = FusedAdamW(ps, lr=1e-2, max_grad_norm=1.0, backend="cpu")
    opt.step()  # builds the table (its rows point to the grads, which stay alive)
    t = next(iter(opt._tables.values()))
    t.norm_inf = inf
    t.grad_scale = torch.tensor(16.0) if scaled else None
    cpu.BACKEND.grad_norm_rows(t)
    want = t.clip_rows.clone()
    t.clip_rows.fill_(float("nan"))
    triton_norm.grad_norm_rows(t, interpret=True)
    assert torch.equal(t.clip_rows, want), (t.clip_rows, want)
    g = torch.cat([p.grad.double().flatten() for p in ps]) / (16.0 if scaled else 1.0)
    total = g.abs().max() if inf else g.square().sum()
    torch.testing.assert_close(want[-1], total, rtol=1e-5, atol=0)  # float32 lanes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_clipped_step_is_capturable(backend):
    """capturable=True with max_grad_norm: after one eager step the clipped step is captured
    into a CUDA graph (no sync, nothing refused) and each replay equals an eager twin's step on
    the same grads bit for bit, grad_norm included."""
    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((300, 70), (33,))]
        for p in ps:
            p.grad = torch.zeros_like(p)
        return ps, FusedAdamW(ps, lr=1e-2, capturable=True, max_grad_norm=1.0, backend=backend)

    (ps, opt), (qs, ref) = make(), make()

    def fill(params, s):
        g = torch.Generator().manual_seed(s)
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=g))

    fill(ps, 0)
    fill(qs, 0)
    opt.step()
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(1, 4):
        fill(ps, s)
        fill(qs, s)
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        assert torch.equal(opt.grad_norm, ref.grad_norm)
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def _clipped_run(backend, dtype, inf, amsgrad, scaled, max_norm, steps=5):
    """``steps`` clipped steps of FusedAdamW on ``backend`` over params at odd element offsets
    with sizes across a tile edge (body and edge blocks of the Triton kernel), under a
    GradScaler-like scale (and one skipped step) when ``scaled``: the params, their grads
    after each step, the state and the norms."""
    torch.manual_seed(0)
    buf = torch.randn(40000).to(dtype)
    ps = [torch.nn.Parameter(buf[1:8]), torch.nn.Parameter(buf[9:16394]),
          torch.nn.Parameter(buf[20001:25001])]
    opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=max_norm,
                     grad_norm_type=_INF if inf else 2.0, backend=backend)
    grads, norms = [], []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * (1 + s % 3)).to(dtype)
        if scaled:  # what torch.amp.GradScaler.step() sets (optimizer._step_supports_amp_scaling)
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if s == 2 else 0.0)
            for p in ps:
                p.grad.mul_(1024.0)
        opt.step()
        if scaled:
            del opt.grad_scale, opt.found_inf
        grads.append([p.grad.clone() for p in ps])
        norms.append(opt.grad_norm.clone())
    t = next(iter(opt._tables.values()))
    return ps, grads, norms, opt, t


@pytest.mark.skipif(not TRITON_INTERPRET,
                    reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1")
# Half of the 2^4 (dtype, norm, amsgrad, GradScaler) cells, those with an even number of the
# second levels: every pair of levels of any two factors still meets in some cell (CI time:
# each cell is seconds of interpreted Triton).
@pytest.mark.parametrize("dtype,inf,amsgrad,scaled", [
    pytest.param(d, i, a, s, id=f"{dn}-{'inf' if i else 'l2'}-{'amsgrad' if a else 'adam'}-"
                 f"{'scaled' if s else 'plain'}")
    for dn, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    for i in (False, True) for a in (False, True) for s in (False, True)
    if (d == torch.bfloat16) + i + a + s in (0, 2, 4)])
def test_triton_clipped_steps_match_the_cpu_loop_bitwise(dtype, inf, amsgrad, scaled):
    """The Triton backend clips in its own kernels (the norm pass of backends/triton_norm.py,
    the coefficient in adamw_kernel, after the unscale and its write-back) and is bit for bit
    the CPU loop over several clipped steps: params, the grads left in p.grad (unscaled,
    unclipped), the moments and grad_norm. Fails when the kernel ignores the coefficient
    (tried: every cell)."""
    from fused_adamw import _clip

    max_norm = 2.0 if inf else 40.0  # the norms here: max |g| 4 to 14, L2 about 150 to 450
    want_ps, want_grads, want_norms, want_opt, _ = _clipped_run("cpu", dtype, inf, amsgrad,
                                                                 scaled, max_norm)
    ps, grads, norms, opt, t = _clipped_run("triton", dtype, inf, amsgrad, scaled, max_norm)
    assert t.backend.name == "triton" and _clip.backend_of(opt, t) is t.backend, \
        "the clipped Triton table fell back to another backend"
    # the clip is active on every taken step (the coefficient is not 1)
    assert all(n > max_norm for n in norms), norms
    for s, (n, m) in enumerate(zip(norms, want_norms)):
        assert torch.equal(n, m), f"step {s}: grad_norm {n} != {m}"
    for s, (gs, hs) in enumerate(zip(grads, want_grads)):
        assert all(torch.equal(g, h) for g, h in zip(gs, hs)), f"step {s}: p.grad differs"
    for i, (p, q) in enumerate(zip(ps, want_ps)):
        assert torch.equal(p, q), f"param {i}"
        for k, v in want_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), f"param {i}: state {k}"


def _norms_run(backend, dtype, state_dtype, masters, amsgrad, scaled, steps=4):
    """``steps`` clipped steps with track_norms over two groups (different lr, decay and
    master modes) of params at odd element offsets: one with its grad at the param's phase
    (a view of a flat buffer: the Triton kernel's head round, body and tail, across a tile
    edge), three with fresh grads (off the 16-byte grid, all edges, or on it at phase 0: the
    body, across a tile edge) and one that never has a grad. Under ``scaled`` a
    GradScaler-like scale with an inf in a grad at step 2 (found_inf: skipped). Returns the params, the norms of each
    step ({index: norms}), grad_norm and the optimizer."""
    torch.manual_seed(0)
    buf = torch.randn(50000).to(dtype)
    gbuf = torch.zeros(50000, dtype=dtype)
    ps = [torch.nn.Parameter(buf[i:j]) for i, j in
          ((1, 8), (9, 16394), (16400, 16410), (20001, 25001), (26000, 46000))]
    with_grad = (0, 1, 3, 4)
    groups = [{"params": ps[:3], "master_weights": masters[0]},
              {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.0, "master_weights": masters[1]}]
    opt = FusedAdamW(groups, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=40.0,
                     track_norms=True, state_dtype=state_dtype, backend=backend)
    norms, totals = [], []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        for i in with_grad:
            grad = (torch.randn(ps[i].shape, generator=g) * (1 + s % 3)).to(dtype)
            if scaled:
                grad = grad * 1024.0
                if s == 2 and i == 3:  # the overflow GradScaler found
                    grad[0] = float("inf")
            if i == 1:  # at the param's phase: on the grid
                gbuf[9:16394].copy_(grad)
                grad = gbuf[9:16394]
            ps[i].grad = grad
        if scaled:  # what torch.amp.GradScaler.step() sets
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if s == 2 else 0.0)
        opt.step()
        if scaled:
            del opt.grad_scale, opt.found_inf
        assert set(map(id, opt.norms)) == {id(ps[i]) for i in with_grad}
        norms.append({i: opt.norms[ps[i]].clone() for i in with_grad})
        totals.append(opt.grad_norm.clone())
    return ps, norms, totals, opt


@pytest.mark.skipif(not TRITON_INTERPRET,
                    reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, state_dtype, masters, amsgrad, scaled", [
    (torch.float32, None, (None, None), False, True),
    (torch.float32, torch.bfloat16, (None, None), True, False),
    (torch.bfloat16, None, ("kahan", "stochastic"), False, True),
    (torch.bfloat16, torch.float32, ("fp32", "remainder"), True, False),
    (torch.float16, None, ("fp32", None), False, False),
], ids=["fp32-scaled", "fp32-bf16state-amsgrad", "bf16-kahan-stochastic-scaled",
        "bf16-fp32state-master-remainder-amsgrad", "fp16-master"])
def test_triton_track_norms_match_the_cpu_loop_bitwise(dtype, state_dtype, masters, amsgrad,
                                                       scaled):
    """track_norms inside the Triton step kernel (adamw_kernel's NOTE on track_norms) gives
    bitwise the CPU loop's opt.norms over several clipped steps (grad as used, param after
    and the step's delta, as stored), with the same params and grad_norm; a skipped step's
    norms are NaN on both. Fails when the lanes add a round's elements in another order
    (tried: e0, e2, e1, e3 in lanes_add, the fp32 cells) and when the delta is taken from
    the master instead of the stored param (tried: the bf16 fp32-master cell)."""
    from fused_adamw import _clip
    from fused_adamw.backends import triton_adamw

    want_ps, want_norms, want_totals, _ = _norms_run("cpu", dtype, state_dtype, masters,
                                                     amsgrad, scaled)
    ps, norms, totals, opt = _norms_run("triton", dtype, state_dtype, masters, amsgrad, scaled)
    t = next(iter(opt._tables.values()))
    assert t.backend.name == "triton" and _clip.backend_of(opt, t) is t.backend, \
        "the Triton table with track_norms fell back to another backend"
    assert triton_adamw.variant(t)[1].norms
    for s, (got, want) in enumerate(zip(norms, want_norms)):
        skipped = scaled and s == 2
        assert torch.equal(totals[s], want_totals[s]), f"step {s}: grad_norm"
        assert totals[s].isinf() == skipped
        for i, n in got.items():
            if skipped:
                assert n.isnan().all() and want[i].isnan().all(), f"step {s}: param {i}"
            else:
                assert torch.equal(n, want[i]), f"step {s}: param {i}: {n} != {want[i]}"
    assert all(n > 40.0 for s, n in enumerate(totals) if not (scaled and s == 2)), totals
    for i, (p, q) in enumerate(zip(ps, want_ps)):
        assert torch.equal(p, q), f"param {i}"
