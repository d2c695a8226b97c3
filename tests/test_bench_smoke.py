"""bench/bench_step.py runs end to end at --quick sizes on the CPU: a table, JSON lines with
every documented key, one line per (case, implementation). No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_step", None)


def test_quick_run_writes_table_and_json(bench, tmp_path, capsys):
    argv = ["--quick", "--no-append", "--device", "cpu", "--out", str(tmp_path),
            "--cases", "flat,small", "--reps", "2", "--warmup", "1", "--threads", "1"]
    # One thread: on a shared 2-core machine an OpenMP barrier can wait a whole scheduler
    # time slice (~8 ms) per parallel region, which made this test take 40 s instead of 10.
    records = bench.main(argv)
    out = capsys.readouterr()

    # The table: a header row and one row per (case, implementation).
    assert "| case" in out.out and "GB/s" in out.out and "copy bandwidth" in out.out
    # flat in float32 and bfloat16, small in float32; four FusedAdamW backends x two kinds of
    # grads plus three torch variants each.
    cases = {"flat-fp32", "flat-bf16", "small-fp32"}
    assert {r["case"] for r in records} == cases
    assert len(records) == len(cases) * (4 * 2 + 3)
    for r in records:
        assert f"| {r['case']}" in out.out

    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(records)
    rows = [json.loads(line) for line in lines]
    for row in rows:
        missing = set(bench.RECORD_KEYS) - set(row)
        assert not missing, f"JSON line lacks {sorted(missing)}: {row}"
        assert row["device"] == "cpu" and row["quick"] is True
        assert row["status"] in ("ok", "skipped", "error")
        assert row["status"] != "error", row["reason"]
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["gbps"] > 0 and row["state_bytes"] > 0
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["host_us"] is None and row["extra_mem_bytes"] is None  # GPU only
        else:
            assert row["reason"]

    by = {(r["case"], r["impl"], r["grads"]): r for r in rows}
    # Triton is never benchmarked on a CPU, even with TRITON_INTERPRET=1.
    assert by[("flat-fp32", "fused_adamw[triton]", "views")]["status"] == "skipped"
    # torch's three variants always run on CPU in float32; the torch backend always can.
    for impl in ("torch-forloop", "torch-foreach", "torch-fused"):
        assert by[("flat-fp32", impl, "torch")]["status"] == "ok"
    for grads in ("views", "foreign"):
        row = by[("small-fp32", "fused_adamw[torch]", grads)]
        assert row["status"] == "ok"
        assert set(row["speedup"]) == {"torch-forloop", "torch-foreach", "torch-fused"}
    # The bytes formula: 28 B/param fp32, 14 bf16, plus 2 * itemsize for foreign grads.
    assert by[("flat-fp32", "torch-fused", "torch")]["bytes_per_param"] == 28
    assert by[("flat-fp32", "fused_adamw[torch]", "foreign")]["bytes_per_param"] == 36
    assert by[("flat-bf16", "fused_adamw[torch]", "views")]["bytes_per_param"] == 14
    # The plot: written when matplotlib is installed, else skipped with a message.
    assert any(tmp_path.glob("*.png")) or "matplotlib is not installed" in out.err


def test_bytes_formula(bench):
    assert bench.bytes_per_param(torch.float32, amsgrad=False, foreign=False) == 28
    assert bench.bytes_per_param(torch.float32, amsgrad=True, foreign=False) == 36
    assert bench.bytes_per_param(torch.bfloat16, amsgrad=False, foreign=False) == 14
    assert bench.bytes_per_param(torch.bfloat16, amsgrad=False, foreign=True) == 18


def test_llm_config_counts(bench):
    """The GPU llm case is the documented 1.21B-param GPT-like list; the CPU one about 54.5M."""
    gpu = bench.llm_shapes(2048, 20, 50257)
    assert sum(math.prod(s) for s in gpu) == 1_212_569_600 and len(gpu) == 163
    assert sum(math.prod(s) for s in bench.llm_shapes(512, 12, 16384)) == 54_538_752
