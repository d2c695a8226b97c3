"""The build: no torch at build time, and the installs that must work without a toolkit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_files_never_import_torch():
    for name in ("setup.py", "pyproject.toml"):
        text = (ROOT / name).read_text()
        assert "import torch" not in text and '"torch' not in text.split("[project]")[0], name


def _install(tmp_path, env_extra) -> tuple[Path, str]:
    """pip-installs a copy of the source tree into tmp_path/site; returns that folder."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist*", ".venv*", "*.egg-info", "__pycache__", "*.so", "bench"))
    env = dict(os.environ, **env_extra)
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q",
         "--target", str(site), str(src)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site, proc.stdout + proc.stderr


def _report(site: Path) -> str:
    code = ("import fused_adamw, fused_adamw._ext as e, torch; "
            "o = fused_adamw.FusedAdamW([torch.nn.Parameter(torch.ones(3))]); "
            "print(e.build_info(), o.backend)")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)),
                          capture_output=True, text=True, timeout=120, cwd=site)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_no_ext_install_is_pure_python_and_works(tmp_path):
    site, log = _install(tmp_path, {"FUSED_ADAMW_NO_EXT": "1"})
    assert not list((site / "fused_adamw").glob("_C*.so"))
    out = _report(site)
    assert "'available': False" in out and out.strip().endswith("torch")


def test_install_without_nvcc_builds_the_cpu_module(tmp_path):
    """FUSED_ADAMW_NO_CUDA=1 takes the path of a machine without nvcc (this one has it)."""
    site, _ = _install(tmp_path, {"FUSED_ADAMW_NO_CUDA": "1"})
    out = _report(site)
    assert "'has_cuda': False" in out and out.strip().endswith("cpu")
