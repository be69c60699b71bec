"""Caller authorization (OCTO's KMS): allow and deny lists by caller identity (sans-IO).

Theory of operation
-------------------
A :class:`Policy` belongs to one service (the one this proxy's inbound side
serves). It is a default (``"allow"``: every caller; ``"deny"``: callers no
allow rule names) and an ordered list of :class:`Rule`, each ``allow`` or
``deny`` for some callers (service names, or ``"*"``) and some methods (exact,
a prefix ``"Get*"``, or ``"*"``). The decision for (caller, method):

1. a matching **deny** rule denies (deny wins over allow, whatever the order);
2. else a matching **allow** rule allows;
3. else the default decides.

The caller is the service named by the peer's verified certificate, or None
when the connection carries no verified identity (plaintext mode). None never
matches an allow rule (there is nothing to allow), but ``"*"`` in a deny rule
matches it. A denial of a verified caller is PERMISSION_DENIED; a denial of
an unverified one is UNAUTHENTICATED. Reasons name the caller and the rule.

Cost: the data path asks :meth:`Policy.for_caller` once per connection (the
caller is fixed per connection). When the answer cannot depend on the method
(no rule that applies to this caller names methods), that single verdict is
used for every frame and nothing is looked up per request; otherwise a small
per-connection cache maps method -> verdict. A policy with no rules and
default ``allow`` is skipped entirely.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol._protocol import Status

__all__ = ["Rule", "Policy", "CallerView", "ALLOW", "parse_rules"]

#: the verdict "allowed"; a denial is a (status, reason) pair
ALLOW: None = None
_CACHE_LIMIT = 1024


def _method_matches(pattern: str, method: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return method.startswith(pattern[:-1])
    return method == pattern


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry.

    Attributes:
        action: ``"allow"`` or ``"deny"``.
        callers: service names, or ``"*"`` for every caller.
        methods: exact names, prefixes ending in ``*`` (``"Get*"``), or ``"*"``.
        index: its position in the policy (for reasons).
    """

    action: str
    callers: tuple[str, ...]
    methods: tuple[str, ...] = ("*",)
    index: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("allow", "deny"):
            raise ValueError(f"rule action must be 'allow' or 'deny', got {self.action!r}")
        if not self.callers:
            raise ValueError("rule needs at least one caller (a service name or '*')")
        if not self.methods:
            raise ValueError("rule needs at least one method (a name, a prefix 'Get*', or '*')")
        for m in self.methods:
            if not m or "*" in m[:-1]:
                raise ValueError(f"bad method pattern {m!r}: a name, a prefix ending in '*', or '*'")

    def names(self, caller: str | None) -> bool:
        if caller is None:
            return self.action == "deny" and "*" in self.callers
        return "*" in self.callers or caller in self.callers

    @property
    def any_method(self) -> bool:
        return "*" in self.methods

    def matches_method(self, method: str) -> bool:
        return any(_method_matches(p, method) for p in self.methods)

    def describe(self) -> str:
        return f"authz rule #{self.index} ({self.action} callers={list(self.callers)} methods={list(self.methods)})"


def parse_rules(items: Iterable[tuple[str, Sequence[str], Sequence[str]]]) -> tuple[Rule, ...]:
    """Build rules from (action, callers, methods) triples, numbering them from 0."""
    return tuple(Rule(a, tuple(c), tuple(m), i) for i, (a, c, m) in enumerate(items))


@dataclass(frozen=True)
class Policy:
    """The authorization policy of one service.

    Attributes:
        service: the service it protects (for reasons).
        default: ``"allow"`` or ``"deny"`` when no rule matches.
        rules: the rules, in order.
        version: where it came from (``"config"``, or the control plane's version).
    """

    service: str
    default: str = "allow"
    rules: tuple[Rule, ...] = ()
    version: str = "config"
    _empty: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if self.default not in ("allow", "deny"):
            raise ValueError(f"authz default must be 'allow' or 'deny', got {self.default!r}")
        object.__setattr__(self, "_empty", not self.rules and self.default == "allow")

    @property
    def allows_everything(self) -> bool:
        """No rules and default allow: the data path skips the check entirely."""
        return self._empty

    def decide(self, caller: str | None, method: str) -> tuple[Status, str] | None:
        """The verdict for one request: None (allowed) or (status, reason)."""
        applicable = [r for r in self.rules if r.names(caller)]
        return self._decide(caller, method, applicable)

    def _decide(self, caller: str | None, method: str, applicable: Sequence[Rule]) -> tuple[Status, str] | None:
        for r in applicable:
            if r.action == "deny" and r.matches_method(method):
                return self._deny(caller, method, f"denied by {r.describe()}")
        for r in applicable:
            if r.action == "allow" and r.matches_method(method):
                return ALLOW
        if self.default == "allow":
            return ALLOW
        return self._deny(caller, method, f"no allow rule matches and authz default is 'deny' ({len(self.rules)} rules)")

    def _deny(self, caller: str | None, method: str, why: str) -> tuple[Status, str]:
        if caller is None:
            return Status.UNAUTHENTICATED, f"no verified caller identity for {self.service}/{method}: {why}"
        return Status.PERMISSION_DENIED, f"caller {caller!r} may not call {self.service}/{method}: {why}"

    def for_caller(self, caller: str | None) -> CallerView:
        """What the data path keeps for one connection (its caller is fixed)."""
        return CallerView(self, caller)


class CallerView:
    """A policy seen by one caller: a fixed verdict, or a method -> verdict cache.

    Attributes:
        uniform: True when the verdict does not depend on the method.
        verdict: that verdict (when uniform; a denial's reason is still
            written per method by :meth:`check`).
    """

    __slots__ = ("policy", "caller", "applicable", "uniform", "verdict", "_cache")

    def __init__(self, policy: Policy, caller: str | None) -> None:
        self.policy = policy
        self.caller = caller
        self.applicable = tuple(r for r in policy.rules if r.names(caller))
        self.uniform = all(r.any_method for r in self.applicable)
        self.verdict = policy._decide(caller, "*", self.applicable) if self.uniform else ALLOW
        self._cache: dict[bytes, tuple[Status, str] | None] = {}

    def check(self, method: bytes) -> tuple[Status, str] | None:
        """The verdict for ``method`` (raw bytes from the frame)."""
        if self.uniform and self.verdict is None:
            return ALLOW
        cache = self._cache
        try:
            return cache[method]
        except KeyError:
            pass
        v = self.policy._decide(self.caller, method.decode(errors="replace"), self.applicable)
        if len(cache) < _CACHE_LIMIT:
            cache[method] = v
        return v


def policy_from_config(service: str, default: str, rules: Iterable[tuple[str, Sequence[str], Sequence[str]]], version: str = "config") -> Policy:
    """A :class:`Policy` from configuration data (``[authz]``, or a pushed resource).

    Raises:
        ValueError: a bad action, default or method pattern.
    """
    return Policy(service, default, parse_rules(rules), version)


def policy_from_message(msg: Any, service: str, version: str) -> Policy:
    """A :class:`Policy` from a pushed ``AuthorizationPolicy`` resource.

    Fields: ``service``, ``default_action`` ("" = "allow"), ``rules`` of
    (``action``, ``callers``, ``methods``; no methods = every method).

    Raises:
        ValueError: anything invalid; the update is then rejected as a whole
            (NACK) and the policy in force does not change.
    """
    if msg.service and msg.service != service:
        raise ValueError(f"policy for service {msg.service!r} pushed to a proxy of {service!r}")
    items = []
    for i, r in enumerate(msg.rules):
        callers = [str(c) for c in r.callers]
        if any(not c for c in callers):
            raise ValueError(f"rule #{i}: empty caller name")
        items.append((str(r.action), callers, [str(m) for m in r.methods] or ["*"]))
    try:
        return policy_from_config(service, str(msg.default_action) or "allow", items, version)
    except ValueError as exc:
        raise ValueError(f"invalid authorization policy for {service!r}: {exc}") from None
