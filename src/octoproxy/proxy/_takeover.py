"""Hot restart, the Trio shell of the child role: take a running proxy's listeners over.

:class:`ChildShell` drives the ``CHILD`` table of :mod:`..core._hot_restart`
(see :mod:`._handover` for the parent role and the channel): every event is
fired through its one ``fire``, which performs the actions the table returns.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from ..common._secretfile import SecretFileError, read_secret
from ..core._hot_restart import (
    PARENT_ALIVE_STATES,
    PROTOCOL_VERSION,
    ChildAction,
    ChildEvent,
    ChildState,
    HotRestartError,
    IllegalEvent,
    ParentEvent,
    child_machine,
    encode,
)
from ._handover import SEND_TIMEOUT, Channel, peer_uid

if TYPE_CHECKING:
    from ._server import Proxy

log = logging.getLogger("octoproxy.hot_restart")

__all__ = ["ChildShell", "take_over"]

#: what each message the parent may send is, for the child's table
_CHILD_EVENTS = {
    "listeners": ChildEvent.LISTENERS,
    "refused": ChildEvent.REFUSED,
    "draining": ChildEvent.PARENT_DRAINING,
    "done": ChildEvent.PARENT_DONE,
}


class ChildShell:
    """The child role of a proxy started with ``--hot-restart``: the ``CHILD`` table, fired in one place.

    Its events all come from the one task that takes over (connect, HELLO,
    LISTENERS, warm-up, READY) and then follows the parent until DONE, so
    :meth:`fire` awaits the sends its actions make.
    """

    def __init__(self, secret: bytes) -> None:
        self.machine = child_machine()
        self.secret = secret
        self.chan: Channel | None = None
        #: the proxy built on the inherited listeners (set by ``Proxy.follow_predecessor``)
        self.proxy: Proxy | None = None
        #: the parent's counters: from LISTENERS, then from DONE
        self.handover_stats: dict[str, Any] | None = None
        self.final_stats: dict[str, Any] | None = None
        #: why we give up (FAILED's reason), or why the last send failed
        self.failure = ""

    @property
    def state(self) -> ChildState:
        return self.machine.state

    @property
    def parent_alive(self) -> bool:
        """The previous generation holds the sockets too (until it is done)."""
        return self.state in PARENT_ALIVE_STATES

    @property
    def keeps_parent_files(self) -> bool:
        """The socket files are the previous generation's until we serve alone."""
        return self.state is not ChildState.ALONE

    def event_for(self, msg: dict[str, Any]) -> ChildEvent:
        """The event a message from the parent is (a message only a child sends: the parent is broken)."""
        return _CHILD_EVENTS.get(msg["type"], ChildEvent.PARENT_LOST)

    async def fire(self, event: ChildEvent) -> ChildState:
        """Take ``event``, perform its actions; an action that fails brings its own event next.

        An event the table does not allow is logged and answered with ABORT.
        """
        queue = deque([event])
        while queue:
            ev = queue.popleft()
            before = self.state
            try:
                tr = self.machine.fire(ev)
            except IllegalEvent as exc:
                log.error("%s: hand-over aborted", exc)
                ev = ChildEvent.ABORT
                tr = self.machine.fire(ev)
            if tr.state is not before:
                log.debug("hot restart: %s -> %s (%s)", before.value, tr.state.value, ev.value)
            for action in tr.actions:
                follow = await self._perform(action)
                if follow is not None:  # the rest of this transition's actions are moot
                    queue.append(follow)
                    break
        return self.state

    async def _perform(self, action: ChildAction) -> ChildEvent | None:
        chan = self.chan
        proxy = self.proxy
        if action is ChildAction.SEND_HELLO:
            assert chan is not None
            hello = encode("hello", version=PROTOCOL_VERSION, pid=os.getpid(), secret=self.secret.decode("ascii", "replace"))
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    await chan.send(hello)
            except (OSError, trio.TooSlowError) as exc:
                self.failure = f"cannot say hello: {exc!r}"
                return ChildEvent.PARENT_LOST
        elif action is ChildAction.SEND_READY:
            # READY first: if the parent is gone or aborted the hand-over, the
            # send fails and we give up before accepting a single connection
            assert chan is not None
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    await chan.send(encode("ready"))
            except (OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:
                log.error("hot restart: the running proxy went away or aborted the hand-over (%r); giving up", exc)
                return ChildEvent.PARENT_LOST
            return ChildEvent.READY_SENT
        elif action is ChildAction.SEND_FAILED:
            if chan is not None:
                with trio.move_on_after(1):
                    try:
                        await chan.send(encode("failed", reason=self.failure or "gave up"))
                    except (OSError, trio.ClosedResourceError):
                        pass
        elif action is ChildAction.START_ACCEPTING:
            assert proxy is not None
            proxy.start_accepting()
            log.info("hot restart: warm and accepting (generation %d); the previous generation drains", proxy.generation)
        elif action is ChildAction.RESTORE_STATS:
            assert proxy is not None
            stats = self.final_stats if self.final_stats is not None else self.handover_stats
            try:
                proxy.stats.registry.restore(stats or {})
            except ValueError as exc:  # e.g. a metric relabelled by the upgrade
                log.error("hot restart: could not carry the previous generation's counters over: %s", exc)
                proxy.stats.error("counters_not_carried_over")
            log.info("hot restart: previous generation done; generation %d serves alone", proxy.generation)
        elif action is ChildAction.CLOSE:
            if chan is not None:
                chan.close()
        elif action is ChildAction.LEAD:
            if proxy is not None:
                proxy.hot_restart.fire(ParentEvent.PREDECESSOR_DONE)
        else:  # pragma: no cover - every action is handled above
            raise AssertionError(action)
        return None


async def take_over(
    path: str, secret_path: str | os.PathLike[str], timeout: float = 5.0
) -> tuple[ChildShell, dict[str, Any], dict[str, socket.socket]]:
    """Connect to a running proxy's hot-restart socket and receive its listeners.

    Args:
        path: the hot-restart socket.
        secret_path: the hand-over secret the running proxy wrote.
        timeout: deadline for the listeners to arrive.

    Returns:
        The child's shell (in WARMING; its channel stays open: READY and DONE
        travel on it), the LISTENERS message, and the sockets by name.

    Raises:
        HotRestartError: the secret cannot be read, the socket belongs to
            another user, refused, or the parent sent something unexpected.
        OSError: nothing listens on ``path``.
        trio.TooSlowError: no answer within ``timeout``.
        EOFError: the parent closed the connection instead.
    """
    try:
        secret = read_secret(secret_path)
    except SecretFileError as exc:
        raise HotRestartError(f"hot restart: cannot read the hand-over secret: {exc}") from None
    shell = ChildShell(secret)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        their_uid = peer_uid(sock)
    except OSError:
        sock.close()
        await shell.fire(ChildEvent.PARENT_LOST)
        raise
    if their_uid is not None and their_uid != os.geteuid():
        sock.close()  # never hand our secret to a socket someone else put there
        await shell.fire(ChildEvent.PARENT_LOST)
        raise HotRestartError(f"hot restart: {path} is served by uid {their_uid}, not by this user ({os.geteuid()})")
    shell.chan = chan = Channel(sock)
    try:
        if await shell.fire(ChildEvent.CONNECTED) is ChildState.FAILED:
            raise HotRestartError(f"hot restart: {shell.failure}")
        try:
            with trio.fail_after(timeout):
                msg, fds = await chan.recv()
        except (EOFError, trio.TooSlowError, HotRestartError, OSError):
            await shell.fire(ChildEvent.PARENT_LOST)
            raise
        event = shell.event_for(msg)
        if event is ChildEvent.LISTENERS and len(fds) != len(msg["names"]):
            event = ChildEvent.PARENT_LOST
        if await shell.fire(event) is not ChildState.WARMING:
            for fd in fds:
                os.close(fd)
            if event is ChildEvent.REFUSED:
                raise HotRestartError(f"hot restart refused: {msg['reason']}")
            raise HotRestartError(f"unexpected {msg['type']} with {len(fds)} descriptors")
    except BaseException:
        chan.close()
        raise
    shell.handover_stats = msg["stats"]
    socks = {name: socket.socket(fileno=fd) for name, fd in zip(msg["names"], fds)}
    return shell, msg, socks
