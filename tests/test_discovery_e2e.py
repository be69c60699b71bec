"""End-to-end discovery: a real control plane, proxies that register and
subscribe on demand, providers coming and going, the control plane killed."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import trio

from e2e import Load, Proc, free_port, provider, proxy_argv, short_tmpdir, start_process, stop
from octoproxy import Status, sdk

pytestmark = pytest.mark.e2e


def cp_argv(port: int, d: Path) -> list[str]:
    """A control plane with its state (operator token, CA, snapshot with the join tokens) in ``d/cp-state``."""
    return [
        sys.executable, "-m", "octoproxy", "control-plane", "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
        "--admin", "127.0.0.1:0", "--state-dir", str(d / "cp-state"),
    ]


async def join_token(d: Path, cp: Proc, service: str) -> Path:
    """A join token of ``service``, made with ``octoproxy ctl token create`` (once per service)."""
    path = d / f"{service}.token"
    if not path.exists():
        argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{cp.admin}",
                "--state-dir", str(d / "cp-state"), "token", "create", "--service", service]
        with trio.fail_after(20):
            out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
        path.write_bytes(out.stdout)
        path.chmod(0o600)
    return path


def _token_line(d: Path, service: str) -> str:
    return f'join_token_file = "{d / (service + ".token")}"'


def caller_cfg(d: Path, cp_port: int, extra: str = "") -> Path:
    path = d / "caller.toml"
    path.write_text(
        f"""
[proxy]
service = "caller-app"
drain_time = 2.0
shutdown_time = 4.0
[outbound]
uds = "{d}/caller.sock"
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.5
[discovery]
control_plane = ["ws://127.0.0.1:{cp_port}/v1/discovery"]
subscribe_timeout = 3.0
{_token_line(d, "caller-app")}
{extra}
"""
    )
    return path


def provider_cfg(d: Path, name: str, service: str, cp_port: int, port: int) -> Path:
    path = d / f"{name}.toml"
    path.write_text(
        f"""
[proxy]
service = "{service}"
drain_time = 2.0
shutdown_time = 4.0
[outbound]
uds = "{d}/{name}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{d}/{name}-app.sock"
[admin]
listen = "127.0.0.1:0"
[discovery]
control_plane = ["ws://127.0.0.1:{cp_port}/v1/discovery"]
lease_ttl = 2.0
{_token_line(d, service)}
"""
    )
    return path


async def get_json(p: Proc, path: str) -> dict:  # type: ignore[type-arg]
    return await p.json(path)  # type: ignore[return-value]


async def until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(0.05)


async def test_discovery_end_to_end() -> None:
    with trio.fail_after(120), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        for service in ("caller-app", "echo", "echo2"):
            await join_token(d, cp, service)
        procs: list[Proc] = [cp]
        try:
            async with provider(d, d / "pa-app.sock", "app-a"), provider(d, d / "pb-app.sock", "app-b"), provider(d, d / "pc-app.sock", "app-c"):
                pa = await start_process(proxy_argv(provider_cfg(d, "pa", "echo", cp_port, free_port())), "octoproxy ready", d, "pa")
                procs.append(pa)
                ccfg = caller_cfg(d, cp_port)
                caller = await start_process(proxy_argv(ccfg), "octoproxy ready", d, "caller")
                procs.append(caller)

                # the SDK subscribes on start; answered once the endpoints are held
                counts = await sdk.subscribe(caller.admin, ["echo"], timeout=5)
                assert counts == {"echo": 1}
                state = await get_json(caller, "/ready")
                assert state["discovery"]["subscriptions"] == ["echo"]
                assert json.loads((d / "caller.sock.subscriptions.json").read_text()) == {"services": ["echo"]}

                load = Load(b"x")

                async with sdk.open_client(d / "caller.sock") as client, trio.open_nursery() as n:
                    for _ in range(8):
                        n.start_soon(load.worker, client)
                    await trio.sleep(0.5)
                    # a second provider comes: traffic spreads over both
                    pb_ = await start_process(proxy_argv(provider_cfg(d, "pb", "echo", cp_port, free_port())), "octoproxy ready", d, "pb")
                    procs.append(pb_)

                    async def both_serve() -> bool:
                        return await pb_.metric("octoproxy_requests_total{direction=\"inbound\"") > 10

                    await until(both_serve)
                    # provider a goes away gracefully: STOPPING, then deregistered; no call fails
                    pa.process.send_signal(signal.SIGTERM)
                    with trio.fail_after(10):
                        assert await pa.process.wait() == 0
                    await trio.sleep(0.5)
                    # the control plane dies: the proxies keep serving with what they know
                    cp.process.send_signal(signal.SIGKILL)
                    await cp.process.wait()

                    async def cp_down() -> bool:
                        return not (await get_json(caller, "/ready"))["discovery"]["control_plane"]["connected"]

                    await until(cp_down)
                    before = load.ok
                    await trio.sleep(1.0)
                    assert load.ok > before
                    assert await caller.metric("octoproxy_control_plane_connected") == 0
                    # it comes back (its snapshot in the state dir keeps the join tokens): providers re-register, proxies resubscribe
                    cp2 = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp2")
                    procs.append(cp2)

                    async def cp_up() -> bool:
                        return bool((await get_json(caller, "/ready"))["discovery"]["control_plane"]["connected"])

                    await until(cp_up)
                    await trio.sleep(1.0)
                    load.stop()
                assert load.failures == [], load.failures[:5]
                assert load.ok > 100
                clusters = await get_json(caller, "/clusters")
                assert [e["address"] for e in clusters["echo"]["endpoints"]] == [pb_.addresses["inbound"]]

                # lazy subscription: a call to a service nobody subscribed to
                pc = await start_process(proxy_argv(provider_cfg(d, "pc", "echo2", cp_port, free_port())), "octoproxy ready", d, "pc")
                procs.append(pc)
                # let it register: with mTLS it first obtains its certificate from the control plane

                async def pc_registered() -> bool:
                    return bool((await get_json(pc, "/ready")).get("discovery", {}).get("registered"))

                await until(pc_registered)
                await trio.sleep(0.3)
                async with sdk.open_client(d / "caller.sock") as client:
                    assert await client.call("echo2", "echo", b"lazy", timeout=5) == b"lazy"
                    with pytest.raises(sdk.CallError) as info:
                        await client.call("nobody", "x", b"", timeout=10)
                    assert info.value.status == Status.NO_ROUTE

                # restart the caller proxy: its subscriptions come back from the file before it is ready
                await stop(caller)
                caller = await start_process(proxy_argv(ccfg), "octoproxy ready", d, "caller-2")
                procs.append(caller)
                state = await get_json(caller, "/ready")
                assert set(state["discovery"]["subscriptions"]) == {"echo", "echo2", "nobody"}
                async with sdk.open_client(d / "caller.sock") as client:
                    assert await client.call("echo", "echo", b"again", timeout=5) == b"again"
        finally:
            for p in procs:
                await stop(p)


async def test_idle_subscriptions_are_dropped_and_persisted() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        for service in ("caller-app", "echo", "echo2"):
            await join_token(d, cp, service)
        caller = await start_process(proxy_argv(caller_cfg(d, cp_port, "idle_unsubscribe = 0.5")), "octoproxy ready", d, "caller")
        try:
            await sdk.subscribe(caller.admin, ["a", "b"], timeout=3)

            async def dropped() -> bool:
                return (await get_json(caller, "/ready"))["discovery"]["subscriptions"] == []

            await until(dropped)

            async def persisted() -> bool:  # saved off the event loop, after the drop: poll (bounded by until)
                path = d / "caller.sock.subscriptions.json"
                return path.exists() and json.loads(path.read_text() or "null") == {"services": []}

            await until(persisted)
        finally:
            await stop(caller)
            await stop(cp)


async def test_sdk_subscribe_retries_until_the_proxy_is_up() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        cp_port = free_port()
        admin_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        for service in ("caller-app", "echo", "echo2"):
            await join_token(d, cp, service)
        cfg = caller_cfg(d, cp_port)
        cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{admin_port}"'))
        procs = [cp]
        try:
            async with trio.open_nursery() as n:

                async def start_later() -> None:
                    await trio.sleep(1.0)
                    procs.append(await start_process(proxy_argv(cfg), "octoproxy ready", d, "caller"))

                n.start_soon(start_later)
                counts = await sdk.subscribe(f"127.0.0.1:{admin_port}", ["svc"], timeout=2, retry_for=20)
                assert counts == {"svc": 0}  # held as absent: nobody registered it yet
        finally:
            for p in procs:
                await stop(p)


async def test_hot_restart_keeps_registration_and_subscriptions() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        for service in ("caller-app", "echo", "echo2"):
            await join_token(d, cp, service)
        procs = [cp]
        try:
            async with provider(d, d / "pa-app.sock", "app-a"):
                pcfg = provider_cfg(d, "pa", "echo", cp_port, free_port())
                pa = await start_process(proxy_argv(pcfg), "octoproxy ready", d, "pa")
                procs.append(pa)
                ccfg = caller_cfg(d, cp_port)
                caller = await start_process(proxy_argv(ccfg), "octoproxy ready", d, "caller")
                procs.append(caller)
                await sdk.subscribe(caller.admin, ["echo"], timeout=5)
                async with sdk.open_client(d / "caller.sock") as client:
                    assert await client.call("echo", "echo", b"1") == b"1"
                    # provider side: the new generation takes over the registration
                    pa2 = await start_process(proxy_argv(pcfg, hot_restart=True), "octoproxy ready", d, "pa2")
                    procs.append(pa2)
                    with trio.fail_after(10):
                        assert await pa.process.wait() == 0
                    # caller side: the new generation inherits the subscriptions
                    caller2 = await start_process(proxy_argv(ccfg, hot_restart=True), "octoproxy ready", d, "caller2")
                    procs.append(caller2)
                    with trio.fail_after(10):
                        assert await caller.process.wait() == 0
                    state = await get_json(caller2, "/ready")
                    assert state["discovery"]["subscriptions"] == ["echo"]
                    await trio.sleep(5)  # more than two lease TTLs: the registration must still be there
                    clusters = await get_json(caller2, "/clusters")
                    assert len(clusters["echo"]["endpoints"]) == 1
                    assert await client.call("echo", "echo", b"2") == b"2"
        finally:
            for p in procs:
                await stop(p)


async def test_proxies_over_a_tls_control_plane() -> None:
    """``--tls``: proxies verify the control plane with its CA (``discovery.ca_file``) and authenticate by join token."""
    with trio.fail_after(60), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process([*cp_argv(cp_port, d), "--tls"], "octoproxy control-plane ready", d, "cp")
        assert cp.addresses.get("tls") == "1"
        procs = [cp]
        try:
            for service in ("caller-app", "echo"):
                await join_token(d, cp, service)
            tls = f'ca_file = "{d / "cp-state" / "ca.crt"}"\n'
            wss = (f'ws://127.0.0.1:{cp_port}/v1/discovery', f'wss://127.0.0.1:{cp_port}/v1/discovery')
            async with provider(d, d / "pa-app.sock", "app-a"):
                pcfg = provider_cfg(d, "pa", "echo", cp_port, free_port())
                pcfg.write_text(pcfg.read_text().replace(*wss) + tls)
                pa = await start_process(proxy_argv(pcfg), "octoproxy ready", d, "pa")
                procs.append(pa)

                async def pa_registered() -> bool:  # with mTLS it first obtains its certificate
                    return bool((await get_json(pa, "/ready")).get("discovery", {}).get("registered"))

                await until(pa_registered)
                ccfg = caller_cfg(d, cp_port, tls)
                ccfg.write_text(ccfg.read_text().replace(*wss))
                caller = await start_process(proxy_argv(ccfg), "octoproxy ready", d, "caller")
                procs.append(caller)
                assert await sdk.subscribe(caller.admin, ["echo"], timeout=5) == {"echo": 1}
                async with sdk.open_client(d / "caller.sock") as client:
                    assert await client.call("echo", "echo", b"tls") == b"tls"
        finally:
            for p in procs:
                await stop(p)
