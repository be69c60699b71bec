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

Local trust (issue 11; ``docs/security.md``, "Local control"): before any
route runs, a request must be origin-form (``POST http://evil/x`` is 421), its
``Host`` must be a loopback name or address or the address the connection
arrived on (421: DNS rebinding), and an ``Origin`` header, if any, must be
loopback (403: a web page's cross-site request). With an :class:`AdminAuth`,
every route not in its ``public`` set also needs ``Authorization: Bearer
<token>`` (compared in constant time) or, on a Unix socket, a peer whose
``SO_PEERCRED`` uid is ours or root; else 401 with ``WWW-Authenticate:
Bearer``, logged at most once a minute per peer.
"""

from __future__ import annotations

import http
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import trio

from ._secretfile import same_secret
from ._unix import remove_stale_socket

if TYPE_CHECKING:
    import h11
else:

    class _LazyH11:
        """``h11``, imported on the first admin connection: an idle proxy serves none
        (it costs ~0.4 MB of RSS; docs/benchmarks.md, "Idle RSS")."""

        def __getattr__(self, name: str) -> object:
            import h11 as module

            globals()["h11"] = module
            return getattr(module, name)

    h11 = _LazyH11()

__all__ = [
    "AdminAuth", "Request", "Response", "Handler", "Routes", "serve_admin", "open_admin_listeners", "http_request",
    "auth_headers", "host_is_allowed",
]  # fmt: skip

logger = logging.getLogger("octoproxy.admin")

_RECV_SIZE = 65536
#: how long a closing server keeps reading, waiting for the peer's FIN
_DRAIN_TIMEOUT = 1.0
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
#: a refused peer is logged at most once per this many seconds
_REFUSAL_LOG_INTERVAL = 60.0
_REFUSAL_LOG_PEERS = 4096  # bound on the rate limiter's memory


@dataclass(frozen=True)
class AdminAuth:
    """Who may call what on an admin server.

    Attributes:
        token: the bearer token (``Authorization: Bearer <token>``).
        public: ``(method, path)`` routes that need no token (read-only
            probes, app-facing calls); every other route does.
        trust_peer_uid: on a Unix socket, a peer whose ``SO_PEERCRED`` uid is
            this process's uid or root needs no token (it could read the
            token file anyway).
    """

    token: bytes
    public: frozenset[tuple[str, str]] = frozenset()
    trust_peer_uid: bool = True

    def __repr__(self) -> str:  # never show the token
        return f"AdminAuth(public={sorted(self.public)!r}, trust_peer_uid={self.trust_peer_uid})"


def auth_headers(token: str | bytes | None) -> list[tuple[str, str]]:
    """``[("Authorization", "Bearer <token>")]``, or ``[]`` for no token."""
    if token is None:
        return []
    return [("Authorization", "Bearer " + (token.decode() if isinstance(token, bytes) else token))]


def _split_host(value: str) -> str:
    """The host part of a ``Host`` value (``h``, ``h:p``, ``[v6]:p``), lower-case, no brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_is_allowed(host_header: str, local_ip: str | None) -> bool:
    """Whether a ``Host`` header names this admin server and not some other name (DNS rebinding).

    Args:
        host_header: the header's value.
        local_ip: the address the connection arrived on (None: unknown).

    Returns:
        True for a loopback name or address, or ``local_ip`` itself (any port).
    """
    host = _split_host(host_header)
    if not host:
        return False
    if _is_loopback(host):
        return True
    if local_ip is None:
        return False
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(local_ip.split("%", 1)[0])
    except ValueError:
        return False


def _origin_is_loopback(origin: str) -> bool:
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return False  # "null", file:, extensions...
    return _is_loopback(_split_host(rest.split("/", 1)[0]))


@dataclass
class _ConnInfo:
    kind: str  # "unix", "tcp" or "other" (memory streams in tests)
    local_ip: str | None
    peer: str  # for logs: an IP address, or uid=N on a Unix socket
    peer_uid: int | None


def _conn_info(stream: trio.abc.Stream) -> _ConnInfo:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return _ConnInfo("other", None, "local", None)
    try:
        if sock.family == socket.AF_UNIX:
            uid = None
            if hasattr(socket, "SO_PEERCRED"):
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", raw)
            return _ConnInfo("unix", None, f"unix uid={uid}", uid)
        local = sock.getsockname()
        peer = sock.getpeername()
        return _ConnInfo("tcp", str(local[0]), str(peer[0]), None)
    except OSError:
        return _ConnInfo("tcp", None, "unknown", None)


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
    auth: AdminAuth | None = None,
    max_connections: int | None = None,
    handler_nursery: trio.Nursery | None = None,
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
        auth: the token and the routes open without it (None: no token is
            asked for; the Host, Origin and request-target checks still apply).
        max_connections: connections served at once; one more is answered
            503 and closed at once (None: no limit).
        handler_nursery: where accepted connections are served (default: a
            nursery of this call). With a nursery that outlives this call,
            cancelling it only stops accepting: connections already accepted
            are served to completion (a hot-restarted proxy's old generation).

    Raises:
        ValueError: if the address is malformed or ``listeners`` is empty.
        OSError: if binding fails.
    """
    if listeners is None:
        listeners = await open_admin_listeners(address)
    if not listeners:
        raise ValueError("serve_admin needs at least one listener")
    server = _Server(dict(routes), max_body, header_timeout, auth, max_connections)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, server.handle, listeners, handler_nursery=handler_nursery))
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
    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        max_body: int,
        header_timeout: float,
        auth: AdminAuth | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.routes = routes
        self.max_body = max_body
        self.timeout = header_timeout
        self.auth = auth
        self.max_connections = max_connections
        self.active = 0
        self._uid = os.geteuid()
        self._logged: dict[str, float] = {}  # peer -> when a refusal was last logged

    def _log_refusal(self, info: _ConnInfo, what: str) -> None:
        now = trio.current_time()
        last = self._logged.get(info.peer)
        if last is not None and now - last < _REFUSAL_LOG_INTERVAL:
            return
        if len(self._logged) >= _REFUSAL_LOG_PEERS:
            self._logged.clear()
        self._logged[info.peer] = now
        logger.warning("admin: refused %s from %s (logged once a minute per peer)", what, info.peer)

    def _guard(self, target: bytes, request: Request, info: _ConnInfo) -> Response | None:
        """The checks every request passes before its route runs (see the module docstring)."""
        what = f"{request.method} {request.path}"
        if not target.startswith(b"/"):
            self._log_refusal(info, f"{what}: request target not in origin-form")
            return Response(421, "absolute-form request targets are refused: send the path only\n")
        if info.kind == "tcp":  # a browser cannot reach a Unix socket
            host = request.header("host")
            if host is None or not host_is_allowed(host, info.local_ip):
                self._log_refusal(info, f"{what}: Host {host!r} is not a loopback or local address")
                return Response(421, "Host must be a loopback name or address, or this server's own address\n")
        origin = request.header("origin")
        if origin is not None and not _origin_is_loopback(origin):
            self._log_refusal(info, f"{what}: Origin {origin!r} is not loopback")
            return Response(403, "cross-origin requests are refused\n")
        if (request.header("sec-fetch-site") or "").lower() == "cross-site":
            self._log_refusal(info, f"{what}: Sec-Fetch-Site cross-site")
            return Response(403, "cross-site requests are refused\n")
        auth = self.auth
        if auth is None or (request.method, request.path) in auth.public:
            return None
        if request.method == "HEAD" and ("GET", request.path) in auth.public:
            return None
        if (request.method, request.path) not in self.routes and (
            request.method != "HEAD" or ("GET", request.path) not in self.routes
        ):
            return None  # 404/405 follow; they reveal nothing
        if auth.trust_peer_uid and info.peer_uid is not None and info.peer_uid in (self._uid, 0):
            return None
        scheme, _sp, given = (request.header("authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and same_secret(given.strip(), auth.token):
            return None
        self._log_refusal(info, f"{what}: missing or wrong admin token")
        return Response(
            401,
            {"error": "this admin endpoint needs Authorization: Bearer <token> (admin.token_file)"},
            headers=[("WWW-Authenticate", 'Bearer realm="octoproxy-admin"')],
        )

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
        info = _conn_info(stream)
        try:
            while await self._serve_one(stream, conn, info):
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

    async def _serve_one(self, stream: trio.abc.Stream, conn: h11.Connection, info: _ConnInfo) -> bool:
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
        refusal = self._guard(event.target, request, info)
        if refusal is not None:  # and close: a refused peer gets nothing more on this connection
            await self._respond(stream, conn, refusal, head=method == "HEAD", close=True)
            return True
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
    token: str | bytes | None = None,
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
        token: an admin token, sent as ``Authorization: Bearer <token>``.

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
    hdrs = [*headers, *auth_headers(token)]
    names = {k.lower() for k, _ in hdrs}
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
