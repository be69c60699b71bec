"""Differential test: the compiled primitives and their twins, byte for byte.

The same seeded scenario runs twice through the sans-IO engine, once on the
compiled kernel, codec, relay and guard and once on the interpreted kernel and
the pure-Python twins (conftest's ``installed``): random frame streams (valid frames of random types, sizes,
stream ids, services, deadlines and metadata; a share of garbage) arrive on
outbound SDK links, inbound peer links (plaintext and mTLS, under an
authorization policy) and upstream links, split at random points as reads
would split them; upstreams answer a random part of what they were sent (some
flagged HOT_RESTART, some late or unknown), time moves, deadlines expire,
links go away (requests park until a replacement comes up), unknown services
are discovered on demand (the waiting requests routed, or refused), the proxy
drains. After every step the trace records every
byte each link has to send, the dirty list, each link's state and pending
table, the timer wheel, the counters and the metrics text. The two traces
must be equal; the first difference is reported with its seed and step.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from conftest import COMPILED, IMPLS, PYTHON, Impl, installed
from octoproxy import RemoteProtocolError
from octoproxy.core._balancer import Endpoint, make_balancer
from octoproxy.core import _engine, _guard
from octoproxy.core._authz import policy_from_config
from octoproxy.core._engine import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link, Route
from octoproxy.core._guard import InboundGuard, InboundPeer

SEEDS = range(16)
STEPS = 120
SERVICES = ["echo", "echo", "echo", "echo", "other", "other", "nope", "", "x" * 40]
METHODS = ["m", "slow", "GetUser", "GetSecret", "Admin", ""]


def test_impl_fixture_installs_every_twin(impl: Impl) -> None:
    """The kernel really runs on the implementation the fixture names (the kernel's own build too)."""
    kernel = impl.kernel
    assert kernel.__name__ == ("octoproxy.core._kernel_c" if impl.name == "compiled" else "octoproxy.core._kernel")
    assert _engine.Engine is kernel.Engine and _engine.Link is kernel.Link and _engine.Cluster is kernel.Cluster
    assert Engine is kernel.Engine and Link is kernel.Link and Route is kernel.Route  # this module's names too
    # the forwarding policy is the kernel's own (one source); the guard calls the installed kernel's
    assert _engine.relay_requests is kernel.relay_requests and _guard.relay_requests is kernel.relay_requests
    if impl.name == "python":  # interpreted, the kernel calls the twin primitives (compiled, they are inlined C)
        assert kernel.copy_frame is impl.relay.copy_frame and kernel.kc_lookup is impl.relay.kc_lookup
    for other in IMPLS.values():  # whichever kernel runs, it scans with the installed codec
        assert other.kernel.Scanner is impl.codec.Scanner
    assert _guard.Scanner is impl.codec.Scanner
    assert _guard.stamp_frames is impl.guard.stamp_frames and _guard.first_unclean is impl.guard.first_unclean
    engine = Engine(routes=[], clusters=[], caller="web")
    assert type(engine) is kernel.Engine
    assert type(engine.new_scanner(Link(DOWNSTREAM, "d", listener="outbound"))) is impl.codec.Scanner
    assert type(InboundGuard("echo")._scanner) is impl.codec.Scanner


# ------------------------------------------------------------------ frames


def _header(codec: Any, rng: random.Random, service: str, method: str, max_frame: int) -> bytes:
    h: dict[str, Any] = {"service": service, "method": method}
    if max_frame > 0x10000 + 100 and rng.random() < 0.05:
        # a header at the 16-bit limit: the caller stamp may or may not fit
        target = 0xFFFF - rng.randint(0, 30)
        h["metadata"] = {"pad": ""}
        h["metadata"]["pad"] = "p" * (target - len(codec.encode_header(**h)))
        while len(header := bytes(codec.encode_header(**h))) > target:  # the length varints grew
            h["metadata"]["pad"] = h["metadata"]["pad"][: target - len(header)]
        return header
    r = rng.random()
    if r < 0.4:
        h["timeout_ms"] = rng.choice([0, 1, 20, 300, 5000, 2**32 - 1])
    if rng.random() < 0.3:
        h["caller"] = rng.choice(["app", "root-admin-svc", ""])
    if rng.random() < 0.35:
        md = {"traceparent": "00-ab"}
        if rng.random() < 0.6:
            md[rng.choice(["authorization", "Authorization", "AUTHORIZATION", "authorizatioN", "authz"])] = "Bearer t"
        h["metadata"] = md
    if rng.random() < 0.1:
        h["error"] = "e" * rng.randint(0, 300)
    header = bytes(codec.encode_header(**h))
    r = rng.random()
    if r < 0.08:  # fields repeated (protobuf: the last one wins) or in another order
        other = bytes(codec.encode_header(service=rng.choice(SERVICES), method=rng.choice(METHODS), timeout_ms=rng.choice([0, 7])))
        header = other + header if rng.random() < 0.5 else header + other
    elif r < 0.12:  # fields this version does not know: skipped, whatever their wire type
        header += rng.choice([b"\x78\x05", b"\x82\x01\x03abc", b"\x8d\x01\x01\x02\x03\x04", b"\x89\x01" + bytes(8)])
    elif r < 0.14:  # a metadata entry written key-last, or with no value
        key = rng.choice([b"authorization", b"AuThOrIzAtIoN", b"k"])
        entry = rng.choice([b"\x12\x01v\x0a" + bytes([len(key)]) + key, b"\x0a" + bytes([len(key)]) + key])
        header += b"\x3a" + bytes([len(entry)]) + entry
    return header


def _body(rng: random.Random, room: int) -> bytes:
    """A body; ``room``: the most that keeps the frame within the limit."""
    r = rng.random()
    if r < 0.6:
        n = rng.randint(0, 64)
    elif r < 0.88:
        n = rng.randint(64, 2000)
    elif r < 0.98:  # at the limit: with a caller stamp it may no longer fit
        n = rng.randint(max(0, room - 40), room)
    else:  # over it
        n = room + rng.randint(1, 40)
    if rng.random() < 0.05:
        return b"\x0a\x0dauthorization" + bytes(max(0, n - 15))  # the key's bytes in a body: never a credential
    return rng.randbytes(max(0, n))


def request_stream(codec: Any, rng: random.Random, max_frame: int) -> bytes:
    """Frames a downstream sends: mostly requests, some of every other type, now and then garbage."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        sid = rng.choice([rng.getrandbits(64), rng.randint(0, 50)])
        if r < 0.8:
            ftype = 3 if rng.random() < 0.1 else 1
            header = _header(codec, rng, rng.choice(SERVICES), rng.choice(METHODS), max_frame)
            parts.append(codec.encode_frame(ftype, sid, header, _body(rng, max_frame - 20 - len(header))))
        elif r < 0.9:
            parts.append(codec.encode_frame(rng.choice([2, 4, 5]), sid, b"", rng.randbytes(rng.randint(0, 16))))
        elif r < 0.92:
            parts.append(codec.encode_frame(6, 0, codec.encode_header(error="bye")))
        else:
            parts.append(codec.encode_request(sid, rng.choice(SERVICES), rng.choice(METHODS), b"", timeout_ms=rng.randint(0, 100)))
    r = rng.random()
    sid = rng.randint(0, 50)
    if r < 0.04:  # a header that is not protobuf
        parts.append(codec.encode_frame(1, sid, rng.randbytes(rng.randint(1, 12)), b""))
    elif r < 0.06:  # a frame over the limit (refused at its length field)
        parts.append(b"\xab\xba\x01\x01" + (max_frame + 1).to_bytes(4, "big") + bytes(12))
    elif r < 0.1:  # one corrupted byte anywhere (often harmless: in a body)
        f = bytearray(codec.encode_request(sid, "echo", "m", b"body"))
        f[rng.randrange(len(f))] = rng.getrandbits(8)
        parts.append(bytes(f))
    return b"".join(parts)


def response_stream(codec: Any, rng: random.Random, engine: Any, up: Link) -> bytes:
    """What an upstream sends back: answers to part of its pending table, and odd frames."""
    parts = []
    pending = sorted(engine.pending_of(up))
    for usid in rng.sample(pending, rng.randint(0, len(pending))):
        r = rng.random()
        flags = 1 if r < 0.1 else 0
        status = rng.choice([0, 0, 0, 1, 3, 4])
        hdr = codec.encode_header(status=status, error="" if not status else "failed")
        parts.append(codec.encode_frame(2, usid, hdr, rng.randbytes(rng.randint(0, 300)), flags))
    for _ in range(rng.randint(0, 3)):
        r = rng.random()
        if r < 0.4:
            parts.append(codec.encode_response(rng.randint(0, 3000), b"late"))  # unknown or already answered
        elif r < 0.6:
            parts.append(codec.encode_frame(4, rng.getrandbits(64)))
        elif r < 0.7:
            parts.append(codec.encode_frame(5, 7))
        elif r < 0.75:
            parts.append(codec.encode_frame(6, 0, codec.encode_header(error="going away")))
        elif r < 0.85:
            parts.append(codec.encode_frame(rng.choice([1, 3]), 9, codec.encode_header(service="echo", method="m")))
        elif r < 0.88:
            parts.append(b"\xab\xba\x02" + bytes(17))  # bad version
    rng.shuffle(parts)
    return b"".join(parts)


# ------------------------------------------------------------------ the world


class World:
    """An outbound engine (clusters, SDK links) and an inbound one (guard, peers, local app)."""

    def __init__(self, rng: random.Random) -> None:
        self.max_frame = rng.choice([4096, 8192, 1 << 16, 1 << 17])
        clusters = [
            Cluster("echo", "round_robin", [Endpoint(f"10.0.0.{i}:9000") for i in range(2)], balancer=make_balancer("round_robin")),
            Cluster("other", "random", [Endpoint("10.0.1.1:9000")], balancer=make_balancer("random", rng=random.Random(rng.random()))),
        ]
        routes = [Route("echo", "slow", "echo", 0.05, 0.08), Route("echo", "*", "echo", 1.0, 2.0), Route("other", "*", "other", 0.3)]
        self.out = Engine(
            routes=routes,
            clusters=clusters,
            caller=rng.choice(["web", "web", ""]),  # "": no caller stamp
            max_pending=rng.choice([8, 40, 1000]),
            max_frame_size=self.max_frame,
            high_watermark=rng.choice([512, 1 << 20]),
        )
        self.ups: list[Link] = []
        for cluster in clusters:
            for ep in cluster.endpoints:
                for j in range(2 if cluster.name == "echo" else 1):
                    link = Link(UPSTREAM, f"{ep.address}#{j}", endpoint=ep, cluster=cluster)
                    cluster.add_link(link)
                    self.ups.append(link)
        self.downs = [Link(DOWNSTREAM, f"sdk{i}", listener="outbound") for i in range(3)]
        policy = policy_from_config("echo", "allow", [("deny", ["web"], ["GetSecret"]), ("deny", ["*"], ["Admin*"])])
        self.inb = Engine(caller="echo", max_frame_size=self.max_frame, max_pending=rng.choice([5, 1000]), inbound_max_timeout=0.5)
        app = Cluster("local_app", "least_request", [Endpoint("unix:/app.sock")])
        self.app = Link(UPSTREAM, "app#0", endpoint=app.endpoints[0], cluster=app)
        app.add_link(self.app)
        self.inb.inbound_cluster = app
        self.inb.inbound_guard = InboundGuard(rng.choice(["echo", "echo", "echo", ""]), policy if rng.random() < 0.7 else None, self.max_frame)
        self.peers = [Link(DOWNSTREAM, f"peer{i}", listener="inbound") for i in range(3)]
        self.peers[1].peer = InboundPeer("web")
        self.peers[2].peer = InboundPeer("billing")
        #: what each link has read and not consumed yet (the shell's receive buffer)
        self.bufs: dict[str, bytearray] = {}
        self.engine_of: dict[str, Engine] = {}
        for link in self.downs + self.ups:
            self.engine_of[link.name] = self.out
        for link in self.peers + [self.app]:
            self.engine_of[link.name] = self.inb
        self.links = {link.name: link for link in self.downs + self.ups + self.peers + [self.app]}
        self.idle: list[str] = []
        #: discovery on demand: services the engine asked for (their requests wait in the held queue)
        self.asked: list[str] = []
        self.out.on_unknown_service = self.asked.append
        self.routes = routes
        for link in self.links.values():
            link.on_idle = lambda lk: self.idle.append(lk.name)
            link.on_goaway = lambda lk: self.idle.append("goaway " + lk.name)

    def fresh(self, link: Link, now: float = 0.0) -> Link:
        """``link`` if still open, else a new connection in its place (a peer reconnects;
        an upstream one replays the requests parked on its cluster)."""
        if link.kind == UPSTREAM and link.draining and not link.npending and not link.closed:
            self.engine_of[link.name].link_lost(link, "drained after GOAWAY")  # as the shell closes it
        if not link.closed:
            return link
        new = Link(link.kind, link.name + "+", endpoint=link.endpoint, cluster=link.cluster, listener=link.listener)
        new.peer = link.peer
        new.on_idle = link.on_idle
        new.on_goaway = link.on_goaway
        for group in (self.downs, self.ups, self.peers):
            if link in group:
                group[group.index(link)] = new
        if link is self.app:
            self.app = new
        self.engine_of[new.name] = self.engine_of[link.name]
        self.links[new.name] = new
        if link.kind == UPSTREAM and link.cluster is not None:
            link.cluster.add_link(new)
            if link.cluster.connecting:
                link.cluster.connecting -= 1
                self.engine_of[link.name].unpark(link.cluster, now)
        return new

    def feed(self, link: Link, data: bytes, rng: random.Random, now: float) -> list[Any]:
        """``data`` arrives on ``link`` in pieces split at random points: what each read did."""
        engine = self.engine_of[link.name]
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
        got: list[Any] = []
        buf = self.bufs.setdefault(link.name, bytearray())
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            if link.closed:
                break
            buf += data[a:b]
            try:
                used = engine.feed(link, engine.new_scanner(link), buf, len(buf), now)
            except RemoteProtocolError as exc:
                engine.protocol_error(link, exc)
                got.append(("protocol_error", str(exc), exc.stream_id, int(exc.status)))
                engine.link_lost(link, "protocol error")
                break
            del buf[:used]
            got.append(used)
        return got


def _pending(engine: Any, link: Link) -> list[Any]:
    return [(usid, p.down.name, p.down_sid, p.deadline, p.t0, p.stats.labels) for usid, p in sorted(engine.pending_of(link).items())]


def snapshot(w: World, what: Any) -> list[Any]:
    """Everything observable after a step, the output bytes taken (as the shell sends them)."""
    snap: list[Any] = [what]
    for name, engine in (("out", w.out), ("in", w.inb)):
        snap.append((name, [link.name for link in engine.take_dirty()], engine.pending_count))
        table = engine.table
        # the table's layout: capacity, free-list head, the wheel's position and next due bucket
        snap.append((table.cap, table.free, table.wheel_tick, table.next_due()))
        snap.append({listener: sorted(cache) for listener, cache in engine.rs_cache.items()})
        snap.append(sorted((c.name, c.picks, [ep.active for ep in c.endpoints]) for c in engine.clusters.values()))
        snap.append([(h.reason, getattr(h.key, "name", h.key), h.down.name, h.raw, h.since, h.deadline, h.unit is not None) for h in engine.held])
        snap.append(engine.stats.render())
    for name, link in sorted(w.links.items()):
        snap.append((name, bytes(link.out), link.closed, link.draining, link.goaway_sent, link.inflight, link.npending, _pending(w.engine_of[link.name], link)))
        link.out.clear()
    snap.append(list(w.idle))
    w.idle.clear()
    return snap


def run(seed: int, impl: Impl) -> list[list[Any]]:
    """The scenario for ``seed`` on ``impl``: one snapshot per step."""
    rng = random.Random(seed)
    trace = []
    with installed(impl):
        w = World(rng)
        codec = impl.codec
        now = 1000.0
        for step in range(STEPS):
            r = rng.random()
            if r < 0.4:
                link = w.fresh(rng.choice(w.downs))
                what: Any = ("sdk", link.name, w.feed(link, request_stream(codec, rng, w.max_frame), rng, now))
            elif r < 0.6:
                link = w.fresh(rng.choice(w.peers))
                what = ("peer", link.name, w.feed(link, request_stream(codec, rng, w.max_frame), rng, now))
            elif r < 0.85:
                link = w.fresh(rng.choice(w.ups + [w.app]), now)
                what = ("upstream", link.name, w.feed(link, response_stream(codec, rng, w.engine_of[link.name], link), rng, now))
            elif r < 0.88:  # a lazy subscription ends: found (with a route now), or not
                name = w.asked.pop(0) if w.asked else "nope"
                found = rng.random() < 0.7
                if found and name not in {r.service for r in w.routes}:
                    w.routes = [*w.routes, Route(name, "*", rng.choice(["echo", "other"]), 0.2)]
                    w.out.set_routes(w.routes)
                w.out.release_unrouted(name, found, now)
                what = ("discovered", name, found)
            elif r < 0.95:
                now += rng.choice([0.001, 0.01, 0.05, 0.2, 1.0])
                what = ("expire", w.out.expire(now), w.inb.expire(now))
            elif r < 0.97 or step < STEPS * 3 // 4:
                link = rng.choice(w.ups)
                w.out.link_lost(link, "reset")
                if link.cluster is not None and rng.random() < 0.5:
                    link.cluster.connecting += 1  # its replacement is on the way: requests park
                what = ("lost", link.name)
            elif r < 0.985:  # the end: a drain (answers HOT_RESTART or UNAVAILABLE from now on)
                w.out.drain_mode = rng.choice(["hot_restart", "drain"])
                w.inb.drain_mode = w.out.drain_mode
                for d in w.downs + w.peers:
                    w.engine_of[d.name].goaway(d, "draining")
                what = ("drain", w.out.drain_mode)
            else:
                what = ("abort", w.out.abort_all("shut down", w.ups), w.inb.abort_all("shut down", [w.app]))
            trace.append(snapshot(w, (step, what)))
    return trace


def first_difference(a: list[list[Any]], b: list[list[Any]]) -> str | None:
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            for part, (p, q) in enumerate(zip(x, y)):
                if p != q:
                    return f"step {step} ({x[0]}), part {part}:\n compiled: {p!r:.3000}\n python:   {q!r:.3000}"
    if len(a) != len(b):
        return f"traces of {len(a)} and {len(b)} steps"
    return None


@pytest.mark.skipif(COMPILED is None, reason="needs both implementations (the compiled one is not built)")
@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_and_twins_agree_on_random_streams(seed: int) -> None:
    assert set(IMPLS) == {"compiled", "python"}
    assert COMPILED is not None
    diff = first_difference(run(seed, COMPILED), run(seed, PYTHON))
    assert diff is None, f"seed {seed}: {diff}"


def test_the_scenario_is_deterministic() -> None:
    """Same seed, same implementation, same trace: a difference above is the implementations'."""
    assert run(7, PYTHON) == run(7, PYTHON)


@pytest.mark.skipif(COMPILED is None, reason="needs both implementations (the compiled one is not built)")
def test_the_comparison_sees_one_wrong_byte() -> None:
    """A twin primitive that flips one bit of every frame it re-stamps is caught (the test compares what matters)."""
    from types import SimpleNamespace

    twin = PYTHON.relay

    def put_sid(out: bytearray, o: int, sid: int) -> int:  # the stream-id rewrite, one bit off in the last byte
        twin.put_sid(out, o, sid)
        out[len(out) - 1] ^= 1
        return 0

    broken = Impl("python", PYTHON.codec, SimpleNamespace(**{**vars(twin), "put_sid": put_sid}), PYTHON.guard, PYTHON.kernel)  # type: ignore[arg-type]
    diff = first_difference(run(3, COMPILED), run(3, broken))
    assert diff is not None
