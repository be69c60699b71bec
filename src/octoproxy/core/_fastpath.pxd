# cython: language_level=3
# The relay's byte-level primitives, compiled: inline functions the kernel
# (core/_kernel.py compiled as _kernel_c) cimports, so each is a few C
# instructions in the kernel's loops. Their pure-Python twin is
# core/_relay_py.py (same names, same results); tests run both.
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy, memcmp
from libc.stdint cimport uint64_t, uint32_t, int32_t

from octoproxy.protocol._fastframe cimport Scanner, KeyRange, uchar

cdef enum:
    KEY_CACHE_SIZE = 4096  # a power of two


cdef class KeyCache:
    cdef list keys
    cdef uint64_t hashes[KEY_CACHE_SIZE]
    cdef int32_t ids[KEY_CACHE_SIZE]
    cdef Py_ssize_t last_idx
    cdef uint64_t last_hash


cdef inline KeyCache new_key_cache():
    return KeyCache()


# -- the scanner's per-frame fields
cdef inline int f_type(Scanner sc, Py_ssize_t i) noexcept:
    return sc.types[i]

cdef inline int f_flags(Scanner sc, Py_ssize_t i) noexcept:
    return sc.flags[i]

cdef inline Py_ssize_t f_offset(Scanner sc, Py_ssize_t i) noexcept:
    return sc.offsets[i]

cdef inline Py_ssize_t f_size(Scanner sc, Py_ssize_t i) noexcept:
    return sc.sizes[i]

cdef inline unsigned long long f_sid(Scanner sc, Py_ssize_t i) noexcept:
    return sc.sids[i]

cdef inline unsigned int f_timeout(Scanner sc, Py_ssize_t i) noexcept:
    return sc.timeouts[i]

cdef inline int f_route(Scanner sc, Py_ssize_t i) noexcept:
    return sc.route_ids[i]

cdef inline unsigned int f_status(Scanner sc, Py_ssize_t i) noexcept:
    return sc.keys[i].status


# -- bytes
cdef inline Py_ssize_t header_len(const uchar[::1] buf, Py_ssize_t off) noexcept:
    """The header length field of the frame at ``off``."""
    return (<Py_ssize_t>buf[off + 18] << 8) | buf[off + 19]


cdef inline Py_ssize_t _grow(bytearray out, Py_ssize_t n) except -1:
    cdef Py_ssize_t o = PyByteArray_GET_SIZE(out)
    if PyByteArray_Resize(out, o + n) < 0:
        raise MemoryError()
    return o


cdef inline Py_ssize_t copy_frame(bytearray out, const uchar[::1] buf, Py_ssize_t off, Py_ssize_t size) except -1:
    """Append the frame at ``buf[off:off+size]`` to ``out``; return where it starts in ``out``."""
    cdef Py_ssize_t o = _grow(out, size)
    memcpy(<uchar*>PyByteArray_AS_STRING(out) + o, &buf[off], size)
    return o


cdef inline Py_ssize_t copy_stamped(bytearray out, const uchar[::1] buf, Py_ssize_t off, Py_ssize_t size, bytes stamp) except -1:
    """:func:`copy_frame` with ``stamp`` (encoded header fields) appended to the frame's header."""
    cdef Py_ssize_t hlen = header_len(buf, off), slen = PyBytes_GET_SIZE(stamp)
    cdef Py_ssize_t o = _grow(out, size + slen)
    cdef uchar* dst = <uchar*>PyByteArray_AS_STRING(out) + o
    cdef const uchar* src = &buf[off]
    memcpy(dst, src, 20 + hlen)
    memcpy(dst + 20 + hlen, PyBytes_AS_STRING(stamp), slen)
    memcpy(dst + 20 + hlen + slen, src + 20 + hlen, size - 20 - hlen)
    # length and header length grow by the stamp
    dst[4] = <uchar>((size - 8 + slen) >> 24)
    dst[5] = <uchar>((size - 8 + slen) >> 16)
    dst[6] = <uchar>((size - 8 + slen) >> 8)
    dst[7] = <uchar>(size - 8 + slen)
    dst[18] = <uchar>((hlen + slen) >> 8)
    dst[19] = <uchar>(hlen + slen)
    return o


cdef inline int put_sid(bytearray out, Py_ssize_t o, uint64_t sid) except -1:
    """Write ``sid`` as the stream id of the frame at ``out[o:]``."""
    cdef uchar* p = <uchar*>PyByteArray_AS_STRING(out) + o + 8
    cdef int k
    for k in range(8):
        p[7 - k] = <uchar>(sid & 0xFF)
        sid >>= 8
    return 0


# -- the stats key cache: (listener, service, method) -> stats id without building the key
cdef inline uint64_t _fnv(uint64_t h, const uchar* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t j
    for j in range(n):
        h = (h ^ p[j]) * 1099511628211ULL
    return h


cdef inline int kc_lookup(KeyCache kc, bint inbound, const uchar[::1] buf, Scanner sc, Py_ssize_t i) except -2:
    """The stats id cached for request ``i``'s key, or -1 (then :func:`kc_fill` files it)."""
    cdef KeyRange* kr = &sc.keys[i]
    cdef Py_ssize_t sl = kr.s1 - kr.s0, ml = kr.m1 - kr.m0, idx
    cdef const uchar* b = &buf[0]
    cdef uint64_t h = 14695981039346656037ULL ^ (1 if inbound else 2)
    h = _fnv(h, b + kr.s0, sl)
    h = h * 1099511628211ULL  # the 0 between service and method
    h = _fnv(h, b + kr.m0, ml)
    idx = <Py_ssize_t>(h & (KEY_CACHE_SIZE - 1))
    kc.last_idx = idx
    kc.last_hash = h
    cdef object known = kc.keys[idx]
    cdef const char* kp
    if kc.hashes[idx] == h and known is not None and PyBytes_GET_SIZE(known) == sl + 1 + ml:
        kp = PyBytes_AS_STRING(known)
        if memcmp(kp, b + kr.s0, sl) == 0 and kp[sl] == 0 and memcmp(kp + sl + 1, b + kr.m0, ml) == 0:
            return kc.ids[idx]
    return -1


cdef inline int kc_fill(KeyCache kc, bint inbound, bytes key, int stats_id) except -1:
    """File ``key`` (``service\\0method``) -> ``stats_id`` where the last lookup missed."""
    kc.keys[kc.last_idx] = key
    kc.hashes[kc.last_idx] = kc.last_hash
    kc.ids[kc.last_idx] = stats_id
    return 0
