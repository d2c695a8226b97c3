"""Shared fixtures: seeds, devices, backends, and small builders of params."""

from __future__ import annotations

import faulthandler
import os
import re
import signal

import pytest
import torch

from fused_adamw import _dispatch

try:
    import _background  # tests/ is on sys.path (rootdir conftest)
except ImportError:  # this file copied alone (tests/test_gpu_suite.py): no background jobs
    _background = None

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


# ------------------------------------------------------------------------------------------
# the quick subset: `TRITON_INTERPRET=1 python -m pytest -q -m quick tests` (issue #20)
# ------------------------------------------------------------------------------------------
# One test (or a few cells) per feature, on every backend that runs here (torch, the CPU
# loop, Triton interpreted) and on a GPU where there is one, within 4 minutes on 2 cores.
# What only the full suite runs: the CUDA kernel's CPU emulation and its SASS checks (they
# compile the kernel: minutes), Triton's sm_90 compile, the build and wheel tests, long
# trajectories in every option and dtype. Entries are node ids below tests/; "*" matches
# anything (parameter ids included).
QUICK = (
    "test_math.py", "test_api.py", "test_capture.py", "test_work_split.py",
    "test_install_check.py", "test_readme.py", "test_demo.py", "test_defects.py",
    "test_hazards.py", "test_host_time.py",
    "test_gpu_suite.py::test_*plan*", "test_gpu_suite.py::test_*no_gpu*",
    "test_optimizer.py::test_trajectory_fp32[default-*]",
    "test_optimizer.py::test_trajectory_low_precision[bf16-*]",
    "test_optimizer.py::test_none_grads_skip_exactly[*]",
    "test_optimizer.py::test_schedulers[*-cpu-cpu]",
    "test_adam_forms.py::test_adam_l2_matches_torch_adam[l2-*]",
    "test_adam_forms.py::test_decouple_lr_is_the_papers_update[*]",
    "test_adam_forms.py::test_signature_is_torchs_plus_ours[*]",
    "test_ext.py::test_cpu_loop_is_the_header_arithmetic[default-*]",
    "test_ext.py::test_binding_rejects_bad_arguments",
    "test_ext.py::test_module_builds_and_imports",
    "test_inplace.py::test_state_edits_act_as_in_torch[*]",
    "test_inplace.py::test_params_keep_their_storage_and_views_see_updates[*]",
    "test_inplace.py::test_overlapping_params_are_refused_before_anything_changes[*]",
    "test_triton.py::test_math_matches_header[*]",
    "test_triton.py::test_triton_update_mirrors_header_text",
    "test_triton.py::test_matches_torch_backend_mixed_steps_and_none_grads[*]",
    "test_triton.py::TestCuda::*",
    "test_lowp.py::test_modes_against_fp64_model[None-dtype0-cpu]",
    "test_lowp.py::test_header_*",
    "test_lowp.py::test_torch_adamw_loads_ours_and_ours_loads_torchs[*]",
    "test_lowp.py::test_triton_and_cpu_backends_agree_bit_for_bit[*fp32*]",
    "test_amp.py::test_fast_path_equals_gradscalers_own_path[*-fp32-scaled]",
    "test_amp.py::test_inf_in_one_of_two_buckets_skips_both[*]",
    "test_compile.py::test_compiled_training_step_matches_eager_and_torch[adamw-aot_eager]",
    "test_distributed.py::test_fsdp2_matches_torch_adamw",
    "test_distributed.py::test_zero_matches_ddp_torch_adamw[bucket_view]",
    "test_cuda_kernel.py::test_matches_cpu_loop[*]",
    "test_gpu_kernels.py::*",
    "test_clip.py::test_bad_arguments_raise_at_construction[*]",
    "test_clip.py::test_clip_matches_torch_over_many_steps[cpu-cpu-*]",
    "test_clip.py::test_gradscaler_equals_unscale_clip_step[*]",
    "test_clip.py::test_track_norms[*]",
    "test_clip.py::test_checkpoint_round_trip_is_bitwise_and_loads_into_torch[*]",
    "test_clip.py::test_clipped_step_is_capturable[*]",
    "test_clip.py::test_triton_clipped_steps_match_the_cpu_loop_bitwise[fp32-l2-adam-plain]",
    "test_clip_corners.py",
)
_QUICK = re.compile("|".join(
    re.escape(q).replace(r"\*", ".*") + ("(::.*)?$" if "*" not in q and "[" not in q else "$")
    for q in QUICK))


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.rsplit("tests/", 1)[-1]
        if _QUICK.match(nodeid):
            item.add_marker(pytest.mark.quick)
    if _background is not None:
        items[:] = _background.last(items)  # the background jobs' tests run last


# ------------------------------------------------------------------------------------------
# the heavy subprocess work of three files, started at once in the background (tests/_background.py)
# ------------------------------------------------------------------------------------------

def pytest_collection_finish(session):
    if _background is not None and not session.config.option.collectonly:
        _background.start(session.items)


def pytest_sessionfinish(session, exitstatus):
    if _background is not None:
        _background.stop()
