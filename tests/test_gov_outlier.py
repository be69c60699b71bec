"""Outlier ejection: consecutive failures, failure rate, caps, un-ejection on time, the table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.protocol._protocol import Status
from octoproxy.governance import OutlierConfig, OutlierDetector, OutlierError, is_failure
from octoproxy.governance._outlier import TRANSITIONS, Event, State, diagram

ADDRS = [f"10.0.0.{i}:9000" for i in range(10)]


def detector(n: int = 10, **kw: int) -> OutlierDetector:
    d = OutlierDetector("c", OutlierConfig(**kw), now_ms=0)
    d.update(ADDRS[:n])
    return d


@pytest.mark.parametrize(
    ("status", "failed"),
    [(Status.OK, False), (Status.APPLICATION_ERROR, False), (Status.NO_ROUTE, False), (Status.UNAVAILABLE, True),
     (Status.TIMEOUT, True), (Status.RATE_LIMITED, False), (Status.OVERLOADED, True), (Status.PROTOCOL_ERROR, False), (999, False)],
)
def test_failure_classification(status: int, failed: bool) -> None:
    assert is_failure(status) is failed


def test_defaults_are_envoys() -> None:
    c = OutlierConfig()
    assert (c.consecutive_failures, c.interval_ms, c.base_ejection_ms, c.max_ejection_ms, c.max_ejection_percent) == (
        5, 10_000, 30_000, 300_000, 10)


def test_five_consecutive_failures_eject() -> None:
    d = detector()
    a = ADDRS[0]
    assert [d.record(a, True, 100) for _ in range(4)] == [False] * 4
    assert d.record(a, True, 100) is True
    assert d.is_ejected(a) and d.state(a) is State.EJECTED and d.ejected_count == 1


def test_a_success_resets_the_run() -> None:
    d = detector()
    a = ADDRS[0]
    for _ in range(4):
        d.record(a, True, 0)
    d.record_status(a, Status.OK, 0)
    for _ in range(4):
        assert not d.record_status(a, Status.UNAVAILABLE, 0)
    assert not d.is_ejected(a)


def test_unejected_on_time_with_growing_ejections() -> None:
    d = detector()
    a = ADDRS[0]
    for _ in range(5):
        d.record(a, True, 0)
    assert d.next_deadline() == 10_000  # the sweep comes first
    assert d.tick(10_000) == []
    assert d.next_deadline() == 20_000
    assert d.tick(29_999) == []
    assert d.tick(30_000) == [(a, False)]
    assert d.state(a) is State.RECOVERING
    # ejected again while recovering: 2 x 30 s
    for _ in range(5):
        d.record(a, True, 30_001)
    assert d.times_ejected(a) == 2
    assert d.tick(90_000) == []
    assert d.tick(90_001) == [(a, False)]


def test_ejection_time_capped() -> None:
    d = detector(base_ejection_ms=30_000, max_ejection_ms=60_000, interval_ms=1_000_000)
    a = ADDRS[0]
    now = 0
    for _ in range(4):
        for _ in range(5):
            d.record(a, True, now)
        until = now + min(30_000 * d.times_ejected(a), 60_000)
        assert d.tick(until - 1) == []
        assert d.tick(until) == [(a, False)]
        now = until
    assert d.times_ejected(a) == 4


def test_multiplier_decays_back_to_healthy() -> None:
    d = detector()
    a = ADDRS[0]
    for _ in range(5):
        d.record(a, True, 0)
    assert d.tick(30_000) == [(a, False)]  # back, but not decayed in the same sweep
    assert d.state(a) is State.RECOVERING and d.times_ejected(a) == 1
    d.tick(40_000)  # a whole interval back in rotation
    assert d.state(a) is State.HEALTHY and d.times_ejected(a) == 0


def test_decay_one_per_whole_interval() -> None:
    d = detector(interval_ms=10_000, base_ejection_ms=5_000)
    a = ADDRS[0]
    for _ in range(5):
        d.record(a, True, 1)
    assert d.tick(5_001) == [(a, False)]
    assert d.state(a) is State.RECOVERING and d.times_ejected(a) == 1
    d.tick(10_000)  # only 4 999 ms back in rotation
    assert d.state(a) is State.RECOVERING
    d.tick(20_000)
    assert d.state(a) is State.HEALTHY and d.times_ejected(a) == 0


@pytest.mark.parametrize(("n", "max_ejected"), [(1, 0), (2, 1), (5, 1), (10, 1), (20, 2), (40, 4)])
def test_at_most_ten_percent_at_least_one_never_the_last(n: int, max_ejected: int) -> None:
    d = OutlierDetector("c", OutlierConfig(), 0)
    addrs = [f"h{i}" for i in range(n)]
    d.update(addrs)
    for a in addrs:
        for _ in range(5):
            d.record(a, True, 0)
    assert d.ejected_count == max_ejected


def test_failure_rate_sweep() -> None:
    d = detector(n=6, consecutive_failures=0)
    for i, a in enumerate(ADDRS[:6]):
        for k in range(100):
            # host 0 fails 90 %, others 1 %; never 5 in a row for the others
            d.record(a, (k % 10 != 0) if i == 0 else (k == 50), 0)
    assert not d.is_ejected(ADDRS[0])  # consecutive detection is off
    changes = d.tick(10_000)
    assert changes == [(ADDRS[0], True)]
    assert d.state(ADDRS[0]) is State.EJECTED


def test_failure_rate_needs_volume_and_hosts() -> None:
    d = detector(n=6, consecutive_failures=0)
    for a in ADDRS[:4]:  # only 4 hosts with volume: fewer than minimum_hosts (5)
        for _ in range(100):
            d.record(a, True, 0)
    assert d.tick(10_000) == []
    d2 = detector(n=6, consecutive_failures=0)
    for a in ADDRS[:6]:
        for _ in range(49):  # below the request volume
            d2.record(a, True, 0)
    assert d2.tick(10_000) == []


def test_counters_reset_each_interval() -> None:
    d = detector(n=6, consecutive_failures=0)
    for a in ADDRS[:6]:
        for _ in range(30):
            d.record(a, a == ADDRS[0], 0)
    d.tick(10_000)
    for a in ADDRS[:6]:
        for _ in range(30):
            d.record(a, a == ADDRS[0], 10_001)
    assert d.tick(20_000) == []  # 30 + 30 would pass the volume; one interval does not


def test_membership_changes() -> None:
    d = detector(n=3)
    for _ in range(5):
        d.record(ADDRS[0], True, 0)
    assert d.ejected_count == 1
    d.update(ADDRS[1:3])
    assert d.ejected_count == 0 and not d.is_ejected(ADDRS[0])
    assert d.record("unknown", True, 0) is False


def test_late_tick_sweeps_once() -> None:
    d = detector()
    d.tick(95_000)
    assert d.next_deadline() == 100_000


def test_transition_table_missing_entry_is_an_error() -> None:
    d = detector()
    h = d._hosts[ADDRS[0]]
    with pytest.raises(OutlierError, match="no transition from HEALTHY on EJECTION_EXPIRED"):
        d._fire(h, Event.EJECTION_EXPIRED)
    # every state is reachable and every row is non-empty
    targets = {s for row in TRANSITIONS.values() for s in row.values()}
    assert set(TRANSITIONS) == set(State) and targets == set(State)


def test_diagram_is_generated_from_the_table() -> None:
    text = diagram()
    for state, row in TRANSITIONS.items():
        for event, nxt in row.items():
            assert f"{state.name} --> {nxt.name}: {event.value}" in text
    assert text.count("-->") == sum(len(r) for r in TRANSITIONS.values()) + 1


def test_set_config_keeps_state() -> None:
    d = detector()
    a = ADDRS[0]
    for _ in range(5):
        d.record(a, True, 0)
    d.set_config(OutlierConfig(consecutive_failures=2, base_ejection_ms=1_000))
    assert d.is_ejected(a) and d.tick(29_999) == []  # the running ejection keeps its end
    assert d.tick(30_000) == [(a, False)]
    b = ADDRS[1]
    assert not d.record(b, True, 30_000) and d.record(b, True, 30_000)  # the new limit: 2


def test_docs_diagram_matches_the_table() -> None:
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "governance.md").read_text()
    assert diagram() in doc, "regenerate the outlier diagram in docs/governance.md from octoproxy.governance._outlier.diagram()"


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 12),
    pct=st.sampled_from([0, 10, 30, 100]),
    consecutive=st.sampled_from([0, 1, 3, 5]),
    events=st.lists(st.tuples(st.integers(0, 11), st.booleans(), st.integers(0, 4_000), st.booleans()), max_size=300),
)
def test_invariants_over_random_traffic(n: int, pct: int, consecutive: int, events: list[tuple[int, bool, int, bool]]) -> None:
    cfg = OutlierConfig(consecutive_failures=consecutive, interval_ms=5_000, base_ejection_ms=3_000, max_ejection_ms=9_000,
                        max_ejection_percent=pct, failure_rate_request_volume=3, failure_rate_minimum_hosts=2, failure_rate_threshold=50)
    d = OutlierDetector("c", cfg, 0)
    addrs = [f"h{i}" for i in range(n)]
    d.update(addrs)
    now = 0
    for host, failed, gap, tick in events:
        now += gap
        a = addrs[host % n]
        was = d.is_ejected(a)
        ejected_now = d.record(a, failed, now)
        assert ejected_now <= (failed and not was)
        if tick:
            changes = d.tick(now)
            for addr, ej in changes:
                assert d.is_ejected(addr) == ej
            # nothing stays ejected past its end once ticked
            assert all(h.ejected_until > now for h in d._hosts.values() if h.state is State.EJECTED)
        states = [d.state(x) for x in addrs]
        count = states.count(State.EJECTED)
        assert count == d.ejected_count
        assert count <= max(1, n * pct // 100) and (count < n or n == 0)
        for h in d._hosts.values():
            if h.state is State.EJECTED:
                assert h.ejected_until - now <= cfg.max_ejection_ms


def test_restored_endpoint_is_not_judged_on_stale_counts() -> None:
    # found by the invariants property: restored and re-ejected in the same tick
    d = OutlierDetector("c", OutlierConfig(consecutive_failures=1, interval_ms=5_000, base_ejection_ms=3_000,
                                           failure_rate_request_volume=1, failure_rate_minimum_hosts=1,
                                           failure_rate_threshold=50, max_ejection_percent=50), 0)
    d.update(["a", "b"])
    assert d.record("b", True, 0)
    d.record("b", True, 100)  # a late failure while ejected
    assert d.tick(5_000) == [("b", False)]  # restored; the sweep does not re-eject it on old counts
    assert not d.is_ejected("b")
