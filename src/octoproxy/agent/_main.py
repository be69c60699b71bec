"""``octoproxy agent -c agent.toml`` and ``octoproxy agent upgrade ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from ..proxy._config import describe_config_error
from ..protocol._errors import ConfigError
from ..common._secretfile import SecretFileError, read_secret
from ._api import UpgradeClientError, post_upgrade
from ._config import load_agent_config
from ._supervisor import Agent

__all__ = ["agent_from_cli", "run_agent", "upgrade_client"]


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def run_agent(config_path: str) -> int:
    """Run the agent until SIGTERM/SIGINT.

    Prints ``octoproxy agent ready admin=HOST:PORT proxy_pid=N`` on stdout once
    the proxy is first ready.

    Args:
        config_path: the agent's TOML file.

    Returns:
        The exit status: 0; 1 if the agent had stopped on a crash loop or
        could not bind its admin address; 2 on an invalid configuration.
    """
    try:
        config = load_agent_config(config_path)
    except ConfigError as exc:
        print(describe_config_error(exc, config_path, "octoproxy agent"), file=sys.stderr)
        return 2
    _setup_logging()

    def on_ready(admin: str, pid: int) -> None:
        print(f"octoproxy agent ready admin={admin} proxy_pid={pid}", flush=True)

    agent = Agent(config.agent, upgrade=config.upgrade, on_ready=on_ready)
    try:
        return trio.run(agent.run)
    except (OSError, SecretFileError) as exc:
        print(f"octoproxy agent: {exc}", file=sys.stderr)
        return 1


def upgrade_client(
    admin: str | None, agent_file: str | None, version: str | None, proxy_config: str | None, token_file: str | None = None
) -> int:
    """POST /upgrade to a running agent and print the outcome.

    Args:
        admin: the agent's admin address; or else
        agent_file: the agent's TOML file, whose ``agent.admin`` must be a
            fixed address (not port 0).
        version: a name from the agent's ``[upgrade] versions``.
        proxy_config: the new proxy config file (made absolute here); the
            agent's ``[upgrade]`` table must allow it.
        token_file: the agent's admin token file (default: ``agent.token_file``
            of ``agent_file``; with ``admin`` alone, no token).

    Returns:
        0 if the upgrade succeeded, 1 if it was rolled back, refused or
        failed, 2 on a usage error.
    """
    if admin is None:
        assert agent_file is not None
        try:
            settings = load_agent_config(agent_file).agent
            admin = settings.admin
            if token_file is None and settings.token_file is not None:
                token_file = str(settings.token_file)
        except ConfigError as exc:
            print(f"octoproxy agent upgrade: invalid configuration: {exc}", file=sys.stderr)
            return 2
        if not admin.startswith("unix:") and admin.endswith(":0"):
            print(f"octoproxy agent upgrade: {agent_file}: agent.admin uses port 0; pass --admin HOST:PORT", file=sys.stderr)
            return 2
    if version is not None and not version:
        print("octoproxy agent upgrade: --version is empty", file=sys.stderr)
        return 2
    config = str(Path(proxy_config).absolute()) if proxy_config is not None else None
    try:
        token = read_secret(token_file) if token_file is not None else None
    except SecretFileError as exc:
        print(f"octoproxy agent upgrade: {exc}", file=sys.stderr)
        return 2
    try:
        result = trio.run(lambda: post_upgrade(admin, version=version, config=config, token=token))
    except UpgradeClientError as exc:
        print(f"octoproxy agent upgrade: {exc}", file=sys.stderr)
        return 1
    print(
        f"upgrade {result.get('outcome')}: {result.get('reason')} "
        f"(pid={result.get('pid')} generation={result.get('generation')})",
        flush=True,
    )
    return 0 if result.get("outcome") == "succeeded" else 1


def agent_from_cli(args: argparse.Namespace) -> int:
    """Dispatch ``octoproxy agent`` (see :mod:`octoproxy._cli`)."""
    if getattr(args, "agent_command", None) == "upgrade":
        return upgrade_client(args.admin, args.agent_file, args.proxy_version, args.proxy_config, args.token_file)
    if args.agent_config is None:
        print("octoproxy agent: -c/--config agent.toml is required", file=sys.stderr)
        return 2
    return run_agent(args.agent_config)
