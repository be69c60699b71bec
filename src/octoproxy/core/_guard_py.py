"""Pure-Python twin of ``octoproxy.core._fastguard``: the inbound guard's per-frame loops.

``first_unclean`` finds the first request that needs the guard's policy (a
route miss or an ``authorization`` metadata candidate); ``stamp_frames``
copies frames with the caller stamp inserted after each request's header
until one needs policy. The compiled module does the same in C loops; keep
the two in step (tests/test_authz.py runs on both).
"""

from __future__ import annotations

from struct import Struct
from typing import Any

IMPLEMENTATION = "python"

_PREFIX = 20
_KEY = b"authorization"
_KEY_PREFIX = b"\x0a" + bytes([len(_KEY)])
_U32 = Struct(">I")
_U16 = Struct(">H")


def has_credential(buf: Any, start: int, end: int) -> bool:
    """Might ``buf[start:end]`` (a header) carry an ``authorization`` metadata key (any case)?"""
    p = buf.find(_KEY_PREFIX, start, end)
    while p >= 0:
        if p + 2 + len(_KEY) <= end and bytes(buf[p + 2 : p + 2 + len(_KEY)]).lower() == _KEY:
            return True
        p = buf.find(_KEY_PREFIX, p + 1, end)
    return False


def first_unclean(sc: Any, buf: Any, start: int, n: int) -> int:
    """Index of the first request frame in ``[start, n)`` with a route miss or a credential; ``n`` if none."""
    frame = sc.frame
    for i in range(start, n):
        off, _size, ftype, _fl, _sid, _t, route, _st = frame(i)
        if ftype != 1 and ftype != 3:
            continue
        if route < 0:
            return i
        h0 = off + _PREFIX
        if has_credential(buf, h0, h0 + (buf[off + 18] << 8 | buf[off + 19])):
            return i
    return n


def stamp_frames(sc: Any, buf: Any, start: int, n: int, stamp: bytes, out: bytearray, max_frame: int) -> int:
    """Append frames from ``start`` to ``out``, requests stamped, until one needs policy; return its index or ``n``."""
    frame = sc.frame
    slen = len(stamp)
    mv = memoryview(buf)
    try:
        for i in range(start, n):
            off, size, ftype, _fl, _sid, _t, route, _st = frame(i)
            if ftype != 1 and ftype != 3:
                out += mv[off : off + size]
                continue
            if route < 0:
                return i
            hlen = buf[off + 18] << 8 | buf[off + 19]
            h0 = off + _PREFIX
            nsize = size + slen
            if nsize > max_frame or hlen + slen > 0xFFFF or has_credential(buf, h0, h0 + hlen):
                return i
            o = len(out)
            out += mv[off : h0 + hlen]
            out += stamp
            out += mv[h0 + hlen : off + size]
            _U32.pack_into(out, o + 4, nsize - 8)
            _U16.pack_into(out, o + 18, hlen + slen)
        return n
    finally:
        mv.release()
