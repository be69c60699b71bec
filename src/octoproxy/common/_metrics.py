"""A small Prometheus-style metrics registry (sans-IO: no Trio, no clock reads).

Theory of operation: a :class:`Registry` owns metric *families* (counter,
gauge, histogram, callback gauge) in registration order. A family with label
names holds one *child* per tuple of label values, created on first use by
``labels(...)`` and cached, so a hot path looks the child up once and then
does plain attribute arithmetic on it (``__slots__``, no locks: Trio runs one
task at a time). A family without label names has a single child and forwards
``inc``/``set``/``observe`` to it. Time is never read here: callers pass the
seconds they measured.

``render()`` produces the text exposition format 0.0.4. ``snapshot()`` and
``restore()`` carry counter and histogram values across a hot restart: the new
process *adds* the old process's totals to its own, so rates stay continuous.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["DEFAULT_LATENCY_BUCKETS", "Registry", "Counter", "CounterChild", "Gauge", "GaugeChild"]
__all__ += ["GaugeFunc", "Histogram", "HistogramChild"]

logger = logging.getLogger("octoproxy.metrics")

#: Upper bounds, in seconds, from 50µs to 10s (``+Inf`` is implicit).
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_SNAPSHOT_VERSION = 1


class CounterChild:
    """One counter time series; ``value`` only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, n: float = 1) -> None:
        """Add ``n`` (must be >= 0).

        Raises:
            ValueError: if ``n`` is negative.
        """
        if n < 0:
            raise ValueError("counters can only increase")
        self.value += n


class GaugeChild:
    """One gauge time series; ``value`` goes up and down."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n


class HistogramChild:
    """One histogram time series.

    ``counts[i]`` is the (non-cumulative) number of observations that fell in
    bucket ``i``; the last slot is the ``+Inf`` bucket.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (``le`` semantics: ``value <= bound``)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


_C = TypeVar("_C", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[_C]):
    kind = ""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], factory: Callable[[], _C]) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._factory: Callable[[], _C] = factory
        self._children: dict[tuple[str, ...], _C] = {}
        # The unlabelled child exists from the start so it renders as 0.
        self._default: _C | None = None if labelnames else self.labels()

    def labels(self, *values: str) -> _C:
        """Return (creating on first use) the child for these label values.

        Args:
            values: one string per label name, in ``labelnames`` order.

        Returns:
            The cached child; keep it on hot paths.

        Raises:
            ValueError: if the number of values does not match the label names.
            TypeError: if a value is not a ``str``.
        """
        try:
            return self._children[values]
        except KeyError:
            pass
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"{self.name}: label values must be str, got {v!r}")
        child = self._children[values] = self._factory()
        return child

    def _only(self) -> _C:
        if self._default is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self._default

    def _sorted(self) -> list[tuple[tuple[str, ...], _C]]:
        return sorted(self._children.items())


class Counter(_Family[CounterChild]):
    """A counter family; create with :meth:`Registry.counter`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]) -> None:
        super().__init__(name, help, labelnames, CounterChild)

    def inc(self, n: float = 1) -> None:
        """Increment the unlabelled counter (see :meth:`CounterChild.inc`)."""
        self._only().inc(n)


class Gauge(_Family[GaugeChild]):
    """A gauge family; create with :meth:`Registry.gauge`."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]) -> None:
        super().__init__(name, help, labelnames, GaugeChild)

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, n: float = 1) -> None:
        self._only().inc(n)

    def dec(self, n: float = 1) -> None:
        self._only().dec(n)


class Histogram(_Family[HistogramChild]):
    """A histogram family; create with :meth:`Registry.histogram`."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        super().__init__(name, help, labelnames, lambda: HistogramChild(buckets))

    def observe(self, value: float) -> None:
        self._only().observe(value)


class GaugeFunc:
    """An unlabelled gauge whose value is ``fn()``, read at render time."""

    kind = "gauge"
    labelnames: tuple[str, ...] = ()

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.name = name
        self.help = help
        self.fn = fn


_Metric = Counter | Gauge | Histogram | GaugeFunc
_M = TypeVar("_M", Counter, Gauge, Histogram, GaugeFunc)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _labelstr(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _check_names(name: str, labelnames: Sequence[str]) -> tuple[str, ...]:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    names = tuple(labelnames)
    for ln in names:
        if not _LABEL_RE.match(ln) or ln.startswith("__"):
            raise ValueError(f"{name}: invalid label name {ln!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: duplicate label names {names}")
    return names


def _check_buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    b = tuple(float(x) for x in buckets if not (math.isinf(x) and x > 0))
    if not b or any(x >= y for x, y in zip(b, b[1:])) or any(math.isnan(x) for x in b):
        raise ValueError(f"{name}: buckets must be non-empty, finite and strictly increasing")
    return b


class Registry:
    """A set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def add_collector(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` before every read of the values (:meth:`render`, :meth:`snapshot`,
        :meth:`collect`): e.g. to fold counters kept elsewhere into the metrics."""
        self._collectors.append(fn)

    def collect(self) -> None:
        """Bring every value up to date (the collectors run)."""
        for fn in self._collectors:
            fn()

    def _register(self, kind: type[_M], name: str, labelnames: tuple[str, ...], make: Callable[[], _M]) -> _M:
        m = self._metrics.get(name)
        if m is None:
            m = self._metrics[name] = make()
        if type(m) is not kind or not isinstance(m, kind) or m.labelnames != labelnames:
            raise ValueError(f"metric {name!r} already registered as {type(m).__name__}{m.labelnames}")
        return m

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Register (or fetch) a counter.

        Args:
            name: metric name (``[a-zA-Z_:][a-zA-Z0-9_:]*``).
            help: one-line description for ``# HELP``.
            labelnames: label names, in the order ``labels()`` takes values.

        Returns:
            The new counter, or the one already registered under ``name``.

        Raises:
            ValueError: on an invalid name, or if ``name`` is already
                registered with another kind or other label names.
        """
        names = _check_names(name, labelnames)
        return self._register(Counter, name, names, lambda: Counter(name, help, names))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Register (or fetch) a gauge; same rules as :meth:`counter`.

        Raises:
            ValueError: as for :meth:`counter`.
        """
        names = _check_names(name, labelnames)
        return self._register(Gauge, name, names, lambda: Gauge(name, help, names))

    def gauge_func(self, name: str, help: str, fn: Callable[[], float]) -> GaugeFunc:
        """Register a gauge whose value is ``fn()`` at render time.

        Registering the same name again re-points it at the new ``fn`` (the
        newest owner of the value wins) and returns the existing metric.

        Raises:
            ValueError: on an invalid name or if ``name`` is another kind.
        """
        m = self._register(GaugeFunc, name, _check_names(name, ()), lambda: GaugeFunc(name, help, fn))
        m.fn = fn
        return m

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        """Register (or fetch) a histogram.

        Args:
            name: metric name.
            help: one-line description.
            labelnames: label names (``le`` is reserved).
            buckets: strictly increasing finite upper bounds; ``+Inf`` is added.

        Returns:
            The new histogram, or the one already registered under ``name``.

        Raises:
            ValueError: on invalid names or buckets, or if ``name`` is already
                registered with another kind, other labels or other buckets.
        """
        names = _check_names(name, labelnames)
        if "le" in names:
            raise ValueError(f"{name}: 'le' is reserved in histograms")
        b = _check_buckets(name, buckets)
        m = self._register(Histogram, name, names, lambda: Histogram(name, help, names, b))
        if m.buckets != b:
            raise ValueError(f"histogram {name!r} already registered with buckets {m.buckets}")
        return m

    def render(self) -> str:
        """Return every metric in the Prometheus text format 0.0.4.

        Returns:
            The exposition text (serve as ``text/plain; version=0.0.4``).
        """
        self.collect()
        out: list[str] = []
        for m in self._metrics.values():
            out.append(f"# HELP {m.name} {_escape_help(m.help)}")
            out.append(f"# TYPE {m.name} {m.kind}")
            if isinstance(m, GaugeFunc):
                try:
                    value = float(m.fn())
                except Exception as exc:  # one broken callback must not hide the rest
                    logger.warning("gauge_func %s raised %r", m.name, exc)
                    value = math.nan
                out.append(f"{m.name} {_fmt(value)}")
            elif isinstance(m, Histogram):
                for values, h in m._sorted():
                    cum = 0
                    for bound, n in zip((*m.buckets, math.inf), h.counts):
                        cum += n
                        le = 'le="' + _fmt(bound) + '"'
                        out.append(f"{m.name}_bucket{_labelstr(m.labelnames, values, le)} {cum}")
                    out.append(f"{m.name}_sum{_labelstr(m.labelnames, values)} {_fmt(h.sum)}")
                    out.append(f"{m.name}_count{_labelstr(m.labelnames, values)} {cum}")
            else:
                for values, c in m._sorted():
                    out.append(f"{m.name}{_labelstr(m.labelnames, values)} {_fmt(c.value)}")
        return "\n".join(out) + "\n" if out else ""

    def snapshot(self) -> dict[str, Any]:
        """Return the counter and histogram values as plain JSON-able data.

        Returns:
            ``{"version": 1, "metrics": [...]}``; each entry has ``name``,
            ``type``, ``help``, ``labelnames`` (and ``buckets`` for
            histograms) and ``samples``: ``{"labels", "value"}`` for counters,
            ``{"labels", "counts", "sum"}`` (per-bucket, last is ``+Inf``) for
            histograms. Gauges are not included: they describe the live process.
        """
        self.collect()
        metrics: list[dict[str, Any]] = []
        for m in self._metrics.values():
            entry: dict[str, Any] = {"name": m.name, "type": m.kind, "help": m.help, "labelnames": list(m.labelnames)}
            if isinstance(m, Counter):
                entry["samples"] = [{"labels": list(k), "value": c.value} for k, c in m._sorted()]
            elif isinstance(m, Histogram):
                entry["buckets"] = list(m.buckets)
                entry["samples"] = [
                    {"labels": list(k), "counts": list(h.counts), "sum": h.sum} for k, h in m._sorted()
                ]
            else:
                continue
            metrics.append(entry)
        return {"version": _SNAPSHOT_VERSION, "metrics": metrics}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Add the values of a :meth:`snapshot` into this registry.

        Unknown names are registered on demand with the snapshot's help,
        labels and buckets. If a histogram exists here with other buckets,
        each old bucket's count moves to the smallest bucket here whose bound
        is >= the old bound (never under-reporting a latency). The whole
        snapshot is checked before any value is added, so a bad snapshot adds
        nothing (though metrics it named may have been registered).

        Args:
            snapshot: a value returned by :meth:`snapshot` (possibly after a
                JSON round trip).

        Raises:
            ValueError: if the snapshot is malformed or names an existing
                metric of another kind or with other label names.
        """
        plan: list[tuple[CounterChild, float] | tuple[HistogramChild, list[int], float]] = []
        try:
            if snapshot.get("version") != _SNAPSHOT_VERSION:
                raise ValueError(f"unsupported snapshot version {snapshot.get('version')!r}")
            for entry in snapshot["metrics"]:
                name, labelnames = str(entry["name"]), tuple(str(x) for x in entry["labelnames"])
                if entry["type"] == "counter":
                    counter = self.counter(name, str(entry["help"]), labelnames)
                    for s in entry["samples"]:
                        value = s["value"]
                        if not isinstance(value, (int, float)) or value < 0:
                            raise ValueError(f"{name}: bad counter value {value!r}")
                        plan.append((counter.labels(*s["labels"]), value))
                elif entry["type"] == "histogram":
                    old = _check_buckets(name, entry["buckets"])
                    hist = self._metrics.get(name)
                    if not isinstance(hist, Histogram):
                        hist = self.histogram(name, str(entry["help"]), labelnames, old)
                    elif hist.labelnames != labelnames:
                        raise ValueError(f"metric {name!r} already registered with labels {hist.labelnames}")
                    # old bucket i (bound old[i], or +Inf) -> first new bucket with bound >= it
                    where = [bisect_left(hist.buckets, b) for b in old] + [len(hist.buckets)]
                    for s in entry["samples"]:
                        counts = [int(n) for n in s["counts"]]
                        if len(counts) != len(where) or min(counts) < 0:
                            raise ValueError(f"{name}: bad bucket counts {counts!r}")
                        moved = [0] * (len(hist.buckets) + 1)
                        for i, n in zip(where, counts):
                            moved[i] += n
                        plan.append((hist.labels(*s["labels"]), moved, float(s["sum"])))
                else:
                    raise ValueError(f"{name}: cannot restore metric type {entry['type']!r}")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed metrics snapshot: {exc!r}") from exc
        for item in plan:
            if len(item) == 2:
                item[0].value += item[1]
            else:
                child, moved, total = item
                child.sum += total
                for i, n in enumerate(moved):
                    child.counts[i] += n
