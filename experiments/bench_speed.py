"""Training-step speed of the Pyro objective, compiled and eager, against the same objective in plain PyTorch.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py --no-epoch      # the step rows only
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py                 # plus the MNIST epochs
    python experiments/bench_speed.py --device cuda --out experiments/results/speed_cuda.json

Three sides share one model and guide (so the weights are identical), each with its own
Adam as training makes it (:func:`pyro_gmvae.loop.adam`: torch's default kernel on CPU, fused on GPU):

- **compiled**: the default training step, :func:`pyro_gmvae.loop.run_epoch` over S batches
  with the loss module ``make_elbo(M)(model, guide)`` (a
  :class:`~pyro_gmvae.objective.CompiledELBOModule`, which replays a traced graph of
  TraceEnum_ELBO's loss) divided by the batch size, ``zero_grad``, ``backward``, the
  non-finite check and the Adam step;
- **eager**: the same step with ``make_elbo(M, "eager")``, Pyro's own ELBO module;
- **reference**: the same objective written by hand in PyTorch on the same modules (draw w
  then x by reparameterisation, marginalise z with ``logsumexp``, add the same regulariser
  factor), ``zero_grad``, ``backward``, Adam, in a plain loop over the same S batches;
- **reference_loop**: that objective through ``run_epoch``, so with the project's loop and
  its non-finite guard (torch's Adam on the CPU: each step's loss read, the parameters
  once a call, a snapshot of parameters and Adam's state at each call's start; a fused
  Adam on a GPU: a device flag per step): compiled minus reference_loop is what the Pyro
  objective itself adds.

Each timed call is S steps, one ``run_epoch`` (``--steps-per-call``; by default 1,024
examples a call, at least 16 steps and at most 4,096 examples: S = 128 at batch 8, 16 at
64 and 256, 4 at 1,024), as steps run inside a training epoch: the loop's once-an-epoch work
(the shuffle, the guard's snapshot and its read of the parameters, ``epoch_guard_ms`` in
each row, timed alone) is shared by S steps, where a training epoch shares it by more
(MNIST: 7,500 steps at batch 8, 234 at batch 256).  A step time is the call's time / S.

Before timing, the script checks in float64 that the eager and compiled sides give the
reference's loss and gradients on the same random draws.  The sides are then timed
interleaved (compiled, eager, reference_loop, reference, then eager, ..., compiled: each
round starts one side later) in one process after warm-up, so
machine noise (other jobs on shared cores) hits them alike; a ratio is
median(side) / median(reference), and the fixed per-step overhead is
median(side) - median(reference) at batch 8, where the arithmetic is smallest.  The
process first sets glibc's allocator as training does
(:func:`pyro_gmvae.allocator.keep_freed_memory`), for every side alike: without it a step
takes back from the system, page by page, memory the previous step freed, and how much
depends on the heap's history, not on the side (``minor_faults_per_step`` in each row).

On CUDA the rows are repeated under bf16 autocast (all three sides under
``torch.autocast("cuda", torch.bfloat16)``), with examples per second and peak memory, and
one MNIST fc epoch is timed.  Peak memory: on CPU, the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` after freed heap is returned with
``malloc_trim``) over two steps of one side, minus the resident size just before them; on
CUDA, ``torch.cuda.max_memory_allocated`` around the steps.  Render the JSON with
``experiments/speed_table.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyro_gmvae import allocator, loop  # noqa: E402
from pyro_gmvae.build import build_model_and_guide  # noqa: E402
from pyro_gmvae.config import Config  # noqa: E402
from pyro_gmvae.loop import adam, run_epoch  # noqa: E402
from pyro_gmvae.objective import entropy, kl_categorical, make_elbo, z_prior_adjustment  # noqa: E402

HERE = Path(__file__).resolve().parent
MNIST_SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)
SIDES = ("compiled", "eager", "reference_loop", "reference")  # the reference last: every ratio is side / reference
BASE = dict(network="fc", hidden_dim=500, K=10, mc_samples=1)  # the MNIST preset's network
BATCHES = (8, 64, 256, 1024)
# The targets of issue 16 for the default (compiled) step.
OVERHEAD_BATCH, OVERHEAD_LIMIT_MS = 8, 1.0
RATIO_BATCH, RATIO_LIMIT = 256, 1.05


def case_name(case: dict) -> str:
    return "{network} H={hidden_dim} K={K} M={mc_samples} B={batch_size}".format(**case)


def build(case: dict, device: torch.device, seed: int = 0):
    """Model, guide and a batch of grey-level images for one benchmark case."""
    config = Config(data="mnist", **{k: v for k, v in case.items() if k != "batch_size"}).resolved()
    pyro.set_rng_seed(seed)
    model, guide = build_model_and_guide(config, MNIST_SHAPE)
    model.to(device).train()
    guide.to(device).train()
    y = torch.rand((case["batch_size"],) + MNIST_SHAPE, device=device)
    return config, model, guide, y


# --- the reference: the same objective in plain PyTorch ----------------------------------
def _normal_log_prob(value, loc, scale):
    return -0.5 * ((value - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI


def reference_loss(model, guide, y: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Negative ELBO (plus regularisers) summed over the batch, averaged over particles.

    The same estimator TraceEnum_ELBO computes for the v2 guide: single-sample log-density
    ratios for w and x, z summed out exactly, the model's regulariser factor added.
    """
    q = guide.encoder(y)
    batch = (num_particles,) if num_particles > 1 else ()
    # Draw order and calls match Pyro's Normal.rsample: w first, then x.
    w = q["w_loc"] + q["w_loc"].new_empty(batch + q["w_loc"].shape).normal_() * q["w_scale"]
    x = q["x_loc"] + q["x_loc"].new_empty(batch + q["x_loc"].shape).normal_() * q["x_scale"]
    log_q = _normal_log_prob(w, q["w_loc"], q["w_scale"]).sum(-1)
    log_q = log_q + _normal_log_prob(x, q["x_loc"], q["x_scale"]).sum(-1)
    log_pw = (-0.5 * w**2 - 0.5 * LOG_2PI).sum(-1)
    loc, scale = model.prior.network(w)  # (M, B, K, Dx)
    log_pi = model.prior.cluster_log_weights()
    log_joint_z = log_pi + _normal_log_prob(x.unsqueeze(-2), loc, scale).sum(-1)  # (M, B, K)
    log_px = torch.logsumexp(log_joint_z, -1)
    logits = model.decoder(x).select(-4, 0)  # (M, B, 1, 28, 28)
    recon = -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").flatten(-3).sum(-1)
    reg = model.regularization
    log_r = torch.log_softmax(log_joint_z, -1)
    factor = -reg.cv_weight * entropy(log_r)
    if reg.touches_z_prior:
        factor = factor + z_prior_adjustment(kl_categorical(log_r, log_pi), reg)
    elbo = log_pw + log_px + recon + factor - log_q  # (M, B)
    return -elbo.sum() / num_particles


# --- the three steps --------------------------------------------------------------------
class Sides:
    """The three training steps of one case on shared modules, each with its own Adam (loop.adam)."""

    def __init__(self, case: dict, device: torch.device, autocast: torch.dtype | None = None, steps: int = 1):
        self.case, self.device, self.autocast, self.steps_per_call = case, device, autocast, steps
        self.config, self.model, self.guide, self.data = build(
            {**case, "batch_size": case["batch_size"] * steps}, device
        )
        self.y = self.data[: case["batch_size"]]  # the batch of the float64 check
        m = case["mc_samples"]
        self.loss_modules = {
            "compiled": make_elbo(m)(self.model, self.guide),
            "eager": make_elbo(m, "eager")(self.model, self.guide),
        }
        self.loss_fn = self.loss_modules["eager"]
        self.optimizers = {side: adam(self.loss_fn.parameters(), self.config.lr) for side in SIDES}
        self.order = torch.Generator(device="cpu").manual_seed(0)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def project(self, side: str = "compiled"):
        """S steps of training: the loop over an epoch of S batches."""
        loss_module = self.loss_modules[side]
        loss = lambda y: loss_module(y) / len(y)  # noqa: E731
        with self._autocast():
            return run_epoch(loss, self.optimizers[side], self.data, len(self.y), self.order)

    def reference_loop(self):
        """The reference objective through the project's loop (its non-finite guard included)."""
        loss = lambda y: reference_loss(self.model, self.guide, y, self.case["mc_samples"]) / len(y)  # noqa: E731
        with self._autocast():
            return run_epoch(loss, self.optimizers["reference_loop"], self.data, len(self.y), self.order)

    def reference(self):
        """S plain steps over the same S batches, in order."""
        optimizer, batch = self.optimizers["reference"], len(self.y)
        for step in range(self.steps_per_call):
            y = self.data[step * batch : (step + 1) * batch]
            with self._autocast():
                loss = reference_loss(self.model, self.guide, y, self.case["mc_samples"]) / batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        return loss

    def steps(self) -> dict:
        return {
            "compiled": self.project,
            "eager": lambda: self.project("eager"),
            "reference_loop": self.reference_loop,
            "reference": self.reference,
        }

    def check(self, rtol: float = 1e-5, batch: int | None = None) -> dict:
        """Same loss and gradients on the same draws (float64 on CPU, so rounding is not the test).

        The eager side's first call, then the compiled side's third (its first is eager, its
        second traces), each against the reference on the same seed.  ``batch`` checks on the
        first ``batch`` examples only (the maths does not depend on B).
        """
        model, guide = self.model, self.guide
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        model.to(dtype), guide.to(dtype)
        y = self.y[:batch].to(dtype)
        params = list(self.loss_fn.parameters())
        out = {"batch": len(y)}
        try:
            pyro.set_rng_seed(123)
            loss_r = reference_loss(model, guide, y, self.case["mc_samples"])
            grads_r = torch.autograd.grad(loss_r, params, allow_unused=True)
            for side, calls in (("eager", 1), ("compiled", 3)):
                for _ in range(calls):
                    pyro.set_rng_seed(123)
                    loss_p = self.loss_modules[side](y)
                grads_p = torch.autograd.grad(loss_p, params, allow_unused=True)
                out[side] = _compare(side, float(loss_p.detach()), grads_p, float(loss_r.detach()), grads_r, rtol)
                out[side]["loss_reference"] = float(loss_r.detach())
        finally:
            model.to(torch.float32), guide.to(torch.float32)
        if any(out[side]["differs"] for side in ("eager", "compiled")):
            raise AssertionError(f"{case_name(self.case)}: project and reference differ: {out}")
        return out


def _compare(side, loss_p, grads_p, loss_r, grads_r, rtol) -> dict:
    rel = abs(loss_p - loss_r) / abs(loss_r)
    # Relative to the largest gradient: biases before BatchNorm have gradient zero (rounding only).
    pairs = [(gp, gr) for gp, gr in zip(grads_p, grads_r, strict=True) if gr is not None]
    grad_scale = max(float(gr.abs().max()) for _, gr in pairs)
    grad_rel = max(float((gp - gr).abs().max()) for gp, gr in pairs) / grad_scale
    return dict(loss_project=loss_p, loss_rel_diff=rel, grad_rel_diff=grad_rel, differs=rel > rtol or grad_rel > 1e-4)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device, batch: int, warmup: int, min_steps: int, max_steps: int, budget_s: float,
                     per_call: int = 1):  # fmt: skip
    """Median step times of step functions run in turn (A B C, B C A, C A B, ...) after warm-up.

    ``steps`` maps names to zero-argument callables that make ``per_call`` steps each (a
    step's time is a call's / ``per_call``); the last is the reference of every
    ratio.  Per side: ``ratio`` = median / median(reference), ``ratio_pairwise_median``
    (the median of per-round ratios, robust to drifts) and ``added_ms`` = median -
    median(reference) of wall time; ``cpu_ratio`` and ``cpu_added_ms`` the same of this
    process's CPU time (``time.process_time``, all its threads), which time spent waiting
    for other jobs on shared cores does not inflate; ``minor_faults_per_step`` the mean
    page faults of a step (memory the allocator took back from the system).
    """
    items = list(steps.items())
    t_warm = time.perf_counter()
    for _ in range(warmup):
        for _, step in items:
            step()
        _sync(device)
        if time.perf_counter() - t_warm > budget_s / 4:  # slow cases: a few rounds warm up enough
            break
    times = {name: [] for name, _ in items}
    cpu = {name: [] for name, _ in items}
    faults = {name: 0 for name, _ in items}
    start = time.perf_counter()
    rounds = 0
    while len(times[items[0][0]]) < max_steps:
        # Each round starts one side later (A B C, B C A, C A B, ...): every side follows every
        # other equally often, so what one step leaves behind (freed memory, cold caches)
        # does not always land on the same next side.
        turn = rounds % len(items)
        rounds += 1
        for name, step in items[turn:] + items[:turn]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / per_call)
            cpu[name].append((time.process_time() - c0) / per_call)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        if len(times[items[0][0]]) >= min_steps and time.perf_counter() - start > budget_s:
            break
    ref_name = items[-1][0]
    ref = times[ref_name]
    out = {"steps_per_side": len(ref) * per_call, "steps_per_call": per_call, "reference_side": ref_name}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_step_s": med, "examples_per_s": batch / med, "min_step_s": min(ts)}
        out[name]["median_cpu_s"] = statistics.median(cpu[name])  # this process's CPU time: waits on others excluded
        out[name]["minor_faults_per_step"] = faults[name] / (len(ts) * per_call)
    for name, ts in times.items():
        if name == ref_name:
            continue
        out[name]["ratio"] = out[name]["median_step_s"] / out[ref_name]["median_step_s"]
        out[name]["ratio_pairwise_median"] = statistics.median(a / b for a, b in zip(ts, ref, strict=True))
        out[name]["added_ms"] = (out[name]["median_step_s"] - out[ref_name]["median_step_s"]) * 1e3
        out[name]["cpu_ratio"] = out[name]["median_cpu_s"] / out[ref_name]["median_cpu_s"]
        out[name]["cpu_added_ms"] = (out[name]["median_cpu_s"] - out[ref_name]["median_cpu_s"]) * 1e3
    return out


# --- memory -----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_and_reset_peak() -> int:
    """Free what can be freed, return it to the OS, reset the peak RSS; the resident KiB after."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kib("VmRSS")


def step_peak_memory(step, device: torch.device, steps: int = 2) -> float:
    """Peak memory (MiB) of ``steps`` training steps above what is resident before them.

    CPU: VmHWM - VmRSS of this process, with the peak reset and freed heap returned to the OS
    just before (parameters, Adam state and data are resident already, so this is what a step
    allocates: activations, the autograd graph, gradients).  CUDA: max_memory_allocated delta.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _release_and_reset_peak()
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - base) / 1024


def parameter_mib(sides: Sides) -> float:
    return sum(p.numel() * p.element_size() for p in sides.loss_fn.parameters()) / 2**20


def epoch_throughput(device: str, data_root: str | None, elbo: str = "compiled", init: str = "random",
                     train_subset: int | None = None, adam_kernel: str = "auto") -> dict:  # fmt: skip
    """One MNIST fc epoch through ``pyro_gmvae.train`` on the preset's network: seconds, examples/s, peak memory.

    ``init`` "random" times the epoch alone; the preset's ``--init`` also runs its
    initialisation (pretraining, embedding, fit) first, reported apart as the wall time.
    ``adam_kernel`` is ``--adam-kernel`` (on the CPU, "fused" replaces torch's default kernel).
    """
    from pyro_gmvae import train

    batch_size = 256
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            data="mnist", data_root=data_root, network="fc", hidden_dim=500, K=10, batch_size=batch_size, epochs=1,
            init=init, elbo=elbo, adam_kernel=adam_kernel, device=device, out=str(Path(tmp) / "run"), progress=False,
            train_subset=train_subset, test_subset=2000,  # evaluation is not what is timed; keep it short
            augment_weight=0.0 if init == "random" else None,  # from scratch: the paper's objective alone
        )  # fmt: skip
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        base = None if cuda else _release_and_reset_peak()
        t0 = time.perf_counter()
        result = train(config, make_figures=False)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else (_status_kib("VmHWM") - base) / 1024
    seconds = result.history[-1]["seconds"]
    num_train = train_subset or 60000
    steps = num_train // batch_size
    return {
        "elbo": elbo, "init": init, "adam_kernel": adam_kernel,
        "data": f"mnist, {num_train} training images" + ("" if train_subset else " (the full training set)"),
        "network": "fc", "hidden_dim": 500, "K": 10, "mc_samples": 1, "batch_size": batch_size, "steps": steps,
        "train_seconds": seconds, "examples_per_s": steps * batch_size / seconds,
        "wall_seconds_with_init_load_eval_checkpoint": wall,
        "peak_memory_mib": peak, "peak_memory_method": "cuda max_memory_allocated" if cuda else "peak RSS above start",
        "device": device,
    }  # fmt: skip


def steps_per_call(batch: int, requested: int | None) -> int:
    """S of one timed call: as requested, else 1,024 examples and at least 16 steps; at most 4,096 examples."""
    wanted = requested if requested is not None else max(16, 1024 // batch)
    return max(1, min(wanted, 4096 // batch))


def epoch_guard_ms(optimizer: torch.optim.Optimizer, repeats: int = 9) -> dict:
    """Median ms of run_epoch's once-an-epoch guard work for ``optimizer``'s parameters.

    With torch's Adam on the CPU: the snapshot at the start (parameters, Adam's state, the
    random state) and the read of the parameters at the end; with a fused optimiser there
    is none (``null``).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or loop.guard_kind(optimizer, params[0].device) != "deferred":
        return {"snapshot": None, "end_check": None}
    out = {}
    for name, work in (("snapshot", lambda: loop._Snapshot(params, optimizer, torch.Generator())),
                       ("end_check", lambda: loop._host_all_finite(params))):  # fmt: skip
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            work()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def run_case(case, device, args, autocast: torch.dtype | None = None) -> dict:
    """Check, time and (unless --no-memory) measure one case; print a line."""
    sides = Sides(case, device, autocast, steps=steps_per_call(case["batch_size"], args.steps_per_call))
    row = {"case": case, "name": case_name(case), "autocast": str(autocast) if autocast else None}
    row["parameters_mib"] = parameter_mib(sides)
    t0 = time.perf_counter()
    if autocast is None:
        row["check"] = sides.check(batch=min(case["batch_size"], 64))
        row["check"]["seconds"] = time.perf_counter() - t0
    steps = sides.steps()
    row.update(time_interleaved(steps, device, case["batch_size"], args.warmup, args.min_steps, args.max_steps,
                                args.budget, per_call=sides.steps_per_call))  # fmt: skip
    row["epoch_guard_ms"] = epoch_guard_ms(sides.optimizers["compiled"])
    if not args.no_memory:
        row["memory_method"] = (
            "MiB, torch.cuda.max_memory_allocated delta over 2 calls (2 S steps)" if device.type == "cuda"
            else "MiB, peak RSS (VmHWM) over 2 calls (2 S steps) minus RSS before them, after the timed steps"
        )  # fmt: skip
        for side, step in steps.items():
            row[side]["peak_memory_mib"] = step_peak_memory(step, device)
    sides = [
        f"{s} x{row[s]['ratio']:.3f} {row[s]['added_ms']:+.2f} ms (cpu x{row[s]['cpu_ratio']:.3f})" for s in SIDES[:-1]
    ]
    ref_ms = row["reference"]["median_step_s"] * 1e3
    print(f"{row['name']:<26} {row['autocast'] or ''}  {'  '.join(sides)}  reference {ref_ms:.1f} ms", flush=True)
    return row


def acceptance(rows: list[dict]) -> list[dict]:
    """The targets of issue 16 for the compiled (default) side; the eager side's values beside them."""
    by_batch = {row["case"]["batch_size"]: row for row in rows if row["autocast"] is None}
    out = []
    for what, batch, key, limit, unit in (
        ("fixed per-step overhead", OVERHEAD_BATCH, "added_ms", OVERHEAD_LIMIT_MS, "ms"),
        ("step time / reference", RATIO_BATCH, "ratio", RATIO_LIMIT, "x"),
    ):
        if batch not in by_batch:
            continue
        row = by_batch[batch]
        against_loop = (
            (row["compiled"]["median_step_s"] - row["reference_loop"]["median_step_s"]) * 1e3
            if key == "added_ms"
            else row["compiled"]["median_step_s"] / row["reference_loop"]["median_step_s"]
        )
        out.append({
            "what": what, "batch": batch, "unit": unit, "limit": limit, "compiled": row["compiled"][key],
            "eager": row["eager"][key], "reference_loop": row["reference_loop"][key],
            "compiled_against_reference_loop": against_loop,
            "pass": row["compiled"][key] <= limit, "steps_per_side": row["steps_per_side"],
        })  # fmt: skip
    return out


def git_state() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = run("git", "status", "--porcelain", "--", "pyro_gmvae", "models", "guides", "experiments/bench_speed.py")
    return {"commit": run("git", "rev-parse", "HEAD"), "library_files_changed_since_commit": bool(dirty)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timing per case once min steps are done")
    p.add_argument("--warmup", type=int, default=4, help="rounds before timing (the compiled side traces in round 2)")
    p.add_argument("--min-steps", type=int, default=20, help="timed calls per side (at least)")
    p.add_argument("--max-steps", type=int, default=80, help="timed calls per side (at most)")
    p.add_argument(
        "--steps-per-call", type=int, default=None,
        help="steps S of one timed call (default: 1024 / batch, at least 16; at most 4096 / batch)",
    )  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA, skip the bf16 autocast rows")
    p.add_argument("--no-epoch", action="store_true", help="skip the MNIST epochs")
    p.add_argument(
        "--default-init-subset", type=int, default=10000,
        help="training images of the epoch run with the preset's --init (its UMAP and pretraining scale with it); "
        "0 skips that run",
    )  # fmt: skip
    p.add_argument("--data-root", help="folder holding MNIST/raw (default: $PYRO_GMVAE_DATA, then ./data)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    heap = allocator.keep_freed_memory()  # as train() does: every side, the reference too, reuses freed memory
    pyro.enable_validation(False)  # the timed steps; training keeps it on (the compiled replay skips it anyway)
    started = time.perf_counter()
    info = {**machine(device), "load_average_start": list(os.getloadavg())}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = {
        "device": str(device),
        "device_name": gpu or f"{info['cpu_model']}, {info['torch_threads']} threads",
        "machine": info, "gpu": gpu, "gpu_note": None if gpu else "no GPU in this session: the CUDA rows are not run",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
        "git": git_state(),
        "command": "python experiments/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**BASE, "batches": args.batches, "validation": False,
                   "optimizer": "Adam (loop.adam: default kernel on CPU, fused on GPU)",
                   "data": "uniform grey levels, MNIST shape", "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "allocator": heap or "the C library's own settings (allocator.keep_freed_memory set nothing)"},
        "timing": "median step times of interleaved steps (the sides in turn, repeated) after warm-up",
        "sides": list(SIDES), "rows": [], "acceptance": [],
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row: partial results survive an interrupted run
        report["machine"]["load_average_now"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")

    for batch in args.batches:
        report["rows"].append(run_case({**BASE, "batch_size": batch}, device, args))
        report["acceptance"] = acceptance(report["rows"])
        save()
    if device.type == "cuda" and not args.no_bf16:
        for batch in args.batches:
            report["rows"].append(run_case({**BASE, "batch_size": batch}, device, args, autocast=torch.bfloat16))
            save()
    if not args.no_epoch:
        report["epochs"] = []
        runs = [("compiled", "random", None, "auto"), ("eager", "random", None, "auto")]
        if device.type == "cpu":  # on a GPU "auto" is the fused kernel already
            runs.append(("compiled", "random", None, "fused"))
        if args.default_init_subset:
            runs.append(("compiled", Config(data="mnist").resolved().init, args.default_init_subset, "auto"))
        for elbo, init, subset, kernel in runs:
            try:
                report["epochs"].append(epoch_throughput(args.device, args.data_root, elbo, init, subset, kernel))
            except Exception as err:  # noqa: BLE001 - e.g. MNIST missing: record it, keep the rest
                report["epochs"].append({"elbo": elbo, "init": init, "adam_kernel": kernel, "error": repr(err)[:500]})
            print(report["epochs"][-1], flush=True)
            save()
    report["machine"]["load_average_end"] = list(os.getloadavg())
    save()
    print(f"wrote {out}")
    return 0 if all(row["pass"] for row in report["acceptance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
