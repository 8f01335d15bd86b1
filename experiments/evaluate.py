"""Evaluate a trained run: held-out log-likelihood by importance sampling, next to its ELBO.

    python experiments/evaluate.py runs/spiral-v2-K8-seed0-1 --loglik 1000
    python experiments/evaluate.py runs/mnist-v2-K10-seed0-1 --loglik 5000 --device cuda --json ll.json

log p(y) is estimated per example with S importance samples from the guide, the cluster
variable summed exactly (``pyro_gmvae.loglik``); the mean over examples and its standard
error are printed in nats, with the ELBO of the same examples for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import pyro
import torch
from common import git_commit, machine

from pyro_gmvae import binarize
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.loglik import DEFAULT_MEMORY_BUDGET, loglik, loglik_summary
from pyro_gmvae.posterior import elbo_terms_dataset
from pyro_gmvae.runs import load_run


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: ...``), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("run", help="run folder (the --out of experiments/run.py) or its checkpoint.pt")
    add("--loglik", type=int, metavar="S", help="importance samples per example (5000 in the literature)")
    add("--split", default="test", help="test | train")
    add("--subset", type=int, metavar="N", help="only the first N examples of the split")
    add("--batch-size", type=int, help="examples per pass (default: from the memory budget)")
    add("--memory-mb", type=float, default=DEFAULT_MEMORY_BUDGET / 2**20, help="memory budget of one chunk, MiB")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--seed", type=int, default=0, help="seed of the importance samples and the ELBO draws")
    add("--json", metavar="PATH", help="write the numbers, the config and the git commit here")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def evaluate(args: argparse.Namespace) -> dict:
    if args.loglik is not None and args.loglik < 1:
        raise UserInputError(f"--loglik must be >= 1 importance sample, got {args.loglik}")
    if args.split not in ("test", "train"):
        raise UserInputError(f"--split must be test or train, got {args.split!r}")
    if args.subset is not None and args.subset < 1:
        raise UserInputError(f"--subset must be >= 1, got {args.subset}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.memory_mb > 0:
        raise UserInputError(f"--memory-mb must be > 0, got {args.memory_mb}")
    if not Path(args.run).exists():
        raise UserInputError(f"run folder {args.run} does not exist")
    run = load_run(args.run, device=args.device)
    data = run.load_data()
    y = data.x_test if args.split == "test" else data.x
    if y is None or len(y) == 0:
        raise UserInputError(f"the run's data set has no {args.split} examples")
    if args.subset is not None:
        y = y[: args.subset]
    batch_size = args.batch_size or 1000

    result = {
        "run": str(run.path),
        "split": args.split,
        "num_examples": len(y),
        "examples": f"the first {len(y)} of the {args.split} split" if args.subset else f"the whole {args.split} split",
        "seed": args.seed,
        "git_commit": git_commit()["sha"],
        "command": "python experiments/evaluate.py " + " ".join(sys.argv[1:]),
        "machine": machine(run.device),
        "config": run.config.to_dict(),
    }
    if run.config.binarize == "dynamic":
        result["binarization"] = (
            f"dynamic: training pixels drawn afresh every epoch; the {args.split} split one fixed Bernoulli draw "
            f"from its grey levels (seed {binarize.TEST_SEED})"
        )
    started = time.perf_counter()
    pyro.set_rng_seed(args.seed)
    elbo = loglik_summary(elbo_terms_dataset(run.model, run.guide, y, batch_size=batch_size)["elbo"])
    result["elbo_mean"], result["elbo_stderr"] = elbo["mean"], _finite(elbo["stderr"])
    print(f"{args.split} ELBO ({len(y)} examples): {elbo['mean']:.4f} +- {elbo['stderr']:.4f} nats")
    if args.loglik is not None:
        generator = torch.Generator(device=run.device).manual_seed(args.seed)
        estimates, mc_stderr = loglik(
            run,
            y,
            num_samples=args.loglik,
            batch_size=args.batch_size,
            memory_budget=int(args.memory_mb * 2**20),
            generator=generator,
            progress=args.progress,
            return_mc_stderr=True,
        )
        ll = loglik_summary(estimates)
        result.update(
            num_samples=args.loglik,
            loglik_mean=ll["mean"],
            loglik_stderr=_finite(ll["stderr"]),
            loglik_mc_stderr_mean=_finite(mc_stderr.mean().item()),
        )
        print(
            f"{args.split} log-likelihood (S={args.loglik}, {len(y)} examples): "
            f"{ll['mean']:.4f} +- {ll['stderr']:.4f} nats (standard error over examples)"
        )
    result["seconds"] = time.perf_counter() - started
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as err:
            raise UserInputError(f"cannot write --json {path}: {err.strerror or err}") from None
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate(args)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
