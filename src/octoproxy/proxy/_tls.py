"""Trio shell for mTLS between proxies: handshakes on raw sockets, rotation.

The data path keeps its raw non-blocking sockets (see :mod:`._io`): a TLS
link is an :class:`ssl.SSLSocket` made with ``do_handshake_on_connect=False``
around the accepted or connected socket. The handshake is driven here, under
a deadline, waiting for readability or writability as OpenSSL asks; once it
is done the connection is handed to a :class:`~._io.Conn` exactly as a
plaintext one is (``Conn`` knows the two TLS "would block" errors and asks
``pending()`` before waiting: TLS may hold decrypted bytes the kernel no
longer signals).

Both sides check identity after the handshake, before a single frame moves:
the inbound side takes the caller's service from its certificate (the only
caller identity the provider's app will ever see), the outbound side refuses
a server whose SPIFFE ID is not the service the cluster routes to.

Rotation: :class:`CertificateSource` watches the certificate files and swaps
new contexts into :class:`~octoproxy.identity._tls.MeshContexts`; connections
already up keep theirs.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import trio

from .._errors import ConfigError
from ..identity._tls import MeshContexts, TlsMaterial, load_material, peer_service

log = logging.getLogger("octoproxy.tls")

__all__ = ["HandshakeError", "handshake", "accept_tls", "connect_tls", "CertificateFiles", "cert_not_after"]


class HandshakeError(Exception):
    """A TLS handshake failed, timed out, or the peer's identity was refused."""


async def handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """Complete the handshake of a non-blocking SSL socket within ``timeout``.

    Raises:
        HandshakeError: the peer failed it, closed, or was too slow.
    """
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(sock)
    except trio.TooSlowError:
        raise HandshakeError(f"no TLS handshake within {timeout}s") from None
    except (ssl.SSLError, OSError) as exc:
        raise HandshakeError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from None


def _close(sock: socket.socket) -> None:
    try:
        trio.lowlevel.notify_closing(sock)
    except (OSError, ValueError):  # pragma: no cover
        pass
    sock.close()


async def accept_tls(raw: socket.socket, contexts: MeshContexts, timeout: float) -> tuple[ssl.SSLSocket, str]:
    """Server side: handshake (client certificate required) and read the caller's service.

    On failure the socket is closed.

    Returns:
        The TLS socket and the caller's service name from its SPIFFE ID.

    Raises:
        HandshakeError: the handshake failed or the certificate names no
            service of our trust domain.
    """
    raw.setblocking(False)
    try:
        tls = contexts.server.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as exc:
        _close(raw)
        raise HandshakeError(f"TLS setup failed: {exc}") from None
    try:
        await handshake(tls, timeout)
        service = peer_service(tls.getpeercert(), contexts.trust_domain)
    except ValueError as exc:
        _close(tls)
        raise HandshakeError(f"caller identity refused: {exc}") from None
    except BaseException:
        _close(tls)
        raise
    return tls, service


async def connect_tls(raw: socket.socket, contexts: MeshContexts, expected: Collection[str], timeout: float) -> tuple[ssl.SSLSocket, str]:
    """Client side: handshake, then check the server is one of the ``expected`` services.

    On failure the socket is closed.

    Returns:
        The TLS socket and the server's service.

    Raises:
        HandshakeError: the handshake failed, or the server's SPIFFE ID is not
            ``spiffe://<td>/svc/<one of expected>`` (an endpoint impersonating
            another service).
    """
    try:
        tls = contexts.client.wrap_socket(raw, server_side=False, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as exc:
        _close(raw)
        raise HandshakeError(f"TLS setup failed: {exc}") from None
    try:
        await handshake(tls, timeout)
        try:
            service = peer_service(tls.getpeercert(), contexts.trust_domain)
        except ValueError as exc:
            raise HandshakeError(f"server identity refused: {exc}") from None
        if service not in expected:
            want = ", ".join(sorted(expected)) or "(no service routes to this cluster)"
            raise HandshakeError(f"server is {service!r}, expected {want}: refused (impersonation?)")
    except BaseException:
        _close(tls)
        raise
    return tls, service


def cert_not_after(cert_pem: bytes) -> float:
    """The expiry (Unix time) of the first certificate in a PEM chain."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc.timestamp()


@dataclass
class _Stamp:
    files: tuple[tuple[int, int, int, int], ...]


def _stat_all(paths: tuple[Path, ...]) -> _Stamp:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode))
        except OSError:
            out.append((0, 0, 0, 0))
    return _Stamp(tuple(out))


class CertificateFiles:
    """Certificates issued by the operator, as files; reloaded when they change.

    Args:
        cert_file, key_file, ca_file: the PEM files.
        trust_domain: the SPIFFE trust domain of the mesh.
    """

    def __init__(self, cert_file: Path, key_file: Path, ca_file: Path, trust_domain: str) -> None:
        self.paths = (cert_file, key_file, ca_file)
        self._stamp = _stat_all(self.paths)
        self.contexts = MeshContexts(load_material(*self.paths), trust_domain)
        self.reload_failures = 0

    def not_after(self) -> float:
        try:
            return cert_not_after(self.contexts.material.cert_pem)
        except Exception:  # pragma: no cover - a chain cryptography cannot read
            return 0.0

    def check(self) -> bool:
        """Reload if a file changed (all three read again). True if the contexts were swapped.

        A change that does not load (half-written files, a key readable by
        others, a chain that does not match its key) changes nothing: the old
        contexts stay, an error is logged and counted, and the next check
        tries again.
        """
        stamp = _stat_all(self.paths)
        if stamp == self._stamp:
            return False
        try:
            material: TlsMaterial = load_material(*self.paths)
            self.contexts.update(material)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("certificate files changed but do not load (%s); keeping the current certificate", exc)
            return False
        self._stamp = stamp
        log.info("certificate reloaded from %s (rotation %d)", self.paths[0], self.contexts.rotations)
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds, forever."""
        while True:
            await trio.sleep(interval)
            self.check()
