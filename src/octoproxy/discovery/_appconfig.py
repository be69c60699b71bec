"""Configuration for apps: versions, limits and gradual-release decisions (sans-IO).

Theory of operation: the control plane keeps one :class:`pb.AppConfigRecord`
per (service, environment): a bounded history of versions (each a full
key/value map), the *stable* version every instance gets, and optionally a
*candidate* released to ``percent`` % of the instances. Which instances is
decided by :func:`bucket`: a hash of (service, environment, instance id) in
0..9999, so an instance stays in the release as the percentage grows, and the
same instance gets the same answer from every control-plane replica.

Every change makes a new version (numbers are never reused, even after
history is trimmed); ``rollback`` makes a new version with an old version's
content. Nothing here does I/O or reads a clock: the time is an argument.

Limits (a write over one is refused with a message naming it):
:data:`MAX_KEY_LENGTH`, :data:`MAX_VALUE_BYTES`, :data:`MAX_KEYS`,
:data:`MAX_TOTAL_BYTES` per version; history keeps :data:`MAX_HISTORY`
versions and at most :data:`MAX_HISTORY_BYTES` (the stable and candidate
versions are always kept).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from ._xds_client import TYPE_APPCONFIG
from ._xds_server import check_service_name
from ..protocol.proto import octoproxy_discovery_pb2 as pb

__all__ = [
    "TYPE_APPCONFIG", "MAX_KEY_LENGTH", "MAX_VALUE_BYTES", "MAX_KEYS", "MAX_TOTAL_BYTES", "MAX_HISTORY",
    "MAX_HISTORY_BYTES", "AppConfigError", "check_environment", "check_values", "resource_name", "split_name",
    "bucket", "in_release", "chosen_version", "new_record", "put_version", "release", "promote", "rollback", "resolve", "find",
    "validate_delivered", "head_values", "diff", "DEFAULT_ENVIRONMENT",
]  # fmt: skip

MAX_KEY_LENGTH = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 1000
MAX_TOTAL_BYTES = 256 * 1024
MAX_HISTORY = 50
MAX_HISTORY_BYTES = 1024 * 1024
MAX_ENV_LENGTH = 63
DEFAULT_ENVIRONMENT = "default"

_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*\Z")
_ENV_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


class AppConfigError(ValueError):
    """A configuration write or delivery is refused; the message says why and which limit."""


def check_environment(env: str) -> str | None:
    """Why ``env`` cannot be an environment name (``[A-Za-z0-9_-]``, no dot), or ``None``."""
    if not env or len(env) > MAX_ENV_LENGTH or not _ENV_RE.match(env):
        return f"invalid environment {env[:80]!r} (want [A-Za-z0-9_-], at most {MAX_ENV_LENGTH} chars, no dot)"
    return None


def resource_name(service: str, env: str) -> str:
    """The discovery resource name of (service, env): ``"<service>.<env>"``.

    Raises:
        AppConfigError: invalid service or environment name.
    """
    error = check_service_name(service) or check_environment(env)
    if error is not None:
        raise AppConfigError(error)
    return f"{service}.{env}"


def split_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`resource_name` (the environment has no dot).

    Raises:
        AppConfigError: not a valid name.
    """
    service, dot, env = name.rpartition(".")
    if not dot:
        raise AppConfigError(f"invalid configuration name {name[:80]!r} (want <service>.<environment>)")
    resource_name(service, env)
    return service, env


def check_values(values: Mapping[str, object]) -> dict[str, str]:
    """Check a key/value map against the limits; return it as ``dict[str, str]``.

    Raises:
        AppConfigError: a key or value is invalid or over a limit.
    """
    if len(values) > MAX_KEYS:
        raise AppConfigError(f"{len(values)} keys: more than the {MAX_KEYS} allowed per service")
    total = 0
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
            shown = key[:40] if isinstance(key, str) else type(key).__name__
            raise AppConfigError(
                f"invalid key {shown!r} (want [A-Za-z0-9_] then [A-Za-z0-9._/-], at most {MAX_KEY_LENGTH} chars)"
            )
        if not isinstance(value, str):
            raise AppConfigError(f"{key}: values are strings (JSON text is a string), got {type(value).__name__}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_VALUE_BYTES:
            raise AppConfigError(f"{key}: value of {size} bytes, more than the {MAX_VALUE_BYTES} allowed per key")
        total += size + len(key)
        if total > MAX_TOTAL_BYTES:
            raise AppConfigError(f"configuration larger than the {MAX_TOTAL_BYTES} bytes allowed per service")
        out[key] = value
    return out


def bucket(service: str, env: str, instance: str) -> int:
    """The instance's place, 0..9999, in every gradual release of (service, env)."""
    digest = hashlib.sha256(f"{service}\0{env}\0{instance}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def in_release(service: str, env: str, instance: str, percent: int) -> bool:
    """True if ``instance`` gets a candidate released to ``percent`` %."""
    return bucket(service, env, instance) < percent * 100


def new_record(service: str, env: str) -> pb.AppConfigRecord:
    resource_name(service, env)
    return pb.AppConfigRecord(service=service, environment=env)


def find(record: pb.AppConfigRecord, version: int) -> pb.AppConfigVersion | None:
    for v in record.history:
        if v.version == version:
            found: pb.AppConfigVersion = v
            return found
    return None


def _trim(record: pb.AppConfigRecord) -> None:
    keep = {record.stable, record.candidate}
    while len(record.history) > 1:
        size = sum(v.ByteSize() for v in record.history)
        if len(record.history) <= MAX_HISTORY and size <= MAX_HISTORY_BYTES:
            return
        victims = [i for i, v in enumerate(record.history) if v.version not in keep]
        if not victims:
            return
        del record.history[victims[0]]


def put_version(
    record: pb.AppConfigRecord, values: Mapping[str, object], now_ms: int, note: str = "put", percent: int = 100
) -> pb.AppConfigRecord:
    """A copy of ``record`` with a new version holding ``values``.

    With ``percent`` 100 it becomes the stable version (a release in progress
    ends); below 100 it is released to that share of instances.

    Raises:
        AppConfigError: invalid values or percentage.
    """
    checked = check_values(values)
    _check_percent(percent)
    out = pb.AppConfigRecord()
    out.CopyFrom(record)
    out.last_version += 1
    out.history.add(version=out.last_version, values=checked, created_unix_ms=now_ms, note=note[:200])
    if percent >= 100 or out.stable == 0:
        out.stable, out.candidate, out.percent = out.last_version, 0, 0
        if percent < 100:  # nothing stable yet: nothing to fall back on
            out.candidate, out.percent = 0, 0
    else:
        out.candidate, out.percent = out.last_version, percent
    _trim(out)
    return out


def _check_percent(percent: int) -> None:
    if not isinstance(percent, int) or not 0 <= percent <= 100:
        raise AppConfigError(f"percent must be an integer 0..100, got {percent!r}")


def release(record: pb.AppConfigRecord, version: int, percent: int) -> pb.AppConfigRecord:
    """Release ``version`` to ``percent`` % of the instances (100: it becomes stable).

    Raises:
        AppConfigError: unknown version, bad percentage.
    """
    _check_percent(percent)
    if find(record, version) is None:
        raise AppConfigError(f"{record.service}/{record.environment}: no version {version} in the history")
    out = pb.AppConfigRecord()
    out.CopyFrom(record)
    if percent >= 100 or version == out.stable:
        out.stable, out.candidate, out.percent = version, 0, 0
    else:
        out.candidate, out.percent = version, percent
    return out


def promote(record: pb.AppConfigRecord) -> pb.AppConfigRecord:
    """The candidate becomes stable for every instance.

    Raises:
        AppConfigError: no release in progress.
    """
    if not record.candidate:
        raise AppConfigError(f"{record.service}/{record.environment}: no release in progress to promote")
    return release(record, record.candidate, 100)


def rollback(record: pb.AppConfigRecord, version: int, now_ms: int) -> pb.AppConfigRecord:
    """A new stable version with ``version``'s content (a release in progress ends).

    Raises:
        AppConfigError: unknown version.
    """
    old = find(record, version)
    if old is None:
        raise AppConfigError(f"{record.service}/{record.environment}: no version {version} in the history")
    return put_version(record, dict(old.values), now_ms, note=f"rollback to {version}")


def chosen_version(record: pb.AppConfigRecord, instance: str) -> int:
    """The version ``instance`` gets: the candidate if it is in the release, else stable (0: none)."""
    if record.candidate and in_release(record.service, record.environment, instance, record.percent):
        return int(record.candidate)
    return int(record.stable)


def resolve(record: pb.AppConfigRecord | None, instance: str) -> pb.AppConfig | None:
    """What ``instance`` gets (see :func:`chosen_version`); ``None``: nothing."""
    if record is None:
        return None
    version = chosen_version(record, instance)
    found = find(record, version) if version else None
    if found is None:
        return None
    return pb.AppConfig(
        service=record.service, environment=record.environment, version=str(found.version), values=found.values
    )


def validate_delivered(name: str, msg: pb.AppConfig) -> None:
    """The proxy's check of a delivered configuration (raising NACKs it: nothing changes).

    Raises:
        AppConfigError: wrong name, bad version or values over a limit.
    """
    if resource_name(msg.service, msg.environment) != name:
        raise AppConfigError(f"configuration for {msg.service}.{msg.environment} delivered as {name!r}")
    if msg.version and not msg.version.isdigit():
        raise AppConfigError(f"invalid configuration version {msg.version[:40]!r}")
    check_values(dict(msg.values))


def head_values(record: pb.AppConfigRecord) -> dict[str, str]:
    """The newest version's values (what ``set`` edits), ``{}`` if none."""
    return dict(record.history[-1].values) if record.history else {}


def diff(old: Mapping[str, str], new: Mapping[str, str], width: int = 60) -> list[str]:
    """Lines saying what changes from ``old`` to ``new``: ``+ k = v``, ``- k``, ``~ k: a -> b``."""

    def short(v: str) -> str:
        return repr(v) if len(v) <= width else repr(v[:width]) + f"... ({len(v)} chars)"

    out = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            out.append(f"- {key}")
        elif key not in old:
            out.append(f"+ {key} = {short(new[key])}")
        elif old[key] != new[key]:
            out.append(f"~ {key}: {short(old[key])} -> {short(new[key])}")
    return out
