"""The Mesh SDK over real Unix sockets: client against server, and against fakes
that speak raw frames (a draining proxy, a GOAWAY sender, a garbage sender).

Every test runs under a Trio-clock ``fail_after`` guard; tests that wait on
timeouts use ``autojump_clock``. Socket paths live in a short directory under
/tmp (pytest's tmp_path can exceed the 108-byte sun_path limit).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from octoproxy import OctoproxyError
from octoproxy.frame import Flags, Frame, FrameDecoder, FrameType, Status, encode_frame, encode_request, encode_response
from octoproxy.sdk import (
    MAX_RESENDS,
    ApplicationError,
    CallError,
    Client,
    Request,
    connect,
    open_client,
    serve,
)

GUARD = 10


# ---------------------------------------------------------------- helpers


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="octo-sdk-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "app.sock")


async def echo(req: Request) -> bytes:
    return req.body


async def start_server(nursery: trio.Nursery, path: str, handler: Callable[[Request], Awaitable[bytes]], **kw: Any) -> trio.CancelScope:
    """Start ``serve`` in its own cancel scope (cancel it to kill the server)."""

    async def run(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(functools.partial(serve, path, handler, **kw))
                task_status.started(scope)

    scope: trio.CancelScope = await nursery.start(run)
    return scope


async def raw_listener(path: str) -> trio.SocketListener:
    # a plain bind: trio binds Unix paths in a worker thread, which autojump_clock takes for idleness
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    await trio.lowlevel.checkpoint()
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class RawPeer:
    """One end of a connection that speaks raw frames (for fakes and bad clients)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        return cls(await trio.open_unix_socket(path))

    async def frame(self) -> Frame | None:
        """The next frame, or None at EOF (or reset)."""
        while True:
            f = self.decoder.next_frame()
            if f is not None:
                return f
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.decoder.receive_data(data)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


def hot_restart(stream_id: int) -> bytes:
    return encode_response(stream_id, flags=Flags.HOT_RESTART, status=Status.UNAVAILABLE)


# ---------------------------------------------------------------- calls


async def test_call_round_trip(path: str) -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> bytes:
        seen.append(req)
        return f"{req.service}/{req.method}:".encode() + req.body

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, path, handler)
            assert len(listeners) == 1
            assert os.stat(path).st_mode & 0o777 == 0o660
            async with open_client(path) as client:
                assert await client.call("echo", "ping", b"hello") == b"echo/ping:hello"
                now = trio.current_time()
                reply = await client.call("echo", "get", b"x", timeout=5.0, metadata={"traceparent": "00-ab-cd-01"})
                assert reply == b"echo/get:x"
                after = trio.current_time()
                assert client.connections_opened == 1
                assert client.resends == 0
            nursery.cancel_scope.cancel()
    first, second = seen
    assert first.deadline is None and first.metadata == {} and first.caller == "" and not first.oneway
    assert second.metadata == {"traceparent": "00-ab-cd-01"}
    # the provider measures the deadline from its own receipt of timeout_ms (rounded up to 1 ms)
    assert second.deadline is not None and now + 4.9 < second.deadline <= after + 5.001
    assert first.stream_id != second.stream_id


async def test_thousand_concurrent_calls_on_one_connection(path: str) -> None:
    async def handler(req: Request) -> bytes:
        await trio.sleep(0)  # let the answers come back out of order
        return req.body[::-1]

    results: dict[int, bytes] = {}
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:

                async def one(i: int) -> None:
                    results[i] = await client.call("rev", "m", str(i).encode())

                async with trio.open_nursery() as calls:
                    for i in range(1000):
                        calls.start_soon(one, i)
                assert client.connections_opened == 1
            nursery.cancel_scope.cancel()
    assert results == {i: str(i).encode()[::-1] for i in range(1000)}


async def test_one_mebibyte_body(path: str) -> None:
    body = os.urandom(1 << 20)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            async with open_client(path) as client:
                assert await client.call("echo", "big", body) == body
            nursery.cancel_scope.cancel()


async def test_request_over_max_frame_size_refused_locally(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            async with open_client(path, max_frame_size=1024) as client:
                with pytest.raises(CallError) as info:
                    await client.call("echo", "big", bytes(2000))
                assert info.value.status == Status.FRAME_TOO_LARGE
                assert await client.call("echo", "small", b"ok") == b"ok"
            nursery.cancel_scope.cancel()


async def test_application_error(path: str) -> None:
    async def handler(req: Request) -> bytes:
        raise ApplicationError(f"no such user: {req.body.decode()}")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                with pytest.raises(CallError) as info:
                    await client.call("users", "get", b"bob")
            nursery.cancel_scope.cancel()
    assert info.value.status == Status.APPLICATION_ERROR
    assert info.value.message == "no such user: bob"
    assert isinstance(info.value, OctoproxyError)
    assert str(info.value) == "APPLICATION_ERROR: no such user: bob"


async def test_handler_exception_is_application_error_and_server_keeps_serving(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(req: Request) -> bytes:
        if req.method == "boom":
            raise ZeroDivisionError("oops")
        return req.body

    caplog.set_level(logging.ERROR, logger="octoproxy.sdk")
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                with pytest.raises(CallError) as info:
                    await client.call("svc", "boom")
                assert await client.call("svc", "ok", b"still here") == b"still here"
            nursery.cancel_scope.cancel()
    assert info.value.status == Status.APPLICATION_ERROR
    assert info.value.message == "internal error: ZeroDivisionError"
    records = [r for r in caplog.records if r.name == "octoproxy.sdk" and r.levelno >= logging.ERROR]
    assert len(records) == 1
    assert "ZeroDivisionError" in records[0].getMessage()


async def test_handler_returning_non_bytes_is_internal_error(path: str) -> None:
    async def handler(req: Request) -> bytes:
        return "text"  # type: ignore[return-value]

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                with pytest.raises(CallError, match="internal error: TypeError"):
                    await client.call("svc", "m")
            nursery.cancel_scope.cancel()


async def test_timeout(path: str, autojump_clock: trio.testing.MockClock) -> None:
    handler_cancelled = trio.Event()

    async def handler(req: Request) -> bytes:
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()
        raise AssertionError("unreachable")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                start = trio.current_time()
                with pytest.raises(CallError) as info:
                    await client.call("slow", "m", timeout=1.5)
                assert info.value.status == Status.TIMEOUT
                assert trio.current_time() - start == pytest.approx(1.5, abs=0.01)
                await handler_cancelled.wait()  # the provider gave up too (timeout_ms)
            nursery.cancel_scope.cancel()


async def test_client_enforces_timeout_without_provider_help(path: str, autojump_clock: trio.testing.MockClock) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with open_client(path) as client:
            peer = RawPeer(await listener.accept())
            start = trio.current_time()
            with pytest.raises(CallError) as info:
                await client.call("mute", "m", timeout=2.0)
            assert info.value.status == Status.TIMEOUT
            assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
            frame = await peer.frame()
            assert frame is not None and frame.type == FrameType.REQUEST
            assert 1900 <= frame.timeout_ms <= 2000
            # a late answer is dropped quietly, and the connection keeps working
            await peer.send(encode_response(frame.stream_id, b"late"))
            async with trio.open_nursery() as nursery:

                async def answer_next() -> None:
                    f = await peer.frame()
                    assert f is not None
                    await peer.send(encode_response(f.stream_id, b"on time"))

                nursery.start_soon(answer_next)
                assert await client.call("mute", "m", timeout=2.0) == b"on time"
            assert client.connections_opened == 1
            await peer.aclose()
        await listener.aclose()


async def test_provider_answers_timeout_when_deadline_passes(path: str, autojump_clock: trio.testing.MockClock) -> None:
    async def handler(req: Request) -> bytes:
        await trio.sleep(10)
        return b"too late"

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            peer = await RawPeer.connect(path)
            start = trio.current_time()
            await peer.send(encode_request(7, "slow", "m", caller="web", timeout_ms=500))
            frame = await peer.frame()
            assert frame is not None and frame.type == FrameType.RESPONSE and frame.stream_id == 7
            assert int(frame.header.status) == Status.TIMEOUT
            assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)
            await peer.aclose()
            nursery.cancel_scope.cancel()


async def test_raw_request_fields_reach_the_handler(path: str) -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> bytes:
        seen.append(req)
        return b""

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            peer = await RawPeer.connect(path)
            await peer.send(encode_request(2**63, "users", "get", b"\x00\x01", caller="web", metadata={"x-set": "blue"}))
            frame = await peer.frame()
            assert frame is not None and frame.stream_id == 2**63 and frame.header_bytes == b""
            await peer.aclose()
            nursery.cancel_scope.cancel()
    (req,) = seen
    assert (req.service, req.method, req.body, req.caller) == ("users", "get", b"\x00\x01", "web")
    assert req.metadata == {"x-set": "blue"} and req.stream_id == 2**63 and req.deadline is None


async def test_oneway(path: str) -> None:
    got: list[Request] = []
    done = trio.Event()

    async def handler(req: Request) -> bytes:
        got.append(req)
        done.set()
        return b"ignored"

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                await client.oneway("log", "append", b"line", metadata={"k": "v"})
                await done.wait()
                assert await client.call("log", "sync", b"x") == b"ignored"  # no stray response
            nursery.cancel_scope.cancel()
    assert got[0].oneway and got[0].body == b"line" and got[0].metadata == {"k": "v"}
    assert not got[1].oneway


async def test_max_concurrency_applies_back_pressure(path: str) -> None:
    running = peak = 0
    release = trio.Event()

    async def handler(req: Request) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return req.body

    results: list[bytes] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, path, handler, max_concurrency=2))
            async with open_client(path) as client:
                async with trio.open_nursery() as calls:
                    for i in range(5):
                        calls.start_soon(_call_into, results, client, bytes([i]))
                    ponged = trio.Event()

                    async def ping() -> None:
                        await client.ping()
                        ponged.set()

                    await trio.testing.wait_all_tasks_blocked()
                    assert running == 2
                    calls.start_soon(ping)  # queued behind the requests the server has not read
                    await trio.testing.wait_all_tasks_blocked()
                    assert not ponged.is_set()  # the server stopped reading: even a PING waits
                    release.set()
            nursery.cancel_scope.cancel()
    assert peak == 2
    assert sorted(results) == [bytes([i]) for i in range(5)]


async def _call_into(out: list[bytes], client: Client, body: bytes) -> None:
    out.append(await client.call("s", "m", body))


# ---------------------------------------------------------------- lifecycle


async def test_connect_failure_raises_oserror(path: str) -> None:
    with trio.fail_after(GUARD):
        with pytest.raises(FileNotFoundError):
            async with open_client(path):
                pass  # pragma: no cover


async def test_exceptions_from_the_block_are_not_wrapped(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            with pytest.raises(KeyError):
                async with open_client(path):
                    raise KeyError("mine")
            nursery.cancel_scope.cancel()


async def test_connect_with_caller_nursery_and_aclose(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            async with trio.open_nursery() as client_nursery:
                client = await connect(client_nursery, path)
                assert isinstance(client, Client)
                async with client:
                    assert await client.call("echo", "m", b"1") == b"1"
                # the client's tasks have ended, so this nursery can finish
            with pytest.raises(trio.ClosedResourceError):
                await client.call("echo", "m", b"2")
            nursery.cancel_scope.cancel()


async def test_close_fails_pending_calls_with_closed_resource_error(path: str) -> None:
    started = trio.Event()

    async def handler(req: Request) -> bytes:
        started.set()
        await trio.sleep_forever()
        return b""  # pragma: no cover

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                async with trio.open_nursery() as calls:

                    async def pending_call() -> None:
                        with pytest.raises(trio.ClosedResourceError):
                            await client.call("s", "m")

                    calls.start_soon(pending_call)
                    await started.wait()
                    await client.aclose()
                with pytest.raises(trio.ClosedResourceError):
                    await client.call("s", "m")
                with pytest.raises(trio.ClosedResourceError):
                    await client.ping()
                assert client.connections_open == 0
            nursery.cancel_scope.cancel()


async def test_server_killed_mid_call_then_reconnect(path: str) -> None:
    started = trio.Event()

    async def handler(req: Request) -> bytes:
        if req.method == "hang":
            started.set()
            await trio.sleep_forever()
        return b"pong"

    outcome: list[BaseException] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, path, handler)
            async with open_client(path, connect_timeout=1.0) as client:
                call_done = trio.Event()

                async def hanging_call() -> None:
                    try:
                        await client.call("svc", "hang")
                    except CallError as exc:
                        outcome.append(exc)
                    call_done.set()

                nursery.start_soon(hanging_call)
                await started.wait()
                server.cancel()
                with trio.fail_after(1):  # promptly
                    await call_done.wait()
                (exc,) = outcome
                assert isinstance(exc, CallError) and exc.status == Status.UNAVAILABLE
                # nobody listens now: one connection attempt, then UNAVAILABLE
                with pytest.raises(CallError) as info:
                    await client.call("svc", "ping")
                assert info.value.status == Status.UNAVAILABLE and "cannot connect" in info.value.message
                # the server comes back (its stale socket file is replaced): calls work again
                await start_server(nursery, path, handler)
                assert await client.call("svc", "ping") == b"pong"
                assert client.connections_opened == 2
            nursery.cancel_scope.cancel()


async def test_serve_refuses_a_path_a_live_server_owns(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            with pytest.raises(OSError) as info:
                await serve(path, echo)
            assert info.value.errno == errno.EADDRINUSE
            nursery.cancel_scope.cancel()


async def test_serve_prebound_listeners(path: str) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            got = await nursery.start(functools.partial(serve, None, echo, listeners=[listener]))
            assert got == [listener]
            async with open_client(path) as client:
                assert await client.call("echo", "m", b"adopted") == b"adopted"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- hot restart and GOAWAY


async def test_hot_restart_resends_on_a_new_connection(path: str) -> None:
    """Connection #1 reaches a draining proxy (answers HOT_RESTART to new work,
    finishes what it holds); the new proxy, on the same path, serves #2."""
    served: list[bytes] = []

    async def handler(req: Request) -> bytes:
        served.append(req.body)
        return b"new:" + req.body

    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            async with open_client(path) as client:
                old = RawPeer(await listener.accept())
                await listener.aclose()  # the old proxy hands its listener over...
                await nursery.start(serve, path, handler)  # ...and the new one owns the path

                held: list[Frame] = []
                got_a = trio.Event()
                old_closed = trio.Event()

                async def draining_proxy() -> None:
                    while (f := await old.frame()) is not None:
                        if f.method == "in-flight":
                            held.append(f)
                            got_a.set()
                        else:
                            await old.send(hot_restart(f.stream_id))
                    old_closed.set()

                nursery.start_soon(draining_proxy)
                result_a: list[bytes] = []
                a_done = trio.Event()

                async def call_a() -> None:
                    result_a.append(await client.call("svc", "in-flight", b"A"))
                    a_done.set()

                nursery.start_soon(call_a)
                await got_a.wait()  # A is in flight on the old connection

                assert await client.call("svc", "new", b"B", timeout=5.0) == b"new:B"
                assert client.resends == 1
                assert client.connections_opened == 2
                assert client.connections_open == 2  # the old one drains: A is outstanding
                assert not old_closed.is_set()

                await old.send(encode_response(held[0].stream_id, b"old:A"))  # the old proxy finishes A
                await a_done.wait()
                assert result_a == [b"old:A"]
                await old_closed.wait()  # nothing outstanding: the client closed it
                await old.aclose()
                assert client.connections_open == 1
                assert await client.call("svc", "new", b"C") == b"new:C"
                assert client.resends == 1 and client.connections_opened == 2
            nursery.cancel_scope.cancel()
    assert served == [b"B", b"C"]  # exactly once each, never on the old proxy


async def test_hot_restart_racing_calls_share_one_new_connection(path: str) -> None:
    n = 20
    served: list[bytes] = []

    async def handler(req: Request) -> bytes:
        served.append(req.body)
        return req.body

    listener = await raw_listener(path)
    results: list[bytes] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            async with open_client(path) as client:
                old = RawPeer(await listener.accept())
                await listener.aclose()
                await nursery.start(serve, path, handler)
                async with trio.open_nursery() as calls:
                    for i in range(n):
                        calls.start_soon(_call_into, results, client, b"%d" % i)
                    frames: list[Frame] = []
                    while len(frames) < n:  # all n are on the old connection...
                        f = await old.frame()
                        assert f is not None
                        frames.append(f)
                    # ...and all get HOT_RESTART in one burst
                    await old.send(b"".join(hot_restart(f.stream_id) for f in frames))
                assert await old.frame() is None  # closed by the client once drained
                await old.aclose()
                assert client.resends == n
                assert client.connections_opened == 2
            nursery.cancel_scope.cancel()
    assert sorted(results) == sorted(served) == sorted(b"%d" % i for i in range(n))


async def test_hot_restart_resends_are_bounded(path: str) -> None:
    listener = await raw_listener(path)

    async def always_draining(stream: trio.SocketStream) -> None:
        async with stream:
            peer = RawPeer(stream)
            while (f := await peer.frame()) is not None:
                if f.type == FrameType.REQUEST:
                    await peer.send(hot_restart(f.stream_id))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, always_draining, [listener])
            async with open_client(path) as client:
                with pytest.raises(CallError) as info:
                    await client.call("s", "m", b"x")
                assert info.value.status == Status.UNAVAILABLE
                assert "HOT_RESTART" in info.value.message
                assert client.resends == MAX_RESENDS
                assert client.connections_opened == MAX_RESENDS + 1
            nursery.cancel_scope.cancel()


async def test_goaway_moves_new_calls_to_a_new_connection(path: str) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            async with open_client(path) as client:
                first = RawPeer(await listener.accept())
                result_a: list[bytes] = []
                a_done = trio.Event()

                async def call_a() -> None:
                    result_a.append(await client.call("s", "a", b"A"))
                    a_done.set()

                nursery.start_soon(call_a)
                frame_a = await first.frame()
                assert frame_a is not None and frame_a.method == "a"
                await first.send(encode_frame(FrameType.GOAWAY, 0, b"\x32\x0bhot restart"))
                await trio.testing.wait_all_tasks_blocked()

                async def second_server() -> None:
                    second = RawPeer(await listener.accept())
                    f = await second.frame()
                    assert f is not None and f.method == "b"
                    await second.send(encode_response(f.stream_id, b"B via #2"))
                    assert await second.frame() is None
                    await second.aclose()

                nursery.start_soon(second_server)
                assert await client.call("s", "b", b"B") == b"B via #2"
                assert client.connections_opened == 2
                assert client.resends == 0
                # the in-flight call still completes on the old connection, which then closes
                await first.send(encode_response(frame_a.stream_id, b"A via #1"))
                await a_done.wait()
                assert result_a == [b"A via #1"]
                assert await first.frame() is None
                await first.aclose()
            nursery.cancel_scope.cancel()
        await listener.aclose()


# ---------------------------------------------------------------- PING, errors from the peer


async def test_ping_pong_both_ways(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            async with open_client(path) as client:
                rtt = await client.ping()
                assert 0 <= rtt < GUARD
            peer = await RawPeer.connect(path)  # the server answers a peer's PING
            await peer.send(encode_frame(FrameType.PING, 0xDEADBEEF))
            frame = await peer.frame()
            assert frame is not None and (frame.type, frame.stream_id) == (FrameType.PONG, 0xDEADBEEF)
            await peer.aclose()
            nursery.cancel_scope.cancel()


async def test_client_answers_ping_and_refuses_requests(path: str) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with open_client(path):
            peer = RawPeer(await listener.accept())
            await peer.send(encode_frame(FrameType.PING, 12345) + encode_request(9, "x", "y"))
            pong = await peer.frame()
            assert pong is not None and (pong.type, pong.stream_id) == (FrameType.PONG, 12345)
            resp = await peer.frame()
            assert resp is not None and (resp.type, resp.stream_id) == (FrameType.RESPONSE, 9)
            assert int(resp.header.status) == Status.NO_ROUTE
            await peer.aclose()
        await listener.aclose()


async def test_ping_times_out(path: str, autojump_clock: trio.testing.MockClock) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with open_client(path) as client:
            mute = await listener.accept()  # accepts, never answers
            with pytest.raises(CallError) as info:
                await client.ping(timeout=3.0)
            assert info.value.status == Status.TIMEOUT
            await mute.aclose()
        await listener.aclose()


async def test_unknown_status_counts_as_unavailable(path: str) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, open_client(path) as client:
            peer = RawPeer(await listener.accept())

            async def answer() -> None:
                f = await peer.frame()
                assert f is not None
                await peer.send(encode_response(f.stream_id, status=42, error="from the future"))

            nursery.start_soon(answer)
            with pytest.raises(CallError) as info:
                await client.call("s", "m")
            assert info.value.status == Status.UNAVAILABLE
            assert info.value.message == "unknown status 42: from the future"
            assert CallError(42, "x").status == Status.UNAVAILABLE
            assert repr(CallError(Status.TIMEOUT, "late")) == "CallError(TIMEOUT, 'late')"
            await peer.aclose()
        await listener.aclose()


async def test_client_protocol_error_fails_pending_calls_and_sends_goaway(path: str) -> None:
    listener = await raw_listener(path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, open_client(path) as client:
            peer = RawPeer(await listener.accept())

            async def garbage() -> None:
                assert await peer.frame() is not None
                await peer.send(b"\xab\xba\x09 not a frame")

            nursery.start_soon(garbage)
            with pytest.raises(CallError) as info:
                await client.call("s", "m")
            assert info.value.status == Status.UNAVAILABLE
            assert "unsupported version 9" in info.value.message
            goaway = await peer.frame()
            assert goaway is not None and goaway.type == FrameType.GOAWAY
            assert goaway.header.error == "unsupported version 9"
            assert await peer.frame() is None
            await peer.aclose()
        await listener.aclose()


async def test_garbage_to_server_gets_goaway_and_close_other_connections_fine(path: str) -> None:
    release = trio.Event()

    async def handler(req: Request) -> bytes:
        if req.method == "slow":
            await release.wait()
        return req.body

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, handler)
            async with open_client(path) as client:
                assert await client.call("s", "m", b"before") == b"before"
                bad = await RawPeer.connect(path)
                # a good request first (it is still served), then garbage
                await bad.send(encode_request(1, "s", "slow", b"in flight") + b"GARBAGE GARBAGE GARBAGE!")
                goaway = await bad.frame()
                assert goaway is not None and goaway.type == FrameType.GOAWAY and goaway.stream_id == 0
                assert goaway.header.error == "bad magic 0x4741"
                assert await client.call("s", "m", b"during") == b"during"
                release.set()
                response = await bad.frame()
                assert response is not None and response.type == FrameType.RESPONSE and response.stream_id == 1
                assert bytes(response.body) == b"in flight"
                assert await bad.frame() is None  # then the server closes that connection
                await bad.aclose()
                assert await client.call("s", "m", b"after") == b"after"
                assert client.connections_opened == 1
            nursery.cancel_scope.cancel()


async def test_malformed_request_header_answered_then_goaway(path: str) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, path, echo)
            bad = await RawPeer.connect(path)
            # walks fine (service, method) but caller (field 3) is not UTF-8: protobuf refuses it
            header = b"\x0a\x01s\x12\x01m\x1a\x02\xff\xfe"
            await bad.send(encode_frame(FrameType.REQUEST, 5, header, b""))
            response = await bad.frame()
            assert response is not None and (response.type, response.stream_id) == (FrameType.RESPONSE, 5)
            assert int(response.header.status) == Status.PROTOCOL_ERROR
            goaway = await bad.frame()
            assert goaway is not None and goaway.type == FrameType.GOAWAY
            assert await bad.frame() is None
            await bad.aclose()
            nursery.cancel_scope.cancel()
