"""The documented commands and the ArviZ example print no warning.

Each runs as a user runs it, in a fresh interpreter with Python's default warning filters,
and what it prints on stderr is checked.  ArviZ's cache folder is a fresh one, so its
once-a-day notice on import would show if it were not silenced.  The ArviZ example runs on
a model whose cluster probabilities are saturated (the same in every draw), the case in
which ``az.summary``'s default chain diagnostics divide 0 by 0 and warn once per entry.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_gmvae import Config, train

REPO = Path(__file__).resolve().parents[1]

ARVIZ_EXAMPLE = """
import sys

import torch

import pyro_gmvae
import arviz as az

run = pyro_gmvae.load_run(sys.argv[1], device="cpu")
network = run.model.prior.network
with torch.no_grad():  # narrow components far apart: many cluster probabilities are 0 or 1 in every draw
    network.loc_head.weight.zero_()
    network.loc_head.bias.mul_(100.0)
    network.scale_head.weight.zero_()
    network.scale_head.bias.fill_(-30.0)
y = run.load_data().x_test[:20]

idata = pyro_gmvae.to_inference_data(run, y, num_samples=100)
summary = az.summary(idata, var_names=["cluster_probs"], kind="stats")
az.plot_forest(idata, var_names=["cluster_probs"], coords={"example": [0, 1]}, combined=True)

probs = idata.posterior["cluster_probs"]
print("constant entries:", int((probs.std("draw") == 0).sum()), "of", probs.isel(chain=0, draw=0).size)
print(summary.shape)
"""


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "XDG_CACHE_HOME": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}


def _small_run(out: Path) -> Path:
    train(Config(epochs=2, train_subset=400, test_subset=100, out=str(out), progress=False), make_figures=False)
    return out


def test_arviz_example_prints_no_warning(tmp_path):
    folder = _small_run(tmp_path / "run")
    stdout = _prints_no_warning(ARVIZ_EXAMPLE, tmp_path, str(folder))
    constant = int(re.search(r"constant entries: (\d+)", stdout).group(1))
    assert constant > 0, "the example should cover saturated cluster probabilities"


def _readme_arviz_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "to_inference_data" in b]


def _prints_no_warning(code: str, tmp_path: Path, *args: str) -> str:
    """Run ``code`` as a script in ``tmp_path``; it must succeed and print no warning (bars may show)."""
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warn" not in done.stderr.lower(), done.stderr[-3000:]  # Python's warnings and ArviZ's logged ones
    return done.stdout


@pytest.mark.parametrize("index", range(len(_readme_arviz_blocks())))
def test_readme_arviz_blocks_print_no_warning(index, tmp_path):
    _prints_no_warning(_readme_arviz_blocks()[index], tmp_path)


def test_quickstart_command_prints_no_warning(tmp_path):
    # The quickstart (python experiments/run.py), shortened; figures included.
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "--epochs", "2", "--train-subset", "500"]
    cmd += ["--test-subset", "200", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warn" not in (done.stdout + done.stderr).lower(), done.stderr[-3000:]
