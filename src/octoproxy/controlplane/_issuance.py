"""Answering a ``CertificateRequest`` (sans-IO: the CA, the principal and the time come in).

The session's principal decides the identity, never the CSR: a service
principal gets a certificate of its own service; an operator gets none (it
has no service identity); in ``--insecure-no-auth`` mode, where everyone is
an operator, the service the CSR's SPIFFE URI SAN asks for is taken, since
there is nothing better to go by (that mode trusts everyone by definition).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..identity import parse_spiffe_id
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._auth import Principal

if TYPE_CHECKING:  # cryptography is imported when a certificate is requested, not by every proxy
    from ..identity import CertificateAuthority

__all__ = ["answer_certificate_request"]

logger = logging.getLogger("octoproxy.controlplane.issuance")


def _requested_service(csr_pem: str, trust_domain: str) -> str | None:
    """The service a CSR's SPIFFE URI SAN asks for (``--insecure-no-auth`` only)."""
    from cryptography import x509

    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return parse_spiffe_id(uri, trust_domain)
        except ValueError:
            continue
    return None


def answer_certificate_request(
    ca: CertificateAuthority | None,
    principal: Principal,
    trust_domain: str,
    leaf_ttl: float,
    req: pb.CertificateRequest,
    now: float,
) -> pb.CertificateResponse:
    """Sign ``req``'s CSR for ``principal`` (see the module doc), or say why not.

    Returns:
        The ``CertificateResponse``: the chain, trust bundle and expiry, or
        ``error`` (a missing CA, an operator, a refused CSR).
    """
    service = principal.service
    if ca is None:
        error = "this control plane issues no certificates (it was started without a CA)"
    elif principal.via == "insecure":
        service = _requested_service(req.csr_pem, trust_domain) or ""
        error = "" if service else "insecure mode: the CSR must carry a spiffe://<td>/svc/<service> URI SAN"
    elif principal.kind != "service":
        error = "operators have no service identity: authenticate with the service's join token"
    else:
        error = ""
    if error or ca is None:
        return pb.CertificateResponse(request_id=req.request_id, error=error)
    from ..identity import CertificateError

    try:
        issued = ca.sign_csr(req.csr_pem, service, now, leaf_ttl)
    except (CertificateError, ValueError) as exc:
        logger.warning("certificate for %s refused: %s", principal.describe(), exc)
        return pb.CertificateResponse(request_id=req.request_id, error=f"CSR refused: {exc}")
    logger.info("issued a certificate to %s (serial %x)", principal.describe(), issued.serial)
    return pb.CertificateResponse(
        request_id=req.request_id,
        certificate_chain_pem=issued.chain_pem,
        trust_bundle_pem=issued.trust_bundle_pem,
        not_after_unix_ms=issued.not_after_unix_ms,
    )
