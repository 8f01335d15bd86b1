"""Training-step speed of the Pyro objective against the same objective in plain PyTorch.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py --quick --no-epoch  # acceptance rows
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py                     # everything
    python experiments/bench_speed.py --device cuda --out experiments/results/speed_cuda.json

The project side is one step of training: :func:`pyro_gmvae.loop.run_epoch` over one batch
(the loss module ``make_elbo(M)(model, guide)`` divided by the batch size, ``zero_grad``,
``backward``, the non-finite check and an Adam step).  The reference side is the same
objective written by hand in PyTorch on the *same* network modules (so the weights are
identical): draw w then x by reparameterisation, marginalise z with ``logsumexp``, add the
same regulariser factor, Adam step.  Before timing, the script checks that both give the
same loss and gradients on the same random draws.  The two sides are then timed
interleaved (A B A B ...) in one process after warm-up, so machine noise (other jobs on the
shared cores) hits both alike; the reported ratio is median(project) / median(reference).

Peak memory: on CPU, the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` after freed heap is returned with ``malloc_trim``) over two steps
of one side, minus the resident size just before them; on CUDA,
``torch.cuda.max_memory_allocated`` around the steps.  Grid cases left when ``--deadline``
seconds have passed are listed in ``grid_skipped``.  Render the JSON with
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
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyro_gmvae.build import build_model_and_guide  # noqa: E402
from pyro_gmvae.config import Config  # noqa: E402
from pyro_gmvae.loop import run_epoch  # noqa: E402
from pyro_gmvae.objective import entropy, kl_categorical, make_elbo, z_prior_adjustment  # noqa: E402

HERE = Path(__file__).resolve().parent
MNIST_SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)

# The acceptance rows of issue 4 and their limits on project / reference.
ACCEPTANCE = [
    (dict(network="fc", hidden_dim=500, K=10, mc_samples=1, batch_size=256), 1.15),
    (dict(network="fc", hidden_dim=500, K=10, mc_samples=1, batch_size=50), 1.3),
]


def grid() -> list[dict]:
    """Every case beyond the acceptance rows; conv first, then fc from cheap to costly."""
    fc = [
        dict(network="fc", hidden_dim=h, K=k, mc_samples=m, batch_size=b)
        for h in (500, 1000)
        for k in (10, 30)
        for m in (1, 10)
        for b in (50, 256, 1024)
    ]
    cost = lambda c: c["hidden_dim"] ** 2 * c["K"] * c["mc_samples"] * c["batch_size"]  # noqa: E731
    return [dict(network="conv", hidden_dim=500, K=10, mc_samples=1, batch_size=256), *sorted(fc, key=cost)]


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


# --- the two steps ---------------------------------------------------------------------
class Sides:
    """Both training steps of one case on shared modules, each with its own Adam."""

    def __init__(self, case: dict, device: torch.device):
        self.case, self.device = case, device
        self.config, self.model, self.guide, self.y = build(case, device)
        self.loss_fn = make_elbo(case["mc_samples"])(self.model, self.guide)
        self.opt_project = torch.optim.Adam(self.loss_fn.parameters(), lr=self.config.lr)
        self.opt_reference = torch.optim.Adam(self.loss_fn.parameters(), lr=self.config.lr)
        self.order = torch.Generator(device="cpu").manual_seed(0)

    def project(self):
        """One step of training: the loop over a one-batch epoch."""
        loss = lambda y: self.loss_fn(y) / len(y)  # noqa: E731
        return run_epoch(loss, self.opt_project, self.y, len(self.y), self.order)

    def reference(self):
        loss = reference_loss(self.model, self.guide, self.y, self.case["mc_samples"]) / len(self.y)
        self.opt_reference.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_reference.step()
        return loss

    def check(self, rtol: float = 1e-5, batch: int | None = None) -> dict:
        """Same loss and gradients on the same draws (float64 on CPU, so rounding is not the test).

        ``batch`` checks on the first ``batch`` examples only (the maths does not depend on B;
        float64 steps of the large cases would cost more than their timing).
        """
        model, guide = self.model, self.guide
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        model.to(dtype), guide.to(dtype)
        y = self.y[:batch].to(dtype)
        params = list(self.loss_fn.parameters())
        try:
            pyro.set_rng_seed(123)
            loss_p = self.loss_fn(y)
            grads_p = torch.autograd.grad(loss_p, params, allow_unused=True)
            pyro.set_rng_seed(123)
            loss_r = reference_loss(model, guide, y, self.case["mc_samples"])
            grads_r = torch.autograd.grad(loss_r, params, allow_unused=True)
        finally:
            model.to(torch.float32), guide.to(torch.float32)
        loss_p, loss_r = float(loss_p.detach()), float(loss_r.detach())
        rel = abs(loss_p - loss_r) / abs(loss_r)
        # Relative to the largest gradient: biases before BatchNorm have gradient zero (rounding only).
        pairs = [(gp, gr) for gp, gr in zip(grads_p, grads_r, strict=True) if gr is not None]
        grad_scale = max(float(gr.abs().max()) for _, gr in pairs)
        grad_rel = max(float((gp - gr).abs().max()) for gp, gr in pairs) / grad_scale
        if rel > rtol or grad_rel > 1e-4:
            raise AssertionError(
                f"{case_name(self.case)}: project and reference differ (loss rel {rel:.2e}, grad rel {grad_rel:.2e})"
            )
        return dict(batch=len(y), loss_project=loss_p, loss_reference=loss_r, loss_rel_diff=rel, grad_rel_diff=grad_rel)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device, batch: int, warmup: int, min_steps: int, max_steps: int, budget_s: float):
    """Median step times of two step functions run alternately (A B A B ...) after warm-up.

    ``steps`` maps two names to zero-argument callables; the first is the numerator of the ratio.
    """
    (name_a, step_a), (name_b, step_b) = steps.items()
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step_a()
        step_b()
        _sync(device)
        if time.perf_counter() - t_warm > budget_s / 4:  # slow cases: one or two pairs warm up enough
            break
    times = {name_a: [], name_b: []}
    start = time.perf_counter()
    while len(times[name_a]) < max_steps:
        for name, step in ((name_a, step_a), (name_b, step_b)):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if len(times[name_a]) >= min_steps and time.perf_counter() - start > budget_s:
            break
    out = {"steps_per_side": len(times[name_a])}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_step_s": med, "examples_per_s": batch / med, "min_step_s": min(ts)}
    # Ratio of medians and the median of per-pair ratios (the second is robust to drifts).
    out["ratio"] = out[name_a]["median_step_s"] / out[name_b]["median_step_s"]
    out["ratio_pairwise_median"] = statistics.median(a / b for a, b in zip(times[name_a], times[name_b], strict=True))
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


def option_validation(case: dict, device: torch.device, args) -> dict:
    """Pyro validation on (training's default) against off (the timed steps here), interleaved."""
    sides = Sides(case, device)

    def on():
        with pyro.validation_enabled(True):
            sides.project()

    def off():
        with pyro.validation_enabled(False):
            sides.project()

    row = {"option": "validation_on", "name": case_name(case), "what": "pyro.enable_validation(True) vs False"}
    steps = {"with_option": on, "default": off}
    row.update(time_interleaved(steps, device, case["batch_size"], 3, args.min_steps, args.max_steps, args.budget))
    return row


def epoch_throughput(device: str, train_subset: int | None = None, data_root: str | None = None) -> dict:
    """Examples per second of one MNIST fc training epoch through ``pyro_gmvae.train``, and its peak memory."""
    from pyro_gmvae import train

    batch_size = 256
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            data="mnist", data_root=data_root, network="fc", hidden_dim=500, K=10, batch_size=batch_size, epochs=1,
            init="random",  # one training epoch is timed, not the preset's initialisation
            device=device, out=str(Path(tmp) / "run"), progress=False, train_subset=train_subset,
            test_subset=2000,  # evaluation is not what is timed; keep it short
        )  # fmt: skip
        base = _release_and_reset_peak() if device == "cpu" else None
        t0 = time.perf_counter()
        result = train(config, make_figures=False)
        wall = time.perf_counter() - t0
        peak = (_status_kib("VmHWM") - base) / 1024 if base is not None else None
    seconds = result.history[-1]["seconds"]
    num_train = train_subset or 60000
    steps = num_train // batch_size
    return {
        "data": f"mnist, {num_train} training images" + ("" if train_subset else " (the full training set)"),
        "network": "fc", "hidden_dim": 500, "K": 10, "mc_samples": 1, "batch_size": batch_size, "steps": steps,
        "train_seconds": seconds, "examples_per_s": steps * batch_size / seconds,
        "wall_seconds_with_load_eval_checkpoint": wall, "peak_rss_delta_mib": peak, "device": device,
    }  # fmt: skip


def run_case(case, device, args, min_steps: int) -> dict:
    """Check, time and (unless --no-memory) measure one case; print a line."""
    sides = Sides(case, device)
    row = {"case": case, "name": case_name(case), "parameters_mib": parameter_mib(sides)}
    t0 = time.perf_counter()
    row["check"] = sides.check(batch=min(case["batch_size"], 64))
    row["check"]["seconds"] = time.perf_counter() - t0
    steps = {"project": sides.project, "reference": sides.reference}
    row.update(
        time_interleaved(steps, device, case["batch_size"], 3, min_steps, max(args.max_steps, min_steps), args.budget)
    )
    line = f"{row['name']:<30} ratio {row['ratio']:.3f} (pairwise {row['ratio_pairwise_median']:.3f})"
    if not args.no_memory:
        row["memory_method"] = (
            "MiB, torch.cuda.max_memory_allocated delta over 2 steps" if device.type == "cuda"
            else "MiB, peak RSS (VmHWM) over 2 steps minus RSS before them, after the timed steps"
        )  # fmt: skip
        for side, step in steps.items():
            row[side]["peak_memory_mib"] = step_peak_memory(step, device)
    print(line, flush=True)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the acceptance rows (no grid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timing per case once min steps are done")
    p.add_argument("--min-steps", type=int, default=8, help="timed steps per side (at least)")
    p.add_argument("--min-steps-acceptance", type=int, default=30, help="timed steps per side, acceptance rows")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--deadline", type=float, default=1800.0, help="seconds in all: later grid cases are skipped")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument("--no-epoch", action="store_true", help="skip the MNIST epochs")
    p.add_argument("--no-options", action="store_true", help="skip the validation_on option")
    p.add_argument("--data-root", help="folder holding MNIST/raw (default: $PYRO_GMVAE_DATA, then ./data)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pyro.enable_validation(False)  # training keeps it on; the validation_on option measures the cost
    started = time.perf_counter()
    info = {**machine(device), "load_average_start": list(os.getloadavg())}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = {
        "device": str(device),
        "device_name": gpu or f"{info['cpu_model']}, {info['torch_threads']} threads",
        "machine": info, "gpu": gpu, "gpu_note": None if gpu else "not available in this session",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
        "command": "python experiments/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": "median step time of interleaved steps (project, reference, project, ...) after warm-up",
        "acceptance": [], "options": [], "grid": [], "grid_skipped": [],
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row: partial results survive an interrupted run
        report["machine"]["load_average_now"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")

    for case, limit in ACCEPTANCE:
        row = run_case(case, device, args, args.min_steps_acceptance)
        report["grid"].append(row)
        keys = ("name", "ratio", "ratio_pairwise_median", "steps_per_side")
        report["acceptance"].append({**{k: row[k] for k in keys}, "limit": limit, "pass": row["ratio"] <= limit})
        save()
    if not args.no_options:
        report["options"].append(option_validation(ACCEPTANCE[0][0], device, args))
        save()
    if not args.no_epoch:
        report["epochs"] = []
        for subset in (None, 15000):  # the full training set, then a quarter of it (data-size scaling)
            try:
                report["epochs"].append(epoch_throughput(args.device, subset, args.data_root))
            except Exception as err:  # noqa: BLE001 - e.g. MNIST missing: record it, keep the grid
                report["epochs"].append({"train_subset": subset, "error": repr(err)[:500]})
            save()
    for case in [] if args.quick else grid():
        if case in [row["case"] for row in report["grid"]]:
            continue
        if time.perf_counter() - started > args.deadline:
            reason = f"the --deadline of {args.deadline:.0f} s had passed"
            report["grid_skipped"].append({"name": case_name(case), "case": case, "reason": reason})
            continue
        report["grid"].append(run_case(case, device, args, args.min_steps))
        save()
    report["machine"]["load_average_end"] = list(os.getloadavg())
    save()
    print(f"wrote {out}")
    return 0 if all(row["pass"] for row in report["acceptance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
