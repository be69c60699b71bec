"""``octoproxy ctl``: the operator's command line for a running control plane.

It talks to the control plane's admin HTTP API (``--admin`` of
``octoproxy control-plane``; see :mod:`octoproxy.controlplane._admin_api`)
with the operator's bearer token, one request per command. By default it
finds both where a control plane on this machine left them: ``admin.url``
and ``operator.token`` in the control plane's state directory
(``$OCTOPROXY_STATE_DIR``, else ``~/.local/state/octoproxy/control-plane``).

Adding a command group (``policy``, ``config`` ...): write a function that
takes the ``ctl`` sub-parsers object, adds its group with one sub-parser per
action, each with ``set_defaults(run=<async function (api, args) -> int>)``,
and append it to :data:`GROUPS`. Imports of Trio and the HTTP client are
deferred to when a command runs: this module is imported to build the
``octoproxy`` parser for every subcommand.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ._config import config_group
from ..common._paths import default_state_dir
from ._policy import policy_group

__all__ = ["add_ctl_parser", "run_ctl", "GROUPS", "Api", "CtlError", "parse_duration"]

Run = Callable[["Api", argparse.Namespace], Awaitable[int]]


class CtlError(Exception):
    """A command failed; the message is printed as one line."""


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"15m"``, ``"24h"``, ``"7d"`` -> seconds.

    Raises:
        argparse.ArgumentTypeError: if it is not a duration.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    number = t[:-1] if scale is not None else t
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 24h, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a duration must not be negative: {text!r}")
    return value


class Api:
    """The admin API of one control plane, with the operator's token.

    Args:
        url: ``http://host:port`` of the admin API.
        token: the operator token.
        timeout: deadline of each request.
    """

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise CtlError(f"--control-plane must be http://host:port (the control plane's --admin), got {url!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.address = f"{host}:{parts.port}"
        self.token = token
        self.timeout = timeout

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> Any:
        """Send one request; return the decoded JSON answer.

        Raises:
            CtlError: if the control plane cannot be reached or answers an error.
        """
        import trio

        from ..common._admin import http_request

        data = json.dumps(body).encode() if body is not None else b""
        headers = [("Authorization", f"Bearer {self.token}"), ("Content-Type", "application/json")]
        try:
            status, _, reply = await http_request(self.address, method, path, data, headers=headers, timeout=self.timeout)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise CtlError(f"cannot reach the control plane's admin API at {self.address}: {type(exc).__name__}: {exc}") from None
        try:
            decoded = json.loads(reply) if reply else {}
        except ValueError:
            decoded = {"error": reply.decode(errors="replace").strip()}
        if status not in ok:
            error = decoded.get("error") if isinstance(decoded, dict) else None
            hint = " (check --token-file: it must hold the operator token)" if status in (401, 403) else ""
            raise CtlError(f"{method} {path}: HTTP {status}: {error or decoded}{hint}")
        return decoded


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# ---------------------------------------------------------------- token
async def _token_create(api: Api, args: argparse.Namespace) -> int:
    info = await api.call("POST", "/v1/tokens", {"service": args.service, "ttl": args.ttl})
    expires = "never" if not info["expires_unix_ms"] else f"in {args.ttl:.0f}s"
    print(f"join token {info['id']} for service {info['service']} (expires: {expires}); shown once:", file=sys.stderr)
    print(info["token"])
    return 0


async def _token_list(api: Api, args: argparse.Namespace) -> int:
    tokens = (await api.call("GET", "/v1/tokens"))["tokens"]
    if args.json:
        _out(tokens)
        return 0
    print(f"{'ID':<14} {'SERVICE':<32} EXPIRES_UNIX_MS")
    for t in tokens:
        print(f"{t['id']:<14} {t['service']:<32} {t['expires_unix_ms'] or 'never'}")
    return 0


async def _token_revoke(api: Api, args: argparse.Namespace) -> int:
    await api.call("POST", "/v1/tokens/revoke", {"id": args.id})
    print(f"revoked join token {args.id} (its sessions are closed)")
    return 0


def _token_group(sub: Any) -> None:
    g = sub.add_parser("token", help="join tokens: how a service's proxies authenticate").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = g.add_parser("create", help="make a join token for a service (printed once on stdout)")
    p.add_argument("--service", required=True, help="the service the token authenticates as")
    p.add_argument("--ttl", type=parse_duration, default=0.0, help="validity (90s, 15m, 24h, 7d); default: never expires")
    p.set_defaults(run=_token_create)
    p = g.add_parser("list", help="list join tokens (ids and services, never the secrets)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_token_list)
    p = g.add_parser("revoke", help="revoke a join token and close the sessions it opened")
    p.add_argument("id", help="the token id (octoproxy ctl token list)")
    p.set_defaults(run=_token_revoke)


# ---------------------------------------------------------------- endpoints
async def _endpoints_list(api: Api, args: argparse.Namespace) -> int:
    _out(await api.call("GET", f"/v1/endpoints?service={quote(args.service)}"))
    return 0


async def _endpoints_register(api: Api, args: argparse.Namespace) -> int:
    tags = {}
    for item in args.tag:
        k, sep, v = item.partition("=")
        if not sep:
            raise CtlError(f"--tag wants key=value, got {item!r}")
        tags[k] = v
    endpoint = {"address": args.address, "weight": args.weight, "region": args.region, "idc": args.idc, "tags": tags}
    _out(await api.call("POST", "/v1/endpoints/register", {"service": args.service, "endpoint": endpoint, "ttl": args.ttl}))
    return 0


async def _endpoints_deregister(api: Api, args: argparse.Namespace) -> int:
    _out(await api.call("POST", "/v1/endpoints/deregister", {"service": args.service, "address": args.address}))
    return 0


async def _endpoints_set_status(api: Api, args: argparse.Namespace) -> int:
    body = {"service": args.service, "address": args.address, "status": args.status.upper()}
    _out(await api.call("POST", "/v1/endpoints/status", body))
    return 0


def _endpoints_group(sub: Any) -> None:
    g = sub.add_parser("endpoints", help="a service's registered endpoints").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = g.add_parser("list", help="show a service's endpoints")
    p.add_argument("service")
    p.set_defaults(run=_endpoints_list)
    p = g.add_parser("register", help="register an endpoint under a lease that is NOT kept alive (expires after --ttl)")
    p.add_argument("service")
    p.add_argument("address", help="host:port of the provider's proxy")
    p.add_argument("--weight", type=int, default=100)
    p.add_argument("--region", default="")
    p.add_argument("--idc", default="")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ttl", type=parse_duration, default=300.0, help="lease (capped by the server's maximum); default 300s")
    p.set_defaults(run=_endpoints_register)
    p = g.add_parser("deregister", help="remove an endpoint (a live provider registers itself again)")
    p.add_argument("service")
    p.add_argument("address")
    p.set_defaults(run=_endpoints_deregister)
    p = g.add_parser("set-status", help="set an endpoint's status")
    p.add_argument("service")
    p.add_argument("address")
    p.add_argument("status", choices=["HEALTHY", "STARTING", "STOPPING", "UNHEALTHY", "healthy", "starting", "stopping", "unhealthy"])
    p.set_defaults(run=_endpoints_set_status)


# ---------------------------------------------------------------- routes
async def _routes_get(api: Api, args: argparse.Namespace) -> int:
    _out((await api.call("GET", f"/v1/routes?service={quote(args.service)}"))["rules"])
    return 0


def _canonical(rules: dict[str, Any]) -> list[str]:
    return json.dumps(rules, indent=2, sort_keys=True).splitlines()


async def _routes_put(api: Api, args: argparse.Namespace) -> int:
    try:
        rules = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read route rules from {args.file}: {exc}") from None
    if not isinstance(rules, dict) or not rules.get("service"):
        raise CtlError(f"{args.file}: want a JSON RouteRules object with a \"service\" (see octoproxy ctl routes get)")
    current = (await api.call("GET", f"/v1/routes?service={quote(str(rules['service']))}"))["rules"]
    current.setdefault("service", rules["service"])
    diff = list(difflib.unified_diff(_canonical(current), _canonical(rules), "current", args.file, lineterm=""))
    if not diff:
        print(f"route rules of {rules['service']}: no change")
        return 0
    print("\n".join(diff))
    if args.dry_run:
        print("(dry run: nothing changed)")
        return 0
    await api.call("PUT", "/v1/routes", rules)
    print(f"route rules of {rules['service']} replaced")
    return 0


def _routes_group(sub: Any) -> None:
    g = sub.add_parser("routes", help="a service's route rules").add_subparsers(dest="action", metavar="ACTION", required=True)
    p = g.add_parser("get", help="print a service's route rules (JSON, the input format of put)")
    p.add_argument("service")
    p.set_defaults(run=_routes_get)
    p = g.add_parser("put", help="replace a service's route rules from a JSON file (no rules deletes them)")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="print what would change and change nothing")
    p.set_defaults(run=_routes_put)


# ---------------------------------------------------------------- authorization policies
async def _authz_get(api: Api, args: argparse.Namespace) -> int:
    reply = await api.call("GET", f"/v1/authz?service={quote(args.service)}")
    if reply.get("policy") is None:
        print(f"{args.service} has no authorization policy on the control plane (its proxies apply [authz])", file=sys.stderr)
        return 1
    _out(reply["policy"])
    return 0


async def _authz_put(api: Api, args: argparse.Namespace) -> int:
    try:
        policy = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read an authorization policy from {args.file}: {exc}") from None
    if not isinstance(policy, dict):
        raise CtlError(f"{args.file}: want a JSON AuthorizationPolicy object (see octoproxy ctl authz get)")
    if policy.setdefault("service", args.service) != args.service:
        raise CtlError(f"{args.file} is the policy of service {policy['service']!r}, not {args.service!r}")
    current = (await api.call("GET", f"/v1/authz?service={quote(args.service)}")).get("policy") or {}
    # the control plane validates it (as the proxies will) even in a dry run
    await api.call("PUT", "/v1/authz?dry_run=1", policy)
    diff = list(difflib.unified_diff(_canonical(current), _canonical(policy), "current", args.file, lineterm=""))
    if not diff:
        print(f"authorization policy of {args.service}: no change")
        return 0
    print("\n".join(diff))
    if args.dry_run:
        print("(dry run: nothing changed)")
        return 0
    await api.call("PUT", "/v1/authz", policy)
    print(f"authorization policy of {args.service} replaced")
    return 0


async def _authz_delete(api: Api, args: argparse.Namespace) -> int:
    await api.call("POST", "/v1/authz/delete", {"service": args.service})
    print(f"authorization policy of {args.service} deleted (its proxies apply their [authz] again)")
    return 0


def _authz_group(sub: Any) -> None:
    g = sub.add_parser("authz", help="a service's pushed authorization policy").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = g.add_parser("get", help="print a service's authorization policy (JSON, the input format of put)")
    p.add_argument("service")
    p.set_defaults(run=_authz_get)
    p = g.add_parser("put", help="replace a service's authorization policy from a JSON file")
    p.add_argument("service")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="validate, print what would change and change nothing")
    p.set_defaults(run=_authz_put)
    p = g.add_parser("delete", help="delete a service's authorization policy (its proxies fall back to [authz])")
    p.add_argument("service")
    p.set_defaults(run=_authz_delete)


#: command groups of ``octoproxy ctl``; each adds its sub-parser (see the module doc)
GROUPS: list[Callable[[Any], None]] = [
    _token_group, _endpoints_group, _routes_group, config_group, _authz_group, policy_group,
]  # fmt: skip


def add_ctl_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``ctl`` to the ``octoproxy`` sub-parsers; returns its parser."""
    ctl: argparse.ArgumentParser = sub.add_parser(
        "ctl",
        help="operate a running control plane: join tokens, endpoints, route rules, app configuration, policies",
        description="Operate a control plane through its admin API, with the operator token.",
    )
    ctl.add_argument(
        "--control-plane",
        metavar="URL",
        help="the control plane's admin API, http://HOST:PORT (default: $OCTOPROXY_CONTROL_PLANE, "
        "else admin.url in the control plane's state directory)",
    )
    ctl.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the operator token (default: $OCTOPROXY_OPERATOR_TOKEN_FILE, "
        "else operator.token in the control plane's state directory)",
    )
    ctl.add_argument("--state-dir", default=None, help="the control plane's state directory (for the defaults above)")
    ctl.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    groups = ctl.add_subparsers(dest="group", metavar="GROUP", required=True)
    for add in GROUPS:
        add(groups)
    return ctl


def run_ctl(args: argparse.Namespace) -> int:
    """Run one ``octoproxy ctl`` command. Returns the exit status (1 with one line on stderr on failure)."""
    state = Path(args.state_dir or default_state_dir())
    try:
        url = args.control_plane or os.environ.get("OCTOPROXY_CONTROL_PLANE")
        if not url:
            try:
                url = (state / "admin.url").read_text().strip()
            except OSError:
                raise CtlError(
                    f"no --control-plane given and no {state / 'admin.url'} "
                    "(start the control plane with --admin, or pass --control-plane http://HOST:PORT)"
                ) from None
        token_file = Path(args.token_file or os.environ.get("OCTOPROXY_OPERATOR_TOKEN_FILE") or state / "operator.token")
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise CtlError(f"cannot read the operator token: {exc} (pass --token-file)") from None
        api = Api(url, token, args.timeout)
        run: Run = args.run
        import trio

        return trio.run(run, api, args)
    except CtlError as exc:
        print(f"octoproxy ctl: {exc}", file=sys.stderr)
        return 1
