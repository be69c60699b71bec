"""Sans-IO tests of the forwarding engine: no sockets, no Trio, time as an argument.

Every test runs twice: on the compiled relay with the compiled scanner, and on
the pure-Python twins of both (conftest's ``impl`` fixture installs them in the
kernel), so the two fast paths are held to the same behaviour.
"""

from __future__ import annotations

import pytest

from conftest import Impl
from octoproxy import Flags, FrameType, RemoteProtocolError, Status
from octoproxy.core._balancer import Endpoint
from octoproxy.frame import FrameDecoder, encode_frame, encode_header, encode_request, encode_response
from octoproxy.core._engine import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link, Route


@pytest.fixture(autouse=True)
def relay(impl: Impl) -> str:
    """Run the test on one implementation of the relay, scanner and guard (conftest's ``impl``)."""
    return impl.name


def make(n_endpoints: int = 1, links_per_endpoint: int = 1, **kw: object) -> tuple[Engine, list[Link]]:
    cluster = Cluster("echo", "round_robin", [Endpoint(f"10.0.0.{i}:9000") for i in range(n_endpoints)])
    engine = Engine(routes=[Route("echo", "*", "echo", 1.0)], clusters=[cluster], caller="web", **kw)  # type: ignore[arg-type]
    ups = []
    for ep in cluster.endpoints:
        for j in range(links_per_endpoint):
            link = Link(UPSTREAM, f"{ep.address}#{j}", endpoint=ep, cluster=cluster)
            cluster.add_link(link)
            ups.append(link)
    return engine, ups


def down(name: str = "sdk") -> Link:
    return Link(DOWNSTREAM, name, listener="outbound")


def feed(engine: Engine, link: Link, data: bytes, now: float = 0.0) -> int:
    buf = bytearray(data)
    return engine.feed(link, engine.new_scanner(link), buf, len(buf), now)


def frames(link: Link) -> list:
    dec = FrameDecoder()
    dec.receive_data(bytes(link.out))
    link.out.clear()
    return list(dec)


def test_request_forwarded_and_response_relayed() -> None:
    engine, (up,) = make()
    d = down()
    assert feed(engine, d, encode_request(41, "echo", "ping", b"hi", caller="spoofed")) > 0
    (req,) = frames(up)
    assert req.type == FrameType.REQUEST and req.stream_id != 41
    assert req.header.caller == "web"  # stamped, and the app's own value overridden
    assert bytes(req.body) == b"hi" and (req.service, req.method) == ("echo", "ping")
    assert engine.pending_count == 1 and d.inflight == 1 and up.endpoint.active == 1  # type: ignore[union-attr]
    feed(engine, up, encode_response(req.stream_id, b"ho"), now=0.002)
    (resp,) = frames(d)
    assert resp.stream_id == 41 and bytes(resp.body) == b"ho"
    assert engine.pending_count == 0 and d.inflight == 0 and up.endpoint.active == 0  # type: ignore[union-attr]
    assert 'octoproxy_requests_total{direction="outbound",service="echo",method="ping",status="OK"} 1' in engine.stats.render()


def test_batch_of_requests_is_one_write_per_destination() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, b"".join(encode_request(i, "echo", "m", bytes(100)) for i in range(50)))
    assert engine.take_dirty() == [up]
    got = frames(up)
    assert len(got) == 50 and len({f.stream_id for f in got}) == 50


def test_many_downstreams_share_one_upstream() -> None:
    engine, (up,) = make()
    downs = [down(f"sdk{i}") for i in range(10)]
    for i, d in enumerate(downs):
        feed(engine, d, encode_request(7, "echo", "m", bytes([i])))
    reqs = frames(up)
    assert len(reqs) == 10
    feed(engine, up, b"".join(encode_response(r.stream_id, bytes(r.body)) for r in reversed(reqs)))
    for i, d in enumerate(downs):
        (resp,) = frames(d)
        assert resp.stream_id == 7 and bytes(resp.body) == bytes([i])


def test_no_route() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(3, "nope", "m"))
    (resp,) = frames(d)
    assert resp.header.status == Status.NO_ROUTE and "nope" in resp.header.error
    assert not up.out and engine.stats.rejected_count("no_route") == 1


def test_no_healthy_endpoint() -> None:
    engine, (up,) = make()
    up.cluster.remove_link(up)  # type: ignore[union-attr]
    d = down()
    feed(engine, d, encode_request(3, "echo", "m"))
    assert frames(d)[0].header.status == Status.UNAVAILABLE


def test_timeout_then_late_response_dropped() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", timeout_ms=200), now=10.0)
    (req,) = frames(up)
    assert 10.2 <= engine.expire(10.1) <= 10.22  # type: ignore[operator]  # 10 ms buckets
    assert not d.out
    assert engine.expire(10.22) is None
    (resp,) = frames(d)
    assert resp.stream_id == 1 and resp.header.status == Status.TIMEOUT
    feed(engine, up, encode_response(req.stream_id, b"late"), now=10.3)
    assert not d.out and engine.stats.error_count("late_response") == 1



def test_a_reused_slot_does_not_take_a_stale_response() -> None:
    """The pending table's slots are reused: the stream id carries the slot's generation,
    so a late answer to the slot's previous request finds nothing (counted, dropped)."""
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", timeout_ms=100), now=0.0)
    (first,) = frames(up)
    engine.expire(0.2)  # answered TIMEOUT: the slot is free
    frames(d)
    feed(engine, d, encode_request(2, "echo", "m"), now=0.3)
    (second,) = frames(up)
    assert second.stream_id & 0xFFFFFFFF == first.stream_id & 0xFFFFFFFF  # the same slot, reused
    assert second.stream_id != first.stream_id  # under a new generation
    feed(engine, up, encode_response(first.stream_id, b"stale"), now=0.4)
    assert not d.out and engine.stats.error_count("late_response") == 1 and engine.pending_count == 1
    feed(engine, up, encode_response(second.stream_id, b"fresh"), now=0.5)
    (resp,) = frames(d)
    assert resp.stream_id == 2 and bytes(resp.body) == b"fresh" and engine.pending_count == 0


def test_a_peer_cannot_answer_another_links_request() -> None:
    """A response settles only a request that left on the link it arrives on: an upstream
    peer that guesses (or replays) another link's stream id answers nothing."""
    engine, (a, b) = make(2)
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    (req,) = frames(a) + frames(b)
    sent_on, other = (a, b) if a.npending else (b, a)
    feed(engine, other, encode_response(req.stream_id, b"forged"), now=0.1)
    assert not d.out and engine.stats.error_count("late_response") == 1 and sent_on.npending == 1
    for sid in (0, 1, req.stream_id ^ (1 << 32), (1 << 64) - 1):  # out of range, other generations
        feed(engine, sent_on, encode_response(sid, b"guess"), now=0.1)
    assert not d.out and sent_on.npending == 1
    feed(engine, sent_on, encode_response(req.stream_id, b"real"), now=0.2)
    (resp,) = frames(d)
    assert resp.stream_id == 1 and bytes(resp.body) == b"real"


def test_many_in_flight_grow_the_table_and_every_answer_comes_back() -> None:
    """Past its first capacity the table grows (slots keep their entries); answered out
    of order, every caller gets its own answer, and the freed slots are reused."""
    engine, (up,) = make()
    d = down()
    n = 300
    feed(engine, d, b"".join(encode_request(i + 1, "echo", "m") for i in range(n)), now=0.0)
    reqs = frames(up)
    assert len(reqs) == n and engine.pending_count == n and engine.table.cap >= n
    feed(engine, up, b"".join(encode_response(r.stream_id, str(r.stream_id).encode()) for r in reversed(reqs)), now=0.1)
    got = {f.stream_id: bytes(f.body) for f in frames(d)}
    assert sorted(got) == list(range(1, n + 1)) and engine.pending_count == 0
    assert all(got[i + 1] == str(reqs[i].stream_id).encode() for i in range(n))
    cap = engine.table.cap
    feed(engine, d, b"".join(encode_request(i + 1, "echo", "m") for i in range(n)), now=0.2)
    assert engine.table.cap == cap  # the freed slots, not new ones

def test_caller_deadline_holds_route_timeout_is_the_default() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", timeout_ms=60000), now=0.0)
    assert 60.0 <= engine.expire(0.0) <= 60.02  # type: ignore[operator]  # the caller's 60 s, not the route's 1 s
    feed(engine, d, encode_request(2, "echo", "m"), now=100.0)  # no deadline in the frame: the route's
    assert 101.0 <= engine.expire(100.0) <= 101.02  # type: ignore[operator]


def test_route_max_timeout_caps_request_timeout() -> None:
    cluster = Cluster("echo", "round_robin", [Endpoint("10.0.0.1:9000")])
    engine = Engine(routes=[Route("echo", "*", "echo", 1.0, max_timeout=2.0)], clusters=[cluster])
    up = Link(UPSTREAM, "u", endpoint=cluster.endpoints[0], cluster=cluster)
    cluster.add_link(up)
    feed(engine, down(), encode_request(1, "echo", "m", timeout_ms=60000), now=0.0)
    assert 2.0 <= engine.expire(0.0) <= 2.02  # type: ignore[operator]  # capped by the route


def test_inbound_deadline_is_the_callers_unless_capped() -> None:
    for cap, want in ((0.0, 10.0), (3.0, 3.0)):
        app = Cluster("local_app", "least_request", [Endpoint("unix:/app")])
        engine = Engine(default_timeout=5.0, inbound_max_timeout=cap)
        engine.inbound_cluster = app
        up = Link(UPSTREAM, "app", endpoint=app.endpoints[0], cluster=app)
        app.add_link(up)
        peer = Link(DOWNSTREAM, "peer", listener="inbound")
        feed(engine, peer, encode_request(1, "echo", "m", timeout_ms=10000), now=0.0)
        assert want <= engine.expire(0.0) <= want + 0.02  # type: ignore[operator]


def test_requests_answered_by_the_proxy_count_in_requests_total() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "nobody", "m"))
    engine.max_pending = 0
    feed(engine, d, encode_request(2, "echo", "m"))
    text = engine.stats.render()
    assert 'octoproxy_requests_total{direction="outbound",service="nobody",method="m",status="NO_ROUTE"} 1' in text
    assert 'octoproxy_requests_total{direction="outbound",service="echo",method="m",status="OVERLOADED"} 1' in text


def test_scanner_is_shared_and_small() -> None:
    engine, (up,) = make()
    a, b = down("a"), down("b")
    assert engine.new_scanner(a) is engine.new_scanner(b)
    assert engine.new_scanner(a).capacity <= 1024
    # more frames in one read than the scanner holds: all forwarded
    feed(engine, a, b"".join(encode_request(i, "echo", "m") for i in range(3000)))
    assert len(frames(up)) == 3000


def test_refuse_partial_answers_overloaded_and_settles_responses() -> None:
    engine, (up,) = make()
    d = down()
    big = encode_request(7, "echo", "m", bytes(100))
    engine.refuse_partial(d, big[:60], "too big")
    (resp,) = frames(d)
    assert resp.stream_id == 7 and resp.header.status == Status.OVERLOADED
    feed(engine, d, encode_request(8, "echo", "m"))
    (req,) = frames(up)
    engine.refuse_partial(up, encode_response(req.stream_id, bytes(100))[:30], "too big")
    (resp,) = frames(d)
    assert resp.stream_id == 8 and resp.header.status == Status.OVERLOADED and "response too big" in resp.header.error
    assert engine.pending_count == 0 and d.inflight == 0


def test_upstream_lost_answers_in_flight_at_once() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, b"".join(encode_request(i, "echo", "m") for i in range(5)))
    engine.link_lost(up, "reset")
    got = frames(d)
    assert sorted(f.stream_id for f in got) == list(range(5))
    assert all(f.header.status == Status.UNAVAILABLE for f in got)
    assert engine.pending_count == 0
    feed(engine, d, encode_request(9, "echo", "m"))
    assert frames(d)[0].header.status == Status.UNAVAILABLE  # no link left


def test_max_pending_overloaded() -> None:
    engine, (up,) = make(max_pending=3)
    d = down()
    feed(engine, d, b"".join(encode_request(i, "echo", "m") for i in range(5)))
    got = frames(d)
    assert [f.stream_id for f in got] == [3, 4] and all(f.header.status == Status.OVERLOADED for f in got)
    assert len(frames(up)) == 3


def test_drain_answers_hot_restart_not_processed() -> None:
    engine, (up,) = make()
    d = down()
    engine.drain_mode = "hot_restart"
    feed(engine, d, encode_request(1, "echo", "m"))
    (resp,) = frames(d)
    assert resp.flags & Flags.HOT_RESTART and resp.header.status == Status.UNAVAILABLE
    assert not up.out


def test_ping_answered_with_pong() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_frame(FrameType.PING, 1234))
    (pong,) = frames(d)
    assert pong.type == FrameType.PONG and pong.stream_id == 1234
    engine.ping(up, 99)
    up.out.clear()
    feed(engine, up, encode_frame(FrameType.PONG, 99))
    assert up.awaiting_pong == 0


def test_goaway_takes_link_out_of_pool_and_idles_it() -> None:
    engine, (a, b) = make(links_per_endpoint=2)
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"))
    first = a if a.out else b
    other = b if first is a else a
    (req,) = frames(first)
    idle = []
    first.on_idle = idle.append
    feed(engine, first, encode_frame(FrameType.GOAWAY, 0))
    assert first.draining and not idle  # still one in flight
    feed(engine, d, encode_request(2, "echo", "m"))
    assert not first.out and len(frames(other)) == 1  # new work goes elsewhere
    feed(engine, first, encode_response(req.stream_id, b"ok"))
    assert idle == [first]
    assert {f.stream_id for f in frames(d)} == {1}


def test_protocol_error_answers_the_stream() -> None:
    engine, _ = make()
    d = down()
    bad = bytearray(encode_request(8, "echo", "m"))
    bad[21] = 0x0F  # header: invalid wire type 7 in the first tag
    with pytest.raises(RemoteProtocolError) as info:
        feed(engine, d, bytes(bad))
    engine.protocol_error(d, info.value)
    resp, goaway = frames(d)
    assert resp.stream_id == 8 and resp.header.status == Status.PROTOCOL_ERROR
    assert goaway.type == FrameType.GOAWAY  # nothing more on this connection


def test_good_frames_before_a_bad_one_are_forwarded() -> None:
    engine, (up,) = make()
    d = down()
    data = encode_request(1, "echo", "m") + b"\x00\x00garbage"
    with pytest.raises(RemoteProtocolError):
        feed(engine, d, data)
    assert len(frames(up)) == 1  # forwarded before the error surfaced


def test_inbound_goes_to_local_app_without_stamp() -> None:
    engine, _ = make()
    app = Cluster("local_app", "least_request", [Endpoint("unix:/x")])
    app_link = Link(UPSTREAM, "app", endpoint=app.endpoints[0], cluster=app)
    app.add_link(app_link)
    engine.inbound_cluster = app
    peer = Link(DOWNSTREAM, "peer", listener="inbound")
    feed(engine, peer, encode_request(5, "anything", "m", b"x", caller="web"))
    (req,) = frames(app_link)
    assert req.header.caller == "web"
    feed(engine, app_link, encode_response(req.stream_id, b"y"))
    assert frames(peer)[0].stream_id == 5


def test_oneway_is_forwarded_without_pending() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "log", b"x", oneway=True))
    assert frames(up)[0].type == FrameType.ONEWAY
    assert engine.pending_count == 0


def test_abort_all() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"))
    assert engine.abort_all("bye") == 1
    assert frames(d)[0].header.status == Status.UNAVAILABLE


def test_timer_wakes_exactly_when_it_says() -> None:
    """expire() returns a time at which the next bucket is due: a timer that
    sleeps until then must find it (no spin on float rounding, e.g. 0.29)."""
    for k in range(1, 400):
        engine, (up,) = make()
        d = down()
        feed(engine, d, encode_request(1, "echo", "m", timeout_ms=k * 10 - 1), now=0.0)
        wake = engine.expire(0.0)
        assert wake is not None
        assert engine.expire(wake) is None, k
        assert frames(d)[0].header.status == Status.TIMEOUT


def test_caller_stamp_never_breaks_the_limits() -> None:
    """A request too big to carry the caller stamp is answered, not forwarded broken."""
    engine, (up,) = make(max_frame_size=4096)
    d = down()
    hdr = encode_header(service="echo", method="m")
    feed(engine, d, encode_frame(FrameType.REQUEST, 5, hdr, bytes(4096 - 20 - len(hdr))))
    assert not up.out
    assert frames(d)[0].header.status == Status.FRAME_TOO_LARGE
    engine, (up,) = make()
    d = down()
    hdr = encode_header(service="echo", method="m", metadata={"k": "x" * (65535 - 21)})
    feed(engine, d, encode_frame(FrameType.REQUEST, 6, hdr))
    assert not up.out
    (resp,) = frames(d)
    assert resp.stream_id == 6 and resp.header.status == Status.PROTOCOL_ERROR
    feed(engine, d, encode_request(7, "echo", "m"))  # and the next one goes through
    assert frames(up)[0].header.caller == "web"


def test_abort_all_includes_links_out_of_the_pool_and_parked_requests() -> None:
    engine, (up,) = make()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"))
    frames(up)
    feed(engine, up, encode_frame(FrameType.GOAWAY, 0, encode_header(error="x")))
    up.cluster.connecting = 1  # type: ignore[union-attr]
    feed(engine, d, encode_request(2, "echo", "m"))  # parked: no link, one connecting
    assert engine.abort_all("bye", [up]) == 2
    assert engine.pending_count == 0 and d.inflight == 0
    assert sorted(f.stream_id for f in frames(d)) == [1, 2]


def test_unrouted_method_of_a_known_service_gets_no_route_once() -> None:
    c = Cluster("users", "round_robin", [])
    e = Engine(routes=[Route("users", "get", "users", 1.0)], clusters=[c])
    calls: list[str] = []
    e.on_unknown_service = calls.append
    d = down()
    feed(e, d, encode_request(1, "users", "put"))
    e.release_unrouted("users", True, 0.1)
    assert frames(d)[0].header.status == Status.NO_ROUTE and calls == ["users"]
    assert not e.held


def test_unrouted_requests_expire() -> None:
    e, _ = make()
    e.on_unknown_service = lambda name: None
    e.unrouted_timeout = 2.0
    d = down()
    feed(e, d, encode_request(1, "other", "m"), now=0.0)
    e.expire(1.0)
    assert not d.out
    e.expire(2.5)
    assert frames(d)[0].header.status == Status.NO_ROUTE


def test_parked_requests_keep_their_first_park_time() -> None:
    ep = Endpoint("10.0.0.1:1")
    c = Cluster("echo", "round_robin", [ep])
    e = Engine(routes=[Route("echo", "*", "echo", 5.0)], clusters=[c], park_timeout=1.0)
    c.connecting = 2
    d = down()
    feed(e, d, encode_request(1, "echo", "m"), now=0.0)
    for t in (0.9, 1.8, 2.7):
        c.connecting = 1
        e.unpark(c, t)  # one attempt failed, another still under way: parked again
        c.connecting = 2
        e.expire(t + 0.05)
    assert frames(d)[0].header.status == Status.UNAVAILABLE


def test_full_upstream_link_takes_no_new_request() -> None:
    """Back-pressure per destination: a link over the high watermark is skipped, or the caller gets OVERLOADED."""
    engine, (a, b) = make(links_per_endpoint=2, high_watermark=1000)
    d = down()
    a.out += bytes(2000)  # over the high watermark, but it sent something 0.1 s ago: still taking
    a.last_tx = 9.9
    feed(engine, d, encode_request(1, "echo", "m"), now=10.0)
    assert a.npending + b.npending == 1
    a.out[:] = bytes(2000)
    b.out.clear()
    a.last_tx = 0.0  # a is not taking what it has: stalled for 10 s
    before = a.npending
    feed(engine, d, b"".join(encode_request(i, "echo", "m") for i in range(4)), now=10.0)
    assert len(frames(b)) == 4 and a.npending == before  # all went to b
    a.out += bytes(2000)
    b.out += bytes(2000)
    feed(engine, d, encode_request(9, "echo", "m"), now=10.0)
    (resp,) = frames(d)
    assert resp.stream_id == 9 and resp.header.status == Status.OVERLOADED
    assert "not taking requests" in resp.header.error
    assert 'service="echo",method="m",status="OVERLOADED"} 1' in engine.stats.render()


# ------------------------------------------------------------------ the kernel's two builds


def test_kernel_build_selected_at_import() -> None:
    """``OCTOPROXY_NO_EXTENSIONS=1`` runs the kernel interpreted; otherwise compiled from the same source."""
    import os
    import subprocess
    import sys

    from conftest import IMPLS, NO_EXTENSIONS

    # (in process, the ``impl`` fixture swaps the kernel's names: the subprocesses below read the import's choice)
    if not NO_EXTENSIONS and not os.environ.get("OCTOPROXY_ALLOW_NO_EXTENSIONS"):
        assert "compiled" in IMPLS, "octoproxy.core._kernel_c is not built: run `pip install .`"
    env = {k: v for k, v in os.environ.items() if k != "OCTOPROXY_NO_EXTENSIONS"}
    for flag, want in (("1", "kernel: python"), ("", "kernel: cython" if "compiled" in IMPLS else "kernel: python")):
        out = subprocess.run(
            [sys.executable, "-m", "octoproxy", "--version"], env={**env, "OCTOPROXY_NO_EXTENSIONS": flag}, capture_output=True, text=True, timeout=30
        )
        assert want in out.stdout, out


def test_kernel_types_its_fields(impl: Impl) -> None:
    """Compiled, the kernel's classes are extension types with C fields (no per-instance dict);
    interpreted, the same source gives plain classes. Both behave the same."""
    kernel = impl.kernel
    link = kernel.Link(UPSTREAM, "u")
    assert not hasattr(link, "__dict__")
    with pytest.raises(AttributeError):
        link.not_a_field = 1
    route = kernel.Route("echo", "*", "echo", 1)
    assert route == kernel.Route("echo", "*", "echo", 1.0) and hash(route) == hash(kernel.Route("echo", "*", "echo", 1.0))
    assert route != kernel.Route("echo", "*", "other", 1.0) and route.timeout == 1.0
    cluster = kernel.Cluster("echo", "round_robin", [Endpoint("10.0.0.1:9000")])
    assert cluster.endpoints[0].address == "10.0.0.1:9000" and cluster.balancer is not None
    assert kernel.Cluster("x").endpoints is not kernel.Cluster("y").endpoints  # no shared default
    assert len(kernel.Engine(routes=[route], clusters=[cluster]).held) == 0  # the held queue, declared in the .pxd
    if impl.name == "compiled":
        assert kernel.__file__.endswith(".so") or kernel.__file__.endswith(".pyd")
        engine = kernel.Engine(routes=[route], clusters=[cluster])
        with pytest.raises(TypeError):
            engine.max_pending = "many"  # a C integer field
        with pytest.raises(AttributeError):
            engine.not_a_field = 1
    else:
        assert kernel.__file__.endswith("_kernel.py")
