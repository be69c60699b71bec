"""The error hierarchy shared by every layer (and by the Cython module).

One base class. Protocol errors carry the status the proxy should answer with.
``LocalProtocolError`` means *we* were asked to do something the protocol
forbids (a bug or misuse on our side); ``RemoteProtocolError`` means the peer
sent bytes that break the protocol. Only the input boundary (the decoders)
raises the remote kind.
"""

from __future__ import annotations

import sys

from ._protocol import Status

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["exception_leaves", "OctoproxyError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "ConfigError"]


class OctoproxyError(Exception):
    """Base class of every error octoproxy raises on purpose."""


class ProtocolError(OctoproxyError):
    """A frame-protocol violation.

    Attributes:
        status: the :class:`Status` to answer the offending peer with.
        stream_id: the stream the bad frame belonged to, when it could be read
            (only for frames that arrived whole), else ``None``.
    """

    def __init__(self, msg: str, status: int = Status.PROTOCOL_ERROR, stream_id: int | None = None) -> None:
        super().__init__(msg)
        self.status = Status(status)
        self.stream_id = stream_id

    def __eq__(self, other: object) -> bool:  # used by the differential tests
        return (
            type(self) is type(other)
            and self.args == other.args
            and self.status == other.status
            and self.stream_id == other.stream_id
        )

    def __hash__(self) -> int:
        return hash((type(self), self.args, self.status, self.stream_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args[0]!r}, status={self.status.name}, stream_id={self.stream_id})"


class LocalProtocolError(ProtocolError):
    """We tried to produce something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class ConfigError(OctoproxyError):
    """A configuration file or value is invalid; the message names the key."""


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``.

    For code that must run on Python 3.10, where ``except*`` does not exist.
    """
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in exception_leaves(sub)]
    return [exc]
