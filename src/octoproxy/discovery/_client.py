"""The proxy's discovery client: one WebSocket to one control plane at a time (Trio shell).

Theory of operation: :meth:`DiscoveryClient.run` loops over the control-plane
URLs: connect, run a session until it breaks, back off (not after a session
that worked: the next URL is tried at once), go on with the next URL. The
protocol state lives in a sans-IO :class:`~octoproxy.discovery._xds_client.XdsClient`
that outlives connections: on each new connection its
:meth:`~octoproxy.discovery._xds_client.XdsClient.on_reconnect` re-subscribes with the
versions held, every registration is sent again, and every request still
waiting for its acknowledgement is resent. While disconnected, held resources
stay as they were: only the control plane removes them.

A session has a reader (responses -> core -> ACK/NACK and ``on_change``;
acknowledgements -> waiting callers), a writer (the only task that writes:
it drains an outbox that core steps append to synchronously, so messages leave
in the order the state changed), and a pinger (WebSocket ping with a
deadline; ``LeaseKeepAlive`` when there are registrations). Any of them
failing closes the session.

Public calls (``subscribe``, ``register``...) change the core or the
registration table at once, queue what to send if connected, and wait (with
a deadline) for the answer: a call that times out has still been recorded and
takes effect on the next connection. :meth:`DiscoveryClient.request_certificate`
is the exception: it needs a live session and fails if the session ends.

Every connection authenticates: ``Authorization: Bearer <join token>`` in the
WebSocket handshake (``token``), and/or a client certificate (``ssl_context``,
``wss://`` URLs). A refusal (401, or the session closed with code 1008 for a
limit or a revoked token) is logged once per connection attempt with the
control plane's reason, and retried with back-off.
"""

from __future__ import annotations

import logging
import math
import random
import re
import ssl
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Union

import trio
from google.protobuf.message import DecodeError, Message
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from ..protocol._errors import exception_leaves
from ._xds_client import MAX_MESSAGE_SIZE, MESSAGE_TOO_BIG, POLICY_VIOLATION, TYPE_ENDPOINTS, TYPE_ROUTES, DiscoveryError, ResourceChange, Validator, XdsClient
from ..protocol.proto import octoproxy_discovery_pb2 as pb

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["DiscoveryClient", "OnChange"]

logger = logging.getLogger("octoproxy.controlplane.client")

#: ``on_change(changes)``: called after every response that changed held resources.
OnChange = Callable[[list[ResourceChange]], None]

_CONNECTION_ERRORS = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Pending:
    message: pb.ClientMessage
    done: trio.Event = field(default_factory=trio.Event)
    error: str = ""
    certificate: pb.CertificateResponse | None = None

    @property
    def resendable(self) -> bool:
        return bool(self.message.WhichOneof("message") != "certificate_request")


#: ``token``: a join token, or a function returning one (read at each connection)
TokenSource = Union[str, Callable[[], "str | None"], None]

#: the smallest request size the client shrinks to after "message too big" closes
MIN_REQUEST_BYTES = 16 << 10


def _refusal(leaves: list[BaseException]) -> str:
    """Why the control plane refused us (401/403/429, or a 1008 close), or ``""``."""
    for e in leaves:
        if isinstance(e, ConnectionRejected) and e.status_code in (401, 403, 429):
            body = (e.body or b"").decode(errors="replace").strip()
            return f"HTTP {e.status_code}: {body[:200]}"
        if isinstance(e, ConnectionClosed) and e.reason is not None and e.reason.code == POLICY_VIOLATION:
            return f"session closed: {e.reason.reason}"
        if isinstance(e, ConnectionClosed) and e.reason is not None and e.reason.code == MESSAGE_TOO_BIG:
            return f"session closed: {e.reason.reason} (the control plane's --max-message-size)"
    return ""


@dataclass
class _Registration:
    endpoint: pb.Endpoint
    ttl: float
    request_id: int = 0


class DiscoveryClient:
    """Keeps a proxy's subscriptions and registrations on a control plane.

    Start it with ``await nursery.start(client.run)`` (it reports started at
    once; use :meth:`wait_connected` to wait for a connection).

    Args:
        urls: control-plane URLs, e.g. ``["ws://127.0.0.1:15010/v1/discovery"]``;
            tried in order, failing over to the next on error.
        node_id: this proxy's identity (appears in control-plane logs).
        on_change: called with the list of :class:`ResourceChange` after each
            response that changed a held resource (exceptions are logged).
        validate: ``validate(type_url, name, resource)``; raising rejects
            (NACKs) the whole response, which leaves the held state unchanged.
        connect_timeout: deadline of connecting plus the WebSocket handshake.
        ping_interval: how often the connection is checked with a ping.
        ping_timeout: a pong later than this closes the connection.
        backoff: ``(first, max)`` delay in seconds between failed attempts.
        token: the join (or operator) token sent as ``Authorization: Bearer``
            in every handshake, or a function returning it (called at each
            connection, so a token file can be replaced), or ``None``.
        ssl_context: client TLS context for ``wss://`` URLs (trust the
            control plane's CA; load this proxy's certificate into it to
            authenticate by certificate). Settable: takes effect on the next
            connection.
        refusal_backoff: the longest delay, seconds, between attempts while
            the control plane keeps refusing this client (401/429, or a
            session closed for a limit or an oversized message); doubles
            from ``backoff[0]`` on each refusal.

    Raises:
        ValueError: if ``urls`` is empty.
    """

    def __init__(
        self,
        urls: Sequence[str],
        node_id: str,
        on_change: OnChange | None = None,
        *,
        validate: Validator | None = None,
        connect_timeout: float = 2.0,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        backoff: tuple[float, float] = (0.05, 2.0),
        token: TokenSource = None,
        ssl_context: ssl.SSLContext | None = None,
        refusal_backoff: float = 30.0,
    ) -> None:
        if not urls:
            raise ValueError("need at least one control-plane URL")
        self.urls = list(urls)
        self.node_id = node_id
        self.on_change = on_change
        self.validate = validate
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff = backoff
        self.token = token
        self.ssl_context = ssl_context
        self.refusal_backoff = refusal_backoff
        #: why the last connection attempt or session was refused ("" once the control plane answers again)
        self.refused = ""
        self.core = XdsClient(node_id)
        #: the URL of the current connection, ``None`` while disconnected
        self.url: str | None = None
        #: how many connections were established so far
        self.connections = 0
        self._registrations: dict[tuple[str, str], _Registration] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._outbox: deque[pb.ClientMessage] | None = None  # None while disconnected
        self._outbox_ready = trio.Event()
        self._changed = trio.Event()
        #: the largest message sent on the current session: (size, message)
        self._largest: tuple[int, pb.ClientMessage | None] = (0, None)

    # ------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        """True while a session with a control plane is up."""
        return self._outbox is not None

    def held(self, type_url: str = TYPE_ENDPOINTS) -> dict[str, Message]:
        """Return ``{service: resource}`` held for ``type_url`` (kept while disconnected)."""
        return self.core.held(type_url)

    def is_absent(self, name: str, type_url: str = TYPE_ENDPOINTS) -> bool:
        """True if the control plane said ``name`` does not exist."""
        return self.core.is_absent(type_url, name)

    def registrations(self) -> dict[tuple[str, str], pb.Endpoint]:
        """Return ``{(service, address): endpoint}`` this client keeps registered."""
        return {k: r.endpoint for k, r in self._registrations.items()}

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _send(self, messages: Iterable[pb.ClientMessage]) -> None:
        if self._outbox is not None:
            self._outbox.extend(messages)
            self._outbox_ready.set()

    async def wait_connected(self, timeout: float) -> None:
        """Return once connected.

        Raises:
            trio.TooSlowError: if not connected within ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not self.connected:
                await self._changed.wait()

    # ------------------------------------------------------------ subscriptions
    async def subscribe(
        self, names: Iterable[str], timeout: float = 5.0, *, types: Iterable[str] = (TYPE_ENDPOINTS, TYPE_ROUTES)
    ) -> None:
        """Subscribe to services and wait until their resources are resolved.

        Resolved means held, or known not to exist (a service with no
        endpoint, or without route rules).

        Args:
            names: service names.
            timeout: seconds to wait; the subscription stays either way.
            types: resource types to subscribe to (default: endpoints and routes).

        Raises:
            trio.TooSlowError: if some name is still unresolved after ``timeout``.
            ValueError: on an empty name or unknown type.
        """
        names, types = list(names), list(types)
        for type_url in types:
            self._send(self.core.subscribe(type_url, names))
        with trio.fail_after(timeout):
            while not all(self.core.is_resolved(t, n) for t in types for n in names):
                await self._changed.wait()

    def subscribe_nowait(self, names: Iterable[str], *, types: Iterable[str] = (TYPE_ENDPOINTS, TYPE_ROUTES)) -> None:
        """Subscribe without waiting for the resources (see :meth:`subscribe`).

        Raises:
            ValueError: on an empty name or unknown type.
        """
        names = list(names)
        for type_url in types:
            self._send(self.core.subscribe(type_url, names))

    def unsubscribe(self, names: Iterable[str], *, types: Iterable[str] = (TYPE_ENDPOINTS, TYPE_ROUTES)) -> None:
        """Drop subscriptions; their resources are forgotten at once (no ``on_change`` call)."""
        names = list(names)
        for type_url in types:
            self._send(self.core.unsubscribe(type_url, names))

    # ------------------------------------------------------------ registrations
    def _request(self, build: Callable[[int], pb.ClientMessage]) -> tuple[int, _Pending]:
        request_id = self._next_id
        self._next_id += 1
        pending = _Pending(build(request_id))
        self._pending[request_id] = pending
        self._send([pending.message])
        return request_id, pending

    async def _wait(self, pending: _Pending, timeout: float) -> None:
        with trio.fail_after(timeout):
            await pending.done.wait()
        if pending.error:
            raise DiscoveryError(pending.error)

    def _register_message(self, service: str, reg: _Registration) -> Callable[[int], pb.ClientMessage]:
        def build(request_id: int) -> pb.ClientMessage:
            reg.request_id = request_id
            msg = pb.Register(request_id=request_id, service=service, endpoint=reg.endpoint)
            msg.lease_ttl_ms = max(1, round(reg.ttl * 1000))
            return pb.ClientMessage(register=msg)

        return build

    async def register(self, service: str, endpoint: pb.Endpoint, ttl: float = 10.0, timeout: float = 5.0) -> None:
        """Register ``endpoint`` under ``service`` and keep it registered.

        The registration is kept alive while connected and re-sent on every
        new connection, until :meth:`deregister`.

        Args:
            service: service name.
            endpoint: the endpoint (its ``address`` is the key).
            ttl: lease TTL: how long the registration outlives a lost connection.
            timeout: seconds to wait for the control plane's acknowledgement.

        Raises:
            DiscoveryError: if the control plane refused it (it is then forgotten).
            trio.TooSlowError: if not acknowledged in time (it stays recorded
                and is sent on the next connection).
        """
        ep = pb.Endpoint()
        ep.CopyFrom(endpoint)
        reg = _Registration(ep, ttl)
        key = (service, ep.address)
        self._registrations[key] = reg
        request_id, pending = self._request(self._register_message(service, reg))
        try:
            await self._wait(pending, timeout)
        except DiscoveryError:
            if self._registrations.get(key) is reg and reg.request_id == request_id:
                del self._registrations[key]
            raise

    async def set_status(self, service: str, address: str, status: int, timeout: float = 5.0) -> None:
        """Change the status (``pb.Endpoint.HEALTHY`` ...) of a registration.

        Raises:
            DiscoveryError: if the control plane refused (e.g. not registered).
            trio.TooSlowError: if not acknowledged in time.
        """
        reg = self._registrations.get((service, address))
        if reg is not None:
            reg.endpoint.status = status  # type: ignore[assignment]
        _, pending = self._request(
            lambda rid: pb.ClientMessage(
                set_status=pb.SetStatus(request_id=rid, service=service, address=address, status=status)  # type: ignore[arg-type]
            )
        )
        await self._wait(pending, timeout)

    async def deregister(self, service: str, address: str, timeout: float = 5.0) -> None:
        """Remove a registration (at once; not re-sent on reconnect).

        Raises:
            DiscoveryError: if the control plane does not know it.
            trio.TooSlowError: if not acknowledged in time.
        """
        self._registrations.pop((service, address), None)
        _, pending = self._request(
            lambda rid: pb.ClientMessage(deregister=pb.Deregister(request_id=rid, service=service, address=address))
        )
        await self._wait(pending, timeout)

    async def put_route_rules(self, rules: pb.RouteRules, timeout: float = 5.0) -> None:
        """Replace a service's route rules (operator tooling; no rules deletes them).

        Raises:
            DiscoveryError: if the control plane refused them.
            trio.TooSlowError: if not acknowledged in time.
        """
        _, pending = self._request(
            lambda rid: pb.ClientMessage(put_route_rules=pb.PutRouteRules(request_id=rid, rules=rules))
        )
        await self._wait(pending, timeout)

    # ------------------------------------------------------------ identity
    async def request_certificate(self, csr_pem: str, timeout: float) -> pb.CertificateResponse:
        """Ask the control plane (the mesh's CA) to sign a CSR, on the current session.

        The control plane ignores every name in the CSR: the certificate it
        issues names the service this session authenticated as (by join
        token or by the certificate it presented), as the URI SAN
        ``spiffe://<trust-domain>/svc/<service>``. Only the CSR leaves this
        process: keep the private key (see
        :func:`octoproxy.identity.make_key_and_csr`). Call it again, with a
        new key and CSR, to renew (e.g. at two thirds of the lifetime).

        Args:
            csr_pem: a PKCS#10 certificate signing request, PEM (ECDSA
                P-256/P-384, RSA 2048-4096 or Ed25519 key).
            timeout: seconds to wait for the answer.

        Returns:
            The ``CertificateResponse``: ``certificate_chain_pem`` (leaf
            first), ``trust_bundle_pem`` (CA certificates to verify peers
            with) and ``not_after_unix_ms`` (the leaf's expiry); its
            ``error`` is always ``""``.

        Raises:
            DiscoveryError: if not connected to a control plane, if the
                session ends before the answer, or if the control plane
                refused (no CA, an operator session, a bad CSR: the message
                says which).
            trio.TooSlowError: if no answer within ``timeout``.
        """
        if not self.connected:  # starting, or between two control planes: wait (bounded) for a session
            try:
                await self.wait_connected(timeout)
            except trio.TooSlowError:
                raise DiscoveryError("cannot request a certificate: not connected to a control plane") from None
        _, pending = self._request(
            lambda rid: pb.ClientMessage(certificate_request=pb.CertificateRequest(request_id=rid, csr_pem=csr_pem))
        )
        try:
            await self._wait(pending, timeout)
        finally:
            self._pending = {k: v for k, v in self._pending.items() if v is not pending}
        if pending.certificate is None:  # pragma: no cover (done is set only with one)
            raise DiscoveryError("no certificate in the control plane's answer")
        return pending.certificate

    def _token_header(self) -> list[tuple[bytes, bytes]]:
        token = self.token() if callable(self.token) else self.token
        if not token:
            return []
        return [(b"Authorization", f"Bearer {token.strip()}".encode())]

    # ------------------------------------------------------------ connection loop
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Connect, and reconnect, until cancelled (reports started at once)."""
        task_status.started()
        delay = self.backoff[0]
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            before = self.connections
            refused = ""
            try:
                await self._run_connection(url)
            except BaseException as exc:  # (no except* here: Python 3.10 is supported)
                leaves = exception_leaves(exc)
                expected = (*_CONNECTION_ERRORS, DiscoveryError, DecodeError)
                if isinstance(exc, BaseExceptionGroup) and any(not isinstance(e, Exception) for e in leaves):
                    # cancelled while the connection also broke: the break is moot, let the
                    # cancellation alone propagate (the cancel scope that caused it absorbs it)
                    cancelled, rest = exc.split(lambda e: not isinstance(e, (Exception, BaseExceptionGroup)))
                    if cancelled is not None and (rest is None or all(isinstance(e, expected) for e in exception_leaves(rest))):
                        raise cancelled from None
                    raise
                refused = _refusal(leaves)
                too_big = [
                    e.reason.reason or ""
                    for e in leaves
                    if isinstance(e, ConnectionClosed) and e.reason is not None and e.reason.code == MESSAGE_TOO_BIG
                ]
                if too_big:
                    self._too_big(url, too_big[0])
                if refused:
                    self.refused = refused
                    logger.warning("control plane %s refused this proxy: %s", url, refused)
                elif all(isinstance(e, _CONNECTION_ERRORS) for e in leaves):
                    logger.info("control plane %s: %s", url, _describe(exc))
                elif all(isinstance(e, expected) for e in leaves):
                    logger.warning("control plane %s: protocol error: %s", url, _describe(exc))
                else:
                    raise
            finally:
                self._outbox = None
                self.url = None
                self._bump()
            index += 1
            if self.connections != before and not refused:
                delay = self.backoff[0]
                continue  # a session worked: fail over to the next URL at once
            await trio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, max(self.backoff[1], self.refusal_backoff) if refused else self.backoff[1])

    def _too_big(self, url: str, reason: str) -> None:
        """The control plane closed the session for a message over its size limit: never resend it as is.

        A subscription request is split into smaller ones from now on (7/8 of
        the limit the close reason names, else half the size of the largest
        message sent); any other request (a
        registration, route rules) fails for its caller with a clear error
        and is not resent.
        """
        size, msg = self._largest
        self._largest = (0, None)
        if msg is None:
            return
        if msg.WhichOneof("message") == "discovery":
            said = re.search(r"maximum message size: (\d+) bytes", reason)  # trio-websocket's close reason
            new = size // 2 if said is None else int(said.group(1)) * 7 // 8
            new = max(MIN_REQUEST_BYTES, min(self.core.max_request_bytes, new))
            if new < self.core.max_request_bytes:
                self.core.max_request_bytes = new
                logger.error(
                    "control plane %s refused a %d-byte subscription request (over its --max-message-size): "
                    "splitting requests into messages of at most %d bytes",
                    url,
                    size,
                    new,
                )
            return
        for request_id, pending in list(self._pending.items()):
            if pending.message is msg:
                del self._pending[request_id]
                kind = msg.WhichOneof("message") or "request"
                if kind == "register":
                    key = (msg.register.service, msg.register.endpoint.address)
                    reg = self._registrations.get(key)
                    if reg is not None and reg.request_id == request_id:
                        del self._registrations[key]
                pending.error = (
                    f"{kind} message of {size} bytes refused: over the control plane's maximum message size "
                    "(its --max-message-size)"
                )
                logger.error("control plane %s: %s: not sent again", url, pending.error)
                pending.done.set()

    async def _run_connection(self, url: str) -> None:
        async with trio.open_nursery() as nursery:
            # The deadline also covers a trio-websocket quirk: a connection
            # reset during the opening handshake does not end the wait for
            # the handshake (e.g. a server killed with our SYN in its queue).
            with trio.fail_after(self.connect_timeout):
                ws = await connect_websocket_url(
                    nursery,
                    url,
                    max_message_size=MAX_MESSAGE_SIZE,
                    extra_headers=self._token_header(),
                    ssl_context=self.ssl_context if url.startswith("wss:") else None,
                )
            try:
                outbox = deque(self.core.on_reconnect())
                for (service, _), reg in self._registrations.items():
                    if reg.request_id not in self._pending:
                        request_id = self._next_id
                        self._next_id += 1
                        msg = self._register_message(service, reg)(request_id)
                        self._pending[request_id] = _Pending(msg)
                for request_id in sorted(self._pending):
                    if self._pending[request_id].resendable:
                        outbox.append(self._pending[request_id].message)
                self._outbox = outbox
                self._largest = (0, None)
                self.url = url
                self.connections += 1
                self._bump()
                logger.info("connected to control plane %s", url)
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self._writer, ws)
                    tasks.start_soon(self._pinger, ws)
                    try:
                        await self._reader(ws)
                    finally:
                        tasks.cancel_scope.cancel()
            finally:
                self._outbox = None
                for request_id, pending in list(self._pending.items()):
                    if not pending.resendable:  # a certificate needs the session it was asked on
                        del self._pending[request_id]
                        pending.error = "the control-plane session ended before the certificate arrived"
                        pending.done.set()
                # A graceful close needs the reader task, which a cancellation
                # of this whole client has already stopped: then just drop it.
                cancelled = trio.current_effective_deadline() == -math.inf
                with trio.CancelScope(shield=True), trio.move_on_after(0 if cancelled else 1.0):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    async def _writer(self, ws: WebSocketConnection) -> None:
        outbox = self._outbox
        assert outbox is not None
        while True:
            while outbox:
                msg = outbox.popleft()
                data = msg.SerializeToString()
                if len(data) > self._largest[0]:
                    self._largest = (len(data), msg)
                with trio.CancelScope(shield=True), trio.fail_after(self.ping_timeout + self.connect_timeout):
                    await ws.send_message(data)
            self._outbox_ready = trio.Event()
            await self._outbox_ready.wait()

    async def _pinger(self, ws: WebSocketConnection) -> None:
        while True:
            ttls = [r.ttl / 3 for r in self._registrations.values()]
            await trio.sleep(min([self.ping_interval, *ttls]))
            if self._registrations:
                self._send([pb.ClientMessage(keepalive=pb.LeaseKeepAlive())])
            with trio.fail_after(self.ping_timeout):
                await ws.ping()

    async def _reader(self, ws: WebSocketConnection) -> None:
        while True:
            data = await ws.get_message()
            if isinstance(data, str):
                raise DiscoveryError("text message on the discovery stream")
            msg = pb.ServerMessage.FromString(data)
            self.refused = ""  # the control plane answers: whatever refused us before is over
            kind = msg.WhichOneof("message")
            if kind == "response":
                outgoing, changes = self.core.on_response(msg, self.validate)
                self._send(outgoing)
                if self.core.last_error and outgoing[0].discovery.HasField("error_detail"):
                    logger.warning("rejected %s update: %s", msg.response.type_url, self.core.last_error)
                if changes and self.on_change is not None:
                    try:
                        self.on_change(changes)
                    except Exception:
                        logger.exception("on_change callback failed")
                self._bump()
            elif kind == "certificate":
                pending = self._pending.pop(msg.certificate.request_id, None)
                if pending is not None:
                    pending.error = msg.certificate.error
                    pending.certificate = msg.certificate
                    pending.done.set()
                    if pending.error:
                        logger.warning("control plane refused a certificate: %s", pending.error)
            elif kind == "ack":
                pending = self._pending.pop(msg.ack.request_id, None)
                if pending is not None:
                    pending.error = msg.ack.error
                    pending.done.set()
                    if pending.error:
                        logger.warning("control plane refused request: %s", pending.error)
                self._bump()
