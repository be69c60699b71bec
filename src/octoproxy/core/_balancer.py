"""Load-balancing policies: which endpoint gets the next request (sans-IO).

A policy is a plain object with one method, :meth:`Balancer.pick`, that looks
at the current endpoint list and returns one endpoint (or ``None``). Nothing
here does I/O or reads a clock; randomness comes from a ``random.Random`` the
caller passes in, so tests (and simulations) are reproducible from a seed.

Every policy skips endpoints that are unhealthy or have weight 0, and returns
``None`` when nothing is left. The endpoint list may change between calls
(discovery pushes, health flips); policies that keep state key it by
``Endpoint.address`` and forget addresses that disappear.

``Endpoint.active`` (requests in flight) is maintained by the caller of the
policy: increment it when a request is sent to the picked endpoint, decrement
it when the response (or error) comes back. Only :class:`LeastRequest` reads it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Endpoint",
    "Balancer",
    "RoundRobin",
    "WeightedRandom",
    "LeastRequest",
    "BALANCERS",
    "make_balancer",
]


@dataclass(eq=False, slots=True)
class Endpoint:
    """One upstream endpoint as the balancer sees it.

    Compared by identity (``eq=False``): two endpoints with the same address are
    still two objects, and callers mutate ``healthy`` / ``active`` / ``weight``
    in place.

    Attributes:
        address: ``"host:port"`` of the peer proxy; the key of per-endpoint state.
        weight: relative share of traffic; 0 takes the endpoint out of rotation.
        region: region of the endpoint (for locality-aware routing).
        idc: data centre of the endpoint.
        tags: free-form routing tags (e.g. a "set" / swimlane name).
        healthy: ``False`` takes the endpoint out of rotation.
        active: requests in flight to this endpoint, maintained by the caller.
        center: locality tier between region and IDC (governed routes only).
        backup: role ``backup``: a governed route uses it only when no normal
            endpoint is usable.
        warmup_start_ms: when its warm-up (slow start) began, in unix
            milliseconds; 0 = none. Governed routes ramp its weight.
        warmup_window_ms: its own warm-up length (registered with
            ``discovery.warmup``); 0 = the route policy's ``slow_start.window``.
    """

    address: str
    weight: int = 100
    region: str = ""
    idc: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    healthy: bool = True
    active: int = 0
    center: str = ""
    backup: bool = False
    warmup_start_ms: int = 0
    warmup_window_ms: int = 0


class Balancer(Protocol):
    """A load-balancing policy."""

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """Choose the endpoint for the next request.

        Args:
            endpoints: the cluster's current endpoints, in a stable order.

        Returns:
            A healthy endpoint with a positive weight, or ``None`` if there is none.
        """
        ...


def _eligible(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    return [ep for ep in endpoints if ep.healthy and ep.weight > 0]


class RoundRobin:
    """Smooth weighted round robin (the nginx algorithm).

    Each pick adds every eligible endpoint's weight to its running "current"
    score, picks the highest score (the earliest in the list on ties) and
    subtracts the total weight from the winner. Over any window of
    ``sum(weights)`` picks each endpoint is chosen exactly ``weight`` times,
    interleaved rather than in bursts (5/1/1 gives ``a a b a c a a``); equal
    weights give a plain rotation.

    Scores are kept per address, so the endpoint list may be rebuilt between
    calls; an address that is no longer eligible loses its score and starts
    again from 0 when it comes back.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """Choose the next endpoint in the weighted rotation.

        Args:
            endpoints: the cluster's current endpoints. Addresses should be
                unique; a repeated address is only considered once.

        Returns:
            The chosen endpoint, or ``None`` if none is healthy with weight > 0.
        """
        current = self._current
        seen: dict[str, int] = {}
        total = 0
        best: Endpoint | None = None
        best_score = 0
        for ep in endpoints:
            if not ep.healthy or ep.weight <= 0 or ep.address in seen:
                continue
            score = current.get(ep.address, 0) + ep.weight
            seen[ep.address] = score
            total += ep.weight
            if best is None or score > best_score:
                best, best_score = ep, score
        if best is None:
            self._current = {}
            return None
        seen[best.address] = best_score - total
        # Rebuilding the dict from `seen` also forgets departed addresses.
        self._current = seen
        return best


def _weighted_choice(rng: random.Random, candidates: Sequence[Endpoint], total: int) -> int:
    """Index of a candidate drawn with probability weight / total."""
    point = rng.randrange(total)
    for i, ep in enumerate(candidates):
        point -= ep.weight
        if point < 0:
            return i
    raise AssertionError("unreachable: total is the sum of the weights")


class WeightedRandom:
    """Pick an eligible endpoint at random, with probability proportional to weight.

    Args:
        rng: the source of randomness (seed it for reproducible picks).
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """Choose a random endpoint, weighted.

        Args:
            endpoints: the cluster's current endpoints.

        Returns:
            The chosen endpoint, or ``None`` if none is healthy with weight > 0.
        """
        candidates = _eligible(endpoints)
        if not candidates:
            return None
        return candidates[_weighted_choice(self._rng, candidates, sum(ep.weight for ep in candidates))]


class LeastRequest:
    """Power of *choices* random choices, by load relative to weight.

    Samples ``choices`` distinct eligible endpoints (weighted, without
    replacement) and returns the one with the lowest ``active / weight``; on a
    tie the one sampled first wins. With fewer eligible endpoints than
    ``choices``, all of them are compared.

    Args:
        rng: the source of randomness (seed it for reproducible picks).
        choices: how many endpoints to compare per pick (at least 1).

    Raises:
        ValueError: if ``choices`` is less than 1.
    """

    __slots__ = ("_rng", "_choices")

    def __init__(self, rng: random.Random, choices: int = 2) -> None:
        if choices < 1:
            raise ValueError(f"choices must be >= 1, got {choices}")
        self._rng = rng
        self._choices = choices

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """Choose the less loaded of ``choices`` randomly sampled endpoints.

        Args:
            endpoints: the cluster's current endpoints, with ``active`` kept
                up to date by the caller.

        Returns:
            The chosen endpoint, or ``None`` if none is healthy with weight > 0.
        """
        candidates = _eligible(endpoints)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        total = sum(ep.weight for ep in candidates)
        best: Endpoint | None = None
        for _ in range(min(self._choices, len(candidates))):
            ep = candidates.pop(_weighted_choice(self._rng, candidates, total))
            total -= ep.weight
            # active/weight compared by cross-multiplication: exact, no floats.
            if best is None or ep.active * best.weight < best.active * ep.weight:
                best = ep
        return best


#: Names accepted by :func:`make_balancer` (and by ``clusters.<name>.lb``).
BALANCERS: tuple[str, ...] = ("round_robin", "random", "least_request")


def make_balancer(name: str, *, rng: random.Random | None = None) -> Balancer:
    """Build a fresh policy by its configuration name.

    Args:
        name: one of :data:`BALANCERS`.
        rng: randomness for the random policies; a new unseeded
            ``random.Random`` when omitted. Ignored by ``round_robin``.

    Returns:
        A new policy object (policies keep per-cluster state: use one per cluster).

    Raises:
        ValueError: if ``name`` is not one of :data:`BALANCERS`.
    """
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return WeightedRandom(rng if rng is not None else random.Random())
    if name == "least_request":
        return LeastRequest(rng if rng is not None else random.Random())
    raise ValueError(f"unknown load balancer {name!r}; expected one of {', '.join(BALANCERS)}")
