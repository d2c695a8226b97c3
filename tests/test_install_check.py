"""The import-time warning for a GPU that fused_adamw's build cannot use (a CPU machine: torch's
CUDA queries and fused_adamw._ext are monkeypatched)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from fused_adamw import _ext, _install_check


@pytest.fixture
def gpu_visible(monkeypatch):
    """torch "sees" two CUDA GPUs; the warning has not been emitted yet in this process."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_install_check, "_warned", False)
    monkeypatch.delenv("FUSED_ADAMW_NO_BUILD_WARNING", raising=False)


def _catch() -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _install_check.warn_once()
    return [w for w in caught if issubclass(w.category, _install_check.BuildWarning)]


def test_warns_once_when_c_is_missing(gpu_visible, monkeypatch):
    reason = "the compiled module fused_adamw._C is not available (test)"
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: reason)
    monkeypatch.setattr(_ext, "C", None)
    first = _catch()
    assert len(first) == 1
    text = str(first[0].message)
    assert issubclass(first[0].category, UserWarning)
    assert "2 CUDA GPUs" in text and reason in text
    assert "pip install" in text and "CUDA_HOME" in text  # how to rebuild
    assert _catch() == []  # once per process


def test_warns_when_c_was_built_without_cuda(gpu_visible, monkeypatch):
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "C", types.SimpleNamespace(has_cuda=False))
    asked = []

    def reason(index):
        asked.append(index)
        return "fused_adamw._C was built without CUDA"

    monkeypatch.setattr(_ext, "cuda_unavailable_reason", reason)
    caught = _catch()
    assert len(caught) == 1 and "built without CUDA" in str(caught[0].message)
    assert asked == [0]


def test_no_warning_without_a_visible_gpu(gpu_visible, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: "no _C (test)")
    assert _catch() == []


def test_no_warning_and_no_driver_query_when_the_build_has_cuda(gpu_visible, monkeypatch):
    """A _C with CUDA: nothing to say about the build; per-device checks (which would create a
    CUDA context on every GPU at import) are not made."""
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "C", types.SimpleNamespace(has_cuda=True))

    def must_not_be_called(index):
        raise AssertionError("per-device CUDA query at import")

    monkeypatch.setattr(_ext, "cuda_unavailable_reason", must_not_be_called)
    assert _catch() == []


def test_silenced_by_environment_variable(gpu_visible, monkeypatch):
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: "no _C (test)")
    monkeypatch.setenv("FUSED_ADAMW_NO_BUILD_WARNING", "1")
    assert _catch() == []


def test_a_failing_check_never_breaks_the_import(gpu_visible, monkeypatch):
    def boom():
        raise RuntimeError("broken driver")

    monkeypatch.setattr(_ext, "unavailable_reason", lambda: "no _C (test)")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert _catch() == []


def test_plain_import_on_this_machine_does_not_warn():
    """The package imports cleanly, with warnings as errors, where no GPU is visible."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: whether to warn depends on this build")
    env = {k: v for k, v in os.environ.items() if k != "FUSED_ADAMW_NO_BUILD_WARNING"}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", "import fused_adamw"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


def test_auto_warns_once_per_gpu_when_the_cuda_kernel_cannot_run_there(monkeypatch):
    """backend='auto' falls back quietly, but a GPU without a usable kernel (a build for other
    archs, an old driver) is said once per device at the first optimizer that uses it."""
    from fused_adamw import _dispatch
    from fused_adamw._install_check import BuildWarning

    _dispatch._load("torch")
    reasons = {"cuda": "the kernel cannot run on sm_90 (compiled for 80)",
               "triton": "Triton is not installed"}
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda name, d, dt: reasons.get(name))
    monkeypatch.setattr(_dispatch, "_warned_devices", set())
    monkeypatch.delenv("FUSED_ADAMW_NO_BUILD_WARNING", raising=False)
    gpu = torch.device("cuda", 3)
    with pytest.warns(BuildWarning, match=r"cuda:3 \(the kernel cannot run on sm_90"):
        assert _dispatch.choose("auto", gpu, torch.float32).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("auto", gpu, torch.bfloat16).name == "torch"  # once per GPU
