"""HTTP/1.1 <-> frame mapping, and the server side of an HTTP/1.1 connection (sans-IO).

Theory of operation. An HTTP/1.1 exchange crosses the mesh as ONE request
frame and ONE response frame on the existing multiplexed links, so routing,
policies, hot restart and metrics apply to it unchanged (docs/http.md,
docs/protocol.md section 11):

* ``service`` is the host the client named (absolute-form target, else the
  ``Host`` header), port stripped; ``method`` is ``"<HTTP method> <path>"``
  (the path without its query), so routes and authorization rules can match
  it; ``metadata["traceparent"]`` carries the client's trace context.
* The frame body is the request as a normalised HTTP/1.1 message: the request
  line in origin-form, the header fields without hop-by-hop ones, an empty
  line, then the whole body with a ``Content-Length`` (never chunked). The
  response frame's body is the app's response in the same form.
* A non-OK frame status (the proxy's own answer: NO_ROUTE, TIMEOUT, ...) maps
  to an HTTP status (:data:`HTTP_STATUS`) with ``x-octoproxy-status`` naming it.

:class:`ServerConnection` wraps h11 (itself sans-IO) with the limits a proxy
needs: a body limit (413), a head size limit (431 from h11), ``Expect:
100-continue``, pipelining (one request at a time, answers in order), and the
"close after this response" decision. No trio, no sockets, no clock here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import h11

from ._protocol import Status

__all__ = [
    "CODECS",
    "HOP_BY_HOP",
    "HTTP_STATUS",
    "STATUS_HEADER",
    "HttpExchange",
    "ServerConnection",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_response",
    "make_exchange",
    "route_of",
]

#: wire codecs a listener (or the inbound side's app connection) can name
CODECS = ("frame", "http1")

#: the header naming the octoproxy status of an answer the proxy made itself
STATUS_HEADER = b"x-octoproxy-status"

#: hop-by-hop fields (RFC 9110 section 7.6.1) never forwarded, plus the framing ones we recompute
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
    }
)

#: octoproxy status -> (HTTP status, Retry-After seconds or None). NO_ROUTE is 404, as Envoy's
#: "NR" (no route for this host): not retryable, unlike 503.
HTTP_STATUS: dict[int, tuple[int, int | None]] = {
    Status.APPLICATION_ERROR: (502, None),
    Status.NO_ROUTE: (404, None),
    Status.UNAVAILABLE: (503, None),
    Status.TIMEOUT: (504, None),
    Status.RATE_LIMITED: (429, 1),
    Status.UNAUTHENTICATED: (403, None),
    Status.PERMISSION_DENIED: (403, None),
    Status.PROTOCOL_ERROR: (502, None),
    Status.FRAME_TOO_LARGE: (502, None),
    Status.OVERLOADED: (503, 1),
}

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 501: b"Not Implemented",
            502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}  # fmt: skip


class HttpMappingError(ValueError):
    """A frame body that is not a well-formed normalised HTTP/1.1 message (a peer's fault)."""


def _split_host(host: bytes) -> bytes:
    """``echo:8080`` -> ``echo``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    return host.split(b":", 1)[0]


def route_of(target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, bytes]:
    """The service a request names and its origin-form target.

    Args:
        target: the request-target as received (origin-form or absolute-form).
        headers: the request's header fields (lower-case names, as h11 gives them).

    Returns:
        ``(service, origin_target)``; the service is "" when nothing names one.

    Raises:
        HttpMappingError: an absolute-form target with a scheme other than http.
    """
    host = b""
    if target[:1] != b"/" and b"://" in target[:16]:
        scheme, rest = target.split(b"://", 1)
        if scheme.lower() != b"http":
            raise HttpMappingError(f"only http:// targets are proxied, not {scheme.decode('latin-1')}://")
        slash = rest.find(b"/")
        authority, target = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        if b"?" in authority:  # http://host?query
            authority, query = authority.split(b"?", 1)
            target = b"/?" + query
        host = authority.rsplit(b"@", 1)[-1]
    if not host:
        for name, value in headers:
            if name == b"host":
                host = value
                break
    return _split_host(host.strip()).decode("latin-1").lower(), target


@dataclass
class HttpExchange:
    """One request read from a client, ready to become a frame (or refused).

    Attributes:
        method: the HTTP method (``b"GET"``).
        target: origin-form target (path and query).
        headers: the request's end-to-end header fields.
        body: the whole body.
        service: the service the request names.
        http10: the client spoke HTTP/1.0.
    """

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    service: str = ""
    http10: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def frame_method(self) -> str:
        """``"GET /path"``: the frame's method, what routes and authz rules match."""
        path = self.target.split(b"?", 1)[0]
        return (self.method + b" " + path).decode("latin-1")


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop fields, and those the Connection field names."""
    headers = list(headers)
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def _head(first: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes, length: bytes | None) -> bytes:
    parts = [first, b"\r\n"]
    for name, value in headers:
        parts += [name, b": ", value, b"\r\n"]
    if length is not None:
        parts += [b"content-length: ", length, b"\r\n"]
    parts += [b"\r\n", body]
    return b"".join(parts)


def encode_request(ex: HttpExchange) -> bytes:
    """The request frame's body: a normalised HTTP/1.1 request (see the module docstring)."""
    return _head(ex.method + b" " + ex.target + b" HTTP/1.1", ex.headers, ex.body, str(len(ex.body)).encode())


def _parse(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise HttpMappingError("no end of head in an HTTP frame body")
    lines = data[:end].split(b"\r\n")
    headers = []
    length = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HttpMappingError(f"malformed header line {line[:40]!r}")
        name = name.lower()
        value = value.strip()
        if name == b"content-length":
            length = value
            continue
        headers.append((name, value))
    body = data[end + 4 :]
    if length is not None and length != str(len(body)).encode():
        raise HttpMappingError("content-length does not match the body in an HTTP frame body")
    return lines[0], headers, body


def decode_request(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    """A request frame's body -> ``(method, target, headers, body)`` (headers without content-length).

    Raises:
        HttpMappingError: not a normalised request (h11 validates names and values when it is sent on).
    """
    first, headers, body = _parse(data)
    parts = first.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[0] or not parts[1]:
        raise HttpMappingError(f"malformed request line {first[:60]!r}")
    return parts[0], parts[1], headers, body


def encode_response(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes, *, head: bool = False) -> bytes:
    """The response frame's body: a normalised HTTP/1.1 response.

    Args:
        status: the app's status code.
        reason: its reason phrase.
        headers: its header fields (hop-by-hop ones are dropped here).
        body: its whole body.
        head: it answers a HEAD request (or has no body by its status): keep
            the app's Content-Length, which describes the body it did not send.
    """
    headers = list(headers)
    length: bytes | None = str(len(body)).encode()
    if head or status in (204, 304) or status < 200:
        length = next((v for n, v in headers if n == b"content-length"), None)
    first = b"HTTP/1.1 " + str(status).encode() + b" " + reason
    return _head(first, _end_to_end(headers), body, length)


def decode_response(data: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """A response frame's body -> ``(status, reason, headers, body)``; headers keep content-length.

    Raises:
        HttpMappingError: not a normalised response.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise HttpMappingError("no end of head in an HTTP frame body")
    lines = data[:end].split(b"\r\n")
    version, _sp, rest = lines[0].partition(b" ")
    code, _sp, reason = rest.partition(b" ")
    if version != b"HTTP/1.1" or len(code) != 3 or not code.isdigit():
        raise HttpMappingError(f"malformed status line {lines[0][:60]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HttpMappingError(f"malformed header line {line[:40]!r}")
        headers.append((name.lower(), value.strip()))
    return int(code), reason, headers, data[end + 4 :]


def error_response(status: int, error: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The HTTP answer to a non-OK frame status: ``(code, headers, body)``."""
    try:
        name = Status(status).name
    except ValueError:
        name, status = "UNAVAILABLE", Status.UNAVAILABLE
    code, retry = HTTP_STATUS.get(status, (502, None))
    headers = [(STATUS_HEADER, name.encode()), (b"content-type", b"text/plain; charset=utf-8")]
    if retry is not None:
        headers.append((b"retry-after", str(retry).encode()))
    return code, headers, (f"{name}: {error}\n" if error else f"{name}\n").encode()


def make_exchange(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, http10: bool) -> HttpExchange:
    """A received request as an :class:`HttpExchange` (service named, hop-by-hop fields gone).

    Raises:
        HttpMappingError: an absolute-form target with a scheme other than http.
    """
    service, target = route_of(target, headers)
    fields = _end_to_end(headers)
    if not any(n == b"host" for n, _v in fields):
        fields.insert(0, (b"host", service.encode("latin-1")))
    md = {}
    for n, v in fields:
        if n == b"traceparent":
            md["traceparent"] = v.decode("latin-1")
    return HttpExchange(method, target, fields, body, service, http10, md)


# ------------------------------------------------------------------ server connection


@dataclass
class Refusal:
    """An answer the listener makes itself (400, 413, 431, ...), then closes."""

    code: int
    reason: str
    status_name: str = ""


class ServerConnection:
    """One client connection's HTTP/1.1 state: bytes in, requests out, response bytes out.

    Use: :meth:`receive_data` (``b""`` at EOF), then :meth:`next_request`
    until it returns None (needs more data), an :class:`HttpExchange` (answer
    it with :meth:`respond` before asking again: answers go in order, which is
    what makes pipelining safe) or a :class:`Refusal` (answer it with
    :meth:`refuse`; the connection closes after). :meth:`data_to_send` holds
    what to write (a ``100 Continue`` may appear there while a body is read).

    Args:
        max_body: largest request body taken; a bigger one is answered 413.
        max_head: largest request head (request line and headers); 431 beyond.
    """

    def __init__(self, max_body: int, max_head: int) -> None:
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.max_body = max_body
        self._out: list[bytes] = []
        self._req: h11.Request | None = None
        self._body: list[bytes] = []
        self._size = 0
        #: the connection closes after the current answer (Connection: close, HTTP/1.0, drain, refusal)
        self.closing = False
        #: the client closed its side
        self.eof = False
        #: whether the client is waiting for 100 Continue (only one is sent per request)
        self._continued = False
        #: the status code of the last answer made
        self.last_code = 0

    @property
    def idle(self) -> bool:
        """No request begun: nothing read of the next one, nothing owed."""
        return self.h11.their_state is h11.IDLE and self._req is None and not self.h11.trailing_data[0]

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.eof = True
        self.h11.receive_data(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_request(self) -> HttpExchange | Refusal | None:
        """The next complete request, a refusal, or None (more data needed, or the client is done)."""
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    if self._req is not None and self.h11.they_are_waiting_for_100_continue and not self._continued:
                        self._continued = True
                        self._out.append(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                    return None
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return None
                if isinstance(event, h11.Request):
                    self._req = event
                    self._body = []
                    self._size = 0
                    self._continued = False
                    # h11 bounds an incomplete head only: one that arrived whole in a read is measured here
                    head = len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in event.headers)
                    if head > self.max_head:
                        return self._refused(431, f"request head of {head} bytes exceeds the limit")
                    declared = next((v for n, v in event.headers if n == b"content-length"), None)
                    if declared is not None and any(n == b"transfer-encoding" for n, _v in event.headers):
                        # RFC 9112 section 6.3: a sign of request smuggling; refused, as Envoy does by default
                        return self._refused(400, "both Content-Length and Transfer-Encoding")
                    if declared is not None and int(declared) > self.max_body:
                        return self._refused(413, f"request body of {int(declared)} bytes exceeds the limit of {self.max_body}")
                    if event.method == b"CONNECT":
                        return self._refused(501, "CONNECT is not supported: octoproxy proxies plain http:// requests")
                elif isinstance(event, h11.Data):
                    self._size += len(event.data)
                    if self._size > self.max_body:
                        return self._refused(413, f"request body exceeds the limit of {self.max_body} bytes")
                    self._body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    req, self._req = self._req, None
                    assert req is not None
                    return self._exchange(req)
        except h11.RemoteProtocolError as exc:
            return self._refused(exc.error_status_hint, str(exc) or "malformed request")

    def _refused(self, code: int, reason: str) -> Refusal:
        self.closing = True
        return Refusal(code, reason)

    def _exchange(self, req: h11.Request) -> HttpExchange | Refusal:
        body = b"".join(self._body)
        self._body = []
        try:
            return make_exchange(req.method, req.target, list(req.headers), body, req.http_version == b"1.0")
        except HttpMappingError as exc:
            return self._refused(400, str(exc))

    def _send(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes, head: bool) -> None:
        if self.closing:
            headers = [h for h in headers if h[0] != b"connection"] + [(b"connection", b"close")]
        h = self.h11
        self.last_code = code
        # built first: h11 checks the fields here, before the connection's state changes
        events: list[h11.Response | h11.Data | h11.EndOfMessage] = [h11.Response(status_code=code, headers=headers, reason=reason)]
        if body and not head:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        for event in events:
            self._out.append(h.send(event) or b"")
        if h.our_state is h11.MUST_CLOSE or h.their_state is not h11.DONE:
            self.closing = True
        if not self.closing:
            h.start_next_cycle()

    def respond(self, ex: HttpExchange, frame_body: bytes) -> None:
        """Answer ``ex`` with the app's response (an OK frame's body)."""
        try:
            code, reason, headers, body = decode_response(frame_body)
            head = ex.method == b"HEAD"
            if not head and code not in (204, 304) and code >= 200:
                headers = [h for h in headers if h[0] != b"content-length"] + [(b"content-length", str(len(body)).encode())]
            self._send(code, reason, headers, body, head)
        except (HttpMappingError, h11.LocalProtocolError) as exc:
            # the provider's answer is not a response h11 will send: a gateway error instead
            self.respond_error(ex, Status.PROTOCOL_ERROR, f"bad HTTP response from the provider: {exc}")

    def respond_error(self, ex: HttpExchange | None, status: int, error: str) -> None:
        """Answer with the HTTP status of a non-OK frame status (:data:`HTTP_STATUS`)."""
        code, headers, body = error_response(status, error)
        headers.append((b"content-length", str(len(body)).encode()))
        self._send(code, _REASONS.get(code, b""), headers, body, ex is not None and ex.method == b"HEAD")

    def refuse(self, refusal: Refusal) -> None:
        """Answer a refusal (400, 408, 413, 431, 501); the connection closes after it."""
        self.closing = True
        body = (refusal.reason + "\n").encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        h = self.h11
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way: nothing sensible to add
        headers.append((b"connection", b"close"))
        self.last_code = refusal.code
        try:
            self._out.append(h.send(h11.Response(status_code=refusal.code, headers=headers, reason=_REASONS.get(refusal.code, b""))) or b"")
            self._out.append(h.send(h11.Data(data=body)) or b"")
            self._out.append(h.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass

    def timed_out(self) -> Refusal | None:
        """The head or body did not arrive in time: a 408 if a request was begun, else None (just close)."""
        if self.idle:
            return None
        return self._refused(408, "request not received in time")
