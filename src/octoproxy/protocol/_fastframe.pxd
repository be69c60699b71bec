# Declarations shared with other compiled modules (octoproxy.core._fastpath).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

ctypedef unsigned char uchar

cdef struct KeyRange:
    Py_ssize_t s0
    Py_ssize_t s1
    Py_ssize_t m0
    Py_ssize_t m1
    uint32_t timeout
    uint32_t status

cdef struct RouteSlot:
    uint64_t hash
    Py_ssize_t koff     # offset of service bytes in the key blob; -1 = empty slot
    Py_ssize_t slen
    Py_ssize_t mlen
    int32_t value


cdef class RouteTable:
    cdef RouteSlot* slots
    cdef Py_ssize_t mask
    cdef bytes blob
    cdef const uchar* bp
    cdef list _entries
    cdef Py_ssize_t n
    cdef int32_t _find(self, uint64_t h, const uchar* s, Py_ssize_t slen, const uchar* m, Py_ssize_t mlen) noexcept nogil
    cdef int32_t c_lookup(self, const uchar* s, Py_ssize_t slen, const uchar* m, Py_ssize_t mlen) noexcept nogil


cdef class Scanner:
    cdef public RouteTable routes
    cdef public Py_ssize_t max_frame_size
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t count
    cdef readonly Py_ssize_t consumed
    cdef readonly Py_ssize_t next_size
    cdef Py_ssize_t* offsets
    cdef Py_ssize_t* sizes
    cdef uint8_t* types
    cdef uint16_t* flags
    cdef uint64_t* sids
    cdef uint32_t* timeouts
    cdef int32_t* route_ids
    cdef KeyRange* keys
    cdef object _buf
    cdef Py_ssize_t c_scan(self, const uchar* buf, Py_ssize_t start, Py_ssize_t end) except -1


cdef class FrameDecoder:
    cdef readonly Py_ssize_t max_frame_size
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef object _error
