"""The caller side of the Mesh SDK: a multiplexing client for the local proxy.

Theory of operation
-------------------
A :class:`Client` owns a set of connections to one Unix socket path, at most
one of them *current* (the one new calls go to). Each connection has one
background reader task (in the client's nursery), a
:class:`~octoproxy._sdk_server.FrameWriter` that every task writes through, and a
table of pending stream id -> waiter. A call picks the current connection,
registers a waiter under a fresh stream id (one counter per client), writes its
REQUEST and sleeps on the waiter; the reader wakes it with the RESPONSE. Many
calls share a connection this way; responses may come back in any order.

A connection leaves service in one of three ways:

* **lost** (EOF, reset, a protocol error from the peer, a failed write): the
  reader ends, every waiter fails at once with UNAVAILABLE, and the connection
  is forgotten. The next call dials a new one (one attempt per call; calls
  queued behind a failed attempt share its failure instead of each retrying).
* **draining**: a RESPONSE with the HOT_RESTART flag (docs/protocol.md section
  9) or a GOAWAY. New calls go elsewhere at once; calls still pending on it
  complete normally, and it is closed as soon as nothing is outstanding. A
  call answered HOT_RESTART (not processed) is resent on a new connection
  (which reaches the new proxy through the inherited listener) with its
  remaining timeout, at most :data:`MAX_RESENDS` times. A call still queued
  for the write lock when its connection stops taking new work is moved too,
  before it is written.
* **closed** by :meth:`Client.aclose`: waiters fail with
  :class:`trio.ClosedResourceError`.

Timeouts are enforced locally (``trio.move_on_at``) and also sent as
``timeout_ms`` (the time left at each send), so the provider can give up too.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from types import TracebackType

import trio

from ._errors import OctoproxyError, RemoteProtocolError
from ._protocol import PREFIX_SIZE, Flags, FrameType, Status
from ._sdk_server import RECV_SIZE, FrameWriter, logger
from .frame import Frame, FrameDecoder, encode_frame, encode_header, encode_request, encode_response

__all__ = ["MAX_RESENDS", "CallError", "Client"]

#: how many times one call is resent after HOT_RESTART answers before giving up
MAX_RESENDS = 5


class CallError(OctoproxyError):
    """A call did not succeed: the response's status was not OK, or no response came.

    Attributes:
        status: the :class:`~octoproxy.Status` (an unknown status from the
            peer is reported as UNAVAILABLE, as the protocol says).
        message: the response's ``error`` text, or what went wrong locally.
    """

    def __init__(self, status: int, message: str) -> None:
        st = Status(status) if status in Status._value2member_map_ else Status.UNAVAILABLE
        super().__init__(st, message)
        self.status = st
        self.message = message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"

    def __repr__(self) -> str:
        return f"CallError({self.status.name}, {self.message!r})"


class _Waiter:
    """One outstanding request or PING; the reader fills it in and sets ``event``."""

    __slots__ = ("event", "status", "error", "body", "hot_restart", "failure", "closed")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.status, self.error, self.body, self.hot_restart = 0, "", b"", False
        self.failure: str | None = None  # the connection was lost
        self.closed = False  # the client was closed


class _Connection:
    def __init__(self, client: Client, stream: trio.SocketStream, number: int) -> None:
        self.client = client
        self.stream = stream
        self.number = number
        self.decoder = FrameDecoder(client.max_frame_size)
        self.scope = trio.CancelScope()
        self.writer: FrameWriter | None = None
        self.pending: dict[int, _Waiter] = {}
        self.pings: dict[int, _Waiter] = {}
        self.alive = True
        self.draining = False
        self.goaway: str | None = None
        self.end_reason: str | None = None  # set when we end it on purpose

    def __repr__(self) -> str:
        return f"<connection #{self.number} to {self.client.path}>"

    @property
    def usable(self) -> bool:
        """Whether new work may start on this connection."""
        return self.alive and not self.draining and self.writer is not None and not self.writer.broken

    def _unusable(self) -> bool:
        return not self.usable

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        reason = "closed"
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self.writer = FrameWriter(self.stream, nursery)
                    task_status.started()
                    reason = await self._read()
                    nursery.cancel_scope.cancel()  # e.g. a PONG flusher still waiting
        except Exception:  # a bug must cost one connection, never the client
            logger.exception("%r failed", self)
            reason = "failed (internal error)"
        finally:
            self._finish(self.end_reason or reason)
            await trio.aclose_forcefully(self.stream)

    async def _read(self) -> str:
        """Read and dispatch frames; return why the connection ended."""
        assert self.writer is not None
        while True:
            try:
                data = await self.stream.receive_some(RECV_SIZE)
            except trio.ClosedResourceError:
                return "closed after a failed write"
            except (trio.BrokenResourceError, OSError) as exc:
                return f"lost: {exc!r}"
            if not data:
                return "closed by the peer"
            self.decoder.receive_data(data)
            try:
                while (frame := self.decoder.next_frame()) is not None:
                    self._dispatch(frame)
            except RemoteProtocolError as exc:
                logger.warning("%r: protocol error from the peer: %s", self, exc)
                try:
                    await self.writer.send(encode_frame(FrameType.GOAWAY, 0, encode_header(error=str(exc))), timeout=1.0)
                except trio.BrokenResourceError:
                    pass
                return f"closed after a protocol error from the peer: {exc}"

    def _dispatch(self, frame: Frame) -> None:
        assert self.writer is not None
        ftype = frame.type
        sid = frame.stream_id
        if ftype == FrameType.RESPONSE:
            if frame.flags & Flags.HOT_RESTART:
                self._start_draining("hot restart")  # before anything else: no new calls here
                waiter = self.pending.pop(sid, None)
                if waiter is not None:
                    waiter.hot_restart = True
                    waiter.event.set()
            else:
                status, error = 0, ""
                if frame.header_bytes:
                    header = frame.header  # raises RemoteProtocolError if it does not parse
                    status, error = header.status, header.error
                waiter = self.pending.pop(sid, None)
                if waiter is None:  # the call timed out or was cancelled meanwhile
                    logger.debug("%r: response for unknown stream %d dropped", self, sid)
                else:
                    waiter.status = status
                    waiter.error = error
                    waiter.body = bytes(frame.body)
                    waiter.event.set()
        elif ftype == FrameType.PING:
            self.writer.post(encode_frame(FrameType.PONG, sid))
        elif ftype == FrameType.PONG:
            waiter = self.pings.pop(sid, None)
            if waiter is not None:
                waiter.event.set()
        elif ftype == FrameType.GOAWAY:
            self.goaway = frame.header.error or "no reason given"
            self._start_draining(f"GOAWAY: {self.goaway}")
        elif ftype == FrameType.REQUEST:
            self.writer.post(encode_response(sid, status=Status.NO_ROUTE, error="an SDK client serves no requests"))
        # ONEWAY to a client: nobody to deliver it to; dropped
        self.maybe_finish()

    def _start_draining(self, why: str) -> None:
        if not self.draining:
            self.draining = True
            logger.info("%r draining (%s): new calls go to a new connection", self, why)

    def maybe_finish(self) -> None:
        """Close a draining connection once nothing is outstanding on it."""
        if self.draining and not self.pending and not self.pings and self.alive:
            self.end_reason = "closed: drained"
            self.scope.cancel()

    def _finish(self, reason: str) -> None:
        self.alive = False
        if self.goaway is not None:
            reason += f" (after GOAWAY: {self.goaway})"
        message = f"connection to {self.client.path} {reason}"
        for table in (self.pending, self.pings):
            for waiter in table.values():
                waiter.failure = message
                waiter.event.set()
            table.clear()
        self.client._forget(self)
        logger.log(logging.DEBUG if self.end_reason else logging.INFO, "%r %s", self, reason)

    def close(self) -> None:
        """The client is closing: fail every waiter with ClosedResourceError, stop."""
        self.alive = False
        self.end_reason = "closed by the client"
        for table in (self.pending, self.pings):
            for waiter in table.values():
                waiter.closed = True
                waiter.event.set()
            table.clear()
        self.scope.cancel()

    async def exchange(self, table: dict[int, _Waiter] | None, sid: int, data: bytes) -> _Waiter | None:
        """Send a REQUEST or PING and wait for its answer (for a ONEWAY, ``table=None``: just send).

        Returns:
            The filled-in waiter, or None if the connection stopped taking new
            work before ``data`` was written (nothing was sent: retry elsewhere).

        Raises:
            CallError: UNAVAILABLE, the connection was lost.
            trio.ClosedResourceError: the client was closed.
        """
        if not self.usable:
            return None
        assert self.writer is not None
        waiter = _Waiter()
        if table is not None:
            table[sid] = waiter
        try:
            try:
                if not await self.writer.send(data, unless=self._unusable):
                    return None
            except trio.BrokenResourceError as exc:
                raise CallError(Status.UNAVAILABLE, f"connection to {self.client.path} lost while sending") from exc
            if table is None:
                return waiter
            await waiter.event.wait()
        finally:
            if table is not None and table.pop(sid, None) is not None:  # not answered (cancelled, timed out, not sent)
                self.maybe_finish()
        if waiter.closed:
            raise trio.ClosedResourceError("the client was closed")
        if waiter.failure is not None:
            raise CallError(Status.UNAVAILABLE, waiter.failure)
        return waiter


class Client:
    """A connection (or, across a hot restart, a few) to the local octoproxy.

    Get one from :func:`octoproxy.sdk.open_client` (or ``connect``); do not instantiate
    it yourself. Safe to use from many tasks at once: calls are multiplexed on
    one connection.

    Attributes:
        path: the Unix socket path of the proxy.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
        resends: how many calls were resent after a HOT_RESTART answer.
        connections_opened: how many connections were opened, the first included.
    """

    def __init__(self, nursery: trio.Nursery, path: str | os.PathLike[str], *, max_frame_size: int, connect_timeout: float) -> None:
        if max_frame_size < PREFIX_SIZE:
            raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")
        self.path = os.fspath(path)
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self.resends = 0
        self.connections_opened = 0
        self._nursery = nursery
        self._current: _Connection | None = None
        self._connections: dict[_Connection, None] = {}  # ordered set
        self._connect_lock = trio.Lock()
        self._connect_attempts = 0
        self._connect_error: str | None = None
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def connections_open(self) -> int:
        """Connections not yet closed (more than one only while old ones drain)."""
        return len(self._connections)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; pending and later calls raise :class:`trio.ClosedResourceError`."""
        if not self._closed:
            self._closed = True
            self._current = None
            for conn in list(self._connections):
                conn.close()
                await trio.aclose_forcefully(conn.stream)
        await trio.lowlevel.checkpoint()

    async def call(
        self,
        service: str,
        method: str,
        body: bytes = b"",
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        """Call ``service``/``method`` and return the response body.

        Transparent to a hot restart of the proxy: a call answered HOT_RESTART
        is resent on a new connection (see :attr:`resends`).

        Args:
            service: the callee service name.
            method: the method name.
            body: the request payload.
            timeout: seconds to wait for the response (None: no local limit;
                the route's default applies in the proxy). Sent as
                ``timeout_ms`` and enforced here too.
            metadata: trace context, routing tags, credentials.

        Returns:
            The body of the OK response.

        Raises:
            CallError: status TIMEOUT when ``timeout`` passes; UNAVAILABLE when
                the proxy cannot be reached or the connection is lost with the
                call in flight; FRAME_TOO_LARGE when the request exceeds
                ``max_frame_size``; otherwise the non-OK status of the response.
            trio.ClosedResourceError: the client is (or gets) closed.
        """
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with trio.move_on_at(deadline):
            return await self._call(service, method, body, deadline, metadata)
        raise CallError(Status.TIMEOUT, f"{service}/{method}: no response within {timeout} s")

    async def _call(self, service: str, method: str, body: bytes, deadline: float, metadata: dict[str, str] | None) -> bytes:
        resends = moves = 0
        while True:
            sid = next(self._ids)
            data = self._encode(sid, service, method, body, metadata, deadline=deadline)
            conn = await self._get_connection()
            waiter = await conn.exchange(conn.pending, sid, data)
            if waiter is None:  # not sent: the connection stopped taking new work meanwhile
                moves += 1
                if moves > MAX_RESENDS:
                    raise CallError(Status.UNAVAILABLE, f"{service}/{method}: no connection would take the call")
                continue
            if waiter.hot_restart:  # not processed: safe to resend
                if resends == MAX_RESENDS:
                    raise CallError(Status.UNAVAILABLE, f"{service}/{method}: still answered HOT_RESTART after {resends} resends")
                resends += 1
                self.resends += 1
                continue
            if waiter.status == Status.OK:
                return waiter.body
            try:
                status = Status(waiter.status)
            except ValueError:
                raise CallError(Status.UNAVAILABLE, f"unknown status {waiter.status}: {waiter.error}") from None
            raise CallError(status, waiter.error or status.name)

    async def oneway(self, service: str, method: str, body: bytes = b"", *, metadata: dict[str, str] | None = None) -> None:
        """Send a ONEWAY request: no response, no delivery guarantee.

        Args:
            service: the callee service name.
            method: the method name.
            body: the payload.
            metadata: trace context, routing tags, credentials.

        Raises:
            CallError: UNAVAILABLE if it could not be written;
                FRAME_TOO_LARGE if it exceeds ``max_frame_size``.
            trio.ClosedResourceError: the client is closed.
        """
        data = self._encode(next(self._ids), service, method, body, metadata, oneway=True)
        for _ in range(MAX_RESENDS + 1):
            conn = await self._get_connection()
            if await conn.exchange(None, 0, data) is not None:
                return
        raise CallError(Status.UNAVAILABLE, f"{service}/{method}: no connection would take the request")

    async def ping(self, *, timeout: float = 5.0) -> float:
        """Send a PING to the proxy and wait for its PONG.

        Args:
            timeout: seconds to wait for the PONG.

        Returns:
            The round-trip time in seconds (Trio clock).

        Raises:
            CallError: TIMEOUT if no PONG came in time; UNAVAILABLE if the
                proxy cannot be reached or the connection is lost.
            trio.ClosedResourceError: the client is (or gets) closed.
        """
        with trio.move_on_after(timeout):
            for _ in range(MAX_RESENDS + 1):
                conn = await self._get_connection()
                token = next(self._ids)
                start = trio.current_time()
                if await conn.exchange(conn.pings, token, encode_frame(FrameType.PING, token)) is not None:
                    return trio.current_time() - start
            raise CallError(Status.UNAVAILABLE, "no connection would take the PING")
        raise CallError(Status.TIMEOUT, f"no PONG within {timeout} s")

    def _encode(
        self, sid: int, service: str, method: str, body: bytes, metadata: dict[str, str] | None, *, deadline: float = math.inf, oneway: bool = False
    ) -> bytes:
        """Encode a request; ``timeout_ms`` is the time left now, at least 1 ms (0 means no timeout)."""
        timeout_ms = 0 if deadline == math.inf else min(max(math.ceil((deadline - trio.current_time()) * 1000), 1), 0xFFFFFFFF)
        data = encode_request(sid, service, method, body, timeout_ms=timeout_ms, metadata=metadata, oneway=oneway)
        if len(data) > self.max_frame_size:
            raise CallError(Status.FRAME_TOO_LARGE, f"request of {len(data)} bytes exceeds the limit of {self.max_frame_size} bytes")
        return data

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the client was closed")

    async def _get_connection(self) -> _Connection:
        """The current connection; dials a new one (one attempt) if there is none."""
        self._check_open()
        conn = self._current
        if conn is not None and conn.usable:
            return conn
        attempts = self._connect_attempts
        async with self._connect_lock:
            self._check_open()
            conn = self._current
            if conn is not None and conn.usable:  # another call connected while we waited
                return conn
            if self._connect_attempts != attempts and self._connect_error is not None:
                raise CallError(Status.UNAVAILABLE, self._connect_error)  # it failed for us too
            try:
                stream = await self._dial()
            except OSError as exc:
                self._connect_attempts += 1
                self._connect_error = f"cannot connect to {self.path}: {exc.strerror or exc!r}"
                raise CallError(Status.UNAVAILABLE, self._connect_error) from exc
            self._connect_attempts += 1
            self._connect_error = None
            return await self._adopt(stream)

    async def _connect_first(self) -> None:
        """Open the first connection (for :func:`octoproxy.sdk.connect`); OSError if it fails."""
        await self._adopt(await self._dial())

    async def _dial(self) -> trio.SocketStream:
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_unix_socket(self.path)
        except trio.TooSlowError:
            raise TimeoutError(f"connecting to {self.path} timed out after {self.connect_timeout} s") from None

    async def _adopt(self, stream: trio.SocketStream) -> _Connection:
        """Start the reader of a freshly connected stream and make it current."""
        conn = _Connection(self, stream, self.connections_opened + 1)
        try:
            await self._nursery.start(conn.run)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.connections_opened += 1
        self._connections[conn] = None
        if self._closed:  # closed while we were connecting
            conn.close()
            self._check_open()
        self._current = conn
        logger.debug("%r opened", conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        """Called by a connection that has ended."""
        if self._current is conn:
            self._current = None
        self._connections.pop(conn, None)
