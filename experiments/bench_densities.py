"""Training-step time with the density table's hand-written backward and with Normal.log_prob.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_densities.py

For each batch size, in one process: the MNIST network (fc, H 500, K 10, as
``bench_speed.py``) and two compiled loss modules on the same weights.  One traces the (B, K,
Dx) table of component densities through ``pyro_gmvae.densities``' hand-written backward
(``MIN_TABLE_ELEMENTS`` 0 while it runs), the other through ``Normal.log_prob`` (the threshold
above any table).  Each side is one ``run_epoch`` of S steps with its own Adam, the sides
timed in turn by ``bench_speed.time_interleaved``.  Both compute the same numbers
(``tests/test_densities.py``); ``ratio`` is the hand-written side's step time over
``Normal.log_prob``'s, and the row's ``table_elements`` the size the threshold is set by.
Writes ``experiments/results/densities.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_speed  # noqa: E402
import torch  # noqa: E402
from common import git_commit, machine  # noqa: E402

from pyro_gmvae import allocator, densities  # noqa: E402
from pyro_gmvae.loop import adam, run_epoch  # noqa: E402
from pyro_gmvae.objective import make_elbo  # noqa: E402

HERE = Path(__file__).resolve().parent
THRESHOLDS = {"by_hand": 0, "normal_log_prob": math.inf}  # the reference (Normal.log_prob) last


def run_case(batch: int, calls: int) -> dict:
    steps = bench_speed.steps_per_call(batch, None)
    case = {**bench_speed.BASE, "batch_size": batch * steps}
    config, model, guide, data = bench_speed.build(case, torch.device("cpu"))
    order = torch.Generator().manual_seed(0)

    def side(elements: float):
        loss_module = make_elbo(config.mc_samples)(model, guide)
        optimizer = adam(loss_module.parameters(), config.lr)

        def call():
            with mock.patch.object(densities, "MIN_TABLE_ELEMENTS", elements):  # read when the graph is traced
                return run_epoch(lambda y: loss_module(y) / len(y), optimizer, data, batch, order)

        return call

    timed = bench_speed.time_interleaved({name: side(t) for name, t in THRESHOLDS.items()}, torch.device("cpu"), batch,
                                         warmup=3, min_steps=calls, max_steps=calls, budget_s=math.inf,
                                         per_call=steps)  # fmt: skip
    elements = batch * config.K * config.x_dim
    row = {"batch_size": batch, "table_elements": elements, **timed}
    print(f"batch {batch:5d} ({elements:,} elements): by hand / Normal.log_prob x{timed['by_hand']['ratio']:.3f} "
          f"({timed['by_hand']['added_ms']:+.2f} ms; pairwise x{timed['by_hand']['ratio_pairwise_median']:.3f})",
          flush=True)  # fmt: skip
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64, 256])
    p.add_argument("--calls", type=int, default=20, help="timed calls (run_epoch of S steps) a side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "densities.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    heap = allocator.keep_freed_memory()  # as train() and bench_speed.py
    started = time.perf_counter()
    report = {
        "git_commit": git_commit(HERE.parent), "machine": machine("cpu"),
        "command": "python experiments/bench_densities.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**bench_speed.BASE, "batches": args.batches, "calls": args.calls,
                   "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "allocator": heap,
                   "min_table_elements": densities.MIN_TABLE_ELEMENTS,
                   "sides": {name: f"MIN_TABLE_ELEMENTS {t}" for name, t in THRESHOLDS.items()}},
        "rows": [],
    }  # fmt: skip
    out = Path(args.out)
    for batch in args.batches:
        report["rows"].append(run_case(batch, args.calls))
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
