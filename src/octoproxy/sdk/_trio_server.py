"""The Trio provider of the Mesh SDK: :func:`serve` and :func:`run_provider` over ``_server_core``.

:func:`serve` runs :func:`trio.serve_listeners`; each connection task feeds a
:class:`~._server_core.ServerConnectionCore` and pulls requests from it,
taking a token from the server-wide semaphore for each (when all
``max_concurrency`` tokens are out the reader stops reading: the peer feels
back-pressure through the socket); the handler runs in a task of the
connection's nursery and writes its RESPONSE through the connection's
:class:`~._trio.FrameWriter` (one writer per stream, see ``_trio.py``).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
from typing import Any, NoReturn

import trio

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE
from ..common._unix import bind_unix, remove_stale_socket
from ._core import RECV_SIZE, logger
from ._server_core import (
    TIMEOUT_OUTCOME,
    Request,
    ServerConnectionCore,
    check_body,
    check_server_args,
    expired,
    outcome_of_exception,
)
from ._trio import FrameWriter, Handler, _reraise, drain_and_close

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["run_provider", "serve"]

async def _open_unix_listener(path: str, mode: int, backlog: int) -> trio.SocketListener:
    await remove_stale_socket(path)
    return trio.SocketListener(trio.socket.from_stdlib_socket(bind_unix(path, mode, backlog)))


def _only_interrupts(group: BaseExceptionGroup[BaseException]) -> bool:
    from ..protocol._errors import exception_leaves

    return all(isinstance(leaf, KeyboardInterrupt) for leaf in exception_leaves(group))


async def serve(
    path: str | os.PathLike[str] | None,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    max_concurrency: int = 1024,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    mode: int = 0o660,
    listeners: list[trio.SocketListener] | None = None,
    backlog: int = 128,
) -> NoReturn:
    """Serve ``handler`` on a Unix socket until cancelled.

    Use as ``await nursery.start(serve, path, handler)``. Every REQUEST runs
    ``await handler(request)`` in its own task and is answered with a RESPONSE
    on the same stream id: the returned bytes with status OK;
    APPLICATION_ERROR with the message of an :class:`ApplicationError`;
    APPLICATION_ERROR ``"internal error: <type>"`` for any other exception
    (logged on ``octoproxy.sdk``); TIMEOUT if the request's deadline
    (``timeout_ms``) passes first (the handler is then cancelled). ONEWAY runs
    the handler and answers nothing. The socket file is left in place on exit
    (a hot-restarted successor may own it); the next bind removes it if stale.
    A Ctrl-C comes out as a plain :class:`KeyboardInterrupt`, not inside an
    exception group; :func:`run_provider` turns it into a clean exit.

    Args:
        path: the socket path; ignored when ``listeners`` is given. A stale
            socket file there is removed first.
        handler: ``async def handler(request: Request) -> bytes``.
        task_status: receives the listeners once they accept connections.
        max_concurrency: handlers running at once across all connections; when
            they are all busy the server stops reading (back-pressure).
        max_frame_size: the largest frame accepted (and sent).
        mode: permission bits of the socket file.
        listeners: already-bound listeners to serve instead (hot restart);
            they are closed on exit.
        backlog: listen backlog.

    Raises:
        ValueError: ``max_concurrency`` < 1, or neither a path nor listeners.
        OSError: binding failed, or a live server already owns ``path``.
    """
    check_server_args(max_concurrency, max_frame_size)
    if listeners is None:
        if path is None:
            raise ValueError("serve needs a path or listeners")
        listeners = [await _open_unix_listener(os.fspath(path), mode, backlog)]
    elif not listeners:
        raise ValueError("serve needs at least one listener")
    server = _Server(handler, trio.Semaphore(max_concurrency), max_frame_size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle_connection, listeners)
            task_status.started(listeners)
    except BaseExceptionGroup as group:
        if _only_interrupts(group):
            raise KeyboardInterrupt from None
        raise
    raise AssertionError("serve_listeners returned")  # pragma: no cover


class _Server:
    def __init__(self, handler: Handler, limit: trio.Semaphore, max_frame_size: int) -> None:
        self.handler = handler
        self.limit = limit
        self.max_frame_size = max_frame_size

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._run(stream, ServerConnectionCore(self.max_frame_size))
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("SDK server connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _run(self, stream: trio.SocketStream, core: ServerConnectionCore) -> None:
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(stream, nursery)
            await self._read(stream, core, nursery, writer)
            if core.error is not None:
                try:
                    await writer.send(core.data_to_send())  # a refusal and the GOAWAY
                except trio.BrokenResourceError:
                    return
        # the nursery has waited for every running handler to write its response
        if core.error is not None:
            await drain_and_close(stream)

    async def _read(self, stream: trio.SocketStream, core: ServerConnectionCore, nursery: trio.Nursery, writer: FrameWriter) -> None:
        """Read, and start a handler per request, until EOF or a protocol error."""
        while True:
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            core.receive_data(data)
            while (req := core.next_request(trio.current_time())) is not None:
                writer.post(core.data_to_send())  # PONGs before this request
                await self.limit.acquire()  # all busy: stop reading (back-pressure)
                nursery.start_soon(self._handle, req, core, writer)
            if core.error is not None:
                return
            writer.post(core.data_to_send())

    async def run_handler(self, req: Request) -> tuple[int, str, bytes]:
        """Run the handler under the request's deadline: ``(status, error, body)``."""
        if expired(req, trio.current_time()):  # expired while queued (back-pressure): do not start it
            return TIMEOUT_OUTCOME
        with trio.move_on_at(math.inf if req.deadline is None else req.deadline):
            try:
                body = check_body(await self.handler(req))
            except Exception as exc:
                return outcome_of_exception(req, exc)
            if not expired(req, trio.current_time()):
                return 0, "", body
        return TIMEOUT_OUTCOME

    async def _handle(self, req: Request, core: ServerConnectionCore, writer: FrameWriter) -> None:
        try:
            status, error, body = await self.run_handler(req)
            data = core.response(req, status, error, body)
            if data is None:
                return
            try:
                await writer.send(data)
            except trio.BrokenResourceError:
                pass  # the caller is gone; nobody to tell
        finally:
            self.limit.release()


def run_provider(path: str | os.PathLike[str], handler: Handler, **kwargs: Any) -> None:
    """Serve ``handler`` on ``path`` in a new Trio run until Ctrl-C or SIGTERM; then return.

    The one-line provider: ``sdk.run_provider("/run/app/inbound.sock", handler)``.
    On SIGINT or SIGTERM the server stops accepting, running handlers are
    cancelled, and the function returns normally (no traceback).

    Args:
        path: the socket path (a stale socket file there is removed first).
        handler: ``async def handler(request: Request) -> bytes``.
        **kwargs: passed to :func:`serve` (``max_concurrency``, ``mode``, ...).

    Raises:
        OSError: binding failed, or a live server already owns ``path``.
    """

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve, path, handler, **kwargs))
                async for signum in signals:
                    logger.info("%s: stopping the provider on %s", signal.Signals(signum).name, os.fspath(path))
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise
    except KeyboardInterrupt:  # a Ctrl-C before the signal receiver was installed
        pass
