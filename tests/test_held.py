"""The held-request queue (core/_held.py, sans-IO) and how the engine uses it."""

from __future__ import annotations

from typing import Any

import pytest

from octoproxy import Status
from octoproxy.core._held import CONNECTING, DISCOVERY, MAX_HELD, MAX_PER_KEY, HeldQueue
from octoproxy.frame import encode_request
from octoproxy.governance import Resource
from test_engine import down, feed, frames, make, relay  # noqa: F401  (relay: the twins fixture)
from test_gov_kernel import gov

# ------------------------------------------------------------ the queue alone


def test_limits_per_key_and_in_total() -> None:
    q = HeldQueue(max_per_key=2, max_total=3)
    assert q.hold(CONNECTING, "a", None, b"1", 0.0, 1.0) is not None
    assert q.hold(CONNECTING, "a", None, b"2", 0.0, 1.0) is not None
    assert not q.has_room(CONNECTING, "a") and q.hold(CONNECTING, "a", None, b"3", 0.0, 1.0) is None  # the key is full
    assert q.has_room(DISCOVERY, "a")  # another reason is another key
    assert q.hold(DISCOVERY, "a", None, b"4", 0.0, 1.0) is not None
    assert len(q) == 3 and not q.has_room(CONNECTING, "b")
    assert q.hold(CONNECTING, "b", None, b"5", 0.0, 1.0) is None  # full in total
    assert q.count(CONNECTING, "a") == 2 and q.count(DISCOVERY, "a") == 1 and q.count(CONNECTING, "b") == 0
    q.release(CONNECTING, "a")
    assert len(q) == 1 and q.hold(CONNECTING, "b", None, b"5", 0.0, 1.0) is not None  # room again


def test_defaults_keep_the_old_per_cluster_limit() -> None:
    q = HeldQueue()
    assert (q.max_per_key, q.max_total) == (MAX_PER_KEY, MAX_HELD) == (10000, 65536)
    with pytest.raises(ValueError):
        HeldQueue(max_total=0)


def test_release_by_key_in_arrival_order() -> None:
    q = HeldQueue()
    for i, key in enumerate("abab"):
        q.hold(CONNECTING, key, None, bytes([i]), float(i), 10.0 + i)
    got = q.release(CONNECTING, "a")
    assert [h.raw for h in got] == [b"\x00", b"\x02"] and [h.since for h in got] == [0.0, 2.0]
    assert q.release(CONNECTING, "a") == [] and q.keys(CONNECTING) == ["b"] and len(q) == 2
    assert q.release(DISCOVERY, "b") == []  # same key, other reason: untouched
    assert [h.raw for h in q.entries(CONNECTING, "b")] == [b"\x01", b"\x03"]


def test_expiry_is_fifo_per_key_and_strictly_after_the_deadline() -> None:
    q = HeldQueue()
    q.hold(CONNECTING, "a", None, b"a1", 0.0, 1.0)
    q.hold(CONNECTING, "a", None, b"a2", 0.5, 1.5)
    q.hold(DISCOVERY, "s", None, b"s1", 0.2, 2.0)
    assert q.next_deadline() == 1.0
    assert q.expire(1.0) == []  # at the deadline: still held
    assert [h.raw for h in q.expire(1.2)] == [b"a1"]
    assert q.next_deadline() == 1.5 and len(q) == 2
    assert [h.raw for h in q.expire(3.0)] == [b"a2", b"s1"]
    assert len(q) == 0 and q.keys(CONNECTING) == [] and q.next_deadline() is None and q.expire(9.0) == []


def test_an_entry_due_earlier_than_the_one_before_it_waits_for_it() -> None:
    """FIFO per key: O(1) per expired entry; an out-of-order deadline leaves with the entry before it."""
    q = HeldQueue()
    q.hold(CONNECTING, "a", None, b"late", 0.0, 5.0)
    q.hold(CONNECTING, "a", None, b"early", 0.0, 1.0)
    assert q.expire(2.0) == []
    assert [h.raw for h in q.expire(5.5)] == [b"late", b"early"]


def test_abort_takes_everything() -> None:
    q = HeldQueue()
    q.hold(CONNECTING, "a", None, b"1", 0.0, 1.0, unit="u")
    q.hold(DISCOVERY, "s", None, b"2", 0.0, 1.0)
    q.hold(CONNECTING, "a", None, b"3", 0.0, 1.0)
    got = q.abort()
    assert [(h.reason, h.key, h.raw, h.unit) for h in got] == [(CONNECTING, "a", b"1", "u"), (CONNECTING, "a", b"3", None), (DISCOVERY, "s", b"2", None)]
    assert len(q) == 0 and q.abort() == [] and list(q) == []


def test_summary_names_keys() -> None:
    class K:
        name = "echo"

    q = HeldQueue()
    q.hold(CONNECTING, K(), None, b"1", 0.0, 1.0)
    q.hold(DISCOVERY, "users", None, b"2", 0.0, 1.0)
    q.hold(DISCOVERY, "users", None, b"3", 0.0, 1.0)
    assert q.summary() == {CONNECTING: {"echo": 1}, DISCOVERY: {"users": 2}}


# ------------------------------------------------------------ the engine on it


def _connecting_engine(**kw: Any) -> Any:
    engine, _ = make(**kw)
    cluster = engine.clusters["echo"]
    cluster.links.clear()
    cluster.endpoints[0].healthy = False
    cluster.connecting = 1
    return engine, cluster


def test_engine_total_limit_is_configurable() -> None:
    engine, cluster = _connecting_engine(max_held=2)
    d = down()
    for sid in (1, 2, 3):
        feed(engine, d, encode_request(sid, "echo", "m"), now=0.0)
    (refused,) = frames(d)  # the third: no room (answered as when the cluster's own queue is full)
    assert refused.stream_id == 3 and refused.header.status == Status.UNAVAILABLE
    assert engine.held.count(CONNECTING, cluster) == 2 and engine.stats.error_count("parked") == 2


def test_held_requests_expire_each_at_its_own_deadline() -> None:
    engine, cluster = _connecting_engine()
    engine.park_timeout = 1.0
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    feed(engine, d, encode_request(2, "echo", "m"), now=0.6)
    engine.expire(1.1)
    (first,) = frames(d)
    assert first.stream_id == 1 and first.header.status == Status.UNAVAILABLE and first.header.error == "no connection to cluster 'echo' in time"
    engine.expire(1.7)
    assert [f.stream_id for f in frames(d)] == [2] and not engine.held


def test_discovery_requests_expire_one_by_one() -> None:
    """Each waits ``unrouted_timeout`` from its own arrival (the whole service's queue used to go with its oldest)."""
    engine, _ = make()
    asked: list[str] = []
    engine.on_unknown_service = asked.append
    engine.unrouted_timeout = 2.0
    d = down()
    feed(engine, d, encode_request(1, "users", "m"), now=0.0)
    feed(engine, d, encode_request(2, "users", "m"), now=1.5)
    assert asked == ["users"] and engine.held.count(DISCOVERY, "users") == 2
    engine.expire(2.5)
    (first,) = frames(d)
    assert first.stream_id == 1 and first.header.status == Status.NO_ROUTE and "no endpoints known" in first.header.error
    assert engine.held.count(DISCOVERY, "users") == 1
    engine.release_unrouted("users", False, 2.6)
    assert [(f.stream_id, f.header.status) for f in frames(d)] == [(2, Status.NO_ROUTE)] and not engine.held


def test_a_request_for_a_new_service_after_the_queue_emptied_asks_again() -> None:
    engine, _ = make()
    asked: list[str] = []
    engine.on_unknown_service = asked.append
    d = down()
    feed(engine, d, encode_request(1, "users", "m"), now=0.0)
    feed(engine, d, encode_request(2, "users", "m"), now=0.1)
    engine.release_unrouted("users", False, 0.2)
    feed(engine, d, encode_request(3, "users", "m"), now=0.3)
    assert asked == ["users", "users"]


def test_a_governed_unit_is_given_back_when_its_request_expires_before_a_filter_hold() -> None:
    """Each held entry gives back the unit it took: a filter's HOLD (no unit) held behind it does not keep it taken."""
    from octoproxy.core._pipeline import Chain
    from octoproxy.governance import hold

    class Gate:
        kind = "gate"
        on_request_acts = True
        on_response_acts = False

        def on_request(self, call: Any, now_ms: int) -> Any:
            return hold("gate closed")

        def on_response(self, call: Any, status: int, now_ms: int) -> None:
            return None

    engine, (up,) = make()
    engine.park_timeout = 1.0
    engine.set_governance(gov(breaker={"max_pending": 5}), 0.0)
    cluster = engine.clusters["echo"]
    rg = engine._route_gov[0]
    assert rg is not None and cluster.gov is not None and cluster.gov.breaker is not None
    breaker = cluster.gov.breaker
    rg.chain = Chain((Gate(), *rg.filters))
    d = down()
    links = dict(cluster.links)
    cluster.links.clear()
    cluster.connecting = 1
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)  # no connection: waits with a PENDING unit
    assert breaker.in_use(Resource.PENDING) == 1
    cluster.links.update(links)
    feed(engine, d, encode_request(2, "echo", "m"), now=0.5)  # a connection, but the gate holds it: no unit
    assert engine.held.count(CONNECTING, cluster) == 2 and breaker.in_use(Resource.PENDING) == 1
    engine.expire(1.2)
    assert [f.stream_id for f in frames(d)] == [1] and breaker.in_use(Resource.PENDING) == 0
    engine.expire(1.6)
    assert [f.stream_id for f in frames(d)] == [2] and breaker.in_use(Resource.PENDING) == 0 and not up.out


def test_a_unit_goes_back_to_the_breaker_it_came_from() -> None:
    """A pushed policy replaced the breaker while requests waited: the old one gets its units back, the new one is untouched."""
    engine, cluster = _connecting_engine()
    engine.set_governance(gov(breaker={"max_pending": 5}), 0.0)
    assert cluster.gov is not None
    old = cluster.gov.breaker
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    engine.set_governance(gov(rate_limits=[{"name": "q", "cluster_rate": 100.0}]), 0.1)  # no breaker
    engine.set_governance(gov(breaker={"max_pending": 5}), 0.2)  # a new one
    new = cluster.gov.breaker
    assert old is not None and new is not None and new is not old
    feed(engine, d, encode_request(2, "echo", "m"), now=0.3)
    assert old.in_use(Resource.PENDING) == 1 and new.in_use(Resource.PENDING) == 1
    engine.expire(1.1)  # the first one: its unit to the old breaker
    assert old.in_use(Resource.PENDING) == 0 and new.in_use(Resource.PENDING) == 1
    assert engine.abort_all("bye") == 1
    assert new.in_use(Resource.PENDING) == 0 and sorted(f.stream_id for f in frames(d)) == [1, 2]


def test_a_full_governed_queue_answers_overloaded_and_keeps_no_unit() -> None:
    engine, cluster = _connecting_engine(max_held=1)
    engine.set_governance(gov(breaker={"max_pending": 5}), 0.0)
    assert cluster.gov is not None and cluster.gov.breaker is not None
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    feed(engine, d, encode_request(2, "echo", "m"), now=0.0)
    (refused,) = frames(d)
    assert refused.stream_id == 2 and refused.header.status == Status.OVERLOADED and "too many requests waiting" in refused.header.error
    assert cluster.gov.breaker.in_use(Resource.PENDING) == 1


def test_drain_answers_every_held_request_once() -> None:
    engine, cluster = _connecting_engine()
    engine.on_unknown_service = lambda name: None
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    feed(engine, d, encode_request(2, "users", "m"), now=0.0)
    assert len(engine.held) == 2
    assert engine.abort_all("proxy draining") == 2
    got = frames(d)
    assert sorted((f.stream_id, f.header.status, f.header.error) for f in got) == [(1, Status.UNAVAILABLE, "proxy draining"), (2, Status.UNAVAILABLE, "proxy draining")]
    assert not engine.held and engine.stats.rejected_count("drain") == 2
    engine.expire(30.0)
    assert not frames(d)


def test_requests_held_on_a_cluster_no_longer_in_the_engine_still_expire() -> None:
    engine, cluster = _connecting_engine()
    d = down()
    feed(engine, d, encode_request(1, "echo", "m"), now=0.0)
    del engine.clusters["echo"]  # a cluster dropped while requests wait for it
    engine.expire(engine.park_timeout + 0.5)
    assert [f.header.status for f in frames(d)] == [Status.UNAVAILABLE] and not engine.held
