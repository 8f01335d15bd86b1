"""A plain (non-editable) pip install into a fresh virtual environment: the models and
guides import from outside the repository, and no generic top-level names are installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sysconfig
import pyro_gmvae, pyro_gmvae.models, pyro_gmvae.guides
from pyro_gmvae.models import GMVAE
from pyro_gmvae.guides import ClusterHeadGuide, ExactGuide
print(json.dumps({
    "site": sysconfig.get_paths()["purelib"],
    "files": [pyro_gmvae.__file__, pyro_gmvae.models.__file__, pyro_gmvae.guides.__file__],
}))
"""


def _copy_sources(dest: Path) -> Path:
    # Build from a copy, so the build leaves no build/ or egg-info behind in the work tree.
    ignore = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "data")
    src = dest / "src"
    shutil.copytree(REPO, src, ignore=ignore)
    return src


def _can_build_wheels() -> bool:
    # setuptools >= 70.1 has bdist_wheel built in; older ones need the "wheel" package.
    import importlib.util

    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_plain_install_puts_models_and_guides_inside_the_package(tmp_path):
    if not _can_build_wheels():
        pytest.skip("this setuptools cannot build wheels offline; pip install 'setuptools>=70.1' (the dev extra does)")
    src = _copy_sources(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # The environment sees the system's pip (and setuptools) through --system-site-packages;
    # run from the environment's python, it installs into the environment.  No network.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", PROBE], cwd=away, env=env, check=True, capture_output=True, text=True)
    info = json.loads(probe.stdout)
    site = Path(info["site"]).resolve()
    assert site.is_relative_to(env_dir.resolve())
    for file in info["files"]:
        assert Path(file).resolve().is_relative_to(site), f"{file} imported from outside {site}"
    installed = sorted(p.name for p in site.iterdir())
    assert "pyro_gmvae" in installed
    assert not {"models", "guides", "experiments", "tests"} & set(installed), installed
    assert (site / "pyro_gmvae" / "models" / "gmvae.py").is_file()
    assert (site / "pyro_gmvae" / "guides" / "gmvae.py").is_file()
