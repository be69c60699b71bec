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

Requests are forwarded with their stream id rewritten in place to the id of
a slot in the engine's :class:`PendingTable` (slot and generation), which
maps it back; responses find their slot by stream id alone, on the link the
request left on. Each slot has a deadline in the table's timer wheel;
:meth:`Engine.expire` answers TIMEOUT for the expired ones, and a late
response is dropped and counted. An upstream link that is lost answers every
request in flight on it UNAVAILABLE at once. Per-request state, stats
included (:class:`StatsTable`), lives in arrays: the fast path makes no
Python object per request.

The fast path (:func:`relay_requests`, :func:`relay_responses`,
:func:`forward`, at the end of this file) is written here once; per frame it
calls the relay's byte-level primitives (the scanner's fields, copy with the
caller stamp, the stream-id rewrite, the stats-key cache), which are inline C
in the compiled build (``_fastpath.pxd``) and their twin ``_relay_py.py``
interpreted.

Nothing here does I/O or reads a clock: time comes in as an argument.

A request that cannot be routed yet (no connection of its cluster while one
is being made, or a service the shell is discovering on demand) waits in
:attr:`Engine.held`, the one held-request queue (``core/_held.py``), until
the shell releases it (:meth:`Engine.unpark`, :meth:`Engine.release_unrouted`)
or its deadline passes in :meth:`Engine.expire`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from array import array
from struct import Struct
from typing import TYPE_CHECKING, Any

from ._balancer import Balancer, Endpoint, RoundRobin, make_balancer
from ..protocol._errors import RemoteProtocolError
from ..protocol._frame import parse_header
from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE, PREFIX_SIZE, Flags, FrameType, Status
from ..frame import RouteTable, Scanner, encode_frame, encode_header, encode_response
from ..governance import Locality
from ._pipeline import NOT_PROCESSED, ClusterGov, Inbound, Outbound, RouteGov, build_inbound, build_routes, tick_outliers

# the relay's byte-level primitives: interpreted, their pure-Python twin;
# compiled (this file built as ``_kernel_c``), the inline C functions of
# ``_fastpath.pxd``, cimported (the line is resolved when Cython compiles)
if TYPE_CHECKING or not __name__.endswith("._kernel_c"):
    from ._relay_py import (
        copy_frame,
        copy_stamped,
        f_flags,
        f_offset,
        f_route,
        f_sid,
        f_size,
        f_status,
        f_timeout,
        f_type,
        header_len,
        kc_fill,
        kc_lookup,
        new_key_cache,
        put_sid,
    )
else:
    from cython.cimports.octoproxy.core._fastpath import (
        copy_frame,
        copy_stamped,
        f_flags,
        f_offset,
        f_route,
        f_sid,
        f_size,
        f_status,
        f_timeout,
        f_type,
        header_len,
        kc_fill,
        kc_lookup,
        new_key_cache,
        put_sid,
    )
from ._stats import ProxyStats, RequestStats
from ._held import CONNECTING, DISCOVERY, MAX_HELD, Held, HeldQueue
from ._pipeline import let_go

if TYPE_CHECKING:
    from ..governance import PolicySet

log = logging.getLogger("octoproxy.proxy")

__all__ = ["Cluster", "Engine", "Link", "Pending", "PendingTable", "Route", "DOWNSTREAM", "UPSTREAM", "forward", "relay_requests", "relay_responses"]

DOWNSTREAM = 0
UPSTREAM = 1
#: timer resolution: deadlines are checked in buckets of 10 ms
TIMER_BUCKETS_PER_SECOND = 100
#: buckets of the timer wheel (a power of two: 1024 x 10 ms, a revolution of ~10 s)
WHEEL_SIZE = 1024
#: statuses counted in the stats arrays (the others, rare, on the objects directly)
COUNTED_STATUSES = 16
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
        "phead",
        "npending",
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
        #: upstream only: its first slot in the engine's PendingTable (-1: none) and how many
        self.phead = -1
        self.npending = 0
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
        #: governance state (router, outlier, breaker, budget) when a governed route uses it
        self.gov = gov
        #: round robin runs here, in the kernel, on an array of scores (no
        #: object per pick); the scores are for the list ``rr_for`` (discovery
        #: replaces the list, and the balancer with it, when endpoints change)
        self.rr = False
        self.rr_for: Any = None
        self.rr_scores = array("q")
        self.__post_init__()

    def __repr__(self) -> str:
        return f"Cluster(name={self.name!r}, lb={self.lb!r}, endpoints={self.endpoints!r})"

    def __post_init__(self) -> None:
        if self.balancer is None:
            self.balancer = make_balancer(self.lb, rng=random.Random())
        self.rr = type(self.balancer) is RoundRobin
        self.rr_for = None
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

    def _rr_pick(self) -> Endpoint | None:
        """Smooth weighted round robin (:class:`~octoproxy.core._balancer.RoundRobin`'s
        rule, the nginx algorithm) over ``rr_scores``, one score per endpoint index."""
        eps = self.endpoints
        n = len(eps)
        if self.rr_for is not eps or len(self.rr_scores) != n:
            self.rr_scores = array("q", bytes(8 * n))
            self.rr_for = eps
        total = 0
        best = -1
        best_score = 0
        for i in range(n):
            ep = eps[i]
            w = ep.weight
            if not ep.healthy or w <= 0:
                self.rr_scores[i] = 0  # starts again from 0 when it comes back
                continue
            score = self.rr_scores[i] + w
            self.rr_scores[i] = score
            total += w
            if best < 0 or score > best_score:
                best = i
                best_score = score
        if best < 0:
            return None
        self.rr_scores[best] = best_score - total
        return eps[best]

    def pick(self) -> Link | None:
        """Choose an endpoint with the balancer, then its least-loaded link."""
        assert self.balancer is not None
        self.picks += 1
        ep: Endpoint | None
        if len(self.endpoints) == 1:  # nothing to balance
            ep = self.endpoints[0]
            if not ep.healthy or ep.weight <= 0:
                return None
        elif self.rr:
            ep = self._rr_pick()
            if ep is None:
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
            if link.npending < best.npending:
                best = link
        return best


class StatsTable:
    """The fast path's request counts and latency histograms, in arrays by stats id.

    One stats id per ``RequestStats`` (a direction, service and method): the
    pending table keeps the id, and a response adds to that id's row of
    counters (one per status below :data:`COUNTED_STATUSES`) and histogram
    buckets, with no Python object touched. The rows are folded into the
    registry's objects whenever the registry is read (``/stats``, a hot-restart
    snapshot): :meth:`flush` is a registry collector.
    """

    def __init__(self, stats: ProxyStats) -> None:
        self.stats = stats
        self.objs: list[RequestStats] = []
        self.ids: dict[int, int] = {}
        self.n = 0
        self.cap = 0
        self.ns = COUNTED_STATUSES
        self.bounds = array("d", stats.duration.buckets)
        self.nb = len(self.bounds) + 1
        self.counts = array("Q")
        self.hist = array("Q")
        self.hsum = array("d")
        self.touched = array("B")
        self.dirty: list[int] = []
        stats.registry.add_collector(self.flush)

    def id_of(self, rs: RequestStats) -> int:
        """The stats id of ``rs`` (a new row the first time)."""
        sid = self.ids.get(id(rs))
        if sid is not None:
            return sid
        if self.n == self.cap:
            more = max(16, self.cap)
            self.counts = array("Q", self.counts) + array("Q", bytes(8 * more * self.ns))
            self.hist = array("Q", self.hist) + array("Q", bytes(8 * more * self.nb))
            self.hsum = array("d", self.hsum) + array("d", bytes(8 * more))
            self.touched = array("B", self.touched) + array("B", bytes(more))
            self.cap += more
        sid = self.n
        self.n += 1
        self.objs.append(rs)
        self.ids[id(rs)] = sid
        return sid

    def record(self, sid: int, status: int, seconds: float) -> None:
        """One answer: its status and latency, on row ``sid``."""
        if 0 <= status < self.ns:
            self.counts[sid * self.ns + status] += 1
        else:
            self.objs[sid].count(status)
        i = 0
        last = self.nb - 1
        while i < last and seconds > self.bounds[i]:  # first bound >= seconds (the histogram's rule)
            i += 1
        self.hist[sid * self.nb + i] += 1
        self.hsum[sid] += seconds
        if not self.touched[sid]:
            self.touched[sid] = 1
            self.dirty.append(sid)

    def flush(self) -> None:
        """Fold the rows counted since the last flush into the registry's objects."""
        dirty = self.dirty
        self.dirty = []
        for sid in dirty:
            self.touched[sid] = 0
            rs = self.objs[sid]
            base = sid * self.ns
            for st in range(self.ns):
                c = self.counts[base + st]
                if c:
                    rs.count(st, c)
                    self.counts[base + st] = 0
            h = rs.latency
            base = sid * self.nb
            for i in range(self.nb):
                c = self.hist[base + i]
                if c:
                    h.counts[i] += c
                    self.hist[base + i] = 0
            h.sum += self.hsum[sid]
            self.hsum[sid] = 0.0


class Pending:
    """A snapshot of one pending entry (slow paths, governed calls, tests).

    The fast path never makes one: pending state lives in :class:`PendingTable`'s
    arrays. :meth:`PendingTable.take` builds one for code that wants an object.
    """

    __slots__ = ("down", "down_sid", "up", "deadline", "t0", "stats", "gov")

    def __init__(self, down: Link, down_sid: int, up: Link, deadline: float, t0: float, stats: Any, gov: Any = None) -> None:
        self.down = down
        self.down_sid = down_sid
        self.up = up
        self.deadline = deadline
        self.t0 = t0
        self.stats = stats
        #: a governed call (``_pipeline.Call``): its response goes through the
        #: route's filter chain in reverse; None on the fast path
        self.gov = gov


def _zeros(code: str, n: int) -> Any:
    return array(code, bytes(n * array(code).itemsize))


class PendingTable:
    """Every request forwarded upstream and not answered yet, in parallel arrays.

    One table per engine. An entry is a *slot*; its fields are one element of
    each array (C arrays in the compiled kernel, ``array.array`` interpreted):
    the downstream link and its stream id, the upstream link, deadline, start
    time, request stats, and (governed calls only) the pipeline's call. The
    stream id we send upstream is the slot in its low 32 bits and the slot's
    *generation* above: a slot's generation changes each time it is freed, so
    a late or forged response to a reused slot finds no match, and a response
    must come back on the link its request left on. Nothing is allocated per
    request once the arrays have grown to the peak in flight.

    Two intrusive doubly linked lists thread the slots: one per upstream link
    (``Link.phead``: what to answer when that link is lost, in O(its entries))
    and one per timer-wheel bucket. The wheel has :data:`WHEEL_SIZE` buckets of
    10 ms (a revolution of ~10 s); a deadline further out waits in its bucket
    for later revolutions. Free slots form a stack through ``lnext``.
    """

    def __init__(self, rstats: StatsTable, capacity: int = 64) -> None:
        #: the stats rows the entries' ``sid`` index
        self.rstats = rstats
        self.cap = 0
        self.count = 0
        self.free = -1
        self.wheel_tick = 0
        self.gen = _zeros("I", 0)
        self.lnext = _zeros("i", 0)
        self.lprev = _zeros("i", 0)
        self.wnext = _zeros("i", 0)
        self.wprev = _zeros("i", 0)
        self.down_sid = _zeros("Q", 0)
        self.deadline = _zeros("d", 0)
        self.t0 = _zeros("d", 0)
        self.down: list[Any] = []
        self.up: list[Any] = []
        self.sid = _zeros("i", 0)
        self.gov: list[Any] = []
        self.mask = WHEEL_SIZE - 1
        self.wheel = array("i", [-1]) * WHEEL_SIZE
        self._grow(capacity)

    def _grow(self, n: int) -> None:
        """Room for ``n`` more slots (new arrays: a compiled view holds the old ones' buffers)."""
        cap = self.cap
        self.gen = array("I", self.gen) + array("I", [1]) * n
        self.lnext = array("i", self.lnext) + array("i", range(cap + 1, cap + n + 1))
        self.lnext[cap + n - 1] = self.free
        self.free = cap
        self.lprev = array("i", self.lprev) + _zeros("i", n)
        self.wnext = array("i", self.wnext) + _zeros("i", n)
        self.wprev = array("i", self.wprev) + _zeros("i", n)
        self.down_sid = array("Q", self.down_sid) + _zeros("Q", n)
        self.deadline = array("d", self.deadline) + _zeros("d", n)
        self.t0 = array("d", self.t0) + _zeros("d", n)
        self.down.extend([None] * n)
        self.up.extend([None] * n)
        self.sid = array("i", self.sid) + _zeros("i", n)
        self.gov.extend([None] * n)
        self.cap = cap + n

    def add(self, down: Link, down_sid: int, up: Link, deadline: float, t0: float, stats_id: int, gov: Any) -> int:
        """Track a request sent on ``up``; return the stream id to send it under."""
        if self.free < 0:
            self._grow(self.cap)
        slot = self.free
        self.free = self.lnext[slot]
        self.down_sid[slot] = down_sid
        self.deadline[slot] = deadline
        self.t0[slot] = t0
        self.down[slot] = down
        self.up[slot] = up
        self.sid[slot] = stats_id
        self.gov[slot] = gov
        # the upstream link's list
        head = up.phead
        self.lnext[slot] = head
        self.lprev[slot] = -1
        if head >= 0:
            self.lprev[head] = slot
        up.phead = slot
        up.npending += 1
        # the timer wheel (a bucket already passed goes in the next one due)
        tick = int(deadline * 100)  # TIMER_BUCKETS_PER_SECOND (compiled: a C cast, no int object)
        tick += 1  # rounded up
        if tick <= self.wheel_tick:
            tick = self.wheel_tick + 1
        b = tick & self.mask
        head = self.wheel[b]
        self.wnext[slot] = head
        self.wprev[slot] = -1 - b  # a bucket head: -1 - bucket
        if head >= 0:
            self.wprev[head] = slot
        self.wheel[b] = slot
        self.count += 1
        down.inflight += 1
        ep = up.endpoint
        if ep is not None:
            ep.active += 1
        g: int = self.gen[slot]
        return (g << 32) | slot

    def usid_of(self, slot: int) -> int:
        """The stream id a pending slot's request was sent under."""
        g: int = self.gen[slot]
        return (g << 32) | slot

    def find(self, up: Link, usid: int) -> int:
        """The slot of a response's stream id on ``up``, or -1 (answered, expired, or not ours)."""
        slot = usid & 0xFFFFFFFF
        if slot >= self.cap or self.gen[slot] != (usid >> 32) or self.up[slot] is not up:
            return -1
        return slot

    def remove(self, slot: int) -> None:
        """Free a slot (answered, expired, lost): settle its links' counters."""
        up = self.up[slot]
        down = self.down[slot]
        nxt = self.lnext[slot]
        prv = self.lprev[slot]
        if prv >= 0:
            self.lnext[prv] = nxt
        else:
            up.phead = nxt
        if nxt >= 0:
            self.lprev[nxt] = prv
        up.npending -= 1
        nxt = self.wnext[slot]
        prv = self.wprev[slot]
        if prv >= 0:
            self.wnext[prv] = nxt
        else:
            self.wheel[-1 - prv] = nxt
        if nxt >= 0:
            self.wprev[nxt] = prv
        self.count -= 1
        down.inflight -= 1
        ep = up.endpoint
        if ep is not None:
            ep.active -= 1
        self.down[slot] = None
        self.up[slot] = None
        self.gov[slot] = None
        g = self.gen[slot]
        g += 1
        self.gen[slot] = g if g <= 0xFFFFFFFF else 1
        self.lnext[slot] = self.free
        self.free = slot

    def take(self, slot: int) -> Pending:
        """Free a slot and return what it held (slow paths)."""
        p = Pending(self.down[slot], self.down_sid[slot], self.up[slot], self.deadline[slot], self.t0[slot], self.rstats.objs[self.sid[slot]], self.gov[slot])
        self.remove(slot)
        return p

    def peek(self, slot: int) -> Pending:
        """What a slot holds, as a snapshot (it stays pending)."""
        return Pending(self.down[slot], self.down_sid[slot], self.up[slot], self.deadline[slot], self.t0[slot], self.rstats.objs[self.sid[slot]], self.gov[slot])

    def slots_of(self, up: Link) -> list[int]:
        """The slots pending on ``up``, oldest first."""
        out = []
        slot = up.phead
        while slot >= 0:
            out.append(slot)
            slot = self.lnext[slot]
        out.reverse()
        return out

    def entries(self, up: Link) -> dict[int, Pending]:
        """``up``'s pending entries by the stream id they were sent under (tests, debugging)."""
        return {self.usid_of(s): self.peek(s) for s in self.slots_of(up)}

    def due(self, now: float) -> list[int]:
        """The slots whose deadline has passed, in deadline-bucket order; advance the wheel to ``now``."""
        cur = int(now * 100)  # TIMER_BUCKETS_PER_SECOND
        if (cur + 1) / TIMER_BUCKETS_PER_SECOND <= now:
            # bucket times are compared as next_due() returns them: 0.29 * 100 is 28.99...
            cur += 1
        start = self.wheel_tick
        if cur <= start:
            return []
        self.wheel_tick = cur
        if not self.count:
            return []
        out = []
        n = cur - start
        if n > WHEEL_SIZE:
            n = WHEEL_SIZE
        for k in range(1, n + 1):
            slot = self.wheel[(start + k) & self.mask]
            while slot >= 0:
                if self.deadline[slot] <= now:
                    out.append(slot)
                slot = self.wnext[slot]
        return out

    def next_due(self) -> float:
        """When the earliest deadline's bucket is due (what ``due`` needs to be called at), or 0.0.

        Walks the buckets ahead of the wheel for the first entry due in this
        revolution; entries a revolution or more away are found by one pass
        over the table (rare: a deadline more than ~10 s out and nothing sooner).
        """
        if not self.count:
            return 0.0
        tick = self.wheel_tick
        for k in range(1, WHEEL_SIZE + 1):
            slot = self.wheel[(tick + k) & self.mask]
            while slot >= 0:
                t = int(self.deadline[slot] * 100)
                if t < tick + k:  # its bucket comes up in this revolution
                    return (tick + k) / TIMER_BUCKETS_PER_SECOND
                slot = self.wnext[slot]
        best = -1.0
        for slot in range(self.cap):
            if self.up[slot] is not None and (best < 0.0 or self.deadline[slot] < best):
                best = self.deadline[slot]
        t = int(best * 100)
        return (t + 1) / TIMER_BUCKETS_PER_SECOND


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
        park_timeout: how long a request may wait for a connection being made.
        max_held: requests held in all (waiting for a connection or for
            discovery); each cluster and each service holds 10,000 at most.
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
        max_held: int = MAX_HELD,
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
        #: every request in flight upstream (the fast path's and the governed ones)
        #: the fast path's request counters, by stats id
        self.rstats = StatsTable(self.stats)
        self.table = PendingTable(self.rstats)
        #: links with new bytes in ``out``; the shell flushes and clears this
        self.dirty: list[Link] = []
        #: None: serving; "drain": answer new requests UNAVAILABLE; "hot_restart": answer HOT_RESTART
        self.drain_mode: str | None = None
        #: inbound: checks every request from a peer first (``_guard.InboundGuard``)
        self.inbound_guard: Any = None
        #: per listener: b"service\0method" -> stats id (the fast path's cache)
        self.rs_cache: dict[str, dict[bytes, int]] = {"outbound": {}, "inbound": {}}
        #: the compiled relay's own cache in front of ``rs_cache`` (made on first use)
        self.key_cache: Any = None
        #: discovery: called with a service name that has no route (the shell
        #: subscribes to it); requests for it wait in ``held`` meanwhile
        self.on_unknown_service: Callable[[str], None] | None = None
        #: requests that wait before they can be routed: for a connection of a
        #: cluster being made (reason ``connecting``) or for a lazy subscription
        #: (``discovery``); see core/_held.py and docs/architecture.md
        self.held = HeldQueue(MAX_PARKED, max_held)
        #: how long a request may wait for its lazy subscription
        self.unrouted_timeout = 10.0
        #: while held requests are routed again: when the one replayed was first held
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
    def pending_count(self) -> int:
        """Requests in flight upstream."""
        return self.table.count

    def pending_of(self, link: Link) -> dict[int, Pending]:
        """An upstream link's requests in flight by stream id, as snapshots (tests, debugging)."""
        return self.table.entries(link)

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

    def park(self, cluster: Cluster, down: Link, mv: memoryview, off: int, size: int, now: float, unit: Any = None) -> None:
        """Hold a request until a connection of ``cluster`` is up (or ``park_timeout``); OVERLOADED when full.

        ``unit``: the breaker whose PENDING unit the request took (``ClusterGov.hold``),
        given back when it leaves the held queue.
        """
        raw = bytes(mv[off : off + size])
        if not self._hold_connecting(cluster, down, raw, now, unit):
            let_go(unit)
            self._refuse_raw(down, raw, "overloaded", Status.OVERLOADED, f"too many requests waiting for cluster {cluster.name!r}")

    def _hold_connecting(self, cluster: Cluster, down: Link, raw: bytes, now: float, unit: Any) -> bool:
        """Into the held queue under (``connecting``, cluster); False when full.

        A request held again while replayed keeps its first held time, and so its deadline.
        """
        since = self._replaying_since
        first = since is None
        if since is None:
            since = now
        if self.held.hold(CONNECTING, cluster, down, raw, since, since + self.park_timeout, unit) is None:
            return False
        if first:
            self.stats.error("parked")
        return True

    def send_governed(self, up: Link, call: Any, now: float, timeout_ms: int) -> None:
        """Forward one try of a governed call on ``up`` (the frame it retains, a new stream id)."""
        out = up.out
        o = len(out)
        out += call.frame
        deadline = now + timeout_ms / 1000.0
        usid = self.table.add(call.down, call.down_sid, up, deadline, now, self.rstats.id_of(call.stats), call)
        _U64.pack_into(out, o + 8, usid)
        dirty = self.dirty
        if not dirty or dirty[-1] is not up:  # one write per destination per read
            dirty.append(up)

    def request_stats(self, direction: str, service: bytes, method: bytes) -> RequestStats:
        """The (direction, service, method) counters, through the fast path's cache."""
        cache = self.rs_cache[direction]
        key = service + b"\0" + method
        sid = cache.get(key)
        if sid is None:
            rs = self.stats.request_stats(direction, service, method)
            sid = self.rstats.id_of(rs)
            if len(cache) < 10000:
                cache[key] = sid
            return rs
        return self.rstats.objs[sid]

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
        """A response to a governed call (its pending entry already taken): the chain in reverse."""
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
                    if link.draining and link.npending == 0 and link.on_idle is not None:
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
        """:meth:`_refuse` for a held frame (waiting for a connection or for discovery)."""
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
            slot = self.table.find(link, sid)
            p = self.table.take(slot) if slot >= 0 else None
            if p is not None and p.gov is not None:
                self._governed_failed(p, Status.OVERLOADED, "response " + why, self._gov_now, False, retry=False)
            elif p is not None:
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
                        # discovery: subscribe on demand; the request waits (its deadline
                        # counts from now, even when replayed: it waits for something new)
                        name = service.decode(errors="replace")
                        held = self.held
                        first = not held.count(DISCOVERY, name)
                        since = now if self._replaying_since is None else self._replaying_since
                        raw = bytes(mv[off : off + size])
                        if held.hold(DISCOVERY, name, down, raw, since, now + self.unrouted_timeout) is not None:
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
                if cluster.connecting and self.held.has_room(CONNECTING, cluster):
                    # a connection is on its way (e.g. replacing one that got
                    # GOAWAY): hold the request until it is up
                    self._hold_connecting(cluster, down, bytes(mv[off : off + size]), now, None)
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
                if not self._not_taking(link, now) and (best is None or link.npending < best.npending):
                    best = link
        return best

    def slow_response(self, up: Link, scanner: Scanner, i: int, mv: memoryview, now: float) -> None:
        """Everything about one frame from an upstream link that the fast path does not do."""
        stats = self.stats
        off, size, ftype, flags, sid, _t, _r, status = scanner.frame(i)
        if ftype == _RESPONSE:
            slot = self.table.find(up, sid)
            if slot < 0:
                stats.error("late_response")
                return
            p = self.table.take(slot)
            if p.gov is not None:
                if flags & _HOT_RESTART:
                    stats.error("hot_restart_from_upstream")
                self.governed_response(up, p, scanner, i, mv, now)
                return
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
            log.info("GOAWAY from %s: taken out of the pool, %d in flight", up.name, up.npending)

    def link_lost(self, link: Link, reason: str) -> None:
        """A connection closed or failed: answer what was in flight on it."""
        if link.closed:
            return
        link.closed = True
        link.out.clear()
        if link.kind == UPSTREAM:
            if link.cluster is not None:
                link.cluster.remove_link(link)
            slots = self.table.slots_of(link)
            for slot in slots:
                p = self.table.take(slot)
                if p.gov is not None:
                    self._governed_failed(p, Status.UNAVAILABLE, f"upstream connection lost: {reason}", self._gov_now, True)
                    continue
                self.stats.finished(p.stats, Status.UNAVAILABLE, 0.0)
                self._answer(p.down, p.down_sid, Status.UNAVAILABLE, f"upstream connection lost: {reason}")
            if slots:
                log.warning("upstream %s lost (%s): %d requests in flight answered UNAVAILABLE", link.name, reason, len(slots))

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
        """Route the requests held for a connection of ``cluster`` again (one came up, or an attempt failed).

        A request that finds no connection again is held again with its first held time.
        """
        held = self.held.release(CONNECTING, cluster)
        if not held:
            return
        for h in held:
            let_go(h.unit)  # each governed one takes a unit again if it waits again
        try:
            for h in held:
                down = h.down
                if down.closed:
                    continue
                self._replaying_since = h.since
                scanner, n, buf = self._one_frame_scanner(down, h.raw)
                with memoryview(buf) as mv:
                    relay_requests(self, down, scanner, n, mv, now)
        finally:
            self._replaying_since = None

    def release_unrouted(self, service: str, found: bool, now: float) -> None:
        """A lazy subscription ended: route the requests held for ``service``, or answer NO_ROUTE."""
        for h in self.held.release(DISCOVERY, service):
            self._release_discovery(h, found, now)

    def _release_discovery(self, h: Held, found: bool, now: float) -> None:
        down = h.down
        if down.closed:
            return
        scanner, n, buf = self._one_frame_scanner(down, h.raw)
        if not found or scanner.frame(0)[6] < 0:
            # no endpoints, or the service is known but not this method
            # (a static route for another method): never queue it again
            why = "no endpoints known" if not found else "no route for this method"
            self._refuse(down, scanner, 0, "no_route", Status.NO_ROUTE, f"no route for service {h.key!r}: {why}")
            return
        with memoryview(buf) as mv:
            relay_requests(self, down, scanner, n, mv, now)

    def _expire_held(self, now: float) -> None:
        """Answer the held requests past their deadline: UNAVAILABLE (no connection in time), NO_ROUTE (discovery)."""
        for h in self.held.expire(now):
            let_go(h.unit)
            if h.reason == CONNECTING:
                self._refuse_raw(h.down, h.raw, "unavailable", Status.UNAVAILABLE, f"no connection to cluster {h.key.name!r} in time")
            else:
                self._release_discovery(h, False, now)

    def _abort_held(self, reason: str) -> int:
        """Answer every held request UNAVAILABLE (end of a drain); returns how many requests (not ONEWAYs)."""
        n = 0
        for h in self.held.abort():
            let_go(h.unit)
            if h.raw[3] == _REQUEST:
                self._refuse_raw(h.down, h.raw, "drain", Status.UNAVAILABLE, reason)
                n += 1
        return n

    def abort_all(self, reason: str, links: Iterable[Link] = ()) -> int:
        """Answer everything still waiting UNAVAILABLE (end of a drain). Returns how many.

        Args:
            reason: the error text.
            links: every upstream link still open, including the ones already
                out of their cluster's pool (GOAWAY, endpoint removed); the
                links in the pools are always included.
        """
        n = self._abort_held(reason)
        every: dict[int, Link] = {id(link): link for link in links}
        for cluster in list(self.clusters.values()) + ([self.inbound_cluster] if self.inbound_cluster else []):
            for cluster_links in cluster.links.values():
                for link in cluster_links:
                    every[id(link)] = link
        for up in every.values():
            for slot in self.table.slots_of(up):
                p = self.table.take(slot)
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
        if len(self.held):
            self._expire_held(now)
        if self._route_gov:
            tick_outliers(self.clusters.values(), self.now_ms(now), self.stats)
        table = self.table
        for slot in table.due(now):
            up = table.up[slot]
            p = table.take(slot)
            if p.gov is not None:
                self._governed_failed(p, Status.TIMEOUT, f"no response within {p.deadline - p.t0:.3f}s", now, False)
            else:
                self.stats.finished(p.stats, Status.TIMEOUT, now - p.t0)
                self._answer(p.down, p.down_sid, Status.TIMEOUT, f"no response within {p.deadline - p.t0:.3f}s")
            if up.draining and up.npending == 0 and up.on_idle is not None:
                up.on_idle(up)
        nxt = table.next_due()
        return nxt if nxt else None

    def take_dirty(self) -> list[Link]:
        dirty = self.dirty
        self.dirty = []
        return dirty


# ---------------------------------------------------------------- the fast path
# One pass over a scan's frames: the common case of each (a routed REQUEST
# with a healthy upstream link; a RESPONSE with its pending entry) is done
# here, with the byte-level primitives above; anything else goes to
# ``Engine.slow_request`` / ``slow_response``, which hold the rest of the policy.


def forward(
    engine: Engine, down: Link, up: Link, sc: Scanner, i: int, mv: memoryview, now: float, route_timeout: float, max_timeout: float, oneway: bool
) -> None:
    """Append request frame ``i`` to ``up`` (new stream id, caller stamp) and track it.

    The deadline is the frame's own timeout, else ``route_timeout``; capped at
    ``max_timeout`` when that is not 0.
    """
    buf = mv
    _forward(engine, down, up, sc, i, buf, now, route_timeout, max_timeout, oneway)


def _forward(
    engine: Engine, down: Link, up: Link, sc: Scanner, i: int, buf: Any, now: float, route_timeout: float, max_timeout: float, oneway: bool
) -> int:
    off = f_offset(sc, i)
    size = f_size(sc, i)
    out = up.out
    stamp = engine.stamp
    if stamp and down.listener == "outbound":
        o = copy_stamped(out, buf, off, size, stamp)
    else:
        o = copy_frame(out, buf, off, size)
    dirty = engine.dirty
    if not dirty or dirty[len(dirty) - 1] is not up:
        dirty.append(up)
    if oneway:
        engine.stats.oneway.inc()
        return 0
    t = f_timeout(sc, i)
    timeout = t / 1000.0 if t else route_timeout
    if max_timeout and timeout > max_timeout:
        timeout = max_timeout
    deadline = now + timeout
    stats_id = _stats_id(engine, down.listener == "inbound", buf, sc, i)
    usid = engine.table.add(down, f_sid(sc, i), up, deadline, now, stats_id, None)
    put_sid(out, o, usid)
    return 0


def _stats_id(engine: Engine, inbound: bool, buf: Any, sc: Scanner, i: int) -> int:
    """The stats id of request ``i``'s (listener, service, method)."""
    kc = engine.key_cache
    if kc is None:
        kc = engine.key_cache = new_key_cache()
    stats_id = kc_lookup(kc, inbound, buf, sc, i)
    if stats_id >= 0:
        return stats_id
    # a miss: the key, the dict, the registry (once per key and cache slot)
    listener = "inbound" if inbound else "outbound"
    service, method = sc.routing_key(i)
    key = service + b"\0" + method
    cache = engine.rs_cache[listener]
    known = cache.get(key)
    if known is None:
        known = engine.rstats.id_of(engine.stats.request_stats(listener, service, method))
        if len(cache) < 10000:  # beyond, ProxyStats pools them anyway
            cache[key] = known
    stats_id = known
    kc_fill(kc, inbound, key, stats_id)
    return stats_id


def relay_requests(engine: Engine, down: Link, sc: Scanner, n: int, mv: memoryview, now: float) -> None:
    """Forward the ``n`` scanned frames that came from a downstream link."""
    if down.reject or engine.drain_mode is not None:
        for i in range(n):
            engine.slow_request(down, sc, i, mv, now)
        return
    buf = mv
    inbound = down.listener == "inbound"
    high = engine.high_watermark
    stamp_len = 0 if inbound else len(engine.stamp)
    max_size = engine.max_frame_size - stamp_len
    route_clusters = engine._route_clusters
    route_timeouts = engine._route_timeouts
    route_max_timeouts = engine._route_max_timeouts
    max_pending = engine.max_pending
    table = engine.table
    route_timeout = 0.0
    max_timeout = 0.0
    for i in range(n):
        off = f_offset(sc, i)
        if f_type(sc, i) != 1 or (stamp_len and (f_size(sc, i) > max_size or header_len(buf, off) + stamp_len > 0xFFFF)):
            # not a request, or too big to carry the caller stamp: the slow path says why
            engine.slow_request(down, sc, i, mv, now)
            continue
        route_id = f_route(sc, i)
        if inbound:
            cluster = engine._inbound_fast  # None while the inbound side is governed
            route_timeout = engine.default_timeout
            max_timeout = engine.inbound_max_timeout
        elif route_id >= 0:
            cluster = route_clusters[route_id]
            route_timeout = route_timeouts[route_id]
            max_timeout = route_max_timeouts[route_id]
        else:
            cluster = None
        if cluster is None or table.count >= max_pending:
            engine.slow_request(down, sc, i, mv, now)
            continue
        up = cluster.pick()
        if up is None or len(up.out) > high:  # no link, or a full one: the slow path says what to do
            engine.slow_request(down, sc, i, mv, now)
            continue
        _forward(engine, down, up, sc, i, buf, now, route_timeout, max_timeout, False)


def relay_responses(engine: Engine, up: Link, sc: Scanner, n: int, mv: memoryview, now: float) -> None:
    """Relay the ``n`` scanned frames that came from an upstream link."""
    buf = mv
    table = engine.table
    rstats = engine.rstats
    for i in range(n):
        if f_type(sc, i) != 2 or (f_flags(sc, i) & 1):
            engine.slow_response(up, sc, i, mv, now)
            continue
        slot = table.find(up, f_sid(sc, i))
        if slot < 0:
            engine.stats.error("late_response")
            continue
        if table.gov[slot] is not None:  # a governed call: the chain in reverse
            engine.governed_response(up, table.take(slot), sc, i, mv, now)
            continue
        down = table.down[slot]
        stats_id = table.sid[slot]
        t0 = table.t0[slot]
        down_sid = table.down_sid[slot]
        table.remove(slot)
        rstats.record(stats_id, f_status(sc, i), now - t0)
        if not down.closed:
            out = down.out
            o = copy_frame(out, buf, f_offset(sc, i), f_size(sc, i))
            put_sid(out, o, down_sid)
            dirty = engine.dirty
            if not dirty or dirty[len(dirty) - 1] is not down:
                dirty.append(down)
            if down.draining and down.inflight == 0 and down.on_idle is not None:
                down.on_idle(down)
