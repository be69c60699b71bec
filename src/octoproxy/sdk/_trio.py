"""The Trio front end of the Mesh SDK: a thin shell over ``_core`` and ``_server_core``.

Calling. A :class:`Client` runs one reader task per connection in a nursery
(:func:`open_client` owns one; :func:`connect` uses yours). A call encodes its
request with the core, writes it through the connection's :class:`FrameWriter`
and sleeps on its waiter's :class:`trio.Event`; the reader feeds what it reads
to the connection's core and sets the events of the waiters it answers.

Serving is in ``_trio_server.py``; it writes through the same :class:`FrameWriter`.

One writer per stream: :class:`FrameWriter` queues the frames of concurrent
writers and one of them writes them all with one ``send_all`` per round
(coalescing: one system call for many calls in flight); every ``send_all``
runs shielded under its own deadline, so cancelling a caller never leaves
half a frame on the wire and a peer that stops reading cannot pin us forever. A write that fails (or times out
half-way) leaves the byte stream unusable, so the writer closes it: the
connection's reader then sees :class:`trio.ClosedResourceError` and tears the
connection down in one place. Control frames the reader must write (PONG) are
*posted*: queued and flushed by one background task, so the reader never waits
for the write lock (it could deadlock against a peer that is itself blocked
writing to us).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import NoReturn

import trio

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, FrameType, Status
from ..frame import encode_frame
from . import _config_core as cfgcore
from . import _subscribe_core as subcore
from ._core import (
    ClientCounters,
    RECV_SIZE,
    CallCore,
    CallError,
    ClientClosedError,
    ClientCore,
    ConnectionCore,
    Pending,
    connect_delays,
    is_no_proxy,
    logger,
    no_proxy_error,
)
from ._server_core import Request

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Client", "FrameWriter", "Handler", "connect", "drain_and_close", "get_config", "open_client", "subscribe", "watch_config",
]  # fmt: skip

#: deadline of one shielded ``send_all``; past it the stream is given up
SEND_TIMEOUT = 30.0
#: how long a closing side keeps reading, waiting for the peer's EOF
_DRAIN_TIMEOUT = 1.0

#: ``async def handler(request: Request) -> bytes``
Handler = Callable[[Request], Awaitable[bytes]]


class ClosedError(ClientClosedError, trio.ClosedResourceError):
    """The client was closed: both the SDK's :class:`ClientClosedError` and Trio's ClosedResourceError."""


class _Queued:
    """One ``send`` waiting in a :class:`FrameWriter`'s queue."""

    __slots__ = ("data", "unless", "state")

    def __init__(self, data: bytes, unless: Callable[[], bool] | None) -> None:
        self.data = data
        self.unless = unless
        #: None: queued; True: written; False: vetoed by ``unless``
        self.state: bool | None = None


class FrameWriter:
    """Whole-frame writes to one stream, coalesced (see the module docstring).

    Writers queue their frames; the first one to find nobody writing becomes
    the flusher and writes everything queued, in rounds, with one
    ``send_all`` per round, while the others wait for the round that carries
    their bytes. With 32 calls in flight that is one system call for many
    frames instead of one each (the asyncio transport does the same), and the
    order of frames on the wire is the order of the ``send`` calls.

    A waiter cancelled before its round starts takes its frame out of the
    queue (nothing of it is written); once the round started, the frame goes
    out whole. Queued bytes are bounded by the writers waiting: each waits
    until its bytes are on the wire (or the stream failed).

    Attributes:
        broken: set once a write failed; every later write fails at once.
    """

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery, *, timeout: float = SEND_TIMEOUT) -> None:
        self._stream = stream
        self._nursery = nursery
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._writing = False
        self._round_done = trio.Event()
        self._failure: BaseException | None = None
        self._posted: list[bytes] = []
        self._flushing = False
        self.broken = False

    async def send(self, data: bytes, *, unless: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Write ``data`` (one or more whole frames) atomically.

        Args:
            data: the encoded frames.
            unless: checked just before the round that would write ``data``;
                if it returns true nothing is written (the connection started
                draining while we queued).
            timeout: overrides the writer's deadline for a round this call flushes.

        Returns:
            True if written, False if ``unless`` vetoed the write.

        Raises:
            trio.BrokenResourceError: the write failed or timed out now or
                earlier; the stream has been closed.
        """
        if self.broken:
            raise trio.BrokenResourceError("an earlier write on this connection failed")
        entry = _Queued(data, unless)
        self._queue.append(entry)
        if self._writing:
            while entry.state is None and not self.broken:
                done = self._round_done
                try:
                    await done.wait()
                except BaseException:
                    if entry.state is None and entry in self._queue:  # not taken by a round yet: nothing written
                        self._queue.remove(entry)
                    raise
            if entry.state is None:  # the stream failed before or while writing our bytes
                raise trio.BrokenResourceError(f"write failed: {self._failure!r}")
            return entry.state
        await trio.lowlevel.checkpoint_if_cancelled()  # cancellable before anything is written
        await self._flush_rounds(self._timeout if timeout is None else timeout)
        if entry.state is None:
            raise trio.BrokenResourceError(f"write failed: {self._failure!r}")
        return entry.state

    async def _flush_rounds(self, timeout: float) -> None:
        """Write what is queued, round after round, until the queue is empty."""
        self._writing = True
        try:
            with trio.CancelScope(shield=True):
                while self._queue and not self.broken:
                    batch, self._queue = self._queue, []
                    chunks = []
                    for e in batch:
                        if e.unless is not None and e.unless():
                            e.state = False
                        else:
                            chunks.append(e.data)
                    try:
                        if chunks:
                            with trio.fail_after(timeout):
                                await self._stream.send_all(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
                        # A partial frame may be on the wire: nothing more can be written.
                        self.broken = True
                        self._failure = exc
                        await trio.aclose_forcefully(self._stream)
                        return
                    for e in batch:
                        if e.state is None:
                            e.state = True
                    self._next_round()
        finally:
            self._writing = False
            self._next_round()

    def _next_round(self) -> None:
        self._round_done.set()
        self._round_done = trio.Event()

    def post(self, data: bytes) -> None:
        """Queue a small control frame; a background task writes the queue."""
        if self.broken or not data:
            return
        self._posted.append(data)
        if not self._flushing:
            self._flushing = True
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            while self._posted:
                data = b"".join(self._posted)
                self._posted.clear()
                await self.send(data)
        except trio.BrokenResourceError:
            self._posted.clear()
        finally:
            self._flushing = False


async def drain_and_close(stream: trio.abc.Stream) -> None:
    """Send EOF, read and drop what the peer still sends (briefly), then close.

    Closing a socket with unread bytes in it makes the kernel reset the
    connection, which can destroy our last frames (a GOAWAY) before the peer
    reads them; reading until the peer's EOF avoids that.
    """
    try:
        with trio.move_on_after(_DRAIN_TIMEOUT):
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(RECV_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------- client


class _Waiter(Pending):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = trio.Event()


def _wake(waiters: Iterable[_Waiter]) -> None:
    for waiter in waiters:
        waiter.event.set()


class _Connection(ConnectionCore[_Waiter]):
    """A connection's core plus its stream, writer and reader task."""

    __slots__ = ("client", "stream", "scope", "writer")

    def __init__(self, client: Client, stream: trio.SocketStream) -> None:
        super().__init__(client._core.next_number(), client.path, client.max_frame_size)
        self.client = client
        self.stream = stream
        self.scope = trio.CancelScope()
        self.writer: FrameWriter | None = None

    @property
    def ready(self) -> bool:
        """Whether new work may start here now."""
        return self.usable and self.writer is not None and not self.writer.broken

    def _not_ready(self) -> bool:
        return not self.ready

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
            _wake(self.lost(reason))
            self.client._core.forget(self)
            await trio.aclose_forcefully(self.stream)

    async def _read(self) -> str:
        """Read and feed the core until the connection ends; return why."""
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
            _wake(self.receive_data(data))
            out = self.data_to_send()
            if self.protocol_error is not None:
                try:
                    await self.writer.send(out, timeout=1.0)  # the GOAWAY
                except trio.BrokenResourceError:
                    pass
                return self.protocol_error
            if out:
                self.writer.post(out)
            self.maybe_finish()

    def maybe_finish(self) -> None:
        """Close a draining connection once nothing is outstanding on it."""
        if self.drained():
            self.lost("closed: drained")
            self.scope.cancel()

    def shut(self) -> None:
        """The client is closing: fail every waiter with the closed error, stop."""
        _wake(self.close())
        self.scope.cancel()

    async def exchange(self, table: dict[int, _Waiter] | None, sid: int, data: bytes) -> _Waiter | None:
        """Send a REQUEST or PING and wait for its answer (for a ONEWAY, ``table=None``: just send).

        Returns:
            The answered waiter, or None if the connection stopped taking new
            work before ``data`` was written (nothing was sent: go elsewhere).

        Raises:
            CallError: UNAVAILABLE, the connection broke while sending.
        """
        if not self.ready:
            return None
        assert self.writer is not None
        waiter = _Waiter()
        if table is not None:
            table[sid] = waiter
        try:
            try:
                if not await self.writer.send(data, unless=self._not_ready):
                    return None
            except trio.BrokenResourceError as exc:
                raise CallError(Status.UNAVAILABLE, f"connection to {self.path} lost while sending") from exc
            if table is None:
                return waiter
            await waiter.event.wait()
        finally:
            if table is not None and table.pop(sid, None) is not None:  # not answered (cancelled, timed out, not sent)
                self.maybe_finish()
        return waiter


class Client(ClientCounters):
    """A connection (or, across a hot restart, a few) to the local octoproxy.

    Get one from :func:`octoproxy.sdk.open_client` (or ``connect``); do not instantiate
    it yourself. Safe to use from many tasks at once: calls are multiplexed on
    one connection.

    Attributes:
        path: the Unix socket path of the proxy.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
    """

    def __init__(self, nursery: trio.Nursery, path: str | os.PathLike[str], *, max_frame_size: int, connect_timeout: float) -> None:
        self.path = os.fspath(path)
        self.max_frame_size = max_frame_size
        self.connect_timeout = connect_timeout
        self._core: ClientCore[_Connection] = ClientCore(self.path, max_frame_size, ClosedError)
        self._nursery = nursery
        self._connect_lock = trio.Lock()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; pending and later calls raise :class:`trio.ClosedResourceError`."""
        for conn in self._core.close():
            conn.shut()
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
        call = CallCore(service, method, body, metadata, timeout, trio.current_time())
        with trio.move_on_at(math.inf if call.deadline is None else call.deadline):
            return await self._call(call)
        raise self._core.timeout_error(call)

    async def _call(self, call: CallCore) -> bytes:
        core = self._core
        while True:
            sid = core.next_id()
            data = core.encode(call, sid, trio.current_time())
            conn = await self._get_connection()
            waiter = await conn.exchange(conn.pending, sid, data)
            if waiter is None:  # not sent: the connection stopped taking new work meanwhile
                core.not_sent(call)
                continue
            result = core.outcome(call, waiter)
            if result is not None:
                return result

    async def oneway(self, service: str, method: str, body: bytes = b"", *, metadata: dict[str, str] | None = None) -> None:
        """Send a ONEWAY request: no response, no delivery guarantee.

        Raises:
            CallError: UNAVAILABLE if it could not be written;
                FRAME_TOO_LARGE if it exceeds ``max_frame_size``.
            trio.ClosedResourceError: the client is closed.
        """
        call = CallCore(service, method, body, metadata, None, trio.current_time(), oneway=True)
        data = self._core.encode(call, self._core.next_id(), trio.current_time())
        while True:
            conn = await self._get_connection()
            if await conn.exchange(None, 0, data) is not None:
                return
            self._core.not_sent(call)

    async def ping(self, *, timeout: float = 5.0) -> float:
        """Send a PING to the proxy and wait for its PONG.

        Returns:
            The round-trip time in seconds (Trio clock).

        Raises:
            CallError: TIMEOUT if no PONG came in time; UNAVAILABLE if the
                proxy cannot be reached or the connection is lost.
            trio.ClosedResourceError: the client is (or gets) closed.
        """
        call = CallCore("", "PING", b"", None, timeout, trio.current_time())
        with trio.move_on_after(timeout):
            while True:
                conn = await self._get_connection()
                token = self._core.next_id()
                start = trio.current_time()
                waiter = await conn.exchange(conn.pings, token, encode_frame(FrameType.PING, token))
                if waiter is not None:
                    self._core.ping_outcome(waiter)
                    return trio.current_time() - start
                self._core.not_sent(call)
        raise CallError(Status.TIMEOUT, f"no PONG within {timeout} s")

    async def _get_connection(self) -> _Connection:
        """The current connection; dials a new one (one attempt) if there is none."""
        core = self._core
        conn = core.usable_connection()
        if conn is not None and conn.ready:
            return conn
        attempts = core.dial_attempts
        async with self._connect_lock:
            conn = core.usable_connection()
            if conn is not None and conn.ready:  # another call connected while we waited
                return conn
            shared = core.shared_dial_failure(attempts)
            if shared is not None:
                raise shared  # it failed for us too
            try:
                stream = await self._dial()
            except OSError as exc:
                raise core.dial_failed(exc) from exc
            return await self._adopt(stream)

    async def _dial(self) -> trio.SocketStream:
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_unix_socket(self.path)
        except trio.TooSlowError:
            raise self._core.connect_timeout_error(self.connect_timeout) from None

    async def _connect_first(self, wait: float) -> None:
        """Open the first connection, waiting up to ``wait`` s for a proxy to appear.

        Raises:
            NoProxyError: nobody listens on the path (also a FileNotFoundError
                or ConnectionRefusedError).
            OSError: any other dial failure (TimeoutError after ``connect_timeout``).
        """
        delays = iter(connect_delays(wait))
        while True:
            try:
                stream = await self._dial()
            except OSError as exc:
                if not is_no_proxy(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise no_proxy_error(self.path, exc) from None
                await trio.sleep(delay)
                continue
            await self._adopt(stream)
            return

    async def _adopt(self, stream: trio.SocketStream) -> _Connection:
        """Start the reader of a freshly connected stream and make it current."""
        conn = _Connection(self, stream)
        try:
            await self._nursery.start(conn.run)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self._core.adopt(conn)
        if self._core.closed:  # closed while we were connecting
            conn.shut()
            self._core.check_open()
        return conn


async def connect(
    nursery: trio.Nursery,
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
    wait: float = 0.0,
) -> Client:
    """Connect to the proxy at ``path``, running the client's tasks in ``nursery``.

    For a client whose lifetime is not one ``async with`` block; otherwise use
    :func:`open_client`. The client must be closed with :meth:`Client.aclose`
    (or ``async with client:``), or the nursery never finishes.

    Args:
        nursery: where the client's reader tasks run.
        path: the proxy's Unix socket.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
        wait: seconds to keep retrying while no proxy listens on ``path``
            (it may be starting next to the app); 0 tries once.

    Returns:
        A connected :class:`Client`.

    Raises:
        NoProxyError: no proxy listens on ``path`` (a :class:`CallError`
            with status UNAVAILABLE, and a FileNotFoundError or
            ConnectionRefusedError); its message names the path.
        OSError: the first connection failed otherwise (``TimeoutError``
            after ``connect_timeout``); later failures surface as :class:`CallError`.
    """
    client = Client(nursery, path, max_frame_size=max_frame_size, connect_timeout=connect_timeout)
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
    """Connect to the proxy at ``path`` for the duration of an ``async with`` block.

    ``async with open_client(path) as client: await client.call(...)``. The
    client's reader tasks live in a nursery this context manager owns; leaving
    the block closes the client. Exceptions from the block propagate as they
    are (not wrapped in an exception group): the client's own tasks never raise.

    Args:
        path: the proxy's Unix socket.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.
        wait: seconds to keep retrying while no proxy listens on ``path``.

    Yields:
        A connected :class:`Client`.

    Raises:
        NoProxyError: no proxy listens on ``path`` (see :func:`connect`).
        OSError: the first connection failed otherwise.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = await connect(nursery, path, max_frame_size=max_frame_size, connect_timeout=connect_timeout, wait=wait)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        _reraise(group.exceptions[0])


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` out of the group that wrapped it, keeping its own context."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


# ---------------------------------------------------------------- discovery


async def subscribe(admin: str, services: Iterable[str], *, timeout: float = 5.0, retry_for: float = 30.0) -> dict[str, int]:
    """Subscribe the local proxy to ``services``; return once it holds their endpoints.

    The proxy may not be up yet (it starts next to the app): retried with
    exponential back-off until ``retry_for`` runs out.

    Args:
        admin: the proxy's admin address (``host:port`` or ``unix:/path``).
        services: the service names this app calls.
        timeout: how long the proxy may wait for the control plane.
        retry_for: how long to keep retrying while the proxy is not up.

    Returns:
        Endpoints known per service (0: the control plane knows no endpoint).

    Raises:
        CallError: UNAVAILABLE if the proxy never answered within
            ``retry_for``, or TIMEOUT if it did not get the endpoints in time;
            NO_ROUTE if the proxy has no discovery configured.
    """
    from ..common._admin import http_request

    names, body = subcore.subscribe_body(services, timeout)
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    with trio.move_on_after(retry_for):
        while True:
            try:
                status, _headers, reply = await http_request(admin, "POST", "/subscribe", body, timeout=timeout + 2.0)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                last = exc  # the proxy is not up (yet): back off and retry
                logger.info("subscribe: proxy at %s not answering (%s); retrying in %.2fs", admin, exc, delay)
                await trio.sleep(delay)
                delay = subcore.next_delay(delay)
                continue
            return subcore.subscribe_result(names, timeout, status, reply)
    raise subcore.never_answered(names, admin, retry_for, last)



# ---------------------------------------------------------------- configuration for apps


async def _config_once(admin: str, watch: str | None, poll: float, timeout: float, retry_for: float) -> cfgcore.AppConfig:
    from ..common._admin import http_request

    path = cfgcore.config_path(watch, poll)
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    with trio.move_on_after(retry_for):
        while True:
            try:
                wait = timeout + (poll if watch is not None else 0)
                status, _headers, reply = await http_request(admin, "GET", path, b"", timeout=wait)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                status, reply, last = 0, b"", exc  # the proxy is not up (yet, or it restarts)
            if status not in (0, 429):
                return cfgcore.config_result(status, reply)
            logger.info("config: proxy at %s not answering (%s); retrying in %.2fs", admin, last or "429", delay)
            await trio.sleep(delay)
            delay = subcore.next_delay(delay)
    raise CallError(Status.UNAVAILABLE, f"GET /config: no proxy answered at {admin} within {retry_for}s ({last})")


async def get_config(admin: str, *, timeout: float = 5.0, retry_for: float = 30.0) -> cfgcore.AppConfig:
    """The app's configuration as its proxy holds it (see docs/sdk.md, "Configuration").

    Args:
        admin: the proxy's admin address (``host:port`` or ``unix:/path``).
        timeout: deadline of one request.
        retry_for: how long to keep retrying while the proxy is not up.

    Raises:
        CallError: NO_ROUTE if the proxy has no configuration for the app
            (no ``[discovery]`` or no ``proxy.service``), UNAVAILABLE if no
            proxy answered within ``retry_for``.
    """
    return await _config_once(admin, None, 0.0, timeout, retry_for)


async def watch_config(
    admin: str, *, since: str | None = None, poll: float = cfgcore.POLL, retry_for: float = 30.0
) -> AsyncIterator[cfgcore.AppConfig]:
    """Yield the app's configuration now (unless ``since`` is given), then at every change.

    ``async for config in watch_config(admin): ...``. Each change is one long
    poll of the proxy's ``GET /config?watch=<version>``: no traffic while
    nothing changes but one request every ``poll`` seconds.

    Args:
        since: the version the app holds; only versions that differ are yielded.
        poll: seconds of one long poll (at most 60).
        retry_for: how long to keep retrying while the proxy does not answer.

    Raises:
        CallError: as :func:`get_config`.
    """
    if since is None:
        current = await get_config(admin, retry_for=retry_for)
        yield current
        since = current.version
    while True:
        current = await _config_once(admin, since, poll, 5.0, retry_for)
        if current.version != since:
            since = current.version
            yield current
