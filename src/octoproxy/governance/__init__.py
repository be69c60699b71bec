"""Governance policy cores: routing, outlier ejection, circuit breakers, retries, rate limits, tracing.

Every module here is sans-IO (no Trio, no sockets, no clock reads: time is an
argument) and synchronous, built to sit in the kernel's declared pipeline as a
filter returning a :class:`Verdict` or as the balancer. How each plugs in is in
docs/governance.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names are bound on first use (PEP 562), each loading only its own module:
# the kernel needs the verdicts, the breaker's resources and the retry decision
# on every proxy, the policy parser and the other filters only when a policy
# set is configured or pushed (docs/benchmarks.md, "Idle RSS").
if TYPE_CHECKING:
    from ._breaker import BreakerError as BreakerError
    from ._breaker import BreakerLimits as BreakerLimits
    from ._breaker import CircuitBreaker as CircuitBreaker
    from ._breaker import Resource as Resource
    from ._outlier import OutlierConfig as OutlierConfig
    from ._outlier import OutlierDetector as OutlierDetector
    from ._outlier import OutlierError as OutlierError
    from ._outlier import is_failure as is_failure
    from ._policy import AccessLogConfig as AccessLogConfig
    from ._policy import PolicyError as PolicyError
    from ._policy import PolicySet as PolicySet
    from ._policy import ServicePolicy as ServicePolicy
    from ._policy import dump_policy_set as dump_policy_set
    from ._policy import parse_policy_set as parse_policy_set
    from ._ratelimit import Direction as Direction
    from ._ratelimit import RateLimiter as RateLimiter
    from ._ratelimit import RateLimitRule as RateLimitRule
    from ._ratelimit import TokenBucket as TokenBucket
    from ._retry import NOT_PROCESSED as NOT_PROCESSED
    from ._retry import BudgetConfig as BudgetConfig
    from ._retry import RetryBudget as RetryBudget
    from ._retry import RetryDecision as RetryDecision
    from ._retry import RetryPolicy as RetryPolicy
    from ._retry import decide as decide
    from ._routing import Locality as Locality
    from ._routing import LocalityMode as LocalityMode
    from ._routing import Member as Member
    from ._routing import RouteRule as RouteRule
    from ._routing import Router as Router
    from ._routing import RoutingPolicy as RoutingPolicy
    from ._routing import SlowStart as SlowStart
    from ._trace import TraceConfig as TraceConfig
    from ._trace import TraceContext as TraceContext
    from ._trace import Tracer as Tracer
    from ._trace import parse_traceparent as parse_traceparent
    from ._verdict import CONTINUE as CONTINUE
    from ._verdict import Kind as Kind
    from ._verdict import Verdict as Verdict
    from ._verdict import answer as answer
    from ._verdict import hold as hold

_LAZY = {
    "BreakerError": "._breaker",
    "BreakerLimits": "._breaker",
    "CircuitBreaker": "._breaker",
    "Resource": "._breaker",
    "OutlierConfig": "._outlier",
    "OutlierDetector": "._outlier",
    "OutlierError": "._outlier",
    "is_failure": "._outlier",
    "AccessLogConfig": "._policy",
    "PolicyError": "._policy",
    "PolicySet": "._policy",
    "ServicePolicy": "._policy",
    "dump_policy_set": "._policy",
    "parse_policy_set": "._policy",
    "Direction": "._ratelimit",
    "RateLimiter": "._ratelimit",
    "RateLimitRule": "._ratelimit",
    "TokenBucket": "._ratelimit",
    "NOT_PROCESSED": "._retry",
    "BudgetConfig": "._retry",
    "RetryBudget": "._retry",
    "RetryDecision": "._retry",
    "RetryPolicy": "._retry",
    "decide": "._retry",
    "Locality": "._routing",
    "LocalityMode": "._routing",
    "Member": "._routing",
    "RouteRule": "._routing",
    "Router": "._routing",
    "RoutingPolicy": "._routing",
    "SlowStart": "._routing",
    "TraceConfig": "._trace",
    "TraceContext": "._trace",
    "Tracer": "._trace",
    "parse_traceparent": "._trace",
    "CONTINUE": "._verdict",
    "Kind": "._verdict",
    "Verdict": "._verdict",
    "answer": "._verdict",
    "hold": "._verdict",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # bound once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
