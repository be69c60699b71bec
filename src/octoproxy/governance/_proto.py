"""From the discovery protobuf messages to the routing core's types (sans-IO).

The control plane already pushes ``RouteRules`` and endpoints with region,
IDC, tags, weight and warm-up start; these functions are what the proxy's
discovery shell will call instead of dropping them. Fields the messages do not
carry yet (an endpoint's center and backup role, a rule's ``force`` in the
issue's sense, the route's locality mode and slow-start window) are listed in
docs/governance.md, "Proto fields to add".

Semantics kept from docs/control-plane.md: a rule whose subset is empty fails
with NO_ROUTE unless ``fallback_to_all`` is set, so a proto rule maps to
``force = not fallback_to_all``; a weight of 0 in an ``Endpoint`` means unset
(100); only ``HEALTHY`` endpoints are routable.
"""

from __future__ import annotations

from ..core._balancer import Endpoint
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._routing import Member, RouteRule

__all__ = ["rule_from_proto", "rules_from_proto", "member_from_proto"]


def rule_from_proto(msg: pb.RouteRule, service: str) -> RouteRule:
    """Convert one ``RouteRule`` message.

    Args:
        msg: the message.
        service: the service of the enclosing ``RouteRules``.

    Returns:
        The routing core's rule.
    """
    return RouteRule(
        name=msg.name,
        service=service,
        method=msg.method,
        match_metadata=tuple(sorted(msg.match_metadata.items())),
        endpoint_tags=tuple(sorted(msg.endpoint_tags.items())),
        weight_overrides=dict(msg.weight_overrides),
        force=not msg.fallback_to_all,
        timeout_ms=msg.timeout_ms,
    )


def rules_from_proto(msg: pb.RouteRules) -> tuple[RouteRule, ...]:
    """Convert a service's ``RouteRules`` (order kept: the first match applies)."""
    return tuple(rule_from_proto(r, msg.service) for r in msg.rules)


def member_from_proto(msg: pb.Endpoint) -> Member:
    """Convert an ``Endpoint`` message (warm-up start in unix milliseconds).

    Args:
        msg: the message.

    Returns:
        A new member; routable only when its status is ``HEALTHY``.
    """
    ep = Endpoint(
        address=msg.address,
        weight=msg.weight or 100,
        region=msg.region,
        idc=msg.idc,
        tags=dict(msg.tags),
        healthy=msg.status == pb.Endpoint.HEALTHY,
    )
    return Member(ep, warmup_start_ms=msg.warmup_start_unix_ms)
