"""The control plane's certificate authority (sans-IO: no Trio, no sockets, time passed in).

Theory of operation: a :class:`CertificateAuthority` holds one CA certificate
and its private key, either made here (:meth:`CertificateAuthority.generate`,
ECDSA P-256, self-signed, 10 years) or supplied by the operator as PEM files
(:meth:`CertificateAuthority.from_pem`; it may be an intermediate, whose
issuers then go in the trust bundle). :meth:`CertificateAuthority.sign_csr`
turns a proxy's CSR into a short-lived leaf certificate:

- the CSR's signature must verify (the requester holds the private key) and
  its key must be one we accept (ECDSA P-256/P-384, RSA 2048-4096 with
  e = 65537, Ed25519): anything else is refused, never "fixed";
- every name in the CSR is ignored: the leaf's only SAN is the URI
  ``spiffe://<trust-domain>/svc/<service>`` of the principal the caller
  authenticated (the control plane passes it in), its subject is
  ``CN=<service>``;
- it is valid from one minute ago (clock skew) for ``ttl`` (24 h by
  default), never past the CA's own expiry, for TLS client and server auth.

:func:`load_or_create_ca` is the one function here that touches files (the
Trio shell runs it in a thread): the CA's key is written with mode 0600 and
never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..protocol._errors import OctoproxyError
from ._names import CONTROL_PLANE_PATH, DEFAULT_LEAF_TTL, check_trust_domain, spiffe_id

__all__ = [
    "CertificateAuthority",
    "CertificateError",
    "IssuedCertificate",
    "DEFAULT_LEAF_TTL",
    "load_or_create_ca",
    "control_plane_id",
    "check_public_key",
]

#: lifetime of a CA this module generates
CA_VALIDITY = 10 * 365 * 24 * 3600.0
#: a CSR larger than this is refused before parsing
MAX_CSR_PEM = 16 * 1024
_SKEW = 60.0

_SigningKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CertificateError(OctoproxyError):
    """A CSR was refused, or CA material is unusable (the message says why)."""


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate the CA issued.

    Attributes:
        chain_pem: the leaf first, then the intermediates up to (not
            including) a self-signed root.
        trust_bundle_pem: CA certificates to verify peers with.
        not_after_unix_ms: the leaf's expiry.
        serial: the leaf's serial number.
    """

    chain_pem: str
    trust_bundle_pem: str
    not_after_unix_ms: int
    serial: int


def control_plane_id(trust_domain: str) -> str:
    """The SPIFFE ID of the control plane itself: ``spiffe://<td>/controlplane``."""
    return f"spiffe://{check_trust_domain(trust_domain)}{CONTROL_PLANE_PATH}"


def _utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)


def _hash_for(key: _SigningKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def check_public_key(key: object) -> str | None:
    """Return why a public key is refused in a CSR, or ``None`` if accepted."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ACCEPTED_CURVES):
            return f"EC curve {key.curve.name} is not accepted (want secp256r1 or secp384r1)"
        return None
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096 or key.public_numbers().e != 65537:
            return f"RSA key of {key.key_size} bits is not accepted (want 2048-4096 bits, e = 65537)"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return f"key type {type(key).__name__} is not accepted (want ECDSA P-256/P-384, RSA 2048-4096 or Ed25519)"


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


class CertificateAuthority:
    """Signs service certificates for one trust domain.

    Args:
        cert: the CA certificate (must have ``BasicConstraints(ca=True)``).
        key: its private key (ECDSA, RSA or Ed25519), matching ``cert``.
        trust_domain: the SPIFFE trust domain of every certificate issued.
        issuers: certificates above ``cert`` (operator-supplied intermediate
            CA): sent in chains, and their roots in the trust bundle.

    Raises:
        CertificateError: if ``cert`` is not a CA or ``key`` does not match it.
        ValueError: if ``trust_domain`` is invalid.
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: _SigningKey,
        trust_domain: str,
        issuers: list[x509.Certificate] | None = None,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CertificateError("the CA certificate lacks BasicConstraints CA:TRUE")
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise CertificateError(f"CA key type {type(key).__name__} is not supported")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ):
            raise CertificateError("the CA key does not match the CA certificate")
        self.cert = cert
        self.key = key
        self.issuers = list(issuers or [])
        self.not_after = cert.not_valid_after_utc.timestamp()
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        intermediates = [c for c in [cert, *self.issuers] if not _is_self_signed(c)]
        self._chain_tail = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in intermediates)
        roots = [c for c in [cert, *self.issuers] if _is_self_signed(c)] or [cert, *self.issuers]
        self.trust_bundle_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in roots)

    # ------------------------------------------------------------ construction
    @classmethod
    def generate(cls, trust_domain: str, now: float, *, validity: float = CA_VALIDITY) -> CertificateAuthority:
        """Make a new self-signed CA (ECDSA P-256) valid from ``now`` for ``validity`` seconds."""
        check_trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "octoproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"octoproxy CA {trust_domain}"),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - _SKEW))
            .not_valid_after(_utc(now + validity))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, trust_domain: str) -> CertificateAuthority:
        """Load a CA from PEM: ``cert_pem`` holds the CA certificate first, then its issuers (if any).

        Raises:
            CertificateError: if the PEM cannot be parsed, is not a CA, or the key does not match.
        """
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"cannot load the CA: {exc}") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise CertificateError(f"CA key type {type(key).__name__} is not supported")
        return cls(certs[0], key, trust_domain, certs[1:])

    @property
    def cert_pem(self) -> str:
        """The CA certificate, PEM."""
        return self._cert_pem

    def key_pem(self) -> bytes:
        """The CA's private key, unencrypted PKCS#8 PEM (write it with mode 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # ------------------------------------------------------------ issuance
    def sign_csr(self, csr_pem: str | bytes, service: str, now: float, ttl: float = DEFAULT_LEAF_TTL) -> IssuedCertificate:
        """Issue a leaf certificate for ``service`` to the holder of the CSR's key.

        Args:
            csr_pem: a PKCS#10 CSR, PEM. Its names are ignored.
            service: the authenticated principal's service: the leaf's only
                URI SAN is ``spiffe://<trust-domain>/svc/<service>``.
            now: the current time (Unix seconds).
            ttl: lifetime in seconds (capped at the CA's own expiry).

        Returns:
            The :class:`IssuedCertificate`.

        Raises:
            CertificateError: if the CSR is malformed, its signature does not
                verify, its key is not accepted, or the CA has expired.
            ValueError: if ``service`` is not a valid service name.
        """
        uri = spiffe_id(self.trust_domain, service)
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(data) > MAX_CSR_PEM:
            raise CertificateError(f"CSR too large ({len(data)} bytes, limit {MAX_CSR_PEM})")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CertificateError(f"not a PEM certificate signing request: {exc}") from None
        try:
            pub = csr.public_key()
        except (ValueError, TypeError) as exc:  # unsupported algorithm
            raise CertificateError(f"CSR public key not usable: {exc}") from None
        why = check_public_key(pub)
        if why is not None:
            raise CertificateError(why)
        try:
            valid = csr.is_signature_valid
        except (InvalidSignature, ValueError, TypeError):
            valid = False
        if not valid:
            raise CertificateError("the CSR's signature does not verify")
        return self._issue(pub, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]),
                           [x509.UniformResourceIdentifier(uri)], now, ttl)

    def issue_control_plane(self, hosts: list[str], now: float, ttl: float) -> tuple[str, IssuedCertificate]:
        """Make a key and a server certificate for the control plane's own listener.

        The certificate names ``spiffe://<td>/controlplane`` and each of
        ``hosts`` (IP SAN if it parses as an address, else DNS SAN).

        Returns:
            ``(key_pem, issued)``.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(control_plane_id(self.trust_domain))]
        for host in dict.fromkeys(h for h in hosts if h):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            except ValueError:
                sans.append(x509.DNSName(host))
        issued = self._issue(key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "octoproxy control plane")]),
                             sans, now, ttl)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return key_pem, issued

    def _issue(self, pub: object, subject: x509.Name, sans: list[x509.GeneralName], now: float, ttl: float) -> IssuedCertificate:
        if now >= self.not_after:
            raise CertificateError("the CA certificate has expired")
        if not ttl > 0:
            raise ValueError(f"certificate TTL must be positive, got {ttl}")
        not_before = max(now - _SKEW, self.cert.not_valid_before_utc.timestamp())
        not_after = min(now + ttl, self.not_after)
        is_rsa = isinstance(pub, rsa.RSAPublicKey)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(pub)  # type: ignore[arg-type]
            .serial_number(serial)
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, _hash_for(self.key))
        )
        leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
        return IssuedCertificate(
            chain_pem=leaf + self._chain_tail,
            trust_bundle_pem=self.trust_bundle_pem,
            not_after_unix_ms=int(not_after * 1000),
            serial=serial,
        )


# ---------------------------------------------------------------- files (blocking: run in a thread)
def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_or_create_ca(
    trust_domain: str,
    now: float,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> CertificateAuthority:
    """Load the operator's CA (``cert_file`` + ``key_file``), or the control plane's own.

    Without ``cert_file``, the CA lives in ``state_dir`` (``ca.crt``,
    ``ca.key`` with mode 0600) and is generated there the first time.
    Blocking file I/O: call it from a thread.

    Raises:
        CertificateError: unusable CA material, or only one of the two files.
        OSError: if the files cannot be read or written.
        ValueError: if neither ``cert_file`` nor ``state_dir`` is given.
    """
    if (cert_file is None) != (key_file is None):
        raise CertificateError("give both the CA certificate and the CA key file, or neither")
    if cert_file is not None and key_file is not None:
        return CertificateAuthority.from_pem(Path(cert_file).read_bytes(), Path(key_file).read_bytes(), trust_domain)
    if state_dir is None:
        raise ValueError("need a state directory or CA files")
    d = Path(state_dir)
    crt, key = d / "ca.crt", d / "ca.key"
    if crt.exists() or key.exists():
        if not (crt.exists() and key.exists()):
            raise CertificateError(f"{d}: found only one of ca.crt and ca.key; restore the other or remove both")
        return CertificateAuthority.from_pem(crt.read_bytes(), key.read_bytes(), trust_domain)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = CertificateAuthority.generate(trust_domain, now)
    _write_new(key, ca.key_pem(), 0o600)
    _write_new(crt, ca.cert_pem.encode(), 0o644)
    return ca
