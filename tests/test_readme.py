"""Every code block of README.md that can run on a CPU runs here, so the README cannot drift
from the code (issue #20).

- ```` ```python ```` blocks run with ``exec`` in a fresh namespace that holds a small model and
  the names the README's snippets take as given (``model``, ``loss_fn``, ``loader``,
  ``FusedAdamW`` as the "Switching from torch" block imports it, ...: see ``_given``); an
  optimizer ``opt`` a block builds then takes one training step, so a block that only builds
  one is still held to a working step.
- ```` ```python gpu ```` blocks need CUDA. Where there is none, a block that uses
  ``torch.cuda.`` is skipped with that reason (after it parses), and one that only names the
  device runs as its CPU twin ("cuda" spelled "cpu").
- ```` ```bash ```` blocks run when every command in them is a cheap ``python -m fused_adamw...``
  call (in a subprocess, against the installed package); blocks that install or run the test
  suite are skipped with that reason.

CI runs the tests from the clone against an installed wheel: README.md is found beside the
tests folder, never through the package.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from fused_adamw import FusedAdamW

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
CHEAP = ("python -m fused_adamw",)  # bash commands that are quick and change nothing


def blocks() -> list[tuple[str, str, int]]:
    """(info string, code, line number) of every fenced block of the README."""
    text = README.read_text()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def _cases(language: str):
    if not README.exists():  # a test run outside a clone: nothing to check against
        return [pytest.param(None, None,
                             marks=pytest.mark.skip(reason="no README.md beside tests/"))]
    return [pytest.param(info, code, id=f"line{line}")
            for info, code, line in blocks() if info.split()[:1] == [language]]


def _given() -> dict:
    """The names the README's snippets assume: a model, its loss and a few batches, small."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    loader = [(torch.randn(5, 8), torch.randint(0, 4, (5,))) for _ in range(3)]
    return {"torch": torch, "FusedAdamW": FusedAdamW, "model": model, "loader": loader,
            "loss_fn": torch.nn.functional.cross_entropy,
            "warmup": lambda step: min(1.0, (step + 1) / 10)}


def test_the_readme_has_blocks_of_each_kind():
    """The parser sees the README's blocks (a regex that matched nothing would pass all)."""
    if not README.exists():
        pytest.skip("no README.md beside tests/")
    infos = [info for info, _, _ in blocks()]
    assert infos.count("python") >= 3 and "python gpu" in infos and "bash" in infos, infos


@pytest.mark.parametrize("info, code", _cases("python"))
def test_python_block(info, code, monkeypatch):
    compiled = compile(code, f"README.md ({info} block)", "exec")  # every block parses
    if "gpu" in info.split()[1:] and not torch.cuda.is_available():
        if "torch.cuda." in code:
            pytest.skip("a README block marked gpu needs CUDA, which is not available here")
        # A block that only names the device (AMP) runs as its CPU twin: the same calls with
        # "cuda" spelled "cpu", so its API cannot drift either.
        code = code.replace('"cuda"', '"cpu"').replace(".cuda()", "")
        compiled = compile(code, f"README.md ({info} block, on cpu)", "exec")
    if "torch.compile" in code:
        # Inductor's first compile costs tens of seconds on a CPU; dynamo's trace, where our
        # step must appear as one operator without a graph break, runs the same with "eager".
        monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    namespace = _given()
    exec(compiled, namespace)
    opt, model = namespace.get("opt"), namespace["model"]
    if opt is not None:  # the optimizer a block builds takes a step that changes the model
        x, y = namespace["loader"][0]
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        namespace["loss_fn"](model(x.to(before[0].dtype)), y).backward()
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("info, code", _cases("bash"))
def test_bash_block(info, code, tmp_path):
    commands = [line.split("#", 1)[0].strip() for line in code.splitlines()]
    commands = [c for c in commands if c]
    if not all(c.startswith(CHEAP) for c in commands):
        pytest.skip("installs packages or runs the test suite: not run by a test")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=dict(os.environ))
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
