"""The change detection that a steady step runs (issue #21, "Host time at the goal").

A step where nothing changed compares every param, grad and state tensor with what the rows
were built from in one compiled call (``_watch.Watch``: ``_C.scan_table`` reading each
tensor's address, dtype, device, sizes and strides through torch's stable C shim), or in
Python passes where torch lacks it (with compiled address reads where only those exist).
Each test runs with each of the three: what the cheaper pass reads must still catch every swap
the README promises (of a param, a grad or a state tensor). No timing here:
bench/bench_step.py's host case times it.
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
                pytest.skip("no compiled scan here (torch lacks the AOTInductor shim or "
                            "its probe failed)")
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


def _started(ps, twin, gen, steps=2):
    """FusedAdamW and torch's for-loop AdamW on twin params, ``steps`` steps on one set of
    grads (kept: zero_grad(set_to_none=False)'s case)."""
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    _grads(ps, twin, gen)
    for _ in range(steps):
        opt.step()
        ref.step()
    return opt, ref


def _step_both_and_compare(opt, ref, ps, twin, gen, grads: str, steps: int = 1) -> None:
    for _ in range(steps):
        if grads == "fresh":
            _grads(ps, twin, gen)
        opt.step()
        ref.step()
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()


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
    _step_both_and_compare(opt, ref, ps, twin, gen, grads)
    mine = opt.state[ps[1]][key]
    assert mine is t and mine.data_ptr() == moved.data_ptr()
    assert torch.allclose(mine, ref.state[twin[1]][key].to(mine.dtype), rtol=0, atol=ATOL)


@pytest.mark.parametrize("what", ["param", "grad"])
def test_a_param_or_grad_moved_with_persistent_grads_is_stepped_where_it_now_lives(reader,
                                                                                   what):
    """``p.data = t`` or ``p.grad.data = t`` at a new address, the grad objects kept
    (zero_grad(set_to_none=False)): the steady pass sees the new address."""
    ps, twin, gen = _pair()
    opt, ref = _started(ps, twin, gen)
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


class _Grad(torch.Tensor):
    """A Tensor subclass with nothing overridden: a grad the rows take as it is."""


def test_a_pass_that_refuses_what_python_accepts_falls_back_then_gives_up():
    """The compiled pass takes only plain Tensors and Parameters (it calls TensorBase's grad
    getter and reads the objects' layout): grads of a Tensor subclass are decided by the
    Python passes, correctly, and after a few such steps the table stops re-arming the
    compiled pass."""
    if _watch.compiled_scan() is None:
        pytest.skip("no compiled scan here (no _C build, or torch lacks its entry points)")
    ps, twin, gen = _pair()
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    for _ in range(3 + 2 * _watch.Watch.MAX_MISSES):
        _grads(ps, twin, gen)
        for p in ps:
            p.grad = p.grad.as_subclass(_Grad)
        opt.step()
        ref.step()
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()
    watch = next(iter(opt._tables.values())).watch
    assert watch.misses == _watch.Watch.MAX_MISSES and not watch.armed


def test_grads_with_other_strides_on_size_1_dims_stay_on_the_compiled_pass():
    """Autograd stashes grads whose strides differ from the param's on size-1 dims (its layout
    contract leaves them free, as is_contiguous does): such grads fit the rows, and the
    compiled pass takes them too (else a ViT's (1, N, C) embeddings would put its table on the
    Python passes for good)."""
    if _watch.compiled_scan() is None:
        pytest.skip("no compiled scan here (no _C build, or torch lacks its entry points)")
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1, 3, 4, generator=gen)) for _ in range(3)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    table = None
    for k in range(6):
        for p, q in zip(ps, twin):
            g = torch.randn(p.shape, generator=gen)
            p.grad = torch.empty_strided(p.shape, (1 + k, 4, 1)).copy_(g)  # stride 0's free
            q.grad = g.clone()
        opt.step()
        ref.step()
        table = next(iter(opt._tables.values()))
        if k >= 2:
            assert table.watch.armed and table.watch.misses == 0, k
    assert table.rebuilds == 1
    for p, q in zip(ps, twin):
        assert torch.allclose(p, q, rtol=0, atol=ATOL), (p - q).abs().max()


def test_without_torchs_entry_points_the_python_passes_run(monkeypatch):
    """A torch without the shim or without the data pointer entry point: no compiled pass (the
    Python passes run: the "python" and "addresses" cells above)."""
    from torch._C._dynamo import guards

    monkeypatch.setattr(_watch, "_torch_library", lambda: None)
    assert _watch._compiled_scan() is None
    monkeypatch.undo()
    monkeypatch.setattr(_watch, "_cdata_offset", lambda probes: None)
    assert _watch._compiled_scan() is None
    monkeypatch.delattr(guards, "_torchinductor_pyobject_tensor_data_ptr", raising=False)
    assert _watch._compiled_readers() is None


def test_the_compiled_pass_exists_on_the_torch_we_test():
    """On the torch of CI and of the GPU suite's image (2.11 and later) the shim, the probe and
    the scan are all there: a change to torch or to _C that broke one of them would otherwise
    only make steps slower (every test above passes through the Python passes too)."""
    from fused_adamw import _ext

    if _ext.C is None:
        pytest.skip("no _C build here (the torch backend's install)")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 11):
        pytest.skip(f"torch {torch.__version__}: the shim's probe is only required from 2.11")
    shim = _watch._shim()
    assert shim is not None and shim[0] == _watch._cdata_offset([torch.zeros(2)])
    assert _watch._records_agree(_ext.C.record_geometry, shim)
    assert _watch._compiled_scan() is not None


@pytest.mark.parametrize("grads", ["fresh", "persistent"])
def test_a_state_tensor_re_viewed_at_its_address_is_noticed(reader, grads):
    """``state[p]["exp_avg"].data = state[p]["exp_avg"].data.t()``: same object, same address,
    another layout. torch's for-loop steps the moment as it now is (a transposed view); so
    must we (a step that missed it would walk it in the old order)."""
    ps, twin, gen = _pair(shape=(4, 4))
    opt, ref = _started(ps, twin, gen)
    for o, q in ((opt, ps[1]), (ref, twin[1])):
        t = o.state[q]["exp_avg"]
        t.data = t.data.t()
    _step_both_and_compare(opt, ref, ps, twin, gen, grads, steps=2)
    mine, theirs = opt.state[ps[1]]["exp_avg"], ref.state[twin[1]]["exp_avg"]
    assert mine.stride() == theirs.stride() == (1, 4)
    assert torch.allclose(mine, theirs, rtol=0, atol=ATOL)


def test_the_probes_draw_nothing_from_torchs_generator():
    """The first step builds the compiled readers and probes them: nothing drawn from torch's
    global generator, so a run seeded with torch.manual_seed gets torch's dropout, shuffling
    and stochastic rounding seeds whether it uses FusedAdamW or torch's AdamW."""
    torch.manual_seed(0)
    want = torch.randn(4)
    torch.manual_seed(0)
    _watch._compiled_readers()
    _watch._shim()
    _watch._compiled_scan()
    assert torch.equal(torch.randn(4), want)


def _refused_like_torch(ps, twin, act, match):
    """``act(opt, params)`` applied to both sides, then a step: torch's for-loop raises, so
    must we, naming what is wrong, before anything changes."""
    gen = torch.Generator().manual_seed(5)
    opt, ref = _started(ps, twin, gen, steps=3)
    act(opt, ps)
    act(ref, twin)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError):
        ref.step()
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def _exp_avg_as_int32(o, params):
    st = o.state[params[1]]["exp_avg"]
    st.data = st.data.view(torch.int32)


def _param_reshaped(o, params):
    params[1].data = params[1].data.view(5, 4)


@pytest.mark.parametrize("act,match", [(_exp_avg_as_int32, "int32"),
                                       (_param_reshaped, r"\(5, 4\)")])
def test_a_re_view_at_the_same_address_that_torch_refuses_is_refused(reader, act, match):
    """A state tensor re-viewed as another dtype of its size (``.view(torch.int32)``), a param
    re-viewed as another shape of its numel (``p.data = p.data.view(5, 4)`` of a (4, 5) param):
    same address, same numel, nothing for the kernel to trip on, but torch raises at the next
    step (its moments no longer fit), and so must we rather than step on as before."""
    ps, twin, _ = _pair()
    _refused_like_torch(ps, twin, act, match)


@pytest.mark.parametrize("grads", ["fresh", "persistent"])
def test_grads_with_the_lazy_negation_bit_are_read_negated(reader, grads):
    """``z.conj().imag`` is a real view of a complex tensor that carries torch's lazy negation
    bit: its memory holds -g. torch's ops resolve the bit; the kernels read memory, so such a
    grad is staged (the copy resolves it) and never taken as it is, on any pass."""
    gen = torch.Generator().manual_seed(2)
    # One element each: the imaginary view of one complex number is contiguous (a longer one
    # strides over the real parts and is staged for that alone).
    ps = [torch.nn.Parameter(torch.randn(1, generator=gen)) for _ in range(3)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedAdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)

    def negated_grads():
        for p, q in zip(ps, twin):
            z = torch.complex(torch.zeros(p.shape), -torch.randn(p.shape, generator=gen))
            p.grad = z.conj().imag  # reads as -imag(z): a neg-bit view
            assert p.grad.is_neg() and p.grad.is_contiguous()
            q.grad = p.grad.clone()  # resolved: what torch's ops see

    _grads(ps, twin, gen)  # plain grads first: the compiled pass is armed where it exists
    _step_both_and_compare(opt, ref, ps, twin, gen, "persistent", steps=2)
    negated_grads()
    _step_both_and_compare(opt, ref, ps, twin, gen, "persistent")
    for _ in range(3):
        if grads == "fresh":
            negated_grads()
        _step_both_and_compare(opt, ref, ps, twin, gen, "persistent")
