"""Server side of the discovery protocol: one connection's delta-xDS state (sans-IO).

Theory of operation: a :class:`XdsServerSession` tracks, per resource type,
what the client subscribed to and which version of each name it holds (as far
as the server knows), and a *dirty* set of names to look at again. It never
reads the store: the Trio shell feeds it requests, tells it which names
changed in the store (:meth:`XdsServerSession.mark_changed`), takes the dirty
names (:meth:`XdsServerSession.take_dirty`), looks their current state up, and
hands that back to :meth:`XdsServerSession.make_response`, which returns a
response carrying only what differs from what the client holds, or ``None``.

- Subscribing marks the name dirty, so the next round answers it: with the
  resource, or with the name in ``removed_resources`` if it does not exist.
- The first request of a type on a connection may carry
  ``initial_resource_versions``: those become the client's versions, so a
  reconnecting client gets only what changed while it was away.
- The client's versions are updated when a response is *built*: a NACKed
  version is therefore not sent again; the next different one is. ACKs and
  NACKs are matched to responses by nonce; unknown nonces are ignored (they
  belong to an older connection or were already answered).
- Names the client did not subscribe to are never sent.

Taking the dirty set before the (asynchronous) lookups and answering exactly
what was taken means a change that arrives during the lookups is kept for the
next round instead of being lost.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._xds_client import RESOURCE_TYPES, DiscoveryError
from ..protocol.proto import octoproxy_discovery_pb2 as pb

__all__ = [
    "Nack",
    "RequestOutcome",
    "XdsServerSession",
    "check_service_name",
    "check_endpoint",
    "check_route_rules",
    "check_address",
    "LimitExceeded",
    "MAX_NAME_LENGTH",
    "DEFAULT_MAX_SUBSCRIPTIONS",
    "DEFAULT_MAX_SUBSCRIPTION_BYTES",
]

MAX_NAME_LENGTH = 253
_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_ADDRESS_RE = re.compile(r"[^\s/]+:[0-9]{1,5}\Z")
#: names one session may subscribe to, per resource type
DEFAULT_MAX_SUBSCRIPTIONS = 10_000
#: bytes of names (summed over all types) one session may subscribe to: 10,000
#: names of ~100 characters for both types, but not 10,000 of 253 (~27 MB of
#: control-plane memory per session)
DEFAULT_MAX_SUBSCRIPTION_BYTES = 2 << 20

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class LimitExceeded(DiscoveryError):
    """A session went over one of the control plane's limits (the message names it and its option)."""


def check_address(address: str, allowed: Iterable[Network] = ()) -> str | None:
    """Return why ``address`` (``host:port``) cannot be an endpoint, or ``None`` if it can.

    IP literals that are link-local (169.254.0.0/16, fe80::/10: cloud metadata
    services live there), unspecified (0.0.0.0, ::), multicast or the IPv4
    broadcast address are refused, unless inside one of the ``allowed``
    networks. Port 0 is refused. Host names are accepted (the control plane
    does not resolve them).
    """
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        return f"invalid endpoint address {address!r} (port must be 1-65535)"
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        if bracketed or ":" in host:
            return f"invalid endpoint address {address!r} (not an IP address)"
        return None
    if ":" in host and not bracketed:
        return f"invalid endpoint address {address!r} (an IPv6 address needs brackets)"
    mapped = getattr(ip, "ipv4_mapped", None)
    check = mapped if mapped is not None else ip
    kind = None
    if check.is_unspecified:
        kind = "unspecified"
    elif check.is_link_local:
        kind = "link-local"
    elif check.is_multicast:
        kind = "multicast"
    elif isinstance(check, ipaddress.IPv4Address) and check == ipaddress.IPv4Address("255.255.255.255"):
        kind = "broadcast"
    if kind is None or any(ip in net or check in net for net in allowed):
        return None
    return f"endpoint address {address!r} is {kind}: refused (allow it with --allow-endpoint-cidr)"


def check_service_name(name: str) -> str | None:
    """Return why ``name`` cannot be a service name, or ``None`` if it can.

    Service names appear in store keys, so they are restricted to
    ``[A-Za-z0-9._-]`` (starting with a letter or digit), at most 253 chars.
    """
    if not name or len(name) > MAX_NAME_LENGTH or not _SERVICE_RE.match(name):
        return f"invalid service name {name!r} (want [A-Za-z0-9._-], at most {MAX_NAME_LENGTH} chars)"
    return None


def check_endpoint(endpoint: pb.Endpoint, allowed: Iterable[Network] = ()) -> str | None:
    """Return why ``endpoint`` cannot be registered, or ``None`` if it can.

    Args:
        endpoint: the endpoint.
        allowed: networks whose addresses pass :func:`check_address` anyway.
    """
    if len(endpoint.address) > 255 or not _ADDRESS_RE.match(endpoint.address):
        return f"invalid endpoint address {endpoint.address!r} (want host:port)"
    if endpoint.status not in pb.Endpoint.Status.values():
        return f"unknown endpoint status {endpoint.status}"
    if endpoint.role not in pb.Endpoint.Role.values():
        return f"unknown endpoint role {endpoint.role}"
    return check_address(endpoint.address, allowed)


def check_route_rules(rules: pb.RouteRules) -> str | None:
    """Return why ``rules`` cannot be stored, or ``None`` if they can."""
    return check_service_name(rules.service)


@dataclass(frozen=True, slots=True)
class Nack:
    """A response the client rejected.

    Attributes:
        type_url: type of the rejected response.
        nonce: its nonce.
        versions: ``{name: version}`` it carried (``None`` = removal).
        message: the client's reason.
    """

    type_url: str
    nonce: str
    versions: dict[str, str | None]
    message: str


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What one request did.

    Attributes:
        subscribed: names newly subscribed (now dirty: look them up).
        unsubscribed: names dropped.
        acked: the nonce this request acknowledged, ``""`` if none.
        nack: the rejection it reported, if any.
    """

    subscribed: list[str] = field(default_factory=list)
    unsubscribed: list[str] = field(default_factory=list)
    acked: str = ""
    nack: Nack | None = None


@dataclass
class _TypeState:
    subscribed: set[str] = field(default_factory=set)
    # name -> version the client holds; None = client knows it does not exist
    client_versions: dict[str, str | None] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    started: bool = False  # first request seen (initial versions honoured once)


class XdsServerSession:
    """The discovery state of one client connection.

    Args:
        nonce_prefix: prepended to every nonce (e.g. a per-connection random
            token, so nonces from different connections never collide).
        max_subscriptions: names one session may subscribe to per type.
        max_subscription_bytes: total length of the names one session may
            subscribe to, all types together (0: no budget).
    """

    def __init__(
        self,
        nonce_prefix: str = "",
        *,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_subscription_bytes: int = DEFAULT_MAX_SUBSCRIPTION_BYTES,
    ) -> None:
        self.node_id = ""
        self.max_subscriptions = max_subscriptions
        self.max_subscription_bytes = max_subscription_bytes
        #: total length of the subscribed names, all types
        self.subscription_bytes = 0
        self.nacks = 0
        self._prefix = nonce_prefix
        self._counter = 0
        self._types = {t: _TypeState() for t in RESOURCE_TYPES}
        self._pending: dict[str, tuple[str, dict[str, str | None]]] = {}

    # ------------------------------------------------------------ queries
    def subscribed(self, type_url: str) -> frozenset[str]:
        """Return the names the client subscribed to for ``type_url``."""
        return frozenset(self._types[type_url].subscribed)

    def client_versions(self, type_url: str) -> dict[str, str | None]:
        """Return what the server believes the client holds (``None`` = known absent)."""
        return dict(self._types[type_url].client_versions)

    def has_dirty(self) -> bool:
        """True if some subscribed name must be looked up again."""
        return any(st.dirty for st in self._types.values())

    @property
    def pending_nonces(self) -> frozenset[str]:
        """Nonces sent and not yet ACKed or NACKed."""
        return frozenset(self._pending)

    def release(self) -> int:
        """Forget every subscription and pending response (the connection ended).

        Returns:
            How many subscriptions there were (all types).
        """
        count = sum(len(st.subscribed) for st in self._types.values())
        self._types = {t: _TypeState() for t in RESOURCE_TYPES}
        self.subscription_bytes = 0
        self._pending.clear()
        return count

    # ------------------------------------------------------------ input
    def on_request(self, req: pb.DiscoveryRequest) -> RequestOutcome:
        """Apply one ``DiscoveryRequest`` from the client.

        Returns:
            What it changed (see :class:`RequestOutcome`).

        Raises:
            DiscoveryError: unknown type_url, or an empty resource name (the
                peer's fault: close the connection).
        """
        st = self._types.get(req.type_url)
        if st is None:
            raise DiscoveryError(f"unknown type_url {req.type_url!r}"[:200])
        if any(not n for n in req.subscribe) or any(not n for n in req.unsubscribe):
            raise DiscoveryError("resource names must not be empty")
        for name in req.subscribe:
            error = check_service_name(name)
            if error is not None:
                raise DiscoveryError(f"subscribe: {error}")
        if len(req.node_id) > MAX_NAME_LENGTH:
            raise DiscoveryError(f"node_id longer than {MAX_NAME_LENGTH} chars")
        after = len(st.subscribed.union(req.subscribe).difference(req.unsubscribe))
        if after > self.max_subscriptions and after > len(st.subscribed):
            raise LimitExceeded(  # (the option first: a WebSocket close reason holds 123 bytes)
                f"too many subscriptions on one session (limit {self.max_subscriptions}, "
                f"raise it with --max-subscriptions): {after} names of {req.type_url}"
            )
        added = {n for n in req.subscribe if n not in st.subscribed}.difference(req.unsubscribe)
        dropped = st.subscribed.intersection(req.unsubscribe)
        size = self.subscription_bytes + sum(map(len, added)) - sum(map(len, dropped))
        if self.max_subscription_bytes and size > self.max_subscription_bytes and size > self.subscription_bytes:
            raise LimitExceeded(
                f"subscribed names too long in total (limit {self.max_subscription_bytes} bytes per session, "
                f"raise it with --max-subscription-bytes): {size} bytes"
            )
        self.subscription_bytes = size
        if req.node_id:
            self.node_id = req.node_id
        first = not st.started
        st.started = True
        new = [n for n in req.subscribe if n not in st.subscribed]
        st.subscribed.update(req.subscribe)
        st.dirty.update(req.subscribe)
        if first:
            for name, version in req.initial_resource_versions.items():
                if name in st.subscribed and version:
                    st.client_versions[name] = version
        gone = [n for n in req.unsubscribe if n in st.subscribed]
        for name in req.unsubscribe:
            st.subscribed.discard(name)
            st.client_versions.pop(name, None)
            st.dirty.discard(name)
        acked, nack = "", None
        if req.response_nonce:
            sent = self._pending.pop(req.response_nonce, None)
            if sent is not None:
                if req.HasField("error_detail"):
                    self.nacks += 1
                    nack = Nack(sent[0], req.response_nonce, sent[1], req.error_detail.message)
                else:
                    acked = req.response_nonce
        return RequestOutcome(subscribed=new, unsubscribed=gone, acked=acked, nack=nack)

    def mark_changed(self, type_url: str, name: str) -> bool:
        """Note that ``name`` changed in the store.

        Returns:
            True if the client subscribed to it (it is now dirty).
        """
        st = self._types.get(type_url)
        if st is None or name not in st.subscribed:
            return False
        st.dirty.add(name)
        return True

    def mark_all_changed(self) -> None:
        """Look every subscription up again (e.g. after the store resynced)."""
        for st in self._types.values():
            st.dirty.update(st.subscribed)

    # ------------------------------------------------------------ output
    def take_dirty(self) -> dict[str, set[str]]:
        """Return and clear the names to look up, per type (non-empty types only)."""
        out = {}
        for type_url, st in self._types.items():
            if st.dirty:
                out[type_url], st.dirty = st.dirty, set()
        return out

    def make_response(
        self, type_url: str, current: Mapping[str, tuple[str, bytes] | None], system_version: str = ""
    ) -> pb.ServerMessage | None:
        """Build the response for the names looked up.

        Args:
            type_url: the resource type.
            current: for each name taken from :meth:`take_dirty`, its
                ``(version, encoded body)`` in the store, or ``None`` if it
                does not exist.
            system_version: informative store revision to put in the response.

        Returns:
            A ``ServerMessage`` with what differs from the client's versions,
            or ``None`` if nothing does.
        """
        st = self._types[type_url]
        resources = []
        removed = []
        sent: dict[str, str | None] = {}
        for name in sorted(current):
            if name not in st.subscribed:
                continue  # unsubscribed meanwhile
            value = current[name]
            if value is None:
                if name in st.client_versions and st.client_versions[name] is None:
                    continue
                st.client_versions[name] = sent[name] = None
                removed.append(name)
            else:
                version, body = value
                if st.client_versions.get(name) == version:
                    continue
                st.client_versions[name] = sent[name] = version
                resources.append(pb.Resource(name=name, version=version, body=body))
        if not sent:
            return None
        self._counter += 1
        nonce = f"{self._prefix}{self._counter}"
        self._pending[nonce] = (type_url, sent)
        resp = pb.DiscoveryResponse(
            type_url=type_url,
            nonce=nonce,
            system_version=system_version,
            resources=resources,
            removed_resources=removed,
        )
        return pb.ServerMessage(response=resp)
