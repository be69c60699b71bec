"""The proxy's metrics: what ``GET /stats`` shows (Prometheus text format).

Families (all prefixed ``octoproxy_``):

* ``requests_total{direction,service,method,status}``: requests answered, by
  final status (including the ones the proxy answered itself).
* ``request_duration_seconds{direction,service,method}``: latency histogram,
  from the proxy receiving the request to the response leaving for the caller.
* ``rejected_total{reason}``: requests the proxy answered itself before
  forwarding (no_route, unavailable, overloaded, drain, hot_restart).
* ``errors_total{kind}``: protocol errors, late responses, slow clients cut
  off, connection failures.
* ``connections{listener}`` / ``upstream_connections{cluster}``: gauges.
* ``pending_requests``: requests in flight through this proxy.
* governed routes only (docs/governance.md): ``calls_total{direction,service,
  method,caller,status}`` and ``call_duration_seconds{direction,service,method,
  caller}``; ``retries_total{cluster}``; ``outlier_ejections_total{cluster}``.

Hot paths keep the labelled children (``RequestStats``) instead of looking
labels up per request.
"""

from __future__ import annotations

from typing import Any

from ..common._metrics import CounterChild, HistogramChild, Registry
from ..protocol._protocol import Status

__all__ = ["ProxyStats", "RequestStats", "CallerStats"]

_STATUS_NAMES = {int(s): s.name for s in Status}


class RequestStats:
    """Counters and histogram of one (direction, service, method)."""

    __slots__ = ("_stats", "labels", "by_status", "latency")

    def __init__(self, stats: ProxyStats, labels: tuple[str, str, str]) -> None:
        self._stats = stats
        self.labels = labels
        self.by_status: dict[int, CounterChild] = {}
        self.latency: HistogramChild = stats.duration.labels(*labels)

    def count(self, status: int, n: int = 1) -> None:
        child = self.by_status.get(status)
        if child is None:
            name = _STATUS_NAMES.get(status, "UNKNOWN")
            child = self.by_status[status] = self._stats.requests.labels(*self.labels, name)
        child.value += n


class CallerStats:
    """Counters and histogram of one (direction, service, method, caller): governed routes only."""

    __slots__ = ("_stats", "labels", "by_status", "latency")

    def __init__(self, stats: ProxyStats, labels: tuple[str, str, str, str]) -> None:
        self._stats = stats
        self.labels = labels
        self.by_status: dict[int, CounterChild] = {}
        self.latency: HistogramChild = stats.call_duration.labels(*labels)

    def observe(self, status: int, seconds: float) -> None:
        child = self.by_status.get(status)
        if child is None:
            name = _STATUS_NAMES.get(status, "UNKNOWN")
            child = self.by_status[status] = self._stats.calls.labels(*self.labels, name)
        child.value += 1
        self.latency.observe(seconds)


class ProxyStats:
    """Every metric of one proxy process, in one :class:`Registry`."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = reg = registry if registry is not None else Registry()
        self.requests = reg.counter(
            "octoproxy_requests_total", "Requests answered, by final status.", ("direction", "service", "method", "status")
        )
        self.duration = reg.histogram(
            "octoproxy_request_duration_seconds", "Time from request in to response out.", ("direction", "service", "method")
        )
        self.rejections = reg.counter("octoproxy_rejected_total", "Requests answered by the proxy itself.", ("reason",))
        self.errors = reg.counter("octoproxy_errors_total", "Errors by kind.", ("kind",))
        self.connections = reg.gauge("octoproxy_connections", "Open downstream connections.", ("listener",))
        self.upstream_connections = reg.gauge("octoproxy_upstream_connections", "Open upstream connections.", ("cluster",))
        self.accepted = reg.counter("octoproxy_connections_accepted_total", "Downstream connections accepted.", ("listener",))
        self.oneway = reg.counter("octoproxy_oneway_forwarded_total", "ONEWAY frames forwarded.")
        self.calls = reg.counter(
            "octoproxy_calls_total",
            "Governed routes: calls answered, by caller and final status (the proxy's own answers included).",
            ("direction", "service", "method", "caller", "status"),
        )
        self.call_duration = reg.histogram(
            "octoproxy_call_duration_seconds",
            "Governed routes: time from request in to final answer out, retries included, by caller.",
            ("direction", "service", "method", "caller"),
        )
        self.retries = reg.counter("octoproxy_retries_total", "Governed routes: tries sent again to another endpoint.", ("cluster",))
        self.ejections = reg.counter("octoproxy_outlier_ejections_total", "Endpoints ejected by outlier detection.", ("cluster",))
        self._cache: dict[Any, RequestStats] = {}
        self._callers: dict[tuple[str, str, str, str], CallerStats] = {}
        self._rejected: dict[str, CounterChild] = {}
        self._errors: dict[str, CounterChild] = {}

    # -- hot path

    def request_stats(self, direction: str, service: bytes, method: bytes) -> RequestStats:
        key = (direction, service, method)
        rs = self._cache.get(key)
        if rs is None:
            if len(self._cache) >= 10000:  # bound the label cardinality
                key = (direction, b"_other", b"_other")
                rs = self._cache.get(key)
                if rs is not None:
                    return rs
            rs = self._cache[key] = RequestStats(self, (direction, key[1].decode(errors="replace"), key[2].decode(errors="replace")))
        return rs

    def caller_stats(self, direction: str, service: str, method: str, caller: str) -> CallerStats:
        key = (direction, service, method, caller)
        cs = self._callers.get(key)
        if cs is None:
            if len(self._callers) >= 10000:  # bound the label cardinality
                key = (direction, "_other", "_other", "_other")
                cs = self._callers.get(key)
                if cs is not None:
                    return cs
            cs = self._callers[key] = CallerStats(self, key)
        return cs

    def retried(self, cluster: str) -> None:
        self.retries.labels(cluster).inc()

    def ejection(self, cluster: str) -> None:
        self.ejections.labels(cluster).inc()

    def finished(self, rs: RequestStats, status: int, seconds: float) -> None:
        rs.count(status)
        rs.latency.observe(seconds)

    def answered(self, direction: str, service: bytes, method: bytes, status: int) -> None:
        """A request the proxy answered itself (not forwarded): count it in ``requests_total``."""
        self.request_stats(direction, service, method).count(status)

    def rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self.rejections.labels(reason)
        child.value += 1

    def error(self, kind: str, n: int = 1) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self.errors.labels(kind)
        child.value += n

    def error_count(self, kind: str) -> float:
        child = self._errors.get(kind)
        return child.value if child is not None else 0

    def rejected_count(self, reason: str) -> float:
        child = self._rejected.get(reason)
        return child.value if child is not None else 0

    def render(self) -> str:
        return self.registry.render()
