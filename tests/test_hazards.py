"""The hazards a GPU would show and the CPU emulation cannot (issue #18, "Close the hazards").

Held on the CPU with a recorded log of streams: the optimizer runs on ``meta`` tensors (the
torch backend, no data), ``_table.current_stream`` is a fake that says which stream is
current, and every launch, stream wait, ``record_stream``, write into a device buffer and
free of one is logged. A checker then replays the log as a GPU would order it. The GPU twins
(skipped here: no CUDA device) run the same scenarios on real streams and graphs.

Also: a step tensor shared by two params, and staleness detected by address alone (a param
re-viewed or re-allocated at the same address), on the CPU backends.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from conftest import HAS_CUDA
from fused_adamw import FusedAdamW, _table, _validate, _watch
from fused_adamw.backends import torch as torch_backend

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# ------------------------------------------------------------------------------------------
# a recorded log of streams
# ------------------------------------------------------------------------------------------


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self._log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self._log.append(("wait", self, other))

    def __repr__(self):
        return self.name


class StreamLog:
    """Installs the fakes; ``use(name)`` makes a stream current (as ``torch.cuda.stream``).

    Events: ("launch", stream, buffers read), ("wait", stream, other), ("write", stream,
    buffer), ("record", buffer, stream), ("free", buffer). Buffers are named by the ids the
    log hands out (``ref``), so that the log keeps none alive."""

    def __init__(self, monkeypatch):
        self.log: list = []
        self.streams: dict[str, FakeStream] = {}
        self.current = self.stream("s0")
        self._ids: dict[int, int] = {}  # id(tensor) -> buffer number, while it lives
        log = self.log
        meta_memory(monkeypatch)
        monkeypatch.setattr(_table, "current_stream",
                            lambda device: self.current if device.type == "meta" else None)

        def record_stream(t, stream):
            log.append(("record", self.ref(t), stream))

        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
        real_copy = torch.Tensor.copy_

        def copy_(dst, src, non_blocking=False):
            if dst.device.type == "meta":
                base = dst if dst._base is None else dst._base
                if id(base) in self._ids:
                    log.append(("write", self.current, self._ids[id(base)]))
            return real_copy(dst, src, non_blocking)

        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        real_foreach_copy = torch._foreach_copy_

        def foreach_copy_(dsts, srcs, non_blocking=False):
            for d in dsts:
                if id(d) in self._ids:
                    log.append(("write", self.current, self._ids[id(d)]))
            return real_foreach_copy(dsts, srcs, non_blocking)

        monkeypatch.setattr(torch, "_foreach_copy_", foreach_copy_)
        real_step = torch_backend.BACKEND.step

        def step(table):
            log.append(("launch", self.current, (self.ref(table.packed), self.ref(table.hparams),
                                                 *(self.ref(t) for t, _ in table.stage_in))))
            real_step(table)

        monkeypatch.setattr(torch_backend.BACKEND, "step", step)
        real_upload = _table.Table._upload

        def upload(table, host):  # a new packed buffer is tracked from its first write
            old = table.packed
            real_upload(table, host)
            if table.packed is not old:
                log.append(("write", self.current, self.ref(table.packed)))

        monkeypatch.setattr(_table.Table, "_upload", upload)

    def stream(self, name: str) -> FakeStream:
        return self.streams.setdefault(name, FakeStream(name, self.log))

    def use(self, name: str) -> None:
        self.current = self.stream(name)

    def ref(self, t: torch.Tensor) -> int:
        """The buffer number of ``t`` (new ones are watched: their free is logged)."""
        if id(t) not in self._ids:
            n = self._ids[id(t)] = len(self._ids) + 1000 * len(self.log)
            key = id(t)

            def freed():
                self._ids.pop(key, None)
                self.log.append(("free", n))

            weakref.finalize(t, freed)
        return self._ids[id(t)]

    def watch_hparams(self, opt) -> None:
        for _, buf in opt._hparams.values():
            self.ref(buf)


def order_problems(log: list) -> list[str]:
    """Replays ``log`` as a GPU orders it: work on one stream in order, across streams only
    through waits. Returns what a GPU could get wrong: a write into a buffer that a launch on
    another stream may still read, and a buffer freed (its memory handed out again on the
    stream it was first written on) while a launch on another stream, not recorded with
    record_stream, may still read it."""
    problems = []
    done: dict = {}  # stream -> launches ordered before its next work
    reads: dict = {}  # buffer -> [(launch number, stream)]
    home: dict = {}  # buffer -> the stream of its first write (its allocation)
    recorded: dict = {}  # buffer -> streams it was recorded on
    for k, ev in enumerate(log):
        if ev[0] == "launch":
            done.setdefault(ev[1], set()).add(k)
            for b in ev[2]:
                reads.setdefault(b, []).append((k, ev[1]))
        elif ev[0] == "wait":
            done.setdefault(ev[1], set()).update(done.get(ev[2], set()))
        elif ev[0] == "write":
            home.setdefault(ev[2], ev[1])
            for launch, stream in reads.get(ev[2], []):
                if launch not in done.get(ev[1], set()):
                    problems.append(f"event {k}: buffer {ev[2]} written on {ev[1]} while the "
                                    f"launch of event {launch} on {stream} may read it")
        elif ev[0] == "record":
            recorded.setdefault(ev[1], set()).add(ev[2])
        elif ev[0] == "free":
            b = ev[1]
            for launch, stream in reads.get(b, []):
                if stream is not home.get(b) and stream not in recorded.get(b, set()) and (
                        launch not in done.get(home.get(b), set())):
                    problems.append(f"event {k}: buffer {b} freed while the launch of event "
                                    f"{launch} on {stream} may read it (no record_stream)")
    return problems


def meta_memory(monkeypatch) -> None:
    """Meta tensors all sit at address 0: the overlap check would see every pair overlap."""
    monkeypatch.setattr(_validate, "check_overlaps", lambda names, params, locals_: None)


def meta_params(n: int) -> list:
    return [torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(n)]


def fresh_grads(params) -> None:
    for p in params:
        p.grad = torch.empty(3, device="meta")


# ------------------------------------------------------------------------------------------
# uploads on another stream than the launch that read the buffer
# ------------------------------------------------------------------------------------------


def test_an_upload_on_another_stream_waits_for_the_launches_that_read_the_table(monkeypatch):
    streams = StreamLog(monkeypatch)
    params = meta_params(1)
    opt = FusedAdamW(params, lr=1e-3, backend="torch")
    for name in ("a", "a", "b", "c", "b"):  # fresh grads: the table's grad column patched
        streams.use(name)
        fresh_grads(params)
        opt.step()
    launches = [e for e in streams.log if e[0] == "launch"]
    assert len(launches) == 5
    assert order_problems(streams.log) == []
    assert ("wait", streams.stream("b"), streams.stream("a")) in streams.log


def test_hparams_rewritten_on_another_stream_wait_for_the_launches_that_read_them(monkeypatch):
    streams = StreamLog(monkeypatch)
    params = meta_params(1)
    fresh_grads(params)
    lr = torch.tensor(1e-3)  # a Tensor lr: copied into the rows every step
    opt = FusedAdamW([{"params": params}, {"params": meta_params(1), "lr": lr}], lr=1e-3,
                     backend="torch")
    streams.use("a")
    opt.step()
    streams.watch_hparams(opt)
    for name, value in (("b", 2e-3), ("c", 3e-3), ("c", 3e-3), ("a", 4e-3)):
        streams.use(name)
        opt.param_groups[0]["lr"] = value  # a float changed: the rows rewritten in place
        opt.step()
    assert sum(e[0] == "launch" for e in streams.log) == 5
    assert order_problems(streams.log) == []


def test_staged_copies_on_another_stream_wait_for_the_launches_that_read_them(monkeypatch):
    """A param that is not dense (a column slice) steps through a scratch copy, written
    before every launch: on another stream than the last launch, after it; dropped at a
    rebuild, recorded on the streams that read it."""
    streams = StreamLog(monkeypatch)
    params = [torch.nn.Parameter(torch.empty(6, 4, device="meta")[:, :3]), *meta_params(1)]
    for p in params:
        p.grad = torch.empty(p.shape, device="meta")
    opt = FusedAdamW(params, lr=1e-3, backend="torch")
    for name in ("a", "b", "b", "a"):  # the same grads: no rebuild, the scratch rewritten
        streams.use(name)
        opt.step()
    streams.use("c")
    params[1].grad = None  # a rebuild: the scratch dropped
    opt.step()
    gc.collect()
    assert sum(e[0] == "launch" and len(e[2]) > 2 for e in streams.log) == 5
    assert any(e[0] == "free" for e in streams.log)
    assert order_problems(streams.log) == []


def test_a_dropped_table_is_recorded_on_the_streams_that_read_it(monkeypatch):
    streams = StreamLog(monkeypatch)
    params = meta_params(2)
    opt = FusedAdamW(params, lr=1e-3, backend="torch")
    params[0].grad = torch.empty(3, device="meta")
    streams.use("a")
    opt.step()  # the table (1 row) allocated on a
    streams.use("b")
    opt.step()  # the same grads: read on b, no upload
    streams.watch_hparams(opt)
    streams.use("c")
    params[1].grad = torch.empty(3, device="meta")
    opt.step()  # 2 rows: the 1-row table is dropped while b's launch may read it
    opt.add_param_group({"params": meta_params(1)})
    streams.use("d")
    opt.step()  # new tables and hparams: the old ones dropped
    gc.collect()
    frees = [e for e in streams.log if e[0] == "free"]
    assert len(frees) >= 3, streams.log  # the 1-row table, the 2-row table, the hparams
    assert order_problems(streams.log) == []


def test_a_host_buffer_is_never_written_after_its_copy_is_queued(monkeypatch):
    """A non_blocking copy from pinned memory reads it later: the table's host buffer must
    not be rewritten in place while that copy may be pending (the next step patches the grad
    column of a clone). Freeing it is safe: torch's caching host allocator records an event."""
    queued = []
    real_copy = torch.Tensor.copy_

    def copy_(dst, src, non_blocking=False):
        if dst.device.type == "meta" and src.device.type == "cpu":
            queued.append((src, src.clone()))
        return real_copy(dst, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    meta_memory(monkeypatch)
    # Meta tensors have no address: each grad gets its id, so that fresh grads change the
    # table's grad column as they do on a GPU.
    data_ptr = _watch._data_ptr
    monkeypatch.setattr(_watch, "_data_ptr", lambda t: id(t) if t.is_meta else data_ptr(t))
    params = meta_params(3)
    opt = FusedAdamW(params, lr=1e-3, backend="torch")
    for _ in range(4):
        fresh_grads(params)
        opt.step()
    assert len(queued) >= 4
    for k, (host, content) in enumerate(queued):
        assert torch.equal(host, content), f"host buffer of copy {k} rewritten after the copy"


# ------------------------------------------------------------------------------------------
# CUDA graphs: what a capture reads stays allocated and unchanged
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["fresh-grads", "float-lr", "rebuild", "new-group", "load"])
def test_eager_changes_after_a_capture_keep_what_the_graph_reads(monkeypatch, first):
    """After a captured step, eager steps change the table and the rows every way they can
    (``first`` first): the buffers the graph reads stay allocated and are never written."""
    streams = StreamLog(monkeypatch)
    params = meta_params(2)
    opt = FusedAdamW(params, lr=1e-3, backend="torch", capturable=True)
    params[0].grad = torch.empty(3, device="meta")
    opt.step()  # warm-up
    monkeypatch.setattr(opt, "_capturing", lambda: True)
    opt.step()  # "captured"
    monkeypatch.setattr(opt, "_capturing", lambda: False)
    table = next(iter(opt._tables.values()))
    graph_table, graph_hparams = table.packed, table.hparams
    refs = [weakref.ref(graph_table), weakref.ref(graph_hparams)]
    watched = {streams.ref(graph_table), streams.ref(graph_hparams)}
    start = len(streams.log)

    def fresh_grads_():
        params[0].grad = torch.empty(3, device="meta")  # the grad column changes

    def float_lr():
        opt.param_groups[0]["lr"] *= 2  # the rows change

    def rebuild():
        params[1].grad = torch.empty(3, device="meta")  # 2 rows

    changes = {"fresh-grads": fresh_grads_, "float-lr": float_lr, "rebuild": rebuild,
               "new-group": lambda: opt.add_param_group({"params": meta_params(1)}),
               "load": lambda: opt.load_state_dict(opt.state_dict())}
    names = list(changes)
    k = names.index(first)
    for name in names[k:] + names[:k]:
        changes[name]()
        opt.step()
    del table, graph_table, graph_hparams
    gc.collect()
    assert all(r() is not None for r in refs), "a buffer the graph reads was freed"
    written = [e for e in streams.log[start:] if e[0] == "write" and e[2] in watched]
    assert written == [], f"a buffer the graph reads was rewritten: {written}"


# ------------------------------------------------------------------------------------------
# GPU twins
# ------------------------------------------------------------------------------------------


def _cuda_setup(n=3, size=4099):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, device="cuda")) for _ in range(n)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return params, twin


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_steps_on_alternating_streams_match_one_stream(backend):
    params, twin = _cuda_setup()
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    ref = FusedAdamW(twin, lr=1e-2, backend=backend)
    streams = [torch.cuda.Stream() for _ in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for k in range(12):
        grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in params]
        s = streams[k % 2]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if k == 6:
                params[0].grad = None  # a rebuild (a smaller table) on the other stream
            opt.param_groups[0]["lr"] = 1e-2 / (1 + k)  # the hparams rows rewritten
            opt.step()
        torch.cuda.current_stream().wait_stream(s)
        for p, g in zip(twin, grads):
            p.grad = g.clone()
        if k == 6:
            twin[0].grad = None
        ref.param_groups[0]["lr"] = 1e-2 / (1 + k)
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@needs_cuda
def test_a_graph_replays_what_it_captured_after_eager_rebuilds():
    params, twin = _cuda_setup()
    opt = FusedAdamW(params, lr=1e-2, capturable=True, backend="cuda")
    ref = FusedAdamW(twin, lr=1e-2, capturable=True, backend="cuda")
    for p in params + twin:
        p.grad = torch.ones_like(p)  # static grads: what the graph reads
    opt.step()  # warm-up
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    # Eager steps that rebuild the table and reallocate the rows (a new group), then churn
    # the allocator so that freed memory would be handed out again.
    extra = torch.nn.Parameter(torch.randn(77, device="cuda"))
    opt.add_param_group({"params": [extra], "lr": 5e-3})
    extra.grad = torch.ones_like(extra)
    opt.step()
    ref.step()
    junk = [torch.full((4096,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    del junk
    graph.replay()  # the captured step: the old table and rows, three steps in all
    ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        assert torch.equal(p, q), (p - q).abs().max()


def test_a_cuda_scratch_replaced_is_kept_until_the_streams_that_wrote_it_are_done(monkeypatch):
    """The CUDA backend's norm scratch (track_norms) and clip scratch are written by every
    launch on its stream; one that grows with the table is freed, and its memory must not be
    handed out before the work of the other streams that wrote it (record_stream)."""
    import types

    from fused_adamw.backends import cuda as cuda_backend

    streams = StreamLog(monkeypatch)
    meta = torch.device("meta")
    for name in ("norm_scratch", "clip_scratch"):
        table = types.SimpleNamespace()  # the helper reads and sets attributes only
        streams.use("a")
        first = cuda_backend._scratch(table, name, 10, meta)
        streams.use("b")
        assert cuda_backend._scratch(table, name, 10, meta) is first
        old = streams.ref(first)
        streams.use("c")
        bigger = cuda_backend._scratch(table, name, 20, meta)
        assert bigger is not first and bigger.numel() >= 20
        recorded = {e[2].name for e in streams.log if e[0] == "record" and e[1] == old}
        assert recorded == {"a", "b"}, name
        assert getattr(table, name + "_users") == [streams.stream("c")]


# ------------------------------------------------------------------------------------------
# a step tensor shared by two params
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_step_tensor_shared_by_two_params_is_refused_naming_both(backend):
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    for p in params:
        p.grad = torch.randn(5)
    opt.step()
    opt.state[params[2]]["step"] = opt.state[params[0]]["step"]
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    with pytest.raises(RuntimeError, match=r"param 0 of param group 0 and param 2 of param "
                                           r"group 0 share one optimizer state 'step'"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [float(opt.state[p]["step"]) for p in params] == steps
    opt.state[params[2]]["step"] = opt.state[params[0]]["step"].clone()
    opt.step()  # once each its own: steps on
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 2.0, 2.0]


# ------------------------------------------------------------------------------------------
# staleness: what the kernel relies on, not the address alone
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("staged", [False, True], ids=["fast-table", "staged-table"])
@pytest.mark.parametrize("change", ["longer", "shorter", "dtype", "transposed"])
def test_a_param_changed_at_the_same_address_is_not_stepped_stale(backend, staged, change):
    """``p.data = t`` with t at the address of the old data, and its grad likewise (params and
    grads as views of flat buffers; a view stands for the caching allocator placing a new
    tensor where the old one was), the same grad objects every step. The table must see the
    change: a new size or dtype does not match the state (refused, naming the param, as torch
    refuses it), a transposed square param steps as torch steps it."""
    dtype = torch.float16 if change == "dtype" else torch.float32
    pbuf, gbuf = torch.randn(64, dtype=dtype), torch.randn(64, dtype=dtype)
    p = torch.nn.Parameter(pbuf[:16].view(4, 4))
    p.grad = gbuf[:16].view(4, 4)
    params = [p]
    if staged:  # a column slice: staged, so the table is off the fresh-grads path
        params.append(torch.nn.Parameter(torch.randn(6, 4, dtype=dtype)[:, :3]))
        params[1].grad = torch.randn(6, 3, dtype=dtype)
    twin = [torch.nn.Parameter(t.detach().clone()) for t in params]
    for a, b in zip(params, twin):
        b.grad = a.grad.clone()
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    opt.step()
    ref.step()
    view = {"longer": lambda t: t[:36].view(6, 6), "shorter": lambda t: t[:4].view(2, 2),
            "dtype": lambda t: t[:16].view(4, 4).view(torch.bfloat16),
            "transposed": lambda t: t[:16].view(4, 4).t()}[change]
    p.data, p.grad.data = view(pbuf), view(gbuf)
    assert p.data_ptr() == pbuf.data_ptr() and p.grad.data_ptr() == gbuf.data_ptr()
    if change != "transposed":
        before = [t.detach().clone() for t in params]
        with pytest.raises(RuntimeError, match="param 0 of param group 0"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(params, before)), "a param changed"
        return
    twin[0].data, twin[0].grad.data = twin[0].data.t(), twin[0].grad.data.t()
    for _ in range(2):
        opt.step()
        ref.step()
    for a, b in zip(params, twin):
        # 3 steps of fp32 |p| < 5: the fused math rounds in another order than torch's
        # for-loop (a few ulps, 4.8e-7 each at 4); a stale (untransposed) walk is off by ~1e-2.
        assert torch.allclose(a, b, rtol=0, atol=2e-6), (a - b).abs().max()


@pytest.mark.parametrize("python_pass", [False, True], ids=["compiled", "python"])
@pytest.mark.parametrize("change", ["t_", "data_t", "view", "dtype_view"])
def test_a_kept_grad_re_viewed_at_its_address_is_not_stepped_stale(change, python_pass,
                                                                    monkeypatch):
    """The param untouched, its kept grad (zero_grad(set_to_none=False)) re-viewed in place:
    the same object at the same address, another layout. A transposed one steps as torch
    steps it; another shape or dtype is refused before anything changes, as torch refuses it.
    Both change detections: the compiled scan and the Python passes."""
    if python_pass:
        monkeypatch.setattr(_watch, "_SCAN", None)  # as tests/test_host_time.py
    shape = (2, 3) if change == "view" else (3, 3)
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(p.detach().clone())
    opt = FusedAdamW([p], lr=1e-2)
    ref = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    p.grad = torch.randn(shape)
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for x in (p, q):
        if change == "t_":
            x.grad.t_()
        elif change == "data_t":
            x.grad.data = x.grad.data.t()
        elif change == "view":
            x.grad.data = x.grad.data.view(3, 2)
        else:
            x.grad.data = x.grad.data.view(torch.int32)
    if change in ("view", "dtype_view"):
        before = p.detach().clone()
        with pytest.raises(RuntimeError, match="param 0 of param group 0"):
            opt.step()
        assert torch.equal(p, before), "the param changed"
        return
    for _ in range(2):
        opt.step()
        ref.step()
    # 3 steps of fp32 |p| < 5: a few ulps of rounding order; stale (untransposed): ~6e-4.
    assert torch.allclose(p, q, rtol=0, atol=2e-6), (p - q).abs().max()
