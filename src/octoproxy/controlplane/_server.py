"""The control-plane server: discovery sessions over WebSocket, state in a :class:`Store`.

Theory of operation: :meth:`ControlPlaneServer.serve` accepts WebSocket
connections at ``/v1/discovery`` (trio-websocket runs one task per connection
in its handler nursery). Each connection is a :class:`_Session` with three
tasks: the *reader* feeds ``ClientMessage`` s to the sans-IO
:class:`~octoproxy._xds_server.XdsServerSession` or performs registrations on
the store and acknowledges them; the *sender* waits until the core has dirty
names, looks them up in the store's view and sends what differs; the *lease
keeper* keeps the session's registrations alive while the connection is (a
message or a pong since the last round proves it), pinging an idle client,
and closes a client that does not answer. A closed connection leaves its
registrations to expire by TTL: the control plane cannot tell a dead proxy from
a proxy that lost only us, and a live one re-registers on its next connection.

The server subscribes once to the store's change notifications and marks the
sessions interested in a name dirty (an index by name keeps that O(interested)),
so a store change reaches subscribers after one view update and one send. All
writes on a connection go through :meth:`_Session.send`, under a lock, shielded
and with a deadline, so cancellation never cuts a message in half and a client
that stops reading cannot pin the server.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import NoReturn

import trio
from google.protobuf.message import DecodeError
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from .._errors import exception_leaves
from .._xds_client import RESOURCE_TYPES, DiscoveryError
from .._xds_server import XdsServerSession, check_endpoint, check_route_rules, check_service_name
from ..proto import octoproxy_discovery_pb2 as pb
from ._store import LeaseNotFound, Store, StoreChange, StoreError

__all__ = ["ControlPlaneServer", "DISCOVERY_PATH"]

logger = logging.getLogger("octoproxy.controlplane.server")

#: the WebSocket path of the discovery stream
DISCOVERY_PATH = "/v1/discovery"
MAX_MESSAGE_SIZE = 16 << 20


@dataclass
class _Registration:
    endpoint: pb.Endpoint
    lease_id: int
    ttl: float


class ControlPlaneServer:
    """Serves the discovery protocol from a store.

    The store must be running (``await nursery.start(store.run)``) before
    :meth:`serve` is started.

    Args:
        store: where registrations and route rules live.
        default_lease_ttl: TTL, in seconds, of a ``Register`` with
            ``lease_ttl_ms = 0``.
        min_lease_ttl: requested TTLs are raised to at least this.
        max_lease_ttl: requested TTLs are lowered to at most this.
        idle_ping_interval: how often a session without registrations pings
            its client to find out whether it is still there.
        send_timeout: deadline of every write to a client.
    """

    def __init__(
        self,
        store: Store,
        *,
        default_lease_ttl: float = 10.0,
        min_lease_ttl: float = 0.2,
        max_lease_ttl: float = 300.0,
        idle_ping_interval: float = 15.0,
        send_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.default_lease_ttl = default_lease_ttl
        self.min_lease_ttl = min_lease_ttl
        self.max_lease_ttl = max_lease_ttl
        self.idle_ping_interval = idle_ping_interval
        self.send_timeout = send_timeout
        self.sessions: set[_Session] = set()
        self._by_name: defaultdict[str, set[_Session]] = defaultdict(set)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host:port`` and serve until cancelled.

        Use as ``host, port = await nursery.start(server.serve, "127.0.0.1", 0)``.

        Args:
            host: address to bind.
            port: port to bind (0 picks one).
            task_status: receives the bound ``(host, port)`` once listening.

        Raises:
            OSError: if binding fails.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0 and len(listeners) > 1:
            for extra in listeners[1:]:
                await trio.aclose_forcefully(extra)
            listeners = listeners[:1]
        ws_server = WebSocketServer(
            self._handle,
            listeners,
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=self.send_timeout,
            disconnect_timeout=2.0,
        )
        bound = listeners[0].socket.getsockname()
        with self.store.listen(self._on_store_change):
            async with trio.open_nursery() as nursery:
                await nursery.start(ws_server.run)
                task_status.started((bound[0], bound[1]))
        raise AssertionError("WebSocketServer.run returned")  # pragma: no cover

    # ------------------------------------------------------------ fan-out
    def _on_store_change(self, change: StoreChange) -> None:
        if change.name is None:
            for session in self.sessions:
                session.core.mark_all_changed()
                session.wake()
            return
        for session in self._by_name.get(change.name, ()):
            if session.core.mark_changed(change.type_url, change.name):
                session.wake()

    def _index(self, session: _Session) -> None:
        names = set().union(*(session.core.subscribed(t) for t in RESOURCE_TYPES))
        for name in session.indexed - names:
            self._by_name[name].discard(session)
            if not self._by_name[name]:
                del self._by_name[name]
        for name in names - session.indexed:
            self._by_name[name].add(session)
        session.indexed = names

    # ------------------------------------------------------------ connections
    async def _handle(self, request: WebSocketRequest) -> None:
        if request.path != DISCOVERY_PATH:
            await request.reject(404, body=b"not found: the discovery stream is at /v1/discovery\n")
            return
        ws = await request.accept()
        session = _Session(self, ws)
        self.sessions.add(session)
        try:
            await session.run()
        except BaseException as exc:  # (no except* here: Python 3.10 is supported)
            leaves = exception_leaves(exc)
            if any(not isinstance(e, Exception) for e in leaves):
                raise  # Cancelled, KeyboardInterrupt: not ours to swallow
            protocol = [e for e in leaves if isinstance(e, (DiscoveryError, DecodeError))]
            if all(isinstance(e, (ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError)) for e in leaves):
                logger.debug("session %s ended: %r", session.peer, leaves[0])
            elif protocol:
                logger.warning("session %s: protocol error: %s", session.peer, protocol[0])
                with trio.move_on_after(1.0):
                    await ws.aclose(1002, str(protocol[0])[:120])
            else:  # a bug must cost one connection, never the server
                logger.error("session %s failed", session.peer, exc_info=exc)
        finally:
            self.sessions.discard(session)
            session.indexed, names = set(), session.indexed
            for name in names:
                self._by_name[name].discard(session)
                if not self._by_name[name]:
                    del self._by_name[name]


class _Session:
    def __init__(self, server: ControlPlaneServer, ws: WebSocketConnection) -> None:
        self.server = server
        self.store = server.store
        self.ws = ws
        self.peer = str(ws.remote)
        self.core = XdsServerSession(nonce_prefix=secrets.token_hex(4) + "-")
        self.indexed: set[str] = set()
        self.registrations: dict[tuple[str, str], _Registration] = {}
        self._wakeup = trio.Event()
        self._regs_changed = trio.Event()
        self._alive = True
        self._send_lock = trio.Lock()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender)
            nursery.start_soon(self._lease_keeper)
            try:
                await self._reader()
            finally:
                nursery.cancel_scope.cancel()

    async def send(self, msg: pb.ServerMessage) -> None:
        data = msg.SerializeToString()
        async with self._send_lock:
            with trio.CancelScope(shield=True), trio.fail_after(self.server.send_timeout):
                await self.ws.send_message(data)

    # ------------------------------------------------------------ reader
    async def _reader(self) -> None:
        while True:
            data = await self.ws.get_message()
            if isinstance(data, str):
                raise DiscoveryError("text message on the discovery stream (want binary protobuf)")
            msg = pb.ClientMessage.FromString(data)
            self._alive = True
            kind = msg.WhichOneof("message")
            if kind == "discovery":
                outcome = self.core.on_request(msg.discovery)
                if outcome.subscribed or outcome.unsubscribed:
                    self.server._index(self)
                if outcome.nack is not None:
                    logger.warning(
                        "node %r rejected %s %s: %s",
                        self.core.node_id,
                        outcome.nack.type_url,
                        outcome.nack.versions,
                        outcome.nack.message,
                    )
                if self.core.has_dirty():
                    self.wake()
            elif kind == "keepalive":
                pass  # _alive is enough
            elif kind is not None:
                ack = await self._registration(kind, msg)
                await self.send(pb.ServerMessage(ack=ack))
            # an empty ClientMessage (a newer client's unknown kind) is ignored

    async def _registration(self, kind: str, msg: pb.ClientMessage) -> pb.RegisterAck:
        try:
            if kind == "register":
                return await self._register(msg.register)
            if kind == "deregister":
                d = msg.deregister
                reg = self.registrations.pop((d.service, d.address), None)
                self._regs_changed.set()
                found = await self.store.delete_endpoint(d.service, d.address)
                if reg is not None:
                    await self._revoke_if_unused(reg.lease_id)
                return pb.RegisterAck(request_id=d.request_id, error="" if found or reg else "not registered")
            if kind == "set_status":
                s = msg.set_status
                reg = self.registrations.get((s.service, s.address))
                if reg is not None:
                    reg.endpoint.status = s.status
                    await self._put(s.service, reg)
                    return pb.RegisterAck(request_id=s.request_id)
                found = await self.store.set_status(s.service, s.address, s.status)
                return pb.RegisterAck(request_id=s.request_id, error="" if found else "not registered")
            if kind == "put_route_rules":
                p = msg.put_route_rules
                error = check_route_rules(p.rules)
                if error is None:
                    await self.store.put_route_rules(p.rules)
                return pb.RegisterAck(request_id=p.request_id, error=error or "")
        except StoreError as exc:
            logger.warning("%s from %s failed: %s", kind, self.peer, exc)
            return pb.RegisterAck(request_id=getattr(msg, kind).request_id, error=f"store error: {exc}")
        raise DiscoveryError(f"unexpected message {kind!r}")  # pragma: no cover

    async def _register(self, r: pb.Register) -> pb.RegisterAck:
        error = check_service_name(r.service) or check_endpoint(r.endpoint)
        if error is not None:
            return pb.RegisterAck(request_id=r.request_id, error=error)
        srv = self.server
        ttl = r.lease_ttl_ms / 1000 if r.lease_ttl_ms else srv.default_lease_ttl
        ttl = min(max(ttl, srv.min_lease_ttl), srv.max_lease_ttl)
        key = (r.service, r.endpoint.address)
        old = self.registrations.get(key)
        endpoint = pb.Endpoint()
        endpoint.CopyFrom(r.endpoint)
        if old is not None and old.ttl == ttl:
            reg = _Registration(endpoint, old.lease_id, old.ttl)
        else:
            lease = await self.store.grant_lease(ttl)
            reg = _Registration(endpoint, lease.id, lease.ttl)
        await self._put(r.service, reg)
        self.registrations[key] = reg
        self._regs_changed.set()
        if old is not None and old.lease_id != reg.lease_id:
            await self._revoke_if_unused(old.lease_id)
        return pb.RegisterAck(request_id=r.request_id, lease_ttl_ms=round(reg.ttl * 1000))

    async def _put(self, service: str, reg: _Registration) -> None:
        """Put under the registration's lease; a lease lost meanwhile is replaced."""
        try:
            await self.store.put_endpoint(service, reg.endpoint, reg.lease_id)
        except LeaseNotFound:
            lease = await self.store.grant_lease(reg.ttl)
            reg.lease_id, reg.ttl = lease.id, lease.ttl
            await self.store.put_endpoint(service, reg.endpoint, reg.lease_id)

    async def _revoke_if_unused(self, lease_id: int) -> None:
        if all(r.lease_id != lease_id for r in self.registrations.values()):
            await self.store.revoke_lease(lease_id)

    # ------------------------------------------------------------ sender
    async def _sender(self) -> None:
        while True:
            if not self.core.has_dirty():
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            for type_url, names in self.core.take_dirty().items():
                current = {name: self.store.view.lookup(type_url, name) for name in names}
                msg = self.core.make_response(type_url, current, str(self.store.view.revision))
                if msg is not None:
                    await self.send(msg)

    # ------------------------------------------------------------ leases
    def _period(self) -> float:
        if not self.registrations:
            return self.server.idle_ping_interval
        return min(r.ttl for r in self.registrations.values()) / 3

    async def _lease_keeper(self) -> None:
        last = trio.current_time()
        while True:
            with trio.move_on_at(last + self._period()):
                await self._regs_changed.wait()
            self._regs_changed = trio.Event()
            now = trio.current_time()
            if now < last + self._period():
                continue  # registrations changed: recompute the period
            last = now
            if not self._alive:
                with trio.fail_after(max(self._period(), 0.5)):
                    await self.ws.ping()  # TooSlowError ends the session
            self._alive = False
            for key, reg in list(self.registrations.items()):
                try:
                    if not await self.store.keepalive_lease(reg.lease_id) and self.registrations.get(key) is reg:
                        logger.warning("lease of %s/%s was lost: registering again", *key)
                        await self._put(key[0], reg)
                except StoreError as exc:  # retried next round; the TTL leaves some slack
                    logger.warning("keeping %s/%s alive failed: %s", *key, exc)
