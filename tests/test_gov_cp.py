"""End to end: governance policies set with ``octoproxy ctl policy``, stored, pushed live to the proxies.

A real control plane (embedded store, or over a real etcd), join tokens, a
provider proxy that registers ``echo`` with its locality, backup role and
warm-up window, and a caller proxy; the apps are in the test process. Each
proxy's ``GET /governance`` shows the control plane's policy set it holds
(what it handed to ``Proxy.set_governance``) and the routing facts of the
endpoints it installed.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from e2e import Proc, free_port, provider_toml, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from octoproxy import Status, sdk
from octoproxy.common._admin import http_request
from test_etcd import Member, etcd_bin, etcd_single  # noqa: F401  (fixtures)
from test_mesh_tls import App, _cp_argv, _discovery, _join_token

pytestmark = pytest.mark.e2e

POLICY = {
    "retry": {"max_attempts": 3, "idempotent_methods": ["Get*"]},
    "routing": {"locality": "enforce", "rules": [{"name": "blue", "match_metadata": {"swimlane": "blue"},
                                                 "endpoint_tags": {"swimlane": "blue"}}]},
    "breaker": {"max_requests": 100},
}  # fmt: skip
#: the caller proxy's own table for echo: what applies while the control plane has nothing for echo
LOCAL_GOVERNANCE = '[governance]\nversion = "L1"\n[governance.services.echo.tracing]\nsampled = false\n'
LOCAL_ECHO = {"tracing": {"enabled": True, "sampled": False}}
#: every call to echo fails NO_ROUTE while this is in force (no endpoint is tagged green)
FORCE_GREEN = {"routing": {"rules": [{"name": "green-only", "endpoint_tags": {"swimlane": "green"}, "force": True}]}}
#: two errors at once: both must be listed, with their keys
BAD_POLICY = {"retry": {"max_attempts": 0}, "breaker": {"max_requets": 5}}


async def ctl(d: Path, cp: Proc, *args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{cp.admin}",
            "--state-dir", str(d / "cp-state"), *args]  # fmt: skip
    with trio.fail_after(20):
        out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return out.returncode, out.stdout.decode(), out.stderr.decode()


async def governance(p: Proc) -> dict[str, Any]:
    status, body = await p.get("/governance")
    assert status == 200, body
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


async def until(p: Proc, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    """Poll ``/governance`` until ``check`` holds; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while True:
            g = await governance(p)
            if check(g):
                return g
            await trio.sleep(0.02)


def echo_policy(g: dict[str, Any]) -> Any:
    return ((g.get("policy") or {}).get("services") or {}).get("echo")


async def start_mesh(d: Path, cp_args: list[str]) -> tuple[list[Proc], Proc, Proc, Proc]:
    """Control plane, provider proxy (echo, backup, c1, warm-up 30 s) and caller proxy; returns ``(procs, cp, pp, cpx)``."""
    cp_port, port = free_port(), free_port()
    cp = await start_process(_cp_argv(cp_port, d, *cp_args), "octoproxy control-plane ready", d, "cp")
    procs = [cp]
    for service in ("caller-app", "echo"):
        await _join_token(d, cp, service)
    locality = 'region = "r1"\ncenter = "c1"\nidc = "i1"\n'
    (d / "p.toml").write_text(
        provider_toml(d, port, d / "app.sock", proxy=locality)
        + _discovery(d, cp_port, "echo")
        + 'role = "backup"\nwarmup = 30.0\ntags = { swimlane = "blue" }\n'
    )
    (d / "c.toml").write_text(
        f'[proxy]\nservice = "caller-app"\nregion = "r1"\n[outbound]\nuds = "{d}/caller.sock"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f"[upstream]\nconnect_timeout = 0.5\n" + _discovery(d, cp_port, "caller-app") + LOCAL_GOVERNANCE
    )
    pp = await start_process(proxy_argv(d / "p.toml"), "octoproxy ready", d, "provider-proxy")
    procs.append(pp)
    cpx = await start_process(proxy_argv(d / "c.toml"), "octoproxy ready", d, "caller-proxy")
    procs.append(cpx)
    await wait_ready(pp, 20)
    await wait_ready(cpx, 20)
    return procs, cp, pp, cpx


async def test_policy_set_with_ctl_reaches_the_proxies_live() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        procs: list[Proc] = []
        try:
            async with trio.open_nursery() as nursery:
                app = App()
                await nursery.start(sdk.serve, str(d / "app.sock"), app.handler)
                procs, cp, pp, cpx = await start_mesh(d, [])
                registered_after = int(time.time() * 1000) - 30_000
                async with sdk.open_client(d / "caller.sock") as client:
                    await client.call("echo", "whoami", b"", timeout=5)  # the caller's proxy subscribes to echo

                    # the endpoint's routing facts, from the provider's registration to the caller's members
                    g = await until(cpx, lambda g: "echo" in g["endpoints"], 5)
                    (m,) = g["endpoints"]["echo"].values()
                    assert (m["region"], m["center"], m["idc"]) == ("r1", "c1", "i1")
                    assert (m["role"], m["warmup_window_ms"]) == ("backup", 30_000)
                    assert registered_after < m["warmup_start_unix_ms"] <= int(time.time() * 1000)
                    # nothing pushed yet: the caller's own [governance] is in force
                    assert g["version"] == "L1" and g["control_plane_version"] == "" and echo_policy(g) == LOCAL_ECHO
                    rc, out, _ = await ctl(d, cp, "endpoints", "list", "echo")
                    (ep,) = json.loads(out)["endpoints"]
                    assert (ep["region"], ep["center"], ep["idc"], ep["role"]) == ("r1", "c1", "i1", "BACKUP")

                    # a dry run validates and shows the diff, and changes nothing
                    (d / "policy.json").write_text(json.dumps(POLICY))
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "policy.json"), "--dry-run")
                    assert rc == 0 and "dry run" in out and '"max_attempts": 3' in out, (out, err)
                    rc, _, err = await ctl(d, cp, "policy", "get", "echo")
                    assert rc == 1 and "no governance policy" in err

                    # set: both proxies (the caller of echo, and echo's own) hold it within a second
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "policy.json"))
                    assert rc == 0 and "version 1" in out, (out, err)
                    t0 = trio.current_time()
                    g = await until(cpx, lambda g: echo_policy(g) is not None, 1.0)
                    await until(pp, lambda g: echo_policy(g) is not None, 1.0)
                    assert trio.current_time() - t0 < 1.0
                    held = echo_policy(g)
                    assert held["retry"]["max_attempts"] == 3 and held["retry"]["idempotent_methods"] == ["Get*"]
                    assert held["routing"]["locality"] == "enforce" and held["routing"]["rules"][0]["name"] == "blue"
                    assert held["breaker"]["max_requests"] == 100 and held["breaker"]["max_retries"] == 3  # defaults spelled out
                    assert re.fullmatch(r"local:L1\|echo=1#[0-9a-f]{8}", g["version"]) and g["sources"]["echo"]["policy_version"] == 1
                    assert "tracing" not in held  # a pushed policy replaces the local table of its service
                    rc, out, _ = await ctl(d, cp, "policy", "get", "echo")
                    assert rc == 0 and json.loads(out) == held  # the canonical form is what travels

                    # an invalid policy is refused with every error, and the old one stays everywhere
                    (d / "bad.json").write_text(json.dumps(BAD_POLICY))
                    for extra in ((), ("--dry-run",)):
                        rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "bad.json"), *extra)
                        assert rc != 0 and "HTTP 400" in err, (out, err)
                        assert "governance.services.echo.retry.max_attempts: expected 1..10, got 0" in err, err
                        assert "governance.services.echo.breaker.max_requets: unknown key" in err, err
                    rc, out, _ = await ctl(d, cp, "policy", "get", "echo")
                    assert json.loads(out) == held
                    await trio.sleep(0.3)
                    assert echo_policy(await governance(cpx)) == held and (await governance(cpx))["version"] == g["version"]

                    # the data path applies what is pushed: a forced empty subset answers NO_ROUTE, naming the rule
                    (d / "green.json").write_text(json.dumps(FORCE_GREEN))
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "green.json"))
                    assert rc == 0 and "version 2" in out, (out, err)
                    with trio.fail_after(2):
                        while True:
                            try:
                                await client.call("echo", "whoami", b"", timeout=5)
                            except sdk.CallError as exc:
                                assert exc.status == Status.NO_ROUTE and "green-only" in str(exc), exc
                                break
                            await trio.sleep(0.02)

                    # only operators: no credentials (401), a service's join token (403)
                    body = json.dumps({"service": "echo", "policy": {}}).encode()
                    status, _, reply = await http_request(cp.admin, "PUT", "/v1/policy", body, timeout=5)
                    assert status == 401, reply
                    echo_token = (d / "echo.token").read_text().strip()
                    for method, path in (("PUT", "/v1/policy"), ("POST", "/v1/policy/delete")):
                        status, _, reply = await http_request(cp.admin, method, path, body, token=echo_token, timeout=5)
                        assert status == 403 and b"not an operator" in reply, reply
                    rc, out, _ = await ctl(d, cp, "policy", "get", "echo")
                    assert json.loads(out)["routing"]["rules"][0]["name"] == "green-only"

                    # route rules and a policy: the policy's routing wins; without one, the rules are the routing
                    rules = {"service": "echo", "rules": [{"name": "green", "endpoint_tags": {"swimlane": "green"},
                                                          "fallback_to_all": True}]}  # fmt: skip
                    (d / "rules.json").write_text(json.dumps(rules))
                    rc, out, err = await ctl(d, cp, "routes", "put", str(d / "rules.json"))
                    assert rc == 0, err
                    g = await until(cpx, lambda g: (g["sources"].get("echo") or {}).get("route_rules_ignored"), 2)
                    assert echo_policy(g)["routing"]["rules"][0]["name"] == "green-only"
                    (d / "no-routing.json").write_text(json.dumps({"retry": {}}))
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "no-routing.json"))
                    assert rc == 0 and "version 3" in out, (out, err)
                    g = await until(cpx, lambda g: (g["sources"].get("echo") or {}).get("policy_version") == 3, 2)
                    routing = echo_policy(g)["routing"]
                    assert [r["name"] for r in routing["rules"]] == ["green"] and routing["rules"][0]["force"] is False
                    assert re.fullmatch(r"local:L1\|echo=3#[0-9a-f]{8}\+routes:[0-9a-f]{12}", g["version"]), g["version"]
                    assert not g["sources"]["echo"]["route_rules_ignored"]
                    await client.call("echo", "whoami", b"", timeout=5)  # green-only is gone: calls flow again

                    # history, newest first
                    rc, out, _ = await ctl(d, cp, "policy", "history", "echo", "--json")
                    history = json.loads(out)
                    assert history["current"] == 3 and [v["version"] for v in history["history"]] == [3, 2, 1]
                    assert history["history"][2]["policy"] == held
                    rc, out, _ = await ctl(d, cp, "policy", "history", "echo")
                    lines = out.splitlines()
                    assert rc == 0 and len(lines) == 3 and lines[0].split()[0] == "3" and "(in force)" in lines[0]
                    assert "breaker, retry, routing" in lines[2], out

                    # delete: the proxies fall back to their own [governance] (the caller's table; none on the provider)
                    rc, out, err = await ctl(d, cp, "policy", "delete", "echo")
                    assert rc == 0 and "deleted (version 4)" in out, (out, err)
                    rules["rules"] = []
                    (d / "rules.json").write_text(json.dumps(rules))
                    rc, out, err = await ctl(d, cp, "routes", "put", str(d / "rules.json"))
                    assert rc == 0, err
                    g = await until(cpx, lambda g: g["control_plane_version"] == "", 2)
                    assert g["version"] == "L1" and echo_policy(g) == LOCAL_ECHO
                    await until(pp, lambda g: g["policy"] is None, 2)
                    rc, _, _ = await ctl(d, cp, "policy", "get", "echo")
                    assert rc == 1
                    rc, _, err = await ctl(d, cp, "policy", "delete", "echo")
                    assert rc != 0 and "HTTP 404" in err

                    # calls kept flowing, and no proxy restarted or NACKed anything
                    await client.call("echo", "whoami", b"", timeout=5)

                    # echo's own proxy divides inbound cluster_rate limits among echo's live instances
                    assert (await governance(pp))["inbound_instances"] == 1
                    other = f"127.0.0.1:{free_port()}"
                    rc, out, err = await ctl(d, cp, "endpoints", "register", "echo", other, "--ttl", "60")
                    assert rc == 0, err
                    await until(pp, lambda g: g["inbound_instances"] == 2, 2)
                    rc, out, err = await ctl(d, cp, "endpoints", "set-status", "echo", other, "UNHEALTHY")
                    assert rc == 0, err
                    await until(pp, lambda g: g["inbound_instances"] == 1, 2)
                assert all(p.process.returncode is None for p in procs)
                assert "NACK" not in cpx.stderr() and "rejected" not in cpx.stderr()
                nursery.cancel_scope.cancel()
        finally:
            for p in reversed(procs):
                await stop(p)


@pytest.mark.etcd
async def test_policy_over_etcd_reaches_the_proxies(etcd_single: list[Member]) -> None:  # noqa: F811
    """The same with the control plane over etcd: set, pushed within a second, TOML input, delete."""
    with trio.fail_after(90), short_tmpdir() as d:
        procs: list[Proc] = []
        try:
            async with trio.open_nursery() as nursery:
                app = App()
                await nursery.start(sdk.serve, str(d / "app.sock"), app.handler)
                cp_args = ["--store", "etcd", "--etcd-endpoints", etcd_single[0].client_url, "--etcd-prefix", "/gov-e2e/"]
                procs, cp, pp, cpx = await start_mesh(d, cp_args)
                async with sdk.open_client(d / "caller.sock") as client:
                    await client.call("echo", "whoami", b"", timeout=5)
                    g = await until(cpx, lambda g: "echo" in g["endpoints"], 5)
                    (m,) = g["endpoints"]["echo"].values()
                    assert (m["center"], m["role"], m["warmup_window_ms"]) == ("c1", "backup", 30_000)

                    (d / "policy.toml").write_text('[breaker]\nmax_requests = 7\n[tracing]\nsampled = false\n')
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "policy.toml"))
                    assert rc == 0 and "version 1" in out, (out, err)
                    g = await until(cpx, lambda g: echo_policy(g) is not None, 1.0)
                    assert echo_policy(g)["breaker"]["max_requests"] == 7
                    assert echo_policy(g)["tracing"] == {"enabled": True, "sampled": False}
                    rc, out, err = await ctl(d, cp, "policy", "delete", "echo")
                    assert rc == 0, err
                    g = await until(cpx, lambda g: g["control_plane_version"] == "", 2)
                    assert echo_policy(g) == LOCAL_ECHO
                nursery.cancel_scope.cancel()
        finally:
            for p in reversed(procs):
                await stop(p)


async def test_warmup_start_from_the_control_plane_shapes_the_split_of_calls() -> None:
    """A provider registered long ago and one that just came up: with a slow-start window in echo's
    policy the new one gets the floor share (10 % of its weight); with the window set to 0, its half."""
    with trio.fail_after(90), short_tmpdir() as d:
        procs: list[Proc] = []
        try:
            async with trio.open_nursery() as nursery:
                old_app, new_app = App(), App()
                await nursery.start(sdk.serve, str(d / "old.sock"), old_app.handler)
                await nursery.start(sdk.serve, str(d / "new.sock"), new_app.handler)
                cp_port, old_port, new_port = free_port(), free_port(), free_port()
                cp = await start_process(_cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
                procs.append(cp)
                for service in ("caller-app", "echo"):
                    await _join_token(d, cp, service)
                # the old provider's address was registered ten minutes ago (its start is kept when its proxy registers)
                old = f"127.0.0.1:{old_port}"
                ten_minutes_ago = int(time.time() * 1000) - 600_000
                body = {"service": "echo", "endpoint": {"address": old, "warmup_start_unix_ms": ten_minutes_ago}, "ttl": 60}
                status, _, reply = await http_request(cp.admin, "POST", "/v1/endpoints/register", json.dumps(body).encode(),
                                                      token=(d / "cp-state" / "operator.token").read_text().strip(), timeout=5)  # fmt: skip
                assert status == 200, reply
                (d / "warm.json").write_text(json.dumps({"routing": {"locality": "off", "slow_start": {"window": 60.0}}}))
                rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "warm.json"))
                assert rc == 0, err
                for name, port in (("old", old_port), ("new", new_port)):
                    (d / f"{name}.toml").write_text(provider_toml(d, port, d / f"{name}.sock", name=name) + _discovery(d, cp_port, "echo"))
                    pp = await start_process(proxy_argv(d / f"{name}.toml"), "octoproxy ready", d, f"{name}-proxy")
                    procs.append(pp)
                    await wait_ready(pp, 20)
                    assert echo_policy(await governance(pp)) is not None  # its own service's policy, before ready
                (d / "c.toml").write_text(
                    f'[proxy]\nservice = "caller-app"\n[outbound]\nuds = "{d}/caller.sock"\n[admin]\nlisten = "127.0.0.1:0"\n'
                    f"[upstream]\nconnect_timeout = 0.5\n" + _discovery(d, cp_port, "caller-app")
                )
                cpx = await start_process(proxy_argv(d / "c.toml"), "octoproxy ready", d, "caller-proxy")
                procs.append(cpx)
                async with sdk.open_client(d / "caller.sock") as client:
                    await client.call("echo", "whoami", b"", timeout=5)
                    g = await until(cpx, lambda g: len(g["endpoints"].get("echo", {})) == 2 and echo_policy(g) is not None, 5)
                    starts = {a: e["warmup_start_unix_ms"] for a, e in g["endpoints"]["echo"].items()}
                    assert starts.pop(old) == ten_minutes_ago and list(starts.values())[0] > ten_minutes_ago + 500_000
                    with trio.fail_after(5):  # both connected
                        while not all(e["connections"] for e in (await cpx.json("/clusters"))["echo"]["endpoints"]):  # type: ignore[index]
                            await trio.sleep(0.05)

                    async def new_share(n: int) -> float:
                        before_old, before_new = len(old_app.seen), len(new_app.seen)
                        for _ in range(n):
                            await client.call("echo", "m", b"", timeout=5)
                        got_new = len(new_app.seen) - before_new
                        return got_new / (got_new + len(old_app.seen) - before_old)

                    warming = await new_share(300)
                    assert 0.02 < warming < 0.25, warming  # the floor: 10 % of its weight, ~9 % of the calls
                    (d / "cold.json").write_text(json.dumps({"routing": {"locality": "off", "slow_start": {"window": 0.0}}}))
                    rc, out, err = await ctl(d, cp, "policy", "set", "echo", str(d / "cold.json"))
                    assert rc == 0, err
                    await until(cpx, lambda g: g["control_plane_version"].startswith("echo=2#"), 2)
                    warm = await new_share(300)
                    assert 0.3 < warm < 0.7, warm
                nursery.cancel_scope.cancel()
        finally:
            for p in reversed(procs):
                await stop(p)
