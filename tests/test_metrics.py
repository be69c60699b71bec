"""Tests for the sans-IO metrics registry: exact exposition text, snapshot/restore."""

from __future__ import annotations

import json

import pytest

from octoproxy.common._metrics import DEFAULT_LATENCY_BUCKETS, Registry


def test_empty_registry_renders_nothing() -> None:
    assert Registry().render() == ""


def test_counter_and_gauge_rendering() -> None:
    reg = Registry()
    total = reg.counter("octo_requests_total", "Requests handled.")
    by_svc = reg.counter("octo_calls_total", "Calls by service and method.", ("service", "method"))
    conns = reg.gauge("octo_connections", "Open connections.")
    queue = reg.gauge("octo_queue_depth", "Queue depth.", ("pool",))
    reg.gauge_func("octo_uptime_seconds", "Seconds since start.", lambda: 12.5)
    total.inc()
    total.inc(2)
    child = by_svc.labels("users", "Get")
    child.inc()
    child.inc(4)
    by_svc.labels("auth", "Login").inc()
    conns.set(7)
    conns.inc()
    conns.dec(3)
    queue.labels("b").set(1.5)
    queue.labels("a").inc()
    assert reg.render() == (
        "# HELP octo_requests_total Requests handled.\n"
        "# TYPE octo_requests_total counter\n"
        "octo_requests_total 3\n"
        "# HELP octo_calls_total Calls by service and method.\n"
        "# TYPE octo_calls_total counter\n"
        'octo_calls_total{service="auth",method="Login"} 1\n'
        'octo_calls_total{service="users",method="Get"} 5\n'
        "# HELP octo_connections Open connections.\n"
        "# TYPE octo_connections gauge\n"
        "octo_connections 5\n"
        "# HELP octo_queue_depth Queue depth.\n"
        "# TYPE octo_queue_depth gauge\n"
        'octo_queue_depth{pool="a"} 1\n'
        'octo_queue_depth{pool="b"} 1.5\n'
        "# HELP octo_uptime_seconds Seconds since start.\n"
        "# TYPE octo_uptime_seconds gauge\n"
        "octo_uptime_seconds 12.5\n"
    )


def test_labelled_family_without_children_renders_only_header() -> None:
    reg = Registry()
    reg.counter("c", "h", ("x",))
    assert reg.render() == "# HELP c h\n# TYPE c counter\n"


def test_histogram_rendering_with_labels() -> None:
    reg = Registry()
    h = reg.histogram("octo_latency_seconds", "Latency.", ("service",), buckets=(0.1, 1.0))
    fast = h.labels("users")
    fast.observe(0.05)
    fast.observe(0.1)  # le is inclusive
    fast.observe(0.5)
    fast.observe(3.0)
    h.labels("auth").observe(0.25)
    assert fast.count == 4
    assert reg.render() == (
        "# HELP octo_latency_seconds Latency.\n"
        "# TYPE octo_latency_seconds histogram\n"
        'octo_latency_seconds_bucket{service="auth",le="0.1"} 0\n'
        'octo_latency_seconds_bucket{service="auth",le="1.0"} 1\n'
        'octo_latency_seconds_bucket{service="auth",le="+Inf"} 1\n'
        'octo_latency_seconds_sum{service="auth"} 0.25\n'
        'octo_latency_seconds_count{service="auth"} 1\n'
        'octo_latency_seconds_bucket{service="users",le="0.1"} 2\n'
        'octo_latency_seconds_bucket{service="users",le="1.0"} 3\n'
        'octo_latency_seconds_bucket{service="users",le="+Inf"} 4\n'
        'octo_latency_seconds_sum{service="users"} 3.65\n'
        'octo_latency_seconds_count{service="users"} 4\n'
    )


def test_unlabelled_histogram_renders_zeroes() -> None:
    reg = Registry()
    reg.histogram("h", "x", buckets=[1, 2])
    assert reg.render() == (
        "# HELP h x\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 0\nh_bucket{le="2.0"} 0\nh_bucket{le="+Inf"} 0\n'
        "h_sum 0.0\nh_count 0\n"
    )


def test_default_buckets_span_50us_to_10s() -> None:
    assert DEFAULT_LATENCY_BUCKETS[0] == 0.00005
    assert DEFAULT_LATENCY_BUCKETS[-1] == 10.0
    assert list(DEFAULT_LATENCY_BUCKETS) == sorted(set(DEFAULT_LATENCY_BUCKETS))


def test_label_and_help_escaping() -> None:
    reg = Registry()
    reg.counter("c", 'help with \\ and\nnewline and "quotes"', ("v",)).labels('a\\b"c\nd').inc()
    assert reg.render() == (
        '# HELP c help with \\\\ and\\nnewline and "quotes"\n'
        "# TYPE c counter\n"
        'c{v="a\\\\b\\"c\\nd"} 1\n'
    )


def test_gauge_func_is_evaluated_at_render_and_errors_become_nan() -> None:
    reg = Registry()
    box = [1.0]
    reg.gauge_func("g", "x", lambda: box[0])
    assert reg.render().endswith("g 1.0\n")
    box[0] = 2.0
    assert reg.render().endswith("g 2.0\n")

    def broken() -> float:
        raise RuntimeError("boom")

    reg.gauge_func("g", "x", broken)  # re-registration re-points the callback
    assert reg.render().endswith("g NaN\n")


def test_children_are_cached() -> None:
    c = Registry().counter("c", "h", ("a", "b"))
    assert c.labels("x", "y") is c.labels("x", "y")
    assert c.labels("x", "y") is not c.labels("y", "x")


def test_reregistration_rules() -> None:
    reg = Registry()
    c = reg.counter("c", "h", ("a",))
    assert reg.counter("c", "other help", ["a"]) is c
    with pytest.raises(ValueError):
        reg.counter("c", "h", ("b",))
    with pytest.raises(ValueError):
        reg.gauge("c", "h", ("a",))
    with pytest.raises(ValueError):
        reg.histogram("c", "h", ("a",))
    h = reg.histogram("h", "x", buckets=(1.0, 2.0))
    assert reg.histogram("h", "x", buckets=(1, 2)) is h
    with pytest.raises(ValueError):
        reg.histogram("h", "x", buckets=(1.0, 3.0))
    reg.gauge_func("f", "x", lambda: 1.0)
    with pytest.raises(ValueError):
        reg.gauge("f", "x")


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.counter("bad name", "h"),
        lambda r: r.counter("c", "h", ("__reserved",)),
        lambda r: r.counter("c", "h", ("a", "a")),
        lambda r: r.histogram("h", "x", ("le",)),
        lambda r: r.histogram("h", "x", buckets=(2.0, 1.0)),
        lambda r: r.histogram("h", "x", buckets=()),
    ],
)
def test_invalid_definitions(call: object) -> None:
    with pytest.raises(ValueError):
        call(Registry())  # type: ignore[operator]


def test_misuse_of_labels() -> None:
    reg = Registry()
    c = reg.counter("c", "h", ("a",))
    with pytest.raises(ValueError):
        c.inc()  # labelled family has no default child
    with pytest.raises(ValueError):
        c.labels("x", "y")
    with pytest.raises(TypeError):
        c.labels(200)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.labels("x").inc(-1)


def _populate(reg: Registry) -> None:
    reg.counter("req", "r", ("svc",)).labels("a").inc(3)
    reg.counter("plain", "p").inc(2)
    h = reg.histogram("lat", "l", ("svc",), buckets=(0.1, 1.0))
    h.labels("a").observe(0.05)
    h.labels("a").observe(5.0)
    reg.gauge("conns", "c").set(9)


def test_snapshot_is_json_and_excludes_gauges() -> None:
    reg = Registry()
    _populate(reg)
    snap = json.loads(json.dumps(reg.snapshot()))
    assert [m["name"] for m in snap["metrics"]] == ["req", "plain", "lat"]
    assert snap["metrics"][2]["samples"] == [{"labels": ["a"], "counts": [1, 0, 1], "sum": 5.05}]


def test_restore_adds_into_existing_and_creates_unknown() -> None:
    old = Registry()
    _populate(old)
    snap = json.loads(json.dumps(old.snapshot()))

    new = Registry()
    new.counter("req", "r", ("svc",)).labels("a").inc(1)
    new.gauge("conns", "c").set(1)
    new.restore(snap)
    new.restore(snap)  # twice: values add up
    assert new.counter("req", "r", ("svc",)).labels("a").value == 7
    assert new.counter("plain", "p").labels().value == 4
    lat = new.histogram("lat", "l", ("svc",), buckets=(0.1, 1.0)).labels("a")
    assert lat.counts == [2, 0, 2]
    assert lat.sum == pytest.approx(10.1)
    assert 'conns 1\n' in new.render()


def test_restore_rebins_histograms_with_other_buckets() -> None:
    old = Registry()
    h = old.histogram("lat", "l", buckets=(0.1, 0.3, 1.0))
    for v in (0.05, 0.2, 0.9, 2.0):
        h.observe(v)
    new = Registry()
    nh = new.histogram("lat", "l", buckets=(0.25, 1.0))
    new.restore(old.snapshot())
    # 0.1 -> 0.25, 0.3 -> 1.0 (never a smaller bound), 1.0 -> 1.0, +Inf -> +Inf
    assert nh.labels().counts == [1, 2, 1]


def test_restore_rejects_conflicts_without_adding_anything() -> None:
    old = Registry()
    old.counter("a", "x").inc(5)
    old.counter("b", "x", ("svc",)).labels("s").inc()
    new = Registry()
    a = new.counter("a", "x")
    new.gauge("b", "x", ("svc",))
    with pytest.raises(ValueError):
        new.restore(old.snapshot())
    assert a.labels().value == 0
    with pytest.raises(ValueError):
        new.restore({"version": 99, "metrics": []})
    with pytest.raises(ValueError):
        new.restore({"version": 1, "metrics": [{"name": "a"}]})
