"""The asyncio front end of the Mesh SDK (the caller side; the provider is ``_asyncio_server.py``).

Calling. Each connection is an :class:`asyncio.Protocol` that is also the
connection's :class:`~._core.ConnectionCore`: ``data_received`` feeds the core
and resolves the futures of the waiters it answers. A call encodes its request
with the core, writes it with ``transport.write`` (whole frames, never
interleaved: asyncio transports buffer and never write partially from the
caller's side) and awaits its waiter's future; its deadline is a loop timer
that resolves the future as "timed out". When the transport's buffer is over
its high-water mark (``pause_writing``), new calls wait for it to drain first.

Serving. Each accepted connection is a protocol over a
:class:`~._server_core.ServerConnectionCore`. Requests are pulled from the core
only while a server-wide handler slot is free (``max_concurrency``); otherwise
the connection stops reading (``pause_reading``) until a slot frees: the peer
feels back-pressure through the socket. Each handler runs in its own task under
a loop timer at the request's deadline (cancelled then, answered TIMEOUT).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TypeVar

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, FrameType, Status
from ..frame import encode_frame
from . import _config_core as cfgcore
from . import _subscribe_core as subcore
from ._core import CallCore, CallError, ClientCore, ClientCounters, ConnectionCore, Pending, connect_delays, is_no_proxy, logger, no_proxy_error
from ._server_core import Request

__all__ = ["Client", "Handler", "connect", "get_config", "open_client", "subscribe", "watch_config"]

T = TypeVar("T")

#: ``async def handler(request: Request) -> bytes``
Handler = Callable[[Request], Awaitable[bytes]]


class _Waiter(Pending):
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        super().__init__()
        self.future = future


def _wake(waiters: Iterable[_Waiter]) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_result(False)


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)  # True: timed out


class _Connection(ConnectionCore[_Waiter], asyncio.Protocol):
    """A connection's core and its asyncio protocol."""

    __slots__ = ("client", "transport", "paused", "_writable")

    def __init__(self, client: Client) -> None:
        ConnectionCore.__init__(self, client._core.next_number(), client.path, client.max_frame_size)
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._writable: list[asyncio.Future[None]] = []

    @property
    def ready(self) -> bool:
        """Whether new work may start here now."""
        return self.usable and self.transport is not None and not self.transport.is_closing()

    # -- protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        _wake(self.receive_data(data))
        out = self.data_to_send()
        assert self.transport is not None
        if out:
            self.transport.write(out)
        if self.protocol_error is not None:
            _wake(self.lost(self.protocol_error))
            self.transport.close()  # after writing the GOAWAY
        else:
            self.maybe_finish()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        _wake(self.lost("closed by the peer" if exc is None else f"lost: {exc!r}"))
        self.client._core.forget(self)
        self._wake_writers()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    # -- helpers

    def _wake_writers(self) -> None:
        for fut in self._writable:
            if not fut.done():
                fut.set_result(None)
        self._writable.clear()

    async def writable(self) -> None:
        """Wait until the transport's buffer drained below its low-water mark (or the connection ended)."""
        while self.paused and self.ended is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._writable.append(fut)
            await fut

    def maybe_finish(self) -> None:
        """Close a draining connection once nothing is outstanding on it."""
        if self.drained():
            self.lost("closed: drained")
            assert self.transport is not None
            self.transport.close()

    def shut(self) -> None:
        """The client is closing: fail every waiter with the closed error, close."""
        _wake(self.close())
        if self.transport is not None:
            self.transport.abort()


class Client(ClientCounters):
    """A connection (or, across a hot restart, a few) to the local octoproxy, for asyncio.

    Get one from :func:`octoproxy.sdk.aio.open_client` (or ``connect``). Safe
    to use from many tasks of its event loop at once: calls are multiplexed on
    one connection. Same behaviour and errors as the Trio client
    (:class:`octoproxy.sdk.Client`); a closed client raises
    :class:`~octoproxy.sdk.ClientClosedError`.

    Attributes:
        path: the Unix socket path of the proxy.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_frame_size: int, connect_timeout: float) -> None:
        self.path = os.fspath(path)
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self._core: ClientCore[_Connection] = ClientCore(self.path, max_frame_size)
        self._loop = asyncio.get_running_loop()
        self._connect_lock = asyncio.Lock()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; pending and later calls raise :class:`~octoproxy.sdk.ClientClosedError`."""
        for conn in self._core.close():
            conn.shut()
        await asyncio.sleep(0)

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
            timeout: seconds to wait for the response (None: no local limit).
            metadata: trace context, routing tags, credentials.

        Returns:
            The body of the OK response.

        Raises:
            CallError: TIMEOUT, UNAVAILABLE, FRAME_TOO_LARGE or the non-OK
                status of the response (as the Trio client).
            ClientClosedError: the client is (or gets) closed.
        """
        loop = self._loop
        core = self._core
        call = CallCore(service, method, body, metadata, timeout, loop.time())
        while True:
            sid = core.next_id()
            data = core.encode(call, sid, loop.time())
            conn = core.usable_connection()
            if conn is None or not conn.ready:
                conn = await self._get_connection(call)
            if conn.paused:
                await self._until(call, conn.writable())
            if not conn.ready:
                core.not_sent(call)
                continue
            waiter = _Waiter(loop.create_future())
            conn.pending[sid] = waiter
            assert conn.transport is not None
            conn.transport.write(data)
            timer = None if call.deadline is None else loop.call_at(call.deadline, _expire, waiter.future)
            try:
                timed_out = await waiter.future
            finally:
                if timer is not None:
                    timer.cancel()
                if conn.pending.pop(sid, None) is not None:  # not answered (timed out, cancelled)
                    conn.maybe_finish()
            if timed_out:
                raise core.timeout_error(call)
            result = core.outcome(call, waiter)
            if result is not None:
                return result

    async def _until(self, call: CallCore, aw: Awaitable[T]) -> T:
        """Await ``aw`` within the call's deadline (TIMEOUT after it)."""
        if call.deadline is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, max(call.deadline - self._loop.time(), 0))
        except asyncio.TimeoutError:
            raise self._core.timeout_error(call) from None

    async def oneway(self, service: str, method: str, body: bytes = b"", *, metadata: dict[str, str] | None = None) -> None:
        """Send a ONEWAY request: no response, no delivery guarantee.

        Raises:
            CallError: UNAVAILABLE if it could not be written; FRAME_TOO_LARGE.
            ClientClosedError: the client is closed.
        """
        call = CallCore(service, method, body, metadata, None, self._loop.time(), oneway=True)
        data = self._core.encode(call, self._core.next_id(), self._loop.time())
        while True:
            conn = self._core.usable_connection() or await self._get_connection(call)
            if conn.paused:
                await conn.writable()
            if conn.ready and conn.transport is not None:
                conn.transport.write(data)
                return
            self._core.not_sent(call)

    async def ping(self, *, timeout: float = 5.0) -> float:
        """Send a PING to the proxy and wait for its PONG; return the round-trip time in seconds.

        Raises:
            CallError: TIMEOUT if no PONG came in time; UNAVAILABLE if the
                proxy cannot be reached or the connection is lost.
            ClientClosedError: the client is (or gets) closed.
        """
        loop = self._loop
        call = CallCore("", "PING", b"", None, timeout, loop.time())
        while True:
            conn = self._core.usable_connection() or await self._get_connection(call)
            if not conn.ready or conn.transport is None:
                self._core.not_sent(call)
                continue
            token = self._core.next_id()
            waiter = _Waiter(loop.create_future())
            conn.pings[token] = waiter
            start = loop.time()
            conn.transport.write(encode_frame(FrameType.PING, token))
            timer = loop.call_at(start + timeout, _expire, waiter.future)
            try:
                timed_out = await waiter.future
            finally:
                timer.cancel()
                if conn.pings.pop(token, None) is not None:
                    conn.maybe_finish()
            if timed_out:
                raise CallError(Status.TIMEOUT, f"no PONG within {timeout} s")
            self._core.ping_outcome(waiter)
            return loop.time() - start

    async def _get_connection(self, call: CallCore) -> _Connection:
        """The current connection; dials a new one (one attempt) if there is none."""
        core = self._core
        attempts = core.dial_attempts
        async with self._connect_lock:
            conn = core.usable_connection()
            if conn is not None and conn.ready:  # another call connected while we waited
                return conn
            shared = core.shared_dial_failure(attempts)
            if shared is not None:
                raise shared  # it failed for us too
            try:
                conn = await self._until(call, self._dial())
            except OSError as exc:
                raise core.dial_failed(exc) from exc
            core.adopt(conn)
            return conn

    async def _dial(self) -> _Connection:
        conn = _Connection(self)
        try:
            await asyncio.wait_for(self._loop.create_unix_connection(lambda: conn, self.path), self.connect_timeout)
        except asyncio.TimeoutError:
            raise self._core.connect_timeout_error(self.connect_timeout) from None
        return conn

    async def _connect_first(self, wait: float) -> None:
        delays = iter(connect_delays(wait))
        while True:
            try:
                conn = await self._dial()
            except OSError as exc:
                if not is_no_proxy(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise no_proxy_error(self.path, exc) from None
                await asyncio.sleep(delay)
                continue
            self._core.adopt(conn)
            return


async def connect(
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
    wait: float = 0.0,
) -> Client:
    """Connect to the proxy at ``path``; close the client with :meth:`Client.aclose`.

    Args:
        path: the proxy's Unix socket.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
        wait: seconds to keep retrying while no proxy listens on ``path``.

    Raises:
        NoProxyError: no proxy listens on ``path``; the message names it.
        OSError: the first connection failed otherwise.
    """
    client = Client(path, max_frame_size=max_frame_size, connect_timeout=connect_timeout)
    await client._connect_first(wait)
    return client


@asynccontextmanager
async def open_client(
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
    wait: float = 0.0,
) -> AsyncIterator[Client]:
    """``async with open_client(path) as client: await client.call(...)`` (see :func:`connect`)."""
    client = await connect(path, max_frame_size=max_frame_size, connect_timeout=connect_timeout, wait=wait)
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------- discovery


async def _post(admin: str, request: bytes, timeout: float) -> tuple[int, bytes]:
    target = subcore.parse_admin_address(admin)

    async def exchange() -> tuple[int, bytes]:
        if isinstance(target, str):
            reader, writer = await asyncio.open_unix_connection(target)
        else:
            reader, writer = await asyncio.open_connection(*target)
        try:
            writer.write(request)
            reply = subcore.HttpReply()
            while not reply.complete:
                reply.receive_data(await reader.read(65536))
            return reply.status, reply.body
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


async def subscribe(admin: str, services: Iterable[str], *, timeout: float = 5.0, retry_for: float = 30.0) -> dict[str, int]:
    """Subscribe the local proxy to ``services`` (as :func:`octoproxy.sdk.subscribe`).

    Raises:
        CallError: UNAVAILABLE if the proxy never answered within
            ``retry_for``, TIMEOUT if it did not get the endpoints in time,
            NO_ROUTE if it has no discovery configured.
    """
    loop = asyncio.get_running_loop()
    names, body = subcore.subscribe_body(services, timeout)
    request = subcore.subscribe_request(admin, body)
    give_up = loop.time() + retry_for
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    while loop.time() < give_up:
        try:
            status, reply = await asyncio.wait_for(_post(admin, request, timeout + 2.0), max(give_up - loop.time(), 0.001))
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            last = exc  # the proxy is not up (yet): back off and retry
            logger.info("subscribe: proxy at %s not answering (%r); retrying in %.2fs", admin, exc, delay)
            await asyncio.sleep(min(delay, max(give_up - loop.time(), 0)))
            delay = subcore.next_delay(delay)
            continue
        return subcore.subscribe_result(names, timeout, status, reply)
    raise subcore.never_answered(names, admin, retry_for, last)


# ---------------------------------------------------------------- configuration for apps


async def _config_once(admin: str, watch: str | None, poll: float, timeout: float, retry_for: float) -> cfgcore.AppConfig:
    loop = asyncio.get_running_loop()
    request = cfgcore.config_request(admin, cfgcore.config_path(watch, poll))
    give_up = loop.time() + retry_for
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    while loop.time() < give_up:
        try:
            wait = timeout + (poll if watch is not None else 0)
            status, reply = await asyncio.wait_for(_post(admin, request, wait), max(give_up - loop.time(), 0.001) + poll)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            status, reply, last = 0, b"", exc  # the proxy is not up (yet, or it restarts)
        if status not in (0, 429):
            return cfgcore.config_result(status, reply)
        logger.info("config: proxy at %s not answering (%r); retrying in %.2fs", admin, last or "429", delay)
        await asyncio.sleep(min(delay, max(give_up - loop.time(), 0)))
        delay = subcore.next_delay(delay)
    raise CallError(Status.UNAVAILABLE, f"GET /config: no proxy answered at {admin} within {retry_for}s ({last})")


async def get_config(admin: str, *, timeout: float = 5.0, retry_for: float = 30.0) -> cfgcore.AppConfig:
    """The app's configuration as its proxy holds it (as :func:`octoproxy.sdk.get_config`)."""
    return await _config_once(admin, None, 0.0, timeout, retry_for)


async def watch_config(
    admin: str, *, since: str | None = None, poll: float = cfgcore.POLL, retry_for: float = 30.0
) -> AsyncIterator[cfgcore.AppConfig]:
    """Yield the configuration now (unless ``since``), then at every change (as :func:`octoproxy.sdk.watch_config`)."""
    if since is None:
        current = await get_config(admin, retry_for=retry_for)
        yield current
        since = current.version
    while True:
        current = await _config_once(admin, since, poll, 5.0, retry_for)
        if current.version != since:
            since = current.version
            yield current
