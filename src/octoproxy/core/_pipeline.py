"""The engine's declared pipeline per direction, and the governance filters on it (sans-IO).

Theory of operation
-------------------
A request goes through the stages its direction declares (:data:`Outbound.STAGES`,
:data:`Inbound.STAGES`)::

    outbound: scan -> route -> filters -> balance(request) -> forward
              response -> pending -> filters in reverse -> (retry | relay)
    inbound:  scan -> guard -> filters -> forward (the local app)
              response -> pending -> filters in reverse -> relay

*scan* and *route* are the compiled scanner's (one call per read); the engine
resolves each route id, once per configuration, to a :class:`RouteGov` (its
filter tuple, its cluster's :class:`ClusterGov`, its retry policy) or to
``None``. A route whose governance is ``None`` never reaches this module: the
engine gives the fast path ``None`` for its cluster slot only when the route is
governed, so an ungoverned route costs exactly what it did before.

A :class:`Filter` is synchronous and sans-IO. ``on_request`` returns a
:class:`~octoproxy.governance.Verdict` (continue, or answer now with a status
and reason); when a filter answers, the filters before it see ``on_response``
with that status, in reverse, so every unit they took is given back.
``on_response`` runs once per call, in reverse order, when its final status is
known. Filters keep per-call state on the :class:`Call` only.

*balance* is the cluster's :class:`~octoproxy.governance.Router` (rules, tags,
locality, backups, warm-up), which receives the request (service, method,
metadata). Per *try* (not per call) the pipeline takes a unit of the cluster's
circuit breaker and, on the response, feeds the outlier detector and releases
the unit; then the retry decision (:func:`~octoproxy.governance.decide`) either
sends the retained frame again to another endpoint, or the response is relayed.

Nothing here does I/O or reads a clock; ``now`` comes from the engine.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from struct import Struct
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol._errors import RemoteProtocolError
from ..protocol._frame import parse_header
from ..protocol._protocol import PREFIX_SIZE, Flags, FrameType, Status
from ._balancer import Endpoint
from ..frame import encode_header
from ..governance import (
    CONTINUE,
    CircuitBreaker,
    Kind,
    Locality,
    Member,
    Resource,
    RetryBudget,
    RetryPolicy,
    Router,
    RoutingPolicy,
    Verdict,
    answer,
    decide,
    hold,
)
from ..governance import NOT_PROCESSED as NOT_PROCESSED

if TYPE_CHECKING:
    # loaded by the functions that build filters (a policy set is configured):
    # an ungoverned proxy never imports the policy parser, rate limiter, tracer or outlier detector
    from ..governance import Direction, OutlierDetector, PolicySet, RateLimiter, ServicePolicy, Tracer
    from ._engine import Cluster, Engine, Link, Pending, Route
    from ._stats import ProxyStats

__all__ = [
    "Call",
    "Filter",
    "RateLimitFilter",
    "BreakerFilter",
    "TraceFilter",
    "ObserveFilter",
    "ClusterGov",
    "RouteGov",
    "InboundGov",
    "Outbound",
    "Inbound",
    "NOT_PROCESSED",
]

log = logging.getLogger("octoproxy.proxy")
access_log = logging.getLogger("octoproxy.access")

_REQUEST = int(FrameType.REQUEST)
_ONEWAY = int(FrameType.ONEWAY)
_HOT_RESTART = int(Flags.HOT_RESTART)
_OK = int(Status.OK)


class Call:
    """One governed request, from its arrival to its final answer (slow path only)."""

    __slots__ = (
        "route",
        "service",
        "method",
        "caller",
        "metadata",
        "header",
        "body_off",
        "frame",
        "down",
        "down_sid",
        "t0",
        "t0_ms",
        "deadline_ms",
        "timeout_ms",
        "attempt",
        "tried",
        "endpoint",
        "idempotent",
        "retry_unit",
        "request_unit",
        "stats",
        "traceparent",
        "tracestate",
    )

    def __init__(self, route: Any, service: str, method: str, caller: str, metadata: Mapping[str, str], down: Link, down_sid: int, t0: float, t0_ms: int) -> None:
        self.route = route
        self.service = service
        self.method = method
        self.caller = caller
        #: the request's metadata, read-only (the parsed header's map; empty when
        #: no filter or rule of the route reads metadata); filters add entries
        #: through their own fields (e.g. ``traceparent``), appended to the header
        self.metadata = metadata
        self.header: Any = None
        self.body_off = 0
        #: the frame as forwarded (caller stamp, new metadata); kept for retries
        self.frame = b""
        self.down = down
        self.down_sid = down_sid
        self.t0 = t0
        self.t0_ms = t0_ms
        self.deadline_ms = 0
        self.timeout_ms = 0
        self.attempt = 0
        self.tried: frozenset[str] = frozenset()
        self.endpoint = ""
        self.idempotent = False
        #: a RETRIES unit of the cluster's breaker is held by this try
        self.retry_unit = False
        #: a REQUESTS unit of the cluster's breaker is held by this try
        self.request_unit = False
        self.stats: Any = None
        #: set by the trace filter: the values this hop sends on
        self.traceparent = ""
        self.tracestate: str | None = None


class Filter(Protocol):
    """A step of a route's filter chain (synchronous, sans-IO).

    Attributes:
        kind: the ``rejected_total{reason}`` label of its answers.
        on_request_acts: False when ``on_request`` always continues and changes
            nothing (the chain then skips the call).
        on_response_acts: False when ``on_response`` does nothing (skipped too).
    """

    kind: str
    on_request_acts: bool
    on_response_acts: bool

    def on_request(self, call: Call, now_ms: int) -> Verdict:
        """Look at (and possibly change) a request: CONTINUE, or an answer verdict."""
        ...

    def on_response(self, call: Call, status: int, now_ms: int) -> None:
        """The call's final status (in reverse order); give back what ``on_request`` took."""
        ...


class RateLimitFilter:
    """Token buckets per (service, method) outbound, per (service, method, caller) inbound."""

    __slots__ = ("limiter",)
    kind = "rate_limited"
    on_request_acts = True
    on_response_acts = False

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def on_request(self, call: Call, now_ms: int) -> Verdict:
        return self.limiter.check(call.service, call.method, call.caller, now_ms)

    def on_response(self, call: Call, status: int, now_ms: int) -> None:
        return None


class BreakerFilter:
    """The inbound side's circuit breaker: requests in flight to the local app."""

    __slots__ = ("breaker",)
    kind = "circuit_breaker"
    on_request_acts = True
    on_response_acts = True

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def on_request(self, call: Call, now_ms: int) -> Verdict:
        v = self.breaker.acquire_request()
        if v is CONTINUE:
            call.request_unit = True
        return v

    def on_response(self, call: Call, status: int, now_ms: int) -> None:
        if call.request_unit:
            call.request_unit = False
            self.breaker.release_request()


class TraceFilter:
    """W3C trace context: keep the trace id, a new span id per hop; start a trace when absent."""

    __slots__ = ("tracer",)
    kind = "trace"
    on_request_acts = True
    on_response_acts = False

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def on_request(self, call: Call, now_ms: int) -> Verdict:
        md = call.metadata
        incoming = md.get("tracestate")
        tp, ts = self.tracer.next_hop(md.get("traceparent"), incoming)
        call.traceparent = tp
        # a new trace drops the old tracestate: overwritten with an empty value
        call.tracestate = "" if ts is None and incoming else None
        return CONTINUE

    def on_response(self, call: Call, status: int, now_ms: int) -> None:
        return None


class ObserveFilter:
    """Per (direction, service, method, caller, status) counts and latency; the sampled access log."""

    __slots__ = ("stats", "direction", "sample_rate", "_random", "_cache")
    kind = "observe"
    on_request_acts = False
    on_response_acts = True

    def __init__(self, stats: ProxyStats, direction: str, sample_rate: float, rng: random.Random) -> None:
        self.stats = stats
        self.direction = direction
        self.sample_rate = sample_rate
        self._random = rng.random
        #: (the call's RequestStats, caller) -> CallerStats
        self._cache: dict[tuple[Any, str], Any] = {}

    def on_request(self, call: Call, now_ms: int) -> Verdict:
        return CONTINUE

    def on_response(self, call: Call, status: int, now_ms: int) -> None:
        seconds = max(0, now_ms - call.t0_ms) / 1000.0
        key = (call.stats, call.caller)
        cs = self._cache.get(key)
        if cs is None:
            cs = self.stats.caller_stats(self.direction, call.service, call.method, call.caller)
            if len(self._cache) < 10000:
                self._cache[key] = cs
        cs.observe(status, seconds)
        if self.sample_rate > 0.0 and self._random() < self.sample_rate:
            access_log.info(
                json.dumps(
                    {
                        "direction": self.direction,
                        "service": call.service,
                        "method": call.method,
                        "caller": call.caller,
                        "status": Status(status).name if status in _STATUS_VALUES else str(status),
                        "duration_ms": max(0, now_ms - call.t0_ms),
                        "endpoint": call.endpoint,
                        "attempts": call.attempt,
                        "traceparent": call.traceparent,
                    },
                    separators=(",", ":"),
                )
            )


_STATUS_VALUES = {int(s) for s in Status}


class Chain:
    """A resolved filter tuple, with the calls that do something picked out once.

    Attributes:
        filters: every filter, in request order.
        requests: ``(filter, undo)`` for each filter whose ``on_request`` acts;
            ``undo`` is the filters before it whose ``on_response`` acts, reversed
            (what runs when that filter answers).
        responses: the filters whose ``on_response`` acts, in reverse order.
    """

    __slots__ = ("filters", "requests", "responses")

    def __init__(self, filters: tuple[Filter, ...]) -> None:
        self.filters = filters
        self.requests = tuple(
            (f, tuple(g for g in reversed(filters[:k]) if g.on_response_acts)) for k, f in enumerate(filters) if f.on_request_acts
        )
        self.responses = tuple(g for g in reversed(filters) if g.on_response_acts)

    def request(self, call: Call, now_ms: int) -> tuple[Filter, Verdict] | None:
        """Run the request side; None when every filter continued, else the filter that answered
        (or asked to hold: the request then waits in the held queue) and its verdict."""
        for f, undo in self.requests:
            v = f.on_request(call, now_ms)
            if v is not CONTINUE:
                for g in undo:
                    g.on_response(call, v.status, now_ms)
                return f, v
        return None

    def response(self, call: Call, status: int, now_ms: int) -> None:
        """Run the response side, in reverse order."""
        for g in self.responses:
            g.on_response(call, status, now_ms)


class ClusterGov:
    """Per-cluster governance state: router, outlier detector, breaker, retry budget.

    Args:
        name: the cluster's name.
        local: the proxy's own locality.
        now_ms: the current time.
        rng: randomness of the router.
    """

    __slots__ = ("name", "router", "outlier", "breaker", "budget", "_members_key")

    def __init__(self, name: str, local: Locality, now_ms: int, rng: random.Random) -> None:
        self.name = name
        self.router = Router(name, RoutingPolicy(), local, rng)
        self.outlier: OutlierDetector | None = None
        self.breaker: CircuitBreaker | None = None
        self.budget: RetryBudget | None = None
        self._members_key: tuple[Any, ...] = ()

    def configure(self, policy: ServicePolicy | None, now_ms: int) -> None:
        """Apply a (new) policy in place: units held stay held, ejections keep their end."""
        routing = policy.routing if policy is not None and policy.routing is not None else RoutingPolicy()
        if routing != self.router.policy:
            self.router.set_policy(routing)
        oc = policy.outlier if policy is not None else None
        if oc is None:
            if self.outlier is not None:
                for address in list(self.router._ejected):
                    self.router.set_ejected(address, False)
            self.outlier = None
        elif self.outlier is None:
            from ..governance import OutlierDetector

            self.outlier = OutlierDetector(self.name, oc, now_ms)
            self._members_key = ()  # the next sync() tells it the endpoints
        elif self.outlier.config != oc:
            self.outlier.set_config(oc)
        bl = policy.breaker if policy is not None else None
        if bl is None:
            self.breaker = None  # calls in flight release into the object they hold
        elif self.breaker is None:
            self.breaker = CircuitBreaker(self.name, bl)
        elif self.breaker.limits != bl:
            self.breaker.set_limits(bl)
        rp = policy.retry if policy is not None else None
        if rp is None:
            self.budget = None
        elif self.budget is None or self.budget.config != rp.budget:
            self.budget = RetryBudget(rp.budget, now_ms)

    def hold(self) -> tuple[Verdict, CircuitBreaker | None]:
        """A request is about to wait for a connection: HOLD (a PENDING unit taken), or OVERLOADED (``max_pending``).

        Returns:
            The verdict, and on HOLD the breaker the unit was taken from (None: no
            breaker): the held entry keeps it and :func:`let_go` gives it back when
            the request leaves the held queue (replayed, timed out, drained), to
            that very breaker even if a pushed policy replaced it meanwhile.
        """
        breaker = self.breaker
        if breaker is None:
            return _HOLD, None
        v = breaker.hold_pending()
        return v, breaker if v.kind is Kind.HOLD else None

    def state(self, now_ms: int) -> dict[str, Any]:
        """What ``GET /clusters`` shows: ejected endpoints, breaker units in use, retries the budget allows."""
        out: dict[str, Any] = {"ejected": sorted(self.router._ejected)}
        if self.breaker is not None:
            out["breaker"] = {r.name.lower(): self.breaker.in_use(r) for r in Resource}
        if self.budget is not None:
            out["retry_budget_available"] = self.budget.available(now_ms)
        return out

    def sync(self, endpoints: Sequence[Endpoint]) -> None:
        """Follow the cluster's endpoints (discovery changed them, or their fields)."""
        key = tuple((id(ep), ep.weight, ep.region, ep.idc, ep.center, ep.backup, ep.warmup_start_ms, ep.warmup_window_ms, tuple(ep.tags.items())) for ep in endpoints)
        if key == self._members_key:
            self.router.invalidate()
            return
        self._members_key = key
        self.router.update([Member(ep, ep.center, ep.backup, ep.warmup_start_ms, ep.warmup_window_ms) for ep in endpoints])
        if self.outlier is not None:
            self.outlier.update(ep.address for ep in endpoints)


def let_go(unit: CircuitBreaker | None) -> None:
    """A held request left the held queue: give back the PENDING unit it took (:meth:`ClusterGov.hold`)."""
    if unit is not None:
        unit.release(Resource.PENDING)


class RouteGov:
    """A governed route: its resolved filter tuple, its cluster, its retry policy."""

    __slots__ = ("route", "cluster", "cgov", "filters", "chain", "retry", "policy", "reads_metadata", "idempotent")

    def __init__(self, route: Route, cluster: Cluster, cgov: ClusterGov, filters: tuple[Filter, ...], retry: RetryPolicy | None, policy: ServicePolicy) -> None:
        self.route = route
        self.cluster = cluster
        self.cgov = cgov
        self.filters = filters
        self.chain = Chain(filters)
        self.retry = retry
        #: method -> whether the retry policy marks it idempotent (bounded cache)
        self.idempotent: dict[str, bool] = {}
        self.policy = policy
        #: the header is parsed only when a filter or a routing rule reads the metadata
        rules = policy.routing.rules if policy.routing is not None else ()
        self.reads_metadata = any(isinstance(f, TraceFilter) for f in filters) or any(r.match_metadata for r in rules)


class InboundGov:
    """The inbound side's filter tuple (this proxy's own service's policy)."""

    __slots__ = ("filters", "chain", "policy", "limiter", "breaker")

    def __init__(self, filters: tuple[Filter, ...], policy: ServicePolicy, limiter: RateLimiter | None, breaker: CircuitBreaker | None) -> None:
        self.filters = filters
        self.chain = Chain(filters)
        self.policy = policy
        self.limiter = limiter
        self.breaker = breaker


def _outbound_filters(policy: ServicePolicy, stats: ProxyStats, old: RouteGov | None, rng: random.Random) -> tuple[Filter, ...]:
    from ..governance import Direction, RateLimiter, Tracer

    # observe first: its on_response runs last, and for every answer of a later filter
    sample = policy.access_log.sample_rate if policy.access_log is not None else 0.0
    filters: list[Filter] = [ObserveFilter(stats, "outbound", sample, rng)]
    rules = tuple(r for r in policy.rate_limits if r.direction is Direction.OUTBOUND)
    if rules:
        prev = next((f for f in old.filters if isinstance(f, RateLimitFilter)), None) if old is not None else None
        if prev is not None and prev.limiter._rules == rules:  # unchanged: keep its buckets
            filters.append(prev)
        else:
            filters.append(RateLimitFilter(RateLimiter(rules, Direction.OUTBOUND)))
    if policy.tracing is not None and policy.tracing.enabled:
        filters.append(TraceFilter(Tracer(policy.tracing)))
    return tuple(filters)


def build_inbound(policy: ServicePolicy | None, stats: ProxyStats, old: InboundGov | None, instances: int, rng: random.Random) -> InboundGov | None:
    """The inbound filter tuple for this proxy's own service, or None (the fast path)."""
    if policy is None:
        return None
    from ..governance import Direction, RateLimiter, Tracer

    rules = tuple(r for r in policy.rate_limits if r.direction is Direction.INBOUND)
    if not rules and policy.breaker is None and policy.tracing is None and policy.access_log is None:
        return None
    sample = policy.access_log.sample_rate if policy.access_log is not None else 0.0
    filters: list[Filter] = [ObserveFilter(stats, "inbound", sample, rng)]
    limiter = None
    if rules:
        if old is not None and old.limiter is not None and old.limiter._rules == rules:
            limiter = old.limiter
        else:
            limiter = RateLimiter(rules, Direction.INBOUND, instances=max(1, instances))
        filters.append(RateLimitFilter(limiter))
    breaker = None
    if policy.breaker is not None:
        if old is not None and old.breaker is not None:
            breaker = old.breaker
            if breaker.limits != policy.breaker:
                breaker.set_limits(policy.breaker)
        else:
            breaker = CircuitBreaker("local_app", policy.breaker)
        filters.append(BreakerFilter(breaker))
    if policy.tracing is not None and policy.tracing.enabled:
        filters.append(TraceFilter(Tracer(policy.tracing)))
    return InboundGov(tuple(filters), policy, limiter, breaker)


def build_routes(
    routes: Sequence[Route],
    clusters: dict[str, Cluster],
    policies: PolicySet | None,
    stats: ProxyStats,
    old: Sequence[RouteGov | None],
    local: Locality,
    now_ms: int,
    rng: random.Random,
) -> list[RouteGov | None]:
    """Resolve each route to its governance (None: the route keeps the fast path).

    A route is governed when the policy set has a non-empty policy for its
    service. Cluster state (router, outlier, breaker, budget) is kept on the
    cluster and updated in place, so calls in flight release what they hold.
    """
    by_old = {id(g.route): g for g in old if g is not None}
    out: list[RouteGov | None] = []
    governed_clusters: set[str] = set()
    for r in routes:
        policy = policies.for_service(r.service) if policies is not None else None
        cluster = clusters[r.cluster]
        if policy is None or policy.empty:
            out.append(None)
            continue
        cg = cluster.gov
        if cg is None:
            cg = cluster.gov = ClusterGov(cluster.name, local, now_ms, rng)
        if cluster.name not in governed_clusters:
            governed_clusters.add(cluster.name)
            cg.router.local = local
            cg.configure(policy, now_ms)
            cg.sync(cluster.endpoints)
        prev = by_old.get(id(r))
        out.append(RouteGov(r, cluster, cg, _outbound_filters(policy, stats, prev, rng), policy.retry, policy))
    for c in clusters.values():  # a cluster no governed route uses any more
        if c.gov is not None and c.name not in governed_clusters:
            c.gov.configure(None, now_ms)
            c.gov = None
    return out


def _least_pending(links: list[Link]) -> Link:
    best = links[0]
    for link in links:
        if link.npending < best.npending:
            best = link
    return best


_EMPTY_MD: Mapping[str, str] = {}
_U32 = Struct(">I")
_U16 = Struct(">H")


def _frame_of(call: Call, stamp: bytes, mv: memoryview, off: int, hlen: int, size: int) -> bytes:
    """The request as forwarded: its header with ``stamp`` and this hop's trace context appended.

    Protobuf merges concatenated messages (the last scalar wins, map entries
    merge by key), so appending fields overrides them without re-encoding the
    header, as the fast path does with the caller stamp.
    """
    extra = stamp
    if call.traceparent:
        md = {"traceparent": call.traceparent}
        if call.tracestate is not None:
            md["tracestate"] = call.tracestate
        extra = extra + encode_header(metadata=md)
    if not extra:
        return bytes(mv[off : off + size])
    hend = off + PREFIX_SIZE + hlen
    n = len(extra)
    frame = bytearray(mv[off:hend])
    frame += extra
    frame += mv[hend : off + size]
    _U32.pack_into(frame, 4, size - 8 + n)
    _U16.pack_into(frame, 18, hlen + n)
    return bytes(frame)


class Outbound:
    """The outbound (caller's proxy) pipeline for governed routes."""

    STAGES = ("scan", "route", "filters", "balance", "forward")
    RESPONSE_STAGES = ("pending", "filters_reversed", "retry_or_relay")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.caller = ""

    # ------------------------------------------------------------ request

    def request(self, down: Link, scanner: Any, i: int, mv: memoryview, now: float, rg: RouteGov) -> None:
        engine = self.engine
        off, size, ftype, _flags, sid, timeout_ms, _route, _s = scanner.frame(i)
        oneway = ftype == _ONEWAY
        cluster = rg.cluster
        if not oneway and engine.pending_count >= engine.max_pending:
            engine._refuse(down, scanner, i, "overloaded", Status.OVERLOADED, "too many requests in flight")
            return
        if not any(cluster.links.values()) and cluster.connecting:
            # held before any filter takes a unit (it runs them when replayed)
            v, unit = rg.cgov.hold()
            if v.kind is not Kind.HOLD:
                engine._refuse(down, scanner, i, "circuit_breaker", v.status, v.reason)
                return
            engine.park(cluster, down, mv, off, size, now, unit)
            return
        hlen = mv[off + 18] << 8 | mv[off + 19]
        md = _EMPTY_MD
        if rg.reads_metadata:
            try:
                md = parse_header(mv[off + PREFIX_SIZE : off + PREFIX_SIZE + hlen]).metadata
            except RemoteProtocolError as exc:
                engine._refuse(down, scanner, i, "protocol_error", Status.PROTOCOL_ERROR, str(exc))
                return
        now_ms = engine.now_ms(now)
        service_b, method_b = scanner.routing_key(i)
        call = Call(rg, service_b.decode(errors="replace"), method_b.decode(errors="replace"), self.caller, md, down, sid, now, now_ms)
        call.stats = engine.request_stats("outbound", service_b, method_b)
        refused = rg.chain.request(call, now_ms)
        if refused is not None:
            if refused[1].kind is Kind.HOLD:  # a filter asks to wait: the held queue (it runs again on replay)
                engine.park(cluster, down, mv, off, size, now)
            else:
                engine._refuse(down, scanner, i, refused[0].kind, refused[1].status, refused[1].reason)
            return
        call.frame = _frame_of(call, engine.stamp, mv, off, hlen, size)
        if len(call.frame) > engine.max_frame_size or len(call.frame) - size + hlen > 0xFFFF:
            self._finish(call, Status.FRAME_TOO_LARGE, f"frame of {len(call.frame)} bytes exceeds {engine.max_frame_size} bytes", now)
            return
        route = rg.route
        timeout = timeout_ms / 1000.0 if timeout_ms else route.timeout
        if route.max_timeout and timeout > route.max_timeout:
            timeout = route.max_timeout
        call.timeout_ms = max(1, int(timeout * 1000))
        call.deadline_ms = now_ms + call.timeout_ms
        if rg.retry is not None:
            idem = rg.idempotent.get(call.method)
            if idem is None:
                idem = rg.retry.is_idempotent(call.method)
                if len(rg.idempotent) < 1024:
                    rg.idempotent[call.method] = idem
            call.idempotent = idem
        if rg.cgov.budget is not None:
            rg.cgov.budget.deposit(now_ms)
        if oneway:
            self._oneway(call, now_ms)
            return
        first = call.timeout_ms
        if rg.retry is not None and rg.retry.per_try_timeout_ms > 0:
            first = min(first, rg.retry.per_try_timeout_ms)
        not_sent = self._try(call, now, now_ms, first)
        if not_sent is not None:
            engine.stats.rejected(not_sent[1])
            self._finish(call, not_sent[0].status, not_sent[0].reason, now)

    def _oneway(self, call: Call, now_ms: int) -> None:
        engine = self.engine
        rg: RouteGov = call.route
        ep = rg.cgov.router.pick(call.service, call.method, call.metadata, now_ms, None)
        if isinstance(ep, Endpoint):
            links = rg.cluster.links.get(ep.address)
            if links:
                up = _least_pending(links)
                up.out += call.frame
                engine._mark(up)
                engine.stats.oneway.inc()
        rg.chain.response(call, _OK, now_ms)

    def _try(self, call: Call, now: float, now_ms: int, timeout_ms: int) -> tuple[Verdict, str] | None:
        """Balance and forward one try; None when sent, else why it could not go (and the ``rejected_total`` reason)."""
        engine = self.engine
        rg: RouteGov = call.route
        cg = rg.cgov
        cluster = rg.cluster
        for _ in range(4):  # an endpoint with no connection left is skipped (nothing was sent)
            picked = cg.router.pick(call.service, call.method, call.metadata, now_ms, call.tried or None)
            if not isinstance(picked, Endpoint):
                return picked, "no_route" if picked.status == Status.NO_ROUTE else "unavailable"
            links = cluster.links.get(picked.address)
            if links:
                break
            cg.router.invalidate()
            call.tried = call.tried | {picked.address}
        else:
            return answer(Status.UNAVAILABLE, f"no connected endpoint in cluster {cluster.name!r}"), "unavailable"
        up = links[0] if len(links) == 1 else _least_pending(links)
        if len(up.out) > engine.high_watermark and engine._not_taking(up, now):
            other = engine._least_queued(cluster, now)
            if other is None:
                return answer(Status.OVERLOADED, f"cluster {cluster.name!r} is not taking requests: {len(up.out)} bytes queued on {up.name}"), "overloaded"
            up = other
        breaker = cg.breaker
        if breaker is not None:
            if call.attempt > 0:
                v = breaker.acquire(Resource.RETRIES)
                if v is not CONTINUE:
                    return v, "circuit_breaker"
                call.retry_unit = True
            v = breaker.acquire_request()
            if v is not CONTINUE:
                if call.retry_unit:
                    call.retry_unit = False
                    breaker.release(Resource.RETRIES)
                return v, "circuit_breaker"
            call.request_unit = True
        call.attempt += 1
        assert up.endpoint is not None
        call.endpoint = up.endpoint.address
        engine.send_governed(up, call, now, min(timeout_ms, max(1, call.deadline_ms - now_ms)))
        return None

    # ------------------------------------------------------------ response

    def try_done(self, p: Pending, status: int, flags: int, now: float, frame: memoryview | None, error: str, lost: bool = False, retry: bool = True) -> None:
        """One try ended (response, timeout, lost connection): outlier, breaker, then retry or relay."""
        engine = self.engine
        call: Call = p.gov
        rg: RouteGov = call.route
        cg = rg.cgov
        now_ms = engine.now_ms(now)
        address = call.endpoint
        outlier = cg.outlier
        if outlier is not None and not flags & _HOT_RESTART:
            failed = lost or status in _FAILURES
            if outlier.record(address, failed, now_ms):
                cg.router.set_ejected(address, True)
                engine.stats.ejection(cg.name)
                log.warning("cluster %s: endpoint %s ejected (outlier)", cg.name, address)
        breaker = cg.breaker
        if breaker is not None:
            if call.request_unit:
                call.request_unit = False
                breaker.release_request()
            if call.retry_unit:
                call.retry_unit = False
                breaker.release(Resource.RETRIES)
        if (status != _OK or flags & (_HOT_RESTART | NOT_PROCESSED)) and retry and rg.retry is not None and not call.down.closed:
            d = decide(
                rg.retry,
                status=status,
                flags=flags,
                connect_failed=False,
                idempotent=call.idempotent,
                attempt=call.attempt,
                now_ms=now_ms,
                deadline_ms=call.deadline_ms,
                endpoint=address,
                tried=call.tried,
                budget=cg.budget,
            )
            if d.retry:
                call.tried = d.exclude
                if self._try(call, now, now_ms, d.timeout_ms) is None:
                    engine.stats.retried(cg.name)
                    return
        if frame is not None:
            engine.relay_frame(call.down, call.down_sid, frame)
            self._done(call, status, now)
        else:
            self._finish(call, status, error, now)

    def _finish(self, call: Call, status: int, error: str, now: float) -> None:
        self.engine._answer(call.down, call.down_sid, status, error)
        self._done(call, status, now)

    def _done(self, call: Call, status: int, now: float) -> None:
        engine = self.engine
        if call.stats is not None:
            engine.stats.finished(call.stats, status, now - call.t0)
        call.route.chain.response(call, status, engine.now_ms(now))
        down = call.down
        if down.draining and down.inflight == 0 and down.on_idle is not None:
            down.on_idle(down)


_HOLD = hold("waiting for a connection")
_FAILURES = frozenset({int(Status.UNAVAILABLE), int(Status.TIMEOUT), int(Status.OVERLOADED)})


class Inbound:
    """The inbound (provider's proxy) pipeline when this proxy's own service is governed."""

    STAGES = ("scan", "guard", "filters", "forward")
    RESPONSE_STAGES = ("pending", "filters_reversed", "relay")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gov: InboundGov | None = None

    def request(self, down: Link, scanner: Any, i: int, mv: memoryview, now: float) -> None:
        engine = self.engine
        ig = self.gov
        assert ig is not None
        off, size, ftype, _flags, sid, timeout_ms, _route, _s = scanner.frame(i)
        oneway = ftype == _ONEWAY
        cluster = engine.inbound_cluster
        if cluster is None:
            engine._refuse(down, scanner, i, "no_route", Status.NO_ROUTE, "this proxy has no local app")
            return
        if not oneway and engine.pending_count >= engine.max_pending:
            engine._refuse(down, scanner, i, "overloaded", Status.OVERLOADED, "too many requests in flight")
            return
        up = cluster.pick()
        if up is None:
            if cluster.connecting:
                engine.park(cluster, down, mv, off, size, now)
                return
            engine._refuse(down, scanner, i, "unavailable", Status.UNAVAILABLE, f"no healthy endpoint in cluster {cluster.name!r}")
            return
        hlen = mv[off + 18] << 8 | mv[off + 19]
        try:
            header = parse_header(mv[off + PREFIX_SIZE : off + PREFIX_SIZE + hlen])
        except RemoteProtocolError as exc:
            engine._refuse(down, scanner, i, "protocol_error", Status.PROTOCOL_ERROR, str(exc))
            return
        now_ms = engine.now_ms(now)
        call = Call(ig, header.service, header.method, header.caller, header.metadata, down, sid, now, now_ms)
        service_b, method_b = scanner.routing_key(i)
        call.stats = engine.request_stats("inbound", service_b, method_b)
        refused = ig.chain.request(call, now_ms)
        if refused is not None:
            if refused[1].kind is Kind.HOLD:
                engine.park(cluster, down, mv, off, size, now)
            else:
                engine._refuse(down, scanner, i, refused[0].kind, refused[1].status, refused[1].reason)
            return
        call.frame = _frame_of(call, b"", mv, off, hlen, size)
        if oneway:
            up.out += call.frame
            engine._mark(up)
            engine.stats.oneway.inc()
            ig.chain.response(call, _OK, now_ms)
            return
        timeout = timeout_ms / 1000.0 if timeout_ms else engine.default_timeout
        if engine.inbound_max_timeout and timeout > engine.inbound_max_timeout:
            timeout = engine.inbound_max_timeout
        call.attempt = 1
        engine.send_governed(up, call, now, max(1, int(timeout * 1000)))

    def try_done(self, p: Pending, status: int, flags: int, now: float, frame: memoryview | None, error: str, lost: bool = False, retry: bool = True) -> None:
        engine = self.engine
        call: Call = p.gov
        if frame is not None:
            engine.relay_frame(call.down, call.down_sid, frame)
        else:
            engine._answer(call.down, call.down_sid, status, error)
        if call.stats is not None:
            engine.stats.finished(call.stats, status, now - call.t0)
        call.route.chain.response(call, status, engine.now_ms(now))
        down = call.down
        if down.draining and down.inflight == 0 and down.on_idle is not None:
            down.on_idle(down)


def tick_outliers(clusters: Iterable[Cluster], now_ms: int, stats: ProxyStats) -> None:
    """Run the outlier detectors that are due; apply their changes to the routers."""
    for c in clusters:
        cg = c.gov
        if cg is None or cg.outlier is None or now_ms < cg.outlier.next_deadline():
            continue
        for address, ejected in cg.outlier.tick(now_ms):
            cg.router.set_ejected(address, ejected)
            if ejected:
                stats.ejection(cg.name)
            log.info("cluster %s: endpoint %s %s (outlier)", cg.name, address, "ejected" if ejected else "back in rotation")
