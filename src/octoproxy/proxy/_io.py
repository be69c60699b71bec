"""Trio shell around one connection: raw non-blocking socket, reader and writer.

Why raw sockets and not ``trio.SocketStream``: ``receive_some`` allocates a
new ``bytes`` per read and ``send_all`` yields to the scheduler on every call;
on this data path that doubled the CPU per call (see docs/benchmarks.md and
the measurements in PERFORMANCE.md). Here a reader waits until the socket is
readable, ``recv_into`` a reusable buffer, hands the bytes to the engine, and
writes every output buffer the engine touched with a plain non-blocking
``send``. Only a partial send wakes the link's writer task, which waits until
the socket is writable; until then nothing else is sent on that link, so
frames never reorder.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from .._errors import RemoteProtocolError
from ._engine import DOWNSTREAM, Engine, Link

log = logging.getLogger("octoproxy.proxy")

__all__ = ["Conn", "Flusher"]

_INITIAL_BUFFER = 64 * 1024


class Conn:
    """A socket, the engine's :class:`Link` for it, and its read/write state."""

    __slots__ = ("sock", "link", "engine", "flusher", "scanner", "buf", "blocked", "wake", "drained", "max_buffer", "closed_event", "on_close", "_closing", "linger", "tls")

    def __init__(self, sock: socket.socket, link: Link, flusher: Flusher, *, max_buffer: int, on_close: Callable[[Conn], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.link = link
        link.io = self
        self.flusher = flusher
        self.engine = engine = flusher.engine
        self.scanner = engine.new_scanner(link)
        self.buf = bytearray(_INITIAL_BUFFER)
        #: a partial send happened: the writer task owns the output until it drains
        self.blocked = False
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.drained.set()
        self.max_buffer = max_buffer
        self.closed_event = trio.Event()
        self.on_close = on_close
        self._closing = False
        #: after a protocol error: how long to wait for responses still owed
        self.linger = 30.0
        #: an mTLS link (proxy/_tlssock.py's TLSConnection, duck-typed as a
        #: socket): it may hold decrypted bytes, so ask pending() before waiting
        self.tls = hasattr(sock, "pending")

    # ------------------------------------------------------------ writing

    def try_send(self) -> None:
        """Write as much of ``link.out`` as the socket takes now, without waiting."""
        out = self.link.out
        if not out or self._closing:
            return
        if self.blocked:
            # the writer task waits for the socket; meanwhile the queue must
            # not grow without bound behind a client that does not read
            if len(out) > self.max_buffer and self.link.kind == DOWNSTREAM:
                self._cut_off(len(out))
            return
        try:
            n = self.sock.send(out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.lost(f"send failed: {exc.strerror or exc}")
            return
        if n == len(out):
            out.clear()
            return
        del out[:n]
        if len(out) > self.max_buffer and self.link.kind == DOWNSTREAM:
            self._cut_off(len(out))
            return
        self.blocked = True
        self.drained = trio.Event()
        self.wake.set()

    def _cut_off(self, queued: int) -> None:
        """A client that does not read its responses: cut it off, alone."""
        self.engine.stats.error("slow_client_cut_off")
        log.warning("%s is not reading (%d bytes queued > %d): closing it", self.link.name, queued, self.max_buffer)
        self.lost("slow client cut off")

    async def writer(self) -> None:
        """Drain the output buffer whenever a non-blocking send was partial."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            out = self.link.out
            while out and not self._closing:
                try:
                    await trio.lowlevel.wait_writable(self.sock)
                except trio.ClosedResourceError:
                    return
                try:
                    n = self.sock.send(out)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.lost(f"send failed: {exc.strerror or exc}")
                    return
                del out[:n]
                if len(out) > self.max_buffer and self.link.kind == DOWNSTREAM:
                    self._cut_off(len(out))
                    return
            self.blocked = False
            self.drained.set()
            if self._closing:
                return

    # ------------------------------------------------------------ reading

    async def reader(self) -> None:
        """Read, feed the engine, flush what it produced; until EOF or error."""
        engine = self.engine
        link = self.link
        sock = self.sock
        fill = 0
        max_frame = engine.max_frame_size
        while not self._closing:
            buf = self.buf
            if fill == len(buf):
                # a frame larger than the buffer: grow towards its size
                want = max(len(buf) * 2, self.scanner.next_size)
                if want > max_frame + len(buf):
                    want = max_frame + 16
                buf.extend(bytes(want - len(buf)))
            if not (self.tls and sock.pending()):  # type: ignore[attr-defined]
                # TLS may hold decrypted bytes the kernel no longer signals
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return  # closed by lost(), from another task
            try:
                n = sock.recv_into(memoryview(buf)[fill:])
            except BlockingIOError:
                continue
            except OSError as exc:
                self.lost(f"receive failed: {exc.strerror or exc}")
                return
            if n == 0:
                self.lost("closed by peer")
                return
            fill += n
            link.last_rx = now = trio.current_time()
            try:
                consumed = engine.feed(link, self.scanner, buf, fill, now)
            except RemoteProtocolError as exc:
                engine.protocol_error(link, exc)
                self.flusher.flush()
                # stop reading; still deliver what we owe for the requests
                # received before the bad frame, then close
                link.draining = True
                with trio.move_on_after(self.linger):
                    while link.inflight and not self._closing:
                        await trio.sleep(0.01)
                await self.close_after_flush(f"protocol error: {exc}")
                return
            self.flusher.flush()
            if consumed:
                rest = fill - consumed
                if rest:
                    buf[:rest] = buf[consumed:fill]
                fill = rest
                if len(buf) > _INITIAL_BUFFER and fill <= _INITIAL_BUFFER:
                    del buf[_INITIAL_BUFFER:]  # give back what one big frame took
            if link.kind == DOWNSTREAM:
                # back-pressure: do not read more requests than upstreams take
                await self.flusher.wait_upstreams()

    # ------------------------------------------------------------ closing

    def lost(self, reason: str) -> None:
        """The connection is gone (or must go now): tell the engine, close the socket."""
        if self._closing:
            return
        self._closing = True
        self.engine.link_lost(self.link, reason)
        self.flusher.flush()
        self.flusher.blocked_upstreams.discard(self)
        self.wake.set()
        self.drained.set()
        try:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        self.closed_event.set()
        if self.on_close is not None:
            self.on_close(self)

    async def close_after_flush(self, reason: str, timeout: float = 1.0) -> None:
        """Send what is queued, then close gracefully (bounded in time).

        After the last byte, shut down our sending side and read (and drop)
        what the peer still sends until it closes: closing a socket with
        unread input resets the connection, and a reset can destroy responses
        the peer has not read yet.
        """
        with trio.move_on_after(timeout):
            while self.link.out and not self._closing:
                if not self.blocked:
                    self.try_send()
                    if not self.link.out:
                        break
                await self.drained.wait()
            if not self._closing:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                    while True:
                        await trio.lowlevel.wait_readable(self.sock)
                        try:
                            if not self.sock.recv(65536):
                                break
                        except BlockingIOError:
                            continue
                except (OSError, trio.ClosedResourceError):
                    pass
        self.lost(reason)


class Flusher:
    """Writes the links an engine touched; tracks upstreams that fell behind."""

    def __init__(self, engine: Engine, high_water: int = 4 * 1024 * 1024) -> None:
        self.engine = engine
        self.high_water = high_water
        self.blocked_upstreams: set[Conn] = set()

    def flush(self) -> None:
        """Write every link the engine touched since the last flush."""
        engine = self.engine
        if not engine.dirty:
            return
        for link in engine.take_dirty():
            conn = link.io
            if conn is not None and not link.closed:
                conn.try_send()
                if conn.blocked and link.kind != DOWNSTREAM:
                    self.blocked_upstreams.add(conn)

    async def wait_upstreams(self) -> None:
        """Pause a downstream reader while an upstream link has too much queued."""
        if not self.blocked_upstreams:
            return
        for conn in list(self.blocked_upstreams):
            if not conn.blocked or conn.link.closed:
                self.blocked_upstreams.discard(conn)
            elif len(conn.link.out) > self.high_water:
                await conn.drained.wait()


def is_transient_accept_error(exc: OSError) -> bool:
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def connect_raw(address: str, timeout: float) -> socket.socket:
    """Open a non-blocking stream socket to ``host:port`` or ``unix:/path``.

    Raises:
        OSError: the connection failed.
        trio.TooSlowError: not connected within ``timeout``.
    """
    if address.startswith("unix:"):
        family, target = socket.AF_UNIX, address[5:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockaddr: object = target
    else:
        from .._config import split_host_port

        host, port = split_host_port(address)
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _t, _p, _c, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with trio.fail_after(timeout):
            err = sock.connect_ex(sockaddr)  # type: ignore[arg-type]
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {address}: {errno.errorcode.get(err, err)}")
    except BaseException:
        sock.close()
        raise
    return sock
