# cython: language_level=3
"""Compiled frame codec, scanner and route table (see ``protocol/_frame_py.py``).

This module and ``protocol/_frame_py.py`` are twins: same names, same results, same
exception classes and messages, same order of checks. The tests run every
codec test on both and compare them on random input. What this one adds is
speed: the scanner keeps per-frame results in C arrays, the route table is a
C hash table keyed by the raw name bytes, and nothing on the scan path makes
a Python object per frame.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free, PyMem_Calloc
from libc.string cimport memcpy, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

from ._errors import LocalProtocolError, RemoteProtocolError
from ._frame import Frame
from ._protocol import Status, DEFAULT_MAX_FRAME_SIZE

IMPLEMENTATION = "cython"

ROUTE_MISS = -1
ROUTE_NOT_REQUEST = -2

cdef enum:
    PREFIX = 20
    LEN_END = 8
    MIN_LEN = 12
    MAX_FIELD = (1 << 29) - 1

cdef object _PROTOCOL_ERROR = Status.PROTOCOL_ERROR
cdef object _FRAME_TOO_LARGE = Status.FRAME_TOO_LARGE


cdef inline uint16_t _be16(const uchar* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t _be32(const uchar* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline uint64_t _be64(const uchar* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)

cdef inline void _put_be64(uchar* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[7 - i] = <uchar>(v & 0xFF)
        v >>= 8


# ---------------------------------------------------------------- errors

cdef int _hdr_error(str msg, uint64_t sid) except -1:
    raise RemoteProtocolError(msg, _PROTOCOL_ERROR, sid)


cdef Py_ssize_t _check_prefix(const uchar* p, Py_ssize_t avail, Py_ssize_t max_frame_size) except -1:
    """Check what is present of a frame's first 8 bytes; return its size or 0."""
    cdef uint32_t length
    cdef Py_ssize_t size
    cdef int t
    if avail > 1 and (p[0] != 0xAB or p[1] != 0xBA):
        raise RemoteProtocolError("bad magic 0x%04x" % ((p[0] << 8) | p[1]), _PROTOCOL_ERROR)
    if avail > 2 and p[2] != 1:
        raise RemoteProtocolError("unsupported version %d" % p[2], _PROTOCOL_ERROR)
    if avail > 3:
        t = p[3]
        if t == 0 or t > 6:
            raise RemoteProtocolError("unknown frame type %d" % t, _PROTOCOL_ERROR)
    if avail < LEN_END:
        return 0
    length = _be32(p + 4)
    if length < MIN_LEN:
        raise RemoteProtocolError("frame length %d below minimum %d" % (length, MIN_LEN), _PROTOCOL_ERROR)
    size = <Py_ssize_t>length + LEN_END
    if size > max_frame_size:
        raise RemoteProtocolError(
            "frame of %d bytes exceeds the limit of %d bytes" % (size, max_frame_size), _FRAME_TOO_LARGE
        )
    return size


# ---------------------------------------------------------------- header walk

cdef inline Py_ssize_t _varint(const uchar* buf, Py_ssize_t pos, Py_ssize_t end, uint64_t* out, uint64_t sid) except -1:
    cdef uint64_t val = 0
    cdef int shift = 0
    cdef uchar b
    while True:
        if pos >= end:
            _hdr_error("malformed header: truncated varint", sid)
        b = buf[pos]
        pos += 1
        if shift == 63 and (b & 0x7E):
            _hdr_error("malformed header: varint too long", sid)
        val |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            out[0] = val
            return pos
        shift += 7
        if shift > 63:
            _hdr_error("malformed header: varint too long", sid)


cdef int _walk_header(const uchar* buf, Py_ssize_t start, Py_ssize_t end, uint64_t sid, KeyRange* kr) except -1:
    cdef Py_ssize_t pos = start
    cdef uint64_t key, val, field
    cdef int wt
    cdef Py_ssize_t n
    kr.s0 = kr.s1 = kr.m0 = kr.m1 = start
    kr.timeout = 0
    kr.status = 0
    while pos < end:
        if buf[pos] < 0x80:
            key = buf[pos]
            pos += 1
        else:
            pos = _varint(buf, pos, end, &key, sid)
        field = key >> 3
        wt = <int>(key & 7)
        if field == 0 or field > MAX_FIELD:
            _hdr_error("malformed header: bad field number", sid)
        if wt == 2:
            if pos < end and buf[pos] < 0x80:
                val = buf[pos]
                pos += 1
            else:
                pos = _varint(buf, pos, end, &val, sid)
            if val > <uint64_t>(end - pos):
                _hdr_error("malformed header: field length past end", sid)
            if field == 1:
                kr.s0 = pos
                kr.s1 = pos + <Py_ssize_t>val
            elif field == 2:
                kr.m0 = pos
                kr.m1 = pos + <Py_ssize_t>val
            elif field == 4 or field == 5:
                _hdr_error("malformed header: wrong wire type for field %d" % field, sid)
            pos += <Py_ssize_t>val
        elif wt == 0:
            pos = _varint(buf, pos, end, &val, sid)
            if field == 4:
                kr.timeout = <uint32_t>(val & 0xFFFFFFFF)
            elif field == 5:
                kr.status = <uint32_t>(val & 0xFFFFFFFF)
            elif field <= 3 or field == 6 or field == 7:
                _hdr_error("malformed header: wrong wire type for field %d" % field, sid)
        elif wt == 1 or wt == 5:
            if field <= 7:
                _hdr_error("malformed header: wrong wire type for field %d" % field, sid)
            n = 8 if wt == 1 else 4
            if n > end - pos:
                _hdr_error("malformed header: field length past end", sid)
            pos += n
        else:
            _hdr_error("malformed header: invalid wire type %d" % wt, sid)
    return 0


def read_routing_key(header):
    """Return ``(service, method)`` as bytes from an encoded header.

    Raises:
        RemoteProtocolError: the header is not well-formed protobuf, or a known
            field has the wrong wire type.
    """
    cdef Py_buffer view
    cdef KeyRange kr
    cdef const uchar* p
    PyObject_GetBuffer(header, &view, PyBUF_SIMPLE)
    try:
        p = <const uchar*>view.buf
        _walk_header(p, 0, view.len, 0, &kr)
        return (PyBytes_FromStringAndSize(<const char*>p + kr.s0, kr.s1 - kr.s0),
                PyBytes_FromStringAndSize(<const char*>p + kr.m0, kr.m1 - kr.m0))
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------- route table

cdef uint64_t _K1 = 0x9E3779B97F4A7C15
cdef uint64_t _K2 = 0xC2B2AE3D27D4EB4F

cdef inline uint64_t _mix(uint64_t h, uint64_t w) noexcept nogil:
    h = (h ^ w) * <uint64_t>_K1
    return h ^ (h >> 29)

cdef inline uint64_t _hash_seg(uint64_t h, const uchar* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t w
    h = _mix(h, <uint64_t>n * <uint64_t>_K2)
    while n >= 8:
        memcpy(&w, p, 8)
        h = _mix(h, w)
        p += 8
        n -= 8
    if n > 0:
        w = 0
        memcpy(&w, p, n)
        h = _mix(h, w)
    return h


cdef class RouteTable:
    """Immutable map from (service, method) to a route id, with method wildcards.

    Built from ``(service, method, route_id)`` triples; method ``"*"`` matches
    any method of that service; an exact entry wins over the wildcard. Names
    are compared as UTF-8 bytes, straight out of the frame.
    """

    def __cinit__(self):
        self.slots = NULL
        self.n = 0

    def __init__(self, entries=()):
        cdef list keys = []
        cdef dict seen = {}
        cdef Py_ssize_t cap, i, off
        cdef bytes s, m
        cdef uint64_t h
        cdef RouteSlot* slot
        self._entries = []
        for service, method, route_id in entries:
            s = service.encode() if isinstance(service, str) else bytes(service)
            m = method.encode() if isinstance(method, str) else bytes(method)
            rid = int(route_id)
            if rid < 0 or rid > 0x7FFFFFFF:
                raise ValueError(f"route id {rid} out of range 0..2**31-1")
            if (s, m) in seen:
                raise ValueError(f"duplicate route {s.decode(errors='replace')}/{m.decode(errors='replace')}")
            seen[(s, m)] = rid
            keys.append((s, m, rid))
            self._entries.append((s.decode(errors="replace"), m.decode(errors="replace"), rid))
        self.n = len(keys)
        cap = 8
        while cap < self.n * 2:
            cap <<= 1
        self.mask = cap - 1
        self.blob = b"".join([s + m for s, m, _ in keys])
        self.bp = <const uchar*>PyBytes_AS_STRING(self.blob)
        self.slots = <RouteSlot*>PyMem_Malloc(cap * sizeof(RouteSlot))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(cap):
            self.slots[i].koff = -1
        off = 0
        for s, m, rid in keys:
            h = _hash_seg(_hash_seg(0, <const uchar*>PyBytes_AS_STRING(s), len(s)),
                          <const uchar*>PyBytes_AS_STRING(m), len(m))
            i = <Py_ssize_t>(h & <uint64_t>self.mask)
            while self.slots[i].koff != -1:
                i = (i + 1) & self.mask
            slot = &self.slots[i]
            slot.hash = h
            slot.koff = off
            slot.slen = len(s)
            slot.mlen = len(m)
            slot.value = rid
            off += len(s) + len(m)

    def __dealloc__(self):
        if self.slots != NULL:
            PyMem_Free(self.slots)

    cdef int32_t _find(self, uint64_t h, const uchar* s, Py_ssize_t slen,
                              const uchar* m, Py_ssize_t mlen) noexcept nogil:
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self.mask)
        cdef RouteSlot* slot
        while True:
            slot = &self.slots[i]
            if slot.koff == -1:
                return -1
            if (slot.hash == h and slot.slen == slen and slot.mlen == mlen
                    and memcmp(self.bp + slot.koff, s, slen) == 0
                    and memcmp(self.bp + slot.koff + slen, m, mlen) == 0):
                return slot.value
            i = (i + 1) & self.mask

    cdef int32_t c_lookup(self, const uchar* s, Py_ssize_t slen, const uchar* m, Py_ssize_t mlen) noexcept nogil:
        cdef uint64_t hs, h
        cdef int32_t r
        if self.n == 0:
            return -1
        hs = _hash_seg(0, s, slen)
        h = _hash_seg(hs, m, mlen)
        r = self._find(h, s, slen, m, mlen)
        if r >= 0:
            return r
        h = _hash_seg(hs, <const uchar*>b"*", 1)
        return self._find(h, s, slen, <const uchar*>b"*", 1)

    def lookup(self, service, method):
        """Return the route id for (service, method), or -1."""
        cdef bytes s = service.encode() if isinstance(service, str) else bytes(service)
        cdef bytes m = method.encode() if isinstance(method, str) else bytes(method)
        return self.c_lookup(<const uchar*>PyBytes_AS_STRING(s), len(s), <const uchar*>PyBytes_AS_STRING(m), len(m))

    def entries(self):
        return list(self._entries)

    def __len__(self):
        return self.n


# ---------------------------------------------------------------- scanner

cdef class Scanner:
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

    def __cinit__(self):
        self.offsets = NULL
        self.sizes = NULL
        self.types = NULL
        self.flags = NULL
        self.sids = NULL
        self.timeouts = NULL
        self.route_ids = NULL
        self.keys = NULL

    def __init__(self, routes=None, max_frame_size=DEFAULT_MAX_FRAME_SIZE, capacity=1024):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_frame_size < PREFIX:
            raise ValueError(f"max_frame_size must be >= {PREFIX}")
        self.routes = routes if routes is not None else RouteTable()
        self.max_frame_size = max_frame_size
        self.capacity = capacity
        self.count = 0
        self.consumed = 0
        self.next_size = 0
        self._buf = b""
        self.offsets = <Py_ssize_t*>PyMem_Malloc(capacity * sizeof(Py_ssize_t))
        self.sizes = <Py_ssize_t*>PyMem_Malloc(capacity * sizeof(Py_ssize_t))
        self.types = <uint8_t*>PyMem_Malloc(capacity * sizeof(uint8_t))
        self.flags = <uint16_t*>PyMem_Malloc(capacity * sizeof(uint16_t))
        self.sids = <uint64_t*>PyMem_Malloc(capacity * sizeof(uint64_t))
        self.timeouts = <uint32_t*>PyMem_Malloc(capacity * sizeof(uint32_t))
        self.route_ids = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
        self.keys = <KeyRange*>PyMem_Malloc(capacity * sizeof(KeyRange))
        if (self.offsets == NULL or self.sizes == NULL or self.types == NULL or self.flags == NULL
                or self.sids == NULL or self.timeouts == NULL or self.route_ids == NULL or self.keys == NULL):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.offsets)
        PyMem_Free(self.sizes)
        PyMem_Free(self.types)
        PyMem_Free(self.flags)
        PyMem_Free(self.sids)
        PyMem_Free(self.timeouts)
        PyMem_Free(self.route_ids)
        PyMem_Free(self.keys)

    cdef Py_ssize_t c_scan(self, const uchar* buf, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef Py_ssize_t pos = start, n = 0, avail, size, cap = self.capacity
        cdef Py_ssize_t max_size = self.max_frame_size, next_size = 0
        cdef const uchar* p
        cdef uint32_t length
        cdef uint16_t hlen
        cdef uint8_t ftype
        cdef uint64_t sid
        cdef KeyRange* kr
        cdef RouteTable routes = self.routes
        try:
            while n < cap:
                avail = end - pos
                if avail <= 0:
                    break
                p = buf + pos
                if avail < PREFIX or p[0] != 0xAB or p[1] != 0xBA or p[2] != 1:
                    size = _check_prefix(p, avail, max_size)
                    if size == 0 or avail < size:
                        next_size = size
                        break
                ftype = p[3]
                length = _be32(p + 4)
                if ftype == 0 or ftype > 6 or length < MIN_LEN or <Py_ssize_t>length + 8 > max_size:
                    _check_prefix(p, avail, max_size)
                size = <Py_ssize_t>length + 8
                if avail < size:
                    next_size = size
                    break
                sid = _be64(p + 8)
                hlen = _be16(p + 18)
                kr = &self.keys[n]
                if hlen > length - MIN_LEN:
                    raise RemoteProtocolError("header length %d exceeds frame" % hlen, _PROTOCOL_ERROR, sid)
                if hlen:
                    _walk_header(buf, pos + PREFIX, pos + PREFIX + hlen, sid, kr)
                else:
                    kr.s0 = kr.s1 = kr.m0 = kr.m1 = pos + PREFIX
                    kr.timeout = 0
                    kr.status = 0
                if ftype == 1 or ftype == 3:
                    self.route_ids[n] = routes.c_lookup(buf + kr.s0, kr.s1 - kr.s0, buf + kr.m0, kr.m1 - kr.m0)
                else:
                    self.route_ids[n] = ROUTE_NOT_REQUEST
                self.offsets[n] = pos
                self.sizes[n] = size
                self.types[n] = ftype
                self.flags[n] = _be16(p + 16)
                self.sids[n] = sid
                self.timeouts[n] = kr.timeout
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

    def scan(self, buf, Py_ssize_t start=0, Py_ssize_t end=-1):
        """Scan ``buf[start:end]`` (``end=-1``: to the end). Returns the frame count."""
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if end < 0 or end > view.len:
                end = view.len
            if start < 0 or start > end:
                raise ValueError("start out of range")
            self._buf = buf
            self.count = 0
            return self.c_scan(<const uchar*>view.buf, start, end)
        finally:
            PyBuffer_Release(&view)

    def frame(self, Py_ssize_t i):
        """``(offset, size, type, flags, stream_id, timeout_ms, route, status)`` of frame ``i``.

        ``status`` is header field 5 (responses), truncated to 32 bits.
        """
        if not 0 <= i < self.count:
            raise IndexError(i)
        return (self.offsets[i], self.sizes[i], self.types[i], self.flags[i], self.sids[i],
                self.timeouts[i], self.route_ids[i], self.keys[i].status)

    def routing_key(self, Py_ssize_t i):
        """``(service, method)`` bytes of frame ``i`` (empty for non-requests)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        cdef KeyRange* kr = &self.keys[i]
        cdef Py_buffer view
        PyObject_GetBuffer(self._buf, &view, PyBUF_SIMPLE)
        try:
            p = <const char*>view.buf
            return (PyBytes_FromStringAndSize(p + kr.s0, kr.s1 - kr.s0),
                    PyBytes_FromStringAndSize(p + kr.m0, kr.m1 - kr.m0))
        finally:
            PyBuffer_Release(&view)


# ---------------------------------------------------------------- decoder

cdef class FrameDecoder:
    """Feed bytes, pull whole :class:`Frame` objects (h11-style, sans-IO).

    Memory is bounded by ``max_frame_size``: a frame announcing more is refused
    as soon as its length field arrives. After an error the decoder is in a
    sticky error state and raises the same error again.
    """

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        if max_frame_size < PREFIX:
            raise ValueError(f"max_frame_size must be >= {PREFIX}")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._error = None

    @property
    def pending(self):
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf) - self._pos

    def receive_data(self, data):
        """Append bytes read from the peer."""
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self):
        """Return the next whole frame, or ``None`` if more bytes are needed.

        Raises:
            RemoteProtocolError: the stream is not valid (sticky).
        """
        cdef Py_ssize_t pos = self._pos, avail, size
        cdef const uchar* p
        cdef uint64_t sid
        cdef uint16_t hlen
        cdef uint8_t ftype
        cdef KeyRange kr
        cdef bytes raw
        cdef const uchar* r
        if self._error is not None:
            raise self._error
        avail = PyByteArray_GET_SIZE(self._buf) - pos
        if avail <= 0:
            return None
        p = <const uchar*>PyByteArray_AS_STRING(self._buf) + pos
        try:
            size = _check_prefix(p, avail, self.max_frame_size)
            if size == 0 or avail < size:
                return None
            ftype = p[3]
            sid = _be64(p + 8)
            hlen = _be16(p + 18)
            if hlen > size - PREFIX:
                raise RemoteProtocolError("header length %d exceeds frame" % hlen, _PROTOCOL_ERROR, sid)
            raw = PyBytes_FromStringAndSize(<const char*>p, size)
            r = <const uchar*>PyBytes_AS_STRING(raw)
            _walk_header(r, PREFIX, PREFIX + hlen, sid, &kr)
            service = method = ""
            if ftype == 1 or ftype == 3:
                try:
                    service = raw[kr.s0:kr.s1].decode()
                    method = raw[kr.m0:kr.m1].decode()
                except UnicodeDecodeError:
                    raise RemoteProtocolError("malformed header: name is not valid UTF-8", _PROTOCOL_ERROR, sid) from None
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        self._pos = pos + size
        return Frame(ftype, sid, _be16(r + 16), raw, PREFIX + hlen, service, method, kr.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        f = self.next_frame()
        if f is None:
            raise StopIteration
        return f


# ---------------------------------------------------------------- encoders

cdef inline Py_ssize_t _put_varint(uchar* p, uint64_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    while n > 0x7F:
        p[i] = <uchar>((n & 0x7F) | 0x80)
        n >>= 7
        i += 1
    p[i] = <uchar>n
    return i + 1


cdef inline void _put_string(bytearray out, uchar tag, bytes data):
    cdef uchar tmp[11]
    tmp[0] = tag
    cdef Py_ssize_t k = 1 + _put_varint(tmp + 1, len(data))
    out += (<char*>tmp)[:k]
    out += data


def encode_header(*, service="", method="", caller="", timeout_ms=0, status=0, error="", metadata=None):
    """Encode an ``octoproxy.v1.Header``: fields in number order, defaults
    omitted, map entries sorted by key (UTF-8 byte order), each entry with
    both its key and value fields, as protobuf writes them.
    """
    cdef bytearray out = bytearray()
    cdef bytearray entry
    cdef uchar tmp[11]
    cdef Py_ssize_t k
    if service:
        _put_string(out, 0x0A, service.encode() if isinstance(service, str) else bytes(service))
    if method:
        _put_string(out, 0x12, method.encode() if isinstance(method, str) else bytes(method))
    if caller:
        _put_string(out, 0x1A, caller.encode() if isinstance(caller, str) else bytes(caller))
    if timeout_ms:
        if not 0 <= timeout_ms <= 0xFFFFFFFF:
            raise LocalProtocolError(f"timeout_ms {timeout_ms} out of range")
        tmp[0] = 0x20
        k = 1 + _put_varint(tmp + 1, <uint64_t>timeout_ms)
        out += (<char*>tmp)[:k]
    if status:
        if not 0 <= status <= 0x7FFFFFFF:
            raise LocalProtocolError(f"status {status} out of range")
        tmp[0] = 0x28
        k = 1 + _put_varint(tmp + 1, <uint64_t>status)
        out += (<char*>tmp)[:k]
    if error:
        _put_string(out, 0x32, error.encode() if isinstance(error, str) else bytes(error))
    if metadata:
        for key in sorted(metadata):
            # protobuf writes both fields of a map entry, defaults included
            entry = bytearray()
            _put_string(entry, 0x0A, key.encode())
            _put_string(entry, 0x12, metadata[key].encode())
            _put_string(out, 0x3A, bytes(entry))
    return bytes(out)


def encode_frame(int ftype, stream_id, header=b"", body=b"", flags=0):
    """Encode one frame.

    Raises:
        LocalProtocolError: unknown type, stream id or flags out of range,
            header over 65535 bytes, frame over 4 GiB.
    """
    cdef Py_buffer hv, bv
    cdef bytes out
    cdef uchar* o
    cdef Py_ssize_t length
    cdef uint64_t sid
    cdef uint32_t fl
    if ftype < 1 or ftype > 6:
        raise LocalProtocolError(f"unknown frame type {ftype}")
    if stream_id < 0 or stream_id > 0xFFFFFFFFFFFFFFFF:
        raise LocalProtocolError(f"stream id {stream_id} out of range")
    if flags < 0 or flags > 0xFFFF:
        raise LocalProtocolError(f"flags {flags} out of range")
    sid = stream_id
    fl = flags
    PyObject_GetBuffer(header, &hv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(body, &bv, PyBUF_SIMPLE)
        try:
            if hv.len > 0xFFFF:
                raise LocalProtocolError(f"header of {hv.len} bytes exceeds 65535")
            length = MIN_LEN + hv.len + bv.len
            if length > 0xFFFFFFFF:
                raise LocalProtocolError(f"frame length {length} exceeds 2**32-1")
            out = PyBytes_FromStringAndSize(NULL, PREFIX + hv.len + bv.len)
            o = <uchar*>PyBytes_AS_STRING(out)
            o[0] = 0xAB
            o[1] = 0xBA
            o[2] = 1
            o[3] = <uchar>ftype
            o[4] = <uchar>(length >> 24)
            o[5] = <uchar>(length >> 16)
            o[6] = <uchar>(length >> 8)
            o[7] = <uchar>length
            _put_be64(o + 8, sid)
            o[16] = <uchar>(fl >> 8)
            o[17] = <uchar>fl
            o[18] = <uchar>(hv.len >> 8)
            o[19] = <uchar>hv.len
            if hv.len:
                memcpy(o + PREFIX, hv.buf, hv.len)
            if bv.len:
                memcpy(o + PREFIX + hv.len, bv.buf, bv.len)
            return out
        finally:
            PyBuffer_Release(&bv)
    finally:
        PyBuffer_Release(&hv)


def encode_request(stream_id, service, method, body=b"", *, caller="", timeout_ms=0, metadata=None, oneway=False):
    """Encode a REQUEST (or ONEWAY) frame."""
    header = encode_header(service=service, method=method, caller=caller, timeout_ms=timeout_ms, metadata=metadata)
    return encode_frame(3 if oneway else 1, stream_id, header, body)


def encode_response(stream_id, body=b"", *, status=0, error="", flags=0):
    """Encode a RESPONSE frame."""
    return encode_frame(2, stream_id, encode_header(status=status, error=error), body, flags)


def rewrite_stream_id(buf, Py_ssize_t offset, stream_id):
    """Overwrite the stream id of the frame at ``buf[offset:]`` in place; return the old one."""
    cdef Py_buffer view
    cdef uint64_t old
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        if offset < 0 or offset + PREFIX > view.len:
            raise ValueError("offset out of range")
        if stream_id < 0 or stream_id > 0xFFFFFFFFFFFFFFFF:
            raise LocalProtocolError(f"stream id {stream_id} out of range")
        old = _be64(<const uchar*>view.buf + offset + 8)
        _put_be64(<uchar*>view.buf + offset + 8, <uint64_t>stream_id)
        return old
    finally:
        PyBuffer_Release(&view)
