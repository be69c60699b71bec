"""The admin HTTP/1.1 server and a one-shot HTTP client (h11 over Trio).

Theory of operation: :func:`serve_admin` binds (or adopts) listeners and runs
``trio.serve_listeners``, which backs off on EMFILE/ENFILE and gives every
connection its own task. A connection task owns an ``h11.Connection`` and loops
"read one request (head within ``header_timeout``, body within another),
dispatch, write the response" while both sides are keep-alive. The task is the
only writer of its stream and every write runs shielded but under its own
deadline, so cancellation never leaves half a response on the wire and a peer
that never reads cannot pin us. Peer faults end that connection only: they
never escape into the accept loop. When we close after a response we send FIN
first and drain the peer briefly, so unread request bytes do not turn our FIN
into a RST that would destroy the response before the peer reads it.
"""

from __future__ import annotations

import http
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from ._unix import remove_stale_socket

__all__ = ["Request", "Response", "Handler", "Routes", "serve_admin", "open_admin_listeners", "http_request"]

logger = logging.getLogger("octoproxy.admin")

_RECV_SIZE = 65536
#: how long a closing server keeps reading, waiting for the peer's FIN
_DRAIN_TIMEOUT = 1.0
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


@dataclass
class Request:
    """An admin request, fully read.

    Attributes:
        method: e.g. ``"GET"``.
        path: the target's path as sent (not percent-decoded), without query.
        query: decoded query parameters (the last value of a repeated key wins).
        headers: ``(name, value)`` pairs; names are lower-case.
        body: the whole request body.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    def json(self) -> Any:
        """Decode the body as JSON.

        Raises:
            ValueError: if the body is not valid JSON.
        """
        return json.loads(self.body)


@dataclass
class Response:
    """What a handler returns.

    ``dict``/``list`` bodies are sent as JSON (``application/json``), ``str`` as
    ``text/plain; charset=utf-8``; ``content_type`` overrides either. Do not put
    ``Content-Length`` in ``headers``: it is computed.
    """

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    content_type: str | None = None
    headers: Sequence[tuple[str, str]] = ()

    def encode(self) -> tuple[bytes, str | None]:
        """Return ``(body bytes, content type or None)``.

        Raises:
            TypeError: if a dict/list body is not JSON-serialisable.
        """
        body = self.body
        if isinstance(body, (dict, list)):
            return json.dumps(body).encode(), self.content_type or "application/json"
        if isinstance(body, str):
            return body.encode(), self.content_type or "text/plain; charset=utf-8"
        return bytes(body), self.content_type or ("application/octet-stream" if body else None)


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[tuple[str, str], Handler]


def _parse_address(address: str) -> str | tuple[str, int]:
    """``"unix:/p"`` -> ``"/p"``; ``"h:1"`` / ``"[::1]:1"`` -> ``(host, port)``."""
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


def _listener_address(listener: trio.SocketListener) -> str:
    sock = listener.socket
    name = sock.getsockname()
    if sock.family == trio.socket.AF_UNIX:
        return "unix:" + (name.decode() if isinstance(name, bytes) else str(name))
    return f"[{name[0]}]:{name[1]}" if sock.family == trio.socket.AF_INET6 else f"{name[0]}:{name[1]}"


async def open_admin_listeners(address: str, *, backlog: int = 128) -> list[trio.SocketListener]:
    """Bind and listen on an admin address.

    Args:
        address: ``"host:port"``, ``"[v6]:port"`` (port 0 picks one) or
            ``"unix:/path"`` (a stale socket file is removed first; the new one
            gets mode 0o660).
        backlog: listen backlog.

    Returns:
        The listeners (one, except for a host name with several addresses and a
        fixed port).

    Raises:
        ValueError: if the address is malformed.
        OSError: if binding fails, or a live server already owns the unix path.
    """
    target = _parse_address(address)
    if isinstance(target, tuple):
        host, port = target
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
        if port == 0 and len(listeners) > 1:  # each would get a different port
            for extra in listeners[1:]:
                await trio.aclose_forcefully(extra)
            listeners = listeners[:1]
        return listeners
    await remove_stale_socket(target)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(target)
        os.chmod(target, 0o660)  # before listen(): nobody can connect yet
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def serve_admin(
    address: str,
    routes: Routes,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    max_body: int = 1 << 20,
    header_timeout: float = 10.0,
    listeners: list[trio.SocketListener] | None = None,
    max_connections: int | None = None,
) -> NoReturn:
    """Serve the admin HTTP/1.1 API until cancelled.

    Use as ``addr = await nursery.start(serve_admin, "127.0.0.1:0", routes)``.
    The unix socket file is left in place on exit (a hot-restarted successor
    may be serving the same socket); the next bind removes it if stale.

    Args:
        address: where to listen (see :func:`open_admin_listeners`); ignored
            when ``listeners`` is given.
        routes: ``{(method, path): handler}``. ``HEAD`` falls back to ``GET``.
        task_status: receives the bound address (e.g. ``"127.0.0.1:43121"``,
            ``"[::1]:9901"`` or ``"unix:/run/admin.sock"``) once listening.
        max_body: larger request bodies get 413 and the connection is closed.
        header_timeout: deadline for a request head to arrive, then again for
            its body, and for each response write.
        listeners: already-bound listeners to serve instead of binding
            (hot restart); they are closed on exit.
        max_connections: connections served at once; one more is answered
            503 and closed at once (None: no limit).

    Raises:
        ValueError: if the address is malformed or ``listeners`` is empty.
        OSError: if binding fails.
    """
    if listeners is None:
        listeners = await open_admin_listeners(address)
    if not listeners:
        raise ValueError("serve_admin needs at least one listener")
    server = _Server(dict(routes), max_body, header_timeout, max_connections)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(_listener_address(listeners[0]))
    raise AssertionError("serve_listeners returned")  # pragma: no cover


async def _next_event(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECV_SIZE)))
        elif event is h11.PAUSED:
            raise trio.BrokenResourceError("h11 paused unexpectedly")
        else:
            assert isinstance(event, h11.Event)
            return event


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 28\r\nconnection: close\r\n\r\ntoo many admin connections\r\n"


class _Server:
    def __init__(self, routes: dict[tuple[str, str], Handler], max_body: int, header_timeout: float, max_connections: int | None = None) -> None:
        self.routes = routes
        self.max_body = max_body
        self.timeout = header_timeout
        self.max_connections = max_connections
        self.active = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        if self.max_connections is not None and self.active >= self.max_connections:
            with trio.move_on_after(1.0):
                await stream.send_all(_BUSY)
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            await self._handle(stream)
        finally:
            self.active -= 1

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._serve_one(stream, conn):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    await self._drain_and_close(stream)
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the peer went away or stalled: nothing to tell it
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("admin connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """Serve one request; False if the connection is over with nothing to send."""
        try:
            with trio.move_on_after(self.timeout) as scope:
                event = await _next_event(stream, conn)
            if scope.cancelled_caught:
                if not conn.trailing_data[0]:
                    return False  # idle keep-alive connection: just close
                await self._respond(stream, conn, Response(408, "request timeout\n"), close=True)
                return True
            if not isinstance(event, h11.Request):
                return False  # ConnectionClosed
            method = event.method.decode("ascii")
            length = next((v for k, v in event.headers if k == b"content-length"), None)
            if length is not None and int(length) > self.max_body:
                await self._respond(stream, conn, Response(413, "request body too large\n"), close=True)
                return True
            if conn.client_is_waiting_for_100_continue:
                await self._send(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            body = bytearray()
            with trio.move_on_after(self.timeout) as scope:
                while len(body) <= self.max_body:
                    part = await _next_event(stream, conn)
                    if isinstance(part, h11.Data):
                        body += part.data
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return False  # ConnectionClosed (h11 raises if mid-body)
            if scope.cancelled_caught:
                await self._respond(stream, conn, Response(408, "request timeout\n"), close=True)
                return True
            if len(body) > self.max_body:
                await self._respond(stream, conn, Response(413, "request body too large\n"), close=True)
                return True
        except h11.RemoteProtocolError as exc:
            logger.debug("bad request: %s", exc)
            status = exc.error_status_hint
            await self._respond(stream, conn, Response(status, _reason(status).decode() + "\n"), close=True)
            return True
        target = urlsplit(event.target.decode("latin-1"))
        request = Request(
            method=method,
            path=target.path or "/",
            query=dict(parse_qsl(target.query, keep_blank_values=True)),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=bytes(body),
        )
        await self._respond(stream, conn, await self._dispatch(request), head=method == "HEAD")
        return True

    async def _dispatch(self, request: Request) -> Response:
        handler = self.routes.get((request.method, request.path))
        if handler is None and request.method == "HEAD":
            handler = self.routes.get(("GET", request.path))
        if handler is None:
            allowed = {m for m, p in self.routes if p == request.path}
            if "GET" in allowed:
                allowed.add("HEAD")
            if not allowed:
                return Response(404, "not found\n")
            return Response(405, "method not allowed\n", headers=[("Allow", ", ".join(sorted(allowed)))])
        try:
            response = await handler(request)
            if not isinstance(response, Response) or not 200 <= response.status <= 599:
                raise TypeError(f"handler returned {response!r}")
            response.encode()  # surface encoding errors here, as a 500
        except Exception as exc:
            logger.error("%s %s: handler raised %s: %s", request.method, request.path, type(exc).__name__, exc)
            return Response(500, "internal server error\n")
        return response

    async def _respond(
        self, stream: trio.abc.Stream, conn: h11.Connection, response: Response, *, close: bool = False, head: bool = False
    ) -> None:
        payload, ctype = response.encode()
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        if ctype is not None:
            headers.append(("Content-Type", ctype))
        headers.append(("Content-Length", str(len(payload))))
        if close:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        if payload and not head:  # h11 frames a HEAD reply with the GET headers, no body
            data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        await self._send(stream, data)

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        # Shielded so cancellation never cuts a response in half; the inner
        # deadline still bounds a peer that does not read.
        with trio.CancelScope(shield=True), trio.fail_after(self.timeout):
            await stream.send_all(data)

    async def _drain_and_close(self, stream: trio.abc.Stream) -> None:
        try:
            with trio.move_on_after(_DRAIN_TIMEOUT):
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await stream.receive_some(_RECV_SIZE):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def http_request(
    address: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on a fresh connection and read the reply.

    Args:
        address: ``"host:port"``, ``"[v6]:port"`` or ``"unix:/path"``.
        method: e.g. ``"GET"``.
        path: request target, e.g. ``"/stats?format=json"``.
        body: request body (``Content-Length`` is set for it).
        headers: extra request headers; ``Host`` and ``Connection: close`` are
            added unless given.
        timeout: deadline for the whole exchange, in seconds.

    Returns:
        ``(status, headers, body)``; header names are lower-case and repeated
        headers are joined with ``", "``.

    Raises:
        ValueError: if the address is malformed.
        OSError: if connecting fails (e.g. ``ConnectionRefusedError``).
        trio.TooSlowError: if ``timeout`` passes.
        trio.BrokenResourceError: if the connection breaks or the reply is not
            valid HTTP.
    """
    target = _parse_address(address)
    names = {k.lower() for k, _ in headers}
    hdrs = list(headers)
    if "host" not in names:
        hdrs.insert(0, ("Host", "localhost" if isinstance(target, str) else address))
    if "connection" not in names:
        hdrs.append(("Connection", "close"))
    if (body or method not in _BODYLESS_METHODS) and not names & {"content-length", "transfer-encoding"}:
        hdrs.append(("Content-Length", str(len(body))))
    with trio.fail_after(timeout):
        if isinstance(target, str):
            stream: trio.abc.Stream = await trio.open_unix_socket(target)
        else:
            stream = await trio.open_tcp_stream(*target)
        try:
            conn = h11.Connection(h11.CLIENT)
            data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            send_error: trio.BrokenResourceError | None = None
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:  # the server may have replied early (413) and closed
                send_error = exc
            status, resp_headers, chunks = 0, dict[str, str](), list[bytes]()
            while True:
                try:
                    event = await _next_event(stream, conn)
                except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                    raise (send_error or trio.BrokenResourceError(f"bad HTTP reply: {exc}")) from exc
                if isinstance(event, h11.Response):
                    status = event.status_code
                    for k, v in event.headers:
                        name, value = k.decode("latin-1"), v.decode("latin-1")
                        resp_headers[name] = f"{resp_headers[name]}, {value}" if name in resp_headers else value
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, resp_headers, b"".join(chunks)
                elif isinstance(event, h11.ConnectionClosed):
                    raise send_error or trio.BrokenResourceError("connection closed before the reply")
        finally:
            await trio.aclose_forcefully(stream)
