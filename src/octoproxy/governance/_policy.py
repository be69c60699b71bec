"""The governance policy model: typed, validated, versioned (sans-IO).

One parser for both sources: the proxy's TOML ``[governance]`` table and a
control-plane policy resource decode to the same plain mapping, and
:func:`parse_policy_set` turns it into a frozen :class:`PolicySet`. Every
problem is collected and reported at once in one :class:`PolicyError`, each
line starting with the full key (``services.echo.retry.max_attempts: ...``);
an unknown key is an error. A section that is absent is a policy that is off,
so a route pays only for what it configures. Durations are seconds in the
input and integer milliseconds in the cores.

Shape (TOML)::

    [governance]
    version = "42"
    [governance.services.echo.routing]
    locality = "prefer"                    # off | prefer | enforce
    slow_start = { window = 30.0, aggression = 1.0, min_weight_percent = 10.0 }
    [[governance.services.echo.routing.rules]]
    name = "blue"
    method = "Get*"
    match_metadata = { swimlane = "blue" }
    endpoint_tags = { swimlane = "blue" }
    [governance.services.echo.outlier]     # Envoy's defaults when present
    [governance.services.echo.breaker]     # max_connections, max_pending, max_requests, max_retries
    [governance.services.echo.retry]       # max_attempts, idempotent_methods, retry_on, per_try_timeout, budget
    [[governance.services.echo.rate_limits]]
    name = "per-caller"
    caller = "*"
    rate = 100.0
    [governance.services.echo.tracing]     # enabled, sampled
    [governance.services.echo.access_log]  # sample_rate (0 = off)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..protocol._errors import ConfigError
from ..protocol._protocol import Status
from ._breaker import BreakerLimits
from ._outlier import OutlierConfig
from ._ratelimit import Direction, RateLimitRule
from ._retry import BudgetConfig, RetryPolicy
from ._routing import LocalityMode, RouteRule, RoutingPolicy, SlowStart
from ._trace import TraceConfig

__all__ = ["AccessLogConfig", "ServicePolicy", "PolicySet", "PolicyError", "parse_policy_set", "dump_policy_set"]

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """The structured access log (JSON lines).

    Attributes:
        sample_rate: share of calls logged, 0.0 (off) to 1.0.
    """

    sample_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Everything governed for one callee service; ``None`` / empty = that policy is off."""

    service: str
    routing: RoutingPolicy | None = None
    outlier: OutlierConfig | None = None
    breaker: BreakerLimits | None = None
    retry: RetryPolicy | None = None
    rate_limits: tuple[RateLimitRule, ...] = ()
    tracing: TraceConfig | None = None
    access_log: AccessLogConfig | None = None

    @property
    def empty(self) -> bool:
        """True when nothing is governed (the route keeps the fast path)."""
        return (
            self.routing is None
            and self.outlier is None
            and self.breaker is None
            and self.retry is None
            and not self.rate_limits
            and self.tracing is None
            and self.access_log is None
        )


@dataclass(frozen=True, slots=True)
class PolicySet:
    """A versioned set of service policies.

    Attributes:
        version: opaque; equal versions mean equal content.
        services: service name -> its policy.
    """

    version: str = ""
    services: Mapping[str, ServicePolicy] = field(default_factory=dict)

    def for_service(self, service: str) -> ServicePolicy | None:
        """The policy of ``service``, or ``None`` when it has none."""
        return self.services.get(service)


class PolicyError(ConfigError):
    """One or more invalid policy keys; ``errors`` lists them all, each naming its key."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = tuple(errors)


class _Reader:
    """Reads typed values out of nested mappings, collecting every error."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{key}: {msg}")

    def table(self, v: object, key: str, allowed: tuple[str, ...]) -> Mapping[str, object] | None:
        if not isinstance(v, Mapping):
            self.err(key, f"expected a table, got {v!r}")
            return None
        for k in v:
            if k not in allowed:
                self.err(f"{key}.{k}", "unknown key")
        return v

    def integer(self, t: Mapping[str, object], key: str, name: str, default: int, lo: int, hi: int | None = None) -> int:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(f"{key}.{name}", f"expected an integer, got {v!r}")
            return default
        if v < lo or (hi is not None and v > hi):
            self.err(f"{key}.{name}", f"expected {lo}..{hi if hi is not None else ''}, got {v}")
            return default
        return v

    def number(self, t: Mapping[str, object], key: str, name: str, default: float, lo: float, hi: float | None = None, *, lo_open: bool = False) -> float:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.err(f"{key}.{name}", f"expected a number, got {v!r}")
            return default
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            rng = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
            self.err(f"{key}.{name}", f"expected a number {rng}, got {v!r}")
            return default
        return float(v)

    def millis(self, t: Mapping[str, object], key: str, name: str, default_ms: int, *, allow_zero: bool = False) -> int:
        s = self.number(t, key, name, default_ms / 1000.0, 0.0, 86_400.0 * 365, lo_open=not allow_zero)
        return round(s * 1000)

    def boolean(self, t: Mapping[str, object], key: str, name: str, default: bool) -> bool:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.err(f"{key}.{name}", f"expected true or false, got {v!r}")
            return default
        return v

    def string(self, t: Mapping[str, object], key: str, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, str):
            self.err(f"{key}.{name}", f"expected a string, got {v!r}")
            return default
        if choices and v not in choices:
            self.err(f"{key}.{name}", f"expected one of {', '.join(choices)}, got {v!r}")
            return default
        return v

    def pattern(self, t: Mapping[str, object], key: str, name: str) -> str:
        p = self.string(t, key, name, "")
        if "*" in p[:-1]:
            self.err(f"{key}.{name}", f"'*' may only end a pattern, got {p!r}")
            return ""
        return p

    def pairs(self, t: Mapping[str, object], key: str, name: str) -> tuple[tuple[str, str], ...]:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return ()
        if not isinstance(v, Mapping):
            self.err(f"{key}.{name}", f"expected a table of strings, got {v!r}")
            return ()
        out = []
        for k, x in v.items():
            if not isinstance(k, str) or not k or not isinstance(x, str):
                self.err(f"{key}.{name}.{k}", f"expected a string, got {x!r}")
            else:
                out.append((k, x))
        return tuple(sorted(out))

    def strings(self, t: Mapping[str, object], key: str, name: str) -> tuple[str, ...]:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return ()
        if not isinstance(v, (list, tuple)):
            self.err(f"{key}.{name}", f"expected an array of strings, got {v!r}")
            return ()
        out = []
        for i, x in enumerate(v):
            if not isinstance(x, str) or not x:
                self.err(f"{key}.{name}[{i}]", f"expected a non-empty string, got {x!r}")
            else:
                out.append(x)
        return tuple(out)

    def array(self, t: Mapping[str, object], key: str, name: str) -> list[object]:
        v = t.get(name, _MISSING)
        if v is _MISSING:
            return []
        if not isinstance(v, (list, tuple)):
            self.err(f"{key}.{name}", f"expected an array of tables, got {v!r}")
            return []
        return list(v)


_SERVICE_KEYS = ("routing", "outlier", "breaker", "retry", "rate_limits", "tracing", "access_log")


def _routing(r: _Reader, v: object, key: str, service: str) -> RoutingPolicy | None:
    t = r.table(v, key, ("locality", "same_region_factor", "other_region_factor", "rules", "slow_start"))
    if t is None:
        return None
    mode = r.string(t, key, "locality", "prefer", tuple(m.value for m in LocalityMode))
    rules = []
    names: set[str] = set()
    for i, rv in enumerate(r.array(t, key, "rules")):
        rk = f"{key}.rules[{i}]"
        rt = r.table(rv, rk, ("name", "method", "match_metadata", "endpoint_tags", "weight_overrides", "force", "timeout"))
        if rt is None:
            continue
        name = r.string(rt, rk, "name", f"rule{i}")
        if name in names:
            r.err(f"{rk}.name", f"duplicate rule name {name!r}")
        names.add(name)
        overrides: dict[str, int] = {}
        wo = rt.get("weight_overrides", {})
        if not isinstance(wo, Mapping):
            r.err(f"{rk}.weight_overrides", f"expected a table of integers, got {wo!r}")
        else:
            for addr in wo:
                overrides[str(addr)] = r.integer(wo, f"{rk}.weight_overrides", addr, 0, 0, 1_000_000)
        rules.append(
            RouteRule(
                name=name,
                service=service,
                method=r.pattern(rt, rk, "method"),
                match_metadata=r.pairs(rt, rk, "match_metadata"),
                endpoint_tags=r.pairs(rt, rk, "endpoint_tags"),
                weight_overrides=overrides,
                force=r.boolean(rt, rk, "force", False),
                timeout_ms=r.millis(rt, rk, "timeout", 0, allow_zero=True),
            )
        )
    slow = SlowStart()
    if "slow_start" in t:
        sk = f"{key}.slow_start"
        st = r.table(t["slow_start"], sk, ("window", "aggression", "min_weight_percent", "step"))
        if st is not None:
            slow = SlowStart(
                window_ms=r.millis(st, sk, "window", 0, allow_zero=True),
                aggression=r.number(st, sk, "aggression", 1.0, 0.0, 100.0, lo_open=True),
                min_weight_percent=r.number(st, sk, "min_weight_percent", 10.0, 0.0, 100.0),
                step_ms=r.millis(st, sk, "step", 1000),
            )
    return RoutingPolicy(
        rules=tuple(rules),
        locality=LocalityMode(mode),
        same_region_factor=r.number(t, key, "same_region_factor", 0.001, 0.0, 1.0),
        other_region_factor=r.number(t, key, "other_region_factor", 0.000001, 0.0, 1.0),
        slow_start=slow,
    )


def _outlier(r: _Reader, v: object, key: str) -> OutlierConfig | None:
    names = (
        "enabled", "consecutive_failures", "interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent",
        "failure_rate_threshold", "failure_rate_minimum_hosts", "failure_rate_request_volume",
    )  # fmt: skip
    t = r.table(v, key, names)
    if t is None:
        return None
    enabled = r.boolean(t, key, "enabled", True)
    d = OutlierConfig()
    cfg = OutlierConfig(
        consecutive_failures=r.integer(t, key, "consecutive_failures", d.consecutive_failures, 0, 1_000_000),
        interval_ms=r.millis(t, key, "interval", d.interval_ms),
        base_ejection_ms=r.millis(t, key, "base_ejection_time", d.base_ejection_ms),
        max_ejection_ms=r.millis(t, key, "max_ejection_time", d.max_ejection_ms),
        max_ejection_percent=r.integer(t, key, "max_ejection_percent", d.max_ejection_percent, 0, 100),
        failure_rate_threshold=r.integer(t, key, "failure_rate_threshold", d.failure_rate_threshold, 0, 100),
        failure_rate_minimum_hosts=r.integer(t, key, "failure_rate_minimum_hosts", d.failure_rate_minimum_hosts, 1, 1_000_000),
        failure_rate_request_volume=r.integer(t, key, "failure_rate_request_volume", d.failure_rate_request_volume, 1, 1 << 31),
    )
    if cfg.max_ejection_ms < cfg.base_ejection_ms:
        r.err(f"{key}.max_ejection_time", "must not be less than base_ejection_time")
    return cfg if enabled else None


def _breaker(r: _Reader, v: object, key: str) -> BreakerLimits | None:
    t = r.table(v, key, ("max_connections", "max_pending", "max_requests", "max_retries"))
    if t is None:
        return None
    d = BreakerLimits()
    return BreakerLimits(
        max_connections=r.integer(t, key, "max_connections", d.max_connections, 0, 1 << 31),
        max_pending=r.integer(t, key, "max_pending", d.max_pending, 0, 1 << 31),
        max_requests=r.integer(t, key, "max_requests", d.max_requests, 0, 1 << 31),
        max_retries=r.integer(t, key, "max_retries", d.max_retries, 0, 1 << 31),
    )


_RETRY_ON = {"unavailable": Status.UNAVAILABLE, "timeout": Status.TIMEOUT, "overloaded": Status.OVERLOADED}


def _retry(r: _Reader, v: object, key: str) -> RetryPolicy | None:
    t = r.table(v, key, ("max_attempts", "idempotent_methods", "retry_on", "per_try_timeout", "min_try_time", "budget"))
    if t is None:
        return None
    d = RetryPolicy()
    retry_on = d.retry_on
    if "retry_on" in t:
        got = []
        for i, s in enumerate(r.strings(t, key, "retry_on")):
            if s not in _RETRY_ON:
                r.err(f"{key}.retry_on[{i}]", f"expected one of {', '.join(_RETRY_ON)}, got {s!r}")
            else:
                got.append(_RETRY_ON[s])
        retry_on = frozenset(got)
    methods = r.strings(t, key, "idempotent_methods")
    for i, m in enumerate(methods):
        if "*" in m[:-1]:
            r.err(f"{key}.idempotent_methods[{i}]", f"'*' may only end a pattern, got {m!r}")
    budget = d.budget
    if "budget" in t:
        bk = f"{key}.budget"
        bt = r.table(t["budget"], bk, ("ratio", "min_per_second", "window"))
        if bt is not None:
            bd = BudgetConfig()
            budget = BudgetConfig(
                ratio=r.number(bt, bk, "ratio", bd.ratio, 0.0, 1000.0),
                min_per_second=r.number(bt, bk, "min_per_second", bd.min_per_second, 0.0, 1e9),
                window_ms=r.millis(bt, bk, "window", bd.window_ms),
            )
            if budget.window_ms < budget.buckets:
                r.err(f"{bk}.window", f"must be at least {budget.buckets} ms")
    return RetryPolicy(
        max_attempts=r.integer(t, key, "max_attempts", d.max_attempts, 1, 10),
        idempotent_methods=methods,
        retry_on=retry_on,
        per_try_timeout_ms=r.millis(t, key, "per_try_timeout", d.per_try_timeout_ms, allow_zero=True),
        min_try_ms=r.millis(t, key, "min_try_time", d.min_try_ms, allow_zero=True),
        budget=budget,
    )


def _rate_limits(r: _Reader, t: Mapping[str, object], key: str, service: str) -> tuple[RateLimitRule, ...]:
    out = []
    names: set[str] = set()
    for i, v in enumerate(r.array(t, key, "rate_limits")):
        k = f"{key}.rate_limits[{i}]"
        rt = r.table(v, k, ("name", "direction", "method", "caller", "rate", "cluster_rate", "burst"))
        if rt is None:
            continue
        name = r.string(rt, k, "name", f"limit{i}")
        if name in names:
            r.err(f"{k}.name", f"duplicate rate limit name {name!r}")
        names.add(name)
        direction = Direction(r.string(rt, k, "direction", "inbound", tuple(d.value for d in Direction)))
        caller = r.string(rt, k, "caller", "")
        if caller and direction is Direction.OUTBOUND:
            r.err(f"{k}.caller", "only inbound limits match on the caller")
        rate = r.number(rt, k, "rate", 0.0, 0.0, 1e9)
        cluster_rate = r.number(rt, k, "cluster_rate", 0.0, 0.0, 1e9)
        if (rate > 0) == (cluster_rate > 0):
            r.err(k, "set exactly one of rate and cluster_rate (> 0)")
        out.append(
            RateLimitRule(
                name=name,
                direction=direction,
                service=service,
                method=r.pattern(rt, k, "method"),
                caller=caller,
                rate=rate,
                cluster_rate=cluster_rate,
                burst=r.number(rt, k, "burst", 0.0, 0.0, 1e12),
            )
        )
    return tuple(out)


def _service(r: _Reader, v: object, key: str, service: str) -> ServicePolicy | None:
    t = r.table(v, key, _SERVICE_KEYS)
    if t is None:
        return None
    # parsed in a fixed order, so errors come out in a stable order
    routing = _routing(r, t["routing"], f"{key}.routing", service) if "routing" in t else None
    outlier = _outlier(r, t["outlier"], f"{key}.outlier") if "outlier" in t else None
    breaker = _breaker(r, t["breaker"], f"{key}.breaker") if "breaker" in t else None
    retry = _retry(r, t["retry"], f"{key}.retry") if "retry" in t else None
    rate_limits = _rate_limits(r, t, key, service)
    tracing = None
    if "tracing" in t:
        tk = f"{key}.tracing"
        tt = r.table(t["tracing"], tk, ("enabled", "sampled"))
        if tt is not None and r.boolean(tt, tk, "enabled", True):
            tracing = TraceConfig(enabled=True, sampled=r.boolean(tt, tk, "sampled", True))
    access_log = None
    if "access_log" in t:
        ak = f"{key}.access_log"
        at = r.table(t["access_log"], ak, ("sample_rate",))
        if at is not None:
            rate = r.number(at, ak, "sample_rate", 0.0, 0.0, 1.0)
            access_log = AccessLogConfig(rate) if rate > 0 else None
    return ServicePolicy(
        service=service,
        routing=routing,
        outlier=outlier,
        breaker=breaker,
        retry=retry,
        rate_limits=rate_limits,
        tracing=tracing,
        access_log=access_log,
    )


def parse_policy_set(data: Mapping[str, object], *, prefix: str = "governance") -> PolicySet:
    """Parse and validate a policy set.

    Args:
        data: the ``[governance]`` table of the proxy's TOML, or the decoded
            body of a control-plane policy resource (same shape).
        prefix: the key path of ``data`` in error messages.

    Returns:
        The frozen policy set.

    Raises:
        PolicyError: listing every invalid, missing-typed or unknown key at once.
    """
    r = _Reader()
    t = r.table(data, prefix, ("version", "services"))
    services: dict[str, ServicePolicy] = {}
    version = ""
    if t is not None:
        version = r.string(t, prefix, "version", "")
        sv = t.get("services", {})
        if not isinstance(sv, Mapping):
            r.err(f"{prefix}.services", f"expected a table of services, got {sv!r}")
        else:
            for name, v in sv.items():
                if not isinstance(name, str) or not name:
                    r.err(f"{prefix}.services", f"service names must be non-empty strings, got {name!r}")
                    continue
                p = _service(r, v, f"{prefix}.services.{name}", name)
                if p is not None and not p.empty:
                    services[name] = p
    if r.errors:
        raise PolicyError(r.errors)
    return PolicySet(version=version, services=services)


def _s(ms: int) -> float:
    return ms / 1000.0


def _dump_service(p: ServicePolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.routing is not None:
        ro = p.routing
        rules = []
        for r in ro.rules:
            rules.append({
                "name": r.name,
                "method": r.method,
                "match_metadata": dict(r.match_metadata),
                "endpoint_tags": dict(r.endpoint_tags),
                "weight_overrides": dict(r.weight_overrides),
                "force": r.force,
                "timeout": _s(r.timeout_ms),
            })  # fmt: skip
        sl = ro.slow_start
        out["routing"] = {
            "locality": ro.locality.value,
            "same_region_factor": ro.same_region_factor,
            "other_region_factor": ro.other_region_factor,
            "rules": rules,
            "slow_start": {"window": _s(sl.window_ms), "aggression": sl.aggression,
                           "min_weight_percent": sl.min_weight_percent, "step": _s(sl.step_ms)},
        }  # fmt: skip
    if p.outlier is not None:
        o = p.outlier
        out["outlier"] = {
            "consecutive_failures": o.consecutive_failures,
            "interval": _s(o.interval_ms),
            "base_ejection_time": _s(o.base_ejection_ms),
            "max_ejection_time": _s(o.max_ejection_ms),
            "max_ejection_percent": o.max_ejection_percent,
            "failure_rate_threshold": o.failure_rate_threshold,
            "failure_rate_minimum_hosts": o.failure_rate_minimum_hosts,
            "failure_rate_request_volume": o.failure_rate_request_volume,
        }
    if p.breaker is not None:
        b = p.breaker
        out["breaker"] = {"max_connections": b.max_connections, "max_pending": b.max_pending,
                          "max_requests": b.max_requests, "max_retries": b.max_retries}  # fmt: skip
    if p.retry is not None:
        rt = p.retry
        names = {v: k for k, v in _RETRY_ON.items()}
        out["retry"] = {
            "max_attempts": rt.max_attempts,
            "idempotent_methods": list(rt.idempotent_methods),
            "retry_on": sorted(names[x] for x in rt.retry_on),
            "per_try_timeout": _s(rt.per_try_timeout_ms),
            "min_try_time": _s(rt.min_try_ms),
            "budget": {"ratio": rt.budget.ratio, "min_per_second": rt.budget.min_per_second, "window": _s(rt.budget.window_ms)},
        }
    if p.rate_limits:
        out["rate_limits"] = [
            {"name": r.name, "direction": r.direction.value, "method": r.method, "caller": r.caller,
             "rate": r.rate, "cluster_rate": r.cluster_rate, "burst": r.burst}
            for r in p.rate_limits
        ]  # fmt: skip
    if p.tracing is not None:
        out["tracing"] = {"enabled": True, "sampled": p.tracing.sampled}
    if p.access_log is not None:
        out["access_log"] = {"sample_rate": p.access_log.sample_rate}
    return out


def dump_policy_set(ps: PolicySet) -> dict[str, Any]:
    """Serialise a policy set to plain data (``/config_dump``; a control-plane resource body).

    Args:
        ps: the policy set.

    Returns:
        A JSON-able mapping, every default spelled out, that
        :func:`parse_policy_set` turns back into an equal policy set.
    """
    return {"version": ps.version, "services": {name: _dump_service(p) for name, p in ps.services.items()}}
