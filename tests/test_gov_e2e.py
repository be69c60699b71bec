"""End-to-end governance: real `octoproxy run` processes for every proxy, SDK apps, loopback only.

An SDK caller -> the caller's proxy (governed route to "echo") -> N provider
proxies -> N provider apps (tests/apps/gov_provider.py, which say who they
are and echo the metadata they saw). Covers docs/governance.md section 10 as
wired: outlier ejection and safe retries when a provider is killed under
load, NOT_PROCESSED resends, tag routing with fallback and force, the circuit
breaker's OVERLOADED, rate limits both sides, traceparent across two hops,
per-caller metrics and the access log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from e2e import HERE, Proc, free_port, proxy, run_process, short_tmpdir, wait_ready
from octoproxy import Status, sdk

pytestmark = pytest.mark.e2e


def provider_proxy_toml(d: Path, name: str, port: int, app_uds: Path, gov: str = "") -> str:
    return f"""
[proxy]
service = "echo"
drain_time = 1.0
shutdown_time = 3.0
[outbound]
uds = "{d}/{name}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{app_uds}"
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.2
{gov}
"""


def caller_proxy_toml(d: Path, endpoints: list[tuple[int, dict[str, str]]], gov: str = "", timeout: float = 5.0, proxy_extra: str = "") -> str:
    """``tags`` keys starting with ``=`` are endpoint fields (``{"=idc": "i1"}``), the others tags."""

    def fields(tags: dict[str, str]) -> str:
        out = "".join(f', {k[1:]} = "{v}"' for k, v in tags.items() if k.startswith("="))
        plain = {k: v for k, v in tags.items() if not k.startswith("=")}
        if plain:
            out += ", tags = { " + ", ".join(f'{k} = "{v}"' for k, v in plain.items()) + " }"
        return out

    eps = ", ".join(f'{{ address = "127.0.0.1:{port}"{fields(tags)} }}' for port, tags in endpoints)
    return f"""
[proxy]
service = "caller-app"
{proxy_extra}
drain_time = 1.0
shutdown_time = 3.0
[outbound]
uds = "{d}/caller.sock"
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.3
connections_per_endpoint = 1
[[routes]]
service = "echo"
cluster = "echo"
timeout = {timeout}
[clusters.echo]
endpoints = [ {eps} ]
{gov}
"""


@dataclass
class Provider:
    name: str
    port: int
    app: Proc
    proxy: Proc


@dataclass
class GovMesh:
    dir: Path
    caller: Proc
    providers: dict[str, Provider] = field(default_factory=dict)

    @property
    def sock(self) -> Path:
        return self.dir / "caller.sock"

    def kill(self, name: str, app: bool = True, proxy_too: bool = True) -> None:
        p = self.providers[name]
        targets = ([p.proxy] if proxy_too else []) + ([p.app] if app else [])
        for proc in targets:
            try:
                os.killpg(proc.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@asynccontextmanager
async def gov_mesh(
    providers: list[tuple[str, dict[str, str]]], caller_gov: str = "", provider_gov: str = "", timeout: float = 5.0, proxy_extra: str = "",
    links: int | None = None,
) -> AsyncIterator[GovMesh]:
    with short_tmpdir() as d:
        async with AsyncExitStack() as stack:
            made: dict[str, Provider] = {}
            for name, _tags in providers:
                port = free_port()
                uds = d / f"{name}-app.sock"
                argv = [sys.executable, str(HERE / "apps" / "gov_provider.py"), "--uds", str(uds), "--name", name]
                app = await stack.enter_async_context(run_process(argv, "provider ready", d, f"{name}-app"))
                pp = await stack.enter_async_context(proxy(d, f"{name}-proxy", provider_proxy_toml(d, name, port, uds, provider_gov)))
                made[name] = Provider(name, port, app, pp)
            toml = caller_proxy_toml(d, [(made[n].port, tags) for n, tags in providers], caller_gov, timeout, proxy_extra)
            cp = await stack.enter_async_context(proxy(d, "caller-proxy", toml))
            with trio.fail_after(15):
                for p in made.values():
                    await wait_ready(p.proxy)
                await wait_ready(cp)
                while await cp.metric('octoproxy_upstream_connections{cluster="echo"}') < (len(made) if links is None else links):
                    await trio.sleep(0.05)
            yield GovMesh(d, cp, made)


RESILIENT = """
[governance]
version = "1"
[governance.services.echo.outlier]
consecutive_failures = 3
interval = 1.0
base_ejection_time = 5.0
max_ejection_percent = 50
[governance.services.echo.breaker]
max_retries = 64
[governance.services.echo.retry]
max_attempts = 3
idempotent_methods = ["echo", "who", "sleep"]
"""


class Load:
    """Closed-loop calls of one method until stopped; counts by outcome."""

    def __init__(self, method: str, unique: bool = False) -> None:
        self.method = method
        self.unique = unique
        self.ok = 0
        self.failures: list[sdk.CallError] = []
        self.stop = trio.Event()
        self._n = 0

    async def worker(self, client: sdk.Client, wid: int) -> None:
        while not self.stop.is_set():
            self._n += 1
            body = f"{wid}-{self._n}".encode()
            try:
                await client.call("echo", self.method, body, timeout=5)
                self.ok += 1
            except sdk.CallError as exc:
                self.failures.append(exc)
            await trio.sleep(0.003)


async def seen(client: sdk.Client, mesh: GovMesh, names: list[str]) -> Counter[str]:
    """Every call id the named providers executed, with how many times (via their own proxies)."""
    ids: Counter[str] = Counter()
    # ask each provider app directly over its UDS: its proxy's inbound would be balanced
    for name in names:
        async with sdk.open_client(mesh.dir / f"{name}-app.sock") as c:
            data = json.loads(await c.call("echo", "seen", b"", timeout=5))
        assert data["duplicates"] == 0, (name, data)
        ids.update(data["ids"])
    return ids


async def test_killed_provider_is_retried_elsewhere_with_no_failed_idempotent_call() -> None:
    with trio.fail_after(60):
        async with gov_mesh([("a", {}), ("b", {}), ("c", {})], RESILIENT) as m, sdk.open_client(m.sock) as client:
            idem = Load("echo")
            unsafe = Load("count")
            slow: list[bytes] = []

            async def sleeper() -> None:  # surely in flight on every provider at the kill
                slow.append(await client.call("echo", "sleep", b"0.5", timeout=5))

            async with trio.open_nursery() as n:
                for w in range(6):
                    n.start_soon(idem.worker, client, w)
                for w in range(2):
                    n.start_soon(unsafe.worker, client, 100 + w)
                await trio.sleep(1.0)
                before = idem.ok
                for _ in range(20):
                    n.start_soon(sleeper)
                await trio.sleep(0.2)
                m.kill("c")
                await trio.sleep(1.5)
                idem.stop.set()
                unsafe.stop.set()
            assert idem.failures == [], idem.failures[:3]
            assert slow == [b"slept"] * 20  # the ones in flight on c went again elsewhere
            assert idem.ok > before + 50
            # a call that may have been processed by the killed provider is never resent:
            # it fails, and only the ones that were in flight on its connection do
            assert len(unsafe.failures) <= 4, unsafe.failures
            for exc in unsafe.failures:
                assert exc.status == Status.UNAVAILABLE and "connection lost" in exc.message, exc
            ids = await seen(client, m, ["a", "b"])  # no duplicate on the survivors
            assert sum(ids.values()) == len(ids)
            assert await m.caller.metric('octoproxy_retries_total{cluster="echo"}') >= 1


async def test_dead_app_answers_not_processed_and_even_unsafe_calls_move_on() -> None:
    with trio.fail_after(60):
        async with gov_mesh([("a", {}), ("b", {})], RESILIENT) as m, sdk.open_client(m.sock) as client:
            for i in range(20):
                await client.call("echo", "count", f"warm-{i}".encode(), timeout=5)
            m.kill("b", app=True, proxy_too=False)  # its proxy stays, with no app behind it
            await trio.sleep(0.5)
            failures = []
            for i in range(100):
                try:
                    assert await client.call("echo", "count", f"id-{i}".encode(), timeout=5) == b"a"
                except sdk.CallError as exc:
                    failures.append(exc)
            assert failures == []
            ids = await seen(client, m, ["a"])
            assert all(ids[f"id-{i}"] == 1 for i in range(100))
            # b's proxy said NOT_PROCESSED (its rejected counter), and b was ejected
            assert await m.providers["b"].proxy.metric("octoproxy_rejected_total") >= 1
            gov = (await m.caller.json("/clusters"))["echo"]["governance"]  # type: ignore[index]
            assert gov["ejected"] == [f"127.0.0.1:{m.providers['b'].port}"]
            assert gov["breaker"]["requests"] == 0 and gov["breaker"]["retries"] == 0
            assert await m.caller.metric('octoproxy_outlier_ejections_total{cluster="echo"}') == 1


TAGS = """
[governance]
[[governance.services.echo.routing.rules]]
name = "blue"
match_metadata = { swimlane = "blue" }
endpoint_tags = { swimlane = "blue" }
[[governance.services.echo.routing.rules]]
name = "green"
match_metadata = { swimlane = "green" }
endpoint_tags = { swimlane = "green" }
force = true
[[governance.services.echo.routing.rules]]
name = "red"
match_metadata = { swimlane = "red" }
endpoint_tags = { swimlane = "red" }
[governance.services.echo.retry]
idempotent_methods = ["who"]
"""


async def test_tag_routing_with_fallback_and_force() -> None:
    with trio.fail_after(60):
        async with gov_mesh([("blue", {"swimlane": "blue"}), ("p1", {}), ("p2", {})], TAGS) as m, sdk.open_client(m.sock) as client:

            async def who(lane: str | None, n: int = 30) -> Counter[bytes]:
                md = {"swimlane": lane} if lane else None
                return Counter([await client.call("echo", "who", b"", metadata=md, timeout=5) for _ in range(n)])

            assert await who("blue") == Counter({b"blue": 30})
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "who", b"", metadata={"swimlane": "green"}, timeout=5)
            assert info.value.status == Status.NO_ROUTE
            assert "rule 'green'" in info.value.message and "force" in info.value.message
            red = await who("red")  # no endpoint tagged red: falls back to every endpoint
            assert len(red) >= 2
            plain = await who(None, 60)
            assert set(plain) == {b"blue", b"p1", b"p2"}
            m.kill("blue")
            await trio.sleep(0.3)
            after = await who("blue")  # the subset is empty now: fallback to the others
            assert set(after) <= {b"p1", b"p2"}, after


BREAKER = """
[governance]
[governance.services.echo.breaker]
max_requests = 2
"""


async def test_circuit_breaker_answers_overloaded_with_the_reason() -> None:
    with trio.fail_after(30):
        async with gov_mesh([("a", {})], BREAKER) as m, sdk.open_client(m.sock) as client:
            results: list[bytes] = []

            async def sleeper() -> None:
                results.append(await client.call("echo", "sleep", b"1.0", timeout=5))

            async with trio.open_nursery() as n:
                n.start_soon(sleeper)
                n.start_soon(sleeper)
                await trio.sleep(0.3)
                with pytest.raises(sdk.CallError) as info:
                    await client.call("echo", "who", b"", timeout=5)
                assert info.value.status == Status.OVERLOADED
                assert "circuit breaker open" in info.value.message and "max_requests (2)" in info.value.message
            assert results == [b"slept", b"slept"]
            assert await client.call("echo", "who", b"", timeout=5) == b"a"  # units given back
            dump = await m.caller.json("/config_dump")
            assert dump["governance"] == {"version": "", "governed_routes": ["echo/*"]}  # type: ignore[index]
            assert await m.caller.metric('octoproxy_rejected_total{reason="circuit_breaker"}') == 1


CONNECTION_LIMIT = """
[governance]
[governance.services.echo.breaker]
max_connections = 2
"""


async def test_connection_breaker_caps_the_upstream_pool() -> None:
    """max_connections: the pool dials no more than the limit; calls use the links that are open."""
    with trio.fail_after(40):
        async with gov_mesh([("a", {}), ("b", {}), ("c", {})], CONNECTION_LIMIT, links=2) as m, sdk.open_client(m.sock) as client:
            await trio.sleep(1.5)  # a third dial would have happened by now (connect is loopback)
            assert await m.caller.metric('octoproxy_upstream_connections{cluster="echo"}') == 2
            assert await m.caller.metric('octoproxy_errors_total{kind="upstream_connections_limited"}') >= 1
            served = Counter([await client.call("echo", "who", b"", timeout=5) for _ in range(30)])
            assert sum(served.values()) == 30 and len(served) == 2, served  # two endpoints have a link
            # a provider dies: its unit comes back and the third endpoint gets the connection
            dead = next(n for n in "abc" if n.encode() in served)
            m.kill(dead)
            with trio.fail_after(15):
                while True:
                    try:
                        if await client.call("echo", "who", b"", timeout=5) not in served:
                            break
                    except sdk.CallError:
                        pass
                    await trio.sleep(0.1)
            assert await m.caller.metric('octoproxy_upstream_connections{cluster="echo"}') <= 2


OUT_LIMIT = """
[governance]
[[governance.services.echo.rate_limits]]
name = "out"
direction = "outbound"
rate = 10.0
burst = 5.0
"""

IN_LIMIT = """
[governance]
[[governance.services.echo.rate_limits]]
name = "per-caller"
caller = "*"
rate = 10.0
burst = 5.0
"""


@pytest.mark.parametrize("side", ["outbound", "inbound"])
async def test_rate_limit_answers_rate_limited(side: str) -> None:
    caller_gov, provider_gov = (OUT_LIMIT, "") if side == "outbound" else ("", IN_LIMIT)
    with trio.fail_after(30):
        async with gov_mesh([("a", {})], caller_gov, provider_gov) as m, sdk.open_client(m.sock) as client:
            outcomes: Counter[str] = Counter()
            messages = set()
            for _ in range(30):
                try:
                    await client.call("echo", "who", b"", timeout=5)
                    outcomes["ok"] += 1
                except sdk.CallError as exc:
                    outcomes[exc.status.name] += 1
                    messages.add(exc.message)
            assert outcomes["RATE_LIMITED"] >= 15, outcomes
            assert 5 <= outcomes["ok"] <= 12, outcomes
            name = "out" if side == "outbound" else "per-caller"
            assert any(f"rate limited by {name!r}" in msg for msg in messages), messages


TRACED = """
[governance]
[governance.services.echo.tracing]
[governance.services.echo.access_log]
sample_rate = 1.0
"""


async def test_traceparent_reaches_the_app_with_a_new_span_per_hop_and_metrics_by_caller() -> None:
    with trio.fail_after(30):
        async with gov_mesh([("a", {})], TRACED, TRACED) as m, sdk.open_client(m.sock) as client:
            sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            seen_by_app = json.loads(await client.call("echo", "meta", b"", metadata={"traceparent": sent, "tracestate": "k=v"}, timeout=5))
            tp = seen_by_app["metadata"]["traceparent"]
            version, trace_id, span, flags = tp.split("-")
            assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
            assert span != "00f067aa0ba902b7" and len(span) == 16
            assert seen_by_app["metadata"]["tracestate"] == "k=v"
            assert seen_by_app["caller"] == "caller-app"
            fresh = json.loads(await client.call("echo", "meta", b"", timeout=5))["metadata"]["traceparent"]
            assert fresh.startswith("00-") and len(fresh) == 55 and fresh.split("-")[1] != trace_id
            labels = 'service="echo",method="meta",caller="caller-app"'
            assert await m.caller.metric(f'octoproxy_calls_total{{direction="outbound",{labels},status="OK"}}') == 2
            assert await m.caller.metric(f'octoproxy_call_duration_seconds_count{{direction="outbound",{labels}}}') == 2
            pp = m.providers["a"].proxy
            assert await pp.metric(f'octoproxy_calls_total{{direction="inbound",{labels},status="OK"}}') == 2
            with trio.fail_after(5):
                while '"method":"meta"' not in m.caller.stderr():
                    await trio.sleep(0.05)
            line = next(ln for ln in m.caller.stderr().splitlines() if '"method":"meta"' in ln)
            record = json.loads(line[line.index("{") :])
            assert record["status"] == "OK" and record["caller"] == "caller-app" and record["attempts"] == 1


async def test_ungoverned_route_has_no_caller_metrics() -> None:
    with trio.fail_after(30):
        async with gov_mesh([("a", {})]) as m, sdk.open_client(m.sock) as client:
            assert await client.call("echo", "who", b"", timeout=5) == b"a"
            assert await m.caller.metric("octoproxy_calls_total{") == 0
            assert (await m.caller.json("/config_dump"))["governance"] is None  # type: ignore[index]
            assert await m.caller.metric('octoproxy_requests_total{direction="outbound",service="echo",method="who",status="OK"}') == 1


LOCALITY = """
[governance]
[governance.services.echo.routing]
locality = "prefer"
[governance.services.echo.outlier]
[governance.services.echo.retry]
idempotent_methods = ["who"]
"""


async def test_locality_prefers_the_same_idc_then_region_then_others_then_backups() -> None:
    providers = [
        ("near", {"=region": "r1", "=idc": "i1"}),
        ("far", {"=region": "r1", "=idc": "i2"}),
        ("remote", {"=region": "r2", "=idc": "i9"}),
        ("bak", {"=region": "r1", "=idc": "i1", "=role": "backup"}),
    ]
    with trio.fail_after(60):
        async with gov_mesh(providers, LOCALITY, proxy_extra='region = "r1"\nidc = "i1"') as m, sdk.open_client(m.sock) as client:

            async def who(n: int = 40) -> Counter[bytes]:
                return Counter([await client.call("echo", "who", b"", timeout=5) for _ in range(n)])

            assert (await who())[b"near"] >= 39  # the others keep a trickle (x0.001, x0.000001)
            for dead, nxt in (("near", b"far"), ("far", b"remote"), ("remote", b"bak")):
                m.kill(dead)
                await trio.sleep(0.3)  # its connection is seen lost
                assert (await who())[nxt] >= 39, (dead, nxt)


STEADY_LIMIT = """
[governance]
[[governance.services.echo.rate_limits]]
name = "steady"
direction = "outbound"
rate = 30.0
burst = 3.0
"""


async def test_rate_limit_holds_its_rate_within_ten_percent_over_ten_seconds() -> None:
    with trio.fail_after(40):
        async with gov_mesh([("a", {})], STEADY_LIMIT) as m, sdk.open_client(m.sock) as client:
            ok = 0
            limited = 0

            async def worker() -> None:
                nonlocal ok, limited
                while trio.current_time() < end:
                    try:
                        await client.call("echo", "who", b"", timeout=5)
                        ok += 1
                    except sdk.CallError as exc:
                        assert exc.status == Status.RATE_LIMITED
                        limited += 1
                    await trio.sleep(0.005)

            end = trio.current_time() + 10.0
            async with trio.open_nursery() as n:
                for _ in range(4):
                    n.start_soon(worker)
            assert limited > ok  # offered well above the rate
            assert abs(ok - (30 * 10 + 3)) <= 30, ok
