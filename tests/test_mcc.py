"""Configuration for apps, end to end (issue 13 item 3): real control-plane and proxy processes.

A change is seen by watchers in all three SDK front ends; an app starts with
the persisted configuration while the control plane is down; a gradual
release reaches about the requested share of instances and only them, stays
sticky as it grows, and is promoted or rolled back; a service's proxy cannot
read another service's configuration; writes need the operator; hostile
input (huge values, many keys, crafted persisted files) is refused and costs
nothing. Loopback only, real clock, every wait bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e import Proc, free_port, proxy_argv, short_tmpdir, start_process, stop
from test_cp_trust import cp  # noqa: F401 (fixture: an in-process control plane)
from test_discovery_e2e import cp_argv, join_token
from test_etcd import etcd_bin, etcd_single  # noqa: F401 (fixtures)

from octoproxy.discovery import _appconfig as core
from octoproxy import sdk
from octoproxy.common._admin import http_request
from octoproxy.discovery._xds_client import TYPE_APPCONFIG
from octoproxy.controlplane import DiscoveryClient
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb
from octoproxy.proxy import _appconfig as proxy_appconfig
from octoproxy.sdk import aio, sync

pytestmark = pytest.mark.e2e


def app_cfg(d: Path, cp_port: int, name: str = "app", service: str = "app", extra: str = "") -> Path:
    path = d / f"{name}.toml"
    path.write_text(
        f"""
[proxy]
service = "{service}"
drain_time = 1.0
shutdown_time = 2.0
[outbound]
uds = "{d}/{name}.sock"
[admin]
listen = "127.0.0.1:0"
[discovery]
control_plane = ["ws://127.0.0.1:{cp_port}/v1/discovery"]
join_token_file = "{d / (service + '.token')}"
{extra}
"""
    )
    return path


def operator(d: Path) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {(d / 'cp-state' / 'operator.token').read_text().strip()}")]


async def api(cp: Proc, d: Path, method: str, path: str, body: Any = None, want: int = 200) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    status, _h, reply = await http_request(cp.admin, method, path, data, headers=operator(d), timeout=10)
    assert status == want, reply
    return json.loads(reply)


async def ctl(d: Path, cp: Proc, *args: str, ok: bool = True) -> str:
    argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{cp.admin}",
            "--state-dir", str(d / "cp-state"), "config", *args]  # fmt: skip
    with trio.fail_after(30):
        out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert (out.returncode == 0) == ok, (out.stdout + out.stderr).decode()
    return (out.stdout + out.stderr).decode()


async def until(pred: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(0.05)


async def served(p: Proc) -> dict[str, Any]:
    status, body = await p.get("/config")
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- watchers in every front end
async def test_a_change_is_seen_by_watchers_in_every_sdk() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        procs = [cp]
        try:
            await join_token(d, cp, "app")
            out = await ctl(d, cp, "set", "app", "greeting", "hello")
            assert "+ greeting = 'hello'" in out and "stable version 1" in out
            app = await start_process(proxy_argv(app_cfg(d, cp_port)), "octoproxy ready", d, "app")
            procs.append(app)
            await until(lambda: _version_is(app, "1"))
            admin = app.admin

            seen: dict[str, list[tuple[str, str]]] = {"trio": [], "asyncio": [], "blocking": []}

            async def trio_watcher() -> None:
                async for c in sdk.watch_config(admin, poll=5):
                    seen["trio"].append((c.version, c.values.get("greeting", "")))
                    if len(seen["trio"]) == 2:
                        return

            def asyncio_watcher() -> None:
                async def run() -> None:
                    watcher = aio.watch_config(admin, poll=5)
                    async for c in watcher:
                        seen["asyncio"].append((c.version, c.values.get("greeting", "")))
                        if len(seen["asyncio"]) == 2:
                            break
                    await watcher.aclose()  # type: ignore[attr-defined]

                asyncio.run(asyncio.wait_for(run(), 30))

            def blocking_watcher() -> None:
                for c in sync.watch_config(admin, poll=5):
                    seen["blocking"].append((c.version, c.values.get("greeting", "")))
                    if len(seen["blocking"]) == 2:
                        return

            threads = [threading.Thread(target=f, daemon=True) for f in (asyncio_watcher, blocking_watcher)]
            async with trio.open_nursery() as n:
                n.start_soon(trio_watcher)
                for t in threads:
                    t.start()
                await until(lambda: _all_have(seen, 1), 20)
                assert all(v == [("1", "hello")] for v in seen.values()), seen
                await ctl(d, cp, "set", "app", "greeting", "bonjour")
            for t in threads:
                await trio.to_thread.run_sync(t.join, 20)
            assert all(v == [("1", "hello"), ("2", "bonjour")] for v in seen.values()), seen
            # get_config in every front end, and the local API
            assert (await sdk.get_config(admin)).values == {"greeting": "bonjour"}
            assert (await trio.to_thread.run_sync(sync.get_config, admin)).version == "2"
            assert (await trio.to_thread.run_sync(lambda: asyncio.run(aio.get_config(admin)))).source == "control-plane"
            got = json.loads(await ctl(d, cp, "get", "app"))
            assert (got["values"], got["stable"]) == ({"greeting": "bonjour"}, "2")
            ready = await app.json("/ready")
            assert ready["discovery"]["app_config"] == {"name": "app.default", "version": "2", "source": "control-plane"}  # type: ignore[index]
            status, body = await app.get("/config?watch=2&timeout=0.2")  # unchanged: answered after the timeout
            assert status == 200 and json.loads(body)["version"] == "2"
            for bad in ("/config?watch=x", "/config?watch=1&timeout=600", "/config?watch=1&timeout=nan"):
                assert (await app.get(bad))[0] == 400, bad
        finally:
            for p in procs:
                await stop(p)


async def _version_is(p: Proc, version: str) -> bool:
    return (await served(p))["version"] == version


async def _all_have(seen: dict[str, list[Any]], n: int) -> bool:
    return all(len(v) >= n for v in seen.values())


# ---------------------------------------------------------------- persisted, control plane down
async def test_an_app_starts_with_the_persisted_configuration_while_the_control_plane_is_down() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        procs = [cp]
        try:
            await join_token(d, cp, "app")
            values = {"db.url": "postgres://db/app", "limits": json.dumps({"rps": 100})}
            (d / "v.json").write_text(json.dumps({"db.url": values["db.url"], "limits": {"rps": 100}}))
            assert "(dry run: nothing changed)" in await ctl(d, cp, "put", "app", str(d / "v.json"), "--dry-run")
            assert (await api(cp, d, "GET", "/v1/config?service=app"))["history"] == []
            await ctl(d, cp, "put", "app", str(d / "v.json"))
            app = await start_process(proxy_argv(app_cfg(d, cp_port)), "octoproxy ready", d, "app")
            procs.append(app)
            await until(lambda: _version_is(app, "1"))
            persisted = d / "app.sock.appconfig.json"
            await until(lambda: _exists(persisted))
            assert stat.S_IMODE(persisted.stat().st_mode) == 0o600
            await stop(app)
            await stop(cp)  # the control plane is down from here on
            app2 = await start_process(proxy_argv(app_cfg(d, cp_port)), "octoproxy ready", d, "app2")
            procs.append(app2)
            got = await trio.to_thread.run_sync(lambda: sync.get_config(app2.admin))
            assert (got.version, got.values, got.source) == ("1", values, "file")
            assert got.json("limits") == {"rps": 100}
        finally:
            for p in procs:
                await stop(p)


async def _exists(path: Path) -> bool:
    return path.exists()


# ---------------------------------------------------------------- gradual release, rollback, isolation
async def _resolved(clients: dict[str, DiscoveryClient], name: str) -> dict[str, str]:
    out = {}
    for node, c in clients.items():
        held = c.held(TYPE_APPCONFIG).get(name)
        out[node] = held.version if held is not None else ""  # type: ignore[attr-defined]
    return out


async def test_gradual_release_promote_rollback_and_isolation() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        try:
            token = (await join_token(d, cp, "app")).read_text().strip()
            other = (await join_token(d, cp, "other")).read_text().strip()
            url = f"ws://127.0.0.1:{cp_port}/v1/discovery"
            await api(cp, d, "POST", "/v1/config/put", {"service": "app", "values": {"color": "blue"}})
            await api(cp, d, "POST", "/v1/config/put", {"service": "app", "values": {"color": "green"}, "percent": 0})
            n = 40
            nodes = [f"app-{i}" for i in range(n)]
            async with trio.open_nursery() as nursery:
                clients = {}
                for node in nodes:
                    c = DiscoveryClient([url], node, token=token, backoff=(0.05, 0.2), connect_timeout=5.0)
                    nursery.start_soon(c.run)
                    clients[node] = c
                for c in clients.values():
                    await c.subscribe(["app.default"], timeout=20, types=(TYPE_APPCONFIG,))
                assert set((await _resolved(clients, "app.default")).values()) == {"1"}

                async def share(percent: int) -> set[str]:
                    await api(cp, d, "POST", "/v1/config/release", {"service": "app", "version": 2, "percent": percent})
                    expected = {x for x in nodes if core.in_release("app", "default", x, percent)}

                    async def arrived() -> bool:
                        got = await _resolved(clients, "app.default")
                        return {x for x, v in got.items() if v == "2"} == expected and all(v in "12" for v in got.values())

                    await until(arrived)
                    return expected

                s10, s25, s50 = await share(10), await share(25), await share(50)
                assert s10 <= s25 <= s50  # an instance stays in as the percentage grows
                assert 0.25 * n - 7 <= len(s25) <= 0.25 * n + 7 and 0.5 * n - 9 <= len(s50) <= 0.5 * n + 9, (len(s25), len(s50))
                out = await ctl(d, cp, "promote", "app")
                assert "stable version 2" in out

                async def all_at(version: str) -> bool:
                    return set((await _resolved(clients, "app.default")).values()) == {version}

                await until(lambda: all_at("2"))
                out = await ctl(d, cp, "rollback", "app", "1")
                assert "~ color: 'green' -> 'blue'" in out and "stable version 3" in out
                await until(lambda: all_at("3"))
                held = clients[nodes[0]].held(TYPE_APPCONFIG)["app.default"]
                assert dict(held.values) == {"color": "blue"}  # type: ignore[attr-defined]
                history = await ctl(d, cp, "history", "app")
                assert history.splitlines()[0].split()[0] == "3" and "rollback to 1" in history and "Z " in history

                # a service's proxy cannot read another service's configuration
                spy = DiscoveryClient([url], "spy", token=other, backoff=(0.05, 0.2), connect_timeout=5.0)
                nursery.start_soon(spy.run)
                await spy.subscribe(["app.default"], timeout=10, types=(TYPE_APPCONFIG,))
                assert spy.is_absent("app.default", TYPE_APPCONFIG)
                assert spy.held(TYPE_APPCONFIG) == {}
                nursery.cancel_scope.cancel()
        finally:
            await stop(cp)
        assert "permission denied: configuration of 'app'" in cp.stderr()


async def test_writes_need_the_operator_and_limits_hold() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        try:
            token = (await join_token(d, cp, "app")).read_text().strip()
            body = json.dumps({"service": "app", "set": {"k": "v"}}).encode()
            for headers, want in (([], 401), ([("Authorization", "Bearer nope")], 401), ([("Authorization", f"Bearer {token}")], 403)):
                status, _h, _b = await http_request(cp.admin, "POST", "/v1/config/set", body, headers=headers)
                assert status == want
                status, _h, _b = await http_request(cp.admin, "GET", "/v1/config?service=app", headers=headers)
                assert status == want
            # hostile writes: refused with the limit named, nothing stored
            huge = {"service": "app", "set": {"k": "x" * (core.MAX_VALUE_BYTES + 1)}}
            assert "allowed per key" in (await api(cp, d, "POST", "/v1/config/set", huge, want=400))["error"]
            many = {"service": "app", "values": {f"k{i}": "v" for i in range(core.MAX_KEYS + 1)}}
            assert "keys" in (await api(cp, d, "POST", "/v1/config/put", many, want=400))["error"]
            total = {"service": "app", "values": {f"k{i}": "x" * 60000 for i in range(5)}}
            assert "per service" in (await api(cp, d, "POST", "/v1/config/put", total, want=400))["error"]
            bad = [{"service": "app", "values": {"../x y": "v"}}, {"service": "app", "values": {"k": 1}},
                   {"service": "a/b", "values": {}}, {"service": "app", "env": "a.b", "values": {}},
                   {"service": "app", "values": {"k": "v"}, "percent": 101}]  # fmt: skip
            for b in bad:
                await api(cp, d, "POST", "/v1/config/put", b, want=400)
            await api(cp, d, "POST", "/v1/config/release", {"service": "app", "version": 7, "percent": 5}, want=400)
            await api(cp, d, "POST", "/v1/config/promote", {"service": "app"}, want=400)
            status, _h, _b = await http_request(cp.admin, "POST", "/v1/config/put", b"{" + b" " * (2 << 20), headers=operator(d))
            assert status == 413
            assert (await api(cp, d, "GET", "/v1/config?service=app"))["last_version"] in ("0", 0)
            # history stays bounded
            for i in range(core.MAX_HISTORY + 5):
                await api(cp, d, "POST", "/v1/config/set", {"service": "app", "set": {"i": str(i)}})
            record = await api(cp, d, "GET", "/v1/config?service=app")
            assert len(record["history"]) == core.MAX_HISTORY and int(record["last_version"]) == core.MAX_HISTORY + 5
        finally:
            await stop(cp)


async def test_crafted_persisted_files_are_refused_and_cost_nothing() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()  # no control plane at all: the proxy starts from its file or with nothing
        (d / "app.token").write_text("octo1.x.y")
        path = d / "app.sock.appconfig.json"
        good = {"service": "app", "environment": "default", "version": "4", "values": {"k": "v"}}
        crafted: list[tuple[str, Any]] = [
            ("other service", {**good, "service": "other"}),
            ("bad version", {**good, "version": "4; rm -rf"}),
            ("huge value", {**good, "values": {"k": "x" * (core.MAX_VALUE_BYTES + 1)}}),
            ("not json", b"{\xff"),
            ("too big", b" " * (proxy_appconfig.APP_CONFIG_FILE_MAX + 1)),
            ("fifo", None),
            ("symlink", "link"),
        ]
        for what, content in crafted:
            if path.exists() or path.is_symlink():
                path.unlink()
            if content is None:
                os.mkfifo(path)
            elif content == "link":
                (d / "target.json").write_text(json.dumps(good))
                path.symlink_to(d / "target.json")
            else:
                path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
            with trio.fail_after(20):
                app = await start_process(proxy_argv(app_cfg(d, cp_port)), "octoproxy ready", d, f"app-{what.replace(' ', '-')}")
            try:
                assert await served(app) == {"service": "app", "environment": "default", "version": "", "values": {}, "source": "none"}, what
                assert "app configuration file ignored" in app.stderr(), what
            finally:
                await stop(app)
        path.unlink()
        path.write_text(json.dumps(good))
        app = await start_process(proxy_argv(app_cfg(d, cp_port)), "octoproxy ready", d, "app-good")
        try:
            assert (await served(app))["values"] == {"k": "v"}
        finally:
            await stop(app)


# ---------------------------------------------------------------- watcher bound, NACK (in process)
async def test_watchers_are_bounded_and_a_change_wakes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_appconfig, "MAX_WATCHERS", 3)
    state = proxy_appconfig.AppConfigState("app", "default", tmp_path / "c.json")
    results: list[bool] = []

    async def watch() -> None:
        results.append(await state.wait_changed("", 10))

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(watch)
        await trio.sleep(0.05)
        assert state.watchers == 3
        assert await state.wait_changed("", 10) is False  # the 4th is refused at once
        state.delivered(pb.AppConfig(service="app", environment="default", version="1", values={"a": "b"}), n)
    assert results == [True, True, True] and state.watchers == 0
    assert json.loads((tmp_path / "c.json").read_text())["values"] == {"a": "b"}


# ---------------------------------------------------------------- stores
async def test_records_survive_an_embedded_snapshot(tmp_path: Path) -> None:
    from octoproxy.controlplane import EmbeddedStore

    record = core.put_version(core.new_record("app", "prod"), {"k": "v"}, 1)
    async with trio.open_nursery() as n:
        a = EmbeddedStore(str(tmp_path / "snap.json"), snapshot_delay=0.01)
        await n.start(a.run)
        await a.put_app_config(record)
        await trio.sleep(0.3)
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        b = EmbeddedStore(str(tmp_path / "snap.json"))
        await n.start(b.run)
        assert b.view.app_configs == {"app.prod": record}
        n.cancel_scope.cancel()


async def test_records_in_etcd_are_listed_and_watched(etcd_single: Any) -> None:
    from octoproxy.controlplane import EtcdStore

    url = etcd_single[0].client_url
    record = core.put_version(core.new_record("app", "default"), {"k": "v"}, 1)
    async with trio.open_nursery() as n:
        a, b = EtcdStore([url], prefix="/mcc/"), EtcdStore([url], prefix="/mcc/")
        await n.start(a.run)
        await a.put_app_config(record)
        await n.start(b.run)  # lists what exists
        assert b.view.app_configs["app.default"] == record
        newer = core.put_version(record, {"k": "w"}, 2)
        await a.put_app_config(newer)  # watched

        async def arrived() -> bool:
            return b.view.app_configs["app.default"] == newer

        await until(arrived)

        # writers through two replicas at once: compare-and-swap, no write lost
        async def writer(store: EtcdStore, tag: str) -> None:
            for i in range(6):
                await store.update_app_config("app", "default", lambda r: core.put_version(r, {"w": f"{tag}{i}"}, 3))

        async with trio.open_nursery() as writers:
            writers.start_soon(writer, a, "a")
            writers.start_soon(writer, b, "b")

        async def all_written() -> bool:
            return b.view.app_configs["app.default"].last_version == 2 + 12

        await until(all_written)
        written = {v.values["w"] for v in b.view.app_configs["app.default"].history[2:]}
        assert written == {f"{t}{i}" for t in "ab" for i in range(6)}
        n.cancel_scope.cancel()


async def test_watchers_ride_out_a_proxy_restart() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port = free_port()
        cp = await start_process(cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        admin_port = free_port()
        extra_admin = f'listen = "127.0.0.1:{admin_port}"'
        cfg = app_cfg(d, cp_port)
        cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', extra_admin))
        procs = [cp]
        try:
            await join_token(d, cp, "app")
            await ctl(d, cp, "set", "app", "k", "1")
            app = await start_process(proxy_argv(cfg), "octoproxy ready", d, "app")
            procs.append(app)
            await until(lambda: _version_is(app, "1"))
            seen: dict[str, list[str]] = {"trio": [], "asyncio": [], "blocking": []}

            async def trio_watcher() -> None:
                async for c in sdk.watch_config(app.admin, poll=5, retry_for=30):
                    seen["trio"].append(c.values["k"])
                    if len(seen["trio"]) == 2:
                        return

            def blocking_watcher() -> None:
                for c in sync.watch_config(app.admin, poll=5, retry_for=30):
                    seen["blocking"].append(c.values["k"])
                    if len(seen["blocking"]) == 2:
                        return

            def asyncio_watcher() -> None:
                async def run() -> None:
                    watcher = aio.watch_config(app.admin, poll=5, retry_for=30)
                    async for c in watcher:
                        seen["asyncio"].append(c.values["k"])
                        if len(seen["asyncio"]) == 2:
                            break
                    await watcher.aclose()  # type: ignore[attr-defined]

                asyncio.run(asyncio.wait_for(run(), 60))

            threads = [threading.Thread(target=f, daemon=True) for f in (asyncio_watcher, blocking_watcher)]
            async with trio.open_nursery() as n:
                n.start_soon(trio_watcher)
                for thread in threads:
                    thread.start()
                await until(lambda: _all_have(seen, 1), 20)
                await stop(app)  # the long polls in flight break
                await trio.sleep(0.5)
                app2 = await start_process(proxy_argv(cfg), "octoproxy ready", d, "app2")
                procs.append(app2)
                await ctl(d, cp, "set", "app", "k", "2")
            for thread in threads:
                await trio.to_thread.run_sync(thread.join, 20)
            assert seen == {"trio": ["1", "2"], "asyncio": ["1", "2"], "blocking": ["1", "2"]}
        finally:
            for p in procs:
                await stop(p)


async def test_a_configuration_is_encoded_once_per_version_not_per_session(cp: Any) -> None:
    record = core.put_version(core.put_version(core.new_record("app", "default"), {"k": "1"}, 0), {"k": "2"}, 0, percent=50)
    await cp.store.put_app_config(record)
    clients = [cp.client(f"app-{i}", cp.token("app")) for i in range(12)]
    for c in clients:
        await c.subscribe(["app.default"], timeout=10, types=(TYPE_APPCONFIG,))
    got = {c.node_id: c.held(TYPE_APPCONFIG)["app.default"].version for c in clients}
    assert got == {f"app-{i}": str(core.chosen_version(record, f"app-{i}")) for i in range(12)}
    cache = cp.server._app_configs["app.default"]
    assert cache[0] is cp.store.view.app_configs["app.default"] and set(cache[1]) == {int(v) for v in got.values()}
    await cp.store.put_app_config(core.promote(record))
    for c in clients:
        with trio.fail_after(10):
            while c.held(TYPE_APPCONFIG)["app.default"].version != "2":
                await trio.sleep(0.02)
    assert set(cp.server._app_configs["app.default"][1]) == {2}
