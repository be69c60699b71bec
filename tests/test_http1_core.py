"""The sans-IO HTTP/1.1 <-> frame mapping and server connection (protocol/_http1.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy import Status
from octoproxy.protocol._http1 import (
    HTTP_STATUS,
    HttpExchange,
    HttpMappingError,
    Refusal,
    ServerConnection,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_response,
    route_of,
)
from octoproxy.protocol._http1_app import _httptools
from octoproxy.protocol._http1_fast import FastServerConnection

CONNS = [pytest.param(ServerConnection, id="h11")]
if _httptools is not None:
    CONNS.append(pytest.param(FastServerConnection, id="httptools"))
both = pytest.mark.parametrize("conn_cls", CONNS)


@pytest.mark.parametrize(
    ("target", "host", "service", "origin"),
    [
        (b"/a?b=1", b"web", "web", b"/a?b=1"),
        (b"/a", b"web:8080", "web", b"/a"),
        (b"/a", b"WEB", "web", b"/a"),
        (b"http://web/x/y?z", b"ignored", "web", b"/x/y?z"),
        (b"http://web:80", b"", "web", b"/"),
        (b"http://user@web/x", b"", "web", b"/x"),
        (b"http://web?q=1", b"", "web", b"/?q=1"),
        (b"/a", b"[::1]:80", "[::1]", b"/a"),
        (b"/a", None, "", b"/a"),
    ],
)
def test_route_of(target: bytes, host: bytes | None, service: str, origin: bytes) -> None:
    headers = [(b"host", host)] if host is not None else []
    assert route_of(target, headers) == (service, origin)


def test_route_of_refuses_other_schemes() -> None:
    with pytest.raises(HttpMappingError, match="only http://"):
        route_of(b"https://web/", [])


def test_request_round_trip_drops_hop_by_hop() -> None:
    ex = HttpExchange(b"POST", b"/p?q", [(b"host", b"web"), (b"x-a", b"1"), (b"x-a", b"2")], b"body", "web")
    data = encode_request(ex)
    assert data == b"POST /p?q HTTP/1.1\r\nhost: web\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\nbody"
    assert decode_request(data) == (b"POST", b"/p?q", [(b"host", b"web"), (b"x-a", b"1"), (b"x-a", b"2")], b"body")
    assert ex.frame_method == "POST /p"


def test_response_encoding() -> None:
    headers = [(b"content-type", b"text/plain"), (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"), (b"transfer-encoding", b"chunked")]
    data = encode_response(200, b"OK", headers, b"hello")
    assert data == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
    assert decode_response(data) == (200, b"OK", [(b"content-type", b"text/plain"), (b"content-length", b"5")], b"hello")
    # HEAD and 304 keep the app's length, which describes a body not sent
    assert b"content-length: 99\r\n" in encode_response(200, b"OK", [(b"content-length", b"99")], b"", head=True)
    assert b"content-length" not in encode_response(204, b"No Content", [], b"")


@pytest.mark.parametrize(
    "bad",
    [b"", b"GET / HTTP/1.1\r\n", b"GET /\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
     b"GET / HTTP/1.1\r\n x: folded\r\n\r\n", b"GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nabc"],
)  # fmt: skip
def test_decode_request_refuses_malformed(bad: bytes) -> None:
    with pytest.raises(HttpMappingError):
        decode_request(bad)


def test_error_statuses() -> None:
    assert HTTP_STATUS[Status.NO_ROUTE][0] == 404
    assert HTTP_STATUS[Status.TIMEOUT][0] == 504
    code, headers, body = error_response(Status.OVERLOADED, "full")
    assert code == 503 and (b"retry-after", b"1") in headers and (b"x-octoproxy-status", b"OVERLOADED") in headers
    assert body == b"OVERLOADED: full\n"
    assert error_response(99, "?")[0] == 503  # unknown: UNAVAILABLE, as the protocol says
    for status in Status:
        if status != Status.OK:
            assert status in HTTP_STATUS


def feed(conn: Any, data: bytes) -> HttpExchange | Refusal | None:
    conn.receive_data(data)
    return conn.next_request()


def ok_frame(body: bytes = b"hi") -> bytes:
    return encode_response(200, b"OK", [], body)


@both
def test_keepalive_cycle_and_pipelining(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    first = feed(conn, b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\nGET /2 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(first, HttpExchange) and first.target == b"/1" and first.service == "web"
    conn.respond(first, ok_frame(b"one"))
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"one") and not conn.closing
    second = conn.next_request()  # the pipelined one, only after the first was answered
    assert isinstance(second, HttpExchange) and second.target == b"/2"
    conn.respond(second, ok_frame(b"two"))
    assert conn.data_to_send().endswith(b"two")
    assert conn.next_request() is None and conn.idle


@both
def test_chunked_request_is_joined(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    assert feed(conn, b"POST /c HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n") is None
    assert not conn.idle
    ex = feed(conn, b"2\r\nde\r\n0\r\n\r\n")
    assert isinstance(ex, HttpExchange) and ex.body == b"abcde"
    assert (b"transfer-encoding", b"chunked") not in ex.headers
    assert b"content-length: 5\r\n" in encode_request(ex)


@both
def test_body_limits(conn_cls: type) -> None:
    conn = conn_cls(4, 4096)
    r = feed(conn, b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(r, Refusal) and r.code == 413 and conn.closing
    conn = conn_cls(4, 4096)
    r = feed(conn, b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n")
    assert isinstance(r, Refusal) and r.code == 413
    conn.refuse(r)
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 413 ") and b"connection: close" in out


@both
def test_expect_100_continue_sent_once_when_body_is_awaited(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    assert feed(conn, b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n") is None
    assert conn.data_to_send().startswith(b"HTTP/1.1 100 ")
    assert conn.next_request() is None and conn.data_to_send() == b""
    ex = feed(conn, b"abc")
    assert isinstance(ex, HttpExchange) and ex.body == b"abc"
    assert all(n != b"expect" for n, _ in ex.headers)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00\x01garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: web\r\nx: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"CONNECT web:443 HTTP/1.1\r\nHost: web\r\n\r\n", 501),
        (b"GET https://web/ HTTP/1.1\r\nHost: web\r\n\r\n", 400),
    ],
)
@both
def test_refusals(conn_cls: type, data: bytes, code: int) -> None:
    conn = conn_cls(1024, 4096)
    r = feed(conn, data)
    assert isinstance(r, Refusal) and r.code == code, r
    conn.refuse(r)
    assert conn.data_to_send().startswith(b"HTTP/1.1 %d " % code)


@both
def test_incomplete_head_over_limit_is_431(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    r = feed(conn, b"GET / HTTP/1.1\r\nx: " + b"a" * 5000)
    assert isinstance(r, Refusal) and r.code == 431


@both
def test_http10_and_connection_close_close_after_the_answer(conn_cls: type) -> None:
    for req in (b"GET / HTTP/1.0\r\nHost: web\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"):
        conn = conn_cls(1024, 4096)
        ex = feed(conn, req)
        assert isinstance(ex, HttpExchange)
        conn.respond(ex, ok_frame())
        assert conn.closing
        assert b"connection: close" in conn.data_to_send().lower()


@both
def test_drain_marks_the_answer_connection_close(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    ex = feed(conn, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(ex, HttpExchange)
    conn.closing = True  # what the listener does on drain
    conn.respond(ex, ok_frame())
    assert b"connection: close\r\n" in conn.data_to_send()


@both
def test_error_answer_and_head(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    ex = feed(conn, b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(ex, HttpExchange)
    conn.respond_error(ex, Status.TIMEOUT, "late")
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and b"x-octoproxy-status: TIMEOUT" in out
    assert out.endswith(b"\r\n\r\n")  # HEAD: no body
    assert not conn.closing


@both
def test_bad_app_response_becomes_502(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    ex = feed(conn, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(ex, HttpExchange)
    conn.respond(ex, b"HTTP/1.1 200 OK\r\nbad header\x00: x\r\n\r\n")
    assert conn.data_to_send().startswith(b"HTTP/1.1 502 ")


@both
def test_timed_out(conn_cls: type) -> None:
    conn = conn_cls(1024, 4096)
    assert conn.timed_out() is None  # idle: just close
    assert feed(conn, b"GET / HTTP/1.1\r\nHo") is None
    r = conn.timed_out()
    assert isinstance(r, Refusal) and r.code == 408


@both
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fuzz_server_connection_never_raises(conn_cls: type, data: bytes, step: int) -> None:
    """Any bytes, split anywhere: requests, refusals or 'need more', never an exception."""
    conn = conn_cls(256, 512)
    for i in range(0, len(data) + 1, step):
        conn.receive_data(data[i : i + step])
        for _ in range(8):
            r = conn.next_request()
            if r is None:
                break
            if isinstance(r, Refusal):
                conn.refuse(r)
                return
            conn.respond(r, ok_frame())
            if conn.closing:
                return


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_frame_body_decoders(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except HttpMappingError:
            pass


_TOK = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)


@st.composite
def pipelined_requests(draw: Any) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """1-3 valid requests (Content-Length or chunked bodies), and what each must become."""
    data = b""
    want = []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]))
        path = b"/" + "/".join(draw(st.lists(_TOK, max_size=3))).encode()
        if draw(st.booleans()):
            path += b"?q=" + draw(_TOK).encode()
        headers = [(draw(_TOK).encode(), draw(_TOK).encode()) for _ in range(draw(st.integers(0, 3)))]
        headers = [(b"x-" + n, v) for n, v in headers]
        body = draw(st.binary(max_size=40))
        head = method + b" " + path + b" HTTP/1.1\r\nHost: web\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        if body and draw(st.booleans()):
            chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
            data += head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        else:
            data += head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        want.append((method, path, body))
    return data, want


@settings(max_examples=200, deadline=None)
@given(pipelined_requests(), st.integers(min_value=1, max_value=64))
def test_differential_h11_and_httptools(case: tuple[bytes, list[tuple[bytes, bytes, bytes]]], step: int) -> None:
    """The same pipelined requests, split the same way, give the same exchanges and answers from both cores."""
    if len(CONNS) < 2:
        pytest.skip("httptools not installed")
    data, want = case
    results = []
    for cls in (ServerConnection, FastServerConnection):
        conn: Any = cls(1024, 4096)
        got = []
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            while (r := conn.next_request()) is not None:
                assert isinstance(r, HttpExchange), r
                got.append((r.method, r.target, r.headers, r.body, r.service))
                conn.respond(r, ok_frame(r.body))
        conn.data_to_send()
        results.append(got)
    assert results[0] == results[1]
    assert [(m, t, b) for m, t, _h, b, _s in results[0]] == want
