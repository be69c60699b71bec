"""Helpers for end-to-end tests: real `octoproxy run` processes on temp-dir
sockets and loopback ports, started and stopped by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from octoproxy import Status, sdk
from octoproxy.common._admin import http_request
from octoproxy.common._ports import free_port as _free_port

HERE = Path(__file__).resolve().parent


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temp dir under /tmp: pytest's tmp_path can exceed the 108-byte UDS path limit."""
    d = Path(tempfile.mkdtemp(prefix="op-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    return _free_port()  # below the ephemeral range: no connect() takes it before our process binds it


@dataclass
class Proc:
    process: trio.Process
    stderr_path: Path
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return self.addresses["admin"]

    @property
    def token(self) -> str | None:
        """The admin token (from the file the ready line names), for the endpoints that need it."""
        path = self.addresses.get("admin_token_file")
        return Path(path).read_text().strip() if path else None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, bytes]:
        status, _h, body = await http_request(self.admin, "GET", path, token=self.token)
        return status, body

    async def post(self, path: str) -> tuple[int, bytes]:
        status, _h, body = await http_request(self.admin, "POST", path, token=self.token)
        return status, body

    async def json(self, path: str) -> object:
        status, body = await self.get(path)
        return json.loads(body)

    async def metric(self, name_and_labels: str) -> float:
        """Sum of the samples of /stats whose line starts with ``name_and_labels``."""
        _s, body = await self.get("/stats")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name_and_labels):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def _wait_for_line(proc: trio.Process, prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while b"\n" not in buf or not any(l.startswith(prefix.encode()) for l in buf.split(b"\n")):
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"process exited before printing {prefix!r}")
            buf += chunk
    for line in buf.split(b"\n"):
        if line.startswith(prefix.encode()):
            return line.decode()
    raise AssertionError("unreachable")


@asynccontextmanager
async def run_process(argv: list[str], ready_prefix: str, workdir: Path, name: str, timeout: float = 15.0) -> AsyncIterator[Proc]:
    errpath = workdir / f"{name}.stderr"
    with open(errpath, "wb") as err:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    p = Proc(proc, errpath)
    try:
        try:
            line = await _wait_for_line(proc, ready_prefix, timeout)
        except BaseException:
            print(f"--- {name} stderr ---\n{p.stderr()}", file=sys.stderr)
            raise
        for word in line.split()[2:]:
            if "=" in word:
                k, v = word.split("=", 1)
                p.addresses[k] = v
        try:
            yield p
        except BaseException:
            print(f"--- {name} stderr (tail) ---\n{p.stderr()[-3000:]}", file=sys.stderr)
            raise
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


async def start_process(argv: list[str], ready_prefix: str, workdir: Path, name: str, timeout: float = 15.0) -> Proc:
    """Start a process and wait for its ready line; the caller must :func:`stop` it."""
    errpath = workdir / f"{name}.stderr"
    with open(errpath, "ab") as err:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    p = Proc(proc, errpath)
    try:
        line = await _wait_for_line(proc, ready_prefix, timeout)
    except BaseException:
        await stop(p)
        raise
    for word in line.split()[2:]:
        if "=" in word:
            k, v = word.split("=", 1)
            p.addresses[k] = v
    return p


async def stop(p: Proc) -> None:
    with trio.CancelScope(shield=True):
        if p.process.returncode is None:
            try:
                os.killpg(p.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await p.process.wait()
        if p.process.stdout is not None:
            await p.process.stdout.aclose()


def proxy_argv(config: Path, hot_restart: bool = False) -> list[str]:
    return [sys.executable, "-m", "octoproxy", "run", "-c", str(config)] + (["--hot-restart"] if hot_restart else [])


@asynccontextmanager
async def proxy(workdir: Path, name: str, toml: str) -> AsyncIterator[Proc]:
    cfg = workdir / f"{name}.toml"
    cfg.write_text(toml)
    async with run_process([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)], "octoproxy ready", workdir, name) as p:
        yield p


@asynccontextmanager
async def provider(workdir: Path, uds: Path, name: str = "provider") -> AsyncIterator[Proc]:
    async with run_process([sys.executable, str(HERE / "apps" / "provider.py"), "--uds", str(uds)], "provider ready", workdir, name) as p:
        yield p


def caller_toml(workdir: Path, upstream_ports: list[int], **extra: str) -> str:
    endpoints = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in upstream_ports)
    outbound_extra = extra.get("outbound", "")
    return f"""
[proxy]
service = "caller-app"
drain_time = {extra.get("drain_time", "3.0")}
shutdown_time = {extra.get("shutdown_time", "6.0")}
max_frame_size = {extra.get("max_frame_size", "16777216")}
{extra.get("proxy", "")}
[outbound]
uds = "{workdir}/caller.sock"
{outbound_extra}
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.5
ping_interval = {extra.get("ping_interval", "10.0")}
[[routes]]
service = "echo"
cluster = "echo"
timeout = {extra.get("route_timeout", "5.0")}
[clusters.echo]
lb = "{extra.get("lb", "round_robin")}"
endpoints = [ {endpoints} ]
"""


def provider_toml(workdir: Path, port: int, app_uds: Path, name: str = "provider", **extra: str) -> str:
    return f"""
[proxy]
service = "echo"
drain_time = {extra.get("drain_time", "3.0")}
shutdown_time = 6.0
{extra.get("proxy", "")}
[outbound]
uds = "{workdir}/{name}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{app_uds}"
{extra.get("inbound", "")}
[admin]
listen = "127.0.0.1:0"
"""


async def wait_ready(p: Proc, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while True:
            status, _ = await p.get("/ready")
            if status == 200:
                return
            await trio.sleep(0.02)


class Load:
    """Closed-loop echo calls on a client until :meth:`stop`; counts successes and failures."""

    def __init__(self, body: bytes = b"x", pause: float = 0.002) -> None:
        self.body = body
        self.pause = pause
        self.ok = 0
        self.failures: list[str] = []
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def worker(self, client: sdk.Client) -> None:
        while not self._stop.is_set():
            try:
                assert await client.call("echo", "echo", self.body, timeout=5) == self.body
                self.ok += 1
            except sdk.CallError as exc:
                self.failures.append(repr(exc))
            await trio.sleep(self.pause)


async def statuses_of_slow_calls(client: sdk.Client, n: int, kill: Callable[[], None], seconds: bytes = b"20") -> list[Status]:
    """Start ``n`` calls that sleep at the provider, ``kill()`` something mid-call, return their error statuses."""
    statuses: list[Status] = []

    async def slow() -> None:
        try:
            await client.call("echo", "sleep", seconds, timeout=25)
        except sdk.CallError as exc:
            statuses.append(exc.status)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(slow)
        await trio.sleep(0.5)
        kill()
    return statuses
