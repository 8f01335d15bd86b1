"""Training-step speed of the Pyro objective against the same objective in plain PyTorch.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py --quick     # acceptance rows
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py             # full grid
    python experiments/bench_speed.py --device cuda --out experiments/results/speed_cuda.json

The project side is exactly one step of ``pyro_gmvae.training.train``: the loss module of
``make_elbo(M)(model, guide)``, divided by the batch size, ``zero_grad``, ``backward``,
the non-finite check and an Adam step.  The reference side is the same objective written
by hand in PyTorch on the *same* network modules (so the weights are identical): draw w
then x by reparameterisation from the encoder outputs, marginalise z with ``logsumexp``,
add the same regulariser factor, Adam step.  Before timing, the script checks that both
give the same loss and gradients on the same random draws.  The two sides are then timed
interleaved (A B A B ...) in one process after warm-up, so machine noise (other jobs on the
2 shared cores) hits both alike; the reported ratio is median(project) / median(reference).

Peak memory: on CPU, the peak resident set size (``VmHWM``) of a fresh child process that
runs a few steps of one side, minus its resident size just before the first step; on CUDA,
``torch.cuda.max_memory_allocated`` around the steps of each side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyro_gmvae.build import build_model_and_guide  # noqa: E402
from pyro_gmvae.config import Config  # noqa: E402
from pyro_gmvae.objective import entropy, kl_categorical, make_elbo, z_prior_adjustment  # noqa: E402

HERE = Path(__file__).resolve().parent
MNIST_SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)

# The acceptance rows of issue 4 and their limits on project / reference.
ACCEPTANCE = [
    (dict(network="fc", hidden_dim=500, K=10, mc_samples=1, batch_size=256), 1.15),
    (dict(network="fc", hidden_dim=500, K=10, mc_samples=1, batch_size=50), 1.3),
]


def grid(quick: bool) -> list[dict]:
    if quick:
        return [case for case, _ in ACCEPTANCE]
    cases = [
        dict(network="fc", hidden_dim=h, K=k, mc_samples=m, batch_size=b)
        for h in (500, 1000)
        for k in (10, 30)
        for m in (1, 10)
        for b in (50, 256, 1024)
    ]
    cases.append(dict(network="conv", hidden_dim=500, K=10, mc_samples=1, batch_size=256))
    return cases


def case_name(case: dict) -> str:
    return "{network} H={hidden_dim} K={K} M={mc_samples} B={batch_size}".format(**case)


# --- building ---------------------------------------------------------------------------
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
    log_q = _normal_log_prob(w, q["w_loc"], q["w_scale"]).sum(-1) + _normal_log_prob(x, q["x_loc"], q["x_scale"]).sum(
        -1
    )
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


# --- steps ------------------------------------------------------------------------------
def project_step(loss_fn, optimizer, y, state):
    """One step of ``training.train`` (keep in step with its loop)."""
    loss = loss_fn(y) / y.shape[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in loss_fn.parameters() if p.grad is not None])
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    state["bad"] = torch.where((state["bad"] < 0) & ~finite, state["step"], state["bad"])
    state["step"] += 1
    optimizer.step()
    return loss


def reference_step(model, guide, optimizer, y, num_particles):
    loss = reference_loss(model, guide, y, num_particles) / y.shape[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class Sides:
    """Both training steps of one case on shared modules, each with its own Adam."""

    def __init__(self, case: dict, device: torch.device, option: str = "default"):
        self.case, self.device, self.option = case, device, option
        self.config, self.model, self.guide, self.y = build(case, device)
        if option == "channels_last":
            self.model.to(memory_format=torch.channels_last)
            self.guide.to(memory_format=torch.channels_last)
            self.y = self.y.contiguous(memory_format=torch.channels_last)
        if option == "compile":
            for module in (self.guide.encoder, self.model.decoder, self.model.prior.network):
                module.compile()
        self.loss_fn = make_elbo(case["mc_samples"], jit=option == "jit")(self.model, self.guide)
        lr = self.config.lr
        self.opt_project = torch.optim.Adam(self.loss_fn.parameters(), lr=lr)
        self.opt_reference = torch.optim.Adam(self.loss_fn.parameters(), lr=lr)
        self.state = {"bad": torch.full((), -1, device=device, dtype=torch.long), "step": 0}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if option == "bf16" else contextlib.nullcontext()

    def project(self):
        with self.autocast:
            return project_step(self.loss_fn, self.opt_project, self.y, self.state)

    def reference(self):
        with self.autocast:
            return reference_step(self.model, self.guide, self.opt_reference, self.y, self.case["mc_samples"])

    def check(self, rtol: float = 1e-5) -> dict:
        """Same loss and gradients on the same draws (float64 on CPU, so rounding is not the test)."""
        model, guide, y = self.model, self.guide, self.y
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        model.to(dtype)
        guide.to(dtype)
        y = y.to(dtype)
        params = list(self.loss_fn.parameters())
        try:
            pyro.set_rng_seed(123)
            loss_p = self.loss_fn(y)
            grads_p = torch.autograd.grad(loss_p, params, allow_unused=True)
            pyro.set_rng_seed(123)
            loss_r = reference_loss(model, guide, y, self.case["mc_samples"])
            grads_r = torch.autograd.grad(loss_r, params, allow_unused=True)
        finally:
            model.to(torch.float32)
            guide.to(torch.float32)
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
        return {"loss_project": loss_p, "loss_reference": loss_r, "loss_rel_diff": rel, "grad_rel_diff": grad_rel}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(sides: Sides, warmup: int, min_steps: int, max_steps: int, budget_s: float) -> dict:
    """Median step times of both sides, A B A B ..., after ``warmup`` steps of each."""
    device = sides.device
    t_warm = time.perf_counter()
    for _ in range(warmup):
        sides.project()
        sides.reference()
        _sync(device)
        if time.perf_counter() - t_warm > budget_s / 4:  # slow cases: one or two pairs warm up enough
            break
    times = {"project": [], "reference": []}
    start = time.perf_counter()
    while len(times["project"]) < max_steps:
        for name in ("project", "reference"):
            t0 = time.perf_counter()
            getattr(sides, name)()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        done = len(times["project"])
        if done >= min_steps and time.perf_counter() - start > budget_s:
            break
    batch = sides.case["batch_size"]
    out = {"steps_per_side": len(times["project"])}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_step_s": med, "examples_per_s": batch / med}
    # Ratio of medians and the median of per-pair ratios (the second is robust to drifts).
    out["ratio"] = out["project"]["median_step_s"] / out["reference"]["median_step_s"]
    out["ratio_pairwise_median"] = statistics.median(
        p / r for p, r in zip(times["project"], times["reference"], strict=True)
    )
    return out


# --- memory -----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(case: dict, side: str, device: torch.device, steps: int = 2) -> float:
    """Peak memory (MiB) of ``steps`` training steps of one side (see module docstring)."""
    sides = Sides(case, device)
    step = sides.project if side == "project" else sides.reference
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - base) / 1024


def memory_in_child(case: dict, side: str, threads: int) -> float:
    """Run :func:`memory_probe` in a fresh interpreter so earlier cases do not hide the peak."""
    cmd = [sys.executable, __file__, "--memory-probe", json.dumps(case), "--side", side, "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


# --- a whole epoch ------------------------------------------------------------------------
def epoch_throughput(device: str, batch_size: int = 256) -> dict:
    """Examples per second of one full MNIST fc training epoch through ``training.train``."""
    from pyro_gmvae.training import train

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            data="mnist",
            network="fc",
            K=10,
            batch_size=batch_size,
            epochs=1,
            device=device,
            out=str(Path(tmp) / "run"),
            progress=False,
        )
        t0 = time.perf_counter()
        result = train(config, make_figures=False)
        wall = time.perf_counter() - t0
    row = result.history[-1]
    steps = 60000 // batch_size
    return {
        "data": "mnist (60000 train images)",
        "network": "fc",
        "hidden_dim": result.config.hidden_dim,
        "K": 10,
        "batch_size": batch_size,
        "steps": steps,
        "train_seconds": row["seconds"],
        "examples_per_s": steps * batch_size / row["seconds"],
        "wall_seconds_with_eval_and_checkpoint": wall,
        "device": device,
    }


# --- main -----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the acceptance rows and options")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timing per case (after min steps)")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (a child process per case and side)")
    p.add_argument("--no-epoch", action="store_true", help="skip the full MNIST epoch")
    p.add_argument("--no-options", action="store_true", help="skip the options (jit, compile, ...)")
    p.add_argument("--options", default="jit,compile,channels_last,bf16,validation_on")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_case(case, device, args, option="default", memory=True) -> dict:
    sides = Sides(case, device, option)
    row = {"case": case, "name": case_name(case), "option": option}
    if option in ("default", "validation_on"):
        row["check"] = sides.check()
    warmup = 10 if option == "compile" else 3
    row.update(time_interleaved(sides, warmup, args.min_steps, args.max_steps, args.budget))
    if memory and option == "default":
        unit = "MiB, torch.cuda.max_memory_allocated" if device.type == "cuda" else "MiB, peak RSS delta (VmHWM)"
        for name in ("project", "reference"):
            if device.type == "cuda":
                row[name]["peak_memory_mib"] = memory_probe(case, name, device)
            else:
                row[name]["peak_memory_mib"] = memory_in_child(case, name, args.threads)
        row["memory_method"] = unit
    print(
        f"{row['name']:<34} {option:<14} project {row['project']['median_step_s'] * 1e3:8.2f} ms  "
        f"reference {row['reference']['median_step_s'] * 1e3:8.2f} ms  ratio {row['ratio']:.3f} "
        f"(pairwise {row['ratio_pairwise_median']:.3f}, n={row['steps_per_side']})",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.settings.set(module_local_params=True)
    device = torch.device(args.device)
    if args.memory_probe:
        pyro.enable_validation(False)
        print(memory_probe(json.loads(args.memory_probe), args.side, device))
        return 0
    # training.train runs its steps with validation off; do the same unless measuring it.
    pyro.enable_validation(False)
    report = {
        "device": str(device),
        "device_name": device_name(device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_note": None if torch.cuda.is_available() else "not available in this session",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "command": "python experiments/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": "median step time of interleaved steps (project, reference, project, ...) after warm-up",
        "grid": [],
        "acceptance": [],
        "options": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in grid(args.quick):
        report["grid"].append(run_case(case, device, args, memory=not args.no_memory))
        out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive an interrupted run
    for case, limit in ACCEPTANCE:
        row = next((r for r in report["grid"] if r["case"] == case), None)
        if row is None:
            continue
        report["acceptance"].append(
            {"name": row["name"], "ratio": row["ratio"], "limit": limit, "pass": row["ratio"] <= limit}
        )
    if not args.no_options:
        fc = ACCEPTANCE[0][0]
        conv = dict(network="conv", hidden_dim=500, K=10, mc_samples=1, batch_size=256)
        for option in args.options.split(","):
            if option == "bf16" and device.type != "cuda":
                report["options"].append({"option": option, "skipped": "mixed precision is measured on CUDA only"})
                continue
            if option == "validation_on":
                with pyro.validation_enabled(True):
                    report["options"].append(run_case(fc, device, args, option, memory=False))
                continue
            case = conv if option == "channels_last" else fc
            try:
                report["options"].append(run_case(case, device, args, option, memory=False))
            except Exception as err:  # an option that fails to build is a result too
                report["options"].append({"option": option, "name": case_name(case), "error": repr(err)[:500]})
                print(f"option {option} failed: {err!r}"[:300], flush=True)
    if not args.no_epoch:
        pyro.enable_validation(False)
        report["epoch"] = epoch_throughput(args.device)
        print("epoch:", report["epoch"], flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(row["pass"] for row in report["acceptance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
