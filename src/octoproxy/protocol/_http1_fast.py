"""The HTTP listener's server connection over httptools (llhttp), sans-IO.

Same interface and behaviour as :class:`octoproxy.protocol._http1.ServerConnection`
(the h11 reference, which ``tests/test_http1_core.py`` runs on both, with a
differential fuzz), at a fraction of its cost: llhttp parses in C, and the
answer is written here rather than through h11's state machine. What h11
checks for us there is checked here explicitly: header names and values of
the app's answer (RFC 9110 grammar, so no response splitting), one ``Host``,
not both ``Content-Length`` and ``Transfer-Encoding``, the head and body limits.

Requests a client pipelines are parsed as they come (at most one read's
worth), queued, and handed out one at a time, each only after the previous
one was answered, so answers stay in order.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ._http1 import _REASONS, HttpExchange, HttpMappingError, Refusal, ServerConnection, decode_response, error_response, make_exchange
from ._http1_app import _TOKEN, _VALUE, IMPLEMENTATION
from ._http1_app import _httptools as httptools
from ._protocol import Status

__all__ = ["FastServerConnection", "server_connection"]


def server_connection(max_body: int, max_head: int) -> ServerConnection | FastServerConnection:
    """The listener's connection core: httptools when loaded (``_http1_app.IMPLEMENTATION``), else h11."""
    if IMPLEMENTATION == "httptools":
        return FastServerConnection(max_body, max_head)
    return ServerConnection(max_body, max_head)


class _Refuse(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.refusal = Refusal(code, reason)


class FastServerConnection:
    """See :class:`octoproxy.protocol._http1.ServerConnection`."""

    def __init__(self, max_body: int, max_head: int) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self._p: Any = httptools.HttpRequestParser(self)
        self._out: list[bytes] = []
        self._ready: deque[tuple[HttpExchange | Refusal, bool]] = deque()  # (item, client wants keep-alive)
        self._failed = False
        self.closing = False
        self.eof = False
        self.last_code = 0
        self._answering: HttpExchange | None = None
        # the message being parsed
        self._in_message = False
        self._partial = 0  # bytes of the current head received so far
        self._headers_done = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._expect = False
        self._continued = False

    # ------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._headers_done = False
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._expect = False
        self._continued = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        headers = self._headers
        head = len(self._url) + 24 + sum(len(n) + len(v) + 4 for n, v in headers)
        if head > self.max_head:
            raise _Refuse(431, f"request head of {head} bytes exceeds the limit")
        hosts = 0
        length = None
        chunked = False
        for n, v in headers:
            if n == b"host":
                hosts += 1
            elif n == b"content-length":
                length = v
            elif n == b"transfer-encoding":
                chunked = True
            elif n == b"expect" and v.lower() == b"100-continue":
                self._expect = True
        if hosts > 1:
            raise _Refuse(400, "more than one Host field")
        if length is not None and chunked:
            raise _Refuse(400, "both Content-Length and Transfer-Encoding")
        if length is not None and int(length) > self.max_body:
            raise _Refuse(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body}")
        if self._p.get_method() == b"CONNECT":
            raise _Refuse(501, "CONNECT is not supported: octoproxy proxies plain http:// requests")
        if self._p.get_http_version() == "1.1" and hosts == 0:
            raise _Refuse(400, "missing Host field")

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.max_body:
            raise _Refuse(413, f"request body exceeds the limit of {self.max_body} bytes")
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._partial = 0
        p = self._p
        http10 = p.get_http_version() == "1.0"
        try:
            ex: HttpExchange | Refusal = make_exchange(p.get_method(), self._url, self._headers, b"".join(self._body), http10)
        except HttpMappingError as exc:
            raise _Refuse(400, str(exc)) from None
        self._ready.append((ex, bool(p.should_keep_alive()) and not http10))

    # ------------------------------------------------------------ the interface

    @property
    def idle(self) -> bool:
        return not self._in_message and not self._partial and not self._ready

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        if self._failed:
            return
        if not self._headers_done or not self._in_message:
            self._partial += len(data)
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade:
            # an Upgrade (not supported): answer what came, then close
            self._failed = True
            if self._ready:
                self._ready[-1] = (self._ready[-1][0], False)
            else:
                self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Refuse):
                self._fail(cause.refusal.code, cause.refusal.reason)
            else:
                self._fail(400, f"malformed request: {exc}")
        if self._in_message and not self._headers_done and self._partial > self.max_head and not self._failed:
            self._fail(431, "request head exceeds the limit")

    def _fail(self, code: int, reason: str) -> None:
        self._failed = True
        self._ready.append((Refusal(code, reason), False))

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_request(self) -> HttpExchange | Refusal | None:
        if self._answering is not None:
            return None  # answer the previous one first
        if self._ready:
            item, keep = self._ready.popleft()
            if isinstance(item, Refusal):
                self.closing = True
                return item
            if not keep:
                self.closing = True
            self._answering = item
            return item
        if self._in_message and self._headers_done and self._expect and not self._continued and not self._failed:
            self._continued = True
            self._out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def _send(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes, head: bool) -> None:
        parts = [b"HTTP/1.1 ", str(code).encode(), b" ", reason, b"\r\n"]
        for name, value in headers:
            if name == b"connection" and self.closing:
                continue
            if not _TOKEN.match(name) or not _VALUE.match(value):
                raise ValueError(f"invalid header field {name[:40]!r} in the answer")
            parts += [name, b": ", value, b"\r\n"]
        if self.closing:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if body and not head:
            parts.append(body)
        self._out.append(b"".join(parts))
        self.last_code = code
        self._answering = None

    def respond(self, ex: HttpExchange, frame_body: bytes) -> None:
        try:
            code, reason, headers, body = decode_response(frame_body)
            if code < 200 or code > 999 or any(c in reason for c in b"\r\n\0"):
                raise ValueError(f"status {code} cannot answer a request")
            head = ex.method == b"HEAD"
            if not head and code not in (204, 304):
                headers = [h for h in headers if h[0] != b"content-length"] + [(b"content-length", str(len(body)).encode())]
            self._send(code, reason, headers, body, head)
        except ValueError as exc:  # HttpMappingError too
            self.respond_error(ex, Status.PROTOCOL_ERROR, f"bad HTTP response from the provider: {exc}")

    def respond_error(self, ex: HttpExchange | None, status: int, error: str) -> None:
        code, headers, body = error_response(status, error)
        headers.append((b"content-length", str(len(body)).encode()))
        self._send(code, _REASONS.get(code, b""), headers, body, ex is not None and ex.method == b"HEAD")

    def refuse(self, refusal: Refusal) -> None:
        self.closing = True
        body = (refusal.reason + "\n").encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        self._send(refusal.code, _REASONS.get(refusal.code, b""), headers, body, False)

    def timed_out(self) -> Refusal | None:
        if self.idle:
            return None
        self.closing = True
        return Refusal(408, "request not received in time")
