"""Trio shell around one connection: raw non-blocking socket, reader and writer.

Why raw sockets and not ``trio.SocketStream``: ``receive_some`` allocates a
new ``bytes`` per read and ``send_all`` yields to the scheduler on every call;
on this data path that doubled the CPU per call (see docs/benchmarks.md and
the measurements in PERFORMANCE.md). Here a reader waits until the socket is
readable, ``recv_into`` a buffer, hands the bytes to the engine, and writes
every output buffer the engine touched with a plain non-blocking ``send``.
Only a partial send wakes the link's writer task, which waits until the
socket is writable; until then nothing else is sent on that link, so frames
never reorder.

Memory (docs/architecture.md, "Back-pressure and memory"): a read goes into
one receive buffer shared by every connection (a read is scanned and relayed
in one synchronous step, so nothing else uses it meanwhile). A connection
keeps only the tail of an incomplete frame: as ``bytes`` when small, in a
buffer of exactly the frame's size when large, admitted against the
proxy-wide :class:`Budget` above ``connection_buffer_limit``. A frame that
the budget cannot take is answered OVERLOADED and skipped as it arrives. An
idle connection holds no buffer at all.

Back-pressure is per destination: the engine gives no new request to an
upstream link above its high watermark (another link of the cluster takes
it, or the caller gets OVERLOADED with the reason), so a stalled destination
never stops a reader, and calls to other destinations on the same connection
go on. A downstream connection that does not read its own responses is not
read until it has taken half of them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from ..protocol._errors import RemoteProtocolError
from ..protocol._protocol import PREFIX_SIZE
from ..core._engine import DOWNSTREAM, Engine, Link

log = logging.getLogger("octoproxy.proxy")

__all__ = ["Budget", "Conn", "Flusher", "trim_memory", "tune_malloc"]

#: the receive buffer shared by every connection of a proxy
SHARED_RECEIVE_BUFFER = 256 * 1024
#: an incomplete frame up to this size is carried between reads as bytes
#: (copied in front of the next read) while its received part is at most
#: CARRY_LIMIT; otherwise it gets a buffer of its own, of exactly its size, so
#: that a peer trickling a frame byte by byte never costs more than
#: CARRY_LIMIT of copying per read
SMALL_FRAME = 64 * 1024
CARRY_LIMIT = 4096
_EMPTY = b""
_NOTHING: list[Link] = []
_DONE = trio.Event()
_DONE.set()


class Budget:
    """Proxy-wide accounting of the memory that peers can make the proxy hold.

    Args:
        total: bytes for incoming frames above ``per_connection`` and for
            output queued beyond a downstream connection's ``max_buffer``.
        per_connection: bytes of one incoming frame a connection may buffer
            without drawing on ``total``.
        frame_timeout: a started frame must be complete, and an over-full
            output queue must move, within this many seconds.
        high_water: ``max_buffer`` of upstream connections (the engine's
            ``high_watermark`` decides when one takes no new request).
    """

    __slots__ = ("total", "used", "per_connection", "frame_timeout", "high_water", "closes")

    def __init__(
        self, total: int = 32 << 20, per_connection: int = 1 << 20, frame_timeout: float = 30.0, high_water: int = 4 << 20
    ) -> None:
        self.total = total
        self.used = 0
        self.per_connection = per_connection
        self.frame_timeout = frame_timeout
        self.high_water = high_water
        #: connections closed since the last :func:`trim_memory`
        self.closes = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (and nothing reserved) if they do not fit."""
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Conn:
    """A socket, the engine's :class:`Link` for it, and its read/write state."""

    __slots__ = (
        "sock", "link", "engine", "flusher", "scanner", "rest", "big", "big_fill", "big_charge", "skip", "started",
        "blocked", "spawn", "writing", "wake", "drained", "max_buffer", "out_charge", "low_event", "on_close",
        "_closing", "linger", "last_active", "tls", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        link: Link,
        flusher: Flusher,
        *,
        max_buffer: int,
        on_close: Callable[[Conn], None] | None = None,
        spawn: Callable[..., object] | None = None,
    ) -> None:
        """``spawn`` (a nursery's ``start_soon``) starts a writer task on each
        partial send, so an idle connection has no writer task; without it,
        run :meth:`writer` alongside :meth:`reader`."""
        sock.setblocking(False)
        self.sock = sock
        self.link = link
        link.io = self  # a cycle until lost() breaks it (then refcounting frees both)
        self.flusher = flusher
        self.engine = engine = flusher.engine
        self.scanner = engine.new_scanner(link)
        #: the start of an incomplete small frame, carried to the next read
        self.rest = _EMPTY
        #: a large incomplete frame: its own buffer, bytes in it, bytes charged to the budget
        self.big: bytearray | None = None
        self.big_fill = 0
        self.big_charge = 0
        #: bytes still to discard of a frame refused for lack of memory
        self.skip = 0
        #: when the incomplete frame began (0.0: none); see Budget.frame_timeout
        self.started = 0.0
        #: a partial send happened: the writer task owns the output until it drains
        self.blocked = False
        self.spawn = spawn
        self.writing = False
        self.wake: trio.Event | None = None if spawn is not None else trio.Event()
        #: set once the output is drained (shared, already set, while nothing waits)
        self.drained = _DONE
        #: output bytes above which this link counts as full (downstream: the
        #: reader is paused and the excess is charged to the budget)
        self.max_buffer = max_buffer
        self.out_charge = 0
        #: set when the output falls to half of ``max_buffer`` (made on demand)
        self.low_event: trio.Event | None = None
        self.on_close = on_close
        self._closing = False
        #: after a protocol error: how long to wait for responses still owed
        self.linger = 30.0
        #: last time a read left requests in flight (idle timeout, shedding)
        self.last_active = trio.current_time()
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
            # the writer task waits for the socket; meanwhile the queue of a
            # client that does not read grows only within the budget
            if len(out) > self.max_buffer and self.link.kind == DOWNSTREAM:
                self._charge()
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
        if len(out) > self.max_buffer and self.link.kind == DOWNSTREAM and not self._charge():
            return
        self.blocked = True
        self.link.last_tx = trio.current_time()  # a backlog starts: it must move from now on
        self.drained = trio.Event()
        if self.spawn is not None:
            if not self.writing:
                self.writing = True
                self.spawn(self._write_out)
        elif self.wake is not None:
            self.wake.set()

    def _charge(self) -> bool:
        """Charge the output above ``max_buffer`` to the budget; cut the connection off if it does not fit."""
        budget = self.flusher.budget
        excess = max(0, len(self.link.out) - self.max_buffer)
        delta = excess - self.out_charge
        if delta > 0 and not budget.take(delta):
            self._cut_off(f"{len(self.link.out)} bytes queued, over max_buffer and the proxy's memory budget is used up")
            return False
        if delta < 0:
            budget.give(-delta)
        self.out_charge = excess
        return True

    def _cut_off(self, why: str) -> None:
        """A peer that does not read what we owe it: cut it off, alone."""
        self.engine.stats.error("slow_client_cut_off" if self.link.kind == DOWNSTREAM else "slow_upstream_cut_off")
        log.warning("%s is not reading (%s): closing it", self.link.name, why)
        self.lost("not reading: " + why)

    async def writer(self) -> None:
        """Without ``spawn``: drain the output buffer whenever a non-blocking send was partial."""
        assert self.wake is not None
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if await self._drain_out():
                return

    async def _write_out(self) -> None:
        """With ``spawn``: one writer task per partial send, until the output is drained."""
        try:
            await self._drain_out()
        finally:
            self.writing = False

    async def _drain_out(self) -> bool:
        """Send the queue as the socket takes it; True when the connection is closing."""
        timeout = self.flusher.budget.frame_timeout
        out = self.link.out
        while out and not self._closing:
            try:
                # the peer must take some of what is queued in time
                with trio.move_on_after(timeout) as scope:
                    await trio.lowlevel.wait_writable(self.sock)
            except trio.ClosedResourceError:
                return True
            if scope.cancelled_caught:
                self._cut_off(f"took none of {len(out)} queued bytes in {timeout:g}s")
                return True
            try:
                n = self.sock.send(out)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.lost(f"send failed: {exc.strerror or exc}")
                return True
            del out[:n]
            if n:
                self.link.last_tx = trio.current_time()
            if self.out_charge:
                self._charge()
            if self.low_event is not None and len(out) <= self.max_buffer // 2:
                self.low_event.set()
                self.low_event = None
        self.blocked = False
        self.drained.set()
        return self._closing

    @property
    def closed(self) -> bool:
        return self._closing

    async def wait_low(self) -> None:
        """Wait until the output is down to half of ``max_buffer`` (or the connection is gone)."""
        while len(self.link.out) > self.max_buffer // 2 and not self._closing:
            ev = self.low_event
            if ev is None:
                ev = self.low_event = trio.Event()
            await ev.wait()

    # ------------------------------------------------------------ reading

    async def reader(self) -> None:
        """Read, feed the engine, flush what it produced; until EOF or error."""
        engine = self.engine
        link = self.link
        sock = self.sock
        flusher = self.flusher
        budget = flusher.budget
        rx = flusher.rx
        rx_view = flusher.rx_view
        downstream = link.kind == DOWNSTREAM
        while not self._closing:
            if not (self.tls and sock.pending()):  # type: ignore[attr-defined]
                # (TLS may hold decrypted bytes the kernel no longer signals)
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return  # closed by lost(), from another task
            big = self.big
            try:
                if big is not None:
                    with memoryview(big) as mv:
                        n = sock.recv_into(mv[self.big_fill :])
                elif self.skip:
                    n = sock.recv_into(rx, min(self.skip, SHARED_RECEIVE_BUFFER))
                else:
                    k = len(self.rest)
                    if k:
                        rx[:k] = self.rest
                        n = sock.recv_into(rx_view[k:])
                    else:
                        n = sock.recv_into(rx)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.lost(f"receive failed: {exc.strerror or exc}")
                return
            if n == 0:
                self.lost("closed by peer")
                return
            link.last_rx = now = trio.current_time()
            if big is not None:
                self.big_fill += n
                if self.big_fill < len(big):
                    continue
                buf, fill = big, len(big)
            elif self.skip:
                self.skip -= n
                if not self.skip:
                    self.started = 0.0
                continue
            else:
                buf, fill = rx, k + n
            try:
                consumed = engine.feed(link, self.scanner, buf, fill, now)
            except RemoteProtocolError as exc:
                engine.protocol_error(link, exc)
                flusher.flush()
                # stop reading; still deliver what we owe for the requests
                # received before the bad frame, then close
                link.draining = True
                with trio.move_on_after(self.linger):
                    while link.inflight and not self._closing:
                        await trio.sleep(0.01)
                await self.close_after_flush(f"protocol error: {exc}")
                return
            if big is not None:
                # the big frame is relayed (copied to its destination's queue):
                # release it and its charge before the flush, so the frame is
                # held once and a queue charge taken by the flush finds room
                del buf
                big = None
                self._release_big()
                flusher.flush()
            else:
                flusher.flush()
                if consumed == fill:
                    if self.rest:
                        self.rest = _EMPTY
                    self.started = 0.0
                else:
                    self._keep_rest(buf, consumed, fill, now)
            if link.inflight:
                self.last_active = now
            if downstream and len(link.out) > self.max_buffer:
                # a client that does not read its responses: read no more
                # requests from it until it has taken half of them
                await self.wait_low()

    def _release_big(self) -> None:
        """The big frame is relayed: free its buffer and return its charge at once."""
        self.big = None
        budget = self.flusher.budget
        budget.give(self.big_charge)
        budget.closes += 1  # worth a trim_memory() too
        self.big_charge = 0
        self.started = 0.0
        self.scanner.scan(_EMPTY)  # drop the scanner's reference to it

    def _keep_rest(self, buf: bytearray, consumed: int, fill: int, now: float) -> None:
        """Keep the incomplete frame at ``buf[consumed:fill]`` for the next reads."""
        if consumed or not self.started:
            self.started = now  # a new frame began
        rest = fill - consumed
        size = self.scanner.next_size
        if rest < PREFIX_SIZE or not size or (size <= SMALL_FRAME and rest <= CARRY_LIMIT):
            self.rest = bytes(buf[consumed:fill])
            return
        self.rest = _EMPTY
        budget = self.flusher.budget
        charge = size if size > budget.per_connection else 0
        if charge and not budget.take(charge):
            why = f"frame of {size} bytes does not fit in the proxy's memory budget now ({budget.used} of {budget.total} bytes in use)"
            log.warning("%s: %s: answered OVERLOADED and skipped", self.link.name, why)
            self.engine.refuse_partial(self.link, bytes(buf[consumed:fill]), why)
            self.flusher.flush()
            self.skip = size - rest
            return
        big = bytearray(size)
        big[:rest] = buf[consumed:fill]
        self.big = big
        self.big_fill = rest
        self.big_charge = charge

    # ------------------------------------------------------------ closing

    def lost(self, reason: str) -> None:
        """The connection is gone (or must go now): tell the engine, close the socket."""
        if self._closing:
            return
        self._closing = True
        link = self.link
        self.engine.link_lost(link, reason)
        self.flusher.flush()
        budget = self.flusher.budget
        budget.give(self.big_charge + self.out_charge)
        budget.closes += 1
        self.big_charge = self.out_charge = 0
        self.big = None
        self.rest = _EMPTY
        if self.wake is not None:
            self.wake.set()
        self.drained.set()
        if self.low_event is not None:
            self.low_event.set()
        try:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        # break the Conn <-> Link cycle (and the callbacks that close over
        # this object): a closed connection is freed by refcounting at once
        link.io = None
        link.on_idle = None
        link.on_goaway = None
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
                            if not self.sock.recv_into(self.flusher.rx):
                                break
                        except BlockingIOError:
                            continue
                except (OSError, trio.ClosedResourceError):
                    pass
        self.lost(reason)


class Flusher:
    """Writes the links an engine touched; owns the shared receive buffer and the budget."""

    def __init__(self, engine: Engine, budget: Budget | None = None) -> None:
        self.engine = engine
        self.budget = budget if budget is not None else Budget()
        self.rx = bytearray(SHARED_RECEIVE_BUFFER)
        self.rx_view = memoryview(self.rx)

    def flush(self) -> list[Link]:
        """Write every link the engine touched since the last flush; return them."""
        engine = self.engine
        if not engine.dirty:
            return _NOTHING
        dirty = engine.take_dirty()
        for link in dirty:
            conn = link.io
            if conn is not None and not link.closed:
                conn.try_send()
        return dirty


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
        from ._config import split_host_port

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
