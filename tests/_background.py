"""The suite's heavy subprocess work, started in the background when the session starts.

Four fixtures compute everything they check in subprocesses that need nothing from the tests
before them: the CUDA kernel's emulation (build, checks under ASan, mutants:
tests/test_kernel_emulation.py), the Triton kernels' sm_90 compile
(tests/test_triton_compile.py), the SASS checks with their two broken kernels
(tests/test_sass.py) and a pip install that compiles the CPU loop (tests/test_build.py). Run in
turn, they were more than half of CI's time on 2 cores, while the rest of the suite (the Triton
interpreter, small tensors, one thread) keeps one core busy. So ``pytest_collection_finish``
(tests/conftest.py) starts each job whose tests are selected, at once, niced (the tests in
front keep their core), and ``pytest_collection_modifyitems`` moves those files' tests to the
end of the run. Their fixtures then take the job's result with :func:`run`, waiting for it if
needed: the same command and output, started earlier. When no job was started (a run of one
test, ``FUSED_ADAMW_TEST_BACKGROUND=0``), :func:`run` runs the command there and then.

A job is ``python <test file> --background``: the file's ``__main__`` prints one JSON object
on the last line of its stdout. Jobs still running when the session ends are killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# job name -> (test file, the fixture whose selected tests need it)
JOBS = {
    "emulation": ("test_kernel_emulation.py", "emu_job"),
    "triton_compile": ("test_triton_compile.py", "compiled"),
    "sass": ("test_sass.py", "sass_job"),
    "install_no_cuda": ("test_build.py", "cpu_install"),
}
ENABLED = os.environ.get("FUSED_ADAMW_TEST_BACKGROUND", "1") != "0"

_running: dict[str, tuple[subprocess.Popen, Path, Path]] = {}


def command(name: str) -> list[str]:
    return [sys.executable, str(TESTS / JOBS[name][0]), "--background"]


_dir: Path | None = None  # the session's folder for the jobs' outputs


def env() -> dict:
    # The Triton compile needs real (not interpreted) kernels; the others do not care.
    out = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if _dir is not None:
        out["FUSED_ADAMW_BG_DIR"] = str(_dir)  # what a job leaves for its tests (an install)
    return out


def wanted(items) -> list[str]:
    """The jobs some selected test needs (by its fixture)."""
    names = []
    for name, (fname, fixture) in JOBS.items():
        if any(item.path.name == fname and fixture in getattr(item, "fixturenames", ())
               for item in items):
            names.append(name)
    return names


def start(items) -> None:
    global _dir
    names = wanted(items)
    if not ENABLED or not names:
        return
    tmp = _dir = Path(tempfile.mkdtemp(prefix="fused_adamw_bg_"))
    for name in names:
        out, err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(command(name), cwd=ROOT, env=env(), stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lambda: os.nice(10))
        _running[name] = (proc, out, err)


def run(name: str, timeout: float) -> dict:
    """The job's JSON result: the background one if it was started, else run here."""
    if name in _running:
        proc, out, err = _running.pop(name)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise
        stdout, stderr, rc = out.read_text(), err.read_text(), proc.returncode
    else:
        r = subprocess.run(command(name), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=timeout)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    lines = stdout.strip().splitlines()
    if rc != 0 or not lines:
        raise RuntimeError(f"{' '.join(command(name))} failed (exit {rc}):\n{stdout[-4000:]}\n"
                           f"{stderr[-8000:]}")
    return json.loads(lines[-1])


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def stop() -> None:
    global _dir
    while _running:
        _, (proc, _, _) = _running.popitem()
        if proc.poll() is None:
            _kill(proc)
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
        _dir = None


def last(items) -> list:
    """``items`` with the jobs' files' tests moved to the end, in their order."""
    files = {fname for fname, _ in JOBS.values()}
    tail = [i for i in items if i.path.name in files]
    return [i for i in items if i.path.name not in files] + tail
