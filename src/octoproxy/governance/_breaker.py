"""Circuit breakers per cluster: connections, held requests, requests and retries in flight (sans-IO).

Four counters against four limits (Envoy's defaults 1024 / 1024 / 1024 / 3).
``acquire_*`` either takes one unit and returns :data:`CONTINUE`, or takes
nothing and returns an OVERLOADED answer whose reason names the limit; every
successful acquire must be paired with exactly one ``release_*`` when the
connection closes, the held request leaves the queue, or the request (or
retry) finishes. Releasing more than was acquired is a bug and raises
:class:`BreakerError`. The answers are built once per breaker, so the fast
path allocates nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..protocol._errors import OctoproxyError
from ..protocol._protocol import Status
from ._verdict import CONTINUE, Verdict, answer, hold

__all__ = ["BreakerLimits", "Resource", "BreakerError", "CircuitBreaker"]


@dataclass(frozen=True, slots=True)
class BreakerLimits:
    """Per-cluster limits (Envoy's default thresholds).

    Attributes:
        max_connections: upstream connections open to the cluster.
        max_pending: requests held (waiting for a connection or a policy) at once.
        max_requests: requests in flight to the cluster.
        max_retries: retries in flight to the cluster.
    """

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


class Resource(enum.IntEnum):
    """The four guarded resources (index into the breaker's counters)."""

    CONNECTIONS = 0
    PENDING = 1
    REQUESTS = 2
    RETRIES = 3


_LIMIT_NAMES = ("max_connections", "max_pending", "max_requests", "max_retries")


class BreakerError(OctoproxyError):
    """A release without a matching acquire (a bug in the caller)."""


class CircuitBreaker:
    """The circuit breakers of one cluster.

    Args:
        cluster: the cluster's name (for reasons).
        limits: the limits.
    """

    __slots__ = ("cluster", "limits", "_used", "_max", "_overflow", "_answers", "_hold")

    def __init__(self, cluster: str, limits: BreakerLimits) -> None:
        self.cluster = cluster
        self._used = [0, 0, 0, 0]
        self._overflow = [0, 0, 0, 0]
        self._max = [0, 0, 0, 0]
        self._answers: tuple[Verdict, ...] = ()
        self._hold = hold(f"waiting for a connection to cluster {cluster!r}")
        self.limits = limits
        self.set_limits(limits)

    def set_limits(self, limits: BreakerLimits) -> None:
        """Install new limits (a pushed update). Units in use stay in use; a lower
        limit only refuses new acquires until enough are released.

        Args:
            limits: the new limits.
        """
        self.limits = limits
        self._max = [limits.max_connections, limits.max_pending, limits.max_requests, limits.max_retries]
        self._answers = tuple(
            answer(Status.OVERLOADED, f"circuit breaker open: cluster {self.cluster!r} {name} ({mx}) reached")
            for name, mx in zip(_LIMIT_NAMES, self._max)
        )

    def acquire(self, resource: Resource) -> Verdict:
        """Take one unit of ``resource``.

        Args:
            resource: which counter.

        Returns:
            :data:`CONTINUE` (the unit is taken) or an OVERLOADED answer naming the limit.
        """
        i = int(resource)
        used = self._used
        if used[i] >= self._max[i]:
            self._overflow[i] += 1
            return self._answers[i]
        used[i] += 1
        return CONTINUE

    def release(self, resource: Resource) -> None:
        """Give back one unit of ``resource``.

        Raises:
            BreakerError: if nothing of it is held.
        """
        i = int(resource)
        if self._used[i] <= 0:
            raise BreakerError(f"circuit breaker: cluster {self.cluster!r}: release of {_LIMIT_NAMES[i]} without acquire")
        self._used[i] -= 1

    def hold_pending(self) -> Verdict:
        """Park a request that has no ready connection: take a ``PENDING`` unit.

        Returns:
            A HOLD verdict (the unit is taken; release it when the request
            leaves the held queue, forwarded or timed out), or the OVERLOADED
            answer naming ``max_pending``.
        """
        used = self._used
        if used[1] >= self._max[1]:
            self._overflow[1] += 1
            return self._answers[1]
        used[1] += 1
        return self._hold

    # The request path calls these two for every request: no enum conversion.
    def acquire_request(self) -> Verdict:
        """:meth:`acquire` of ``REQUESTS`` (the per-request fast path)."""
        used = self._used
        if used[2] >= self._max[2]:
            self._overflow[2] += 1
            return self._answers[2]
        used[2] += 1
        return CONTINUE

    def release_request(self) -> None:
        """:meth:`release` of ``REQUESTS``."""
        if self._used[2] <= 0:
            raise BreakerError(f"circuit breaker: cluster {self.cluster!r}: release of max_requests without acquire")
        self._used[2] -= 1

    def in_use(self, resource: Resource) -> int:
        """Units of ``resource`` held now."""
        return self._used[int(resource)]

    def overflows(self, resource: Resource) -> int:
        """How many acquires of ``resource`` were refused (for ``/stats``)."""
        return self._overflow[int(resource)]

    def is_open(self, resource: Resource) -> bool:
        """Whether the next acquire of ``resource`` would be refused."""
        i = int(resource)
        return self._used[i] >= self._max[i]
