"""The command lines a user meets first: ``python -m fused_adamw`` (the environment report, its
--help and --json) and ``python -m fused_adamw.demo`` with a device it cannot use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fused_adamw
from fused_adamw import __main__ as report


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_help_prints_usage_not_the_report():
    proc = _run("fused_adamw", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fused_adamw") and "--json" in proc.stdout
    assert f"fused_adamw {fused_adamw.__version__}\n" not in proc.stdout


def test_json_report_has_what_a_bug_report_needs():
    proc = _run("fused_adamw", "--json",
                env_extra={"FUSED_ADAMW_TEST_MARKER": "7", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert info["fused_adamw"] == fused_adamw.__version__
    assert info["torch"]["version"] == torch.__version__
    assert info["install"]["kind"] and info["install"]["package_path"].endswith("fused_adamw")
    assert info["os"]["platform"] and info["cpu"]["model"]
    assert info["cpu"]["torch_threads"] >= 1 and info["cpu"]["OMP_NUM_THREADS"] == "1"
    assert info["environment"]["FUSED_ADAMW_TEST_MARKER"] == "7"
    assert "build_config" in info  # None for a build from before the config was recorded
    picks = info["backends"]["cpu"]["auto"]
    assert set(picks) == {"float32", "bfloat16", "float16", "float64"}
    assert picks["float64"] == "torch"  # only the torch backend computes in float64
    for name in ("cuda", "triton", "cpu", "torch"):
        assert set(info["backends"]["cpu"]["backends"][name]) == set(picks)


def test_text_report_lines():
    info = report.collect()
    info["environment"] = {"FUSED_ADAMW_NO_CUDA": "1", "TRITON_INTERPRET": "1"}
    text = "\n".join(report.lines(info))
    for needle in ("install: ", "os: ", "cpu: ", "OMP_NUM_THREADS=", "torch threads",
                   "environment: FUSED_ADAMW_NO_CUDA=1, TRITON_INTERPRET=1",
                   "cpu: auto picks ", "torch for float64"):
        assert needle in text, needle


def test_report_reads_the_build_config(monkeypatch):
    config = {"version": fused_adamw.__version__, "date": "2026-01-01T00:00:00+00:00",
              "editable": True, "ext": "built", "ext_reason": None, "cuda": False,
              "cuda_reason": "FUSED_ADAMW_NO_CUDA=1 is set", "host_compiler": "g++ -fPIC",
              "host_compiler_version": "g++ (Debian 12.2.0-14) 12.2.0",
              "cflags": ["-O3", "-fopenmp"], "ldflags": ["-fopenmp"],
              "env": {"FUSED_ADAMW_NO_CUDA": "1"}}
    monkeypatch.setitem(sys.modules, "fused_adamw._build_config",
                        types.SimpleNamespace(BUILD_CONFIG=config))
    text = "\n".join(report.lines())
    assert "g++ (Debian 12.2.0-14) 12.2.0: g++ -fPIC" in text
    assert "-O3 -fopenmp" in text
    assert "CUDA: not compiled in: FUSED_ADAMW_NO_CUDA=1 is set" in text
    assert "build environment: FUSED_ADAMW_NO_CUDA=1" in text


def test_report_without_a_build_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "fused_adamw._build_config", None)  # import fails
    assert report.build_config() is None
    assert "unknown (built before build config was recorded)" in "\n".join(report.lines())


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="CUDA is available here")),
    "cuda:64",
    "nodevice",
])
def test_demo_with_an_unusable_device_exits_with_one_line(device):
    proc = _run("fused_adamw.demo", "--device", device, "--steps", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # One line, argparse's error format without the usage (the reason is not buried).
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m fused_adamw.demo: error: --device " + device), lines
