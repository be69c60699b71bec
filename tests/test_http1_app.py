"""The provider side's response readers (h11 reference and httptools) on the same cases, and the request encoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.protocol import _http1_app
from octoproxy.protocol._http1_app import AppResponseError, FastResponseReader, H11ResponseReader, encode_app_request

READERS = {"h11": H11ResponseReader}
if _http1_app._httptools is not None:
    READERS["httptools"] = FastResponseReader


@pytest.fixture(params=sorted(READERS))
def reader_cls(request: pytest.FixtureRequest) -> type:
    return READERS[request.param]


def test_fast_reader_loaded() -> None:
    """httptools is a dependency: the fast reader must be what runs, unless the twin is forced."""
    import os

    if os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") in ("", "0"):
        assert _http1_app.IMPLEMENTATION == "httptools"
    else:
        assert _http1_app.IMPLEMENTATION == "h11"


CASES = [
    # (name, method, bytes, then EOF?, status, headers subset, body, keep_alive)
    ("length", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", False, 200, [(b"x-a", b"1")], b"hello", True),
    ("chunked", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", False, 200, [], b"abcde", True),
    ("to-close", b"GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", True, 200, [], b"until close", False),
    ("head", b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", False, 200, [(b"content-length", b"1234")], b"", True),
    ("no-content", b"DELETE", b"HTTP/1.1 204 No Content\r\n\r\n", False, 204, [], b"", True),
    ("continue", b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", False, 201, [], b"ok", True),
    ("close", b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye", False, 200, [], b"bye", False),
    ("http10", b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", False, 200, [], b"hi", False),
]  # fmt: skip


def run(reader_cls: type, method: bytes, data: bytes, eof: bool, step: int = 1 << 20, max_body: int = 1 << 20) -> object:
    r = reader_cls(method, max_body)
    done = False
    for i in range(0, len(data), step):
        done = r.feed(data[i : i + step])
        if done:
            break
    if not done and eof:
        done = r.feed(b"")
    assert done
    return r


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_cases(reader_cls: type, case: tuple, step: int) -> None:
    _name, method, data, eof, status, headers, body, keep = case
    r = run(reader_cls, method, data, eof, step)
    assert (r.status, r.body, r.keep_alive) == (status, body, keep)  # type: ignore[attr-defined]
    for h in headers:
        assert h in r.headers  # type: ignore[attr-defined]


def test_eof_before_any_answer_is_not_partial(reader_cls: type) -> None:
    r = reader_cls(b"GET", 100)
    with pytest.raises(AppResponseError) as info:
        r.feed(b"")
    assert not info.value.partial


@pytest.mark.parametrize("data", [b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
def test_malformed(reader_cls: type, data: bytes) -> None:
    with pytest.raises(AppResponseError) as info:
        r = reader_cls(b"GET", 100)
        r.feed(data)
        r.feed(b"")
    assert info.value.partial


def test_cut_off_body(reader_cls: type) -> None:
    r = reader_cls(b"GET", 100)
    assert not r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(AppResponseError):
        r.feed(b"")


def test_too_big(reader_cls: type) -> None:
    with pytest.raises(AppResponseError, match="exceeds 4 bytes"):
        run(reader_cls, b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, max_body=4)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CASES), st.integers(min_value=1, max_value=40))
def test_differential(case: tuple, step: int) -> None:
    """Both readers give the same answer for the same bytes, however they are split."""
    if len(READERS) < 2:
        pytest.skip("httptools not installed")
    _name, method, data, eof, *_ = case
    a, b = (run(cls, method, data, eof, step) for cls in (H11ResponseReader, FastResponseReader))
    assert (a.status, a.headers, a.body, a.keep_alive) == (b.status, b.headers, b.body, b.keep_alive)  # type: ignore[attr-defined]


def test_encode_app_request() -> None:
    data = encode_app_request(b"POST", b"/a?b", [(b"host", b"web"), (b"x-a", b"1 2")], b"hi")
    assert data == b"POST /a?b HTTP/1.1\r\nhost: web\r\nx-a: 1 2\r\ncontent-length: 2\r\n\r\nhi"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET", b"/a b", []),
        (b"G T", b"/", []),
        (b"GET", b"/", [(b"x\r\ninjected", b"1")]),
        (b"GET", b"/", [(b"x", b"1\r\nInjected: 2")]),
        (b"GET", b"/", [(b"x", b"1\nInjected: 2")]),
        (b"GET", b"/", [(b"x", b"a\x00b")]),
        (b"GET", b"/", [(b"", b"1")]),
        (b"GET", b"/", [(b"x", b" leading")]),
    ],
)
def test_encode_app_request_refuses_injection(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ValueError):
        encode_app_request(method, target, headers, b"")
