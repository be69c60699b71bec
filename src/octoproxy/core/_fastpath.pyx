# cython: language_level=3
"""The relay's byte-level primitives, compiled (see ``_fastpath.pxd``, which
holds them as inline functions for the kernel to cimport; their twin is
``octoproxy/core/_relay_py.py``). The forwarding policy itself is the
kernel's (``core/_kernel.py``), written once.
"""

IMPLEMENTATION = "cython"


cdef class KeyCache:
    """(listener, service, method) -> stats id, found from the bytes in the read buffer.

    Direct-mapped by an FNV-1a hash; a slot keeps the key bytes it was filled
    with (compared with ``memcmp``) and the stats id. One per engine (stats
    ids are per engine); a miss falls back to the engine's ``rs_cache``.
    """

    def __cinit__(self):
        self.keys = [None] * KEY_CACHE_SIZE
        self.last_idx = 0
        self.last_hash = 0
