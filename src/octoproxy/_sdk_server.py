"""The provider side of the Mesh SDK: serve a handler on a Unix socket.

Theory of operation: :func:`serve` binds (or adopts) listeners and runs
:func:`trio.serve_listeners`, which backs off on EMFILE/ENFILE and gives every
connection its own task. A connection task is the connection's only reader: it
feeds a :class:`~octoproxy.frame.FrameDecoder` and acts on each frame. A
REQUEST or ONEWAY first takes a token from the server-wide semaphore (when all
``max_concurrency`` tokens are out the reader simply stops reading: the peer
feels back-pressure through the socket), then runs the handler in a task of the
connection's nursery; that task writes the RESPONSE through the connection's
:class:`FrameWriter` and gives the token back. PING is
answered with a posted PONG.

A protocol error from the peer (docs/protocol.md section 8) stops the reading:
we send a GOAWAY whose ``error`` says why (preceded by a PROTOCOL_ERROR
RESPONSE when the bad frame is a request we could identify), let the handlers
already running finish and write their responses, then close that connection
alone. EOF from the peer likewise lets running handlers finish (a ONEWAY sender
may well hang up at once); their responses are dropped.

One writer per stream (shared with the client, which imports it from here):
both ends of an SDK connection write frames from many tasks and read them in
one. :class:`FrameWriter` is the single way to write: a :class:`trio.Lock`
makes writers take turns, and every ``send_all`` runs shielded under its own
deadline, so cancelling a caller never leaves half a frame on the wire and a
peer that stops reading cannot pin us forever. A write that fails (or times out
half-way) leaves the byte stream unusable, so the writer closes it: the
connection's reader then sees :class:`trio.ClosedResourceError` and tears the
connection down in one place. Control frames the reader must answer (PONG) are
*posted*: queued and flushed by one background task, so the reader never waits
for the write lock (it could deadlock against a peer that is itself blocked
writing to us) and a burst of PINGs costs one task and one ``send_all``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from ._errors import OctoproxyError, RemoteProtocolError
from ._protocol import DEFAULT_MAX_FRAME_SIZE, PREFIX_SIZE, FrameType, Status
from ._unix import bind_unix, remove_stale_socket
from .frame import Frame, FrameDecoder, encode_frame, encode_header, encode_response

__all__ = ["ApplicationError", "FrameWriter", "Handler", "RECV_SIZE", "Request", "SEND_TIMEOUT", "drain_and_close", "logger", "serve"]

logger = logging.getLogger("octoproxy.sdk")

#: bytes asked of ``receive_some`` per read
RECV_SIZE = 256 * 1024
#: deadline of one shielded ``send_all``; past it the stream is given up
SEND_TIMEOUT = 30.0
#: how long a closing side keeps reading, waiting for the peer's EOF
_DRAIN_TIMEOUT = 1.0


class FrameWriter:
    """Serialises whole-frame writes to one stream (see the module docstring).

    Attributes:
        broken: set once a write failed; every later write fails at once.
    """

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery, *, timeout: float = SEND_TIMEOUT) -> None:
        self._stream = stream
        self._nursery = nursery
        self._timeout = timeout
        self._lock = trio.Lock()
        self._posted: list[bytes] = []
        self._flushing = False
        self.broken = False

    async def send(self, data: bytes, *, unless: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Write ``data`` (one or more whole frames) atomically.

        Args:
            data: the encoded frames.
            unless: checked once the lock is held; if it returns true nothing is
                written (the connection started draining while we queued).
            timeout: overrides the writer's deadline for this write.

        Returns:
            True if written, False if ``unless`` vetoed the write.

        Raises:
            trio.BrokenResourceError: the write failed or timed out now or
                earlier; the stream has been closed.
        """
        async with self._lock:  # waiting for the lock is cancellable: nothing is written yet
            if self.broken:
                raise trio.BrokenResourceError("an earlier write on this connection failed")
            if unless is not None and unless():
                return False
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(self._timeout if timeout is None else timeout):
                        await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
                    # A partial frame may be on the wire: nothing more can be written.
                    self.broken = True
                    await trio.aclose_forcefully(self._stream)
                    raise trio.BrokenResourceError(f"write failed: {exc!r}") from exc
        return True

    def post(self, data: bytes) -> None:
        """Queue a small control frame; a background task writes the queue."""
        if self.broken:
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


class ApplicationError(OctoproxyError):
    """Raise from a handler to answer APPLICATION_ERROR with ``message``.

    Attributes:
        message: sent to the caller as the response's ``error``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Request:
    """One request as a handler sees it.

    Attributes:
        service: the callee service name.
        method: the method name.
        body: the request payload.
        caller: the caller's service name as stamped by its proxy ("" if none).
        metadata: trace context, routing tags, credentials.
        stream_id: the request's stream id on this connection.
        deadline: when the caller stops waiting, on the Trio clock
            (``trio.current_time()``), or ``None`` if it sent no timeout.
        oneway: True for a ONEWAY request (nobody reads the result).
    """

    service: str
    method: str
    body: bytes
    caller: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stream_id: int = 0
    deadline: float | None = None
    oneway: bool = False


#: ``async def handler(request: Request) -> bytes``
Handler = Callable[[Request], Awaitable[bytes]]


async def _open_unix_listener(path: str, mode: int, backlog: int) -> trio.SocketListener:
    await remove_stale_socket(path)
    return trio.SocketListener(trio.socket.from_stdlib_socket(bind_unix(path, mode, backlog)))


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
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if max_frame_size < PREFIX_SIZE:
        raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")
    if listeners is None:
        if path is None:
            raise ValueError("serve needs a path or listeners")
        listeners = [await _open_unix_listener(os.fspath(path), mode, backlog)]
    elif not listeners:
        raise ValueError("serve needs at least one listener")
    server = _Server(handler, trio.Semaphore(max_concurrency), max_frame_size)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle_connection, listeners)
        task_status.started(listeners)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


class _Server:
    def __init__(self, handler: Handler, limit: trio.Semaphore, max_frame_size: int) -> None:
        self.handler = handler
        self.limit = limit
        self.max_frame_size = max_frame_size

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            await _ServerConnection(self, stream).run()
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("SDK server connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def run_handler(self, req: Request) -> tuple[int, str, bytes]:
        """Run the handler under the request's deadline: ``(status, error, body)``."""
        deadline = math.inf if req.deadline is None else req.deadline
        if trio.current_time() >= deadline:  # expired while queued (back-pressure): do not start it
            return Status.TIMEOUT, "deadline exceeded in the provider", b""
        with trio.move_on_at(deadline):
            try:
                body = await self.handler(req)
                if not isinstance(body, (bytes, bytearray, memoryview)):
                    raise TypeError(f"handler returned {type(body).__name__}, not bytes")
            except ApplicationError as exc:
                return Status.APPLICATION_ERROR, exc.message, b""
            except Exception as exc:
                logger.error(
                    "%s/%s (stream %d): handler raised %s", req.service, req.method, req.stream_id, type(exc).__name__, exc_info=exc
                )
                return Status.APPLICATION_ERROR, f"internal error: {type(exc).__name__}", b""
            if trio.current_time() < deadline:
                return Status.OK, "", bytes(body)
        return Status.TIMEOUT, "deadline exceeded in the provider", b""


class _ServerConnection:
    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.decoder = FrameDecoder(server.max_frame_size)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(self.stream, nursery)
            protocol_error = await self._read(nursery, writer)
            if protocol_error is not None:
                logger.info("SDK server: protocol error from peer, closing connection: %s", protocol_error)
                try:
                    await writer.send(encode_frame(FrameType.GOAWAY, 0, encode_header(error=str(protocol_error))))
                except trio.BrokenResourceError:
                    return
        # the nursery has waited for every running handler to write its response
        if protocol_error is not None:
            await drain_and_close(self.stream)

    async def _read(self, nursery: trio.Nursery, writer: FrameWriter) -> RemoteProtocolError | None:
        """Read and dispatch frames until EOF or a protocol error (returned)."""
        while True:
            try:
                data = await self.stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not data:
                return None
            self.decoder.receive_data(data)
            try:
                while (frame := self.decoder.next_frame()) is not None:
                    await self._dispatch(frame, nursery, writer)
            except RemoteProtocolError as exc:
                return exc

    async def _dispatch(self, frame: Frame, nursery: trio.Nursery, writer: FrameWriter) -> None:
        ftype = frame.type
        if ftype == FrameType.REQUEST or ftype == FrameType.ONEWAY:
            oneway = ftype == FrameType.ONEWAY
            try:
                header = frame.header  # full parse: caller and metadata
            except RemoteProtocolError as exc:
                if not oneway:  # a request we can name: answer it before the GOAWAY
                    try:
                        await writer.send(encode_response(frame.stream_id, status=exc.status, error=str(exc)))
                    except trio.BrokenResourceError:
                        pass
                raise
            deadline = None
            if frame.timeout_ms:
                deadline = trio.current_time() + frame.timeout_ms / 1000
            req = Request(
                service=frame.service,
                method=frame.method,
                body=bytes(frame.body),
                caller=header.caller,
                metadata=dict(header.metadata),
                stream_id=frame.stream_id,
                deadline=deadline,
                oneway=oneway,
            )
            await self.server.limit.acquire()  # all busy: stop reading (back-pressure)
            nursery.start_soon(self._handle, req, writer)
        elif ftype == FrameType.PING:
            writer.post(encode_frame(FrameType.PONG, frame.stream_id))
        elif ftype == FrameType.GOAWAY:
            pass  # "send nothing new": we only ever answer
        else:  # RESPONSE, PONG: we sent no request and no PING
            logger.debug("SDK server: ignoring unexpected %r", frame)

    async def _handle(self, req: Request, writer: FrameWriter) -> None:
        try:
            status, error, body = await self.server.run_handler(req)
            if req.oneway:
                return
            data = encode_response(req.stream_id, body, status=status, error=error)
            if len(data) > self.server.max_frame_size:
                logger.error("%s/%s: response of %d bytes exceeds max_frame_size", req.service, req.method, len(data))
                data = encode_response(
                    req.stream_id,
                    status=Status.FRAME_TOO_LARGE,
                    error=f"response of {len(data)} bytes exceeds the limit of {self.server.max_frame_size} bytes",
                )
            try:
                await writer.send(data)
            except trio.BrokenResourceError:
                pass  # the caller is gone; nobody to tell
        finally:
            self.server.limit.release()
