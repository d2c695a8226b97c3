"""The torch.optim contract: errors, checkpoints, copies, hooks, state access, memory layout."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fused_adamw
from _trajectory import describe, make
from conftest import backend_cells
from fused_adamw import BackendUnavailableError, FusedAdamW, weight_decay_groups

CELLS = backend_cells()

# Two optimizers on the same data and grads stay within this of each other over the short
# runs below: their arithmetic differs by rounding (see _trajectory.assert_trajectory_matches),
# a few tens of ulp of |p| ~ 4 after <= 30 steps. Exactness tests use torch.equal instead.
CLOSE = dict(rtol=0, atol=64 * 1.2e-7 * 4)


def train(opt, params, steps, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
        opt.step()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(eps=-1e-8), "Invalid epsilon value"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(betas=(0.9, torch.tensor(0.999))), "both floats or both Tensors"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(betas=(0, 0.99)), "both floats or both Tensors"),
    (dict(lr=torch.tensor(1e-3), foreach=True),
     "lr as a Tensor is not supported for capturable=False and foreach=True"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
     r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"),
    (dict(backend="cudnn"), "Invalid backend: 'cudnn'"),
])
def test_bad_hyperparameters_raise_like_torch(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW(make([3]), **kwargs)
    if "backend" not in kwargs:  # torch raises the same message
        with pytest.raises(ValueError, match=message):
            torch.optim.AdamW(make([3]), **kwargs)


def test_bad_group_hyperparameters_raise():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedAdamW([{"params": make([3]), "lr": -1.0}])


@pytest.mark.parametrize("cls", [FusedAdamW, fused_adamw.FusedAdam], ids=["adamw", "adam"])
def test_differentiable_steps_like_torch_and_carries_gradients(cls):
    """differentiable=True is torch's meta-learning mode: the update is part of the autograd
    graph. It runs torch's own single-tensor Adam, so params, state and the gradient through
    three steps equal torch's exactly (same code, same order)."""
    torch_cls = torch.optim.AdamW if cls is FusedAdamW else torch.optim.Adam
    results = []
    for make_opt in (cls, torch_cls):
        torch.manual_seed(0)
        start = torch.randn(5, dtype=torch.float64, requires_grad=True)
        p = start.clone()  # a non-leaf: allowed in differentiable mode, as in torch's tests
        # amsgrad off: torch's own differentiable Adam (L2 + amsgrad) fails this 3-step backward
        opt = make_opt([p], lr=0.1, weight_decay=0.1, differentiable=True)
        for _ in range(3):
            p.grad = torch.randn(5, dtype=torch.float64)
            opt.step()
        (dstart,) = torch.autograd.grad(p.sum(), start)
        results.append((p.detach(), dstart, opt.state[p]["exp_avg"].detach(),
                        opt.state[p]["step"]))
    ours, theirs = results
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), describe(a, b)
    assert not torch.equal(ours[1], torch.ones(5, dtype=torch.float64)), "the step is in the graph"


def test_fused_and_differentiable_refused_like_torch():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        FusedAdamW(make([3]), differentiable=True, fused=True)


def test_tensor_betas_are_squeezed_like_torch():
    opt = FusedAdamW(make([3]), betas=(torch.tensor([[0.9]]), torch.tensor([0.99])))
    ref = torch.optim.AdamW(make([3]), betas=(torch.tensor([[0.9]]), torch.tensor([0.99])))
    assert [b.shape for b in opt.param_groups[0]["betas"]] == \
        [b.shape for b in ref.param_groups[0]["betas"]] == [(), ()]


def test_non_floating_param_raises():
    with pytest.raises(TypeError, match="param 1 of param group 0 has dtype torch.int64"):
        FusedAdamW([make([3])[0], torch.zeros(3, dtype=torch.long)])


def test_param_given_twice_warns_like_torch_then_step_refuses():
    """torch warns about a param given twice in a group (and updates it twice per step); the
    construction does the same here, and step() refuses before changing anything, since one
    fused step cannot update a param twice. Across groups both raise torch's error."""
    p = make([3])[0]
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        opt = FusedAdamW([p, p])
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="param 0 of param group 0 .* given to the optimizer "
                                           "twice .*param 1 of param group 0"):
        opt.step()
    assert torch.equal(before, p) and len(opt.state) == 0
    with pytest.raises(ValueError, match="more than one parameter group"):
        FusedAdamW([{"params": [p]}, {"params": [p]}])


def test_sparse_grad_raises():
    p = make([4])[0]
    opt = FusedAdamW([p])
    p.grad = torch.eye(4)[0].to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_explicit_backend_that_cannot_run_raises_with_reason():
    with pytest.raises(BackendUnavailableError, match='backend="cuda" cannot run on cpu'):
        FusedAdamW(make([3]), backend="cuda")


def test_auto_backend_falls_back_quietly(recwarn):
    opt = FusedAdamW(make([3]))
    assert opt.backend in ("cpu", "torch")
    assert not [w for w in recwarn if "fused_adamw" in str(w.filename)]


def test_float64_params_use_the_torch_backend_and_match_torch():
    a, b = make([1025, 7], dtype=torch.float64), make([1025, 7], dtype=torch.float64)
    opt = FusedAdamW(a)
    assert opt.backend == "torch"
    train(opt, a, 20, 0)
    train(torch.optim.AdamW(b, foreach=False), b, 20, 0)
    for p, q in zip(a, b):
        # float64 math in both: within 64 ulp of float64 at |p| ~ 4.
        assert torch.allclose(p, q, rtol=0, atol=64 * 2.2e-16 * 4), describe(p, q)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("backend,device", CELLS)
def test_checkpoint_round_trip_mid_training_changes_nothing(backend, device):
    """Train 10 steps, save, load into a fresh optimizer over fresh params, train 10 more:
    bit-identical to 20 uninterrupted steps."""
    shapes = [1025, (7, 3), ("C", (5,))]
    a = make(shapes, device=device)
    opt = FusedAdamW(a, lr=1e-2, amsgrad=True, backend=backend)
    train(opt, a, 10, 0, device)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in a], "opt": opt.state_dict()}, buf)
    train(opt, a, 10, 1, device)

    buf.seek(0)
    ck = torch.load(buf, map_location="cpu", weights_only=True)  # saved on the device
    b = [torch.nn.Parameter(t.to(device)) for t in ck["params"]]
    opt2 = FusedAdamW(b, lr=1e-2, amsgrad=True, backend=backend)
    opt2.load_state_dict(ck["opt"])
    train(opt2, b, 10, 1, device)
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach()), describe(p, q)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert torch.equal(v, sd2["state"][i][k]), k


@pytest.mark.parametrize("backend,device", CELLS)
def test_torch_checkpoint_loads_into_fused_and_back(backend, device):
    """torch AdamW -> FusedAdamW -> torch AdamW, training between, on the same trajectory."""
    shapes = [1025, (7, 3)]
    ref_params = make(shapes)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)

    t1 = make(shapes)
    o1 = torch.optim.AdamW(t1, lr=1e-2, foreach=False)
    train(o1, t1, 5, 0)
    train(ref, ref_params, 5, 0)

    f = [torch.nn.Parameter(p.detach().to(device)) for p in t1]
    of = FusedAdamW(f, lr=1e-2, backend=backend)
    of.load_state_dict(o1.state_dict())
    train(of, f, 5, 1, device)
    train(ref, ref_params, 5, 1)
    sd = of.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].ndim == 0
    assert sd["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()

    t2 = [torch.nn.Parameter(p.detach().cpu().clone()) for p in f]
    o2 = torch.optim.AdamW(t2, lr=1e-2, foreach=False)
    o2.load_state_dict(pickle.loads(pickle.dumps(of.state_dict())))  # plain dicts only
    train(o2, t2, 5, 2)
    train(ref, ref_params, 5, 2)
    for p, q in zip(t2, ref_params):
        assert torch.allclose(p, q, **CLOSE), describe(p, q)
    assert float(o2.state[t2[0]]["step"]) == 15


def test_state_dict_pickles_without_fused_adamw():
    a = make([5])
    opt = FusedAdamW(a)
    train(opt, a, 1, 0)
    blob = pickle.dumps(opt.state_dict())
    assert b"fused_adamw" not in blob


# ---------------------------------------------------------------------------- torch plumbing


@pytest.mark.parametrize("backend,device", CELLS)
def test_deepcopy_and_pickle_continue_identically(backend, device):
    a = make([1025, 3], device=device)
    opt = FusedAdamW(a, lr=1e-2, backend=backend)
    train(opt, a, 3, 0, device)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = clone.param_groups[0]["params"]
        assert all(p is not q for p, q in zip(params, a))
        assert clone.backend == opt.backend
        train(clone, params, 3, 1, device)
    train(opt, a, 3, 1, device)
    for p, q in zip(a, params):
        assert torch.equal(p.detach(), q.detach()), describe(p, q)


@pytest.mark.parametrize("backend,device", CELLS)
def test_state_read_and_assigned_directly(backend, device):
    a, b = make([64, 7], device=device), make([64, 7])
    opt, ref = FusedAdamW(a, lr=1e-2, backend=backend), torch.optim.AdamW(b, lr=1e-2,
                                                                          foreach=False)
    train(opt, a, 3, 0, device)
    train(ref, b, 3, 0)
    assert set(opt.state[a[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    for o, p in ((opt, a[0]), (ref, b[0])):
        o.state[p]["exp_avg"] = torch.zeros_like(p)  # code that resets a moment
        o.state[p]["step"] = torch.tensor(100.0)
    for o, p in ((opt, a[1]), (ref, b[1])):
        o.state[p]["exp_avg_sq"].mul_(4)  # in-place edits go straight to the buffers
    train(opt, a, 3, 1, device)
    train(ref, b, 3, 1)
    for p, q in zip(a, b):
        assert torch.allclose(p.detach().cpu(), q, **CLOSE), describe(p, q)
    assert float(opt.state[a[0]]["step"]) == 103


@pytest.mark.parametrize("backend,device", CELLS)
def test_step_hooks_and_closure(backend, device):
    p = make([8], device=device)[0]
    opt = FusedAdamW([p], backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("backend,device", CELLS)
def test_params_moved_after_building_are_followed(backend, device):
    """model.to(...) and p.data = ... after the optimizer was built: the next step updates
    the live tensors, never a dead buffer."""
    a, b = make([64, 7], device=device), make([64, 7])
    opt, ref = FusedAdamW(a, lr=1e-2, backend=backend), torch.optim.AdamW(b, lr=1e-2,
                                                                          foreach=False)
    train(opt, a, 2, 0, device)
    train(ref, b, 2, 0)
    for p, q in zip(a, b):
        p.data = p.data.clone()  # what model.to() does to each param
        q.data = q.data.clone()
    train(opt, a, 2, 1, device)
    train(ref, b, 2, 1)
    for p, q in zip(a, b):
        assert torch.allclose(p.detach().cpu(), q, **CLOSE), describe(p, q)


def test_module_to_dtype_after_building_is_refused_then_converted_on_purpose():
    """Decision: a dtype change after steps (model.to(float64), model.half()) is refused with
    an error naming the param and both dtypes, before anything changes; torch's own for-loop
    fails there too (lerp_ of mixed dtypes). Converting the state is one explicit call."""
    model = torch.nn.Linear(8, 4)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    model.to(torch.float64)
    opt.zero_grad()
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"param 0 of param group 0 is torch.float64 but its "
                                           r"optimizer state 'exp_avg' is torch.float32"):
        opt.step()
    assert torch.equal(before, model.weight) and opt.state[model.weight]["step"] == 1
    opt.load_state_dict(opt.state_dict())  # casts state to the params' dtype, as torch does
    opt.step()
    assert model.weight.dtype == torch.float64 and not torch.equal(before, model.weight)
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float64


# NOTE on warnings: torch's ZeroRedundancyOptimizer calls torch.jit.script/interface itself,
# which torch 2.13 deprecates; the warning is torch's, about torch's code, not ours to fix.
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.(script|interface)` is deprecated:DeprecationWarning")
def test_zero_redundancy_optimizer_wraps_fused(tmp_path):
    """torch's ZeroRedundancyOptimizer builds FusedAdamW on its shard of the params."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)
    try:
        a, b = make([64, 7]), make([64, 7])
        zero = ZeroRedundancyOptimizer(a, optimizer_class=FusedAdamW, lr=1e-2)
        ref = torch.optim.AdamW(b, lr=1e-2, foreach=False)
        train(zero, a, 5, 0)
        train(ref, b, 5, 0)
        for p, q in zip(a, b):
            assert torch.allclose(p, q, **CLOSE), describe(p, q)
        zero.consolidate_state_dict()
        assert len(zero.state_dict()["state"]) == 2
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- memory layout


@pytest.mark.parametrize("backend,device", CELLS)
def test_params_stay_where_they_live_and_state_shares_their_layout(backend, device):
    """No param moves; each state tensor has its param's shape, strides (transposed,
    channels_last kept) and 16-byte phase, so that param and state share the vector grid."""
    a = make([7, ("T", (5, 3)), ("CL", (2, 3, 4, 4)), ("C", (3,)), ()], device=device)
    buf = torch.zeros(64, device=device)
    a[0].data = buf[3:10].copy_(a[0].detach())  # a param at an odd element offset
    ptrs, strides = [p.data_ptr() for p in a], [p.stride() for p in a]
    opt = FusedAdamW(a, backend=backend)
    train(opt, a, 2, 0, device)
    for p, ptr, stride in zip(a, ptrs, strides):
        assert p.data_ptr() == ptr and p.stride() == stride
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == p.dtype and st[key].stride() == p.stride()
            assert st[key].data_ptr() % 16 == p.data_ptr() % 16
        assert st["step"].device == p.device and st["step"].dtype == torch.float32
    assert torch.equal(buf[3:10], a[0].detach())


@pytest.mark.parametrize("backend,device", CELLS)
def test_no_grad_copy_on_any_zero_grad(backend, device, monkeypatch):
    """Grads are read where they are: neither the default zero_grad() (fresh grads every step)
    nor set_to_none=False (the same grads every step) makes step() copy anything, and the
    table is built once."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 1)).to(device)
    twin = copy.deepcopy(model).cpu()
    opt = FusedAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(4, 8)
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a: copies.append(1) or real_copy(*a))
    for step in range(6):
        set_to_none = step < 3
        for o, m, xx in ((opt, model, x.to(device)), (ref, twin, x)):
            o.zero_grad(set_to_none=set_to_none)
            m(xx).pow(2).sum().backward()
            o.step()
        if step == 4:
            grads = [p.grad for p in model.parameters()]
    assert all(p.grad is g for p, g in zip(model.parameters(), grads)), "grads kept"
    assert not copies
    (table,) = opt._tables.values()
    assert table.rebuilds == 1
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.detach().cpu(), q, **CLOSE), describe(p, q)


@pytest.mark.parametrize("backend,device", CELLS)
def test_foreign_grads_are_used(backend, device):
    """Grads that are not views into our buffer (model.zero_grad(), an assigned grad) count."""
    a, b = make([16, 8], device=device), make([16, 8])
    opt, ref = FusedAdamW(a, lr=1e-2, backend=backend), torch.optim.AdamW(b, lr=1e-2,
                                                                          foreach=False)
    for o in (opt, ref):
        o.zero_grad(set_to_none=False)
    train(opt, a, 2, 0, device)  # assigns fresh grads every step
    train(ref, b, 2, 0)
    opt.zero_grad(set_to_none=False)  # grads become views...
    ref.zero_grad(set_to_none=False)
    a[0].grad = torch.full_like(a[0], 0.5)  # ...and then one is replaced by the user
    b[0].grad = torch.full_like(b[0], 0.5)
    opt.step()
    ref.step()
    for p, q in zip(a, b):
        assert torch.allclose(p.detach().cpu(), q, **CLOSE), describe(p, q)


def test_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4),
                                torch.nn.LayerNorm(4), torch.nn.Linear(4, 10, bias=False))
    model[3].weight = model[0].weight  # tied: must appear once
    model[2].bias.requires_grad_(False)  # frozen: left out
    decay, rest = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(10, 4), (4, 4)]
    assert [p.shape for p in rest["params"]] == [(4,), (4,)]  # linear bias, norm weight
    FusedAdamW([decay, rest])  # builds
    decay2, _ = weight_decay_groups(model, no_decay=("0.",))
    assert [p.shape for p in decay2["params"]] == [(4, 4)]


def test_public_surface():
    assert fused_adamw.__version__
    assert set(fused_adamw.__all__) >= {"FusedAdamW", "weight_decay_groups",
                                        "BackendUnavailableError"}


@pytest.mark.parametrize("backend,device", CELLS)
def test_amsgrad_switched_on_mid_training(backend, device):
    """torch raises a KeyError here (no max_exp_avg_sq state); we start the maxima at zero,
    which is what a fresh amsgrad run does, so the step after the switch equals one from
    torch AdamW(amsgrad=True) loaded with the same state plus zero maxima."""
    a, b = make([64], device=device), make([64])
    opt = FusedAdamW(a, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(b, lr=1e-2, amsgrad=True, foreach=False)
    train(opt, a, 3, 0, device)
    train(torch.optim.AdamW(b, lr=1e-2, foreach=False), b, 3, 0)
    sd = torch.optim.AdamW(b, lr=1e-2, foreach=False).state_dict()
    sd["state"] = {0: {k: v.detach().cpu().clone() for k, v in opt.state[a[0]].items()}}
    sd["state"][0]["max_exp_avg_sq"] = torch.zeros(64)
    sd["param_groups"][0]["amsgrad"] = True
    ref.load_state_dict(sd)
    opt.param_groups[0]["amsgrad"] = True
    train(opt, a, 3, 1, device)
    train(ref, b, 3, 1)
    assert "max_exp_avg_sq" in opt.state[a[0]]
    assert torch.allclose(a[0].detach().cpu(), b[0], **CLOSE), describe(a[0], b[0])


def test_torch_only_flags_are_accepted_and_change_nothing():
    """foreach, fused and capturable are accepted so that the class name is the only change."""
    runs = []
    for flags in ({}, dict(foreach=True), dict(fused=True), dict(capturable=True),
                  dict(foreach=False, fused=False)):
        a = make([1025, 7])
        opt = FusedAdamW(a, lr=1e-2, **flags)
        train(opt, a, 3, 0)
        runs.append(a)
        assert opt.param_groups[0].get("fused") == flags.get("fused")
    for other in runs[1:]:
        for p, q in zip(runs[0], other):
            assert torch.equal(p, q)


def test_zero_grad_defaults_to_set_to_none():
    a = make([5])
    opt = FusedAdamW(a)
    train(opt, a, 1, 0)
    opt.zero_grad()
    assert a[0].grad is None


def test_tensor_subclass_params_raise_clearly():
    """Tensor subclasses other than Parameter and DTensor (FSDP2) are refused up front with
    their name, instead of failing somewhere inside step()."""
    class Shard(torch.Tensor):
        pass

    p = torch.randn(4).as_subclass(Shard).requires_grad_()
    with pytest.raises(NotImplementedError, match="param 0 of param group 0 is a Shard"):
        FusedAdamW([p])


def test_demo_prints_matching_loss_columns(capsys):
    from fused_adamw import demo

    diff = demo.main(["--steps", "4"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4
    for row in rows:  # both optimizers' losses, printed to 6 decimals, agree
        assert abs(float(row[2]) - float(row[3])) < 1e-5, row
    assert diff < 1e-5  # 4 steps of lr <= 3e-3: a few ulp of |p| ~ 1 at most


def test_environment_report_names_versions_and_backends():
    from fused_adamw.__main__ import lines

    text = "\n".join(lines())
    assert f"fused_adamw {fused_adamw.__version__}" in text
    assert f"torch {torch.__version__}" in text and "triton" in text
    assert "cpu: auto picks" in text
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f"  {name:<7} " in text  # each backend with 'available' or its reason


def test_grad_scaler_unscales_and_skips_inf_steps():
    """GradScaler drives FusedAdamW through its ordinary path: grads unscaled before step(),
    a step with an inf grad skipped (params and step counts unchanged)."""
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    x = torch.randn(3, 4)
    for step in range(4):
        for m, o, sc in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            sc.scale(m(x).sum()).backward()
            if step == 2:
                m.weight.grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, **CLOSE), describe(p, q)
    assert float(opt.state[model.weight]["step"]) == 3  # the inf step was skipped


def test_differentiable_group_in_a_non_differentiable_optimizer_steps_leaf_params():
    """torch steps under grad mode = the optimizer-wide `differentiable` default
    (_use_grad_for_differentiable): a group with differentiable=True in an optimizer built
    without it updates its leaf params in place under no_grad. We enabled grad for such
    groups and failed ("a leaf Variable that requires grad is being used in an in-place
    operation"); now the params equal torch's."""
    def run(cls, **kw):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
        opt = cls([{"params": [a]}, {"params": [b], "differentiable": True}], lr=1e-2, **kw)
        for _ in range(3):
            a.grad, b.grad = torch.ones(5), torch.full((5,), 2.0)
            opt.step()
        return a.detach(), b.detach()

    ours, theirs = run(FusedAdamW), run(torch.optim.AdamW, foreach=False)
    # group 0: the fused kernel vs torch's for-loop, a few ulp apart after 3 steps;
    # group 1: torch's own single-tensor Adam on both sides
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    assert torch.equal(ours[1], theirs[1])
