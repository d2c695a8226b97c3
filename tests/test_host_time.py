"""The change detection that a steady step runs (issue #21, "Host time at the goal").

A step where nothing changed compares every param, grad and state tensor with what the rows
were built from in one compiled call (``_watch.Watch``: torch's C entry point for a Tensor's
data pointer and its TensorGuards, driven by ``_C.scan_table``), or in Python passes where
torch lacks them (with compiled address reads where only those exist). Each test runs with
each of the three: what the cheaper pass reads must still catch every swap the README promises
(of a param, a grad or a state tensor). No timing here: bench/bench_step.py's host case times
it.
"""

from __future__ import annotations

import pytest
import torch

from fused_adamw import FusedAdamW, _table, _watch

# 3 steps of fp32 AdamW with |p| < 5: the fused loop rounds in another order than torch's
# for-loop (a few ulps, 4.8e-7 each at 4); a swap the step missed is off by ~lr = 1e-2.
ATOL = 2e-6


@pytest.fixture(params=["scan", "addresses", "python"])
def reader(request, monkeypatch):
    """scan: the compiled pass (``_watch.compiled_scan``) and compiled addresses; addresses:
    compiled addresses, the Python passes; python: no compiled call."""
    scan = None
    if request.param == "python":
        readers = (_watch._python_addresses, _watch._python_same_addresses,
                   _watch._python_same_items)
    else:
        readers = _watch._compiled_readers()
        if readers is None:
            pytest.skip("no compiled address reader here (no _C build, or torch lacks the "
                        "entry point)")
        if request.param == "scan":
            scan = _watch.compiled_scan()
            if scan is None:
                pytest.skip("no compiled scan here (torch lacks TensorGuards or its probe "
                            "failed)")
    monkeypatch.setattr(_watch, "_READERS", readers)
    monkeypatch.setattr(_watch, "_SCAN", scan)
    return request.param


def test_the_compiled_reader_reads_what_data_ptr_reads():
    readers = _watch._compiled_readers()
    if readers is None:
        pytest.skip("no compiled address reader here (no _C build, or torch lacks the entry "
                    "point)")
    addresses, same, _ = readers
    flat = torch.randn(40)
    ts = [flat, flat[7:], flat.view(5, 8).t(), flat[1::3], torch.nn.Parameter(torch.ones(3)),
          torch.empty(0), torch.zeros((), dtype=torch.bfloat16), torch.randn(2, 3)[:, 1]]
    ptrs = [t.data_ptr() for t in ts]
    assert addresses(ts) == ptrs
    assert same(ts, ptrs)
    for i in range(len(ts)):  # one address off anywhere is seen
        other = list(ptrs)
        other[i] += 4
        assert not same(ts, other), i
    assert not same(ts, ptrs[:-1]) and not same(ts[:-1], ptrs)
    # A non-tensor is left to the Python pass, which raises as data_ptr() does.
    with pytest.raises(TypeError, match="data_ptr"):
        addresses([flat, object()])


def _pair(n=3, shape=(4, 5)):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(n)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    return ps, twin, gen


def _grads(ps, twin, gen):
    for p, q in zip(ps, twin):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("grads", ["fresh", "persistent"])
def test_a_state_tensor_rebound_in_place_is_stepped_where_it_now_lives(reader, key, how, grads):
    """``state[p][key].data = t`` / ``.set_(t)`` (an offload idiom): the same tensor object
    now lives elsewhere; the next step must update it there, as torch's AdamW does."""
    ps, twin, gen = _pair()
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    _grads(ps, twin, gen)
    for _ in range(2):
        if grads == "fresh":
            _grads(ps, twin, gen)
        opt.step()
        ref.step()
    t = opt.state[ps[1]][key]
    old = t.detach()  # keeps the old storage alive: a step that missed the swap writes there
    moved = t.detach().clone() + 0  # new storage, same values
    ref_t = ref.state[twin[1]][key]
    ref_moved = ref_t.detach().clone() + 0
    if how == "data":
        t.data, ref_t.data = moved, ref_moved
    else:
        t.set_(moved)
        ref_t.set_(ref_moved)
    assert opt.state[ps[1]][key].data_ptr() == moved.data_ptr()
    if grads == "fresh":
        _grads(ps, twin, gen)
    opt.step()
    ref.step()
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()
    mine = opt.state[ps[1]][key]
    assert mine is t and mine.data_ptr() == moved.data_ptr()
    assert torch.allclose(mine, ref.state[twin[1]][key].to(mine.dtype), rtol=0, atol=ATOL)


@pytest.mark.parametrize("what", ["param", "grad"])
def test_a_param_or_grad_moved_with_persistent_grads_is_stepped_where_it_now_lives(reader,
                                                                                   what):
    """``p.data = t`` or ``p.grad.data = t`` at a new address, the grad objects kept
    (zero_grad(set_to_none=False)): the steady pass sees the new address."""
    ps, twin, gen = _pair()
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    _grads(ps, twin, gen)
    for _ in range(2):
        opt.step()
        ref.step()
    grad = ps[2].grad
    old = (ps[2].detach(), grad.detach())  # the old storage stays: a missed swap writes there
    if what == "param":
        ps[2].data = ps[2].data.clone()
        twin[2].data = twin[2].data.clone()
    else:
        new = torch.randn(grad.shape, generator=gen)
        ps[2].grad.data = new
        twin[2].grad.data = new.clone()
    assert ps[2].grad is grad  # the same grad object: the steady path's case
    opt.step()
    ref.step()
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()


def test_a_steady_step_rebuilds_nothing(reader):
    ps, twin, gen = _pair(n=20, shape=(3,))
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    _grads(ps, twin, gen)
    opt.step()
    table = next(iter(opt._tables.values()))
    rebuilds = table.rebuilds
    for _ in range(3):
        opt.step()  # persistent grads
    for _ in range(3):
        _grads(ps, twin, gen)
        opt.step()  # fresh grads: new addresses patched in, no rebuild
    assert table.rebuilds == rebuilds


def test_a_steady_step_runs_no_python_pass(monkeypatch):
    """The compiled pass decides steady steps alone (persistent and fresh grads): were it
    dead code, every test above would still pass through the Python passes."""
    if _watch.compiled_scan() is None:
        pytest.skip("no compiled scan here (no _C build, or torch lacks its entry points)")
    ps, twin, gen = _pair(n=300, shape=(3,))  # two chunks of the compiled pass
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    _grads(ps, twin, gen)
    opt.step()
    table = next(iter(opt._tables.values()))
    assert table.watch.armed

    def python_pass(*args):
        raise AssertionError("a steady step ran the Python passes")

    monkeypatch.setattr(_watch, "address_readers", python_pass)
    for _ in range(2):
        opt.step()  # persistent grads
    for _ in range(2):
        _grads(ps, twin, gen)
        opt.step()  # fresh grads
    monkeypatch.undo()
    # The fresh grads' addresses went into the rows: the Python passes agree with them.
    ref = [p.grad.data_ptr() for p in ps]
    assert table.host_packed.numpy()[_table.ROW_GRAD: len(ps) * _table.ROW_COLS:
                                     _table.ROW_COLS].tolist() == ref


def test_guards_that_refuse_what_python_accepts_fall_back_then_give_up():
    """The guards compare more than the rows need (requires_grad): a param frozen and thawed
    every step is decided by the Python passes, correctly, and after a few such steps the table
    stops re-arming the compiled pass."""
    if _watch.compiled_scan() is None:
        pytest.skip("no compiled scan here (no _C build, or torch lacks its entry points)")
    ps, twin, gen = _pair()
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    _grads(ps, twin, gen)
    for k in range(3 + 2 * _watch.Watch.MAX_MISSES):
        for p in (ps[0], twin[0]):
            p.requires_grad_(k % 2 == 0)  # a param with a grad steps either way (as torch)
        opt.step()
        ref.step()
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()
    watch = next(iter(opt._tables.values())).watch
    assert watch.misses == _watch.Watch.MAX_MISSES and not watch.armed


def test_without_torchs_entry_points_the_python_passes_run(monkeypatch):
    """A torch without the data pointer entry point or without TensorGuards: no compiled
    pass (the Python passes run: the "python" and "addresses" cells above)."""
    from torch._C._dynamo import guards

    monkeypatch.delattr(guards, "TensorGuards", raising=False)
    assert _watch._compiled_scan() is None
    monkeypatch.delattr(guards, "_torchinductor_pyobject_tensor_data_ptr", raising=False)
    assert _watch._compiled_readers() is None and _watch._compiled_scan() is None
