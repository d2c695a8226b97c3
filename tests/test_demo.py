"""``python -m fused_adamw.demo``: its flags, errors and output (issue #20). Cheap: a few
steps of the small model on the CPU, parsed in-process except one --help through ``-m``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fused_adamw import demo


def _error(capsys, argv) -> str:
    """The error line of a refused command line (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "2.5"], "--steps"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--backend", "nope"], "--backend"),
    (["--form", "sgd"], "--form"),
])
def test_a_bad_flag_is_refused_by_name(capsys, argv, flag):
    line = _error(capsys, argv + ["--device", "cpu"])
    assert line.startswith(f"{demo.PROG}: error: argument {flag}:"), line
    for other in ("--lr", "--steps", "--weight-decay", "--backend", "--form", "--device"):
        if other != flag:
            assert other not in line, line  # the error blames the flag given, no other


def test_a_backend_that_cannot_run_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "1", "--device", "cpu", "--backend", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{demo.PROG}: error: --backend cuda: "), err


def test_help_names_the_module_and_every_default():
    env = dict(os.environ, COLUMNS="200")  # one option per line, whatever the terminal
    proc = subprocess.run([sys.executable, "-m", "fused_adamw.demo", "--help"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fused_adamw.demo "), proc.stdout
    options = [a for a in demo.build_parser()._actions if a.dest != "help"]
    assert {a.dest for a in options} == {"steps", "device", "backend", "lr", "form",
                                         "weight_decay"}
    # Each option's entry: its line and the indented lines under it, up to the next option.
    entries = re.split(r"\n  (?=-)", proc.stdout.split("\noptions:\n", 1)[1].split("\n\n")[0])
    for action in options:
        flag = action.option_strings[0]
        entry = " ".join(next(e for e in entries if e.startswith(flag)).split())
        assert f"(default: {action.default})" in entry, entry  # its default
        assert " ".join(action.help.split()[:4]) in entry, entry  # and what it means


def test_prints_step_times_and_the_backends_that_ran(capsys):
    diff = demo.main(["--steps", "3", "--device", "cpu", "--backend", "cpu"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3
    for row in rows:  # step, lr, the two losses, the two step times in ms
        assert len(row) == 6 and abs(float(row[2]) - float(row[3])) < 1e-5, row
        assert float(row[4]) > 0 and float(row[5]) > 0, row
    medians = re.findall(r"median step\(\) time, (.+): ([0-9.]+) ms over 3 steps", out)
    assert [label for label, _ in medians] == ["torch AdamW (for-loop)", "FusedAdamW (cpu)"]
    assert all(float(ms) > 0 for _, ms in medians)
    assert diff < 1e-5  # 3 steps of lr <= 3e-3: a few ulp of |p| ~ 1 at most


def test_the_torch_path_is_torchs_own_choice():
    import torch

    params = [torch.nn.Parameter(torch.ones(2))]
    assert demo.torch_path(torch.optim.AdamW(params)) == "for-loop"  # CPU params: torch's rule
    assert demo.torch_path(torch.optim.AdamW(params, foreach=True)) == "foreach"
    assert demo.torch_path(torch.optim.AdamW(params, fused=True)) == "fused"
