"""Certificate issuance: N proxies obtaining certificates from one control plane.

What runs: a real ``octoproxy control-plane`` process (embedded store, its own
CA); a join token made through its admin API; then, in this process, N
simulated proxies, each with its own key and CSR (made before the clock
starts: a real proxy makes its key on its own host), its own WebSocket
session authenticated by the join token, and one ``CertificateRequest``
through :meth:`DiscoveryClient.request_certificate` (the call the proxy
uses). At most ``--concurrency`` sessions are being opened at once (a fleet
restarting together, without a SYN flood). The clock runs from the first
connection to the last certificate received; every certificate is checked
(its URI SAN, its key). Target (issue 11): 1,000 proxies in <= 10 s.

    python bench/issuance.py [--proxies 1000] [--concurrency 200]

Last line, exactly: ``issuance: proxies=<N> seconds=<T> per_second=<R> errors=<E>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from octoproxy.common._admin import http_request
from octoproxy.controlplane import DiscoveryClient
from octoproxy.identity import make_key_and_csr

SERVICE = "bench-issued"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_control_plane(state: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "octoproxy", "control-plane", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--state-dir", str(state), "--log-level", "warning", "--max-sessions-per-peer", "100000"],
        stdout=subprocess.PIPE, stderr=open(state / "cp.log", "ab"),  # noqa: SIM115
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "ready" not in line:
        proc.kill()
        raise SystemExit(f"control plane did not start: {line!r}; see {state / 'cp.log'}")
    words = dict(w.split("=", 1) for w in line.split() if "=" in w)
    return proc, f"ws://{words['listen']}/v1/discovery", words["admin"]


async def make_token(admin: str, state: Path) -> str:
    operator = (state / "operator.token").read_text().strip()
    status, _, body = await http_request(
        admin, "POST", "/v1/tokens", json.dumps({"service": SERVICE}).encode(),
        headers=[("Authorization", f"Bearer {operator}"), ("Content-Type", "application/json")],
    )
    if status != 200:
        raise SystemExit(f"cannot make a join token: HTTP {status} {body!r}")
    return str(json.loads(body)["token"])


async def run(n: int, concurrency: int, url: str, token: str, csrs: list[tuple[str, str]]) -> tuple[float, int, list[float]]:
    limiter = trio.CapacityLimiter(concurrency)
    errors: list[str] = []
    latencies: list[float] = []
    want_uri = f"spiffe://octoproxy.local/svc/{SERVICE}"

    async def proxy(i: int) -> None:
        key_pem, csr_pem = csrs[i]
        async with limiter:
            t0 = time.perf_counter()
            client = DiscoveryClient([url], f"bench-{i}", token=token, connect_timeout=20.0, ping_interval=60.0)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.run)
                    await client.wait_connected(30)
                    resp = await client.request_certificate(csr_pem, timeout=30)
                    latencies.append(time.perf_counter() - t0)
                    nursery.cancel_scope.cancel()
                leaf = x509.load_pem_x509_certificate(resp.certificate_chain_pem.encode())
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                pub = serialization.load_pem_private_key(key_pem.encode(), None).public_key()
                fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                if san.get_values_for_type(x509.UniformResourceIdentifier) != [want_uri] or (
                    leaf.public_key().public_bytes(*fmt) != pub.public_bytes(*fmt)
                ):
                    errors.append(f"proxy {i}: wrong certificate")
            except Exception as exc:  # counted, reported
                errors.append(f"proxy {i}: {type(exc).__name__}: {exc}")

    # The simulated proxies stand for N processes on N hosts: keep this process's cyclic GC
    # (1,000 clients' worth of objects) out of the figure, as the control plane does (tune_gc).
    gc.collect()
    gc.freeze()
    gc.disable()
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(proxy, i)
    elapsed = time.perf_counter() - t0
    gc.enable()
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    return elapsed, len(errors), sorted(latencies)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxies", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=200, help="sessions being opened at once")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="octobench-issuance-"))
    os.chmod(state, 0o700)
    t = time.perf_counter()
    csrs = [make_key_and_csr(SERVICE) for _ in range(args.proxies)]
    keygen = time.perf_counter() - t
    proc, url, admin = start_control_plane(state)
    try:
        token = trio.run(make_token, admin, state)
        cp_cpu0, own_cpu0 = cpu_seconds(proc.pid), time.process_time()
        elapsed, errors, lat = trio.run(run, args.proxies, args.concurrency, url, token, csrs)
        cp_cpu, own_cpu = cpu_seconds(proc.pid) - cp_cpu0, time.process_time() - own_cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: float("nan"))
    print(f"keys+CSRs made beforehand: {args.proxies} in {keygen:.2f}s (ECDSA P-256, one per proxy)")
    print(f"per proxy (connect + authenticate + issue): p50 {p(0.5):.1f} ms  p99 {p(0.99):.1f} ms  "
          f"(concurrency {args.concurrency})")
    print(f"CPU: control plane {cp_cpu:.2f}s ({cp_cpu / args.proxies * 1e3:.2f} ms per proxy), "
          f"the {args.proxies} simulated proxies {own_cpu:.2f}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"target: {args.proxies} proxies in <= 10 s: {'met' if elapsed <= 10 and not errors else 'NOT met'}")
    print(f"issuance: proxies={args.proxies} seconds={elapsed:.2f} per_second={args.proxies / elapsed:.0f} errors={errors}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
