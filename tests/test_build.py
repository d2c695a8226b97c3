"""The build: no torch at build time, and the installs that must work without a toolkit.

The tests that call setup.py's helpers and command classes directly (stale ``_C`` removal, the
no-CUDA reason, the build config) run in seconds; the two that pip-install a copy of the tree
build it for real.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

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


def _installed_build_config(site: Path) -> dict:
    return runpy.run_path(str(site / "fused_adamw" / "_build_config.py"))["BUILD_CONFIG"]


def test_no_ext_install_is_pure_python_and_works(tmp_path):
    site, log = _install(tmp_path, {"FUSED_ADAMW_NO_EXT": "1"})
    assert not list((site / "fused_adamw").glob("_C*.so"))
    out = _report(site)
    assert "'available': False" in out and out.strip().endswith("torch")
    config = _installed_build_config(site)
    assert config["ext"] == "not built" and config["ext_reason"] == "FUSED_ADAMW_NO_EXT=1 is set"
    assert config["env"]["FUSED_ADAMW_NO_EXT"] == "1"


def _job() -> dict:
    """``python tests/test_build.py --background`` (started with the session:
    tests/_background.py): the install of test_install_without_nvcc_builds_the_cpu_module (it
    compiles the CPU loop, minutes), into a folder that lives as long as the session."""
    import tempfile
    d = Path(os.environ.get("FUSED_ADAMW_BG_DIR") or tempfile.mkdtemp()) / "install_no_cuda"
    d.mkdir(parents=True, exist_ok=True)
    site, _ = _install(d, {"FUSED_ADAMW_NO_CUDA": "1"})
    return {"site": str(site)}


@pytest.fixture(scope="module")
def cpu_install() -> Path:
    import _background
    return Path(_background.run("install_no_cuda", timeout=900)["site"])


def test_install_without_nvcc_builds_the_cpu_module(cpu_install):
    """FUSED_ADAMW_NO_CUDA=1 takes the path of a machine without nvcc (this one has it)."""
    site = cpu_install
    out = _report(site)
    assert "'has_cuda': False" in out and out.strip().endswith("cpu")
    config = _installed_build_config(site)
    assert config["ext"] == "built" and config["cuda"] is False
    assert config["cuda_reason"] == "FUSED_ADAMW_NO_CUDA=1 is set"
    assert config["host_compiler"] and "-O3" in config["cflags"]


# ----------------------------------------------------------- setup.py's logic, called directly


@pytest.fixture(scope="module")
def setup_py() -> ModuleType:
    """setup.py as a module: importing it runs nothing (setup() is under __main__)."""
    spec = importlib.util.spec_from_file_location("fused_adamw_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def package(tmp_path, monkeypatch, setup_py) -> Path:
    """A package folder like python/fused_adamw after an in-place build: an __init__.py and
    compiled modules; setup.py's PACKAGE points at it and the cwd is its source root."""
    pkg = tmp_path / "python" / "fused_adamw"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("_C.cpython-311-x86_64-linux-gnu.so", "_C.abi3.so"):
        (pkg / name).write_bytes(b"\x7fELF stale")
    monkeypatch.setattr(setup_py, "PACKAGE", pkg)
    monkeypatch.chdir(tmp_path)
    return pkg


def _build_py(setup_py, tmp_path, no_ext_reason, editable):
    from setuptools.dist import Distribution

    dist = Distribution({"name": "fused-adamw", "version": "0", "packages": ["fused_adamw"],
                         "package_dir": {"": "python"}})
    dist.script_name = "setup.py"
    cmd = setup_py.BuildPy(dist)
    cmd.no_ext_reason = no_ext_reason
    cmd.editable_mode = editable
    cmd.build_lib = str(tmp_path / "build")
    cmd.ensure_finalized()
    cmd.run()


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_no_ext_build_removes_a_stale_in_place_module(setup_py, package, tmp_path, capsys,
                                                      editable):
    """FUSED_ADAMW_NO_EXT=1 over an earlier in-place build: the old _C would be loaded."""
    _build_py(setup_py, tmp_path, "FUSED_ADAMW_NO_EXT=1 is set", editable)
    assert not list(package.glob("_C*")), "a stale _C is left where it would be imported"
    err = capsys.readouterr().err
    assert "FUSED_ADAMW_NO_EXT=1" in err and "_C.cpython-311-x86_64-linux-gnu.so" in err
    where = package if editable else tmp_path / "build" / "fused_adamw"
    config = runpy.run_path(str(where / setup_py.BUILD_CONFIG))["BUILD_CONFIG"]
    assert config["ext"] == "not built" and config["ext_reason"] == "FUSED_ADAMW_NO_EXT=1 is set"
    assert config["editable"] is editable
    if not editable:
        assert (where / "__init__.py").exists() and not list(where.glob("_C*"))


def test_a_build_with_the_extension_keeps_the_in_place_module(setup_py, package, tmp_path):
    _build_py(setup_py, tmp_path, None, editable=True)
    assert len(list(package.glob("_C*.so"))) == 2
    assert not (package / setup_py.BUILD_CONFIG).exists()  # BuildExt writes that one


def test_build_ext_with_no_ext_in_place_removes_the_module_and_records_why(
        setup_py, package, monkeypatch):
    from setuptools.dist import Distribution

    monkeypatch.setenv("FUSED_ADAMW_NO_EXT", "1")
    cmd = setup_py.BuildExt(Distribution())
    cmd.inplace = True
    cmd.run()
    assert not list(package.glob("_C*"))
    config = runpy.run_path(str(package / setup_py.BUILD_CONFIG))["BUILD_CONFIG"]
    assert config["ext"] == "not built" and "FUSED_ADAMW_NO_EXT=1" in config["ext_reason"]


def test_no_cuda_reason_names_the_variable_not_nvcc(setup_py, monkeypatch):
    monkeypatch.setenv("FUSED_ADAMW_NO_CUDA", "1")

    def no_lookup():
        raise AssertionError("nvcc must not be looked for under FUSED_ADAMW_NO_CUDA=1")

    monkeypatch.setattr(setup_py, "_find_nvcc", no_lookup)
    nvcc, reason = setup_py._cuda_toolkit()
    assert nvcc is None and reason == "FUSED_ADAMW_NO_CUDA=1 is set"
    message = setup_py._no_cuda_message(reason)
    assert message.startswith("FUSED_ADAMW_NO_CUDA=1 is set: building fused_adamw._C without "
                              "CUDA") and "nvcc" not in message


def test_missing_nvcc_is_blamed_only_when_not_found(setup_py, monkeypatch):
    monkeypatch.delenv("FUSED_ADAMW_NO_CUDA", raising=False)
    monkeypatch.setattr(setup_py, "_find_nvcc", lambda: None)
    nvcc, reason = setup_py._cuda_toolkit()
    assert nvcc is None and "nvcc was not found" in reason and "CUDA_HOME" in reason
    assert "FUSED_ADAMW_NO_CUDA" not in reason
    monkeypatch.setattr(setup_py, "_find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    assert setup_py._cuda_toolkit() == ("/opt/cuda/bin/nvcc", None)


def test_build_ext_warns_with_the_real_reason_and_records_it(setup_py, monkeypatch, capsys):
    """The CPU-only path of BuildExt (the compile itself stubbed out)."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext
    from setuptools.dist import Distribution

    built = []
    monkeypatch.setattr(build_ext, "build_extension", lambda self, ext: built.append(ext))
    monkeypatch.setenv("FUSED_ADAMW_NO_CUDA", "1")
    cmd = setup_py.BuildExt(Distribution())
    cmd._config = setup_py._base_config(editable=False)
    cmd.compiler = SimpleNamespace(compiler_so=[sys.executable, "-fPIC"],
                                   linker_so=[sys.executable, "-shared"])
    ext = Extension("fused_adamw._C", ["csrc/x.cpp"], extra_compile_args=["-O3"],
                    extra_link_args=["-fopenmp"])
    cmd.build_extension(ext)
    assert built == [ext]
    err = capsys.readouterr().err
    assert "FUSED_ADAMW_NO_CUDA=1 is set: building fused_adamw._C without CUDA" in err
    assert "nvcc" not in err
    config = cmd._config
    assert config["ext"] == "built" and config["cuda"] is False
    assert config["cuda_reason"] == "FUSED_ADAMW_NO_CUDA=1 is set"
    assert config["cflags"] == ["-O3"] and config["ldflags"] == ["-fopenmp"]
    assert config["host_compiler"] == f"{sys.executable} -fPIC"
    assert config["host_compiler_version"].startswith("Python")
    assert config["env"]["FUSED_ADAMW_NO_CUDA"] == "1"


def test_build_config_round_trips_as_a_module(setup_py, tmp_path):
    config = setup_py._base_config(editable=True)
    config.update(ext="failed", ext_reason='nvcc said: "no"\nline two', cflags=["-O3"])
    path = tmp_path / setup_py.BUILD_CONFIG
    setup_py._write_build_config(path, config)
    assert runpy.run_path(str(path))["BUILD_CONFIG"] == config
    assert config["version"] == runpy.run_path(
        str(ROOT / "python" / "fused_adamw" / "_version.py"))["__version__"]


def test_generated_and_output_files_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/python/fused_adamw/_build_config.py" in ignored
    assert "/bench/out/" in ignored


if __name__ == "__main__" and sys.argv[1:] == ["--background"]:
    import json
    print(json.dumps(_job()))
