"""``octoproxy ctl policy``: a service's governance policy (docs/governance.md).

The file given to ``set`` holds the service's policy table, the shape of
``[governance.services.<service>]`` in a proxy's TOML: a JSON object, or a TOML
document when the file name ends in ``.toml`` (keys ``routing``, ``outlier``,
``breaker``, ``retry``, ``rate_limits``, ``tracing``, ``access_log``). The
control plane validates it with the proxies' own parser (every error is
listed; nothing changes), stores its canonical form (every default spelled
out) as a new version, and pushes it to every proxy that calls or serves the
service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ._main import Api

__all__ = ["policy_group", "read_policy_file", "MAX_FILE"]

#: a policy file is refused past this size (the control plane stores at most 256 KiB)
MAX_FILE = 1 << 20


def read_policy_file(path: str) -> Any:
    """The policy table in ``path`` (JSON, or TOML for ``*.toml``).

    Raises:
        CtlError: the file cannot be read or parsed, or is too big.
    """
    from ._main import CtlError

    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE:
            raise CtlError(f"{path}: larger than {MAX_FILE} bytes")
        data = p.read_bytes()[: MAX_FILE + 1]
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(data.decode())
        return json.loads(data)
    except (OSError, ValueError) as exc:  # (TOMLDecodeError and UnicodeDecodeError are ValueErrors)
        raise CtlError(f"cannot read a governance policy from {path}: {exc}") from None


async def _get(api: Api, args: argparse.Namespace) -> int:
    reply = await api.call("GET", f"/v1/policy?service={quote(args.service)}")
    if reply.get("policy") is None:
        print(f"{args.service} has no governance policy on the control plane (its proxies apply [governance])", file=sys.stderr)
        return 1
    print(f"# {args.service} version {reply['version']}", file=sys.stderr)
    print(json.dumps(reply["policy"], indent=2, sort_keys=True))
    return 0


async def _set(api: Api, args: argparse.Namespace) -> int:
    body = {"service": args.service, "policy": read_policy_file(args.file)}
    # validated by the control plane (with the proxies' parser) even in a dry run
    reply = await api.call("PUT", "/v1/policy?dry_run=1" if args.dry_run else "/v1/policy", body)
    diff = reply.get("diff") or []
    print("\n".join(diff) if diff else f"governance policy of {args.service}: no change")
    if args.dry_run:
        print("(dry run: nothing changed)")
    elif diff:
        print(f"governance policy of {args.service}: version {reply['version']}")
    return 0


async def _delete(api: Api, args: argparse.Namespace) -> int:
    reply = await api.call("POST", "/v1/policy/delete", {"service": args.service})
    print(f"governance policy of {args.service} deleted (version {reply['version']}); its proxies apply [governance] again")
    return 0


async def _history(api: Api, args: argparse.Namespace) -> int:
    reply = await api.call("GET", f"/v1/policy/history?service={quote(args.service)}")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    for v in reply.get("history") or []:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(v.get("created_unix_ms") or 0) / 1000))
        mark = "  (in force)" if v["version"] == reply.get("current") else ""
        sections = ", ".join(sorted(v["policy"])) if v.get("policy") else "-"
        print(f"{v['version']:>6}  {when}  {v.get('note', ''):<7} {sections}{mark}")
    return 0


def policy_group(sub: Any) -> None:
    """Add ``policy get|set|delete|history`` to the ``ctl`` sub-parsers."""
    g = sub.add_parser("policy", help="a service's governance policy (routing, limits, retries...)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = g.add_parser("get", help="print the policy in force (JSON, every default spelled out; input format of set)")
    p.add_argument("service")
    p.set_defaults(run=_get)
    p = g.add_parser("set", help="replace the policy from a file (JSON, or TOML if *.toml): a new version")
    p.add_argument("service")
    p.add_argument("file", help="the service's policy table, as [governance.services.<service>] in a proxy's TOML")
    p.add_argument("--dry-run", action="store_true", help="validate, print what would change and change nothing")
    p.set_defaults(run=_set)
    p = g.add_parser("delete", help="delete the policy (its proxies fall back to their [governance] table)")
    p.add_argument("service")
    p.set_defaults(run=_delete)
    p = g.add_parser("history", help="list the stored versions, newest first")
    p.add_argument("service")
    p.add_argument("--json", action="store_true", help="JSON output, with each version's policy")
    p.set_defaults(run=_history)
