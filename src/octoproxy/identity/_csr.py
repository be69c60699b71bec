"""A proxy's side of issuance (sans-IO): make a private key and a CSR.

The key never leaves the proxy: only the CSR (public key + a signature that
proves possession of the private key) goes to the control plane, which
ignores every name in it and issues a certificate for the service the
session authenticated as (see :mod:`octoproxy.identity._ca`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._names import DEFAULT_TRUST_DOMAIN, spiffe_id

__all__ = ["make_key_and_csr"]


def make_key_and_csr(service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> tuple[str, str]:
    """Make an ECDSA P-256 private key and a PKCS#10 CSR for ``service``.

    The CSR names ``service`` (CN and SPIFFE URI SAN) for readability only:
    the control plane decides the certificate's identity from the session.

    Args:
        service: the service this proxy serves.
        trust_domain: SPIFFE trust domain written into the CSR's URI SAN.

    Returns:
        ``(key_pem, csr_pem)``: the private key (PKCS#8, unencrypted PEM: keep
        it in memory or in a mode-0600 file) and the CSR (PEM).

    Raises:
        ValueError: if ``service`` or ``trust_domain`` is not a valid name.
    """
    uri = spiffe_id(trust_domain, service)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()
