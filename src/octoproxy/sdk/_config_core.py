"""Sans-IO part of the SDK's configuration for apps (``GET /config`` on the proxy's admin API).

The front ends write :func:`config_request`, read one reply (an
:class:`~._subscribe_core.HttpReply`) and turn it into an :class:`AppConfig`
with :func:`config_result`. ``watch_config`` is a loop of long polls
(``?watch=<version>``): the proxy answers when the version differs from the
one the app holds, or after ``poll`` seconds with the same one (then the
front end asks again); while the proxy does not answer the front ends retry
with :func:`~._subscribe_core.next_delay`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import quote

import h11

from ..protocol._protocol import Status
from ._core import CallError

__all__ = ["AppConfig", "config_path", "config_request", "config_result", "POLL"]

#: default seconds of one long poll (the proxy allows up to 60)
POLL = 30.0


@dataclass(frozen=True)
class AppConfig:
    """The app's configuration as its proxy holds it.

    Attributes:
        version: the version (decimal digits), ``""`` if there is none yet.
        values: key -> value (strings; JSON text where the operator put JSON).
        source: ``"control-plane"``, ``"file"`` (the proxy's persisted copy:
            the control plane has not answered since it started) or ``"none"``.
        service: the proxy's ``proxy.service``.
        environment: the proxy's ``proxy.environment``.
    """

    version: str
    values: dict[str, str] = field(default_factory=dict)
    source: str = "none"
    service: str = ""
    environment: str = ""

    def json(self, key: str) -> object:
        """``values[key]`` decoded as JSON (``KeyError`` if absent, ``ValueError`` if not JSON)."""
        return json.loads(self.values[key])


def config_path(watch: str | None = None, poll: float = POLL) -> str:
    """The target of ``GET /config`` (a long poll when ``watch`` is a version, ``""`` included)."""
    if watch is None:
        return "/config"
    return f"/config?watch={quote(watch)}&timeout={poll:g}"


def config_request(address: str, path: str) -> bytes:
    """The bytes of ``GET path`` (one request, then ``Connection: close``)."""
    conn = h11.Connection(h11.CLIENT)
    host = "localhost" if address.startswith("unix:") else address
    headers = [("Host", host), ("Content-Length", "0"), ("Connection", "close")]
    data = conn.send(h11.Request(method="GET", target=path, headers=headers)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data


def config_result(status: int, reply: bytes) -> AppConfig:
    """The configuration in the proxy's reply.

    Raises:
        CallError: NO_ROUTE (the proxy has no ``[discovery]`` or no
            ``proxy.service``), OVERLOADED (too many watchers: retry later)
            or UNAVAILABLE (any other answer).
    """
    if status == 200:
        try:
            data = json.loads(reply)
            values = data["values"]
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise ValueError("values")
            return AppConfig(str(data["version"]), dict(values), str(data.get("source", "")),
                             str(data.get("service", "")), str(data.get("environment", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise CallError(Status.UNAVAILABLE, f"GET /config: bad answer from the proxy ({exc})") from None
    if status == 404:
        raise CallError(
            Status.NO_ROUTE, "GET /config: the proxy has no configuration for the app ([discovery] and proxy.service)"
        )
    if status == 429:
        raise CallError(Status.OVERLOADED, "GET /config: too many configuration watchers on the proxy")
    raise CallError(Status.UNAVAILABLE, f"GET /config: HTTP {status}: {reply[:200]!r}")
