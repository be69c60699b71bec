"""A new user's start-up mistakes: one line naming the key and the address, exit 2.

Real processes: `octoproxy run`, `octoproxy control-plane` and `octoproxy
agent` with an address in use, a socket directory that does not exist, a
path too long for a Unix socket, or a proxy already running on the same
sockets. And the ready line means ready: a proxy whose local app's socket
directory is missing says what it waits for, and prints its ready line only
once ``GET /ready`` answers 200.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from e2e import free_port, provider, proxy_argv, short_tmpdir, start_process, stop

from octoproxy.common._admin import http_request
from octoproxy.common._startup import _why

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.e2e


@contextmanager
def port_in_use() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def octoproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "octoproxy", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_one_line(proc: subprocess.CompletedProcess[str], *expect: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in expect:
        assert text in lines[0], lines[0]
    assert "ready" not in proc.stdout


def run_toml(d: Path, text: str) -> subprocess.CompletedProcess[str]:
    cfg = d / "p.toml"
    cfg.write_text(text)
    return octoproxy("run", "-c", str(cfg))


def test_outbound_socket_directory_missing() -> None:
    with short_tmpdir() as d:
        proc = run_toml(d, '[outbound]\nuds = "missing/out.sock"\n')
        assert_one_line(proc, f"outbound.uds = {d}/missing/out.sock", f"the directory {d}/missing does not exist")


def test_inbound_address_in_use() -> None:
    with short_tmpdir() as d, port_in_use() as port:
        proc = run_toml(d, f'[outbound]\nuds = "out.sock"\n[inbound]\nlisten = "127.0.0.1:{port}"\napp_uds = "app.sock"\n')
        assert_one_line(proc, f"inbound.listen = 127.0.0.1:{port}", "address already in use")


def test_admin_address_in_use_and_admin_directory_missing() -> None:
    with short_tmpdir() as d, port_in_use() as port:
        proc = run_toml(d, f'[outbound]\nuds = "out.sock"\n[admin]\nlisten = "127.0.0.1:{port}"\n')
        assert_one_line(proc, f"admin.listen = 127.0.0.1:{port}", "address already in use")
        proc = run_toml(d, '[outbound]\nuds = "out.sock"\n[admin]\nlisten = "unix:nope/admin.sock"\n')
        assert_one_line(proc, f"admin.listen = unix:{d}/nope/admin.sock", f"the directory {d}/nope does not exist")


def test_unix_path_too_long() -> None:
    with short_tmpdir() as d:
        long = "x" * 120
        proc = run_toml(d, f'[outbound]\nuds = "{long}.sock"\n')
        assert_one_line(proc, "outbound.uds = ", "more than the 107 a Unix socket path can have")


async def test_second_proxy_on_the_same_sockets_names_hot_restart() -> None:
    with short_tmpdir() as d:
        cfg = d / "p.toml"
        cfg.write_text('[outbound]\nuds = "out.sock"\n[admin]\nlisten = "127.0.0.1:0"\n')
        with trio.fail_after(30):
            first = await start_process(proxy_argv(cfg), "octoproxy ready", d, "first")
            try:
                proc = await trio.to_thread.run_sync(octoproxy, "run", "-c", str(cfg))
                assert_one_line(proc, f"outbound.uds = {d}/out.sock", "a server already listens", "--hot-restart")
                assert first.process.returncode is None
            finally:
                await stop(first)


def test_traceback_only_when_asked() -> None:
    with short_tmpdir() as d:
        cfg = d / "p.toml"
        cfg.write_text('[proxy]\nlog_level = "debug"\n[outbound]\nuds = "missing/out.sock"\n')
        proc = octoproxy("run", "-c", str(cfg))
        assert proc.returncode == 2 and "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("octoproxy: cannot listen on outbound.uds = ")


def test_control_plane_address_in_use_and_admin_directory_missing() -> None:
    with port_in_use() as port:
        proc = octoproxy("control-plane", "--listen", f"127.0.0.1:{port}")
        assert_one_line(proc, f"octoproxy control-plane: cannot listen on --listen = 127.0.0.1:{port}", "already in use")
    proc = octoproxy("control-plane", "--listen", "127.0.0.1:0", "--admin", "unix:/nonexistent-dir/a.sock")
    assert_one_line(proc, "--admin = unix:/nonexistent-dir/a.sock", "the directory /nonexistent-dir does not exist")


def test_agent_admin_address_in_use() -> None:
    with short_tmpdir() as d, port_in_use() as port:
        (d / "p.toml").write_text('[outbound]\nuds = "out.sock"\n')
        (d / "agent.toml").write_text(f'[agent]\nadmin = "127.0.0.1:{port}"\nproxy_config = "p.toml"\n')
        proc = octoproxy("agent", "-c", str(d / "agent.toml"))
        assert_one_line(proc, f"octoproxy agent: cannot listen on agent.admin = 127.0.0.1:{port}", "already in use")


def test_messages_for_errors_root_cannot_provoke() -> None:
    denied = OSError(errno.EACCES, "Permission denied")
    assert _why(denied, "/run/app/out.sock") == "permission denied: this user cannot create a socket in /run/app"
    assert "ports below 1024" in _why(denied, None)
    assert "no such address" in _why(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), None)


# ---------------------------------------------------------------- the ready line means ready


async def test_ready_line_waits_for_the_local_app() -> None:
    """app_uds in a directory that does not exist yet: no ready line while /ready says 503."""
    with short_tmpdir() as d:
        app_dir = d / "app"
        cfg = d / "p.toml"
        cfg.write_text(
            f'[outbound]\nuds = "out.sock"\n[inbound]\nlisten = "127.0.0.1:{free_port()}"\napp_uds = "app/app.sock"\n'
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        admin = cfg.read_text().split('listen = "')[-1].split('"')[0]
        errpath = d / "proxy.stderr"
        with trio.fail_after(40), open(errpath, "wb") as err:
            proc = await trio.lowlevel.open_process(proxy_argv(cfg), stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            try:
                assert proc.stdout is not None
                # /ready answers (503) while the ready line has not come
                while True:
                    try:
                        status, _h, body = await http_request(admin, "GET", "/ready", timeout=2)
                        break
                    except OSError:
                        await trio.sleep(0.05)
                assert status == 503 and json.loads(body)["local_app"]["connected"] is False
                with trio.move_on_after(3):
                    early = await proc.stdout.receive_some(4096)
                    pytest.fail(f"printed before ready: {early!r}")
                assert f"waiting for the local app on inbound.app_uds {app_dir}/app.sock (the directory {app_dir} does not exist)" in (
                    errpath.read_text()
                )
                app_dir.mkdir()
                async with provider(d, app_dir / "app.sock"):
                    line = b""
                    while b"\n" not in line:
                        chunk = await proc.stdout.receive_some(4096)
                        assert chunk, errpath.read_text()
                        line += chunk
                    assert line.startswith(b"octoproxy ready ")
                    status, _h, body = await http_request(admin, "GET", "/ready", timeout=2)
                    assert status == 200, body
                    proc.send_signal(signal.SIGTERM)
                    assert await proc.wait() == 0
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()
        assert "Traceback" not in errpath.read_text()


def test_other_errors_are_not_turned_into_a_line(tmp_path: Path) -> None:
    """Only a failed bind of a known listener becomes one line; anything else keeps its traceback."""
    from octoproxy.common._startup import describe_listen_failure

    listeners = [("outbound.uds", str(tmp_path / "out.sock")), ("admin.listen", "127.0.0.1:0")]
    assert describe_listen_failure(ValueError("bug"), listeners) is None
    assert describe_listen_failure(ExceptionGroup("g", [OSError(errno.EMFILE, "Too many open files")]), listeners) is None
    assert describe_listen_failure(ExceptionGroup("g", [OSError(errno.EADDRINUSE, "in use"), KeyError("x")]), listeners) is None
    assert not (tmp_path / "out.sock").exists(), "a trial bind left its socket file"
    missing = OSError(errno.ENOENT, "No such file or directory")
    line = describe_listen_failure(ExceptionGroup("g", [missing]), [("outbound.uds", str(tmp_path / "no" / "out.sock"))])
    assert line == f"outbound.uds = {tmp_path}/no/out.sock: the directory {tmp_path}/no does not exist (create it, or point the key at one that does)"


def test_hot_restart_peer_that_hangs_up_is_one_line() -> None:
    """`run --hot-restart` against something that accepts and closes: one line, no traceback."""
    import threading

    with short_tmpdir() as d:
        (d / "p.toml").write_text('[outbound]\nuds = "out.sock"\n')
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(d / "out.sock.hotrestart"))
        server.listen()
        # the hand-over secret a running proxy writes: the child reads it before it says hello
        secret = d / "out.sock.hotrestart.secret"
        secret.write_text("s" * 43)
        secret.chmod(0o600)

        def hang_up() -> None:
            conn, _ = server.accept()
            conn.recv(4096)
            conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            proc = octoproxy("run", "-c", str(d / "p.toml"), "--hot-restart")
        finally:
            server.close()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"octoproxy: hot restart: the process on proxy.hot_restart_uds = {d}/out.sock.hotrestart "
            "closed the connection instead of handing its listeners over"
        ]
