"""The ``rackscope`` command: one entry point, a subcommand per job.

Each package wires its subcommands in its own ``cli`` module, which exposes
``register(subparsers)``: it adds the parsers and sets each ``func`` to a
``(argparse.Namespace) -> int`` runner. Command modules import their heavy dependencies inside
those functions so ``rackscope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from rackscope import __version__
from rackscope.errors import ConfigError, RackscopeError
from rackscope.logs import formatter

# Each package's command wiring; each exposes register(subparsers).
COMMAND_MODULES = [
    "rackscope.agent.cli",  # agent
    "rackscope.dashboards.cli",  # dashboards build|check|push
    "rackscope.runner.cli",  # run, compare, report, serve-sim
    "rackscope.rack.cli",  # rack run, demo
]


# 128 + SIGPIPE, what a shell reports for a writer whose reader left.
BROKEN_PIPE_EXIT = 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps description paragraphs as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rackscope",
        description="Live throughput, power and tokens-per-joule telemetry for LLM inference racks.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rackscope {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"rackscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RackscopeError as exc:
        print(f"rackscope {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output went away (`rackscope compare ... | head`): not our error.
        # Point stdout at /dev/null so the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
