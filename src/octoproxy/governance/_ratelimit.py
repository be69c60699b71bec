"""Rate limits: token buckets per (service, method, caller), with cluster-wide quotas (sans-IO).

Theory of operation
-------------------
A :class:`RateLimiter` serves one direction. Inbound (the provider's proxy)
keys buckets by (service, method, caller); outbound (the caller's proxy) by
(service, method). The first :class:`RateLimitRule` that matches a key gives
its rate: either a per-instance ``rate`` or a ``cluster_rate`` set once for the
whole provider cluster and divided by the live instances
(:meth:`RateLimiter.set_instances`, re-divided as they come and go), so no
call to a limit server is needed per request.

A :class:`TokenBucket` refills lazily from the time passed in. Levels are
integers in nano-tokens and the refill per millisecond is rounded down, so the
guarantee is exact: over any interval of ``d`` ms a bucket grants at most
``burst + rate * d / 1000`` tokens.

The key space is bounded (``max_keys``). When it is full, a new key looks at up
to 8 of the oldest entries (a CLOCK-style second chance: a hit costs nothing,
a busy entry goes to the back) and drops the first whose dropping loses
nothing (no rule, or its bucket has refilled to full); when all 8 are busy the
new key shares one overflow bucket of its rule. A flood of distinct callers therefore neither pins
memory nor resets anyone's bucket.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..protocol._protocol import Status
from ._routing import method_matches
from ._verdict import CONTINUE, Verdict, answer

__all__ = ["Direction", "RateLimitRule", "Limit", "TokenBucket", "RateLimiter", "UNIT"]

#: one token, in bucket units (nano-tokens)
UNIT = 1_000_000_000


class Direction(enum.Enum):
    """Which side of the proxy a limit guards."""

    #: provider side: keyed by (service, method, caller)
    INBOUND = "inbound"
    #: caller side: keyed by (service, method)
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """One rate limit.

    Attributes:
        name: for reasons and metrics.
        direction: inbound or outbound.
        service: service to match ("" any).
        method: method pattern ("" or "*" any, ``Prefix*``, exact).
        caller: caller to match, inbound only ("" or "*" any).
        rate: tokens per second on this instance (exclusive with ``cluster_rate``).
        cluster_rate: tokens per second for the whole provider cluster, divided by its live instances.
        burst: bucket size in tokens; 0 = one second of the (local) rate, at least 1.
    """

    name: str
    direction: Direction = Direction.INBOUND
    service: str = ""
    method: str = ""
    caller: str = ""
    rate: float = 0.0
    cluster_rate: float = 0.0
    burst: float = 0.0

    def matches(self, service: str, method: str, caller: str) -> bool:
        """Whether the rule applies to this key."""
        return (
            (not self.service or self.service == service)
            and method_matches(self.method, method)
            and (not self.caller or self.caller == "*" or self.caller == caller)
        )


class Limit:
    """A rule's current numbers, shared by all its buckets (re-divided in place)."""

    __slots__ = ("rule", "rate", "refill", "capacity", "verdict")

    def __init__(self, rule: RateLimitRule, instances: int) -> None:
        self.rule = rule
        self.rate = 0.0
        self.refill = 0
        self.capacity = 0
        self.verdict: Verdict = CONTINUE
        self.divide(instances)

    def divide(self, instances: int) -> None:
        """Set the local rate for ``instances`` live instances of the provider."""
        r = self.rule
        rate = r.cluster_rate / max(1, instances) if r.cluster_rate > 0 else r.rate
        self.rate = rate
        self.refill = int(rate * (UNIT // 1000))  # units per millisecond, rounded down
        burst = r.burst if r.burst > 0 else max(1.0, rate)
        self.capacity = max(UNIT, int(burst * UNIT))
        scope = "(service, method, caller)" if r.direction is Direction.INBOUND else "(service, method)"
        self.verdict = answer(Status.RATE_LIMITED, f"rate limited by {r.name!r}: {rate:g}/s per {scope}")


class TokenBucket:
    """A token bucket that refills lazily; starts full.

    Args:
        limit: its rate and size (may change under it).
        now_ms: the current time.
    """

    __slots__ = ("limit", "level", "last_ms")

    def __init__(self, limit: Limit, now_ms: int) -> None:
        self.limit = limit
        self.level = limit.capacity
        self.last_ms = now_ms

    def _refill(self, now_ms: int) -> int:
        lim = self.limit
        elapsed = now_ms - self.last_ms
        level = self.level
        if elapsed > 0:
            level += elapsed * lim.refill
            self.last_ms = now_ms
        if level > lim.capacity:
            level = lim.capacity
        self.level = level
        return level

    def take(self, now_ms: int) -> bool:
        """Take one token if there is one.

        Args:
            now_ms: the current time (earlier than the last call counts as no time passed).

        Returns:
            True if a token was taken.
        """
        level = self._refill(now_ms)
        if level >= UNIT:
            self.level = level - UNIT
            return True
        return False

    def is_full(self, now_ms: int) -> bool:
        """Whether the bucket has refilled to its size (dropping it would lose nothing)."""
        return self._refill(now_ms) >= self.limit.capacity


class RateLimiter:
    """The rate limits of one direction.

    Args:
        rules: in order; the first that matches a key applies. Rules of the
            other direction are ignored.
        direction: inbound (keys include the caller) or outbound.
        instances: live instances of the provider, for ``cluster_rate`` rules.
        max_keys: at most this many keys are tracked.
    """

    __slots__ = ("direction", "_rules", "_limits", "_keys", "_overflow", "_max_keys", "_instances", "_inbound")

    def __init__(self, rules: Sequence[RateLimitRule], direction: Direction, *, instances: int = 1, max_keys: int = 10_000) -> None:
        self.direction = direction
        self._inbound = direction is Direction.INBOUND
        self._instances = max(1, instances)
        self._rules = tuple(r for r in rules if r.direction is direction)
        self._limits = [Limit(r, self._instances) for r in self._rules]
        self._keys: dict[tuple[str, str, str], TokenBucket | None] = {}
        self._overflow: dict[int, TokenBucket] = {}
        self._max_keys = max(1, max_keys)

    @property
    def instances(self) -> int:
        """Live instances the cluster quotas are divided by."""
        return self._instances

    def set_instances(self, n: int) -> None:
        """Re-divide the cluster quotas among ``n`` live instances (discovery changed).

        Args:
            n: live instances of the provider (values below 1 count as 1).
        """
        self._instances = max(1, n)
        for lim in self._limits:
            if lim.rule.cluster_rate > 0:
                lim.divide(self._instances)

    def __len__(self) -> int:
        return len(self._keys)

    def limit_for(self, service: str, method: str, caller: str = "") -> Limit | None:
        """The limit that applies to a key, if any."""
        for lim in self._limits:
            if lim.rule.matches(service, method, caller):
                return lim
        return None

    def check(self, service: str, method: str, caller: str, now_ms: int) -> Verdict:
        """Take a token for one request.

        Args:
            service: the callee service.
            method: the method.
            caller: the calling service (ignored outbound).
            now_ms: the current time.

        Returns:
            :data:`CONTINUE`, or a RATE_LIMITED answer naming the rule.
        """
        if not self._limits:
            return CONTINUE
        key = (service, method, caller if self._inbound else "")
        keys = self._keys
        try:
            bucket = keys[key]
        except KeyError:
            bucket = self._admit(key, now_ms)
        if bucket is None or bucket.take(now_ms):
            return CONTINUE
        return bucket.limit.verdict

    def _admit(self, key: tuple[str, str, str], now_ms: int) -> TokenBucket | None:
        keys = self._keys
        limit = self.limit_for(*key)
        if len(keys) >= self._max_keys:
            # CLOCK-style second chance: look at a few of the oldest keys; drop the
            # first idle one, send busy ones to the back (hits cost nothing)
            for _ in range(8):
                old_key = next(iter(keys))
                old = keys.pop(old_key)
                if old is None or old.is_full(now_ms):
                    break
                keys[old_key] = old
            else:  # everything looked at is busy: share the rule's overflow bucket
                if limit is None:
                    return None
                idx = self._limits.index(limit)
                ob = self._overflow.get(idx)
                if ob is None:
                    ob = self._overflow[idx] = TokenBucket(limit, now_ms)
                return ob
        bucket = TokenBucket(limit, now_ms) if limit is not None else None
        keys[key] = bucket
        return bucket
