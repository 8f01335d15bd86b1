"""Train and evaluate a GMVAE; write a run folder (config, metrics, checkpoint, figures).

    python experiments/run.py                                  # spiral toy set, CPU, ~1 min
    python experiments/run.py --data mnist --device cuda       # the paper's MNIST experiment
    python experiments/run.py --out runs/x --resume --epochs 200

Unset options come from the data preset (``pyro_gmvae.config.DATA_PRESETS``).  Without
``--out`` each run gets a fresh folder ``runs/<data>-<guide>-K<K>-seed<seed>-<N>`` (N one
above the highest there); ``--resume`` without ``--out`` continues the highest.

Errors are one line on stderr.  Exit codes: 0 done, 2 bad input or a failed write,
130 Ctrl-C, 143 SIGTERM (both keep the last complete checkpoint and print the
``--resume`` command; under torchrun every rank exits so and rank 0 prints the line).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from pyro_gmvae.config import Config, add_arguments, presets_table
from pyro_gmvae.distributed import info_from_env
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.faults import Terminated, raise_on_sigterm
from pyro_gmvae.runfolder import CONFIG_NAME, RunFolder
from pyro_gmvae.training import resolved_config, train


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
        folder = RunFolder(given["out"]) if "out" in given else RunFolder.latest_default(Config(**given).resolved())
        return folder.resume_config(given), resume, overwrite
    return Config(**given), resume, overwrite


def close_progress_bars() -> None:
    """End the bars a failed run left open, so that its error line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def interrupted_line(err: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C or SIGTERM: the last complete epoch and how to continue."""
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    folder = getattr(err, "run_folder", None)
    if folder is None:  # before the run folder was made: nothing was written
        return f"error: {what} before training started; nothing was written"
    epoch = getattr(err, "last_epoch", None)
    resume = f"python experiments/run.py --out {shlex.quote(str(folder))} --resume"
    if epoch:
        return f"error: {what} after epoch {epoch}; the checkpoint in {folder} is kept; continue with: {resume}"
    if (Path(folder) / CONFIG_NAME).is_file():  # --resume starts such a run over
        return f"error: {what} before the first epoch completed; start it over with: {resume}"
    return f"error: {what} before the first epoch completed; nothing was kept"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with raise_on_sigterm():  # a scheduler's SIGTERM unwinds like Ctrl-C; the old handlers come back after
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, resume, overwrite = config_from_args(args)
        if getattr(args, "show_config", False):
            config = resolved_config(config)
            config.validate()
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        result = train(config, resume=resume, overwrite=overwrite)
    except (UserInputError, NonFiniteLossError) as err:
        close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM as faults.Terminated
        close_progress_bars()
        if info_from_env().is_main:
            print(interrupted_line(err), file=sys.stderr)
        return Terminated.exit_code if isinstance(err, Terminated) else 130
    if not info_from_env().is_main:  # under torchrun only rank 0 reports (the others have no summary)
        return 0
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.final.items())
    print(f"run folder: {result.out}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
