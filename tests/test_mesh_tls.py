"""End to end: mTLS between two real `octoproxy run` processes, caller identity, authorization.

Each test starts its own proxies (real processes, real TLS, loopback only), a
provider app in the test process (it records what reaches it), and
certificates from a throwaway CA (tests/mesh_certs.py).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from e2e import Load, Proc, caller_toml, free_port, provider_toml, proxy, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from mesh_certs import TestCA, tls_toml
from octoproxy import Status, sdk
from octoproxy.frame import FrameDecoder, encode_request

pytestmark = pytest.mark.e2e


@dataclass
class App:
    """The provider app, in the test process: records every request it gets."""

    seen: list[sdk.Request] = field(default_factory=list)

    async def handler(self, req: sdk.Request) -> bytes:
        self.seen.append(req)
        if req.method == "whoami":
            return json.dumps({"caller": req.caller, "metadata": req.metadata}).encode()
        return req.body


@dataclass
class Mesh:
    dir: Path
    ca: TestCA
    caller: Proc
    provider: Proc
    app: App
    port: int

    @property
    def sock(self) -> Path:
        return self.dir / "caller.sock"


@asynccontextmanager
async def tls_mesh(
    *,
    provider_tls: bool = True,
    caller_tls: bool = True,
    provider_extra: str = "",
    provider_cert_service: str = "echo",
    caller_ca: TestCA | None = None,
    lifetime: float = 3600.0,
    inbound_extra: str = "",
) -> AsyncIterator[Mesh]:
    ca = TestCA()
    with short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        app = App()
        async with trio.open_nursery() as nursery:
            await nursery.start(sdk.serve, str(app_uds), app.handler)
            ptoml = provider_toml(d, port, app_uds, inbound=inbound_extra)
            if provider_tls:
                ptoml += tls_toml(ca.write(d, provider_cert_service, "provider", lifetime=lifetime), reload_interval="0.2", handshake_timeout="1.0")
            else:
                ptoml += '[tls]\nmode = "plaintext"\n'
            ptoml += provider_extra
            ctoml = caller_toml(d, [port])
            if caller_tls:
                ctoml += tls_toml((caller_ca or ca).write(d, "caller-app", "caller", lifetime=lifetime), reload_interval="0.2", handshake_timeout="1.0")
            async with proxy(d, "provider-proxy", ptoml) as pp, proxy(d, "caller-proxy", ctoml) as cp:
                await wait_ready(pp)
                yield Mesh(d, ca, cp, pp, app, port)
            nursery.cancel_scope.cancel()


def _client_context(ca_pem: bytes, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.load_cert_chain(cert, key)
    return ctx


def _exchange(port: int, data: bytes, expect: int, ctx: ssl.SSLContext | None) -> list:
    """Blocking: connect (TLS if ``ctx``), send ``data``, read ``expect`` frames (fewer if closed)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s: socket.socket = ctx.wrap_socket(raw) if ctx is not None else raw
    except (ssl.SSLError, ConnectionResetError):
        raw.close()
        return []  # refused during the handshake
    try:
        s.sendall(data)
        dec = FrameDecoder()
        out: list = []
        while len(out) < expect:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            dec.receive_data(chunk)
            out.extend(dec)
        return out
    finally:
        s.close()


async def exchange(port: int, data: bytes, expect: int, ctx: ssl.SSLContext | None = None) -> list:
    return await trio.to_thread.run_sync(_exchange, port, data, expect, ctx)


def peer_ctx(m: Mesh, service: str, ca: TestCA | None = None) -> ssl.SSLContext:
    """A client context with a certificate for ``service`` (from ``ca``, default the mesh's)."""
    cert, key, _ = (ca or m.ca).write(m.dir, service, f"peer-{service}")
    return _client_context(m.ca.pem, cert, key)


# ---------------------------------------------------------------- calls over mTLS


async def test_calls_over_mtls_caller_from_certificate() -> None:
    with trio.fail_after(30):
        async with tls_mesh() as m, sdk.open_client(m.sock) as client:
            await wait_ready(m.caller)
            assert await client.call("echo", "echo", b"over tls") == b"over tls"
            who = json.loads(await client.call("echo", "whoami", b"", metadata={"authorization": "Bearer x", "traceparent": "00-1"}))
            assert who == {"caller": "caller-app", "metadata": {"traceparent": "00-1"}}
            results = []

            async def one(i: int) -> None:
                results.append(await client.call("echo", "echo", str(i).encode()))

            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(one, i)
            assert len(results) == 200
            ready = await m.provider.json("/ready")
            assert ready["tls"]["mode"] == "mtls"  # type: ignore[index]
            import time as _time

            expiry = await m.provider.metric("octoproxy_tls_certificate_expiry_timestamp_seconds")
            assert 3000 < expiry - _time.time() <= 3600


async def test_forged_caller_and_authorization_from_a_peer() -> None:
    """A peer with a valid certificate for 'billing' forges caller and a credential: both lose."""
    with trio.fail_after(30):
        async with tls_mesh() as m:
            forged = encode_request(
                1, "echo", "whoami", b"", caller="root-admin-svc", metadata={"authorization": "Bearer root", "AUTHORIZATION": "y", "k": "v"}
            )
            (resp,) = await exchange(m.port, forged, 1, peer_ctx(m, "billing"))
            assert resp.header.status == Status.OK
            assert json.loads(bytes(resp.body)) == {"caller": "billing", "metadata": {"k": "v"}}
            assert m.app.seen[-1].caller == "billing"


async def test_plaintext_peer_and_other_ca_are_refused_at_the_handshake() -> None:
    with trio.fail_after(30):
        async with tls_mesh() as m:
            req = encode_request(1, "echo", "whoami", b"", caller="root-admin-svc")
            assert await exchange(m.port, req, 1) == []  # raw plaintext frames
            # refused at its first bytes (not at the handshake deadline), and the log says why
            with trio.fail_after(2):
                while "the peer proxy has TLS off" not in m.provider.stderr():
                    await trio.sleep(0.05)
            rogue = TestCA("rogue CA")
            assert await exchange(m.port, req, 1, peer_ctx(m, "caller-app", ca=rogue)) == []
            valid = peer_ctx(m, "x")
            cert, key, _ = m.ca.write(m.dir, None, "other-td", uris=["spiffe://evil.example/svc/caller-app"])
            assert await exchange(m.port, req, 1, _client_context(m.ca.pem, cert, key)) == []
            no_spiffe_cert, no_spiffe_key, _ = m.ca.write(m.dir, None, "no-uri", uris=[])
            assert await exchange(m.port, req, 1, _client_context(m.ca.pem, no_spiffe_cert, no_spiffe_key)) == []
            assert m.app.seen == []
            assert await m.provider.metric('octoproxy_errors_total{kind="tls_handshake_failed"}') >= 4
            # and the real mesh still works
            assert (await exchange(m.port, req, 1, valid))[0].header.status == Status.OK


async def test_caller_with_certificate_from_another_ca_gets_nothing_through() -> None:
    with trio.fail_after(30):
        async with tls_mesh(caller_ca=TestCA("rogue CA")) as m, sdk.open_client(m.sock) as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "echo", b"x", timeout=3)
            assert info.value.status == Status.UNAVAILABLE
            assert m.app.seen == []
            assert await m.provider.metric('octoproxy_errors_total{kind="tls_handshake_failed"}') >= 1


async def test_endpoint_impersonating_another_service_is_refused() -> None:
    """The provider's certificate says 'billing': the caller will not send 'echo' calls to it."""
    with trio.fail_after(30):
        async with tls_mesh(provider_cert_service="billing", provider_extra="") as m, sdk.open_client(m.sock) as client:
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "echo", b"x", timeout=3)
            assert info.value.status == Status.UNAVAILABLE
            assert m.app.seen == []
            assert await m.caller.metric('octoproxy_errors_total{kind="tls_handshake_failed"}') >= 1
            assert "impersonation" in m.caller.stderr()


async def test_handshakes_under_way_count_towards_the_connection_limit() -> None:
    """Idle TCP connections that never handshake cannot make the proxy burn CPU on more handshakes."""
    with trio.fail_after(30):
        async with tls_mesh(inbound_extra="max_connections = 4") as m, sdk.open_client(m.sock) as client:
            await wait_ready(m.caller)  # the caller proxy holds 2 of the 4
            idle = [socket.create_connection(("127.0.0.1", m.port)) for _ in range(2)]
            try:
                await trio.sleep(0.3)
                req = encode_request(1, "echo", "whoami", b"")
                assert await exchange(m.port, req, 1, peer_ctx(m, "billing")) == []  # closed at once
                assert await m.provider.metric('octoproxy_errors_total{kind="connection_limit"}') >= 1
                assert await client.call("echo", "echo", b"still") == b"still"
                await trio.sleep(1.5)  # handshake_timeout: the idle ones are dropped
                (resp,) = await exchange(m.port, req, 1, peer_ctx(m, "billing"))
                assert resp.header.status == Status.OK
            finally:
                for s in idle:
                    s.close()


# ---------------------------------------------------------------- the service check (both modes)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
async def test_request_for_a_service_not_served_is_no_route(tls: bool) -> None:
    """On main, a raw request for another service reached the app with a forged caller and credential."""
    with trio.fail_after(30):
        async with tls_mesh(provider_tls=tls, caller_tls=tls) as m:
            attack = encode_request(
                3, "admin-svc", "DropTables", b"", caller="root-admin-svc", metadata={"authorization": "Bearer forged"}
            )
            ctx = peer_ctx(m, "billing") if tls else None
            (resp,) = await exchange(m.port, attack, 1, ctx)
            assert resp.stream_id == 3 and resp.header.status == Status.NO_ROUTE
            assert "serves 'echo', not 'admin-svc'" in resp.header.error
            assert m.app.seen == []
            if not tls:  # plaintext: the credential is still stripped from what does reach the app
                (ok,) = await exchange(m.port, encode_request(4, "echo", "whoami", b"", metadata={"authorization": "x"}), 1)
                assert json.loads(bytes(ok.body))["metadata"] == {}


# ---------------------------------------------------------------- authorization


AUTHZ = """
[authz]
default = "deny"
[[authz.rules]]
action = "allow"
callers = ["caller-app"]
methods = ["Get*", "echo", "whoami"]
[[authz.rules]]
action = "deny"
callers = ["caller-app"]
methods = ["GetSecret"]
"""


async def test_authorization_allows_and_denies_with_reasons() -> None:
    with trio.fail_after(30):
        async with tls_mesh(provider_extra=AUTHZ) as m, sdk.open_client(m.sock) as client:
            await wait_ready(m.caller)
            assert await client.call("echo", "GetUser", b"u") == b"u"
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "GetSecret", b"")
            assert info.value.status == Status.PERMISSION_DENIED
            assert "'caller-app'" in str(info.value) and "rule #1" in str(info.value)
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "Delete", b"")
            assert info.value.status == Status.PERMISSION_DENIED and "default is 'deny'" in str(info.value)
            # another service with a valid certificate is an unknown caller here
            (resp,) = await exchange(m.port, encode_request(1, "echo", "GetUser", b""), 1, peer_ctx(m, "billing"))
            assert resp.header.status == Status.PERMISSION_DENIED and "'billing'" in resp.header.error
            assert [r.method for r in m.app.seen] == ["GetUser"]
            assert await m.provider.metric('octoproxy_rejected_total{reason="permission_denied"}') == 3


async def test_authorization_without_identity_is_unauthenticated() -> None:
    with trio.fail_after(30):
        async with tls_mesh(provider_tls=False, caller_tls=False, provider_extra=AUTHZ) as m, sdk.open_client(m.sock) as client:
            await wait_ready(m.caller)
            with pytest.raises(sdk.CallError) as info:
                await client.call("echo", "GetUser", b"")
            assert info.value.status == Status.UNAUTHENTICATED
            assert m.app.seen == []


# ---------------------------------------------------------------- configuration


def test_key_readable_by_others_is_refused_in_one_line() -> None:
    ca = TestCA()
    with short_tmpdir() as d:
        paths = ca.write(d, "echo", "p")
        paths[1].chmod(0o644)
        cfg = d / "p.toml"
        cfg.write_text(provider_toml(d, free_port(), d / "app.sock") + tls_toml(paths))
        r = subprocess.run([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "mode 0644" in lines[0] and "0600" in lines[0], r.stderr
        assert "PRIVATE KEY" not in r.stderr


# ---------------------------------------------------------------- rotation


async def test_rotation_under_load_loses_nothing() -> None:
    """Certificates living 3 s, replaced every 0.7 s for 8 s, under load: 0 failed calls.

    Existing connections keep their sessions; new connections (a second
    provider that comes up after every original certificate has expired, and a
    raw probe) can only succeed with rotated certificates on both sides.
    """
    life = 3.0
    with trio.fail_after(60):
        async with tls_mesh(lifetime=life) as m:
            d = m.dir
            port2 = free_port()
            app2 = d / "app2.sock"

            def rotate() -> None:
                m.ca.write(d, "echo", "provider", lifetime=life)
                m.ca.write(d, "caller-app", "caller", lifetime=life)

            # the caller also knows a second provider endpoint, not up yet
            ctoml = caller_toml(d, [m.port, port2]).replace(str(d / "caller.sock"), str(d / "caller2.sock"))
            ctoml += '[tls]\ncert_file = "{0}/caller.crt"\nkey_file = "{0}/caller.key"\nca_file = "{0}/caller-ca.crt"\nreload_interval = 0.2\n'.format(d)
            load = Load(pause=0.001)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_rotating, rotate)
                await nursery.start(sdk.serve, str(app2), m.app.handler)
                c2 = await start_proxy(d, "caller2", ctoml)
                async with sdk.open_client(d / "caller2.sock") as client:
                    await wait_ready(c2)
                    async with trio.open_nursery() as workers:
                        for _ in range(4):
                            workers.start_soon(load.worker, client)
                        await exercise_rotation(m, c2, load, port2, app2)
                await stop(c2)
                nursery.cancel_scope.cancel()
            assert load.failures == [], load.failures[:5]
            assert load.ok > 200
            rotations = await m.provider.metric("octoproxy_tls_certificate_rotations")
            assert rotations >= 5


async def keep_rotating(rotate: Callable[[], None]) -> None:
    while True:
        await trio.sleep(0.7)
        rotate()


async def exercise_rotation(m: Mesh, c2: Proc, load: Load, port2: int, app2: Path) -> None:
    d = m.dir
    t_end = trio.current_time() + 8.0
    async with trio.open_nursery() as inner:
        started = False
        while trio.current_time() < t_end:
            await trio.sleep(0.2)
            if not started and trio.current_time() > t_end - 4.0:
                # every certificate the mesh started with has expired by now
                started = True
                ptoml = provider_toml(d, port2, app2, name="provider2") + tls_toml(
                    (d / "provider.crt", d / "provider.key", d / "provider-ca.crt"), reload_interval="0.2"
                )

                async def run_second() -> None:
                    async with proxy(d, "provider2", ptoml):
                        await trio.sleep_forever()

                inner.start_soon(run_second)
        # the caller reached the second provider with a rotated client certificate
        with trio.fail_after(10):
            while True:
                clusters = await c2.json("/clusters")
                conns = {e["address"]: e["connections"] for e in clusters["echo"]["endpoints"]}  # type: ignore[index]
                if conns.get(f"127.0.0.1:{port2}"):
                    break
                await trio.sleep(0.1)
        # the first provider serves new handshakes with its rotated certificate
        (resp,) = await exchange(m.port, encode_request(1, "echo", "whoami", b""), 1, peer_ctx(m, "caller-app"))
        assert resp.header.status == Status.OK
        await trio.sleep(1.0)
        load.stop()  # the workers finish the call in flight, then the second provider goes
        await trio.sleep(0.5)
        inner.cancel_scope.cancel()


async def start_proxy(d: Path, name: str, toml: str) -> Proc:
    cfg = d / f"{name}.toml"
    cfg.write_text(toml)
    return await start_process(proxy_argv(cfg), "octoproxy ready", d, name)


# ---------------------------------------------------------------- certificates from the control plane (the proxy's side)


async def test_control_plane_certificates_renew_at_two_thirds(autojump_clock: trio.abc.Clock) -> None:
    """A new key and CSR per issuance, renewed at 2/3 of the life; a failed request is retried."""
    import time as _time

    from mesh_certs import make_key_and_csr
    from octoproxy.proxy._tls import ControlPlaneCertificates

    ca = TestCA()
    csrs: list[str] = []
    calls = 0

    @dataclass
    class Resp:
        certificate_chain_pem: str
        trust_bundle_pem: str
        not_after_unix_ms: int
        error: str = ""

    async def request(csr_pem: str, timeout: float) -> Resp:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("control plane unreachable")  # the first renewal fails once
        csrs.append(csr_pem)
        return Resp(ca.sign_csr(csr_pem, "echo", lifetime=30), ca.pem.decode(), int((_time.time() + 30) * 1000))

    source = ControlPlaneCertificates("echo", "octoproxy.local", request, make_key_and_csr)
    assert source.contexts is None
    async with trio.open_nursery() as n:
        await n.start(source.run)
        await source.held.wait()
        first = source.contexts
        assert first is not None and first.rotations == 0
        t0 = trio.current_time()
        while source.issued < 3:
            await trio.sleep(0.5)
        # 30 s certificates: renewed after ~20 s (plus the 0.5 s retry), then again after ~20 s
        assert 40 <= trio.current_time() - t0 <= 45
        assert source.contexts is first and first.rotations == 2  # swapped in place
        assert len(set(csrs)) == 3 and source.failures == 1
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- hot restart over mTLS


async def test_hot_restart_over_mtls_with_rotated_certificates_loses_nothing() -> None:
    """Each new generation loads the certificate files as they are now (rotated in between):
    GOAWAY, drain and reconnection all happen over TLS, and no call fails."""
    ca = TestCA()
    with trio.fail_after(90), short_tmpdir() as d:
        port = free_port()
        app_uds = d / "app.sock"
        app = App()

        def write_configs() -> tuple[Path, Path]:
            caller_cfg, prov_cfg = d / "caller.toml", d / "provider.toml"
            caller_cfg.write_text(caller_toml(d, [port], drain_time="5.0") + tls_toml(ca.write(d, "caller-app", "caller")))
            prov_cfg.write_text(provider_toml(d, port, app_uds, drain_time="5.0") + tls_toml(ca.write(d, "echo", "provider")))
            return caller_cfg, prov_cfg

        caller_cfg, prov_cfg = write_configs()
        load = Load(pause=0.001)
        async with trio.open_nursery() as nursery:
            await nursery.start(sdk.serve, str(app_uds), app.handler)
            pp = await start_process(proxy_argv(prov_cfg), "octoproxy ready", d, "provider-proxy")
            cp = await start_process(proxy_argv(caller_cfg), "octoproxy ready", d, "caller-proxy")
            try:
                await wait_ready(pp)
                await wait_ready(cp)
                async with sdk.open_client(d / "caller.sock") as client, trio.open_nursery() as workers:
                    for _ in range(16):
                        workers.start_soon(load.worker, client)
                    await trio.sleep(0.5)
                    for i in range(2):
                        write_configs()  # new certificates (and keys) for the next generations
                        before = load.ok
                        cp = await hot_restart(caller_cfg, d, f"caller-proxy-{i + 1}", cp)
                        pp = await hot_restart(prov_cfg, d, f"provider-proxy-{i + 1}", pp)
                        await trio.sleep(0.3)
                        assert load.ok > before, "no progress across a restart"
                    load.stop()
                assert load.failures == [], load.failures[:5]
                assert await pp.metric('octoproxy_tls_handshakes_total{side="inbound"') >= 2
            finally:
                await stop(cp)
                await stop(pp)
                nursery.cancel_scope.cancel()


async def hot_restart(config: Path, workdir: Path, name: str, old: Proc) -> Proc:
    new = await start_process(proxy_argv(config, hot_restart=True), "octoproxy ready", workdir, name)
    with trio.fail_after(15):
        assert await old.process.wait() == 0, old.stderr()[-2000:]
    await stop(old)
    return new


# ---------------------------------------------------------------- TLSConnection (memory BIOs over a raw socket)


async def tls_pair(d: Path) -> tuple:
    from octoproxy.identity._tls import MeshContexts, load_material
    from octoproxy.proxy._tls import handshake
    from octoproxy.proxy._tlssock import TLSConnection

    ca = TestCA()
    server_ctx = MeshContexts(load_material(*ca.write(d, "echo", "s")), "octoproxy.local")
    client_ctx = MeshContexts(load_material(*ca.write(d, "billing", "c")), "octoproxy.local")
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv = TLSConnection(b, server_ctx.server, server_side=True)
    cli = TLSConnection(a, client_ctx.client, server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(handshake, srv, 5.0)
        n.start_soon(handshake, cli, 5.0)
    return cli, srv


async def test_tls_connection_partial_sends_and_split_records() -> None:
    """A send the socket cannot take whole is confirmed only once its ciphertext is out;
    records arriving in pieces are decrypted once whole; nothing is lost or reordered."""
    with trio.fail_after(20), short_tmpdir() as d:
        cli, srv = await tls_pair(d)
        assert srv.getpeercert() and cli.cipher()[1] == "TLSv1.3"  # type: ignore[index]
        payload = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers take
        out = bytearray(payload)
        received = bytearray()
        buf = bytearray(65536)

        async def reader() -> None:
            while len(received) < len(payload):
                if not srv.pending():
                    await trio.lowlevel.wait_readable(srv)
                try:
                    n = srv.recv_into(memoryview(buf))
                except BlockingIOError:
                    continue
                assert n > 0
                received.extend(buf[:n])

        blocked = 0
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            while out:
                try:
                    taken = cli.send(out)
                except BlockingIOError:
                    blocked += 1
                    await trio.lowlevel.wait_writable(cli)
                    continue
                del out[:taken]
                out += b""  # the caller may append behind; the front stays the same
        assert blocked > 0  # the partial-send path was taken
        assert received == payload
        cli.close()
        srv.close()


# ---------------------------------------------------------------- certificates from the control plane (end to end)


def _cp_argv(port: int, d: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "octoproxy", "control-plane", "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
        "--admin", "127.0.0.1:0", "--state-dir", str(d / "cp-state"), *extra,
    ]


async def _join_token(d: Path, cp: Proc, service: str) -> Path:
    path = d / f"{service}.token"
    argv = [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://{cp.admin}",
            "--state-dir", str(d / "cp-state"), "token", "create", "--service", service]
    with trio.fail_after(20):
        out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    path.write_bytes(out.stdout)
    path.chmod(0o600)
    return path


def _discovery(d: Path, cp_port: int, service: str) -> str:
    return (
        f'[discovery]\ncontrol_plane = ["ws://127.0.0.1:{cp_port}/v1/discovery"]\nsubscribe_timeout = 3.0\n'
        f'lease_ttl = 2.0\njoin_token_file = "{d / (service + ".token")}"\n'
    )


async def test_certificates_from_the_control_plane_renewed_under_load() -> None:
    """[discovery] and no certificate files: mTLS by default with certificates the control plane
    issues (key made in the proxy, renewed at two thirds of a 6 s life), calls under load: 0 failures."""
    with trio.fail_after(90), short_tmpdir() as d:
        cp_port, port = free_port(), free_port()
        app_uds = d / "app.sock"
        app = App()
        cp = await start_process(_cp_argv(cp_port, d, "--cert-ttl", "6"), "octoproxy control-plane ready", d, "cp")
        procs = [cp]
        try:
            for service in ("caller-app", "echo"):
                await _join_token(d, cp, service)
            async with trio.open_nursery() as nursery:
                await nursery.start(sdk.serve, str(app_uds), app.handler)
                ptoml = provider_toml(d, port, app_uds) + _discovery(d, cp_port, "echo")
                ctoml = (
                    f'[proxy]\nservice = "caller-app"\n[outbound]\nuds = "{d}/caller.sock"\n[admin]\nlisten = "127.0.0.1:0"\n'
                    f"[upstream]\nconnect_timeout = 0.5\n" + _discovery(d, cp_port, "caller-app")
                )
                (d / "p.toml").write_text(ptoml)
                (d / "c.toml").write_text(ctoml)
                pp = await start_process(proxy_argv(d / "p.toml"), "octoproxy ready", d, "provider-proxy")
                procs.append(pp)
                cp2 = await start_process(proxy_argv(d / "c.toml"), "octoproxy ready", d, "caller-proxy")
                procs.append(cp2)
                await wait_ready(pp, 20)
                await wait_ready(cp2, 20)
                ready = await pp.json("/ready")
                assert ready["tls"]["mode"] == "mtls", ready  # type: ignore[index]
                load = Load(pause=0.002)
                async with sdk.open_client(d / "caller.sock") as client:
                    who = json.loads(await client.call("echo", "whoami", b"", timeout=5))
                    assert who["caller"] == "caller-app"  # from the certificate the control plane issued
                    async with trio.open_nursery() as workers:
                        for _ in range(8):
                            workers.start_soon(load.worker, client)
                        await trio.sleep(9.0)  # the 6 s certificates are renewed at ~4 s, then ~6.7 s
                        load.stop()
                assert load.failures == [], load.failures[:5]
                assert load.ok > 100
                assert await pp.metric("octoproxy_tls_certificate_rotations") >= 2
                assert await cp2.metric("octoproxy_tls_certificate_rotations") >= 2
                assert await cp2.metric('octoproxy_tls_handshakes_total{side="upstream"') >= 1
                # a plaintext peer gets nothing from the provider
                assert await exchange(port, encode_request(1, "echo", "whoami", b""), 1) == []
                nursery.cancel_scope.cancel()
        finally:
            for p in reversed(procs):
                await stop(p)
