"""The largest test-set confusions of finished runs, under the Hungarian matching.

    python experiments/mnist_confusions.py experiments/results/runs/k10umap/*umap10f3w10-e20-s*

For each run folder: the test accuracy of its last checkpoint and its ``--top`` largest
errors, "N images of digit d sit in the cluster matched to digit m", printed and merged
into ``experiments/results/mnist_confusions.json`` (keyed by grid/run folder name).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import git_commit, trained_config

from pyro_gmvae.metrics import confusions, hungarian_accuracy
from pyro_gmvae.runs import load_run

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "mnist_confusions.json"))
    args = p.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for folder in map(Path, args.runs):
        run = load_run(folder)
        data = run.load_data()
        assignments = run.assign(data.x_test)
        errors = confusions(assignments, data.labels_test, args.top)
        key = f"{folder.parent.name}/{folder.name}"
        results[key] = {
            "commit": git_commit(),
            "config": trained_config(run.config.to_dict()),
            "epochs": run.history[-1]["epoch"] if run.history else 0,
            "acc_hungarian": hungarian_accuracy(assignments, data.labels_test),
            "confusions": [{"count": n, "digit": d, "in_cluster_of": m} for n, d, m in errors],
        }
        listed = ", ".join(f"{n} {d}s as {m}" for n, d, m in errors)
        print(f"{key}: {100 * results[key]['acc_hungarian']:.2f}%; {listed}", flush=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
