"""Discovery benchmark: proxy memory vs registry size, and control-plane push latency.

    python bench/discovery.py [--json PATH] [--quick] [--keep-tmp] [--parts a,b]
                              [--sizes 10,1000,10000] [--subscribers 10,1000] [--changes 20]
                              [--stores embedded,etcd] [--clients light|full|light,full]
                              [--cp-gc-stats] [--cp-gc-threshold SPEC]

(a) Proxy memory is flat in registry size. For each registry size (services of 10 endpoints
    each), a fresh `octoproxy control-plane` (embedded store) is started on a StoreSnapshot file
    written beforehand (no registration over the wire; one-hour leases), then a fresh
    `python -m octoproxy run` proxy with a [discovery] table, which is subscribed to 10 services
    (svc-0..svc-9) with `POST /subscribe` on its admin address. The endpoints of those 10
    services are all on the same 10 closed loopback ports (the proxy tries to connect and fails,
    which is fine). RSS is VmRSS from /proc/PID/status: the maximum of 5 samples taken 2 s after
    the subscription answered 200. rss_growth_pct = (RSS at the largest size - RSS at the
    smallest) / RSS at the smallest x 100 (target: within 5 %). Cross-checks: the subscribe reply
    (10 endpoints per service), the proxy's GET /clusters, the control plane's GET /sessions.
    The control plane's own RSS is shown for contrast: it holds the whole registry, the proxy
    must not. If the proxy cannot subscribe, part (a) is reported FAILED with the reason.

(b) Push latency. N subscribers, all in this process, each with its own WebSocket connection
    to the control plane, speaking the real protocol (subscribe to endpoints and route rules of
    one service, ACK every response). Default `light` subscribers: the sans-IO XdsClient over
    trio-websocket, one task each; `--clients full` uses DiscoveryClient instances (3 tasks and
    a ping every 5 s each: about 1.5x the CPU in this process, which then weighs on the
    figures). A separate DiscoveryClient changes the service's endpoints `--changes` times
    (alternately registers a new endpoint and deregisters it), waiting until every subscriber
    has seen the change (at most 5 s) plus a jittered 0.1-0.2 s gap before the next. Latency of
    a (change, subscriber) pair = from just before register/deregister is called to that
    subscriber's on_change seeing the new endpoint set (time.perf_counter in both places, same
    process). Reported: p50 / p90 / p99 / max over all pairs, the time until the last
    subscriber had each change, the register/deregister ack time, the control plane's CPU time
    per change (utime+stime from /proc/PID/stat) and this process's, and how busy the two CPUs
    were with other processes meanwhile. Run on the embedded store (with a --snapshot file, as
    deployed) and on etcd (one member started here, as tests/test_etcd.py does; control plane
    with `--store etcd`), each with a small-N baseline (10) and N=1000, each on a fresh control
    plane. Targets: p99 < 200 ms (embedded, N=1000), < 500 ms (etcd, N=1000).
    The N simulated proxies share this process's heap, so its cyclic GC is off while measuring
    (a real proxy has a small heap of its own; here one full collection over 1000 of them
    pauses ~50-150 ms). The control plane is left alone, except with --cp-gc-stats: then it
    runs through bench/_discovery_gcwrap.py (same code, plus a gc.callbacks hook) and the
    table shows its GC time per change; --cp-gc-threshold sets its GC thresholds (a what-if).

The control plane is pinned to CPU 0, this process (the subscribers) to CPU 1, the proxy to
CPU 0 and etcd runs on every CPU (when the machine has 2+ CPUs). RLIMIT_NOFILE of this process
is raised to its hard limit (children inherit it): N=1000 needs ~1000 sockets here and ~1000 in
the control plane. Every child runs in its own process group and is killed on exit, Ctrl-C or
SIGTERM. `--quick` (smoke test of the script): sizes 10,1000; N 10,100; 6 changes.

The last line printed is always

    push_p99_ms: <X> rss_growth_pct: <Y>

X = embedded-store p99 for the largest N (first --clients kind), Y from (a); `nan` for a part
that failed or was not run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_websocket import connect_websocket_url

from octoproxy.common._admin import http_request
from octoproxy.discovery._xds_client import TYPE_ROUTES, XdsClient
from octoproxy.controlplane import TYPE_ENDPOINTS, DiscoveryClient, ResourceChange
from octoproxy.controlplane._server import MAX_MESSAGE_SIZE
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

BENCH_DIR = Path(__file__).resolve().parent
# Authentication is on: every control plane of this bench shares one operator token, which the
# simulated proxies and the real proxy present too (an operator session may do what a service does).
BENCH_TOKEN = "bench-operator-" + os.urandom(16).hex()
_TOKEN_FILE = Path(tempfile.mkdtemp(prefix="octobench-")) / "operator.token"
with open(os.open(_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as _f:
    _f.write(BENCH_TOKEN + "\n")
AUTH_HEADERS = [("Authorization", f"Bearer {BENCH_TOKEN}")]
REPO = BENCH_DIR.parent
READY_TIMEOUT = 30.0  # a control plane loading 100,000 registrations takes a few seconds
ENDPOINTS_PER_SERVICE = 10
SUBSCRIBED = [f"svc-{i}" for i in range(10)]
CP_CPU = 0
HARNESS_CPU = 1
PUSH_SERVICE = "bench-push"
CHANGE_TIMEOUT = 5.0  # a change not seen by every subscriber after this counts as missed
PHASE_CAP = 30.0  # no new change after this many seconds of a run's change phase (bounded time)
CONNECT_BATCH = 100  # subscribers connecting at once


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_line: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StartupFailed(Exception):
    def __init__(self, reason: str, procs: list[Proc]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tails = {p.name: p.tail() for p in procs}


class Procs:
    """Every child process, so that all of them are ended whatever happens."""

    def __init__(self, pin: bool) -> None:
        self.procs: list[Proc] = []
        self.taskset = shutil.which("taskset")
        self.pin = pin
        self.all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))

    def spawn(self, name: str, argv: list[str], cpu: int | None, log_path: Path, *, stdout_pipe: bool = False,
              env: dict | None = None) -> Proc:
        # explicit affinity for every child (this process pins itself to the harness CPU)
        cpus = str(cpu) if (cpu is not None and self.pin) else self.all_cpus
        if self.taskset:
            argv = [self.taskset, "-c", cpus, *argv]
        logf = open(log_path, "wb")  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                env=env,
                cwd=str(REPO),
                start_new_session=True,  # own process group: killed as a group, no terminal ^C
            )
        finally:
            logf.close()
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def stop_many(self, ps: list[Proc], grace: float = 2.0) -> None:
        """SIGTERM every process group at once, SIGKILL what is left after `grace` seconds."""
        for p in ps:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in ps:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.0, deadline - time.monotonic()))
        for p in ps:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(2.0)
            if p.popen.stdout:
                with contextlib.suppress(OSError):
                    p.popen.stdout.close()
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.stop_many(list(self.procs), grace=1.0)


def wait_ready_line(p: Proc, prefix: str, timeout: float = READY_TIMEOUT) -> str:
    """Read `p`'s stdout until a line starting with `prefix`; then drain the rest into its log."""
    assert p.popen.stdout is not None
    fd = p.popen.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        lines = buf.split(b"\n")
        for line in lines[:-1]:
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                p.ready_line = text
                threading.Thread(target=_drain, args=(p,), daemon=True).start()
                return text
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartupFailed(f"{p.name}: no ready line after {timeout:.0f} s", [p])
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                p.popen.wait(2.0)
                raise StartupFailed(f"{p.name} exited with code {p.popen.returncode} before ready", [p])
            buf += chunk


def _drain(p: Proc) -> None:
    with contextlib.suppress(OSError, ValueError), open(p.log_path, "ab") as f:
        f.writelines(p.popen.stdout)  # type: ignore[arg-type]


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):  # noqa: F821
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):  # noqa: F821
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    """VmRSS of `pid` in kB (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of `pid` in seconds, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_control_plane(procs: Procs, tmp: Path, name: str, *extra: str,
                        gc_stats: Path | None = None, gc_threshold: str = "") -> tuple[Proc, str, str]:
    """Start `octoproxy control-plane`; return (proc, ws URL, admin address).

    With `gc_stats`, run it through bench/_discovery_gcwrap.py, which keeps its GC figures there.
    """
    launch, env = ["-m", "octoproxy"], None
    if gc_stats is not None:
        launch = [str(BENCH_DIR / "_discovery_gcwrap.py")]
        env = {**os.environ, "OCTOBENCH_GC_STATS": str(gc_stats), "OCTOBENCH_GC_THRESHOLD": gc_threshold}
    p = procs.spawn(
        name,
        [sys.executable, *launch, "control-plane", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--log-level", "warning", "--state-dir", str(tmp / f"{name}-state"), "--operator-token-file", str(_TOKEN_FILE),
         "--max-sessions-per-peer", "100000", *extra],
        CP_CPU, tmp / f"{name}.log", stdout_pipe=True, env=env,
    )
    line = wait_ready_line(p, "octoproxy control-plane ready")
    words = dict(w.split("=", 1) for w in line.split() if "=" in w)
    return p, f"ws://{words['listen']}/v1/discovery", words.get("admin", "")


def etcd_healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=1) as r:
            return r.status == 200 and json.loads(r.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


def start_etcd(procs: Procs, tmp: Path) -> tuple[Proc, str]:
    """One etcd member on free loopback ports (as tests/test_etcd.py does); return (proc, client URL)."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise StartupFailed("the etcd binary is not on PATH (bash ci/install_services.sh)", [])
    client, peer = free_port(), free_port()
    client_url = f"http://127.0.0.1:{client}"
    # fmt: off
    argv = [
        etcd, "--name", "bench", "--data-dir", str(tmp / "etcd-data"),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--initial-cluster-state", "new",
        "--initial-cluster-token", f"octo-bench-{client}",
        "--heartbeat-interval", "25", "--election-timeout", "250",
        "--logger", "zap", "--log-level", "error",
    ]
    # fmt: on
    p = procs.spawn("etcd", argv, None, tmp / "etcd.log")
    deadline = time.monotonic() + READY_TIMEOUT
    while not etcd_healthy(client_url):
        if not p.alive():
            raise StartupFailed(f"etcd exited with code {p.popen.returncode} before healthy", [p])
        if time.monotonic() > deadline:
            raise StartupFailed(f"etcd not healthy after {READY_TIMEOUT:.0f} s", [p])
        time.sleep(0.05)
    return p, client_url


def cpu_busy_ticks() -> dict[int, int]:
    """Busy ticks (everything but idle and iowait) of every CPU, from /proc/stat."""
    out = {}
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in vals]
                out[int(name[3:])] = sum(v[:8]) - v[3] - v[4]
    return out


async def read_gc_stats(path: Path | None, pid: int) -> dict | None:
    """Ask bench/_discovery_gcwrap.py (SIGUSR1) for its cumulative GC figures; None if not running it."""
    if path is None:
        return None

    def read() -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        return None

    before = read()
    seq = before["seq"] if before else 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    with trio.move_on_after(2.0):
        while True:
            now = read()
            if now is not None and now["seq"] > seq:
                return now
            await trio.sleep(0.005)
    return None


def octoproxy_version() -> str:
    with contextlib.suppress(Exception):
        import octoproxy

        return f"{getattr(octoproxy, '__version__', '?')} from {Path(octoproxy.__file__).parent}"
    return "?"


# --------------------------------------------------------------------------- (a) proxy memory


def write_snapshot(path: Path, services: int, closed_ports: list[int]) -> int:
    """StoreSnapshot (JSON form, as EmbeddedStore loads it) with `services` x 10 endpoints.

    svc-0..svc-9 (the subscribed ones) all use 127.0.0.1 on the same closed ports; the others get
    distinct unroutable addresses. Leases of one hour, so nothing expires during the run.
    """
    from google.protobuf import json_format

    snap = pb.StoreSnapshot()
    for i in range(services):
        name = f"svc-{i}"
        for j in range(ENDPOINTS_PER_SERVICE):
            if i < len(SUBSCRIBED):
                address = f"127.0.0.1:{closed_ports[j]}"
            else:
                address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{9000 + j}"
            snap.registrations.add(service=name, endpoint=pb.Endpoint(address=address), lease_ttl_ms=3_600_000)
    data = json_format.MessageToJson(snap, preserving_proto_field_name=True, indent=None)
    path.write_text(data)
    return len(snap.registrations)


def proxy_config(tmp: Path, cp_url: str) -> str:
    return f"""\
[proxy]
service = "bench-caller"
[outbound]
uds = "{tmp / 'caller.sock'}"
[admin]
listen = "127.0.0.1:0"
[upstream]
connections_per_endpoint = 1
connect_timeout = 0.2
[discovery]
control_plane = ["{cp_url}"]
subscribe_timeout = 5.0
join_token_file = "{_TOKEN_FILE}"
"""


async def _subscribe(admin: str, services: list[str], timeout: float) -> tuple[int, bytes, float]:
    body = json.dumps({"services": services}).encode()
    t0 = time.perf_counter()
    status, _, reply = await http_request(
        admin, "POST", "/subscribe", body, headers=[("Content-Type", "application/json")], timeout=timeout
    )
    return status, reply, time.perf_counter() - t0


async def _get_json(admin: str, path: str, token: str | None = None) -> object:
    status, _, reply = await http_request(admin, "GET", path, timeout=5.0, token=token)
    return json.loads(reply) if status == 200 else None


def sample_rss(pid: int, n: int = 5, interval: float = 0.2) -> int | None:
    samples = []
    for _ in range(n):
        v = rss_kb(pid)
        if v is not None:
            samples.append(v)
        time.sleep(interval)
    return max(samples) if samples else None


def memory_one(size: int, procs: Procs, base: Path, settle: float) -> dict:
    """One registry size: fresh control plane + proxy; RSS of both."""
    tmp = base / f"mem-{size}"
    tmp.mkdir()
    res: dict = {"services": size, "endpoints": size * ENDPOINTS_PER_SERVICE}
    before = {id(p) for p in procs.procs}
    try:
        closed_ports = [free_port() for _ in range(ENDPOINTS_PER_SERVICE)]  # bound then closed: refused
        t0 = time.monotonic()
        res["registrations"] = write_snapshot(tmp / "snapshot.json", size, closed_ports)
        res["snapshot_write_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        cp, url, cp_admin = start_control_plane(procs, tmp, f"cp-mem-{size}", "--snapshot", str(tmp / "snapshot.json"))
        res["cp_startup_s"] = time.monotonic() - t0
        (tmp / "proxy.toml").write_text(proxy_config(tmp, url))
        proxy = procs.spawn("proxy", [sys.executable, "-m", "octoproxy", "run", "-c", str(tmp / "proxy.toml")],
                            CP_CPU, tmp / "proxy.log", stdout_pipe=True)
        line = wait_ready_line(proxy, "octoproxy ready")
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        admin = words["admin"]
        pid = int(words.get("pid", proxy.pid))
        time.sleep(0.5)
        res["proxy_rss_ready_kb"] = sample_rss(pid, 3, 0.1)
        res["cp_rss_ready_kb"] = rss_kb(cp.pid)
        try:
            status, reply, took = trio.run(_subscribe, admin, SUBSCRIBED, 15.0)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            status, reply, took = None, f"{type(e).__name__}: {e}".encode(), None
        res["subscribe_status"] = status
        res["subscribe_s"] = took
        if status != 200:
            text = reply.decode(errors="replace").strip()[:200]
            res["error"] = f"POST /subscribe on the proxy's admin answered {status}: {text!r}"
            if status == 404:
                res["error"] += " (discovery not wired into the proxy yet?)"
            res["proxy_tail"] = proxy.tail()
            return res
        time.sleep(settle)
        res["proxy_rss_kb"] = sample_rss(pid)
        res["cp_rss_kb"] = rss_kb(cp.pid)
        if not proxy.alive():
            res["error"] = f"proxy died (exit {proxy.popen.returncode})"
            res["proxy_tail"] = proxy.tail()
            return res
        # cross-checks: what the proxy says it got, what it holds, what the control plane saw it subscribe to
        warnings = []
        with contextlib.suppress(ValueError, AttributeError):
            got = {k: v.get("endpoints") for k, v in json.loads(reply).get("services", {}).items()}
            res["subscribe_reply_endpoints"] = got
            if got != dict.fromkeys(SUBSCRIBED, ENDPOINTS_PER_SERVICE):
                warnings.append(f"POST /subscribe reported endpoints {got}")
        with contextlib.suppress(Exception):
            token = Path(words["admin_token_file"]).read_text().strip()  # GET /clusters needs the admin token
            clusters = trio.run(_get_json, admin, "/clusters", token) or {}
            res["proxy_clusters"] = len(clusters)
            res["proxy_cluster_endpoints"] = sum(len(c.get("endpoints", [])) for c in clusters.values())
        with contextlib.suppress(Exception):
            sessions = (trio.run(_get_json, cp_admin, "/sessions?limit=1000", BENCH_TOKEN) or {}).get("sessions", [])  # type: ignore[union-attr]
            subs = sorted({n for s in sessions for n in s.get("subscribed_sample", [])})
            res["cp_sessions"] = len(sessions)
            res["cp_subscribed_endpoints"] = subs
            if subs != sorted(SUBSCRIBED):
                warnings.append(f"the control plane sees the proxy subscribed to {len(subs)} services, not 10")
        if warnings:
            res["warning"] = "; ".join(warnings)
    except StartupFailed as e:
        res["error"] = e.reason
        res["tails"] = e.tails
    finally:
        procs.stop_many([p for p in procs.procs if id(p) not in before])
    return res


def run_memory(sizes: list[int], procs: Procs, base: Path, settle: float, out: dict) -> None:
    out["sizes"] = []
    for size in sizes:
        log(f"(a) registry of {size:,} services x {ENDPOINTS_PER_SERVICE} endpoints ...")
        r = memory_one(size, procs, base, settle)
        out["sizes"].append(r)
        if r.get("error"):
            log(f"    FAILED: {r['error']}")
            out["failed"] = r["error"]
            break  # the same failure would repeat for every size
        log(f"    proxy RSS {r['proxy_rss_kb'] / 1024:.1f} MB, control plane RSS {r['cp_rss_kb'] / 1024:.1f} MB")
    ok = [r for r in out["sizes"] if r.get("proxy_rss_kb")]
    if not out.get("failed") and len(ok) == len(sizes) and len(ok) >= 2:
        lo, hi = ok[0]["proxy_rss_kb"], ok[-1]["proxy_rss_kb"]
        out["rss_growth_pct"] = (hi - lo) / lo * 100
        out["from_services"], out["to_services"] = ok[0]["services"], ok[-1]["services"]


# --------------------------------------------------------------------------- (b) push latency


@dataclass
class _Round:
    """The change in flight: which endpoint set the subscribers must reach."""

    expected: frozenset = frozenset()
    t_issue: float = 0.0
    seen: list = field(default_factory=list)
    remaining: int = 0
    done: trio.Event = field(default_factory=trio.Event)


class GcTimer:
    """Time spent in this process's cyclic garbage collector (gc.callbacks), per generation."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        d = time.perf_counter() - self._t
        g = info["generation"]
        self.count[g] += 1
        self.seconds[g] += d
        self.longest = max(self.longest, d)

    def start(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def stop(self) -> None:
        gc.callbacks.remove(self)


def _pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (inf values allowed)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


class LightSubscriber:
    """One simulated proxy, lighter than a DiscoveryClient: the sans-IO XdsClient over one
    trio-websocket connection and one task (receive a response, apply it, on_change, ACK/NACK);
    no writer or pinger task (the control plane pings idle sessions, trio-websocket answers)."""

    def __init__(self, url: str, node_id: str, on_change) -> None:
        self.url = url
        self.core = XdsClient(node_id)
        self.on_change = on_change
        self.connected = trio.Event()

    async def run(self, names: list[str]) -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                ws = await connect_websocket_url(
                    nursery, self.url, max_message_size=MAX_MESSAGE_SIZE,
                    extra_headers=[(k.encode(), v.encode()) for k, v in AUTH_HEADERS],
                )
            self.connected.set()
            for type_url in (TYPE_ENDPOINTS, TYPE_ROUTES):  # what a proxy subscribes to
                for m in self.core.subscribe(type_url, names):
                    await ws.send_message(m.SerializeToString())
            while True:
                data = await ws.get_message()
                msg = pb.ServerMessage.FromString(data)
                if msg.WhichOneof("message") != "response":
                    continue
                outgoing, changes = self.core.on_response(msg)
                if changes:
                    self.on_change(changes)
                for m in outgoing:
                    await ws.send_message(m.SerializeToString())


async def push_experiment(url: str, n: int, changes: int, cp_pid: int, gap: float, client: str,
                          gc_stats: Path | None) -> dict:
    """N subscribers on `url`; `changes` registration changes; latency per (change, subscriber)."""
    rnd = _Round()
    res: dict = {"subscribers": n, "changes": changes, "client": client}
    base_ep = "127.0.0.1:1"

    def make_on_change(i: int):
        def on_change(chs: list[ResourceChange]) -> None:
            now = time.perf_counter()
            for ch in chs:
                if ch.name != PUSH_SERVICE or ch.resource is None or rnd.seen[i] is not None:
                    continue
                if frozenset(e.address for e in ch.resource.endpoints) == rnd.expected:  # type: ignore[attr-defined]
                    rnd.seen[i] = now - rnd.t_issue
                    rnd.remaining -= 1
                    if rnd.remaining == 0:
                        rnd.done.set()

        return on_change

    async with trio.open_nursery() as nursery:
        registrar = DiscoveryClient([url], "bench-registrar", token=BENCH_TOKEN)
        nursery.start_soon(registrar.run)
        await registrar.wait_connected(10)
        await registrar.register(PUSH_SERVICE, pb.Endpoint(address=base_ep), ttl=30, timeout=10)

        # connect in batches (no SYN storm); every subscriber must then hold the service
        t0 = time.perf_counter()
        rnd.expected = frozenset([base_ep])
        rnd.seen = [None] * n
        rnd.remaining = n
        rnd.done = trio.Event()
        rnd.t_issue = t0
        full: list[DiscoveryClient] = []
        for start in range(0, n, CONNECT_BATCH):
            batch = range(start, min(n, start + CONNECT_BATCH))
            if client == "full":
                cs = [DiscoveryClient([url], f"bench-sub-{i}", make_on_change(i), connect_timeout=5.0, token=BENCH_TOKEN)
                      for i in batch]
                for c in cs:
                    nursery.start_soon(c.run)
                for c in cs:
                    await c.wait_connected(20)
                full.extend(cs)
            else:
                ls = [LightSubscriber(url, f"bench-sub-{i}", make_on_change(i)) for i in batch]
                for sub in ls:
                    nursery.start_soon(sub.run, [PUSH_SERVICE])
                with trio.fail_after(20):
                    for sub in ls:
                        await sub.connected.wait()
        res["connect_s"] = time.perf_counter() - t0
        if client == "full":
            async with trio.open_nursery() as sub_nursery:
                for c in full:
                    sub_nursery.start_soon(functools.partial(c.subscribe, [PUSH_SERVICE], timeout=30))
        with trio.move_on_after(30):
            await rnd.done.wait()
        res["subscribed_s"] = time.perf_counter() - t0
        if rnd.remaining:
            raise RuntimeError(f"{rnd.remaining} subscribers did not receive the service after subscribing")
        await trio.sleep(0.5)  # let the initial ACKs drain
        # The N simulated proxies share this one heap (real ones have a small heap each): this
        # process's cyclic GC, scanning all of them, would add pauses of 50-150 ms to the figures
        # that no real proxy has. So it is off while measuring (refcounting still frees almost
        # everything; one collection afterwards). The control plane's GC is left as it is.
        gc.collect()
        gc.freeze()
        gc.disable()
        harness_rss0 = rss_kb(os.getpid())

        lat: list[float] = []
        last: list[float] = []
        first: list[float] = []
        acks: list[float] = []
        missed = 0
        cp_cpu0, self_cpu0, busy0 = cpu_seconds(cp_pid), time.process_time(), cpu_busy_ticks()
        cp_gc0 = await read_gc_stats(gc_stats, cp_pid)
        t_changes = time.perf_counter()
        gc_timer = GcTimer().start()
        done = 0
        for k in range(1, changes + 1):
            if time.perf_counter() - t_changes > PHASE_CAP:
                log(f"    stopping after {done} changes: the {PHASE_CAP:.0f} s cap of a run is reached")
                break
            done = k
            extra = f"127.0.0.1:{20000 + k}" if k % 2 else f"127.0.0.1:{20000 + k - 1}"
            rnd.expected = frozenset([base_ep, extra]) if k % 2 else frozenset([base_ep])
            rnd.seen = [None] * n
            rnd.remaining = n
            rnd.done = trio.Event()
            rnd.t_issue = time.perf_counter()
            if k % 2:
                await registrar.register(PUSH_SERVICE, pb.Endpoint(address=extra), ttl=30, timeout=10)
            else:
                await registrar.deregister(PUSH_SERVICE, extra, timeout=10)
            acks.append(time.perf_counter() - rnd.t_issue)
            with trio.move_on_after(CHANGE_TIMEOUT):
                await rnd.done.wait()
            got = [s for s in rnd.seen if s is not None]
            missed += n - len(got)
            lat.extend(got)
            lat.extend([math.inf] * (n - len(got)))
            if got:
                first.append(min(got))
                last.append(max(got) if len(got) == n else math.inf)
            await trio.sleep(gap * (1 + random.random()))  # spaced, jittered
        wall = time.perf_counter() - t_changes
        gc_timer.stop()
        cp_cpu1, self_cpu1, busy1 = cpu_seconds(cp_pid), time.process_time(), cpu_busy_ticks()
        harness_rss1 = rss_kb(os.getpid())
        cp_gc1 = await read_gc_stats(gc_stats, cp_pid)
        gc.enable()
        gc.unfreeze()
        res["reconnects"] = sum(c.connections for c in full) - len(full)
        nursery.cancel_scope.cancel()

    res["changes_done"] = changes = done
    lat.sort()
    ms = 1000.0
    res.update({
        "pairs": len(lat),
        "missed": missed,
        "p50_ms": _pct(lat, 50) * ms,
        "p90_ms": _pct(lat, 90) * ms,
        "p99_ms": _pct(lat, 99) * ms,
        "max_ms": lat[-1] * ms if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) * ms if lat and not missed else float("nan"),
        "first_subscriber_p50_ms": statistics.median(first) * ms if first else float("nan"),
        "last_subscriber_p50_ms": statistics.median(last) * ms if last else float("nan"),
        "last_subscriber_max_ms": max(last) * ms if last else float("nan"),
        "register_ack_p50_ms": statistics.median(acks) * ms,
        "register_ack_max_ms": max(acks) * ms,
        "cp_cpu_ms_per_change": ((cp_cpu1 - cp_cpu0) / changes * ms) if cp_cpu0 is not None and cp_cpu1 is not None
        else None,
        "harness_cpu_ms_per_change": (self_cpu1 - self_cpu0) / changes * ms,
        "harness_gc_ms_per_change": sum(gc_timer.seconds) / changes * ms,
        "harness_gc_collections": gc_timer.count,
        "harness_gc_longest_ms": gc_timer.longest * ms,
        "harness_rss_growth_kb": (harness_rss1 - harness_rss0) if harness_rss0 and harness_rss1 else None,
        "changes_wall_s": wall,
        "per_change_last_ms": [x * ms for x in last],
    })
    tck = os.sysconf("SC_CLK_TCK")
    if cp_cpu0 is not None and cp_cpu1 is not None:
        res["cp_busy_pct"] = (cp_cpu1 - cp_cpu0) / wall * 100
        if CP_CPU in busy0 and CP_CPU in busy1:  # what else kept the control plane's CPU busy (noise)
            res["other_load_cp_cpu_pct"] = max(0.0, ((busy1[CP_CPU] - busy0[CP_CPU]) / tck - (cp_cpu1 - cp_cpu0)) / wall * 100)
    if HARNESS_CPU in busy0 and HARNESS_CPU in busy1:
        res["other_load_harness_cpu_pct"] = max(
            0.0, ((busy1[HARNESS_CPU] - busy0[HARNESS_CPU]) / tck - (self_cpu1 - self_cpu0)) / wall * 100)
    if cp_gc0 is not None and cp_gc1 is not None:
        res["cp_gc_ms_per_change"] = (sum(cp_gc1["cpu_s"]) - sum(cp_gc0["cpu_s"])) / changes * ms
        res["cp_gc_collections"] = [b - a for a, b in zip(cp_gc0["count"], cp_gc1["count"])]
        res["cp_gc_longest_ms_whole_run"] = cp_gc1["longest_s"] * ms
        res["cp_gc_tracked_objects"] = cp_gc1.get("tracked_objects")
    return res


def push_one(store: str, n: int, changes: int, procs: Procs, base: Path, gap: float,
             etcd_url: str | None, client: str, cp_gc: tuple[bool, str]) -> dict:
    tmp = base / f"push-{store}-{n}-{client}"
    tmp.mkdir()
    res: dict = {"store": store, "subscribers": n, "client": client}
    before = {id(p) for p in procs.procs}
    try:
        if store == "etcd":
            assert etcd_url is not None
            extra = ["--store", "etcd", "--etcd-endpoints", etcd_url, "--etcd-prefix", f"/bench-{n}-{os.getpid()}/"]
        else:  # as deployed: with a snapshot file (written off the event loop, coalesced)
            extra = ["--snapshot", str(tmp / "snapshot.json")]
        gc_path = tmp / "cp-gc.json" if cp_gc[0] else None
        cp, url, _ = start_control_plane(procs, tmp, f"cp-{store}-{n}", *extra, gc_stats=gc_path, gc_threshold=cp_gc[1])
        res.update(trio.run(push_experiment, url, n, changes, cp.pid, gap, client, gc_path))
        res["cp_rss_kb"] = rss_kb(cp.pid)
        if not cp.alive():
            res["error"] = f"control plane died (exit {cp.popen.returncode})"
    except StartupFailed as e:
        res["error"] = e.reason
        res["tails"] = e.tails
    except Exception as e:  # noqa: BLE001 (a subscriber or the registrar failed: a group from the nursery)
        res["error"] = describe(e)
    finally:
        procs.stop_many([p for p in procs.procs if id(p) not in before])
    return res


def run_push(stores: list[str], ns: list[int], changes: int, procs: Procs, base: Path, gap: float,
             clients: list[str], cp_gc: tuple[bool, str], out: dict) -> None:
    out["runs"] = []
    out["cp_gc_threshold"] = cp_gc[1]
    for store in stores:
        etcd_url = None
        etcd_proc = None
        if store == "etcd":
            try:
                etcd_proc, etcd_url = start_etcd(procs, base)
            except StartupFailed as e:
                for n, client in [(n, c) for n in ns for c in clients]:
                    out["runs"].append({"store": store, "subscribers": n, "client": client, "error": e.reason,
                                        "tails": e.tails})
                log(f"(b) etcd: FAILED: {e.reason}")
                continue
        try:
            for n, client in [(n, c) for n in ns for c in clients]:
                log(f"(b) {store} store, {n} subscribers ({client} clients), {changes} changes ...")
                r = push_one(store, n, changes, procs, base, gap, etcd_url, client, cp_gc)
                out["runs"].append(r)
                if r.get("error"):
                    log(f"    FAILED: {r['error']}")
                else:
                    log(f"    p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  "
                        f"missed {r['missed']}  (connect {r['connect_s']:.1f} s)")
        finally:
            if etcd_proc is not None:
                procs.stop_many([etcd_proc])


# --------------------------------------------------------------------------- report


def fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths))))


def mb(kb) -> str:
    return fmt(kb / 1024 if kb is not None else None)


def report_memory(mem: dict) -> None:
    print(f"\n## (a) proxy memory vs registry size: proxy subscribed to {len(SUBSCRIBED)} services, "
          f"{ENDPOINTS_PER_SERVICE} endpoints per service; VmRSS, max of samples after settling")
    rows = []
    for r in mem.get("sizes", []):
        rows.append((
            f"{r['services']:,}", f"{r['endpoints']:,}", mb(r.get("proxy_rss_ready_kb")),
            "FAILED" if r.get("error") else mb(r.get("proxy_rss_kb")),
            mb(r.get("cp_rss_ready_kb")), mb(r.get("cp_rss_kb")), fmt(r.get("cp_startup_s")),
            fmt(r["subscribe_s"] * 1000 if r.get("subscribe_s") is not None and not r.get("error") else None, ".0f"),
            f"{r['proxy_clusters']}/{r['proxy_cluster_endpoints']}" if "proxy_clusters" in r else "-",
        ))
    table(("services", "endpoints", "proxy MB (ready)", "proxy MB (subscribed)", "CP MB (ready)",
           "CP MB (subscribed)", "CP start s", "subscribe ms", "proxy holds clusters/eps"), rows)
    if mem.get("failed"):
        print(f"(a) FAILED: {mem['failed']}")
        for r in mem.get("sizes", []):
            tail = r.get("proxy_tail") or "\n".join(f"--- {k}\n{v}" for k, v in r.get("tails", {}).items())
            if tail:
                print(f"--- log tail\n{tail}")
    elif "rss_growth_pct" in mem:
        ok = abs(mem["rss_growth_pct"]) <= 5.0
        print(f"proxy rss_growth_pct ({mem['from_services']:,} -> {mem['to_services']:,} services): "
              f"{mem['rss_growth_pct']:.2f} %  (target: within 5 %: {'met' if ok else 'MISSED'})")
    for r in mem.get("sizes", []):
        if r.get("warning"):
            print(f"warning ({r['services']:,} services): {r['warning']}")


TARGETS = {"embedded": 200.0, "etcd": 500.0}  # p99 ms at N = TARGET_N
TARGET_N = 1000
NOISY_PCT = 10.0


def report_push(push: dict, big_n: int, changes: int, headline_client: str) -> None:
    print(f"\n## (b) push latency: registration change -> on_change in every subscriber "
          f"(each its own WebSocket, all in this process); {changes} changes; over all (change, subscriber) pairs")
    rows = []
    gc_col = any(r.get("cp_gc_ms_per_change") is not None for r in push.get("runs", []))
    for r in push.get("runs", []):
        if r.get("error"):
            rows.append((r["store"], r.get("client", "-"), r["subscribers"], "FAILED") + ("-",) * (12 + gc_col))
            continue
        load = f"{fmt(r.get('other_load_cp_cpu_pct'), '.0f')}/{fmt(r.get('other_load_harness_cpu_pct'), '.0f')} %"
        rows.append((
            r["store"], r["client"], r["subscribers"], r["pairs"], fmt(r["p50_ms"]), fmt(r["p90_ms"]),
            fmt(r["p99_ms"]), fmt(r["max_ms"]), fmt(r["last_subscriber_p50_ms"]), fmt(r["register_ack_p50_ms"]),
            r["missed"], fmt(r.get("cp_cpu_ms_per_change")),
            *((fmt(r.get("cp_gc_ms_per_change")),) if gc_col else ()),
            fmt(r.get("harness_cpu_ms_per_change")), load,
        ))
    table(("store", "client", "subs", "pairs", "p50 ms", "p90 ms", "p99 ms", "max ms", "all-have-it p50 ms",
           "reg ack ms", "missed", "CP cpu ms/chg", *(("CP gc ms/chg",) if gc_col else ()), "subs cpu ms/chg",
           "other load cpu0/cpu1"), rows)
    print("(all-have-it: time until the last subscriber had the change, median over changes; CP cpu: the "
          "control plane's utime+stime per change, sending N responses and reading N ACKs; subs cpu: this "
          "process, i.e. the N simulated proxies; other load: what else ran on the two CPUs meanwhile)")
    noisy = [r for r in push.get("runs", []) if max(r.get("other_load_cp_cpu_pct") or 0,
                                                   r.get("other_load_harness_cpu_pct") or 0) > NOISY_PCT]
    if noisy:
        print(f"warning: other processes kept the CPUs busy (> {NOISY_PCT:.0f} %) during "
              + ", ".join(f"{r['store']} N={r['subscribers']} ({r['client']})" for r in noisy)
              + ": those figures are disturbed; run again on a quiet machine")
    if any(r.get("cp_gc_ms_per_change") is not None for r in push.get("runs", [])):
        print("CP gc: CPU time in the control plane's cyclic garbage collector per change (bench/_discovery_gcwrap.py"
              + (f"; gc thresholds set to {push['cp_gc_threshold']!r}: a what-if, not how octoproxy runs)"
                 if push.get("cp_gc_threshold") else ")"))
    for r in push.get("runs", []):
        if r.get("error"):
            print(f"{r['store']} N={r['subscribers']} ({r.get('client')}): FAILED: {r['error']}")
            for name, tail in r.get("tails", {}).items():
                if tail:
                    print(f"--- {name} (log tail)\n{tail}")
        elif r["subscribers"] == big_n != TARGET_N and r["store"] in TARGETS and r["client"] == headline_client:
            print(f"{r['store']} N={big_n}: p99 {r['p99_ms']:.1f} ms (the targets are for N={TARGET_N:,}: not checked)")
        elif r["subscribers"] == big_n and r["store"] in TARGETS and r["client"] == headline_client:
            t = TARGETS[r["store"]]
            print(f"{r['store']} N={big_n}: p99 {r['p99_ms']:.1f} ms, target < {t:.0f} ms: "
                  f"{'met' if r['p99_ms'] < t else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="write every figure there")
    ap.add_argument("--quick", action="store_true", help="smaller run, for smoke-testing the script")
    ap.add_argument("--sizes", help="(a) registry sizes in services (default 10,1000,10000)")
    ap.add_argument("--subscribers", help="(b) subscriber counts (default 10,1000; the last is the headline)")
    ap.add_argument("--changes", type=int, help="(b) registration changes per run (default 20)")
    ap.add_argument("--gap", type=float, default=0.1, help="(b) pause after each change, jittered x1..2 (s)")
    ap.add_argument("--settle", type=float, default=2.0, help="(a) wait after subscribing before sampling RSS (s)")
    ap.add_argument("--stores", default="embedded,etcd", help="(b) stores: embedded,etcd")
    ap.add_argument("--parts", default="a,b", help="parts to run: a,b")
    ap.add_argument("--clients", default="light",
                    help="(b) subscriber kind(s): light (XdsClient over trio-websocket, one task each; default), "
                         "full (DiscoveryClient); e.g. light,full")
    ap.add_argument("--cp-gc-stats", action="store_true",
                    help="(b) run the control plane through bench/_discovery_gcwrap.py and report its GC time")
    ap.add_argument("--cp-gc-threshold", default="", metavar="SPEC",
                    help="(b) what-if, implies --cp-gc-stats: the control plane's gc thresholds, 'A,B,C' or 0 = off")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    sizes = [int(x) for x in (args.sizes or ("10,1000" if args.quick else "10,1000,10000")).split(",")]
    ns = [int(x) for x in (args.subscribers or ("10,100" if args.quick else "10,1000")).split(",")]
    changes = args.changes or (6 if args.quick else 20)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    cp_gc = (args.cp_gc_stats or bool(args.cp_gc_threshold), args.cp_gc_threshold)
    bad = ([s for s in stores if s not in TARGETS] + [p for p in parts if p not in ("a", "b")]
           + [c for c in clients if c not in ("light", "full")])
    if bad:
        ap.error(f"unknown store/part: {', '.join(bad)}")

    def on_term(_signum, _frame):  # SIGTERM: same path as Ctrl-C (trio turns it into KeyboardInterrupt)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with ^C ignored
    t_begin = time.monotonic()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = 2 * max(ns) + 200
    if nofile < need:
        log(f"warning: RLIMIT_NOFILE {nofile} < ~{need} needed for {max(ns)} subscribers")
    pin = {CP_CPU, HARNESS_CPU} <= os.sched_getaffinity(0)
    procs = Procs(pin)
    if pin:
        os.sched_setaffinity(0, {HARNESS_CPU})  # children get explicit affinities via taskset
    else:
        log(f"warning: CPUs {CP_CPU} and {HARNESS_CPU} are not both available: nothing pinned")
    log(f"octoproxy {octoproxy_version()}; RLIMIT_NOFILE soft {soft} -> {nofile} (hard {hard}); "
        f"sizes {sizes}, subscribers {ns}, {changes} changes, stores {stores}")

    base = Path(tempfile.mkdtemp(prefix="octobench-discovery-", dir="/tmp"))
    mem: dict = {}
    push: dict = {}
    interrupted = False
    try:
        if "a" in parts:
            run_memory(sizes, procs, base, args.settle, mem)
        if "b" in parts:
            run_push(stores, ns, changes, procs, base, args.gap, clients, cp_gc, push)
    except BaseException as e:  # Ctrl-C / SIGTERM, possibly wrapped in a group by a Trio nursery
        if not is_interrupt(e):
            raise
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        gc.enable()
        procs.stop_all()
        if args.keep_tmp:
            log(f"temp dir kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    elapsed = time.monotonic() - t_begin
    print(f"# discovery benchmark; control plane{' + proxy' if 'a' in parts else ''} on CPU {CP_CPU}, "
          f"subscribers (this process) on CPU {HARNESS_CPU}, etcd unpinned{'' if pin else ' (nothing pinned)'}; "
          f"RLIMIT_NOFILE {soft} -> {nofile}; total {elapsed:.0f} s" + ("; INTERRUPTED" if interrupted else ""))
    if "a" in parts:
        report_memory(mem)
    if "b" in parts:
        report_push(push, max(ns), changes, clients[0])

    if args.json:
        doc = {
            "config": {
                "sizes": sizes, "endpoints_per_service": ENDPOINTS_PER_SERVICE, "subscribed": SUBSCRIBED,
                "subscribers": ns, "changes": changes, "gap_s": args.gap, "settle_s": args.settle,
                "stores": stores, "parts": sorted(parts), "quick": args.quick, "pinned": pin,
                "cp_cpu": CP_CPU, "harness_cpu": HARNESS_CPU, "rlimit_nofile": [soft, nofile, hard],
                "octoproxy": octoproxy_version(), "python": sys.version.split()[0],
                "kernel": platform.release(), "cpus": os.cpu_count(), "interrupted": interrupted,
                "elapsed_s": elapsed,
            },
            "memory": mem,
            "push": push,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    x = float("nan")
    for r in push.get("runs", []):
        if (r["store"] == "embedded" and r["subscribers"] == max(ns) and r.get("client") == clients[0]
                and not r.get("error")):
            x = float(r["p99_ms"])
    y = float(mem.get("rss_growth_pct", float("nan")))
    sys.stderr.flush()
    print(f"push_p99_ms: {x:.2f} rss_growth_pct: {y:.2f}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
