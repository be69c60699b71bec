"""A governance policy applied live, under load, fails no call in flight.

The caller's proxy runs in this process (so the test can call
``Proxy.set_governance`` as the discovery shell does when the control plane
pushes a policy); the providers (apps and their proxies) are real processes.
"""

from __future__ import annotations

import sys
import tomllib

import pytest
import trio

from e2e import HERE, free_port, proxy, run_process, short_tmpdir, wait_ready
from octoproxy import sdk
from octoproxy.proxy._config import parse_config
from octoproxy.governance import parse_policy_set
from octoproxy.proxy._server import Proxy
from test_gov_e2e import RESILIENT, TAGS, caller_proxy_toml, provider_proxy_toml

pytestmark = pytest.mark.e2e

LIMITS = """
[governance]
version = "3"
[governance.services.echo.breaker]
max_requests = 100000
[[governance.services.echo.rate_limits]]
name = "high"
direction = "outbound"
rate = 100000.0
[governance.services.echo.tracing]
"""


async def test_policy_pushed_under_load_fails_no_call() -> None:
    policies = [parse_policy_set(tomllib.loads(t)["governance"]) for t in (RESILIENT, TAGS, LIMITS)]
    with short_tmpdir() as d, trio.fail_after(60):
        ports = [free_port(), free_port()]
        async with (
            run_process([sys.executable, str(HERE / "apps" / "gov_provider.py"), "--uds", str(d / "a.sock"), "--name", "a"], "provider ready", d, "a"),
            run_process([sys.executable, str(HERE / "apps" / "gov_provider.py"), "--uds", str(d / "b.sock"), "--name", "b"], "provider ready", d, "b"),
            proxy(d, "pa", provider_proxy_toml(d, "pa", ports[0], d / "a.sock")) as pa,
            proxy(d, "pb", provider_proxy_toml(d, "pb", ports[1], d / "b.sock")) as pb,
        ):
            await wait_ready(pa)
            await wait_ready(pb)
            cfg = parse_config(tomllib.loads(caller_proxy_toml(d, [(ports[0], {"swimlane": "blue"}), (ports[1], {})])), base_dir=d)
            px = Proxy(cfg)
            async with trio.open_nursery() as n:
                await n.start(px.run)
                cluster = px.engine.clusters["echo"]
                while sum(len(v) for v in cluster.links.values()) < 2:
                    await trio.sleep(0.02)
                ok = 0
                failures: list[sdk.CallError] = []
                stop = trio.Event()
                async with sdk.open_client(d / "caller.sock") as client:

                    async def worker(method: str, body: bytes, lane: str | None) -> None:
                        nonlocal ok
                        while not stop.is_set():
                            try:
                                await client.call("echo", method, body, metadata={"swimlane": lane} if lane else None, timeout=5)
                                ok += 1
                            except sdk.CallError as exc:
                                failures.append(exc)
                            await trio.sleep(0.002)

                    async with trio.open_nursery() as load:
                        for w in range(4):
                            load.start_soon(worker, "echo", b"x", "blue" if w % 2 else None)
                        load.start_soon(worker, "sleep", b"0.2", None)  # calls in flight across every change
                        load.start_soon(worker, "sleep", b"0.2", "blue")
                        for k in range(12):
                            ps = policies[k % 3] if k % 4 != 3 else None
                            px.set_governance(ps)
                            assert px.engine.governed_routes() == ([] if ps is None else ["echo/*"])
                            assert (px.engine._route_clusters[0] is None) == (ps is not None)  # governed: off the fast path
                            await trio.sleep(0.15)
                        stop.set()
                px.request_shutdown()
            assert failures == [], failures[:3]
            assert ok > 200


WARMUP = """
[governance]
[governance.services.echo.routing]
slow_start = { window = 10.0, min_weight_percent = 10.0, step = 0.25 }
"""


async def test_a_warming_endpoint_gets_a_small_share_that_grows() -> None:
    import time
    from collections import Counter

    policy = parse_policy_set(tomllib.loads(WARMUP)["governance"])
    with short_tmpdir() as d, trio.fail_after(60):
        ports = [free_port(), free_port()]
        async with (
            run_process([sys.executable, str(HERE / "apps" / "gov_provider.py"), "--uds", str(d / "a.sock"), "--name", "a"], "provider ready", d, "a"),
            run_process([sys.executable, str(HERE / "apps" / "gov_provider.py"), "--uds", str(d / "b.sock"), "--name", "b"], "provider ready", d, "b"),
            proxy(d, "pa", provider_proxy_toml(d, "pa", ports[0], d / "a.sock")) as pa,
            proxy(d, "pb", provider_proxy_toml(d, "pb", ports[1], d / "b.sock")) as pb,
        ):
            await wait_ready(pa)
            await wait_ready(pb)
            cfg = parse_config(tomllib.loads(caller_proxy_toml(d, [(ports[0], {}), (ports[1], {})])), base_dir=d)
            px = Proxy(cfg)
            async with trio.open_nursery() as n:
                await n.start(px.run)
                cluster = px.engine.clusters["echo"]
                while sum(len(v) for v in cluster.links.values()) < 2:
                    await trio.sleep(0.02)
                px.set_governance(policy)
                # what the discovery shell does when a registration brings a warm-up start (unix ms)
                cluster.endpoints[1].warmup_start_ms = int(time.time() * 1000)
                cluster.__post_init__()
                async with sdk.open_client(d / "caller.sock") as client:

                    async def split(n_calls: int) -> float:
                        seen: Counter[bytes] = Counter()

                        async def one() -> None:
                            for _ in range(n_calls // 4):
                                seen[await client.call("echo", "who", b"", timeout=5)] += 1

                        async with trio.open_nursery() as w:
                            for _ in range(4):
                                w.start_soon(one)
                        return seen[b"b"] / sum(seen.values())

                    early = await split(300)
                    await trio.sleep(10.5)
                    late = await split(300)
                px.request_shutdown()
            assert early < 0.3, early
            assert late > 0.38, late
