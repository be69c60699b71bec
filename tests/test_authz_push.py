"""End to end: authorization policies stored by the control plane and pushed to the provider's proxy.

A real control plane, join tokens, two real proxies over mTLS with
certificates the control plane issued, a provider app in the test process.
An operator changes who may call ``echo`` with ``octoproxy ctl authz``; the
provider's proxy applies each change without a restart.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

from e2e import Proc, free_port, provider_toml, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from octoproxy import Status, sdk
from octoproxy.common._admin import http_request
from octoproxy.discovery._xds_client import TYPE_AUTHZ
from octoproxy.controlplane import DiscoveryClient, EmbeddedStore, EtcdStore
from octoproxy.controlplane._store import check_authz_policy
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb
from test_controlplane import wait_for
from test_etcd import Member, etcd_bin, etcd_single  # noqa: F401  (fixtures)
from test_mesh_tls import App, _cp_argv, _discovery, _join_token

pytestmark = pytest.mark.e2e

DENY_CALLER = {"service": "echo", "rules": [{"action": "deny", "callers": ["caller-app"], "methods": ["*"]}]}


async def ctl(d: Path, cp: Proc, *args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{cp.admin}",
            "--state-dir", str(d / "cp-state"), "authz", *args]  # fmt: skip
    with trio.fail_after(20):
        out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return out.returncode, out.stdout.decode(), out.stderr.decode()


async def call_status(client: sdk.Client) -> tuple[int, str]:
    """``(status, error)`` of one call from caller-app to echo."""
    try:
        await client.call("echo", "whoami", b"", timeout=5)
    except sdk.CallError as exc:
        return exc.status, str(exc)
    return Status.OK, ""


async def until_status(client: sdk.Client, want: int, timeout: float = 8.0) -> str:
    with trio.fail_after(timeout):
        while True:
            status, error = await call_status(client)
            if status == want:
                return error
            await trio.sleep(0.05)


async def test_policy_pushed_by_an_operator_applies_without_restart() -> None:
    with trio.fail_after(60), short_tmpdir() as d:
        cp_port, port = free_port(), free_port()
        app_uds = d / "app.sock"
        app = App()
        cp = await start_process(_cp_argv(cp_port, d), "octoproxy control-plane ready", d, "cp")
        procs = [cp]
        try:
            for service in ("caller-app", "echo"):
                await _join_token(d, cp, service)
            async with trio.open_nursery() as nursery:
                await nursery.start(sdk.serve, str(app_uds), app.handler)
                (d / "p.toml").write_text(provider_toml(d, port, app_uds) + _discovery(d, cp_port, "echo"))
                (d / "c.toml").write_text(
                    f'[proxy]\nservice = "caller-app"\n[outbound]\nuds = "{d}/caller.sock"\n[admin]\nlisten = "127.0.0.1:0"\n'
                    f"[upstream]\nconnect_timeout = 0.5\n" + _discovery(d, cp_port, "caller-app")
                )
                pp = await start_process(proxy_argv(d / "p.toml"), "octoproxy ready", d, "provider-proxy")
                procs.append(pp)
                cpx = await start_process(proxy_argv(d / "c.toml"), "octoproxy ready", d, "caller-proxy")
                procs.append(cpx)
                await wait_ready(pp, 20)
                await wait_ready(cpx, 20)
                provider_pid = pp.process.pid
                async with sdk.open_client(d / "caller.sock") as client:
                    who = json.loads(await client.call("echo", "whoami", b"", timeout=5))
                    assert who["caller"] == "caller-app"  # mTLS, certificate from the control plane

                    # a dry run shows the diff and changes nothing
                    (d / "deny.json").write_text(json.dumps(DENY_CALLER))
                    rc, out, err = await ctl(d, cp, "put", "echo", str(d / "deny.json"), "--dry-run")
                    assert rc == 0, err
                    assert "dry run" in out and '"deny"' in out
                    rc, _, err = await ctl(d, cp, "get", "echo")
                    assert rc == 1 and "no authorization policy" in err
                    assert (await call_status(client))[0] == Status.OK

                    # the operator denies caller-app: its calls are refused, with a reason
                    rc, out, err = await ctl(d, cp, "put", "echo", str(d / "deny.json"))
                    assert rc == 0 and "replaced" in out, (out, err)
                    reason = await until_status(client, Status.PERMISSION_DENIED)
                    assert "'caller-app'" in reason and "rule #0" in reason, reason
                    rc, out, _ = await ctl(d, cp, "get", "echo")
                    assert rc == 0 and json.loads(out) == DENY_CALLER

                    # an invalid policy is refused, and changes nothing
                    (d / "bad.json").write_text(json.dumps({"rules": [{"action": "maybe", "callers": ["caller-app"]}]}))
                    rc, out, err = await ctl(d, cp, "put", "echo", str(d / "bad.json"))
                    assert rc != 0 and "HTTP 400" in err and "maybe" in err, (out, err)
                    rc, out, _ = await ctl(d, cp, "put", "echo", str(d / "bad.json"), "--dry-run")
                    assert rc != 0
                    rc, out, _ = await ctl(d, cp, "get", "echo")
                    assert json.loads(out) == DENY_CALLER

                    # a service's join token is not an operator: its write is refused
                    echo_token = (d / "echo.token").read_text().strip()
                    allow = json.dumps({"service": "echo", "default_action": "allow"}).encode()
                    status, _, body = await http_request(cp.admin, "PUT", "/v1/authz", allow, token=echo_token, timeout=5)
                    assert status == 403 and b"not an operator" in body, body
                    status, _, _ = await http_request(cp.admin, "POST", "/v1/authz/delete", b'{"service": "echo"}',
                                                      token=echo_token, timeout=5)  # fmt: skip
                    assert status == 403
                    rc, out, _ = await ctl(d, cp, "get", "echo")
                    assert json.loads(out) == DENY_CALLER
                    assert (await call_status(client))[0] == Status.PERMISSION_DENIED

                    # another service's session may not read echo's policy: answered absent
                    caller_token = (d / "caller-app.token").read_text().strip()
                    url = f"ws://127.0.0.1:{cp_port}/v1/discovery"
                    for token, visible in ((caller_token, False), (echo_token, True)):
                        reader = DiscoveryClient([url], "reader", token=token)
                        async with trio.open_nursery() as n:
                            await n.start(reader.run)
                            await reader.subscribe(["echo"], timeout=5, types=(TYPE_AUTHZ,))
                            assert ("echo" in reader.held(TYPE_AUTHZ)) == visible
                            assert reader.is_absent("echo", TYPE_AUTHZ) == (not visible)
                            n.cancel_scope.cancel()

                    # deleted: the proxy falls back to its [authz] (none: every caller)
                    rc, out, err = await ctl(d, cp, "delete", "echo")
                    assert rc == 0 and "deleted" in out, (out, err)
                    await until_status(client, Status.OK)
                    rc, _, _ = await ctl(d, cp, "get", "echo")
                    assert rc == 1
                assert pp.process.pid == provider_pid and pp.process.returncode is None  # never restarted
                assert [r.method for r in app.seen if r.method == "whoami"]
                nursery.cancel_scope.cancel()
        finally:
            for p in reversed(procs):
                await stop(p)


# ---------------------------------------------------------------- the stores

POLICY = pb.AuthorizationPolicy(
    service="echo", default_action="deny", rules=[pb.AuthorizationRule(action="allow", callers=["web"], methods=["Get*"])]
)


def test_validation_is_the_proxys() -> None:
    assert check_authz_policy(POLICY) is None
    assert "maybe" in (check_authz_policy(pb.AuthorizationPolicy(service="echo", default_action="maybe")) or "")
    bad_rule = pb.AuthorizationPolicy(service="echo", rules=[pb.AuthorizationRule(action="allow", callers=[""])])
    assert "empty caller" in (check_authz_policy(bad_rule) or "")
    assert check_authz_policy(pb.AuthorizationPolicy()) is not None  # no service


async def test_embedded_snapshot_keeps_policies(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    async with trio.open_nursery() as nursery:
        s1 = EmbeddedStore(path, snapshot_delay=0.01)
        await nursery.start(s1.run)
        await s1.put_authz_policy(POLICY)
        before = await s1.get_authz_policy("echo")
        await wait_for(lambda: os.path.exists(path) and "Get*" in open(path).read())
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        s2 = EmbeddedStore(path, snapshot_delay=0.01)
        await nursery.start(s2.run)
        assert await s2.get_authz_policy("echo") == before  # same content, same version
        assert await s2.delete_authz_policy("echo")
        assert not await s2.delete_authz_policy("echo")
        assert await s2.get_authz_policy("echo") is None
        nursery.cancel_scope.cancel()


@pytest.mark.etcd
async def test_etcd_store_lists_and_watches_policies(etcd_single: list[Member]) -> None:
    url = etcd_single[0].client_url
    async with trio.open_nursery() as nursery:
        a, b = EtcdStore([url], prefix="/authz1/"), EtcdStore([url], prefix="/authz1/")
        await nursery.start(a.run)
        await a.put_authz_policy(POLICY)
        await nursery.start(b.run)  # lists what exists
        assert b.view.authz["echo"] == POLICY
        await a.put_authz_policy(pb.AuthorizationPolicy(service="other", default_action="deny"))  # watched
        await wait_for(lambda: "other" in b.view.authz)
        # each store's view follows its own watch: a sees its own write once the event is back
        await wait_for(lambda: "echo" in a.view.authz)
        assert await b.get_authz_policy("echo") == await a.get_authz_policy("echo")
        assert await a.delete_authz_policy("echo")
        await wait_for(lambda: "echo" not in b.view.authz)
        nursery.cancel_scope.cancel()
