"""Shared fixtures: seeds, devices, backends, and small builders of params."""

from __future__ import annotations

import faulthandler
import os
import signal

import pytest
import torch

from fused_adamw import _dispatch

ODD_SIZES = [0, 1, 7, 1023, 1024, 1025, 4097, 278011]
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# FUSED_ADAMW_TEST_TIMEOUT=SECONDS (bench/gpu_suite.sh sets it; pytest-timeout may be missing on
# the GPU machine): a test running longer fails with a Timeout, and the run goes on with the
# next test; one stuck where no signal reaches Python (a hung kernel) gets its traceback
# dumped and the process ended 30 s later. Unset (CI): no timeout.
TEST_TIMEOUT_S = float(os.environ.get("FUSED_ADAMW_TEST_TIMEOUT") or 0)


class PerTestTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise PerTestTimeout(f"the test ran longer than FUSED_ADAMW_TEST_TIMEOUT={TEST_TIMEOUT_S:g} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT_S <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 30, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


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
