"""The governance filters on the engine's declared pipeline: sans-IO, both relay twins.

Uses test_engine's fixture, so every test runs on the compiled relay and on
its pure-Python twin.
"""

from __future__ import annotations

from typing import Any

import pytest

from octoproxy import Flags, Status
from octoproxy.core._balancer import Endpoint
from octoproxy.frame import encode_request, encode_response
from octoproxy.governance import NOT_PROCESSED, Resource, parse_policy_set
from octoproxy.core._engine import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link, Route
from octoproxy.core._held import CONNECTING
from octoproxy.core._pipeline import Inbound, Outbound
from test_engine import down, feed, frames, make, relay  # noqa: F401  (relay: the twins fixture)


def gov(**echo: Any) -> Any:
    return parse_policy_set({"version": "t", "services": {"echo": echo}})


def answer_of(link: Link) -> Any:
    (f,) = frames(link)
    return f


def test_pipelines_are_declared() -> None:
    assert Outbound.STAGES == ("scan", "route", "filters", "balance", "forward")
    assert Inbound.STAGES == ("scan", "guard", "filters", "forward")
    assert Outbound.RESPONSE_STAGES[-1] == "retry_or_relay"


def test_an_ungoverned_route_stays_on_the_fast_path_and_a_governed_one_leaves_it() -> None:
    engine, (up,) = make()
    cluster = engine.clusters["echo"]
    assert engine._route_clusters == [cluster]
    engine.set_governance(gov(breaker={}), 0.0)
    assert engine._route_clusters == [None] and engine.governed_routes() == ["echo/*"]
    engine.set_governance(gov(), 0.0)  # an empty policy is no policy
    assert engine._route_clusters == [cluster]
    engine.set_governance(None, 0.0)
    assert engine._route_clusters == [cluster] and cluster.gov is None


def test_governed_request_is_stamped_traced_and_its_response_relayed() -> None:
    engine, (up,) = make()
    engine.set_governance(gov(tracing={}), 0.0)
    d = down()
    feed(engine, d, encode_request(7, "echo", "Get", b"hi", caller="spoofed", metadata={"k": "v"}))
    (req,) = frames(up)
    assert req.header.caller == "web" and req.header.metadata["k"] == "v"
    assert req.header.metadata["traceparent"].startswith("00-") and bytes(req.body) == b"hi"
    feed(engine, up, encode_response(req.stream_id, b"ok"), 0.01)
    (resp,) = frames(d)
    assert resp.stream_id == 7 and bytes(resp.body) == b"ok"
    assert engine.pending_count == 0 and d.inflight == 0
    cs = engine.stats.caller_stats("outbound", "echo", "Get", "web")
    assert cs.by_status[0].value == 1


def test_breaker_answers_overloaded_and_gives_units_back() -> None:
    engine, (up,) = make()
    engine.set_governance(gov(breaker={"max_requests": 1}), 0.0)
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", b""))
    feed(engine, d, encode_request(2, "echo", "m", b""))
    (req,) = frames(up)
    (refused,) = frames(d)
    assert refused.stream_id == 2 and refused.header.status == Status.OVERLOADED
    assert "max_requests (1)" in refused.header.error
    feed(engine, up, encode_response(req.stream_id))
    frames(d)
    feed(engine, d, encode_request(3, "echo", "m", b""))
    assert len(frames(up)) == 1
    assert engine.stats.rejected_count("circuit_breaker") == 1


def test_not_processed_is_resent_to_another_endpoint_once() -> None:
    engine, ups = make(2)
    engine.set_governance(gov(retry={}), 0.0)
    d = down()
    feed(engine, d, encode_request(9, "echo", "Write", b"body"))
    first = next(u for u in ups if u.out)
    (req,) = frames(first)
    feed(engine, first, encode_response(req.stream_id, status=Status.OVERLOADED, error="busy", flags=NOT_PROCESSED), 0.01)
    assert not d.out  # not relayed: resent
    other = next(u for u in ups if u.out)
    assert other is not first
    (again,) = frames(other)
    assert bytes(again.body) == b"body"
    feed(engine, other, encode_response(again.stream_id, b"done"), 0.02)
    (resp,) = frames(d)
    assert resp.stream_id == 9 and bytes(resp.body) == b"done" and engine.pending_count == 0


def test_lost_connection_resends_only_idempotent_methods() -> None:
    engine, ups = make(2)
    engine.set_governance(gov(retry={"idempotent_methods": ["Get*"]}), 0.0)
    d = down()
    feed(engine, d, encode_request(1, "echo", "GetX", b""))
    feed(engine, d, encode_request(2, "echo", "Put", b""))
    busy = [u for u in ups if u.npending]
    for u in ups:
        u.out.clear()
    if len(busy) == 2:  # one on each: lose the one with the unsafe call
        busy = [u for u in busy if any(p.gov.method == "Put" for p in engine.pending_of(u).values())]
    for u in busy:
        engine.link_lost(u, "reset")
    answers = {f.stream_id: f for f in frames(d)}
    assert set(answers) == {2}  # the unsafe one fails ...
    assert answers[2].header.status == Status.UNAVAILABLE
    assert engine.pending_count == 1  # ... the idempotent one went again


@pytest.mark.parametrize("pushed_later", [False, True])
def test_consecutive_failures_eject_an_endpoint(pushed_later: bool) -> None:
    engine, ups = make(3)
    if pushed_later:  # the cluster is governed already when outlier detection arrives
        engine.set_governance(gov(breaker={}), 0.0)
    engine.set_governance(gov(outlier={"consecutive_failures": 2, "max_ejection_percent": 50}), 0.0)
    d = down()
    bad = ups[0]
    sid = 0
    while engine.stats.ejections.labels("echo").value == 0:
        sid += 1
        assert sid < 200
        feed(engine, d, encode_request(sid, "echo", "m", b""))
        for u in ups:
            for f in frames(u):
                status = Status.UNAVAILABLE if u is bad else Status.OK
                feed(engine, u, encode_response(f.stream_id, status=status))
        frames(d)
    for i in range(60):
        feed(engine, d, encode_request(1000 + i, "echo", "m", b""))
    assert not bad.out and not bad.npending


def test_per_try_timeout_retries_an_idempotent_call_within_its_deadline() -> None:
    engine, ups = make(2)
    engine.set_governance(gov(retry={"idempotent_methods": ["*"], "per_try_timeout": 0.1}), 0.0)
    d = down()
    feed(engine, d, encode_request(5, "echo", "m", b""))
    first = next(u for u in ups if u.out)
    frames(first)
    engine.expire(0.2)
    other = next(u for u in ups if u.out)
    assert other is not first and not d.out
    (again,) = frames(other)
    feed(engine, other, encode_response(again.stream_id, b"late but fine"), 0.25)
    assert bytes(frames(d)[0].body) == b"late but fine"


def test_outbound_rate_limit() -> None:
    engine, (up,) = make()
    engine.set_governance(gov(rate_limits=[{"name": "r", "direction": "outbound", "rate": 1.0, "burst": 1.0}]), 0.0)
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", b""))
    feed(engine, d, encode_request(2, "echo", "m", b""))
    (refused,) = frames(d)
    assert refused.header.status == Status.RATE_LIMITED and "rate limited by 'r'" in refused.header.error


def test_inbound_refusals_carry_not_processed() -> None:
    engine = Engine(caller="echo")
    app = Cluster("local_app", "least_request", [Endpoint("unix:/x")])
    app.endpoints[0].healthy = False
    engine.inbound_cluster = app
    peer = Link(DOWNSTREAM, "peer", listener="inbound")
    feed(engine, peer, encode_request(3, "echo", "m", b""))
    (resp,) = frames(peer)
    assert resp.header.status == Status.UNAVAILABLE and resp.flags & NOT_PROCESSED and not resp.flags & Flags.HOT_RESTART


def test_inbound_side_governed_by_its_own_service_policy() -> None:
    engine = Engine(caller="echo")
    app = Cluster("local_app", "least_request", [Endpoint("unix:/x")])
    engine.inbound_cluster = app
    up = Link(UPSTREAM, "app", endpoint=app.endpoints[0], cluster=app)
    app.add_link(up)
    assert engine._inbound_fast is app
    engine.set_governance(gov(rate_limits=[{"name": "pc", "caller": "*", "rate": 1.0, "burst": 1.0}], tracing={}), 0.0)
    assert engine._inbound_fast is None
    peer = Link(DOWNSTREAM, "peer", listener="inbound")
    feed(engine, peer, encode_request(1, "echo", "m", b"", caller="web"))
    feed(engine, peer, encode_request(2, "echo", "m", b"", caller="web"))
    (req,) = frames(up)
    assert req.header.metadata["traceparent"].startswith("00-")
    (refused,) = frames(peer)
    assert refused.header.status == Status.RATE_LIMITED and refused.flags & NOT_PROCESSED
    feed(engine, up, encode_response(req.stream_id, b"ok"))
    assert bytes(frames(peer)[0].body) == b"ok"
    cs = engine.stats.caller_stats("inbound", "echo", "m", "web")
    assert cs.by_status[0].value == 1 and cs.by_status[Status.RATE_LIMITED].value == 1  # its own answers too
    feed(engine, peer, encode_request(4, "echo", "other", b"", caller="web"))  # its own bucket: forwarded
    feed(engine, peer, encode_request(5, "echo", "other", b"", caller="web"))  # refused: counted under its method
    assert engine.stats.caller_stats("inbound", "echo", "other", "web").by_status[Status.RATE_LIMITED].value == 1
    engine.set_governance(None, 0.0)
    assert engine._inbound_fast is app


def test_warm_up_and_backup_come_from_the_endpoint_fields() -> None:
    engine, ups = make(3)
    eps = engine.clusters["echo"].endpoints
    engine.clock_offset_ms = 1_000_000
    eps[1].warmup_start_ms = 1_000_000  # starts warming at engine time 0
    eps[2].backup = True
    engine.set_governance(gov(routing={"slow_start": {"window": 10.0, "min_weight_percent": 10.0}}), 0.0)
    cluster = engine.clusters["echo"]
    cluster.__post_init__()  # what discovery calls after changing endpoint fields
    assert cluster.gov is not None
    shares = cluster.gov.router.shares("echo", "m", {}, engine.now_ms(1.0))
    assert set(shares) == {eps[0].address, eps[1].address}  # the backup only when nothing else is usable
    assert shares[eps[1].address] < 0.15
    later = cluster.gov.router.shares("echo", "m", {}, engine.now_ms(20.0))
    assert abs(later[eps[1].address] - 0.5) < 1e-9


def test_inbound_cluster_rate_is_divided_among_live_instances() -> None:
    engine = Engine(caller="echo")
    engine.set_governance(gov(rate_limits=[{"name": "q", "cluster_rate": 100.0}]), 0.0)
    ig = engine.inbound.gov
    assert ig is not None and ig.limiter is not None
    engine.set_inbound_instances(4)
    limit = ig.limiter.limit_for("echo", "m", "web")
    assert limit is not None and limit.rate == 25.0
    engine.set_governance(gov(rate_limits=[{"name": "q", "cluster_rate": 100.0}]), 1.0)  # same rules: kept
    assert engine.inbound.gov is not None and engine.inbound.gov.limiter is ig.limiter


def test_held_requests_take_pending_units_and_max_pending_answers_overloaded() -> None:
    cluster = Cluster("echo", "round_robin", [Endpoint("10.0.0.1:9000")])
    cluster.endpoints[0].healthy = False
    engine = Engine(routes=[Route("echo", "*", "echo", 1.0)], clusters=[cluster], caller="web")
    engine.set_governance(gov(breaker={"max_pending": 2}), 0.0)
    cluster.connecting = 1  # a connection is on its way
    d = down()
    for sid in (1, 2, 3):
        feed(engine, d, encode_request(sid, "echo", "m", b""))
    (refused,) = frames(d)
    assert refused.stream_id == 3 and refused.header.status == Status.OVERLOADED and "max_pending (2)" in refused.header.error
    assert engine.held.count(CONNECTING, cluster) == 2
    breaker = cluster.gov.breaker if cluster.gov is not None else None
    assert breaker is not None and breaker.in_use(Resource.PENDING) == 2
    up = Link(UPSTREAM, "u", endpoint=cluster.endpoints[0], cluster=cluster)
    cluster.connecting = 0
    cluster.add_link(up)
    engine.unpark(cluster, 0.1)
    assert len(frames(up)) == 2 and breaker.in_use(Resource.PENDING) == 0
    cluster.links.clear()
    cluster.endpoints[0].healthy = False
    cluster.connecting = 1
    feed(engine, d, encode_request(4, "echo", "m", b""), 0.2)
    assert breaker.in_use(Resource.PENDING) == 1
    engine.expire(5.0)  # the park timeout: answered, its unit given back
    answered = {f.stream_id: f.header.status for f in frames(d)}
    assert answered[4] == Status.UNAVAILABLE and breaker.in_use(Resource.PENDING) == 0


def test_a_filter_that_holds_parks_the_request_until_replayed() -> None:
    from octoproxy.governance import CONTINUE, hold

    class Gate:
        kind = "gate"
        on_request_acts = True
        on_response_acts = False
        closed = True

        def on_request(self, call: Any, now_ms: int) -> Any:
            return hold("gate closed") if self.closed else CONTINUE

        def on_response(self, call: Any, status: int, now_ms: int) -> None:
            return None

    from octoproxy.core._pipeline import Chain

    engine, (up,) = make()
    engine.set_governance(gov(breaker={}), 0.0)
    rg = engine._route_gov[0]
    assert rg is not None
    gate = Gate()
    rg.chain = Chain((gate, *rg.filters))
    d = down()
    feed(engine, d, encode_request(1, "echo", "m", b""))
    cluster = engine.clusters["echo"]
    assert not up.out and not d.out and engine.held.count(CONNECTING, cluster) == 1
    gate.closed = False
    engine.unpark(cluster, 0.1)
    assert len(frames(up)) == 1 and not engine.held
