"""Issue 11, items 1, 4 and 5: nothing that controls the mesh answers an unauthenticated local user.

Each attack the issue reports, re-run against real processes on temp-dir
sockets and loopback ports, now fails to do harm; and the real thing (a hot
restart, an admin call with the token) still works:

* the proxy's admin API: ``POST /drain``, ``/healthcheck/fail``, ``GET
  /config_dump`` without the token; a browser's absolute-form ``POST
  http://evil/healthcheck/ok``, a rebound ``Host``, a cross-site ``Origin``;
* the agent's ``POST /upgrade`` without the token;
* the hot-restart socket: a same-user peer without the hand-over secret tries
  to take the listeners, says a fake READY, or holds the socket to block real
  upgrades; a peer of another uid is refused even with the secret.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from e2e import Proc, caller_toml, free_port, provider, provider_toml, proxy_argv, short_tmpdir, start_process, stop, wait_ready
from octoproxy import sdk
from octoproxy.common._admin import http_request

pytestmark = pytest.mark.e2e

NOBODY = 65534
#: a Python another uid can run (the test's own lives under a private directory); stdlib only
SYSTEM_PYTHON = "/usr/bin/python3"


def _other_uid_possible() -> bool:
    return os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK)
PLAIN_TOML = """
[proxy]
drain_time = 1.0
shutdown_time = 2.0
[outbound]
uds = "{dir}/out.sock"
[admin]
listen = "{admin}"
"""


# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def plain_proxy(d: Path, admin: str = "127.0.0.1:0", extra: str = "") -> AsyncIterator[Proc]:
    """A proxy with no upstream: ready at once."""
    cfg = d / "plain.toml"
    cfg.write_text(PLAIN_TOML.format(dir=d, admin=admin) + extra)
    p = await start_process(proxy_argv(cfg), "octoproxy ready", d, "plain")
    try:
        yield p
    finally:
        await stop(p)


@asynccontextmanager
async def caller_and_provider(d: Path, **extra: str) -> AsyncIterator[tuple[Path, Proc]]:
    """A provider app behind its proxy, and a caller proxy in front of it (the target)."""
    port = free_port()
    app_uds = d / "app.sock"
    (d / "p.toml").write_text(provider_toml(d, port, app_uds))
    cfg = d / "caller.toml"
    cfg.write_text(caller_toml(d, [port], **extra))
    async with provider(d, app_uds):
        pp = await start_process(proxy_argv(d / "p.toml"), "octoproxy ready", d, "pp")
        try:
            cp = await start_process(proxy_argv(cfg), "octoproxy ready", d, "cp")
            try:
                await wait_ready(cp)
                yield cfg, cp
            finally:
                await stop(cp)
        finally:
            await stop(pp)


def raw_http(address: str, request: bytes) -> bytes:
    """Send bytes as they are (absolute-form targets, odd headers) and read the whole reply."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def hot_restart_peer(path: Path, send: bytes, linger: float = 5.0) -> tuple[bytes, int]:
    """Connect to a hot-restart socket, send ``send``, read until EOF (at most ``linger`` s).

    Returns:
        What came back, and how many file descriptors came with it.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(linger)
        s.connect(str(path))
        if send:
            s.sendall(send)
        data, nfds = b"", 0
        try:
            while True:
                chunk, fds, _flags, _addr = socket.recv_fds(s, 65536, 16)
                for fd in fds:
                    os.close(fd)
                nfds += len(fds)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return data, nfds


def hello(secret: str | None) -> bytes:
    msg: dict[str, object] = {"type": "hello", "version": 1, "pid": os.getpid()}
    if secret is not None:
        msg["secret"] = secret
    return json.dumps(msg).encode() + b"\n"


async def hot_restart(cfg: Path, d: Path, name: str, old: Proc) -> Proc:
    new = await start_process(proxy_argv(cfg, hot_restart=True), "octoproxy ready", d, name)
    with trio.fail_after(15):
        assert await old.process.wait() == 0, old.stderr()[-2000:]
    await stop(old)
    return new


# ------------------------------------------------------------------ admin API of the proxy


async def test_proxy_admin_refuses_unauthenticated_control() -> None:
    """Issue 11, item 4: POST /drain made a provider exit, /healthcheck/fail made it unready,
    /config_dump showed everything, with no credential at all."""
    with trio.fail_after(30), short_tmpdir() as d:
        async with plain_proxy(d) as p:
            admin = p.admin
            token_file = Path(p.addresses["admin_token_file"])
            assert token_file == d / "out.sock.admin-token"
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            token = token_file.read_text().strip()
            for method, path in [("POST", "/drain"), ("POST", "/healthcheck/fail"), ("POST", "/healthcheck/ok"),
                                 ("GET", "/config_dump"), ("GET", "/clusters")]:  # fmt: skip
                for tok in (None, "wrong-" + token, token[:-1]):
                    status, headers, _ = await http_request(admin, method, path, token=tok)
                    assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (method, path, tok)
            # nothing happened
            assert (await http_request(admin, "GET", "/ready"))[0] == 200
            assert p.process.returncode is None
            # read-only probes and the SDK's subscribe stay open
            for path in ("/healthz", "/ready", "/stats"):
                assert (await http_request(admin, "GET", path))[0] == 200, path
            status, _h, body = await http_request(admin, "POST", "/subscribe", b'{"services": ["x"]}')
            assert status == 404 and b"discovery is not configured" in body  # reached the handler
            # with the token: as before; the token is in neither the dump nor the log
            status, _h, dump = await http_request(admin, "GET", "/config_dump", token=token)
            assert status == 200 and token.encode() not in dump
            assert json.loads(dump)["config"]["proxy"]["hot_restart_hello_timeout"] == 2.0
            assert (await http_request(admin, "POST", "/healthcheck/fail", token=token))[0] == 200
            assert (await http_request(admin, "GET", "/ready"))[0] == 503
            assert (await http_request(admin, "POST", "/healthcheck/ok", token=token))[0] == 200
            log = p.stderr()
            assert token not in log and str(token_file) in log
            # refusals are logged once per peer (a minute), not once per request
            assert log.count("missing or wrong admin token") == 1
            assert (await http_request(admin, "POST", "/drain", token=token))[0] == 200
            with trio.fail_after(10):
                assert await p.process.wait() == 0


async def test_proxy_admin_refuses_what_a_browser_sends() -> None:
    """Issue 11, item 4: `POST http://evil/healthcheck/ok` (absolute-form) got 200; no Host check."""
    with trio.fail_after(30), short_tmpdir() as d:
        async with plain_proxy(d) as p:
            admin, token = p.admin, p.token
            assert token is not None
            auth = f"Authorization: Bearer {token}\r\n".encode()
            for req, code in [
                (b"POST http://evil/healthcheck/fail HTTP/1.1\r\nHost: evil\r\nContent-Length: 0\r\n\r\n", b"421"),
                (b"POST http://127.0.0.1/healthcheck/fail HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Length: 0\r\n\r\n", b"421"),
                # DNS rebinding: evil.example resolves to 127.0.0.1; the page reads /stats
                (b"GET /stats HTTP/1.1\r\nHost: evil.example:" + admin.rsplit(":", 1)[1].encode() + b"\r\n\r\n", b"421"),
                (b"GET /stats HTTP/1.0\r\n\r\n", b"421"),  # no Host at all
                # a cross-site request, token or not
                (b"POST /healthcheck/fail HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n" + auth + b"Content-Length: 0\r\n\r\n", b"403"),
                (b"POST /healthcheck/fail HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\n" + auth + b"Content-Length: 0\r\n\r\n", b"403"),
                (b"GET /stats HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-Site: cross-site\r\n\r\n", b"403"),
            ]:
                reply = await trio.to_thread.run_sync(raw_http, admin, req + b"")
                assert reply.split(b" ", 2)[1] == code, (req, reply[:200])
            assert (await http_request(admin, "GET", "/ready"))[0] == 200  # still healthy
            # loopback names and addresses are fine, and so is a loopback Origin
            for host in (b"localhost", b"127.0.0.1:1", b"[::1]", b"foo.localhost"):
                reply = await trio.to_thread.run_sync(raw_http, admin, b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 200 "), (host, reply[:100])
            reply = await trio.to_thread.run_sync(
                raw_http, admin,
                b"POST /healthcheck/ok HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://localhost:3000\r\n" + auth
                + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
            )  # fmt: skip
            assert reply.startswith(b"HTTP/1.1 200 ")


async def test_unix_admin_trusts_our_uid_and_asks_others_for_the_token() -> None:
    """On a Unix-socket admin, SO_PEERCRED stands in for the token for our uid (and root)."""
    if not _other_uid_possible():
        pytest.skip("needs root and a system python to connect as another uid")
    with trio.fail_after(30), short_tmpdir() as d:
        async with plain_proxy(d, admin=f"unix:{d}/admin.sock") as p:
            assert (await http_request(p.admin, "POST", "/healthcheck/fail"))[0] == 200  # us: no token needed
            assert (await http_request(p.admin, "POST", "/healthcheck/ok"))[0] == 200
            # another uid, through a socket file someone loosened: the token is asked for
            os.chmod(d, 0o755)
            os.chmod(d / "admin.sock", 0o666)
            code = (
                "import socket, sys\n"
                "for auth in ('', 'Authorization: Bearer ' + sys.argv[2] + '\\r\\n'):\n"
                "    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                "    s.sendall(('POST /healthcheck/fail HTTP/1.1\\r\\nHost: localhost\\r\\n' + auth\n"
                "               + 'Content-Length: 0\\r\\nConnection: close\\r\\n\\r\\n').encode())\n"
                "    print(s.recv(100).split()[1].decode())\n"
            )
            res = await trio.run_process(
                [SYSTEM_PYTHON, "-c", code, p.admin[5:], p.token or ""], user=NOBODY, capture_stdout=True, capture_stderr=True
            )
            assert res.stdout.split() == [b"401", b"200"], res.stderr
            assert (await http_request(p.admin, "GET", "/ready"))[0] == 503


async def test_unsafe_token_file_is_refused() -> None:
    with trio.fail_after(30), short_tmpdir() as d:
        token_file = d / "tok"
        token_file.write_text("s3cret-s3cret-s3cret-s3cret\n")
        os.chmod(token_file, 0o644)
        cfg = d / "p.toml"
        cfg.write_text(PLAIN_TOML.format(dir=d, admin="127.0.0.1:0").replace("[admin]", f'[admin]\ntoken_file = "{token_file}"'))
        res = await trio.run_process(proxy_argv(cfg), capture_stdout=True, capture_stderr=True, check=False)
        # a start-up failure: exit 2 and one line naming the file, no traceback
        assert res.returncode == 2 and b"mode 0644 lets others read or write it" in res.stderr, res.stderr
        assert b"Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        os.chmod(token_file, 0o600)  # an operator's own token, once safe, is used as it is
        async with plain_proxy(d, extra=f'token_file = "{token_file}"\n') as p:
            assert p.token == "s3cret-s3cret-s3cret-s3cret"
            assert (await http_request(p.admin, "GET", "/config_dump", token="s3cret-s3cret-s3cret-s3cret"))[0] == 200


# ------------------------------------------------------------------ the agent


async def test_agent_upgrade_needs_the_token() -> None:
    """Issue 11, item 1, without a token: 401, nothing run."""
    from test_agent import agent_toml, run_agent, write_proxy

    with trio.fail_after(40), short_tmpdir() as d:
        write_proxy(d)
        pwned = d / "pwned"
        async with run_agent(d, agent_toml()) as a:
            attack = json.dumps({"command": ["/bin/sh", "-c", f"id > {pwned}; exit 3"]}).encode()
            for tok in (None, "wrong-token-wrong-token"):
                status, headers, _ = await http_request(a.admin, "POST", "/upgrade", attack, token=tok)
                assert status == 401 and "Bearer" in headers["www-authenticate"]
                assert (await http_request(a.admin, "GET", "/status", token=tok))[0] == 401
            reply = await trio.to_thread.run_sync(
                raw_http, a.admin, b"POST http://evil/upgrade HTTP/1.1\r\nHost: evil\r\nContent-Length: 2\r\n\r\n{}"
            )
            assert reply.startswith(b"HTTP/1.1 421 ")
            assert (await http_request(a.admin, "GET", "/healthz"))[0] == 200
            assert (await http_request(a.admin, "GET", "/metrics"))[0] == 200
            status, _h, body = await http_request(a.admin, "POST", "/upgrade", attack, token=a.token)
            assert status == 400 and '"command" is not accepted' in json.loads(body)["error"]
            await trio.sleep(0.3)
            assert not pwned.exists()
            st = await a.status()
            assert st["generation"] == 0 and st["last_upgrade"] is None
            assert stat.S_IMODE((d / "agent-admin.token").stat().st_mode) == 0o600
            assert a.token not in a.stderr()


# ------------------------------------------------------------------ the hot-restart socket


async def test_hot_restart_peer_without_the_secret_gets_nothing() -> None:
    """Issue 11, item 5: a same-user process took the listening sockets (and read new SDK
    connections' payloads), or said "ready" and made the proxy exit in 8 ms."""
    with trio.fail_after(60), short_tmpdir() as d:
        async with caller_and_provider(d) as (cfg, cp):
            sock = d / "caller.sock.hotrestart"
            secret_file = d / "caller.sock.hotrestart.secret"
            assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
            async with sdk.open_client(d / "caller.sock") as client:
                assert await client.call("echo", "echo", b"a") == b"a"
                # 1: steal the listeners, with no secret, a wrong one, an old-style hello
                for send in (hello("x" * 43), hello(None), hello(""), b"listeners please\n"):
                    data, nfds = await trio.to_thread.run_sync(hot_restart_peer, sock, send)
                    assert nfds == 0 and b"listeners" not in data, (send, data)
                # 2: a fake READY right after the hello
                data, nfds = await trio.to_thread.run_sync(hot_restart_peer, sock, hello("x" * 43) + b'{"type":"ready"}\n')
                assert nfds == 0 and json.loads(data.splitlines()[0]) == {"type": "refused", "reason": "wrong hand-over secret"}
                await trio.sleep(0.5)
                assert cp.process.returncode is None  # it did not drain and exit
                state = await cp.json("/ready")
                assert state["ready"] and state["hot_restart"]["state"] == "serving"  # type: ignore[index]
                assert await client.call("echo", "echo", b"b") == b"b"
            async with sdk.open_client(d / "caller.sock") as client2:  # new connections reach this proxy
                assert await client2.call("echo", "echo", b"c") == b"c"
            assert await cp.metric('octoproxy_errors_total{kind="hot_restart_unauthenticated"}') == 5
            assert cp.stderr().count("hot restart: refused pid") == 1  # logged once, counted every time
            # the real thing still works, and the next generation writes a new secret
            old_secret = secret_file.read_text()
            new = await hot_restart(cfg, d, "cp1", cp)
            try:
                assert secret_file.read_text() != old_secret
                assert (await new.json("/ready"))["hot_restart"]["generation"] == 1  # type: ignore[index]
                async with sdk.open_client(d / "caller.sock") as client3:
                    assert await client3.call("echo", "echo", b"d") == b"d"
                # the old secret is worth nothing now
                data, nfds = await trio.to_thread.run_sync(hot_restart_peer, sock, hello(old_secret.strip()))
                assert nfds == 0 and b"wrong hand-over secret" in data
            finally:
                await stop(new)


async def test_idle_peers_cannot_block_a_real_hot_restart() -> None:
    """Issue 11, item 5: a peer that held the socket made real upgrades fail for 35 s each."""
    with trio.fail_after(60), short_tmpdir() as d:
        async with caller_and_provider(d) as (cfg, cp):
            sock_path = str(d / "caller.sock.hotrestart")
            idle = []
            for _ in range(12):  # more than the parent keeps waiting for their hello
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                idle.append(s)
            try:
                t0 = trio.current_time()
                new = await hot_restart(cfg, d, "cp1", cp)
                took = trio.current_time() - t0
                try:
                    assert took < 10, took
                    assert (await new.json("/ready"))["hot_restart"]["generation"] == 1  # type: ignore[index]
                finally:
                    await stop(new)
                # each idle peer was dropped, after the hello deadline at the latest, and got no descriptor
                for s in idle:
                    s.settimeout(5)
                    chunk, fds, _f, _a = socket.recv_fds(s, 4096, 4)
                    assert (chunk, fds) == (b"", [])
            finally:
                for s in idle:
                    s.close()
            assert "said no hello within 2.0s" in cp.stderr() or "dropped the oldest" in cp.stderr()


async def test_hello_deadline_is_configurable_and_short() -> None:
    with trio.fail_after(30), short_tmpdir() as d:
        cfg = d / "fast.toml"
        cfg.write_text(PLAIN_TOML.format(dir=d, admin="127.0.0.1:0").replace("[proxy]", "[proxy]\nhot_restart_hello_timeout = 0.3"))
        p = await start_process(proxy_argv(cfg), "octoproxy ready", d, "fast")
        try:
            t0 = trio.current_time()
            data, nfds = await trio.to_thread.run_sync(hot_restart_peer, d / "out.sock.hotrestart", b"", 5.0)
            assert (data, nfds) == (b"", 0)
            assert trio.current_time() - t0 < 2.0
            assert "said no hello within 0.3s" in p.stderr()
        finally:
            await stop(p)


async def test_other_uid_is_refused_even_with_the_secret() -> None:
    """SO_PEERCRED: even through a loosened socket file, and knowing the secret, another uid gets nothing."""
    if not _other_uid_possible():
        pytest.skip("needs root and a system python to connect as another uid")
    with trio.fail_after(30), short_tmpdir() as d:
        async with plain_proxy(d) as p:
            sock = d / "out.sock.hotrestart"
            secret = (d / "out.sock.hotrestart.secret").read_text().strip()
            os.chmod(d, 0o755)
            os.chmod(sock, 0o666)
            code = (
                "import json, os, socket, sys\n"
                "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                "try:\n"
                "    s.sendall(json.dumps({'type': 'hello', 'version': 1, 'pid': os.getpid(), 'secret': sys.argv[2]}).encode() + b'\\n')\n"
                "    data, fds, _f, _a = socket.recv_fds(s, 65536, 16)\n"
                "except OSError:  # closed at once\n"
                "    data, fds = b'', []\n"
                "print(len(data), len(fds))\n"
            )
            res = await trio.run_process(
                [SYSTEM_PYTHON, "-c", code, str(sock), secret], user=NOBODY, capture_stdout=True, capture_stderr=True, check=False
            )
            assert res.stdout.split() == [b"0", b"0"], (res.stdout, res.stderr)
            assert "refused a peer with uid 65534" in p.stderr()
            state = await p.json("/ready")
            assert state["hot_restart"]["state"] == "serving"  # type: ignore[index]
