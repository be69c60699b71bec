# cython: annotation_typing=False, wraparound=True, boundscheck=True, cdivision=False
"""The forwarding engine: sans-IO core of the proxy's data path.

One source, two builds: this file runs interpreted (``OCTOPROXY_NO_EXTENSIONS=1``)
and is compiled by Cython in pure-Python mode into ``octoproxy.core._kernel_c``,
typed by ``_kernel_c.pxd`` (the classes become extension types with C fields).
:mod:`octoproxy.core._engine` picks one of the two; see docs/architecture.md.

Theory of operation
-------------------
Every connection the proxy holds is a :class:`Link`. A *downstream* link sends
us requests and gets responses (an SDK connection on the outbound UDS, or a
peer proxy on the inbound TCP listener). An *upstream* link is one we send
requests on and read responses from (a pooled connection to a peer proxy, or
to the local app).

The shell reads bytes from a link into a buffer and calls :meth:`Engine.feed`
with the buffer and the current time. The engine splits the bytes into frames
with the compiled :class:`~octoproxy.frame.Scanner` (one call per read),
decides what each frame becomes, and appends bytes to the output buffers of
the links concerned (``link.out``), which it lists in :attr:`Engine.dirty`.
The shell then writes each dirty link's buffer with one ``send``. So every
frame that one read brought is forwarded with one write per destination.

Requests are forwarded with their stream id rewritten in place to an id of
the upstream link's own; a :class:`Pending` entry in that link's table maps
it back. Responses find their entry by stream id alone. Each pending entry has
a deadline; :meth:`Engine.expire` answers TIMEOUT for the expired ones, and a
late response is dropped and counted. An upstream link that is lost answers
every request in flight on it UNAVAILABLE at once.

Nothing here does I/O or reads a clock: time comes in as an argument.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from struct import Struct
from typing import TYPE_CHECKING, Any

from ._balancer import Balancer, Endpoint, make_balancer
from ..protocol._errors import RemoteProtocolError
from ..protocol._frame import parse_header
from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, PREFIX_SIZE, Flags, FrameType, Status
from ..frame import RouteTable, Scanner, encode_frame, encode_header, encode_response
from ..governance import Locality
from ._pipeline import NOT_PROCESSED, ClusterGov, Inbound, Outbound, RouteGov, build_inbound, build_routes, schedule, tick_outliers
from ._relay import Pending, forward, relay_requests, relay_responses
from ._stats import ProxyStats, RequestStats

if TYPE_CHECKING:
    from ..governance import PolicySet

log = logging.getLogger("octoproxy.proxy")

__all__ = ["Cluster", "Engine", "Link", "Pending", "Route", "DOWNSTREAM", "UPSTREAM"]

DOWNSTREAM = 0
UPSTREAM = 1
#: timer resolution: deadlines are checked in buckets of 10 ms
TIMER_BUCKETS_PER_SECOND = 100
#: requests held per cluster while its connections are being re-established
MAX_PARKED = 10000
#: an upstream link over its high watermark that sent nothing for this long is
#: "not taking requests" (a link that drains, e.g. a big frame, still takes them)
STALLED_AFTER = 0.5

_U64 = Struct(">Q")
_U32 = Struct(">I")
_U16 = Struct(">H")
_REQUEST = FrameType.REQUEST
_RESPONSE = FrameType.RESPONSE
_ONEWAY = FrameType.ONEWAY
_PING = FrameType.PING
_PONG = FrameType.PONG
_GOAWAY = FrameType.GOAWAY
_HOT_RESTART = int(Flags.HOT_RESTART)


class Link:
    """One connection, as the engine sees it. The shell owns the socket."""

    __slots__ = (
        "kind",
        "name",
        "out",
        "closed",
        "draining",
        "goaway_sent",
        "pending",
        "next_sid",
        "endpoint",
        "cluster",
        "inflight",
        "reject",
        "awaiting_pong",
        "last_rx",
        "last_tx",
        "listener",
        "on_idle",
        "on_goaway",
        "io",
        "peer",
    )

    def __init__(self, kind: int, name: str, *, endpoint: Endpoint | None = None, cluster: Cluster | None = None, listener: str = "") -> None:
        self.kind = kind
        self.name = name
        #: bytes waiting to be written, appended by the engine, drained by the shell
        self.out = bytearray()
        self.closed = False
        #: upstream: the peer sent GOAWAY (send nothing new); downstream: we are draining it
        self.draining = False
        self.goaway_sent = False
        #: upstream only: our stream id -> Pending
        self.pending: dict[int, Pending] = {}
        self.next_sid = 1
        self.endpoint = endpoint
        self.cluster = cluster
        #: downstream only: its requests in flight upstream
        self.inflight = 0
        #: downstream over a connection limit: every request is answered OVERLOADED
        self.reject = False
        self.awaiting_pong = 0
        self.last_rx = 0.0
        #: the shell: when a send last made progress while output was queued
        self.last_tx = 0.0
        self.listener = listener
        #: called by the engine when a draining link has nothing outstanding
        self.on_idle: Callable[[Link], None] | None = None
        #: called by the engine when the peer sends GOAWAY on this upstream link
        self.on_goaway: Callable[[Link], None] | None = None
        #: the shell's object for this link (opaque to the engine)
        self.io: Any = None
        #: inbound only: who the peer is (an ``_guard.InboundPeer``; None: plaintext)
        self.peer: Any = None

    def __repr__(self) -> str:
        return f"<Link {self.name} {'up' if self.kind else 'down'}{' closed' if self.closed else ''}>"


class Cluster:
    """A named set of endpoints, each with its pooled upstream links."""

    def __init__(
        self,
        name: str,
        lb: str = "round_robin",
        endpoints: list[Endpoint] | None = None,
        links: dict[str, list[Link]] | None = None,
        balancer: Balancer | None = None,
        connecting: int = 0,
        picks: int = 0,
        parked: list[tuple[Link, bytes, float]] | None = None,
        gov: ClusterGov | None = None,
    ) -> None:
        self.name = name
        self.lb = lb
        self.endpoints: list[Endpoint] = [] if endpoints is None else endpoints
        #: endpoint address -> links that are connected and not draining
        self.links: dict[str, list[Link]] = {} if links is None else links
        self.balancer = balancer
        #: connection attempts under way (the shell keeps this up to date)
        self.connecting = connecting
        #: requests routed to this cluster so far (idle subscriptions are dropped)
        self.picks = picks
        #: requests that found no connection while one was being (re)established:
        #: (downstream link, the raw frame, when parked)
        self.parked: list[tuple[Link, bytes, float]] = [] if parked is None else parked
        #: governance state (router, outlier, breaker, budget) when a governed route uses it
        self.gov = gov
        self.__post_init__()

    def __repr__(self) -> str:
        return f"Cluster(name={self.name!r}, lb={self.lb!r}, endpoints={self.endpoints!r})"

    def __post_init__(self) -> None:
        if self.balancer is None:
            self.balancer = make_balancer(self.lb, rng=random.Random())
        # (discovery calls this again after changing the endpoints)
        if self.gov is not None:
            self.gov.sync(self.endpoints)

    def ready_endpoints(self) -> list[Endpoint]:
        return [ep for ep in self.endpoints if self.links.get(ep.address)]

    def add_link(self, link: Link) -> None:
        assert link.endpoint is not None
        self.links.setdefault(link.endpoint.address, []).append(link)
        if not link.endpoint.healthy:
            link.endpoint.healthy = True
            if self.gov is not None:
                self.gov.router.invalidate()

    def remove_link(self, link: Link) -> None:
        assert link.endpoint is not None
        links = self.links.get(link.endpoint.address)
        if links and link in links:
            links.remove(link)
            if not links:
                link.endpoint.healthy = False
                if self.gov is not None:
                    self.gov.router.invalidate()

    def pick(self) -> Link | None:
        """Choose an endpoint with the balancer, then its least-loaded link."""
        assert self.balancer is not None
        self.picks += 1
        ep: Endpoint | None
        if len(self.endpoints) == 1:  # nothing to balance
            ep = self.endpoints[0]
            if not ep.healthy or ep.weight <= 0:
                return None
        else:
            ep = self.balancer.pick(self.endpoints)
            if ep is None:
                return None
        links = self.links.get(ep.address)
        if not links:  # pragma: no cover - healthy implies links
            return None
        if len(links) == 1:
            return links[0]
        best = links[0]
        for link in links:
            if len(link.pending) < len(best.pending):
                best = link
        return best


class Route:
    """One outbound route: requests for ``service``/``method`` go to ``cluster`` (a value: compare, hash)."""

    def __init__(self, service: str, method: str, cluster: str, timeout: float, max_timeout: float = 0.0) -> None:
        self.service = service
        self.method = method
        self.cluster = cluster
        #: deadline of a request whose frame gives none
        self.timeout = float(timeout)
        #: cap on any request's deadline; 0: none (the caller's deadline holds)
        self.max_timeout = float(max_timeout)

    def _key(self) -> tuple[str, str, str, float, float]:
        return (self.service, self.method, self.cluster, self.timeout, self.max_timeout)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Route):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Route(service={self.service!r}, method={self.method!r}, cluster={self.cluster!r}, timeout={self.timeout!r}, max_timeout={self.max_timeout!r})"


class Engine:
    """The data-path state machine for one proxy process.

    Args:
        routes: outbound routes, in route-id order (the id is the index).
        clusters: clusters by name; the engine adds and removes links as the
            shell connects them.
        caller: this proxy's service name, stamped on forwarded requests
            (header field 3, appended: the last occurrence wins).
        max_pending: requests in flight through this proxy; beyond, OVERLOADED.
        default_timeout: deadline of a request whose frame and route give none.
        inbound_max_timeout: cap on the deadline of requests from peers; 0: none.
        high_watermark: bytes queued on an upstream link above which it takes
            no new request: another link of the cluster does, or OVERLOADED.
        max_frame_size: largest frame accepted.
        stats: the metrics the engine updates.
    """

    def __init__(
        self,
        *,
        routes: Sequence[Route] = (),
        clusters: Iterable[Cluster] = (),
        caller: str = "",
        max_pending: int = 65536,
        default_timeout: float = 5.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        stats: ProxyStats | None = None,
        park_timeout: float = 1.0,
        inbound_max_timeout: float = 0.0,
        high_watermark: int = 4 << 20,
    ) -> None:
        #: how long a request may wait for a connection that is being established
        self.park_timeout = park_timeout
        self.clusters: dict[str, Cluster] = {c.name: c for c in clusters}
        self.max_pending = max_pending
        self.default_timeout = default_timeout
        self.inbound_max_timeout = inbound_max_timeout
        self.high_watermark = high_watermark
        self.max_frame_size = max_frame_size
        self.stats = stats if stats is not None else ProxyStats()
        self.stamp = encode_header(caller=caller) if caller else b""
        self.pending_count = 0
        #: links with new bytes in ``out``; the shell flushes and clears this
        self.dirty: list[Link] = []
        #: None: serving; "drain": answer new requests UNAVAILABLE; "hot_restart": answer HOT_RESTART
        self.drain_mode: str | None = None
        #: inbound: checks every request from a peer first (``_guard.InboundGuard``)
        self.inbound_guard: Any = None
        #: deadlines in 10 ms buckets: bucket -> [(link, stream id, deadline)],
        #: plus a heap of the bucket numbers (appending to a bucket is cheaper
        #: than a heap push per request)
        self.timer_wheel: dict[int, list[tuple[Link, int, float]]] = {}
        self.timer_keys: list[int] = []
        #: per listener: b"service\0method" -> RequestStats (the fast path's cache)
        self.rs_cache: dict[str, dict[bytes, RequestStats]] = {"outbound": {}, "inbound": {}}
        #: discovery: called with a service name that has no route (the shell
        #: subscribes to it); requests for it wait in ``unrouted`` meanwhile
        self.on_unknown_service: Callable[[str], None] | None = None
        self.unrouted: dict[str, list[tuple[Link, bytes, float]]] = {}
        #: how long a request may wait for its lazy subscription
        self.unrouted_timeout = 10.0
        #: while parked requests are routed again: when they were first parked
        self._replaying_since: float | None = None
        #: the shell's scanners, shared by every connection: a read is scanned
        #: and relayed in one synchronous call, so one scanner per kind serves
        #: all connections (its arrays are per proxy, not per connection)
        self._shared_scanners: dict[int, Scanner] = {}  # 0 plain, 1 routed (outbound), 2 guarded (inbound)
        #: the declared pipelines of governed requests (ungoverned ones take the fast path)
        self.outbound = Outbound(self)
        self.outbound.caller = caller
        self.inbound = Inbound(self)
        #: governance: the policy set in force, this proxy's service and locality,
        #: and the offset from the engine's clock to unix milliseconds (warm-up starts)
        self.policies: PolicySet | None = None
        self.service = caller
        self.locality = Locality()
        self.clock_offset_ms = 0
        self._gov_rng = random.Random()
        self._route_gov: list[RouteGov | None] = []
        #: the time of the last expire() or policy change (governance callbacks outside a read)
        self._gov_now = 0.0
        #: live instances of this proxy's own service (inbound cluster-wide rate limits are divided by it)
        self.inbound_instances = 1
        self._inbound_cluster: Cluster | None = None
        #: what the fast path forwards inbound requests to: None while the inbound side is governed
        self._inbound_fast: Cluster | None = None
        self.set_routes(routes)

    @property
    def inbound_cluster(self) -> Cluster | None:
        """The cluster every request on an inbound link goes to (the local app)."""
        return self._inbound_cluster

    @inbound_cluster.setter
    def inbound_cluster(self, cluster: Cluster | None) -> None:
        self._inbound_cluster = cluster
        self._inbound_fast = cluster if self.inbound.gov is None else None

    # ------------------------------------------------------------ configuration

    def set_routes(self, routes: Sequence[Route]) -> None:
        """Swap the route table (atomic: a new immutable table)."""
        for r in routes:
            if r.cluster not in self.clusters:
                raise ValueError(f"route {r.service}/{r.method} names unknown cluster {r.cluster!r}")
        self.routes = list(routes)
        self._route_timeouts = [r.timeout for r in self.routes]
        self._route_max_timeouts = [r.max_timeout for r in self.routes]
        self.route_table = RouteTable([(r.service, r.method, i) for i, r in enumerate(self.routes)])
        self._route_clusters_all = [self.clusters[r.cluster] for r in self.routes]
        self._apply_governance(self._gov_now)

    # ------------------------------------------------------------ governance

    def now_ms(self, now: float) -> int:
        """The engine's time in unix milliseconds (the governance cores' clock)."""
        return int(now * 1000) + self.clock_offset_ms

    def set_governance(self, policies: PolicySet | None, now: float) -> None:
        """Apply a policy set (or none) between two reads, in place.

        Routes whose service gets a non-empty policy leave the fast path for the
        declared pipeline; the others return to it. Cluster state (breakers,
        outlier records, routers) is updated in place, so calls in flight keep
        and release what they hold; a call in flight is never failed by this.
        """
        self.policies = policies
        self._apply_governance(now)

    def _apply_governance(self, now: float) -> None:
        self._gov_now = now
        now_ms = self.now_ms(now)
        self._route_gov = build_routes(
            self.routes, self.clusters, self.policies, self.stats, self._route_gov, self.locality, now_ms, self._gov_rng
        )
        # the fast path sees None for a governed route's cluster and hands it to the slow path
        self._route_clusters = [None if g is not None else c for g, c in zip(self._route_gov, self._route_clusters_all)]
        own = self.policies.for_service(self.service) if self.policies is not None and self.service else None
        old = self.inbound.gov
        self.inbound.gov = build_inbound(own, self.stats, old, self.inbound_instances, self._gov_rng)
        self._inbound_fast = self._inbound_cluster if self.inbound.gov is None else None

    def set_inbound_instances(self, n: int) -> None:
        """The live instances of this proxy's own service changed (its registration's endpoints):
        re-divide the inbound ``cluster_rate`` limits among them."""
        self.inbound_instances = max(1, n)
        ig = self.inbound.gov
        if ig is not None and ig.limiter is not None:
            ig.limiter.set_instances(self.inbound_instances)

    def governed_routes(self) -> list[str]:
        """``service/method`` of each route on the declared pipeline (for ``/config_dump``)."""
        return [f"{r.service}/{r.method}" for r, g in zip(self.routes, self._route_gov) if g is not None]

    def park(self, cluster: Cluster, down: Link, mv: memoryview, off: int, size: int, now: float) -> None:
        """Hold a request until a connection of ``cluster`` is up (or ``park_timeout``)."""
        if len(cluster.parked) >= MAX_PARKED:
            self._refuse_raw(down, bytes(mv[off : off + size]), "overloaded", Status.OVERLOADED, f"too many requests waiting for cluster {cluster.name!r}")
            return
        since = self._replaying_since
        cluster.parked.append((down, bytes(mv[off : off + size]), now if since is None else since))
        if since is None:
            self.stats.error("parked")

    def send_governed(self, up: Link, call: Any, now: float, timeout_ms: int) -> None:
        """Forward one try of a governed call on ``up`` (the frame it retains, a new stream id)."""
        out = up.out
        o = len(out)
        out += call.frame
        usid = up.next_sid
        up.next_sid = usid + 1
        _U64.pack_into(out, o + 8, usid)
        dirty = self.dirty
        if not dirty or dirty[-1] is not up:  # one write per destination per read
            dirty.append(up)
        deadline = now + timeout_ms / 1000.0
        up.pending[usid] = Pending(call.down, call.down_sid, up, deadline, now, call.stats, call)
        self.pending_count += 1
        call.down.inflight += 1
        if up.endpoint is not None:
            up.endpoint.active += 1
        schedule(self, up, usid, deadline)

    def request_stats(self, direction: str, service: bytes, method: bytes) -> RequestStats:
        """The (direction, service, method) counters, through the fast path's cache."""
        cache = self.rs_cache[direction]
        key = service + b"\0" + method
        rs = cache.get(key)
        if rs is None:
            rs = self.stats.request_stats(direction, service, method)
            if len(cache) < 10000:
                cache[key] = rs
        return rs

    def relay_frame(self, down: Link, down_sid: int, frame: memoryview) -> None:
        """Relay a response frame to its caller under the caller's stream id."""
        if down.closed:
            return
        out = down.out
        o = len(out)
        out += frame
        _U64.pack_into(out, o + 8, down_sid)
        dirty = self.dirty
        if not dirty or dirty[-1] is not down:
            dirty.append(down)

    def governed_response(self, up: Link, p: Pending, scanner: Scanner, i: int, mv: memoryview, now: float) -> None:
        """A response to a governed call (its pending entry already popped): the chain in reverse."""
        self._settle(p)
        off, size, _ftype, flags, _sid, _t, _r, status = scanner.frame(i)
        pipeline = self.inbound if up.cluster is self._inbound_cluster else self.outbound
        pipeline.try_done(p, status, flags, now, mv[off : off + size], "")

    def _governed_failed(self, p: Pending, status: int, error: str, now: float, lost: bool, retry: bool = True) -> None:
        pipeline = self.inbound if p.up.cluster is self._inbound_cluster else self.outbound
        pipeline.try_done(p, status, 0, now, None, error, lost, retry)

    def new_scanner(self, link: Link) -> Scanner:
        """The scanner for a link's reads: routed for outbound downstream links;
        for inbound ones (with a guard), by the one service this proxy serves.

        It is shared by every link of its kind (see ``_shared_scanners``); use
        it only for one :meth:`feed` at a time.
        """
        routed = link.kind == DOWNSTREAM and link.listener == "outbound"
        guarded = not routed and link.kind == DOWNSTREAM and self.inbound_guard is not None
        key = 1 if routed else 2 if guarded else 0
        scanner = self._shared_scanners.get(key)
        if scanner is None:
            routes = self.route_table if routed else self.inbound_guard.routes if guarded else None
            scanner = self._shared_scanners[key] = Scanner(routes, self.max_frame_size, 1024)
        return scanner

    def _one_frame_scanner(self, down: Link, raw: bytes) -> tuple[Scanner, int, bytearray]:
        """A private scanner over one held frame (requests routed again may run inside a feed)."""
        routes = self.route_table if down.listener == "outbound" else None
        scanner = Scanner(routes, self.max_frame_size, 1)
        buf = bytearray(raw)
        return scanner, scanner.scan(buf), buf

    # ------------------------------------------------------------ input

    def feed(self, link: Link, scanner: Scanner, buf: bytearray, end: int, now: float) -> int:
        """Process every whole frame in ``buf[:end]``; return the bytes consumed.

        A protocol error in the first frame raises :class:`RemoteProtocolError`
        (the shell then calls :meth:`protocol_error`); frames before a bad one
        are processed first.
        """
        if link.kind == DOWNSTREAM and link.listener == "outbound":
            scanner.routes = self.route_table  # pick up a swapped table
        guard = self.inbound_guard if link.kind == DOWNSTREAM and link.listener == "inbound" else None
        start = 0
        mv = memoryview(buf)
        try:
            while True:
                n = scanner.scan(buf, start, end)
                if not n:
                    return start
                if guard is not None:
                    guard.relay(self, link, scanner, n, buf, mv, now)
                elif link.kind == DOWNSTREAM:
                    relay_requests(self, link, scanner, n, mv, now)
                else:
                    relay_responses(self, link, scanner, n, mv, now)
                    if link.draining and not link.pending and link.on_idle is not None:
                        link.on_idle(link)
                start = scanner.consumed
        finally:
            mv.release()

    def _mark(self, link: Link) -> None:
        if not link.closed:
            self.dirty.append(link)

    def _answer(self, link: Link, sid: int, status: int, error: str, flags: int = 0) -> None:
        if not link.closed:
            link.out += encode_response(sid, status=status, error=error, flags=flags)
            self.dirty.append(link)

    def _refuse(self, down: Link, scanner: Scanner, i: int, reason: str, status: int, error: str, flags: int = 0) -> None:
        """Answer request ``i`` ourselves (not forwarded): counted by reason and in ``requests_total``."""
        self.stats.rejected(reason)
        _off, _size, ftype, _f, sid, _t, _r, _s = scanner.frame(i)
        if ftype != _REQUEST:
            return  # a ONEWAY gets no answer
        service, method = scanner.routing_key(i)
        self.stats.answered(down.listener, service, method, status)
        if down.listener == "inbound" and not flags:
            flags = NOT_PROCESSED  # answered here, never handed to the app: a caller may resend it elsewhere
        self._answer(down, sid, status, error, flags)

    def _refuse_raw(self, down: Link, raw: bytes, reason: str, status: int, error: str) -> None:
        """:meth:`_refuse` for a held frame (parked or waiting for discovery)."""
        scanner, n, _buf = self._one_frame_scanner(down, raw)
        if n:
            self._refuse(down, scanner, 0, reason, status, error)
        else:  # pragma: no cover - held frames were whole frames
            self.stats.rejected(reason)

    def refuse_partial(self, link: Link, head: bytes | bytearray | memoryview, why: str) -> None:
        """A frame that will not be buffered (over the memory budget): answer its caller OVERLOADED.

        ``head`` is at least the 20-byte prefix of the frame. A request is
        answered on ``link``; a response is settled with its pending entry and
        its caller answered; anything else is just dropped.
        """
        ftype = head[3]
        sid = _U64.unpack_from(head, 8)[0]
        self.stats.error("frame_over_budget")
        if link.kind == DOWNSTREAM:
            self.stats.rejected("overloaded")
            if ftype == _REQUEST:
                hlen = head[18] << 8 | head[19]
                service = method = b"_unknown"
                if len(head) >= PREFIX_SIZE + hlen:
                    with contextlib.suppress(RemoteProtocolError):
                        header = parse_header(head[PREFIX_SIZE : PREFIX_SIZE + hlen])
                        service, method = header.service.encode(), header.method.encode()
                self.stats.answered(link.listener, service, method, Status.OVERLOADED)
                self._answer(link, sid, Status.OVERLOADED, why)
        elif ftype == _RESPONSE:
            p = link.pending.pop(sid, None)
            if p is not None and p.gov is not None:
                self._settle(p)
                self._governed_failed(p, Status.OVERLOADED, "response " + why, self._gov_now, False, retry=False)
            elif p is not None:
                self._settle(p)
                self.stats.finished(p.stats, Status.OVERLOADED, 0.0)
                self._answer(p.down, p.down_sid, Status.OVERLOADED, "response " + why)

    def stamp_problem(self, size: int, hlen: int) -> tuple[Status, str] | None:
        """Why a request of this size cannot carry the caller stamp, or None."""
        extra = len(self.stamp)
        if hlen + extra > 0xFFFF:
            return Status.PROTOCOL_ERROR, f"header of {hlen} bytes leaves no room for the caller stamp (65535 at most)"
        if size + extra > self.max_frame_size:
            return Status.FRAME_TOO_LARGE, f"frame of {size} bytes plus the caller stamp exceeds {self.max_frame_size} bytes"
        return None

    def slow_request(self, down: Link, scanner: Scanner, i: int, mv: memoryview, now: float) -> None:
        """Everything about one frame from a downstream link that the fast path does not do."""
        stats = self.stats
        inbound = down.listener == "inbound"
        off, size, ftype, _flags, sid, timeout_ms, route_id, _status = scanner.frame(i)
        if ftype == _REQUEST or ftype == _ONEWAY:
            oneway = ftype == _ONEWAY
            if down.reject:
                self._refuse(down, scanner, i, "overloaded", Status.OVERLOADED, "too many connections to this proxy")
                return
            if self.drain_mode is not None:
                if self.drain_mode == "hot_restart":
                    self._refuse(down, scanner, i, self.drain_mode, Status.UNAVAILABLE, "proxy hot restart: resend on a new connection", _HOT_RESTART)
                else:
                    self._refuse(down, scanner, i, self.drain_mode, Status.UNAVAILABLE, "proxy draining")
                return
            if inbound:
                if self.inbound.gov is not None:  # the inbound side is governed: its declared pipeline
                    self.inbound.request(down, scanner, i, mv, now)
                    return
                cluster = self.inbound_cluster
                route_timeout = self.default_timeout
                max_timeout = self.inbound_max_timeout
                if cluster is None:
                    self._refuse(down, scanner, i, "no_route", Status.NO_ROUTE, "this proxy has no local app")
                    return
            else:
                if route_id < 0:
                    service, method = scanner.routing_key(i)
                    if self.on_unknown_service is not None and service:
                        # discovery: subscribe on demand; the request waits
                        name = service.decode(errors="replace")
                        waiting = self.unrouted.get(name)
                        first = waiting is None
                        if waiting is None:
                            waiting = self.unrouted[name] = []
                        if len(waiting) < MAX_PARKED:
                            waiting.append((down, bytes(mv[off : off + size]), now))
                            if first:  # after queueing: the callback may answer at once
                                self.on_unknown_service(name)
                            return
                    log.info("no route for %s/%s from %s", service.decode(errors="replace"), method.decode(errors="replace"), down.name)
                    self._refuse(down, scanner, i, "no_route", Status.NO_ROUTE, f"no route for service {service.decode(errors='replace')!r}")
                    return
                rg = self._route_gov[route_id]
                if rg is not None:
                    self.outbound.request(down, scanner, i, mv, now, rg)
                    return
                cluster = self._route_clusters_all[route_id]
                route_timeout = self._route_timeouts[route_id]
                max_timeout = self._route_max_timeouts[route_id]
            if self.pending_count >= self.max_pending and not oneway:
                self._refuse(down, scanner, i, "overloaded", Status.OVERLOADED, "too many requests in flight")
                return
            if self.stamp and not inbound:
                hlen = mv[off + 18] << 8 | mv[off + 19]
                problem = self.stamp_problem(size, hlen)
                if problem is not None:
                    self._refuse(down, scanner, i, "too_large", problem[0], problem[1])
                    return
            up = cluster.pick()
            if up is None:
                if cluster.connecting and len(cluster.parked) < MAX_PARKED:
                    # a connection is on its way (e.g. replacing one that got
                    # GOAWAY): hold the request until it is up
                    since = self._replaying_since
                    cluster.parked.append((down, bytes(mv[off : off + size]), now if since is None else since))
                    if since is None:
                        stats.error("parked")
                    return
                self._refuse(down, scanner, i, "unavailable", Status.UNAVAILABLE, f"no healthy endpoint in cluster {cluster.name!r}")
                return
            if len(up.out) > self.high_watermark and self._not_taking(up, now):
                # back-pressure per destination: this link is not taking what
                # it has; another link of the cluster may, else the caller is told
                other = self._least_queued(cluster, now)
                if other is None:
                    self._refuse(
                        down,
                        scanner,
                        i,
                        "overloaded",
                        Status.OVERLOADED,
                        f"cluster {cluster.name!r} is not taking requests: {len(up.out)} bytes queued on {up.name}",
                    )
                    return
                up = other
            if oneway:
                forward(self, down, up, scanner, i, mv, now, 0.0, 0.0, True)
            else:
                forward(self, down, up, scanner, i, mv, now, route_timeout, max_timeout, False)
        elif ftype == _PING:
            down.out += mv[off : off + size]
            down.out[len(down.out) - size + 3] = _PONG
            self._mark(down)
        elif ftype == _PONG:
            down.awaiting_pong = 0
        elif ftype == _GOAWAY:
            down.draining = True
        else:
            stats.error("unexpected_frame")
            log.info("unexpected %s frame from downstream %s dropped", FrameType(ftype).name, down.name)

    def _not_taking(self, link: Link, now: float) -> bool:
        """Over the high watermark, and stalled (or more than a whole frame beyond it)."""
        queued = len(link.out)
        return queued > self.high_watermark and (now - link.last_tx > STALLED_AFTER or queued > self.high_watermark + self.max_frame_size)

    def _least_queued(self, cluster: Cluster, now: float) -> Link | None:
        """The cluster's link with the fewest requests pending among those still taking requests."""
        best: Link | None = None
        for links in cluster.links.values():
            for link in links:
                if not self._not_taking(link, now) and (best is None or len(link.pending) < len(best.pending)):
                    best = link
        return best

    def slow_response(self, up: Link, scanner: Scanner, i: int, mv: memoryview, now: float) -> None:
        """Everything about one frame from an upstream link that the fast path does not do."""
        stats = self.stats
        off, size, ftype, flags, sid, _t, _r, status = scanner.frame(i)
        if ftype == _RESPONSE:
            p = up.pending.pop(sid, None)
            if p is None:
                stats.error("late_response")
                return
            if p.gov is not None:
                if flags & _HOT_RESTART:
                    stats.error("hot_restart_from_upstream")
                self.governed_response(up, p, scanner, i, mv, now)
                return
            self._settle(p)
            if flags & _HOT_RESTART:
                # the peer is restarting and did not process it; the caller's
                # SDK resends on a fresh connection (it is safe: not processed)
                stats.error("hot_restart_from_upstream")
            stats.finished(p.stats, status, now - p.t0)
            down = p.down
            if not down.closed:
                out = down.out
                o = len(out)
                out += mv[off : off + size]
                _U64.pack_into(out, o + 8, p.down_sid)
                self._mark(down)
                if down.draining and down.inflight == 0 and down.on_idle is not None:
                    down.on_idle(down)
        elif ftype == _PONG:
            up.awaiting_pong = 0
        elif ftype == _PING:
            up.out += mv[off : off + size]
            up.out[len(up.out) - size + 3] = _PONG
            self._mark(up)
        elif ftype == _GOAWAY:
            self.upstream_goaway(up)
        else:
            stats.error("unexpected_frame")
            log.info("unexpected %s frame from upstream %s dropped", FrameType(ftype).name, up.name)

    def _settle(self, p: Pending) -> None:
        self.pending_count -= 1
        p.down.inflight -= 1
        ep = p.up.endpoint
        if ep is not None:
            ep.active -= 1

    # ------------------------------------------------------------ events

    def upstream_goaway(self, up: Link) -> None:
        """The peer asked us to send nothing new on ``up``."""
        if not up.draining:
            up.draining = True
            if up.cluster is not None:
                up.cluster.remove_link(up)
            self.stats.error("goaway_received")
            if up.on_goaway is not None:
                up.on_goaway(up)
            log.info("GOAWAY from %s: taken out of the pool, %d in flight", up.name, len(up.pending))

    def link_lost(self, link: Link, reason: str) -> None:
        """A connection closed or failed: answer what was in flight on it."""
        if link.closed:
            return
        link.closed = True
        link.out.clear()
        if link.kind == UPSTREAM:
            if link.cluster is not None:
                link.cluster.remove_link(link)
            pending = link.pending
            link.pending = {}
            for usid, p in pending.items():
                self._settle(p)
                if p.gov is not None:
                    self._governed_failed(p, Status.UNAVAILABLE, f"upstream connection lost: {reason}", self._gov_now, True)
                    continue
                self.stats.finished(p.stats, Status.UNAVAILABLE, 0.0)
                self._answer(p.down, p.down_sid, Status.UNAVAILABLE, f"upstream connection lost: {reason}")
            if pending:
                log.warning("upstream %s lost (%s): %d requests in flight answered UNAVAILABLE", link.name, reason, len(pending))

    def protocol_error(self, link: Link, exc: RemoteProtocolError) -> None:
        """A bad frame on ``link``: answer what we can; the shell closes it after flushing."""
        self.stats.error("protocol_error")
        log.warning("protocol error on %s: %s (%s); closing it", link.name, exc, exc.status.name)
        if link.kind == DOWNSTREAM and exc.stream_id is not None:
            self._answer(link, exc.stream_id, exc.status, str(exc))
        # and send nothing more on this connection: it closes once what is owed is answered
        link.out += encode_frame(_GOAWAY, 0, encode_header(status=exc.status, error=str(exc)))
        link.goaway_sent = True
        self._mark(link)

    def goaway(self, link: Link, reason: str) -> None:
        """Tell a downstream peer to send nothing new on ``link``."""
        if not link.goaway_sent and not link.closed:
            link.goaway_sent = True
            link.out += encode_frame(_GOAWAY, 0, encode_header(error=reason))
            self._mark(link)

    def ping(self, link: Link, token: int) -> None:
        link.awaiting_pong = token
        link.out += encode_frame(_PING, token)
        self._mark(link)

    def unpark(self, cluster: Cluster, now: float) -> None:
        """Route the requests parked on ``cluster`` again (a connection came up, or an attempt failed)."""
        if not cluster.parked:
            return
        parked = cluster.parked
        cluster.parked = []
        if cluster.gov is not None:
            cluster.gov.settle_held(0)  # each governed one takes a unit again if it waits again
        try:
            for down, raw, t in parked:
                if down.closed:
                    continue
                self._replaying_since = t  # a request parked again keeps its first park time
                scanner, n, buf = self._one_frame_scanner(down, raw)
                with memoryview(buf) as mv:
                    relay_requests(self, down, scanner, n, mv, now)
        finally:
            self._replaying_since = None

    def release_unrouted(self, service: str, found: bool, now: float) -> None:
        """A lazy subscription ended: route the waiting requests, or answer NO_ROUTE."""
        waiting = self.unrouted.pop(service, None)
        if not waiting:
            return
        for down, raw, _t in waiting:
            if down.closed:
                continue
            scanner, n, buf = self._one_frame_scanner(down, raw)
            if not found or scanner.frame(0)[6] < 0:
                # no endpoints, or the service is known but not this method
                # (a static route for another method): never queue it again
                why = "no endpoints known" if not found else "no route for this method"
                self._refuse(down, scanner, 0, "no_route", Status.NO_ROUTE, f"no route for service {service!r}: {why}")
                continue
            with memoryview(buf) as mv:
                relay_requests(self, down, scanner, n, mv, now)

    def _expire_unrouted(self, now: float) -> None:
        for service, waiting in list(self.unrouted.items()):
            if waiting and now - waiting[0][2] > self.unrouted_timeout:
                self.release_unrouted(service, False, now)

    def _expire_parked(self, now: float) -> None:
        for cluster in self.clusters.values():
            if cluster.parked and now - cluster.parked[0][2] > self.park_timeout:
                keep = []
                for down, raw, t in cluster.parked:
                    if now - t <= self.park_timeout:
                        keep.append((down, raw, t))
                        continue
                    self._refuse_raw(down, raw, "unavailable", Status.UNAVAILABLE, f"no connection to cluster {cluster.name!r} in time")
                cluster.parked = keep
                if cluster.gov is not None:
                    cluster.gov.settle_held(len(keep))

    def abort_all(self, reason: str, links: Iterable[Link] = ()) -> int:
        """Answer everything still waiting UNAVAILABLE (end of a drain). Returns how many.

        Args:
            reason: the error text.
            links: every upstream link still open, including the ones already
                out of their cluster's pool (GOAWAY, endpoint removed); the
                links in the pools are always included.
        """
        n = 0
        every: dict[int, Link] = {id(link): link for link in links}
        for cluster in list(self.clusters.values()) + ([self.inbound_cluster] if self.inbound_cluster else []):
            for cluster_links in cluster.links.values():
                for link in cluster_links:
                    every[id(link)] = link
            parked, cluster.parked = cluster.parked, []
            if cluster.gov is not None:
                cluster.gov.settle_held(0)
            for down, raw, _t in parked:
                if raw[3] == _REQUEST:
                    self._refuse_raw(down, raw, "drain", Status.UNAVAILABLE, reason)
                    n += 1
        for service in list(self.unrouted):
            for down, raw, _t in self.unrouted.pop(service):
                if raw[3] == _REQUEST:
                    self._refuse_raw(down, raw, "drain", Status.UNAVAILABLE, reason)
                    n += 1
        for up in every.values():
            pending = up.pending
            up.pending = {}
            for p in pending.values():
                self._settle(p)
                n += 1
                if p.gov is not None:
                    self._governed_failed(p, Status.UNAVAILABLE, reason, self._gov_now, False, retry=False)
                    continue
                self.stats.finished(p.stats, Status.UNAVAILABLE, 0.0)
                self._answer(p.down, p.down_sid, Status.UNAVAILABLE, reason)
        return n

    # ------------------------------------------------------------ time

    def expire(self, now: float) -> float | None:
        """Answer TIMEOUT for every request past its deadline.

        Returns:
            The next deadline, or None when nothing is pending.
        """
        self._gov_now = now
        self._expire_parked(now)
        if self._route_gov:
            tick_outliers(self.clusters.values(), self.now_ms(now), self.stats)
        if self.unrouted:
            self._expire_unrouted(now)
        keys = self.timer_keys
        wheel = self.timer_wheel
        # compare bucket times exactly as they are returned below: the timer
        # sleeps until keys[0] / TIMER_BUCKETS_PER_SECOND and must then find
        # that bucket due (int(now * 100) rounds 0.29 down to 28)
        while keys and keys[0] / TIMER_BUCKETS_PER_SECOND <= now:
            key = heapq.heappop(keys)
            bucket = wheel.pop(key)
            later = []
            for up, usid, deadline in bucket:
                p = up.pending.get(usid)
                if p is None or p.deadline != deadline:
                    continue  # answered already
                if deadline > now:
                    later.append((up, usid, deadline))
                    continue
                del up.pending[usid]
                self._settle(p)
                if p.gov is not None:
                    self._governed_failed(p, Status.TIMEOUT, f"no response within {deadline - p.t0:.3f}s", now, False)
                else:
                    self.stats.finished(p.stats, Status.TIMEOUT, now - p.t0)
                    self._answer(p.down, p.down_sid, Status.TIMEOUT, f"no response within {deadline - p.t0:.3f}s")
                if up.draining and not up.pending and up.on_idle is not None:
                    up.on_idle(up)
            if later:  # a rounding hair early: look again one bucket later
                nxt = wheel.get(key + 1)
                if nxt is None:
                    wheel[key + 1] = later
                    heapq.heappush(keys, key + 1)
                else:
                    nxt.extend(later)
        if keys:
            return keys[0] / TIMER_BUCKETS_PER_SECOND
        return None

    def take_dirty(self) -> list[Link]:
        dirty = self.dirty
        self.dirty = []
        return dirty
