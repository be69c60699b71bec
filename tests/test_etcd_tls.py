"""The etcd store over TLS with client certificates, against a real etcd started with
``--client-cert-auth`` (certificates made here with ``cryptography``, through our CA).

Without an ``etcd`` binary these tests FAIL, unless OCTOPROXY_SKIP_ETCD=1 (as test_etcd.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from test_controlplane import OPERATOR_TOKEN, STEP, TOKEN_FILE, addresses, ep, free_port, kill, start_control_plane, wait_for
from test_etcd import etcd_bin  # noqa: F401  (fixture)

from octoproxy.controlplane import DiscoveryClient, EtcdStore, StoreUnavailable
from octoproxy.controlplane._auth import make_join_token
from octoproxy.identity import CertificateAuthority, make_key_and_csr

pytestmark = [pytest.mark.etcd, pytest.mark.e2e]


class TlsEtcd:
    def __init__(self, d: Path, url: str, proc: trio.Process) -> None:
        self.dir, self.url, self.proc = d, url, proc
        self.ca, self.cert, self.key = d / "ca.pem", d / "client.pem", d / "client.key"


@pytest.fixture
async def tls_etcd(etcd_bin: str, tmp_path: Path) -> AsyncIterator[TlsEtcd]:  # noqa: F811
    ca = CertificateAuthority.generate("octoproxy.local", time.time())
    (tmp_path / "ca.pem").write_text(ca.trust_bundle_pem)
    server_key, server = ca.issue_control_plane(["127.0.0.1"], time.time(), 3600)  # any server certificate of our CA
    (tmp_path / "server.pem").write_text(server.chain_pem)
    (tmp_path / "server.key").write_text(server_key)
    key_pem, csr_pem = make_key_and_csr("octoproxy-control-plane")
    client = ca.sign_csr(csr_pem, "octoproxy-control-plane", time.time(), 3600)
    (tmp_path / "client.pem").write_text(client.chain_pem)
    (tmp_path / "client.key").write_text(key_pem)
    os.chmod(tmp_path / "client.key", 0o600)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    # fmt: off
    args = [
        etcd_bin, "--name", "tls0", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls0=http://127.0.0.1:{peer}",
        "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
        "--client-cert-auth", "--trusted-ca-file", str(tmp_path / "ca.pem"),
        "--logger", "zap", "--log-level", "error",
    ]
    # fmt: on
    with open(tmp_path / "etcd.log", "ab") as log:
        proc = await trio.lowlevel.open_process(args, stdout=log, stderr=subprocess.STDOUT)
    e = TlsEtcd(tmp_path, url, proc)
    try:
        with trio.fail_after(STEP):
            while True:
                assert proc.returncode is None, (tmp_path / "etcd.log").read_text()[-2000:]
                store = EtcdStore([url], ca_file=str(e.ca), cert_file=str(e.cert), key_file=str(e.key), request_timeout=0.5)
                try:
                    await store._call("/v3/kv/range", {"key": "eA=="})
                    break
                except StoreUnavailable:
                    await trio.sleep(0.1)
        yield e
    finally:
        await kill(proc)


async def test_store_over_tls_with_a_client_certificate(tls_etcd: TlsEtcd) -> None:
    e = tls_etcd
    async with trio.open_nursery() as nursery:
        a = EtcdStore([e.url], prefix="/tls/", ca_file=str(e.ca), cert_file=str(e.cert), key_file=str(e.key))
        b = EtcdStore([e.url], prefix="/tls/", ca_file=str(e.ca), cert_file=str(e.cert), key_file=str(e.key))
        await nursery.start(a.run)
        await nursery.start(b.run)  # list + watch over TLS
        lease = await a.grant_lease(5)
        await a.put_endpoint("echo", ep("127.0.0.1:9000"), lease.id)
        _, record = make_join_token("echo", time.time())
        await a.put_token(record)
        await wait_for(lambda: "echo" in b.view.services and record.id in b.view.tokens)
        await trio.sleep(1.5)  # a health probe or two over TLS: the watch stays
        await a.delete_endpoint("echo", "127.0.0.1:9000")
        await wait_for(lambda: "echo" not in b.view.services)
        nursery.cancel_scope.cancel()


async def test_no_client_certificate_or_wrong_ca_is_refused(tls_etcd: TlsEtcd, tmp_path: Path) -> None:
    e = tls_etcd
    without_cert = EtcdStore([e.url], ca_file=str(e.ca), request_timeout=1.0)
    with pytest.raises(StoreUnavailable):
        await without_cert.grant_lease(5)
    other = CertificateAuthority.generate("octoproxy.local", time.time())
    (tmp_path / "other.pem").write_text(other.trust_bundle_pem)
    wrong_ca = EtcdStore([e.url], ca_file=str(tmp_path / "other.pem"), cert_file=str(e.cert), key_file=str(e.key), request_timeout=1.0)
    with pytest.raises(StoreUnavailable):
        await wrong_ca.grant_lease(5)
    with pytest.raises(ValueError, match="https"):
        EtcdStore(["http://127.0.0.1:2379"], ca_file=str(e.ca))


async def test_control_plane_process_over_tls_etcd(tls_etcd: TlsEtcd, nursery: trio.Nursery) -> None:
    e = tls_etcd
    args = ["--listen", "127.0.0.1:0", "--store", "etcd", "--etcd-endpoints", e.url, "--etcd-ca-file", str(e.ca),
            "--etcd-cert-file", str(e.cert), "--etcd-key-file", str(e.key), "--operator-token-file", TOKEN_FILE]
    proc, url = await start_control_plane(*args, log=str(e.dir / "cp.log"))
    try:
        c = DiscoveryClient([url], "op", token=OPERATOR_TOKEN)
        nursery.start_soon(c.run)
        await c.register("echo", ep("127.0.0.1:9100"), ttl=5)
        await c.subscribe(["echo"], timeout=STEP)
        assert addresses(c, "echo") == {"127.0.0.1:9100"}
    finally:
        await kill(proc)
