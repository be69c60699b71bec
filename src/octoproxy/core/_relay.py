"""Pick the engine's fast path: compiled ``octoproxy.core._fastpath`` or its twin.

Same rule as :mod:`octoproxy.frame`: ``OCTOPROXY_NO_EXTENSIONS=1`` forces the
pure-Python twin; otherwise the compiled module if it and the compiled kernel
import (the compiled relay works on the compiled kernel's classes only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..frame import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._relay_py import IMPLEMENTATION, forward, relay_requests, relay_responses
else:
    try:
        # only with the compiled kernel (the compiled relay types its arguments with its classes)
        from . import _kernel_c  # noqa: F401
        from ._fastpath import IMPLEMENTATION, forward, relay_requests, relay_responses  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - depends on the build
        from ._relay_py import IMPLEMENTATION, forward, relay_requests, relay_responses

__all__ = ["IMPLEMENTATION", "forward", "relay_requests", "relay_responses"]
