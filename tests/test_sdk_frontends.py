"""One suite, three SDK front ends: Trio (``octoproxy.sdk``), asyncio (``octoproxy.sdk.aio``)
and threads (``octoproxy.sdk.sync``), each as client and as provider.

Most cases run through real proxies: a caller-side ``octoproxy run`` and a
provider-side one (subprocesses, loopback, temp-dir sockets), in front of a
provider app served in this process by the front end under test. The last
case hot-restarts both proxies under load and expects 0 failed calls.

The drivers in ``sdk_drivers.py`` give the three front ends one synchronous
face, so each case is written once. The tests are plain (not Trio) functions:
each front end runs its own loop on its own thread, as in an app.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from e2e import caller_toml, free_port, provider_toml, proxy_argv, short_tmpdir
from octoproxy.sdk import CallError, ClientClosedError, NoProxyError, Status
from sdk_drivers import DRIVERS, Load, driver

FRONT_ENDS = sorted(DRIVERS)


# ---------------------------------------------------------------- real proxies (synchronous helpers)


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    addresses: dict[str, str] = field(default_factory=dict)

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.addresses['admin']}{path}", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:  # e.g. reset while the admin server starts
            return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_proxy(config: Path, workdir: Path, name: str, hot_restart: bool = False, timeout: float = 20.0) -> Proxy:
    with open(workdir / f"{name}.stderr", "ab") as err:
        proc = subprocess.Popen(proxy_argv(config, hot_restart), stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    p = Proxy(proc)
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"octoproxy ready" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                p.kill()
                raise AssertionError(f"{name} not ready: {(workdir / f'{name}.stderr').read_text()[-2000:]}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                p.kill()
                raise AssertionError(f"{name} exited: {(workdir / f'{name}.stderr').read_text()[-2000:]}")
            buf += chunk
    line = next(line for line in buf.decode().splitlines() if line.startswith("octoproxy ready"))
    for word in line.split()[2:]:
        if "=" in word:
            k, v = word.split("=", 1)
            p.addresses[k] = v
    deadline = time.monotonic() + 10
    while p.get("/ready") != 200:
        assert time.monotonic() < deadline, f"{name} never ready"
        time.sleep(0.02)
    return p


def hot_restart(config: Path, workdir: Path, name: str, old: Proxy) -> Proxy:
    """A new generation with --hot-restart; the old one drains and exits 0 by itself."""
    new = start_proxy(config, workdir, name, hot_restart=True)
    assert old.proc.wait(15) == 0
    old.kill()
    return new


@dataclass
class Mesh:
    """caller app (front end under test) -> caller proxy -> provider proxy -> provider app (same front end)."""

    driver: object
    workdir: Path
    caller_cfg: Path
    provider_cfg: Path
    caller: Proxy
    provider: Proxy

    @property
    def outbound(self) -> str:
        return str(self.workdir / "caller.sock")


@pytest.fixture(scope="module", params=FRONT_ENDS)
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with driver(request.param) as d, short_tmpdir() as tmp:
        port = free_port()
        app_uds = tmp / "app.sock"
        stop_app = d.serve(str(app_uds))
        caller_cfg = tmp / "caller.toml"
        caller_cfg.write_text(caller_toml(tmp, [port], drain_time="2.0"))
        provider_cfg = tmp / "provider.toml"
        provider_cfg.write_text(provider_toml(tmp, port, app_uds, drain_time="2.0"))
        pp = start_proxy(provider_cfg, tmp, "provider-proxy")
        try:
            cp = start_proxy(caller_cfg, tmp, "caller-proxy")
        except BaseException:
            pp.kill()
            raise
        m = Mesh(d, tmp, caller_cfg, provider_cfg, cp, pp)
        try:
            yield m
        finally:
            m.caller.kill()
            m.provider.kill()
            stop_app()


@pytest.fixture(params=FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> Iterator[object]:
    with driver(request.param) as d:
        yield d


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_tmpdir() as d:
        yield d


# ---------------------------------------------------------------- direct: every client against every provider


@pytest.mark.parametrize("server_name", FRONT_ENDS)
def test_every_client_against_every_provider(front_end: object, server_name: str, sock_dir: Path) -> None:
    path = str(sock_dir / "p.sock")
    with driver(server_name) as server:
        stop = server.serve(path)
        try:
            client = front_end.client(path)  # type: ignore[attr-defined]
            try:
                assert client.call("svc", "echo", b"hello", timeout=5) == b"hello"
                with pytest.raises(CallError) as info:
                    client.call("svc", "fail", b"bob", timeout=5)
                assert info.value.status == Status.APPLICATION_ERROR and info.value.message == "failed: bob"
                with pytest.raises(CallError) as info:
                    client.call("svc", "boom", timeout=5)
                assert info.value.message == "internal error: ZeroDivisionError"
                big = os.urandom(4 << 20)
                assert client.call("svc", "echo", big, timeout=10) == big
                start = time.monotonic()
                with pytest.raises(CallError) as info:
                    client.call("svc", "sleep", b"5", timeout=0.3)
                assert info.value.status == Status.TIMEOUT
                assert 0.25 < time.monotonic() - start < 3
            finally:
                client.close()
        finally:
            stop()


# ---------------------------------------------------------------- through real proxies


def test_call_returns_the_result(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        assert client.call("echo", "echo", b"hello", timeout=5) == b"hello"
        assert client.call("echo", "echo", b"", timeout=5) == b""
        assert client.connections_opened == 1 and client.resends == 0
    finally:
        client.close()


def test_application_error(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        with pytest.raises(CallError) as info:
            client.call("echo", "fail", b"bob", timeout=5)
        assert info.value.status == Status.APPLICATION_ERROR
        assert info.value.message == "failed: bob"
        assert str(info.value) == "APPLICATION_ERROR: failed: bob"
        with pytest.raises(CallError) as info:
            client.call("echo", "boom", timeout=5)
        assert info.value.status == Status.APPLICATION_ERROR and info.value.message == "internal error: ZeroDivisionError"
        assert client.call("echo", "echo", b"still fine", timeout=5) == b"still fine"
    finally:
        client.close()


def test_timeout(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        start = time.monotonic()
        with pytest.raises(CallError) as info:
            client.call("echo", "sleep", b"3", timeout=0.4)
        assert info.value.status == Status.TIMEOUT
        assert 0.3 < time.monotonic() - start < 2.5
        assert client.call("echo", "echo", b"after", timeout=5) == b"after"
    finally:
        client.close()


def test_no_route(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        with pytest.raises(CallError) as info:
            client.call("no-such-service", "m", b"x", timeout=5)
        assert info.value.status == Status.NO_ROUTE
    finally:
        client.close()


def test_many_calls_in_flight_on_one_connection(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        calls = [("echo", "echo", b"%d" % i) for i in range(500)]
        assert client.call_many(calls, timeout=20) == [b for _s, _m, b in calls]
        assert client.connections_opened == 1
    finally:
        client.close()


def test_big_bodies(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    try:
        body = os.urandom(1 << 20)
        assert client.call("echo", "echo", body, timeout=20) == body
        assert client.call("echo", "big", b"%d" % (3 << 20), timeout=20) == b"b" * (3 << 20)
    finally:
        client.close()


def test_request_over_max_frame_size_refused_locally(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound, max_frame_size=1024)  # type: ignore[attr-defined]
    try:
        with pytest.raises(CallError) as info:
            client.call("echo", "echo", bytes(2000), timeout=5)
        assert info.value.status == Status.FRAME_TOO_LARGE
        assert client.call("echo", "echo", b"small", timeout=5) == b"small"
    finally:
        client.close()


def test_closed_client_raises_client_closed_error(mesh: Mesh) -> None:
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    assert client.call("echo", "echo", b"x", timeout=5) == b"x"
    client.close()
    with pytest.raises(ClientClosedError) as info:
        client.call("echo", "echo", b"x", timeout=5)
    if mesh.driver.name == "trio":  # type: ignore[attr-defined]
        assert isinstance(info.value, trio.ClosedResourceError)


def test_hot_restarts_under_load_fail_no_call(mesh: Mesh) -> None:
    """Both proxies hot-restart (caller side twice, provider side once) under load: 0 failed calls."""
    client = mesh.driver.client(mesh.outbound)  # type: ignore[attr-defined]
    newcomers_done = threading.Event()
    load = Load()
    try:
        join = client.load(load, workers=16)
        time.sleep(0.3)
        for i, side in enumerate(["caller", "provider", "caller"]):
            before = load.ok
            if side == "caller":
                mesh.caller = hot_restart(mesh.caller_cfg, mesh.workdir, f"caller-proxy-{i + 1}", mesh.caller)
            else:
                mesh.provider = hot_restart(mesh.provider_cfg, mesh.workdir, f"provider-proxy-{i + 1}", mesh.provider)
            time.sleep(0.2)
            assert load.ok > before, f"no progress across the {side} restart"
        load.stopped.set()
        join()
        newcomers_done.set()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        assert client.connections_opened >= 3  # one per caller-proxy generation
        assert client.call("echo", "echo", b"after", timeout=5) == b"after"
    finally:
        load.stopped.set()
        client.close()


# ---------------------------------------------------------------- discovery


def test_subscribe_without_discovery_is_no_route(mesh: Mesh) -> None:
    with pytest.raises(CallError) as info:
        mesh.driver.subscribe(mesh.caller.addresses["admin"], ["echo"], timeout=2, retry_for=5)  # type: ignore[attr-defined]
    assert info.value.status == Status.NO_ROUTE


def test_subscribe_gives_up_when_no_proxy_answers(front_end: object) -> None:
    start = time.monotonic()
    with pytest.raises(CallError) as info:
        front_end.subscribe(f"127.0.0.1:{free_port()}", ["echo"], timeout=1, retry_for=0.5)  # type: ignore[attr-defined]
    assert info.value.status == Status.UNAVAILABLE and "no proxy answered" in info.value.message
    assert time.monotonic() - start < 5


def test_subscribe_waits_for_the_proxy_then_holds_the_service(front_end: object, sock_dir: Path) -> None:
    """Started before its proxy (as an app next to it): retried until the proxy answers."""
    cp_port, admin_port, cp_admin_port = free_port(), free_port(), free_port()
    state = sock_dir / "cp-state"
    cp = subprocess.Popen(
        [sys.executable, "-m", "octoproxy", "control-plane", "--listen", f"127.0.0.1:{cp_port}", "--log-level", "warning",
         "--admin", f"127.0.0.1:{cp_admin_port}", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cfg = sock_dir / "caller.toml"
    cfg.write_text(
        f"""
[proxy]
service = "caller-app"
drain_time = 1.0
shutdown_time = 2.0
[outbound]
uds = "{sock_dir}/caller.sock"
[admin]
listen = "127.0.0.1:{admin_port}"
[discovery]
control_plane = ["ws://127.0.0.1:{cp_port}/v1/discovery"]
subscribe_timeout = 3.0
join_token_file = "{sock_dir}/caller-app.token"
"""
    )
    proxies: list[Proxy] = []
    try:
        assert cp.stdout is not None and b"ready" in cp.stdout.readline()
        # the control plane authenticates every session: a join token made by the operator
        token = subprocess.run(
            [sys.executable, "-m", "octoproxy", "ctl", "--control-plane", f"http://127.0.0.1:{cp_admin_port}",
             "--state-dir", str(state), "token", "create", "--service", "caller-app"],
            capture_output=True, check=True, timeout=30,
        ).stdout
        token_file = sock_dir / "caller-app.token"
        token_file.write_bytes(token)
        token_file.chmod(0o600)
        timer = threading.Timer(0.5, lambda: proxies.append(start_proxy(cfg, sock_dir, "caller")))
        timer.start()
        try:
            counts = front_end.subscribe(f"127.0.0.1:{admin_port}", ["svc", "svc"], timeout=3, retry_for=20)  # type: ignore[attr-defined]
        finally:
            timer.join()
        assert counts == {"svc": 0}  # held as absent: nobody registered it yet
    finally:
        for p in proxies:
            p.kill()
        os.killpg(cp.pid, signal.SIGKILL)
        cp.wait(10)
        cp.stdout.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------- errors a new user can act on


def test_no_proxy_names_the_path(front_end: object, sock_dir: Path) -> None:
    path = str(sock_dir / "outbound.sock")
    with pytest.raises(NoProxyError) as info:
        front_end.client(path)  # type: ignore[attr-defined]
    err = info.value
    assert isinstance(err, CallError) and err.status == Status.UNAVAILABLE
    assert isinstance(err, FileNotFoundError) and err.errno == errno.ENOENT  # code that caught OSError still does
    assert str(err).startswith(f"UNAVAILABLE: no octoproxy listening on {path} (is the proxy running? outbound.uds in its config)")
    # a stale socket file: nobody listens
    stop = front_end.serve(path)  # type: ignore[attr-defined]
    stop()
    if os.path.exists(path):
        with pytest.raises(NoProxyError) as info:
            front_end.client(path)  # type: ignore[attr-defined]
        assert isinstance(info.value, ConnectionRefusedError)


def test_wait_for_the_proxy_to_come_up(front_end: object, sock_dir: Path) -> None:
    path = str(sock_dir / "late.sock")
    stops: list[object] = []
    with driver("blocking") as server:
        timer = threading.Timer(0.4, lambda: stops.append(server.serve(path)))
        timer.start()
        start = time.monotonic()
        client = front_end.client(path, wait=10)  # type: ignore[attr-defined]
        try:
            assert time.monotonic() - start >= 0.3
            assert client.call("svc", "echo", b"up", timeout=5) == b"up"
        finally:
            client.close()
            timer.join()
            for stop in stops:
                stop()  # type: ignore[operator]


def test_no_proxy_one_line_from_a_script(sock_dir: Path) -> None:
    """An app that does not catch the error still gets the path and the fix in the last line."""
    path = sock_dir / "missing.sock"
    code = f"from octoproxy.sdk import sync\nsync.connect({str(path)!r})\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last == (
        f"octoproxy.sdk.NoProxyError: UNAVAILABLE: no octoproxy listening on {path} "
        "(is the proxy running? outbound.uds in its config); cannot connect: No such file or directory"
    )


# ---------------------------------------------------------------- providers, seen from raw frames


def raw_exchange(path: str, data: bytes, n: int, timeout: float = 10.0) -> list:  # type: ignore[type-arg]
    """Send ``data`` on a fresh connection; return the first ``n`` frames that come back."""
    from octoproxy.frame import FrameDecoder

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    dec = FrameDecoder()
    out = []
    try:
        sock.sendall(data)
        while len(out) < n:
            while (f := dec.next_frame()) is not None:
                out.append(f)
            if len(out) >= n:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            dec.receive_data(chunk)
    finally:
        sock.close()
    return out


def test_provider_answers_timeout_at_the_deadline(front_end: object, sock_dir: Path) -> None:
    from octoproxy.frame import FrameType, encode_request

    path = str(sock_dir / "p.sock")
    stop = front_end.serve(path)  # type: ignore[attr-defined]
    try:
        start = time.monotonic()
        (resp,) = raw_exchange(path, encode_request(7, "s", "sleep", b"1.0", timeout_ms=300), 1)
        elapsed = time.monotonic() - start
        assert (resp.type, resp.stream_id, resp.header.status) == (FrameType.RESPONSE, 7, Status.TIMEOUT)
        if front_end.name == "blocking":  # type: ignore[attr-defined]
            assert 0.9 < elapsed < 5  # a thread cannot be cancelled: answered when the handler returns
        else:
            assert 0.25 < elapsed < 0.9  # cancelled at the deadline
    finally:
        stop()


def test_provider_refuses_a_malformed_request_then_goaway(front_end: object, sock_dir: Path) -> None:
    from octoproxy.frame import FrameType, encode_frame, encode_request

    path = str(sock_dir / "p.sock")
    stop = front_end.serve(path)  # type: ignore[attr-defined]
    try:
        bad = encode_frame(FrameType.REQUEST, 5, b"\x0a\x01s\x12\x01m\x1a\x02\xff\xfe", b"")  # caller is not UTF-8
        ping = encode_frame(FrameType.PING, 99)
        frames_back = raw_exchange(path, ping + encode_request(1, "s", "sleep", b"0.3") + bad, 4)
        kinds = [(f.type, f.stream_id) for f in frames_back]
        # the request before the bad frame is still served, after the refusal and the GOAWAY
        assert sorted(kinds) == sorted([(FrameType.PONG, 99), (FrameType.RESPONSE, 5), (FrameType.GOAWAY, 0), (FrameType.RESPONSE, 1)])
        assert kinds.index((FrameType.GOAWAY, 0)) < kinds.index((FrameType.RESPONSE, 1))
        assert frames_back[kinds.index((FrameType.RESPONSE, 5))].header.status == Status.PROTOCOL_ERROR
    finally:
        stop()


def test_provider_max_concurrency_bounds_running_handlers(front_end: object, sock_dir: Path) -> None:
    path = str(sock_dir / "p.sock")
    stop = front_end.serve(path, max_concurrency=2)  # type: ignore[attr-defined]
    try:
        client = front_end.client(path)  # type: ignore[attr-defined]
        try:
            start = time.monotonic()
            got = client.call_many([("s", "sleep", b"0.3")] * 6, timeout=10)
            elapsed = time.monotonic() - start
        finally:
            client.close()
        assert got == [b"slept"] * 6
        assert 0.85 < elapsed < 5  # three waves of two
    finally:
        stop()


# ---------------------------------------------------------------- hot restart and GOAWAY against fakes (deterministic)


class FakeProxies:
    """A Unix listener whose first connection is the old, draining proxy and whose
    later connections are the new one (it echoes, prefixed ``new:``).

    On the old connection a request with method ``in-flight`` is held (answer it
    with :meth:`answer_held`); any other request gets ``on_new_request``: a
    HOT_RESTART answer, or nothing.
    """

    def __init__(self, path: str, hot_restart_new_requests: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.hot_restart_new_requests = hot_restart_new_requests
        self.held: list[int] = []
        self.old: socket.socket | None = None
        self.old_got_new_requests = 0
        self.served_new: list[bytes] = []
        self.old_closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if first:
                self.old = conn
            threading.Thread(target=self._serve, args=(conn, first), daemon=True).start()
            first = False

    def _serve(self, conn: socket.socket, old: bool) -> None:
        from octoproxy.frame import Flags, FrameDecoder, FrameType, encode_response

        dec = FrameDecoder()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                dec.receive_data(data)
                while (f := dec.next_frame()) is not None:
                    if f.type != FrameType.REQUEST:
                        continue
                    if not old:
                        self.served_new.append(bytes(f.body))
                        conn.sendall(encode_response(f.stream_id, b"new:" + bytes(f.body)))
                    elif f.method == "in-flight":
                        self.held.append(f.stream_id)
                    else:
                        self.old_got_new_requests += 1
                        if self.hot_restart_new_requests:
                            conn.sendall(encode_response(f.stream_id, flags=Flags.HOT_RESTART, status=Status.UNAVAILABLE))
        if old:
            self.old_closed.set()

    def send_old(self, data: bytes) -> None:
        assert self.old is not None
        self.old.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _wait(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["hot-restart-answer", "goaway"])
def test_draining_proxy_new_calls_move_in_flight_calls_finish(front_end: object, sock_dir: Path, how: str) -> None:
    """The old proxy answers new requests HOT_RESTART (resent on a new connection), or
    sends GOAWAY (new calls go to a new connection); the call in flight on the old
    connection still gets its answer there, and then the client closes it."""
    from octoproxy.frame import FrameType, encode_frame, encode_header, encode_response

    path = str(sock_dir / "p.sock")
    fake = FakeProxies(path, hot_restart_new_requests=how == "hot-restart-answer")
    client = front_end.client(path)  # type: ignore[attr-defined]
    try:
        results: list[object] = []
        in_flight = threading.Thread(target=lambda: results.append(client.call("s", "in-flight", b"A", timeout=10)))
        in_flight.start()
        _wait(lambda: bool(fake.held))
        if how == "goaway":
            fake.send_old(encode_frame(FrameType.GOAWAY, 0, encode_header(error="hot restart")))
            time.sleep(0.2)  # let the client read it
        assert client.call("s", "new", b"B", timeout=5) == b"new:B"
        assert client.connections_opened == 2
        if how == "goaway":
            assert client.resends == 0 and fake.old_got_new_requests == 0  # nothing new was sent on the old one
        else:
            assert client.resends == 1 and fake.old_got_new_requests == 1
        assert not fake.old_closed.is_set()  # A is still outstanding there
        fake.send_old(encode_response(fake.held[0], b"old:A"))
        in_flight.join(10)
        assert results == [b"old:A"]
        assert fake.old_closed.wait(5)  # drained: the client closed it
        assert client.call("s", "new", b"C", timeout=5) == b"new:C"
        assert fake.served_new == [b"B", b"C"] and client.connections_opened == 2
    finally:
        client.close()
        fake.close()
