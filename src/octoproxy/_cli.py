"""The ``octoproxy`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


def _version_line() -> str:
    from . import frame

    return f"octoproxy {__version__} (frame codec: {frame.IMPLEMENTATION}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octoproxy", description="Service-mesh sidecar proxy (Trio + Cython).")
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a sidecar proxy")
    run.add_argument("-c", "--config", required=True, help="proxy configuration file (TOML)")
    run.add_argument("--hot-restart", action="store_true", help="take over from a running proxy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        from .proxy._main import run_from_cli

        return run_from_cli(args.config, hot_restart=args.hot_restart)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2
