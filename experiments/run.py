"""Train and evaluate a GMVAE; write a run folder (config, metrics, checkpoint, figures).

    python experiments/run.py                                  # spiral toy set, CPU, ~1 min
    python experiments/run.py --data mnist --device cuda       # the paper's MNIST experiment
    python experiments/run.py --out runs/x --resume --epochs 200

Unset options come from the data preset (``pyro_gmvae.config.DATA_PRESETS``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pyro_gmvae.build import CHOICES
from pyro_gmvae.config import Config
from pyro_gmvae.data import DATA_ENV, DATASETS
from pyro_gmvae.distributed import info_from_env
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.training import default_out, train


def _names(key: str) -> str:
    return " | ".join(CHOICES[key])


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: ...``), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = _Parser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # Only flags the user gives reach the config, so --resume can tell them apart.
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    # No argparse ``choices``: its error spans several lines; validate_config names the valid ones.
    add("--data", help=f"one of {', '.join(DATASETS)} (default {defaults.data})")
    add("--data-root", help=f"folder holding the data sets (default ${DATA_ENV}, then ./data)")
    add("--download", action="store_true", help="let torchvision download MNIST / SVHN into --data-root")
    add("--network", help=f"encoder/decoder family: {_names('network')} (default: data preset)")
    add("--likelihood", help=f"p(y|x): {_names('likelihood')} (default: data preset)")
    add("--prior", help=f"cluster weights: {_names('prior')} (fixed uniform or learned; default {defaults.prior})")
    add("--guide", help=f"{_names('guide')}; v2: exact p(z|x,w), v1: q(z|y) head (default {defaults.guide})")
    add("--K", type=int, help="number of clusters (default: data preset)")
    add("--x-dim", type=int, help="Dx, size of x (default: data preset)")
    add("--w-dim", type=int, help="Dw, size of w (default: data preset)")
    add("--hidden-dim", type=int, help="H, hidden units (default: data preset)")
    add("--epochs", type=int, help="total epochs; with --resume, train up to this many (default: data preset)")
    add("--batch-size", type=int, help="minibatch size (default: data preset)")
    add("--lr", type=float, help="Adam learning rate (default: data preset)")
    add("--lr-final", type=float, help="decay the learning rate to this by the last epoch (cosine); default: constant")
    add("--kl-warmup", type=int, help="epochs over which the KL terms' weight rises linearly to 1 (default 0: off)")
    add(
        "--init",
        help="random; vae-kmeans: pretrain a VAE, seat the components on k-means of its latent means; "
        "vae-umap: the same with k-means on a UMAP embedding of them (default: data preset)",
    )
    add("--pretrain-epochs", type=int, help="VAE epochs of --init vae-* (default: data preset)")
    add(
        "--pretrain-lr",
        type=float,
        help=f"Adam learning rate of that pretraining and of the fit (default {defaults.pretrain_lr:g})",
    )
    add(
        "--init-fit-epochs",
        type=int,
        help="--init vae-*: train the seated GMVAE this many epochs on its objective plus --init-fit-weight x "
        "the cross-entropy to the partition before training (default: data preset; 0 = off)",
    )
    add("--init-fit-weight", type=float, help=f"weight of that cross-entropy (default {defaults.init_fit_weight:g})")
    add(
        "--init-restarts",
        type=int,
        help="--init vae-*: pretrain and seat this many starts, train each for --init-probe-epochs, "
        "keep the one with the lowest training objective (default: data preset)",
    )
    add("--init-probe-epochs", type=int, help=f"GMVAE epochs of each probe (default {defaults.init_probe_epochs})")
    add("--mc-samples", type=int, help=f"M, Monte Carlo samples of (x, w) (default {defaults.mc_samples})")
    add("--z-prior-weight", type=float, help=f"eta, weight of the z-prior KL (default {defaults.z_prior_weight})")
    add("--cv-weight", type=float, help="alpha, consistency-violation weight (default: data preset)")
    add("--free-bits", type=float, help=f"lambda, free-bits threshold of the z prior (default {defaults.free_bits})")
    add("--seed", type=int, help=f"random seed (default {defaults.seed})")
    add("--device", help=f"cpu, cuda or cuda:N (default {defaults.device})")
    add("--out", help="run folder (default runs/<data>-<guide>-K<K>-seed<seed>)")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--overwrite", action="store_true", help="replace a run already in --out")
    add("--train-subset", type=int, help="use only the first N training examples (quick checks)")
    add("--test-subset", type=int, help="use only the first N test examples (quick checks)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[Config, bool, bool]:
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    resume = getattr(args, "resume", False)
    overwrite = getattr(args, "overwrite", False)
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; pass one")
    if resume:
        # Start from the saved options; flags given now override them (checked for
        # compatibility against the checkpoint when training starts).
        out = Path(given["out"]) if "out" in given else default_out(Config(**given).resolved())
        config_file = out / "config.json"
        if not config_file.is_file():
            raise UserInputError(f"--resume given but {config_file} does not exist; pass the run folder with --out")
        try:
            saved = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            raise UserInputError(f"{config_file} is not valid JSON; the run folder is damaged") from None
        saved.pop("versions", None)
        try:
            config = Config.from_dict({**saved, **given, "out": str(out)})
        except (TypeError, ValueError) as err:
            raise UserInputError(f"{config_file} does not hold a pyro_gmvae config ({err})") from None
        return config, resume, overwrite
    return Config(**given), resume, overwrite


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, resume, overwrite = config_from_args(args)
        result = train(config, resume=resume, overwrite=overwrite)
    except (UserInputError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the last complete checkpoint is kept, continue with --resume", file=sys.stderr)
        return 130
    if not info_from_env().is_main:  # under torchrun only rank 0 reports (the others have no summary)
        return 0
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.final.items())
    print(f"run folder: {result.out}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
