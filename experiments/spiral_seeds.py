"""Train the default spiral run (``python experiments/run.py`` with no flags) for several seeds.

    python experiments/spiral_seeds.py                  # seeds 0 1 2 -> experiments/results/spiral.json
    python experiments/spiral_seeds.py --seeds 0 1 2 3 4 --runs runs/spiral-seeds

Each seed trains the spiral preset of ``pyro_gmvae.config.DATA_PRESETS`` unchanged except
for the seed, and the script records purity, NMI and accuracies against the arm labels, the
wall-clock seconds and the machine, so the README's numbers can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit, machine, summary, trained_config

from pyro_gmvae import Config, train

RESULTS = Path(__file__).resolve().parent / "results" / "spiral.json"
FIGURES = Path(__file__).resolve().parent / "results" / "figures" / "spiral"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", help="keep the run folders under this folder (default: a temporary one)")
    p.add_argument("--results", default=str(RESULTS), help="where to write the JSON summary")
    p.add_argument("--figures", default=str(FIGURES), help="copy the first seed's figures here (for the README)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        per_seed = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            result = train(Config(seed=seed, out=str(root / f"seed{seed}"), progress=False), overwrite=True)
            wall = time.perf_counter() - t0
            final = result.final
            row = {
                "seed": seed,
                "purity": final["purity"],
                "nmi": final["nmi"],
                "ari": final["ari"],
                "acc_paper": final["acc_paper"],
                "acc_hungarian": final["acc_hungarian"],
                "clusters_used": final["clusters_used"],
                "elbo": final["elbo"],
                "epochs": final["epochs"],
                "train_seconds": final["seconds"],
                "seconds": wall,
            }
            per_seed.append(row)
            print(json.dumps(row))
            if seed == args.seeds[0] and args.figures:
                shutil.copytree(result.out / "figures", args.figures, dirs_exist_ok=True)

    config = Config().resolved()
    report = {
        "command": "python experiments/spiral_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "config": trained_config(config.to_dict()),
        "seeds": per_seed,
        "summary": {key: summary([r[key] for r in per_seed]) for key in ("purity", "nmi", "acc_hungarian", "seconds")},
        "machine": machine(),
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
