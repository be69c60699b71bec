"""Workload identity: SPIFFE names, the certificate authority, CSRs.

The names are imported at once; the X.509 parts (``cryptography``) only
when first used, so that a proxy that does not use them starts as fast and
as small as before (``octoproxy run`` imports the discovery client, which
imports this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._names import DEFAULT_LEAF_TTL as DEFAULT_LEAF_TTL
from ._names import DEFAULT_TRUST_DOMAIN as DEFAULT_TRUST_DOMAIN
from ._names import parse_spiffe_id as parse_spiffe_id
from ._names import spiffe_id as spiffe_id

if TYPE_CHECKING:
    from ._ca import CertificateAuthority as CertificateAuthority
    from ._ca import CertificateError as CertificateError
    from ._ca import IssuedCertificate as IssuedCertificate
    from ._ca import control_plane_id as control_plane_id
    from ._ca import load_or_create_ca as load_or_create_ca
    from ._csr import make_key_and_csr as make_key_and_csr

_LAZY = {
    "CertificateAuthority": "._ca",
    "CertificateError": "._ca",
    "IssuedCertificate": "._ca",
    "control_plane_id": "._ca",
    "load_or_create_ca": "._ca",
    "make_key_and_csr": "._csr",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
