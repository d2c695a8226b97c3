"""``capturable=True`` and CUDA graphs.

On the CPU: a warmed-up ``step()`` under ``capturable=True`` dispatches no ``.item()``
(``aten._local_scalar_dense``) and no allocating aten op (a ``TorchDispatchMode`` sees aten
ops only: the extension's own allocations are the code review's job; it makes none), with
float and Tensor lr, fresh grads every step and GradScaler's values; ``init_state()``
materialises state without counting a step. On a GPU (skipped here with the reason): capture
and replay of ``step()``, of ``scaler.step(opt); scaler.update()`` and of a whole training
step, modelled on torch's ``test_graph_scaling_fused_optimizers``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import HAS_CUDA
from fused_adamw import FusedAdamW

# Ops that allocate no new storage: views, in-place writes and metadata. Anything else a
# warmed-up capturable step dispatches is an allocation (or a sync) and fails the test.
_NON_ALLOCATING = {
    "aten.copy_.default", "aten.select.int", "aten.view.default", "aten.alias.default",
    "aten.reshape.default", "aten._reshape_alias.default", "aten.detach.default",
    "aten.fill_.Scalar", "aten.fill_.Tensor", "aten.add_.Tensor", "aten.mul_.Tensor",
    "aten.lerp_.Scalar",
}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _problems(ops: list[str]) -> list[str]:
    """Aten ops that may allocate (torch's Optimizer.step wrapper adds profiler ops, which
    are not aten's and allocate no tensor memory)."""
    return [op for op in ops if op.startswith("aten.") and op not in _NON_ALLOCATING]


def _setup(backend, lr, n=5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 3), (100,), (1,), (33, 5)][:n]]
    opt = FusedAdamW(params, lr=lr, capturable=True, backend=backend, weight_decay=0.1,
                     amsgrad=True)
    return params, opt


def _fresh_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)  # a new tensor each step, as after zero_grad


@pytest.mark.parametrize("lr_kind", ["float", "tensor", "float-schedule", "tensor-schedule"])
def test_warm_capturable_step_makes_no_sync_and_no_allocation(lr_kind):
    lr = torch.tensor(1e-2) if lr_kind.startswith("tensor") else 1e-2
    params, opt = _setup("cpu", lr)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
             if lr_kind.endswith("schedule") else None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # warm-up: state and tables
        _fresh_grads(params, gen)
        opt.step()
        if sched:
            sched.step()
    for k in range(3):
        _fresh_grads(params, gen)
        opt.grad_scale = torch.tensor(4.0)  # GradScaler's values, as its step sets them
        opt.found_inf = torch.tensor(float(k == 1))
        with _Recorder() as rec:
            opt.step()
        del opt.grad_scale, opt.found_inf
        assert "aten._local_scalar_dense.default" not in rec.ops, rec.ops
        assert _problems(rec.ops) == [], rec.ops
        if sched:
            sched.step()
    assert opt.state[params[0]]["step"].item() == 4  # the found_inf step was skipped


def test_capturable_changes_nothing_on_cpu():
    """capturable=True is accepted on every device (torch's for-loop refuses it on CPU); on
    the CPU it changes nothing but the no-sync guarantee: the same bits as capturable=False."""
    out = []
    for capturable in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300))
        opt = FusedAdamW([p], lr=torch.tensor(1e-2), capturable=capturable)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            p.grad = torch.randn(300, generator=gen)
            opt.step()
        out.append(p.detach().clone())
    assert torch.equal(*out)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_init_state_counts_no_step(amsgrad):
    """init_state(): torch's keys with step 0 and zero moments for every param (with or
    without a grad), params untouched; the next step is the first step, bit for bit with an
    optimizer that never saw init_state; a second call changes nothing."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 4), (17,), (3,)]]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = FusedAdamW(a, lr=1e-2, amsgrad=amsgrad, capturable=True)
    opt_b = FusedAdamW(b, lr=1e-2, amsgrad=amsgrad, capturable=True)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen) for p in a]
    for p, g in zip(a[:2], grads):  # the last param has no grad at first
        p.grad = g.clone()
    before = [p.detach().clone() for p in a]
    opt_a.init_state()
    opt_a.init_state()
    for p, v in zip(a, before):
        assert torch.equal(p, v)
        st = opt_a.state[p]
        assert st["step"].item() == 0 and st["step"].dtype == torch.float32
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        assert set(st) == keys
        assert all(not st[k].any() for k in keys - {"step"})
    sd = opt_a.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]
    torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in a],
                      amsgrad=amsgrad).load_state_dict(sd)  # torch reads it
    # The first real step: warm already (no allocation), and the same as without init_state.
    with _Recorder() as rec:
        opt_a.step()
    assert _problems(rec.ops) == [], rec.ops
    for p, g in zip(b[:2], grads):
        p.grad = g.clone()
    opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a[:2], b[:2]):
        for k, v in opt_b.state[q].items():
            assert torch.equal(opt_a.state[p][k], v), k
    assert opt_a.state[a[2]]["step"].item() == 0  # no grad yet: still not stepped


# ------------------------------------------------------------------------------------------
# GPU: capture and replay (skip without CUDA)
# ------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def _cuda_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8)).to("cuda", dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_of_scaler_step_equals_eager(dtype):
    """torch's test_graph_scaling_fused_optimizers, for FusedAdamW: grads are static; each
    iteration writes new grads into them (with an inf in some), then eager runs
    scaler.step + update on one copy and the graph replays them on the other."""
    m_eager, m_graph = _cuda_model(dtype=dtype), _cuda_model(dtype=dtype)
    kw = dict(lr=torch.tensor(1e-3, device="cuda"), capturable=True, weight_decay=0.1)
    opt_e = FusedAdamW(m_eager.parameters(), **kw)
    opt_g = FusedAdamW(m_graph.parameters(), **{**kw, "lr": torch.tensor(1e-3, device="cuda")})
    s_e = torch.amp.GradScaler("cuda", init_scale=128.0)
    s_g = torch.amp.GradScaler("cuda", init_scale=128.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m in (m_eager, m_graph):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    opt_g.init_state()  # the buffers the graph needs, without a step that counts
    s_g._lazy_init_scale_growth_tracker(torch.device("cuda"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_g.step(opt_g)
        s_g.update()
    for i in range(12):
        for pe, pg in zip(m_eager.parameters(), m_graph.parameters()):
            g = torch.randn(pe.shape, device="cuda", generator=gen).to(dtype) * 128
            if i in (3, 7):
                g.view(-1)[0] = float("inf")
            pe.grad.copy_(g)
            pg.grad.copy_(g)
        s_e.step(opt_e)
        s_e.update()
        graph.replay()
        torch.cuda.synchronize()
        for pe, pg in zip(m_eager.parameters(), m_graph.parameters()):
            assert torch.equal(pe, pg), i
            assert torch.equal(pe.grad, pg.grad), i
        assert s_e.get_scale() == s_g.get_scale()
    for pe, pg in zip(m_eager.parameters(), m_graph.parameters()):
        assert opt_e.state[pe]["step"].item() == opt_g.state[pg]["step"].item() == 10


@needs_cuda
def test_graph_replay_of_a_whole_training_step_with_a_tensor_lr_schedule():
    """forward, backward and step captured once (static input and grads); a Tensor lr changed
    in place between replays; replays equal the eager loop bit for bit."""
    m_e, m_g = _cuda_model(), _cuda_model()
    lr_e, lr_g = torch.tensor(1e-3, device="cuda"), torch.tensor(1e-3, device="cuda")
    opt_e = FusedAdamW(m_e.parameters(), lr=lr_e, capturable=True)
    opt_g = FusedAdamW(m_g.parameters(), lr=lr_g, capturable=True)
    x = torch.randn(16, 64, device="cuda")
    static_x = x.clone()

    def train(model, opt, inp):
        loss = model(inp).square().mean()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up backward (no step: init_state instead)
        m_g(static_x).square().mean().backward()
        opt_g.init_state()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for p in m_g.parameters():
        p.grad.zero_()
    with torch.cuda.graph(graph):
        train(m_g, opt_g, static_x)
    for i in range(8):
        x = torch.randn(16, 64, device="cuda")
        lr_e.fill_(1e-3 / (1 + i))
        lr_g.fill_(1e-3 / (1 + i))
        opt_e.zero_grad(set_to_none=False)
        train(m_e, opt_e, x)
        for p in m_g.parameters():
            p.grad.zero_()
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        for pe, pg in zip(m_e.parameters(), m_g.parameters()):
            torch.testing.assert_close(pe, pg, rtol=0, atol=0)


@needs_cuda
def test_capture_refusals_are_clear():
    m = _cuda_model()
    opt = FusedAdamW(m.parameters(), lr=1e-3)  # capturable=False
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            opt.step()
    opt2 = FusedAdamW(m.parameters(), lr=1e-3, capturable=True)  # no state yet
    with pytest.raises(RuntimeError, match="init_state"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt2.step()
    opt3 = FusedAdamW(m.parameters(), lr=torch.tensor(1e-3), capturable=True)  # CPU lr
    opt3.init_state()
    with pytest.raises(RuntimeError, match="lr of param group 0 is a Tensor on cpu"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt3.step()


@needs_cuda
def test_cpu_tensor_lr_with_gpu_params():
    """DCP's optimizer-state initialisation can leave a CPU Tensor lr beside GPU params: an
    eager step reads it (a device copy), and equals a float lr."""
    m1, m2 = _cuda_model(), _cuda_model()
    o1 = FusedAdamW(m1.parameters(), lr=torch.tensor(1e-3))
    o2 = FusedAdamW(m2.parameters(), lr=1e-3)
    for _ in range(3):
        for a, b in zip(m1.parameters(), m2.parameters()):
            a.grad = torch.ones_like(a)
            b.grad = torch.ones_like(b)
        o1.step()
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_second_gpu_runs_on_its_own_current_stream(backend):
    """A cuda:1 bucket launches on cuda:1's current stream (a side stream here) whatever the
    current device, which is left as it was."""
    torch.cuda.set_device(0)
    p = torch.nn.Parameter(torch.randn(10000, device="cuda:1"))
    p.grad = torch.randn(10000, device="cuda:1")
    ref = p.detach().clone()
    opt = FusedAdamW([p], lr=1e-2, backend=backend)
    s = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(s):
        opt.step()
    s.synchronize()
    assert torch.cuda.current_device() == 0
    assert not torch.equal(p, ref)
