"""Request-aware endpoint selection: rules, locality, backups and warm-up (sans-IO).

Theory of operation
-------------------
A :class:`Router` serves one cluster. It holds the cluster's members (each a
:class:`~octoproxy.core._balancer.Endpoint` plus the fields the balancer does not
have yet: center, backup role, warm-up start), a :class:`RoutingPolicy` and the
proxy's own :class:`Locality`. For a request (service, method, metadata) it

1. finds the first :class:`RouteRule` that matches (service, method: exact,
   ``Prefix*`` or any; every ``match_metadata`` pair present in the request);
2. takes the rule's subset (members whose tags contain every ``endpoint_tags``
   pair); when no member of the subset is usable it either answers NO_ROUTE
   (``force``) or falls back to the members outside the subset;
3. keeps the usable members (healthy, not ejected, weight > 0 after the rule's
   ``weight_overrides``); normal members first, backups only when no normal
   member is usable;
4. scales weights by locality (the best tier present among same IDC, same
   center, same region, any keeps full weight; the others keep x0.001 in the
   same region and x0.000001 elsewhere, or nothing when ``enforce``) and by
   warm-up (Envoy's slow start: ``max(min%, (t / window) ** (1 / aggression))``,
   with ``t`` taken at the start of the current time step);
5. draws from cumulative weights with one ``random()`` and one ``bisect``.

Steps 2-4 depend only on (members, health, rule, time bucket), so their result
is a table cached per rule index and rebuilt only when the epoch moves
(:meth:`Router.update`, :meth:`Router.set_ejected`, :meth:`Router.invalidate`,
:meth:`Router.set_policy`) or when a warm-up weight moves to its next time step.
A pick is a dict lookup, a few comparisons, ``random()`` and ``bisect``.

Times are integers in milliseconds on one clock chosen by the caller; warm-up
starts come from the control plane in unix milliseconds, so the shell either
passes unix milliseconds here or converts the starts when it installs members.
"""

from __future__ import annotations

import enum
import math
import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..core._balancer import Endpoint
from ..protocol._protocol import Status
from ._verdict import Verdict, answer

__all__ = [
    "Locality",
    "LocalityMode",
    "SlowStart",
    "RouteRule",
    "RoutingPolicy",
    "Member",
    "Router",
    "method_matches",
    "slow_start_factor",
]

_NEVER = math.inf


@dataclass(frozen=True, slots=True)
class Locality:
    """Where something runs: region > center > IDC. Empty fields are unknown and never match."""

    region: str = ""
    center: str = ""
    idc: str = ""


class LocalityMode(enum.Enum):
    """How a route uses locality."""

    #: ignore locality: every usable endpoint keeps its weight
    OFF = "off"
    #: prefer the nearest tier present, keep a trickle of weight elsewhere (OCTO's MNS)
    PREFER = "prefer"
    #: only the nearest tier present receives traffic
    ENFORCE = "enforce"


@dataclass(frozen=True, slots=True)
class SlowStart:
    """Warm-up of new endpoints, as Envoy's ``slow_start_config``.

    Attributes:
        window_ms: length of the ramp; 0 turns warm-up off.
        aggression: the curve, ``(t / window) ** (1 / aggression)``; 1.0 is linear.
        min_weight_percent: floor of the factor, in percent of the full weight.
        step_ms: warm-up weights are recomputed at most once per step.
    """

    window_ms: int = 0
    aggression: float = 1.0
    min_weight_percent: float = 10.0
    step_ms: int = 1000


def slow_start_factor(slow: SlowStart, start_ms: int, now_ms: int) -> float:
    """The weight factor of an endpoint that began warming up at ``start_ms``.

    Args:
        slow: the warm-up configuration.
        start_ms: when warm-up began (0 = never: no warm-up).
        now_ms: the current time on the same clock.

    Returns:
        A factor in ``[min_weight_percent / 100, 1]``; 1.0 outside the window.
    """
    if slow.window_ms <= 0 or start_ms <= 0:
        return 1.0
    elapsed = now_ms - start_ms
    if elapsed >= slow.window_ms:
        return 1.0
    time_factor = max(elapsed, 1) / slow.window_ms
    curve: float = time_factor ** (1.0 / slow.aggression)
    return max(slow.min_weight_percent / 100.0, curve)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One routing rule (the proto's ``RouteRule`` plus ``service`` and ``force``).

    Attributes:
        name: for reasons, logs and metrics.
        service: callee service to match; "" matches any.
        method: "" or "*" any, ``"Get*"`` a prefix, else exact.
        match_metadata: request metadata must contain all these pairs.
        endpoint_tags: the subset: endpoints whose tags contain all these pairs.
        weight_overrides: endpoint address -> weight (0 = no traffic) under this rule.
        force: an empty subset answers NO_ROUTE instead of falling back to the rest.
        timeout_ms: request timeout of matching requests; 0 = the route's own.
    """

    name: str
    service: str = ""
    method: str = ""
    match_metadata: tuple[tuple[str, str], ...] = ()
    endpoint_tags: tuple[tuple[str, str], ...] = ()
    weight_overrides: Mapping[str, int] = field(default_factory=dict)
    force: bool = False
    timeout_ms: int = 0


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The routing part of a route's policy.

    Attributes:
        rules: in order; the first that matches applies.
        locality: off, prefer (default) or enforce.
        same_region_factor: weight factor of non-preferred endpoints in the proxy's region.
        other_region_factor: weight factor of endpoints in other regions.
        slow_start: warm-up of new endpoints.
    """

    rules: tuple[RouteRule, ...] = ()
    locality: LocalityMode = LocalityMode.PREFER
    same_region_factor: float = 0.001
    other_region_factor: float = 0.000001
    slow_start: SlowStart = SlowStart()


@dataclass(eq=False, slots=True)
class Member:
    """An endpoint with the routing facts the balancer's ``Endpoint`` lacks.

    Attributes:
        endpoint: the shared balancer endpoint (address, weight, region, idc, tags, healthy).
        center: the endpoint's center (between region and IDC).
        backup: role ``backup``: used only when no normal endpoint is usable.
        warmup_start_ms: when its warm-up began; 0 = no warm-up.
        warmup_window_ms: its own warm-up length; 0 = the policy's window.
    """

    endpoint: Endpoint
    center: str = ""
    backup: bool = False
    warmup_start_ms: int = 0
    warmup_window_ms: int = 0


def method_matches(pattern: str, method: str) -> bool:
    """Whether ``method`` matches a rule's method pattern.

    Args:
        pattern: "" or "*" (any), ``"Prefix*"``, or an exact name.
        method: the request's method.

    Returns:
        True on a match.
    """
    if not pattern or pattern == "*":
        return True
    if pattern[-1] == "*":
        return method.startswith(pattern[:-1])
    return method == pattern


def _pairs_match(have: Mapping[str, str], want: tuple[tuple[str, str], ...]) -> bool:
    for k, v in want:
        if have.get(k) != v:
            return False
    return True


class _Table:
    """A precomputed draw: endpoints, cumulative weights, or a verdict."""

    __slots__ = ("epoch", "valid_until", "endpoints", "cum", "total", "verdict", "exhausted")

    def __init__(self, epoch: int, valid_until: float) -> None:
        self.epoch = epoch
        self.valid_until = valid_until
        self.endpoints: list[Endpoint] = []
        self.cum: list[float] = []
        self.total = 0.0
        self.verdict: Verdict | None = None
        self.exhausted: Verdict | None = None


class Router:
    """Request-aware endpoint selection for one cluster.

    Args:
        cluster: the cluster's name (for reasons).
        policy: the routing policy.
        local: the proxy's own locality (from its configuration).
        rng: randomness (seed it for reproducible picks).
    """

    __slots__ = ("cluster", "local", "_policy", "_rng", "_random", "_members", "_ejected", "_epoch", "_tables", "_by_service")

    def __init__(self, cluster: str, policy: RoutingPolicy, local: Locality, rng: random.Random) -> None:
        self.cluster = cluster
        self.local = local
        self._policy = policy
        self._rng = rng
        self._random = rng.random
        self._members: tuple[Member, ...] = ()
        self._ejected: set[str] = set()
        self._epoch = 0
        self._tables: dict[int, _Table] = {}
        # service -> method -> candidate rules (index, metadata pairs), by service/method only
        self._by_service: dict[str, dict[str, tuple[tuple[int, tuple[tuple[str, str], ...]], ...]]] = {}

    @property
    def policy(self) -> RoutingPolicy:
        """The current routing policy."""
        return self._policy

    @property
    def epoch(self) -> int:
        """Bumped by every change that invalidates the cached tables."""
        return self._epoch

    def _bump(self) -> None:
        self._epoch += 1

    def update(self, members: Sequence[Member]) -> None:
        """Install the cluster's members (a new cluster version from discovery).

        Args:
            members: every endpoint of the cluster, normal and backup.
        """
        self._members = tuple(members)
        present = {m.endpoint.address for m in self._members}
        self._ejected &= present
        self._bump()

    def set_policy(self, policy: RoutingPolicy) -> None:
        """Install a new routing policy (a pushed update); picks after this use it.

        Args:
            policy: the new policy.
        """
        self._policy = policy
        self._by_service.clear()
        self._tables.clear()
        self._bump()

    def set_ejected(self, address: str, ejected: bool) -> None:
        """Take an endpoint out of rotation (outlier ejection) or put it back.

        Args:
            address: the endpoint's address.
            ejected: True to eject, False to restore.
        """
        if ejected == (address in self._ejected):
            return
        if ejected:
            self._ejected.add(address)
        else:
            self._ejected.discard(address)
        self._bump()

    def invalidate(self) -> None:
        """Recompute on the next pick: call after flipping ``Endpoint.healthy`` or ``weight`` in place."""
        self._bump()

    # ---------------------------------------------------------------- matching

    def _candidates(self, service: str, method: str) -> tuple[tuple[int, tuple[tuple[str, str], ...]], ...]:
        by_method = self._by_service.get(service)
        if by_method is None:
            if len(self._by_service) >= 1024:  # bounded: a flood of names cannot pin memory
                self._by_service.clear()
            by_method = self._by_service[service] = {}
        found = by_method.get(method)
        if found is None:
            found = tuple(
                (i, r.match_metadata)
                for i, r in enumerate(self._policy.rules)
                if (not r.service or r.service == service) and method_matches(r.method, method)
            )
            if len(by_method) >= 1024:
                by_method.clear()
            by_method[method] = found
        return found

    def match(self, service: str, method: str, metadata: Mapping[str, str]) -> int:
        """Index of the first rule matching the request, or -1.

        Args:
            service: the callee service.
            method: the method.
            metadata: the request's metadata (only the rules' keys are read).

        Returns:
            The rule's index in ``policy.rules``, or -1 when none matches.
        """
        if not self._policy.rules:
            return -1
        for i, pairs in self._candidates(service, method):
            if not pairs or _pairs_match(metadata, pairs):
                return i
        return -1

    # ---------------------------------------------------------------- tables

    def _usable(self, m: Member) -> bool:
        return m.endpoint.healthy and m.endpoint.address not in self._ejected

    def _build(self, index: int, now_ms: int) -> _Table:
        policy = self._policy
        rule = policy.rules[index] if index >= 0 else None
        label = f"cluster {self.cluster!r}" + (f", rule {rule.name!r}" if rule is not None else "")
        members: Sequence[Member] = self._members
        overrides = rule.weight_overrides if rule is not None else {}

        def weight(m: Member) -> int:
            return overrides.get(m.endpoint.address, m.endpoint.weight)

        if rule is not None and rule.endpoint_tags:
            subset = [m for m in members if _pairs_match(m.endpoint.tags, rule.endpoint_tags)]
            if not any(self._usable(m) and weight(m) > 0 for m in subset):
                if rule.force:
                    t = _Table(self._epoch, _NEVER)
                    tags = ",".join(f"{k}={v}" for k, v in rule.endpoint_tags)
                    t.verdict = answer(Status.NO_ROUTE, f"{label}: no healthy endpoint with tags {tags} (force)")
                    return t
                inside = {id(m) for m in subset}
                members = [m for m in members if id(m) not in inside]
            else:
                members = subset
        usable = [m for m in members if self._usable(m) and weight(m) > 0]
        chosen = [m for m in usable if not m.backup] or [m for m in usable if m.backup]
        t = _Table(self._epoch, _NEVER)
        t.exhausted = answer(Status.UNAVAILABLE, f"no endpoint left to try in {label}")
        if not chosen:
            t.verdict = answer(Status.UNAVAILABLE, f"no healthy endpoint in {label}")
            return t
        factors = self._locality_factors(chosen)
        slow = policy.slow_start
        # warm-up weights are taken at the start of the current step, so a table
        # is the same whichever request in the step builds it
        step = max(1, slow.step_ms)
        at = now_ms // step * step
        total = 0.0
        for m, f in zip(chosen, factors):
            if f <= 0.0:
                continue
            own = m.warmup_window_ms
            ramp = slow if not own or own == slow.window_ms else replace(slow, window_ms=own)
            if ramp.window_ms > 0 and m.warmup_start_ms > 0 and at - m.warmup_start_ms < ramp.window_ms:
                f *= slow_start_factor(ramp, m.warmup_start_ms, at)
                t.valid_until = at + step  # the weight moves at the next step
            total += weight(m) * f
            t.endpoints.append(m.endpoint)
            t.cum.append(total)
        t.total = total
        if not t.endpoints:  # enforce removed everything (cannot happen: the best tier stays)
            t.verdict = answer(Status.UNAVAILABLE, f"no healthy endpoint in {label}")
        return t

    def _locality_factors(self, chosen: list[Member]) -> list[float]:
        policy = self._policy
        local = self.local
        if policy.locality is LocalityMode.OFF or not (local.region or local.center or local.idc):
            return [1.0] * len(chosen)

        def tier(m: Member) -> int:
            ep = m.endpoint
            if local.idc and ep.idc == local.idc:
                return 0
            if local.center and m.center == local.center:
                return 1
            if local.region and ep.region == local.region:
                return 2
            return 3

        tiers = [tier(m) for m in chosen]
        best = min(tiers)
        enforce = policy.locality is LocalityMode.ENFORCE
        out = []
        for tr, m in zip(tiers, chosen):
            if tr == best:
                out.append(1.0)
            elif enforce:
                out.append(0.0)
            elif local.region and m.endpoint.region == local.region:
                out.append(policy.same_region_factor)
            else:
                out.append(policy.other_region_factor)
        return out

    def _table(self, index: int, now_ms: int) -> _Table:
        t = self._tables.get(index)
        if t is None or t.epoch != self._epoch or now_ms >= t.valid_until:
            t = self._tables[index] = self._build(index, now_ms)
        return t

    # ---------------------------------------------------------------- picking

    def pick(
        self,
        service: str,
        method: str,
        metadata: Mapping[str, str],
        now_ms: int,
        exclude: frozenset[str] | None = None,
    ) -> Endpoint | Verdict:
        """Choose the endpoint for a request.

        Args:
            service: the callee service.
            method: the method.
            metadata: the request's metadata.
            now_ms: the current time (warm-up).
            exclude: addresses already tried by this call (retries); ``None`` on a first try.

        Returns:
            The endpoint, or an answer verdict: NO_ROUTE (a ``force`` rule's
            subset is empty) or UNAVAILABLE (nothing usable, or nothing left
            outside ``exclude``).
        """
        index = -1
        if self._policy.rules:  # match() inlined: this is the per-request path
            by_method = self._by_service.get(service)
            found = by_method.get(method) if by_method is not None else None
            if found is None:
                found = self._candidates(service, method)
            for i, pairs in found:
                for k, v in pairs:
                    if metadata.get(k) != v:
                        break
                else:
                    index = i
                    break
        t = self._tables.get(index)
        if t is None or t.epoch != self._epoch or now_ms >= t.valid_until:
            t = self._tables[index] = self._build(index, now_ms)
        if t.verdict is not None:
            return t.verdict
        eps = t.endpoints
        if exclude:
            return self._pick_excluding(t, exclude)
        if len(eps) == 1:
            return eps[0]
        i = bisect_right(t.cum, self._random() * t.total)
        return eps[i if i < len(eps) else -1]

    def _pick_excluding(self, t: _Table, exclude: frozenset[str]) -> Endpoint | Verdict:
        eps, cum = t.endpoints, t.cum
        for _ in range(4):  # rejection sampling: cheap when few endpoints are excluded
            i = bisect_right(cum, self._random() * t.total)
            ep = eps[i if i < len(eps) else -1]
            if ep.address not in exclude:
                return ep
        left: list[tuple[Endpoint, float]] = []
        prev = 0.0
        for ep, c in zip(eps, cum):
            if ep.address not in exclude:
                left.append((ep, c - prev))
            prev = c
        if not left:
            assert t.exhausted is not None
            return t.exhausted
        total = sum(w for _, w in left)
        x = self._random() * total
        for ep, w in left:
            x -= w
            if x < 0:
                return ep
        return left[-1][0]

    def shares(self, service: str, method: str, metadata: Mapping[str, str], now_ms: int) -> dict[str, float]:
        """Each endpoint's probability of being picked for such a request (for tests and ``/clusters``).

        Args:
            service: the callee service.
            method: the method.
            metadata: the request's metadata.
            now_ms: the current time.

        Returns:
            address -> probability; empty when the request would be answered instead.
        """
        t = self._table(self.match(service, method, metadata), now_ms)
        if t.verdict is not None or t.total <= 0:
            return {}
        out: dict[str, float] = {}
        prev = 0.0
        for ep, c in zip(t.endpoints, t.cum):
            out[ep.address] = out.get(ep.address, 0.0) + (c - prev) / t.total
            prev = c
        return out
