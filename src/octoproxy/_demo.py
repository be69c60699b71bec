"""``octoproxy demo``: the whole mesh on one machine, nothing to configure.

What runs (all on loopback and in a temp dir, all cleaned up on exit or Ctrl-C):

* a control plane (``octoproxy control-plane``, embedded store);
* two provider apps ("echo" service, this process, SDK ``serve``), each behind
  its own octoproxy, which registers it with the control plane: provider 1's
  proxy supervised by ``octoproxy agent``, provider 2's plain ``octoproxy run``;
* a caller app (this process, SDK client, many calls in flight on long-lived
  connections) behind its own octoproxy, which it subscribes to "echo" only
  (on-demand discovery: the caller's proxy learns both providers);
* in the middle of the traffic: a hot-restart upgrade of provider 1's proxy
  through its agent, then a hot restart of the caller's proxy.

A live progress line, then a summary table. Exit status 1 if any call failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import sdk
from .common._admin import http_request

__all__ = ["main"]


@dataclass
class Stats:
    calls: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]


@dataclass
class Child:
    name: str
    process: trio.Process
    info: dict[str, str]
    log: Path


class Demo:
    def __init__(self, workdir: Path, duration: float, workers: int, out: object = sys.stdout) -> None:
        self.dir = workdir
        self.duration = duration
        self.workers = workers
        self.stats = Stats()
        self.children: list[Child] = []
        self.out = out
        self.cp_port = 0
        self.tokens: dict[str, Path] = {}

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)  # type: ignore[call-overload]

    # ------------------------------------------------------------ processes

    async def spawn(self, name: str, argv: list[str], ready: str, timeout: float = 20.0) -> Child:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as err:
            proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        child = Child(name, proc, {}, log)
        self.children.append(child)
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(timeout):
            while True:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"{name} exited before it was ready; see {log}:\n{log.read_text()[-2000:]}")
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(ready):
                        child.info = dict(w.split("=", 1) for w in line.split()[2:] if "=" in w)
                        return child

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                if child.process.returncode is None:
                    try:
                        os.killpg(child.process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            with trio.move_on_after(8):
                for child in self.children:
                    await child.process.wait()
            for child in self.children:
                if child.process.returncode is None:
                    try:
                        os.killpg(child.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    await child.process.wait()

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    # ------------------------------------------------------------ the mesh

    def discovery(self, service: str) -> str:
        token = self.tokens[service]
        return f'[discovery]\ncontrol_plane = ["ws://127.0.0.1:{self.cp_port}/v1/discovery"]\njoin_token_file = "{token}"\n'

    async def make_join_token(self, admin: str, service: str) -> None:
        """What ``octoproxy ctl token create --service S`` does: the admin API with the operator token."""
        operator = (self.dir / "cp-state" / "operator.token").read_text().strip()
        status, _h, body = await http_request(
            admin,
            "POST",
            "/v1/tokens",
            json.dumps({"service": service}).encode(),
            headers=[("Authorization", f"Bearer {operator}"), ("Content-Type", "application/json")],
            timeout=10,
        )
        if status != 200:
            raise RuntimeError(f"cannot make a join token for {service}: HTTP {status} {body[:200]!r}")
        path = self.dir / f"{service}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.loads(body)["token"] + "\n")
        self.tokens[service] = path

    def provider_config(self, i: int, port: int) -> Path:
        d = self.dir
        return self.write(
            f"provider{i}.toml",
            f"""[proxy]
service = "echo"
drain_time = 5.0
shutdown_time = 8.0
log_level = "warning"
[outbound]
uds = "{d}/p{i}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{d}/p{i}-app.sock"
[admin]
listen = "127.0.0.1:0"
"""
            + self.discovery("echo")
            + "lease_ttl = 5.0\n",
        )

    def caller_config(self) -> Path:
        d = self.dir
        return self.write(
            "caller.toml",
            f"""[proxy]
service = "demo-caller"
drain_time = 5.0
shutdown_time = 8.0
log_level = "warning"
[outbound]
uds = "{d}/caller.sock"
[admin]
listen = "127.0.0.1:0"
"""
            + self.discovery("demo-caller")
            + 'lb = "least_request"\n',
        )

    async def run(self) -> int:
        py = sys.executable
        ports = [_free_port(), _free_port(), _free_port()]
        served = [0, 0]

        def make_handler(i: int) -> sdk.Handler:
            async def handler(req: sdk.Request) -> bytes:
                served[i] += 1
                return req.body

            return handler

        async with trio.open_nursery() as nursery:
            try:
                for i in (0, 1):
                    await nursery.start(sdk.serve, self.dir / f"p{i + 1}-app.sock", make_handler(i))
                self.say(f"[demo] workdir {self.dir}")
                self.cp_port = ports.pop()
                cp = await self.spawn(
                    "control-plane",
                    [
                        py, "-m", "octoproxy", "control-plane", "--listen", f"127.0.0.1:{self.cp_port}",
                        "--log-level", "warning", "--admin", "127.0.0.1:0", "--state-dir", str(self.dir / "cp-state"),
                    ],
                    "octoproxy control-plane ready",
                )
                for service in ("echo", "demo-caller"):
                    await self.make_join_token(cp.info["admin"], service)
                self.say(
                    f"[demo] control plane on 127.0.0.1:{self.cp_port} (embedded store); "
                    "join tokens made for echo and demo-caller"
                )
                ports.append(_free_port())
                p1cfg = self.provider_config(1, ports[0])
                agent_cfg = self.write(
                    "agent1.toml", f'[agent]\nadmin = "127.0.0.1:0"\nproxy_config = "{p1cfg}"\nupgrade_timeout = 20.0\n'
                )
                agent = await self.spawn("agent1", [py, "-m", "octoproxy", "agent", "-c", str(agent_cfg)], "octoproxy agent ready")
                self.say(f"[demo] provider 1: app + octoproxy under the agent (agent admin {agent.info['admin']})")
                await self.spawn("provider2", [py, "-m", "octoproxy", "run", "-c", str(self.provider_config(2, ports[1]))], "octoproxy ready")
                self.say("[demo] provider 2: app + octoproxy")
                ccfg = self.caller_config()
                caller = await self.spawn("caller", [py, "-m", "octoproxy", "run", "-c", str(ccfg)], "octoproxy ready")
                await _wait_ready(caller.info["admin"])
                counts = await sdk.subscribe(caller.info["admin"], ["echo"], timeout=10)
                await _wait_endpoints(caller.info["admin"], "echo", 2, token=_token(caller.info["admin_token_file"]))
                self.subscriptions = sorted(counts)
                self.say(f"[demo] caller subscribed to {', '.join(self.subscriptions)}: 2 providers discovered")
                self.say(f"[demo] caller: app + octoproxy on {self.dir / 'caller.sock'}; {self.workers} calls in flight for {self.duration:.0f}s")
                await self.traffic(agent, ccfg)
            finally:
                nursery.cancel_scope.cancel()
        caller_admin = self.children[-1].info.get("admin", "")
        return self.summary(served, caller_admin)

    async def traffic(self, agent: Child, caller_cfg: Path) -> None:
        stats = self.stats
        stop = trio.Event()
        t_start = trio.current_time()

        async def worker(client: sdk.Client, n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                body = f"{n}:{i}".encode()
                t0 = time.perf_counter()
                try:
                    got = await client.call("echo", "echo", body, timeout=10)
                    if got != body:
                        raise sdk.CallError(sdk.Status.APPLICATION_ERROR, "wrong body")
                except sdk.CallError as exc:
                    stats.errors += 1
                    if len(stats.error_samples) < 5:
                        stats.error_samples.append(repr(exc))
                    continue
                stats.calls += 1
                stats.latencies.append(time.perf_counter() - t0)

        async def progress() -> None:
            last = 0
            while not stop.is_set():
                await trio.sleep(1)
                elapsed = trio.current_time() - t_start
                rate = stats.calls - last
                last = stats.calls
                self.say(
                    f"[demo] {elapsed:5.1f}s  calls {stats.calls:8d}  {rate:6d}/s  errors {stats.errors}"
                    f"  p50 {stats.percentile(0.5) * 1e3:6.2f} ms  p99 {stats.percentile(0.99) * 1e3:6.2f} ms"
                )

        async def upgrades() -> None:
            await trio.sleep(self.duration / 3)
            self.say("[demo] upgrading provider 1's proxy through its agent (hot restart) ...")
            token = _token(self.dir / "agent-admin.token")  # agent.token_file's default, next to agent1.toml
            status, _h, body = await http_request(agent.info["admin"], "POST", "/upgrade", b"{}", timeout=30, token=token)
            outcome = json.loads(body).get("outcome", body.decode(errors="replace")) if body else status
            stats.events.append(f"provider 1 proxy upgraded via agent: {outcome}")
            self.say(f"[demo] ... {outcome}")
            await trio.sleep(self.duration / 3)
            self.say("[demo] hot-restarting the caller's proxy ...")
            new = await self.spawn(
                "caller", [sys.executable, "-m", "octoproxy", "run", "-c", str(caller_cfg), "--hot-restart"], "octoproxy ready"
            )
            stats.events.append(f"caller proxy hot-restarted: generation {new.info.get('generation')}")
            self.say(f"[demo] ... caller proxy generation {new.info.get('generation')} serving")

        async with sdk.open_client(self.dir / "caller.sock") as c1, sdk.open_client(self.dir / "caller.sock") as c2:
            async with trio.open_nursery() as n:
                for w in range(self.workers):
                    n.start_soon(worker, c1 if w % 2 else c2, w)
                n.start_soon(progress)
                n.start_soon(upgrades)
                await trio.sleep(self.duration)
                stop.set()
        self.resends = c1.resends + c2.resends

    def summary(self, served: list[int], caller_admin: str) -> int:
        s = self.stats
        rows = [
            ("calls", f"{s.calls}"),
            ("errors", f"{s.errors}"),
            ("p50 latency", f"{s.percentile(0.5) * 1e3:.2f} ms"),
            ("p99 latency", f"{s.percentile(0.99) * 1e3:.2f} ms"),
            ("served by provider 1 / 2", f"{served[0]} / {served[1]}"),
            ("hot restarts", f"{len(s.events)}"),
            ("caller subscriptions", ", ".join(getattr(self, "subscriptions", [])) or "-"),
            ("SDK resends (HOT_RESTART, not processed)", f"{getattr(self, 'resends', 0)}"),
        ]
        width = max(len(k) for k, _ in rows)
        self.say("")
        self.say("octoproxy demo summary")
        self.say("-" * (width + 20))
        for k, v in rows:
            self.say(f"{k:<{width}}  {v}")
        for e in s.events:
            self.say(f"  * {e}")
        for e in s.error_samples:
            self.say(f"  ! {e}")
        self.say("-" * (width + 20))
        ok = s.errors == 0 and s.calls > 0
        self.say("result: OK, no call failed" if ok else "result: FAILED")
        return 0 if ok else 1


def _free_port() -> int:
    from .common._ports import free_port

    return free_port()


async def _wait_ready(admin: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                status, _h, _b = await http_request(admin, "GET", "/ready", timeout=2)
                if status == 200:
                    return
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                pass
            await trio.sleep(0.05)


def _token(path: str | Path) -> bytes:
    """An admin token, from the file its proxy or agent created (mode 0600)."""
    from .common._secretfile import read_secret

    return read_secret(path)


async def _wait_endpoints(admin: str, service: str, n: int, timeout: float = 20.0, *, token: bytes | None = None) -> None:
    """Until the proxy has ``n`` connected endpoints for ``service``."""
    with trio.fail_after(timeout):
        while True:
            _s, _h, body = await http_request(admin, "GET", "/clusters", timeout=2, token=token)
            eps = json.loads(body).get(service, {}).get("endpoints", [])
            if sum(1 for e in eps if e["connections"]) >= n:
                return
            await trio.sleep(0.05)


@asynccontextmanager
async def _demo_dir() -> AsyncIterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="octoproxy-demo-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _main(duration: float, workers: int) -> int:
    """Run the demo; on SIGINT (Ctrl-C) or SIGTERM stop everything it started, then say so in one line."""
    interrupted: int | None = None
    status = 1
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _demo_dir() as d:
            demo = Demo(d, duration, workers)
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal interrupted
                    async for signum in signals:
                        interrupted = signum
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                try:
                    status = await demo.run()
                finally:
                    await demo.stop_all()  # shielded and bounded; a second Ctrl-C waits for it
                nursery.cancel_scope.cancel()
    if interrupted is not None:
        s = demo.stats
        print(
            f"[demo] interrupted after {s.calls} calls ({s.errors} failed); every process and file it made is gone",
            file=sys.stderr,
            flush=True,
        )
        return 128 + interrupted  # 130 for Ctrl-C, as a shell reports it
    return status


def main(duration: float = 20.0, workers: int = 32) -> int:
    """Run the demo; returns the exit status (1 if any call failed, 130 on Ctrl-C)."""
    try:
        return trio.run(_main, duration, workers)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        print("\n[demo] interrupted", file=sys.stderr)
        return 130
