"""Pick the kernel: the compiled ``octoproxy.core._kernel_c`` or the interpreted ``_kernel``.

Both are built from one source, ``core/_kernel.py``: Cython compiles it in
pure-Python mode under another module name (typed by ``_kernel_c.pxd``), so
the ``.py`` stays importable beside its extension. Same rule as
:mod:`octoproxy.frame`: ``OCTOPROXY_NO_EXTENSIONS=1`` forces the interpreted
kernel; otherwise the compiled one if it imports. :data:`KERNEL` says which.
Import the kernel's names from here, never from ``_kernel``/``_kernel_c``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..frame import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _kernel as _impl
    from ._kernel import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link, Pending, Route, forward, relay_requests, relay_responses
else:
    try:
        from . import _kernel_c as _impl  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - depends on the build
        from . import _kernel as _impl  # type: ignore[no-redef]
    DOWNSTREAM, UPSTREAM = _impl.DOWNSTREAM, _impl.UPSTREAM
    Cluster, Engine, Link, Pending, Route = _impl.Cluster, _impl.Engine, _impl.Link, _impl.Pending, _impl.Route
    forward, relay_requests, relay_responses = _impl.forward, _impl.relay_requests, _impl.relay_responses

#: "cython" when the kernel runs compiled, "python" when interpreted
KERNEL: str = "python" if _impl.__name__.endswith("._kernel") else "cython"

__all__ = ["Cluster", "Engine", "Link", "Pending", "Route", "DOWNSTREAM", "UPSTREAM", "KERNEL", "forward", "relay_requests", "relay_responses"]
