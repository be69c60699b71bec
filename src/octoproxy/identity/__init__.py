"""Workload identity: SPIFFE names, the certificate authority, TLS contexts."""

from ._ca import DEFAULT_LEAF_TTL as DEFAULT_LEAF_TTL
from ._ca import CertificateAuthority as CertificateAuthority
from ._ca import CertificateError as CertificateError
from ._ca import IssuedCertificate as IssuedCertificate
from ._ca import control_plane_id as control_plane_id
from ._ca import load_or_create_ca as load_or_create_ca
from ._csr import make_key_and_csr as make_key_and_csr
from ._names import DEFAULT_TRUST_DOMAIN as DEFAULT_TRUST_DOMAIN
from ._names import parse_spiffe_id as parse_spiffe_id
from ._names import spiffe_id as spiffe_id

__all__ = [
    "DEFAULT_LEAF_TTL",
    "DEFAULT_TRUST_DOMAIN",
    "CertificateAuthority",
    "CertificateError",
    "IssuedCertificate",
    "control_plane_id",
    "load_or_create_ca",
    "make_key_and_csr",
    "parse_spiffe_id",
    "spiffe_id",
]
