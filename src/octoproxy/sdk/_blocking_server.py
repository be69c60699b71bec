"""The thread-pool provider of the Mesh SDK over ``_server_core``.

:func:`start_server` binds, and :meth:`Server.serve_forever` accepts in the
calling thread; each connection gets a reader thread that pulls requests from
a :class:`~._server_core.ServerConnectionCore` and submits each to a thread
pool of ``workers`` threads. A server-wide semaphore of ``max_concurrency``
tokens is taken before submitting (when it runs out the readers stop reading:
back-pressure). A handler thread cannot be cancelled: a request whose deadline
passes while its handler runs is answered TIMEOUT when the handler returns
(the caller has given up by then anyway). A connection's socket is closed only
once none of its handlers can still write to it (a closed fd may be reused by
another connection).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, Status
from ._blocking import SEND_TIMEOUT, Handler, _now, _set_send_timeout
from ._core import RECV_SIZE, logger
from ._server_core import TIMEOUT_OUTCOME, Request, ServerConnectionCore, check_body, check_server_args, expired, outcome_of_exception
from ._sockets import bind_replacing_stale

__all__ = ["Server", "run_provider", "serve", "start_server"]

#: how long a closing server connection keeps reading, waiting for the peer's EOF
_DRAIN_TIMEOUT = 1.0

class _ServerConnection:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.core = ServerConnectionCore(server.max_frame_size)
        self.write_lock = threading.Lock()
        self.inflight = 0
        self.idle = threading.Condition()

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self.write_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the caller is gone; the reader sees it too

    def run(self) -> None:
        server = self.server
        core = self.core
        try:
            while not server.closed:
                try:
                    data = self.sock.recv(RECV_SIZE)
                except OSError:
                    break
                if not data:
                    break
                core.receive_data(data)
                while (req := core.next_request(_now())) is not None:
                    self.write(core.data_to_send())
                    server.slots.acquire()  # all busy: stop reading (back-pressure)
                    with self.idle:
                        self.inflight += 1
                    try:
                        server.pool.submit(self._handle, req)
                    except RuntimeError:  # the pool was shut down: the server is closing
                        self._done()
                        server.slots.release()
                        return
                out = core.data_to_send()
                if core.error is not None:
                    self.write(out)  # a refusal and the GOAWAY, at once: the peer stops sending
                    self._wait_idle()  # running handlers still write the responses we owe
                    self._drain()
                    break
                self.write(out)
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("SDK server connection failed")
        finally:
            self._wait_idle()  # no handler may write to a closed (and reused) fd
            server.connections.discard(self)
            self.sock.close()

    def _drain(self) -> None:
        """Send EOF and read what the peer still sends (briefly), so closing does not reset our GOAWAY away."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(_DRAIN_TIMEOUT)
            end = _now() + _DRAIN_TIMEOUT
            while _now() < end and self.sock.recv(RECV_SIZE):
                pass
        except OSError:
            pass

    def _wait_idle(self) -> None:
        with self.idle:
            while self.inflight:
                self.idle.wait()

    def _done(self) -> None:
        with self.idle:
            self.inflight -= 1
            if not self.inflight:
                self.idle.notify_all()

    def _handle(self, req: Request) -> None:
        try:
            outcome = self.server.run_handler(req)
            data = self.core.response(req, *outcome)
            if data is not None:
                self.write(data)
        finally:
            self.server.slots.release()
            self._done()


class Server:
    """A provider for threads (from :func:`start_server`): handlers run in a pool of ``workers`` threads.

    Run it with :meth:`serve_forever` (in any thread); stop it with :meth:`close`.

    Attributes:
        path: the socket path it listens on.
        workers: handler threads.
    """

    def __init__(self, handler: Handler, path: str, sock: socket.socket, workers: int, max_concurrency: int, max_frame_size: int) -> None:
        self.handler = handler
        self.path = path
        self.workers = workers
        self.max_frame_size = max_frame_size
        self.slots = threading.Semaphore(max_concurrency)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="octoproxy-sdk-handler")
        self.connections: set[_ServerConnection] = set()
        self.closed = False
        self._sock = sock

    def run_handler(self, req: Request) -> tuple[int, str, bytes]:
        """Run the handler (in this worker thread): ``(status, error, body)``."""
        if expired(req, _now()):  # expired while queued: do not start it
            return TIMEOUT_OUTCOME
        try:
            body = check_body(self.handler(req))
        except Exception as exc:
            return outcome_of_exception(req, exc)
        if expired(req, _now()):
            return TIMEOUT_OUTCOME
        return Status.OK, "", body

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close`; each gets a reader thread."""
        while not self.closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)  # EMFILE and friends: back off
                continue
            _set_send_timeout(sock, SEND_TIMEOUT)
            conn = _ServerConnection(self, sock)
            self.connections.add(conn)
            threading.Thread(target=conn.run, name="octoproxy-sdk-server-conn", daemon=True).start()

    def close(self) -> None:
        """Stop accepting and reading; running handlers finish, queued ones are dropped."""
        if self.closed:
            return
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._sock.close()
        for conn in list(self.connections):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def start_server(
    path: str | os.PathLike[str],
    handler: Handler,
    *,
    workers: int = 8,
    max_concurrency: int | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    mode: int = 0o660,
    backlog: int = 128,
) -> Server:
    """Bind ``path`` for a thread-pool provider; run it with :meth:`Server.serve_forever`.

    Args:
        path: the socket path; a stale socket file there is removed first.
        handler: ``def handler(request: Request) -> bytes``, run in a worker thread.
        workers: handler threads.
        max_concurrency: requests accepted at once (running or queued for a
            worker); when all are taken the server stops reading
            (back-pressure). Default: ``4 * workers``.
        max_frame_size: the largest frame accepted (and sent).
        mode: permission bits of the socket file.
        backlog: listen backlog.

    Raises:
        ValueError: ``workers`` or ``max_concurrency`` < 1.
        OSError: binding failed, or a live server already owns ``path``.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    limit = 4 * workers if max_concurrency is None else max_concurrency
    check_server_args(limit, max_frame_size)
    p = os.fspath(path)
    return Server(handler, p, bind_replacing_stale(p, mode, backlog), workers, limit, max_frame_size)


def serve(path: str | os.PathLike[str], handler: Handler, *, workers: int = 8, **kwargs: Any) -> None:
    """Serve ``handler`` on ``path`` with ``workers`` threads until Ctrl-C; then return cleanly.

    Args:
        path: the socket path; a stale socket file there is removed first.
        handler: ``def handler(request: Request) -> bytes``.
        workers: handler threads.
        **kwargs: as :func:`start_server`.
    """
    server = start_server(path, handler, workers=workers, **kwargs)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Ctrl-C: stopping the provider on %s", server.path)
    finally:
        server.close()


#: the same as :func:`serve` (which already returns on Ctrl-C), named as in the other front ends
run_provider = serve
