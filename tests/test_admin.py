"""Tests for the admin HTTP server and client: real loopback sockets, curl, raw h11."""

from __future__ import annotations

import json
import logging
from functools import partial
import os
import socket
import stat
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from octoproxy.common._admin import (
    AdminAuth,
    Request,
    Response,
    Routes,
    _Server,
    host_is_allowed,
    http_request,
    open_admin_listeners,
    serve_admin,
)


async def healthz(request: Request) -> Response:
    return Response(body="ok\n")


async def stats(request: Request) -> Response:
    return Response(body={"uptime": 1.5, "query": request.query})


async def echo(request: Request) -> Response:
    return Response(
        status=201,
        body=request.body,
        content_type=request.header("content-type"),
        headers=[("X-Echo-Length", str(len(request.body)))],
    )


async def boom(request: Request) -> Response:
    raise RuntimeError("handler exploded")


ROUTES: Routes = {
    ("GET", "/healthz"): healthz,
    ("GET", "/stats"): stats,
    ("POST", "/echo"): echo,
    ("PUT", "/echo"): echo,
    ("GET", "/boom"): boom,
}


async def curl(*args: str) -> bytes:
    result = await trio.run_process(["curl", "-s", "--max-time", "5", *args], capture_stdout=True)
    return result.stdout


async def test_tcp_healthz(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        host, port = addr.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        status, headers, body = await http_request(addr, "GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["content-length"] == "3"
        assert await curl(f"http://{addr}/healthz") == b"ok\n"


async def test_ipv6_loopback(nursery: trio.Nursery) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with trio.fail_after(10):
        try:
            addr = await nursery.start(serve_admin, "[::1]:0", ROUTES)
        except OSError:
            pytest.skip("::1 not available")
        assert addr.startswith("[::1]:")
        assert (await http_request(addr, "GET", "/healthz"))[2] == b"ok\n"


async def test_unix_socket(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, f"unix:{path}", ROUTES)
        assert addr == f"unix:{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        status, _, body = await http_request(addr, "GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert await curl("--unix-socket", str(path), "http://localhost/healthz") == b"ok\n"


async def test_unix_stale_socket_is_replaced_live_one_is_not(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening, then abandoned: a stale file
    stale.close()
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, f"unix:{path}", ROUTES)
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200
        with pytest.raises(OSError):
            await open_admin_listeners(f"unix:{path}")  # a live server owns it
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200
        regular = tmp_path / "not-a-socket"
        regular.write_text("keep me")
        with pytest.raises(FileExistsError):
            await open_admin_listeners(f"unix:{regular}")
        assert regular.read_text() == "keep me"


async def test_prebound_listeners_are_served(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        listeners = await open_admin_listeners("127.0.0.1:0")
        bound = listeners[0].socket.getsockname()
        addr = await nursery.start(partial(serve_admin, listeners=listeners), "ignored", ROUTES)
        assert addr == f"127.0.0.1:{bound[1]}"
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200


async def test_cancel_stops_serving() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError):
            await http_request(addr, "GET", "/healthz")


async def _h11_roundtrip(stream: trio.SocketStream, conn: h11.Connection, request: h11.Request) -> tuple[int, bytes]:
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body


async def test_keep_alive_raw_h11(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        host, port = addr.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            req = h11.Request(method="GET", target="/healthz", headers=[("Host", addr)])
            assert await _h11_roundtrip(stream, conn, req) == (200, b"ok\n")
            conn.start_next_cycle()
            req = h11.Request(method="GET", target="/stats?x=1", headers=[("Host", addr), ("Connection", "close")])
            status, body = await _h11_roundtrip(stream, conn, req)
            assert status == 200 and json.loads(body)["query"] == {"x": "1"}
            # Connection: close is honoured: the server closes after the reply
            assert await stream.receive_some(100) == b""


async def test_keep_alive_curl_reuses_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        out = await curl("-o", "/dev/null", "-o", "/dev/null", "-w", "%{num_connects}\n", f"http://{addr}/healthz", f"http://{addr}/stats")
        assert out.split() == [b"1", b"0"]


async def test_not_found_and_method_not_allowed(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        assert (await http_request(addr, "GET", "/nope"))[0] == 404
        status, headers, _ = await http_request(addr, "DELETE", "/echo")
        assert status == 405
        assert headers["allow"] == "POST, PUT"
        status, headers, _ = await http_request(addr, "POST", "/healthz", b"x")
        assert status == 405 and headers["allow"] == "GET, HEAD"


async def test_head_falls_back_to_get(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        status, headers, body = await http_request(addr, "HEAD", "/healthz")
        assert (status, headers["content-length"], body) == (200, "3", b"")


async def test_body_too_large(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(partial(serve_admin, max_body=1000), "127.0.0.1:0", ROUTES)
        assert (await http_request(addr, "POST", "/echo", b"x" * 1000))[0] == 201
        # declared Content-Length over the limit: refused before reading
        status, headers, _ = await http_request(addr, "POST", "/echo", b"x" * 2_000_000)
        assert status == 413 and headers["connection"] == "close"
        # chunked body, no Content-Length: refused once it passes the limit
        status, _, _ = await http_request(
            addr, "POST", "/echo", b"y" * 5000, headers=[("Transfer-Encoding", "chunked")]
        )
        assert status == 413
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200


async def test_garbage_gets_400_then_close(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        host, port = addr.rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(b"this is not HTTP\r\n\r\nmore garbage after it")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"connection: close\r\n" in reply.lower()
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200


async def test_handler_error_gives_500_and_server_keeps_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        with caplog.at_level(logging.ERROR, logger="octoproxy.admin"):
            status, _, body = await http_request(addr, "GET", "/boom")
        assert status == 500 and b"handler exploded" not in body
        records = [r for r in caplog.records if r.name == "octoproxy.admin"]
        assert len(records) == 1 and "handler exploded" in records[0].getMessage()
        assert "\n" not in records[0].getMessage()
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200


async def test_json_body(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        status, headers, body = await http_request(addr, "GET", "/stats?format=json&empty=")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"uptime": 1.5, "query": {"format": "json", "empty": ""}}
        assert json.loads(await curl(f"http://{addr}/stats"))["uptime"] == 1.5


async def test_post_echo(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(10):
        addr = await nursery.start(serve_admin, "127.0.0.1:0", ROUTES)
        payload = bytes(range(256)) * 10
        status, headers, body = await http_request(
            addr, "POST", "/echo", payload, headers=[("Content-Type", "application/x-test")]
        )
        assert (status, body) == (201, payload)
        assert headers["content-type"] == "application/x-test"
        assert headers["x-echo-length"] == str(len(payload))
        sock = tmp_path / "admin.sock"
        uaddr = await nursery.start(serve_admin, f"unix:{sock}", ROUTES)
        assert uaddr == f"unix:{sock}"
        # curl sends "Expect: 100-continue" for this size; the server must answer it
        big = tmp_path / "big.bin"
        big.write_bytes(b"z" * 300_000)
        out = await curl("--unix-socket", str(sock), "-X", "PUT", "--data-binary", f"@{big}", "http://x/echo")
        assert out == big.read_bytes()


async def test_header_timeout_memory_stream(autojump_clock: trio.testing.MockClock) -> None:
    server = _Server(dict(ROUTES), max_body=1000, header_timeout=10.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # idle connection: closed silently after header_timeout
            client, srv = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle, srv)
            assert await client.receive_some(100) == b""
            assert trio.current_time() >= 10.0
            # half a request head: 408, then close
            client, srv = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle, srv)
            await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            reply = b""
            while chunk := await client.receive_some(100):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("bad", ["127.0.0.1", "::1:80", "host:http", "unix:", "[::1]:99999", ":80"])
async def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        await open_admin_listeners(bad)
    with pytest.raises(ValueError):
        await http_request(bad, "GET", "/")


# ---------------------------------------------------------------- local trust (issue 11)


@pytest.mark.parametrize(
    ("host", "local_ip", "ok"),
    [
        ("localhost", None, True), ("LOCALHOST:9901", None, True), ("a.localhost", None, True), ("localhost.", None, True),
        ("127.0.0.1", None, True), ("127.9.9.9:1", None, True), ("[::1]:80", None, True), ("::1", None, True),
        ("10.0.0.5:9901", "10.0.0.5", True), ("10.0.0.5", "10.0.0.6", False), ("[::ffff:127.0.0.1]", None, True),
        ("evil.example", "10.0.0.5", False), ("localhost.evil.example", None, False), ("", None, False),
        ("127.0.0.1.evil.example", None, False), ("0.0.0.0:9901", "127.0.0.1", False), ("[fe80::1]", None, False),
    ],
)  # fmt: skip
def test_host_check(host: str, local_ip: str | None, ok: bool) -> None:
    assert host_is_allowed(host, local_ip) is ok


async def test_token_guards_all_but_public_routes(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    auth = AdminAuth(b"t" * 32, frozenset({("GET", "/healthz")}))
    assert "tttt" not in repr(auth)
    with trio.fail_after(10):
        addr = await nursery.start(partial(serve_admin, auth=auth), "127.0.0.1:0", ROUTES)
        assert (await http_request(addr, "GET", "/healthz"))[0] == 200
        assert (await http_request(addr, "HEAD", "/healthz"))[0] == 200
        with caplog.at_level(logging.WARNING, logger="octoproxy.admin"):
            for tok in (None, "t" * 31, "t" * 33, "Bearer " + "t" * 32):
                status, headers, _ = await http_request(addr, "GET", "/stats", token=tok)
                assert status == 401 and headers["www-authenticate"] == 'Bearer realm="octoproxy-admin"'
            status, _, _ = await http_request(addr, "POST", "/echo", b"x", headers=[("Authorization", "Basic dDp0")])
            assert status == 401
        assert len([r for r in caplog.records if "missing or wrong admin token" in r.getMessage()]) == 1  # rate-limited
        assert (await http_request(addr, "GET", "/stats", token="t" * 32))[0] == 200
        assert (await http_request(addr, "GET", "/stats", headers=[("authorization", "bearer " + "t" * 32)]))[0] == 200
        assert (await http_request(addr, "GET", "/nope"))[0] == 404  # unknown routes: 404, no token asked for
