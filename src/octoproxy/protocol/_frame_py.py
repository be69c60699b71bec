"""Pure-Python twin of ``octoproxy.protocol._fastframe``: the frame codec, the scanner
and the route table. Behaviour, results and exceptions are identical to the
Cython module (the test suite runs every codec test on both and compares
them on random input). Keep the two files in step: same names, same error
messages, same order of checks.

Theory of operation
-------------------
A byte stream is a sequence of frames (docs/protocol.md). Two consumers:

* :class:`FrameDecoder`, h11-style (``receive_data`` / ``next_frame``), for the
  SDK and for tests: it buffers and yields :class:`~octoproxy.protocol._frame.Frame`
  objects.
* :class:`Scanner`, for the proxy's hot path: it walks a buffer the caller
  owns and records, per complete frame, offset, size, type, flags, stream id,
  timeout and route id, without building objects per frame (in the compiled
  module: C arrays).

Checks are made as soon as the bytes they need are present, in this order:
magic (2 bytes), version (3), type (4), length (8: minimum, then maximum
frame size, so an oversized frame is refused before it is buffered), then,
once the frame is whole, the header length and the header's protobuf
structure. Header fields 1 (service), 2 (method) and 4 (timeout_ms) are read
on the way; other fields are skipped after their wire structure is checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from struct import Struct

from ._errors import LocalProtocolError, RemoteProtocolError
from ._frame import Frame
from ._protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    LENGTH_FIELD_END,
    MAGIC,
    MIN_LENGTH,
    PREFIX_SIZE,
    VERSION,
    Status,
)

IMPLEMENTATION = "python"

ROUTE_MISS = -1
ROUTE_NOT_REQUEST = -2

_PREFIX = Struct(">HBBIQHH")
_U16 = Struct(">H")
_U64 = Struct(">Q")
_PREFIX_PACK = _PREFIX.pack
_PREFIX_UNPACK_FROM = _PREFIX.unpack_from
_MAX_FIELD = (1 << 29) - 1
_FRAME_TOO_LARGE = Status.FRAME_TOO_LARGE


# ---------------------------------------------------------------- header walk


def _varint(buf: bytes | bytearray | memoryview, pos: int, end: int, stream_id: int) -> tuple[int, int]:
    """Read a base-128 varint at ``pos``; values must fit in 64 bits."""
    val = 0
    shift = 0
    while True:
        if pos >= end:
            raise RemoteProtocolError("malformed header: truncated varint", Status.PROTOCOL_ERROR, stream_id)
        b = buf[pos]
        pos += 1
        if shift == 63 and b & 0x7E:
            raise RemoteProtocolError("malformed header: varint too long", Status.PROTOCOL_ERROR, stream_id)
        val |= (b & 0x7F) << shift
        if not b & 0x80:
            return val, pos
        shift += 7
        if shift > 63:
            raise RemoteProtocolError("malformed header: varint too long", Status.PROTOCOL_ERROR, stream_id)


def _walk_header(buf: bytes | bytearray | memoryview, start: int, end: int, stream_id: int) -> tuple[int, int, int, int, int, int]:
    """Check the protobuf structure of ``buf[start:end]``.

    Returns (service_start, service_end, method_start, method_end, timeout_ms, status);
    absent strings are empty ranges at ``start``. Last occurrence wins, as in
    protobuf.
    """
    s0 = s1 = m0 = m1 = start
    timeout = status = 0
    pos = start
    while pos < end:
        if buf[pos] < 0x80:  # one-byte key: the common case
            key = buf[pos]
            pos += 1
        else:
            key, pos = _varint(buf, pos, end, stream_id)
        field = key >> 3
        wt = key & 7
        if field == 0 or field > _MAX_FIELD:
            raise RemoteProtocolError("malformed header: bad field number", Status.PROTOCOL_ERROR, stream_id)
        if wt == 2:
            if pos < end and buf[pos] < 0x80:
                val = buf[pos]
                pos += 1
            else:
                val, pos = _varint(buf, pos, end, stream_id)
            if val > end - pos:
                raise RemoteProtocolError("malformed header: field length past end", Status.PROTOCOL_ERROR, stream_id)
            if field == 1:
                s0 = pos
                s1 = pos + val
            elif field == 2:
                m0 = pos
                m1 = pos + val
            elif field == 4 or field == 5:
                raise RemoteProtocolError(f"malformed header: wrong wire type for field {field}", Status.PROTOCOL_ERROR, stream_id)
            pos += val
        elif wt == 0:
            val, pos = _varint(buf, pos, end, stream_id)
            if field == 4:
                timeout = val & 0xFFFFFFFF
            elif field == 5:
                status = val & 0xFFFFFFFF
            elif field <= 3 or field == 6 or field == 7:
                raise RemoteProtocolError(f"malformed header: wrong wire type for field {field}", Status.PROTOCOL_ERROR, stream_id)
        elif wt == 1 or wt == 5:
            if field <= 7:
                raise RemoteProtocolError(f"malformed header: wrong wire type for field {field}", Status.PROTOCOL_ERROR, stream_id)
            n = 8 if wt == 1 else 4
            if n > end - pos:
                raise RemoteProtocolError("malformed header: field length past end", Status.PROTOCOL_ERROR, stream_id)
            pos += n
        else:
            raise RemoteProtocolError(f"malformed header: invalid wire type {wt}", Status.PROTOCOL_ERROR, stream_id)
    return s0, s1, m0, m1, timeout, status


def read_routing_key(header: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """Return ``(service, method)`` as bytes from an encoded header.

    Raises:
        RemoteProtocolError: the header is not well-formed protobuf, or a known
            field has the wrong wire type.
    """
    mv = memoryview(header).cast("B")
    s0, s1, m0, m1, _, _ = _walk_header(mv, 0, len(mv), 0)
    return bytes(mv[s0:s1]), bytes(mv[m0:m1])


def _check_prefix(buf: bytes | bytearray | memoryview, pos: int, avail: int, max_frame_size: int) -> int:
    """Check what is present of the 8-byte start of a frame; return its size or 0."""
    if avail > 1 and (buf[pos] != 0xAB or buf[pos + 1] != 0xBA):
        raise RemoteProtocolError(f"bad magic 0x{buf[pos] << 8 | buf[pos + 1]:04x}", Status.PROTOCOL_ERROR)
    if avail > 2 and buf[pos + 2] != VERSION:
        raise RemoteProtocolError(f"unsupported version {buf[pos + 2]}", Status.PROTOCOL_ERROR)
    if avail > 3:
        t = buf[pos + 3]
        if t == 0 or t > 6:
            raise RemoteProtocolError(f"unknown frame type {t}", Status.PROTOCOL_ERROR)
    if avail < LENGTH_FIELD_END:
        return 0
    length = buf[pos + 4] << 24 | buf[pos + 5] << 16 | buf[pos + 6] << 8 | buf[pos + 7]
    if length < MIN_LENGTH:
        raise RemoteProtocolError(f"frame length {length} below minimum {MIN_LENGTH}", Status.PROTOCOL_ERROR)
    size = LENGTH_FIELD_END + length
    if size > max_frame_size:
        raise RemoteProtocolError(f"frame of {size} bytes exceeds the limit of {max_frame_size} bytes", _FRAME_TOO_LARGE)
    return size


# ---------------------------------------------------------------- route table


class RouteTable:
    """Immutable map from (service, method) to a route id, with method wildcards.

    Built from ``(service, method, route_id)`` triples; method ``"*"`` matches
    any method of that service; an exact entry wins over the wildcard. Names
    are compared as UTF-8 bytes, straight out of the frame.
    """

    __slots__ = ("_map", "_entries")

    def __init__(self, entries: Iterable[tuple[str | bytes, str | bytes, int]] = ()) -> None:
        self._map: dict[tuple[bytes, bytes], int] = {}
        self._entries: list[tuple[str, str, int]] = []
        for service, method, route_id in entries:
            s = service.encode() if isinstance(service, str) else bytes(service)
            m = method.encode() if isinstance(method, str) else bytes(method)
            rid = int(route_id)
            if rid < 0 or rid > 0x7FFFFFFF:
                raise ValueError(f"route id {rid} out of range 0..2**31-1")
            if (s, m) in self._map:
                raise ValueError(f"duplicate route {s.decode(errors='replace')}/{m.decode(errors='replace')}")
            self._map[(s, m)] = rid
            self._entries.append((s.decode(errors="replace"), m.decode(errors="replace"), rid))

    def lookup(self, service: str | bytes, method: str | bytes) -> int:
        """Return the route id for (service, method), or -1."""
        s = service.encode() if isinstance(service, str) else bytes(service)
        m = method.encode() if isinstance(method, str) else bytes(method)
        rid = self._map.get((s, m))
        if rid is None:
            rid = self._map.get((s, b"*"), -1)
        return rid

    def entries(self) -> list[tuple[str, str, int]]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------- scanner


class Scanner:
    """Hot-path frame splitter and router over a caller-owned buffer.

    ``scan(buf, start, end)`` records up to ``capacity`` complete frames found
    in ``buf[start:end]`` and returns their count. ``consumed`` is then the
    offset just past the last recorded frame, and ``next_size`` the size of the
    incomplete frame that follows (0 if its length field is not there yet).

    A bad frame raises :class:`RemoteProtocolError` only if it is the first
    frame of the scan: otherwise the good frames before it are returned and the
    next scan (which starts at the bad frame) raises. So no good frame is ever
    lost to a bad one behind it.
    """

    def __init__(self, routes: RouteTable | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_frame_size < PREFIX_SIZE:
            raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")
        self.routes = routes if routes is not None else RouteTable()
        self.max_frame_size = max_frame_size
        self.capacity = capacity
        self.count = 0
        self.consumed = 0
        self.next_size = 0
        self._info: list[tuple[int, int, int, int, int, int, int, int]] = []
        self._keys: list[tuple[int, int, int, int]] = []
        self._buf: bytes | bytearray | memoryview = b""

    def scan(self, buf: bytes | bytearray | memoryview, start: int = 0, end: int = -1) -> int:
        """Scan ``buf[start:end]`` (``end=-1``: to the end). Returns the frame count."""
        if isinstance(buf, memoryview):
            buf = buf.cast("B") if buf.format != "B" else buf
        n_total = len(buf)
        if end < 0 or end > n_total:
            end = n_total
        if start < 0 or start > end:
            raise ValueError("start out of range")
        self._buf = buf
        self.count = 0  # as the compiled twin: nothing valid until this scan returns
        info = self._info
        keys = self._keys
        info.clear()
        keys.clear()
        lookup = self.routes._map.get
        max_size = self.max_frame_size
        cap = self.capacity
        pos = start
        n = 0
        next_size = 0
        try:
            while n < cap:
                avail = end - pos
                if avail <= 0:
                    break
                if avail < PREFIX_SIZE or buf[pos] != 0xAB or buf[pos + 1] != 0xBA or buf[pos + 2] != 1:
                    size = _check_prefix(buf, pos, avail, max_size)
                    if size == 0 or avail < size:
                        next_size = size
                        break
                magic, _ver, ftype, length, sid, flags, hlen = _PREFIX_UNPACK_FROM(buf, pos)
                if ftype == 0 or ftype > 6 or length < MIN_LENGTH or length + 8 > max_size:
                    _check_prefix(buf, pos, avail, max_size)
                size = length + 8
                if avail < size:
                    next_size = size
                    break
                if hlen > length - MIN_LENGTH:
                    raise RemoteProtocolError(f"header length {hlen} exceeds frame", Status.PROTOCOL_ERROR, sid)
                h0 = pos + PREFIX_SIZE
                if hlen:
                    s0, s1, m0, m1, timeout, status = _walk_header(buf, h0, h0 + hlen, sid)
                else:
                    s0 = s1 = m0 = m1 = h0
                    timeout = status = 0
                if ftype == 1 or ftype == 3:
                    s = bytes(buf[s0:s1])
                    m = bytes(buf[m0:m1])
                    route = lookup((s, m))
                    if route is None:
                        route = lookup((s, b"*"), -1)
                else:
                    route = ROUTE_NOT_REQUEST
                info.append((pos, size, ftype, flags, sid, timeout, route, status))
                keys.append((s0, s1, m0, m1))
                n += 1
                pos += size
        except RemoteProtocolError:
            if n == 0:
                raise
            next_size = 0
        self.count = n
        self.consumed = pos
        self.next_size = next_size
        return n

    def frame(self, i: int) -> tuple[int, int, int, int, int, int, int, int]:
        """``(offset, size, type, flags, stream_id, timeout_ms, route, status)`` of frame ``i``.

        ``status`` is header field 5 (responses), truncated to 32 bits.
        """
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self._info[i]

    def routing_key(self, i: int) -> tuple[bytes, bytes]:
        """``(service, method)`` bytes of frame ``i`` (empty for non-requests)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        s0, s1, m0, m1 = self._keys[i]
        buf = self._buf
        return bytes(buf[s0:s1]), bytes(buf[m0:m1])


# ---------------------------------------------------------------- decoder


class FrameDecoder:
    """Feed bytes, pull whole :class:`Frame` objects (h11-style, sans-IO).

    Memory is bounded by ``max_frame_size``: a frame announcing more is refused
    as soon as its length field arrives. After an error the decoder is in a
    sticky error state and raises the same error again.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < PREFIX_SIZE:
            raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._error: RemoteProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the peer."""
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or ``None`` if more bytes are needed.

        Raises:
            RemoteProtocolError: the stream is not valid (sticky).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail <= 0:
            return None
        try:
            size = _check_prefix(buf, pos, avail, self.max_frame_size)
            if size == 0 or avail < size:
                return None
            _m, _v, ftype, _l, sid, flags, hlen = _PREFIX_UNPACK_FROM(buf, pos)
            if hlen > size - PREFIX_SIZE:
                raise RemoteProtocolError(f"header length {hlen} exceeds frame", Status.PROTOCOL_ERROR, sid)
            raw = bytes(buf[pos : pos + size])
            h1 = PREFIX_SIZE + hlen
            s0, s1, m0, m1, timeout, _status = _walk_header(raw, PREFIX_SIZE, h1, sid)
            service = method = ""
            if ftype == 1 or ftype == 3:
                try:
                    service = raw[s0:s1].decode()
                    method = raw[m0:m1].decode()
                except UnicodeDecodeError:
                    raise RemoteProtocolError("malformed header: name is not valid UTF-8", Status.PROTOCOL_ERROR, sid) from None
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        self._pos = pos + size
        return Frame(ftype, sid, flags, raw, h1, service, method, timeout)

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Frame:
        f = self.next_frame()
        if f is None:
            raise StopIteration
        return f


# ---------------------------------------------------------------- encoders


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string_field(tag: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else bytes(value)
    return bytes((tag,)) + _encode_varint(len(data)) + data


def encode_header(
    *,
    service: str = "",
    method: str = "",
    caller: str = "",
    timeout_ms: int = 0,
    status: int = 0,
    error: str = "",
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Encode an ``octoproxy.v1.Header``: fields in number order, defaults
    omitted, map entries sorted by key (UTF-8 byte order), each entry with
    both its key and value fields, as protobuf writes them.
    """
    out = bytearray()
    if service:
        out += _string_field(0x0A, service)
    if method:
        out += _string_field(0x12, method)
    if caller:
        out += _string_field(0x1A, caller)
    if timeout_ms:
        if not 0 <= timeout_ms <= 0xFFFFFFFF:
            raise LocalProtocolError(f"timeout_ms {timeout_ms} out of range")
        out += b"\x20" + _encode_varint(timeout_ms)
    if status:
        if not 0 <= status <= 0x7FFFFFFF:
            raise LocalProtocolError(f"status {status} out of range")
        out += b"\x28" + _encode_varint(status)
    if error:
        out += _string_field(0x32, error)
    if metadata:
        for k in sorted(metadata):
            # protobuf writes both fields of a map entry, defaults included
            entry = _string_field(0x0A, k) + _string_field(0x12, metadata[k])
            out += b"\x3a" + _encode_varint(len(entry)) + entry
    return bytes(out)


def encode_frame(ftype: int, stream_id: int, header: bytes | bytearray | memoryview = b"", body: bytes | bytearray | memoryview = b"", flags: int = 0) -> bytes:
    """Encode one frame.

    Raises:
        LocalProtocolError: unknown type, stream id or flags out of range,
            header over 65535 bytes, frame over 4 GiB.
    """
    if ftype < 1 or ftype > 6:
        raise LocalProtocolError(f"unknown frame type {ftype}")
    if stream_id < 0 or stream_id > 0xFFFFFFFFFFFFFFFF:
        raise LocalProtocolError(f"stream id {stream_id} out of range")
    if flags < 0 or flags > 0xFFFF:
        raise LocalProtocolError(f"flags {flags} out of range")
    hlen = len(header)
    if hlen > 0xFFFF:
        raise LocalProtocolError(f"header of {hlen} bytes exceeds 65535")
    length = MIN_LENGTH + hlen + len(body)
    if length > 0xFFFFFFFF:
        raise LocalProtocolError(f"frame length {length} exceeds 2**32-1")
    return b"".join((_PREFIX_PACK(MAGIC, VERSION, ftype, length, stream_id, flags, hlen), header, body))


def encode_request(
    stream_id: int,
    service: str,
    method: str,
    body: bytes | bytearray | memoryview = b"",
    *,
    caller: str = "",
    timeout_ms: int = 0,
    metadata: dict[str, str] | None = None,
    oneway: bool = False,
) -> bytes:
    """Encode a REQUEST (or ONEWAY) frame."""
    header = encode_header(service=service, method=method, caller=caller, timeout_ms=timeout_ms, metadata=metadata)
    return encode_frame(3 if oneway else 1, stream_id, header, body)


def encode_response(
    stream_id: int,
    body: bytes | bytearray | memoryview = b"",
    *,
    status: int = 0,
    error: str = "",
    flags: int = 0,
) -> bytes:
    """Encode a RESPONSE frame."""
    return encode_frame(2, stream_id, encode_header(status=status, error=error), body, flags)


def rewrite_stream_id(buf: bytearray | memoryview, offset: int, stream_id: int) -> int:
    """Overwrite the stream id of the frame at ``buf[offset:]`` in place; return the old one."""
    if offset < 0 or offset + PREFIX_SIZE > len(buf):
        raise ValueError("offset out of range")
    if stream_id < 0 or stream_id > 0xFFFFFFFFFFFFFFFF:
        raise LocalProtocolError(f"stream id {stream_id} out of range")
    old: int = _U64.unpack_from(buf, offset + 8)[0]
    _U64.pack_into(buf, offset + 8, stream_id)
    return old
