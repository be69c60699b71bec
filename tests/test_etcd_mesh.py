"""The whole mesh over etcd: a 3-member etcd cluster, two control-plane
replicas, proxies registering and subscribing; a replica and an etcd member
killed under load without a failed call."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from e2e import Load, free_port, provider, proxy_argv, short_tmpdir, start_process, stop
from octoproxy import sdk
from octoproxy.controlplane import EtcdStore
from octoproxy.controlplane._auth import make_join_token
from test_controlplane import kill
from test_etcd import Member, etcd_bin, etcd_cluster, replicas  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]


def discovery(urls: list[str], token_file: Path) -> str:
    quoted = ", ".join(f'"{u}"' for u in urls)
    return (
        f"[discovery]\ncontrol_plane = [{quoted}]\nlease_ttl = 2.0\nsubscribe_timeout = 5.0\n"
        f'join_token_file = "{token_file}"\n'
    )


async def join_token(members: list[Member], service: str, d: Path) -> Path:
    """Put a join token of ``service`` straight into etcd (every replica's view gets it by watch)."""
    token, record = make_join_token(service, time.time())
    await EtcdStore([m.client_url for m in members]).put_token(record)
    path = d / f"{service}.token"
    path.write_text(token)
    path.chmod(0o600)
    return path


async def test_mesh_over_etcd_survives_replica_and_member_loss(etcd_cluster: list[Member], replicas) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    (cp_a, url_a), (cp_b, url_b) = await replicas(etcd_cluster)
    with trio.fail_after(90), short_tmpdir() as d:
        port = free_port()
        pcfg = d / "p.toml"
        pcfg.write_text(
            f'[proxy]\nservice = "echo"\n[outbound]\nuds = "{d}/p-out.sock"\n[inbound]\nlisten = "127.0.0.1:{port}"\n'
            f'app_uds = "{d}/app.sock"\n[admin]\nlisten = "127.0.0.1:0"\n' + discovery([url_a], await join_token(etcd_cluster, "echo", d))
        )
        ccfg = d / "c.toml"
        ccfg.write_text(
            f'[proxy]\nservice = "web"\n[outbound]\nuds = "{d}/c.sock"\n[admin]\nlisten = "127.0.0.1:0"\n'
            "[upstream]\nconnect_timeout = 0.5\n" + discovery([url_b, url_a], await join_token(etcd_cluster, "web", d))
        )
        async with provider(d, d / "app.sock"):
            pp = await start_process(proxy_argv(pcfg), "octoproxy ready", d, "pp")
            cp = await start_process(proxy_argv(ccfg), "octoproxy ready", d, "cp")
            try:
                # registered through replica A, seen through replica B
                with trio.fail_after(10):
                    while (await sdk.subscribe(cp.admin, ["echo"], timeout=5)) != {"echo": 1}:
                        await trio.sleep(0.1)
                load = Load(b"e")

                async with sdk.open_client(d / "c.sock") as client, trio.open_nursery() as n:
                    for _ in range(8):
                        n.start_soon(load.worker, client)
                    await trio.sleep(0.5)
                    await kill(cp_b)  # the caller's replica: it fails over to A
                    with trio.fail_after(15):
                        while (await cp.json("/ready"))["discovery"]["control_plane"]["url"] != url_a:  # type: ignore[index]
                            await trio.sleep(0.05)
                    proc = etcd_cluster[0].proc
                    assert proc is not None
                    await kill(proc)  # one etcd member of three
                    await trio.sleep(3.0)  # longer than the lease: registrations must be kept alive
                    before = load.ok
                    await trio.sleep(0.5)
                    load.stop()
                assert load.ok > before > 0
                assert load.failures == [], load.failures[:5]
                clusters = await cp.json("/clusters")
                assert len(clusters["echo"]["endpoints"]) == 1  # type: ignore[index]
            finally:
                await stop(cp)
                await stop(pp)
