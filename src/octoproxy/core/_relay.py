"""Which build of the relay's byte-level primitives runs: ``"cython"`` or ``"python"``.

The kernel picks its primitives by its own build (the compiled kernel
cimports ``_fastpath.pxd``'s inline functions; the interpreted one imports
``_relay_py``); this module only reports the choice, by the same rule as
:mod:`octoproxy.core._engine`.
"""

from __future__ import annotations

from ._engine import KERNEL

IMPLEMENTATION: str = KERNEL

__all__ = ["IMPLEMENTATION"]
