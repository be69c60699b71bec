"""The blocking, thread-safe front end of the Mesh SDK: a thin shell over the same cores.

Calling. A :class:`Client` may be used from any number of threads at once.
One lock (``Client._lock``) guards the core's state (ids, pending tables,
connections); each connection has a write lock (one whole frame at a time)
and one background reader thread, which feeds what it reads to the
connection's core and releases the locks of the waiters it answers. A call
registers its waiter, writes its REQUEST itself (no hand-off to another thread
on the way out) and blocks on its waiter's lock with the time left as the
timeout. Why a reader thread rather than "whoever waits reads": an idle
connection still notices a GOAWAY, a PING or the proxy closing it at once, and
the measured cost on one thread is one wake-up (docs/sdk.md has the figures).

Control frames the reader must write (PONG, a GOAWAY) never make it wait for
the write lock (a caller may hold it, blocked on a peer that is itself blocked
writing to us): they are queued, and whoever holds or next takes the write
lock flushes the queue.

Serving (a thread pool) is in ``_blocking_server.py``.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, FrameType, Status
from ..frame import encode_frame
from . import _config_core as cfgcore
from . import _subscribe_core as subcore
from ._core import (
    ClientCounters,
    RECV_SIZE,
    CallCore,
    CallError,
    ClientCore,
    ConnectionCore,
    Pending,
    connect_delays,
    is_no_proxy,
    logger,
    no_proxy_error,
)
from ._server_core import Request

__all__ = ["Client", "Handler", "connect", "get_config", "subscribe", "watch_config"]

#: ``def handler(request: Request) -> bytes`` (runs in a worker thread)
Handler = Callable[[Request], bytes]
#: a send that makes no progress for this long gives the connection up
SEND_TIMEOUT = 30.0

_now = time.monotonic


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO: a blocking send gives up after ``seconds`` (recv stays blocking)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


class _Waiter(Pending):
    __slots__ = ("lock",)

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.lock.acquire()  # released once answered


def _wake(waiters: Iterable[_Waiter]) -> None:
    for waiter in waiters:
        waiter.lock.release()


class _Connection(ConnectionCore[_Waiter]):
    """A connection's core plus its socket, write lock and reader thread."""

    __slots__ = ("client", "sock", "write_lock", "posted", "broken", "thread")

    def __init__(self, client: Client, sock: socket.socket) -> None:
        super().__init__(client._core.next_number(), client.path, client.max_frame_size)
        self.client = client
        self.sock = sock
        self.write_lock = threading.Lock()
        self.posted: list[bytes] = []
        self.broken = False
        self.thread = threading.Thread(target=self._read, name=f"octoproxy-sdk-reader-{self.number}", daemon=True)

    @property
    def ready(self) -> bool:
        return self.usable and not self.broken

    def send(self, data: bytes) -> bool:
        """Write one whole frame (and any posted control frames); False if the connection stopped taking work.

        Raises:
            CallError: UNAVAILABLE, the write failed (the connection is given up).
        """
        with self.write_lock:
            if not self.ready:
                return False
            try:
                if self.posted:
                    data = b"".join(self.posted) + data
                    self.posted.clear()
                self.sock.sendall(data)
            except OSError as exc:
                self.broken = True
                self._shutdown()
                raise CallError(Status.UNAVAILABLE, f"connection to {self.path} lost while sending: {exc!r}") from exc
        return True

    def post(self, data: bytes) -> None:
        """Queue control frames; written now if the write lock is free, else by its holder's next send."""
        self.posted.append(data)
        if self.write_lock.acquire(blocking=False):
            try:
                if self.posted and not self.broken:
                    out = b"".join(self.posted)
                    self.posted.clear()
                    self.sock.sendall(out)
            except OSError:
                self.broken = True
                self._shutdown()
            finally:
                self.write_lock.release()

    def _shutdown(self) -> None:
        """Make the reader's ``recv`` return: it then closes the socket (one place)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def maybe_finish(self) -> None:
        """(client lock held) Close a draining connection once nothing is outstanding on it."""
        if self.drained():
            self.lost("closed: drained")
            self._shutdown()

    def _read(self) -> None:
        lock = self.client._lock
        reason = "closed"
        try:
            while True:
                try:
                    data = self.sock.recv(RECV_SIZE)
                except OSError as exc:
                    reason = f"lost: {exc!r}"
                    break
                if not data:
                    reason = "closed by the peer"
                    break
                with lock:
                    woken = self.receive_data(data)
                    out = self.data_to_send()
                    stop = self.protocol_error
                    if stop is not None:
                        woken += self.lost(stop)
                    elif self.drained():
                        self.lost("closed: drained")
                        stop = "drained"
                _wake(woken)
                if out:
                    self.post(out)
                if stop is not None:
                    break
        except Exception:  # a bug must cost one connection, never the client
            logger.exception("%r failed", self)
            reason = "failed (internal error)"
        finally:
            with lock:
                woken = self.lost(reason)
                self.client._core.forget(self)
            _wake(woken)
            with self.write_lock:  # no writer is using the fd when it is closed
                if self.posted and not self.broken:  # e.g. the GOAWAY after a protocol error
                    try:
                        self.sock.sendall(b"".join(self.posted))
                    except OSError:
                        pass
                self.posted.clear()
                self.broken = True
                self.sock.close()


class Client(ClientCounters):
    """A thread-safe connection (or, across a hot restart, a few) to the local octoproxy.

    Get one from :func:`octoproxy.sdk.sync.connect` (a context manager too).
    Call it from as many threads as you like: calls are multiplexed on one
    connection. Same behaviour and errors as the Trio client; a closed client
    raises :class:`~octoproxy.sdk.ClientClosedError`.

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
        self._lock = threading.Lock()
        self._dial_lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection; pending and later calls raise :class:`~octoproxy.sdk.ClientClosedError`."""
        with self._lock:
            conns = self._core.close()
            woken = [w for conn in conns for w in conn.close()]
        _wake(woken)
        for conn in conns:
            conn._shutdown()

    def call(
        self,
        service: str,
        method: str,
        body: bytes = b"",
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        """Call ``service``/``method`` and return the response body (blocks this thread).

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
        core = self._core
        call = CallCore(service, method, body, metadata, timeout, _now())
        while True:
            sid = core.next_id()
            data = core.encode(call, sid, _now())
            conn = self._get_connection(call)
            waiter = _Waiter()
            with self._lock:
                conn.pending[sid] = waiter
            try:
                sent = conn.send(data)
            except BaseException:
                with self._lock:
                    conn.pending.pop(sid, None)
                raise
            if not sent:  # the connection stopped taking new work before we wrote: move the call
                with self._lock:
                    conn.pending.pop(sid, None)
                    core.not_sent(call)
                continue
            remaining = call.remaining(_now())
            if not waiter.lock.acquire(timeout=max(remaining, 0) if remaining != float("inf") else -1):
                with self._lock:
                    unanswered = conn.pending.pop(sid, None) is not None
                    if unanswered:
                        conn.maybe_finish()
                if unanswered:
                    raise core.timeout_error(call)
            with self._lock:
                result = core.outcome(call, waiter)
            if result is not None:
                return result

    def oneway(self, service: str, method: str, body: bytes = b"", *, metadata: dict[str, str] | None = None) -> None:
        """Send a ONEWAY request: no response, no delivery guarantee.

        Raises:
            CallError: UNAVAILABLE if it could not be written; FRAME_TOO_LARGE.
            ClientClosedError: the client is closed.
        """
        call = CallCore(service, method, body, metadata, None, _now(), oneway=True)
        data = self._core.encode(call, self._core.next_id(), _now())
        while not self._get_connection(call).send(data):
            with self._lock:
                self._core.not_sent(call)

    def ping(self, *, timeout: float = 5.0) -> float:
        """Send a PING to the proxy and wait for its PONG; return the round-trip time in seconds.

        Raises:
            CallError: TIMEOUT if no PONG came in time; UNAVAILABLE if the
                proxy cannot be reached or the connection is lost.
            ClientClosedError: the client is (or gets) closed.
        """
        call = CallCore("", "PING", b"", None, timeout, _now())
        while True:
            conn = self._get_connection(call)
            token = self._core.next_id()
            waiter = _Waiter()
            with self._lock:
                conn.pings[token] = waiter
            start = _now()
            if conn.send(encode_frame(FrameType.PING, token)):
                if waiter.lock.acquire(timeout=max(call.remaining(_now()), 0)):
                    with self._lock:
                        self._core.ping_outcome(waiter)
                    return _now() - start
            with self._lock:
                unanswered = conn.pings.pop(token, None) is not None
                if unanswered:
                    conn.maybe_finish()
                if call.remaining(_now()) <= 0:
                    raise CallError(Status.TIMEOUT, f"no PONG within {timeout} s")
                self._core.not_sent(call)

    def _get_connection(self, call: CallCore) -> _Connection:
        """The current connection; dials a new one (one attempt) if there is none."""
        core = self._core
        with self._lock:
            conn = core.usable_connection()
            if conn is not None and conn.ready:
                return conn
            attempts = core.dial_attempts
        with self._dial_lock:
            with self._lock:
                conn = core.usable_connection()
                if conn is not None and conn.ready:  # another thread connected while we waited
                    return conn
                shared = core.shared_dial_failure(attempts)
            if shared is not None:
                raise shared  # it failed for us too
            try:
                sock = self._dial(min(self.connect_timeout, max(call.remaining(_now()), 0.001)))
            except OSError as exc:
                with self._lock:
                    error = core.dial_failed(exc)
                raise error from exc
            return self._adopt(sock)

    def _dial(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except socket.timeout:
                raise self._core.connect_timeout_error(timeout) from None
            sock.settimeout(None)
            _set_send_timeout(sock, SEND_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _adopt(self, sock: socket.socket) -> _Connection:
        conn = _Connection(self, sock)
        with self._lock:
            closed = self._core.closed
            if not closed:
                self._core.adopt(conn)
        if closed:
            sock.close()
            self._core.check_open()
        conn.thread.start()
        return conn

    def _connect_first(self, wait: float) -> None:
        delays = iter(connect_delays(wait))
        while True:
            try:
                sock = self._dial(self.connect_timeout)
            except OSError as exc:
                if not is_no_proxy(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise no_proxy_error(self.path, exc) from None
                time.sleep(delay)
                continue
            self._adopt(sock)
            return


def connect(
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
    wait: float = 0.0,
) -> Client:
    """Connect to the proxy at ``path``: ``with connect(path) as client: client.call(...)``.

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
    client._connect_first(wait)
    return client


# ---------------------------------------------------------------- discovery


def _post(admin: str, request: bytes, timeout: float) -> tuple[int, bytes]:
    target = subcore.parse_admin_address(admin)
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(target, timeout=timeout)
    with sock:
        end = _now() + timeout
        sock.sendall(request)
        reply = subcore.HttpReply()
        while not reply.complete:
            sock.settimeout(max(end - _now(), 0.001))
            reply.receive_data(sock.recv(65536))
        return reply.status, reply.body


def subscribe(admin: str, services: Iterable[str], *, timeout: float = 5.0, retry_for: float = 30.0) -> dict[str, int]:
    """Subscribe the local proxy to ``services`` (as :func:`octoproxy.sdk.subscribe`; blocks).

    Raises:
        CallError: UNAVAILABLE if the proxy never answered within
            ``retry_for``, TIMEOUT if it did not get the endpoints in time,
            NO_ROUTE if it has no discovery configured.
    """
    names, body = subcore.subscribe_body(services, timeout)
    request = subcore.subscribe_request(admin, body)
    give_up = _now() + retry_for
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    while _now() < give_up:
        try:
            status, reply = _post(admin, request, min(timeout + 2.0, max(give_up - _now(), 0.001)))
        except (OSError, ValueError) as exc:
            last = exc  # the proxy is not up (yet): back off and retry
            logger.info("subscribe: proxy at %s not answering (%r); retrying in %.2fs", admin, exc, delay)
            time.sleep(min(delay, max(give_up - _now(), 0)))
            delay = subcore.next_delay(delay)
            continue
        return subcore.subscribe_result(names, timeout, status, reply)
    raise subcore.never_answered(names, admin, retry_for, last)


# ---------------------------------------------------------------- configuration for apps


def _config_once(admin: str, watch: str | None, poll: float, timeout: float, retry_for: float) -> cfgcore.AppConfig:
    request = cfgcore.config_request(admin, cfgcore.config_path(watch, poll))
    give_up = _now() + retry_for
    delay = subcore.FIRST_DELAY
    last: BaseException | None = None
    while _now() < give_up:
        try:
            status, reply = _post(admin, request, timeout + (poll if watch is not None else 0))
        except (OSError, ValueError) as exc:
            status, reply, last = 0, b"", exc  # the proxy is not up (yet, or it restarts)
        if status not in (0, 429):
            return cfgcore.config_result(status, reply)
        logger.info("config: proxy at %s not answering (%r); retrying in %.2fs", admin, last or "429", delay)
        time.sleep(min(delay, max(give_up - _now(), 0)))
        delay = subcore.next_delay(delay)
    raise CallError(Status.UNAVAILABLE, f"GET /config: no proxy answered at {admin} within {retry_for}s ({last})")


def get_config(admin: str, *, timeout: float = 5.0, retry_for: float = 30.0) -> cfgcore.AppConfig:
    """The app's configuration as its proxy holds it (as :func:`octoproxy.sdk.get_config`; blocks)."""
    return _config_once(admin, None, 0.0, timeout, retry_for)


def watch_config(
    admin: str, *, since: str | None = None, poll: float = cfgcore.POLL, retry_for: float = 30.0
) -> Iterator[cfgcore.AppConfig]:
    """A generator: the configuration now (unless ``since``), then at every change (blocks between).

    ``for config in watch_config(admin): ...`` in a thread of its own.
    """
    if since is None:
        current = get_config(admin, retry_for=retry_for)
        yield current
        since = current.version
    while True:
        current = _config_once(admin, since, poll, 5.0, retry_for)
        if current.version != since:
            since = current.version
            yield current
