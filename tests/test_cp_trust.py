"""The control plane trusts no one (issue 11, item 2) and bounds every session (issue 10).

Each attack that worked against the control plane before it authenticated
sessions is re-run here and must now fail to do harm: an anonymous session,
a service registering, deregistering or setting the status of another
service's endpoint, route rules from a service, link-local or unspecified
addresses, a flood of registrations, leases outliving their session, a
provider whose registration vanished, oversized subscriptions. Then the CA
(issuance, refusals, a certificate-authenticated TLS session), the admin API
and ``octoproxy ctl``, and the snapshot's file mode.

Loopback only, real clock, every wait bounded.
"""

from __future__ import annotations

import gc
import json
import os
import ssl
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from test_controlplane import STEP, ep, wait_for
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from octoproxy.common._admin import http_request, serve_admin
from octoproxy.discovery._xds_server import check_address
from octoproxy.controlplane import ControlPlaneServer, DiscoveryClient, DiscoveryError, EmbeddedStore
from octoproxy.controlplane._admin_api import admin_routes
from octoproxy.controlplane._auth import Authenticator, make_join_token
from octoproxy.identity import CertificateAuthority, CertificateError, make_key_and_csr
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

SRC = Path(__file__).resolve().parent.parent / "src" / "octoproxy"


# ---------------------------------------------------------------- fixtures
class CP:
    def __init__(self, store: EmbeddedStore, server: ControlPlaneServer, url: str, nursery: trio.Nursery) -> None:
        self.store, self.server, self.url, self.nursery = store, server, url, nursery

    def token(self, service: str, ttl: float = 0.0) -> str:
        token, record = make_join_token(service, time.time(), ttl)
        self.store.view.set_token(record)
        return token

    def client(self, node: str, token: str | None, **kw: object) -> DiscoveryClient:
        c = DiscoveryClient(
            [kw.pop("url", self.url)], node, token=token, backoff=(0.05, 0.2), connect_timeout=2.0, **kw  # type: ignore[arg-type]
        )
        self.nursery.start_soon(c.run)
        return c

    def service(self, service: str, **kw: object) -> DiscoveryClient:
        return self.client(f"{service}-proxy", self.token(service), **kw)

    def operator(self, **kw: object) -> DiscoveryClient:
        return self.client("operator", self.server.operator_token, **kw)


@pytest.fixture
async def cp(nursery: trio.Nursery) -> CP:
    store = EmbeddedStore()
    await nursery.start(store.run)
    ca = CertificateAuthority.generate("octoproxy.local", time.time())
    server = ControlPlaneServer(
        store, ca=ca, lease_grace=0.3, max_registrations_per_session=4, max_subscriptions=50, max_sessions_per_peer=20,
        max_message_size=64 * 1024,
    )
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return CP(store, server, f"ws://{host}:{port}/v1/discovery", nursery)


async def handshake_status(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    try:
        with trio.fail_after(STEP):
            async with open_websocket_url(url, extra_headers=headers):
                return 101
    except ConnectionRejected as exc:
        return exc.status_code


# ---------------------------------------------------------------- authentication
async def test_anonymous_and_bogus_sessions_are_refused_at_the_handshake(cp: CP, caplog: pytest.LogCaptureFixture) -> None:
    assert await handshake_status(cp.url) == 401
    assert await handshake_status(cp.url, [(b"Authorization", b"Bearer octo1.abc.nope")]) == 401
    assert await handshake_status(cp.url, [(b"Authorization", b"Basic Zm9vOmJhcg==")]) == 401
    for _ in range(20):
        await handshake_status(cp.url)
    refusals = [r for r in caplog.records if "refused an unauthenticated session" in r.getMessage()]
    assert 1 <= len(refusals) <= 2  # rate-limited: one line, not 23
    assert cp.server.refused["unauthenticated"] == 23
    assert await handshake_status(cp.url, [(b"Authorization", f"Bearer {cp.token('echo')}".encode())]) == 101
    # a refused client says why, and keeps backing off
    anon = cp.client("anon", None)
    await wait_for(lambda: "401" in anon.refused)
    assert not anon.connected and "no credentials" in anon.refused


async def test_expired_and_revoked_tokens(cp: CP) -> None:
    expired = cp.token("echo", ttl=0.001)
    await trio.sleep(0.01)
    assert await handshake_status(cp.url, [(b"Authorization", f"Bearer {expired}".encode())]) == 401
    token = cp.token("echo")
    c = cp.client("echo", token)
    await c.wait_connected(STEP)
    tid = token.split(".")[1]
    assert await cp.store.delete_token(tid)
    await wait_for(lambda: "revoked" in c.refused)  # its live session is closed, and it cannot come back
    await trio.sleep(0.3)
    assert not c.connected and c.connections == 1


async def test_tokens_are_stored_hashed_and_survive_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    token, record = make_join_token("echo", time.time())
    async with trio.open_nursery() as nursery:
        s = EmbeddedStore(str(path), snapshot_delay=0.01)
        await nursery.start(s.run)
        await s.put_token(record)
        await wait_for(lambda: path.exists() and record.id in path.read_text())
        nursery.cancel_scope.cancel()
    text = path.read_text()
    assert token not in text and token.split(".")[2] not in text and record.sha256_hex in text
    assert path.stat().st_mode & 0o777 == 0o600  # registry and token hashes: owner only
    async with trio.open_nursery() as nursery:
        s2 = EmbeddedStore(str(path))
        await nursery.start(s2.run)
        auth = Authenticator("op", lambda: s2.view.tokens)
        principal = auth.authenticate(f"Bearer {token}", time.time())
        assert not isinstance(principal, str) and principal.service == "echo"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- ownership
async def test_a_service_changes_only_its_own_endpoints(cp: CP) -> None:
    echo, rogue, watcher = cp.service("echo"), cp.service("rogue"), cp.operator()
    await echo.register("echo", ep("127.0.0.1:9001"), ttl=5)
    await watcher.subscribe(["echo"], timeout=STEP)
    with pytest.raises(DiscoveryError, match="may change only its own endpoints"):
        await rogue.register("echo", ep("127.0.0.1:6666", weight=10000), ttl=5)  # traffic capture
    assert rogue.registrations() == {}
    with pytest.raises(DiscoveryError, match="permission denied"):
        await rogue.deregister("echo", "127.0.0.1:9001")  # outage
    with pytest.raises(DiscoveryError, match="permission denied"):
        await rogue.set_status("echo", "127.0.0.1:9001", pb.Endpoint.UNHEALTHY)  # outage
    with pytest.raises(DiscoveryError, match="operators only"):
        await rogue.put_route_rules(pb.RouteRules(service="echo", rules=[pb.RouteRule(name="x", weight_overrides={"127.0.0.1:9001": 0})]))
    await trio.sleep(0.2)
    eps = cp.store.view.services["echo"]
    assert set(eps) == {"127.0.0.1:9001"} and eps["127.0.0.1:9001"].status == pb.Endpoint.HEALTHY
    assert cp.store.view.routes == {}
    with pytest.raises(DiscoveryError, match="permission denied"):
        await rogue.register("échø", ep("127.0.0.1:6667"), ttl=5)  # a non-ASCII name is refused, not a crash
    # its own service: fine; an operator: anything
    await rogue.register("rogue", ep("127.0.0.1:7000"), ttl=5)
    await watcher.set_status("echo", "127.0.0.1:9001", pb.Endpoint.STOPPING)
    await wait_for(lambda: cp.store.view.services["echo"]["127.0.0.1:9001"].status == pb.Endpoint.STOPPING)


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254:80", "[fe80::1]:80", "0.0.0.0:80", "[::]:80", "224.0.0.1:80", "[ff02::1]:80",
     "255.255.255.255:80", "[::ffff:169.254.169.254]:80", "127.0.0.1:0"],
)
async def test_bad_endpoint_addresses_are_refused(cp: CP, address: str) -> None:
    c = cp.service("echo")
    with pytest.raises(DiscoveryError, match="refused|port"):
        await c.register("echo", ep(address), ttl=5)
    assert "echo" not in cp.store.view.services


def test_address_allow_list() -> None:
    import ipaddress

    assert check_address("169.254.10.1:80") is not None
    assert check_address("169.254.10.1:80", [ipaddress.ip_network("169.254.10.0/24")]) is None
    for good in ["127.0.0.1:9000", "10.1.2.3:1", "[::1]:9000", "provider.example:9000"]:
        assert check_address(good) is None, good


async def test_a_flood_of_registrations_is_capped_per_session(cp: CP) -> None:
    c = cp.service("echo")
    for i in range(4):
        await c.register("echo", ep(f"127.0.0.1:{9000 + i}"), ttl=5)
    with pytest.raises(DiscoveryError, match="too many registrations.*--max-registrations-per-session"):
        await c.register("echo", ep("127.0.0.1:9100"), ttl=5)
    await c.register("echo", ep("127.0.0.1:9000", weight=5), ttl=5)  # replacing one is not a new one
    assert len(cp.store.view.services["echo"]) == 4


async def test_a_lease_dies_with_its_session(cp: CP) -> None:
    scope = trio.CancelScope()
    rogue = DiscoveryClient([cp.url], "rogue", token=cp.token("echo"))

    async def run() -> None:
        with scope:
            await rogue.run()

    cp.nursery.start_soon(run)
    await rogue.register("echo", ep("127.0.0.1:6666"), ttl=60)
    assert "127.0.0.1:6666" in cp.store.view.services["echo"]
    scope.cancel()  # the connection closes; the lease had 60 s left
    t0 = trio.current_time()
    await wait_for(lambda: "echo" not in cp.store.view.services, timeout=5)
    assert trio.current_time() - t0 < 2.0  # lease_grace (0.3 s), not the TTL


async def test_a_session_from_a_handed_over_proxy_does_not_take_the_endpoint_along(cp: CP) -> None:
    """Hot restart: the successor registers the same address on its own session first."""
    token = cp.token("echo")
    scope = trio.CancelScope()
    old = DiscoveryClient([cp.url], "old", token=token)

    async def run() -> None:
        with scope:
            await old.run()

    cp.nursery.start_soon(run)
    await old.register("echo", ep("127.0.0.1:9001"), ttl=60)
    new = cp.client("new", token)
    await new.register("echo", ep("127.0.0.1:9001"), ttl=60)
    scope.cancel()
    await trio.sleep(1.0)  # > lease_grace
    assert "127.0.0.1:9001" in cp.store.view.services["echo"]


# ---------------------------------------------------------------- limits (issue 10)
async def test_subscription_limits_close_the_session_with_a_clear_reason(cp: CP) -> None:
    greedy = cp.service("greedy")
    with pytest.raises(trio.TooSlowError):
        await greedy.subscribe([f"svc-{i}" for i in range(51)], timeout=1.0)
    assert "too many subscriptions" in greedy.refused and "--max-subscriptions" in greedy.refused
    long_name = cp.service("long")
    with pytest.raises(trio.TooSlowError):
        await long_name.subscribe(["x" * 300], timeout=1.0)
    assert not long_name.connected or long_name.connections > 0


async def test_sessions_per_peer_and_message_size(cp: CP) -> None:
    headers = [(b"Authorization", f"Bearer {cp.token('echo')}".encode())]
    async with trio.open_nursery() as nursery:
        held = trio.Event()
        opened = 0

        async def hold() -> None:
            nonlocal opened
            async with open_websocket_url(cp.url, extra_headers=headers):
                opened += 1
                await held.wait()

        for _ in range(20):
            nursery.start_soon(hold)
        await wait_for(lambda: opened == 20)
        try:
            with trio.fail_after(STEP):
                async with open_websocket_url(cp.url, extra_headers=headers):
                    raise AssertionError("the 21st session from one address was accepted")
        except ConnectionRejected as exc:
            assert exc.status_code == 429 and b"--max-sessions-per-peer" in (exc.body or b"")
        held.set()
    await wait_for(lambda: not cp.server.sessions and not cp.server._per_peer)
    # a message over max_message_size ends the session
    c = cp.service("big")
    await c.subscribe([f"s{i:0>200}" for i in range(40)], timeout=STEP)  # ~8.5 KB: fine
    with pytest.raises(trio.TooSlowError):
        await c.subscribe([f"t{i:0>240}" for i in range(250)], timeout=1.0)  # ~64 KB: over the limit
    # the client never sends that message again: it splits it (and is then refused for the 50-name limit)
    await wait_for(lambda: "too many subscriptions" in c.refused)
    assert c.core.max_request_bytes <= 64 * 1024 * 7 // 8
    assert cp.server.oversized_messages == 1
    connections = c.connections
    await trio.sleep(2.0)
    assert c.connections - connections <= 6  # refusals back off exponentially (at most 0.2 s apart before)
    assert cp.server.oversized_messages == 1


async def test_an_oversized_subscription_is_split_not_resent(cp: CP, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10's cp_flood: a 5 MB subscribe was resent ~10 times in 15 s, and the control plane said nothing."""
    cp.server.max_subscriptions = 10_000
    c = cp.service("big")
    names = [f"t{i:0>240}" for i in range(600)]  # ~150 KB in one request: over the 64 KiB limit
    await c.subscribe(names, timeout=10)  # split after one refusal, then resolved
    assert all(c.is_absent(n) for n in names)
    assert cp.server.oversized_messages == 1
    server_lines = [r.getMessage() for r in caplog.records if r.name == "octoproxy.controlplane.server"]
    too_big = [m for m in server_lines if "over the limit" in m]
    assert len(too_big) == 1 and "65536 bytes" in too_big[0] and "--max-message-size" in too_big[0]
    assert "big" in too_big[0] and "127.0.0.1" in too_big[0]  # names the peer
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "splitting requests" in errors[0]
    # the next connection re-subscribes in messages under the limit too
    before = c.connections
    for session in list(cp.server.sessions):
        session.scope.cancel()
    await wait_for(lambda: c.connections > before and c.connected)
    await trio.sleep(0.3)
    assert cp.server.oversized_messages == 1


async def test_many_oversized_messages_log_one_line(cp: CP, caplog: pytest.LogCaptureFixture) -> None:
    headers = [(b"Authorization", f"Bearer {cp.token('echo')}".encode())]
    for _ in range(5):
        with trio.fail_after(STEP):
            async with open_websocket_url(cp.url, extra_headers=headers) as ws:
                await ws.send_message(b"\0" * (65 * 1024))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert closed.value.reason.code == 1009
    await wait_for(lambda: cp.server.oversized_messages == 5)
    lines = [r.getMessage() for r in caplog.records if "over the limit" in r.getMessage()]
    assert len(lines) == 1  # rate-limited


async def test_an_oversized_request_fails_for_its_caller_and_is_not_resent(
    cp: CP, caplog: pytest.LogCaptureFixture
) -> None:
    op = cp.operator()
    rules = pb.RouteRules(service="echo", rules=[pb.RouteRule(name=f"r{i:0>200}") for i in range(400)])  # ~80 KB
    with pytest.raises(DiscoveryError, match="maximum message size"):
        await op.put_route_rules(rules, timeout=STEP)
    await wait_for(lambda: op.connected)
    await trio.sleep(0.5)
    assert cp.server.oversized_messages == 1 and not op._pending
    assert any("not sent again" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    await op.put_route_rules(pb.RouteRules(service="echo", rules=[pb.RouteRule(name="small")]), timeout=STEP)


def test_requests_are_split_under_the_size_limit() -> None:
    from octoproxy.discovery._xds_client import TYPE_ENDPOINTS, XdsClient

    core = XdsClient("n", max_request_bytes=20_000)
    names = [f"{i:0>250}" for i in range(300)]
    msgs = core.subscribe(TYPE_ENDPOINTS, names)
    assert len(msgs) >= 4 and all(m.ByteSize() <= 20_000 for m in msgs)
    assert [n for m in msgs for n in m.discovery.subscribe] == sorted(names)
    again = core.on_reconnect()
    assert all(m.ByteSize() <= 20_000 for m in again)
    assert sorted(n for m in again for n in m.discovery.subscribe) == sorted(names)
    gone = core.unsubscribe(TYPE_ENDPOINTS, names)
    assert len(gone) >= 4 and all(m.ByteSize() <= 20_000 for m in gone)


async def test_memory_comes_back_after_sessions_close(cp: CP) -> None:
    refs: list[weakref.ref[object]] = []
    for round_ in range(3):
        async with trio.open_nursery() as nursery:
            clients = []
            for i in range(10):
                c = DiscoveryClient([cp.url], f"n{i}", token=cp.token(f"svc{i}"))
                nursery.start_soon(c.run)
                clients.append(c)
            for i, c in enumerate(clients):
                await c.subscribe([f"r{round_}-{i}-{k}-" + "n" * 200 for k in range(40)], timeout=STEP)
            refs.extend(weakref.ref(s) for s in cp.server.sessions)
            status, _, body = await http_request(admin_addr := await _admin(cp), "GET", "/sessions?limit=3",
                                                 headers=[("Authorization", f"Bearer {cp.server.operator_token}")])
            page = json.loads(body)
            assert status == 200 and page["total"] == 10 and len(page["sessions"]) == 3
            assert len(body) < 12_000, "GET /sessions must stay small (counts, samples, paging)"
            assert all(len(s["subscribed_sample"]) <= 10 for s in page["sessions"]) and admin_addr
            nursery.cancel_scope.cancel()
        await wait_for(lambda: not cp.server.sessions)
    gc.collect()
    assert cp.server._by_name == {} and cp.server._per_peer == {}
    assert cp.store.view._cache == {}  # names merely subscribed to (absent) are not cached
    assert sum(r() is not None for r in refs) == 0, "closed sessions are still referenced"


_ADMINS: dict[int, str] = {}


async def _admin(cp: CP) -> str:
    if id(cp) not in _ADMINS:
        _ADMINS[id(cp)] = await cp.nursery.start(serve_admin, "127.0.0.1:0", admin_routes(cp.server))
    return _ADMINS[id(cp)]


# ---------------------------------------------------------------- a provider puts its registration back
async def test_a_provider_whose_registration_vanishes_registers_again() -> None:
    from octoproxy import sdk
    from octoproxy.testing import open_mesh

    async def echo(req: sdk.Request) -> bytes:
        return req.body

    with trio.fail_after(60):
        async with open_mesh() as mesh:
            p = await mesh.add_provider("echo", echo)
            for _ in range(2):  # deleted by an operator, then its lease revoked
                assert p.address in mesh.store.view.services["echo"]
                if _ == 0:
                    await mesh.store.delete_endpoint("echo", p.address)
                else:
                    for lease_id in {mesh.store._owner[("echo", p.address)]}:
                        await mesh.store.revoke_lease(lease_id)
                assert "echo" not in mesh.store.view.services
                await wait_for(lambda: p.address in mesh.store.view.services.get("echo", {}), timeout=10)
            # its own-service watch does not make a cluster of it
            assert "echo" not in p.proxy.engine.clusters


# ---------------------------------------------------------------- certificates
async def test_certificates_name_the_session_service_whatever_the_csr_asks(cp: CP) -> None:
    c = cp.service("echo")
    await c.wait_connected(STEP)
    key_pem, csr_pem = make_key_and_csr("payments")  # asks for another service's name
    resp = await c.request_certificate(csr_pem, timeout=STEP)
    chain = x509.load_pem_x509_certificates(resp.certificate_chain_pem.encode())
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://octoproxy.local/svc/echo"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == (
        serialization.load_pem_private_key(key_pem.encode(), None).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    life = leaf.not_valid_after_utc.timestamp() - time.time()
    assert 23.9 * 3600 < life <= 24 * 3600 and abs(resp.not_after_unix_ms / 1000 - leaf.not_valid_after_utc.timestamp()) < 1
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    root = x509.load_pem_x509_certificate(resp.trust_bundle_pem.encode())
    leaf.verify_directly_issued_by(root)
    # refusals: an operator has no service identity; a bad CSR; not connected
    op = cp.operator()
    await op.wait_connected(STEP)
    with pytest.raises(DiscoveryError, match="operators have no service identity"):
        await op.request_certificate(csr_pem, timeout=STEP)
    with pytest.raises(DiscoveryError, match="CSR refused"):
        await c.request_certificate("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", timeout=STEP)
    lonely = DiscoveryClient(["ws://127.0.0.1:1/v1/discovery"], "lonely")
    with pytest.raises(DiscoveryError, match="not connected"):
        await lonely.request_certificate(csr_pem, timeout=1)


def _csr(key: object, service: str = "echo") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_ca_refuses_odd_keys_and_bad_signatures() -> None:
    ca = CertificateAuthority.generate("octoproxy.local", time.time())
    with pytest.raises(CertificateError, match="RSA key of 1024 bits"):
        ca.sign_csr(_csr(rsa.generate_private_key(65537, 1024)), "echo", time.time())
    with pytest.raises(CertificateError, match="curve"):
        ca.sign_csr(_csr(ec.generate_private_key(ec.SECP521R1())), "echo", time.time())
    ca.sign_csr(_csr(rsa.generate_private_key(65537, 2048)), "echo", time.time())
    # a CSR whose signature does not match its key (tampered public key)
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())).encode()).public_bytes(serialization.Encoding.DER)
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = x509.load_der_x509_csr(good).public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tampered = good.replace(mine[-65:], other[-65:])
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(tampered).decode() + "-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CertificateError, match="signature does not verify"):
        ca.sign_csr(pem, "echo", time.time())
    with pytest.raises(ValueError):
        ca.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "bad/name", time.time())
    # never past the CA's own expiry
    short = CertificateAuthority.generate("octoproxy.local", time.time(), validity=60)
    issued = short.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "echo", time.time(), ttl=3600)
    assert issued.not_after_unix_ms <= short.not_after * 1000


def test_ca_files(tmp_path: Path) -> None:
    from octoproxy.identity import load_or_create_ca

    ca = load_or_create_ca("octoproxy.local", time.time(), state_dir=tmp_path / "state")
    assert (tmp_path / "state" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = load_or_create_ca("octoproxy.local", time.time(), state_dir=tmp_path / "state")
    assert again.cert_pem == ca.cert_pem  # loaded, not made again
    (tmp_path / "c.pem").write_text(ca.cert_pem)
    (tmp_path / "k.pem").write_bytes(ca.key_pem())
    supplied = load_or_create_ca("octoproxy.local", time.time(), cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    assert supplied.cert_pem == ca.cert_pem
    other = CertificateAuthority.generate("octoproxy.local", time.time())
    (tmp_path / "k2.pem").write_bytes(other.key_pem())
    with pytest.raises(CertificateError, match="does not match"):
        load_or_create_ca("octoproxy.local", time.time(), cert_file=tmp_path / "c.pem", key_file=tmp_path / "k2.pem")


async def test_tls_listener_and_a_certificate_authenticated_session(cp: CP, tmp_path: Path) -> None:
    from octoproxy.controlplane._main import _server_tls

    ca = cp.server.ca
    assert ca is not None
    server_ctx = _server_tls(ca, tmp_path, ["127.0.0.1"], 3600, None)
    host, port = await cp.nursery.start(lambda task_status: cp.server.serve("127.0.0.1", 0, ssl_context=server_ctx, task_status=task_status))
    wss = f"wss://{host}:{port}/v1/discovery"
    (tmp_path / "ca.pem").write_text(ca.trust_bundle_pem)
    # 1. a join-token session gets a certificate
    bootstrap = cp.service("echo")
    await bootstrap.wait_connected(STEP)
    key_pem, csr_pem = make_key_and_csr("echo")
    resp = await bootstrap.request_certificate(csr_pem, timeout=STEP)
    (tmp_path / "echo.crt").write_text(resp.certificate_chain_pem)
    (tmp_path / "echo.key").write_text(key_pem)
    # 2. which authenticates a wss:// session with no token at all
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(str(tmp_path / "echo.crt"), str(tmp_path / "echo.key"))
    by_cert = cp.client("echo-by-cert", None, url=wss, ssl_context=ctx)
    await by_cert.register("echo", ep("127.0.0.1:9500"), ttl=5)
    with pytest.raises(DiscoveryError, match="only its own"):
        await by_cert.register("other", ep("127.0.0.1:9501"), ttl=5)
    await by_cert.wait_connected(STEP)
    renewed = await by_cert.request_certificate(make_key_and_csr("echo")[1], timeout=STEP)  # renewal by certificate
    assert "BEGIN CERTIFICATE" in renewed.certificate_chain_pem
    # 3. no client certificate and no token: 401, over TLS too
    bare = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with pytest.raises(HandshakeError):
        with trio.fail_after(STEP):
            async with open_websocket_url(wss, ssl_context=bare):
                pass  # pragma: no cover
    # the listener's certificate names the control plane and its address
    cert = x509.load_pem_x509_certificate((tmp_path / "controlplane.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "spiffe://octoproxy.local/controlplane" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


# ---------------------------------------------------------------- admin API and ctl
async def test_admin_api_wants_the_operator(cp: CP) -> None:
    admin = await _admin(cp)
    assert (await http_request(admin, "GET", "/healthz"))[0] == 200
    for method, path in [("GET", "/sessions"), ("GET", "/v1/tokens"), ("POST", "/v1/tokens"), ("PUT", "/v1/routes")]:
        assert (await http_request(admin, method, path, b"{}"))[0] == 401, path
    join = [("Authorization", f"Bearer {cp.token('echo')}")]
    assert (await http_request(admin, "GET", "/v1/tokens", headers=join))[0] == 403


async def test_ctl_end_to_end(cp: CP, tmp_path: Path) -> None:
    admin = await _admin(cp)
    token_file = tmp_path / "op.token"
    token_file.write_text(str(cp.server.operator_token))

    async def ctl(*args: str, ok: bool = True) -> str:
        argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{admin}", "--token-file", str(token_file), *args]
        with trio.fail_after(30):
            out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        assert (out.returncode == 0) == ok, out.stderr.decode()
        return (out.stdout + out.stderr).decode()

    token = (await ctl("token", "create", "--service", "echo", "--ttl", "1h")).splitlines()[0]  # stdout: the token alone
    assert token.startswith("octo1.")
    tid = token.split(".")[1]
    assert tid in await ctl("token", "list") and token not in await ctl("token", "list")
    c = cp.client("echo", token)
    await c.register("echo", ep("127.0.0.1:9001"), ttl=5)
    assert "127.0.0.1:9001" in await ctl("endpoints", "list", "echo")
    await ctl("endpoints", "set-status", "echo", "127.0.0.1:9001", "unhealthy")
    assert cp.store.view.services["echo"]["127.0.0.1:9001"].status == pb.Endpoint.UNHEALTHY
    await ctl("endpoints", "register", "echo", "127.0.0.1:9002", "--ttl", "30s")
    assert "refused" in await ctl("endpoints", "register", "echo", "169.254.169.254:80", ok=False)
    await ctl("endpoints", "deregister", "echo", "127.0.0.1:9002")
    assert set(cp.store.view.services["echo"]) == {"127.0.0.1:9001"}
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"service": "echo", "rules": [{"name": "slow", "method": "Get*", "timeout_ms": 100}]}))
    out = await ctl("routes", "put", str(rules), "--dry-run")
    assert '"timeout_ms": 100' in out and "dry run" in out and cp.store.view.routes == {}
    await ctl("routes", "put", str(rules))
    assert cp.store.view.routes["echo"].rules[0].timeout_ms == 100
    assert "no change" in await ctl("routes", "put", str(rules))
    assert '"name": "slow"' in await ctl("routes", "get", "echo")
    await ctl("token", "revoke", tid)
    await wait_for(lambda: not c.connected)
    assert "HTTP 401" in await ctl("--token-file", str(rules), "token", "list", ok=False)


@pytest.mark.e2e
async def test_insecure_mode_is_explicit_and_loud(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "octoproxy", "control-plane", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path),
            "--insecure-no-auth"]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with trio.fail_after(STEP):
            out = await proc.stdout.receive_some(4096)
        assert b"ready" in out
        with trio.fail_after(STEP):
            err = await proc.stderr.receive_some(4096)
        assert b"AUTHENTICATION IS OFF" in err
    finally:
        proc.kill()
        await proc.wait()


# ---------------------------------------------------------------- layering
async def test_a_fifo_as_join_token_file_does_not_hang_the_proxy() -> None:
    from octoproxy.testing import open_mesh

    with trio.fail_after(30):
        async with open_mesh() as mesh:
            fifo = mesh.directory / "token.fifo"
            os.mkfifo(fifo)
            web = await mesh.add_caller(
                "web",
                # plaintext: without credentials no certificate comes, and an mTLS proxy would never be ready
                config={"discovery": {"join_token_file": str(fifo)}, "tls": {"mode": "plaintext"}},
            )
            disc = web.proxy.discovery
            assert disc is not None
            await wait_for(lambda: "401" in disc.client.refused)  # no token read: refused, and retrying
            status, _, _ = await http_request(web.admin, "GET", "/healthz")
            assert status == 200  # the event loop was never blocked


async def test_a_mesh_proxy_obtains_a_certificate_of_its_service() -> None:
    from octoproxy import sdk
    from octoproxy.testing import open_mesh

    async def echo(req: sdk.Request) -> bytes:
        return req.body

    with trio.fail_after(30):
        async with open_mesh() as mesh:
            p = await mesh.add_provider("echo", echo)
            disc = p.proxy.discovery
            assert disc is not None
            await disc.client.wait_connected(STEP)
            resp = await disc.client.request_certificate(make_key_and_csr("echo")[1], timeout=STEP)
            leaf = x509.load_pem_x509_certificate(resp.certificate_chain_pem.encode())
            leaf.verify_directly_issued_by(mesh.ca.cert)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://octoproxy.local/svc/echo"]


def test_issuance_decisions() -> None:
    from octoproxy.controlplane._auth import Principal
    from octoproxy.controlplane._issuance import answer_certificate_request

    ca = CertificateAuthority.generate("octoproxy.local", time.time())
    req = pb.CertificateRequest(request_id=7, csr_pem=make_key_and_csr("orders")[1])
    now = time.time()

    def uris(resp: pb.CertificateResponse) -> list[str]:
        leaf = x509.load_pem_x509_certificate(resp.certificate_chain_pem.encode())
        return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )

    ok = answer_certificate_request(ca, Principal("service", "echo", "join-token"), "octoproxy.local", 60, req, now)
    assert ok.request_id == 7 and not ok.error and uris(ok) == ["spiffe://octoproxy.local/svc/echo"]
    insecure = answer_certificate_request(ca, Principal("operator", via="insecure"), "octoproxy.local", 60, req, now)
    assert uris(insecure) == ["spiffe://octoproxy.local/svc/orders"]  # only then does the CSR's name count
    op = answer_certificate_request(ca, Principal("operator", via="operator-token"), "octoproxy.local", 60, req, now)
    assert "operators have no service identity" in op.error and not op.certificate_chain_pem
    none = answer_certificate_request(None, Principal("service", "echo", "join-token"), "octoproxy.local", 60, req, now)
    assert "without a CA" in none.error


# ---------------------------------------------------------------- memory of a subscription flood comes back
def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
async def test_a_subscription_floods_memory_is_returned_after_the_sessions_close(tmp_path: Path) -> None:
    """Issue 10's cp_flood: sessions of thousands of 253-char names; RSS must come back once they close."""
    argv = [sys.executable, "-m", "octoproxy", "control-plane", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path),
            "--max-subscription-bytes", "4000000"]  # (3 MB of names per session: over the default budget)
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        with trio.fail_after(15):
            out = b""
            while b"\n" not in out:
                out += await proc.stdout.receive_some(4096)
        listen = out.split(b"listen=")[1].split()[0].decode()
        url = f"ws://{listen}/v1/discovery"
        token = (tmp_path / "operator.token").read_text().strip()
        await trio.sleep(0.5)
        before = _rss_mb(proc.pid)
        async with trio.open_nursery() as nursery:
            clients = [DiscoveryClient([url], f"flood-{i}", token=token) for i in range(3)]
            for c in clients:
                nursery.start_soon(c.run)
            for i, c in enumerate(clients):
                await c.wait_connected(STEP)
                names = [f"s{i}x{j:05d}" + "n" * 244 for j in range(6_000)]
                await c.subscribe(names, timeout=20)
            during = _rss_mb(proc.pid)
            nursery.cancel_scope.cancel()
        assert during > before + 30, (before, during)  # the flood did cost memory
        after = during
        with trio.move_on_after(10):
            while after > before * 1.1 + 3:
                await trio.sleep(0.5)
                after = _rss_mb(proc.pid)
        assert after <= before * 1.1 + 3, f"RSS {before:.0f} MB before, {during:.0f} during, {after:.0f} MB 10 s after"
    finally:
        proc.kill()
        await proc.wait()


def test_a_session_has_a_byte_budget_for_names() -> None:
    from octoproxy.discovery._xds_client import TYPE_ENDPOINTS, TYPE_ROUTES
    from octoproxy.discovery._xds_server import LimitExceeded, XdsServerSession

    s = XdsServerSession(max_subscription_bytes=1_000)
    names = [f"{i}" + "n" * 249 for i in range(5)]
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=names[:2]))
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ROUTES, subscribe=names[:2]))  # both types count
    assert s.subscription_bytes == 1_000
    with pytest.raises(LimitExceeded, match="--max-subscription-bytes"):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=names[2:3]))
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=names[:2]))  # already held: free
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=names[2:3], unsubscribe=names[:1]))
    assert s.subscription_bytes == 1_000 and s.subscribed(TYPE_ENDPOINTS) == {names[1], names[2]}
    assert s.release() == 4 and s.subscription_bytes == 0 and s.subscribed(TYPE_ENDPOINTS) == frozenset()


async def test_the_name_byte_budget_closes_the_session_with_a_clear_reason(cp: CP) -> None:
    cp.server.max_subscription_bytes = 4_000
    c = cp.service("wordy")
    await c.subscribe([f"w{i}" for i in range(40)], timeout=STEP)  # short names: fine
    with pytest.raises(trio.TooSlowError):
        await c.subscribe([f"{i}" + "n" * 240 for i in range(10)], timeout=1.0)  # 2 x 2,410 bytes: over
    await wait_for(lambda: "--max-subscription-bytes" in c.refused)
    assert "4000 bytes" in c.refused
