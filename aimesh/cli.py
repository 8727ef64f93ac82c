"""The ``aimesh`` command: the parser, built from the command modules in :mod:`aimesh.commands`,
and the dispatch to the chosen one.

Exit codes: 0 success; 1 the command ran and failed (or found nothing); 2 bad usage, bad
configuration or a request the mesh refused as invalid; 3 NATS could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from aimesh.commands import (
    auth,
    datasets,
    demo,
    deploy,
    experiments,
    feedback,
    ingest,
    models,
    run,
    split,
    status,
    train,
    up,
)
from aimesh.commands.mesh import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from shared.errors import ConfigError, MeshError

# Name → module, in the order `aimesh --help` lists them; each module's add_parser uses the name.
COMMANDS = {
    "up": up,
    "demo": demo,
    "run": run,
    "status": status,
    "ingest": ingest,
    "train": train,
    "models": models,
    "deploy": deploy,
    "split": split,
    "experiments": experiments,
    "feedback": feedback,
    "auth": auth,
    "datasets": datasets,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimesh", description="A mesh of PyTorch services over NATS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command].run(args)
    except ConfigError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except MeshError as exc:
        print(f"aimesh {args.command}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # the reader went away (`aimesh … | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = EXIT_OK
    sys.exit(code)
