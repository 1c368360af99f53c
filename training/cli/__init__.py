"""The torch-side commands of `forde`: train, export, fuse and evaluate.

They join the `forde` group (`forde_serve.app.cli.main`) through the `forde.commands` entry points
in pyproject.toml, so the inference package never names this one. At import this module needs
only click and rich: each command imports the torch-side code it runs when it runs, so `forde
--help` stays quick and, where the train extra is not installed, a command says what to install.

Commands are thin: parse, validate into a typed job or config, call one library function. Errors
a user can act on are `FordeError`s, which the group turns into one line and exit code 2.
"""

from __future__ import annotations

import sys

from training.cli.evaluate import evaluate
from training.cli.export import export, fuse
from training.cli.train import train

__all__ = ["evaluate", "export", "fuse", "train", "train_main"]


def train_main() -> None:
    """`python -m training ARGS` (what torchrun starts per rank): `forde train ARGS`, with the group's
    handling of errors (one line, exit code 2)."""
    from forde_serve.app.cli import main

    main.main(args=["train", *sys.argv[1:]], prog_name="python -m training")
