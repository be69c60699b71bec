"""The admin listener through hot restarts: a health check never sees a reset.

The admin listening socket is handed to the new generation like the others,
so during a hand-over both processes hold it. Before the fix, the old
generation's accept loop and the tasks serving admin connections shared one
nursery: stopping accepting at the hand-over cancelled a GET /ready it had
just accepted, and the probe got ECONNRESET (Kubernetes would count a failed
probe). Now the old generation stops accepting at the hand-over and serves
what it accepted to completion.
"""

from __future__ import annotations

import errno

import pytest
import trio

from e2e import Proc, free_port, provider, provider_toml, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from octoproxy.common._admin import http_request

pytestmark = pytest.mark.e2e

RESTARTS = 4
PROBERS = 6


async def test_health_checks_see_no_reset_through_hot_restarts() -> None:
    with trio.fail_after(90), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        cfg = d / "p.toml"
        cfg.write_text(provider_toml(d, port, app_uds, drain_time="2.0"))
        statuses: dict[tuple[str, int], int] = {}
        errors: list[str] = []
        done = trio.Event()
        async with provider(d, app_uds):
            gen = await start_process(proxy_argv(cfg), "octoproxy ready", d, "g0")
            procs: list[Proc] = [gen]
            try:
                await wait_ready(gen)
                admin = gen.admin  # the same socket in every generation

                async def prober(path: str) -> None:
                    while not done.is_set():
                        try:
                            status, _h, _b = await http_request(admin, "GET", path, timeout=10)
                        except (OSError, trio.BrokenResourceError) as exc:
                            errors.append(f"{path}: {exc!r}")
                        else:
                            statuses[path, status] = statuses.get((path, status), 0) + 1
                        await trio.sleep(0)

                async with trio.open_nursery() as n:
                    for i in range(PROBERS):
                        n.start_soon(prober, "/ready" if i % 2 else "/healthz")
                    for i in range(RESTARTS):
                        old = gen
                        gen = await start_process(proxy_argv(cfg, hot_restart=True), "octoproxy ready", d, f"g{i + 1}")
                        procs.append(gen)
                        with trio.fail_after(20):
                            assert await old.process.wait() == 0, old.stderr()[-2000:]
                    await trio.sleep(0.2)
                    done.set()
                assert await gen.metric("octoproxy_hot_restart_generation") == RESTARTS
            finally:
                for p in procs:
                    await stop(p)
        print(statuses)
        resets = [e for e in errors if "ECONNRESET" in e or str(errno.ECONNRESET) in e or "reset" in e.lower()]
        assert errors == [], f"{len(errors)} failed probes ({len(resets)} resets): {errors[:5]}"
        assert set(statuses) <= {("/healthz", 200), ("/ready", 200), ("/ready", 503)}, statuses
        # the old generation stops accepting the moment the new one is ready: a 503
        # "draining" can only come from a probe it had accepted just before
        assert statuses.get(("/healthz", 200), 0) > 20 and statuses.get(("/ready", 200), 0) > 20, statuses
