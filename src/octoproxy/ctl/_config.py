"""``octoproxy ctl config``: configuration for apps (docs/control-plane.md).

Every command goes through the control plane's admin API with the operator
token; the version logic is in :mod:`octoproxy.discovery._appconfig`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ._main import Api

__all__ = ["config_group"]

#: a FILE.json for ``put`` is refused past this size (the admin API takes 1 MiB)
MAX_FILE = 1 << 20


def _target(args: argparse.Namespace) -> dict[str, Any]:
    return {"service": args.service, "env": args.env}


def _show(answer: dict[str, Any], what: str) -> int:
    record = answer["record"]
    lines = answer.get("diff") or []
    print("\n".join(lines) if lines else "(no change of values)")
    if answer.get("dry_run"):
        print("(dry run: nothing changed)")
        return 0
    release = f", version {record.get('candidate')} to {record.get('percent')}%" if int(record.get("candidate") or 0) else ""
    print(f"{what}: {record['service']}.{record['environment']} stable version {record.get('stable')}{release}")
    return 0


async def _get(api: Api, args: argparse.Namespace) -> int:
    rec = await api.call("GET", f"/v1/config?service={quote(args.service)}&env={quote(args.env)}")
    out = {k: rec.get(k) for k in ("service", "environment", "stable", "candidate", "percent", "values")}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


async def _history(api: Api, args: argparse.Namespace) -> int:
    rec = await api.call("GET", f"/v1/config?service={quote(args.service)}&env={quote(args.env)}")
    for v in reversed(rec.get("history") or []):
        version = int(v.get("version", 0))
        mark = " stable" if version == int(rec.get("stable") or 0) else ""
        if version == int(rec.get("candidate") or 0):
            mark = f" released to {rec.get('percent')}%"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(v.get("created_unix_ms") or 0) / 1000))
        print(f"{version:>6}  {when}  {len(v.get('values') or {}):>4} keys  {v.get('note', '')}{mark}")
    return 0


async def _set(api: Api, args: argparse.Namespace) -> int:
    body = {**_target(args), "set": {args.key: args.value}, "percent": args.percent, "dry_run": args.dry_run}
    return _show(await api.call("POST", "/v1/config/set", body), "set")


async def _put(api: Api, args: argparse.Namespace) -> int:
    from ._main import CtlError

    try:
        path = Path(args.file)
        if path.stat().st_size > MAX_FILE:
            raise CtlError(f"{args.file}: larger than {MAX_FILE} bytes")
        values = json.loads(path.read_bytes()[: MAX_FILE + 1])
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read configuration from {args.file}: {exc}") from None
    if not isinstance(values, dict):
        raise CtlError(f'{args.file}: want a JSON object {{"key": "value", ...}}')
    # a non-string value is sent as its JSON text (values are strings)
    values = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}
    body = {**_target(args), "values": values, "percent": args.percent, "dry_run": args.dry_run}
    return _show(await api.call("POST", "/v1/config/put", body), "put")


async def _release(api: Api, args: argparse.Namespace) -> int:
    body = {**_target(args), "version": args.version, "percent": args.percent}
    return _show(await api.call("POST", "/v1/config/release", body), "release")


async def _promote(api: Api, args: argparse.Namespace) -> int:
    return _show(await api.call("POST", "/v1/config/promote", _target(args)), "promote")


async def _rollback(api: Api, args: argparse.Namespace) -> int:
    body = {**_target(args), "version": args.version}
    return _show(await api.call("POST", "/v1/config/rollback", body), "rollback")


def config_group(sub: Any) -> None:
    g = sub.add_parser("config", help="configuration for apps: versions, gradual release, rollback").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )

    def cmd(name: str, help: str, run: Any, *extra: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = g.add_parser(name, help=help)
        p.add_argument("service")
        for arg in extra:
            if arg == "version":
                p.add_argument(arg, type=int)
            else:
                p.add_argument(arg)
        p.add_argument("--env", default="default", help="environment (default: default)")
        p.set_defaults(run=run)
        return p

    cmd("get", "print the stable values (and any release in progress)", _get)
    cmd("history", "list the versions kept, newest first", _history)
    for name, run, extra, help in (
        ("set", _set, ("key", "value"), "set one key: a new version (the newest version edited)"),
        ("put", _put, ("file",), "replace all values from a JSON object file: a new version"),
    ):
        p = cmd(name, help, run, *extra)
        p.add_argument("--dry-run", action="store_true", help="print the diff and change nothing")
        p.add_argument("--percent", type=int, default=100, help="release the new version to this share of instances")
    p = cmd("release", "release an existing version to a share of the instances", _release, "version")
    p.add_argument("--percent", type=int, required=True, help="0..100 (100: it becomes stable)")
    cmd("promote", "the version in release becomes stable for every instance", _promote)
    cmd("rollback", "a new stable version with an earlier version's content", _rollback, "version")
