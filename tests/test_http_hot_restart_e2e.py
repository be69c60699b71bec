"""End-to-end: hot restart of either proxy under HTTP/1.1 keep-alive load, 0 failed requests.

Plain HTTP clients (requests sessions in threads, an aiohttp session) keep
posting unique ids through the caller proxy's HTTP listener to a plain HTTP
app behind the provider proxy, while each proxy is hot-restarted twice.
Every request must succeed, and the app must see every id exactly once.
Also: a plain drain (SIGTERM) answers a request that arrives on a kept-alive
connection, with ``Connection: close``, instead of dropping it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import threading

import pytest
import trio

from e2e import free_port, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from http_mesh import SERVICE, http_app, http_caller_toml, http_mesh, http_provider_toml
from test_hot_restart_e2e import hot_restart

pytestmark = pytest.mark.e2e


class HttpLoad:
    def __init__(self, base: str) -> None:
        self.base = base
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def next_id(self) -> bytes:
        with self.lock:
            return str(next(self.ids)).encode()

    def done(self, call_id: bytes, status: int, body: bytes) -> None:
        with self.lock:
            if status == 200 and body == call_id:
                self.ok += 1
            else:
                self.failures.append(f"{call_id!r}: {status} {body[:200]!r}")

    def requests_worker(self) -> None:
        import requests

        with requests.Session() as s:
            while not self.stop.is_set():
                call_id = self.next_id()
                try:
                    r = s.post(f"{self.base}/count", data=call_id, headers={"Host": SERVICE}, timeout=20)
                except requests.RequestException as exc:
                    with self.lock:
                        self.failures.append(f"{call_id!r}: {exc!r}")
                    continue
                self.done(call_id, r.status_code, r.content)

    def aiohttp_worker(self, concurrency: int) -> None:
        import aiohttp

        async def main() -> None:
            async with aiohttp.ClientSession(base_url=self.base, headers={"Host": SERVICE}) as s:

                async def one() -> None:
                    while not self.stop.is_set():
                        call_id = self.next_id()
                        try:
                            async with s.post("/count", data=call_id, timeout=aiohttp.ClientTimeout(total=20)) as r:
                                self.done(call_id, r.status, await r.read())
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                            with self.lock:
                                self.failures.append(f"{call_id!r}: {exc!r}")

                await asyncio.gather(*(one() for _ in range(concurrency)))

        asyncio.run(main())


async def test_hot_restart_of_either_proxy_under_http_load() -> None:
    with trio.fail_after(110), short_tmpdir() as d:
        async with http_app(d) as app:
            app_port = int(app.addresses["port"])
            pport, hport = free_port(), free_port()
            prov_cfg = d / "web-proxy.toml"
            prov_cfg.write_text(http_provider_toml(d, pport, app_port))
            caller_cfg = d / "caller-proxy.toml"
            caller_cfg.write_text(http_caller_toml(d, hport, pport))
            pp = await start_process(proxy_argv(prov_cfg), "octoproxy ready", d, "web-proxy")
            cp = await start_process(proxy_argv(caller_cfg), "octoproxy ready", d, "caller-proxy")
            load = HttpLoad(f"http://127.0.0.1:{hport}")
            try:
                await wait_ready(pp)
                await wait_ready(cp)
                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(trio.to_thread.run_sync, load.requests_worker)
                    n.start_soon(trio.to_thread.run_sync, load.aiohttp_worker, 8)
                    try:
                        await trio.sleep(0.5)
                        for i in range(2):
                            before = load.ok
                            cp = await hot_restart(caller_cfg, d, f"caller-proxy-{i + 1}", cp)
                            pp = await hot_restart(prov_cfg, d, f"web-proxy-{i + 1}", pp)
                            await trio.sleep(0.3)
                            assert load.ok > before, "no progress across a restart"
                        await trio.sleep(0.3)
                    finally:
                        load.stop.set()
                if load.failures:
                    for f in sorted(d.glob("*.stderr")):
                        print(f"--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}")
                assert load.failures == [], load.failures[:10]
                assert load.ok > 50

                def seen() -> dict[str, int]:
                    import requests

                    return dict(requests.get(f"http://127.0.0.1:{hport}/seen", headers={"Host": SERVICE}, timeout=5).json())

                counts = await trio.to_thread.run_sync(seen)
                assert counts == {"unique": load.ok, "duplicates": 0}
                assert await cp.metric("octoproxy_hot_restart_generation") == 2
            finally:
                await stop(cp)
                await stop(pp)


async def test_drain_answers_a_request_on_a_kept_alive_connection() -> None:
    """SIGTERM: a keep-alive connection that sends during the drain gets an answer and Connection: close."""
    with trio.fail_after(30):
        async with http_mesh(extra_http="drain_grace = 2.0") as m:

            def keepalive_then(after: trio.Event) -> tuple[bytes, bytes, bytes]:
                with socket.create_connection(("127.0.0.1", m.http_port), timeout=5) as s:
                    s.sendall(b"GET /echo/first HTTP/1.1\r\nHost: web\r\n\r\n")
                    first = b""
                    while b"/echo/first" not in first:
                        first += s.recv(4096)
                    trio.from_thread.run(after.wait)  # the proxy drains now
                    s.sendall(b"GET /echo/second HTTP/1.1\r\nHost: web\r\n\r\n")
                    second = b""
                    while chunk := s.recv(4096):
                        second += chunk
                    return first, second, b""

            draining = trio.Event()
            async with trio.open_nursery() as n:
                result: list[tuple[bytes, bytes, bytes]] = []

                async def client() -> None:
                    result.append(await trio.to_thread.run_sync(keepalive_then, draining))

                n.start_soon(client)
                await trio.sleep(0.3)
                m.caller.process.send_signal(signal.SIGTERM)
                await trio.sleep(0.2)
                draining.set()
            first, second, _ = result[0]
            assert first.startswith(b"HTTP/1.1 200 ")
            # answered (the proxy is going away: 503 UNAVAILABLE), and told to close: not reset, not silence
            assert second.startswith(b"HTTP/1.1 503 "), second
            assert b"connection: close" in second.lower() and b"x-octoproxy-status: UNAVAILABLE" in second


async def test_drain_closes_idle_keepalive_connections() -> None:
    with trio.fail_after(30):
        async with http_mesh(extra_http="drain_grace = 0.3") as m:

            def idle_client() -> tuple[bytes, float]:
                import time

                with socket.create_connection(("127.0.0.1", m.http_port), timeout=8) as s:
                    s.sendall(b"GET /echo/x HTTP/1.1\r\nHost: web\r\n\r\n")
                    got = b""
                    while b"/echo/x" not in got:
                        got += s.recv(4096)
                    start = time.monotonic()
                    rest = s.recv(4096)  # blocks until the proxy closes the idle connection
                    return rest, time.monotonic() - start

            async with trio.open_nursery() as n:
                out: list[tuple[bytes, float]] = []

                async def run() -> None:
                    out.append(await trio.to_thread.run_sync(idle_client))

                n.start_soon(run)
                await trio.sleep(0.5)
                m.caller.process.send_signal(signal.SIGTERM)
            rest, waited = out[0]
            assert rest == b""  # a clean close (FIN), well before the 60 s idle timeout
            assert waited < 5
            with trio.fail_after(10):
                await m.caller.process.wait()


async def test_drain_finishes_a_request_in_flight() -> None:
    """SIGTERM while a request waits for the app: it is answered 200, with Connection: close."""
    with trio.fail_after(30):
        async with http_mesh() as m:

            def slow() -> bytes:
                with socket.create_connection(("127.0.0.1", m.http_port), timeout=10) as s:
                    s.sendall(b"GET /sleep?s=1 HTTP/1.1\r\nHost: web\r\n\r\n")
                    out = b""
                    while chunk := s.recv(4096):
                        out += chunk
                    return out

            async with trio.open_nursery() as n:
                got: list[bytes] = []

                async def run() -> None:
                    got.append(await trio.to_thread.run_sync(slow))

                n.start_soon(run)
                await trio.sleep(0.4)
                m.caller.process.send_signal(signal.SIGTERM)
            assert got[0].startswith(b"HTTP/1.1 200 ") and got[0].endswith(b"slept"), got
            assert b"connection: close" in got[0].lower()
