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
    "rackscope.dashboards.cli",  # dashboards build|check|push, baseline
    "rackscope.runner.cli",  # run, compare, report, serve-sim
    "rackscope.rack.cli",  # rack run, demo
]
# Which module wires each command. A command line that names one registers only that module:
# registering the others imports what their flags are declared with (the agent's settings, the
# rack's task schema), a few hundred milliseconds of CPU that a benchmark client would count
# against its own start-up. A module may offer ``register_command(subparsers, name)`` to add one
# of its commands alone.
COMMANDS = {
    "agent": "rackscope.agent.cli",
    "dashboards": "rackscope.dashboards.cli",
    "baseline": "rackscope.dashboards.cli",
    "run": "rackscope.runner.cli",
    "compare": "rackscope.runner.cli",
    "report": "rackscope.runner.cli",
    "serve-sim": "rackscope.runner.cli",
    "rack": "rackscope.rack.cli",
    "demo": "rackscope.rack.cli",
}


# 128 + SIGPIPE, what a shell reports for a writer whose reader left.
BROKEN_PIPE_EXIT = 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps description paragraphs as written."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or, given one of ``COMMANDS``, only what that command needs."""
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
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command])
        one = getattr(module, "register_command", None)
        if one is not None:
            one(sub, command)
        else:
            module.register(sub)
        return parser
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The command a command line names (its first word past the top-level options), if any."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(named_command(argv))
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
