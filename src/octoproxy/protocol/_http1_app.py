"""The provider side's HTTP/1.1 client half, sans-IO: request bytes to the app, its response read back.

Two readers with one interface, picked once at import as the frame codec's
twins are: :class:`FastResponseReader` over httptools (llhttp, the parser
uvicorn uses; about 40 times cheaper than h11 here, docs/http.md) when it is
installed, and :class:`H11ResponseReader`, the reference, otherwise or under
``OCTOPROXY_NO_EXTENSIONS=1`` (``OCTOPROXY_HTTP_PARSER=h11`` picks it alone, e.g. to measure it). Both are tested on the same cases
(``tests/test_http1_app.py``), including a differential test over random
responses split at random points.

:func:`encode_app_request` writes the request itself (both readers use it),
after checking method, target and every header field with the grammar h11
enforces (RFC 9110 tokens and field values), so a peer cannot inject a header
or a second request into the app's connection.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h11

__all__ = ["IMPLEMENTATION", "AppResponseError", "H11ResponseReader", "FastResponseReader", "encode_app_request", "response_reader"]

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(rb"([\x21-\x7e\x80-\xff]([\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+\Z")


class AppResponseError(ValueError):
    """The app's bytes are not a valid HTTP/1.1 response, or too big; ``partial``: some bytes had come."""

    def __init__(self, message: str, partial: bool = True) -> None:
        super().__init__(message)
        self.partial = partial


def encode_app_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The request as sent to the app (``content-length`` added).

    Raises:
        ValueError: a method, target or header field that HTTP/1.1 does not allow.
    """
    if not _TOKEN.match(method) or not _TARGET.match(target):
        raise ValueError(f"invalid request line {method[:20]!r} {target[:60]!r}")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not _TOKEN.match(name) or not _VALUE.match(value):
            raise ValueError(f"invalid header field {name[:40]!r}")
        parts += [name, b": ", value, b"\r\n"]
    parts += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
    return b"".join(parts)


class H11ResponseReader:
    """The reference reader (h11). Feed bytes with :meth:`feed` (``b""`` at EOF) until it returns True."""

    def __init__(self, method: bytes, max_body: int) -> None:
        self.h11 = h11.Connection(h11.CLIENT)
        # h11 tracks the request only to know how the response is framed (HEAD, keep-alive)
        self.h11.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"app"), (b"content-length", b"0")]))
        self.h11.send(h11.EndOfMessage())
        self.max_body = max_body
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self.got = False
        self.keep_alive = False

    @property
    def body(self) -> bytes:
        return b"".join(self._body)

    def feed(self, data: bytes) -> bool:
        h = self.h11
        if data:
            self.got = True
        try:
            h.receive_data(data)
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    return False
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    self.status, self.reason, self.headers = event.status_code, bytes(event.reason), list(event.headers)
                elif isinstance(event, h11.Data):
                    self._size += len(event.data)
                    if self._size > self.max_body:
                        raise AppResponseError(f"the app's response exceeds {self.max_body} bytes")
                    self._body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self.keep_alive = h.our_state is h11.DONE and h.their_state is h11.DONE and bool(data)
                    return True
                else:  # ConnectionClosed (or PAUSED) before the end of the response
                    raise AppResponseError("the app closed the connection without answering", partial=self.got)
        except h11.RemoteProtocolError as exc:
            raise AppResponseError(f"malformed HTTP response from the app: {exc}", partial=self.got) from None


class FastResponseReader:
    """The same reader over httptools (llhttp)."""

    def __init__(self, method: bytes, max_body: int) -> None:
        self.method = method
        self.max_body = max_body
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self.got = False
        self._headers_done = False
        self._complete = False
        self._framed = False  # content-length or chunked: the end is known without EOF
        self.keep_alive = False
        self._parser: Any = _httptools.HttpResponseParser(self)

    @property
    def body(self) -> bytes:
        return b"".join(self._body)

    # llhttp callbacks
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200:  # an interim answer: forget it, read on
            self.headers = []
            self.reason = b""
            return
        self.status = code
        self._headers_done = True
        self._framed = any(n in (b"content-length", b"transfer-encoding") for n, _v in self.headers)
        if self.method == b"HEAD" or code in (204, 304):
            self._framed = True
            self._complete = True
            self.keep_alive = bool(self._parser.should_keep_alive())

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.max_body:
            raise AppResponseError(f"the app's response exceeds {self.max_body} bytes")
        self._body.append(data)

    def on_message_complete(self) -> None:
        if self._headers_done and not self._complete:
            self._complete = True
            self.keep_alive = bool(self._parser.should_keep_alive())

    def feed(self, data: bytes) -> bool:
        if not data:  # EOF: complete only if the body runs to the close
            if self._headers_done and not self._framed and not self._complete:
                self._complete = True
                self.keep_alive = False
                return True
            if self._complete:
                return True
            raise AppResponseError("the app closed the connection without answering", partial=self.got)
        self.got = True
        if self._complete:  # bytes after a HEAD/204/304 answer: not reusable, the answer stands
            self.keep_alive = False
            return True
        try:
            self._parser.feed_data(data)
        except _httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, AppResponseError):  # raised by a callback (a body too big)
                raise cause from None
            if self._complete and self.method == b"HEAD":
                self.keep_alive = False  # llhttp expected a body; the answer itself was whole
                return True
            raise AppResponseError(f"malformed HTTP response from the app: {exc}") from None
        if self._complete and self.headers and any(n == b"connection" and b"close" in v.lower() for n, v in self.headers):
            self.keep_alive = False
        return self._complete


_httptools: Any
try:
    if os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0") or os.environ.get("OCTOPROXY_HTTP_PARSER") == "h11":
        raise ImportError("the h11 twin was asked for")
    import httptools as _httptools

    IMPLEMENTATION = "httptools"
except ImportError:
    _httptools = None
    IMPLEMENTATION = "h11"


def response_reader(method: bytes, max_body: int) -> H11ResponseReader | FastResponseReader:
    """A reader for the answer to a ``method`` request (httptools when loaded, else h11)."""
    if _httptools is not None:
        return FastResponseReader(method, max_body)
    return H11ResponseReader(method, max_body)
