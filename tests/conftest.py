"""Shared fixtures: seeds, devices, backends, and small builders for flat buckets."""

from __future__ import annotations

import os

import pytest
import torch

from fused_adamw import _dispatch, _flat

ODD_SIZES = [0, 1, 7, 1023, 1024, 1025, 4097, 278011]
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def devices() -> list:
    """["cpu"] plus cuda and mps when present; absent ones appear as skips with the reason."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
        pytest.param("mps", marks=pytest.mark.skipif(not HAS_MPS, reason="no MPS device")),
    ]


def backend_cells() -> list:
    """Every (backend, device) pair of the matrix; the ones that cannot run here skip with
    the dispatcher's own reason."""
    cells = []
    for device in ("cpu", "cuda", "mps"):
        for name in ("torch", "cpu", "triton", "cuda"):
            if (device, name) in {("cpu", "cuda"), ("mps", "cuda"), ("mps", "cpu"),
                                  ("mps", "triton"), ("cuda", "cpu")}:
                continue  # not a pairing that exists
            reason = None
            if device == "cuda" and not HAS_CUDA:
                reason = "no CUDA device"
            elif device == "mps" and not HAS_MPS:
                reason = "no MPS device"
            elif name == "triton" and device == "cpu" and not TRITON_INTERPRET:
                reason = "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
            else:
                reason = _dispatch.unavailable_reason(name, torch.device(device), torch.float32)
            marks = pytest.mark.skip(reason=reason) if reason else ()
            cells.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return cells


def make_params(sizes, dtype=torch.float32, device="cpu"):
    """Params of the given shapes (an int is a 1-D size) with random data."""
    out = []
    for s in sizes:
        shape = (s,) if isinstance(s, int) else tuple(s)
        out.append(torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=device)))
    return out


def make_bucket(params, groups: list[dict], group_of=None, states=None, amsgrad=None):
    """A FlatBucket of ``params`` with its hparams table built from torch-style group dicts.

    ``group_of[i]`` is param i's group index (default 0). Grads are drawn fresh by
    :func:`fill_grads`.
    """
    group_of = group_of or [0] * len(params)
    states = states or [{} for _ in params]
    if amsgrad is None:
        amsgrad = any(g.get("amsgrad", False) for g in groups)
    b = _flat.build_bucket(params, group_of, states, amsgrad)
    full = [dict(dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False,
                      amsgrad=False, lr=1e-3), **g) for g in groups]
    b.host_hparams = [_flat.hparam_row(g) for g in full]
    op = _flat.opmath_dtype(b.dtype)
    b.hparams = torch.tensor(b.host_hparams, dtype=op).to(b.device)
    b.ensure_grad()
    return b


def fill_grads(bucket, generator=None):
    """Random grads in every segment (padding stays zero), then advance every step by one."""
    for v in bucket.grad_views:
        v.copy_(torch.randn(v.shape, dtype=v.dtype, generator=generator).to(v.device))
    bucket.steps.add_(1)
    bucket.host_steps = [s + 1 for s in bucket.host_steps]


def check_untouched_where_it_must_be(backend, dtype=torch.float32, device="cpu"):
    """Poisons what a step must not touch, steps, and checks it still holds the poison:
    an inactive param's four buffers, and max_exp_avg_sq of a group without amsgrad. Also
    checks that the active params moved and the padding stayed zero."""
    groups = [dict(amsgrad=True), dict(amsgrad=False)]
    params = make_params([1025, 4097, 7, 33], dtype, device)
    b = make_bucket(params, groups, group_of=[0, 1, 0, 1])
    fill_grads(b)
    nan = float("nan")
    b.max_exp_avg_sq.fill_(nan)
    for s in (b.segments[0], b.segments[2]):  # the amsgrad group's rows are real state
        b.max_exp_avg_sq[s.offset:s.offset + s.padded].zero_()
    b.active.copy_(torch.tensor([1, 1, 0, 1], dtype=torch.uint8))
    s2 = b.segments[2]
    inactive = slice(s2.offset, s2.offset + s2.padded)
    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name in names:
        getattr(b, name)[inactive].fill_(nan)
    before = b.param.clone()
    backend.step(b)
    for name in names:
        assert getattr(b, name)[inactive].isnan().all(), f"{name}: the inactive param was written"
    for i in (1, 3):  # non-amsgrad group: its max_exp_avg_sq rows keep the poison
        s = b.segments[i]
        assert b.max_exp_avg_sq[s.offset:s.offset + s.padded].isnan().all()
        assert not b.param[s.offset:s.offset + s.padded].isnan().any()
    for i in (0, 1, 3):
        s = b.segments[i]
        assert not torch.equal(b.param[s.offset:s.offset + s.numel],
                               before[s.offset:s.offset + s.numel]), f"param {i} did not move"
    for s in b.segments:
        if s is not s2:
            for name in ("param", "exp_avg", "exp_avg_sq"):
                pad = getattr(b, name)[s.offset + s.numel:s.offset + s.padded]
                assert (pad == 0).all(), f"{name}: padding changed"
