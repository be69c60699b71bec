"""Wire constants of the octoproxy frame protocol, version 1 (docs/protocol.md).

Plain data, shared by the Cython module and its pure-Python twin.
"""

from __future__ import annotations

import enum

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX_SIZE",
    "LENGTH_FIELD_END",
    "MIN_LENGTH",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_STREAM_ID",
    "FrameType",
    "Flags",
    "Status",
]

MAGIC = 0xABBA
VERSION = 1
#: magic(2) version(1) type(1) length(4) stream_id(8) flags(2) header_len(2)
PREFIX_SIZE = 20
#: offset just past the length field; the frame size is ``LENGTH_FIELD_END + length``
LENGTH_FIELD_END = 8
#: the smallest legal value of the length field (stream id, flags, header length)
MIN_LENGTH = PREFIX_SIZE - LENGTH_FIELD_END
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
MAX_STREAM_ID = 2**64 - 1


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ONEWAY = 3
    PING = 4
    PONG = 5
    GOAWAY = 6


class Flags(enum.IntFlag):
    NONE = 0
    #: on a RESPONSE: the request was NOT processed; resend it on a new connection
    HOT_RESTART = 1


class Status(enum.IntEnum):
    OK = 0
    APPLICATION_ERROR = 1
    NO_ROUTE = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    RATE_LIMITED = 5
    UNAUTHENTICATED = 6
    PERMISSION_DENIED = 7
    PROTOCOL_ERROR = 8
    FRAME_TOO_LARGE = 9
    OVERLOADED = 10
