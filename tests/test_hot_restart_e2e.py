"""End-to-end hot restart under load: 0 failed calls, 0 duplicates.

A caller app and a provider app, each behind its own octoproxy, with many
calls in flight on long-lived SDK connections and new connections arriving
all the time. The caller-side proxy is hot-restarted 5 times and the
provider-side proxy 5 times, back to back. Every call must succeed, and the
provider must see every call id exactly once.
"""

from __future__ import annotations

import itertools
import json
import signal

import pytest
import trio

from e2e import Proc, caller_toml, free_port, provider, provider_toml, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from octoproxy import sdk

pytestmark = pytest.mark.e2e


async def hot_restart(config, workdir, name: str, old: Proc) -> Proc:
    """Start a new generation with --hot-restart; the old one drains and exits by itself."""
    new = await start_process(proxy_argv(config, hot_restart=True), "octoproxy ready", workdir, name)
    with trio.fail_after(15):
        assert await old.process.wait() == 0, old.stderr()[-2000:]
    await stop(old)
    return new


async def test_hot_restart_under_load_loses_nothing() -> None:
    with trio.fail_after(120), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        caller_cfg = d / "caller.toml"
        caller_cfg.write_text(caller_toml(d, [port], drain_time="5.0"))
        prov_cfg = d / "provider.toml"
        prov_cfg.write_text(provider_toml(d, port, app_uds, drain_time="5.0"))
        ids = itertools.count()
        ok = 0
        failures: list[str] = []
        stop_load = trio.Event()
        async with provider(d, app_uds):
            pp = await start_process(proxy_argv(prov_cfg), "octoproxy ready", d, "provider-proxy")
            cp = await start_process(proxy_argv(caller_cfg), "octoproxy ready", d, "caller-proxy")
            try:
                await wait_ready(pp)
                await wait_ready(cp)

                async def worker(client: sdk.Client) -> None:
                    nonlocal ok
                    while not stop_load.is_set():
                        call_id = str(next(ids)).encode()
                        try:
                            got = await client.call("echo", "count", call_id, timeout=20)
                        except sdk.CallError as exc:
                            failures.append(f"{call_id!r}: {exc!r}")
                            continue
                        if got != call_id:
                            failures.append(f"{call_id!r}: wrong body {got!r}")
                        ok += 1

                async def long_lived(n_workers: int) -> None:
                    async with sdk.open_client(d / "caller.sock") as client:
                        async with trio.open_nursery() as n:
                            for _ in range(n_workers):
                                n.start_soon(worker, client)

                async def newcomers() -> None:
                    # new connections keep arriving, each making a few calls
                    while not stop_load.is_set():
                        async with sdk.open_client(d / "caller.sock") as client:
                            for _ in range(5):
                                await worker_once(client)
                        await trio.sleep(0.01)

                async def worker_once(client: sdk.Client) -> None:
                    nonlocal ok
                    call_id = str(next(ids)).encode()
                    try:
                        assert await client.call("echo", "count", call_id, timeout=20) == call_id
                        ok += 1
                    except sdk.CallError as exc:
                        failures.append(f"{call_id!r}: {exc!r}")

                async with trio.open_nursery() as load:
                    load.start_soon(long_lived, 32)
                    load.start_soon(long_lived, 32)
                    load.start_soon(newcomers)
                    await trio.sleep(0.5)
                    for i in range(5):
                        before = ok
                        cp = await hot_restart(caller_cfg, d, f"caller-proxy-{i + 1}", cp)
                        pp = await hot_restart(prov_cfg, d, f"provider-proxy-{i + 1}", pp)
                        await trio.sleep(0.2)
                        assert ok > before, "no progress across a restart"
                    await trio.sleep(0.3)
                    stop_load.set()

                if failures:
                    for f in sorted(d.glob("*.stderr")):
                        print(f"--- {f.name} ---\n{f.read_text(errors='replace')[-4000:]}")
                assert failures == [], failures[:10]
                async with sdk.open_client(d / "caller.sock") as client:
                    seen = json.loads(await client.call("echo", "seen", b""))
                assert seen["duplicates"] == 0
                assert seen["unique"] == ok + 1 - 1  # every successful call reached the provider once
                gen = await cp.metric("octoproxy_hot_restart_generation")
                assert gen == 5
                # counters continue across restarts: the caller side saw every call
                assert await cp.metric('octoproxy_requests_total{direction="outbound",service="echo",method="count",status="OK"}') >= ok
            finally:
                await stop(cp)
                await stop(pp)


async def test_new_process_that_crashes_during_startup_leaves_old_serving() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        caller_cfg = d / "caller.toml"
        # an endpoint that never answers: the new generation can never get warm
        caller_cfg.write_text(caller_toml(d, [port]))
        async with provider(d, app_uds):
            pp = await start_process(proxy_argv(write(d / "p.toml", provider_toml(d, port, app_uds))), "octoproxy ready", d, "pp")
            cp = await start_process(proxy_argv(caller_cfg), "octoproxy ready", d, "cp")
            try:
                await wait_ready(cp)
                async with sdk.open_client(d / "caller.sock") as client:
                    assert await client.call("echo", "echo", b"a") == b"a"
                    # 1: a new process with an invalid config exits at once
                    bad = write(d / "bad.toml", caller_toml(d, [port]) + "\n[nonsense]\nx = 1\n")
                    p = await trio.run_process(proxy_argv(bad, hot_restart=True), check=False, capture_stdout=True, capture_stderr=True)
                    assert p.returncode == 2
                    # 2: a new process that cannot get warm (its upstream is dead) gives up
                    dead = write(d / "dead.toml", caller_toml(d, [free_port()]).replace("[proxy]", "[proxy]\nhot_restart_timeout = 1.0\nhot_restart_uds = \"%s\"" % (d / "caller.sock.hotrestart")))
                    p = await trio.run_process(proxy_argv(dead, hot_restart=True), check=False, capture_stdout=True, capture_stderr=True)
                    assert p.returncode == 1, p.stderr
                    # 3: a new process killed in the middle of its warm-up
                    proc = await trio.lowlevel.open_process(proxy_argv(dead, hot_restart=True))
                    with trio.fail_after(10):  # kill it once it holds the listeners
                        while (await cp.json("/ready"))["hot_restart"]["state"] != "handing_over":  # type: ignore[index]
                            await trio.sleep(0.01)
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    # the old proxy never stopped serving, on the same connection and on new ones
                    assert await client.call("echo", "echo", b"b") == b"b"
                async with sdk.open_client(d / "caller.sock") as client2:
                    assert await client2.call("echo", "echo", b"c") == b"c"
                assert cp.process.returncode is None
                state = await cp.json("/ready")
                assert state["hot_restart"]["state"] == "serving" and state["hot_restart"]["generation"] == 0  # type: ignore[index]
                assert await cp.metric('octoproxy_errors_total{kind="hot_restart_aborted"}') == 2
            finally:
                await stop(cp)
                await stop(pp)


async def test_second_hot_restart_at_once_is_refused() -> None:
    """A third generation is refused while the first still drains.

    Event-driven, not timed: generation 0 is held in its draining state by a
    call the provider does not answer until the test says so, and the test
    sees generation 1 ready and generation 0 draining (its log line, and
    generation 1's ``parent_alive``) before it starts generation 2.
    """
    with trio.fail_after(90), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        # drain_time only bounds the test if the release never comes; the release ends the drain
        caller_cfg = write(d / "caller.toml", caller_toml(d, [port], drain_time="60", shutdown_time="70", route_timeout="80"))
        arrived, release = trio.Event(), trio.Event()

        async def handler(req: sdk.Request) -> bytes:
            if req.method == "hold":
                arrived.set()
                await release.wait()
                return b"released"
            return req.body

        async with trio.open_nursery() as app:
            await app.start(sdk.serve, str(app_uds), handler)
            # the held call may wait long on a loaded machine: no deadline on the provider side either
            prov_cfg = write(d / "p.toml", provider_toml(d, port, app_uds) + "[upstream]\ndefault_timeout = 80\n")
            pp = await start_process(proxy_argv(prov_cfg), "octoproxy ready", d, "pp")
            cp = await start_process(proxy_argv(caller_cfg), "octoproxy ready", d, "cp")
            g1: Proc | None = None
            try:
                await wait_ready(cp)
                async with sdk.open_client(d / "caller.sock") as client, trio.open_nursery() as n:
                    got: list[bytes] = []

                    async def held_call() -> None:
                        got.append(await client.call("echo", "hold", b"", timeout=80))

                    n.start_soon(held_call)
                    with trio.fail_after(20):
                        await arrived.wait()  # in flight through generation 0
                    g1 = await start_process(proxy_argv(caller_cfg, hot_restart=True), "octoproxy ready", d, "g1", timeout=30)
                    with trio.fail_after(30):  # generation 0 drains, with our call in flight
                        while "draining: 1 requests in flight" not in cp.stderr():
                            await trio.sleep(0.02)
                    await wait_ready(g1, timeout=30)
                    state = await g1.json("/ready")
                    hot = state["hot_restart"]  # type: ignore[index]
                    assert hot["generation"] == 1 and hot["parent_alive"], state
                    assert cp.process.returncode is None
                    # generation 0 is still draining: a third generation is refused
                    with trio.fail_after(30):  # a third generation that took over would run on: a failure too
                        p = await trio.run_process(proxy_argv(caller_cfg, hot_restart=True), check=False, capture_stderr=True)
                    assert p.returncode == 1 and b"at most two generations" in p.stderr, p.stderr[-2000:]
                    assert cp.process.returncode is None  # the condition held throughout
                    release.set()
                assert got == [b"released"]
                with trio.fail_after(20):  # released: generation 0 has nothing in flight and exits
                    assert await cp.process.wait() == 0
                with trio.fail_after(10):
                    while (await g1.json("/ready"))["hot_restart"]["parent_alive"]:  # type: ignore[index]
                        await trio.sleep(0.02)
                assert await g1.metric('octoproxy_errors_total{kind="hot_restart_refused"}') == 1
            finally:
                release.set()
                if g1 is not None:
                    await stop(g1)
                await stop(cp)
                await stop(pp)
                app.cancel_scope.cancel()


def write(path, text: str):
    path.write_text(text)
    return path
