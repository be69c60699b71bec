"""What a test of your own app against a real octoproxy mesh looks like.

The app under test is ``greet``: it calls the ``users`` service through its
local proxy and falls back to a generic greeting when that service is slow or
gone. The mesh (control plane, a ``users`` provider behind its proxy, and the
caller's proxy) runs inside the test's own Trio run: see docs/testing.md.

Run it with pytest-trio installed::

    python -m pytest examples/test_with_mesh.py

(It lives in ``examples/``, outside octoproxy's own ``testpaths``; in your
project it would sit in your ``tests/``, with ``trio_mode = true`` or the
``pytest.mark.trio`` marker used below.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from octoproxy import Status, sdk
from octoproxy.testing import Mesh, open_mesh

pytestmark = pytest.mark.trio

USERS = {b"1": b"Ada", b"2": b"Grace"}


# ---------------------------------------------------------------- the app under test


async def greet(client: sdk.Client, user_id: str, *, timeout: float = 2.0) -> str:
    """Greet a user by name; a generic greeting when ``users`` cannot answer."""
    try:
        name = await client.call("users", "get_name", user_id.encode(), timeout=timeout)
    except sdk.CallError as exc:
        if exc.status in (Status.TIMEOUT, Status.UNAVAILABLE, Status.NO_ROUTE):
            return "Hello, guest"
        raise
    return f"Hello, {name.decode()}"


async def users_service(request: sdk.Request) -> bytes:
    """A fake of the ``users`` service, served behind its own proxy in the mesh."""
    try:
        return USERS[request.body]
    except KeyError:
        raise sdk.ApplicationError(f"no user {request.body!r}") from None


# ---------------------------------------------------------------- the tests


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with open_mesh() as mesh:
        yield mesh


async def test_greets_by_name(mesh: Mesh) -> None:
    await mesh.add_provider("users", users_service)
    web = await mesh.add_caller("web")
    with trio.fail_after(10):
        async with web.client(subscribe=["users"]) as client:
            assert await greet(client, "1") == "Hello, Ada"
            with pytest.raises(sdk.CallError) as info:
                await greet(client, "42")
            assert info.value.status == Status.APPLICATION_ERROR


async def test_falls_back_when_users_is_gone(mesh: Mesh) -> None:
    users = await mesh.add_provider("users", users_service)
    web = await mesh.add_caller("web")
    with trio.fail_after(10):
        async with web.client(subscribe=["users"]) as client:
            assert await greet(client, "2") == "Hello, Grace"
            await mesh.kill_proxy(users.proxy)  # like SIGKILL on the provider's proxy
            await web.wait_endpoints("users", 0)
            assert await greet(client, "2") == "Hello, guest"


async def test_survives_a_hot_restart_of_its_proxy(mesh: Mesh) -> None:
    await mesh.add_provider("users", users_service)
    web = await mesh.add_caller("web")
    with trio.fail_after(20):
        async with web.client(subscribe=["users"]) as client:
            async with trio.open_nursery() as nursery:
                greetings: list[str] = []

                async def keep_calling() -> None:
                    for _ in range(200):
                        greetings.append(await greet(client, "1"))

                nursery.start_soon(keep_calling)
                await mesh.hot_restart(web.proxy)  # in-process, through the real hot-restart socket
            assert greetings == ["Hello, Ada"] * 200  # not one fell back


async def test_slow_users_service_times_out_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async def slow_users(request: sdk.Request) -> bytes:
        await trio.sleep(30)  # 30 virtual seconds: no real time passes
        return b"Ada"

    with trio.fail_after(60):
        async with open_mesh() as mesh:
            await mesh.add_provider("users", slow_users)
            web = await mesh.add_caller("web", config={"discovery": {"route_timeout": 1.0}})
            async with web.client(subscribe=["users"]) as client:
                start = trio.current_time()
                assert await greet(client, "1", timeout=5.0) == "Hello, guest"
                assert trio.current_time() - start < 1.5  # the route's 1 s, not the caller's 5 s
