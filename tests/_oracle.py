"""The optimizer under test and its oracle, shared by the contract tests (test_inplace.py,
test_defects.py): FusedAdamW, or torch's own AdamW with FUSED_ADAMW_TEST_IMPL=torch, which
validates the tests themselves against torch."""

from __future__ import annotations

import os

import pytest
import torch

from _trajectory import real
from fused_adamw import FusedAdamW

EPS32 = torch.finfo(torch.float32).eps

IMPL = os.environ.get("FUSED_ADAMW_TEST_IMPL", "fused")  # "torch": validate the tests

torch_lacks = pytest.mark.skipif(
    IMPL == "torch", reason="specifies behaviour torch.optim.AdamW does not have")


def new_opt(params, backend="auto", **kw):
    """The optimizer under test: FusedAdamW (or torch's, with FUSED_ADAMW_TEST_IMPL=torch)."""
    kw.setdefault("lr", 1e-2)
    if IMPL == "torch":
        return torch.optim.AdamW(params, foreach=False, **kw)
    return FusedAdamW(params, backend=backend, **kw)


def torch_adamw(params, **kw):
    """The oracle: torch's for-loop AdamW."""
    kw.setdefault("lr", 1e-2)
    return torch.optim.AdamW(params, foreach=False, **kw)


def twin(params, dtype=None, device="cpu"):
    """Fresh contiguous Parameters with the same values (complex stays complex; dtype=float64
    gives complex128 for complex params)."""
    out = []
    for p in params:
        d = dtype
        if d == torch.float64 and p.is_complex():
            d = torch.complex128
        out.append(torch.nn.Parameter(p.detach().to(device, d or p.dtype).clone(
            memory_format=torch.contiguous_format), requires_grad=p.requires_grad))
    return out


def draw(p, gen):
    """A random grad for ``p``, drawn on the CPU in float32 (complex64) and rounded to p's
    dtype, so every side gets the same values whatever its dtype."""
    base = torch.complex64 if p.is_complex() else torch.float32
    return torch.randn(p.shape, generator=gen, dtype=base).to(p.dtype)


def atol_for(theirs) -> float:
    """Our arithmetic is torch's fused fp32 fma form, torch's for-loop rounds differently
    (Python-double hyperparameters, lerp): the two trajectories drift apart by rounding,
    measured 3.8e-6 (8 ulp) after 30 steps at lr 1e-2 on params up to |4.2|. 64 ulp of the
    largest |param| leaves room for that walk and is still 300x smaller than one step's move
    (~lr = 1e-2), so a wrong or missing update cannot hide in it."""
    scale = max([real(t).abs().max().item() for t in theirs if t.numel()] + [1.0])
    return 64 * EPS32 * scale
