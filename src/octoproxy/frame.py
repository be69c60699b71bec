"""The frame codec: public API, backed by the compiled module or its twin.

The implementation is picked once, at import: ``OCTOPROXY_NO_EXTENSIONS=1``
forces the pure-Python twin; otherwise the compiled ``_fastframe`` is used if
it imports, and the twin if it does not. :data:`IMPLEMENTATION` says which
("cython" or "python").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .protocol._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .protocol._frame import Frame, parse_header
from .protocol._protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MAGIC,
    PREFIX_SIZE,
    VERSION,
    Flags,
    FrameType,
    Status,
)

NO_EXTENSIONS = os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0")

if TYPE_CHECKING:
    from .protocol._frame import Header


def __getattr__(name: str) -> Any:
    if name == "Header":  # the protobuf message class: protobuf loads on first use (protocol/_frame.py)
        from .protocol import _frame

        return _frame.Header
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING or NO_EXTENSIONS:
    from .protocol import _frame_py as _impl
else:
    try:
        from .protocol import _fastframe as _impl  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - depends on the build
        from .protocol import _frame_py as _impl

IMPLEMENTATION: str = _impl.IMPLEMENTATION
FrameDecoder = _impl.FrameDecoder
Scanner = _impl.Scanner
RouteTable = _impl.RouteTable
encode_frame = _impl.encode_frame
encode_header = _impl.encode_header
encode_request = _impl.encode_request
encode_response = _impl.encode_response
read_routing_key = _impl.read_routing_key
rewrite_stream_id = _impl.rewrite_stream_id
ROUTE_MISS: int = _impl.ROUTE_MISS
ROUTE_NOT_REQUEST: int = _impl.ROUTE_NOT_REQUEST

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "IMPLEMENTATION",
    "MAGIC",
    "PREFIX_SIZE",
    "ROUTE_MISS",
    "ROUTE_NOT_REQUEST",
    "VERSION",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Header",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RouteTable",
    "Scanner",
    "Status",
    "encode_frame",
    "encode_header",
    "encode_request",
    "encode_response",
    "parse_header",
    "read_routing_key",
    "rewrite_stream_id",
]
