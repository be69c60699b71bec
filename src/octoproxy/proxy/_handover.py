"""Hot restart, the Trio shell: the hot-restart socket, SCM_RIGHTS, both roles.

The protocol and its state machines are in :mod:`._hot_restart`; this module
moves its messages and file descriptors over a Unix socket and drives a
:class:`~._server.Proxy` through the hand-over. It also enforces who may take
over (see :mod:`._hot_restart`, "Who may take over"): the peer's uid, the
hand-over secret, the HELLO deadline, and a bound on unauthenticated peers.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..common._secretfile import SecretFileError, read_secret, same_secret
from ..core._hot_restart import (
    PROTOCOL_VERSION,
    ChildEvent,
    HotRestartError,
    ParentEvent,
    ParentState,
    child_machine,
    decode,
    encode,
)

if TYPE_CHECKING:
    from ._server import Proxy

log = logging.getLogger("octoproxy.hot_restart")

__all__ = ["Channel", "serve_hot_restart", "take_over"]

_MAX_FDS = 16
#: connections that have not said a valid HELLO yet, at most; more are closed at once
_MAX_UNAUTHENTICATED = 8
_MAX_HELLO = 4096  # bytes
#: a refused peer of the same kind is logged at most once per this many seconds
_LOG_INTERVAL = 60.0


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
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


# ------------------------------------------------------------------ parent


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
        nursery.start_soon(_handle_child, proxy, chan, secret, refuse, unauthenticated)


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


async def _handle_child(
    proxy: Proxy, chan: Channel, secret: bytes, refuse: _Refusals, unauthenticated: deque[Channel]
) -> None:
    machine = proxy.hot_restart
    try:
        try:
            hello = await _hello(proxy, chan, secret, refuse)
        finally:
            if chan in unauthenticated:
                unauthenticated.remove(chan)
        if hello is None:
            return
        refusal = None
        if hello["version"] != PROTOCOL_VERSION:
            refusal = f"protocol version {hello['version']} not supported (this proxy speaks {PROTOCOL_VERSION})"
        elif not machine.can(ParentEvent.HELLO):
            refusal = f"a hot restart is already under way (state {machine.state.value})"
        elif proxy.parent_alive:
            refusal = "this proxy's own parent is still draining: at most two generations"
        if refusal is not None:
            log.warning("hot restart refused to pid %s: %s", hello.get("pid"), refusal)
            proxy.stats.error("hot_restart_refused")
            await chan.send(encode("refused", reason=refusal))
            return
        machine.fire(ParentEvent.HELLO)
        proxy.handover_finished = trio.Event()
        proxy.handover_channel = chan
        log.info("hot restart: handing listeners to pid %s (generation %d)", hello["pid"], proxy.generation + 1)
        names, socks = proxy.listener_sockets()
        await chan.send(
            encode(
                "listeners",
                names=names,
                generation=proxy.generation,
                stats=proxy.stats.registry.snapshot(),
                subscriptions=proxy.subscriptions(),
            ),
            [s.fileno() for s in socks],
        )
        try:
            with trio.fail_after(proxy.config.proxy.hot_restart_timeout + 5):
                msg, _ = await chan.recv()
        except (EOFError, OSError, trio.ClosedResourceError) as exc:
            if machine.state is not ParentState.HANDING_OVER:
                return  # aborted by a shutdown request
            machine.fire(ParentEvent.CHILD_LOST)
            log.warning("hot restart: new process went away before ready (%s); still serving", exc)
            proxy.stats.error("hot_restart_aborted")
            return
        except trio.TooSlowError:
            machine.fire(ParentEvent.HANDOVER_TIMEOUT)
            log.warning("hot restart: new process not ready in time; still serving")
            proxy.stats.error("hot_restart_aborted")
            return
        if msg["type"] != "ready":
            machine.fire(ParentEvent.CHILD_LOST)
            log.warning("hot restart: new process failed: %s; still serving", msg.get("reason", msg["type"]))
            proxy.stats.error("hot_restart_aborted")
            return
        machine.fire(ParentEvent.CHILD_READY)
        log.info("hot restart: new process ready; draining this one")
        proxy.begin_handover_drain()
        await chan.send(encode("draining"))
        await proxy.drained.wait()
        machine.fire(ParentEvent.DRAINED)
        with trio.move_on_after(2):
            await chan.send(encode("done", stats=proxy.stats.registry.snapshot()))
    except (HotRestartError, EOFError, OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:
        log.warning("hot restart: hand-over failed: %s", exc)
        if machine.state == ParentState.HANDING_OVER:
            machine.fire(ParentEvent.CHILD_LOST)
    finally:
        if proxy.handover_channel is chan:  # only the hand-over's own connection ends it
            proxy.handover_channel = None
            proxy.handover_finished.set()
        chan.close()


# ------------------------------------------------------------------ child


async def take_over(
    path: str, secret_path: str | os.PathLike[str], timeout: float = 5.0
) -> tuple[Channel, dict[str, Any], dict[str, socket.socket]]:
    """Connect to a running proxy's hot-restart socket and receive its listeners.

    Args:
        path: the hot-restart socket.
        secret_path: the hand-over secret the running proxy wrote.
        timeout: deadline for the listeners to arrive.

    Returns:
        The channel (kept open: READY and DONE travel on it), the LISTENERS
        message, and the sockets by name.

    Raises:
        HotRestartError: the secret cannot be read, the socket belongs to
            another user, refused, or the parent sent something unexpected.
        OSError: nothing listens on ``path``.
    """
    try:
        secret = read_secret(secret_path)
    except SecretFileError as exc:
        raise HotRestartError(f"hot restart: cannot read the hand-over secret: {exc}") from None
    machine = child_machine()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        their_uid = peer_uid(sock)
    except OSError:
        sock.close()
        raise
    if their_uid is not None and their_uid != os.geteuid():
        sock.close()  # never hand our secret to a socket someone else put there
        raise HotRestartError(f"hot restart: {path} is served by uid {their_uid}, not by this user ({os.geteuid()})")
    machine.fire(ChildEvent.CONNECTED)
    chan = Channel(sock)
    try:
        await chan.send(encode("hello", version=PROTOCOL_VERSION, pid=os.getpid(), secret=secret.decode("ascii", "replace")))
        with trio.fail_after(timeout):
            msg, fds = await chan.recv()
        if msg["type"] == "refused":
            machine.fire(ChildEvent.REFUSED)
            raise HotRestartError(f"hot restart refused: {msg['reason']}")
        if msg["type"] != "listeners" or len(fds) != len(msg["names"]):
            raise HotRestartError(f"unexpected {msg['type']} with {len(fds)} descriptors")
        machine.fire(ChildEvent.LISTENERS)
    except BaseException:
        chan.close()
        raise
    socks = {name: socket.socket(fileno=fd) for name, fd in zip(msg["names"], fds)}
    return chan, msg, socks
