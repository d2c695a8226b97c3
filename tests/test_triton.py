"""The Triton backend: against the torch backend, against the header's math, against its text.

On CPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, as CI does) on small sizes
and few steps (the interpreter runs every program of a launch in numpy, one after another);
``TestCuda`` reruns the comparisons on a GPU at larger sizes and more steps.

Every run goes through the public API: ``FusedAdamW(..., backend="triton")`` against
``FusedAdamW(..., backend="torch")`` on copies of the same params, grads and state; the tests
that need the param table read it from ``opt._tables`` ((device, dtype) -> Table).

Units: "ulp" below is one unit in the last place of the storage dtype (fp32: 2**-23 relative,
bf16: 2**-7, fp16: 2**-10) at a stated scale.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, TRITON_INTERPRET, make_params

triton = pytest.importorskip("triton", reason="Triton is not installed")

from fused_adamw import FusedAdamW, _table  # noqa: E402
from fused_adamw.backends import triton_adamw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "kernels" / "adamw_math.cuh"

TRITON = triton_adamw.BACKEND

SIZES = [0, 1, 7, 1023, 1024, 1025, 4097]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.int16: torch.int16}

# Tolerances against the torch backend, in ulp of the storage dtype at the scale of the buffer
# (see assert_ulps and compare). They were set for 20+ steps (TestCuda runs 24 to 30); the
# interpreter tests run 3 to 8 steps to stay fast, where the differences are smaller still
# (measured at the group's scale: 1 ulp in fp32, 0.5 in bf16 and fp16), and keep the same
# bounds, so that a real divergence still fails and rounding noise never does:
# - fp32: 8. The torch backend (reference.py) writes the header's fmaf(a, b, c) as a*b + c,
#   rounding twice. In (1 - b)*g = g - b*g that costs up to half an ulp of b*g, which is
#   b / (1 - b) / 2 ulp of the new term (4.5 for b1 = 0.9); the moments carry those errors with
#   weight (1 - b) and, normalised by the bias correction, stay at a few ulp (measured: 5 for
#   exp_avg, 4.6 for exp_avg_sq, 2 for param over 25 steps).
# - bf16, fp16: 2. Both backends compute in fp32 and round once to storage; an fp32 difference
#   of a few fp32 ulp flips that rounding at most once (1 ulp), and a flip from an earlier step
#   decays by beta but can meet a new one (measured: 1).
TORCH_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}

requires_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRET,
    reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1",
)


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def ulp_at(scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at |scale| (elementwise), never below the smallest normal."""
    s = torch.as_tensor(scale, dtype=torch.float64).abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(s)) - MANTISSA_BITS[dtype])


def assert_ulps(actual, expected, dtype, scale, max_ulps, what):
    """|actual - expected| <= max_ulps ulp at ``scale`` (a float or per-element tensor); NaN
    and inf must sit at the same places. Returns the max distance in ulp."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    assert torch.equal(a_nan, e_nan), (
        f"{what}: NaN at {a_nan.sum()} places vs {e_nan.sum()} expected; first differing "
        f"indices {torch.nonzero(a_nan != e_nan).flatten()[:8].tolist()}")
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    assert torch.equal(a_inf, e_inf) and torch.equal(a[a_inf], e[e_inf]), (
        f"{what}: inf at {a_inf.sum()} places vs {e_inf.sum()} expected")
    finite = ~(a_nan | a_inf)
    if not finite.any():
        return 0.0
    scale = torch.as_tensor(scale, dtype=torch.float64).cpu()
    if scale.dim():
        scale = scale[finite]
    dist = (a[finite] - e[finite]).abs() / ulp_at(scale, dtype)
    worst = dist.max().item()
    bad = torch.nonzero(dist > max_ulps).flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {dist.numel()} elements differ by more than {max_ulps} ulp "
        f"(max {worst:.2f}); first indices {torch.nonzero(finite).flatten()[bad[:8]].tolist()}, "
        f"actual {a[finite][bad[:4]].tolist()}, expected {e[finite][bad[:4]].tolist()}")
    return worst


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN with the same payload)."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grouped(params, groups, group_of):
    """torch-style param groups: param i goes to groups[group_of[i]] (default: group 0)."""
    group_of = group_of or [0] * len(params)
    return [dict(g, params=[p for p, gi in zip(params, group_of) if gi == k])
            for k, g in enumerate(groups)]


def initial_states(params, steps, amsgrad, generator):
    """Mid-training states (torch.optim.AdamW's keys, as a checkpoint holds them): step counts
    as given, moments drawn at the size unit grads give them (so that compare's scales hold:
    m ~ 0.3 g, v ~ g**2). Step 0: no state (the first step creates it)."""
    states = []
    for p, step in zip(params, steps):
        if step == 0:
            states.append({})
            continue
        st = {"step": torch.tensor(float(step)),
              "exp_avg": 0.3 * torch.randn(p.shape, generator=generator),
              "exp_avg_sq": 0.5 + torch.rand(p.shape, generator=generator)}
        if amsgrad:
            st["max_exp_avg_sq"] = st["exp_avg_sq"] * 1.5
        states.append({k: v.to(p.device, p.dtype) if k != "step" else v.to(p.device)
                       for k, v in st.items()})
    return states


def load_states(opt, params, states):
    """Gives each param its own copy of a state (as opt.load_state_dict would)."""
    for p, st in zip(params, states):
        if st:
            opt.state[p] = {k: v.clone() for k, v in st.items()}


BUFFERS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def buffers_of(opt, p) -> dict:
    """A param's tensors by BUFFERS name (those it has)."""
    out = {"param": p.detach()}
    st = opt.state[p]
    out.update((k, st[k]) for k in BUFFERS[1:] if k in st)
    return out


def fresh_grads(params, active, seed):
    """This step's grads: unit normal where active, None elsewhere (same values for the same
    seed whatever the device)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p, a in zip(params, active):
        g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        out.append(g if a else None)
    return out


def run_pair(sizes, dtype, device, groups, group_of, *, n_steps=6, start_steps=None,
             active_at=None, seed=0):
    """Steps the same params and states with the Triton and the torch backend; returns
    ((triton optimizer, its params), (torch optimizer, its params)).

    ``active_at(step, i)`` says whether param i has a grad in that step (default: always).
    """
    gen = torch.Generator().manual_seed(seed)
    params = make_params(sizes, dtype=dtype, device=device)
    twin = clone_params(params)
    amsgrad = any(g.get("amsgrad", False) for g in groups)
    start_steps = start_steps or [0] * len(sizes)
    states = initial_states(params, start_steps, amsgrad, gen)
    a = FusedAdamW(grouped(params, groups, group_of), backend="triton")
    b = FusedAdamW(grouped(twin, groups, group_of), backend="torch")
    load_states(a, params, states)
    load_states(b, twin, states)
    for step in range(n_steps):
        active = [active_at(step, i) if active_at else True for i in range(len(sizes))]
        seed_k = int(torch.randint(0, 2**31, (1,), generator=gen))
        for ps in (params, twin):
            for p, g in zip(ps, fresh_grads(ps, active, seed_k)):
                p.grad = g
        a.step()
        b.step()
    assert a.backend == "triton" and b.backend == "torch"
    return (a, params), (b, twin)


def compare(pair_a, pair_b, what, max_ulps=None):
    """Each buffer of each param of the Triton run against the torch run, at the scale of that
    buffer over the param's group: max |x| for params, max |m| / (1 - b1^step) and max |v| /
    (1 - b2^step) for the moments (the size of the grad terms that went into them), the max
    taken over every param of the group. Step counts must be equal. Returns the worst distance
    in ulp per buffer.

    NOTE on the group: a moment of a param with few elements can be a near-cancelled sum, far
    smaller than the terms whose rounding the torch backend adds (seen: a one-element exp_avg
    of 0.0065 = 0.297 - 0.291 off by 29 ulp of itself, while Triton and the C++ loop agree bit
    for bit), so its own max is no measure of the error; the group's params together (as one
    flat bucket held them in earlier versions) are."""
    (oa, pa), (ob, pb) = pair_a, pair_b
    dtype = pa[0].dtype
    max_ulps = max_ulps if max_ulps is not None else TORCH_ULPS[dtype]
    worst = dict.fromkeys(BUFFERS, 0.0)
    for gi, group in enumerate(oa.param_groups):
        checks, scales = [], dict.fromkeys(BUFFERS, 0.0)
        for p, q in zip(group["params"], ob.param_groups[gi]["params"]):
            i = next(k for k, x in enumerate(pa) if x is p)
            sa, sb = oa.state[p], ob.state[q]
            assert sa.keys() == sb.keys(), f"{what}: param {i} state keys differ"
            if not sa:
                continue
            assert torch.equal(sa["step"], sb["step"]), f"{what}: param {i} steps differ"
            if p.numel() == 0:
                continue
            step = sa["step"].item()
            xs, ys = buffers_of(oa, p), buffers_of(ob, q)
            for name, x in xs.items():
                y = ys[name]
                scale = y.double().abs().max().item()
                if name != "param" and step > 0:
                    beta = group["betas"][0 if name == "exp_avg" else 1]
                    scale /= 1 - beta**step
                scales[name] = max(scales[name], scale)
                checks.append((i, p.numel(), name, x, y))
        for i, n, name, x, y in checks:
            if scales[name] == 0:
                assert torch.equal(x, y), f"{what}: param {i} {name} should be all zeros"
                continue
            worst[name] = max(worst[name], assert_ulps(
                x, y, dtype, scales[name], max_ulps, f"{what}: param {i} (size {n}) {name}"))
    return worst


# Option sets: (id, groups, group_of for SIZES)
OPTIONS = [
    ("default", [dict()], None),
    ("amsgrad", [dict(amsgrad=True)], None),
    ("maximize", [dict(maximize=True)], None),
    ("no_decay", [dict(weight_decay=0.0)], None),
    ("groups", [dict(amsgrad=True, maximize=True, lr=3e-3),
                dict(weight_decay=0.0, lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
                dict(weight_decay=0.1, betas=(0.95, 0.98))],
     [0, 1, 2, 0, 1, 2, 0]),
]


# ------------------------------------------------------------------------------------------
# CPU (interpreter) tests
# ------------------------------------------------------------------------------------------


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_matches_torch_backend(options, dtype):
    _, groups, group_of = options
    a, b = run_pair(SIZES, dtype, "cpu", groups, group_of, n_steps=6)
    compare(a, b, f"{options[0]}-{dtype}")


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_torch_backend_mixed_steps_and_none_grads(dtype):
    """Params at different steps, some skipping steps (grad None): each param's own step count
    reaches the kernel, and only the params with a grad are in the table."""
    groups = [dict(amsgrad=True), dict(maximize=True, weight_decay=0.0, betas=(0.8, 0.99))]
    group_of = [0, 1, 0, 1, 0, 1, 0]
    start = [0, 3, 1000, 0, 17, 5, 2]
    n_steps = 8

    def active_at(step, i):
        return (step + i) % 3 != 0  # every param skips every third step, out of phase

    a, b = run_pair(SIZES, dtype, "cpu", groups, group_of, n_steps=n_steps, start_steps=start,
                    active_at=active_at)
    (oa, pa) = a
    steps = [oa.state[p]["step"].item() for p in pa]
    assert steps == [s + sum(active_at(k, i) for k in range(n_steps))
                     for i, s in enumerate(start)]
    assert len(set(steps)) >= 5  # steps differ
    (table,) = oa._tables.values()
    assert table.n_rows == sum(active_at(n_steps - 1, i) for i in range(len(SIZES)))
    compare(a, b, f"mixed-{dtype}")


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_backend_multi_tile(dtype):
    """16385 and 20000 elements: two tiles each, the second one partial (1 and 3616 elements),
    beside a one-tile param."""
    groups = [dict(amsgrad=True)]
    a, b = run_pair([16385, 20000, 5], dtype, "cpu", groups, None, n_steps=3)
    (table,) = a[0]._tables.values()
    assert table.n_tiles == 5
    compare(a, b, f"multi-tile-{dtype}")


def carve(buf, sizes, at, gap):
    """Views of ``buf`` of the given sizes, the first at element ``at``, ``gap`` elements
    between neighbours."""
    out, pos = [], at
    for n in sizes:
        out.append(buf[pos:pos + n])
        pos += n + gap
    return out


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_params_and_grads_at_odd_offsets(dtype):
    """Params carved out of one buffer at element offsets 3, then with 2 elements between
    neighbours (16-byte phases 3, 1, 2 in fp32 and 3, 5, 6 in 16-bit), grads out of another
    buffer at other offsets: updated in place (no staging), the same as plain params, and
    the elements between them never written. A param of exactly TILE_ELEMS elements at phase
    3 spans two tiles."""
    sizes = [_table.TILE_ELEMS, 7, 1025]
    total = 3 + sum(sizes) + 2 * len(sizes)
    sentinel = 1234.0
    buf = torch.full((total,), sentinel, dtype=dtype)
    gbuf = torch.full((total,), sentinel, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    params = []
    for v in carve(buf, sizes, at=3, gap=2):
        v.copy_(torch.randn(v.shape, generator=gen))
        p = torch.nn.Parameter(torch.empty(0, dtype=dtype))
        p.data = v
        params.append(p)
    grads = carve(gbuf, sizes, at=1, gap=1)
    twin = clone_params(params)
    groups = [dict(amsgrad=True), dict(maximize=True)]
    group_of = [0, 1, 0]
    oa = FusedAdamW(grouped(params, groups, group_of), backend="triton")
    ob = FusedAdamW(grouped(twin, groups, group_of), backend="torch")
    between = torch.ones(total, dtype=torch.bool)
    for v in carve(between, sizes, at=3, gap=2):
        v.fill_(False)
    gbetween = torch.ones(total, dtype=torch.bool)
    for v in carve(gbetween, sizes, at=1, gap=1):
        v.fill_(False)
    for k in range(3):
        gen = torch.Generator().manual_seed(10 + k)
        for p, q, g in zip(params, twin, grads):
            g.copy_(torch.randn(g.shape, generator=gen))
            p.grad = g
            q.grad = g.clone()
        gcopy = gbuf.clone()
        oa.step()
        ob.step()
        assert same_bits(gbuf, gcopy), "the grads were written"
    itemsize = buf.element_size()
    (table,) = oa._tables.values()
    phases = [(p.data_ptr() % 16) // itemsize for p in params]
    assert phases[0] == 3 and all(ph != 0 for ph in phases), phases
    assert sorted(r.param.data_ptr() for r in table.rows) == sorted(p.data_ptr() for p in params)
    assert not table.stage_in and not table.stage_out, "odd offsets must not be staged"
    assert table.n_tiles == 4  # 2 for TILE_ELEMS elements at phase 3, 1 each for the others
    assert [p.data_ptr() for p in params] == [v.data_ptr() for v in carve(buf, sizes, 3, 2)]
    assert (buf[between] == sentinel).all(), "elements between the params were written"
    assert (gbuf[gbetween] == sentinel).all()
    compare((oa, params), (ob, twin), f"odd-offsets-{dtype}")


ON_GRID_CASES = [(torch.float32, None, None), (torch.float32, torch.bfloat16, None),
                 (torch.bfloat16, torch.float32, "fp32"), (torch.bfloat16, None, "remainder"),
                 (torch.float16, torch.float32, "kahan"), (torch.bfloat16, None, "stochastic")]


@requires_interpreter
@pytest.mark.parametrize("dtype,state_dtype,mode", ON_GRID_CASES,
                         ids=[f"{DTYPE_IDS[DTYPES.index(d)]}-{s}-{m}"
                              for d, s, m in ON_GRID_CASES])
def test_grid_body_and_edges_at_odd_phases_match_the_cpu_loop(dtype, state_dtype, mode):
    """The kernel walks each tile as a masked head, whole unmasked blocks on the param's
    16-byte grid (the body the compiled kernel reads 128 bits at a time) and a masked tail,
    or as masked blocks only when a buffer is off the grid. Params at 16-byte phases 3, 1, 3
    (fp32) or 3, 1, 7 (16-bit), one of two tiles, with grads at their param's phase (on the
    grid: head, body, tail) and one grad at another phase (edges only); every mode buffer
    and moment at the param's phase, as the table allocates them. Bit for bit with the cpu
    backend (the C++ loop over the header), amsgrad, weight decay and GradScaler (a skipped
    step) included."""
    from fused_adamw import _ext

    if _ext.unavailable_reason() is not None:
        pytest.skip(f"needs the cpu backend: {_ext.unavailable_reason()}")
    sizes = [2500, _table.TILE_ELEMS + 700, 300]
    total = 3 + sum(sizes) + 2 * len(sizes) + 1

    def train(backend):
        gen = torch.Generator().manual_seed(4)
        buf = torch.randn(total, generator=gen).to(dtype)
        gbuf = torch.zeros(total, dtype=dtype)
        params = []
        for v in carve(buf, sizes, at=3, gap=2):
            p = torch.nn.Parameter(torch.empty(0, dtype=dtype))
            p.data = v
            params.append(p)
        *grads, last = carve(gbuf, sizes, at=3, gap=2)  # the last one moved by one element
        grads.append(gbuf[last.storage_offset() + 1:][:sizes[2]])
        torch.manual_seed(7)  # the stochastic seed
        opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=backend,
                         master_weights=mode, state_dtype=state_dtype)
        for i in range(5):
            for p, g in zip(params, grads):
                g.copy_(torch.randn(g.shape, generator=gen) * (8 if i >= 2 else 1))
                p.grad = g
            if i >= 2:  # GradScaler's sync-free path; step 3 is skipped
                opt.grad_scale = torch.tensor(8.0)
                opt.found_inf = torch.tensor(1.0 if i == 3 else 0.0)
            opt.step()
        (table,) = opt._tables.values()
        return params, grads, table, [buf.clone(), gbuf.clone()] + _state_tensors(opt, params)

    params, grads, table, a = train("cpu")
    *_, b = train("triton")
    size = params[0].element_size()
    phases = [(p.data_ptr() % 16) // size for p in params]
    assert phases == ([3, 1, 3] if size == 4 else [3, 1, 7]), phases
    grad_phases = [(g.data_ptr() % 16) // size for g in grads]
    assert grad_phases[:2] == phases[:2] and grad_phases[2] != phases[2]
    assert not table.stage_in and table.n_tiles == 4
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert same_bits(x, y), f"tensor {i} differs"


def _state_tensors(opt, params):
    return [v.clone() for p in params for _, v in sorted(opt.state[p].items())
            if isinstance(v, torch.Tensor)]


def check_none_grads_untouched(dtype, device):
    """A param whose grad is None is not read or written, even with NaN in its param and
    state (a read would spread them), in a group with amsgrad or without; its step does not
    advance. A max_exp_avg_sq in the state of a group without amsgrad (torch ignores it) is
    neither read nor written either, while the rest of that param steps (lr 0.05 there: the
    update of a 33-element param must show in bf16, whose ulp at 1 is 0.008)."""
    groups = [dict(amsgrad=True), dict(maximize=True, lr=0.05)]
    group_of = [0, 1, 0, 1]
    params = make_params([1025, 7, 4097, 33], dtype=dtype, device=device)
    opt = FusedAdamW(grouped(params, groups, group_of), backend="triton")
    states = initial_states(params, [0, 4, 9, 2], True, torch.Generator().manual_seed(1))
    load_states(opt, params, states)
    for p, g in zip(params, fresh_grads(params, [True] * 4, 2)):
        p.grad = g
    opt.step()  # every param has a row
    assert "max_exp_avg_sq" in opt.state[params[3]]  # given, unused (group 1 has no amsgrad)
    for i in (1, 2):  # one param of each group loses its grad and is poisoned
        params[i].grad = None
        for t in buffers_of(opt, params[i]).values():
            t.fill_(float("nan"))
    opt.state[params[3]]["max_exp_avg_sq"].fill_(float("nan"))
    for i in (0, 3):
        params[i].grad = fresh_grads(params[i:i + 1], [True], 3 + i)[0]
    before = [{k: t.clone() for k, t in buffers_of(opt, p).items()} for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    opt.step()
    for i in (1, 2):
        now = buffers_of(opt, params[i])
        assert now.keys() == before[i].keys()
        for name, t in now.items():
            assert same_bits(t, before[i][name]), f"{name} of param {i} (no grad) changed"
        assert torch.equal(opt.state[params[i]]["step"], steps[i]), f"step of param {i} moved"
    for i in (0, 3):
        assert opt.state[params[i]]["step"].item() == steps[i].item() + 1
        for name, t in buffers_of(opt, params[i]).items():
            if i == 3 and name == "max_exp_avg_sq":
                assert same_bits(t, before[i][name]), "max_exp_avg_sq of a non-amsgrad group"
                continue
            assert not torch.equal(t, before[i][name]), f"{name} of param {i} is stale"
            assert torch.isfinite(t).all(), f"{name} of param {i}"


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_none_grads_untouched(dtype):
    check_none_grads_untouched(dtype, "cpu")


# ---------------------------------------------------------------- the header's math, in float64


def f32(x: torch.Tensor) -> torch.Tensor:
    """Rounds float64 values to float32 and back: one fp32 rounding."""
    return x.to(torch.float32).to(torch.float64)


def fmaf(a, b, c):
    """fmaf on fp32 values held in float64: a*b is exact there (24 + 24 < 53 bits), so this is
    the single-rounding fma except when a*b + c rounded to float64 lands on an fp32 tie
    (double rounding, probability ~2**-29 per call)."""
    return f32(a * b + c)


def header_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hp, step):
    """kernels/adamw_math.cuh evaluated in float64 with an fp32 rounding after every
    operation (+, -, *, /, sqrt of fp32 values rounded once from float64 are the correctly
    rounded fp32 results: 53 >= 2 * 24 + 2)."""
    lr, beta1, beta2, eps, wd, max_lr = (f32(torch.tensor(float(hp[c]), dtype=torch.float64))
                                         for c in (_table.HP_LR, _table.HP_BETA1,
                                                   _table.HP_BETA2, _table.HP_EPS,
                                                   _table.HP_WEIGHT_DECAY, _table.HP_MAX_LR))
    maximize, amsgrad = bool(hp[_table.HP_MAXIMIZE]), bool(hp[_table.HP_AMSGRAD])
    decay = f32(f32(lr / max_lr) * wd) if max_lr.item() != 0.0 else f32(lr * wd)
    l2 = bool(hp[_table.HP_DECAY_MODE]) and wd.item() != 0.0
    step = float(step)
    bias_correction1 = f32(1.0 - f32(torch.tensor(beta1.item() ** step, dtype=torch.float64)))
    bias_correction2_sqrt = f32(torch.sqrt(f32(1.0 - f32(torch.tensor(
        beta2.item() ** step, dtype=torch.float64)))))
    if maximize:
        grad = -grad
    if l2:
        grad = fmaf(param, wd, grad)
    elif wd.item() != 0.0:
        param = fmaf(-decay, param, param)
    exp_avg = fmaf(beta1, exp_avg, fmaf(-beta1, grad, grad))
    grad_sq = f32(grad * grad)
    exp_avg_sq = fmaf(beta2, exp_avg_sq, fmaf(-beta2, grad_sq, grad_sq))
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = torch.where(max_exp_avg_sq < exp_avg_sq, exp_avg_sq, max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = f32(f32(f32(torch.sqrt(second_moment)) / bias_correction2_sqrt) + eps)
    param = f32(param - f32(f32(f32(lr / bias_correction1) * exp_avg) / denom))
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def interpreter_fma_is_single_rounding() -> bool:
    """Whether this Triton's interpreter rounds tl.fma once (triton PRs #11424 and #11641;
    older interpreters computed x * y + z in fp32)."""
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -(x * x)))

    x = torch.tensor([1.4142135], dtype=torch.float32)
    out = torch.empty(1)
    probe[(1,)](x, out)
    return out.item() != 0.0


def check_header_math(dtype, device):
    """One step from random mid-training states, every option, elementwise against
    header_step. Returns the worst distance in ulp."""
    groups = [dict(), dict(amsgrad=True, maximize=True, lr=1e-2),
              dict(weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6),
              dict(weight_decay=0.3, lr=0.05, betas=(0.5, 0.9), amsgrad=True)]
    sizes = [1025, 4097, 1023, 2048, 7]
    group_of = [0, 1, 2, 3, 1]
    start = [0, 1, 9, 999, 123456]
    gen = torch.Generator().manual_seed(3)
    params = make_params(sizes, dtype=dtype, device=device)
    states = initial_states(params, start, True, gen)
    opt = FusedAdamW(grouped(params, groups, group_of), backend="triton")
    load_states(opt, params, states)
    for p in params:
        p.grad = (0.3 * torch.randn(p.shape, generator=gen)).to(device, dtype)
    before = [{n: t.double().cpu() for n, t in buffers_of(opt, p).items()} for p in params]
    opt.step()
    (table,) = opt._tables.values()
    worst = 0.0
    for i, p in enumerate(params):
        hp = table.host_hparams[group_of[i]]
        zeros = torch.zeros(p.shape, dtype=torch.float64)
        b = {n: before[i].get(n, zeros) for n in BUFFERS}  # start 0: the state starts at 0
        step = opt.state[p]["step"].item()
        assert step == start[i] + 1
        expected = header_step(b["param"], p.grad.double().cpu(), b["exp_avg"],
                               b["exp_avg_sq"], b["max_exp_avg_sq"], hp, step)
        now = buffers_of(opt, p)
        for name, e in zip(BUFFERS, expected):
            if name not in now:
                continue
            if name == "max_exp_avg_sq" and not hp[_table.HP_AMSGRAD]:
                e = b[name]  # untouched for non-amsgrad groups
            e = e.to(dtype)  # the kernel's one rounding to storage (RNE, as torch)
            actual = now[name]
            # 1 ulp (elementwise): the only non-exact step in header_step is the rare double
            # rounding of fmaf (see there); everything else is bit for bit. bias corrections
            # come from powf, which the interpreter (and glibc) round correctly but CUDA's
            # libdevice powf only to within a couple of ulp: through 1 - beta2^step that moves
            # param by a fraction of an ulp, hence 2 on a GPU.
            tol = 2 if (device != "cpu" and name == "param") else 1
            d = assert_ulps(actual, e, dtype, torch.maximum(actual.double().abs().cpu(),
                                                            e.double().abs()), tol,
                            f"header math {dtype} param {i} (group {group_of[i]}) {name}")
            worst = max(worst, d)
            if device == "cpu":
                exact = (actual.double().cpu() == e.double()).float().mean().item()
                assert exact >= 0.999, f"{name} of param {i}: only {exact:.4%} bit-exact"
    return worst


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_math_matches_header(dtype):
    if not interpreter_fma_is_single_rounding():
        pytest.skip("this Triton's interpreter rounds tl.fma twice (fixed by triton PRs "
                    "#11424 and #11641); the header test needs a true fma")
    check_header_math(dtype, "cpu")


# ---------------------------------------------------------------- the header's text


def _header_update_body() -> str:
    text = HEADER.read_text()
    text = re.sub(r"//[^\n]*", "", text)
    start = text.index("void adamw_update(")
    body_start = text.index("{", start)
    depth, i = 0, body_start
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[body_start + 1:i]
        i += 1


def _triton_update_function() -> ast.FunctionDef:
    tree = ast.parse(Path(triton_adamw.__file__).read_text())
    return next(n for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name == "adamw_update")


class _InOrder(ast.NodeVisitor):
    """Assigned names and called functions (last attribute) of a function body, in order."""

    def __init__(self):
        self.assigned, self.calls = [], []

    def visit_Assign(self, node):
        self.visit(node.value)  # the right-hand side is evaluated first
        for t in node.targets:
            self.assigned += [e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                              if isinstance(e, ast.Name)]

    def visit_Call(self, node):
        self.generic_visit(node)  # arguments (inner calls) first, as C++ evaluates them
        f = node.func
        self.calls.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "?"))


def test_triton_update_mirrors_header_text():
    """The Triton helper assigns the header's locals in the header's order, with the same
    fmas and sqrt, and spells every division and sqrt the IEEE way (a bare `/` or tl.sqrt
    would compile to approximate instructions on NVIDIA GPUs)."""
    body = _header_update_body()
    header_assigned = re.findall(r"(?:\bfloat\s+)?\b(\w+)\s*=(?!=)", body)
    header_calls = re.findall(r"\b(fmaf|sqrtf|powf)\s*\(", body)
    header_divs = body.count("/")

    fn = _triton_update_function()
    seen = _InOrder()
    for stmt in fn.body:
        seen.visit(stmt)
    assert seen.assigned == header_assigned, (seen.assigned, header_assigned)
    triton_calls = [{"fma": "fmaf", "sqrt_rn": "sqrtf"}.get(c) for c in seen.calls]
    assert [c for c in triton_calls if c] == [c for c in header_calls if c != "powf"]
    assert seen.calls.count("div_rn") == header_divs
    bare = [n for n in ast.walk(fn) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)]
    assert not bare, f"bare division at line {bare[0].lineno}: use tl.div_rn"
    assert "sqrt" not in seen.calls, "tl.sqrt is approximate on GPUs: use tl.sqrt_rn"
    assert "adamw_math.cuh" in ast.get_source_segment(
        Path(triton_adamw.__file__).read_text(), fn), "name the header at the amsgrad max"
    # The regex works: it finds the header's first assignment and its named locals.
    assert header_assigned[0] == "grad" and {"param", "exp_avg", "grad_sq", "denom"} <= set(
        header_assigned), header_assigned


# ---------------------------------------------------------------- availability


def test_unavailable_reason(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert TRITON.unavailable_reason(cuda, torch.float32) is None
    assert TRITON.unavailable_reason(cuda, torch.bfloat16) is None
    assert "float64 uses the torch backend" in TRITON.unavailable_reason(cuda, torch.float64)
    monkeypatch.setattr(triton_adamw, "_INTERPRET", True)  # read from the env at import
    assert TRITON.unavailable_reason(cpu, torch.float16) is None
    monkeypatch.setattr(triton_adamw, "_INTERPRET", False)
    assert "TRITON_INTERPRET=1" in TRITON.unavailable_reason(cpu, torch.float32)
    assert TRITON.unavailable_reason(torch.device("mps"), torch.float32) is not None


def test_import_without_triton_names_the_extra(monkeypatch):
    """Without triton the module's import fails with the install hint, which is what
    _dispatch shows as the reason (it catches the ImportError)."""
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    name = "fused_adamw.backends._triton_adamw_without_triton"
    spec = importlib.util.spec_from_file_location(name, triton_adamw.__file__)
    with pytest.raises(ImportError, match=r'pip install "fused-adamw\[triton\]"'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------

GPU_SIZES = [0, 1, 7, 1023, 1024, 1025, 4097, 278011, (1 << 20) + 3, (512, 1027)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("options", OPTIONS, ids=[o[0] for o in OPTIONS])
    def test_matches_torch_backend(self, options, dtype):
        _, groups, group_of = options
        group_of = [i % len(groups) for i in range(len(GPU_SIZES))]
        a, b = run_pair(GPU_SIZES, dtype, "cuda", groups, group_of, n_steps=30)
        compare(a, b, f"cuda-{options[0]}-{dtype}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_mixed_steps_and_none_grads(self, dtype):
        groups = [dict(amsgrad=True), dict(maximize=True, weight_decay=0.0)]
        group_of = [i % 2 for i in range(len(GPU_SIZES))]
        start = [(7 * i) % 11 for i in range(len(GPU_SIZES))]
        a, b = run_pair(GPU_SIZES, dtype, "cuda", groups, group_of, n_steps=24,
                        start_steps=start, active_at=lambda s, i: (s + i) % 4 != 0)
        compare(a, b, f"cuda-mixed-{dtype}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_math_matches_header(self, dtype):
        check_header_math(dtype, "cuda")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_none_grads_untouched(self, dtype):
        check_none_grads_untouched(dtype, "cuda")

    @pytest.mark.slow
    def test_buffer_past_2_pow_31(self):
        """Offsets past 2**31 elements: int64 program ids and offsets. One fp16 param of
        2**31 + 4099 elements (about 4.3 GB per tensor, 22 GB in all); its last elements are
        checked against the torch backend run on a copy of them."""
        n = (1 << 31) + 4099
        dtype = torch.float16
        (p,) = make_params([n], dtype=dtype, device="cuda")
        p.grad = torch.randn(n, dtype=dtype, device="cuda")
        tail = slice(n - 8192, n)
        small = torch.nn.Parameter(p.detach()[tail].clone())
        small.grad = p.grad[tail].clone()
        big_opt = FusedAdamW([p], amsgrad=True, backend="triton")
        small_opt = FusedAdamW([small], amsgrad=True, backend="torch")
        big_opt.step()
        small_opt.step()
        x, y = buffers_of(big_opt, p), buffers_of(small_opt, small)
        for name in BUFFERS:
            assert_ulps(x[name][tail], y[name], dtype, y[name].double().abs().max().item(),
                        TORCH_ULPS[dtype], f"2**31 tail {name}")
        torch.cuda.synchronize()
