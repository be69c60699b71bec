"""The policy model: one parser for TOML and control-plane resources, every error at once."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.protocol._errors import ConfigError
from octoproxy.protocol._protocol import Status
from octoproxy.governance import (
    BreakerLimits,
    Direction,
    LocalityMode,
    OutlierConfig,
    PolicyError,
    RetryPolicy,
    parse_policy_set,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FULL = """
[governance]
version = "42"

[governance.services.echo.routing]
locality = "enforce"
rules = [
  { name = "blue", method = "Get*", match_metadata = { swimlane = "blue" }, endpoint_tags = { swimlane = "blue" }, force = true },
  { name = "drain", weight_overrides = { "10.0.0.1:9000" = 0 } },
]
slow_start = { window = 30.0, aggression = 2.0, min_weight_percent = 5.0 }

[governance.services.echo.outlier]
consecutive_failures = 3
base_ejection_time = 10.0

[governance.services.echo.breaker]
max_requests = 100

[governance.services.echo.retry]
max_attempts = 3
idempotent_methods = ["Get*"]
retry_on = ["unavailable"]
per_try_timeout = 0.25
budget = { ratio = 0.1, min_per_second = 5.0, window = 20.0 }

[[governance.services.echo.rate_limits]]
name = "per-caller"
caller = "*"
rate = 100.0

[[governance.services.echo.rate_limits]]
name = "quota"
direction = "outbound"
method = "Put"
cluster_rate = 1000.0
burst = 50.0

[governance.services.echo.tracing]
sampled = false

[governance.services.echo.access_log]
sample_rate = 0.01

[governance.services.bare.breaker]
"""


def test_full_toml_round() -> None:
    ps = parse_policy_set(tomllib.loads(FULL)["governance"])
    assert ps.version == "42" and set(ps.services) == {"echo", "bare"}
    p = ps.for_service("echo")
    assert p is not None and not p.empty
    assert p.routing is not None and p.routing.locality is LocalityMode.ENFORCE
    blue, drain = p.routing.rules
    assert (blue.name, blue.service, blue.method, blue.force) == ("blue", "echo", "Get*", True)
    assert blue.match_metadata == (("swimlane", "blue"),) and blue.endpoint_tags == (("swimlane", "blue"),)
    assert dict(drain.weight_overrides) == {"10.0.0.1:9000": 0}
    assert p.routing.slow_start.window_ms == 30_000 and p.routing.slow_start.aggression == 2.0
    assert p.outlier == OutlierConfig(consecutive_failures=3, base_ejection_ms=10_000)
    assert p.breaker == BreakerLimits(max_requests=100)
    assert p.retry is not None and p.retry.max_attempts == 3 and p.retry.per_try_timeout_ms == 250
    assert p.retry.retry_on == frozenset({Status.UNAVAILABLE}) and p.retry.is_idempotent("GetX")
    assert (p.retry.budget.ratio, p.retry.budget.min_per_second, p.retry.budget.window_ms) == (0.1, 5.0, 20_000)
    lim, quota = p.rate_limits
    assert lim.direction is Direction.INBOUND and lim.caller == "*" and lim.rate == 100.0 and lim.service == "echo"
    assert quota.direction is Direction.OUTBOUND and quota.cluster_rate == 1000.0 and quota.burst == 50.0
    assert p.tracing is not None and not p.tracing.sampled
    assert p.access_log is not None and p.access_log.sample_rate == 0.01
    bare = ps.for_service("bare")
    assert bare is not None and bare.breaker == BreakerLimits()  # an empty section: the defaults
    assert ps.for_service("nope") is None


def test_same_parser_for_a_control_plane_resource() -> None:
    # what a control plane would send as a JSON body: the same mapping shape
    body = {"version": "7", "services": {"pay": {"retry": {}, "outlier": {}}}}
    ps = parse_policy_set(body, prefix="resource")
    p = ps.services["pay"]
    assert p.retry == RetryPolicy() and p.outlier == OutlierConfig()


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({"bogus": 1}, ["governance.bogus: unknown key"]),
        ({"services": {"s": {"routng": {}}}}, ["governance.services.s.routng: unknown key"]),
        ({"services": {"s": {"breaker": {"max_requests": -1}}}}, ["governance.services.s.breaker.max_requests: expected 0.."]),
        ({"services": {"s": {"breaker": {"max_requests": True}}}}, ["governance.services.s.breaker.max_requests: expected an integer"]),
        ({"services": {"s": {"retry": {"retry_on": ["teapot"]}}}}, ["governance.services.s.retry.retry_on[0]: expected one of"]),
        ({"services": {"s": {"retry": {"per_try_timeout": "1s"}}}}, ["governance.services.s.retry.per_try_timeout: expected a number"]),
        ({"services": {"s": {"retry": {"idempotent_methods": ["G*et"]}}}}, ["governance.services.s.retry.idempotent_methods[0]: '*' may only end"]),
        ({"services": {"s": {"routing": {"locality": "near"}}}}, ["governance.services.s.routing.locality: expected one of off, prefer, enforce"]),
        ({"services": {"s": {"routing": {"rules": [{"name": "a"}, {"name": "a"}]}}}}, ["governance.services.s.routing.rules[1].name: duplicate"]),
        ({"services": {"s": {"routing": {"rules": [{"endpoint_tags": {"k": 1}}]}}}}, ["governance.services.s.routing.rules[0].endpoint_tags.k: expected a string"]),
        ({"services": {"s": {"routing": {"slow_start": {"aggression": 0}}}}}, ["governance.services.s.routing.slow_start.aggression: expected a number > 0"]),
        ({"services": {"s": {"outlier": {"max_ejection_time": 1.0}}}}, ["governance.services.s.outlier.max_ejection_time: must not be less"]),
        ({"services": {"s": {"outlier": {"interval": 0}}}}, ["governance.services.s.outlier.interval: expected a number > 0"]),
        ({"services": {"s": {"rate_limits": [{"name": "x"}]}}}, ["governance.services.s.rate_limits[0]: set exactly one of rate and cluster_rate"]),
        ({"services": {"s": {"rate_limits": [{"rate": 1.0, "cluster_rate": 2.0}]}}}, ["governance.services.s.rate_limits[0]: set exactly one"]),
        ({"services": {"s": {"rate_limits": [{"rate": 1.0, "direction": "outbound", "caller": "a"}]}}}, ["governance.services.s.rate_limits[0].caller: only inbound"]),
        ({"services": {"s": {"access_log": {"sample_rate": 1.5}}}}, ["governance.services.s.access_log.sample_rate: expected a number >= 0 and <= 1"]),
        ({"services": {"s": {"tracing": {"enabled": "yes"}}}}, ["governance.services.s.tracing.enabled: expected true or false"]),
        ({"services": {"s": 3}}, ["governance.services.s: expected a table"]),
        ({"version": 3}, ["governance.version: expected a string"]),
    ],
)
def test_each_error_names_its_key(data: dict[str, object], errors: list[str]) -> None:
    with pytest.raises(PolicyError) as ei:
        parse_policy_set(data)
    assert len(ei.value.errors) == len(errors)
    for got, want in zip(ei.value.errors, errors):
        assert got.startswith(want), got
    assert isinstance(ei.value, ConfigError)


def test_every_error_is_reported_at_once() -> None:
    data = {
        "version": "1",
        "extra": True,
        "services": {
            "a": {"breaker": {"max_pending": "lots", "max_retries": -3}, "retry": {"max_attempts": 0}},
            "b": {"outlier": {"max_ejection_percent": 101, "unknown": 1}, "tracing": {"sampled": 1}},
        },
    }
    with pytest.raises(PolicyError) as ei:
        parse_policy_set(data)
    keys = [e.split(":")[0] for e in ei.value.errors]
    assert keys == [
        "governance.extra",
        "governance.services.a.breaker.max_pending",
        "governance.services.a.breaker.max_retries",
        "governance.services.a.retry.max_attempts",
        "governance.services.b.outlier.unknown",
        "governance.services.b.outlier.max_ejection_percent",
        "governance.services.b.tracing.sampled",
    ]
    assert str(ei.value).count("\n") == len(keys) - 1


def test_absent_or_disabled_sections_are_off() -> None:
    ps = parse_policy_set({"services": {"s": {"outlier": {"enabled": False}, "tracing": {"enabled": False}, "access_log": {"sample_rate": 0.0}}}})
    assert ps.services == {}  # nothing governed: the route keeps the fast path
    assert parse_policy_set({}).version == ""


def test_disabled_section_is_still_validated() -> None:
    with pytest.raises(PolicyError, match="outlier.interval"):
        parse_policy_set({"services": {"s": {"outlier": {"enabled": False, "interval": -1}}}})


def test_dump_round_trips() -> None:
    import json

    from octoproxy.governance import dump_policy_set

    ps = parse_policy_set(tomllib.loads(FULL)["governance"])
    data = dump_policy_set(ps)
    assert parse_policy_set(json.loads(json.dumps(data))) == ps  # JSON-able, and equal after the trip
    assert data["services"]["bare"] == {"breaker": {"max_connections": 1024, "max_pending": 1024, "max_requests": 1024, "max_retries": 3}}


_secs = st.integers(10, 600_000).map(lambda ms: ms / 1000)
_section = st.fixed_dictionaries(
    {},
    optional={
        "routing": st.fixed_dictionaries({}, optional={
            "locality": st.sampled_from(["off", "prefer", "enforce"]),
            "rules": st.lists(st.fixed_dictionaries({"name": st.uuids().map(str)}, optional={
                "method": st.sampled_from(["", "*", "Get*", "Put"]),
                "match_metadata": st.dictionaries(st.sampled_from(["lane", "env"]), st.text("ab", min_size=1, max_size=2)),
                "endpoint_tags": st.dictionaries(st.sampled_from(["lane", "env"]), st.text("ab", min_size=1, max_size=2)),
                "weight_overrides": st.dictionaries(st.sampled_from(["a:1", "b:2"]), st.integers(0, 1000)),
                "force": st.booleans(),
                "timeout": _secs,
            }), max_size=3, unique_by=lambda r: r["name"]),
            "slow_start": st.fixed_dictionaries({}, optional={"window": _secs, "aggression": st.sampled_from([0.5, 1.0, 3.0]),
                                                              "min_weight_percent": st.sampled_from([0.0, 10.0, 100.0])}),
        }),
        "outlier": st.fixed_dictionaries({}, optional={"consecutive_failures": st.integers(0, 50), "interval": _secs,
                                                       "max_ejection_percent": st.integers(0, 100)}),
        "breaker": st.fixed_dictionaries({}, optional={"max_requests": st.integers(0, 5000), "max_retries": st.integers(0, 10)}),
        "retry": st.fixed_dictionaries({}, optional={
            "max_attempts": st.integers(1, 10),
            "idempotent_methods": st.lists(st.sampled_from(["Get*", "Ping", "*"]), max_size=3),
            "retry_on": st.lists(st.sampled_from(["unavailable", "timeout", "overloaded"]), max_size=3),
            "per_try_timeout": _secs,
            "budget": st.fixed_dictionaries({}, optional={"ratio": st.sampled_from([0.0, 0.2, 1.5]), "window": _secs}),
        }),
        "rate_limits": st.lists(st.builds(
            lambda i, d, rate, cl: {"name": f"l{i}", "direction": d, **({"cluster_rate": rate} if cl else {"rate": rate})},
            st.integers(0, 3), st.just("inbound"), st.sampled_from([0.5, 10.0, 1e6]), st.booleans()),
            max_size=3, unique_by=lambda r: r["name"]),
        "tracing": st.fixed_dictionaries({}, optional={"sampled": st.booleans()}),
        "access_log": st.fixed_dictionaries({"sample_rate": st.sampled_from([0.5, 1.0])}),
    },
)


@settings(max_examples=100, deadline=None)
@given(services=st.dictionaries(st.sampled_from(["echo", "pay", "user"]), _section, max_size=3), version=st.text(max_size=5))
def test_parse_dump_parse_is_identity(services: dict[str, object], version: str) -> None:
    from octoproxy.governance import dump_policy_set

    ps = parse_policy_set({"version": version, "services": services})
    assert parse_policy_set(dump_policy_set(ps)) == ps


def test_the_documented_example_parses() -> None:
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "governance.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    ps = parse_policy_set(tomllib.loads(block)["governance"])
    p = ps.services["echo"]
    assert ps.version == "42" and p.routing is not None and p.outlier == OutlierConfig() and p.breaker == BreakerLimits()
    assert [r.name for r in p.routing.rules] == ["blue", "drain-a"] and p.routing.rules[0].timeout_ms == 500
    assert p.retry is not None and len(p.rate_limits) == 1 and p.tracing is not None and p.access_log is None
