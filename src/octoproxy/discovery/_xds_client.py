"""Client side of the discovery protocol: the delta-xDS state machine (sans-IO).

Theory of operation: a :class:`XdsClient` holds, per resource type, the names
the proxy *wants* (its subscriptions), the resources it *holds* (name ->
version and decoded message), and the names the server said do not exist
(*absent*). Every method takes protocol messages in and returns the messages to
send (and, for responses, the changes applied); nothing here touches a socket
or a clock, so the Trio shell (:mod:`octoproxy.discovery._client`) only
moves bytes and the same object survives any number of reconnects.

- :meth:`XdsClient.subscribe` / :meth:`XdsClient.unsubscribe` record the wish
  and return the request announcing it (nothing if the wish is unchanged).
- :meth:`XdsClient.on_response` checks a whole response first (decodable
  bodies, names matching the resource, the caller's ``validate``), then either
  applies all of it and ACKs, or applies none of it and NACKs: a rejected
  update leaves the client on its last good state.
- :meth:`XdsClient.on_reconnect` returns, per type, one request that
  re-subscribes to everything wanted and lists in ``initial_resource_versions``
  what is held, so the server sends only what differs. Held resources are
  never dropped because a connection broke: only the server removes them.

A name is *resolved* once it is held or known absent; ``subscribe`` in the
shell waits for that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message

from ..protocol._errors import OctoproxyError
from ..protocol.proto import octoproxy_discovery_pb2 as pb

# The stream both sides speak (a WebSocket; constants of the protocol, not of one side).
#: the WebSocket path of the discovery stream
DISCOVERY_PATH = "/v1/discovery"
#: what a client accepts from the server (responses can carry many endpoints)
MAX_MESSAGE_SIZE = 16 << 20
#: WebSocket close code for "you went over a limit / lost your credentials"
POLICY_VIOLATION = 1008
#: WebSocket close code trio-websocket sends for a message over ``max_message_size``
MESSAGE_TOO_BIG = 1009

__all__ = [
    "TYPE_ENDPOINTS",
    "TYPE_ROUTES",
    "TYPE_APPCONFIG",
    "TYPE_AUTHZ",
    "TYPE_GOVERNANCE",
    "RESOURCE_TYPES",
    "INVALID_ARGUMENT",
    "DiscoveryError",
    "ResourceChange",
    "Validator",
    "XdsClient",
]

#: type_url of the endpoints of a service (:class:`pb.ClusterLoadAssignment`).
TYPE_ENDPOINTS = "octoproxy.v1.ClusterLoadAssignment"
#: type_url of the routing rules of a service (:class:`pb.RouteRules`).
TYPE_ROUTES = "octoproxy.v1.RouteRules"
#: type_url of an app's configuration (:class:`pb.AppConfig`, name ``"<service>.<environment>"``;
#: see :mod:`octoproxy.discovery._appconfig`).
TYPE_APPCONFIG = "octoproxy.v1.AppConfig"
#: type_url of the authorization policy of a service (:class:`pb.AuthorizationPolicy`).
TYPE_AUTHZ = "octoproxy.v1.AuthorizationPolicy"
#: type_url of the governance policy of a service (:class:`pb.GovernancePolicy`).
TYPE_GOVERNANCE = "octoproxy.v1.GovernancePolicy"
#: type_url -> message class of the resource body.
RESOURCE_TYPES: dict[
    str,
    type[pb.ClusterLoadAssignment]
    | type[pb.RouteRules]
    | type[pb.AppConfig]
    | type[pb.AuthorizationPolicy]
    | type[pb.GovernancePolicy],
] = {
    TYPE_ENDPOINTS: pb.ClusterLoadAssignment,
    TYPE_ROUTES: pb.RouteRules,
    TYPE_APPCONFIG: pb.AppConfig,
    TYPE_AUTHZ: pb.AuthorizationPolicy,
    TYPE_GOVERNANCE: pb.GovernancePolicy,
}
#: ``ErrorDetail.code`` of a NACK (gRPC's INVALID_ARGUMENT).
INVALID_ARGUMENT = 3

#: ``validate(type_url, name, resource)``; raise (e.g. ``ValueError``) to NACK.
Validator = Callable[[str, str, Message], None]


#: requests are split to stay under this (a quarter of the control plane's default message limit)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class DiscoveryError(OctoproxyError):
    """A discovery-protocol fault: a malformed peer message, or a request the
    control plane refused (the message says which)."""


@dataclass(frozen=True, slots=True)
class ResourceChange:
    """One resource applied to the client's state.

    Attributes:
        type_url: :data:`TYPE_ENDPOINTS` or :data:`TYPE_ROUTES`.
        name: the resource name (service name).
        version: the new version, ``""`` when removed.
        resource: the decoded message, ``None`` when removed.
    """

    type_url: str
    name: str
    version: str
    resource: Message | None


@dataclass
class _TypeState:
    wanted: set[str] = field(default_factory=set)
    held: dict[str, tuple[str, Message]] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    last_nonce: str = ""


class XdsClient:
    """The client-side discovery state of one proxy (all resource types).

    Args:
        node_id: identifies this proxy to the control plane (sent in every
            request; used in its logs).

        max_request_bytes: a request with many names is split into several
            of at most about this size each (a control plane closes a
            session whose message exceeds its ``--max-message-size``,
            4 MiB by default).

    Attributes:
        last_error: the reason of the last NACK we sent, ``""`` if none.
    """

    def __init__(self, node_id: str, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.node_id = node_id
        #: requests (subscribe, unsubscribe, re-subscribe) are split to stay under this many bytes
        self.max_request_bytes = max_request_bytes
        self.last_error = ""
        self._types: dict[str, _TypeState] = {t: _TypeState() for t in RESOURCE_TYPES}

    # ------------------------------------------------------------ queries
    def _state(self, type_url: str) -> _TypeState:
        try:
            return self._types[type_url]
        except KeyError:
            raise ValueError(f"unknown resource type {type_url!r}") from None

    def wanted(self, type_url: str) -> frozenset[str]:
        """Return the names subscribed to for ``type_url``."""
        return frozenset(self._state(type_url).wanted)

    def held(self, type_url: str) -> dict[str, Message]:
        """Return ``{name: decoded resource}`` held for ``type_url`` (a copy)."""
        return {name: res for name, (_, res) in self._state(type_url).held.items()}

    def versions(self, type_url: str) -> dict[str, str]:
        """Return ``{name: version}`` held for ``type_url``."""
        return {name: ver for name, (ver, _) in self._state(type_url).held.items()}

    def is_resolved(self, type_url: str, name: str) -> bool:
        """True if ``name`` is held, or the server said it does not exist."""
        st = self._state(type_url)
        return name in st.held or name in st.absent

    def is_absent(self, type_url: str, name: str) -> bool:
        """True if the server said ``name`` does not exist."""
        return name in self._state(type_url).absent

    def last_nonce(self, type_url: str) -> str:
        """Return the nonce of the last response of ``type_url`` (ACKed or NACKed)."""
        return self._state(type_url).last_nonce

    # ------------------------------------------------------------ subscriptions
    def _request(self, type_url: str, **fields: object) -> pb.ClientMessage:
        req = pb.DiscoveryRequest(node_id=self.node_id, type_url=type_url, **fields)  # type: ignore[arg-type]
        return pb.ClientMessage(discovery=req)

    def subscribe(self, type_url: str, names: Iterable[str]) -> list[pb.ClientMessage]:
        """Want ``names`` of ``type_url``.

        Args:
            type_url: a key of :data:`RESOURCE_TYPES`.
            names: service names; already wanted ones are ignored.

        Returns:
            The request to send (empty if nothing new is wanted).

        Raises:
            ValueError: on an unknown type or an empty name.
        """
        st = self._state(type_url)
        new = sorted(set(names) - st.wanted)
        if any(not n for n in new):
            raise ValueError("resource names must not be empty")
        if not new:
            return []
        st.wanted.update(new)
        return [self._request(type_url, subscribe=chunk) for chunk in self._chunks(new, {})]

    def unsubscribe(self, type_url: str, names: Iterable[str]) -> list[pb.ClientMessage]:
        """Stop wanting ``names``; their resources are forgotten at once.

        Returns:
            The request to send (empty if none of them was wanted).

        Raises:
            ValueError: on an unknown type.
        """
        st = self._state(type_url)
        gone = sorted(set(names) & st.wanted)
        if not gone:
            return []
        for name in gone:
            st.wanted.discard(name)
            st.held.pop(name, None)
            st.absent.discard(name)
        return [self._request(type_url, unsubscribe=chunk) for chunk in self._chunks(gone, {})]

    def on_reconnect(self) -> list[pb.ClientMessage]:
        """Start over on a new connection.

        Returns:
            One request per type with subscriptions: ``subscribe`` lists every
            wanted name and ``initial_resource_versions`` what is held.
        """
        out = []
        for type_url, st in self._types.items():
            st.last_nonce = ""
            if st.wanted:
                versions = {n: v for n, (v, _) in st.held.items() if n in st.wanted}
                for chunk in self._chunks(sorted(st.wanted), versions):
                    held = {n: versions[n] for n in chunk if n in versions}
                    out.append(self._request(type_url, subscribe=chunk, initial_resource_versions=held))
        return out

    def _chunks(self, names: list[str], versions: dict[str, str]) -> list[list[str]]:
        """Split ``names`` so that each request stays under :attr:`max_request_bytes`."""
        budget = max(self.max_request_bytes - 512 - len(self.node_id), 1)
        chunks: list[list[str]] = [[]]
        size = 0
        for name in names:
            cost = len(name.encode()) + 3  # field tag + length
            if name in versions:
                cost += 2 * cost + len(versions[name].encode()) + 3  # a map entry: key, value, framing
            if chunks[-1] and size + cost > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(name)
            size += cost
        return chunks

    # ------------------------------------------------------------ responses
    def on_response(
        self, message: pb.ServerMessage, validate: Validator | None = None
    ) -> tuple[list[pb.ClientMessage], list[ResourceChange]]:
        """Check and apply one response, and say what to answer.

        Args:
            message: a ``ServerMessage`` whose ``response`` is set.
            validate: optional extra check of each decoded resource; if it
                raises, the whole response is NACKed.

        Returns:
            ``(outgoing, changes)``: ``outgoing`` is the ACK (or NACK);
            ``changes`` lists the resources whose held state changed (empty
            on NACK).

        Raises:
            ValueError: if ``message`` is not a discovery response (our bug:
                the shell routes acks elsewhere).
        """
        if message.WhichOneof("message") != "response":
            raise ValueError("on_response needs a ServerMessage with a response")
        resp = message.response
        try:
            decoded = self._check(resp, validate)
        except DiscoveryError as exc:
            self.last_error = str(exc)
            if resp.type_url in self._types:
                self._types[resp.type_url].last_nonce = resp.nonce
            nack = self._request(
                resp.type_url,
                response_nonce=resp.nonce,
                error_detail=pb.ErrorDetail(code=INVALID_ARGUMENT, message=str(exc)),
            )
            return [nack], []
        st = self._types[resp.type_url]
        st.last_nonce = resp.nonce
        changes = []
        for name, version, res in decoded:
            old = st.held.get(name)
            st.absent.discard(name)
            if old is not None and old[0] == version:
                continue
            st.held[name] = (version, res)
            changes.append(ResourceChange(resp.type_url, name, version, res))
        for name in resp.removed_resources:
            if name not in st.wanted:
                continue
            st.absent.add(name)
            if st.held.pop(name, None) is not None:
                changes.append(ResourceChange(resp.type_url, name, "", None))
        return [self._request(resp.type_url, response_nonce=resp.nonce)], changes

    def _check(self, resp: pb.DiscoveryResponse, validate: Validator | None) -> list[tuple[str, str, Message]]:
        """Decode and validate everything, or raise DiscoveryError (-> NACK)."""
        cls = RESOURCE_TYPES.get(resp.type_url)
        if cls is None:
            raise DiscoveryError(f"unknown type_url {resp.type_url!r}")
        st = self._types[resp.type_url]
        seen: set[str] = set()
        out: list[tuple[str, str, Message]] = []
        for r in resp.resources:
            if not r.name or r.name in seen:
                raise DiscoveryError(f"empty or duplicate resource name {r.name!r}")
            seen.add(r.name)
            if not r.version:
                raise DiscoveryError(f"resource {r.name!r} has no version")
            if r.name not in st.wanted:
                continue  # raced with our unsubscribe: drop it, not an error
            try:
                res = cls.FromString(r.body)
            except DecodeError as exc:
                raise DiscoveryError(f"resource {r.name!r}: undecodable body: {exc}") from None
            described = f"{res.service}.{res.environment}" if isinstance(res, pb.AppConfig) else res.service
            if described != r.name:
                raise DiscoveryError(f"resource {r.name!r} describes service {res.service!r}")
            if validate is not None:
                try:
                    validate(resp.type_url, r.name, res)
                except Exception as exc:  # any failure of the check rejects the update
                    raise DiscoveryError(f"resource {r.name!r} rejected: {type(exc).__name__}: {exc}") from None
            out.append((r.name, r.version, res))
        for name in resp.removed_resources:
            if name in seen:
                raise DiscoveryError(f"resource {name!r} both updated and removed")
        return out
