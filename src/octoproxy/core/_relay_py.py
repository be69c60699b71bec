"""Pure-Python twin of the relay's byte-level primitives (``octoproxy.core._fastpath``).

The kernel (``core/_kernel.py``) holds the forwarding policy, written once;
per frame it calls these primitives: the scanner's fields of frame ``i``,
the header length, copy (with the caller stamp), the stream-id rewrite, and
the stats-key cache. Compiled, they are inline C functions in
``_fastpath.pxd`` that the compiled kernel cimports; here, plain functions
with the same names and results. Tests run both (conftest's ``impl``).
"""

from __future__ import annotations

from struct import Struct
from typing import Any

from ..protocol._protocol import PREFIX_SIZE

IMPLEMENTATION = "python"

_U64 = Struct(">Q")
_U32 = Struct(">I")
_U16 = Struct(">H")


class KeyCache:
    """(listener, service, method) -> stats id (a dict here)."""

    __slots__ = ("ids", "last")

    def __init__(self) -> None:
        self.ids: dict[tuple[bool, bytes], int] = {}
        self.last: tuple[bool, bytes] = (False, b"")


def new_key_cache() -> KeyCache:
    return KeyCache()


# -- the scanner's per-frame fields
def f_type(sc: Any, i: int) -> int:
    return int(sc._info[i][2])  # (the twin scanner's row; its frame(i) checks bounds)


def f_flags(sc: Any, i: int) -> int:
    return int(sc._info[i][3])  # (the twin scanner's row; its frame(i) checks bounds)


def f_offset(sc: Any, i: int) -> int:
    return int(sc._info[i][0])  # (the twin scanner's row; its frame(i) checks bounds)


def f_size(sc: Any, i: int) -> int:
    return int(sc._info[i][1])  # (the twin scanner's row; its frame(i) checks bounds)


def f_sid(sc: Any, i: int) -> int:
    return int(sc._info[i][4])  # (the twin scanner's row; its frame(i) checks bounds)


def f_timeout(sc: Any, i: int) -> int:
    return int(sc._info[i][5])  # (the twin scanner's row; its frame(i) checks bounds)


def f_route(sc: Any, i: int) -> int:
    return int(sc._info[i][6])  # (the twin scanner's row; its frame(i) checks bounds)


def f_status(sc: Any, i: int) -> int:
    return int(sc._info[i][7])  # (the twin scanner's row; its frame(i) checks bounds)


# -- bytes
def header_len(buf: Any, off: int) -> int:
    """The header length field of the frame at ``off``."""
    return int(buf[off + 18] << 8 | buf[off + 19])


def copy_frame(out: bytearray, buf: Any, off: int, size: int) -> int:
    """Append the frame at ``buf[off:off+size]`` to ``out``; return where it starts in ``out``."""
    o = len(out)
    out += buf[off : off + size]
    return o


def copy_stamped(out: bytearray, buf: Any, off: int, size: int, stamp: bytes) -> int:
    """:func:`copy_frame` with ``stamp`` (encoded header fields) appended to the frame's header."""
    o = len(out)
    hend = off + PREFIX_SIZE + header_len(buf, off)
    out += buf[off:hend]
    out += stamp
    out += buf[hend : off + size]
    _U32.pack_into(out, o + 4, size - 8 + len(stamp))
    _U16.pack_into(out, o + 18, hend - off - PREFIX_SIZE + len(stamp))
    return o


def put_sid(out: bytearray, o: int, sid: int) -> int:
    """Write ``sid`` as the stream id of the frame at ``out[o:]``."""
    _U64.pack_into(out, o + 8, sid)
    return 0


# -- the stats key cache
def kc_lookup(kc: KeyCache, inbound: bool, buf: Any, sc: Any, i: int) -> int:
    """The stats id cached for request ``i``'s key, or -1 (then :func:`kc_fill` files it)."""
    service, method = sc.routing_key(i)
    kc.last = (inbound, service + b"\0" + method)
    return kc.ids.get(kc.last, -1)


def kc_fill(kc: KeyCache, inbound: bool, key: bytes, stats_id: int) -> int:
    """File ``key`` (``service\\0method``) -> ``stats_id`` where the last lookup missed."""
    if len(kc.ids) < 4096:
        kc.ids[(inbound, key)] = stats_id
    return 0
