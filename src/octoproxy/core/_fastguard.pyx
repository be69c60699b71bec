# cython: language_level=3
"""Compiled twin of ``octoproxy/core/_guard_py.py``: the inbound guard's per-frame loops.

Two loops over a scan's frames, in C: find the first request that needs the
guard's policy (``first_unclean``), and copy frames with the caller stamp
inserted after each request's header (``stamp_frames``). Which frames need
policy (a route miss, an ``authorization`` metadata candidate, a frame too
large for the stamp) is decided by the Python caller for those frames only;
see ``core/_guard.py``. Keep the two implementations in step.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING
from libc.string cimport memcpy

from octoproxy.protocol._fastframe cimport Scanner, uchar

IMPLEMENTATION = "cython"

cdef enum:
    PREFIX = 20
    KEY_LEN = 13  # len("authorization")


cdef inline bint _lower_eq(const uchar* p) noexcept nogil:
    cdef const char* key = b"authorization"
    cdef int i
    cdef uchar c
    for i in range(KEY_LEN):
        c = p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <uchar>key[i]:
            return False
    return True


cdef inline bint _has_credential(const uchar* buf, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """A map-entry key ``authorization`` (any case): bytes 0x0A 0x0D then the 13 letters."""
    cdef Py_ssize_t p = start
    while p + 2 + KEY_LEN <= end:
        if buf[p] == 0x0A and buf[p + 1] == KEY_LEN and _lower_eq(buf + p + 2):
            return True
        p += 1
    return False


def has_credential(buf, Py_ssize_t start, Py_ssize_t end):
    """Might ``buf[start:end]`` (a header) carry an ``authorization`` metadata key?"""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if end > view.len:
            end = view.len
        return _has_credential(<const uchar*>view.buf, start, end)
    finally:
        PyBuffer_Release(&view)


def first_unclean(Scanner sc, buf, Py_ssize_t start, Py_ssize_t n):
    """Index of the first request frame in ``[start, n)`` with a route miss or a credential; ``n`` if none."""
    cdef Py_buffer view
    cdef Py_ssize_t i, off, h0
    cdef const uchar* p
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const uchar*>view.buf
        for i in range(start, n):
            if sc.types[i] != 1 and sc.types[i] != 3:
                continue
            if sc.route_ids[i] < 0:
                return i
            off = sc.offsets[i]
            h0 = off + PREFIX
            if _has_credential(p, h0, h0 + ((<Py_ssize_t>p[off + 18] << 8) | p[off + 19])):
                return i
        return n
    finally:
        PyBuffer_Release(&view)


def stamp_frames(Scanner sc, buf, Py_ssize_t start, Py_ssize_t n, bytes stamp, bytearray out, Py_ssize_t max_frame):
    """Append frames ``start``, ``start+1``... to ``out``, each request with ``stamp``
    after its header (lengths adjusted), until one needs the guard's policy.

    Returns:
        The index of the first frame not appended (a request with a route
        miss, a credential candidate, or no room for the stamp), or ``n``.
    """
    cdef Py_buffer view
    cdef Py_ssize_t i, off, size, hlen, h0, o, slen = len(stamp), nsize
    cdef const uchar* p
    cdef uchar* dst
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const uchar*>view.buf
        for i in range(start, n):
            off = sc.offsets[i]
            size = sc.sizes[i]
            o = PyByteArray_GET_SIZE(out)
            if sc.types[i] != 1 and sc.types[i] != 3:
                if PyByteArray_Resize(out, o + size) < 0:
                    raise MemoryError()
                memcpy(<uchar*>PyByteArray_AS_STRING(out) + o, p + off, size)
                continue
            if sc.route_ids[i] < 0:
                return i
            hlen = (<Py_ssize_t>p[off + 18] << 8) | p[off + 19]
            h0 = off + PREFIX
            nsize = size + slen
            if nsize > max_frame or hlen + slen > 0xFFFF or _has_credential(p, h0, h0 + hlen):
                return i
            if PyByteArray_Resize(out, o + nsize) < 0:
                raise MemoryError()
            dst = <uchar*>PyByteArray_AS_STRING(out) + o
            memcpy(dst, p + off, PREFIX + hlen)
            memcpy(dst + PREFIX + hlen, PyBytes_AS_STRING(stamp), slen)
            memcpy(dst + PREFIX + hlen + slen, p + h0 + hlen, size - PREFIX - hlen)
            dst[4] = <uchar>((nsize - 8) >> 24)
            dst[5] = <uchar>((nsize - 8) >> 16)
            dst[6] = <uchar>((nsize - 8) >> 8)
            dst[7] = <uchar>(nsize - 8)
            dst[18] = <uchar>((hlen + slen) >> 8)
            dst[19] = <uchar>(hlen + slen)
        return n
    finally:
        PyBuffer_Release(&view)
