"""experiments/run.py as a user runs it: in a subprocess, with tiny flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "run.py"
# The flags of the run.py contract: they must all stay.
CONTRACT_FLAGS = (
    "--data", "--data-root", "--network", "--likelihood", "--guide", "--K", "--x-dim", "--w-dim", "--hidden-dim",
    "--epochs", "--batch-size", "--lr", "--mc-samples", "--z-prior-weight", "--cv-weight", "--free-bits", "--seed",
    "--device", "--out", "--resume",
)  # fmt: skip


def _run(*args, cwd=None, timeout=300):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_contract_flag():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.replace(",", " ").split())
    missing = [flag for flag in CONTRACT_FLAGS if flag not in listed]
    assert not missing, f"--help does not list {missing}"
    assert "v1" in result.stdout and "v2" in result.stdout  # the --guide choices


def test_tiny_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    flags = ("--epochs", "2", "--no-progress", "--train-subset", "1000", "--test-subset", "200")
    result = _run(*flags, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run folder" in result.stdout
    for name in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    final = json.loads((out / "metrics.json").read_text())
    assert final["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "figures").glob("*.png"))


def test_help_shows_every_choice_and_the_presets():
    """Each enumerated option lists its registry's names (a new prior or guide shows up alone)."""
    from pyro_gmvae.guides import GUIDES
    from pyro_gmvae.likelihoods import LIKELIHOODS
    from pyro_gmvae.networks import TRUNKS
    from pyro_gmvae.priors import PRIORS

    text = " ".join(_run("--help").stdout.replace("vae-\n", "vae-").split()).replace("vae- ", "vae-")
    for table in (GUIDES, LIKELIHOODS, TRUNKS, PRIORS):
        assert " | ".join(sorted(table)) in text
    assert "random | vae-kmeans | vae-umap" in text
    assert "data presets" in text and "spiral mnist svhn npz" in text


def test_show_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
    result = _run("--data", "mnist", "--K", "16", "--show-config", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["K"] == 16 and config["init"] == "vae-umap" and config["hidden_dim"] == 500
    assert not (tmp_path / "run").exists()
    assert config["flush_denormal"] is False
    flushed = _run("--flush-denormal", "--show-config", cwd=tmp_path)
    assert flushed.returncode == 0, flushed.stderr
    assert json.loads(flushed.stdout)["flush_denormal"] is True


def test_importing_the_package_changes_no_pyro_setting():
    probe = "import pyro, pyro_gmvae; print(pyro.settings.get('module_local_params'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
