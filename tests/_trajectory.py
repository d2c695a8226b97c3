"""Side-by-side runs of FusedAdamW, torch.optim.AdamW (for-loop) and the float64 oracle."""

from __future__ import annotations

import torch

from fused_adamw import FusedAdamW
from fused_adamw.reference import adamw_reference_fp64


def make(shapes, dtype=torch.float32, device="cpu", seed=0):
    """Params of the given shapes; a shape may be ("T", shape) for a transposed (non-contiguous)
    param, ("CL", shape) for channels_last, or ("C", shape) for complex64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        kind, shape = (s if isinstance(s, tuple) and s and isinstance(s[0], str)
                       else (None, s))
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if kind == "C":
            t = torch.randn(shape, generator=g, dtype=torch.complex64)
        else:
            t = torch.randn(shape, generator=g).to(dtype)
        if kind == "T":
            t = t.t().contiguous().t()  # same values, transposed strides
        elif kind == "CL":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t.to(device)))
    return out


def run(shapes, *, steps=50, backend="torch", device="cpu", dtype=torch.float32,
        skip=None, opt_kwargs=None, lr_tensor=False):
    """Runs both optimizers and the oracle on identical grads.

    ``skip(step, i)`` True leaves param i without a grad in that step. Returns (ours, torch's,
    oracle's) final params, the two optimizers, and our params objects.
    """
    kw = dict(lr=1e-2, weight_decay=1e-2)
    kw.update(opt_kwargs or {})
    ours = make(shapes, dtype, device)
    theirs = make(shapes, dtype, "cpu")
    initial = make(shapes, dtype, "cpu")
    lr = kw.pop("lr")
    opt = FusedAdamW(ours, lr=torch.tensor(lr, device=device) if lr_tensor else lr,
                     backend=backend, **kw)
    ref = torch.optim.AdamW(theirs, lr=torch.tensor(lr) if lr_tensor else lr,
                            foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(steps):
        grads = []
        for i, p in enumerate(theirs):
            if skip is not None and skip(step, i):
                grads.append(None)
            else:
                grads.append(torch.randn(p.shape, generator=g, dtype=p.dtype))
        history.append(grads)
        for p, q, gr in zip(ours, theirs, grads):
            p.grad = None if gr is None else gr.to(device)
            q.grad = None if gr is None else gr.clone()
        opt.step()
        ref.step()
    oracle = adamw_reference_fp64(initial, history, lr=lr, **{
        k: v for k, v in kw.items() if k in ("betas", "eps", "weight_decay", "amsgrad",
                                             "maximize")})[0]
    return ours, theirs, oracle, opt, ref


def real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return torch.view_as_real(t).double() if t.is_complex() else t.double()


def max_err(params, oracle) -> float:
    errs = [(real(p) - o.reshape(real(p).shape)).abs().max().item()
            for p, o in zip(params, oracle) if p.numel()]
    return max(errs, default=0.0)


def describe(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two tensors differ: count, first indices, NaN/inf separately."""
    a, b = real(a), real(b)
    diff = (a - b).abs()
    bad = ~(diff <= 0)
    nan = int(torch.isnan(a).sum()), int(torch.isnan(b).sum())
    inf = int(torch.isinf(a).sum()), int(torch.isinf(b).sum())
    idx = bad.nonzero()[:5].tolist()
    return (f"{int(bad.sum())}/{a.numel()} differ, max {diff.max().item() if a.numel() else 0:.3g}"
            f", first at {idx}, NaN {nan}, inf {inf}")


def assert_trajectory_matches(ours, theirs, oracle, dtype=torch.float32, factor=2.0):
    """Our error against the float64 oracle is at most ``factor`` times torch's own, plus a
    floor of 16 ulp of the largest param: torch's for-loop and our fused arithmetic round
    differently (double vs float hyperparameters, lerp vs fma), and the rounding of each step
    carries into the next, so both drift from the oracle by many ulp over 50 steps; what must
    hold is that ours drifts no more than torch's. The floor covers params so small that
    torch's own error happens to be ~0."""
    err_ours, err_torch = max_err(ours, oracle), max_err(theirs, oracle)
    scale = max((o.abs().max().item() for o in oracle if o.numel()), default=1.0)
    floor = 16 * torch.finfo(dtype).eps * max(scale, 1.0)
    worst = max(range(len(ours)), key=lambda i: (real(ours[i]) - oracle[i].reshape(
        real(ours[i]).shape)).abs().max().item() if ours[i].numel() else -1)
    assert err_ours <= factor * err_torch + floor, (
        f"our error {err_ours:.3g} vs torch's {err_torch:.3g} (floor {floor:.3g}); "
        f"worst param {worst}: {describe(ours[worst], theirs[worst])}"
    )
