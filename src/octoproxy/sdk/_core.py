"""The sans-IO core of the Mesh SDK's caller side, shared by the three front ends.

No sockets, no event loop, no clock: the front ends (Trio ``_trio.py``, asyncio
``_asyncio.py``, threads ``_blocking.py``) do the I/O and pass the time in;
this module decides what goes on the wire and what a reply means.

Theory of operation
-------------------
A :class:`ClientCore` holds the state of one client: its stream-id counter, the
set of connections (at most one *current*, the one new calls go to), counters
(``resends``, ``connections_opened``) and the outcome of the last dial (so that
calls queued behind a failed attempt share its failure instead of each dialing).

A :class:`ConnectionCore` is one connection's protocol state: a frame decoder,
the pending tables (stream id -> waiter, PING token -> waiter) and whether it
still takes new work. The front end feeds it the bytes it reads
(:meth:`ConnectionCore.receive_data`), which returns the waiters to wake (their
:class:`Pending` fields filled in), and writes whatever
:meth:`ConnectionCore.data_to_send` returns (PONGs, refusals, a GOAWAY). A
waiter is the front end's own subclass of :class:`Pending` (with a
``trio.Event``, an ``asyncio.Future`` or a ``threading.Lock``).

A connection leaves service in one of three ways:

* **lost** (EOF, reset, a protocol error from the peer, a failed write): the
  front end calls :meth:`ConnectionCore.lost`; every waiter fails with
  UNAVAILABLE. The next call dials a new connection.
* **draining**: a RESPONSE with the HOT_RESTART flag (docs/protocol.md section
  9) or a GOAWAY. :attr:`ConnectionCore.usable` turns false at once, so new
  calls go elsewhere (a front end checks it again right before writing: a call
  that has not been written yet is moved, see :meth:`ClientCore.not_sent`);
  pending calls complete normally, and :meth:`ConnectionCore.drained` says when
  to close it. A call answered HOT_RESTART was not processed:
  :meth:`ClientCore.outcome` says "resend" (on a new connection, with its
  remaining time), at most :data:`MAX_RESENDS` times.
* **closed** by the client: :meth:`ConnectionCore.close` marks every waiter
  ``closed``.

Deadlines are data: a :class:`CallCore` carries an absolute deadline on the
front end's clock, and each encoding of it sends the time left as
``timeout_ms``. The front end enforces the deadline with its own timer and asks
:meth:`ClientCore.timeout_error` for the error.
"""

from __future__ import annotations

import errno as _errno
import itertools
import logging
import math
from typing import Any, Generic, TypeVar

from ..protocol._errors import OctoproxyError, RemoteProtocolError
from ..protocol._protocol import PREFIX_SIZE, Flags, FrameType, Status
from ..frame import Frame, FrameDecoder, encode_frame, encode_header, encode_request, encode_response

__all__ = [
    "ClientCounters",
    "MAX_RESENDS",
    "CallCore",
    "CallError",
    "ClientClosedError",
    "ClientCore",
    "ConnectionCore",
    "NoProxyError",
    "Pending",
    "logger",
    "no_proxy_error",
]

logger = logging.getLogger("octoproxy.sdk")

#: how many times one call is resent after HOT_RESTART answers before giving up
MAX_RESENDS = 5
#: bytes a front end asks for per read
RECV_SIZE = 256 * 1024
#: the dial errors that mean "no proxy there" (rather than a broken one)
_NO_PROXY_ERRNOS = frozenset({_errno.ENOENT, _errno.ECONNREFUSED, _errno.ENOTSOCK})


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
        return f"{type(self).__name__}({self.status.name}, {self.message!r})"


class NoProxyError(CallError, ConnectionError):
    """No octoproxy is listening on the SDK's socket path.

    A :class:`CallError` with status UNAVAILABLE and also an :class:`OSError`
    (``errno`` is the dial's): the instance raised is a
    :class:`FileNotFoundError` when the socket file does not exist and a
    :class:`ConnectionRefusedError` when nobody listens on it, so code that
    caught those keeps working.

    Attributes:
        path: the socket path that was dialled.
    """

    __module__ = "octoproxy.sdk"  # a traceback's last line reads "octoproxy.sdk.NoProxyError: ..."

    def __init__(self, path: str, reason: str = "") -> None:
        message = f"no octoproxy listening on {path} (is the proxy running? outbound.uds in its config)"
        if reason:
            message += f"; cannot connect: {reason}"
        CallError.__init__(self, Status.UNAVAILABLE, message)
        self.path = path
        self.reason = reason
        self.filename = path
        self.strerror = reason or message  # as an OSError: the dial's own text

    def __repr__(self) -> str:
        return f"NoProxyError({self.message!r})"

    def __reduce__(self) -> tuple[object, ...]:  # pickles (e.g. across a process pool) as what it is
        return _rebuild_no_proxy, (self.path, self.reason, self.errno)


class _NoSocketFile(NoProxyError, FileNotFoundError):
    __module__ = "octoproxy.sdk"
    __qualname__ = "NoProxyError"


class _Refused(NoProxyError, ConnectionRefusedError):
    __module__ = "octoproxy.sdk"
    __qualname__ = "NoProxyError"


_NO_PROXY_CLASSES: dict[int | None, type[NoProxyError]] = {_errno.ENOENT: _NoSocketFile, _errno.ECONNREFUSED: _Refused}


def _rebuild_no_proxy(path: str, reason: str, errno: int | None) -> NoProxyError:
    err = _NO_PROXY_CLASSES.get(errno, NoProxyError)(path, reason)
    err.errno = errno
    return err


def no_proxy_error(path: str, exc: OSError) -> CallError:
    """The error for a failed dial of ``path``: :class:`NoProxyError` when nobody is there."""
    if isinstance(exc, NoProxyError):
        return exc
    reason = exc.strerror or repr(exc)
    if exc.errno in _NO_PROXY_ERRNOS:
        return _rebuild_no_proxy(path, reason, exc.errno)
    return CallError(Status.UNAVAILABLE, f"cannot connect to {path}: {reason}")


def is_no_proxy(exc: BaseException) -> bool:
    """Whether a dial failure means "no proxy there (yet)": worth waiting for."""
    return isinstance(exc, OSError) and exc.errno in _NO_PROXY_ERRNOS


class ClientClosedError(OctoproxyError):
    """The client was closed (before or during the call).

    The Trio front end raises a subclass that is also a
    :class:`trio.ClosedResourceError`.
    """


class Pending:
    """One outstanding request or PING: the core fills in the answer, the front end wakes its owner."""

    __slots__ = ("status", "error", "body", "hot_restart", "failure", "closed")

    def __init__(self) -> None:
        self.status = 0
        self.error = ""
        self.body = b""
        self.hot_restart = False
        self.failure: str | None = None  # the connection was lost
        self.closed = False  # the client was closed


P = TypeVar("P", bound=Pending)
C = TypeVar("C", bound="ConnectionCore[Any]")


class ConnectionCore(Generic[P]):
    """The protocol state of one connection to the proxy (see the module docstring).

    Attributes:
        number: 1 for the client's first connection, and so on.
        pending: stream id -> waiter of each outstanding REQUEST.
        pings: token -> waiter of each outstanding PING.
        draining: no new work may start here (HOT_RESTART or GOAWAY seen).
        goaway: the reason of the peer's GOAWAY, if it sent one.
        ended: why the connection ended, once it has (lost, closed, protocol error).
        protocol_error: set when the peer broke the protocol; the front end
            writes :meth:`data_to_send` (a GOAWAY) and then calls :meth:`lost`.
    """

    __slots__ = ("number", "path", "decoder", "pending", "pings", "draining", "goaway", "ended", "protocol_error", "_outbox")

    def __init__(self, number: int, path: str, max_frame_size: int) -> None:
        self.number = number
        self.path = path
        self.decoder = FrameDecoder(max_frame_size)
        self.pending: dict[int, P] = {}
        self.pings: dict[int, P] = {}
        self.draining = False
        self.goaway: str | None = None
        self.ended: str | None = None
        self.protocol_error: str | None = None
        self._outbox: list[bytes] = []

    def __repr__(self) -> str:
        return f"<connection #{self.number} to {self.path}>"

    @property
    def usable(self) -> bool:
        """Whether new work may start on this connection."""
        return self.ended is None and not self.draining and self.protocol_error is None

    def unusable(self) -> bool:
        """``not usable`` (as a callable, for a writer's last-moment check)."""
        return not self.usable

    def drained(self) -> bool:
        """A draining connection with nothing outstanding: close it now."""
        return self.draining and self.ended is None and not self.pending and not self.pings

    def data_to_send(self) -> bytes:
        """Control frames the front end must write (PONGs, refusals, a GOAWAY)."""
        if not self._outbox:
            return b""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    def receive_data(self, data: bytes) -> list[P]:
        """Feed bytes read from the connection; return the waiters to wake.

        After a protocol error from the peer the remaining bytes are ignored:
        :attr:`protocol_error` is set and the outbox holds a GOAWAY.
        """
        if self.protocol_error is not None:
            return []
        woken: list[P] = []
        self.decoder.receive_data(data)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self._dispatch(frame, woken)
        except RemoteProtocolError as exc:
            logger.warning("%r: protocol error from the peer: %s", self, exc)
            self._outbox.append(encode_frame(FrameType.GOAWAY, 0, encode_header(error=str(exc))))
            self.protocol_error = f"closed after a protocol error from the peer: {exc}"
        return woken

    def _dispatch(self, frame: Frame, woken: list[P]) -> None:
        ftype = frame.type
        sid = frame.stream_id
        if ftype == FrameType.RESPONSE:
            if frame.flags & Flags.HOT_RESTART:
                self.start_draining("hot restart")  # before anything else: no new calls here
                waiter = self.pending.pop(sid, None)
                if waiter is not None:
                    waiter.hot_restart = True
                    woken.append(waiter)
                return
            status, error = 0, ""
            if frame.header_bytes:
                header = frame.header  # raises RemoteProtocolError if it does not parse
                status, error = header.status, header.error
            waiter = self.pending.pop(sid, None)
            if waiter is None:  # the call timed out or was cancelled meanwhile
                logger.debug("%r: response for unknown stream %d dropped", self, sid)
                return
            waiter.status = status
            waiter.error = error
            waiter.body = bytes(frame.body)
            woken.append(waiter)
        elif ftype == FrameType.PING:
            self._outbox.append(encode_frame(FrameType.PONG, sid))
        elif ftype == FrameType.PONG:
            waiter = self.pings.pop(sid, None)
            if waiter is not None:
                woken.append(waiter)
        elif ftype == FrameType.GOAWAY:
            self.goaway = frame.header.error or "no reason given"
            self.start_draining(f"GOAWAY: {self.goaway}")
        elif ftype == FrameType.REQUEST:
            self._outbox.append(encode_response(sid, status=Status.NO_ROUTE, error="an SDK client serves no requests"))
        # ONEWAY to a client: nobody to deliver it to; dropped

    def start_draining(self, why: str) -> None:
        """Take no new work here (HOT_RESTART, GOAWAY); pending calls complete."""
        if not self.draining:
            self.draining = True
            logger.info("%r draining (%s): new calls go to a new connection", self, why)

    def lost(self, reason: str) -> list[P]:
        """The connection ended (``reason`` says how): fail every waiter; return them to wake."""
        if self.ended is not None:
            return []
        self.ended = reason
        if self.goaway is not None:
            reason += f" (after GOAWAY: {self.goaway})"
        message = f"connection to {self.path} {reason}"
        woken = [*self.pending.values(), *self.pings.values()]
        for waiter in woken:
            waiter.failure = message
        self.pending.clear()
        self.pings.clear()
        return woken

    def close(self) -> list[P]:
        """The client is closing: mark every waiter closed; return them to wake."""
        woken = [*self.pending.values(), *self.pings.values()]
        self.pending.clear()
        self.pings.clear()
        for waiter in woken:
            waiter.closed = True
        if self.ended is None:
            self.ended = "closed by the client"
        return woken


class CallCore:
    """One logical call, across resends and moves.

    Attributes:
        deadline: when the caller stops waiting, on the front end's clock
            (``None``: no local limit).
        resends: how many times it was resent after a HOT_RESTART answer.
        moves: how many times it was moved before being written.
    """

    __slots__ = ("service", "method", "body", "metadata", "timeout", "deadline", "oneway", "resends", "moves")

    def __init__(
        self,
        service: str,
        method: str,
        body: bytes,
        metadata: dict[str, str] | None,
        timeout: float | None,
        now: float,
        oneway: bool = False,
    ) -> None:
        self.service = service
        self.method = method
        self.body = body
        self.metadata = metadata
        self.timeout = timeout
        self.deadline = None if timeout is None else now + timeout
        self.oneway = oneway
        self.resends = 0
        self.moves = 0

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (``math.inf`` without one; may be negative)."""
        return math.inf if self.deadline is None else self.deadline - now

    def timeout_ms(self, now: float) -> int:
        """``timeout_ms`` for a send at ``now``: the time left, at least 1 ms (0: no timeout)."""
        if self.deadline is None:
            return 0
        return min(max(math.ceil((self.deadline - now) * 1000), 1), 0xFFFFFFFF)


class ClientCore(Generic[C]):
    """The state of one client: ids, connections, dial outcome, counters.

    Generic over the front end's connection class (a :class:`ConnectionCore`
    subclass that adds the socket).

    Attributes:
        path: the proxy's Unix socket path.
        max_frame_size: the largest frame sent or accepted.
        resends: calls resent after a HOT_RESTART answer.
        connections_opened: connections opened, the first included.
        current: the connection new calls go to (None: dial one).
        connections: every connection not yet ended (an ordered set).
        closed: the client was closed.
    """

    def __init__(self, path: str, max_frame_size: int, closed_error: type[BaseException] = ClientClosedError) -> None:
        if max_frame_size < PREFIX_SIZE:
            raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")
        self.path = path
        self.max_frame_size = max_frame_size
        self.resends = 0
        self.connections_opened = 0
        self.current: C | None = None
        self.connections: dict[C, None] = {}
        self.closed = False
        self.dial_attempts = 0
        self.dial_error: CallError | None = None
        self._closed_error = closed_error
        self._ids = itertools.count(1)

    # -- ids and encoding

    def next_id(self) -> int:
        return next(self._ids)

    def encode(self, call: CallCore, sid: int, now: float) -> bytes:
        """The REQUEST (or ONEWAY) frame of ``call`` under stream id ``sid``, sent at ``now``.

        Raises:
            CallError: FRAME_TOO_LARGE if it exceeds ``max_frame_size``.
        """
        data = encode_request(
            sid, call.service, call.method, call.body, timeout_ms=call.timeout_ms(now), metadata=call.metadata, oneway=call.oneway
        )
        if len(data) > self.max_frame_size:
            raise CallError(Status.FRAME_TOO_LARGE, f"request of {len(data)} bytes exceeds the limit of {self.max_frame_size} bytes")
        return data

    # -- connections

    def check_open(self) -> None:
        """Raise the closed error if the client was closed."""
        if self.closed:
            raise self._closed_error("the client was closed")

    def usable_connection(self) -> C | None:
        """The current connection if new work may start on it; None: dial a new one."""
        self.check_open()
        conn = self.current
        if conn is not None and conn.usable:
            return conn
        return None

    def shared_dial_failure(self, attempts_seen: int) -> CallError | None:
        """The failure of a dial that completed while this caller queued for the dial lock."""
        if self.dial_attempts != attempts_seen and self.dial_error is not None:
            return self.dial_error
        return None

    def dial_failed(self, exc: OSError) -> CallError:
        """Record a failed dial; return the error to raise."""
        self.dial_attempts += 1
        self.dial_error = no_proxy_error(self.path, exc)
        return self.dial_error

    def next_number(self) -> int:
        """The number of the next connection (call :meth:`adopt` once its reader runs)."""
        return self.connections_opened + 1

    def adopt(self, conn: C) -> None:
        """Make a new connection current (the dial succeeded)."""
        self.dial_attempts += 1
        self.dial_error = None
        self.connections_opened += 1
        self.connections[conn] = None
        self.current = conn
        logger.debug("%r opened", conn)

    def forget(self, conn: C) -> None:
        """A connection has ended."""
        if self.current is conn:
            self.current = None
        self.connections.pop(conn, None)
        reason = conn.ended or "ended"
        logger.log(logging.INFO if reason.startswith(("lost", "closed by the peer", "closed after")) else logging.DEBUG, "%r %s", conn, reason)

    def close(self) -> list[C]:
        """Close the client; return the connections to close (each one's :meth:`ConnectionCore.close`)."""
        if self.closed:
            return []
        self.closed = True
        self.current = None
        return list(self.connections)

    # -- outcomes

    def not_sent(self, call: CallCore) -> None:
        """The connection stopped taking new work before ``call`` was written: move it.

        Raises:
            CallError: UNAVAILABLE after too many moves.
        """
        call.moves += 1
        if call.moves > MAX_RESENDS:
            raise CallError(Status.UNAVAILABLE, f"{call.service}/{call.method}: no connection would take the call")

    def outcome(self, call: CallCore, waiter: Pending) -> bytes | None:
        """What an answered waiter means: the body, or ``None`` to resend on a new connection.

        Raises:
            CallError: the non-OK status; UNAVAILABLE if the connection was
                lost or HOT_RESTART came back too many times.
            ClientClosedError: (or the front end's class) the client was closed.
        """
        if waiter.closed:
            raise self._closed_error("the client was closed")
        if waiter.failure is not None:
            raise CallError(Status.UNAVAILABLE, waiter.failure)
        if waiter.hot_restart:  # not processed: safe to resend
            if call.resends == MAX_RESENDS:
                raise CallError(Status.UNAVAILABLE, f"{call.service}/{call.method}: still answered HOT_RESTART after {call.resends} resends")
            call.resends += 1
            self.resends += 1
            return None
        status = waiter.status
        if status == Status.OK:
            return waiter.body
        if status not in Status._value2member_map_:
            raise CallError(Status.UNAVAILABLE, f"unknown status {status}: {waiter.error}")
        st = Status(status)
        raise CallError(st, waiter.error or st.name)

    def ping_outcome(self, waiter: Pending) -> None:
        """Raise if a PING waiter was failed rather than answered."""
        if waiter.closed:
            raise self._closed_error("the client was closed")
        if waiter.failure is not None:
            raise CallError(Status.UNAVAILABLE, waiter.failure)

    def timeout_error(self, call: CallCore) -> CallError:
        return CallError(Status.TIMEOUT, f"{call.service}/{call.method}: no response within {call.timeout} s")

    def connect_timeout_error(self, timeout: float) -> TimeoutError:
        return TimeoutError(f"connecting to {self.path} timed out after {timeout} s")


def connect_delays(wait: float) -> list[float]:
    """Pauses between dial attempts for ``wait`` seconds of waiting for a proxy to come up."""
    delays: list[float] = []
    total, delay = 0.0, 0.02
    while total < wait:
        step = min(delay, wait - total)
        delays.append(step)
        total += step
        delay = min(delay * 2, 0.5)
    return delays


class ClientCounters:
    """The counters every front end's ``Client`` shows, read off its :class:`ClientCore`."""

    _core: ClientCore[Any]

    @property
    def resends(self) -> int:
        """How many calls were resent after a HOT_RESTART answer."""
        return self._core.resends

    @property
    def connections_opened(self) -> int:
        """How many connections were opened, the first included."""
        return self._core.connections_opened

    @property
    def connections_open(self) -> int:
        """Connections not yet closed (more than one only while old ones drain)."""
        return len(self._core.connections)
