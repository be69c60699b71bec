"""The router against a plain reference model of docs/governance.md section 2, over random clusters.

The model recomputes everything from scratch on every question; the router
caches tables per rule and epoch. Random sequences of changes (ejections,
health flips, time moving through warm-up) and requests must give the same
shares, the same verdict statuses, and picks only from endpoints with a share.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.core._balancer import Endpoint
from octoproxy.protocol._protocol import Status
from octoproxy.governance import Locality, LocalityMode, Member, RouteRule, Router, RoutingPolicy, SlowStart, Verdict
from octoproxy.governance._routing import method_matches, slow_start_factor

HERE = Locality("r1", "c1", "i1")
PLACES = [("r1", "c1", "i1"), ("r1", "c1", "i2"), ("r1", "c2", "i3"), ("r2", "c3", "i4"), ("", "", "")]


def model(policy: RoutingPolicy, local: Locality, members: list[Member], ejected: set[str],
          service: str, method: str, md: Mapping[str, str], now: int) -> dict[str, float] | Status:
    rule = None
    for r in policy.rules:
        if (not r.service or r.service == service) and method_matches(r.method, method) and all(md.get(k) == v for k, v in r.match_metadata):
            rule = r
            break
    ov = rule.weight_overrides if rule else {}

    def w(m: Member) -> int:
        return ov.get(m.endpoint.address, m.endpoint.weight)

    def usable(m: Member) -> bool:
        return m.endpoint.healthy and m.endpoint.address not in ejected and w(m) > 0

    pool = members
    if rule and rule.endpoint_tags:
        sub = [m for m in members if all(m.endpoint.tags.get(k) == v for k, v in rule.endpoint_tags)]
        if any(usable(m) for m in sub):
            pool = sub
        elif rule.force:
            return Status.NO_ROUTE
        else:
            pool = [m for m in members if m not in sub]
    ok = [m for m in pool if usable(m)]
    normal = [m for m in ok if not m.backup]
    chosen = normal or [m for m in ok if m.backup]
    if not chosen:
        return Status.UNAVAILABLE

    def tier(m: Member) -> int:
        if local.idc and m.endpoint.idc == local.idc:
            return 0
        if local.center and m.center == local.center:
            return 1
        if local.region and m.endpoint.region == local.region:
            return 2
        return 3

    use_loc = policy.locality is not LocalityMode.OFF and bool(local.region or local.center or local.idc)
    best = min(tier(m) for m in chosen) if use_loc else 3
    weights: dict[str, float] = {}
    for m in chosen:
        f = 1.0
        if use_loc and tier(m) != best:
            if policy.locality is LocalityMode.ENFORCE:
                continue
            f = policy.same_region_factor if (local.region and m.endpoint.region == local.region) else policy.other_region_factor
        # the router recomputes warm-up per step: evaluate at the step's start, as it does
        f *= slow_start_factor(policy.slow_start, m.warmup_start_ms, now)
        weights[m.endpoint.address] = weights.get(m.endpoint.address, 0.0) + w(m) * f
    total = sum(weights.values())
    return {a: x / total for a, x in weights.items()}


member_st = st.builds(
    lambda i, place, weight, tag, backup, healthy, warm: Member(
        Endpoint(f"e{i}", weight, place[0], place[2], {"lane": tag} if tag else {}, healthy), place[1], backup, warm),
    st.integers(0, 10**6),
    st.sampled_from(PLACES),
    st.sampled_from([1, 50, 100, 300]),
    st.sampled_from(["", "blue", "green"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 0, 10_000, 14_000]),
)

rule_st = st.builds(
    lambda name, method, lane_md, lane_tag, force, zero: RouteRule(
        name, method=method,
        match_metadata=(("lane", lane_md),) if lane_md else (),
        endpoint_tags=(("lane", lane_tag),) if lane_tag else (),
        weight_overrides={zero: 0} if zero else {}, force=force),
    st.text("abc", min_size=1, max_size=3),
    st.sampled_from(["", "*", "Get*", "Get", "Put"]),
    st.sampled_from(["", "blue", "green"]),
    st.sampled_from(["", "blue", "green"]),
    st.booleans(),
    st.sampled_from(["", "e1", "e2"]),
)

action_st = st.one_of(
    st.tuples(st.just("eject"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("health"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("time"), st.integers(0, 3_000), st.just(False)),
    st.tuples(st.just("ask"), st.sampled_from(["GetX", "Get", "Put"]), st.sampled_from(["", "blue", "green"])),
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(member_st, min_size=0, max_size=7),
    rules=st.lists(rule_st, max_size=3),
    mode=st.sampled_from(list(LocalityMode)),
    actions=st.lists(action_st, min_size=1, max_size=25),
    seed=st.integers(0, 1000),
)
def test_router_matches_the_reference_model(raw: list[Member], rules: list[RouteRule], mode: LocalityMode,
                                            actions: list[tuple[str, object, object]], seed: int) -> None:
    members = [Member(Endpoint(f"e{i}", m.endpoint.weight, m.endpoint.region, m.endpoint.idc, m.endpoint.tags, m.endpoint.healthy),
                      m.center, m.backup, m.warmup_start_ms) for i, m in enumerate(raw)]
    policy = RoutingPolicy(rules=tuple(rules), locality=mode, slow_start=SlowStart(window_ms=8_000, min_weight_percent=1.0, step_ms=1_000))
    r = Router("c", policy, HERE, random.Random(seed))
    r.update(members)
    ejected: set[str] = set()
    now = 10_000
    for kind, a, b in actions:
        if kind == "eject" and members:
            addr = members[int(a) % len(members)].endpoint.address  # type: ignore[call-overload]
            r.set_ejected(addr, bool(b))
            (ejected.add if b else ejected.discard)(addr)
        elif kind == "health" and members:
            members[int(a) % len(members)].endpoint.healthy = bool(b)  # type: ignore[call-overload]
            r.invalidate()
        elif kind == "time":
            now += int(a)  # type: ignore[call-overload]
        elif kind == "ask":
            md = {"lane": str(b)} if b else {}
            step_start = now // 1_000 * 1_000  # warm-up weights as of the current step
            want = model(policy, HERE, members, ejected, "svc", str(a), md, step_start)
            got = r.shares("svc", str(a), md, now)
            v = r.pick("svc", str(a), md, now)
            if isinstance(want, Status):
                assert got == {} and isinstance(v, Verdict) and v.status is want
            else:
                assert got.keys() == want.keys()
                for k in want:
                    assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-15)
                assert isinstance(v, Endpoint) and want.get(v.address, 0.0) > 0.0
