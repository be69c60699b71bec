"""One synchronous face over the three SDK front ends, for tests/test_sdk_frontends.py.

Each driver runs its front end the way an app would: the Trio SDK inside
``trio.run`` on a thread of its own, the asyncio SDK on an event loop on a
thread of its own, the blocking SDK straight from the test's threads. The test
calls them all through the same methods, so one suite runs on all three.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import trio

from octoproxy import sdk
from octoproxy.sdk import CallError, Request, aio, sync

T = TypeVar("T")
#: what the universal handlers do, by method: echo | fail | boom | sleep | big | count
Outcome = bytes | CallError


def _plan(req: Request) -> tuple[str, float]:
    if req.method == "sleep":
        return "sleep", float(req.body)
    return req.method, 0.0


def _result(req: Request) -> bytes:
    if req.method == "fail":
        raise sdk.ApplicationError(f"failed: {req.body.decode()}")
    if req.method == "boom":
        raise ZeroDivisionError("oops")
    if req.method == "big":
        return b"b" * int(req.body)
    if req.method == "sleep":
        return b"slept"
    return req.body


async def trio_handler(req: Request) -> bytes:
    kind, seconds = _plan(req)
    if kind == "sleep":
        await trio.sleep(seconds)
    return _result(req)


async def asyncio_handler(req: Request) -> bytes:
    kind, seconds = _plan(req)
    if kind == "sleep":
        await asyncio.sleep(seconds)
    return _result(req)


def thread_handler(req: Request) -> bytes:
    kind, seconds = _plan(req)
    if kind == "sleep":
        time.sleep(seconds)
    return _result(req)


class Client(Protocol):
    resends: int
    connections_opened: int

    def call(self, service: str, method: str, body: bytes = b"", *, timeout: float | None = None) -> bytes: ...
    def call_many(self, calls: list[tuple[str, str, bytes]], timeout: float) -> list[Outcome]: ...
    def close(self) -> None: ...


class Load:
    """Closed-loop calls from ``workers`` concurrent callers until stopped."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.next_id = 0
        self.lock = threading.Lock()

    def body(self) -> bytes:
        with self.lock:
            self.next_id += 1
            return b"%d" % self.next_id

    def record(self, body: bytes, outcome: bytes | BaseException) -> None:
        with self.lock:
            if outcome == body:
                self.ok += 1
            else:
                self.failures.append(f"{body!r}: {outcome!r}")


# ---------------------------------------------------------------- Trio


class _TrioLoop:
    """``trio.run`` on a thread; ``run(fn, *args)`` runs an async function there."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _main(self) -> None:
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)


class TrioClient:
    def __init__(self, loop: _TrioLoop, path: str, kw: dict[str, Any]) -> None:
        self.loop = loop

        async def open() -> sdk.Client:
            assert loop.nursery is not None
            return await sdk.connect(loop.nursery, path, **kw)

        self.client = loop.run(open)

    @property
    def resends(self) -> int:
        return self.client.resends

    @property
    def connections_opened(self) -> int:
        return self.client.connections_opened

    def call(self, service: str, method: str, body: bytes = b"", *, timeout: float | None = None) -> bytes:
        return self.loop.run(lambda: self.client.call(service, method, body, timeout=timeout))

    def call_many(self, calls: list[tuple[str, str, bytes]], timeout: float) -> list[Outcome]:
        async def many() -> list[Outcome]:
            out: list[Outcome] = [b""] * len(calls)

            async def one(i: int, s: str, m: str, b: bytes) -> None:
                try:
                    out[i] = await self.client.call(s, m, b, timeout=timeout)
                except CallError as exc:
                    out[i] = exc

            async with trio.open_nursery() as n:
                for i, (s, m, b) in enumerate(calls):
                    n.start_soon(one, i, s, m, b)
            return out

        return self.loop.run(many)

    def load(self, load: Load, workers: int, method: str = "echo") -> Callable[[], None]:
        """Start the load; returns a function that waits for the workers to stop."""
        done = threading.Event()

        async def run() -> None:
            async def worker() -> None:
                while not load.stopped.is_set():
                    body = load.body()
                    try:
                        load.record(body, await self.client.call("echo", method, body, timeout=20))
                    except CallError as exc:
                        load.record(body, exc)

            try:
                async with trio.open_nursery() as n:
                    for _ in range(workers):
                        n.start_soon(worker)
            finally:
                done.set()

        trio.from_thread.run_sync(lambda: self.loop.nursery.start_soon(run), trio_token=self.loop.token)  # type: ignore[union-attr]
        return lambda: done.wait(30) or None

    def close(self) -> None:
        self.loop.run(self.client.aclose)


class TrioDriver:
    name = "trio"

    def __init__(self) -> None:
        self.loop = _TrioLoop()

    def client(self, path: str, **kw: Any) -> TrioClient:
        return TrioClient(self.loop, path, kw)

    def subscribe(self, admin: str, services: list[str], **kw: Any) -> dict[str, int]:
        return self.loop.run(lambda: sdk.subscribe(admin, services, **kw))

    def serve(self, path: str, **kw: Any) -> Callable[[], None]:
        scope_box: list[trio.CancelScope] = []

        async def start() -> None:
            async def run(*, task_status: trio.TaskStatus[None]) -> None:
                with trio.CancelScope() as scope:
                    scope_box.append(scope)
                    async with trio.open_nursery() as n:
                        await n.start(functools.partial(sdk.serve, path, trio_handler, **kw))
                        task_status.started()

            assert self.loop.nursery is not None
            await self.loop.nursery.start(run)

        self.loop.run(start)
        return lambda: trio.from_thread.run_sync(scope_box[0].cancel, trio_token=self.loop.token)

    def close(self) -> None:
        self.loop.close()


# ---------------------------------------------------------------- asyncio


class AsyncioClient:
    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, kw: dict[str, Any]) -> None:
        self.loop = loop
        self.client: aio.Client = self.run(aio.connect(path, **kw))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def resends(self) -> int:
        return self.client.resends

    @property
    def connections_opened(self) -> int:
        return self.client.connections_opened

    def call(self, service: str, method: str, body: bytes = b"", *, timeout: float | None = None) -> bytes:
        return self.run(self.client.call(service, method, body, timeout=timeout))

    def call_many(self, calls: list[tuple[str, str, bytes]], timeout: float) -> list[Outcome]:
        async def many() -> list[Outcome]:
            got = await asyncio.gather(*(self.client.call(s, m, b, timeout=timeout) for s, m, b in calls), return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException) and not isinstance(g, CallError):
                    raise g
            return got  # type: ignore[return-value]

        return self.run(many())

    def load(self, load: Load, workers: int, method: str = "echo") -> Callable[[], None]:
        async def worker() -> None:
            while not load.stopped.is_set():
                body = load.body()
                try:
                    load.record(body, await self.client.call("echo", method, body, timeout=20))
                except CallError as exc:
                    load.record(body, exc)

        async def run() -> None:
            await asyncio.gather(*(worker() for _ in range(workers)))

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return lambda: fut.result(30)

    def close(self) -> None:
        self.run(self.client.aclose())


class AsyncioDriver:
    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def client(self, path: str, **kw: Any) -> AsyncioClient:
        return AsyncioClient(self.loop, path, kw)

    def subscribe(self, admin: str, services: list[str], **kw: Any) -> dict[str, int]:
        return asyncio.run_coroutine_threadsafe(aio.subscribe(admin, services, **kw), self.loop).result(60)

    def serve(self, path: str, **kw: Any) -> Callable[[], None]:
        server = asyncio.run_coroutine_threadsafe(aio.start_server(path, asyncio_handler, **kw), self.loop).result(10)
        return lambda: asyncio.run_coroutine_threadsafe(server.aclose(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ---------------------------------------------------------------- threads


class BlockingClient:
    def __init__(self, path: str, kw: dict[str, Any]) -> None:
        self.client = sync.connect(path, **kw)

    @property
    def resends(self) -> int:
        return self.client.resends

    @property
    def connections_opened(self) -> int:
        return self.client.connections_opened

    def call(self, service: str, method: str, body: bytes = b"", *, timeout: float | None = None) -> bytes:
        return self.client.call(service, method, body, timeout=timeout)

    def call_many(self, calls: list[tuple[str, str, bytes]], timeout: float) -> list[Outcome]:
        def one(c: tuple[str, str, bytes]) -> Outcome:
            try:
                return self.client.call(*c, timeout=timeout)
            except CallError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(min(len(calls), 64)) as pool:
            return list(pool.map(one, calls))

    def load(self, load: Load, workers: int, method: str = "echo") -> Callable[[], None]:
        def worker() -> None:
            while not load.stopped.is_set():
                body = load.body()
                try:
                    load.record(body, self.client.call("echo", method, body, timeout=20))
                except CallError as exc:
                    load.record(body, exc)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()

        def join() -> None:
            for t in threads:
                t.join(30)

        return join

    def close(self) -> None:
        self.client.close()


class BlockingDriver:
    name = "blocking"

    def client(self, path: str, **kw: Any) -> BlockingClient:
        return BlockingClient(path, kw)

    def subscribe(self, admin: str, services: list[str], **kw: Any) -> dict[str, int]:
        return sync.subscribe(admin, services, **kw)

    def serve(self, path: str, **kw: Any) -> Callable[[], None]:
        server = sync.start_server(path, thread_handler, **{"workers": 16, **kw})
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.close()
            thread.join(10)

        return stop

    def close(self) -> None:
        pass


DRIVERS: dict[str, Callable[[], Any]] = {"trio": TrioDriver, "asyncio": AsyncioDriver, "blocking": BlockingDriver}


@contextmanager
def driver(name: str) -> Iterator[Any]:
    d = DRIVERS[name]()
    try:
        yield d
    finally:
        d.close()
