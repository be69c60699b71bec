"""End-to-end: an SDK caller -> caller proxy -> provider proxy -> SDK provider,
each proxy a real `octoproxy run` process, on temp-dir sockets and loopback."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from e2e import Proc, caller_toml, statuses_of_slow_calls, free_port, provider, provider_toml, proxy, short_tmpdir, wait_ready
from octoproxy import Flags, FrameType, Status, sdk
from octoproxy.frame import FrameDecoder, encode_frame, encode_request

pytestmark = pytest.mark.e2e


@dataclass
class Mesh:
    dir: Path
    caller: Proc
    prov_proxy: Proc
    app: Proc

    @property
    def sock(self) -> Path:
        return self.dir / "caller.sock"


@asynccontextmanager
async def mesh(caller_extra: dict[str, str] | None = None, provider_extra: dict[str, str] | None = None) -> AsyncIterator[Mesh]:
    with short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        async with provider(d, app_uds) as app:
            async with proxy(d, "provider-proxy", provider_toml(d, port, app_uds, **(provider_extra or {}))) as pp:
                async with proxy(d, "caller-proxy", caller_toml(d, [port], **(caller_extra or {}))) as cp:
                    await wait_ready(pp)
                    await wait_ready(cp)
                    yield Mesh(d, cp, pp, app)


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(5)
    return s


def read_frames(s: socket.socket, count: int) -> list:
    dec = FrameDecoder()
    out: list = []
    while len(out) < count:
        data = s.recv(1 << 20)
        if not data:
            break
        dec.receive_data(data)
        out.extend(dec)
    return out


async def test_one_call_and_admin_api() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            assert await client.call("echo", "hello", b"world") == b"world"
            assert await m.caller.metric('octoproxy_requests_total{direction="outbound",service="echo",method="hello",status="OK"}') == 1
            assert await m.prov_proxy.metric('octoproxy_requests_total{direction="inbound",service="echo",method="hello",status="OK"}') == 1
            assert await m.caller.metric("octoproxy_request_duration_seconds_count") == 1
            clusters = await m.caller.json("/clusters")
            assert clusters["echo"]["endpoints"][0]["connections"] == 2  # type: ignore[index]
            assert clusters["echo"]["held_requests"] == 0  # type: ignore[index]
            dump = await m.caller.json("/config_dump")
            assert dump["config"]["proxy"]["service"] == "caller-app"  # type: ignore[index]
            assert (await m.caller.get("/healthz"))[0] == 200
            assert (await m.caller.post("/healthcheck/fail"))[0] == 200
            assert (await m.caller.get("/ready"))[0] == 503
            assert (await m.caller.post("/healthcheck/ok"))[0] == 200
            assert (await m.caller.get("/ready"))[0] == 200


async def test_thousand_concurrent_calls_and_big_bodies() -> None:
    with trio.fail_after(60):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await client.call("echo", "echo", str(i).encode() * 10)

            async with trio.open_nursery() as n:
                for i in range(1000):
                    n.start_soon(one, i)
            assert all(results[i] == str(i).encode() * 10 for i in range(1000))
            big = os.urandom(1 << 20)
            assert await client.call("echo", "echo", big) == big
            got = await client.call("echo", "big", str(3 << 20).encode())
            assert len(got) == 3 << 20


async def test_unknown_service_no_route_and_proxy_keeps_serving() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("nobody", "x", b"")
            assert info.value.status == Status.NO_ROUTE
            assert await client.call("echo", "x", b"still") == b"still"
            assert await m.caller.metric('octoproxy_rejected_total{reason="no_route"}') == 1


async def test_application_error_passes_through() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "fail", b"")
            assert info.value.status == Status.APPLICATION_ERROR and "on purpose" in str(info.value)


async def test_dead_upstream_unavailable() -> None:
    with trio.fail_after(30), short_tmpdir() as d:
        dead = free_port()  # nothing listens there
        async with proxy(d, "caller", caller_toml(d, [dead])) as cp, sdk.open_client(d / "caller.sock") as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "x", b"")
            assert info.value.status == Status.UNAVAILABLE
            assert (await cp.get("/ready"))[0] == 503
            assert await cp.metric('octoproxy_errors_total{kind="upstream_connect_failed"}') >= 1


async def test_timeout() -> None:
    with trio.fail_after(30):
        async with mesh(caller_extra={"route_timeout": "0.3"}) as m, sdk.open_client(m.sock) as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "sleep", b"2")
            assert info.value.status == Status.TIMEOUT
            assert await client.call("echo", "x", b"ok") == b"ok"
            await trio.sleep(2)  # the late response arrives and is dropped
            assert await m.caller.metric('octoproxy_errors_total{kind="late_response"}') == 1


async def test_provider_proxy_killed_mid_call_answers_unavailable_at_once() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            killed_at: list[float] = []

            def kill() -> None:
                killed_at.append(trio.current_time())
                os.killpg(m.prov_proxy.process.pid, signal.SIGKILL)

            statuses = await statuses_of_slow_calls(client, 20, kill)
            assert statuses == [Status.UNAVAILABLE] * 20
            assert trio.current_time() - killed_at[0] < 3  # not left to time out


async def test_provider_app_killed_mid_call() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            statuses = await statuses_of_slow_calls(client, 5, lambda: os.killpg(m.app.process.pid, signal.SIGKILL))
            assert statuses == [Status.UNAVAILABLE] * 5
            # the provider proxy keeps serving its admin API and reports not ready
            assert (await m.prov_proxy.get("/ready"))[0] == 503


@pytest.mark.parametrize(
    "garbage, status",
    [
        (b"\xde\xad\xbe\xef" * 8, None),  # bad magic: GOAWAY, then closed
        (struct.pack(">HBBIQHH", 0xABBA, 1, 1, 64 << 20, 7, 0, 0), None),  # 64 MiB: refused at the length field
        (struct.pack(">HBBIQHH", 0xABBA, 1, 1, 14, 9, 0, 2) + b"\x0f\x00", Status.PROTOCOL_ERROR),  # bad header
    ],
)
async def test_bad_frames_close_that_connection_only(garbage: bytes, status: Status | None) -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            s = raw_connect(m.sock)
            s.sendall(encode_request(1, "echo", "x", b"first") + garbage)

            def read_all() -> list:
                dec = FrameDecoder()
                while True:
                    data = s.recv(65536)
                    if not data:
                        return list(dec)
                    dec.receive_data(data)

            frames = await trio.to_thread.run_sync(read_all)
            s.close()
            # the request before the bad frame is still answered ...
            (first,) = [f for f in frames if f.type == FrameType.RESPONSE and f.stream_id == 1]
            assert bytes(first.body) == b"first"
            # ... the error is said (on the stream when its id could be read),
            # and a GOAWAY ends the connection
            others = [f for f in frames if f is not first]
            assert others[-1].type == FrameType.GOAWAY
            assert others[-1].header.status in (Status.PROTOCOL_ERROR, Status.FRAME_TOO_LARGE)
            if status is None:
                assert len(others) == 1
            else:
                assert len(others) == 2
                assert others[0].type == FrameType.RESPONSE and others[0].stream_id == 9 and others[0].header.status == status
            assert await client.call("echo", "x", b"others fine") == b"others fine"
            assert await m.caller.metric('octoproxy_errors_total{kind="protocol_error"}') == 1


async def test_frame_too_large_status() -> None:
    with trio.fail_after(30):
        async with mesh(caller_extra={"max_frame_size": "65536"}) as m, sdk.open_client(m.sock) as client:
            s = raw_connect(m.sock)
            s.sendall(encode_request(3, "echo", "x", bytes(70000)))
            frames = await trio.to_thread.run_sync(read_frames, s, 1)
            s.close()
            assert frames[0].type == FrameType.GOAWAY and frames[0].header.status == Status.FRAME_TOO_LARGE
            assert await client.call("echo", "x", b"fine") == b"fine"


async def test_slow_client_cut_off_alone() -> None:
    with trio.fail_after(60):
        # cut off because it takes nothing for frame_timeout (a big queue alone is no reason)
        caller_extra = {"outbound": "max_buffer = 65536", "proxy": "frame_timeout = 2.0"}
        async with mesh(caller_extra=caller_extra) as m, sdk.open_client(m.sock) as client:
            s = raw_connect(m.sock)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # ask for ~40 MiB of responses and never read them
            s.sendall(b"".join(encode_request(i, "echo", "big", b"1048576") for i in range(40)))
            with trio.fail_after(20):
                while await m.caller.metric('octoproxy_errors_total{kind="slow_client_cut_off"}') < 1:
                    await trio.sleep(0.1)
            s.close()
            assert await client.call("echo", "x", b"unaffected") == b"unaffected"


async def test_connection_limit_overloaded() -> None:
    with trio.fail_after(30):
        async with mesh(caller_extra={"outbound": "max_connections = 2"}) as m:
            async with sdk.open_client(m.sock) as a, sdk.open_client(m.sock) as b, trio.open_nursery() as n:
                assert await a.call("echo", "x", b"a") == b"a"
                assert await b.call("echo", "x", b"b") == b"b"
                # both busy (a call in flight each): none idle to shed, so the third is refused
                n.start_soon(a.call, "echo", "sleep", b"1.5")
                n.start_soon(b.call, "echo", "sleep", b"1.5")
                await trio.sleep(0.3)
                s = raw_connect(m.sock)
                s.sendall(encode_request(5, "echo", "x", b"c"))
                frames = await trio.to_thread.run_sync(read_frames, s, 1)
                s.close()
                assert frames[0].header.status == Status.OVERLOADED
                assert await a.call("echo", "x", b"a2") == b"a2"


async def test_pending_limit_overloaded() -> None:
    with trio.fail_after(30):
        async with mesh(caller_extra={"outbound": "max_pending = 5"}) as m, sdk.open_client(m.sock) as client:
            statuses: list[object] = []

            async def slow() -> None:
                try:
                    statuses.append(await client.call("echo", "sleep", b"0.5"))
                except sdk.CallError as exc:
                    statuses.append(exc.status)

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(slow)
            assert statuses.count(b"slept") == 5 and statuses.count(Status.OVERLOADED) == 3


async def test_sigterm_drain_answers_every_call_in_flight() -> None:
    with trio.fail_after(30):
        async with mesh() as m, sdk.open_client(m.sock) as client:
            results: list[object] = []

            async def slow() -> None:
                results.append(await client.call("echo", "sleep", b"1", timeout=10))

            async with trio.open_nursery() as n:
                for _ in range(50):
                    n.start_soon(slow)
                await trio.sleep(0.3)
                m.caller.process.send_signal(signal.SIGTERM)
            assert results == [b"slept"] * 50
            with trio.fail_after(10):
                assert await m.caller.process.wait() == 0
            assert "drained" in m.caller.stderr()


async def test_ping_pong_through_proxy() -> None:
    with trio.fail_after(30):
        async with mesh() as m:
            s = raw_connect(m.sock)
            s.sendall(encode_frame(FrameType.PING, 77))
            (pong,) = await trio.to_thread.run_sync(read_frames, s, 1)
            s.close()
            assert pong.type == FrameType.PONG and pong.stream_id == 77


async def test_drain_via_admin_answers_new_requests_hot_restart() -> None:
    """During a drain, in-flight calls complete and new ones are answered
    HOT_RESTART (not processed), on the same connection."""
    with trio.fail_after(30):
        async with mesh() as m:
            s = raw_connect(m.sock)
            s.sendall(encode_request(1, "echo", "sleep", b"1"))
            await trio.sleep(0.3)
            assert (await m.caller.post("/drain"))[0] == 200
            await trio.sleep(0.2)
            s.sendall(encode_request(2, "echo", "x", b""))
            frames = await trio.to_thread.run_sync(read_frames, s, 3)
            s.close()
            assert frames[0].type == FrameType.GOAWAY  # first: send nothing new here
            by_id = {f.stream_id: f for f in frames[1:]}
            assert by_id[2].flags & Flags.HOT_RESTART and by_id[2].header.status == Status.UNAVAILABLE
            assert by_id[1].flags == 0 and bytes(by_id[1].body) == b"slept"
            with trio.fail_after(10):
                assert await m.caller.process.wait() == 0


async def test_slow_client_trickle_is_cut_off_too() -> None:
    """Responses queued while the writer waits for the socket count against the limit too."""
    with trio.fail_after(60):
        # cut off because it takes nothing for frame_timeout (a big queue alone is no reason)
        caller_extra = {"outbound": "max_buffer = 65536", "proxy": "frame_timeout = 2.0"}
        async with mesh(caller_extra=caller_extra) as m, sdk.open_client(m.sock) as client:
            s = raw_connect(m.sock)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with trio.fail_after(30):
                i = 0
                while await m.caller.metric('octoproxy_errors_total{kind="slow_client_cut_off"}') < 1:
                    i += 1
                    assert i < 2000, "never cut off"
                    try:
                        s.sendall(encode_request(i, "echo", "big", b"16384"))
                    except OSError:
                        break  # cut off between two checks
                    await trio.sleep(0.005)
            s.close()
            assert await m.caller.metric('octoproxy_errors_total{kind="slow_client_cut_off"}') == 1
            assert await client.call("echo", "x", b"unaffected") == b"unaffected"
