"""The ``GovernancePolicy`` discovery resource: validation, canonical form, history (sans-IO).

Both ends of the discovery stream use this module. The control plane calls
:func:`canonical_policy` on what an operator sends (a bad policy is refused
with every error listed, and changes nothing), stores the canonical JSON in a
:class:`~pb.GovernancePolicyRecord` with :func:`record_set` /
:func:`record_delete` (versions per service, never reused, bounded history)
and pushes :func:`current_policy` of the record. A proxy checks each delivery
with :func:`policy_from_message` (an invalid one is NACKed) and turns what it
holds into the :class:`~octoproxy.governance.PolicySet` it applies with
:func:`control_plane_policy_set`.

The body of a policy is the table ``[governance.services.<service>]`` of the
proxy's TOML (docs/governance.md, section 9) as a JSON object, so one parser,
:func:`~octoproxy.governance.parse_policy_set`, checks both sources; its
errors name the same keys (``governance.services.echo.retry.max_attempts``).

RouteRules and GovernancePolicy overlap on routing. The rule here: a
service's ``routing`` comes from its GovernancePolicy when that has a
``routing`` section; otherwise from its RouteRules (the older, rules-only
resource: ``octoproxy ctl routes``), as a routing policy with those rules and
every other routing default; otherwise the service has no pushed routing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..governance import PolicyError, PolicySet, RoutingPolicy, ServicePolicy, dump_policy_set, parse_policy_set
from ..governance._proto import rules_from_proto
from ..protocol.proto import octoproxy_discovery_pb2 as pb

__all__ = [
    "MAX_POLICY_JSON",
    "HISTORY_MAX",
    "HISTORY_MAX_BYTES",
    "canonical_policy",
    "policy_from_message",
    "record_set",
    "record_delete",
    "current_policy",
    "HeldPolicies",
    "control_plane_policy_set",
    "effective_policy_set",
]

#: the largest policy body (JSON text) stored or accepted
MAX_POLICY_JSON = 256 * 1024
#: versions kept in a service's history (the current one is always among them)
HISTORY_MAX = 20
#: bytes of policy text a service's history keeps (the newest version always stays): the record
#: is one etcd value, and etcd refuses requests over 1.5 MiB by default
HISTORY_MAX_BYTES = 768 * 1024


def _parse(service: str, body: object, version: str) -> ServicePolicy:
    ps = parse_policy_set({"version": version, "services": {service: body}})
    # a valid policy that governs nothing is kept as such: it overrides the proxy's own table
    return ps.services.get(service) or ServicePolicy(service=service)


def canonical_policy(service: str, body: object) -> tuple[str, ServicePolicy]:
    """Validate a service's policy table and return its canonical JSON.

    Args:
        service: the service the policy governs.
        body: the decoded JSON object, the shape of ``[governance.services.<service>]``.

    Returns:
        ``(canonical JSON, parsed policy)``: the JSON has every default
        spelled out and its keys sorted, so equal policies have equal text.

    Raises:
        PolicyError: listing every invalid or unknown key at once (or the
            canonical form is larger than :data:`MAX_POLICY_JSON`).
    """
    policy = _parse(service, body, "")
    dumped = dump_policy_set(PolicySet(services={service: policy}))["services"][service]
    text = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_POLICY_JSON:
        raise PolicyError([f"governance.services.{service}: {len(text)} bytes, more than the {MAX_POLICY_JSON} allowed"])
    return text, policy


def policy_from_message(msg: pb.GovernancePolicy) -> ServicePolicy:
    """Check and parse a delivered ``GovernancePolicy``.

    Raises:
        PolicyError: the body is too large, not a JSON object, or not a valid
            policy (every error listed).
    """
    key = f"governance.services.{msg.service}"
    if len(msg.policy_json) > MAX_POLICY_JSON:
        raise PolicyError([f"{key}: {len(msg.policy_json)} bytes, more than the {MAX_POLICY_JSON} allowed"])
    try:
        body = json.loads(msg.policy_json)
    except (ValueError, RecursionError) as exc:
        raise PolicyError([f"{key}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"]) from None
    return _parse(msg.service, body, str(msg.version))


def record_set(record: pb.GovernancePolicyRecord, service: str, policy_json: str, now_ms: int) -> pb.GovernancePolicyRecord:
    """A copy of ``record`` with ``policy_json`` as its new current version.

    The same text as the current version changes nothing (the copy is equal
    to ``record``).
    """
    new = pb.GovernancePolicyRecord()
    new.CopyFrom(record)
    new.service = service
    if new.current and any(v.version == new.current and v.policy_json == policy_json for v in new.history):
        return new
    version = new.last_version + 1
    new.history.add(version=version, policy_json=policy_json, created_unix_ms=now_ms, note="set")
    new.current = new.last_version = version
    _trim(new)
    return new


def record_delete(record: pb.GovernancePolicyRecord, now_ms: int) -> pb.GovernancePolicyRecord:
    """A copy of ``record`` with no policy in force (the history says when it went).

    Raises:
        KeyError: the service has no policy in force.
    """
    if not record.current:
        raise KeyError(record.service)
    new = pb.GovernancePolicyRecord()
    new.CopyFrom(record)
    new.last_version += 1
    new.history.add(version=new.last_version, policy_json="", created_unix_ms=now_ms, note="delete")
    new.current = 0
    _trim(new)
    return new


def _trim(record: pb.GovernancePolicyRecord) -> None:
    """Drop the oldest versions past :data:`HISTORY_MAX` or :data:`HISTORY_MAX_BYTES` (never the newest,
    which is the current version unless the policy was deleted)."""
    size = sum(len(v.policy_json) for v in record.history)
    while len(record.history) > 1 and (len(record.history) > HISTORY_MAX or size > HISTORY_MAX_BYTES):
        size -= len(record.history[0].policy_json)
        del record.history[0]


def current_policy(record: pb.GovernancePolicyRecord) -> pb.GovernancePolicy | None:
    """The resource to push for ``record``, or ``None`` if no policy is in force."""
    if not record.current:
        return None
    for v in record.history:
        if v.version == record.current:
            return pb.GovernancePolicy(service=record.service, version=v.version, policy_json=v.policy_json)
    return None  # (a record whose current version was trimmed: not written by record_set)


@dataclass(frozen=True, slots=True)
class HeldPolicies:
    """What a proxy's discovery client holds for one service (either part may be missing).

    Attributes:
        policy: ``(version number, parsed policy)`` of the service's GovernancePolicy.
        routes: ``(resource version, message)`` of the service's RouteRules.
        policy_resource_version: the GovernancePolicy's resource version (its
            content hash): version numbers restart when a control plane loses
            its store, content hashes do not collide.
    """

    policy: tuple[int, ServicePolicy] | None = None
    routes: tuple[str, pb.RouteRules] | None = None
    policy_resource_version: str = ""

    @property
    def routes_ignored(self) -> bool:
        """True when route rules are held but the policy's own routing section wins."""
        return self.routes is not None and self.policy is not None and self.policy[1].routing is not None


def control_plane_policy_set(held: Mapping[str, HeldPolicies]) -> PolicySet | None:
    """The policy set the control plane gives the services in ``held``.

    A service with neither a policy nor route rules is left out (the proxy's
    own ``[governance]`` table applies to it). A service with route rules and
    no routing section in its policy gets a routing policy made of those rules
    (every other routing key at its default). The version names every part,
    ``<service>=<policy version>[#<its content hash>][+routes:<route rules
    version>]`` joined with ``;`` in name order (``-`` when there is no
    policy), so equal versions mean equal content.

    Returns:
        The set, or ``None`` when no service has anything pushed.
    """
    services: dict[str, ServicePolicy] = {}
    parts = []
    for name in sorted(held):
        h = held[name]
        policy = h.policy[1] if h.policy is not None else None
        used_routes = ""
        if h.routes is not None and h.routes[1].rules and (policy is None or policy.routing is None):
            routing = RoutingPolicy(rules=rules_from_proto(h.routes[1]))
            policy = replace(policy, routing=routing) if policy is not None else ServicePolicy(service=name, routing=routing)
            used_routes = f"+routes:{h.routes[0][:12]}"
        if policy is None:
            continue
        services[name] = policy
        number = f"{h.policy[0]}#{h.policy_resource_version[:8]}" if h.policy is not None and h.policy_resource_version else (
            str(h.policy[0]) if h.policy is not None else "-"
        )
        parts.append(f"{name}={number}{used_routes}")
    if not services:
        return None
    return PolicySet(version=";".join(parts), services=services)



def effective_policy_set(local: PolicySet | None, pushed: PolicySet | None) -> PolicySet | None:
    """What the data path applies: the proxy's ``[governance]``, each service in ``pushed`` replacing its entry.

    A pushed service's policy replaces the local one as a whole (not key by
    key); an empty pushed policy governs nothing for that service. The
    version is the pushed set's, prefixed with ``local:<version>|`` when the
    proxy has a ``[governance]`` table.

    Returns:
        ``local`` when nothing is pushed; ``None`` when neither exists.
    """
    if pushed is None:
        return local
    if local is None:
        return pushed
    return PolicySet(version=f"local:{local.version}|{pushed.version}", services={**local.services, **pushed.services})
