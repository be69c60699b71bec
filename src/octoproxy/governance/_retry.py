"""Retries that never duplicate work, bounded by a retry budget (sans-IO).

Theory of operation
-------------------
:func:`decide` is a pure function of one failed try: may the call be sent
again, on which endpoints not, and with what timeout. A try is retried only
when the request is known not to have been processed:

* the connection to the endpoint failed before the request was written
  (``connect_failed``);
* the response carries ``HOT_RESTART`` (the peer proxy is restarting and did
  not process it; docs/protocol.md);
* the response carries ``NOT_PROCESSED`` (proposed flag bit 1: the remote
  proxy answered itself, before admission: its breaker's OVERLOADED, its rate
  limit, a drain; docs/governance.md, "Protocol additions");

or when the route marks the method idempotent and the status is one of the
policy's ``retry_on`` statuses. A retry goes to another endpoint: the decision
carries the exclusion set (every endpoint tried so far). It is refused when the
attempts are used up, when less than ``min_try_ms`` is left before the call's
deadline, or when the :class:`RetryBudget` is spent. The try timeout is
``min(per_try_timeout, time left)``.

The budget is Linkerd's: retries may add ``ratio`` of the original requests
plus ``min_per_second`` per second, over ``window``. Counts live in a ring of
buckets (no allocation per request). To make the bound hold over every sliding
window, not only bucket-aligned ones, the retries of one bucket more than the
window are counted against the requests of the buckets wholly inside it: a
retry at time ``t`` is allowed only if the retries in ``(t - window, t]``,
itself included, stay within ``ratio * requests in (t - window, t] + reserve``.
HOT_RESTART resends do not draw on the budget: they are the protocol's
hand-over, not a sign of an overloaded cluster.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from ..protocol._protocol import Flags, Status

__all__ = [
    "NOT_PROCESSED",
    "BudgetConfig",
    "RetryBudget",
    "RetryPolicy",
    "RetryDecision",
    "decide",
]

#: Proposed response flag (bit 1): the remote proxy answered without handing the request to its app.
NOT_PROCESSED = 2


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A retry budget (Linkerd's defaults).

    Attributes:
        ratio: retries allowed as a share of original requests.
        min_per_second: retries allowed per second regardless of traffic.
        window_ms: the window over which both are counted.
        buckets: how many buckets the window is cut into.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window_ms: int = 10_000
    buckets: int = 10


class RetryBudget:
    """Linkerd's retry budget over bucketed counters.

    Args:
        config: the budget.
        now_ms: the current time.
    """

    __slots__ = ("config", "_width", "_n", "_m", "_req", "_ret", "_bucket", "_req_sum", "_ret_sum", "_reserve", "_ratio")

    def __init__(self, config: BudgetConfig, now_ms: int) -> None:
        self.config = config
        self._n = max(1, config.buckets)
        self._width = max(1, config.window_ms // self._n)
        self._m = self._n + 1  # one more bucket of retries than of requests (see module doc)
        self._req = [0] * self._m
        self._ret = [0] * self._m
        self._bucket = now_ms // self._width
        self._req_sum = 0
        self._ret_sum = 0
        self._ratio = config.ratio
        self._reserve = config.min_per_second * (self._n * self._width) / 1000.0

    def _advance(self, now_ms: int) -> int:
        b = now_ms // self._width
        cur = self._bucket
        if b <= cur:
            return cur % self._m  # same bucket (or time went back: count it in the current one)
        m, n = self._m, self._n
        req, ret = self._req, self._ret
        if b - cur >= m:
            for i in range(m):
                req[i] = 0
                ret[i] = 0
            self._req_sum = 0
            self._ret_sum = 0
        else:
            while cur < b:
                cur += 1
                self._req_sum -= req[(cur - n) % m]  # leaves the request window
                s = cur % m  # == (cur - n - 1) % m: leaves the retry window, reused for cur
                self._ret_sum -= ret[s]
                req[s] = 0
                ret[s] = 0
        self._bucket = b
        return b % m

    def deposit(self, now_ms: int) -> None:
        """Count one original request (not a retry).

        Args:
            now_ms: the current time.
        """
        cur = self._bucket
        s = cur % self._m if now_ms // self._width <= cur else self._advance(now_ms)
        self._req[s] += 1
        self._req_sum += 1

    def try_withdraw(self, now_ms: int) -> bool:
        """Take one retry from the budget if it allows one.

        Args:
            now_ms: the current time.

        Returns:
            True if the retry may go (and it is counted), False if the budget is spent.
        """
        s = self._advance(now_ms)
        if self._ret_sum + 1 > self._ratio * self._req_sum + self._reserve:
            return False
        self._ret[s] += 1
        self._ret_sum += 1
        return True

    def available(self, now_ms: int) -> int:
        """Retries the budget would allow now (for ``/stats``)."""
        self._advance(now_ms)
        return max(0, int(self._ratio * self._req_sum + self._reserve) - self._ret_sum)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry policy.

    Attributes:
        max_attempts: tries per call, the first included (1 = never retry).
        idempotent_methods: method patterns (exact, ``Prefix*``, ``*``) safe to run twice.
        retry_on: statuses that make an idempotent method's try retryable.
        per_try_timeout_ms: cap on one try; 0 = the whole time left.
        min_try_ms: no new try with less than this left before the deadline.
        budget: the retry budget.
    """

    max_attempts: int = 2
    idempotent_methods: tuple[str, ...] = ()
    retry_on: frozenset[Status] = frozenset({Status.UNAVAILABLE, Status.TIMEOUT, Status.OVERLOADED})
    per_try_timeout_ms: int = 0
    min_try_ms: int = 5
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def is_idempotent(self, method: str) -> bool:
        """Whether the route marks ``method`` idempotent."""
        for p in self.idempotent_methods:
            if p == "*" or (p.endswith("*") and method.startswith(p[:-1])) or p == method:
                return True
        return False


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer of :func:`decide`.

    Attributes:
        retry: whether to send the call again.
        reason: why (or why not), for logs and the final error text.
        exclude: endpoints the retry must not go to.
        timeout_ms: the new try's timeout (0 when not retrying).
        from_budget: whether the retry was drawn from the budget.
    """

    retry: bool
    reason: str
    exclude: frozenset[str] = frozenset()
    timeout_ms: int = 0
    from_budget: bool = False


_NO_SUCCESS = RetryDecision(False, "succeeded")
_NO_UNSAFE = RetryDecision(False, "not retried: the request may have been processed")
_NO_ATTEMPTS = RetryDecision(False, "not retried: attempts exhausted")
_NO_DEADLINE = RetryDecision(False, "not retried: deadline too close")
_NO_BUDGET = RetryDecision(False, "not retried: retry budget exhausted")


_NAMES = {int(s): s.name for s in Status}


def _status_name(status: int) -> str:
    name = _NAMES.get(status)
    return name if name is not None else f"status {status}"


def decide(
    policy: RetryPolicy,
    *,
    status: int,
    flags: int,
    connect_failed: bool,
    idempotent: bool,
    attempt: int,
    now_ms: int,
    deadline_ms: int,
    endpoint: str,
    tried: Collection[str] = (),
    budget: RetryBudget | None = None,
) -> RetryDecision:
    """Whether a failed try may be retried, where not, and with what timeout.

    Args:
        policy: the route's retry policy.
        status: the try's response status (ignored when ``connect_failed``).
        flags: the response frame's flags (``HOT_RESTART``, ``NOT_PROCESSED``).
        connect_failed: the request was never written (connection failed).
        idempotent: the route marks the method idempotent.
        attempt: tries made so far, this one included (1 after the first).
        now_ms: the current time.
        deadline_ms: the call's deadline on the same clock.
        endpoint: the endpoint this try went to.
        tried: endpoints of the earlier tries.
        budget: the cluster's retry budget; ``None`` means unbounded.

    Returns:
        The decision; when ``retry`` is True the budget (if any) has been charged.
    """
    if not connect_failed and status == Status.OK:
        return _NO_SUCCESS
    hot_restart = bool(flags & Flags.HOT_RESTART)
    if not (connect_failed or hot_restart or flags & NOT_PROCESSED or (idempotent and status in policy.retry_on)):
        return _NO_UNSAFE
    if attempt >= policy.max_attempts:
        return _NO_ATTEMPTS
    left = deadline_ms - now_ms
    if left < max(1, policy.min_try_ms):
        return _NO_DEADLINE
    charged = False
    if budget is not None and not hot_restart:
        if not budget.try_withdraw(now_ms):
            return _NO_BUDGET
        charged = True
    timeout = left if policy.per_try_timeout_ms <= 0 else min(left, policy.per_try_timeout_ms)
    if connect_failed:
        why = "connect failure"
    elif hot_restart:
        why = "HOT_RESTART: not processed"
    elif flags & NOT_PROCESSED:
        why = f"{_status_name(status)} before admission: not processed"
    else:
        why = f"{_status_name(status)} on an idempotent method"
    return RetryDecision(True, f"retry {attempt + 1}/{policy.max_attempts}: {why}", frozenset((*tried, endpoint)), timeout, charged)
