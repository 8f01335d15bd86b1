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

from pyro_gmvae.config import Config, add_arguments, presets_table
from pyro_gmvae.distributed import info_from_env
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.runfolder import RunFolder
from pyro_gmvae.training import train


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: ...``), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        description=__doc__.splitlines()[0],
        epilog=presets_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Only flags the user gives reach the config, so --resume can tell them apart.
        argument_default=argparse.SUPPRESS,
    )
    add_arguments(p)  # one flag per Config field, help and choices from its metadata
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[Config, bool, bool]:
    flags = ("resume", "overwrite", "show_config")
    given = {k: v for k, v in vars(args).items() if k not in flags}
    resume = getattr(args, "resume", False)
    overwrite = getattr(args, "overwrite", False)
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; pass one")
    if resume:  # the saved options, overridden by the flags given now
        folder = RunFolder(given["out"]) if "out" in given else RunFolder.for_config(Config(**given).resolved())
        return folder.resume_config(given), resume, overwrite
    return Config(**given), resume, overwrite


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, resume, overwrite = config_from_args(args)
        if getattr(args, "show_config", False):
            config = config.resolved()
            config.validate()
            print(json.dumps(config.to_dict(), indent=2))
            return 0
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
