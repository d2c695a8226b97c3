"""The Triton backend: against the torch backend, against the header's math, against its text.

On CPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, as CI does) on small sizes;
``TestCuda`` reruns the comparisons on a GPU at larger sizes.

Units: "ulp" below is one unit in the last place of the storage dtype (fp32: 2**-23 relative,
bf16: 2**-7, fp16: 2**-10) at a stated scale.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, TRITON_INTERPRET, make_bucket, make_params

triton = pytest.importorskip("triton", reason="Triton is not installed")

from fused_adamw import _flat  # noqa: E402
from fused_adamw.backends import torch as torch_backend  # noqa: E402
from fused_adamw.backends import triton_adamw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "kernels" / "adamw_math.cuh"

TRITON = triton_adamw.BACKEND
TORCH = torch_backend.BACKEND

SIZES = [0, 1, 7, 1023, 1024, 1025, 4097]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}

# Tolerances against the torch backend after 20+ steps, in ulp of the storage dtype at the
# scale of the buffer (see assert_ulps):
# - fp32: 8. The torch backend (reference.py) writes the header's fmaf(a, b, c) as a*b + c,
#   rounding twice. In (1 - b)*g = g - b*g that costs up to half an ulp of b*g, which is
#   b / (1 - b) / 2 ulp of the new term (4.5 for b1 = 0.9); the moments carry those errors with
#   weight (1 - b) and, normalised by the bias correction, stay at a few ulp (measured: 5 for
#   exp_avg, 4.6 for exp_avg_sq, 2 for param over 25 steps).
# - bf16, fp16: 2. Both backends compute in fp32 and round once to storage; an fp32 difference
#   of a few fp32 ulp flips that rounding at most once (1 ulp), and a flip from an earlier step
#   decays by beta but can meet a new one (measured: 1).
TORCH_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}

requires_triton_here = pytest.mark.skipif(
    not TRITON_INTERPRET and not HAS_CUDA,
    reason="Triton needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors",
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


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def initial_states(params, steps, amsgrad, generator):
    """Mid-training states: step counts as given, moments drawn at the size unit grads give
    them (so that compare_buckets' scales hold: m ~ 0.3 g, v ~ g**2)."""
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
        states.append({k: v.to(p.device, p.dtype) if k != "step" else v for k, v in st.items()})
    return states


def set_active(bucket, active: list[bool]):
    """Marks params active/inactive for this step and advances the active ones' steps."""
    flags = torch.tensor(active, dtype=torch.uint8)
    bucket.active.copy_(flags.to(bucket.device))
    bucket.host_active = None if all(active) else list(active)
    bucket.steps.add_(flags.to(bucket.device, torch.float32))
    bucket.host_steps = [s + a for s, a in zip(bucket.host_steps, active)]
    bucket.torch_runs = None  # the torch backend replans when the run structure changes


def fill_grads(bucket, generator, scale=1.0):
    for v in bucket.grad_views:
        v.copy_((scale * torch.randn(v.shape, generator=generator)).to(v.device, v.dtype))


BUFFERS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def run_pair(sizes, dtype, device, groups, group_of, *, n_steps=20, start_steps=None,
             active_at=None, seed=0):
    """Steps the same bucket with the Triton and the torch backend; returns both buckets.

    ``active_at(step, i)`` says whether param i has a grad in that step (default: always).
    """
    gen = torch.Generator().manual_seed(seed)
    params = make_params(sizes, dtype=dtype, device=device)
    twin = clone_params(params)
    amsgrad = any(g.get("amsgrad", False) for g in groups)
    start_steps = start_steps or [0] * len(sizes)
    states = initial_states(params, start_steps, amsgrad, gen)
    a = make_bucket(params, groups, group_of, states=states)
    b = make_bucket(twin, groups, group_of, states=[dict(s) for s in states])
    for step in range(n_steps):
        active = [active_at(step, i) if active_at else True for i in range(len(sizes))]
        seed_k = int(torch.randint(0, 2**31, (1,), generator=gen))
        for bucket in (a, b):
            set_active(bucket, active)
            fill_grads(bucket, torch.Generator().manual_seed(seed_k))
        TRITON.step(a)
        TORCH.step(b)
    return a, b


def compare_buckets(a, b, groups, what, max_ulps=None):
    """Each buffer of each param of ``a`` against ``b``, at the scale of that buffer: max |x|
    for params, max |m| / (1 - b1^step) and max |v| / (1 - b2^step) for the moments (the size
    of the grad terms that went into them). Returns the worst distance in ulp per buffer."""
    dtype = a.dtype
    max_ulps = max_ulps if max_ulps is not None else TORCH_ULPS[dtype]
    worst = dict.fromkeys(BUFFERS, 0.0)
    for i, seg in enumerate(a.segments):
        if seg.padded == 0:
            continue
        g = {**dict(betas=(0.9, 0.999)), **groups[a.groups[i]]}
        step = a.host_steps[i]
        sl = slice(seg.offset, seg.offset + seg.padded)  # padding included: it must stay 0
        for name in BUFFERS:
            x, y = getattr(a, name), getattr(b, name)
            if x is None:
                continue
            x, y = x[sl], y[sl]
            scale = y.double().abs().max().item()
            if name != "param" and step > 0:
                beta = g["betas"][0 if name == "exp_avg" else 1]
                scale /= 1 - beta**step
            if scale == 0:
                assert torch.equal(x, y), f"{what}: param {i} {name} should be all zeros"
                continue
            worst[name] = max(worst[name], assert_ulps(
                x, y, dtype, scale, max_ulps, f"{what}: param {i} (size {seg.numel}) {name}"))
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


@requires_triton_here
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_matches_torch_backend(options, dtype):
    _, groups, group_of = options
    a, b = run_pair(SIZES, dtype, "cpu", groups, group_of, n_steps=20)
    compare_buckets(a, b, groups, f"{options[0]}-{dtype}")


@requires_triton_here
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_torch_backend_mixed_steps_and_inactive(dtype):
    """Params at different steps, some skipping steps (no grad): the per-param step and the
    active flag reach the kernel."""
    groups = [dict(amsgrad=True), dict(maximize=True, weight_decay=0.0, betas=(0.8, 0.99))]
    group_of = [0, 1, 0, 1, 0, 1, 0]
    start = [0, 3, 1000, 0, 17, 5, 2]

    def active_at(step, i):
        return (step + i) % 3 != 0  # every param skips every third step, out of phase

    a, b = run_pair(SIZES, dtype, "cpu", groups, group_of, n_steps=21, start_steps=start,
                    active_at=active_at)
    assert a.steps.tolist() == a.host_steps and len(set(a.host_steps)) >= 5  # steps differ
    compare_buckets(a, b, groups, f"mixed-{dtype}")


@requires_triton_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_backend_multi_tile(dtype):
    """278011 elements: 17 tiles of one param, the last one partial."""
    groups = [dict(amsgrad=True)]
    a, b = run_pair([278011, 5], dtype, "cpu", groups, None, n_steps=4)
    assert a.n_tiles == 18
    compare_buckets(a, b, groups, f"278011-{dtype}")


def check_inactive_untouched(dtype, device):
    """An inactive param's buffers stay bit for bit, even with NaN grads and amsgrad."""
    groups = [dict(amsgrad=True), dict(maximize=True)]
    params = make_params([1025, 7, 4097], dtype=dtype, device=device)
    states = initial_states(params, [0, 4, 9], True, torch.Generator().manual_seed(1))
    bucket = make_bucket(params, groups, [0, 1, 0], states=states)
    fill_grads(bucket, torch.Generator().manual_seed(2))
    bucket.grad_views[1].fill_(float("nan"))
    bucket.grad_views[2].fill_(float("nan"))
    before = {n: getattr(bucket, n).clone() for n in BUFFERS}
    set_active(bucket, [True, False, False])
    TRITON.step(bucket)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for name in BUFFERS:
        now = getattr(bucket, name)
        for i in (1, 2):
            s = bucket.segments[i]
            sl = slice(s.offset, s.offset + s.padded)
            assert torch.equal(now[sl].view(bits), before[name][sl].view(bits)), (
                f"{name} of inactive param {i} changed")
        s = bucket.segments[0]
        sl = slice(s.offset, s.offset + s.numel)
        assert not torch.equal(now[sl], before[name][sl]), f"{name} of the active param is stale"
    assert torch.isfinite(bucket.param).all()


@requires_triton_here
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inactive_param_untouched(dtype):
    check_inactive_untouched(dtype, "cpu")


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
    lr, beta1, beta2, eps, wd = (f32(torch.tensor(float(hp[c]), dtype=torch.float64))
                                 for c in range(5))
    maximize, amsgrad = bool(hp[_flat.HP_MAXIMIZE]), bool(hp[_flat.HP_AMSGRAD])
    step = float(step)
    bias_correction1 = f32(1.0 - f32(torch.tensor(beta1.item() ** step, dtype=torch.float64)))
    bias_correction2_sqrt = f32(torch.sqrt(f32(1.0 - f32(torch.tensor(
        beta2.item() ** step, dtype=torch.float64)))))
    if maximize:
        grad = -grad
    if wd.item() != 0.0:
        param = fmaf(-f32(lr * wd), param, param)
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
    bucket = make_bucket(params, groups, group_of, states=states)
    fill_grads(bucket, gen, scale=0.3)
    before = {n: getattr(bucket, n).double().cpu() for n in BUFFERS}
    grad = bucket.grad.double().cpu()
    set_active(bucket, [True] * len(sizes))
    TRITON.step(bucket)
    worst = 0.0
    for i, seg in enumerate(bucket.segments):
        sl = slice(seg.offset, seg.offset + seg.numel)
        hp = bucket.host_hparams[group_of[i]]
        expected = header_step(*(before[n][sl] for n in BUFFERS[:1]), grad[sl],
                               *(before[n][sl] for n in BUFFERS[1:]), hp, bucket.host_steps[i])
        for name, e in zip(BUFFERS, expected):
            if name == "max_exp_avg_sq" and not hp[_flat.HP_AMSGRAD]:
                e = before[name][sl]  # untouched for non-amsgrad groups
            e = e.to(dtype)  # the kernel's one rounding to storage (RNE, as torch)
            actual = getattr(bucket, name)[sl]
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
                exact = (actual.double() == e.double()).float().mean().item()
                assert exact >= 0.999, f"{name} of param {i}: only {exact:.4%} bit-exact"
    return worst


@requires_triton_here
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
    assert header_assigned[:4] == ["grad", "param", "exp_avg", "grad_sq"]  # the regex works


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
        compare_buckets(a, b, groups, f"cuda-{options[0]}-{dtype}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_mixed_steps_and_inactive(self, dtype):
        groups = [dict(amsgrad=True), dict(maximize=True, weight_decay=0.0)]
        group_of = [i % 2 for i in range(len(GPU_SIZES))]
        start = [(7 * i) % 11 for i in range(len(GPU_SIZES))]
        a, b = run_pair(GPU_SIZES, dtype, "cuda", groups, group_of, n_steps=24,
                        start_steps=start, active_at=lambda s, i: (s + i) % 4 != 0)
        compare_buckets(a, b, groups, f"cuda-mixed-{dtype}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_math_matches_header(self, dtype):
        check_header_math(dtype, "cuda")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_inactive_param_untouched(self, dtype):
        check_inactive_untouched(dtype, "cuda")

    @pytest.mark.slow
    def test_buffer_past_2_pow_31(self):
        """Offsets past 2**31 elements: int64 program ids and offsets. One fp16 param of
        2**31 + 4099 elements (about 4.3 GB per buffer, 22 GB in all); its last elements are
        checked against the torch backend run on a copy of them."""
        n = (1 << 31) + 4099
        dtype = torch.float16
        (p,) = make_params([n], dtype=dtype, device="cuda")
        bucket = make_bucket([p], [dict(amsgrad=True)])
        fill_grads(bucket, torch.Generator().manual_seed(0))
        tail = slice(n - 8192, n)
        small = make_bucket([torch.nn.Parameter(bucket.param[tail].clone())], [dict(amsgrad=True)])
        small.grad.copy_(bucket.grad[tail])
        set_active(bucket, [True])
        set_active(small, [True])
        TRITON.step(bucket)
        TORCH.step(small)
        for name in BUFFERS:
            x, y = getattr(bucket, name)[tail], getattr(small, name)[:8192]
            assert_ulps(x, y, dtype, y.double().abs().max().item(), TORCH_ULPS[dtype],
                        f"2**31 tail {name}")
        torch.cuda.synchronize()
