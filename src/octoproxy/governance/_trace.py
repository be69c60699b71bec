"""W3C Trace Context: ``traceparent`` for the next hop, ``tracestate`` kept (sans-IO).

The proxy is a tracing participant: for each request it forwards it keeps the
trace id and flags of a valid incoming ``traceparent``, writes a new parent
(span) id for its hop, and passes ``tracestate`` on unchanged. When the
incoming value is absent or invalid it starts a new trace (random trace id,
flags from the policy) and drops ``tracestate``, as the specification asks.

Validation follows the specification (https://www.w3.org/TR/trace-context/):
lowercase hex only; version ``ff`` is invalid; version ``00`` is exactly 55
characters; a later version may be longer, with a ``-`` after the first four
fields; an all-zero trace id or parent id is invalid. Output is always
version ``00``. Both ``str`` (decoded metadata) and ``bytes`` (raw header
ranges) forms are provided. Randomness comes from an injectable
``randbits(k)`` callable, so tests are reproducible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TraceConfig", "TraceContext", "Tracer", "parse_traceparent", "TRACEPARENT", "TRACESTATE"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_RE_B = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# the common case in one C call: version 00, exactly 55 characters, non-zero ids
_RE00 = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ZERO_TRACE_B = b"0" * 32
_ZERO_SPAN_B = b"0" * 16


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Tracing settings of a route.

    Attributes:
        enabled: propagate and start traces.
        sampled: the sampled flag of traces this proxy starts.
    """

    enabled: bool = True
    sampled: bool = True


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A parsed ``traceparent``.

    Attributes:
        version: two hex digits.
        trace_id: 32 hex digits.
        parent_id: 16 hex digits.
        flags: the trace flags byte.
    """

    version: str
    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        """The sampled bit."""
        return bool(self.flags & 1)


def parse_traceparent(value: str) -> TraceContext | None:
    """Parse and validate a ``traceparent`` value.

    Args:
        value: the header value.

    Returns:
        The context, or ``None`` when the value is not valid.
    """
    if _RE.match(value) is None:
        return None
    version, trace_id, parent_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceContext(version, trace_id, parent_id, int(flags, 16))


_POOL = 32  # span ids drawn per refill of the hex pool


class Tracer:
    """Builds the ``traceparent`` of the next hop.

    Span ids are cut from a pool of hex digits filled by one large random draw
    every 32 ids, so a hop costs a slice, not a draw and a format.

    Args:
        config: the route's tracing settings.
        randbits: ``randbits(k)`` returns ``k`` random bits (``random.Random.getrandbits``
            fits); a fresh ``random.Random`` (seeded from the OS) when omitted.
    """

    __slots__ = ("config", "_randbits", "_new_flags", "_pool", "_pos")

    def __init__(self, config: TraceConfig, randbits: Callable[[int], int] | None = None) -> None:
        self.config = config
        self._randbits: Callable[[int], int] = randbits if randbits is not None else random.Random().getrandbits
        self._new_flags = "01" if config.sampled else "00"
        self._pool = ""
        self._pos = 16 * _POOL

    def _span(self) -> str:
        while True:
            pos = self._pos
            if pos >= 16 * _POOL:
                self._pool = f"{self._randbits(64 * _POOL):0{16 * _POOL}x}"
                pos = 0
            self._pos = pos + 16
            span = self._pool[pos : pos + 16]
            if span != _ZERO_SPAN:
                return span

    def new_traceparent(self) -> str:
        """A ``traceparent`` that starts a new trace."""
        trace_id = self._span() + self._span()
        while trace_id == _ZERO_TRACE:  # pragma: no cover - each half is non-zero already
            trace_id = self._span() + self._span()
        return f"00-{trace_id}-{self._span()}-{self._new_flags}"

    def next_hop(self, traceparent: str | None, tracestate: str | None = None) -> tuple[str, str | None]:
        """The trace headers to send on for one forwarded request.

        Args:
            traceparent: the incoming value, or ``None``.
            tracestate: the incoming value, or ``None``.

        Returns:
            ``(traceparent, tracestate)`` to send: the same trace with a new
            parent id and ``tracestate`` kept, or a new trace and ``None``.
        """
        if traceparent is None:
            return self.new_traceparent(), None
        if _RE00.fullmatch(traceparent) is not None:
            pos = self._pos
            if pos < 16 * _POOL:
                self._pos = pos + 16
                span = self._pool[pos : pos + 16]
                if span == _ZERO_SPAN:
                    span = self._span()
            else:
                span = self._span()
            return traceparent[:36] + span + traceparent[52:], tracestate
        if _RE.match(traceparent) is not None:
            n = len(traceparent)
            if (
                (n == 55 or (n > 55 and traceparent[55] == "-" and traceparent[:2] != "00"))
                and traceparent[:2] != "ff"
                and traceparent[3:35] != _ZERO_TRACE
                and traceparent[36:52] != _ZERO_SPAN
            ):
                return "00" + traceparent[2:36] + self._span() + traceparent[52:55], tracestate
        return self.new_traceparent(), None

    def next_hop_bytes(self, traceparent: bytes | None, tracestate: bytes | None = None) -> tuple[bytes, bytes | None]:
        """:meth:`next_hop` over raw bytes (metadata ranges of an undecoded header)."""
        if traceparent is not None and _RE_B.match(traceparent) is not None:
            n = len(traceparent)
            if (
                (n == 55 or (n > 55 and traceparent[55] == 0x2D and traceparent[:2] != b"00"))
                and traceparent[:2] != b"ff"
                and traceparent[3:35] != _ZERO_TRACE_B
                and traceparent[36:52] != _ZERO_SPAN_B
            ):
                return b"00" + traceparent[2:36] + self._span().encode("ascii") + traceparent[52:55], tracestate
        return self.new_traceparent().encode("ascii"), None
