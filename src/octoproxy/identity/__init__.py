"""Workload identity: SPIFFE names, the certificate authority, TLS contexts."""

from ._names import DEFAULT_TRUST_DOMAIN as DEFAULT_TRUST_DOMAIN
from ._names import parse_spiffe_id as parse_spiffe_id
from ._names import spiffe_id as spiffe_id

__all__ = ["DEFAULT_TRUST_DOMAIN", "parse_spiffe_id", "spiffe_id"]
