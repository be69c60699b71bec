"""The inbound guard: what a provider's proxy checks before its app sees a request (sans-IO).

Theory of operation
-------------------
Every request frame a peer sends to the inbound listener passes here, once
per read, before the engine's fast path forwards it to the local app:

1. **Service.** The inbound side serves exactly one service, this proxy's
   ``proxy.service``. The scanner of an inbound link routes with a one-entry
   table ``(service, "*")``; a request for anything else is answered NO_ROUTE
   with a reason and never reaches the app (a forged frame could otherwise
   call any method of any app that happens to listen behind this proxy).
2. **Authorization.** The connection's caller (:class:`InboundPeer`: the
   service in the peer's verified certificate, or None in plaintext mode) is
   checked against the service's :class:`~._authz.Policy`; a denial is
   answered PERMISSION_DENIED / UNAUTHENTICATED with the policy's reason.
3. **Caller.** With mTLS, the caller identity is appended to the header as
   field 3 (``caller``): protobuf keeps the last occurrence, so whatever
   ``caller`` the peer wrote is overwritten by the certificate's name.
4. **Credentials.** A ``authorization`` metadata entry (any letter case)
   from a peer is removed: the provider's app must not take a credential a
   peer forged for proof of anything (the verified identity is ``caller``).

A batch where nothing changes (plaintext mode, every frame allowed, no
credential) goes to the fast path as it was read; otherwise the frames that
survive are rewritten into one scratch buffer, scanned again (C speed) and
forwarded from there. The per-frame loops (find the first frame that needs
policy; copy and stamp the others) are compiled (``core/_fastguard.pyx``, twin
``_guard_py.py``); only frames that need policy run Python here.
"""

from __future__ import annotations

import logging
from struct import Struct
from typing import TYPE_CHECKING

from ..protocol._errors import RemoteProtocolError
from ..protocol._protocol import PREFIX_SIZE, Status
from ..frame import NO_EXTENSIONS, RouteTable, Scanner, encode_header, parse_header
from ._authz import CallerView, Policy
from ._engine import relay_requests

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._guard_py import IMPLEMENTATION, first_unclean, has_credential, stamp_frames
else:
    try:
        from ._fastguard import IMPLEMENTATION, first_unclean, has_credential, stamp_frames  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - depends on the build
        from ._guard_py import IMPLEMENTATION, first_unclean, has_credential, stamp_frames

if TYPE_CHECKING:
    from ._engine import Engine, Link

log = logging.getLogger("octoproxy.proxy")

__all__ = ["IMPLEMENTATION", "InboundGuard", "InboundPeer", "STRIPPED_METADATA"]

#: metadata keys (compared in lower case) removed from requests arriving from peers
STRIPPED_METADATA = "authorization"
_PREFIX = Struct(">HBBIQHH")  # magic, version, type, length, stream id, flags, header length
_REQUEST = 1
_ONEWAY = 3


class InboundPeer:
    """Who is on the other end of one inbound connection.

    Attributes:
        service: the caller's service from its verified certificate, or None
            (plaintext: no verified identity).
        stamp: the header bytes appended to each request (``caller``), or b"".
        view: the authorization policy as seen by this caller (cached).
    """

    __slots__ = ("service", "stamp", "view")

    def __init__(self, service: str | None) -> None:
        self.service = service
        self.stamp = encode_header(caller=service) if service else b""
        self.view: CallerView | None = None


_PLAINTEXT = InboundPeer(None)


class InboundGuard:
    """Checks and rewrites requests from peers for one engine.

    Args:
        service: the service this proxy serves (``proxy.service``); empty:
            none, every request is answered NO_ROUTE.
        policy: the authorization policy (None: allow every caller).
        max_frame_size: the engine's limit (a stamped frame must stay within it).
    """

    def __init__(self, service: str, policy: Policy | None = None, max_frame_size: int = 16 * 1024 * 1024) -> None:
        self.service = service
        #: the inbound links' scanners route with this: route 0 = our service
        self.routes = RouteTable([(service, "*", 0)] if service else [])
        self.policy: Policy | None = None
        #: the policy from the configuration file ([authz]); a pushed one replaces it while held
        self.config_policy = policy
        self.set_policy(policy)
        self.max_frame_size = max_frame_size
        #: rescans the rewritten frames (as many as one read brought: it loops if more)
        self._scanner = Scanner(None, max_frame_size, 1024)
        self._out = bytearray()
        self.denials = 0

    def set_policy(self, policy: Policy | None) -> None:
        """Swap the policy; every connection picks it up at its next read."""
        self.policy = None if policy is None or policy.allows_everything else policy
        #: the policy in force (also when it allows everything), for /ready
        self.policy_source = policy

    def _view(self, peer: InboundPeer) -> CallerView | None:
        policy = self.policy
        if policy is None:
            return None
        view = peer.view
        if view is None or view.policy is not policy:
            view = peer.view = policy.for_caller(peer.service)
        if view.uniform and view.verdict is None:
            return None  # this caller may call every method: nothing per request
        return view

    def _reject(self, engine: Engine, down: Link, ftype: int, sid: int, status: Status, reason: str, kind: str) -> None:
        engine.stats.rejected(kind)
        self.denials += 1
        if self.denials <= 20 or self.denials % 1000 == 0:
            log.info("inbound %s: %s (%s; %d refused so far)", down.name, reason, status.name, self.denials)
        if ftype == _REQUEST:
            engine._answer(down, sid, status, reason)

    def _problem(self, scanner: Scanner, i: int, route: int, view: CallerView | None) -> tuple[Status, str, str] | None:
        if route < 0:
            service, _m = scanner.routing_key(i)
            name = service.decode(errors="replace")
            if not self.service:
                return Status.NO_ROUTE, f"this proxy serves no service (proxy.service is empty); asked for {name!r}", "no_route"
            return Status.NO_ROUTE, f"this proxy serves {self.service!r}, not {name!r}", "no_route"
        if view is not None:
            verdict = view.check(scanner.routing_key(i)[1])
            if verdict is not None:
                status, reason = verdict
                return status, reason, status.name.lower()
        return None

    def relay(self, engine: Engine, down: Link, scanner: Scanner, n: int, buf: bytearray, mv: memoryview, now: float) -> None:
        """Check, rewrite and forward the ``n`` frames a peer sent (see the module doc)."""
        peer: InboundPeer = down.peer if down.peer is not None else _PLAINTEXT
        stamp = peer.stamp
        view = self._view(peer)
        if not stamp and view is None and first_unclean(scanner, buf, 0, n) == n:
            # plaintext, nothing to change: forwarded as it was read
            relay_requests(engine, down, scanner, n, mv, now)
            return
        out = self._out
        limit = self.max_frame_size
        i = 0
        while i < n:
            if view is None:
                # the compiled loop copies and stamps until a frame needs policy
                i = stamp_frames(scanner, buf, i, n, stamp, out, limit)
                if i == n:
                    break
            self._one(engine, down, scanner, i, buf, mv, stamp, view, out)
            i += 1
        if not out:
            return
        sc = self._scanner
        try:
            with memoryview(out) as omv:
                start, end = 0, len(out)
                while start < end:
                    m = sc.scan(out, start, end)
                    if not m:  # pragma: no cover - the frames were whole when they were read
                        break
                    relay_requests(engine, down, sc, m, omv, now)
                    start = sc.consumed
        finally:
            out.clear()

    def _one(
        self, engine: Engine, down: Link, scanner: Scanner, i: int, buf: bytearray, mv: memoryview, stamp: bytes, view: CallerView | None, out: bytearray
    ) -> None:
        """One frame the compiled loop left to policy: answer it, or append it rewritten to ``out``."""
        off, size, ftype, flags, sid, _t, route, _st = scanner.frame(i)
        if ftype != _REQUEST and ftype != _ONEWAY:
            out += mv[off : off + size]
            return
        problem = self._problem(scanner, i, route, view)
        if problem is not None:
            self._reject(engine, down, ftype, sid, *problem)
            return
        hstart = off + PREFIX_SIZE
        hend = hstart + (buf[off + 18] << 8 | buf[off + 19])
        header: bytes | memoryview | None = None
        if has_credential(buf, hstart, hend):
            header = self._strip(mv[hstart:hend], sid)
        if header is None:
            header = mv[hstart:hend]
        hlen = len(header) + len(stamp)
        fsize = PREFIX_SIZE + hlen + (off + size - hend)
        if fsize > self.max_frame_size or hlen > 0xFFFF:
            why = "header" if hlen > 0xFFFF else "frame"
            self._reject(engine, down, ftype, sid, Status.FRAME_TOO_LARGE, f"{why} too large to carry the caller identity", "too_large")
            return
        # a new prefix (lengths grow by the stamp), the header, the stamp, the body
        out += _PREFIX.pack(0xABBA, 1, ftype, fsize - 8, sid, flags, hlen)
        out += header
        out += stamp
        out += mv[hend : off + size]

    def _strip(self, header: memoryview, sid: int) -> bytes | None:
        """The header without its ``authorization`` entries (None: there were none)."""
        try:
            h = parse_header(header, sid)
        except RemoteProtocolError:  # pragma: no cover - the scanner validated it
            return None
        keys = [k for k in h.metadata if k.lower() == STRIPPED_METADATA]
        if not keys:
            return None
        for k in keys:
            del h.metadata[k]
        return bytes(h.SerializeToString())
