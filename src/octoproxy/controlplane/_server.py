"""The control-plane server: discovery sessions over WebSocket, state in a :class:`Store`.

Theory of operation: :meth:`ControlPlaneServer.serve` accepts WebSocket
connections at ``/v1/discovery`` (trio-websocket runs one task per connection
in its handler nursery). Each connection is a :class:`_Session` with three
tasks: the *reader* feeds ``ClientMessage`` s to the sans-IO
:class:`~octoproxy.discovery._xds_server.XdsServerSession` or performs registrations on
the store and acknowledges them; the *sender* waits until the core has dirty
names, looks them up in the store's view and sends what differs; the *lease
keeper* keeps the session's registrations alive while the connection is (a
message or a pong since the last round proves it), pinging an idle client,
and closes a client that does not answer.

Every session is authenticated at the WebSocket handshake (see
:mod:`~octoproxy.controlplane._auth`): an operator token, a service's join
token, or a client certificate this control plane's CA issued; anything else
gets 401 and one rate-limited log line. A service principal may register,
deregister and set the status of its own service's endpoints only, and read
only its own service's configuration and authorization policy; route rules
and authorization policies are written by operators. Each session is bounded: registrations
(``max_registrations_per_session``), subscriptions (``max_subscriptions``),
message size, sessions per peer address; going over one ends the session (or
refuses the request) with a message that names the limit and its option.

A lease dies with the session that made it: when the *client's* connection
ends (closed, broken, silent), the session's leases are revoked after
``lease_grace`` seconds (so that a hot-restarted proxy, whose successor
registers the same address on its own session, hands over without a gap:
its registration then no longer belongs to the old lease). A control plane
that is shut down or dies revokes nothing: its sessions' registrations live
until their TTL, and the proxies re-register on another replica.

The server subscribes once to the store's change notifications and marks the
sessions interested in a name dirty (an index by name keeps that O(interested)),
so a store change reaches subscribers after one view update and one send. All
writes on a connection go through :meth:`_Session.send`, under a lock, shielded
and with a deadline, so cancellation never cuts a message in half and a client
that stops reading cannot pin the server.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import secrets
import ssl
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import trio
from google.protobuf.message import DecodeError
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from ..discovery import _appconfig
from ..discovery._xds_client import DISCOVERY_PATH, MAX_MESSAGE_SIZE, MESSAGE_TOO_BIG, POLICY_VIOLATION
from ..protocol._errors import exception_leaves
from ..discovery._xds_client import RESOURCE_TYPES, TYPE_APPCONFIG, TYPE_AUTHZ, DiscoveryError
from ..discovery._xds_server import (
    DEFAULT_MAX_SUBSCRIPTION_BYTES,
    DEFAULT_MAX_SUBSCRIPTIONS,
    LimitExceeded,
    Network,
    XdsServerSession,
    check_endpoint,
    check_route_rules,
    check_service_name,
)
from ..identity import DEFAULT_LEAF_TTL, parse_spiffe_id
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ..common._memory import trim_memory
from ._auth import Authenticator, Principal, RateLimitedLog
from ._issuance import answer_certificate_request
from ._store import TYPE_TOKENS, LeaseNotFound, Store, StoreChange, StoreError, resource_version, stamp_warmup

if TYPE_CHECKING:  # (cryptography is imported when a CA is made, not by every proxy)
    from ..identity import CertificateAuthority

__all__ = ["ControlPlaneServer", "DISCOVERY_PATH"]

logger = logging.getLogger("octoproxy.controlplane.server")

#: what the server accepts from one client message by default
DEFAULT_MAX_CLIENT_MESSAGE = 4 << 20
DEFAULT_MAX_REGISTRATIONS = 16
DEFAULT_MAX_SESSIONS_PER_PEER = 64
#: closed sessions' subscriptions (plus 1,000 per session) that make a memory release due
RELEASE_WEIGHT = 20_000
#: seconds from a release becoming due to doing it
RELEASE_DELAY = 0.5
#: seconds between two memory releases (a full collection and ``malloc_trim``)
RELEASE_INTERVAL = 2.0


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
        auth: who may connect. Default: an :class:`Authenticator` with a
            fresh random operator token (:attr:`operator_token`) and the
            store's join tokens: authentication is never off by default.
        ca: the certificate authority that answers ``CertificateRequest``
            (``None``: requests are refused with a clear error).
        leaf_ttl: lifetime of issued certificates, seconds.
        allowed_networks: endpoint addresses in these networks pass the
            link-local/unspecified/multicast/broadcast check.
        max_registrations_per_session: endpoints one session may register.
        max_subscriptions: names one session may subscribe to, per type.
        max_subscription_bytes: total length of the names one session may
            subscribe to, all types (0: no budget).
        max_message_size: largest client message accepted, bytes.
        max_sessions_per_peer: concurrent sessions from one IP address.
        lease_grace: seconds between a client's connection ending and the
            revocation of its session's leases.
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
        auth: Authenticator | None = None,
        ca: CertificateAuthority | None = None,
        leaf_ttl: float = DEFAULT_LEAF_TTL,
        allowed_networks: Iterable[str | Network] = (),
        max_registrations_per_session: int = DEFAULT_MAX_REGISTRATIONS,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_subscription_bytes: int = DEFAULT_MAX_SUBSCRIPTION_BYTES,
        max_message_size: int = DEFAULT_MAX_CLIENT_MESSAGE,
        max_sessions_per_peer: int = DEFAULT_MAX_SESSIONS_PER_PEER,
        lease_grace: float = 2.0,
    ) -> None:
        self.store = store
        self.default_lease_ttl = default_lease_ttl
        self.min_lease_ttl = min_lease_ttl
        self.max_lease_ttl = max_lease_ttl
        self.idle_ping_interval = idle_ping_interval
        self.send_timeout = send_timeout
        #: the operator token when ``auth`` was not given (else ``None``)
        self.operator_token: str | None = None
        if auth is None:
            self.operator_token = secrets.token_urlsafe(32)
            auth = Authenticator(self.operator_token, lambda: store.view.tokens)
        self.auth = auth
        self.ca = ca
        self.leaf_ttl = leaf_ttl
        self.allowed_networks = tuple(ipaddress.ip_network(n) for n in allowed_networks)
        self.max_registrations_per_session = max_registrations_per_session
        self.max_subscriptions = max_subscriptions
        self.max_subscription_bytes = max_subscription_bytes
        self.max_message_size = max_message_size
        self.max_sessions_per_peer = max_sessions_per_peer
        self.lease_grace = lease_grace
        self.sessions: set[_Session] = set()
        self._by_name: defaultdict[str, set[_Session]] = defaultdict(set)
        self._per_peer: defaultdict[str, int] = defaultdict(int)
        self._refused_log = RateLimitedLog(logger.warning)
        self._limit_log = RateLimitedLog(logger.warning)
        self._too_big_log = RateLimitedLog(logger.warning)
        #: what closed sessions held since the last memory release (see :meth:`_memory_keeper`)
        self._released_weight = 0
        self._release_due = trio.Event()
        #: sessions closed for a message over ``max_message_size``
        self.oversized_messages = 0
        #: memory releases done (full collection + ``malloc_trim``)
        self.memory_releases = 0
        self._nursery: trio.Nursery | None = None
        #: app configuration bodies by name: (the record they were made from, version -> (hash, body))
        self._app_configs: dict[str, tuple[pb.AppConfigRecord, dict[int, tuple[str, bytes]]]] = {}
        #: sessions refused at the handshake, by reason (401, 429)
        self.refused = {"unauthenticated": 0, "too_many_sessions": 0}

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host:port`` and serve until cancelled.

        Use as ``host, port = await nursery.start(server.serve, "127.0.0.1", 0)``.

        Args:
            host: address to bind.
            port: port to bind (0 picks one).
            ssl_context: serve TLS (``wss://``) with this server context; if
                it verifies client certificates (``CERT_OPTIONAL`` or
                ``CERT_REQUIRED``, against this control plane's CA), a peer
                certificate naming ``spiffe://<td>/svc/<service>``
                authenticates the session as that service.
            task_status: receives the bound ``(host, port)`` once listening.

        Raises:
            OSError: if binding fails.
        """
        tcp_listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0 and len(tcp_listeners) > 1:
            for extra in tcp_listeners[1:]:
                await trio.aclose_forcefully(extra)
            tcp_listeners = tcp_listeners[:1]
        bound = tcp_listeners[0].socket.getsockname()
        listeners: list[trio.SSLListener[trio.SocketStream] | trio.SocketListener] = list(tcp_listeners)
        if ssl_context is not None:
            listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp_listeners]
        ws_server = WebSocketServer(
            self._handle,
            listeners,
            max_message_size=self.max_message_size,
            connect_timeout=self.send_timeout,
            disconnect_timeout=2.0,
        )
        with self.store.listen(self._on_store_change):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(ws_server.run)
                nursery.start_soon(self._memory_keeper)
                task_status.started((bound[0], bound[1]))
        raise AssertionError("WebSocketServer.run returned")  # pragma: no cover

    # ------------------------------------------------------------ fan-out
    def _on_store_change(self, change: StoreChange) -> None:
        if change.type_url == TYPE_TOKENS:
            if change.name is not None and change.name not in self.store.view.tokens:
                for session in list(self.sessions):  # revoked: its sessions end
                    if session.principal.token_id == change.name:
                        session.close_for(f"join token {change.name} was revoked")
            return
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

    # ------------------------------------------------------------ memory
    def _session_closed(self, weight: int) -> None:
        self._released_weight += weight
        if self._released_weight >= RELEASE_WEIGHT:
            self._release_due.set()

    async def _memory_keeper(self) -> None:
        """Give closed sessions' memory back after a burst of closes (rate-limited).

        The control plane freezes its start-up objects and raises the GC
        thresholds (``tune_gc``): full collections then almost never run, and
        a closed session's cycles (Trio tasks, tracebacks, the WebSocket and
        its buffers) with its subscription sets would stay in the old
        generation. Once closed sessions held enough (:data:`RELEASE_WEIGHT`),
        :data:`RELEASE_DELAY` later, at most every :data:`RELEASE_INTERVAL` seconds: a full collection,
        then glibc ``malloc_trim(0)`` so the freed arenas leave the RSS.
        """
        while True:
            await self._release_due.wait()
            # let the burst finish and trio-websocket tear the connections down
            # (their buffers become garbage only after our handlers return)
            await trio.sleep(RELEASE_DELAY)
            self._release_due = trio.Event()
            self._released_weight = 0
            gc.collect()
            trim_memory()
            self.memory_releases += 1
            await trio.sleep(RELEASE_INTERVAL)

    # ------------------------------------------------------------ connections
    def _peer_certificate_service(self, request: WebSocketRequest) -> str | None:
        """The service named by the peer's verified client certificate, if any."""
        # trio-websocket does not expose the stream; its connection keeps it
        # as ``_stream`` (an SSLStream on a TLS listener, handshake done).
        stream = getattr(getattr(request, "_connection", None), "_stream", None)
        if not isinstance(stream, trio.SSLStream):
            return None
        try:
            cert = stream.getpeercert()
        except (ValueError, ssl.SSLError, trio.BrokenResourceError):
            return None
        if not cert:
            return None  # none sent (or not verified: then getpeercert() is empty)
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        for uri in uris:
            try:
                return parse_spiffe_id(str(uri), self.auth.trust_domain)
            except ValueError:
                continue
        return None

    async def _handle(self, request: WebSocketRequest) -> None:
        if request.path != DISCOVERY_PATH:
            await request.reject(404, body=b"not found: the discovery stream is at /v1/discovery\n")
            return
        remote = request.remote
        peer_ip = remote.address if hasattr(remote, "address") else str(remote)
        peer_ip = str(peer_ip)
        now = trio.current_time()
        if self._per_peer[peer_ip] >= self.max_sessions_per_peer:
            self.refused["too_many_sessions"] += 1
            msg = (
                f"too many sessions from {peer_ip} (limit {self.max_sessions_per_peer}: "
                "raise it with --max-sessions-per-peer)"
            )
            self._limit_log(now, f"refused a session: {msg}")
            await request.reject(429, body=(msg + "\n").encode())
            return
        authorization = next(
            (v.decode("latin-1") for k, v in request.headers if k.lower() == b"authorization"), None
        )
        principal = self.auth.authenticate(
            authorization, time.time(), certificate_service=self._peer_certificate_service(request)
        )
        if isinstance(principal, str):
            self.refused["unauthenticated"] += 1
            self._refused_log(now, f"refused an unauthenticated session from {remote}: {principal}")
            await request.reject(
                401,
                extra_headers=[(b"WWW-Authenticate", b'Bearer realm="octoproxy"')],
                body=f"unauthenticated: {principal}\n".encode(),
            )
            return
        ws = await request.accept()
        session = _Session(self, ws, principal)
        self.sessions.add(session)
        self._per_peer[peer_ip] += 1
        client_gone = False
        try:
            with session.scope:
                await session.run()
            if session.closed_for:
                logger.warning("session %s (%s) closed: %s", session.peer, principal.describe(), session.closed_for)
                client_gone = True
                with trio.move_on_after(1.0):
                    await ws.aclose(POLICY_VIOLATION, session.closed_for[:120])
        except BaseException as exc:  # (no except* here: Python 3.10 is supported)
            leaves = exception_leaves(exc)
            if any(not isinstance(e, Exception) for e in leaves):
                raise  # Cancelled, KeyboardInterrupt: not ours to swallow
            client_gone = True
            limit = [e for e in leaves if isinstance(e, LimitExceeded)]
            protocol = [e for e in leaves if isinstance(e, (DiscoveryError, DecodeError))]
            too_big = ws.closed is not None and ws.closed.code == MESSAGE_TOO_BIG
            if too_big:
                self.oversized_messages += 1
                self._too_big_log(
                    trio.current_time(),
                    f"session {session.peer} ({principal.describe()}) sent a message over the limit of "
                    f"{self.max_message_size} bytes: closed (raise it with --max-message-size)",
                )
            elif all(isinstance(e, (ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError)) for e in leaves):
                logger.debug("session %s ended: %r", session.peer, leaves[0])
            elif limit:
                self._limit_log(trio.current_time(), f"session {session.peer} ({principal.describe()}): {limit[0]}")
                with trio.move_on_after(1.0):
                    await ws.aclose(POLICY_VIOLATION, str(limit[0])[:120])
            elif protocol:
                logger.warning("session %s: protocol error: %s", session.peer, protocol[0])
                with trio.move_on_after(1.0):
                    await ws.aclose(1002, str(protocol[0])[:120])
            else:  # a bug must cost one connection, never the server
                logger.error("session %s failed", session.peer, exc_info=exc)
        finally:
            self.sessions.discard(session)
            self._per_peer[peer_ip] -= 1
            if self._per_peer[peer_ip] <= 0:
                del self._per_peer[peer_ip]
            session.indexed, names = set(), session.indexed
            for name in names:
                self._by_name[name].discard(session)
                if not self._by_name[name]:
                    del self._by_name[name]
            leases = {r.lease_id for r in session.registrations.values()}
            session.registrations.clear()
            self._session_closed(1_000 + len(names) + session.core.release())
            if client_gone and leases and self._nursery is not None:
                self._nursery.start_soon(self._revoke_later, session.peer, leases)

    async def _revoke_later(self, peer: str, leases: set[int]) -> None:
        """A lease dies with its session (after ``lease_grace``: see the module doc)."""
        await trio.sleep(self.lease_grace)
        for lease_id in leases:
            try:
                with trio.fail_after(self.send_timeout):
                    await self.store.revoke_lease(lease_id)
            except (StoreError, trio.TooSlowError) as exc:  # the TTL ends it anyway
                logger.warning("revoking lease %d of closed session %s failed: %s", lease_id, peer, exc)
        logger.debug("revoked %d leases of closed session %s", len(leases), peer)


class _Session:
    def __init__(self, server: ControlPlaneServer, ws: WebSocketConnection, principal: Principal) -> None:
        self.server = server
        self.store = server.store
        self.ws = ws
        self.principal = principal
        self.peer = str(ws.remote)
        self.scope = trio.CancelScope()
        self.closed_for = ""
        self.core = XdsServerSession(
            nonce_prefix=secrets.token_hex(4) + "-",
            max_subscriptions=server.max_subscriptions,
            max_subscription_bytes=server.max_subscription_bytes,
        )
        self.indexed: set[str] = set()
        self.registrations: dict[tuple[str, str], _Registration] = {}
        self._wakeup = trio.Event()
        self._regs_changed = trio.Event()
        self._alive = True
        self._send_lock = trio.Lock()

    def wake(self) -> None:
        self._wakeup.set()

    def close_for(self, reason: str) -> None:
        """End this session (its credentials were revoked): close code 1008 with ``reason``."""
        self.closed_for = reason
        self.scope.cancel()

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
            elif kind == "certificate_request":
                await self.send(pb.ServerMessage(certificate=self._certificate(msg.certificate_request)))
            elif kind is not None:
                ack = await self._registration(kind, msg)
                await self.send(pb.ServerMessage(ack=ack))
            # an empty ClientMessage (a newer client's unknown kind) is ignored

    def _certificate(self, req: pb.CertificateRequest) -> pb.CertificateResponse:
        """Sign the CSR for this session's service (never for a name the CSR asks)."""
        srv = self.server
        return answer_certificate_request(srv.ca, self.principal, srv.auth.trust_domain, srv.leaf_ttl, req, time.time())

    def _forbidden(self, what: str, service: str) -> str | None:
        if self.principal.may_write(service):
            return None
        if self.principal.kind == "service":
            return (
                f"permission denied: {what} {service!r}: this session is service "
                f"{self.principal.service!r} and may change only its own endpoints"
            )
        return f"permission denied: {what} {service!r}"  # pragma: no cover (no other kinds)

    async def _registration(self, kind: str, msg: pb.ClientMessage) -> pb.RegisterAck:
        request_id = getattr(msg, kind).request_id
        if kind in ("register", "deregister", "set_status"):
            denied = self._forbidden(kind.replace("_", " "), getattr(msg, kind).service)
            if denied is not None:
                logger.warning("session %s (%s): %s", self.peer, self.principal.describe(), denied)
                return pb.RegisterAck(request_id=request_id, error=denied)
        elif kind == "put_route_rules" and not self.principal.is_operator:
            return pb.RegisterAck(
                request_id=request_id, error="permission denied: route rules are changed by operators only"
            )
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
        srv = self.server
        error = check_service_name(r.service) or check_endpoint(r.endpoint, srv.allowed_networks)
        if error is None and (r.service, r.endpoint.address) not in self.registrations:
            if len(self.registrations) >= srv.max_registrations_per_session:
                error = (
                    f"too many registrations on one session (limit {srv.max_registrations_per_session}: "
                    "raise it with --max-registrations-per-session)"
                )
        if error is not None:
            return pb.RegisterAck(request_id=r.request_id, error=error)
        ttl = r.lease_ttl_ms / 1000 if r.lease_ttl_ms else srv.default_lease_ttl
        ttl = min(max(ttl, srv.min_lease_ttl), srv.max_lease_ttl)
        key = (r.service, r.endpoint.address)
        old = self.registrations.get(key)
        endpoint = pb.Endpoint()
        endpoint.CopyFrom(r.endpoint)
        stamp_warmup(self.store.view, r.service, endpoint, time.time())
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
                if type_url == TYPE_APPCONFIG:
                    current = {name: self._app_config(name) for name in names}
                elif type_url == TYPE_AUTHZ:
                    current = {name: self._authz(name) for name in names}
                else:
                    current = {name: self.store.view.lookup(type_url, name) for name in names}
                msg = self.core.make_response(type_url, current, str(self.store.view.revision))
                if msg is not None:
                    await self.send(msg)

    def _authz(self, name: str) -> tuple[str, bytes] | None:
        """Service ``name``'s authorization policy, if this session may read it.

        A service principal reads only its own service's policy (who may call
        whom is not every service's business): any other name is answered as
        absent (and logged, rate-limited), as if it did not exist.
        """
        if not self.principal.is_operator and name != self.principal.service:
            self.server._limit_log(
                trio.current_time(),
                f"session {self.peer} ({self.principal.describe()}): permission denied: authorization policy of {name!r}",
            )
            return None
        return self.store.view.lookup(TYPE_AUTHZ, name)

    def _app_config(self, name: str) -> tuple[str, bytes] | None:
        """The configuration ``name`` resolved for this session's instance (its node id).

        A service principal reads only its own service's configuration: any
        other name is answered as absent (and logged), as if it did not exist.
        """
        try:
            service, _env = _appconfig.split_name(name)
        except _appconfig.AppConfigError:
            return None
        if not self.principal.is_operator and service != self.principal.service:
            self.server._limit_log(
                trio.current_time(),
                f"session {self.peer} ({self.principal.describe()}): permission denied: configuration of {service!r}",
            )
            return None
        record = self.store.view.app_configs.get(name)
        if record is None:
            self.server._app_configs.pop(name, None)
            return None
        version = _appconfig.chosen_version(record, self.core.node_id or self.peer)
        cached = self.server._app_configs.get(name)
        if cached is None or cached[0] is not record:  # a new record object: a change
            cached = (record, {})
            self.server._app_configs[name] = cached
        found = cached[1].get(version)
        if found is None:  # encoded once per version, not once per session
            resolved = _appconfig.resolve(record, self.core.node_id or self.peer)
            if resolved is None:
                return None
            body = resolved.SerializeToString(deterministic=True)
            found = cached[1][version] = (resource_version(body), body)
        return found

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

