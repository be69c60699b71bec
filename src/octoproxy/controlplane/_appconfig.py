"""The control plane's admin API for configuration for apps (``octoproxy ctl config``).

Operators only (the admin API's bearer token), like every write. The record
logic (versions, limits, gradual release) is the sans-IO
:mod:`octoproxy._appconfig`; this module reads the record from the store's
view, applies one operation and writes the record back.

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

from .. import _appconfig as core
from .._admin import Request, Response
from ..proto import octoproxy_discovery_pb2 as pb
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

    def target(data: dict[str, Any]) -> tuple[str, str, pb.AppConfigRecord]:
        service = str(data.get("service") or "")
        env = str(data.get("env") or data.get("environment") or core.DEFAULT_ENVIRONMENT)
        name = core.resource_name(service, env)  # AppConfigError (a ValueError): 400
        record = store.view.app_configs.get(name) or core.new_record(service, env)
        return service, env, record

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

    async def write(old: pb.AppConfigRecord, new: pb.AppConfigRecord, what: str, dry_run: bool = False) -> Response:
        before = core.find(old, old.stable)
        after = core.find(new, new.last_version if new.last_version != old.last_version else new.stable)
        lines = core.diff(dict(before.values) if before else {}, dict(after.values) if after else {})
        if not dry_run:
            await store.put_app_config(new)
            log.info("operator: config %s.%s %s -> version %d", new.service, new.environment, what, new.last_version)
        return Response(200, {"dry_run": dry_run, "diff": lines, "record": _record_json(new)})

    async def get(req: Request) -> Response:
        _s, _e, record = target(dict(req.query))
        return Response(200, _record_json(record))

    async def put(req: Request) -> Response:
        data = body(req)
        _s, _e, record = target(data)
        values = data.get("values")
        if not isinstance(values, dict):
            raise core.AppConfigError('expected {"values": {"key": "value", ...}}')
        new = core.put_version(record, values, int(time.time() * 1000), "put", percent_of(data))
        return await write(record, new, "put", bool(data.get("dry_run")))

    async def set_keys(req: Request) -> Response:
        data = body(req)
        _s, _e, record = target(data)
        values = core.head_values(record)
        changes = data.get("set") or {}
        deletes = data.get("delete") or []
        if not isinstance(changes, dict) or not isinstance(deletes, list):
            raise core.AppConfigError('expected {"set": {"key": "value"}, "delete": ["key"]}')
        values.update(changes)
        for key in deletes:
            values.pop(str(key), None)
        new = core.put_version(record, values, int(time.time() * 1000), "set", percent_of(data))
        return await write(record, new, "set", bool(data.get("dry_run")))

    async def release(req: Request) -> Response:
        data = body(req)
        _s, _e, record = target(data)
        new = core.release(record, version_of(data), percent_of(data, -1))
        return await write(record, new, f"release {new.candidate or new.stable} to {new.percent or 100}%")

    async def promote(req: Request) -> Response:
        _s, _e, record = target(body(req))
        return await write(record, core.promote(record), "promote")

    async def rollback(req: Request) -> Response:
        data = body(req)
        _s, _e, record = target(data)
        new = core.rollback(record, version_of(data), int(time.time() * 1000))
        return await write(record, new, f"rollback to {version_of(data)}")

    return {
        ("GET", "/v1/config"): get,
        ("POST", "/v1/config/put"): put,
        ("POST", "/v1/config/set"): set_keys,
        ("POST", "/v1/config/release"): release,
        ("POST", "/v1/config/promote"): promote,
        ("POST", "/v1/config/rollback"): rollback,
    }
