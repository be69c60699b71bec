"""End-to-end: `octoproxy agent` supervising real `octoproxy run` processes,
on temp-dir sockets and loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from e2e import _wait_for_line, caller_toml, free_port, provider, provider_toml, proxy, short_tmpdir, wait_ready
import octoproxy
from octoproxy import sdk
from octoproxy.common._admin import http_request

pytestmark = pytest.mark.e2e

PROXY_TOML = """
[proxy]
drain_time = 1.0
shutdown_time = 2.0
[outbound]
uds = "{dir}/out.sock"
[admin]
listen = "127.0.0.1:0"
"""
BAD_PROXY_TOML = "[proxy]\nno_such_key = 1\n"  # fails validation: the proxy exits 2 at once
HANG = [sys.executable, "-c", "import time; time.sleep(60)"]


def agent_toml(
    admin: str = "127.0.0.1:0", proxy_config: str = "proxy.toml", *, upgrade: dict[str, object] | None = None, **keys: object
) -> str:
    lines = ["[agent]", f'admin = "{admin}"', f'proxy_config = "{proxy_config}"', "health_interval = 0.2"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    if upgrade:
        lines.append("[upgrade]")
        for k, v in upgrade.items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ " + ", ".join(f"{json.dumps(n)} = {json.dumps(c)}" for n, c in v.items()) + " }")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_strays(d: Path) -> list[int]:
    """SIGKILL processes whose command line names our temp dir (proxies the agent left behind)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(d).encode() in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


@dataclass
class Agent:
    process: trio.Process
    dir: Path
    admin: str
    ready_line: str | None

    def stderr(self) -> str:
        return (self.dir / "agent.stderr").read_text(errors="replace")

    @property
    def token(self) -> str:
        return (self.dir / "agent-admin.token").read_text().strip()  # the default, next to agent.toml

    async def status(self) -> dict[str, Any]:
        code, _h, body = await http_request(self.admin, "GET", "/status", token=self.token)
        assert code == 200
        data: dict[str, Any] = json.loads(body)
        return data

    async def metrics(self) -> str:
        code, _h, body = await http_request(self.admin, "GET", "/metrics")
        assert code == 200
        return body.decode()

    async def upgrade(self, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode() if body is not None else b""
        code, _h, reply = await http_request(self.admin, "POST", "/upgrade", raw, timeout=30, token=self.token)
        return code, json.loads(reply)

    async def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                st = await self.status()
                if pred(st):
                    return st
                await trio.sleep(0.05)

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            return await self.process.wait()


async def proxy_get(st: dict[str, Any], path: str) -> int:
    code, _h, _b = await http_request(st["proxy_admin"], "GET", path)
    return code


@asynccontextmanager
async def run_agent(d: Path, toml: str, *, admin: str | None = None) -> AsyncIterator[Agent]:
    """Start `octoproxy agent`; wait for its ready line, or (given a fixed
    ``admin``) only for its admin API. Stops it, and anything it left, at the end."""
    cfg = d / "agent.toml"
    cfg.write_text(toml)
    with open(d / "agent.stderr", "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "octoproxy", "agent", "-c", str(cfg)],
            stdout=subprocess.PIPE, stderr=err, start_new_session=True,
        )  # fmt: skip
    a = Agent(proc, d, admin or "", None)
    try:
        if admin is None:
            a.ready_line = await _wait_for_line(proc, "octoproxy agent ready", 20)
            words = dict(w.split("=", 1) for w in a.ready_line.split()[3:])
            a.admin = words["admin"]
        else:
            with trio.fail_after(15):
                while True:
                    try:
                        if (await http_request(admin, "GET", "/healthz", timeout=1))[0] == 200:
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.05)
        yield a
    except BaseException:
        print(f"--- agent stderr ---\n{a.stderr()[-6000:]}", file=sys.stderr)
        raise
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()
            kill_strays(d)


def write_proxy(d: Path, name: str = "proxy.toml") -> Path:
    path = d / name
    path.write_text(PROXY_TOML.format(dir=d))
    return path


async def test_agent_starts_the_proxy_and_reports_it() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        async with run_agent(d, agent_toml()) as a:
            assert a.ready_line is not None
            pid = int(a.ready_line.rsplit("proxy_pid=", 1)[1])
            st = await a.wait_status(lambda s: s["version"] is not None)
            assert st["state"] == "running" and st["pid"] == pid and alive(pid)
            assert st["config"] == str(d / "proxy.toml")
            assert st["command"] == [sys.executable, "-m", "octoproxy", "run"]
            assert (st["generation"], st["restarts"], st["last_upgrade"], st["crash_loop_reason"]) == (0, 0, None, None)
            assert st["version"] == octoproxy.__version__
            assert await proxy_get(st, "/healthz") == 200
            code, _h, _b = await http_request(a.admin, "GET", "/healthz")
            assert code == 200
            await a.wait_status(lambda s: s["ready"])
            with trio.fail_after(5):
                while 'agent_health_checks_total{result="ok"}' not in await a.metrics():
                    await trio.sleep(0.05)
            metrics = await a.metrics()
            assert "agent_proxy_up 1" in metrics and "agent_restarts_total 0" in metrics
            assert await a.stop() == 0
            assert not alive(pid), "the agent left its proxy running"
            assert "event=agent_stopped" in a.stderr()
        assert not kill_strays(d)


async def test_sigkilled_proxy_is_restarted_and_serves_again() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        async with run_agent(d, agent_toml()) as a:
            old = (await a.status())["pid"]
            os.kill(old, signal.SIGKILL)
            st = await a.wait_status(lambda s: s["state"] == "running" and s["pid"] not in (None, old))
            assert st["restarts"] == 1 and alive(st["pid"])
            assert st["last_exit"]["pid"] == old and st["last_exit"]["code"] == -signal.SIGKILL
            assert await proxy_get(st, "/healthz") == 200
            assert await proxy_get(st, "/ready") == 200
            assert "agent_restarts_total 1" in await a.metrics()
            assert "reason=\"killed by signal 9\"" in a.stderr()


async def test_hung_proxy_is_restarted_after_failed_liveness_checks() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        toml = agent_toml(health_timeout=0.2, failure_threshold=2, stop_grace=0.5)
        async with run_agent(d, toml) as a:
            old = (await a.status())["pid"]
            os.kill(old, signal.SIGSTOP)  # alive, but answers nothing: SIGTERM cannot help, SIGKILL must
            try:
                st = await a.wait_status(lambda s: s["state"] == "running" and s["pid"] not in (None, old))
            finally:
                if alive(old):
                    os.kill(old, signal.SIGKILL)
            assert st["restarts"] == 1 and st["last_exit"]["code"] == -signal.SIGKILL
            failed = re.search(r'agent_health_checks_total\{result="failed"\} (\S+)', await a.metrics())
            assert failed is not None and float(failed.group(1)) >= 2
            log = a.stderr()
            assert 'reason="2 liveness checks failed in a row' in log and "signal=SIGKILL" in log


async def test_always_crashing_proxy_stops_at_the_crash_loop_limit() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        (d / "proxy.toml").write_text(BAD_PROXY_TOML)
        admin = f"127.0.0.1:{free_port()}"
        toml = agent_toml(admin, crash_loop_limit=3, backoff_initial=0.05, backoff_max=0.2)
        async with run_agent(d, toml, admin=admin) as a:
            st = await a.wait_status(lambda s: s["state"] == "crash_loop")
            reason = st["crash_loop_reason"]
            assert reason.startswith("crash loop: 3 failures within 60.0s") and "exited with code 2" in reason
            assert st["restarts"] == 2 and st["pid"] is None and st["last_exit"]["code"] == 2
            await trio.sleep(0.5)  # and it stays stopped
            assert (await a.status())["restarts"] == 2
            code, reply = await a.upgrade()
            assert code == 409 and "crash_loop" in reply["error"]
            assert "agent_proxy_up 0" in await a.metrics()
            assert await a.stop() == 1
            assert "CRASH LOOP" in a.stderr() and "event=crash_loop" in a.stderr()


async def test_upgrade_to_an_invalid_config_rolls_back() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        (d / "bad.toml").write_text(BAD_PROXY_TOML)
        async with run_agent(d, agent_toml(upgrade={"configs": ["bad.toml"]})) as a:
            before = await a.status()
            code, res = await a.upgrade({"config": "bad.toml"})  # relative: next to proxy.toml
            assert code == 200, res
            assert res["outcome"] == "rolled_back" and "exited with code 2 before it was ready" in res["reason"]
            assert res["config"] == str(d / "bad.toml") and res["pid"] == before["pid"]
            st = await a.status()
            assert st["pid"] == before["pid"] and st["state"] == "running" and alive(st["pid"])
            assert st["generation"] == 0 and st["config"] == str(d / "proxy.toml")
            assert st["last_upgrade"]["outcome"] == "rolled_back"
            assert await proxy_get(st, "/healthz") == 200
            # the same through the command-line client: exit status 1
            cli = await trio.run_process(
                [sys.executable, "-m", "octoproxy", "agent", "upgrade", "--admin", a.admin, "--config", str(d / "bad.toml"),
                 "--token-file", str(d / "agent-admin.token")],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert cli.returncode == 1, cli.stderr
            assert cli.stdout.decode().startswith("upgrade rolled_back: candidate exited with code 2")
            assert 'agent_upgrades_total{outcome="rolled_back"} 2' in await a.metrics()
            assert (await a.status())["pid"] == before["pid"]


async def test_upgrade_that_never_gets_ready_is_killed_and_rolled_back() -> None:
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        async with run_agent(d, agent_toml(upgrade_timeout=1.0, upgrade={"versions": {"hang": HANG}})) as a:
            before = await a.status()
            results: list[tuple[int, dict[str, Any]]] = []

            async def first() -> None:
                results.append(await a.upgrade({"version": "hang"}))

            async with trio.open_nursery() as n:
                n.start_soon(first)
                st = await a.wait_status(lambda s: s["candidate_pid"] is not None)
                candidate = st["candidate_pid"]
                assert st["state"] == "upgrading" and st["upgrading"]
                code, busy = await a.upgrade()  # one at a time
                assert code == 409 and "already in progress" in busy["error"]
            code, res = results[0]
            assert code == 200 and res["outcome"] == "rolled_back" and res["version"] == "hang"
            assert res["reason"] == "candidate not ready within upgrade_timeout (1.0s)"
            assert 1.0 <= res["duration"] < 5.0
            with trio.fail_after(5):
                while alive(candidate):  # killed (and reaped by the agent)
                    await trio.sleep(0.05)
            st = await a.status()
            assert st["pid"] == before["pid"] and st["state"] == "running" and st["command"] == before["command"]
            assert await proxy_get(st, "/healthz") == 200


async def test_upgrade_never_runs_a_command_from_the_request() -> None:
    """Issue 11, item 1: `{"command": [...]}` ran any argv as the agent's user. Now the body
    only names a version or a config file that the agent's own configuration allows."""
    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        pwned = d / "pwned"
        outside = d / "outside"
        outside.mkdir()
        (outside / "evil.toml").write_text(PROXY_TOML.format(dir=d))
        allowed = d / "allowed"
        allowed.mkdir()
        (allowed / "escape.toml").symlink_to(outside / "evil.toml")  # a symlink out of config_dir
        (allowed / "sub").mkdir()
        toml = agent_toml(upgrade={"versions": {"same": [sys.executable, "-m", "octoproxy", "run"]}, "config_dir": "allowed"})
        async with run_agent(d, toml) as a:
            before = await a.status()
            attacks: list[tuple[dict[str, Any], str]] = [
                ({"command": ["/bin/sh", "-c", f"id > {pwned}; exit 3"]}, '"command" is not accepted'),
                ({"command": ["/bin/sh", "-c", f"id > {pwned}"], "version": "same"}, '"command" is not accepted'),
                ({"version": f"/bin/sh -c 'id > {pwned}'"}, "is not in the agent's [upgrade] versions (same)"),
                ({"version": ["/bin/sh"]}, "is not in the agent's [upgrade] versions"),
                ({"config": str(outside / "evil.toml")}, "is not allowed"),
                ({"config": "allowed/escape.toml"}, "is not allowed"),
                ({"config": "allowed/../outside/evil.toml"}, "is not allowed"),
                ({"config": "allowed/sub"}, "is not a regular file"),
                ({"config": "allowed/missing.toml"}, "No such file or directory"),
                ({"argv": ["/bin/sh"]}, "argv: unknown key"),
            ]
            for body, reason in attacks:
                code, reply = await a.upgrade(body)
                assert code == 400 and reason in reply["error"], (body, reply)
            await trio.sleep(0.5)
            assert not pwned.exists()
            st = await a.status()
            assert (st["pid"], st["generation"], st["upgrading"], st["last_upgrade"]) == (before["pid"], 0, False, None)
            assert a.stderr().count("event=upgrade_refused") == len(attacks)
            # what the configuration allows still works: a version by name, a file inside config_dir
            (allowed / "next.toml").write_text(PROXY_TOML.format(dir=d))
            code, res = await a.upgrade({"version": "same", "config": "allowed/next.toml"})
            assert code == 200 and res["outcome"] == "succeeded", res
            assert res["version"] == "same" and res["config"] == str((allowed / "next.toml").resolve())
            # and the command-line client names a version, with the agent's token
            tok = ["--token-file", str(d / "agent-admin.token")]
            cli = await trio.run_process(
                [sys.executable, "-m", "octoproxy", "agent", "upgrade", "--admin", a.admin, "--version", "nope", *tok],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert cli.returncode == 1 and b"is not in the agent's [upgrade] versions" in cli.stderr
            cli = await trio.run_process(
                [sys.executable, "-m", "octoproxy", "agent", "upgrade", "--admin", a.admin, "--version", "same"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert cli.returncode == 1 and b"agent answered 401" in cli.stderr  # no token
            cli = await trio.run_process(
                [sys.executable, "-m", "octoproxy", "agent", "upgrade", "--admin", a.admin, "--version", "same", *tok],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert (await a.status())["generation"] == 2


async def test_upgrade_through_hot_restart() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        write_proxy(d)
        admin = f"127.0.0.1:{free_port()}"
        async with run_agent(d, agent_toml(admin)) as a:
            old = (await a.status())["pid"]
            code, res = await a.upgrade()
            assert code == 200 and res["outcome"] == "succeeded", res
            new = res["pid"]
            assert new != old and res["generation"] == 1
            st = await a.status()
            assert (st["pid"], st["generation"], st["state"]) == (new, 1, "running")
            with trio.fail_after(10):  # the old one drains and exits by itself
                while alive(old):
                    await trio.sleep(0.05)
            code, _h, stats = await http_request(st["proxy_admin"], "GET", "/stats")
            assert "octoproxy_hot_restart_generation 1" in stats.decode()
            # SIGHUP: the same again, with the config re-read
            a.process.send_signal(signal.SIGHUP)
            st = await a.wait_status(lambda s: s["generation"] == 2 and s["state"] == "running")
            assert st["last_upgrade"]["outcome"] == "succeeded" and st["pid"] not in (old, new)
            with trio.fail_after(10):
                while alive(new):
                    await trio.sleep(0.05)
            # the command-line client, finding the agent through its config file
            cli = await trio.run_process(
                [sys.executable, "-m", "octoproxy", "agent", "upgrade", "-c", str(d / "agent.toml")],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout.decode().startswith("upgrade succeeded")
            assert (await a.status())["generation"] == 3
            assert 'agent_upgrades_total{outcome="succeeded"} 3' in await a.metrics()
            assert (await a.status())["restarts"] == 0


async def test_upgrade_under_load_fails_no_call() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        (d / "caller.toml").write_text(caller_toml(d, [port], drain_time="2.0"))
        async with provider(d, app_uds), proxy(d, "provider-proxy", provider_toml(d, port, app_uds)) as pp:
            await wait_ready(pp)
            async with run_agent(d, agent_toml(proxy_config="caller.toml")) as a:
                ok, failed, errors = 0, 0, list[str]()
                stop = trio.Event()

                async def worker(client: sdk.Client, i: int) -> None:
                    nonlocal ok, failed
                    n = 0
                    while not stop.is_set():
                        body = f"{i}:{n}".encode()
                        try:
                            got = await client.call("echo", "echo", body, timeout=5.0)
                            ok, failed = (ok + 1, failed) if got == body else (ok, failed + 1)
                        except sdk.CallError as exc:
                            failed += 1
                            errors.append(repr(exc))
                        n += 1

                async with sdk.open_client(d / "caller.sock") as client:
                    async with trio.open_nursery() as nursery:
                        for i in range(16):
                            nursery.start_soon(worker, client, i)
                        await trio.sleep(0.5)
                        for generation in (1, 2):
                            old = (await a.status())["pid"]
                            code, res = await a.upgrade()
                            assert code == 200 and res["outcome"] == "succeeded", res
                            assert res["generation"] == generation
                            with trio.fail_after(15):
                                while alive(old):
                                    await trio.sleep(0.05)
                            await trio.sleep(0.3)
                        stop.set()
                assert failed == 0, errors[:5]
                assert ok > 200
                st = await a.status()
                assert (st["generation"], st["restarts"], st["state"]) == (2, 0, "running")


async def test_invalid_agent_config_is_refused_naming_the_key() -> None:
    with trio.fail_after(20), short_tmpdir() as d:
        (d / "agent.toml").write_text('[agent]\nproxy_config = "p.toml"\nhealth_interval = "x"\n')
        res = await trio.run_process(
            [sys.executable, "-m", "octoproxy", "agent", "-c", str(d / "agent.toml")],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert res.returncode == 2
        assert "agent.health_interval: expected a positive number, got 'x'" in res.stderr.decode()


async def test_sigkilled_provider_proxy_fails_over_then_is_restarted() -> None:
    """Two providers; the agent supervises provider 1's proxy. SIGKILL it under
    load: new calls go to provider 2 meanwhile, the agent restarts it, and
    provider 1 serves again. Only calls in flight on the killed proxy fail."""
    with trio.fail_after(90), short_tmpdir() as d:
        p1, p2 = free_port(), free_port()
        (d / "p1.toml").write_text(provider_toml(d, p1, d / "app1.sock", name="p1"))
        (d / "caller.toml").write_text(caller_toml(d, [p1, p2], lb="round_robin"))
        async with provider(d, d / "app1.sock", "app1"), provider(d, d / "app2.sock", "app2"):
            async with proxy(d, "p2", provider_toml(d, p2, d / "app2.sock", name="p2")) as pp2, run_agent(
                d, agent_toml(proxy_config="p1.toml", backoff_initial=0.2)
            ) as a, proxy(d, "caller", (d / "caller.toml").read_text()) as cp:
                await wait_ready(cp)
                ok, failed, statuses = 0, 0, list[str]()
                stop = trio.Event()

                async def worker(client: sdk.Client) -> None:
                    nonlocal ok, failed
                    while not stop.is_set():
                        try:
                            assert await client.call("echo", "echo", b"x", timeout=5.0) == b"x"
                            ok += 1
                        except sdk.CallError as exc:
                            failed += 1
                            statuses.append(exc.status.name)
                        await trio.sleep(0.001)

                async with sdk.open_client(d / "caller.sock") as client, trio.open_nursery() as n:
                    for _ in range(8):
                        n.start_soon(worker, client)
                    await trio.sleep(0.5)
                    old = (await a.status())["pid"]
                    os.kill(old, signal.SIGKILL)
                    served_by_2 = await pp2.metric('octoproxy_requests_total{direction="inbound"')
                    before = ok
                    await trio.sleep(0.3)
                    assert ok > before + 20  # calls keep succeeding: provider 2 takes them
                    assert await pp2.metric('octoproxy_requests_total{direction="inbound"') > served_by_2
                    st = await a.wait_status(lambda s: s["restarts"] == 1 and s["state"] == "running" and s["pid"] != old)
                    # provider 1 is back in the caller's pool
                    with trio.fail_after(10):
                        while True:
                            eps = (await cp.json("/clusters"))["echo"]["endpoints"]  # type: ignore[index]
                            if all(e["connections"] for e in eps):
                                break
                            await trio.sleep(0.05)
                    await trio.sleep(0.3)
                    stop.set()
                assert st["pid"] != old
                assert failed <= 8 and set(statuses) <= {"UNAVAILABLE"}, statuses  # in flight at the kill only
                assert ok > 200
