"""The sans-IO core of the Mesh SDK's provider side, shared by the three front ends.

Theory of operation: a :class:`ServerConnectionCore` is one accepted
connection's protocol state. The front end feeds it the bytes it reads
(:meth:`~ServerConnectionCore.receive_data`) and pulls requests out one at a time
(:meth:`~ServerConnectionCore.next_request`, with the time now, so the front
end can stop pulling when all its handler slots are busy: back-pressure).
PINGs are answered (a PONG in the outbox); a GOAWAY from the peer changes
nothing (we only ever answer); RESPONSE and PONG frames are ignored.

A protocol error from the peer (docs/protocol.md section 8) ends the reading:
the outbox gets a PROTOCOL_ERROR RESPONSE (when the bad frame is a request we
could identify) and a GOAWAY saying why, :attr:`~ServerConnectionCore.error`
is set, and :meth:`~ServerConnectionCore.next_request` returns None from then
on. The front end lets the handlers already running finish and write their
responses, then closes that connection alone.

Handlers' outcomes map to statuses the same way in every front end
(:func:`outcome_of_exception`, :func:`response_frame`): the returned bytes with
OK; APPLICATION_ERROR with an :class:`ApplicationError`'s message;
APPLICATION_ERROR ``"internal error: <type>"`` for any other exception (logged);
TIMEOUT when the request's deadline passed first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..protocol._errors import OctoproxyError, RemoteProtocolError
from ..protocol._protocol import PREFIX_SIZE, FrameType, Status
from ..frame import FrameDecoder, encode_frame, encode_header, encode_response

__all__ = [
    "ApplicationError",
    "Request",
    "ServerConnectionCore",
    "TIMEOUT_OUTCOME",
    "check_server_args",
    "outcome_of_exception",
    "response_frame",
]

logger = logging.getLogger("octoproxy.sdk")

#: the outcome of a request whose deadline passed in the provider
TIMEOUT_OUTCOME = (Status.TIMEOUT, "deadline exceeded in the provider", b"")


class ApplicationError(OctoproxyError):
    """Raise from a handler to answer APPLICATION_ERROR with ``message``.

    Attributes:
        message: sent to the caller as the response's ``error``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Request:
    """One request as a handler sees it.

    Attributes:
        service: the callee service name.
        method: the method name.
        body: the request payload.
        caller: the caller's service name as stamped by its proxy ("" if none).
        metadata: trace context, routing tags, credentials.
        stream_id: the request's stream id on this connection.
        deadline: when the caller stops waiting, on the serving front end's
            clock (Trio's clock, the asyncio loop's clock, the monotonic clock
            for threads), or ``None`` if it sent no timeout.
        oneway: True for a ONEWAY request (nobody reads the result).
    """

    service: str
    method: str
    body: bytes
    caller: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stream_id: int = 0
    deadline: float | None = None
    oneway: bool = False


def check_server_args(max_concurrency: int, max_frame_size: int) -> None:
    """Raise ValueError for limits no server can run with."""
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if max_frame_size < PREFIX_SIZE:
        raise ValueError(f"max_frame_size must be >= {PREFIX_SIZE}")


class ServerConnectionCore:
    """The protocol state of one accepted connection (see the module docstring).

    Attributes:
        error: the peer's protocol error, once it broke the protocol.
        max_frame_size: the largest frame accepted and sent.
    """

    __slots__ = ("decoder", "error", "max_frame_size", "_outbox")

    def __init__(self, max_frame_size: int) -> None:
        self.decoder = FrameDecoder(max_frame_size)
        self.max_frame_size = max_frame_size
        self.error: RemoteProtocolError | None = None
        self._outbox: list[bytes] = []

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the connection (ignored after a protocol error)."""
        if self.error is None:
            self.decoder.receive_data(data)

    def data_to_send(self) -> bytes:
        """Control frames the front end must write (PONGs; a refusal and a GOAWAY)."""
        if not self._outbox:
            return b""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    def next_request(self, now: float) -> Request | None:
        """The next REQUEST or ONEWAY in the bytes received so far, or None.

        ``now`` (the front end's clock) anchors the request's deadline.
        """
        if self.error is not None:
            return None
        try:
            while (frame := self.decoder.next_frame()) is not None:
                ftype = frame.type
                if ftype == FrameType.REQUEST or ftype == FrameType.ONEWAY:
                    oneway = ftype == FrameType.ONEWAY
                    try:
                        header = frame.header  # full parse: caller and metadata
                    except RemoteProtocolError as exc:
                        if not oneway:  # a request we can name: answer it before the GOAWAY
                            self._outbox.append(encode_response(frame.stream_id, status=exc.status, error=str(exc)))
                        raise
                    return Request(
                        service=frame.service,
                        method=frame.method,
                        body=bytes(frame.body),
                        caller=header.caller,
                        metadata=dict(header.metadata),
                        stream_id=frame.stream_id,
                        deadline=now + frame.timeout_ms / 1000 if frame.timeout_ms else None,
                        oneway=oneway,
                    )
                if ftype == FrameType.PING:
                    self._outbox.append(encode_frame(FrameType.PONG, frame.stream_id))
                elif ftype != FrameType.GOAWAY:  # GOAWAY: "send nothing new": we only ever answer
                    logger.debug("SDK server: ignoring unexpected %r", frame)  # RESPONSE, PONG
        except RemoteProtocolError as exc:
            logger.info("SDK server: protocol error from peer, closing connection: %s", exc)
            self.error = exc
            self._outbox.append(encode_frame(FrameType.GOAWAY, 0, encode_header(error=str(exc))))
        return None

    def response(self, req: Request, status: int, error: str, body: bytes) -> bytes | None:
        """The RESPONSE frame for a handled request (None for a ONEWAY)."""
        if req.oneway:
            return None
        return response_frame(req, status, error, body, self.max_frame_size)


def response_frame(req: Request, status: int, error: str, body: bytes, max_frame_size: int) -> bytes:
    """Encode a response; one over ``max_frame_size`` becomes FRAME_TOO_LARGE."""
    data = encode_response(req.stream_id, body, status=status, error=error)
    if len(data) > max_frame_size:
        logger.error("%s/%s: response of %d bytes exceeds max_frame_size", req.service, req.method, len(data))
        data = encode_response(
            req.stream_id,
            status=Status.FRAME_TOO_LARGE,
            error=f"response of {len(data)} bytes exceeds the limit of {max_frame_size} bytes",
        )
    return data


def check_body(body: object) -> bytes:
    """A handler's return value as bytes; TypeError if it returned something else."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(f"handler returned {type(body).__name__}, not bytes")
    return bytes(body)


def outcome_of_exception(req: Request, exc: Exception) -> tuple[int, str, bytes]:
    """``(status, error, body)`` for a handler that raised ``exc`` (logged unless ApplicationError)."""
    if isinstance(exc, ApplicationError):
        return Status.APPLICATION_ERROR, exc.message, b""
    logger.error("%s/%s (stream %d): handler raised %s", req.service, req.method, req.stream_id, type(exc).__name__, exc_info=exc)
    return Status.APPLICATION_ERROR, f"internal error: {type(exc).__name__}", b""


def expired(req: Request, now: float) -> bool:
    """Whether the request's deadline has passed at ``now``."""
    return req.deadline is not None and now >= req.deadline
