"""pyro_gmvae.allocator: glibc keeps a step's freed memory for the next step, and no result changes.

Each check runs training steps in a fresh process, since the allocator's settings are
process-wide and cannot be undone: once with :func:`keep_freed_memory`'s settings, once
with glibc's own settings fixed by the environment at a small mmap threshold (64 KiB:
nearly every tensor of a step is mapped and unmapped), which ``keep_freed_memory`` leaves
alone.  The MNIST-sized network (fc, H 500, K 10) at batch 64: blocks of megabytes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import hashlib, json, resource, sys
import pyro, torch
from pyro_gmvae import allocator
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.loop import adam, run_epoch
from pyro_gmvae.objective import make_elbo

torch.set_num_threads(2)
settings = allocator.keep_freed_memory()
again = allocator.keep_freed_memory()
config = Config(data="mnist", network="fc", hidden_dim=500, K=10).resolved()
pyro.set_rng_seed(0)
model, guide = build_model_and_guide(config, (1, 28, 28))
loss_module = make_elbo()(model, guide)
optimizer = adam(loss_module.parameters(), 1e-3)
x = torch.rand(6 * 64, 1, 28, 28)
order = torch.Generator().manual_seed(0)
loss = lambda y: loss_module(y) / len(y)
totals = [float(run_epoch(loss, optimizer, x, 64, order)) for _ in range(2)]  # warm-up: the trace, Adam's state
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    totals.append(float(run_epoch(loss, optimizer, x, 64, order)))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 18
digest = hashlib.sha256()
for p in loss_module.parameters():
    digest.update(p.detach().numpy().tobytes())
print(json.dumps(dict(settings=settings, again=again, totals=totals, params=digest.hexdigest(), faults=faults)))
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)


def _steps(**environment) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(environment, OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_kept_memory_changes_no_result_and_spares_the_page_faults():
    kept = _steps()
    own = _steps(MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    assert kept["settings"] == {"mmap_threshold": 32 * 2**20, "trim_threshold": 256 * 2**20}
    assert kept["again"] == kept["settings"]
    assert own["settings"] is None  # the environment's choice wins
    # the same losses and weights, bit for bit, after 30 training steps
    assert kept["totals"] == own["totals"]
    assert kept["params"] == own["params"]
    # a step takes back megabytes page by page (4 KiB each) where memory is returned; hardly any where kept
    assert own["faults"] > 500
    assert kept["faults"] < own["faults"] / 20


@glibc
def test_tunables_in_the_environment_win():
    assert _steps(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")["settings"] is None


def test_the_allocator_benchmark_takes_the_median_over_rounds():
    summarise = load_script("bench_allocator").summarise

    def child(compiled_s, reference_s, faults):
        return {side: {"median_step_s": s, "minor_faults_per_step": faults}
                for side, s in (("compiled", compiled_s), ("reference", reference_s))}  # fmt: skip

    runs = {"glibc": [child(0.030, 0.020, 900), child(0.020, 0.030, 700), child(0.025, 0.040, 800)],
            "kept": [child(0.015, 0.010, 2), child(0.020, 0.020, 0), child(0.010, 0.030, 1)]}  # fmt: skip
    out = summarise(runs)
    assert out["glibc"]["compiled"]["median_step_ms"] == pytest.approx(25.0)
    assert out["kept"]["reference"]["median_step_ms"] == pytest.approx(20.0)
    assert out["glibc"]["compiled"]["minor_faults_per_step"] == pytest.approx(800)
    assert out["compiled_kept_over_glibc"] == pytest.approx(15.0 / 25.0)
    assert out["reference_kept_over_glibc"] == pytest.approx(20.0 / 30.0)
