"""bench/bench_step.py runs end to end at --quick sizes on the CPU into a temporary folder: a
table, JSON lines with every documented key, one line per (case, implementation, grads), the
host case, and the load warning's logic. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import re
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
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--cases", "flat,small,host",
            "--reps", "2", "--warmup", "1", "--host-reps", "2", "--threads", "1"]
    # One thread: on a shared 2-core machine an OpenMP barrier can wait a whole scheduler
    # time slice (~8 ms) per parallel region, which made this test take 40 s instead of 10.
    records = bench.main(argv)
    out = capsys.readouterr()

    # The table: a header row and one row per (case, implementation, grads).
    assert "| case" in out.out and "GB/s" in out.out and "copy bandwidth" in out.out
    assert "ns/param" in out.out  # the host table
    main_records = [r for r in records if r["kind"] != "host"]
    cases = {"flat-fp32", "flat-bf16", "small-fp32"}
    assert {r["case"] for r in main_records} == cases
    # four FusedAdamW backends and three torch variants, each with both grad modes
    assert len(main_records) == len(cases) * 7 * 2
    for r in main_records:
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
        assert len(row["copy_gbps_run"]) == 5  # start, beside each of 3 cases, end
        assert row["load_warning"] is None or "rerun on an idle machine" in row["load_warning"]
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["state_bytes"] > 0
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["host_us"] is None and row["extra_mem_bytes"] is None  # GPU only
        else:
            assert row["reason"]
    if rows[0]["load_warning"]:
        assert f"WARNING: {rows[0]['load_warning']}" in out.out

    by = {(r["case"], r["impl"], r["grads"]): r for r in rows}
    # Triton is never benchmarked on a CPU, even with TRITON_INTERPRET=1.
    assert by[("flat-fp32", "fused_adamw[triton]", "fresh")]["status"] == "skipped"
    # torch's three variants always run on CPU in float32; the torch backend always can.
    for impl in ("torch-forloop", "torch-foreach", "torch-fused"):
        for grads in ("fresh", "persistent"):
            row = by[("flat-fp32", impl, grads)]
            assert row["status"] == "ok" and row["gbps"] > 0 and row["interleaved_with"] >= 4
    for grads in ("fresh", "persistent"):
        row = by[("small-fp32", "fused_adamw[torch]", grads)]
        assert row["status"] == "ok" and row["backend_used"] == "torch"
        assert set(row["speedup"]) == {"torch-forloop", "torch-foreach", "torch-fused"}
    # The bytes formula: 28 B/param fp32, 14 bf16, whatever the grad mode.
    assert by[("flat-fp32", "torch-fused", "fresh")]["bytes_per_param"] == 28
    assert by[("flat-fp32", "fused_adamw[torch]", "fresh")]["bytes_per_param"] == 28
    assert by[("flat-bf16", "fused_adamw[torch]", "persistent")]["bytes_per_param"] == 14
    # The host case: 500 one-element params at --quick, ns per param and the ratio to torch.
    host = [r for r in rows if r["kind"] == "host"]
    assert {(r["impl"], r["grads"]) for r in host} == {
        (impl, grads) for impl in ("fused_adamw[cpu]", "torch-fused")
        for grads in ("fresh", "persistent")}
    for r in host:
        assert r["case"] == "host-500x1" and r["n_tensors"] == 500
        if r["status"] == "ok":
            assert r["ns_per_param"] > 0 and r["host_ratio"] > 0
    assert all(r["host_ratio"] == 1 for r in host if r["impl"] == "torch-fused")
    # The report is saved next to the JSON; the plot when matplotlib is installed.
    assert any(tmp_path.glob("*.txt"))
    assert any(tmp_path.glob("*.png")) or "matplotlib is not installed" in out.err


def test_default_output_is_not_the_committed_results(bench):
    args = bench.parse_args([])
    assert Path(args.out) == bench.REPO / "bench" / "out"
    assert not args.append


def test_load_warnings(bench):
    assert bench.load_warnings([20.0, 21.0, 23.9], [0.5, 1.9], cores=2) == []
    spread = bench.load_warnings([20.0, 25.0], [None], cores=2)
    assert len(spread) == 1 and "varied by 25%" in spread[0]
    loaded = bench.load_warnings([20.0], [1.0, 2.5], cores=2)
    assert len(loaded) == 1 and "load average reached 2.50 on 2 cores" in loaded[0]


def test_round_robin_interleaves_implementations(bench):
    order = []

    class Fake(bench.Runner):
        def prepare(self):
            pass

        def step(self):
            order.append(self.impl)

    runners = [Fake(name, "fresh", []) for name in ("a", "b", "c")]
    bench.time_round_robin(runners, warmup=1, reps=3, device=torch.device("cpu"))
    assert order == list("abc" "bca" "cab" "abc")
    assert all(len(r.times) == 3 for r in runners)


def test_memory_groups(bench):
    assert [list(g) for g in bench.plan_groups(5, 10, 25)] == [[0, 1], [2, 3], [4]]
    assert [list(g) for g in bench.plan_groups(2, 10, 5)] == [[0], [1]]


def test_bytes_formula(bench):
    assert bench.bytes_per_param(torch.float32, amsgrad=False) == 28
    assert bench.bytes_per_param(torch.float32, amsgrad=True) == 36
    assert bench.bytes_per_param(torch.bfloat16, amsgrad=False) == 14
    # low precision: bf16 p r+w, g r (6) + bf16 m, v r+w (8) + the mode's buffer r+w
    bf16 = lambda **o: bench.bytes_per_param(torch.bfloat16, False, o)  # noqa: E731
    assert (bf16(master_weights="fp32"), bf16(master_weights="remainder"),
            bf16(master_weights="kahan"), bf16(master_weights="stochastic")) == (22, 18, 18, 14)
    assert bf16(master_weights="fp32", state_dtype=torch.float32) == 30
    # fp32 p r+w, g r (12) + bf16 m, v r+w (8)
    assert bench.bytes_per_param(torch.float32, False, {"state_dtype": torch.bfloat16}) == 20


def test_case_sizes(bench):
    """The GPU llm case is the documented 1.21B-param GPT-like list; the CPU one about 54.5M;
    small is 5,000 tensors of 10,000 elements; flat is one 50M-element tensor on the CPU."""
    gpu = bench.llm_shapes(2048, 20, 50257)
    assert sum(math.prod(s) for s in gpu) == 1_212_569_600 and len(gpu) == 163
    assert sum(math.prod(s) for s in bench.llm_shapes(512, 12, 16384)) == 54_538_752
    cases = {c.name: c for c in bench.build_cases(
        list(bench.CASE_KINDS), [torch.float32, torch.bfloat16], bench.SIZES["cpu"])}
    lowp = {"lowp-bf16-master-fp32", "lowp-bf16-remainder", "lowp-bf16-stochastic",
            "lowp-fp32-bf16-moments"}
    assert set(cases) == {"flat-fp32", "flat-bf16", "llm-fp32", "llm-bf16", "small-fp32",
                          "flat-amsgrad-fp32"} | lowp
    assert cases["lowp-bf16-remainder"].options == {"master_weights": "remainder"}
    assert cases["lowp-fp32-bf16-moments"].dtype == torch.float32
    # the default run is the one it always was: lowp only when asked for
    assert "lowp" not in bench.parse_args([]).cases
    assert cases["flat-fp32"].shapes == [(50_000_000,)]
    assert cases["small-fp32"].shapes == [(10_000,)] * 5000
    assert cases["flat-amsgrad-fp32"].amsgrad and not cases["flat-fp32"].amsgrad


def test_bench_readme_cites_only_files_in_the_repository():
    """Every file path bench/README.md cites exists in the repository; nothing outside it."""
    repo = BENCH.parents[1]
    text = (repo / "bench" / "README.md").read_text()
    assert "../" not in text and "/tmp/" not in text and "shared/" not in text
    cited = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for token in span.split():
            token = token.strip("(),;:")
            if "<" in token or "OUTDIR" in token or token.startswith(("bench/out", "--")):
                continue
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)*\.(py|md|sh|txt|png|jsonl|toml|cu|cuh|h|cpp)",
                            token) or re.fullmatch(r"(bench|tests|python|kernels|csrc)/\S*",
                                                   token):
                cited.add(token)
    # Paths with a folder anywhere in the text (code blocks and prose included).
    for token in re.findall(r"(?<![\w/.<-])((?:bench|tests|python|kernels|csrc|\.ci)/[\w./-]*\w)",
                            text):
        if not token.startswith("bench/out"):
            cited.add(token)
    assert {"bench/results", "tests/test_bench_smoke.py"} <= cited  # the check sees the paths
    missing = [t for t in sorted(cited)
               if not (repo / t).exists() and not (repo / "bench" / t).exists()
               and not (repo / "bench" / "results" / t).exists()]
    assert not missing, f"bench/README.md cites paths that do not exist: {missing}"


def test_training_step_bench_quick(tmp_path):
    """bench/bench_training_step.py --quick on the CPU: the GradScaler case for both
    implementations (GradScaler's sync-free path on CPU too), the graph case skipped with
    its reason; one JSON line per row."""
    import json
    import subprocess

    script = BENCH.parent / "bench_training_step.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "training_step.jsonl").read_text().splitlines()]
    assert [(x["case"], x.get("impl")) for x in rows] == [
        ("scaler", "fused_adamw"), ("scaler", "torch-fused"), ("graph", None)]
    assert rows[2]["skipped"] == "CUDA graphs need a CUDA device"
    assert all(x["median_s"] > 0 for x in rows[:2])
    assert "scaler  fused_adamw" in r.stdout


def test_suite_cases_and_defaults(bench):
    """--suite on a GPU: flat fp32 and bf16 at 1e9, 1e8 and 1e6 params (largest first),
    5,000 x 10k, one case per low-precision kind at 1e8; cuda, triton and torch fused, fresh
    grads, 10 timed steps after 3 warm-up. It chooses its cases itself."""
    cases = bench.suite_cases(bench.SIZES["gpu"])
    assert [(c.name, c.numel) for c in cases] == [
        ("flat-fp32-1e9", 10**9), ("flat-bf16-1e9", 10**9), ("small-fp32", 5000 * 10_000),
        ("flat-fp32-1e8", 10**8), ("flat-bf16-1e8", 10**8), ("flat-fp32-1e6", 10**6),
        ("flat-bf16-1e6", 10**6), ("lowp-bf16-master-fp32", 10**8),
        ("lowp-bf16-remainder", 10**8), ("lowp-bf16-stochastic", 10**8),
        ("lowp-fp32-bf16-moments", 10**8)]
    assert cases[2].shapes == [(10_000,)] * 5000
    args = bench.parse_args(["--suite"])
    assert (args.backends, args.grads, args.reps, args.warmup) == (
        ["cuda", "triton", "torch-fused"], ["fresh"], 10, 3)
    assert bench.parse_args(["--suite", "--backends", "cpu", "--reps", "4"]).backends == ["cpu"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "--cases", "flat"])


def test_suite_quick_run(bench, tmp_path, capsys):
    """--suite --quick runs on the CPU: every suite case, fresh grads only, the low-precision
    cases stepped with their options by FusedAdamW and skipped with the reason for torch's
    AdamW; the kernel time is GPU only (n/a here)."""
    records = bench.main(["--suite", "--quick", "--device", "cpu", "--backends",
                          "cpu,torch-fused", "--out", str(tmp_path), "--reps", "1",
                          "--warmup", "0", "--threads", "1", "--plot", "none"])
    out = capsys.readouterr().out
    assert "kernel ms" in out
    names = [c.name for c in bench.suite_cases(bench.SIZES["quick"])]
    assert list(dict.fromkeys(r["case"] for r in records)) == names
    assert {r["grads"] for r in records} == {"fresh"}
    by = {(r["case"], r["impl"]): r for r in records}
    for name in names:
        ours, torchs = by[(name, "fused_adamw[cpu]")], by[(name, "torch-fused")]
        assert ours["status"] == "ok", ours["reason"]
        assert ours["kernel_ms"] is None
        if name.startswith("lowp-"):
            assert torchs["status"] == "skipped" and "master weights" in torchs["reason"]
        else:
            assert torchs["status"] == "ok" and ours["options"] == {}
    r = by[("lowp-bf16-master-fp32", "fused_adamw[cpu]")]
    assert r["options"] == {"master_weights": "fp32"} and r["bytes_per_param"] == 22
    # the fp32 master is state: 4 B/param more than the bf16 moments' 4
    assert r["state_bytes"] >= 8 * r["numel"]
    assert by[("lowp-fp32-bf16-moments", "fused_adamw[cpu]")]["options"] == {
        "state_dtype": "bfloat16"}
