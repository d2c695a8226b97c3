"""Shared fixtures: seeds, devices, backends, and small builders of params."""

from __future__ import annotations

import os

import pytest
import torch

from fused_adamw import _dispatch

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
