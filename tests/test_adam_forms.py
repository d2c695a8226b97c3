"""The three forms of weight decay: FusedAdam (Adam + L2) against torch.optim.Adam, the paper's
decoupled decay (decouple_lr=True) against a float64 implementation of Loshchilov & Hutter's
update, torch's AdamW form unchanged; checkpoints both ways with torch's Adam and AdamW; the
errors of a decouple_lr that cannot work.

Every trajectory test runs for each (backend, device) cell of conftest.backend_cells(): torch
and cpu here; triton under TRITON_INTERPRET=1 (small params: the interpreter runs each program
in numpy); cuda and triton on a GPU machine.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pytest
import torch

import fused_adamw
from _trajectory import assert_trajectory_matches, describe, make, real
from conftest import backend_cells
from fused_adamw import FusedAdam, FusedAdamW, _table
from fused_adamw.demo import warmup_cosine  # the schedule the demo trains with
from fused_adamw.optimizer import _hparam_row
from test_ext import _header_step

CELLS = backend_cells()
S = torch.optim.lr_scheduler

# Shapes: odd sizes, 2-D, transposed and channels_last params and a complex one; the Triton
# interpreter gets three small ones.
SHAPES = [1, 7, 1025, 4097, (33, 17), ("T", (31, 9)), ("CL", (4, 3, 5, 5)), ("C", (13,))]
SMALL_SHAPES = [7, 1025, (33, 17)]

# Two optimizers on the same data stay within this of each other over the short checkpoint
# runs below (<= 30 steps, |p| ~ 4): their arithmetic differs by rounding only (float vs
# double hyperparameters, fma vs separate roundings), a few tens of ulp. Same as test_api.py.
CLOSE = dict(rtol=0, atol=64 * 1.2e-7 * 4)


def shapes_for(backend, device):
    return SMALL_SHAPES if (backend == "triton" and device == "cpu") else SHAPES


# ------------------------------------------------------------------------------------------
# The float64 oracle: each form written from its paper, independently of the library
# ------------------------------------------------------------------------------------------


def oracle_fp64(initial, history, lrs, group_of, groups, form):
    """Adam in float64 with the given form of weight decay, per param group.

    ``history[t][i]``: param i's grad at step t (None: no grad, skipped as torch does);
    ``lrs[t][k]``: group k's lr at step t (what a scheduler set); ``groups[k]``: betas, eps,
    weight_decay, amsgrad, maximize and (paper form) max_lr. ``form``: one for every group,
    or a list of one per group. Forms:

    - "adamw": torch's AdamW, p <- p - lr*wd*p, then the Adam step;
    - "l2": Adam with L2 (Kingma & Ba with torch's order): g <- -g if maximize, g <- g + wd*p;
    - "paper": Loshchilov & Hutter 2019, Algorithm 2: with the schedule multiplier
      eta_t = lr_t / max_lr and alpha = max_lr,
      p <- p - eta_t * (alpha * mhat / (sqrt(vhat) + eps) + wd * p).
    """
    ps = [real(p).clone() for p in initial]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps]
    step = [0] * len(ps)
    for t, grads in enumerate(history):
        for i, g in enumerate(grads):
            if g is None:
                continue
            o = groups[group_of[i]]
            lr, wd = lrs[t][group_of[i]], o["weight_decay"]
            form_i = form if isinstance(form, str) else form[group_of[i]]
            b1, b2 = o["betas"]
            g = real(g)
            if o["maximize"]:
                g = -g
            if form_i == "l2":
                g = g + wd * ps[i]
            elif form_i == "adamw":
                ps[i] = ps[i] - lr * wd * ps[i]
            step[i] += 1
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            second = v[i]
            if o["amsgrad"]:
                vmax[i] = torch.maximum(vmax[i], v[i])
                second = vmax[i]
            mhat = m[i] / (1 - b1 ** step[i])
            vhat = second / (1 - b2 ** step[i])
            if form_i == "paper":
                alpha = o["max_lr"]
                eta = lr / alpha
                ps[i] = ps[i] - eta * (alpha * mhat / (vhat.sqrt() + o["eps"]) + wd * ps[i])
            else:
                ps[i] = ps[i] - lr * mhat / (vhat.sqrt() + o["eps"])
    return ps


def group_options(opt) -> list[dict]:
    return [dict(betas=tuple(float(b) for b in g["betas"]), eps=float(g["eps"]),
                 weight_decay=float(g["weight_decay"]), amsgrad=bool(g["amsgrad"]),
                 maximize=bool(g["maximize"]), max_lr=g.get("max_lr"))
            for g in opt.param_groups]


def run_forms(shapes, groups, group_of, *, ours_cls, ours_kw, theirs_cls, theirs_kw,
              backend, device, steps=50, schedule=None, dtype=torch.float32, lr_tensor=False,
              theirs_groups=None):
    """Our optimizer and torch's on identical params and grads, each with ``schedule(opt)``
    stepped after every step. ``groups``: per-group options (lr included), ``theirs_groups``
    torch's when they differ (another weight_decay); ``group_of[i]`` the group of param i.
    Returns (ours, theirs, our optimizer, lrs[t][k], grad history, initial params)."""
    ours, theirs = make(shapes, dtype, device), make(shapes, dtype, "cpu")
    initial = make(shapes, dtype, "cpu")

    def grouped(params, tensor_lr):
        out = []
        for k, g in enumerate(groups):
            g = dict(g)
            if tensor_lr:
                g["lr"] = torch.tensor(g["lr"], device=params[0].device)
            out.append({"params": [p for p, gi in zip(params, group_of) if gi == k], **g})
        return out

    opt = ours_cls(grouped(ours, lr_tensor), backend=backend, **ours_kw)
    ref_groups = grouped(theirs, lr_tensor)
    for g, extra in zip(ref_groups, theirs_groups or []):
        g.update(extra)
    ref = theirs_cls(ref_groups, foreach=False, **theirs_kw)
    scheds = [schedule(o) for o in (opt, ref)] if schedule else []
    gen = torch.Generator().manual_seed(1)
    history, lrs = [], []
    for _ in range(steps):
        grads = [torch.randn(q.shape, generator=gen, dtype=q.dtype) for q in theirs]
        history.append(grads)
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.to(device), gr.clone()
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        assert [float(g["lr"]) for g in opt.param_groups] == [
            float(g["lr"]) for g in ref.param_groups]
    return ours, theirs, opt, lrs, history, initial


# ------------------------------------------------------------------------------------------
# Adam + L2 against torch.optim.Adam
# ------------------------------------------------------------------------------------------

# Three groups: L2 with amsgrad and maximize; L2 with other betas and eps; no decay.
L2_GROUPS = [dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
             dict(lr=3e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6),
             dict(lr=5e-3, weight_decay=0.0)]


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("case", ["l2", "l2-maximize-amsgrad", "groups-scheduler"])
def test_adam_l2_matches_torch_adam(backend, device, case):
    """FusedAdam's L2 (after maximize, no decoupled decay) follows torch.optim.Adam's
    trajectory: our error against the float64 oracle is at most twice torch's own (see
    _trajectory.assert_trajectory_matches: both round differently and drift by many ulp over
    50 steps; what must hold is that ours drifts no more than torch's)."""
    shapes = shapes_for(backend, device)
    schedule = None
    if case == "groups-scheduler":
        groups, group_of = L2_GROUPS, [i % 3 for i in range(len(shapes))]

        def schedule(o):
            return S.LambdaLR(o, warmup_cosine(5, 50))
    else:
        extra = dict(amsgrad=True, maximize=True) if case == "l2-maximize-amsgrad" else {}
        groups, group_of = [dict(lr=1e-2, weight_decay=0.1, **extra)], [0] * len(shapes)
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, groups, group_of, ours_cls=FusedAdam, ours_kw={}, theirs_cls=torch.optim.Adam,
        theirs_kw={}, backend=backend, device=device, schedule=schedule)
    assert opt.backend == backend
    assert all(g["decoupled_weight_decay"] is False for g in opt.param_groups)
    oracle = oracle_fp64(initial, history, lrs, group_of, group_options(opt), "l2")
    assert_trajectory_matches(ours, theirs, oracle)
    # L2 is not AdamW's decay: the AdamW oracle is far from ours.
    adamw = oracle_fp64(initial, history, lrs, group_of, group_options(opt), "adamw")
    assert max((real(p) - a.reshape(real(p).shape)).abs().max().item()
               for p, a in zip(ours, adamw)) > 1e-3


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_adam_l2_low_precision(backend, device, dtype):
    """bf16/fp16 params with L2: we compute in float32 and round once per step, torch's
    for-loop rounds after every operation; our error stays within torch's own (factor 1.5:
    rounding noise between the two, as tests/test_optimizer.py)."""
    shapes = [7, 1025, (33, 17)]
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, [dict(lr=1e-3, weight_decay=0.1, maximize=True)], [0, 0, 0],
        ours_cls=FusedAdam, ours_kw={}, theirs_cls=torch.optim.Adam, theirs_kw={},
        backend=backend, device=device, dtype=dtype)
    oracle = oracle_fp64(initial, history, lrs, [0, 0, 0], group_options(opt), "l2")
    assert_trajectory_matches(ours, theirs, oracle, dtype=dtype, factor=1.5)


@pytest.mark.parametrize("backend,device", CELLS)
def test_adam_decoupled_is_adamw(backend, device):
    """FusedAdam(decoupled_weight_decay=True) is AdamW, as torch's: bit for bit FusedAdamW,
    and torch.optim.Adam(decoupled_weight_decay=True)'s trajectory."""
    shapes = [7, 1025]
    kw = dict(lr=1e-2, weight_decay=0.1)
    a, b = make(shapes, device=device), make(shapes, device=device)
    opt_a = FusedAdam(a, decoupled_weight_decay=True, backend=backend, **kw)
    opt_b = FusedAdamW(b, backend=backend, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        for p, q in zip(a, b):
            gr = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = gr, gr.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q), describe(p, q)
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes_for(backend, device), [kw], [0] * len(shapes_for(backend, device)),
        ours_cls=FusedAdam, ours_kw=dict(decoupled_weight_decay=True),
        theirs_cls=torch.optim.Adam, theirs_kw=dict(decoupled_weight_decay=True),
        backend=backend, device=device)
    oracle = oracle_fp64(initial, history, lrs, [0] * len(ours), group_options(opt), "adamw")
    assert_trajectory_matches(ours, theirs, oracle)


def test_adam_default_has_no_weight_decay():
    """torch.optim.Adam's default weight_decay is 0: no decay of any kind."""
    p = make([64])[0]
    opt = FusedAdam([p], lr=0.0, backend="torch")
    assert opt.defaults["weight_decay"] == 0 and opt.defaults["decoupled_weight_decay"] is False
    before = p.detach().clone()
    p.grad = torch.randn(64)
    opt.step()
    assert torch.equal(before, p.detach())


# ------------------------------------------------------------------------------------------
# The compiled loop is the header's arithmetic in every form
# ------------------------------------------------------------------------------------------


def header_step(p, g, m, v, vmax, group, step):
    """kernels/adamw_math.cuh in numpy float32, from a param group: tests/test_ext.py's op-for-op
    evaluation (exact fmaf), fed the group's row of the hyperparameter table."""
    row, _ = _hparam_row(group)
    out = _header_step(*(torch.from_numpy(np.ascontiguousarray(x)) for x in (p, g, m, v, vmax)),
                       row, step)
    return tuple(t.numpy() for t in out)


def test_cpu_loop_is_the_header_arithmetic_in_every_form():
    """One step of the C++ loop from random mid-training state, for Adam + L2 (with maximize
    and amsgrad), the paper's decay (max_lr twice the lr) and torch's AdamW decay, against the
    header evaluated op for op in numpy float32: within 1 ulp (glibc's powf may differ from
    the correctly rounded pow by 1 ulp in rare cases, moving a bias correction), and bit for
    bit in more than 99.9% of the elements."""
    pytest.importorskip("fused_adamw._C", reason="the C++ extension is not built")
    groups = [dict(lr=1e-2, weight_decay=0.1, maximize=True, amsgrad=True),
              dict(lr=3e-3, weight_decay=0.2, betas=(0.8, 0.99), eps=1e-6,
                   decoupled_weight_decay=True, decouple_lr=True, max_lr=6e-3),
              dict(lr=5e-3, weight_decay=0.05, decoupled_weight_decay=True)]
    params = make([20000, 1025, 4097])
    opt = FusedAdam([{"params": [p], **g} for p, g in zip(params, groups)], backend="cpu")
    gen = torch.Generator().manual_seed(5)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # creates the state
    before = []
    for p, k in zip(params, [3, 999, 17]):
        st = opt.state[p]
        st["step"].fill_(k)
        st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        if "max_exp_avg_sq" in st:
            st["max_exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        p.grad.copy_(torch.randn(p.shape, generator=gen))
        before.append({k2: t.detach().numpy().copy() for k2, t in
                       [("p", p), ("g", p.grad), *((n, st[n]) for n in
                        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if n in st)]})
    opt.step()
    for i, (p, group, b) in enumerate(zip(params, opt.param_groups, before)):
        st = opt.state[p]
        vmax0 = b.get("max_exp_avg_sq", np.zeros_like(b["p"]))
        want = header_step(b["p"], b["g"], b["exp_avg"], b["exp_avg_sq"], vmax0, group,
                           float(st["step"]))
        got = [p, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq")]
        for name, x, y in zip(("param", "exp_avg", "exp_avg_sq", "max"), got, want):
            if x is None:
                continue
            x = x.detach().numpy()
            ulps = np.abs(x.view(np.int32).astype(np.int64) - y.view(np.int32).astype(np.int64))
            assert ulps.max() <= 1, f"group {i} {name}: {ulps.max()} ulp"
            assert (ulps != 0).mean() < 1e-3, f"group {i} {name}: {(ulps != 0).mean():.2%} differ"


# ------------------------------------------------------------------------------------------
# decouple_lr: the paper's decay
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float-lr", "tensor-lr"])
def test_decouple_lr_is_the_papers_update(backend, device, lr_tensor):
    """decouple_lr=True under a warmup + cosine LambdaLR: the decay is wd * lr_t / max_lr
    with max_lr the group's lr when it was created (a float snapshot, also of a Tensor lr the
    scheduler fills in place), against a float64 implementation of the paper's Algorithm 2.

    torch's AdamW with wd_torch = wd_paper / max_lr decays by the same amount at every step
    under any schedule that multiplies the base lr (lr_t * wd_torch = (lr_t / max_lr) *
    wd_paper), so it is the for-loop twin whose rounding error bounds ours (factor 2: see
    _trajectory.assert_trajectory_matches)."""
    shapes = shapes_for(backend, device)
    lr, wd_paper = 1e-2, 0.05  # wd_paper is large on purpose: the decay must show
    groups = [dict(lr=lr, weight_decay=wd_paper), dict(lr=2 * lr, weight_decay=wd_paper / 2,
                                                       amsgrad=True)]
    group_of = [i % 2 for i in range(len(shapes))]
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, groups, group_of, ours_cls=FusedAdamW, ours_kw=dict(decouple_lr=True),
        theirs_cls=torch.optim.AdamW, theirs_kw={}, backend=backend, device=device,
        schedule=lambda o: S.LambdaLR(o, warmup_cosine(5, 50)), lr_tensor=lr_tensor,
        theirs_groups=[dict(weight_decay=g["weight_decay"] / g["lr"]) for g in groups])
    for g, want in zip(opt.param_groups, groups):
        # float(lr) of a float32 Tensor lr is its float32 value: approx
        assert type(g["max_lr"]) is float and g["max_lr"] == pytest.approx(want["lr"], rel=1e-7)
        assert g["decouple_lr"] is True
    assert lrs[0][0] < lr / 4 and max(t[0] for t in lrs) == pytest.approx(lr)  # warmup, peak
    oracle = oracle_fp64(initial, history, lrs, group_of, group_options(opt), "paper")
    assert_trajectory_matches(ours, theirs, oracle)
    # torch's form with the same weight_decay decays by lr_t * wd: far less than the paper's.
    torch_form = oracle_fp64(initial, history, lrs, group_of, group_options(opt), "adamw")
    assert max((real(p) - a.reshape(real(p).shape)).abs().max().item()
               for p, a in zip(ours, torch_form)) > 1e-3


@pytest.mark.parametrize("backend,device", CELLS)
@pytest.mark.parametrize("cls", [FusedAdamW, FusedAdam])
def test_decouple_lr_at_max_lr_equals_torch_adamw(backend, device, cls):
    """With the lr staying at max_lr, the paper's decay with wd_paper = lr * wd_torch is
    torch's AdamW with wd_torch: within the same tolerance as torch AdamW's own trajectory
    tests (the float64 oracle of torch's form is the paper's here)."""
    shapes = shapes_for(backend, device)
    lr, wd_torch = 1e-2, 0.1
    kw = dict(decouple_lr=True, **({"decoupled_weight_decay": True} if cls is FusedAdam else {}))
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, [dict(lr=lr, weight_decay=lr * wd_torch, amsgrad=True)], [0] * len(shapes),
        ours_cls=cls, ours_kw=kw, theirs_cls=torch.optim.AdamW, theirs_kw={},
        backend=backend, device=device, theirs_groups=[dict(weight_decay=wd_torch)])
    assert opt.param_groups[0]["max_lr"] == lr and all(t == [lr] for t in lrs)
    torch_opts = [dict(o, weight_decay=wd_torch) for o in group_options(opt)]
    oracle = oracle_fp64(initial, history, lrs, [0] * len(shapes), torch_opts, "adamw")
    assert_trajectory_matches(ours, theirs, oracle)


@pytest.mark.parametrize("backend,device", CELLS)
def test_three_forms_in_one_step(backend, device):
    """One FusedAdam, three groups, three forms (L2; torch's AdamW decay; the paper's with its
    own max_lr), one fused step per table under a warmup + cosine schedule: each group
    follows its form. torch's twin is torch.optim.Adam with the same per-group
    decoupled_weight_decay flags and the paper group's decay converted (wd / max_lr);
    tolerance as test_adam_l2_matches_torch_adam."""
    shapes = shapes_for(backend, device)
    groups = [dict(lr=1e-2, weight_decay=0.1, maximize=True),
              dict(lr=5e-3, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
              dict(lr=3e-3, weight_decay=0.02, decoupled_weight_decay=True, decouple_lr=True,
                   max_lr=6e-3)]
    group_of = [i % 3 for i in range(len(shapes))]
    theirs_groups = [{}, {}, dict(weight_decay=0.02 / 6e-3)]  # decouple_lr: unknown to torch
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, groups, group_of, ours_cls=FusedAdam, ours_kw={}, theirs_cls=torch.optim.Adam,
        theirs_kw={}, backend=backend, device=device,
        schedule=lambda o: S.LambdaLR(o, warmup_cosine(5, 50)), theirs_groups=theirs_groups)
    assert opt.param_groups[2]["max_lr"] == 6e-3 and "decouple_lr" not in opt.param_groups[0]
    oracle = oracle_fp64(initial, history, lrs, group_of, group_options(opt),
                         ["l2", "adamw", "paper"])
    assert_trajectory_matches(ours, theirs, oracle)


@pytest.mark.parametrize("backend,device", CELLS)
def test_onecycle_writes_max_lr(backend, device):
    """OneCycleLR writes its peak into group["max_lr"] when built: decouple_lr then decays by
    wd * lr_t / peak, the paper's multiplier (lr_t rises from peak / 25 to the peak)."""
    shapes, peak, wd_paper = [7, 1025], 5e-2, 0.02
    # cycle_momentum=False: OneCycleLR would also move beta1, which the oracle does not replay.
    ours, theirs, opt, lrs, history, initial = run_forms(
        shapes, [dict(lr=1e-3, weight_decay=wd_paper)], [0, 0], ours_cls=FusedAdamW,
        ours_kw=dict(decouple_lr=True), theirs_cls=torch.optim.AdamW, theirs_kw={},
        backend=backend, device=device, steps=30,
        schedule=lambda o: S.OneCycleLR(o, max_lr=peak, total_steps=40, cycle_momentum=False),
        theirs_groups=[dict(weight_decay=wd_paper / peak)])
    assert opt.param_groups[0]["max_lr"] == peak
    assert lrs[0][0] == pytest.approx(peak / 25)
    oracle = oracle_fp64(initial, history, lrs, [0, 0], group_options(opt), "paper")
    assert_trajectory_matches(ours, theirs, oracle)  # tolerance: see test_decouple_lr_...


# ------------------------------------------------------------------------------------------
# Checkpoints, both ways, with torch.optim.Adam and torch.optim.AdamW
# ------------------------------------------------------------------------------------------


def train(opt, params, steps, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
        opt.step()


def twin(params, device="cpu"):
    return [torch.nn.Parameter(p.detach().clone().to(device)) for p in params]


KW = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)


@pytest.mark.parametrize("backend,device", CELLS)
def test_adam_checkpoint_both_ways(backend, device):
    """torch Adam -> FusedAdam -> torch Adam, training in between: the same trajectory as
    torch Adam throughout (L2 all along), the same state_dict schema."""
    shapes = [7, (5, 6)]
    start = make(shapes)
    ref_params = twin(start)
    ref = torch.optim.Adam(ref_params, foreach=False, **KW)
    a = twin(start)
    o1 = torch.optim.Adam(a, foreach=False, **KW)
    train(o1, a, 5, 0)
    train(ref, ref_params, 5, 0)

    f = twin(a, device)
    of = FusedAdam(f, backend=backend, **KW)
    of.load_state_dict(copy.deepcopy(o1.state_dict()))
    assert of.param_groups[0]["decoupled_weight_decay"] is False
    train(of, f, 5, 1, device)
    train(ref, ref_params, 5, 1)
    for p, q in zip(f, ref_params):
        assert torch.allclose(p.detach().cpu(), q.detach(), **CLOSE), describe(p, q)
    sd = of.state_dict()
    # exactly torch's keys (torch.distributed.checkpoint loads only a checkpoint that has
    # every key of the optimizer it loads into)
    assert sd["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()
    assert set(sd["state"][0]) == set(ref.state_dict()["state"][0])

    b = twin(f)
    o2 = torch.optim.Adam(b, foreach=False, **KW)
    o2.load_state_dict(pickle.loads(pickle.dumps(sd)))  # plain dicts, no fused_adamw needed
    train(o2, b, 5, 2)
    train(ref, ref_params, 5, 2)
    for p, q in zip(b, ref_params):
        assert torch.allclose(p, q, **CLOSE), describe(p, q)
    assert float(o2.state[b[0]]["step"]) == 15


@pytest.mark.parametrize("backend,device", CELLS)
def test_adam_checkpoint_into_fused_adamw_stays_adamw(backend, device):
    """As torch's AdamW.__setstate__: an Adam checkpoint (decoupled_weight_decay=False)
    loaded into FusedAdamW steps as AdamW; torch AdamW loading the same checkpoint is the
    twin."""
    start = make([7, 33])
    a = twin(start)
    writer = torch.optim.Adam(a, foreach=False, **KW)
    train(writer, a, 4, 0)
    sd = writer.state_dict()
    assert sd["param_groups"][0]["decoupled_weight_decay"] is False
    ours, theirs = twin(a, device), twin(a)
    opt = FusedAdamW(ours, backend=backend, **KW)
    ref = torch.optim.AdamW(theirs, foreach=False, **KW)
    opt.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert ref.param_groups[0]["decoupled_weight_decay"] is True
    train(opt, ours, 10, 1, device)
    train(ref, theirs, 10, 1)
    for p, q in zip(ours, theirs):
        assert torch.allclose(p.detach().cpu(), q.detach(), **CLOSE), describe(p, q)
    # ... and it is not Adam's L2: torch Adam from the same checkpoint goes elsewhere.
    l2 = twin(a)
    l2_opt = torch.optim.Adam(l2, foreach=False, **KW)
    l2_opt.load_state_dict(copy.deepcopy(sd))
    train(l2_opt, l2, 10, 1)
    assert max((p.detach().cpu() - q).abs().max().item() for p, q in zip(ours, l2)) > 1e-4


@pytest.mark.parametrize("backend,device", CELLS)
def test_adamw_checkpoint_into_fused_adam_keeps_decoupled(backend, device):
    """As torch's Adam.__setstate__ (setdefault): an AdamW checkpoint keeps
    decoupled_weight_decay=True in FusedAdam, which then steps as AdamW, like torch Adam
    loading it; a checkpoint without the key (older torch) loads as L2 (False)."""
    start = make([7, 33])
    a = twin(start)
    writer = torch.optim.AdamW(a, foreach=False, **KW)
    train(writer, a, 4, 0)
    sd = writer.state_dict()
    ours, theirs = twin(a, device), twin(a)
    opt = FusedAdam(ours, backend=backend, **KW)
    ref = torch.optim.Adam(theirs, foreach=False, **KW)
    opt.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert ref.param_groups[0]["decoupled_weight_decay"] is True
    train(opt, ours, 10, 1, device)
    train(ref, theirs, 10, 1)
    for p, q in zip(ours, theirs):
        assert torch.allclose(p.detach().cpu(), q.detach(), **CLOSE), describe(p, q)

    old = copy.deepcopy(sd)
    del old["param_groups"][0]["decoupled_weight_decay"]
    opt2, ref2 = FusedAdam(twin(a), backend="torch", **KW), torch.optim.Adam(twin(a), **KW)
    opt2.load_state_dict(copy.deepcopy(old))
    ref2.load_state_dict(copy.deepcopy(old))
    assert opt2.param_groups[0]["decoupled_weight_decay"] is False
    assert ref2.param_groups[0]["decoupled_weight_decay"] is False


def test_decouple_lr_checkpoints():
    """decouple_lr and max_lr travel in our checkpoints (a round trip changes nothing, bit for
    bit); torch's AdamW loads them and ignores them; a torch checkpoint loaded into an
    optimizer built with decouple_lr=True steps in torch's form (its groups have no
    decouple_lr), as torch's load takes every group key from the checkpoint; a group with
    decouple_lr but no max_lr gets its lr as max_lr on load."""
    start = make([7, 33])
    a = twin(start)
    opt = FusedAdamW(a, lr=1e-2, weight_decay=1e-3, decouple_lr=True, backend="cpu")
    opt.param_groups[0]["max_lr"] = 2e-2  # the user's peak
    train(opt, a, 3, 0)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["decouple_lr"] is True and sd["param_groups"][0]["max_lr"] == 2e-2

    b = twin(a)
    opt2 = FusedAdamW(b, lr=1e-2, weight_decay=1e-3, backend="cpu")
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["decouple_lr"] is True and opt2.param_groups[0]["max_lr"] == 2e-2
    train(opt, a, 3, 1)
    train(opt2, b, 3, 1)
    for p, q in zip(a, b):
        assert torch.equal(p, q), describe(p, q)

    ref = torch.optim.AdamW(twin(a), lr=1e-2)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # extra keys kept, ignored
    train(ref, ref.param_groups[0]["params"], 1, 2)

    tsd = torch.optim.AdamW(twin(start), lr=3e-3).state_dict()
    opt3 = FusedAdamW(twin(start), lr=1e-2, weight_decay=1e-3, decouple_lr=True)
    opt3.load_state_dict(copy.deepcopy(tsd))
    assert "decouple_lr" not in opt3.param_groups[0] and "max_lr" not in opt3.param_groups[0]
    row = _hparam_row(opt3.param_groups[0])[0]
    assert (row[_table.HP_DECAY_MODE], row[_table.HP_MAX_LR]) == (0.0, 0.0)  # torch's decay
    tsd["param_groups"][0]["decouple_lr"] = True  # a hand-made checkpoint without max_lr
    opt3.load_state_dict(tsd)
    assert opt3.param_groups[0]["max_lr"] == 3e-3


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_max_lr_zero_with_weight_decay_raises():
    with pytest.raises(ValueError, match=r"param group 0: decouple_lr=True .* max_lr is 0\.0"):
        FusedAdamW(make([3]), lr=0.0, weight_decay=0.1, decouple_lr=True)
    FusedAdamW(make([3]), lr=0.0, weight_decay=0.0, decouple_lr=True)  # nothing to decay
    # A group created at lr 0 with its own peak is fine.
    FusedAdamW([{"params": make([3]), "lr": 0.0, "max_lr": 1e-3}], decouple_lr=True)


def test_decouple_lr_with_l2_raises():
    with pytest.raises(ValueError, match="decouple_lr=True needs decoupled weight decay"):
        FusedAdam(make([3]), weight_decay=0.1, decouple_lr=True)
    FusedAdam(make([3]), weight_decay=0.1, decouple_lr=True, decoupled_weight_decay=True)
    opt = FusedAdam(make([3]), weight_decay=0.1)
    with pytest.raises(ValueError, match="param group 1: decouple_lr=True needs decoupled"):
        opt.add_param_group({"params": make([4]), "decouple_lr": True})
    assert len(opt.param_groups) == 1  # refused before anything was added


def test_edited_group_raises_at_step_before_any_change():
    """Groups are checked at every step: an edit that makes decouple_lr impossible raises
    before any param, state or step count changes."""
    a = make([5, 9])
    opt = FusedAdamW([{"params": [a[0]]}, {"params": [a[1]]}], lr=1e-2, weight_decay=0.1,
                     decouple_lr=True, backend="cpu")
    train(opt, a, 2, 0)
    for edit, error, match in [
        (dict(max_lr=0.0), ValueError, r"param group 1: .* max_lr is 0\.0"),
        (dict(max_lr=torch.tensor(1e-2)), TypeError, "max_lr must be a float"),
        (dict(decoupled_weight_decay=False), ValueError, "needs decoupled weight decay"),
    ]:
        before = [p.detach().clone() for p in a]
        steps = [float(opt.state[p]["step"]) for p in a]
        saved = dict(opt.param_groups[1])
        opt.param_groups[1].update(edit)
        for p in a:
            p.grad = torch.ones_like(p)
        with pytest.raises(error, match=match):
            opt.step()
        assert all(torch.equal(b, p) for b, p in zip(before, a))
        assert [float(opt.state[p]["step"]) for p in a] == steps
        opt.param_groups[1].clear()
        opt.param_groups[1].update(saved)
    opt.step()  # repaired: steps again


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("ours,theirs", [(FusedAdam, torch.optim.Adam),
                                         (FusedAdamW, torch.optim.AdamW)])
def test_signature_is_torchs_plus_ours(ours, theirs):
    """torch's parameters, kinds, defaults and order, then our keyword-only backend,
    decouple_lr, master_weights, state_dtype and the clipping options (issue #19)."""
    ours_only = [
        ("backend", inspect.Parameter.KEYWORD_ONLY, "auto"),
        ("decouple_lr", inspect.Parameter.KEYWORD_ONLY, False),
        ("master_weights", inspect.Parameter.KEYWORD_ONLY, None),
        ("state_dtype", inspect.Parameter.KEYWORD_ONLY, None),
        ("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, None),
        ("grad_norm_type", inspect.Parameter.KEYWORD_ONLY, 2.0),
        ("track_norms", inspect.Parameter.KEYWORD_ONLY, False),
        ("grad_norm_process_group", inspect.Parameter.KEYWORD_ONLY, None)]
    assert _params(ours.__init__)[:-len(ours_only)] == _params(theirs.__init__)
    assert _params(ours.__init__)[-len(ours_only):] == ours_only


def test_public_surface():
    assert {"FusedAdam", "FusedAdamW"} <= set(fused_adamw.__all__)
    assert issubclass(FusedAdamW, FusedAdam)  # as torch's AdamW is an Adam
    for cls in (FusedAdam, FusedAdamW):
        ref = (torch.optim.Adam if cls is FusedAdam else torch.optim.AdamW)(make([3]))
        opt = cls(make([3]))
        assert opt.param_groups[0].keys() == ref.param_groups[0].keys()  # torch's, exactly
        assert opt.defaults.keys() == ref.defaults.keys()
        kw = dict(decoupled_weight_decay=True) if cls is FusedAdam else {}
        g = cls(make([3]), lr=torch.tensor(3e-3), decouple_lr=True, **kw).param_groups[0]
        assert g["decouple_lr"] is True and type(g["max_lr"]) is float
        opt.add_param_group({"params": make([2]), "decouple_lr": True, "lr": 2e-3, **kw})
        assert opt.param_groups[1]["max_lr"] == 2e-3


@pytest.mark.parametrize("form", ["adamw", "adam-l2", "adamw-paper"])
def test_demo_forms(capsys, form):
    from fused_adamw import demo

    diff = demo.main(["--steps", "3", "--form", form])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and f"form {form}" in out
    for row in rows:  # both optimizers' losses, printed to 6 decimals, agree
        assert abs(float(row[2]) - float(row[3])) < 1e-5, row
    assert diff < 1e-5  # 3 steps of lr <= 3e-3: a few ulp of |p| ~ 1 at most
