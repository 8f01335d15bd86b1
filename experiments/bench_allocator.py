"""Training-step time with glibc's own allocator settings and with allocator.keep_freed_memory.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_allocator.py

The allocator's settings are process-wide and cannot be undone, so each setting runs in
processes of its own: ``--rounds`` pairs of child processes, glibc's own settings and the
kept memory in turn (the order alternates by round), one after the other, never two at once.
A child builds the MNIST network (fc, H 500, K 10, as ``bench_speed.py``), warms up, then
times ``--calls`` calls of the compiled training step (one ``run_epoch`` of S steps, S as in
``bench_speed.py``) interleaved with calls of the plain-PyTorch reference step, and counts the
page faults (``ru_minflt``) of each: ``bench_speed.time_interleaved``.  Per batch size and
setting: the median over rounds of each child's median step time, and the page faults per
step.  Both settings compute the same numbers (``tests/test_allocator.py``); only the time
differs.  Writes ``experiments/results/allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import git_commit, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = ("glibc", "kept")  # glibc's own (its moving mmap threshold), allocator.keep_freed_memory()


def child(batch: int, keep: bool, calls: int, threads: int) -> dict:
    """Time the compiled and reference steps in this process under one allocator setting."""
    import bench_speed

    from pyro_gmvae import allocator

    torch.set_num_threads(threads)
    applied = allocator.keep_freed_memory() if keep else None
    if keep and applied is None:
        raise SystemExit("bench_allocator: keep_freed_memory set nothing here (not glibc, or MALLOC_*_ is set)")
    sides = bench_speed.Sides({**bench_speed.BASE, "batch_size": batch}, torch.device("cpu"),
                              steps=bench_speed.steps_per_call(batch, None))  # fmt: skip
    steps = {"compiled": sides.project, "reference": sides.reference}
    # bench_speed's interleaved timing, ``calls`` calls a side after 3 warm-up rounds (the trace,
    # Adam's state, the heap's first growth); no time budget: the calls end it
    timed = bench_speed.time_interleaved(steps, torch.device("cpu"), batch, warmup=3, min_steps=calls,
                                         max_steps=calls, budget_s=math.inf, per_call=sides.steps_per_call)  # fmt: skip
    out = {"allocator": applied, "steps_per_call": sides.steps_per_call}
    for name in steps:
        out[name] = {key: timed[name][key] for key in ("median_step_s", "minor_faults_per_step")}
    return out


def run_child(batch: int, keep: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--batches", str(batch),
           "--calls", str(args.calls), "--threads", str(args.threads)] + (["--keep"] if keep else [])  # fmt: skip
    done = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_allocator: a child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict) -> dict:
    """Per setting and side: the median over rounds of the children's median step times, mean faults."""
    out = {}
    for setting, children in runs.items():
        out[setting] = {
            side: {
                "median_step_ms": 1e3 * statistics.median(c[side]["median_step_s"] for c in children),
                "minor_faults_per_step": statistics.fmean(c[side]["minor_faults_per_step"] for c in children),
            }
            for side in ("compiled", "reference")
        }
    for side in ("compiled", "reference"):
        out[f"{side}_kept_over_glibc"] = out["kept"][side]["median_step_ms"] / out["glibc"][side]["median_step_ms"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 256])
    p.add_argument("--rounds", type=int, default=3, help="pairs of child processes per batch size")
    p.add_argument("--calls", type=int, default=6, help="timed calls per side in a child")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "allocator.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.batches[0], args.keep, args.calls, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {
        "git_commit": git_commit(HERE.parent), "machine": machine("cpu"),
        "command": "python experiments/bench_allocator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"network": "fc", "hidden_dim": 500, "K": 10, "mc_samples": 1, "batches": args.batches,
                   "rounds": args.rounds, "calls": args.calls, "threads": args.threads,
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "settings": {"glibc": "the C library's own (mmap threshold moving between 128 KiB and 32 MiB)",
                     "kept": "pyro_gmvae.allocator.keep_freed_memory()"},
        "rows": [],
    }  # fmt: skip
    for batch in args.batches:
        runs = {setting: [] for setting in SETTINGS}
        for r in range(args.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                runs[setting].append(run_child(batch, setting == "kept", args))
        row = {"batch_size": batch, **summarise(runs), "children": runs}
        report["rows"].append(row)
        print(f"batch {batch:5d}  compiled: {row['glibc']['compiled']['median_step_ms']:.1f} ms -> "
              f"{row['kept']['compiled']['median_step_ms']:.1f} ms (x{row['compiled_kept_over_glibc']:.3f}), "
              f"faults {row['glibc']['compiled']['minor_faults_per_step']:.0f} -> "
              f"{row['kept']['compiled']['minor_faults_per_step']:.0f} a step; reference "
              f"x{row['reference_kept_over_glibc']:.3f}", flush=True)  # fmt: skip
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
