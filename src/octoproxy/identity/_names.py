"""Workload identity names (sans-IO): SPIFFE IDs for services.

A workload identity is a URI SAN in a certificate, never a string in a
header: ``spiffe://<trust-domain>/svc/<service>`` for a service's proxies,
``spiffe://<trust-domain>/controlplane`` for the control plane. Service names
follow the discovery protocol's rule (``check_service_name``); the trust
domain is a DNS-like label list (SPIFFE: lower-case letters, digits, ``.-_``).
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_TRUST_DOMAIN", "DEFAULT_LEAF_TTL", "CONTROL_PLANE_PATH", "spiffe_id", "parse_spiffe_id", "check_trust_domain"]

DEFAULT_TRUST_DOMAIN = "octoproxy.local"
#: default lifetime of a service certificate, seconds (Linkerd's 24 h): renewed at two thirds
DEFAULT_LEAF_TTL = 24 * 3600.0
CONTROL_PLANE_PATH = "/controlplane"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?\Z")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")  # as check_service_name (MAX_NAME_LENGTH 253)


def check_trust_domain(td: str) -> str:
    """Return ``td`` if it is a valid SPIFFE trust domain, else raise ValueError."""
    if not _TRUST_DOMAIN.match(td):
        raise ValueError(f"invalid trust domain {td!r}: lower-case letters, digits, '.', '-', '_'")
    return td


def spiffe_id(trust_domain: str, service: str) -> str:
    """The SPIFFE ID of ``service``'s proxies in ``trust_domain``.

    Raises:
        ValueError: if either name is not valid.
    """
    check_trust_domain(trust_domain)
    if not _SERVICE.match(service):
        raise ValueError(f"invalid service name {service!r}")
    return f"spiffe://{trust_domain}/svc/{service}"


def parse_spiffe_id(uri: str, trust_domain: str) -> str:
    """Return the service a SPIFFE ID names, if it is in ``trust_domain``.

    Raises:
        ValueError: for another scheme or trust domain, a path that is not
            ``/svc/<service>``, or an invalid service name.
    """
    prefix = f"spiffe://{trust_domain}/svc/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is not a service identity of trust domain {trust_domain!r}")
    service = uri[len(prefix):]
    if not _SERVICE.match(service):
        raise ValueError(f"{uri!r}: invalid service name {service!r}")
    return service
