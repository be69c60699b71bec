"""Sans-IO part of the SDK's discovery subscription (``POST /subscribe`` to the proxy's admin API).

The front ends open a connection to the admin address, write
:func:`subscribe_request`, feed what they read to an :class:`HttpReply` until it
is complete, and turn the reply into endpoint counts with
:func:`subscribe_result`; while the proxy does not answer they retry with the
delays of :func:`next_delay`. HTTP/1.1 is spoken by h11 (no I/O either).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import h11

from ..protocol._protocol import Status
from ._core import CallError

__all__ = ["HttpReply", "parse_admin_address", "subscribe_body", "subscribe_request", "subscribe_result", "next_delay"]

#: first pause between attempts while the proxy is not up; doubled up to ``MAX_DELAY``
FIRST_DELAY = 0.05
MAX_DELAY = 2.0


def parse_admin_address(address: str) -> str | tuple[str, int]:
    """``"unix:/p"`` -> ``"/p"``; ``"h:1"`` / ``"[::1]:1"`` -> ``(host, port)``.

    Raises:
        ValueError: the address is malformed.
    """
    if address.startswith("unix:"):
        if len(address) == 5:
            raise ValueError("empty unix socket path in address 'unix:'")
        return address[5:]
    host, sep, port_s = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 address needs brackets: {address!r}")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ValueError(f"address must be 'host:port', '[v6]:port' or 'unix:/path', got {address!r}")
    return host, int(port_s)


def subscribe_body(services: Iterable[str], timeout: float) -> tuple[list[str], bytes]:
    """The sorted, de-duplicated names and the JSON body of the subscription."""
    names = sorted(set(services))
    return names, json.dumps({"services": names, "timeout": timeout}).encode()


def subscribe_request(address: str, body: bytes) -> bytes:
    """The bytes of ``POST /subscribe`` with ``body`` (one request, then ``Connection: close``)."""
    conn = h11.Connection(h11.CLIENT)
    host = "localhost" if address.startswith("unix:") else address
    headers = [("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
    data = conn.send(h11.Request(method="POST", target="/subscribe", headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data


class HttpReply:
    """Collects one HTTP/1.1 response from the bytes read.

    Attributes:
        status: the status code once the head arrived (0 before).
        body: the body read so far.
        complete: the whole response has arrived.
    """

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT)
        # we never send through this parser: put it in the state of having sent a request
        self._conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        self._conn.send(h11.EndOfMessage())
        self.status = 0
        self.body = b""
        self.complete = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes (``b""`` at EOF).

        Raises:
            ValueError: the reply is not valid HTTP, or the peer closed early.
        """
        try:
            self._conn.receive_data(data)
            while not self.complete:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if not data:
                        raise ValueError("the connection closed before the reply was complete")
                    return
                if isinstance(event, h11.Response):
                    self.status = event.status_code
                elif isinstance(event, h11.Data):
                    self.body += bytes(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    self.complete = True
        except h11.RemoteProtocolError as exc:
            raise ValueError(f"bad HTTP reply: {exc}") from None


def subscribe_result(names: list[str], timeout: float, status: int, reply: bytes) -> dict[str, int]:
    """Endpoint counts per service from the proxy's reply.

    Raises:
        CallError: TIMEOUT (the proxy got no endpoints in time), NO_ROUTE (no
            discovery configured) or UNAVAILABLE (any other answer).
    """
    if status == 200:
        services_state = json.loads(reply).get("services", {})
        return {n: int(v.get("endpoints", 0)) for n, v in services_state.items()}
    if status == 504:
        raise CallError(Status.TIMEOUT, f"subscribe {names}: the proxy got no endpoints within {timeout}s")
    if status == 404:
        raise CallError(Status.NO_ROUTE, f"subscribe {names}: the proxy has no discovery configured")
    raise CallError(Status.UNAVAILABLE, f"subscribe {names}: HTTP {status}: {reply[:200]!r}")


def never_answered(names: list[str], admin: str, retry_for: float, last: BaseException | None) -> CallError:
    return CallError(Status.UNAVAILABLE, f"subscribe {names}: no proxy answered at {admin} within {retry_for}s ({last})")


def next_delay(delay: float) -> float:
    """The pause after ``delay`` (exponential back-off, capped)."""
    return min(delay * 2, MAX_DELAY)
