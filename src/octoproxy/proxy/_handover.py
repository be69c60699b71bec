"""Hot restart, the Trio shell: the hot-restart socket, SCM_RIGHTS, both roles.

The protocol and its state machines are in :mod:`._hot_restart`; this module
moves its messages and file descriptors over a Unix socket and drives a
:class:`~._server.Proxy` through the hand-over.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from ._hot_restart import (
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
#: hand-over connections served at once (a real hand-over needs one)
MAX_HANDOVER_CONNECTIONS = 4
#: largest hand-over message (a JSON line), in bytes
MAX_MESSAGE = 16 * 1024 * 1024


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

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it.

        Raises:
            HotRestartError: bad message.
            EOFError: the peer closed the socket.
        """
        while b"\n" not in self._buf:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, _MAX_FDS)
            except BlockingIOError:
                continue
            self._fds.extend(fds)
            if not data:
                raise EOFError("hot-restart peer closed the connection")
            self._buf += data
            if len(self._buf) > MAX_MESSAGE or len(self._fds) > 4 * _MAX_FDS:
                raise HotRestartError(f"hot-restart message over {MAX_MESSAGE} bytes or {4 * _MAX_FDS} descriptors")
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

    Each hand-over runs in ``nursery``, so that it outlives this accept loop
    (which stops when the hand-over begins) until the drain is done. At most
    :data:`MAX_HANDOVER_CONNECTIONS` are served at once (each must say hello
    within 5 s); more are closed at once. Accept failures (EMFILE...) are
    logged once per 10 s.
    """
    lsock.setblocking(False)
    active = 0
    logged = -1e9

    async def handle(chan: Channel) -> None:
        nonlocal active
        try:
            await _handle_child(proxy, chan)
        finally:
            active -= 1

    while True:
        await trio.lowlevel.wait_readable(lsock)
        try:
            sock, _ = lsock.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            if trio.current_time() - logged >= 10.0:
                logged = trio.current_time()
                log.error("hot-restart accept failed: %s; backing off", exc)
            await trio.sleep(0.1)
            continue
        if active >= MAX_HANDOVER_CONNECTIONS:
            proxy.stats.error("hot_restart_connection_limit")
            sock.close()
            continue
        active += 1
        nursery.start_soon(handle, Channel(sock))


async def _handle_child(proxy: Proxy, chan: Channel) -> None:
    machine = proxy.hot_restart
    try:
        with trio.fail_after(5):
            hello, fds = await chan.recv()
        for fd in fds:  # a child sends none
            os.close(fd)
        if hello["type"] != "hello":
            raise HotRestartError(f"expected hello, got {hello['type']}")
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
        if proxy.handover_channel is chan:
            proxy.handover_channel = None
        chan.close()
        proxy.handover_finished.set()


# ------------------------------------------------------------------ child


async def take_over(path: str, timeout: float = 5.0) -> tuple[Channel, dict[str, Any], dict[str, socket.socket]]:
    """Connect to a running proxy's hot-restart socket and receive its listeners.

    Returns:
        The channel (kept open: READY and DONE travel on it), the LISTENERS
        message, and the sockets by name.

    Raises:
        HotRestartError: refused, or the parent sent something unexpected.
        OSError: nothing listens on ``path``.
    """
    machine = child_machine()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    machine.fire(ChildEvent.CONNECTED)
    chan = Channel(sock)
    try:
        await chan.send(encode("hello", version=PROTOCOL_VERSION, pid=os.getpid()))
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
