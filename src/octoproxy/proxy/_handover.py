"""Hot restart, the Trio shell: the hot-restart socket, SCM_RIGHTS, the parent role.

The protocol and its two state machines are in :mod:`..core._hot_restart`. Each role
is a small shell around its table: :class:`ParentShell` here (every proxy: it
may hand over to a next generation) and :class:`~._takeover.ChildShell` (a
proxy started with ``--hot-restart``). A shell fires every event of its role through one
``fire(event)`` and performs the actions the table returns, nothing else; an
event the table does not allow in the current state is logged in one line and
answered with ``ABORT`` (the hand-over ends safely, the old generation keeps
serving). This module also moves the messages and file descriptors over the
Unix socket and enforces who may take over (see :mod:`..core._hot_restart`, "Who may
take over"): the peer's uid, the hand-over secret, the HELLO deadline, and a
bound on unauthenticated peers.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..common._secretfile import same_secret
from ..core._hot_restart import (
    PROTOCOL_VERSION,
    HotRestartError,
    IllegalEvent,
    ParentAction,
    ParentEvent,
    ParentState,
    decode,
    encode,
    parent_machine,
    refusal,
)

if TYPE_CHECKING:
    from ._server import Proxy

log = logging.getLogger("octoproxy.hot_restart")

__all__ = ["Channel", "ParentShell", "peer_uid", "serve_hot_restart"]

_MAX_FDS = 16
#: connections that have not said a valid HELLO yet, at most; more are closed at once
_MAX_UNAUTHENTICATED = 8
_MAX_HELLO = 4096  # bytes
#: a refused peer of the same kind is logged at most once per this many seconds
_LOG_INTERVAL = 60.0
#: each message the parent sends must be written within this long (the peer is a local process)
SEND_TIMEOUT = 5.0


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a Unix-socket peer (``SO_PEERCRED``), or None where unsupported."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # pragma: no cover - Linux has it
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


class _Refusals:
    """Logs a kind of refused peer once per ``_LOG_INTERVAL``, counts every one."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        self.proxy.stats.error(kind)
        now = trio.current_time()
        last = self._last.get(kind)
        if last is None or now - last >= _LOG_INTERVAL:
            self._last[kind] = now
            log.warning("hot restart: " + message + " (logged once a minute)", *args)


class Channel:
    """JSON lines (and file descriptors) over a non-blocking stream UDS."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = b""
        self._fds: list[int] = []
        #: messages posted for :meth:`pump` to send, in order: (line, descriptors, event once sent)
        self._outbox: deque[tuple[bytes, Sequence[int], Any]] = deque()
        self._posted = trio.Event()
        self._close_when_sent = False

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def post(self, data: bytes, fds: Sequence[int] = (), then: Any = None) -> None:
        """Queue a message for :meth:`pump` (the parent's shell posts; it never awaits)."""
        self._outbox.append((data, fds, then))
        self._posted.set()

    def post_close(self) -> None:
        """Close once everything posted is sent."""
        self._close_when_sent = True
        self._posted.set()

    async def pump(self, sent: Callable[[Any], None], broken: Callable[[BaseException], None]) -> None:
        """Send what is posted, in order, each within ``SEND_TIMEOUT``, until the channel closes.

        ``sent(event)`` is called after a message posted with an event; ``broken(exc)``
        if a send fails (then the channel is closed).
        """
        while not self.closed:
            await self._posted.wait()
            self._posted = trio.Event()
            while self._outbox and not self.closed:
                data, fds, then = self._outbox.popleft()
                try:
                    with trio.fail_after(SEND_TIMEOUT):
                        await self.send(data, fds)
                except (OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:
                    self.close()
                    broken(exc)
                    return
                if then is not None:
                    sent(then)
            if self._close_when_sent and not self._outbox:
                self.close()

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        first = True
        while view:
            try:
                if first and fds:
                    n = socket.send_fds(self.sock, [view], list(fds))
                else:
                    n = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            first = False
            view = view[n:]

    async def recv(self, max_line: int = 1 << 26) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it.

        Args:
            max_line: a longer message is a protocol error (a HELLO is tiny;
                LISTENERS carries the counters).

        Raises:
            HotRestartError: bad or too long message.
            EOFError: the peer closed the socket.
        """
        while b"\n" not in self._buf:
            if len(self._buf) > max_line:
                raise HotRestartError(f"hot-restart message longer than {max_line} bytes")
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, _MAX_FDS)
            except BlockingIOError:
                continue
            self._fds.extend(fds)
            if not data:
                raise EOFError("hot-restart peer closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        fds, self._fds = self._fds, []
        return decode(line), fds

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._outbox.clear()
        self._posted.set()  # a pump waiting for work ends
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


# ------------------------------------------------------------------ parent


class ParentShell:
    """The parent role of one proxy: the ``PARENT`` table, fired in one place.

    Its state is the proxy's hand-over and drain state (``Proxy.draining``,
    ``Proxy.handed_over`` and ``Proxy.keep_socket_files`` are read from it).
    Events come from the hot-restart connections, the drain and the signal
    handlers; :meth:`fire` never awaits: messages to a peer are posted to its
    :class:`Channel`, whose pump sends them in order.
    """

    def __init__(self, proxy: Proxy, initial: ParentState = ParentState.SERVING) -> None:
        self.proxy = proxy
        self.machine = parent_machine(initial)
        #: the connection of the hand-over under way (ADOPT .. RELEASE)
        self.channel: Channel | None = None
        self._queue: deque[tuple[ParentEvent, Channel | None]] = deque()
        self._firing = False
        self._changed = trio.Event()

    @property
    def state(self) -> ParentState:
        return self.machine.state

    def fire(self, event: ParentEvent, peer: Channel | None = None) -> ParentState:
        """Take ``event`` (from ``peer``, for the events a connection brings) and perform its actions.

        An event the table does not allow is logged and answered with ABORT.
        Events that actions cause are taken after the current one, in order.
        """
        self._queue.append((event, peer))
        if self._firing:
            return self.state
        self._firing = True
        try:
            while self._queue:
                ev, who = self._queue.popleft()
                before = self.state
                try:
                    tr = self.machine.fire(ev)
                except IllegalEvent as exc:
                    log.error("%s: hand-over aborted", exc)
                    self.proxy.stats.error("hot_restart_illegal_event")
                    ev = ParentEvent.ABORT
                    tr = self.machine.fire(ev)
                if tr.state is not before:
                    log.debug("hot restart: %s -> %s (%s)", before.value, tr.state.value, ev.value)
                for action in tr.actions:
                    self._perform(action, who)
        finally:
            self._firing = False
            self._changed.set()
            self._changed = trio.Event()
        return self.state

    def _perform(self, action: ParentAction, peer: Channel | None) -> None:
        proxy = self.proxy
        chan = self.channel
        if action is ParentAction.ADOPT:
            self.channel = peer
        elif action is ParentAction.SEND_LISTENERS:
            assert chan is not None
            names, socks = proxy.listener_sockets()
            msg = encode(
                "listeners",
                names=names,
                generation=proxy.generation,
                stats=proxy.stats.registry.snapshot(),
                subscriptions=proxy.subscriptions(),
            )
            chan.post(msg, [s.fileno() for s in socks])
        elif action is ParentAction.REFUSE:
            reason = refusal(self.state)
            log.warning("hot restart refused: %s", reason)
            proxy.stats.error("hot_restart_refused")
            if peer is not None:
                peer.post(encode("refused", reason=reason))
                peer.post_close()
        elif action is ParentAction.RELEASE:
            self.channel = None
            if chan is not None:
                chan.close()
        elif action is ParentAction.COUNT_ABORTED:
            proxy.stats.error("hot_restart_aborted")
        elif action is ParentAction.STOP_ACCEPTING:
            proxy.stop_accepting()
        elif action is ParentAction.STOP_ADMIN:
            proxy.stop_admin()  # accepted admin requests still complete (see Proxy._serve_admin)
        elif action is ParentAction.SEND_DRAINING:
            if chan is not None:
                chan.post(encode("draining"))
        elif action is ParentAction.DRAIN:
            proxy.start_drain()
        elif action is ParentAction.SEND_DONE:
            if chan is not None and not chan.closed:
                chan.post(encode("done", stats=proxy.stats.registry.snapshot()), then=ParentEvent.DONE_SENT)
            else:  # the child went away: nobody to tell
                self._queue.append((ParentEvent.DONE_SENT, None))
        else:  # pragma: no cover - every action is handled above
            raise AssertionError(action)

    async def wait_done(self) -> None:
        """Until the hand-over is over (DONE sent, or the child gone)."""
        while self.state is not ParentState.DONE:
            await self._changed.wait()


async def serve_hot_restart(proxy: Proxy, lsock: socket.socket, nursery: trio.Nursery) -> None:
    """Accept hand-over requests on the hot-restart socket (the parent role).

    Only a peer of our uid that says a HELLO with the secret
    :meth:`~._server.Proxy.arm_hot_restart` wrote gets anywhere. Each
    hand-over runs in ``nursery``, so that it outlives this accept loop (which
    stops when the hand-over begins) until the drain is done.

    Raises:
        SecretFileError: the secret file cannot be written.
    """
    if not proxy.hot_restart_secret:
        proxy.arm_hot_restart()
    secret = proxy.hot_restart_secret
    refuse = _Refusals(proxy)
    uid = os.geteuid()
    # connections still before a valid HELLO, oldest first: when there are too
    # many, the oldest goes (a real child says HELLO at once; refusing the
    # newest instead would let idle peers lock real upgrades out)
    unauthenticated: deque[Channel] = deque()
    lsock.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(lsock)
        try:
            sock, _ = lsock.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            log.error("hot-restart accept failed: %s", exc)
            await trio.sleep(0.1)
            continue
        try:
            their_uid = peer_uid(sock)
        except OSError:
            their_uid = -1
        if their_uid is not None and their_uid != uid:
            refuse("hot_restart_unauthenticated", "refused a peer with uid %s (this proxy runs as uid %s)", their_uid, uid)
            sock.close()
            continue
        if len(unauthenticated) >= _MAX_UNAUTHENTICATED:
            refuse("hot_restart_unauthenticated", "dropped the oldest of %d peers still without a hello", len(unauthenticated))
            unauthenticated.popleft().close()
        chan = Channel(sock)
        unauthenticated.append(chan)
        nursery.start_soon(_serve_peer, proxy, chan, secret, refuse, unauthenticated)


async def _hello(proxy: Proxy, chan: Channel, secret: bytes, refuse: _Refusals) -> dict[str, Any] | None:
    """The peer's HELLO, if it says a valid one with the right secret in time; else None (dropped)."""
    timeout = proxy.config.proxy.hot_restart_hello_timeout
    try:
        with trio.fail_after(timeout):
            hello, fds = await chan.recv(max_line=_MAX_HELLO)
    except trio.TooSlowError:
        refuse("hot_restart_unauthenticated", "dropped a peer that said no hello within %ss", timeout)
        return None
    except (HotRestartError, EOFError, OSError, trio.ClosedResourceError) as exc:
        refuse("hot_restart_unauthenticated", "dropped a peer that said no valid hello: %r", exc)
        return None
    for fd in fds:  # a child sends none
        os.close(fd)
    if hello["type"] != "hello":
        refuse("hot_restart_unauthenticated", "dropped a peer that said %r instead of hello", hello["type"])
        return None
    if not same_secret(str(hello.get("secret")), secret):
        refuse("hot_restart_unauthenticated", "refused pid %s: wrong hand-over secret", hello.get("pid"))
        with trio.move_on_after(1):
            await chan.send(encode("refused", reason="wrong hand-over secret"))
        return None
    return hello


async def _serve_peer(proxy: Proxy, chan: Channel, secret: bytes, refuse: _Refusals, unauthenticated: deque[Channel]) -> None:
    """One connection on the hot-restart socket: authenticate, then HELLO, and follow the child."""
    shell = proxy.hot_restart

    def sent(event: Any) -> None:
        if chan is shell.channel:
            shell.fire(event, chan)

    def broken(exc: BaseException) -> None:
        if chan is shell.channel:
            log.warning("hot restart: cannot write to the new process (%r)", exc)
            shell.fire(ParentEvent.CHILD_LOST, chan)

    try:
        async with trio.open_nursery() as n:
            n.start_soon(chan.pump, sent, broken)
            try:
                hello = await _hello(proxy, chan, secret, refuse)
            finally:
                if chan in unauthenticated:
                    unauthenticated.remove(chan)
            if hello is None:
                chan.close()
            elif hello["version"] != PROTOCOL_VERSION:
                reason = f"protocol version {hello['version']} not supported (this proxy speaks {PROTOCOL_VERSION})"
                log.warning("hot restart refused to pid %s: %s", hello.get("pid"), reason)
                proxy.stats.error("hot_restart_refused")
                chan.post(encode("refused", reason=reason))
                chan.post_close()
            else:
                log.info("hot restart: pid %s says hello (generation %d would be next)", hello["pid"], proxy.generation + 1)
                shell.fire(ParentEvent.HELLO, chan)
                await _follow_child(proxy, shell, chan)
    finally:
        chan.close()


async def _follow_child(proxy: Proxy, shell: ParentShell, chan: Channel) -> None:
    """Read the hand-over's child until it is let go: each message, close or timeout an event."""
    deadline = trio.current_time() + proxy.config.proxy.hot_restart_timeout + 5
    while chan is shell.channel:
        handing_over = shell.state is ParentState.HANDING_OVER
        try:
            # READY is due within the hand-over timeout; after it the child says nothing,
            # and the connection ends when we are done (bounded by the drain)
            with trio.move_on_at(deadline if handing_over else math.inf) as scope:
                msg, fds = await chan.recv()
        except (EOFError, OSError, HotRestartError, trio.ClosedResourceError) as exc:
            if chan is shell.channel:
                if handing_over:
                    log.warning("hot restart: new process went away before ready (%s); still serving", exc)
                shell.fire(ParentEvent.CHILD_LOST, chan)
            return
        if scope.cancelled_caught:
            log.warning("hot restart: new process not ready in time; still serving")
            shell.fire(ParentEvent.HANDOVER_TIMEOUT, chan)
            continue
        for fd in fds:
            os.close(fd)
        if msg["type"] == "ready":
            log.info("hot restart: new process ready; draining this one")
            shell.fire(ParentEvent.CHILD_READY, chan)
        else:
            log.warning("hot restart: new process failed: %s", msg.get("reason", f"it said {msg['type']}"))
            shell.fire(ParentEvent.CHILD_FAILED, chan)
