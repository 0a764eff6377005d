"""The one `spillway` command. Each component adds its subcommands in its own `cli` module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from spillway import __version__
from spillway import logging as slog

# Modules with `add_commands(subparsers)`; each registers subcommands whose handler is
# stored as `func` (sync, returning an exit code).
COMMAND_MODULES = (
    "spillway.agent.cli",
    "spillway.operator.cli",
    "spillway.deviceplugin.cli",
    "spillway.dra.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillway", description="Lend idle GPU memory to the tenants that need it.")
    parser.add_argument("--version", action="version", version=f"spillway {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    slog.setup(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `spillway pool show | head`
        return 0
    except SystemExit:
        raise
    except Exception as exc:  # a clear one-line error for the person at the terminal
        print(f"spillway: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
