"""The control plane's admin API for configuration for apps (``octoproxy ctl config``).

Operators only (the admin API's bearer token), like every write. The record
logic (versions, limits, gradual release) is the sans-IO
:mod:`octoproxy.discovery._appconfig`; this module applies one operation to the record
with :meth:`Store.update_app_config` (a compare-and-swap in etcd, so two
operators writing through two replicas lose nothing).

| method | path | body / query | what |
|---|---|---|---|
| GET | /v1/config | ``?service=&env=`` | record: stable, candidate, percent, history |
| POST | /v1/config/put | ``{service, env, values, percent, dry_run}`` | a new version with exactly ``values`` |
| POST | /v1/config/set | ``{service, env, set: {k: v}, delete: [k], percent, dry_run}`` | a new version: the newest one edited |
| POST | /v1/config/release | ``{service, env, version, percent}`` | release ``version`` to ``percent`` % |
| POST | /v1/config/promote | ``{service, env}`` | the candidate becomes stable |
| POST | /v1/config/rollback | ``{service, env, version}`` | a new stable version with ``version``'s content |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from ..discovery import _appconfig as core
from ..common._admin import Request, Response
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._store import Store

__all__ = ["appconfig_routes"]

log = logging.getLogger("octoproxy.controlplane.appconfig")


def _record_json(record: pb.AppConfigRecord) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(
        record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    stable = core.find(record, record.stable)
    out["values"] = dict(stable.values) if stable is not None else {}
    return out


def appconfig_routes(store: Store) -> dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]:
    """The routes (to be wrapped by the admin API's operator check)."""

    def target(data: dict[str, Any]) -> tuple[str, str]:
        service = str(data.get("service") or "")
        env = str(data.get("env") or data.get("environment") or core.DEFAULT_ENVIRONMENT)
        core.resource_name(service, env)  # AppConfigError (a ValueError): 400
        return service, env

    def body(req: Request) -> dict[str, Any]:
        data = req.json()
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        return data

    def percent_of(data: dict[str, Any], default: int = 100) -> int:
        value = data.get("percent", default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise core.AppConfigError(f"percent must be an integer 0..100, got {value!r}")
        return value

    def version_of(data: dict[str, Any]) -> int:
        value = data.get("version")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise core.AppConfigError(f"version must be a positive integer, got {value!r}")
        return value

    async def write(data: dict[str, Any], update: Callable[[pb.AppConfigRecord], pb.AppConfigRecord], what: str) -> Response:
        """Apply ``update`` (a compare-and-swap in etcd); with ``dry_run``, only show what it would do."""
        service, env = target(data)
        if data.get("dry_run"):
            old = store.view.app_configs.get(f"{service}.{env}") or core.new_record(service, env)
            new = update(old)
        else:
            old, new = await store.update_app_config(service, env, update)
            log.info("operator: config %s.%s %s -> stable %d, candidate %d at %d%%", service, env, what, new.stable,
                     new.candidate, new.percent)  # fmt: skip
        before = core.find(old, old.stable)
        after = core.find(new, new.last_version if new.last_version != old.last_version else new.stable)
        lines = core.diff(dict(before.values) if before else {}, dict(after.values) if after else {})
        return Response(200, {"dry_run": bool(data.get("dry_run")), "diff": lines, "record": _record_json(new)})

    async def get(req: Request) -> Response:
        service, env = target(dict(req.query))
        record = store.view.app_configs.get(f"{service}.{env}") or core.new_record(service, env)
        return Response(200, _record_json(record))

    async def put(req: Request) -> Response:
        data = body(req)
        values = data.get("values")
        if not isinstance(values, dict):
            raise core.AppConfigError('expected {"values": {"key": "value", ...}}')
        percent, now = percent_of(data), int(time.time() * 1000)
        return await write(data, lambda r: core.put_version(r, values, now, "put", percent), "put")

    async def set_keys(req: Request) -> Response:
        data = body(req)
        changes = data.get("set") or {}
        deletes = data.get("delete") or []
        if not isinstance(changes, dict) or not isinstance(deletes, list):
            raise core.AppConfigError('expected {"set": {"key": "value"}, "delete": ["key"]}')
        percent, now = percent_of(data), int(time.time() * 1000)

        def edit(record: pb.AppConfigRecord) -> pb.AppConfigRecord:
            values = core.head_values(record)
            values.update(changes)
            for key in deletes:
                values.pop(str(key), None)
            return core.put_version(record, values, now, "set", percent)

        return await write(data, edit, "set")

    async def release(req: Request) -> Response:
        data = body(req)
        version, percent = version_of(data), percent_of(data, -1)
        return await write(data, lambda r: core.release(r, version, percent), f"release {version} to {percent}%")

    async def promote(req: Request) -> Response:
        return await write(body(req), core.promote, "promote")

    async def rollback(req: Request) -> Response:
        data = body(req)
        version, now = version_of(data), int(time.time() * 1000)
        return await write(data, lambda r: core.rollback(r, version, now), f"rollback to {version}")

    return {
        ("GET", "/v1/config"): get,
        ("POST", "/v1/config/put"): put,
        ("POST", "/v1/config/set"): set_keys,
        ("POST", "/v1/config/release"): release,
        ("POST", "/v1/config/promote"): promote,
        ("POST", "/v1/config/rollback"): rollback,
    }
