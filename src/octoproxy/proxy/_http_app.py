"""The provider side of HTTP/1.1 in the mesh: frames in, the app's HTTP port out (Trio shell).

With ``inbound.app_codec = "http1"`` the inbound side's "local app" is this
bridge, served inside the proxy: once the app's port accepts, it adds a
socketless link to the engine's local-app cluster (:class:`_AppLinkIO`, the
part of the shell's ``Conn`` the engine uses), so the engine hands it request
frames exactly as it would write them to an SDK app's socket, and takes the
answers back as response frames on that link. Each request frame's body (a
normalised HTTP/1.1 request, :mod:`octoproxy.protocol._http1`) is sent to
``inbound.app_http`` on a pooled keep-alive connection (at most
``inbound.app_http_connections``, which is also how many requests the app
sees at once; more wait, with their deadlines), and the app's response goes
back as the response frame's body.

Failures: the app refusing the connection or closing it without an answer
is UNAVAILABLE, no answer by the request's deadline (or
``inbound.app_http_timeout``) is TIMEOUT, a malformed or oversized answer is
APPLICATION_ERROR; the caller's proxy maps these to 503, 504 and 502.

The app learns the calling service from ``x-octoproxy-caller`` (the frame's
``caller``, which the caller's proxy stamps and mTLS verifies); whatever a
client wrote in that header is removed first.

A pooled connection the app closed while idle is noticed before reuse (it
reads as EOF); one that fails on reuse before any byte of the answer came
is retried once on a fresh connection for idempotent methods.
"""

from __future__ import annotations

import logging
import math
import select
import socket
from typing import Any

import trio


from .. import frame
from ..core._engine import UPSTREAM, Link
from ..protocol._http1 import decode_request, encode_response
from ..protocol._http1_app import AppResponseError, encode_app_request, response_reader
from ..protocol._protocol import FrameType, Status
from ._io import connect_raw
from ..sdk._server_core import TIMEOUT_OUTCOME, Request, response_frame

log = logging.getLogger("octoproxy.proxy.http_app")

__all__ = ["HttpAppBridge"]

#: the request header that names the calling service to the app (any value a client sent is replaced)
CALLER_HEADER = b"x-octoproxy-caller"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class _AppError(Exception):
    def __init__(self, status: int, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


class _AppConn:
    """One keep-alive connection to the app."""

    __slots__ = ("sock", "reusable")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # non-blocking; raw recv/send as the proxy's own connections (PERFORMANCE.md)
        self.reusable = True

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def receive_some(self) -> bytes:
        while True:
            try:
                return self.sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def stale(self) -> bool:
        """The app closed (or wrote unasked) while the connection sat idle in the pool."""
        # readable while idle means EOF or bytes nobody asked for: either way not reusable
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))


class _AppLinkIO:
    """The engine's local-app link, served in process (duck-typed as the shell's ``Conn``).

    The engine writes request frames for the app into ``link.out``; the
    flusher calls :meth:`try_send`, which decodes them and starts one task per
    request (at most ``connections`` talk to the app at once). Each answer is
    fed back to the engine as a response frame on the same link, exactly as
    if it had been read from an app's socket.
    """

    def __init__(self, bridge: HttpAppBridge, engine: Any, flusher: Any, link: Link, nursery: trio.Nursery) -> None:
        self.bridge = bridge
        self.engine = engine
        self.flusher = flusher
        self.link = link
        self.nursery = nursery
        self.decoder = frame.FrameDecoder(bridge.max_frame_size)
        self.limit = trio.Semaphore(bridge.connections)

    def try_send(self) -> None:
        out = self.link.out
        if not out:
            return
        self.decoder.receive_data(bytes(out))
        out.clear()
        for f in self.decoder:
            if f.type == FrameType.REQUEST or f.type == FrameType.ONEWAY:
                self.nursery.start_soon(self._serve, f)

    def lost(self, reason: str) -> None:  # the shell API; nothing to close
        pass

    async def _serve(self, f: Any) -> None:
        now = trio.current_time()
        header = f.header
        req = Request(
            service=f.service,
            method=f.method,
            body=bytes(f.body),
            caller=header.caller,
            metadata=dict(header.metadata),
            stream_id=f.stream_id,
            deadline=now + f.timeout_ms / 1000 if f.timeout_ms else None,
            oneway=f.type == FrameType.ONEWAY,
        )
        async with self.limit:
            status, error, body = await self.bridge.run_handler(req)
        if req.oneway:
            return
        buf = bytearray(response_frame(req, status, error, body, self.bridge.max_frame_size))
        self.engine.feed(self.link, self.engine.new_scanner(self.link), buf, len(buf), trio.current_time())
        self.flusher.flush()


class HttpAppBridge:
    """Frames from the engine -> the app's HTTP/1.1 port, pooled.

    Args:
        app_http: the app's ``host:port``.
        connections: most connections to the app at once (and requests in flight to it).
        timeout: longest wait for the app's answer when the request has no deadline of its own.
        max_frame_size: the frame size limit; a bigger answer is refused.
    """

    def __init__(self, app_http: str, connections: int, timeout: float, max_frame_size: int) -> None:
        from ._config import split_host_port

        self.host, self.port = split_host_port(app_http)
        self.app_http = app_http
        self.connections = connections
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.max_response = max_frame_size - 4096
        #: the local-app endpoint's address as the engine and ``GET /ready`` show it
        self.address = f"http1:{app_http}"
        self._idle: list[_AppConn] = []
        self.app_up = False

    async def run(self, engine: Any, flusher: Any, cluster: Any) -> None:
        """Wait until the app's port accepts, then serve the engine's local-app link until cancelled."""
        delay = 0.05
        warned = trio.current_time() + 5.0
        while True:
            try:
                sock = await connect_raw(self.app_http, 2.0)
            except (OSError, trio.TooSlowError) as exc:
                if trio.current_time() >= warned:
                    log.warning("the app's HTTP port %s does not answer yet (%s)", self.app_http, exc)
                    warned = trio.current_time() + 30.0
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._idle.append(_AppConn(sock))
            break
        self.app_up = True
        ep = cluster.endpoints[0]
        link = Link(UPSTREAM, f"local_app/{self.address}", endpoint=ep, cluster=cluster)
        link.last_rx = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                link.io = _AppLinkIO(self, engine, flusher, link, nursery)
                cluster.add_link(link)  # the endpoint is healthy: the proxy may say ready, requests flow
                engine.unpark(cluster, trio.current_time())
                flusher.flush()
                await trio.sleep_forever()
        finally:
            cluster.remove_link(link)
            link.io = None
            for conn in self._idle:
                conn.sock.close()
            self._idle.clear()

    async def run_handler(self, req: Request) -> tuple[int, str, bytes]:
        """The request's outcome ``(status, error, body)``, within its deadline (or ``timeout``)."""
        now = trio.current_time()
        deadline = min(req.deadline if req.deadline is not None else math.inf, now + self.timeout)
        if now >= deadline:
            return TIMEOUT_OUTCOME
        with trio.move_on_at(deadline):
            return await self.exchange(req)
        return TIMEOUT_OUTCOME

    # ------------------------------------------------------------ one exchange

    async def exchange(self, req: Request) -> tuple[int, str, bytes]:
        """Send one request frame's HTTP request to the app: ``(status, error, body)`` for the response frame."""
        try:
            method, target, headers, body = decode_request(req.body)
            # the caller as its proxy stamped it (verified by mTLS when on): the app's only source for it
            headers = [h for h in headers if h[0] != CALLER_HEADER]
            if req.caller:
                headers.append((CALLER_HEADER, req.caller.encode()))
            data = encode_app_request(method, target, headers, body)
        except ValueError as exc:  # HttpMappingError too
            return Status.APPLICATION_ERROR, f"not a valid HTTP request frame: {exc}", b""
        for attempt in (0, 1):
            conn, reused = await self._checkout()
            try:
                answer = await self._round_trip(conn, method, data)
            except _AppError as exc:
                conn.sock.close()
                if exc.retry and reused and attempt == 0 and method in _IDEMPOTENT:
                    continue
                return exc.status, str(exc), b""
            except BaseException:
                conn.sock.close()  # cancelled (deadline) mid-exchange: never reused
                raise
            self._checkin(conn)
            return Status.OK, "", answer
        raise AssertionError("unreachable")  # pragma: no cover

    async def _checkout(self) -> tuple[_AppConn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale():
                return conn, True
            conn.sock.close()
        try:
            sock = await connect_raw(self.app_http, self.timeout)
        except (OSError, trio.TooSlowError) as exc:
            raise _AppError(Status.UNAVAILABLE, f"the app does not accept on {self.app_http}: {getattr(exc, 'strerror', None) or exc or 'timeout'}") from None
        return _AppConn(sock), False

    def _checkin(self, conn: _AppConn) -> None:
        if conn.reusable and len(self._idle) < self.connections:
            self._idle.append(conn)
            return
        conn.sock.close()

    async def _round_trip(self, conn: _AppConn, method: bytes, data: bytes) -> bytes:
        reader = response_reader(method, self.max_response)
        try:
            await conn.send_all(data)
            while not reader.feed(await conn.receive_some()):
                pass
        except AppResponseError as exc:
            if not exc.partial:  # closed before any byte of an answer: a stale connection
                raise _AppError(Status.UNAVAILABLE, str(exc), retry=True) from None
            raise _AppError(Status.APPLICATION_ERROR, str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _AppError(Status.UNAVAILABLE, f"connection to the app lost: {exc}", retry=not reader.got) from None
        conn.reusable = reader.keep_alive
        return encode_response(reader.status, reader.reason, reader.headers, reader.body, head=method == b"HEAD")
