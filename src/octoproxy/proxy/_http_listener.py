"""The caller side of HTTP/1.1 in the mesh: a listener for plain HTTP clients (Trio shell).

Each accepted connection runs one task: read, feed the sans-IO server
connection core (:mod:`octoproxy.protocol._http1_fast`, or its h11 twin), and
forward each complete request as one frame, fed straight into the engine's
outbound pipeline through a socketless downstream link (:class:`DirectLink`),
so the request takes exactly the path an SDK app's call takes (routes,
policies, balancing, deadlines, metrics). During a hot restart it goes
through an in-process SDK client on this proxy's outbound socket instead,
which resends it to the next generation. Answers go back in order
(pipelining), one request at a time per connection.

Limits: ``http.max_connections`` (beyond it: 503 OVERLOADED and close), a
request begun must arrive whole within ``http.read_timeout`` (408), an idle
keep-alive connection is closed after ``http.idle_timeout``, bodies above
``http.max_body`` get 413 and heads above ``http.max_header_size`` get 431.

Drain (SIGTERM, hot restart): :meth:`HttpListener.drain` marks every
connection closing. A request that arrives on a closing connection is still
answered (forwarded during a hot restart, where the SDK client resends it to
the new generation; 503 during a plain shutdown), with ``Connection: close``.
A connection that stays idle is closed once it has been quiet for
``http.drain_grace``, after a last non-blocking read: a request already in
the socket is answered, never dropped.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import trio

from .. import frame, sdk
from ..core._engine import DOWNSTREAM, Link
from ..protocol._errors import LocalProtocolError
from ..protocol._protocol import Flags, Status
from ..protocol._http1 import HttpExchange, Refusal, ServerConnection, encode_request
from ..protocol._http1_fast import FastServerConnection, server_connection

log = logging.getLogger("octoproxy.proxy.http")

__all__ = ["HttpListener"]

_RECV = 65536


class _Conn:
    __slots__ = ("sock", "core", "scope", "last_active", "busy")

    def __init__(self, sock: socket.socket, core: ServerConnection | FastServerConnection, now: float) -> None:
        self.sock = sock
        self.core = core
        self.scope: trio.CancelScope | None = None  # the current read wait
        self.last_active = now
        self.busy = False


class _Waiter:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: Any = None


class DirectLink:
    """The listener's own downstream link into the engine's outbound pipeline (no socket).

    A request is fed to the engine as a frame, exactly as if it had been read
    from an SDK connection (routing, policies, caller stamping, deadlines,
    metrics: ``direction="outbound"``); the engine's answers land in
    ``link.out``, which the flusher hands to :meth:`try_send` (the duck-typed
    part of :class:`~octoproxy.proxy._io.Conn` the engine's shell uses), where
    they are decoded and given to the waiting request by stream id. This saves
    the Unix-socket round trip and two task wake-ups of an in-process SDK
    client per request (docs/http.md).
    """

    def __init__(self, engine: Any, flusher: Any, max_frame_size: int) -> None:
        self.engine = engine
        self.flusher = flusher
        self.link = Link(DOWNSTREAM, "http#direct", listener="outbound")
        self.link.io = self
        self.decoder = frame.FrameDecoder(max_frame_size)
        self.waiters: dict[int, _Waiter] = {}
        self.next_sid = 1

    def try_send(self) -> None:
        out = self.link.out
        if not out:
            return
        self.decoder.receive_data(bytes(out))
        out.clear()
        for f in self.decoder:
            waiter = self.waiters.pop(f.stream_id, None)
            if waiter is not None:
                waiter.frame = f
                waiter.event.set()

    def lost(self, reason: str) -> None:  # the engine's shell API; nothing to close here
        pass

    async def call(self, service: str, method: str, body: bytes, metadata: dict[str, str] | None) -> Any:
        """Feed one request; return the response frame (its ``flags``, ``header``, ``body``)."""
        sid = self.next_sid
        self.next_sid = sid + 1 if sid < (1 << 62) else 1
        waiter = self.waiters[sid] = _Waiter()
        buf = bytearray(frame.encode_request(sid, service, method, body, metadata=metadata))
        try:
            scanner = self.engine.new_scanner(self.link)
            self.engine.feed(self.link, scanner, buf, len(buf), trio.current_time())
            self.flusher.flush()
            await waiter.event.wait()
        finally:
            self.waiters.pop(sid, None)
        return waiter.frame


class HttpListener:
    """Plain HTTP/1.1 clients -> frames on this proxy's outbound path.

    Args:
        cfg: the ``[http]`` section.
        outbound_uds: this proxy's outbound socket (the in-process client dials it).
        max_frame_size: the frame size limit (the in-process client's too).
        registry: metrics registry.
        can_forward: during a drain, whether a new request may still be forwarded
            (a hot restart: yes, the next generation takes it; a shutdown: no).
    """

    def __init__(
        self,
        cfg: Any,
        outbound_uds: str,
        max_frame_size: int,
        registry: Any,
        can_forward: Callable[[], bool],
        direct: DirectLink | None = None,
    ) -> None:
        self.cfg = cfg
        self.direct = direct
        self.outbound_uds = outbound_uds
        self.max_frame_size = max_frame_size
        self.can_forward = can_forward
        self.conns: set[_Conn] = set()
        self.draining = False
        self._client: sdk.Client | None = None
        self._client_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._responses = registry.counter("octoproxy_http_responses_total", "HTTP/1.1 listener answers, by status code class.", ("code",))
        self._errors = registry.counter("octoproxy_http_errors_total", "HTTP/1.1 listener refusals and failures, by kind.", ("kind",))
        registry.gauge_func("octoproxy_http_connections", "Open connections on the HTTP/1.1 listener.", lambda: float(len(self.conns)))

    # ------------------------------------------------------------ accepting

    async def serve(self, lsock: socket.socket, conn_nursery: trio.Nursery) -> None:
        """Accept until cancelled; connections are served in ``conn_nursery`` (they outlive the accept loop)."""
        self._nursery = conn_nursery
        overflow = 0
        while True:
            await trio.lowlevel.wait_readable(lsock)
            try:
                sock, _addr = lsock.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                    self._errors.labels("accept_failed").inc()
                    await trio.sleep(0.1)
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.conns) >= self.cfg.max_connections:
                self._errors.labels("connection_limit").inc()
                if overflow >= 64:  # a flood: no task per refused connection
                    sock.close()
                    continue
                overflow += 1

                async def refuse(s: socket.socket = sock) -> None:
                    nonlocal overflow
                    try:
                        await self._refuse_connection(s)
                    finally:
                        overflow -= 1

                conn_nursery.start_soon(refuse)
                continue
            conn = _Conn(sock, server_connection(self.cfg.max_body, self.cfg.max_header_size), trio.current_time())
            self.conns.add(conn)  # counted at once: the limit above sees it before its task runs
            conn_nursery.start_soon(self._serve_conn, conn)

    async def _refuse_connection(self, sock: socket.socket) -> None:
        """Over the connection limit: 503 OVERLOADED, then close after reading what came (no RST)."""
        core = ServerConnection(1, self.cfg.max_header_size)
        core.closing = True
        core.respond_error(None, Status.OVERLOADED, f"connection limit {self.cfg.max_connections} reached")
        try:
            with trio.move_on_after(1.0):
                await self._send(sock, core.data_to_send())
                sock.shutdown(socket.SHUT_WR)
                while await self._recv(sock):
                    pass
        except OSError:
            pass
        finally:
            sock.close()

    # ------------------------------------------------------------ draining

    def drain(self) -> None:
        """Stop keeping connections alive: answer what arrives with ``Connection: close``, close idle ones."""
        self.draining = True
        now = trio.current_time()
        for conn in self.conns:
            conn.core.closing = True
            self._arm_drain(conn, now)

    def _arm_drain(self, conn: _Conn, now: float) -> None:
        if conn.scope is not None and conn.core.idle and not conn.busy:
            conn.scope.deadline = min(conn.scope.deadline, max(now, conn.last_active + self.cfg.drain_grace))

    @property
    def open_connections(self) -> int:
        return len(self.conns)

    # ------------------------------------------------------------ one connection

    async def _serve_conn(self, conn: _Conn) -> None:
        sock = conn.sock
        core = conn.core
        cfg = self.cfg
        begun: float | None = None  # when the first bytes of the current request arrived
        try:
            while True:
                item = core.next_request()
                out = core.data_to_send()  # a 100 Continue
                if out:
                    await self._send(sock, out)
                if item is None:
                    if core.eof:
                        return
                    now = trio.current_time()
                    if core.idle:
                        begun = None
                        deadline = conn.last_active + cfg.idle_timeout if cfg.idle_timeout else math.inf
                        if self.draining:
                            deadline = min(deadline, max(now, conn.last_active + cfg.drain_grace))
                    else:
                        if begun is None:
                            begun = now
                        deadline = begun + cfg.read_timeout
                    data = await self._read(conn, deadline)
                    if data is None:  # the deadline passed
                        refusal = core.timed_out()
                        if refusal is None:
                            self._errors.labels("idle_closed" if not self.draining else "drain_closed").inc()
                            return
                        self._errors.labels("read_timeout").inc()
                        core.refuse(refusal)
                        await self._finish(conn, 408)
                        return
                    core.receive_data(data)
                    continue
                conn.busy = True
                if isinstance(item, Refusal):
                    self._errors.labels(f"refused_{item.code}").inc()
                    core.refuse(item)
                    await self._finish(conn, item.code)
                    return
                if self.draining:
                    core.closing = True
                code = await self._forward(core, item)
                await self._send(sock, core.data_to_send())
                self._responses.labels(f"{code // 100}xx").inc()
                conn.busy = False
                conn.last_active = trio.current_time()
                begun = None
                if core.closing:
                    await self._finish(conn, None)
                    return
        except (OSError, trio.TooSlowError):
            self._errors.labels("connection_lost").inc()
        except Exception:  # a bug must cost this connection, never the proxy
            log.exception("HTTP listener: connection failed")
            self._errors.labels("internal_error").inc()
        finally:
            self.conns.discard(conn)
            sock.close()

    async def _read(self, conn: _Conn, deadline: float) -> bytes | None:
        """Bytes from the client (``b""`` at EOF), or None if ``deadline`` passed first.

        During a drain the wait's deadline may be brought forward
        (:meth:`_arm_drain`); when it passes, one last non-blocking read still
        takes a request that is already in the socket.
        """
        sock = conn.sock
        with trio.CancelScope(deadline=deadline) as scope:
            conn.scope = scope
            if self.draining:
                self._arm_drain(conn, trio.current_time())
            try:
                while True:
                    try:
                        return sock.recv(_RECV)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
            finally:
                conn.scope = None
        try:  # cancelled: a last look, so a request already on its way is never dropped
            return sock.recv(_RECV)
        except BlockingIOError:
            return None

    async def _recv(self, sock: socket.socket) -> bytes:
        while True:
            try:
                return sock.recv(_RECV)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        """Write all of ``data``; a client that takes none of it for ``read_timeout`` is cut off."""
        view = memoryview(data)
        while view:
            try:
                n = sock.send(view)
            except BlockingIOError:
                with trio.fail_after(self.cfg.read_timeout):
                    await trio.lowlevel.wait_writable(sock)
                continue
            view = view[n:]

    async def _finish(self, conn: _Conn, code: int | None) -> None:
        """Send what is owed, then close gracefully: FIN first, and read (bounded) until the client closes."""
        sock = conn.sock
        if code is not None:
            self._responses.labels(f"{code // 100}xx").inc()
        try:
            await self._send(sock, conn.core.data_to_send())
            sock.shutdown(socket.SHUT_WR)
            with trio.move_on_after(1.0):  # a close with unread bytes would reset, and lose our answer
                total = 0
                while total < (1 << 20):
                    data = await self._recv(sock)
                    if not data:
                        break
                    total += len(data)
        except OSError:
            pass

    # ------------------------------------------------------------ forwarding

    async def _get_client(self) -> sdk.Client:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                assert self._nursery is not None
                self._client = await sdk.connect(self._nursery, self.outbound_uds, max_frame_size=self.max_frame_size, connect_timeout=2.0)
            return self._client

    async def _forward(self, core: ServerConnection | FastServerConnection, ex: HttpExchange) -> int:
        """Send ``ex`` as one frame, write its answer into ``core``; returns the HTTP status code sent."""
        if not ex.service:
            core.respond_error(ex, Status.NO_ROUTE, "no Host header or absolute-form target names a service")
            return 404
        if self.draining and not self.can_forward():
            core.closing = True
            core.respond_error(ex, Status.UNAVAILABLE, "the proxy is shutting down")
            return 503
        data = encode_request(ex)
        try:
            with trio.fail_after(self.cfg.request_timeout):
                if self.direct is not None and not self.draining:
                    f = await self.direct.call(ex.service, ex.frame_method, data, ex.metadata or None)
                    if not f.flags & Flags.HOT_RESTART:
                        status = f.header.status
                        if status != Status.OK:
                            raise sdk.CallError(status, f.header.error)
                        core.respond(ex, bytes(f.body))
                        return int(core.last_code)
                # draining (a hot restart): the SDK client resends to the next generation
                client = await self._get_client()
                reply = await client.call(ex.service, ex.frame_method, data, metadata=ex.metadata or None)
        except sdk.CallError as exc:
            core.respond_error(ex, exc.status, exc.message)
            return int(core.last_code)
        except LocalProtocolError as exc:  # e.g. a path too long for a frame header (65535 bytes)
            core.refuse(Refusal(431, f"request cannot be carried in a frame: {exc}"))
            return 431
        except trio.TooSlowError:
            core.respond_error(ex, Status.TIMEOUT, f"no answer within http.request_timeout {self.cfg.request_timeout:g}s")
            return 504
        except OSError as exc:  # the in-process client could not reach this proxy's outbound socket
            log.warning("HTTP listener: cannot reach the outbound socket %s: %s", self.outbound_uds, exc)
            core.respond_error(ex, Status.UNAVAILABLE, "the proxy's outbound path is not reachable")
            return 503
        core.respond(ex, reply)
        return int(core.last_code)
