"""bench/bench_lowprec.py runs end to end with --quick on the CPU into a temporary folder: a
table row per configuration, JSON lines with every documented key, the measured optimizer
state bytes per param of each mode, and the "fp32" / "remainder" bit-identity check reported
true. No timing or loss-quality assertions (a few steps cannot tell the modes apart)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_lowprec.py"

# Per-element optimizer state, bytes per param: the moments (2 x their itemsize) plus the
# master mode's buffer ("fp32" +4, "remainder" +2, "kahan" +2 for bf16, "stochastic" +0).
EXPECTED_STATE_BYTES = {
    "fp32": 8,
    "bf16": 4, "bf16-fp32": 8, "bf16-remainder": 6, "bf16-kahan": 6, "bf16-stochastic": 4,
    "bf16-m32": 8, "bf16-m32-fp32": 12, "bf16-m32-remainder": 10, "bf16-m32-kahan": 10,
    "bf16-m32-stochastic": 8,
    "fp32-m16": 4,
}
# Bytes moved per param per step (reads + writes): param 2x, grad 1x, moments 4x, buffer 2x.
EXPECTED_MOVED = {
    "fp32": 28, "bf16": 14, "bf16-fp32": 22, "bf16-remainder": 18, "bf16-kahan": 18,
    "bf16-stochastic": 14, "bf16-m32": 22, "bf16-m32-fp32": 30, "bf16-m32-remainder": 26,
    "bf16-m32-kahan": 26, "bf16-m32-stochastic": 22, "fp32-m16": 20,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lowprec")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "lowprec.jsonl").read_text().splitlines()]
    return proc.stdout, records, out


def test_table_has_a_row_per_config(quick_run):
    stdout, records, out = quick_run
    assert "| config |" in stdout and "verdict" in stdout
    assert {r["config"] for r in records} == set(EXPECTED_STATE_BYTES)  # --quick: all configs
    for r in records:
        assert f"| {r['config']} |" in stdout
    assert (out / "lowprec.md").read_text().count("\n| ") >= len(records) + 1
    # The plot is written, or its absence said.
    assert "Plot:" in stdout
    assert (out / "lowprec.png").exists() or "skipped" in stdout


def test_jsonl_fields(quick_run):
    _, records, _ = quick_run
    s = importlib.util.spec_from_file_location("bench_lowprec", BENCH)
    module = importlib.util.module_from_spec(s)
    sys.modules["bench_lowprec"] = module  # dataclasses look their module up there
    try:
        s.loader.exec_module(module)
        keys = module.RECORD_KEYS
    finally:
        sys.modules.pop("bench_lowprec", None)
    for r in records:
        missing = set(keys) - set(r)
        assert not missing, f"{r['config']} lacks {sorted(missing)}"
        assert r["quick"] is True and r["seeds"] == [0]
        assert len(r["final_loss"]) == len(r["avg_loss"]) == 1
        for k in ("final_loss_mean", "avg_loss_mean", "final_ratio_mean", "final_ratio_max",
                  "avg_ratio_mean", "avg_ratio_max", "opt_step_ms", "train_step_ms"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["config"], k, r[k])
        assert r["verdict"]
    base = next(r for r in records if r["config"] == "fp32")
    assert base["final_ratio_mean"] == 1.0 and base["verdict"] == "baseline"
    assert base["baseline_spread"] == 0.0  # one seed


def test_state_and_moved_bytes_per_param(quick_run):
    _, records, _ = quick_run
    for r in records:
        assert r["state_bytes_per_param"] == EXPECTED_STATE_BYTES[r["config"]], r["config"]
        assert r["bytes_moved_per_param"] == EXPECTED_MOVED[r["config"]], r["config"]
    by = {r["config"]: r["state_bytes_per_param"] for r in records}
    for mode, extra in (("fp32", 4), ("remainder", 2), ("kahan", 2), ("stochastic", 0)):
        assert by[f"bf16-{mode}"] == by["bf16"] + extra == 4 + extra


def test_bit_identity_reported_true(quick_run):
    stdout, records, _ = quick_run
    by = {r["config"]: r for r in records}
    for name in ("bf16-fp32", "bf16-remainder", "bf16-m32-fp32", "bf16-m32-remainder"):
        assert by[name]["bit_identical"] is True, by[name]["bit_identity"]
        assert "masters bit-identical" in by[name]["verdict"]
    for name in ("bf16", "bf16-kahan", "fp32"):
        assert by[name]["bit_identical"] is None
    assert "identical (0 of" in stdout
