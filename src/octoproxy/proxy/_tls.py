"""Trio shell for mTLS between proxies: handshakes on raw sockets, rotation.

The data path keeps its raw non-blocking sockets (see :mod:`._io`): a TLS
link is a :class:`~._tlssock.TLSConnection` (an ``SSLObject`` over memory
BIOs, around the accepted or connected socket; why not ``SSLSocket`` is
explained there). The handshake is driven here, under a deadline, waiting for
readability or writability as it needs; once it is done the connection is
handed to a :class:`~._io.Conn` exactly as a plaintext one is (``Conn`` asks
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

import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..protocol._errors import ConfigError
from ..identity._tls import MeshContexts, TlsMaterial, load_material, peer_service
from ._tlssock import TLSConnection

log = logging.getLogger("octoproxy.tls")

__all__ = ["HandshakeError", "handshake", "accept_tls", "connect_tls", "CertificateFiles", "ControlPlaneCertificates", "cert_not_after"]


class HandshakeError(Exception):
    """A TLS handshake failed, timed out, or the peer's identity was refused."""


async def handshake(conn: TLSConnection, timeout: float) -> None:
    """Complete the handshake of a TLS connection within ``timeout``.

    Raises:
        HandshakeError: the peer failed it (an alert, a certificate refused),
            closed, or was too slow.
    """
    raw = conn.raw
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    done = conn.handshake_step()
                finally:
                    conn.handshake_output()  # our flight, or the alert that says why we refuse
                while not conn.handshake_flush():
                    await trio.lowlevel.wait_writable(raw)
                if done:
                    conn.handshake_done()
                    return
                await trio.lowlevel.wait_readable(raw)
                try:
                    if not conn.handshake_fill():
                        raise HandshakeError("the peer closed the connection during the TLS handshake")
                except BlockingIOError:
                    continue
    except trio.TooSlowError:
        raise HandshakeError(f"no TLS handshake within {timeout}s") from None
    except (ssl.SSLError, OSError) as exc:
        with contextlib.suppress(OSError):
            conn.handshake_flush()
        raise HandshakeError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from None


def _close(sock: socket.socket | TLSConnection) -> None:
    try:
        trio.lowlevel.notify_closing(sock)
    except (OSError, ValueError):  # pragma: no cover
        pass
    sock.close()


async def accept_tls(raw: socket.socket, contexts: MeshContexts, timeout: float) -> tuple[TLSConnection, str]:
    """Server side: handshake (client certificate required) and read the caller's service.

    On failure the socket is closed.

    Returns:
        The TLS connection and the caller's service name from its SPIFFE ID.

    Raises:
        HandshakeError: the handshake failed or the certificate names no
            service of our trust domain.
    """
    try:
        tls = TLSConnection(raw, contexts.server, server_side=True)
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


async def connect_tls(raw: socket.socket, contexts: MeshContexts, expected: Collection[str], timeout: float) -> tuple[TLSConnection, str]:
    """Client side: handshake, then check the server is one of the ``expected`` services.

    On failure the socket is closed.

    Returns:
        The TLS connection and the server's service.

    Raises:
        HandshakeError: the handshake failed, or the server's SPIFFE ID is not
            ``spiffe://<td>/svc/<one of expected>`` (an endpoint impersonating
            another service).
    """
    try:
        tls = TLSConnection(raw, contexts.client, server_side=False)
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
        self._not_after: tuple[object, float] = (None, 0.0)

    def not_after(self) -> float:
        material = self.contexts.material
        if self._not_after[0] is not material:  # parse once per certificate, not per scrape
            try:
                self._not_after = (material, cert_not_after(material.cert_pem))
            except Exception:  # pragma: no cover - a chain cryptography cannot read
                self._not_after = (material, 0.0)
        return self._not_after[1]

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


class ControlPlaneCertificates:
    """Certificates issued by the control plane, renewed at two thirds of their life.

    The private key is made here for every issuance (a new key each time) and
    never leaves the process: only the CSR goes to the control plane, which
    issues a certificate for the service the discovery session authenticated
    as. Until the first certificate arrives :attr:`contexts` is None (the
    inbound side refuses peers, upstream connections wait, ``/ready`` is 503).

    Args:
        service: this proxy's service (the CSR names it; the control plane decides).
        trust_domain: the SPIFFE trust domain peers must belong to.
        request: ``await request(csr_pem, timeout)`` -> a ``CertificateResponse``
            (``DiscoveryClient.request_certificate``).
        make_key_and_csr: ``make_key_and_csr(service, trust_domain)`` -> ``(key_pem, csr_pem)``.
        timeout: deadline of one request.
    """

    def __init__(
        self,
        service: str,
        trust_domain: str,
        request: Callable[[str, float], Awaitable[Any]],
        make_key_and_csr: Callable[[str, str], tuple[str, str]],
        *,
        timeout: float = 10.0,
    ) -> None:
        self.service = service
        self.trust_domain = trust_domain
        self._request = request
        self._make = make_key_and_csr
        self.timeout = timeout
        self.contexts: MeshContexts | None = None
        self.held = trio.Event()
        self.issued = 0
        self.failures = 0
        self.not_after_unix = 0.0
        self.last_error = ""

    def not_after(self) -> float:
        return self.not_after_unix

    async def obtain(self) -> float:
        """One issuance: new key, CSR, request, load. Returns the expiry (Unix time).

        Raises:
            ConfigError: the certificate that came back does not load (nothing changed).
            Exception: whatever the request raised (not connected, refused, too slow).
        """
        key_pem, csr_pem = self._make(self.service, self.trust_domain)
        resp = await self._request(csr_pem, self.timeout)
        if getattr(resp, "error", ""):
            raise ConfigError(f"the control plane refused the certificate request: {resp.error}")
        material = TlsMaterial(resp.certificate_chain_pem.encode(), key_pem.encode(), resp.trust_bundle_pem.encode())
        del key_pem
        if self.contexts is None:
            self.contexts = MeshContexts(material, self.trust_domain)
        else:
            self.contexts.update(material)
        not_after = resp.not_after_unix_ms / 1000.0 if resp.not_after_unix_ms else cert_not_after(material.cert_pem)
        self.not_after_unix = not_after
        self.issued += 1
        self.held.set()
        return not_after

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Obtain a certificate, then renew it at two thirds of its remaining life, forever.

        Failures are retried with back-off (0.5 s doubling to 10 s); while a
        renewal fails the current certificate keeps serving until it expires.
        """
        task_status.started()
        backoff = 0.5
        while True:
            try:
                not_after = await self.obtain()
            except Exception as exc:  # retried: not connected yet, refused, too slow, bad answer
                self.failures += 1
                self.last_error = str(exc) or type(exc).__name__
                if self.failures == 1 or self.failures % 20 == 0:
                    log.warning("certificate from the control plane: %s; retrying in %.1fs", self.last_error, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            life = max(0.0, not_after - time.time())
            renew_in = max(1.0, life * 2 / 3)  # as Linkerd: renew at two thirds of the lifetime
            log.info("certificate for %s from the control plane (issue %d), expires in %.0fs; renewing in %.0fs",
                     self.service, self.issued, life, renew_in)
            await trio.sleep(renew_in)
