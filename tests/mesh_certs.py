"""Test helper: a throwaway certificate authority issuing SPIFFE service certificates.

Made with the ``cryptography`` library (never hand-written ASN.1): an ECDSA
P-256 CA, and leaf certificates whose only identity is the URI SAN
``spiffe://<trust-domain>/svc/<service>``, as the control plane issues them.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "octoproxy.local"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class TestCA:
    """A CA for one test; ``issue`` makes leaf certificates for services."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "octoproxy test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        service: str | None,
        *,
        trust_domain: str = TRUST_DOMAIN,
        lifetime: float = 3600.0,
        uris: list[str] | None = None,
    ) -> tuple[bytes, bytes]:
        """A (certificate PEM, key PEM) pair for ``service`` valid from now for ``lifetime`` seconds."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if uris is None:
            uris = [f"spiffe://{trust_domain}/svc/{service}"]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def sign_csr(self, csr_pem: str, service: str, *, lifetime: float = 3600.0) -> str:
        """Sign a CSR as the control plane does: the identity comes from ``service``, not the CSR."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/svc/{service}")]),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def write(self, directory: Path, service: str | None, name: str | None = None, **kw: object) -> tuple[Path, Path, Path]:
        """Issue for ``service`` and write cert, key (mode 0600) and CA files; return their paths.

        Files are replaced atomically (a rename), as an operator's tooling should.
        """
        name = name or str(service)
        cert, key = self.issue(service, **kw)  # type: ignore[arg-type]
        paths = (directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}-ca.crt")
        for path, data, mode in ((paths[1], key, 0o600), (paths[0], cert, 0o644), (paths[2], self.pem, 0o644)):
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        return paths


def tls_toml(paths: tuple[Path, Path, Path], **extra: str) -> str:
    """A ``[tls]`` section for the three files."""
    cert, key, ca = paths
    lines = [f'cert_file = "{cert}"', f'key_file = "{key}"', f'ca_file = "{ca}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "[tls]\n" + "\n".join(lines) + "\n"


def make_key_and_csr(service: str, trust_domain: str = TRUST_DOMAIN) -> tuple[str, str]:
    """(key PEM, CSR PEM) for ``service``, as a proxy makes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key).decode(), csr.public_bytes(serialization.Encoding.PEM).decode()
