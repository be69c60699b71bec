"""Failover under load: a provider killed, another stopped; failed calls, p99 and recovery time.

    python bench/failover.py [--duration 12] [--stop 3] [--json PATH]

Topology (loopback, sockets in a temp dir), run twice, once per system:

    load generator (SDK, 8 callers, closed loop) -UDS-> caller proxy -TCP-> 3 provider proxies -UDS-> 3 apps

Systems:
  plain     the caller proxy without governance (today's round robin; a lost connection's calls fail)
  governed  the caller proxy with docs/governance.md's policies on the route: outlier ejection
            (3 consecutive failures), retries of the idempotent method (3 tries, 0.25 s per try,
            Linkerd's budget), breakers

Faults, at fixed times into the run: at 25 % provider "c" (its proxy and app) is SIGKILLed; at
50 % provider "b"'s proxy is SIGSTOPped for ``--stop`` seconds, then SIGCONTed. The method called
is idempotent ("echo"), each call with a 2 s deadline.

Per system: calls completed and failed, p99 latency during the faults (every call that ended
between the kill and the end of the stop + 1 s, failed ones included), and the time to recover: from each fault to the last failed call it caused
(0 when none failed). Envoy is not run here (an HTTP/2 Envoy with retries and outlier detection
is the issue's comparison; not built yet), so its fields print ``nan``. The last line is exactly

    failover: octoproxy_failed=<governed> envoy_failed=nan octoproxy_p99_ms=<governed p99> envoy_p99_ms=nan

and the line before it ``failover_plain: failed=<A> p99_ms=<B> recover_ms=<C>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from octoproxy import sdk

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
APP = REPO / "tests" / "apps" / "gov_provider.py"
GOVERNANCE = """
[governance]
version = "failover"
[governance.services.echo.outlier]
consecutive_failures = 3
interval = 1.0
base_ejection_time = 10.0
max_ejection_percent = 50
[governance.services.echo.breaker]
max_retries = 64
[governance.services.echo.retry]
max_attempts = 3
idempotent_methods = ["echo"]
per_try_timeout = 0.25
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(argv: list[str], ready: str, log_path: Path, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as err:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    os.set_blocking(p.stdout.fileno(), False)
    while ready.encode() not in buf:
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError(f"{argv[1:3]} not ready: {log_path.read_text()[-1500:]}")
        try:
            chunk = os.read(p.stdout.fileno(), 4096)
            buf += chunk
        except BlockingIOError:
            time.sleep(0.02)
    return p


def provider_toml(d: Path, name: str, port: int) -> str:
    return f"""
[proxy]
service = "echo"
[outbound]
uds = "{d}/{name}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{d}/{name}-app.sock"
[admin]
listen = "127.0.0.1:0"
"""


def caller_toml(d: Path, ports: list[int], governed: bool) -> str:
    eps = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in ports)
    return f"""
[proxy]
service = "bench-caller"
[outbound]
uds = "{d}/caller.sock"
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.3
connections_per_endpoint = 1
[[routes]]
service = "echo"
cluster = "echo"
timeout = 2.0
[clusters.echo]
endpoints = [ {eps} ]
""" + (GOVERNANCE if governed else "")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_system(governed: bool, duration: float, stop_for: float) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="failover-", dir="/tmp"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ports = {}
        for name in ("a", "b", "c"):
            ports[name] = free_port()
            procs[f"{name}-app"] = spawn([sys.executable, str(APP), "--uds", str(d / f"{name}-app.sock"), "--name", name], "provider ready", d / f"{name}-app.log")
            (d / f"{name}.toml").write_text(provider_toml(d, name, ports[name]))
            procs[f"{name}-proxy"] = spawn([sys.executable, "-m", "octoproxy", "run", "-c", str(d / f"{name}.toml")], "octoproxy ready", d / f"{name}-proxy.log")
        (d / "caller.toml").write_text(caller_toml(d, list(ports.values()), governed))
        procs["caller"] = spawn([sys.executable, "-m", "octoproxy", "run", "-c", str(d / "caller.toml")], "octoproxy ready", d / "caller.log")
        await trio.sleep(1.0)  # connections up
        t0 = trio.current_time()
        kill_at, stop_at = t0 + duration * 0.25, t0 + duration * 0.5
        cont_at = stop_at + stop_for
        ok: list[tuple[float, float]] = []  # (end time, latency)
        failed: list[float] = []
        failed_lat: list[tuple[float, float]] = []
        done = trio.Event()

        async def caller(client: sdk.Client) -> None:
            while not done.is_set():
                start = trio.current_time()
                try:
                    await client.call("echo", "echo", b"x" * 100, timeout=2.0)
                    ok.append((trio.current_time(), trio.current_time() - start))
                except sdk.CallError:
                    failed.append(trio.current_time())
                    failed_lat.append((trio.current_time(), trio.current_time() - start))
                await trio.sleep(0.002)

        async def faults() -> None:
            await trio.sleep_until(kill_at)
            for name in ("c-proxy", "c-app"):
                os.killpg(procs[name].pid, signal.SIGKILL)
            await trio.sleep_until(stop_at)
            os.killpg(procs["b-proxy"].pid, signal.SIGSTOP)
            await trio.sleep_until(cont_at)
            os.killpg(procs["b-proxy"].pid, signal.SIGCONT)
            await trio.sleep_until(t0 + duration)
            done.set()

        async with sdk.open_client(d / "caller.sock") as client, trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(caller, client)
            n.start_soon(faults)
        during = [lat for end, lat in ok + failed_lat if kill_at <= end <= cont_at + 1.0]  # failed calls count too
        kill_fail = [t for t in failed if kill_at <= t < stop_at]
        stop_fail = [t for t in failed if t >= stop_at]
        recover = max([(kill_fail[-1] - kill_at) if kill_fail else 0.0, (stop_fail[-1] - stop_at) if stop_fail else 0.0])
        return {
            "calls": float(len(ok)),
            "failed": float(len(failed)),
            "failed_kill": float(len(kill_fail)),
            "failed_stop": float(len(stop_fail)),
            "p99_ms": pct(during, 0.99) * 1000,
            "p50_ms": pct(during, 0.50) * 1000,
            "recover_ms": recover * 1000,
        }
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of load per system")
    ap.add_argument("--stop", type=float, default=3.0, help="seconds provider b stays SIGSTOPped")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    results = {}
    for system in ("plain", "governed"):
        log(f"{system}: {args.duration:g} s of load, kill at 25 %, stop {args.stop:g} s at 50 % ...")
        results[system] = trio.run(run_system, system == "governed", args.duration, args.stop)
        r = results[system]
        log(f"  {r['calls']:.0f} calls, {r['failed']:.0f} failed ({r['failed_kill']:.0f} on the kill, "
            f"{r['failed_stop']:.0f} on the stop), p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms during the faults, "
            f"recovered in {r['recover_ms']:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    p, g = results["plain"], results["governed"]
    print(f"failover_plain: failed={p['failed']:.0f} p99_ms={p['p99_ms']:.1f} recover_ms={p['recover_ms']:.0f}")
    nan = math.nan
    print(f"failover: octoproxy_failed={g['failed']:.0f} envoy_failed={nan} octoproxy_p99_ms={g['p99_ms']:.1f} envoy_p99_ms={nan}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
