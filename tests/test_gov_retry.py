"""Safe retries: the decision table, exclusion, per-try timeouts, and the retry budget."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.protocol._protocol import Flags, Status
from octoproxy.governance import NOT_PROCESSED, BudgetConfig, RetryBudget, RetryPolicy, decide

POL = RetryPolicy(max_attempts=3, idempotent_methods=("Get*", "Ping"), per_try_timeout_ms=200)


def run(**kw: object) -> object:
    args: dict[str, object] = dict(status=Status.UNAVAILABLE, flags=0, connect_failed=False, idempotent=False,
                                   attempt=1, now_ms=1_000, deadline_ms=2_000, endpoint="a")
    args.update(kw)
    return decide(POL, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "retry", "why"),
    [
        ({"status": Status.OK}, False, "succeeded"),
        ({}, False, "may have been processed"),  # UNAVAILABLE, not idempotent: maybe processed
        ({"status": Status.TIMEOUT}, False, "may have been processed"),
        ({"connect_failed": True}, True, "connect failure"),
        ({"connect_failed": True, "status": Status.OK}, True, "connect failure"),
        ({"flags": Flags.HOT_RESTART}, True, "HOT_RESTART"),
        ({"flags": NOT_PROCESSED, "status": Status.OVERLOADED}, True, "OVERLOADED before admission"),
        ({"status": Status.OVERLOADED}, False, "may have been processed"),
        ({"idempotent": True}, True, "UNAVAILABLE on an idempotent method"),
        ({"idempotent": True, "status": Status.TIMEOUT}, True, "TIMEOUT on an idempotent"),
        ({"idempotent": True, "status": Status.APPLICATION_ERROR}, False, "may have been processed"),
        ({"idempotent": True, "status": Status.RATE_LIMITED}, False, "may have been processed"),
        ({"connect_failed": True, "attempt": 3}, False, "attempts exhausted"),
        ({"connect_failed": True, "now_ms": 1_996}, False, "deadline"),
        ({"flags": NOT_PROCESSED, "status": 77}, True, "status 77 before admission"),
    ],
)
def test_decision_table(kw: dict[str, object], retry: bool, why: str) -> None:
    d = run(**kw)
    assert d.retry is retry and why in d.reason  # type: ignore[attr-defined]


def test_retry_excludes_every_tried_endpoint_and_caps_the_try() -> None:
    d = decide(POL, status=Status.UNAVAILABLE, flags=0, connect_failed=True, idempotent=False, attempt=2,
               now_ms=1_000, deadline_ms=1_150, endpoint="b", tried=("a",))
    assert d.retry and d.exclude == frozenset({"a", "b"}) and d.timeout_ms == 150  # time left < per-try cap
    d = decide(POL, status=Status.UNAVAILABLE, flags=0, connect_failed=True, idempotent=False, attempt=1,
               now_ms=1_000, deadline_ms=5_000, endpoint="a")
    assert d.timeout_ms == 200 and "retry 2/3" in d.reason
    d = decide(RetryPolicy(), status=0, flags=0, connect_failed=True, idempotent=False, attempt=1, now_ms=0,
               deadline_ms=5_000, endpoint="a")
    assert d.timeout_ms == 5_000  # no per-try cap: all the time left


def test_idempotent_patterns() -> None:
    assert POL.is_idempotent("GetUser") and POL.is_idempotent("Ping")
    assert not POL.is_idempotent("Pings") and not POL.is_idempotent("PutUser")
    assert RetryPolicy(idempotent_methods=("*",)).is_idempotent("Anything")


def test_budget_spent_refuses_and_hot_restart_is_exempt() -> None:
    budget = RetryBudget(BudgetConfig(ratio=0.0, min_per_second=0.1, window_ms=10_000), 0)  # reserve: 1 retry
    kw = dict(status=Status.UNAVAILABLE, idempotent=False, attempt=1, now_ms=0, deadline_ms=9_000, endpoint="a", budget=budget)
    d1 = decide(POL, flags=0, connect_failed=True, **kw)  # type: ignore[arg-type]
    assert d1.retry and d1.from_budget
    d2 = decide(POL, flags=0, connect_failed=True, **kw)  # type: ignore[arg-type]
    assert not d2.retry and "budget" in d2.reason
    d3 = decide(POL, flags=Flags.HOT_RESTART, connect_failed=False, **kw)  # type: ignore[arg-type]
    assert d3.retry and not d3.from_budget


def test_budget_ratio_and_reserve() -> None:
    b = RetryBudget(BudgetConfig(), 0)  # 20 % + 10/s over 10 s: reserve 100
    assert sum(b.try_withdraw(0) for _ in range(150)) == 100
    for _ in range(1000):
        b.deposit(0)
    assert sum(b.try_withdraw(0) for _ in range(500)) == 200  # 0.2 * 1000 more
    assert b.available(0) == 0
    # 11 s later everything above has left the window
    assert b.available(11_000) == 100


def test_budget_time_going_back_counts_in_current_bucket() -> None:
    b = RetryBudget(BudgetConfig(ratio=0.0, min_per_second=0.2), 5_000)  # reserve 2
    assert b.try_withdraw(5_000) and b.try_withdraw(4_000) and not b.try_withdraw(3_000)


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 3_000), st.booleans()), min_size=1, max_size=400),
    ratio=st.sampled_from([0.0, 0.2, 0.5]),
    per_s=st.sampled_from([0.5, 1.0, 10.0]),
)
def test_budget_never_exceeds_ratio_plus_reserve_over_any_window(events: list[tuple[int, bool]], ratio: float, per_s: float) -> None:
    window = 10_000
    cfg = BudgetConfig(ratio=ratio, min_per_second=per_s, window_ms=window, buckets=10)
    b = RetryBudget(cfg, 0)
    reserve = per_s * window / 1000
    now = 0
    reqs: deque[int] = deque()
    rets: deque[int] = deque()
    for gap, is_retry in events:
        now += gap
        while reqs and reqs[0] <= now - window:
            reqs.popleft()
        while rets and rets[0] <= now - window:
            rets.popleft()
        if is_retry:
            if b.try_withdraw(now):
                rets.append(now)
                # every sliding window (t - W, t] ending at a retry stays within the budget
                assert len(rets) <= ratio * len(reqs) + reserve + 1e-9
        else:
            b.deposit(now)
            reqs.append(now)


def test_budget_allows_the_full_reserve_when_idle() -> None:
    b = RetryBudget(BudgetConfig(ratio=0.2, min_per_second=10.0), 0)
    got = sum(b.try_withdraw(t) for t in range(0, 10_000, 10))
    assert got == 100
