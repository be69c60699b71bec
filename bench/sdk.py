"""SDK front ends: calls per second and call latency through one real proxy.

    python bench/sdk.py [--duration 3] [--rounds 2] [--concurrency 32] [--latency-calls 3000]

Topology (loopback, sockets in a temp dir):

    client (front end under test) -UDS-> octoproxy -TCP-> (same octoproxy, inbound) -UDS-> echo

One ``python -m octoproxy run`` process whose route "echo" points at its own
inbound listener, in front of ``bench/_echo.py`` (a raw-socket echo provider,
so the provider costs next to nothing). The proxy runs pinned to CPU 0; the
echo provider and the client to CPU 1 (when the machine has two CPUs).

Figures, each a median over ``--rounds`` rounds (front ends interleaved):

* calls/s of the Trio, asyncio and blocking clients, closed loop with the same
  number of callers (``--concurrency``: tasks, or threads for blocking), 100-byte
  bodies, on one client (one multiplexed connection);
* single-thread, one-at-a-time call latency (mean µs over ``--latency-calls``)
  of the three clients, and of "inline": a bare socket that writes a request
  and reads its response in the calling thread (the floor of a blocking client
  without a reader thread, to weigh that design choice).

Client CPU µs per call (``time.process_time``) is printed beside each figure:
on a loaded machine it moves less than wall-clock figures do.

Each client runs in a fresh process of its own (``--worker MODE``). The
installed package is used (no ``src/`` on ``sys.path``). Targets: asyncio
calls/s within 20 % of Trio's; blocking latency within 50 µs of asyncio's.
The last line is always

    sdk: trio_cps=<A> asyncio_cps=<B> blocking_us=<C> asyncio_us=<D>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BODY = b"x" * 100


# ---------------------------------------------------------------- workers (one process per measurement)


def worker_trio(path: str, mode: str, concurrency: int, warmup: float, duration: float, calls: int) -> dict[str, float]:
    import trio

    from octoproxy import sdk

    async def main() -> dict[str, float]:
        async with sdk.open_client(path) as client:
            if mode == "latency":
                for _ in range(200):
                    await client.call("echo", "echo", BODY, timeout=5)
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    await client.call("echo", "echo", BODY, timeout=5)
                return {"us": (time.perf_counter() - start) / calls * 1e6, "cpu_us": (time.process_time() - cpu) / calls * 1e6}
            count = 0
            measuring = False
            stop = False

            async def caller() -> None:
                nonlocal count
                while not stop:
                    await client.call("echo", "echo", BODY, timeout=10)
                    if measuring:
                        count += 1

            async with trio.open_nursery() as n:
                for _ in range(concurrency):
                    n.start_soon(caller)
                await trio.sleep(warmup)
                measuring = True
                start, cpu = time.perf_counter(), time.process_time()
                await trio.sleep(duration)
                measuring = False
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                stop = True
            return {"cps": count / elapsed, "cpu_us": cpu / max(count, 1) * 1e6}

    return trio.run(main)


def worker_asyncio(path: str, mode: str, concurrency: int, warmup: float, duration: float, calls: int) -> dict[str, float]:
    import asyncio

    from octoproxy.sdk import aio

    async def main() -> dict[str, float]:
        async with aio.open_client(path) as client:
            if mode == "latency":
                for _ in range(200):
                    await client.call("echo", "echo", BODY, timeout=5)
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    await client.call("echo", "echo", BODY, timeout=5)
                return {"us": (time.perf_counter() - start) / calls * 1e6, "cpu_us": (time.process_time() - cpu) / calls * 1e6}
            count = 0
            measuring = False
            stop = False

            async def caller() -> None:
                nonlocal count
                while not stop:
                    await client.call("echo", "echo", BODY, timeout=10)
                    if measuring:
                        count += 1

            tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
            await asyncio.sleep(warmup)
            measuring = True
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(duration)
            measuring = False
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            stop = True
            await asyncio.gather(*tasks)
            return {"cps": count / elapsed, "cpu_us": cpu / max(count, 1) * 1e6}

    return asyncio.run(main())


def worker_blocking(path: str, mode: str, concurrency: int, warmup: float, duration: float, calls: int) -> dict[str, float]:
    import threading

    from octoproxy.sdk import sync

    with sync.connect(path) as client:
        if mode == "latency":
            for _ in range(200):
                client.call("echo", "echo", BODY, timeout=5)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                client.call("echo", "echo", BODY, timeout=5)
            return {"us": (time.perf_counter() - start) / calls * 1e6, "cpu_us": (time.process_time() - cpu) / calls * 1e6}
        counts = [0] * concurrency
        measuring = threading.Event()
        stop = threading.Event()

        def caller(i: int) -> None:
            while not stop.is_set():
                client.call("echo", "echo", BODY, timeout=10)
                if measuring.is_set():
                    counts[i] += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        measuring.set()
        start, cpu = time.perf_counter(), time.process_time()
        time.sleep(duration)
        measuring.clear()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        stop.set()
        for t in threads:
            t.join()
        return {"cps": sum(counts) / elapsed, "cpu_us": cpu / max(sum(counts), 1) * 1e6}


def worker_inline(path: str, mode: str, concurrency: int, warmup: float, duration: float, calls: int) -> dict[str, float]:
    """Reference for the blocking design: no reader thread, the caller reads its own response
    (the floor of a "whoever waits reads" client: one socket, the codec, nothing else)."""
    import socket as _socket

    from octoproxy.frame import FrameDecoder, encode_request

    assert mode == "latency"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.connect(path)
    dec = FrameDecoder()

    def one(sid: int) -> None:
        sock.sendall(encode_request(sid, "echo", "echo", BODY, timeout_ms=5000))
        while (f := dec.next_frame()) is None:
            dec.receive_data(sock.recv(65536))
        assert bytes(f.body) == BODY

    for i in range(200):
        one(i + 1)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(calls):
        one(i + 1000)
    result = {"us": (time.perf_counter() - start) / calls * 1e6, "cpu_us": (time.process_time() - cpu) / calls * 1e6}
    sock.close()
    return result


WORKERS = {"trio": worker_trio, "asyncio": worker_asyncio, "blocking": worker_blocking, "inline": worker_inline}


# ---------------------------------------------------------------- the harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int | None):  # type: ignore[no-untyped-def]
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def wait_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout: float = 20.0) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


def proxy_config(d: Path, port: int) -> str:
    return f"""
[proxy]
service = "echo"  # the route below points at this proxy's own inbound, which serves only its own service
drain_time = 1.0
shutdown_time = 2.0
[outbound]
uds = "{d}/outbound.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{d}/app.sock"
[admin]
listen = "127.0.0.1:0"
[upstream]
ping_interval = 30.0
[[routes]]
service = "echo"
cluster = "echo"
timeout = 10.0
[clusters.echo]
endpoints = [ {{ address = "127.0.0.1:{port}" }} ]
"""


def measure(path: str, front_end: str, mode: str, args: argparse.Namespace, cpu: int | None) -> tuple[float, float]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", front_end, "--mode", mode, "--path", path,
            "--concurrency", str(args.concurrency), "--warmup", str(args.warmup), "--duration", str(args.duration),
            "--latency-calls", str(args.latency_calls)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=pin(cpu))
    if p.returncode != 0:
        raise RuntimeError(f"{front_end} {mode} worker failed:\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return float(result["cps" if mode == "cps" else "us"]), float(result["cpu_us"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per calls/s run")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32, help="callers in flight (tasks or threads)")
    ap.add_argument("--latency-calls", type=int, default=3000)
    ap.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the client to CPUs")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["cps", "latency"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.path, args.mode, args.concurrency, args.warmup, args.duration, args.latency_calls)))
        return 0

    import octoproxy
    from octoproxy import frame

    two_cpus = len(os.sched_getaffinity(0)) >= 2 and not args.no_pin
    proxy_cpu, client_cpu = (0, 1) if two_cpus else (None, None)
    d = Path(tempfile.mkdtemp(prefix="octo-bsdk-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        cfg = d / "proxy.toml"
        cfg.write_text(proxy_config(d, port))
        echo = subprocess.Popen([sys.executable, str(BENCH_DIR / "_echo.py"), "--uds", str(d / "app.sock")],
                                stdout=subprocess.PIPE, stderr=open(d / "echo.stderr", "wb"), preexec_fn=pin(client_cpu))
        procs.append(echo)
        wait_line(echo, b"ready")
        proxy = subprocess.Popen([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)],
                                 stdout=subprocess.PIPE, stderr=open(d / "proxy.stderr", "wb"), preexec_fn=pin(proxy_cpu))
        procs.append(proxy)
        line = wait_line(proxy, b"octoproxy ready").decode()
        admin = dict(w.split("=", 1) for w in line.split()[2:] if "=" in w)["admin"]
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("proxy never ready")
            time.sleep(0.05)
        path = str(d / "outbound.sock")
        print(f"octoproxy {octoproxy.__version__} codec={frame.IMPLEMENTATION}, python {sys.version.split()[0]}, "
              f"cpus={'proxy:0 client+echo:1' if two_cpus else 'unpinned'}, concurrency={args.concurrency}, "
              f"{args.duration}s x {args.rounds} rounds", flush=True)
        cps: dict[str, list[float]] = {k: [] for k in ("trio", "asyncio", "blocking")}
        cps_cpu: dict[str, list[float]] = {k: [] for k in cps}
        lat: dict[str, list[float]] = {k: [] for k in ("trio", "asyncio", "blocking", "inline")}
        lat_cpu: dict[str, list[float]] = {k: [] for k in lat}
        for r in range(args.rounds):
            for fe in ("trio", "asyncio", "blocking"):
                v, c = measure(path, fe, "cps", args, client_cpu)
                cps[fe].append(v)
                cps_cpu[fe].append(c)
                print(f"round {r + 1}: {fe:9s} {v:9.0f} calls/s     (client CPU {c:6.1f} µs per call)", flush=True)
            for fe in ("trio", "asyncio", "blocking", "inline"):
                v, c = measure(path, fe, "latency", args, client_cpu)
                lat[fe].append(v)
                lat_cpu[fe].append(c)
                print(f"round {r + 1}: {fe:9s} {v:9.1f} µs per call (one at a time; client CPU {c:6.1f} µs)", flush=True)
        med = {k: statistics.median(v) for k, v in cps.items()}
        mlat = {k: statistics.median(v) for k, v in lat.items()}
        print()
        print(f"{'front end':10s} {'calls/s':>9s} {'vs trio':>8s} {'client CPU µs/call':>19s} {'µs/call 1-at-a-time':>20s} {'client CPU µs':>14s}")
        for fe in ("trio", "asyncio", "blocking"):
            print(f"{fe:10s} {med[fe]:9.0f} {med[fe] / med['trio']:7.2f}x {statistics.median(cps_cpu[fe]):19.1f} "
                  f"{mlat[fe]:20.1f} {statistics.median(lat_cpu[fe]):14.1f}")
        print(f"{'(inline)':10s} {'':9s} {'':8s} {'':19s} {mlat['inline']:20.1f} {statistics.median(lat_cpu['inline']):14.1f}"
              "   <- raw socket in the calling thread: the floor of a client without a reader thread")
        ok_cps = med["asyncio"] >= 0.8 * med["trio"]
        ok_lat = mlat["blocking"] <= mlat["asyncio"] + 50
        print(f"target asyncio calls/s within 20 % of trio: {'met' if ok_cps else 'NOT met'}; "
              f"blocking latency within 50 µs of asyncio: {'met' if ok_lat else 'NOT met'} "
              f"({mlat['blocking'] - mlat['asyncio']:+.1f} µs)")
        print(f"sdk: trio_cps={med['trio']:.0f} asyncio_cps={med['asyncio']:.0f} blocking_us={mlat['blocking']:.1f} asyncio_us={mlat['asyncio']:.1f}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
