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
ranges) forms are provided. Randomness comes from an injectable callable that
returns 64 random bits, so tests are reproducible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TraceConfig", "TraceContext", "Tracer", "parse_traceparent", "TRACEPARENT", "TRACESTATE"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_RE_B = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


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
    m = _RE.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceContext(version, trace_id, parent_id, int(flags, 16))


class Tracer:
    """Builds the ``traceparent`` of the next hop.

    Args:
        config: the route's tracing settings.
        rand64: returns 64 random bits; a fresh ``random.Random`` (seeded from
            the OS) when omitted.
    """

    __slots__ = ("config", "_rand64", "_new_flags")

    def __init__(self, config: TraceConfig, rand64: Callable[[], int] | None = None) -> None:
        self.config = config
        if rand64 is None:
            rng = random.Random()

            def rand64() -> int:
                return rng.getrandbits(64)

        self._rand64: Callable[[], int] = rand64
        self._new_flags = "01" if config.sampled else "00"

    def _span(self) -> int:
        r = self._rand64
        span = r()
        while not span:
            span = r()
        return span

    def new_traceparent(self) -> str:
        """A ``traceparent`` that starts a new trace."""
        r = self._rand64
        hi, lo = r(), r()
        while not (hi or lo):
            hi, lo = r(), r()
        return f"00-{hi:016x}{lo:016x}-{self._span():016x}-{self._new_flags}"

    def next_hop(self, traceparent: str | None, tracestate: str | None = None) -> tuple[str, str | None]:
        """The trace headers to send on for one forwarded request.

        Args:
            traceparent: the incoming value, or ``None``.
            tracestate: the incoming value, or ``None``.

        Returns:
            ``(traceparent, tracestate)`` to send: the same trace with a new
            parent id and ``tracestate`` kept, or a new trace and ``None``.
        """
        if traceparent is not None:
            m = _RE.match(traceparent)
            if m is not None:
                version = m.group(1)
                n = len(traceparent)
                if (
                    version != "ff"
                    and (n == 55 or (version != "00" and n > 55 and traceparent[55] == "-"))
                    and m.group(2) != _ZERO_TRACE
                    and m.group(3) != _ZERO_SPAN
                ):
                    return f"00-{m.group(2)}-{self._span():016x}-{m.group(4)}", tracestate
        return self.new_traceparent(), None

    def next_hop_bytes(self, traceparent: bytes | None, tracestate: bytes | None = None) -> tuple[bytes, bytes | None]:
        """:meth:`next_hop` over raw bytes (metadata ranges of an undecoded header)."""
        if traceparent is not None:
            m = _RE_B.match(traceparent)
            if m is not None:
                version = m.group(1)
                n = len(traceparent)
                if (
                    version != b"ff"
                    and (n == 55 or (version != b"00" and n > 55 and traceparent[55] == 0x2D))
                    and m.group(2) != b"0" * 32
                    and m.group(3) != b"0" * 16
                ):
                    return b"00-%s-%016x-%s" % (m.group(2), self._span(), m.group(4)), tracestate
        return self.new_traceparent().encode("ascii"), None
