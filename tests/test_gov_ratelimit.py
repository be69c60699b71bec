"""Rate limits: token buckets, keys per direction, cluster quotas divided, bounded key space."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.protocol._protocol import Status
from octoproxy.governance import CONTINUE, Direction, RateLimiter, RateLimitRule, TokenBucket
from octoproxy.governance._ratelimit import Limit


def bucket(rate: float, burst: float = 0.0) -> TokenBucket:
    return TokenBucket(Limit(RateLimitRule("r", rate=rate, burst=burst), 1), 0)


def test_bucket_starts_full_then_refills_lazily() -> None:
    b = bucket(10.0, burst=5)
    assert [b.take(0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(99)
    assert b.take(100)  # 10/s: one token per 100 ms
    assert not b.take(150)
    assert [b.take(10_000) for _ in range(6)] == [True] * 5 + [False]  # capped at the burst


def test_default_burst_is_one_second_at_least_one() -> None:
    b50, b05 = bucket(50.0), bucket(0.5)
    assert sum(b50.take(0) for _ in range(100)) == 50
    assert sum(b05.take(0) for _ in range(10)) == 1


def test_fractional_rates() -> None:
    b = bucket(0.5)
    assert b.take(0) and not b.take(1_999) and b.take(2_000)


@settings(max_examples=80, deadline=None)
@given(
    rate=st.sampled_from([0.3, 1.0, 7.0, 100.0, 1234.5]),
    burst=st.sampled_from([0.0, 1.0, 3.0, 50.0]),
    gaps=st.lists(st.integers(0, 400), min_size=1, max_size=300),
)
def test_bucket_never_exceeds_its_rate_over_any_window(rate: float, burst: float, gaps: list[int]) -> None:
    b = bucket(rate, burst)
    cap = max(burst if burst > 0 else max(1.0, rate), 1.0)
    now = 0
    granted: list[int] = []
    for g in gaps:
        now += g
        if b.take(now):
            granted.append(now)
    # every window [granted[i], granted[j]]
    for i in range(len(granted)):
        for j in range(i, len(granted)):
            assert j - i + 1 <= cap + rate * (granted[j] - granted[i]) / 1000 + 1e-9


INBOUND = [
    RateLimitRule("vip", service="svc", caller="vip", rate=1000.0),
    RateLimitRule("per-caller", service="svc", method="Get*", rate=2.0),
    RateLimitRule("out", direction=Direction.OUTBOUND, service="svc", rate=1.0),
]


def test_inbound_keys_include_the_caller() -> None:
    rl = RateLimiter(INBOUND, Direction.INBOUND)
    assert [rl.check("svc", "GetA", "x", 0) is CONTINUE for _ in range(3)] == [True, True, False]
    assert rl.check("svc", "GetA", "y", 0) is CONTINUE  # another caller: its own bucket
    assert rl.check("svc", "GetB", "x", 0) is CONTINUE  # another method: its own bucket
    assert all(rl.check("svc", "GetA", "vip", 0) is CONTINUE for _ in range(100))  # first rule wins
    assert all(rl.check("svc", "Put", "x", 0) is CONTINUE for _ in range(100))  # no rule: unlimited
    assert all(rl.check("other", "GetA", "x", 0) is CONTINUE for _ in range(100))


def test_outbound_ignores_the_caller_and_inbound_rules() -> None:
    rl = RateLimiter(INBOUND, Direction.OUTBOUND)
    assert rl.check("svc", "GetA", "x", 0) is CONTINUE
    v = rl.check("svc", "GetA", "y", 0)
    assert v.status is Status.RATE_LIMITED and "'out'" in v.reason and "(service, method)" in v.reason


def test_reason_names_the_rule_and_rate() -> None:
    rl = RateLimiter(INBOUND, Direction.INBOUND)
    rl.check("svc", "GetA", "x", 0)
    rl.check("svc", "GetA", "x", 0)
    v = rl.check("svc", "GetA", "x", 0)
    assert v.status is Status.RATE_LIMITED and v.reason == "rate limited by 'per-caller': 2/s per (service, method, caller)"
    assert rl.check("svc", "GetA", "x", 0) is v  # prebuilt


def test_no_rules_is_free() -> None:
    rl = RateLimiter([], Direction.INBOUND)
    assert rl.check("a", "b", "c", 0) is CONTINUE and len(rl) == 0


@pytest.mark.parametrize(("n", "per_instance"), [(1, 100), (2, 50), (4, 25), (0, 100)])
def test_cluster_quota_divided_among_live_instances(n: int, per_instance: int) -> None:
    rl = RateLimiter([RateLimitRule("q", cluster_rate=100.0)], Direction.INBOUND, instances=n)
    assert sum(rl.check("s", "m", "c", 0) is CONTINUE for _ in range(200)) == per_instance


def test_quota_redivided_as_instances_change() -> None:
    rl = RateLimiter([RateLimitRule("q", cluster_rate=100.0, burst=10)], Direction.INBOUND, instances=1)
    assert rl.check("s", "m", "c", 0) is CONTINUE
    rl.set_instances(4)  # 25/s each now
    assert rl.instances == 4
    for _ in range(20):
        rl.check("s", "m", "c", 0)
    assert "25/s" in rl.check("s", "m", "c", 0).reason
    granted = sum(rl.check("s", "m", "c", 1_000 + i) is CONTINUE for i in range(1_000))
    assert granted == 10 + 24  # the full burst, then 999 ms at 25/s (it would be 10 + 99 at 100/s)


def test_key_space_is_bounded_and_busy_buckets_are_not_reset() -> None:
    rl = RateLimiter([RateLimitRule("r", rate=1.0)], Direction.INBOUND, max_keys=3)
    # caller a uses its token: its bucket is busy (not full)
    assert rl.check("s", "m", "a", 0) is CONTINUE
    for c in "bc":
        assert rl.check("s", "m", c, 0) is CONTINUE
    # a flood of new callers: the table is full of busy buckets, they share the overflow bucket
    flood = [rl.check("s", "m", f"x{i}", 0) is CONTINUE for i in range(1000)]
    assert sum(flood) == 1 and len(rl) == 3
    # caller a was not evicted/reset: still limited
    assert rl.check("s", "m", "a", 0) is not CONTINUE
    # once idle buckets refill, they are evicted to make room
    assert rl.check("s", "m", "new", 5_000) is CONTINUE and len(rl) == 3


def test_keys_without_rule_are_bounded_too() -> None:
    rl = RateLimiter([RateLimitRule("r", method="Limited", rate=1.0)], Direction.INBOUND, max_keys=10)
    for i in range(10_000):
        assert rl.check("s", "Free", f"c{i}", 0) is CONTINUE
    assert len(rl) == 10


def test_second_chance_finds_an_idle_key_behind_busy_ones() -> None:
    rl = RateLimiter([RateLimitRule("r", rate=1.0, burst=1), RateLimitRule("free", method="Free", rate=1e6)], Direction.INBOUND, max_keys=3)
    assert rl.check("s", "m", "busy", 0) is CONTINUE  # drained: busy until 1 s later
    assert rl.check("s", "Other", "x", 0) is CONTINUE  # drained too
    rl._keys[("s", "Free", "idle")] = None  # a key with no bucket: free to drop
    assert rl.check("s", "m", "new", 10) is CONTINUE
    assert set(rl._keys) == {("s", "m", "busy"), ("s", "Other", "x"), ("s", "m", "new")}
    assert rl.check("s", "m", "busy", 10) is not CONTINUE  # not reset by the newcomer
