"""The :class:`Frame` value type and full header parsing (shared by both codec
implementations; protobuf is only touched here, never on the proxy's hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import RemoteProtocolError
from ._protocol import PREFIX_SIZE, Flags, FrameType, Status

if TYPE_CHECKING:
    from .proto import octoproxy_header_pb2 as _pb

    Header = _pb.Header

__all__ = ["Frame", "Header", "parse_header"]

# protobuf (about 3 MB of RSS with its descriptor pool) loads on the first full
# parse: an idle proxy, and one whose routes need no header metadata, never
# parses a header with it (docs/benchmarks.md, "Idle RSS")
_header_class: Any = None
_decode_error: Any = None


def _load_protobuf() -> Any:
    global _header_class, _decode_error
    from google.protobuf.message import DecodeError

    from .proto import octoproxy_header_pb2

    _decode_error = DecodeError
    _header_class = octoproxy_header_pb2.Header
    return _header_class


def __getattr__(name: str) -> Any:
    if name == "Header":  # the protobuf message class, loaded on first use
        return _header_class or _load_protobuf()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_header(data: bytes | bytearray | memoryview, stream_id: int | None = None) -> _pb.Header:
    """Parse an encoded ``octoproxy.v1.Header`` with protobuf.

    Raises:
        RemoteProtocolError: the bytes are not a valid Header (status PROTOCOL_ERROR).
    """
    msg: _pb.Header = (_header_class or _load_protobuf())()
    try:
        msg.ParseFromString(bytes(data))
    except _decode_error as exc:
        raise RemoteProtocolError(f"malformed header: {exc}", Status.PROTOCOL_ERROR, stream_id) from None
    return msg


class Frame:
    """One decoded frame. The body is a zero-copy view of the frame's bytes.

    Attributes:
        type: the :class:`FrameType` (an int).
        stream_id: 64-bit stream id.
        flags: 16-bit flags (:class:`Flags`).
        raw: the whole encoded frame (``bytes``).
        service, method: the routing key of REQUEST/ONEWAY frames ("" otherwise).
        timeout_ms: header field 4 (0 if absent).
    """

    __slots__ = ("type", "stream_id", "flags", "raw", "_hend", "service", "method", "timeout_ms", "_header")

    def __init__(
        self,
        ftype: int,
        stream_id: int,
        flags: int,
        raw: bytes,
        header_end: int,
        service: str = "",
        method: str = "",
        timeout_ms: int = 0,
    ) -> None:
        self.type = ftype
        self.stream_id = stream_id
        self.flags = flags
        self.raw = raw
        self._hend = header_end
        self.service = service
        self.method = method
        self.timeout_ms = timeout_ms
        self._header: _pb.Header | None = None

    @property
    def header_bytes(self) -> bytes:
        """The encoded protobuf header."""
        return self.raw[PREFIX_SIZE : self._hend]

    @property
    def body(self) -> memoryview:
        """The opaque body, as a view into :attr:`raw` (no copy)."""
        return memoryview(self.raw)[self._hend :]

    @property
    def header(self) -> _pb.Header:
        """The parsed protobuf header (parsed on first access, then cached).

        Raises:
            RemoteProtocolError: the header does not parse.
        """
        if self._header is None:
            self._header = parse_header(self.header_bytes, self.stream_id)
        return self._header

    @property
    def hot_restart(self) -> bool:
        return bool(self.flags & Flags.HOT_RESTART)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        try:
            t = FrameType(self.type).name
        except ValueError:  # pragma: no cover - decoders never produce these
            t = str(self.type)
        extra = f" {self.service}/{self.method}" if self.service or self.method else ""
        return f"<Frame {t} stream={self.stream_id} flags={self.flags}{extra} body={len(self.raw) - self._hend}B>"
