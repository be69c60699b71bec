"""Control plane over the embedded store: in-process server and clients, then a real subprocess.

Loopback only, real clock (leases are a few hundred ms), every wait bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from octoproxy.common._admin import http_request
from octoproxy.controlplane import (
    TYPE_ENDPOINTS,
    TYPE_ROUTES,
    ControlPlaneServer,
    DiscoveryClient,
    DiscoveryError,
    EmbeddedStore,
    ResourceChange,
)
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

STEP = 10.0  # generous bound for any single wait

#: the operator token every control-plane process of these tests (and test_etcd*.py) shares
OPERATOR_TOKEN = "test-operator-" + secrets.token_urlsafe(16)
_TOKEN_DIR = tempfile.mkdtemp(prefix="octocp-")
TOKEN_FILE = os.path.join(_TOKEN_DIR, "operator.token")
with open(os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as _f:
    _f.write(OPERATOR_TOKEN + "\n")


# ---------------------------------------------------------------- helpers (also used by test_etcd.py)
def free_port() -> int:
    from octoproxy.common._ports import free_port as pick

    return pick()


async def start_control_plane(*args: str, log: str | None = None) -> tuple[trio.Process, str]:
    """Start ``octoproxy control-plane ARGS`` and wait for its ready line.

    Unless ARGS say otherwise, it gets a fresh ``--state-dir`` and the shared
    ``--operator-token-file`` (:data:`OPERATOR_TOKEN`).

    Returns:
        ``(process, "ws://host:port/v1/discovery")``.
    """
    extra = []
    if "--state-dir" not in args:
        extra += ["--state-dir", tempfile.mkdtemp(prefix="octocp-state-")]
    if "--operator-token-file" not in args:
        extra += ["--operator-token-file", TOKEN_FILE]
    stderr = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "octoproxy", "control-plane", *args, *extra], stdout=subprocess.PIPE, stderr=stderr
    )
    if log:
        stderr.close()  # type: ignore[union-attr]
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.fail_after(STEP):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"control plane exited early (rc={await proc.wait()}), log: {log}")
                buf += chunk
    except BaseException:
        proc.kill()
        raise
    line = buf.split(b"\n")[0].decode()
    assert line.startswith("octoproxy control-plane ready listen="), line
    listen = line.split("listen=")[1].split()[0]
    return proc, f"ws://{listen}/v1/discovery"


async def kill(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    with trio.fail_after(STEP):
        await proc.wait()


async def wait_for(pred: Callable[[], bool], timeout: float = STEP, interval: float = 0.01) -> None:
    """Poll ``pred`` until true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(interval)


def addresses(client: DiscoveryClient, service: str) -> set[str]:
    res = client.held(TYPE_ENDPOINTS).get(service)
    return {e.address for e in res.endpoints} if res is not None else set()  # type: ignore[attr-defined]


def ep(address: str, **kw: object) -> pb.Endpoint:
    return pb.Endpoint(address=address, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- in-process fixtures
@pytest.fixture
async def store(nursery: trio.Nursery) -> EmbeddedStore:
    s = EmbeddedStore()
    await nursery.start(s.run)
    return s


@pytest.fixture
async def server(store: EmbeddedStore) -> ControlPlaneServer:
    return ControlPlaneServer(store, lease_grace=0.2)


@pytest.fixture
async def url(nursery: trio.Nursery, server: ControlPlaneServer) -> str:
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return f"ws://{host}:{port}/v1/discovery"


@pytest.fixture
async def make_client(nursery: trio.Nursery, url: str, server: ControlPlaneServer) -> AsyncIterator[Callable[..., DiscoveryClient]]:
    """Clients authenticated as the operator (``token=`` overrides)."""
    clients: list[DiscoveryClient] = []

    def make(node_id: str, on_change: Callable[[list[ResourceChange]], None] | None = None, **kw: object) -> DiscoveryClient:
        kw.setdefault("token", server.operator_token)
        c = DiscoveryClient(kw.pop("urls", [url]), node_id, on_change, **kw)  # type: ignore[arg-type]
        nursery.start_soon(c.run)
        clients.append(c)
        return c

    yield make


# ---------------------------------------------------------------- in-process tests
async def test_subscribe_gets_endpoints(make_client: Callable[..., DiscoveryClient]) -> None:
    provider, consumer = make_client("provider"), make_client("consumer")
    with trio.fail_after(STEP):
        await provider.register("user", ep("10.0.0.1:9000", weight=50, region="bj", tags={"set": "a"}), ttl=5)
        await consumer.subscribe(["user"], timeout=STEP)
    cla = consumer.held(TYPE_ENDPOINTS)["user"]
    assert [(e.address, e.weight, e.tags["set"]) for e in cla.endpoints] == [("10.0.0.1:9000", 50, "a")]  # type: ignore[attr-defined]
    assert consumer.connected and consumer.is_absent("user", TYPE_ROUTES)  # no route rules: resolved as absent
    # a service nobody provides resolves (as absent) instead of hanging
    await consumer.subscribe(["nobody"], timeout=STEP)
    assert consumer.is_absent("nobody") and "nobody" not in consumer.held()


async def test_registration_changes_are_pushed(make_client: Callable[..., DiscoveryClient]) -> None:
    changes: list[ResourceChange] = []
    provider = make_client("provider")
    consumer = make_client("consumer", changes.extend)
    await provider.register("user", ep("10.0.0.1:9000"), ttl=5)
    await consumer.subscribe(["user"], timeout=STEP)
    changes.clear()
    t0 = trio.current_time()
    await provider.register("user", ep("10.0.0.2:9000"), ttl=5)
    await wait_for(lambda: addresses(consumer, "user") == {"10.0.0.1:9000", "10.0.0.2:9000"})
    assert trio.current_time() - t0 < 0.5  # pushed, not polled
    await provider.set_status("user", "10.0.0.2:9000", pb.Endpoint.STOPPING)
    await wait_for(lambda: any(e.status == pb.Endpoint.STOPPING for e in consumer.held()["user"].endpoints))  # type: ignore[attr-defined]
    rules = pb.RouteRules(service="user", rules=[pb.RouteRule(name="canary", endpoint_tags={"set": "b"})])
    await provider.put_route_rules(rules)
    await wait_for(lambda: "user" in consumer.held(TYPE_ROUTES))
    await provider.deregister("user", "10.0.0.1:9000")
    await provider.deregister("user", "10.0.0.2:9000")
    await wait_for(lambda: "user" not in consumer.held())  # last endpoint gone: service removed
    assert consumer.is_absent("user")
    assert [c.resource is None for c in changes if c.type_url == TYPE_ENDPOINTS][-1] is True
    with pytest.raises(DiscoveryError):
        await provider.deregister("user", "10.0.0.9:9000")
    with pytest.raises(DiscoveryError):
        await provider.register("bad/name", ep("10.0.0.1:1"))
    assert provider.registrations() == {}


async def test_lease_expiry_removes_endpoint(
    nursery: trio.Nursery, url: str, store: EmbeddedStore, server: ControlPlaneServer, make_client: Callable[..., DiscoveryClient]
) -> None:
    consumer = make_client("consumer")
    provider = DiscoveryClient([url], "provider", token=server.operator_token)
    provider_scope = trio.CancelScope()
    nursery.start_soon(_run_in, provider_scope, provider)
    await provider.register("pay", ep("10.0.0.5:9000"), ttl=0.3)
    await consumer.subscribe(["pay"], timeout=STEP)
    await trio.sleep(1.0)  # several TTLs: kept alive by the live connection
    assert addresses(consumer, "pay") == {"10.0.0.5:9000"}
    provider_scope.cancel()  # the provider dies without deregistering
    t0 = trio.current_time()
    await wait_for(lambda: "pay" not in consumer.held(), timeout=3)
    assert trio.current_time() - t0 < 2.0  # about one TTL (0.3 s), or lease_grace (0.2 s) after its session closed
    assert store.view.services == {}


async def _run_in(scope: trio.CancelScope, client: DiscoveryClient) -> None:
    with scope:
        await client.run()


async def test_nack_keeps_last_good_state(make_client: Callable[..., DiscoveryClient]) -> None:
    def no_port_666(type_url: str, name: str, res: object) -> None:
        if type_url == TYPE_ENDPOINTS and any(e.address.endswith(":666") for e in res.endpoints):  # type: ignore[attr-defined]
            raise ValueError("port 666 is cursed")

    provider = make_client("provider")
    consumer = make_client("consumer", validate=no_port_666)
    await provider.register("svc", ep("10.0.0.1:1"), ttl=5)
    await consumer.subscribe(["svc"], timeout=STEP)
    await provider.register("svc", ep("10.0.0.1:666"), ttl=5)
    await wait_for(lambda: "cursed" in consumer.core.last_error)
    assert addresses(consumer, "svc") == {"10.0.0.1:1"}
    await provider.deregister("svc", "10.0.0.1:666")  # back to a good state: no re-send needed
    await provider.register("svc", ep("10.0.0.2:2"), ttl=5)
    await wait_for(lambda: addresses(consumer, "svc") == {"10.0.0.1:1", "10.0.0.2:2"})


async def test_unknown_path_is_rejected(url: str) -> None:
    with pytest.raises(HandshakeError):
        with trio.fail_after(STEP):
            async with open_websocket_url(url.replace("/v1/discovery", "/nope")):
                pass  # pragma: no cover


async def test_subscribe_times_out_without_control_plane(nursery: trio.Nursery) -> None:
    client = DiscoveryClient([f"ws://127.0.0.1:{free_port()}/v1/discovery"], "lonely")
    nursery.start_soon(client.run)
    with pytest.raises(trio.TooSlowError):
        await client.subscribe(["x"], timeout=0.3)
    assert not client.connected and client.core.wanted(TYPE_ENDPOINTS) == {"x"}


async def test_snapshot_restore(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "state.json")
    rules = pb.RouteRules(service="a", rules=[pb.RouteRule(name="r", method="Get*", timeout_ms=100)])
    async with trio.open_nursery() as nursery:
        s1 = EmbeddedStore(path, snapshot_delay=0.01)
        await nursery.start(s1.run)
        lease = await s1.grant_lease(30)
        await s1.put_endpoint("a", ep("10.0.0.1:1", tags={"k": "v"}), lease.id)
        await s1.put_endpoint("b", ep("10.0.0.2:2"), lease.id)
        await s1.put_route_rules(rules)
        before = (await s1.get_endpoints("a"), await s1.get_route_rules("a"))
        await wait_for(lambda: os.path.exists(path) and "10.0.0.2:2" in open(path).read())
        nursery.cancel_scope.cancel()
    assert [f for f in os.listdir(str(tmp_path)) if ".tmp" in f] == []  # atomic: no leftovers
    async with trio.open_nursery() as nursery:
        s2 = EmbeddedStore(path)
        await nursery.start(s2.run)
        after = (await s2.get_endpoints("a"), await s2.get_route_rules("a"))
        assert after == before  # same content, same versions
        assert set(s2.view.services) == {"a", "b"}
        nursery.cancel_scope.cancel()


async def test_embedded_store_leases() -> None:
    async with trio.open_nursery() as nursery:
        s = EmbeddedStore()
        await nursery.start(s.run)
        short, long = await s.grant_lease(0.2), await s.grant_lease(30)
        await s.put_endpoint("a", ep("10.0.0.1:1"), short.id)
        await s.put_endpoint("a", ep("10.0.0.2:2"), long.id)
        await trio.sleep(0.1)
        assert await s.keepalive_lease(short.id)
        await trio.sleep(0.15)  # kept alive: still there
        assert set(s.view.services["a"]) == {"10.0.0.1:1", "10.0.0.2:2"}
        await wait_for(lambda: set(s.view.services["a"]) == {"10.0.0.2:2"}, timeout=1)
        assert not await s.keepalive_lease(short.id)
        # moving a key to another lease: revoking the old one does not delete it
        await s.put_endpoint("a", ep("10.0.0.2:2", weight=7), long.id)
        await s.revoke_lease(short.id)
        assert await s.set_status("a", "10.0.0.2:2", pb.Endpoint.UNHEALTHY)
        assert not await s.set_status("a", "10.9.9.9:9", pb.Endpoint.UNHEALTHY)
        await s.revoke_lease(long.id)
        assert s.view.services == {}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- a real process
@pytest.mark.e2e
async def test_process_restart_client_reconnects_and_keeps_state(tmp_path: object, nursery: trio.Nursery) -> None:
    port, snap = free_port(), os.path.join(str(tmp_path), "cp.json")
    log = os.path.join(str(tmp_path), "cp.log")
    args = ["--listen", f"127.0.0.1:{port}", "--snapshot", snap]
    proc, url = await start_control_plane(*args, log=log)
    try:
        changes: list[ResourceChange] = []
        fast = {"backoff": (0.05, 0.2), "connect_timeout": 0.5}
        provider = DiscoveryClient([url], "provider", token=OPERATOR_TOKEN, **fast)  # type: ignore[arg-type]
        consumer = DiscoveryClient([url], "consumer", changes.extend, token=OPERATOR_TOKEN, **fast)  # type: ignore[arg-type]
        nursery.start_soon(provider.run)
        nursery.start_soon(consumer.run)
        await provider.register("order", ep("10.0.0.7:9000"), ttl=5)
        await consumer.subscribe(["order"], timeout=STEP)
        held = consumer.held()
        await wait_for(lambda: os.path.exists(snap) and "10.0.0.7:9000" in open(snap).read())

        proc.kill()  # crash
        await kill(proc)
        await wait_for(lambda: not consumer.connected and not provider.connected)
        await trio.sleep(0.3)  # disconnected for a while: state kept
        assert consumer.held() == held and not consumer.connected
        changes.clear()

        proc, url2 = await start_control_plane(*args, log=log)
        assert url2 == url
        await wait_for(lambda: consumer.connections == 2 and provider.connections == 2 and consumer.connected)
        await trio.sleep(0.2)
        assert consumer.held() == held and changes == []  # nothing re-sent: versions matched
        # the restarted server pushes as before
        await provider.register("order", ep("10.0.0.8:9000"), ttl=5)
        await wait_for(lambda: addresses(consumer, "order") == {"10.0.0.7:9000", "10.0.0.8:9000"})
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await proc.wait() == 0
    finally:
        await kill(proc)


@pytest.mark.e2e
async def test_process_healthz_and_sigterm(tmp_path: object) -> None:
    state = str(tmp_path)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "octoproxy", "control-plane", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--state-dir", state],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(STEP):
            while b"\n" not in buf:
                buf += await proc.stdout.receive_some(4096)
        words = dict(w.split("=", 1) for w in buf.decode().split() if "=" in w)
        status, _, body = await http_request(words["admin"], "GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        client_url = f"ws://{words['listen']}/v1/discovery"
        # made at first start, owner-only
        token_path = os.path.join(state, "operator.token")
        assert os.stat(token_path).st_mode & 0o777 == 0o600
        assert os.stat(os.path.join(state, "ca.key")).st_mode & 0o777 == 0o600
        token = open(token_path).read().strip()
        auth = [("Authorization", f"Bearer {token}")]
        async with trio.open_nursery() as nursery:
            c = DiscoveryClient([client_url], "n-1", token=token)
            nursery.start_soon(c.run)
            await c.subscribe(["x"], timeout=STEP)
            status, _, body = await http_request(words["admin"], "GET", "/sessions")
            assert status == 401  # the admin API wants the operator token
            status, _, body = await http_request(words["admin"], "GET", "/sessions", headers=auth)
            [session] = json.loads(body)["sessions"]
            assert session["node_id"] == "n-1" and session["subscriptions"][TYPE_ENDPOINTS] == 1
            assert session["subscribed_sample"] == ["x"] and session["principal"] == "operator (operator-token)"
            nursery.cancel_scope.cancel()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await proc.wait() == 0
    finally:
        await kill(proc)
