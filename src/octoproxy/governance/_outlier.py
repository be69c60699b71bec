"""Outlier ejection per endpoint: consecutive failures and failure rate (sans-IO).

Theory of operation
-------------------
Every endpoint of a cluster has a small record: a state, its consecutive
failures, this interval's requests and failures, how many times it has been
ejected (the multiplier) and, while ejected, until when. The shell feeds it:

* :meth:`OutlierDetector.record` after each response (or connection error):
  a failure is UNAVAILABLE, TIMEOUT, OVERLOADED or a connection error
  (:func:`is_failure`). Reaching ``consecutive_failures`` in a row ejects the
  endpoint at once (the call returns True so the shell tells the router).
* :meth:`OutlierDetector.tick` at :meth:`OutlierDetector.next_deadline`: it
  restores endpoints whose ejection time is over, and at each ``interval`` it
  runs the failure-rate sweep (endpoints with at least ``request_volume``
  requests this interval, when at least ``minimum_hosts`` have that many, are
  ejected if their failure percentage is at least ``threshold``), decays by one
  the multiplier of endpoints back in rotation for a whole interval, and starts
  a new interval.

An ejection lasts ``base_ejection * times_ejected``, at most ``max_ejection``.
At most ``max_ejection_percent`` of the cluster is ejected at once, but always
at least one endpoint may be (Envoy), and never the last one left in rotation
(a cluster of one is never ejected: failing calls beat no calls).

State changes go through :data:`TRANSITIONS` (``TRANSITIONS[state][event]``); an
event with no entry for the current state is a bug and raises
:class:`OutlierError`. :func:`diagram` renders the table for docs/governance.md.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol._errors import OctoproxyError
from ..protocol._protocol import Status

__all__ = [
    "State",
    "Event",
    "TRANSITIONS",
    "OutlierConfig",
    "OutlierError",
    "OutlierDetector",
    "is_failure",
    "diagram",
]


class State(enum.Enum):
    """An endpoint's outlier state."""

    #: in rotation, never ejected (or its multiplier decayed back to 0)
    HEALTHY = "healthy"
    #: out of rotation until its ejection time is over
    EJECTED = "ejected"
    #: back in rotation; a new ejection would last longer (multiplier > 0)
    RECOVERING = "recovering"


class Event(enum.Enum):
    """What moves an endpoint between states."""

    CONSECUTIVE_FAILURES = "consecutive_failures"
    FAILURE_RATE = "failure_rate"
    EJECTION_EXPIRED = "ejection_expired"
    MULTIPLIER_DECAYED = "multiplier_decayed"


#: ``TRANSITIONS[state][event]`` -> next state. A missing entry is an error.
TRANSITIONS: dict[State, dict[Event, State]] = {
    State.HEALTHY: {
        Event.CONSECUTIVE_FAILURES: State.EJECTED,
        Event.FAILURE_RATE: State.EJECTED,
    },
    State.EJECTED: {
        Event.EJECTION_EXPIRED: State.RECOVERING,
    },
    State.RECOVERING: {
        Event.CONSECUTIVE_FAILURES: State.EJECTED,
        Event.FAILURE_RATE: State.EJECTED,
        Event.MULTIPLIER_DECAYED: State.HEALTHY,
    },
}


def diagram() -> str:
    """The state diagram as Mermaid text, generated from :data:`TRANSITIONS`."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.HEALTHY.name}"]
    for state, row in TRANSITIONS.items():
        for event, nxt in row.items():
            lines.append(f"    {state.name} --> {nxt.name}: {event.value}")
    return "\n".join(lines) + "\n"


class OutlierError(OctoproxyError):
    """An event arrived in a state that has no transition for it (a bug)."""


_FAILURE_TABLE = tuple(s in (Status.UNAVAILABLE, Status.TIMEOUT, Status.OVERLOADED) for s in range(256))


def is_failure(status: int) -> bool:
    """Whether a response status counts against the endpoint.

    Args:
        status: the response status (``Status`` value).

    Returns:
        True for UNAVAILABLE, TIMEOUT and OVERLOADED.
    """
    return 0 <= status < 256 and _FAILURE_TABLE[status]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Outlier detection settings (Envoy's defaults).

    Attributes:
        consecutive_failures: failures in a row that eject an endpoint; 0 turns it off.
        interval_ms: the sweep interval (failure rate, multiplier decay).
        base_ejection_ms: ejection time, multiplied by the times ejected.
        max_ejection_ms: cap on one ejection.
        max_ejection_percent: at most this share of the cluster ejected at once (at least one).
        failure_rate_threshold: failure percentage that ejects at a sweep; 0 turns it off.
        failure_rate_minimum_hosts: the sweep only judges when this many endpoints have enough volume.
        failure_rate_request_volume: requests in the interval for an endpoint to be judged.
    """

    consecutive_failures: int = 5
    interval_ms: int = 10_000
    base_ejection_ms: int = 30_000
    max_ejection_ms: int = 300_000
    max_ejection_percent: int = 10
    failure_rate_threshold: int = 85
    failure_rate_minimum_hosts: int = 5
    failure_rate_request_volume: int = 50


class _Host:
    __slots__ = ("address", "state", "consecutive", "requests", "failures", "times_ejected", "ejected_until")

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = State.HEALTHY
        self.consecutive = 0
        self.requests = 0
        self.failures = 0
        self.times_ejected = 0
        self.ejected_until = 0


class OutlierDetector:
    """Outlier detection for one cluster.

    Args:
        cluster: the cluster's name.
        config: the settings.
        now_ms: the current time: the first interval starts here.
    """

    __slots__ = ("cluster", "config", "_hosts", "_ejected", "_next_sweep", "_limit")

    def __init__(self, cluster: str, config: OutlierConfig, now_ms: int) -> None:
        self.cluster = cluster
        self.config = config
        self._hosts: dict[str, _Host] = {}
        self._ejected = 0
        self._next_sweep = now_ms + config.interval_ms
        self._limit = config.consecutive_failures if config.consecutive_failures > 0 else 1 << 62

    def set_config(self, config: OutlierConfig) -> None:
        """Install new settings (a pushed update) without forgetting any endpoint's state.

        Ejections in progress keep their end time; the new times apply to the next ejection.

        Args:
            config: the new settings.
        """
        self.config = config
        self._limit = config.consecutive_failures if config.consecutive_failures > 0 else 1 << 62

    # ---------------------------------------------------------------- membership

    def update(self, addresses: Iterable[str]) -> None:
        """Follow the cluster's membership: new addresses start healthy, gone ones are forgotten.

        Args:
            addresses: every current endpoint address.
        """
        want = set(addresses)
        for gone in [a for a in self._hosts if a not in want]:
            if self._hosts.pop(gone).state is State.EJECTED:
                self._ejected -= 1
        for a in want:
            if a not in self._hosts:
                self._hosts[a] = _Host(a)

    def state(self, address: str) -> State:
        """The endpoint's state.

        Raises:
            KeyError: for an unknown address.
        """
        return self._hosts[address].state

    def is_ejected(self, address: str) -> bool:
        """Whether the endpoint is out of rotation now."""
        h = self._hosts.get(address)
        return h is not None and h.state is State.EJECTED

    @property
    def ejected_count(self) -> int:
        """Endpoints ejected now."""
        return self._ejected

    def times_ejected(self, address: str) -> int:
        """The endpoint's ejection multiplier."""
        return self._hosts[address].times_ejected

    # ---------------------------------------------------------------- events

    def _fire(self, h: _Host, event: Event) -> State:
        try:
            nxt = TRANSITIONS[h.state][event]
        except KeyError:
            raise OutlierError(f"outlier: {h.address}: no transition from {h.state.name} on {event.name}") from None
        h.state = nxt
        return nxt

    def _may_eject(self) -> bool:
        n = len(self._hosts)
        allowed = max(1, n * self.config.max_ejection_percent // 100)
        return self._ejected < allowed and self._ejected + 1 < n

    def _eject(self, h: _Host, event: Event, now_ms: int) -> bool:
        if not self._may_eject():
            return False
        self._fire(h, event)
        self._ejected += 1
        h.times_ejected += 1
        h.consecutive = 0
        h.requests = h.failures = 0  # judged afresh when it comes back
        c = self.config
        h.ejected_until = now_ms + min(c.base_ejection_ms * h.times_ejected, max(c.max_ejection_ms, c.base_ejection_ms))
        return True

    def record(self, address: str, failed: bool, now_ms: int) -> bool:
        """Count one outcome for an endpoint (the per-response fast path).

        Args:
            address: the endpoint that served (or failed) the request.
            failed: True for a failure (see :func:`is_failure`, plus connection errors).
            now_ms: the current time.

        Returns:
            True when this outcome ejected the endpoint (tell the router).
        """
        h = self._hosts.get(address)
        if h is None:
            return False
        h.requests += 1
        if not failed:
            h.consecutive = 0
            return False
        h.failures += 1
        h.consecutive += 1
        if h.consecutive >= self._limit and h.state is not State.EJECTED:
            return self._eject(h, Event.CONSECUTIVE_FAILURES, now_ms)
        return False

    def record_status(self, address: str, status: int, now_ms: int) -> bool:
        """:meth:`record` from a response status."""
        if status == 0:  # OK: the common case, inlined
            h = self._hosts.get(address)
            if h is not None:
                h.requests += 1
                h.consecutive = 0
            return False
        return self.record(address, 0 <= status < 256 and _FAILURE_TABLE[status], now_ms)

    def next_deadline(self) -> int:
        """When :meth:`tick` should run next (the earliest ejection end or the next sweep)."""
        t = self._next_sweep
        if self._ejected:
            for h in self._hosts.values():
                if h.state is State.EJECTED and h.ejected_until < t:
                    t = h.ejected_until
        return t

    def tick(self, now_ms: int) -> list[tuple[str, bool]]:
        """Restore expired ejections and, once per interval, run the sweep.

        Args:
            now_ms: the current time.

        Returns:
            The changes, in order: ``(address, True)`` ejected, ``(address, False)`` restored.
        """
        changes: list[tuple[str, bool]] = []
        if self._ejected:
            for h in self._hosts.values():
                if h.state is State.EJECTED and now_ms >= h.ejected_until:
                    self._fire(h, Event.EJECTION_EXPIRED)
                    self._ejected -= 1
                    h.consecutive = 0
                    h.requests = h.failures = 0  # late responses from before do not count
                    h.ejected_until = now_ms  # from now on: when it came back (multiplier decay)
                    changes.append((h.address, False))
        if now_ms >= self._next_sweep:
            self._sweep(now_ms, changes)
            c = self.config
            # skip whole intervals missed (a late tick does not sweep several times)
            missed = (now_ms - self._next_sweep) // c.interval_ms
            self._next_sweep += (missed + 1) * c.interval_ms
        return changes

    def _sweep(self, now_ms: int, changes: list[tuple[str, bool]]) -> None:
        c = self.config
        if c.failure_rate_threshold > 0:
            judged = [h for h in self._hosts.values() if h.state is not State.EJECTED and h.requests >= c.failure_rate_request_volume]
            if len(judged) >= c.failure_rate_minimum_hosts:
                # worst first, so the cap ejects the worst offenders
                judged.sort(key=lambda h: h.failures * 1.0 / h.requests, reverse=True)
                for h in judged:
                    if h.failures * 100 >= c.failure_rate_threshold * h.requests:
                        if self._eject(h, Event.FAILURE_RATE, now_ms):
                            changes.append((h.address, True))
        for h in self._hosts.values():
            h.requests = 0
            h.failures = 0
            # one step of decay per whole interval spent back in rotation
            if h.state is State.RECOVERING and now_ms - h.ejected_until >= c.interval_ms:
                h.ejected_until = now_ms
                h.times_ejected -= 1
                if h.times_ejected <= 0:
                    h.times_ejected = 0
                    self._fire(h, Event.MULTIPLIER_DECAYED)
