"""TLS contexts for the mesh (mTLS between proxies) and peer identities.

No I/O loop here: this module builds :class:`ssl.SSLContext` objects from
certificate files (or PEM held in memory) and reads the SPIFFE identity out of
a verified peer certificate. The Trio shell that drives handshakes on raw
non-blocking sockets is :mod:`octoproxy.proxy._tls`.

Cipher policy (one, for every hop): TLS 1.3 only, both directions
authenticated (the server requires a client certificate and both sides verify
the chain against the mesh's trust bundle), OpenSSL's TLS 1.3 suites
(TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256;
Python cannot narrow TLS 1.3 suites), no session tickets (a mesh link lives
for hours; resumption would only add state), no compression, no
renegotiation (TLS 1.3 has none). Identity is the URI SAN
``spiffe://<trust-domain>/svc/<service>``; host names are not checked.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol._errors import ConfigError
from ._names import parse_spiffe_id

__all__ = [
    "TlsMaterial",
    "MeshContexts",
    "check_key_file",
    "client_context",
    "server_context",
    "peer_uris",
    "peer_service",
    "load_material",
]


def check_key_file(path: Path, key: str = "tls.key_file") -> None:
    """Refuse a private key file that others may read (mode must be 0600 or stricter).

    Raises:
        ConfigError: one line naming the file, its mode and the fix.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigError(f"{key}: {path} has mode {mode:04o}; a private key must be 0600 or stricter (chmod 600 {path})")


@dataclass(frozen=True)
class TlsMaterial:
    """A certificate chain, its private key and the trust bundle, as PEM bytes.

    The key is held in memory only; :meth:`__repr__` never shows it.
    """

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return f"TlsMaterial(cert={len(self.cert_pem)} bytes, key=<hidden>, ca={len(self.ca_pem)} bytes)"


def load_material(cert_file: Path, key_file: Path, ca_file: Path) -> TlsMaterial:
    """Read the three files (the key file's mode is checked first).

    Raises:
        ConfigError: a file is missing, unreadable, or the key is readable by others.
    """
    check_key_file(key_file)
    out = []
    for key, path in (("tls.cert_file", cert_file), ("tls.key_file", key_file), ("tls.ca_file", ca_file)):
        try:
            out.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    return TlsMaterial(out[0], out[1], out[2])


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that no other process can read, removed afterwards.

    ``ssl`` loads certificate chains from paths only. A memfd (Linux) keeps the
    key off every file system; elsewhere a 0600 file in a 0700 directory,
    deleted as soon as OpenSSL has read it.
    """
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("octoproxy-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="octoproxy-tls-") as d:  # pragma: no cover - not Linux
        path = os.path.join(d, "material.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        yield path


def _base(ctx: ssl.SSLContext, material: TlsMaterial) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=material.ca_pem.decode("ascii"))
        with _private_file(material.cert_pem + b"\n" + material.key_pem) as path:
            ctx.load_cert_chain(path)
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tls: cannot load the certificate, key or trust bundle: {exc}") from None
    return ctx


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """The inbound listener's context: a client certificate is required and verified."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), material)
    with contextlib.suppress(AttributeError, ValueError):
        ctx.num_tickets = 0
    return ctx


def client_context(material: TlsMaterial) -> ssl.SSLContext:
    """The upstream links' context: presents our certificate, verifies the server's chain.

    Host names are not checked: the caller checks the server's SPIFFE ID
    (:func:`peer_service`) against the service it meant to reach.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _base(ctx, material)


def peer_uris(cert: dict[str, Any] | None) -> list[str]:
    """The URI SANs of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not cert:
        return []
    return [str(v) for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_service(cert: dict[str, Any] | None, trust_domain: str) -> str:
    """The service a verified peer certificate names.

    Raises:
        ValueError: no certificate, no URI SAN, more than one, or one that is
            not ``spiffe://<trust_domain>/svc/<service>``.
    """
    uris = peer_uris(cert)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise ValueError(f"peer certificate must carry exactly one SPIFFE URI SAN, has {len(spiffe)}: {uris}")
    return parse_spiffe_id(spiffe[0], trust_domain)


class MeshContexts:
    """The current server and client contexts of one proxy, swapped on rotation.

    New connections take whatever :attr:`server` / :attr:`client` hold when
    they start; connections already up keep the context they were made with
    (an :class:`ssl.SSLSocket` holds its own reference), so a rotation never
    touches them.
    """

    def __init__(self, material: TlsMaterial, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self.server = server_context(material)
        self.client = client_context(material)
        self.material = material
        self.rotations = 0

    def update(self, material: TlsMaterial) -> None:
        """Build both contexts from new material first, then swap (all or nothing).

        Raises:
            ConfigError: the new material does not load; nothing changed.
        """
        server = server_context(material)
        client = client_context(material)
        self.server, self.client, self.material = server, client, material
        self.rotations += 1
