"""Request-aware routing: rules, force/fallback, overrides, locality, backups, warm-up, caching."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.core._balancer import Endpoint
from octoproxy.protocol._protocol import Status
from octoproxy.governance import Kind, Locality, LocalityMode, Member, RouteRule, Router, RoutingPolicy, SlowStart, Verdict
from octoproxy.governance._routing import method_matches, slow_start_factor

HERE = Locality(region="bj", center="bj-north", idc="yf")


def member(addr: str, *, weight: int = 100, region: str = "bj", center: str = "bj-north", idc: str = "yf",
           tags: dict[str, str] | None = None, backup: bool = False, warm: int = 0, healthy: bool = True) -> Member:
    return Member(Endpoint(addr, weight, region, idc, dict(tags or {}), healthy), center, backup, warm)


def router(members: list[Member], policy: RoutingPolicy | None = None, local: Locality = HERE, seed: int = 1) -> Router:
    r = Router("c", policy or RoutingPolicy(), local, random.Random(seed))
    r.update(members)
    return r


def picks(r: Router, n: int, meta: dict[str, str] | None = None, method: str = "Get", now: int = 0) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        ep = r.pick("svc", method, meta or {}, now)
        out[ep.address if isinstance(ep, Endpoint) else "verdict"] += 1
    return out


@pytest.mark.parametrize(
    ("pattern", "method", "ok"),
    [("", "Get", True), ("*", "Get", True), ("Get", "Get", True), ("Get", "GetX", False),
     ("Get*", "GetUser", True), ("Get*", "Get", True), ("Get*", "Put", False), ("Put", "Get", False)],
)
def test_method_patterns(pattern: str, method: str, ok: bool) -> None:
    assert method_matches(pattern, method) is ok


BLUE = RouteRule("blue", method="Get*", match_metadata=(("swimlane", "blue"),), endpoint_tags=(("swimlane", "blue"),))


@pytest.mark.parametrize(
    ("meta", "method", "expect"),
    [
        ({"swimlane": "blue"}, "GetUser", {"b1"}),       # rule matches: the subset only
        ({"swimlane": "blue"}, "PutUser", {"a", "b1"}),  # method does not match: no rule
        ({"swimlane": "green"}, "GetUser", {"a", "b1"}),  # metadata does not match
        ({}, "GetUser", {"a", "b1"}),
    ],
)
def test_rule_selects_subset(meta: dict[str, str], method: str, expect: set[str]) -> None:
    r = router([member("a"), member("b1", tags={"swimlane": "blue"})], RoutingPolicy(rules=(BLUE,)))
    assert set(picks(r, 200, meta, method)) == expect


def test_first_matching_rule_wins_and_service_filter() -> None:
    other = RouteRule("other-svc", service="nope", endpoint_tags=(("x", "1"),), force=True)
    to_a = RouteRule("to-a", endpoint_tags=(("name", "a"),))
    to_b = RouteRule("to-b", endpoint_tags=(("name", "b"),))
    r = router([member("a", tags={"name": "a"}), member("b", tags={"name": "b"})], RoutingPolicy(rules=(other, to_a, to_b)))
    assert r.match("svc", "Get", {}) == 1
    assert set(picks(r, 50)) == {"a"}


def test_empty_subset_falls_back_to_the_rest() -> None:
    r = router([member("a"), member("b1", tags={"swimlane": "blue"}, healthy=False)], RoutingPolicy(rules=(BLUE,)))
    assert set(picks(r, 50, {"swimlane": "blue"})) == {"a"}


def test_force_answers_no_route_with_reason() -> None:
    rule = RouteRule("blue", match_metadata=(("swimlane", "blue"),), endpoint_tags=(("swimlane", "blue"),), force=True)
    r = router([member("a")], RoutingPolicy(rules=(rule,)))
    v = r.pick("svc", "Get", {"swimlane": "blue"}, 0)
    assert isinstance(v, Verdict) and v.kind is Kind.ANSWER and v.status is Status.NO_ROUTE
    assert "blue" in v.reason and "swimlane=blue" in v.reason and "force" in v.reason
    # the verdict is built once, not per request
    assert r.pick("svc", "Get", {"swimlane": "blue"}, 0) is v


def test_weight_overrides_apply_under_the_rule() -> None:
    rule = RouteRule("drain-a", weight_overrides={"a": 0, "b": 300})
    r = router([member("a"), member("b"), member("c")], RoutingPolicy(rules=(rule,)))
    s = r.shares("svc", "Get", {}, 0)
    assert s == pytest.approx({"b": 0.75, "c": 0.25})


def test_no_healthy_endpoint_is_unavailable() -> None:
    r = router([member("a", healthy=False)])
    v = r.pick("svc", "Get", {}, 0)
    assert isinstance(v, Verdict) and v.status is Status.UNAVAILABLE and "no healthy endpoint" in v.reason
    r2 = router([])
    assert isinstance(r2.pick("svc", "Get", {}, 0), Verdict)


# ---------------------------------------------------------------- locality

def locality_members() -> list[Member]:
    return [
        member("idc", idc="yf"),
        member("center", idc="dx", center="bj-north"),
        member("region", idc="zw", center="bj-south"),
        member("far", region="sh", center="sh-1", idc="sh-a"),
    ]


def test_locality_prefers_same_idc_with_trickle() -> None:
    s = router(locality_members()).shares("svc", "Get", {}, 0)
    total = 1 + 0.001 + 0.001 + 0.000001
    assert s["idc"] == pytest.approx(1 / total)
    assert s["center"] == pytest.approx(0.001 / total)
    assert s["region"] == pytest.approx(0.001 / total)
    assert s["far"] == pytest.approx(0.000001 / total)


@pytest.mark.parametrize(
    ("down", "best"),
    [({"idc"}, "center"), ({"idc", "center"}, "region"), ({"idc", "center", "region"}, "far")],
)
def test_locality_fails_over_tier_by_tier(down: set[str], best: str) -> None:
    r = router(locality_members())
    for a in down:
        r.set_ejected(a, True)
    s = r.shares("svc", "Get", {}, 0)
    assert max(s, key=s.__getitem__) == best and s[best] > 0.99
    assert not set(s) & down


def test_enforce_keeps_only_the_best_tier() -> None:
    r = router(locality_members(), RoutingPolicy(locality=LocalityMode.ENFORCE))
    assert r.shares("svc", "Get", {}, 0) == {"idc": 1.0}
    r.set_ejected("idc", True)
    assert r.shares("svc", "Get", {}, 0) == {"center": 1.0}


def test_locality_off_or_unknown_local_keeps_weights() -> None:
    eq = {"idc": 0.25, "center": 0.25, "region": 0.25, "far": 0.25}
    assert router(locality_members(), RoutingPolicy(locality=LocalityMode.OFF)).shares("svc", "Get", {}, 0) == pytest.approx(eq)
    assert router(locality_members(), local=Locality()).shares("svc", "Get", {}, 0) == pytest.approx(eq)


# ---------------------------------------------------------------- backups

def test_backup_only_when_no_normal_endpoint_is_usable() -> None:
    r = router([member("a"), member("bk", backup=True)])
    assert set(picks(r, 100)) == {"a"}
    r.set_ejected("a", True)
    assert set(picks(r, 20)) == {"bk"}
    r.set_ejected("a", False)
    assert set(picks(r, 20)) == {"a"}


def test_backup_used_when_normal_healthy_flag_flips() -> None:
    a = member("a")
    r = router([a, member("bk", backup=True)])
    assert set(picks(r, 10)) == {"a"}
    a.endpoint.healthy = False
    r.invalidate()
    assert set(picks(r, 10)) == {"bk"}


# ---------------------------------------------------------------- warm-up

@pytest.mark.parametrize(
    ("elapsed", "aggression", "floor", "factor"),
    [(0, 1.0, 10.0, 0.1), (5_000, 1.0, 10.0, 0.5), (9_000, 1.0, 10.0, 0.9), (10_000, 1.0, 10.0, 1.0),
     (2_500, 2.0, 10.0, 0.5), (2_500, 1.0, 50.0, 0.5), (1_000, 1.0, 0.0, 0.1), (99_999, 1.0, 10.0, 1.0)],
)
def test_slow_start_factor(elapsed: int, aggression: float, floor: float, factor: float) -> None:
    slow = SlowStart(window_ms=10_000, aggression=aggression, min_weight_percent=floor)
    assert slow_start_factor(slow, 1_000_000, 1_000_000 + elapsed) == pytest.approx(factor)
    assert slow_start_factor(SlowStart(), 1_000_000, 1_000_000 + elapsed) == 1.0  # window 0: off
    assert slow_start_factor(slow, 0, 5) == 1.0  # no warm-up start


def test_warm_up_visible_in_the_split_and_recomputed_per_step() -> None:
    start = 1_000_000
    pol = RoutingPolicy(slow_start=SlowStart(window_ms=10_000, step_ms=1_000))
    r = router([member("old"), member("new", warm=start)], pol)
    s0 = r.shares("svc", "Get", {}, start + 500)
    assert s0["new"] == pytest.approx(10 / 110)  # the floor, 10 %
    s5 = r.shares("svc", "Get", {}, start + 5_000)
    assert s5["new"] == pytest.approx(50 / 150)
    # within the same step the cached table is reused
    assert r.shares("svc", "Get", {}, start + 5_999) == s5
    assert r.shares("svc", "Get", {}, start + 20_000)["new"] == pytest.approx(0.5)


def test_table_is_cached_until_something_changes() -> None:
    r = router([member("a"), member("b")])
    r.pick("svc", "Get", {}, 0)
    t = r._tables[-1]
    r.pick("svc", "Get", {}, 10**9)
    assert r._tables[-1] is t
    r.set_ejected("a", True)
    r.pick("svc", "Get", {}, 0)
    assert r._tables[-1] is not t
    e = r.epoch
    r.set_ejected("a", True)  # no change: no new epoch
    assert r.epoch == e


def test_exclude_never_returns_an_excluded_endpoint() -> None:
    r = router([member("a", weight=1000), member("b"), member("c")])
    for _ in range(200):
        ep = r.pick("svc", "Get", {}, 0, exclude=frozenset({"a", "b"}))
        assert isinstance(ep, Endpoint) and ep.address == "c"
    v = r.pick("svc", "Get", {}, 0, exclude=frozenset({"a", "b", "c"}))
    assert isinstance(v, Verdict) and v.status is Status.UNAVAILABLE


def test_set_policy_and_update_take_effect() -> None:
    r = router([member("a"), member("b", tags={"v": "2"})])
    assert set(picks(r, 50)) == {"a", "b"}
    r.set_policy(RoutingPolicy(rules=(RouteRule("v2", endpoint_tags=(("v", "2"),)),)))
    assert set(picks(r, 50)) == {"b"}
    r.update([member("a")])
    assert set(picks(r, 50)) == {"a"}  # subset empty: fallback


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(1, 50), min_size=2, max_size=6), seed=st.integers(0, 2**32))
def test_weighted_pick_distribution(weights: list[int], seed: int) -> None:
    r = router([member(f"e{i}", weight=w) for i, w in enumerate(weights)], seed=seed)
    n = 20_000
    got = picks(r, n)
    total = sum(weights)
    for i, w in enumerate(weights):
        p = w / total
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(got[f"e{i}"] - n * p) <= 5 * sd + 1, (weights, got)


# ---------------------------------------------------------------- from the discovery messages

def test_conversion_from_proto() -> None:
    from octoproxy.governance._proto import member_from_proto, rules_from_proto
    from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

    msg = pb.RouteRules(service="svc", rules=[
        pb.RouteRule(name="blue", method="Get*", match_metadata={"swimlane": "blue"}, endpoint_tags={"swimlane": "blue"},
                     weight_overrides={"a:1": 0}, timeout_ms=250),
        pb.RouteRule(name="soft", endpoint_tags={"v": "2"}, fallback_to_all=True),
    ])
    blue, soft = rules_from_proto(msg)
    assert blue == RouteRule("blue", "svc", "Get*", (("swimlane", "blue"),), (("swimlane", "blue"),), {"a:1": 0}, True, 250)
    assert not soft.force  # fallback_to_all: fall back to the rest
    m = member_from_proto(pb.Endpoint(address="a:1", region="bj", idc="yf", tags={"swimlane": "blue"}, warmup_start_unix_ms=5))
    assert (m.endpoint.address, m.endpoint.weight, m.endpoint.healthy, m.warmup_start_ms) == ("a:1", 100, True, 5)
    assert not member_from_proto(pb.Endpoint(address="b:1", weight=7, status=pb.Endpoint.STARTING)).endpoint.healthy
    r = router([m, member_from_proto(pb.Endpoint(address="b:1"))], RoutingPolicy(rules=(blue, soft)))
    # the rule overrides a:1 (the only blue endpoint) to weight 0: the subset is empty and the rule forces
    v = r.pick("svc", "GetX", {"swimlane": "blue"}, 0)
    assert isinstance(v, Verdict) and v.status is Status.NO_ROUTE


def test_an_endpoints_own_warm_up_window_overrides_the_policys() -> None:
    """discovery.warmup registers an endpoint's own window; 0 falls back to slow_start.window."""
    start = 1_000_000
    pol = RoutingPolicy(slow_start=SlowStart(window_ms=10_000, step_ms=1_000))
    own = member("own", warm=start)
    own.warmup_window_ms = 40_000
    r = router([member("old"), member("dflt", warm=start), own], pol)
    s = r.shares("svc", "Get", {}, start + 10_000)
    assert s["dflt"] == pytest.approx(s["old"])  # the policy's 10 s window is over
    assert s["own"] == pytest.approx(s["old"] * 0.25)  # 10 s into its own 40 s: a quarter (linear)
    assert r.shares("svc", "Get", {}, start + 40_000)["own"] == pytest.approx(1 / 3)
