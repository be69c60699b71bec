"""End-to-end: plain HTTP clients (requests, httpx, aiohttp, urllib) -> caller proxy's
HTTP listener -> frames -> provider proxy -> a plain HTTP/1.1 app (no SDK anywhere),
every part a real process on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request

import pytest
import trio

from http_mesh import SERVICE, HttpMesh, http_mesh

pytestmark = pytest.mark.e2e


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, until_close: bool = True, expect: int = 0) -> bytes:
    """Send ``data`` on a fresh connection; read until EOF (or ``expect`` responses' worth of 'HTTP/1.1 ')."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if not until_close and expect and out.count(b"HTTP/1.1 ") >= expect and out.endswith((b"\n", b"}")):
                break
        return out


def _requests_calls(m: HttpMesh) -> list[str]:
    import requests

    out = []
    with requests.Session() as s:  # keep-alive: one connection for all
        for i in range(5):
            r = s.post(f"{m.base}/echo?i={i}", data=f"hello {i}".encode(), headers={"Host": SERVICE, "x-octoproxy-caller": "forged"}, timeout=5)
            assert r.headers["x-caller"] == "client-app"  # stamped by the caller's proxy; the forged one is gone
            assert r.status_code == 200, r.text
            assert r.content == f"hello {i}".encode()
            assert r.headers["x-path"] == f"/echo?i={i}"
            assert r.headers["x-method"] == "POST"
            out.append(r.headers["x-host"])
        # the provider's proxy keeps its connections to the app alive: 5 requests, 1 connection
        assert s.get(f"{m.base}/connections", headers={"Host": SERVICE}, timeout=5).text == "1"
        # the app closing its side is noticed before the pooled connection is used again
        assert s.get(f"{m.base}/close", headers={"Host": SERVICE}, timeout=5).text == "bye"
        assert s.get(f"{m.base}/connections", headers={"Host": SERVICE}, timeout=5).text == "2"
        # HTTP_PROXY style: absolute-form, the host naming the service
        r = s.get(f"http://{SERVICE}/echo/abs", proxies={"http": m.proxy_url}, timeout=5)
        assert r.status_code == 200 and r.headers["x-path"] == "/echo/abs"
    return out


async def test_requests_keepalive_and_proxy_form() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            hosts = await trio.to_thread.run_sync(_requests_calls, m)
            assert hosts == [SERVICE] * 5
            # keep-alive: one client connection served all six requests
            assert await m.caller.metric('octoproxy_http_responses_total{code="2xx"}') == 9
            assert await m.caller.metric("octoproxy_http_connections") <= 1
            # the exchange crossed the mesh as frames: counted by route, method = "POST /echo"
            assert await m.provider.metric('octoproxy_requests_total{direction="inbound",service="web",method="POST /echo"') == 5
            assert await m.caller.metric('octoproxy_requests_total{direction="outbound",service="web",method="POST /echo"') == 5
            # fed straight into the engine: no in-process SDK connection on the outbound socket
            assert await m.caller.metric('octoproxy_connections_accepted_total{listener="outbound"}') == 0


def _httpx_calls(m: HttpMesh) -> None:
    import httpx

    with httpx.Client(base_url=m.base, headers={"Host": SERVICE}, timeout=5) as c:
        for i in range(3):
            r = c.put(f"/echo/{i}", content=b"x" * (1000 * i))
            assert r.status_code == 200 and r.content == b"x" * (1000 * i)
        # a chunked request body (a generator: no Content-Length)
        r = c.post("/echo", content=iter([b"part1-", b"part2-", b"part3"]))
        assert r.status_code == 200 and r.content == b"part1-part2-part3"
        # a chunked response from the app arrives whole
        r = c.get("/chunked?n=4")
        assert r.status_code == 200 and r.text == "".join(f"chunk-{i}\n" for i in range(4))
        big = os.urandom(900_000)  # under the 1 MiB default body limit
        r = c.post("/echo", content=big)
        assert r.status_code == 200 and r.content == big
        r = c.get("/big?n=3000000")  # a response far over max_body: only max_frame_size bounds answers
        assert r.status_code == 200 and len(r.content) == 3_000_000
        r = c.head("/big?n=1234")
        assert r.status_code == 200 and r.headers["content-length"] == "1234" and r.content == b""
    with httpx.Client(proxy=m.proxy_url, timeout=5) as c:
        r = c.get(f"http://{SERVICE}/echo/via-proxy")
        assert r.status_code == 200 and r.headers["x-path"] == "/echo/via-proxy"


async def test_httpx_bodies_chunked_head_and_proxy() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            await trio.to_thread.run_sync(_httpx_calls, m)


def _aiohttp_calls(m: HttpMesh) -> list[int]:
    import aiohttp

    async def main() -> list[int]:
        async with aiohttp.ClientSession(base_url=m.base, headers={"Host": SERVICE}) as s:

            async def one(i: int) -> int:
                async with s.post("/echo", data=str(i).encode()) as r:
                    assert await r.read() == str(i).encode()
                    return r.status

            codes = await asyncio.gather(*(one(i) for i in range(20)))
            async with s.get(f"http://{SERVICE}/echo/p", proxy=m.proxy_url) as r:
                assert r.status == 200 and r.headers["x-path"] == "/echo/p"
            return list(codes)

    return asyncio.run(main())


async def test_aiohttp_concurrent() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            assert await trio.to_thread.run_sync(_aiohttp_calls, m) == [200] * 20


def _urllib_call(m: HttpMesh) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": m.proxy_url}))
    with opener.open(f"http://{SERVICE}/echo/urllib", data=b"from urllib", timeout=5) as r:
        assert r.headers["x-path"] == "/echo/urllib"
        return bytes(r.read())


async def test_urllib_http_proxy() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            assert await trio.to_thread.run_sync(_urllib_call, m) == b"from urllib"


def _errors(m: HttpMesh) -> dict[str, tuple[int, str, str]]:
    import requests

    out = {}
    with requests.Session() as s:
        r = s.get(f"{m.base}/echo", headers={"Host": "nobody"}, timeout=5)
        out["no_route"] = (r.status_code, r.headers.get("x-octoproxy-status", ""), r.text)
        r = s.get(f"{m.base}/sleep?s=3", headers={"Host": SERVICE}, timeout=10)
        out["timeout"] = (r.status_code, r.headers.get("x-octoproxy-status", ""), r.text)
        r = s.post(f"{m.base}/echo", data=b"x" * 5000, headers={"Host": SERVICE}, timeout=5)
        out["too_big"] = (r.status_code, "", r.text)
    with requests.Session() as s:
        r = s.get(f"{m.base}/status?code=418", headers={"Host": SERVICE}, timeout=5)
        out["app_status"] = (r.status_code, r.headers.get("x-octoproxy-status", ""), r.text)
    return out


async def test_error_mapping_and_body_limit() -> None:
    with trio.fail_after(40):
        async with http_mesh(extra_http="max_body = 4096", route_timeout="1.0") as m:
            out = await trio.to_thread.run_sync(_errors, m)
            assert out["no_route"][:2] == (404, "NO_ROUTE")
            assert out["timeout"][:2] == (504, "TIMEOUT")
            assert out["too_big"][0] == 413
            assert out["app_status"] == (418, "", "")  # the app's own status passes untouched


async def test_app_down_is_503_and_overloaded_retry_after() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            m.app.process.kill()
            await m.app.process.wait()
            reply = await trio.to_thread.run_sync(raw_exchange, m.http_port, b"GET /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503 "), reply
            assert b"x-octoproxy-status: UNAVAILABLE" in reply


async def test_hostile_input() -> None:
    with trio.fail_after(40):
        async with http_mesh(extra_http="max_header_size = 4096\nread_timeout = 1.0") as m:
            port = m.http_port
            # garbage
            reply = await trio.to_thread.run_sync(raw_exchange, port, b"\x16\x03\x01garbage\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400 "), reply
            # oversized head
            big = b"GET / HTTP/1.1\r\nHost: web\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"
            reply = await trio.to_thread.run_sync(raw_exchange, port, big)
            assert reply.startswith(b"HTTP/1.1 431 "), reply
            # huge declared length
            reply = await trio.to_thread.run_sync(raw_exchange, port, b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 99999999999\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 413 "), reply
            # bad content-length and smuggling attempt
            reply = await trio.to_thread.run_sync(
                raw_exchange, port, b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1.1 400 "), reply

            # slow loris: a head never finished gets 408 after read_timeout, and meanwhile others are served
            def slow_loris() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /echo HTTP/1.1\r\nHost: web\r\n")
                    out = b""
                    while chunk := s.recv(4096):
                        out += chunk
                    return out

            async with trio.open_nursery() as n:
                result: list[bytes] = []

                async def loris() -> None:
                    result.append(await trio.to_thread.run_sync(slow_loris))

                n.start_soon(loris)
                await trio.sleep(0.2)
                ok = await trio.to_thread.run_sync(raw_exchange, port, b"GET /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                assert ok.startswith(b"HTTP/1.1 200 "), ok
            assert result[0].startswith(b"HTTP/1.1 408 "), result
            assert await m.caller.metric('octoproxy_http_errors_total{kind="refused_400"}') == 2


async def test_pipelining_connection_close_http10_and_100_continue() -> None:
    with trio.fail_after(30):
        async with http_mesh() as m:
            port = m.http_port
            # three pipelined requests in one write: three answers, in order
            pipelined = b"".join(f"GET /echo/{i} HTTP/1.1\r\nHost: web\r\n\r\n".encode() for i in range(3))
            pipelined += b"GET /echo/last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
            reply = await trio.to_thread.run_sync(raw_exchange, port, pipelined)
            paths = [line.split(b": ", 1)[1] for line in reply.split(b"\r\n") if line.startswith(b"x-path: ")]
            assert paths == [b"/echo/0", b"/echo/1", b"/echo/2", b"/echo/last"], reply
            assert reply.count(b"HTTP/1.1 200 ") == 4 and b"connection: close" in reply.lower()
            # HTTP/1.0: answered, then closed
            reply = await trio.to_thread.run_sync(raw_exchange, port, b"GET /echo/ten HTTP/1.0\r\nHost: web\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ") and b"/echo/ten" in reply

            def continue_100() -> tuple[bytes, bytes]:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
                    first = s.recv(4096)
                    s.sendall(b"hello")
                    rest = b""
                    while not rest.endswith(b"hello"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        rest += chunk
                    return first, rest

            first, rest = await trio.to_thread.run_sync(continue_100)
            assert first.startswith(b"HTTP/1.1 100 "), first
            assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"hello"), rest

            # 100-continue with a body over the limit: 413 at once, the body never sent
            def continue_413() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n")
                    return s.recv(4096)

            assert (await trio.to_thread.run_sync(continue_413)).startswith(b"HTTP/1.1 413 ")


async def test_connection_limit_and_idle_timeout() -> None:
    with trio.fail_after(30):
        async with http_mesh(extra_http="max_connections = 2\nidle_timeout = 0.5") as m:
            port = m.http_port
            a = socket.create_connection(("127.0.0.1", port))
            b = socket.create_connection(("127.0.0.1", port))
            try:
                await trio.sleep(0.1)
                reply = await trio.to_thread.run_sync(raw_exchange, port, b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 503 ") and b"OVERLOADED" in reply and b"retry-after: 1" in reply.lower(), reply
                # idle keep-alive connections are closed after idle_timeout: then a new client gets in
                a.settimeout(5)
                assert a.recv(10) == b""
                reply = await trio.to_thread.run_sync(raw_exchange, port, b"GET /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 200 "), reply
            finally:
                a.close()
                b.close()


def test_no_extensions_env_is_honoured() -> None:
    """The suite runs on both builds; this says which one this run is (for the log)."""
    from octoproxy import frame

    assert frame.IMPLEMENTATION in ("cython", "python")
    if os.environ.get("OCTOPROXY_NO_EXTENSIONS") == "1":
        assert frame.IMPLEMENTATION == "python"


async def test_path_too_long_for_a_frame_header_is_431() -> None:
    with trio.fail_after(30):
        async with http_mesh(extra_http="max_header_size = 262144") as m:
            req = b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: web\r\n\r\n"
            reply = await trio.to_thread.run_sync(raw_exchange, m.http_port, req)
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
            ok = await trio.to_thread.run_sync(raw_exchange, m.http_port, b"GET /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ")
