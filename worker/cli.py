"""The `hyacinth` command: listener, operator commands and model tools."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from worker.config import Settings
from worker.errors import HyacinthError
from worker.logs import configure_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from worker import model_cli, pipeline_cli

    parser = argparse.ArgumentParser(
        prog="hyacinth",
        description="HyacinthWatch worker: finds water hyacinth in observation photos.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline_cli.register(commands)
    model_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hyacinth` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        configure_logging(settings)
        status: int = args.run(args, settings)
    except HyacinthError as error:
        print(f"hyacinth {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
