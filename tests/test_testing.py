"""``octoproxy.testing``: the in-process mesh, through its public API only.

Calls through the mesh, providers coming and going, a proxy killed (calls fail
over), an in-process hot restart under load with no failed call, and the same
mesh under pytest-trio's ``autojump_clock`` (a 1 s route timeout in front of a
provider that sleeps 30 s answers TIMEOUT at once, in virtual time).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter

import pytest
import trio
import trio.testing

from octoproxy import Status, sdk
from octoproxy.common._admin import http_request
from octoproxy.testing import HotRestartError, Mesh, Provider, open_mesh


async def echo(request: sdk.Request) -> bytes:
    return request.body


def named(name: str, served: Counter[str]) -> sdk.Handler:
    """A handler that answers with its own name and counts what it served."""

    async def handler(request: sdk.Request) -> bytes:
        served[name] += 1
        return name.encode()

    return handler


async def test_calls_through_the_mesh() -> None:
    with trio.fail_after(30):
        async with open_mesh() as mesh:
            provider = await mesh.add_provider("echo", echo)
            caller = await mesh.add_caller("web")
            assert provider.running and caller.running
            assert provider.address.startswith("127.0.0.1:")
            assert os.path.dirname(caller.outbound) == str(mesh.directory)
            assert len(os.fsencode(caller.outbound)) < 100
            # the provider's proxy registered its app with the control plane
            assert list(mesh.store.view.services["echo"]) == [provider.address]
            async with caller.client(subscribe=["echo"]) as client:
                for i in range(20):
                    body = f"hello {i}".encode()
                    assert await client.call("echo", "m", body, timeout=5) == body
            assert caller.metric('octoproxy_requests_total{direction="outbound",service="echo",method="m",status="OK"') == 20
            assert provider.metric('octoproxy_requests_total{direction="inbound"') == 20
            assert caller.endpoints("echo") == 1
            # the admin API answers like a real proxy's, token included
            assert caller.admin.startswith("127.0.0.1:")
            assert (await http_request(caller.admin, "GET", "/config_dump"))[0] == 401
            assert (await http_request(caller.admin, "GET", "/config_dump", token=caller.admin_token))[0] == 200
        assert not mesh.directory.exists()


async def test_provider_added_and_removed() -> None:
    served: Counter[str] = Counter()
    failures: list[str] = []
    with trio.fail_after(60):
        async with open_mesh() as mesh:
            a = await mesh.add_provider("echo", named("a", served))
            caller = await mesh.add_caller("web")
            async with caller.client(subscribe=["echo"]) as client:
                assert await client.call("echo", "m", timeout=5) == b"a"
                b = await mesh.add_provider("echo", named("b", served))
                assert b.name == "echo-2"
                assert sorted(mesh.store.view.services["echo"]) == sorted([a.address, b.address])
                await caller.wait_endpoints("echo", 2)
                for _ in range(40):
                    await client.call("echo", "m", timeout=5)
                assert served["a"] > 0 and served["b"] > 0

                # a goes away gracefully while calls keep coming: none fails
                stop = trio.Event()

                async def load() -> None:
                    while not stop.is_set():
                        try:
                            await client.call("echo", "m", timeout=5)
                        except sdk.CallError as exc:
                            failures.append(repr(exc))
                        await trio.sleep(0.001)

                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(load)
                    await trio.sleep(0.1)
                    await mesh.remove_provider(a)
                    await caller.wait_endpoints("echo", 1)
                    await trio.sleep(0.1)
                    stop.set()
                assert failures == []
                assert not a.running and not a.app_running
                assert list(mesh.store.view.services["echo"]) == [b.address]  # deregistered at once
                before = served["a"]
                for _ in range(10):
                    assert await client.call("echo", "m", timeout=5) == b"b"
                assert served["a"] == before


async def test_killed_proxy_calls_fail_over() -> None:
    served: Counter[str] = Counter()
    with trio.fail_after(60):
        async with open_mesh(lease_ttl=1.0) as mesh:
            a = await mesh.add_provider("echo", named("a", served))
            await mesh.add_provider("echo", named("b", served))
            caller = await mesh.add_caller("web")
            async with caller.client(subscribe=["echo"]) as client:
                await caller.wait_endpoints("echo", 2)
                for _ in range(20):
                    await client.call("echo", "m", timeout=5)
                assert served["a"] and served["b"]

                await mesh.kill_proxy(a.proxy)
                assert not a.running and a.app_running  # the app is still there, its proxy is not
                # calls that raced the connection reset may fail UNAVAILABLE; nothing else
                for _ in range(20):
                    try:
                        assert await client.call("echo", "m", timeout=5) == b"b"
                    except sdk.CallError as exc:
                        assert exc.status == Status.UNAVAILABLE
                await caller.wait_endpoints("echo", 1)
                before = served["a"]
                for _ in range(30):
                    assert await client.call("echo", "m", timeout=5) == b"b"
                assert served["a"] == before

                # like SIGKILL: no deregistration; the lease expires instead
                assert a.address in mesh.store.view.services["echo"]
                with trio.fail_after(5):
                    while a.address in mesh.store.view.services["echo"]:
                        await trio.sleep(0.05)

                with pytest.raises(ValueError):
                    await mesh.hot_restart(a)  # not running
                # a supervisor would start it again: it re-registers and takes traffic
                await mesh.restart_proxy(a)
                assert a.running and a.generation == 0
                await caller.wait_endpoints("echo", 2)
                seen = {await client.call("echo", "m", timeout=5) for _ in range(20)}
                assert seen == {b"a", b"b"}


async def test_hot_restart_under_load_loses_nothing() -> None:
    ids = itertools.count()
    seen: Counter[bytes] = Counter()
    ok = 0
    failures: list[str] = []

    async def counting(request: sdk.Request) -> bytes:
        seen[request.body] += 1
        await trio.sleep(0.002)  # keep calls in flight across the hand-over
        return request.body

    with trio.fail_after(90):
        async with open_mesh() as mesh:
            provider = await mesh.add_provider("echo", counting)
            caller = await mesh.add_caller("web")
            stop = trio.Event()

            async def worker(client: sdk.Client) -> None:
                nonlocal ok
                while not stop.is_set():
                    call_id = str(next(ids)).encode()
                    try:
                        got = await client.call("echo", "count", call_id, timeout=20)
                    except sdk.CallError as exc:
                        failures.append(f"{call_id!r}: {exc!r}")
                        continue
                    if got != call_id:
                        failures.append(f"{call_id!r}: wrong body {got!r}")
                    ok += 1

            async def long_lived(workers: int) -> None:
                async with caller.client(subscribe=["echo"]) as client, trio.open_nursery() as n:
                    for _ in range(workers):
                        n.start_soon(worker, client)

            async def newcomers() -> None:
                while not stop.is_set():
                    async with caller.client() as client:
                        for _ in range(3):
                            await worker_once(client)
                    await trio.sleep(0.005)

            async def worker_once(client: sdk.Client) -> None:
                nonlocal ok
                call_id = str(next(ids)).encode()
                try:
                    assert await client.call("echo", "count", call_id, timeout=20) == call_id
                    ok += 1
                except sdk.CallError as exc:
                    failures.append(f"{call_id!r}: {exc!r}")

            async with trio.open_nursery() as load:
                load.start_soon(long_lived, 16)
                load.start_soon(newcomers)
                await trio.sleep(0.3)
                for i in range(3):
                    before = ok
                    old = caller.proxy
                    new = await mesh.hot_restart(caller.proxy)
                    assert new is caller.proxy and new is not old
                    assert new.generation == i + 1
                    await mesh.hot_restart(provider)
                    await trio.sleep(0.2)
                    assert ok > before, "no progress across a restart"
                stop.set()

            assert failures == [], failures[:10]
            assert ok > 200
            assert all(n == 1 for n in seen.values()), "a call reached the provider twice"
            assert len(seen) == ok
            assert caller.generation == 3 and provider.generation == 3
            assert caller.metric("octoproxy_hot_restart_generation") == 3
            assert caller.metric("octoproxy_hot_restart_parent_alive") == 0
            # counters continue across the restarts
            assert caller.metric('octoproxy_requests_total{direction="outbound",service="echo",method="count",status="OK"}') >= ok


async def test_timeout_under_autojump_clock(autojump_clock: trio.testing.MockClock) -> None:
    """A provider that sleeps 30 s behind a 1 s route timeout: TIMEOUT, at once, in virtual time."""

    async def slow(request: sdk.Request) -> bytes:
        await trio.sleep(30)
        return request.body

    real_start = time.monotonic()
    with trio.fail_after(60):  # virtual seconds
        async with open_mesh() as mesh:
            await mesh.add_provider("slow", slow)
            await mesh.add_provider("echo", echo)
            caller = await mesh.add_caller("web", config={"discovery": {"route_timeout": 1.0}})
            async with caller.client(subscribe=["slow", "echo"]) as client:
                assert await client.call("echo", "m", b"x") == b"x"
                start = trio.current_time()
                with pytest.raises(sdk.CallError) as info:
                    await client.call("slow", "m", b"x")
                assert info.value.status == Status.TIMEOUT
                assert 1.0 - 1e-6 <= trio.current_time() - start < 1.5  # virtual seconds: float sums (0.13 + 1.0 - 0.13 < 1.0)
    assert time.monotonic() - real_start < 10, "virtual time should make this fast"


async def test_mesh_under_autojump_clock_restarts_kills_and_expires_leases(autojump_clock: trio.testing.MockClock) -> None:
    served: Counter[str] = Counter()
    real_start = time.monotonic()
    with trio.fail_after(120):  # virtual seconds
        async with open_mesh(lease_ttl=10.0) as mesh:
            a = await mesh.add_provider("echo", named("a", served))
            b = await mesh.add_provider("echo", named("b", served))
            caller = await mesh.add_caller("web")
            async with caller.client(subscribe=["echo"]) as client:
                await caller.wait_endpoints("echo", 2)
                await mesh.hot_restart(caller)
                await mesh.hot_restart(b)
                for _ in range(20):
                    await client.call("echo", "m", timeout=5)
                assert served["a"] and served["b"]
                await mesh.kill_proxy(a)
                await caller.wait_endpoints("echo", 1)
                # its session closed with it: the lease dies lease_grace (2 s) later, not after its 10 s TTL
                start = trio.current_time()
                while a.address in mesh.store.view.services.get("echo", {}):
                    await trio.sleep(0.1)
                assert 1.5 < trio.current_time() - start <= 3.5
                for _ in range(10):
                    assert await client.call("echo", "m", timeout=5) == b"b"
    assert time.monotonic() - real_start < 20


async def test_errors_propagate_unwrapped_and_everything_is_torn_down() -> None:
    mesh_ref: list[Mesh] = []
    with trio.fail_after(30):
        with pytest.raises(AssertionError, match="boom"):
            async with open_mesh() as mesh:
                mesh_ref.append(mesh)
                p = await mesh.add_provider("echo", echo)
                await mesh.add_caller("web")
                raise AssertionError("boom")
    mesh = mesh_ref[0]
    assert not mesh.directory.exists()
    assert all(not node.running for node in mesh.nodes.values())
    assert isinstance(p, Provider) and not p.app_running


async def test_bad_config_and_names() -> None:
    from octoproxy import ConfigError

    with trio.fail_after(30):
        async with open_mesh() as mesh:
            with pytest.raises(ConfigError):
                await mesh.add_caller("web", config={"upstream": {"connect_timeout": "x"}})
            assert mesh.nodes == {}
            caller = await mesh.add_caller("web", config={"discovery": None, "routes": [], "clusters": {}})
            assert caller.proxy.discovery is None
            with pytest.raises(ValueError):
                await mesh.kill_proxy(caller.proxy.__class__(caller.config))  # not one of ours
            await mesh.stop_proxy(caller)
            assert not caller.running
            # an old generation is not a target any more
            await mesh.restart_proxy(caller)
            old = caller.proxy
            await mesh.hot_restart(caller)
            with pytest.raises(ValueError):
                await mesh.kill_proxy(old)


async def test_hot_restart_refused_while_the_parent_drains() -> None:
    release = trio.Event()

    async def held(request: sdk.Request) -> bytes:
        await release.wait()
        return request.body

    with trio.fail_after(30):
        async with open_mesh(drain_time=5.0) as mesh:
            await mesh.add_provider("held", held)
            caller = await mesh.add_caller("web")
            async with caller.client(subscribe=["held"]) as client, trio.open_nursery() as n:
                results: list[bytes] = []

                async def call() -> None:
                    results.append(await client.call("held", "m", b"1", timeout=10))

                n.start_soon(call)
                await trio.sleep(0.1)
                old = caller.proxy
                # the call in flight keeps generation 0 draining
                new = await mesh.hot_restart(caller, wait=False)
                assert new.parent_alive
                with pytest.raises(HotRestartError, match="refused"):
                    await mesh.hot_restart(caller)  # two generations at most
                assert caller.proxy is new and caller.running
                release.set()
            assert results == [b"1"]
            with trio.fail_after(10):
                while new.parent_alive:
                    await trio.sleep(0.01)
            assert old.drained.is_set()
            await mesh.hot_restart(caller)
            assert caller.generation == 2


async def test_failed_hot_restart_leaves_the_old_generation_serving() -> None:
    with trio.fail_after(30):
        async with open_mesh() as mesh:
            await mesh.add_provider("echo", echo)
            caller = await mesh.add_caller("web")
            async with caller.client(subscribe=["echo"]) as client:
                assert await client.call("echo", "m", b"1", timeout=5) == b"1"
                old = caller.proxy
                # an "upgrade" to a configuration that cannot get ready: a cluster nobody serves
                bad = {
                    "proxy": {"hot_restart_timeout": 0.5},
                    "routes": [{"service": "nowhere", "cluster": "nowhere"}],
                    "clusters": {"nowhere": {"endpoints": [{"address": "127.0.0.1:1"}]}},
                }
                with pytest.raises(HotRestartError, match="not ready"):
                    await mesh.hot_restart(caller, config=bad)
                assert caller.proxy is old and caller.running and caller.generation == 0
                assert "nowhere" not in caller.config.clusters  # rolled back: the old configuration
                assert await client.call("echo", "m", b"2", timeout=5) == b"2"
                assert caller.metric('octoproxy_errors_total{kind="hot_restart_aborted"}') == 1
                # the next (good) one goes through
                await mesh.hot_restart(caller)
                assert caller.generation == 1
                assert await client.call("echo", "m", b"3", timeout=5) == b"3"
