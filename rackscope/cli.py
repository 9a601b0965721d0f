"""The ``rackscope`` command: one entry point, a subcommand per job.

Each subcommand lives in the package that owns it and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a ``(argparse.Namespace) -> int`` runner. Command
modules import their heavy dependencies inside that function so ``rackscope --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rackscope import __version__
from rackscope.errors import ConfigError, RackscopeError

# One module per subcommand; each exposes register(subparsers).
COMMAND_MODULES = [
    "rackscope.agent.cli",  # agent
    "rackscope.dashboards.cli",  # dashboards build|check|push
    "rackscope.runner.cli",  # run, compare
    "rackscope.rack.cli",  # rack run, demo
    "rackscope.runner.report",  # report
    "rackscope.runner.serve_sim",  # serve-sim
]


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
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    return code


if __name__ == "__main__":
    sys.exit(main())
