"""Who is talking to the control plane: principals, join tokens, the operator token.

Theory of operation: every discovery session and every admin request is
authenticated once, from what arrives with it, into a :class:`Principal`:

- an **operator**: ``Authorization: Bearer <operator token>``; the token is
  a secret in a file (mode 0600) the control plane creates at first start;
- a **service** by join token: ``Authorization: Bearer octo1.<id>.<secret>``;
  an operator made the token for one service; the store keeps only its
  SHA-256 (a :class:`pb.JoinToken`, in the embedded snapshot or in etcd, so
  every replica knows it), looked up by ``<id>`` and compared in constant
  time;
- a **service** by certificate: a client certificate this control plane's
  CA issued, on a TLS listener: the service is the one its SPIFFE URI SAN
  names.

Nothing else gets in (401 at the handshake). What a principal may do is
:meth:`Principal.may_write`: a service only its own service's endpoints; an
operator everything. All of this is sans-IO: time is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..discovery._xds_server import check_service_name
from ..common._paths import default_state_dir as default_state_dir
from ..protocol.proto import octoproxy_discovery_pb2 as pb

__all__ = [
    "Principal",
    "OPERATOR",
    "TOKEN_PREFIX",
    "make_join_token",
    "token_id",
    "hash_token",
    "bearer",
    "Authenticator",
    "RateLimitedLog",
    "default_state_dir",
]

TOKEN_PREFIX = "octo1"
_MAX_TOKEN = 512


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated peer.

    Attributes:
        kind: ``"operator"`` or ``"service"``.
        service: the service a service principal speaks for (``""`` for operators).
        via: how it authenticated: ``"operator-token"``, ``"join-token"``,
            ``"certificate"`` or ``"insecure"`` (``--insecure-no-auth``).
        token_id: the join token's id (``via == "join-token"``), so revoking
            the token can end the sessions it opened.
    """

    kind: str
    service: str = ""
    via: str = ""
    token_id: str = ""

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"

    def may_write(self, service: str) -> bool:
        """May this principal register, deregister or set the status of ``service``'s endpoints?"""
        return self.is_operator or (self.kind == "service" and self.service == service)

    def describe(self) -> str:
        if self.is_operator:
            return f"operator ({self.via})"
        return f"service {self.service!r} ({self.via}{' ' + self.token_id if self.token_id else ''})"


OPERATOR = Principal("operator", via="operator-token")


def hash_token(token: str) -> str:
    """SHA-256 of a token, hex: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def make_join_token(service: str, now: float, ttl: float = 0.0) -> tuple[str, pb.JoinToken]:
    """Make a join token for ``service``.

    Args:
        service: the service it authenticates as.
        now: the current time (Unix seconds).
        ttl: validity in seconds; 0 = never expires.

    Returns:
        ``(token, record)``: show ``token`` once, store only ``record``.

    Raises:
        ValueError: on an invalid service name or a negative TTL.
    """
    error = check_service_name(service)
    if error is not None:
        raise ValueError(error)
    if ttl < 0:
        raise ValueError(f"token TTL must not be negative, got {ttl}")
    tid = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}.{tid}.{secrets.token_urlsafe(32)}"
    record = pb.JoinToken(
        id=tid,
        service=service,
        sha256_hex=hash_token(token),
        created_unix_ms=int(now * 1000),
        expires_unix_ms=int((now + ttl) * 1000) if ttl else 0,
    )
    return token, record


def token_id(token: str) -> str | None:
    """The id part of a join token, or ``None`` if it does not look like one."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else ``None``."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > _MAX_TOKEN:
        return None
    return value


class Authenticator:
    """Turns credentials into principals.

    Args:
        operator_token: the operator's bearer token (kept as its hash only).
        tokens: ``{id: JoinToken}``, e.g. the store view's ``tokens`` (read
            at each call, so a token made or revoked on any replica counts
            at once).
        trust_domain: SPIFFE trust domain of accepted client certificates.
        insecure: ``--insecure-no-auth``: every peer is an operator. Only for
            local development; the control plane says so loudly at start.
    """

    def __init__(
        self,
        operator_token: str,
        tokens: Callable[[], Mapping[str, pb.JoinToken]] = dict,
        *,
        trust_domain: str = "octoproxy.local",
        insecure: bool = False,
    ) -> None:
        if not operator_token and not insecure:
            raise ValueError("the operator token must not be empty")
        self._operator_hash = hash_token(operator_token)
        self._tokens = tokens
        self.trust_domain = trust_domain
        self.insecure = insecure

    def authenticate(
        self, authorization: str | None, now: float, *, certificate_service: str | None = None
    ) -> Principal | str:
        """Authenticate a session or a request.

        Args:
            authorization: the ``Authorization`` header value, if any.
            now: the current time (Unix seconds), for token expiry.
            certificate_service: the service named by a verified client
                certificate's SPIFFE ID, if the peer presented one.

        Returns:
            The :class:`Principal`, or why it was refused (no secret in it).
        """
        if self.insecure:
            return Principal("operator", via="insecure")
        token = bearer(authorization)
        if token is not None:
            if hmac.compare_digest(hash_token(token).encode(), self._operator_hash.encode()):
                return OPERATOR
            tid = token_id(token)
            record = self._tokens().get(tid) if tid is not None else None
            if record is None or not hmac.compare_digest(hash_token(token).encode(), record.sha256_hex.encode()):
                return "unknown or revoked token"
            if record.expires_unix_ms and now * 1000 >= record.expires_unix_ms:
                return f"join token {tid} expired"
            return Principal("service", service=record.service, via="join-token", token_id=record.id)
        if certificate_service is not None:
            return Principal("service", service=certificate_service, via="certificate")
        if authorization:
            return "malformed Authorization header (want 'Bearer <token>')"
        return "no credentials (send 'Authorization: Bearer <token>' or a client certificate)"


class RateLimitedLog:
    """At most one line per ``interval`` seconds; the rest are counted into the next line.

    Args:
        emit: called with the text of a line to log.
        interval: seconds between lines.
    """

    def __init__(self, emit: Callable[[str], None], interval: float = 5.0) -> None:
        self.emit = emit
        self.interval = interval
        self._next = -1e18
        self._suppressed = 0

    def __call__(self, now: float, text: str) -> None:
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            text += f" (and {self._suppressed} more since the last line)"
        self._suppressed = 0
        self._next = now + self.interval
        self.emit(text)

