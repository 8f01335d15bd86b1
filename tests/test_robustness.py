"""Numerical failures are caught and no run ever loses its checkpoint.

* A NaN injected into a training batch (or a parameter that makes a term overflow) stops
  training before the optimiser step, names the epoch, the step and the culprit, and leaves
  the last good checkpoint and metrics exactly as they were.
* Scales are bounded so huge pre-activations still give finite log-densities.
* A training process killed with SIGKILL at random moments, and right while it writes its
  checkpoint, always leaves a loadable checkpoint and resumes to the end; Ctrl-C prints one
  line and leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import rebuild

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae import posterior
from pyro_gmvae.config import Config
from pyro_gmvae.data import Dataset, load_spiral
from pyro_gmvae.errors import NonFiniteLossError
from pyro_gmvae.likelihoods import BernoulliLikelihood, GaussianLikelihood
from pyro_gmvae.networks import SCALE_FLOOR, positive_scale
from pyro_gmvae.objective import log_component_densities
from pyro_gmvae.posterior import cluster_probs
from pyro_gmvae.training import RESUME_KEYS, train

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "run.py"


def small_spiral() -> Dataset:
    full = load_spiral()
    return Dataset("spiral", full.x[:400].clone(), full.labels[:400], full.x_test[:200], full.labels_test[:200])


def metrics_epochs(out: Path) -> list[int]:
    """Epochs of the complete lines of metrics.jsonl."""
    text = (out / "metrics.jsonl").read_text()
    return [json.loads(line)["epoch"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


# --- the non-finite guard ---------------------------------------------------------------
def _fail_after_epoch(monkeypatch, corrupt, at_epoch: int = 2):
    """Run ``corrupt(model, guide)`` right after the checkpoint of ``at_epoch`` is on disk.

    Returns a dict that collects the live modules, the cluster probabilities they gave at
    that moment, and every shuffle permutation the loop drew.
    """
    seen: dict = {"perms": []}
    real_evaluate, real_save, real_randperm = posterior.evaluate, ckpt.save_checkpoint, torch.randperm

    def evaluate(model, guide, data, *args, **kwargs):
        seen.update(model=model, guide=guide, data=data)
        return real_evaluate(model, guide, data, *args, **kwargs)

    def save_checkpoint(path, state):
        real_save(path, state)
        if state["epoch"] == at_epoch:
            seen["probs"] = cluster_probs(seen["model"], seen["guide"], seen["data"].x_test)
            corrupt(seen["model"], seen["data"])
            seen["params"] = {n: p.detach().clone() for n, p in seen["model"].named_parameters()}

    def randperm(*args, **kwargs):
        perm = real_randperm(*args, **kwargs)
        if "generator" in kwargs:  # the training loop's shuffle
            seen["perms"].append(perm.clone())
        return perm

    monkeypatch.setattr(posterior, "evaluate", evaluate)
    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(torch, "randperm", randperm)
    return seen


def _assert_last_good_checkpoint_intact(out: Path, seen: dict, good_epoch: int, failing_step: int) -> None:
    assert metrics_epochs(out) == list(range(1, good_epoch + 1))  # no line for the failing epoch
    assert not (out / "metrics.json").exists()
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, required=RESUME_KEYS)
    assert state["epoch"] == good_epoch and len(state["history"]) == good_epoch
    model, guide = rebuild(state)
    assert torch.equal(cluster_probs(model, guide, seen["data"].x_test), seen["probs"])
    # The guard fired before optimizer.step(): no NaN reached the live parameters, and when
    # the first step of the epoch failed they are exactly what they were before it.
    for module in (seen["model"], seen["guide"]):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    if failing_step == 1:
        for name, value in seen["model"].named_parameters():
            assert torch.equal(value, seen["params"][name]), name


def test_nan_in_a_batch_stops_with_epoch_step_and_input(tmp_path, monkeypatch):
    row = 123

    def corrupt(model, data):
        data.x[row, 1] = float("nan")  # in place: the loop's x_train is this very tensor on CPU

    seen = _fail_after_epoch(monkeypatch, corrupt)
    config = Config(out=str(tmp_path / "run"), epochs=5, progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, data=small_spiral(), make_figures=False)
    message = str(info.value)
    # Epoch 3's permutation puts the poisoned example into one batch of 200: that step fails.
    expected_step = seen["perms"][2].tolist().index(row) // 200 + 1
    assert f"epoch 3, step {expected_step}:" in message
    assert "input batch holds NaN" in message
    assert "last good checkpoint (epoch 2)" in message and str(tmp_path / "run") in message
    _assert_last_good_checkpoint_intact(tmp_path / "run", seen, good_epoch=2, failing_step=expected_step)


def test_overflowing_term_is_named(tmp_path, monkeypatch):
    def corrupt(model, data):
        readout = model.decoder.net[-1]
        with torch.no_grad():
            readout.bias[: data.x.shape[1]] = 1e30  # the Gaussian's loc: (y - loc)^2 overflows

    seen = _fail_after_epoch(monkeypatch, corrupt)
    config = Config(out=str(tmp_path / "run"), epochs=5, progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, data=small_spiral(), make_figures=False)
    message = str(info.value)
    assert "epoch 3, step 1:" in message  # every batch overflows, so the first one fails
    assert "non-finite terms: recon" in message
    _assert_last_good_checkpoint_intact(tmp_path / "run", seen, good_epoch=2, failing_step=1)


# --- bounded scales ---------------------------------------------------------------------
# Pre-activations up to the float32 limit.  Softplus grows linearly, so the scale overflows
# only where the pre-activation itself already does; log-densities stay finite over the
# whole range.  Gradients stay finite up to 1e30 (a variance of 1e60, already inf in
# float32): only at ~3e38 does d(scale^2)/d(scale) = 2 * scale overflow and the gradient
# turn NaN, which the training guard catches.
HUGE = torch.tensor([-3e38, -1e30, -1e4, -20.0, 0.0, 20.0, 1e4, 1e30, 3e38])
GRAD_SAFE = HUGE.abs() <= 1e30


def test_positive_scale_is_finite_and_floored():
    raw = HUGE.clone().requires_grad_()
    scale = positive_scale(raw)
    assert torch.isfinite(scale).all() and (scale >= SCALE_FLOOR).all()
    scale.sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_likelihoods_stay_finite_for_huge_preactivations():
    y = torch.rand(len(HUGE), 3)  # in [0, 1]: valid for both likelihoods
    # Gaussian: moderate loc, scale pre-activations from -3e38 to 3e38.
    out = torch.stack([torch.zeros(len(HUGE), 3), HUGE[:, None].expand(-1, 3)], 1).requires_grad_()
    log_prob = GaussianLikelihood()(out, data_dims=1).log_prob(y)
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert torch.isfinite(out.grad[GRAD_SAFE]).all()
    # Bernoulli: logits up to +-1e30 (no scale; near 3e38 the sum over pixels itself overflows).
    logits = HUGE[GRAD_SAFE, None, None].expand(-1, 1, 3).clone().requires_grad_()
    log_prob = BernoulliLikelihood()(logits, data_dims=1).log_prob(y[GRAD_SAFE])
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_component_densities_stay_finite_for_huge_scales():
    raw = HUGE[:, None, None].expand(-1, 4, 2).clone().requires_grad_()  # (N, K, Dx)
    loc = torch.zeros(len(HUGE), 4, 2)
    log_dens = log_component_densities(loc, positive_scale(raw), torch.randn(len(HUGE), 2))
    assert torch.isfinite(log_dens).all()
    log_dens.sum().backward()
    assert torch.isfinite(raw.grad[GRAD_SAFE]).all()


# --- kill and interrupt -----------------------------------------------------------------
EPOCHS = 40
RUN_FLAGS = ["--train-subset", "400", "--test-subset", "200", "--batch-size", "100", "--no-progress"]


def _start(out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(RUN), "--out", str(out), "--epochs", str(EPOCHS), *RUN_FLAGS]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        args + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _checkpoint_id(out: Path):
    try:
        st = (out / ckpt.CHECKPOINT_NAME).stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _wait_for_new_checkpoint(proc: subprocess.Popen, out: Path, old, timeout: float = 120) -> bool:
    """Wait until the process has written a checkpoint other than ``old``; False if it exited."""
    deadline = time.monotonic() + timeout
    while _checkpoint_id(out) in (None, old):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    return True


def _kill_while_writing(proc: subprocess.Popen, out: Path, timeout: float = 5) -> bool:
    """SIGKILL the moment a temporary checkpoint file appears; True if it was there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name.endswith(".tmp") for name in os.listdir(out)):
            proc.send_signal(signal.SIGKILL)
            return True
    proc.send_signal(signal.SIGKILL)
    return False


# Each kill costs a fresh interpreter (the torch import): two by default, six with -m slow.
@pytest.mark.parametrize("num_kills", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_resume(tmp_path, num_kills):
    out = tmp_path / "run"
    rng = random.Random(num_kills)
    kills, mid_write, resume = 0, 0, False
    while kills < num_kills:
        proc = _start(out, resume)
        if not _wait_for_new_checkpoint(proc, out, _checkpoint_id(out)):
            break  # finished before we could kill it: the loop below checks the outcome
        if kills % 2 == 0:
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
        else:
            mid_write += _kill_while_writing(proc, out)
        proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, required=RESUME_KEYS)
        assert [row["epoch"] for row in state["history"]] == list(range(1, state["epoch"] + 1))
        assert metrics_epochs(out) in (list(range(1, state["epoch"])), list(range(1, state["epoch"] + 1)))
        resume = True
    assert kills == num_kills, f"only {kills} kills landed"
    proc = _start(out, resume=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert metrics_epochs(out) == list(range(1, EPOCHS + 1))
    final = json.loads((out / "metrics.json").read_text())
    assert final["epochs"] == EPOCHS and math.isfinite(final["elbo"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    print(f"{kills} kills, {mid_write} while a checkpoint was being written")


def test_ctrl_c_prints_one_line_and_keeps_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, resume=False)
    assert _wait_for_new_checkpoint(proc, out, None)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, required=RESUME_KEYS)
    assert state["epoch"] >= 1
    assert stderr.splitlines() == [
        f"error: interrupted after epoch {state['epoch']}; the checkpoint in {out} is kept; "
        f"continue with: python experiments/run.py --out {out} --resume"
    ]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    """A kill during epoch 1 leaves config.json and an empty metrics.jsonl: --resume trains it from epoch 1."""
    from pyro_gmvae import Config, train

    out = tmp_path / "run"
    cfg = dict(epochs=2, train_subset=400, test_subset=100, progress=False, out=str(out))
    train(Config(**cfg), make_figures=False)
    (out / "checkpoint.pt").unlink()
    (out / "metrics.jsonl").write_text("")
    result = train(Config(**cfg), resume=True, make_figures=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    """--overwrite deletes the run folder, so it must never delete a folder no run wrote."""
    from pyro_gmvae import Config, train
    from pyro_gmvae.errors import UserInputError

    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(UserInputError, match="--overwrite refused"):
        train(Config(epochs=1, train_subset=400, test_subset=100, progress=False, out=str(tmp_path)), overwrite=True)
    assert precious.read_text() == "keep me"
