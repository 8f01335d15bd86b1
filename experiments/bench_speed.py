"""Training-step speed of the Pyro objective against the same objective in plain PyTorch.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py --quick --no-options --no-epoch  # acceptance rows
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_speed.py             # everything, ~30 min bound
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

Peak memory: on CPU, the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` after freed heap is returned with ``malloc_trim``) over two steps
of one side, minus the resident size just before them; on CUDA,
``torch.cuda.max_memory_allocated`` around the steps.  The acceptance rows also record the
peak of a fresh child process from before its first step (that one includes Adam's state).

The run is bounded: ``--deadline`` seconds in all (grid cases predicted not to fit are
listed in ``grid_skipped`` with the reason), and ``torch.compile`` runs in a child process
killed after ``--compile-timeout`` seconds (the outcome is recorded either way).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shutil
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
        self.loss_fn = make_elbo(case["mc_samples"])(self.model, self.guide)
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

    def check(self, rtol: float = 1e-5, batch: int | None = None) -> dict:
        """Same loss and gradients on the same draws (float64 on CPU, so rounding is not the test).

        ``batch`` checks on the first ``batch`` examples only (the maths does not depend on B;
        float64 steps of the large cases would cost more than their timing).
        """
        model, guide, y = self.model, self.guide, self.y[:batch]
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
        return {
            "batch": len(y),
            "loss_project": loss_p,
            "loss_reference": loss_r,
            "loss_rel_diff": rel,
            "grad_rel_diff": grad_rel,
        }


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


def memory_probe(case: dict, side: str, device: torch.device, steps: int = 2) -> float:
    """Peak RSS delta of a fresh process from before its first step (cross-check; includes Adam state)."""
    sides = Sides(case, device)
    step = sides.project if side == "project" else sides.reference
    base = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - base) / 1024


def memory_in_child(case: dict, side: str, threads: int) -> float:
    """Run :func:`memory_probe` in a fresh interpreter so earlier cases do not hide the peak."""
    cmd = [sys.executable, __file__, "--memory-probe", json.dumps(case), "--side", side, "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return float(result.stdout.strip().splitlines()[-1])


def parameter_mib(sides: Sides) -> float:
    return sum(p.numel() * p.element_size() for p in sides.loss_fn.parameters()) / 2**20


# --- options ----------------------------------------------------------------------------
def time_option(with_option, default, case: dict, device, args, warmup: int = 3) -> dict:
    """Interleaved timing of an option's step against the default step, with the CLI's step limits."""
    steps = {"with_option": with_option, "default": default}
    return time_interleaved(
        steps, device, case["batch_size"], warmup, args.min_steps_options, args.max_steps, args.budget
    )


def option_validation(case: dict, device: torch.device, args) -> dict:
    """Pyro validation on (training.train's default) against off (the timed steps here), interleaved."""
    sides = Sides(case, device)

    def on():
        with pyro.validation_enabled(True):
            sides.project()

    def off():
        with pyro.validation_enabled(False):
            sides.project()

    row = {"option": "validation_on", "name": case_name(case), "what": "pyro.enable_validation(True) vs False"}
    row.update(time_option(on, off, case, device, args))
    return row


def option_channels_last(case: dict, device: torch.device, args) -> dict:
    """Conv networks and data in channels-last layout against the default layout (two copies, same init)."""
    last, default = Sides(case, device, "channels_last"), Sides(case, device)
    row = {"option": "channels_last", "name": case_name(case), "what": "model, guide and batch in channels_last"}
    row.update(time_option(last.project, default.project, case, device, args, warmup=2))
    return row


def option_compile_child(case: dict, device: torch.device, args) -> dict:
    """torch.compile of encoder, decoder and prior network (run inside a child process)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # 2 shared cores
    compiled, default = Sides(case, device, "compile"), Sides(case, device)
    row = {"option": "compile", "name": case_name(case), "what": "Module.compile() of encoder, decoder, prior network"}
    t0 = time.perf_counter()
    compiled.project()
    _sync(device)
    row["first_step_s"] = time.perf_counter() - t0  # tracing + inductor codegen + C++ build
    t0 = time.perf_counter()
    compiled.project()
    _sync(device)
    row["second_step_s"] = time.perf_counter() - t0  # recompiles on the second call (e.g. Adam) show here
    row.update(time_option(compiled.project, default.project, case, device, args))
    return row


def option_compile(case: dict, args) -> dict:
    """Run :func:`option_compile_child` in a child with a timeout, so a slow compile cannot hang the run."""
    cmd = [sys.executable, __file__, "--compile-child", json.dumps(case), "--device", args.device,
           "--threads", str(args.threads), "--budget", str(args.budget), "--max-steps", str(args.max_steps),
           "--min-steps-options", str(args.min_steps_options)]  # fmt: skip
    t0 = time.perf_counter()
    row = {"option": "compile", "name": case_name(case), "timeout_s": args.compile_timeout}
    # A private inductor cache: a cold compile is what is measured, and other users' half-written
    # cache files (seen here: "file too short") cannot break it.
    cache = tempfile.mkdtemp(prefix="bench_inductor_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout, env=env)
    except subprocess.TimeoutExpired:
        row["error"] = f"did not finish compiling and timing within {args.compile_timeout} s (killed)"
        row["wall_s"] = time.perf_counter() - t0
        return row
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        row["error"] = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1][:500]
        return row
    row.update(json.loads(lines[-1]))
    return row


# --- a whole epoch ------------------------------------------------------------------------
def epoch_throughput(
    device: str,
    batch_size: int = 256,
    hidden_dim: int = 500,
    train_subset: int | None = None,
    data_root: str | None = None,
) -> dict:
    """Examples per second of one MNIST fc training epoch through ``training.train``, and its peak memory."""
    from pyro_gmvae.training import train

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            data="mnist",
            data_root=data_root,
            network="fc",
            hidden_dim=hidden_dim,  # as the acceptance rows (the mnist fc preset is 1000)
            K=10,
            batch_size=batch_size,
            epochs=1,
            init="random",  # one training epoch is timed, not the preset's initialisation
            device=device,
            out=str(Path(tmp) / "run"),
            progress=False,
            train_subset=train_subset,
            test_subset=2000,  # evaluation is not what is timed; keep it short
        )
        base = _release_and_reset_peak() if device == "cpu" else None
        t0 = time.perf_counter()
        result = train(config, make_figures=False)
        wall = time.perf_counter() - t0
        peak = (_status_kib("VmHWM") - base) / 1024 if base is not None else None
    row = result.history[-1]
    num_train = train_subset or 60000
    steps = num_train // batch_size
    return {
        "data": f"mnist, {num_train} training images" + ("" if train_subset else " (the full training set)"),
        "network": "fc",
        "hidden_dim": result.config.hidden_dim,
        "K": 10,
        "mc_samples": 1,
        "batch_size": batch_size,
        "steps": steps,
        "train_seconds": row["seconds"],
        "examples_per_s": steps * batch_size / row["seconds"],
        "wall_seconds_with_load_eval_checkpoint": wall,
        "peak_rss_delta_mib": peak,
        "device": device,
    }


# --- main -----------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    info["torch_threads"] = torch.get_num_threads()
    info["load_average_start"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = machine(device)
    return f"{info['cpu_model']}, {info['torch_threads']} threads"


def fc_cost(case: dict) -> float:
    """A rough flop count per step, only to order the grid cheap-first and predict slow cases."""
    h, k, m, b = case["hidden_dim"], case["K"], case["mc_samples"], case["batch_size"]
    encoder = h * (784 + h + 700)
    per_particle = h * (200 + h + 784) + h * (150 + h + 400 * k) + 600 * k
    return b * (encoder + m * per_particle)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the acceptance rows (no grid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timing per case once min steps are done")
    p.add_argument("--min-steps", type=int, default=8, help="timed steps per side and grid case (at least)")
    p.add_argument("--min-steps-acceptance", type=int, default=30, help="timed steps per side, acceptance rows")
    p.add_argument("--min-steps-options", type=int, default=10, help="timed steps per side, options")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument(
        "--deadline", type=float, default=1800.0, help="seconds in all: grid cases predicted not to fit are skipped"
    )
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds for the torch.compile option")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument("--no-epoch", action="store_true", help="skip the MNIST epochs")
    p.add_argument("--data-root", help="folder holding MNIST/raw (default: $PYRO_GMVAE_DATA, then ./data)")
    p.add_argument("--no-options", action="store_true", help="skip the options (compile, ...)")
    p.add_argument("--options", default="validation_on,channels_last,compile,bf16")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--compile-child", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_case(case, device, args, min_steps: int, memory: bool = True) -> dict:
    sides = Sides(case, device)
    row = {"case": case, "name": case_name(case), "parameters_mib": parameter_mib(sides)}
    t0 = time.perf_counter()
    row["check"] = sides.check(batch=min(case["batch_size"], 64))
    row["check"]["seconds"] = time.perf_counter() - t0
    row.update(
        time_interleaved(
            {"project": sides.project, "reference": sides.reference},
            device,
            case["batch_size"],
            3,
            min_steps,
            max(args.max_steps, min_steps),
            args.budget,
        )
    )
    if memory:
        row["memory_method"] = (
            "MiB, torch.cuda.max_memory_allocated delta over 2 steps"
            if device.type == "cuda"
            else "MiB, peak RSS (VmHWM) over 2 steps minus RSS before them, after the timed steps"
        )
        row["project"]["peak_memory_mib"] = step_peak_memory(sides.project, device)
        row["reference"]["peak_memory_mib"] = step_peak_memory(sides.reference, device)
    print(
        f"{row['name']:<30} project {row['project']['median_step_s'] * 1e3:9.2f} ms  "
        f"reference {row['reference']['median_step_s'] * 1e3:9.2f} ms  ratio {row['ratio']:.3f} "
        f"(pairwise {row['ratio_pairwise_median']:.3f}, n={row['steps_per_side']})"
        + (
            f"  mem {row['project']['peak_memory_mib']:.0f}/{row['reference']['peak_memory_mib']:.0f} MiB"
            if memory
            else ""
        ),
        flush=True,
    )
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.settings.set(module_local_params=True)
    device = torch.device(args.device)
    # Time both sides without Pyro's argument checks (training.train keeps them on; the
    # validation_on option measures what they cost).
    pyro.enable_validation(False)
    if args.memory_probe:
        print(memory_probe(json.loads(args.memory_probe), args.side, device))
        return 0
    if args.compile_child:
        print(json.dumps(option_compile_child(json.loads(args.compile_child), device, args)))
        return 0
    started = time.perf_counter()
    info = machine(device)
    report = {
        "device": str(device),
        "device_name": device_name(device),
        "machine": info,
        "gpu": info.get("gpu_name"),
        "gpu_note": None if device.type == "cuda" else "not available in this session",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "command": "python experiments/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": "median step time of interleaved steps (project, reference, project, ...) after warm-up",
        "acceptance": [],
        "options": [],
        "grid": [],
        "grid_skipped": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["machine"]["load_average_now"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive an interrupted run

    memory = not args.no_memory
    for case, limit in ACCEPTANCE:
        row = run_case(case, device, args, args.min_steps_acceptance, memory)
        if memory and device.type == "cpu":  # cross-check: a fresh process, from before its first step
            row["fresh_process_peak_mib"] = {
                s: memory_in_child(case, s, args.threads) for s in ("project", "reference")
            }
        report["grid"].append(row)
        report["acceptance"].append(
            {
                "name": row["name"],
                "ratio": row["ratio"],
                "ratio_pairwise_median": row["ratio_pairwise_median"],
                "steps_per_side": row["steps_per_side"],
                "limit": limit,
                "pass": row["ratio"] <= limit,
            }  # fmt: skip
        )
        save()
    if not args.no_options:
        fc = ACCEPTANCE[0][0]
        conv = dict(network="conv", hidden_dim=500, K=10, mc_samples=1, batch_size=256)
        for option in args.options.split(","):
            t0 = time.perf_counter()
            if option == "bf16":
                if device.type != "cuda":
                    row = {"option": option, "skipped": "mixed precision is measured on CUDA only"}
                else:
                    row = {"option": option, "skipped": "not implemented for this run"}
            elif option == "validation_on":
                row = option_validation(fc, device, args)
            elif option == "channels_last":
                row = option_channels_last(conv, device, args)
            elif option == "compile":
                row = option_compile(fc, args)
            else:
                raise SystemExit(f"unknown option {option!r}")
            row["seconds"] = time.perf_counter() - t0
            report["options"].append(row)
            print("option", json.dumps(row)[:400], flush=True)
            save()
    if not args.no_epoch:
        report["epochs"] = []
        for subset in (None, 15000):  # the full training set, then a quarter of it (data-size scaling)
            try:
                report["epochs"].append(epoch_throughput(args.device, train_subset=subset, data_root=args.data_root))
            except Exception as err:  # noqa: BLE001 - e.g. MNIST missing: record it, keep the grid
                report["epochs"].append({"train_subset": subset, "error": repr(err)[:500]})
            print("epoch:", report["epochs"][-1], flush=True)
            save()
    if not args.quick:
        done = [row["case"] for row in report["grid"]]
        cases = [c for c in grid(False) if c not in done]
        # conv first (needed for the table whatever happens), then fc cheap-first.
        cases.sort(key=lambda c: (c["network"] != "conv", fc_cost(c)))
        for case in cases:
            remaining = args.deadline - (time.perf_counter() - started)
            steps = 3 + args.min_steps + (2 if memory else 0)
            fc_rows = [r for r in report["grid"] if r["case"]["network"] == "fc"]
            predicted = None
            if case["network"] == "fc" and fc_rows:
                # seconds per unit of fc_cost, the largest seen (slow cases are the least efficient to guess)
                rate = max(r["project"]["median_step_s"] / fc_cost(r["case"]) for r in fc_rows[-3:])
                predicted = rate * fc_cost(case)
                if 2 * steps * predicted > remaining:
                    report["grid_skipped"].append(
                        {
                            "name": case_name(case),
                            "case": case,
                            "predicted_step_s": predicted,
                            "reason": f"{2 * steps} steps at ~{predicted:.1f} s predicted; {remaining:.0f} s of the "
                            f"--deadline {args.deadline:.0f} s left",
                        }  # fmt: skip
                    )
                    print("skip", report["grid_skipped"][-1]["reason"], case_name(case), flush=True)
                    save()
                    continue
            report["grid"].append(run_case(case, device, args, args.min_steps, memory))
            save()
    report["machine"]["load_average_end"] = list(os.getloadavg())
    save()
    print(f"wrote {out}")
    return 0 if all(row["pass"] for row in report["acceptance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
