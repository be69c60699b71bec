"""Process memory: keep big buffers mmapped, give freed heap back to the system (glibc).

Used by the proxy (after a flood of connections closes) and the control plane
(after sessions with many subscriptions end).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

#: allocations above this are served by mmap and returned on free (2 x the proxy's small frame)
MMAP_THRESHOLD = 128 * 1024

_libc_trim: Callable[[int], int] | None = None
_trim_checked = False


def _libc() -> ctypes.CDLL | None:
    try:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover
        return None


def tune_malloc() -> None:
    """Keep glibc from moving big frame buffers onto the heap.

    glibc serves allocations above ``M_MMAP_THRESHOLD`` with mmap (given back
    on free) but raises that threshold after each such free, up to 32 MiB;
    then 16 MiB frame buffers come from the heap and stay resident after they
    are freed. A fixed threshold keeps them mmapped.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def trim_memory() -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim(0)``); False where unavailable.

    After a flood of connections closes, glibc keeps the freed arenas; RSS
    then stays at the flood's peak. Called rate-limited by the proxy's sweeper.
    """
    global _libc_trim, _trim_checked
    if not _trim_checked:
        _trim_checked = True
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim.argtypes = [ctypes.c_size_t]
            trim.restype = ctypes.c_int
            _libc_trim = trim
    if _libc_trim is None:
        return False
    _libc_trim(0)
    return True
