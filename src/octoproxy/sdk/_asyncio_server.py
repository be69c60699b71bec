"""The asyncio provider of the Mesh SDK over ``_server_core``.

Each accepted connection is a protocol over a
:class:`~._server_core.ServerConnectionCore`. Requests are pulled from the core
only while a server-wide handler slot is free (``max_concurrency``); otherwise
the connection stops reading (``pause_reading``) until a slot frees: the peer
feels back-pressure through the socket. Each handler runs in its own task under
a loop timer at the request's deadline (cancelled then, answered TIMEOUT).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from types import TracebackType
from typing import Any

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, Status
from ._asyncio import Handler
from ._core import logger
from ._server_core import TIMEOUT_OUTCOME, Request, ServerConnectionCore, check_body, check_server_args, expired, outcome_of_exception
from ._sockets import bind_replacing_stale

__all__ = ["Server", "run_provider", "serve", "start_server"]

class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = ServerConnectionCore(server.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.blocked = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.core.receive_data(data)
        self.pump()

    def eof_received(self) -> bool:
        self.eof = True  # running handlers finish; their responses are dropped
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def pump(self) -> None:
        """Start handlers for the requests received, while handler slots are free."""
        server = self.server
        core = self.core
        transport = self.transport
        if transport is None:
            return
        while True:
            if server.free == 0:
                if not self.blocked:
                    self.blocked = True
                    transport.pause_reading()
                    server.blocked.append(self)
                break
            req = core.next_request(server.loop.time())
            out = core.data_to_send()
            if out:
                transport.write(out)
            if req is None:
                break
            server.free -= 1
            task = server.loop.create_task(self._handle(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if core.error is not None:
            transport.pause_reading()
            self.maybe_close()

    def unblock(self) -> None:
        self.blocked = False
        if self.transport is not None:
            self.pump()
            if not self.blocked and self.core.error is None:
                self.transport.resume_reading()

    def maybe_close(self) -> None:
        """After a protocol error: close once the running handlers have answered."""
        if self.core.error is not None and not self.tasks and self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.transport.close()

    async def _handle(self, req: Request) -> None:
        # taken now: a pending task closed with its loop runs the finally with no running loop
        me = asyncio.current_task()
        try:
            status, error, body = await self.server.run_handler(req)
            data = self.core.response(req, status, error, body)
            if data is not None and self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)
        finally:
            self.server.release()
            if me is not None:
                self.tasks.discard(me)
            self.maybe_close()


class Server:
    """A running asyncio provider (from :func:`start_server`); close it with :meth:`aclose`.

    Attributes:
        path: the socket path it listens on.
    """

    def __init__(self, handler: Handler, path: str, max_concurrency: int, max_frame_size: int) -> None:
        self.handler = handler
        self.path = path
        self.max_frame_size = max_frame_size
        self.free = max_concurrency
        self.blocked: collections.deque[_ServerConnection] = collections.deque()
        self.connections: set[_ServerConnection] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | None = None

    def release(self) -> None:
        self.free += 1
        while self.free and self.blocked:
            self.blocked.popleft().unblock()

    async def run_handler(self, req: Request) -> tuple[int, str, bytes]:
        """Run the handler under the request's deadline: ``(status, error, body)``."""
        loop = self.loop
        if expired(req, loop.time()):  # expired while queued (back-pressure): do not start it
            return TIMEOUT_OUTCOME
        fired = False
        timer = None
        if req.deadline is not None:
            task = asyncio.current_task()
            assert task is not None

            def expire() -> None:
                nonlocal fired
                fired = True
                task.cancel()

            timer = loop.call_at(req.deadline, expire)
        try:
            body = check_body(await self.handler(req))
        except asyncio.CancelledError:
            if not fired:
                raise
            return TIMEOUT_OUTCOME
        except Exception as exc:
            return outcome_of_exception(req, exc)
        finally:
            if timer is not None:
                timer.cancel()
        if fired or expired(req, loop.time()):
            return TIMEOUT_OUTCOME
        return Status.OK, "", body

    async def aclose(self) -> None:
        """Stop accepting, cancel running handlers, close every connection."""
        if self._server is not None:
            self._server.close()
        tasks: list[asyncio.Task[None]] = []
        for conn in list(self.connections):
            tasks += conn.tasks
            for task in conn.tasks:
                task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        if tasks:  # let them finish unwinding (no "Task was destroyed but it is pending")
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


async def start_server(
    path: str | os.PathLike[str],
    handler: Handler,
    *,
    max_concurrency: int = 1024,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    mode: int = 0o660,
    backlog: int = 128,
) -> Server:
    """Start serving ``handler`` on a Unix socket; return once it accepts connections.

    Same answers as :func:`octoproxy.sdk.serve` (OK, APPLICATION_ERROR,
    ``internal error: <type>``, TIMEOUT at the request's deadline, with the
    handler cancelled then). Close it with ``await server.aclose()`` (or
    ``async with``).

    Args:
        path: the socket path; a stale socket file there is removed first.
        handler: ``async def handler(request: Request) -> bytes``.
        max_concurrency: handlers running at once; when all are busy the
            server stops reading (back-pressure).
        max_frame_size: the largest frame accepted (and sent).
        mode: permission bits of the socket file.
        backlog: listen backlog.

    Raises:
        ValueError: ``max_concurrency`` < 1.
        OSError: binding failed, or a live server already owns ``path``.
    """
    check_server_args(max_concurrency, max_frame_size)
    p = os.fspath(path)
    server = Server(handler, p, max_concurrency, max_frame_size)
    sock = bind_replacing_stale(p, mode, backlog)
    try:
        server._server = await server.loop.create_unix_server(lambda: _ServerConnection(server), sock=sock)
    except BaseException:
        sock.close()
        raise
    return server


async def serve(path: str | os.PathLike[str], handler: Handler, **kwargs: Any) -> None:
    """Serve ``handler`` on ``path`` until cancelled (``asyncio.run(serve(path, handler))``).

    Args:
        path: the socket path; a stale socket file there is removed first.
        handler: ``async def handler(request: Request) -> bytes``.
        **kwargs: as :func:`start_server`.
    """
    server = await start_server(path, handler, **kwargs)
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()


def run_provider(path: str | os.PathLike[str], handler: Handler, **kwargs: Any) -> None:
    """Serve ``handler`` on ``path`` in a new event loop until Ctrl-C or SIGTERM; then return.

    The one-line asyncio provider: ``aio.run_provider("/run/app/inbound.sock", handler)``.
    On SIGINT or SIGTERM the server stops accepting, running handlers are
    cancelled, and the function returns normally (no traceback).

    Args:
        path: the socket path (a stale socket file there is removed first).
        handler: ``async def handler(request: Request) -> bytes``.
        **kwargs: as :func:`start_server`.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with await start_server(path, handler, **kwargs):
                await stop.wait()
                logger.info("stopping the provider on %s", os.fspath(path))
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # a Ctrl-C before the handlers were installed
        pass
