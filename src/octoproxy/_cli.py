"""The ``octoproxy`` command line."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

from .protocol._errors import exception_leaves
from .common._secretfile import SecretFileError
from .common._startup import describe_listen_failure
from ._version import __version__


def _version_line() -> str:
    from . import frame
    from .core import _engine

    return f"octoproxy {__version__} (frame codec: {frame.IMPLEMENTATION}, kernel: {_engine.KERNEL}, Python {sys.version.split()[0]})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``octoproxy`` parser; ``command``: the subcommand given, if known (see :func:`_command_of`).

    ``ctl`` and its sub-parsers are added unless another subcommand was given:
    a proxy process (``run``) never loads the operator CLI's modules.
    """
    import argparse  # here: a plain ``octoproxy run -c PATH`` is parsed without it (see _parse_run)

    p = argparse.ArgumentParser(prog="octoproxy", description="Service-mesh sidecar proxy (Trio + Cython).")
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a sidecar proxy")
    run.add_argument("-c", "--config", required=True, help="proxy configuration file (TOML)")
    run.add_argument("--hot-restart", action="store_true", help="take over from a running proxy")
    agent = sub.add_parser(
        "agent",
        help="supervise a proxy: health checks, restarts, hot-restart upgrades",
        description="Run the agent (octoproxy agent -c agent.toml), or ask a running one to upgrade its proxy.",
    )
    agent.add_argument("-c", "--config", dest="agent_config", help="agent configuration file (TOML)")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="[upgrade]")
    upgrade = agent_sub.add_parser("upgrade", help="ask a running agent to upgrade its proxy (hot restart)")
    target = upgrade.add_mutually_exclusive_group(required=True)
    target.add_argument("--admin", help="the agent's admin address, HOST:PORT or unix:/path")
    target.add_argument("-c", dest="agent_file", metavar="AGENT_TOML", help="the agent's configuration file")
    upgrade.add_argument(
        "--version", dest="proxy_version", metavar="NAME", help="new proxy version: a name from the agent's [upgrade] versions"
    )
    upgrade.add_argument(
        "--config", dest="proxy_config", metavar="PATH", help="new proxy configuration file (one the agent's [upgrade] table allows)"
    )
    upgrade.add_argument("--token-file", metavar="PATH", help="the agent's admin token file (default: agent.token_file of -c)")
    demo = sub.add_parser("demo", help="run the whole mesh on this machine with traffic and hot restarts")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of traffic (default 20)")
    demo.add_argument("--workers", type=int, default=32, help="calls in flight (default 32)")
    cp = sub.add_parser("control-plane", help="run a control-plane server (discovery over WebSocket)")
    cp.add_argument("--listen", default="127.0.0.1:15010", help="host:port of the WebSocket listener")
    cp.add_argument("--store", choices=["embedded", "etcd"], default="embedded", help="where state lives")
    cp.add_argument("--snapshot", help="embedded store: snapshot file (restored at start, kept up to date; default STATE_DIR/snapshot.json)")
    cp.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379", help="etcd store: comma-separated client URLs")
    cp.add_argument("--etcd-prefix", default="/octoproxy/", help="etcd store: key prefix")
    cp.add_argument("--admin", help="host:port or unix:/path of the admin API (octoproxy ctl; GET /healthz, GET /sessions)")
    cp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_control_plane_trust_args(cp)
    if command not in _OTHER_COMMANDS:
        from .ctl import add_ctl_parser  # light: argparse only

        add_ctl_parser(sub)
    return p


#: subcommands whose parsing needs no ``ctl`` parser (the ones defined in :func:`build_parser` itself)
_OTHER_COMMANDS = frozenset({"run", "agent", "demo", "control-plane"})


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named by ``argv`` (its first word, when that is not an option), else None."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def _add_control_plane_trust_args(cp: argparse.ArgumentParser) -> None:
    """``octoproxy control-plane``: authentication, CA, TLS, limits (docs/control-plane.md).

    Defaults are ``None`` here (the control plane's ``Options`` holds them), so
    building the parser imports nothing heavy.
    """
    g = cp.add_argument_group("trust")
    g.add_argument("--state-dir", help="operator token, CA, admin.url, snapshot (default $OCTOPROXY_STATE_DIR, "
                   "else ~/.local/state/octoproxy/control-plane)")
    g.add_argument("--operator-token-file", help="the operator's bearer token (default: STATE_DIR/operator.token, made at first start)")
    g.add_argument("--insecure-no-auth", action="store_true", help="DEVELOPMENT ONLY: accept every session as an operator")
    g.add_argument("--trust-domain", help="SPIFFE trust domain of issued certificates (default octoproxy.local)")
    g.add_argument("--ca-cert", help="operator-supplied CA certificate (PEM; issuers after it); default: STATE_DIR/ca.crt")
    g.add_argument("--ca-key", help="its private key (PEM)")
    g.add_argument("--cert-ttl", type=float, help="lifetime of issued certificates, seconds (default 86400)")
    g.add_argument("--tls", action="store_true", help="serve wss:// with a certificate from the CA (client certificates authenticate)")
    g.add_argument("--tls-san", action="append", default=[], help="extra DNS name or IP for the listener's certificate")
    g.add_argument("--allow-endpoint-cidr", action="append", default=[], metavar="CIDR",
                   help="accept endpoint addresses in CIDR even if link-local, unspecified, multicast or broadcast")
    g.add_argument("--max-registrations-per-session", type=int, help="endpoints one session may register (default 16)")
    g.add_argument("--max-subscriptions", type=int, help="names per session and type (default 10000)")
    g.add_argument("--max-message-size", type=int, help="bytes per client message (default 4194304)")
    g.add_argument("--max-subscription-bytes", type=int,
                   help="total length of the names one session subscribes to, all types (default 2097152; 0: none)")
    g.add_argument("--max-sessions-per-peer", type=int, help="sessions per IP address (default 64)")
    g.add_argument("--lease-grace", type=float, help="seconds before a closed session's leases are revoked (default 2)")
    g.add_argument("--etcd-ca-file", help="etcd store over https://: CA to verify etcd with")
    g.add_argument("--etcd-cert-file", help="etcd store over https://: client certificate")
    g.add_argument("--etcd-key-file", help="etcd store over https://: client key")


def _parse_run(argv: Sequence[str]) -> Any:
    """``run -c PATH`` and ``--hot-restart`` in their plain spellings, as argparse would parse them; else None.

    A sidecar proxy is started this way; parsing it here keeps argparse (and
    gettext) out of the proxy process (docs/benchmarks.md, "Idle RSS").
    Anything else (abbreviations, ``-cPATH``, ``--config=PATH``, errors,
    ``--help``) returns None and goes to the full parser.
    """
    words = list(argv)
    if not words or words[0] != "run":
        return None
    hot_restart = False
    if words[1:2] == ["--hot-restart"]:
        hot_restart = True
        del words[1]
    elif words[3:] == ["--hot-restart"]:
        hot_restart = True
        del words[3]
    if len(words) != 3 or words[1] not in ("-c", "--config") or words[2].startswith("-"):
        return None
    return SimpleNamespace(command="run", config=words[2], hot_restart=hot_restart)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser: argparse.ArgumentParser | None = None
    args = _parse_run(argv)
    if args is None:
        parser = build_parser(_command_of(argv))
        args = parser.parse_args(argv)
    if args.command is None:
        assert parser is not None
        parser.print_help()
        return 2
    try:
        return _dispatch(parser, args)
    except BaseException as exc:  # the one boundary where start-up failures become one line
        line = describe_listen_failure(exc, _listeners(args))
        if line is not None:
            line = f"cannot listen on {line}"
        else:
            leaves = exception_leaves(exc)
            if not leaves or not all(isinstance(leaf, SecretFileError) for leaf in leaves):
                raise
            line = f"unsafe or unusable secret file: {leaves[0]}"  # names the path, never the secret
        if _debug(args):
            traceback.print_exception(exc)
        name = "octoproxy" if args.command == "run" else f"octoproxy {args.command}"
        print(f"{name}: {line}", file=sys.stderr)
        return 2


def _listeners(args: Any) -> list[tuple[str, str]]:
    """The command's listeners, ``(key, address)``, in the order it binds them."""
    from .protocol._errors import ConfigError

    try:
        if args.command == "run":
            from .proxy._config import load_config

            cfg = load_config(args.config)
            inbound = cfg.inbound.listen if cfg.inbound is not None else ""
            return [
                ("outbound.uds", str(cfg.outbound.uds)),
                ("inbound.listen", inbound),
                ("admin.listen", cfg.admin.listen),
                ("proxy.hot_restart_uds", str(cfg.hot_restart_path)),
            ]
        if args.command == "control-plane":
            return [("--listen", args.listen), ("--admin", args.admin or "")]
        if args.command == "agent" and args.agent_config:
            from .agent._config import load_agent_config

            return [("agent.admin", load_agent_config(args.agent_config).agent.admin)]
    except ConfigError:
        pass
    return []


def _debug(args: Any) -> bool:
    """Whether a start-up failure also prints its traceback (log level debug)."""
    if os.environ.get("OCTOPROXY_TRACEBACK", "") not in ("", "0"):
        return True
    if getattr(args, "log_level", None) == "debug":
        return True
    if args.command == "run":
        from .proxy._config import load_config
        from .protocol._errors import ConfigError

        try:
            return load_config(args.config).proxy.log_level == "debug"
        except ConfigError:
            return False
    return False


def _dispatch(parser: argparse.ArgumentParser | None, args: Any) -> int:
    if args.command == "run":
        from .proxy._main import run_from_cli

        return run_from_cli(args.config, hot_restart=args.hot_restart)
    if args.command == "control-plane":
        from .controlplane._main import Options
        from .controlplane._main import run_from_cli as run_control_plane

        given = {
            name: getattr(args, name)
            for name in (
                "state_dir", "operator_token_file", "trust_domain", "ca_cert", "ca_key", "cert_ttl",
                "max_registrations_per_session", "max_subscriptions", "max_message_size", "max_sessions_per_peer",
                "lease_grace", "max_subscription_bytes",
            )
            if getattr(args, name) is not None
        }
        options = Options(
            insecure_no_auth=args.insecure_no_auth,
            tls=args.tls,
            tls_san=tuple(args.tls_san),
            allow_endpoint_cidr=tuple(args.allow_endpoint_cidr),
            **given,
        )
        return run_control_plane(
            args.listen,
            store=args.store,
            snapshot=args.snapshot,
            etcd_endpoints=args.etcd_endpoints,
            etcd_prefix=args.etcd_prefix,
            etcd_ca_file=args.etcd_ca_file,
            etcd_cert_file=args.etcd_cert_file,
            etcd_key_file=args.etcd_key_file,
            admin=args.admin,
            log_level=args.log_level,
            options=options,
        )
    if args.command == "ctl":
        from .ctl import run_ctl

        return run_ctl(args)
    if args.command == "demo":
        from ._demo import main as demo_main

        return demo_main(args.duration, args.workers)
    if args.command == "agent":
        from .agent._main import agent_from_cli

        return agent_from_cli(args)
    assert parser is not None  # _parse_run makes only "run"
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2
