"""The GPU kernels through the optimizer, where tests/test_cuda_kernel.py does not reach: the
low-precision kernels (every (param, state) dtype pair and master mode) of the CUDA backend and
of the compiled Triton kernel, against the CPU loop (``backend="cpu"``), and steps on two
streams. Run by bench/gpu_suite.sh; skipped without a CUDA device.

How close must the GPU be to the CPU loop? Every operation of kernels/adamw_math.cuh is
correctly rounded on both sides (explicit fmas, nvcc's --fmad=false; Triton's explicit
``tl.fma``/``div_rn``/``sqrt_rn``) except ``powf(beta, step)`` in the bias corrections (CUDA's
within 4 ulp, glibc's within 1: tests/test_cuda_kernel.py). Hence two tests:

* with betas (0.5, 0.5) every ``powf(0.5, t) = 2^-t`` is exact on both sides, so params,
  moments, amsgrad maxima, the mode's buffer, the step counts and the grads GradScaler's
  unscale wrote back must agree bit for bit: every code path of the low-precision kernels,
  nothing left to tolerance;
* with Adam's betas (0.9, 0.999) the moments, maxima, step counts and grads still agree bit for
  bit (with decoupled decay they do not depend on powf nor on the param), and the params and
  fp32 masters within the powf bound of tests/test_cuda_kernel.py summed over the steps.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA
from fused_adamw import FusedAdamW, _dispatch, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]

MODES = [None, "fp32", "remainder", "kahan", "stochastic"]
PAIRS = [(torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, None),
         (torch.float16, torch.float32), (torch.float32, None), (torch.float32, torch.bfloat16)]
PAIR_IDS = ["bf16", "bf16-m32", "fp16", "fp16-m32", "fp32", "fp32-m16"]
GPU_BACKENDS = ["cuda", "triton"]
# odd sizes; 20000 and 278011 span two and 17 tiles of 16384 elements (the element index
# feeds the stochastic bits)
SIZES = [1, 7, 1023, 4097, 20000, 278011]
STEPS = 6  # step index 4 is skipped by GradScaler's found_inf: 5 steps taken
SKIPPED = 4
LR = 1e-2
POWF_ULPS = 4 + 1  # CUDA's powf bound plus glibc's (tests/test_cuda_kernel.py)
# |update| / lr = |m_hat| / (sqrt(v_hat) + eps): 1 at the first step, below 3 for these
# Gaussian grads after it (Adam's update is bounded by a few lr); 10 leaves room.
UPDATE_OVER_LR = 10


def needs(backend: str) -> None:
    reason = _dispatch.unavailable_reason(backend, torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(reason)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (float64); as tests/test_lowp.py's."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    emin = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}[dtype]
    e = torch.floor(torch.log2(x.double().abs().clamp_min(2.0 ** emin)))
    return torch.exp2(e - mant)


def train(backend: str, device: str, dtype, state_dtype, mode, betas, **clip) -> dict:
    """STEPS steps of two param groups (with and without weight decay) over SIZES with
    amsgrad; from step 3 on, GradScaler's sync-free path (grads scaled by 8, the kernel
    unscales and writes them back), step SKIPPED skipped (found_inf). Returns every tensor
    a step may write, on the CPU, by name. ``clip``: max_grad_norm / track_norms (issue #19);
    then also every step's opt.grad_norm and opt.norms."""
    torch.manual_seed(4)
    p0s = [torch.randn(n) for n in SIZES]
    grads = [[torch.randn(n) for n in SIZES] for _ in range(STEPS)]
    torch.manual_seed(7)  # the stochastic seed (drawn from torch's CPU generator)
    params = [torch.nn.Parameter(p0.to(device, dtype)) for p0 in p0s]
    opt = FusedAdamW([{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}],
                     lr=LR, betas=betas, weight_decay=0.1, amsgrad=True, backend=backend,
                     master_weights=mode, state_dtype=state_dtype, **clip)
    out = {}
    for i, gs in enumerate(grads):
        scale = 8.0 if i >= 3 else 1.0
        for p, g in zip(params, gs):
            p.grad = (g * scale).to(device, dtype)
        if i >= 3:
            opt.grad_scale = torch.tensor(scale, device=device)
            opt.found_inf = torch.tensor(1.0 if i == SKIPPED else 0.0, device=device)
        opt.step()
        if clip:
            out[f"grad_norm step {i}"] = opt.grad_norm.cpu()
        if clip.get("track_norms"):
            for k, p in enumerate(params):
                out[f"norms {k} step {i}"] = opt.norms[p].cpu()
    for k, p in enumerate(params):
        out[f"param {k}"] = p.detach().cpu()
        out[f"grad {k}"] = p.grad.cpu()
        for key, v in opt.state[p].items():
            out[f"{key} {k}"] = v.cpu() if isinstance(v, torch.Tensor) else v
    assert opt.backend == backend
    return out


def differ(x: torch.Tensor, y: torch.Tensor) -> str:
    """How many elements differ (NaNs in the same place count as equal), the first ones."""
    xs, ys = x.reshape(-1), y.reshape(-1)
    ne = (xs.double() != ys.double()) & ~(xs.double().isnan() & ys.double().isnan())
    idx = ne.nonzero().reshape(-1)[:5].tolist()
    return (f"{int(ne.sum())} of {xs.numel()} elements differ; first at {idx}: "
            f"{xs[idx].tolist()} vs {ys[idx].tolist()}")


def assert_bits(a: dict, b: dict, names=None) -> None:
    assert a.keys() == b.keys()
    for name in names if names is not None else a:
        x, y = a[name], b[name]
        if not isinstance(x, torch.Tensor):
            assert x == y, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dim() == 0:
            assert torch.equal(x, y), f"{name}: {x} vs {y}"
        else:
            same = torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
            assert same, f"{name}: {differ(x, y)}"


def modes_for(dtype):
    return [m for m in MODES if not (m == "remainder" and dtype == torch.float16)]


def cells(backend):
    return [pytest.param(backend, dtype, sdtype, mode, id=f"{pid}-{mode}")
            for (dtype, sdtype), pid in zip(PAIRS, PAIR_IDS) for mode in modes_for(dtype)]


def check_bit_for_bit(backend, dtype, state_dtype, mode):
    needs(backend)
    betas = (0.5, 0.5)  # powf(0.5, t) = 2^-t exactly on both sides
    gpu = train(backend, "cuda", dtype, state_dtype, mode, betas)
    cpu = train("cpu", "cpu", dtype, state_dtype, mode, betas)
    assert_bits(gpu, cpu)


# The CUDA kernel first, the compiled Triton kernel last (its variants compile on first use,
# a second or so each: bench/gpu_suite.sh runs the most telling tests first).
@pytest.mark.parametrize("backend,dtype,state_dtype,mode", cells("cuda"))
def test_cuda_low_precision_kernels_match_the_cpu_loop_bit_for_bit(backend, dtype,
                                                                   state_dtype, mode):
    check_bit_for_bit(backend, dtype, state_dtype, mode)


# issue #19: the CUDA NORMS kernels (clipped amsgrad and low-precision tables, track_norms)
# and the plain ones' clipping, through the optimizer: one cell per kernel family.
CLIP_CELLS = [pytest.param(torch.float32, None, None, id="fp32"),
              pytest.param(torch.bfloat16, None, None, id="bf16"),
              pytest.param(torch.bfloat16, torch.float32, "fp32", id="bf16-m32-fp32"),
              pytest.param(torch.float16, None, "stochastic", id="fp16-stochastic"),
              pytest.param(torch.float32, torch.bfloat16, None, id="fp32-m16")]


@pytest.mark.parametrize("dtype,state_dtype,mode", CLIP_CELLS)
@pytest.mark.parametrize("track_norms", [False, True], ids=["clip", "clip+norms"])
def test_cuda_clipping_and_track_norms_match_the_cpu_loop(dtype, state_dtype, mode,
                                                          track_norms):
    """max_grad_norm (active: the grads' norm is about 550) on amsgrad tables, with and
    without track_norms, on the CUDA backend (no torch fallback any more:
    backends/cuda.py clips_table, tracks_norms) against the cpu backend, betas (0.5, 0.5) so
    that every value is exact on both sides: params, state, grads, every step's grad_norm
    and opt.norms (NaN on the skipped step on both) bit for bit. The emulation proves the
    kernels' order (tests/test_kernel_emulation.py track_norms); this runs nvcc's code."""
    needs("cuda")
    betas = (0.5, 0.5)
    clip = dict(max_grad_norm=1.0, track_norms=track_norms)
    gpu = train("cuda", "cuda", dtype, state_dtype, mode, betas, **clip)
    cpu = train("cpu", "cpu", dtype, state_dtype, mode, betas, **clip)
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        x, y = gpu[name], cpu[name]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.isnan().any():
            assert torch.equal(x.isnan(), y.isnan()), f"{name}: {differ(x, y)}"
            x, y = x.nan_to_num(0.0), y.nan_to_num(0.0)
            assert torch.equal(x, y), f"{name}: {differ(x, y)}"
        else:
            assert_bits({name: x}, {name: y})


def powf_bound(scale: torch.Tensor, dtype: torch.dtype, betas) -> torch.Tensor:
    """Per element, what powf's ulps may move a param or fp32 master over the taken steps:
    each step the update moves by a relative (A1 + A2) * POWF_ULPS * 2^-23 (A = b^t/(1 - b^t),
    A2 halved by the square root: how much 1 - b^t amplifies b^t's error) of |update| <=
    UPDATE_OVER_LR * lr, and the stored value by one more ulp of its dtype where the two sides
    round on either side (the difference carries over to the next steps)."""
    b1, b2 = betas
    taken = STEPS - 1
    amp = sum(b1 ** t / (1 - b1 ** t) + b2 ** t / (2 * (1 - b2 ** t)) for t in range(1, taken + 1))
    return taken * ulp(scale, dtype) + LR * UPDATE_OVER_LR * amp * POWF_ULPS * 2.0 ** -23


@pytest.mark.parametrize("backend,dtype,state_dtype,mode", cells("cuda"))
def test_cuda_low_precision_kernels_with_adams_betas(backend, dtype, state_dtype, mode):
    needs(backend)
    betas = (0.9, 0.999)
    gpu = train(backend, "cuda", dtype, state_dtype, mode, betas)
    cpu = train("cpu", "cpu", dtype, state_dtype, mode, betas)
    exact = [n for n in gpu if n.split()[0] in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                                   "step", "grad", "sr_seed")]
    assert_bits(gpu, cpu, exact)
    for k in range(len(SIZES)):
        p, q = gpu[f"param {k}"].double(), cpu[f"param {k}"].double()
        scale = torch.maximum(p.abs(), q.abs())
        bound = powf_bound(scale, dtype, betas)
        assert ((p - q).abs() <= bound).all(), f"param {k}: {differ(p, q)}"
        if mode == "fp32" and dtype != torch.float32:
            m, n = gpu[f"master_param {k}"].double(), cpu[f"master_param {k}"].double()
            assert ((m - n).abs() <= powf_bound(scale, torch.float32, betas)).all(), \
                f"master_param {k}: {differ(m, n)}"
        if mode == "remainder" and dtype == torch.bfloat16:
            m = reference.remainder_join(gpu[f"param {k}"], gpu[f"param_remainder {k}"])
            n = reference.remainder_join(cpu[f"param {k}"], cpu[f"param_remainder {k}"])
            m, n = m.double(), n.double()
            assert ((m - n).abs() <= powf_bound(scale, torch.float32, betas)).all(), \
                f"the remainder's master {k}: {differ(m, n)}"
        if mode == "kahan" and dtype != torch.float32:
            # the compensation takes up what the param's rounding left out: a param rounded
            # the other way moves it by that ulp
            c, d = gpu[f"kahan_compensation {k}"].double(), cpu[f"kahan_compensation {k}"].double()
            assert ((c - d).abs() <= bound).all(), f"kahan_compensation {k}: {differ(c, d)}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_steps_on_two_streams_equal_steps_on_one(backend):
    """Steps alternating between two side streams, each ordered after the last as a user
    must (``wait_stream``), with the grads written on the step's stream behind a GPU
    busy-wait (a kernel launched on another stream than the current one would read them
    before they land), and a table change in the middle (a param's grad set to None), give
    the params and state of the same steps on one stream, bit for bit (the kernels are
    deterministic: no atomics)."""
    needs(backend)
    torch.manual_seed(3)
    p0s = [torch.randn(n, device="cuda") for n in SIZES]
    grads = [[torch.randn(n, device="cuda") for n in SIZES] for _ in range(STEPS)]
    torch.cuda.synchronize()

    def run(streams):
        params = [torch.nn.Parameter(p0.clone()) for p0 in p0s[:3]]
        params += [torch.nn.Parameter(p0.bfloat16()) for p0 in p0s[3:]]
        opt = FusedAdamW(params, lr=LR, weight_decay=0.1, amsgrad=True, backend=backend)
        prev = torch.cuda.current_stream()
        for i, gs in enumerate(grads):
            s = streams[i % len(streams)]
            s.wait_stream(prev)
            with torch.cuda.stream(s):
                torch.cuda._sleep(5_000_000)  # a few ms: the grads below land late
                for p, g in zip(params, gs):
                    p.grad = g.to(p.dtype, copy=True)  # made on s, as backward on s would
                if i == 2:
                    params[1].grad = None  # the table changes mid-way
                opt.step()
            prev = s
        torch.cuda.current_stream().wait_stream(prev)
        torch.cuda.synchronize()
        out = {f"param {k}": p.detach().cpu() for k, p in enumerate(params)}
        for k, p in enumerate(params):
            out.update({f"{key} {k}": v.cpu() for key, v in opt.state[p].items()})
        return out

    one = run([torch.cuda.Stream()])
    two = run([torch.cuda.Stream(), torch.cuda.Stream()])
    assert_bits(two, one)


@pytest.mark.parametrize("backend,dtype,state_dtype,mode", cells("triton"))
def test_triton_low_precision_kernels_match_the_cpu_loop_bit_for_bit(backend, dtype,
                                                                     state_dtype, mode):
    """The compiled Triton kernel's low-precision paths (auto keeps them off until they have
    run on a GPU: fused_adamw/_dispatch.py's NOTE on never wrong)."""
    check_bit_for_bit(backend, dtype, state_dtype, mode)
