# cython: language_level=3
"""Compiled twin of ``octoproxy/core/_relay_py.py``: the engine's per-frame
fast path (see that file for the contract). It reads the scanner's C arrays
directly, copies frames into the destination buffers with ``memcpy`` and
rewrites stream ids in place; policy stays in ``Engine.slow_request`` /
``slow_response``, called for every frame that is not the common case.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

from octoproxy.protocol._fastframe cimport Scanner, KeyRange, uchar
from octoproxy.core._kernel_c cimport Cluster, Engine, Link, PendingTable, StatsTable

IMPLEMENTATION = "cython"


cdef inline void _put_be64(uchar* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[7 - i] = <uchar>(v & 0xFF)
        v >>= 8


cdef inline Py_ssize_t _grow(bytearray out, Py_ssize_t n) except -1:
    """Extend ``out`` by ``n`` bytes; return the offset of the new space."""
    cdef Py_ssize_t o = PyByteArray_GET_SIZE(out)
    if PyByteArray_Resize(out, o + n) < 0:
        raise MemoryError()
    return o


cdef enum:
    KEY_CACHE_SIZE = 4096  # a power of two


cdef class KeyCache:
    """(listener, service, method) -> stats id, found without building the key.

    Direct-mapped by an FNV-1a hash of the bytes as they sit in the read
    buffer; a slot holds the key bytes it was filled with (compared with
    ``memcmp``) and its stats id. A miss falls back to the engine's
    ``rs_cache`` dict and fills the slot. One per engine (stats ids are).
    """
    cdef list keys
    cdef uint64_t hashes[KEY_CACHE_SIZE]
    cdef int32_t ids[KEY_CACHE_SIZE]

    def __cinit__(self):
        self.keys = [None] * KEY_CACHE_SIZE


cdef inline uint64_t _fnv(uint64_t h, const uchar* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        h = (h ^ p[j]) * 1099511628211ULL
    return h


cdef int _stats_id(Engine engine, bint inbound, const uchar* buf, KeyRange* kr) except -1:
    """The stats id of the request's (listener, service, method)."""
    cdef KeyCache kc = engine.key_cache
    if kc is None:
        kc = engine.key_cache = KeyCache()
    cdef Py_ssize_t sl = kr.s1 - kr.s0, ml = kr.m1 - kr.m0, idx
    cdef uint64_t h = 14695981039346656037ULL ^ (1 if inbound else 2)
    h = _fnv(h, buf + kr.s0, sl)
    h = (h ^ 0) * 1099511628211ULL
    h = _fnv(h, buf + kr.m0, ml)
    idx = <Py_ssize_t>(h & (KEY_CACHE_SIZE - 1))
    cdef object known = kc.keys[idx]
    cdef const char* kp
    if kc.hashes[idx] == h and known is not None and PyBytes_GET_SIZE(known) == sl + 1 + ml:
        kp = PyBytes_AS_STRING(known)
        if memcmp(kp, buf + kr.s0, sl) == 0 and kp[sl] == 0 and memcmp(kp + sl + 1, buf + kr.m0, ml) == 0:
            return kc.ids[idx]
    # a miss: the key, the dict, the registry (once per key)
    listener = "inbound" if inbound else "outbound"
    cdef dict cache = engine.rs_cache[listener]
    cdef bytes key = PyBytes_FromStringAndSize(NULL, sl + 1 + ml)
    cdef char* k = PyBytes_AS_STRING(key)
    memcpy(k, buf + kr.s0, sl)
    k[sl] = 0
    memcpy(k + sl + 1, buf + kr.m0, ml)
    stats_id = cache.get(key)
    if stats_id is None:
        stats_id = engine.rstats.id_of(engine.stats.request_stats(
            listener,
            PyBytes_FromStringAndSize(<const char*>buf + kr.s0, sl),
            PyBytes_FromStringAndSize(<const char*>buf + kr.m0, ml),
        ))
        if len(cache) < 10000:  # beyond, ProxyStats pools them anyway
            cache[key] = stats_id
    kc.keys[idx] = key
    kc.hashes[idx] = h
    kc.ids[idx] = stats_id
    return stats_id


cdef int _forward(Engine engine, Link down, Link up, Scanner sc, Py_ssize_t i, const uchar* buf,
                  double now, double route_timeout, double max_timeout, bint oneway) except -1:
    cdef Py_ssize_t off = sc.offsets[i], size = sc.sizes[i], o, hlen, slen
    cdef bytearray out = up.out
    cdef bytes stamp = engine.stamp
    cdef uchar* dst
    cdef KeyRange* kr = &sc.keys[i]
    cdef double timeout, deadline
    cdef uint64_t usid
    cdef int stats_id
    cdef list dirty
    slen = len(stamp)
    if slen and down.listener == "outbound":
        hlen = (<Py_ssize_t>buf[off + 18] << 8) | buf[off + 19]
        o = _grow(out, size + slen)
        dst = <uchar*>PyByteArray_AS_STRING(out) + o
        memcpy(dst, buf + off, 20 + hlen)
        memcpy(dst + 20 + hlen, PyBytes_AS_STRING(stamp), slen)
        memcpy(dst + 20 + hlen + slen, buf + off + 20 + hlen, size - 20 - hlen)
        # length and header length grow by the stamp
        dst[4] = <uchar>((size - 8 + slen) >> 24)
        dst[5] = <uchar>((size - 8 + slen) >> 16)
        dst[6] = <uchar>((size - 8 + slen) >> 8)
        dst[7] = <uchar>(size - 8 + slen)
        dst[18] = <uchar>((hlen + slen) >> 8)
        dst[19] = <uchar>(hlen + slen)
    else:
        o = _grow(out, size)
        dst = <uchar*>PyByteArray_AS_STRING(out) + o
        memcpy(dst, buf + off, size)
    dirty = engine.dirty
    if not dirty or dirty[len(dirty) - 1] is not up:
        dirty.append(up)
    if oneway:
        engine.stats.oneway.inc()
        return 0
    timeout = sc.timeouts[i] / 1000.0 if sc.timeouts[i] else route_timeout
    if max_timeout and timeout > max_timeout:
        timeout = max_timeout
    deadline = now + timeout
    stats_id = _stats_id(engine, down.listener == "inbound", buf, kr)
    usid = engine.table.add(down, sc.sids[i], up, deadline, now, stats_id, None)
    # (the output may have moved: add() runs no Python code on ``out``, but re-derive to be safe)
    _put_be64(<uchar*>PyByteArray_AS_STRING(out) + o + 8, usid)
    return 0


def forward(Engine engine, Link down, Link up, Scanner scanner, Py_ssize_t i, mv, double now, double route_timeout, double max_timeout, bint oneway):
    """Append request frame ``i`` to ``up`` (new stream id, caller stamp) and track it."""
    cdef Py_buffer view
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    try:
        _forward(engine, down, up, scanner, i, <const uchar*>view.buf, now, route_timeout, max_timeout, oneway)
    finally:
        PyBuffer_Release(&view)


def relay_requests(Engine engine, Link down, Scanner scanner, Py_ssize_t n, mv, double now):
    """Forward the ``n`` scanned frames that came from a downstream link."""
    cdef Py_buffer view
    cdef Py_ssize_t i
    cdef int32_t route_id
    cdef bint inbound
    cdef double route_timeout = 0.0, max_timeout = 0.0
    cdef list route_clusters, route_timeouts, route_max_timeouts
    cdef Py_ssize_t max_pending, stamp_len, max_size, off, high
    cdef const uchar* buf
    cdef Cluster cluster
    cdef Link up
    if down.reject or engine.drain_mode is not None:
        for i in range(n):
            engine.slow_request(down, scanner, i, mv, now)
        return
    inbound = down.listener == "inbound"
    high = engine.high_watermark
    stamp_len = 0 if inbound else len(<bytes>engine.stamp)
    max_size = engine.max_frame_size - stamp_len
    route_clusters = engine._route_clusters
    route_timeouts = engine._route_timeouts
    route_max_timeouts = engine._route_max_timeouts
    max_pending = engine.max_pending
    cdef PendingTable table = engine.table
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    try:
        buf = <const uchar*>view.buf
        for i in range(n):
            off = scanner.offsets[i]
            if scanner.types[i] != 1 or (stamp_len and (
                    scanner.sizes[i] > max_size
                    or (((<Py_ssize_t>buf[off + 18]) << 8) | buf[off + 19]) + stamp_len > 0xFFFF)):
                # not a request, or too big to carry the caller stamp: the slow path says why
                engine.slow_request(down, scanner, i, mv, now)
                continue
            route_id = scanner.route_ids[i]
            if inbound:
                cluster = engine._inbound_fast  # None while the inbound side is governed
                route_timeout = engine.default_timeout
                max_timeout = engine.inbound_max_timeout
            elif route_id >= 0:
                cluster = route_clusters[route_id]
                route_timeout = route_timeouts[route_id]
                max_timeout = route_max_timeouts[route_id]
            else:
                cluster = None
            if cluster is None or table.count >= max_pending:
                engine.slow_request(down, scanner, i, mv, now)
                continue
            up = cluster.pick()
            if up is None or PyByteArray_GET_SIZE(<bytearray>up.out) > high:  # no link, or a full one
                engine.slow_request(down, scanner, i, mv, now)
                continue
            _forward(engine, down, up, scanner, i, <const uchar*>view.buf, now, route_timeout, max_timeout, False)
    finally:
        PyBuffer_Release(&view)


def relay_responses(Engine engine, Link up, Scanner scanner, Py_ssize_t n, mv, double now):
    """Relay the ``n`` scanned frames that came from an upstream link."""
    cdef Py_buffer view
    cdef Py_ssize_t i, off, size, o, slot
    cdef PendingTable table = engine.table
    cdef StatsTable rstats = engine.rstats
    cdef int stats_id
    cdef Link down
    cdef bytearray out
    cdef uchar* dst
    cdef list dirty
    cdef uint32_t status
    cdef unsigned long long down_sid
    cdef double t0
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    try:
        for i in range(n):
            if scanner.types[i] != 2 or (scanner.flags[i] & 1):
                engine.slow_response(up, scanner, i, mv, now)
                continue
            slot = table.find(up, scanner.sids[i])
            if slot < 0:
                engine.stats.error("late_response")
                continue
            if table.gov[slot] is not None:  # a governed call: the chain in reverse
                engine.governed_response(up, table.take(slot), scanner, i, mv, now)
                continue
            down = <Link>table.down[slot]
            stats_id = table.sid[slot]
            t0 = table.t0[slot]
            down_sid = table.down_sid[slot]
            table.remove(slot)
            rstats.record(stats_id, scanner.keys[i].status, now - t0)
            if not down.closed:
                off = scanner.offsets[i]
                size = scanner.sizes[i]
                out = down.out
                o = _grow(out, size)
                dst = <uchar*>PyByteArray_AS_STRING(out) + o
                memcpy(dst, <const uchar*>view.buf + off, size)
                _put_be64(dst + 8, down_sid)
                dirty = engine.dirty
                if not dirty or dirty[len(dirty) - 1] is not down:
                    dirty.append(down)
                if down.draining and down.inflight == 0 and down.on_idle is not None:
                    down.on_idle(down)
    finally:
        PyBuffer_Release(&view)
