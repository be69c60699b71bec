"""Hostile cases of issue 10 against a live proxy pair while a well-behaved client keeps calling.

    python bench/abuse.py [--quick] [--cases a,b,...] [--after 30] [--json PATH] [--keep-tmp]

Topology (loopback and temp-dir sockets; every process `sys.executable -m octoproxy ...` or
`tests/apps/provider.py`, from the installed package):

    good SDK client --UDS--> caller proxy --TCP--> provider proxy "echo"  --UDS--> echo app
                                          --TCP--> provider proxy "other" --UDS--> other app
    control plane (only for the discovery cases)

The proxies run with the default configuration (static routes, no limit changed) and with
RLIMIT_NOFILE soft = 1024 (a common default; `--proxy-nofile`). The good client calls `echo`
and `other` 20 times a second each (3 s timeout) for the whole run; a case that stops the echo
provider pauses the echo calls during the case.

Cases (each with its own deadline):
  garbage         random bytes, bad magic, 64 MiB length, half prefixes, truncated frames and
                  slow-loris senders, 10 of each against the caller's UDS and the peer port;
                  the unfinished ones held 35 s (`--quick`: 8 s) or until the proxy closes them
  big_bodies      another SDK app sends 5 MiB and ~16 MiB bodies through both hops while the
                  good client's small calls flow on the same links
  head_of_line    echo's app stopped (SIGSTOP); one client keeps 400 x 64 KB calls to echo in
                  flight for 10 s (each re-issued when it fails: loopback TCP buffers here take
                  tens of MB, so 400 calls once may not fill them); the good client keeps
                  calling `other` only (own cluster, connection and provider)
  memory_pinning  24 raw peer connections each send a 16 MiB frame minus its last byte and
                  stop; held 5 s, then closed
  idle_flood      as many idle raw connections as `max_connections` allows to the peer port and
                  to the caller's UDS; a new peer and a new SDK client must still be served
  subscriptions   a caller proxy with discovery: POST /subscribe with "", a hot restart over a
                  bad subscriptions file, cold starts over wrong-shaped files and a FIFO
  cp_flood        3 control-plane sessions subscribing 20,000 names of 253 characters each
                  and 3 subscribing 9,999 (under a 10,000 cap); GET /sessions; sessions closed

Per case one line: RSS (VmRSS from /proc/PID/status) of the caller and the echo provider proxy
before the case, max during the case and its after-wait, and after the wait (30 s, `--quick` 5 s);
the good client's failures during the case and its after-wait (with their statuses), its call
count and slowest call; what the case itself saw. The last line is always

    abuse: cases=<N> good_failures=<F> idle_rss_mb=<I> max_rss_mb=<M> rss_after_mb=<A>

where idle is caller+provider RSS summed before the first case, max the largest such sum sampled
(every 0.2 s) over all cases, after the sum after the last case's wait. Targets (issue 10):
0 good failures, after within 10 % of idle, max <= 2x idle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO / "tests"))  # e2e.py: process start/stop and admin helpers

import _abuse_raw as raw  # noqa: E402
from e2e import Proc, free_port, start_process, stop, wait_ready  # noqa: E402

from octoproxy import Status, sdk  # noqa: E402
from octoproxy.common._admin import http_request  # noqa: E402

PROVIDER_APP = REPO / "tests" / "apps" / "provider.py"
MIB = 1 << 20
GOOD_RATE = 20.0  # calls per second per service
GOOD_TIMEOUT = 3.0
GARBAGE_HOLD = 35.0  # unfinished frames are held this long (longer than a 30 s frame deadline)
HOL_SECONDS = 10.0  # the head-of-line flood keeps 400 x 64 KB calls in flight this long
RUN_DEADLINE = 9 * 60.0
#: the control plane authenticates sessions (join / operator tokens, docs/control-plane.md)
CP_AUTH = importlib.util.find_spec("octoproxy.controlplane._auth") is not None


def status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return f"status{code}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples the watched processes every 0.2 s; keeps the max since the last reset."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self.pids = pids
        self.max: dict[str, float] = {}
        self.max_pair = 0.0
        self.max_pair_all = 0.0

    def now(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids().items():
            v = rss_mb(pid)
            if v is not None:
                out[name] = v
        return out

    def reset(self) -> None:
        self.max = {}
        self.max_pair = 0.0

    def take(self) -> dict[str, float]:
        cur = self.now()
        for k, v in cur.items():
            self.max[k] = max(self.max.get(k, 0.0), v)
        pair = cur.get("caller", 0.0) + cur.get("provider", 0.0)
        self.max_pair = max(self.max_pair, pair)
        self.max_pair_all = max(self.max_pair_all, pair)
        return cur

    async def run(self) -> None:
        while True:
            self.take()
            await trio.sleep(0.2)


# --------------------------------------------------------------------------- the mesh


def proxy_argv(cfg: Path, nofile: int, hot_restart: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)] + (["--hot-restart"] if hot_restart else [])
    prl = shutil.which("prlimit")
    if nofile and prl:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        hard_s = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        argv = [prl, f"--nofile={nofile}:{hard_s}", *argv]  # prlimit execs: same pid
    return argv


def caller_config(d: Path, name: str, echo_port: int, other_port: int, extra: str = "") -> str:
    return f"""\
[proxy]
service = "abuse-{name}"

[outbound]
uds = "{d}/{name}.sock"

[admin]
listen = "127.0.0.1:0"

[[routes]]
service = "echo"
cluster = "echo"

[[routes]]
service = "other"
cluster = "other"

[clusters.echo]
endpoints = [ {{ address = "127.0.0.1:{echo_port}" }} ]

[clusters.other]
endpoints = [ {{ address = "127.0.0.1:{other_port}" }} ]
{extra}"""


def provider_config(d: Path, service: str, port: int) -> str:
    return f"""\
[proxy]
service = "{service}"

[outbound]
uds = "{d}/{service}-proxy-out.sock"

[inbound]
listen = "127.0.0.1:{port}"
app_uds = "{d}/{service}-app.sock"

[admin]
listen = "127.0.0.1:0"
"""


@dataclass
class Mesh:
    dir: Path
    nofile: int
    echo_port: int = field(default_factory=free_port)
    other_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)

    @property
    def caller_sock(self) -> Path:
        return self.dir / "caller.sock"

    @property
    def cp_state(self) -> Path:
        return self.dir / "cp-state"

    def operator_headers(self) -> list[tuple[str, str]]:
        tok = self.cp_state / "operator.token"
        return [("Authorization", f"Bearer {tok.read_text().strip()}")] if CP_AUTH and tok.exists() else []

    async def join_token(self, service: str) -> Path | None:
        """A join token for ``service`` in a 0600 file (``octoproxy ctl token create``), if the control plane has auth."""
        if not CP_AUTH:
            return None
        argv = [sys.executable, "-m", "octoproxy", "ctl", "--state-dir", str(self.cp_state), "token", "create", "--service", service]
        with trio.fail_after(20):
            out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"ctl token create: exit {out.returncode}: {last_error_line(out.stderr.decode(errors='replace'))}")
        path = self.dir / f"{service}.join-token"
        path.write_text(out.stdout.decode().strip().splitlines()[-1] + "\n")
        path.chmod(0o600)
        return path

    def pids(self) -> dict[str, int]:
        names = {"caller": "caller", "provider": "echo-proxy", "other": "other-proxy", "cp": "cp"}
        return {k: self.procs[v].process.pid for k, v in names.items() if v in self.procs and self.procs[v].process.returncode is None}

    async def start(self, name: str) -> Proc:
        d = self.dir
        if name in ("echo-app", "other-app"):
            svc = name.split("-")[0]
            p = await start_process([sys.executable, str(PROVIDER_APP), "--uds", str(d / f"{svc}-app.sock")], "provider ready", d, name)
        elif name in ("echo-proxy", "other-proxy"):
            svc = name.split("-")[0]
            cfg = d / f"{name}.toml"
            cfg.write_text(provider_config(d, svc, self.echo_port if svc == "echo" else self.other_port))
            p = await start_process(proxy_argv(cfg, self.nofile), "octoproxy ready", d, name)
            await wait_ready(p)
        elif name == "caller":
            cfg = d / "caller.toml"
            cfg.write_text(caller_config(d, "caller", self.echo_port, self.other_port))
            p = await start_process(proxy_argv(cfg, self.nofile), "octoproxy ready", d, name)
            await wait_ready(p)
        elif name == "cp":
            argv = [sys.executable, "-m", "octoproxy", "control-plane", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
            if CP_AUTH:  # authentication landed: a private state dir (operator token made at first start)
                argv += ["--state-dir", str(self.cp_state)]
            p = await start_process(argv, "octoproxy control-plane ready", d, name)
        else:
            raise ValueError(name)
        self.procs[name] = p
        return p

    async def start_all(self) -> None:
        for name in ("echo-app", "other-app", "echo-proxy", "other-proxy", "caller", "cp"):
            await self.start(name)

    async def heal(self) -> list[str]:
        """Restart whatever died; return what was dead (with its exit code and last stderr line)."""
        dead = []
        for name, p in list(self.procs.items()):
            if p.process.poll() is not None:
                tail = [ln for ln in p.stderr().splitlines() if ln.strip()][-1:] or [""]
                dead.append(f"{name} DIED exit={p.process.returncode} last={tail[0][-160:]!r}")
                await stop(p)
                del self.procs[name]
                try:
                    await self.start(name)
                    self.restarts.append(name)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    dead.append(f"{name} restart failed: {exc}")
        return dead

    async def stop_all(self) -> None:
        for p in reversed(list(self.procs.values())):
            await stop(p)


def describe_exc(exc: BaseException) -> str:
    """One line for an exception; the distinct leaves of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(dict.fromkeys(describe_exc(e) for e in exc.exceptions))
        return f"{len(exc.exceptions)} errors: " + " | ".join(leaves)[:400]
    return f"{type(exc).__name__}: {exc}"[:300]


def last_error_line(text: str) -> str:
    """The line of a log that best says what went wrong: an exception line, else an ERROR line, else the last."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.lstrip("|+- ").split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Group")) and " " not in head:
            return ln.lstrip("|+- ")[:200]
    for ln in reversed(lines):
        if " ERROR " in ln or " CRITICAL " in ln:
            return ln[:200]
    return lines[-1][:200] if lines else ""


async def spawn_and_watch(argv: list[str], d: Path, name: str, ready_timeout: float, watch: float) -> tuple[str, Proc | None]:
    """Start a proxy; say how it went: no ready line (then: does SIGTERM end it?), ready then exit, or running."""
    errpath = d / f"{name}.stderr"
    with open(errpath, "wb") as err:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    p = Proc(proc, errpath)
    assert proc.stdout is not None
    buf = b""
    with trio.move_on_after(ready_timeout):
        while b"octoproxy ready" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:  # stdout closed: it is exiting
                with trio.move_on_after(5):
                    await proc.wait()
                break
            buf += chunk
    if b"octoproxy ready" not in buf:
        if proc.poll() is not None:
            return f"exit {proc.returncode} before ready: {last_error_line(p.stderr())!r}", p
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await proc.wait()
        term = f"exits on SIGTERM ({proc.returncode})" if proc.poll() is not None else "SIGTERM ignored for 5 s"
        return f"no ready line in {ready_timeout:g} s (hangs), {term}", p
    line = next(ln for ln in buf.decode(errors="replace").splitlines() if ln.startswith("octoproxy ready"))
    for word in line.split()[2:]:
        if "=" in word:
            k, v = word.split("=", 1)
            p.addresses[k] = v
    with trio.move_on_after(watch):
        await proc.wait()
    if proc.poll() is not None:
        tb = " with a traceback" if "Traceback" in p.stderr() else ""
        return f"ready line, then exit {proc.returncode}{tb}: {last_error_line(p.stderr())!r}", p
    return "running", p


def said_about_file(p: Proc) -> str:
    """What a proxy logged about its subscriptions file (WARNING and up), if anything."""
    for ln in p.stderr().splitlines():
        if "subscriptions file" in ln and (" ERROR " in ln or " WARNING " in ln):
            return "; said: " + ln.split("]: ", 1)[-1][:150]
    return ""


def stderr_marks(mesh: Mesh) -> dict[str, int]:
    return {n: p.stderr_path.stat().st_size if p.stderr_path.exists() else 0 for n, p in mesh.procs.items()}


def stderr_news(mesh: Mesh, marks: dict[str, int]) -> dict[str, dict[str, object]]:
    """Per process: tracebacks and ERROR lines written since ``marks`` (and the first of each)."""
    out: dict[str, dict[str, object]] = {}
    for n, p in mesh.procs.items():
        try:
            with open(p.stderr_path, "rb") as f:
                f.seek(marks.get(n, 0))
                text = f.read(32 * MIB).decode(errors="replace")
        except OSError:
            continue
        lines = text.splitlines()
        tb = sum(1 for ln in lines if ln.startswith("Traceback"))
        errors = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln]
        if tb or errors:
            out[n] = {"tracebacks": tb, "error_lines": len(errors), "first_error": (errors[0][-200:] if errors else "")}
    return out


class LogTap(logging.Handler):
    """Collects what this process's octoproxy client code logs (WARNING and up) during a case."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(name)
        self.messages: dict[str, int] = {}
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()[:160]
        self.messages[msg] = self.messages.get(msg, 0) + 1

    def close(self) -> dict[str, int]:  # type: ignore[override]
        self.logger.removeHandler(self)
        return dict(list(self.messages.items())[:3])


# --------------------------------------------------------------------------- the good client


@dataclass
class Outcome:
    t: float
    target: str
    status: str
    latency: float


class GoodClient:
    """A well-behaved app: steady small calls to `echo` and `other`; records every outcome."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.paused: set[str] = set()
        self.stopped = False

    async def worker(
        self, client: sdk.Client, target: str, service: str, until: trio.Event | None = None, finished: trio.Event | None = None
    ) -> None:
        try:
            await self._loop(client, target, service, until)
        finally:
            if finished is not None:
                finished.set()

    async def _loop(self, client: sdk.Client, target: str, service: str, until: trio.Event | None) -> None:
        period = 1.0 / GOOD_RATE
        body = b"good-" + service.encode()
        while not self.stopped and not (until is not None and until.is_set()):
            t0 = trio.current_time()
            if target in self.paused:
                await trio.sleep(period)
                continue
            try:
                got = await client.call(service, "echo", body, timeout=GOOD_TIMEOUT)
                status = "OK" if got == body else "WRONG_BODY"
            except sdk.CallError as exc:
                status = status_name(exc.status)
            except Exception as exc:  # noqa: BLE001 - a good client's failure of any kind is counted
                status = type(exc).__name__
            t1 = trio.current_time()
            self.outcomes.append(Outcome(t1, target, status, t1 - t0))
            await trio.sleep(max(0.0, period - (t1 - t0)))

    def window(self, t0: float, t1: float) -> dict[str, object]:
        got = [o for o in self.outcomes if t0 <= o.t < t1]
        fails = [o for o in got if o.status != "OK"]
        by: dict[str, int] = {}
        for o in fails:
            key = f"{o.target}:{o.status}"
            by[key] = by.get(key, 0) + 1
        oks = [o for o in got if o.status == "OK"]
        return {
            "calls": len(got),
            "failures": len(fails),
            "failure_statuses": by,
            "max_latency_ms": round(max((o.latency for o in oks), default=0.0) * 1000, 1),
        }

    def min_rate(self, target: str, t0: float, t1: float) -> float:
        """Fewest OK calls of ``target`` in any whole second of [t0, t1)."""
        secs = max(1, int(t1 - t0))
        bins = [0] * secs
        for o in self.outcomes:
            if o.target == target and o.status == "OK" and t0 <= o.t < t0 + secs:
                bins[int(o.t - t0)] += 1
        return float(min(bins))


# --------------------------------------------------------------------------- cases


@dataclass
class Ctx:
    mesh: Mesh
    good: GoodClient
    nursery: trio.Nursery
    quick: bool


CaseFn = Callable[[Ctx], Awaitable[dict[str, object]]]


async def case_garbage(ctx: Ctx) -> dict[str, object]:
    targets: list[raw.Target] = [("uds", str(ctx.mesh.caller_sock)), ("tcp", f"127.0.0.1:{ctx.mesh.echo_port}")]
    kinds = ["random", "bad_magic", "oversize", "half_prefix", "truncated", "slow_loris"]
    results: dict[str, dict[str, int]] = {}

    async def one(t: raw.Target, kind: str) -> None:
        r = await raw.garbage(t, kind, hold=8.0 if ctx.quick else GARBAGE_HOLD)
        key = f"{raw.describe(t).split()[0]}:{kind}"
        results.setdefault(key, {})
        results[key][r] = results[key].get(r, 0) + 1

    async with trio.open_nursery() as n:
        for t in targets:
            for k in kinds:
                for _ in range(10):
                    n.start_soon(one, t, k)
    new_peer = await raw.one_call(targets[1], "echo", b"after-garbage")
    return {"connections": results, "new_peer_after": new_peer}


async def case_big_bodies(ctx: Ctx) -> dict[str, object]:
    sizes = [5 * MIB, 5 * MIB, 16 * MIB - 64 * 1024, 16 * MIB - 64 * 1024]
    results: list[str] = []
    async with sdk.open_client(ctx.mesh.caller_sock) as big:
        for i in range(0, len(sizes), 2):
            async def one(size: int) -> None:
                body = os.urandom(size)
                t0 = trio.current_time()
                try:
                    got = await big.call("echo", "echo", body, timeout=30)
                    r = "OK" if got == body else "WRONG_BODY"
                except sdk.CallError as exc:
                    r = status_name(exc.status)
                results.append(f"{size / MIB:.1f}MiB:{r}:{trio.current_time() - t0:.1f}s")

            async with trio.open_nursery() as n:  # two at once, as two apps would
                n.start_soon(one, sizes[i])
                n.start_soon(one, sizes[i + 1])
    ok = sum(1 for r in results if ":OK:" in r)
    return {"big_calls": results, "big_ok": f"{ok}/{len(sizes)}"}


async def case_head_of_line(ctx: Ctx) -> dict[str, object]:
    app = ctx.mesh.procs["echo-app"]
    ctx.good.paused.add("echo")
    statuses: dict[str, int] = {}
    t0 = trio.current_time()
    os.kill(app.process.pid, signal.SIGSTOP)
    try:
        async with sdk.open_client(ctx.mesh.caller_sock) as flood:
            body = b"h" * 64_000
            stop_at = trio.current_time() + HOL_SECONDS

            async def sender() -> None:  # one of 400 calls in flight, re-issued until stop_at
                while trio.current_time() < stop_at:
                    try:
                        await flood.call("echo", "echo", body, timeout=5)
                        s = "OK"
                    except sdk.CallError as exc:
                        s = status_name(exc.status)
                    statuses[s] = statuses.get(s, 0) + 1

            with trio.move_on_after(HOL_SECONDS + 8):
                async with trio.open_nursery() as n:
                    for _ in range(400):
                        n.start_soon(sender)
    finally:
        os.kill(app.process.pid, signal.SIGCONT)
    t1 = trio.current_time()
    await trio.sleep(1.0)
    ctx.good.paused.discard("echo")
    return {"flood_statuses": statuses, "other_min_calls_per_s": ctx.good.min_rate("other", t0, t1), "other_rate_target": GOOD_RATE}


async def case_memory_pinning(ctx: Ctx) -> dict[str, object]:
    target: raw.Target = ("tcp", f"127.0.0.1:{ctx.mesh.echo_port}")
    dump = await ctx.mesh.procs["echo-proxy"].json("/config_dump")
    limit = int(dump["config"]["proxy"]["max_frame_size"])  # type: ignore[index]
    frame = raw.frame_of_size(limit)
    part = memoryview(frame)[:-1]
    sent: list[int] = []
    socks: list[trio.socket.SocketType] = []

    async def one() -> None:
        try:
            s = await raw.connect(target)
        except (OSError, trio.TooSlowError):
            sent.append(-1)
            return
        socks.append(s)
        with trio.move_on_after(40):
            sent.append(await raw.send_all(s, part))
            return
        sent.append(-2)

    async with trio.open_nursery() as n:
        for _ in range(24):
            n.start_soon(one)
    await trio.sleep(5.0)
    held = sum(1 for s in socks if not _closed(s))
    for s in socks:
        s.close()
    full = sum(1 for x in sent if x == len(part))
    return {
        "frame_bytes": limit,
        "connections": 24,
        "sent_all_but_last_byte": full,
        "cut_off_early": sum(1 for x in sent if 0 <= x < len(part)),
        "send_stalled_40s": sent.count(-2),
        "still_open_after_5s": held,
    }


def _closed(s: trio.socket.SocketType) -> bool:
    f = raw.Flood(("tcp", ""), [s])
    return f.closed_count() == 1


async def case_idle_flood(ctx: Ctx) -> dict[str, object]:
    mesh = ctx.mesh
    dump_p = await mesh.procs["echo-proxy"].json("/config_dump")
    dump_c = await mesh.procs["caller"].json("/config_dump")
    lim_in = int(dump_p["config"]["inbound"]["max_connections"])  # type: ignore[index]
    lim_out = int(dump_c["config"]["outbound"]["max_connections"])  # type: ignore[index]
    peer = raw.Flood(("tcp", f"127.0.0.1:{mesh.echo_port}"))
    sdkf = raw.Flood(("uds", str(mesh.caller_sock)))
    try:
        with trio.move_on_after(40):
            await peer.open(lim_in)
            await sdkf.open(lim_out)
        await trio.sleep(1.0)
        new_peer = await raw.one_call(("tcp", f"127.0.0.1:{mesh.echo_port}"), "echo", b"new-peer")
        new_sdk_call = await raw.one_call(("uds", str(mesh.caller_sock)), "other", b"new-sdk")
        try:
            with trio.fail_after(6):
                async with sdk.open_client(mesh.caller_sock, connect_timeout=2) as c:
                    new_sdk = "OK" if await c.call("other", "echo", b"n", timeout=3) == b"n" else "WRONG_BODY"
        except sdk.CallError as exc:
            new_sdk = f"CallError {status_name(exc.status)}"
        except (OSError, trio.TooSlowError) as exc:
            new_sdk = f"{type(exc).__name__}"
        admin_p = await _admin_ok(mesh.procs["echo-proxy"])
        admin_c = await _admin_ok(mesh.procs["caller"])
        await trio.sleep(5.0 if ctx.quick else 8.0)
        closed_peer, closed_sdk = peer.closed_count(), sdkf.closed_count()
    finally:
        opened = (len(peer.socks), len(sdkf.socks))
        refused = (sorted(set(peer.refused)), sorted(set(sdkf.refused)))
        peer.close()
        sdkf.close()
    return {
        "peer_idle_opened": f"{opened[0]}/{lim_in}",
        "sdk_idle_opened": f"{opened[1]}/{lim_out}",
        "refused": refused,
        "idle_closed_by_proxy": {"peer": closed_peer, "sdk": closed_sdk},
        "new_peer_call": new_peer,
        "new_raw_sdk_call": new_sdk_call,
        "new_sdk_client_call": new_sdk,
        "admin_answers": {"provider": admin_p, "caller": admin_c},
    }


async def _admin_ok(p: Proc) -> str:
    try:
        status, _ = await p.get("/healthz")
        return str(status)
    except (OSError, trio.TooSlowError, Exception) as exc:  # noqa: BLE001 - reported
        return type(exc).__name__


async def case_subscriptions(ctx: Ctx) -> dict[str, object]:
    mesh, d = ctx.mesh, ctx.mesh.dir
    cp = mesh.procs["cp"]
    url = f"ws://{cp.addresses['listen']}/v1/discovery"
    res: dict[str, object] = {}

    token = await mesh.join_token("abuse-subscriber")
    token_line = f'join_token_file = "{token}"\n' if token else ""

    def cfg(name: str, subs: Path) -> Path:
        extra = f'\n[discovery]\ncontrol_plane = ["{url}"]\nsubscriptions_file = "{subs}"\nsubscribe_timeout = 2.0\n{token_line}'
        path = d / f"{name}.toml"
        path.write_text(caller_config(d, name, mesh.echo_port, mesh.other_port, extra))
        return path

    # (1) a caller with discovery under the good client; POST /subscribe with "" in the list
    subs2 = d / "caller2.subs.json"
    c2cfg = cfg("caller2", subs2)
    c2 = await start_process(proxy_argv(c2cfg, mesh.nofile), "octoproxy ready", d, "caller2")
    procs = [c2]
    try:
        await wait_ready(c2)
        done, finished = trio.Event(), trio.Event()
        async with sdk.open_client(d / "caller2.sock") as client2:
            ctx.nursery.start_soon(ctx.good.worker, client2, "other@caller2", "other", done, finished)
            await trio.sleep(1.0)
            st, _h, body = await http_request(c2.admin, "POST", "/subscribe", json.dumps({"services": ["echo", ""], "timeout": 2}).encode())
            res["post_subscribe_empty_name"] = f"HTTP {st}"
            res["file_after_post"] = subs2.read_text()[:80] if subs2.exists() else None
            # (2) hot restart over a bad file (what (1) may have left, else written here)
            if not subs2.exists() or '""' not in subs2.read_text():
                subs2.write_text('{"services": [""]}')
            res["hot_restart_file"] = subs2.read_text()[:80]
            how, child = await spawn_and_watch(proxy_argv(c2cfg, mesh.nofile, hot_restart=True), d, "caller2-gen1", 20, 4.0)
            if child is not None:
                procs.append(child)
            res["hot_restart"] = how + (said_about_file(child) if child is not None else "")
            res["parent_alive"] = c2.process.poll() is None
            await trio.sleep(2.0)
            done.set()
            await finished.wait()
        # (3) cold starts over wrong-shaped files and a FIFO, all at once
        shapes = {"list": '["echo"]', "number": "42", "null": '{"services": null}', "string": '{"services": "echo"}', "fifo": None}
        cold: dict[str, str] = {}

        async def cold_start(key: str, content: str | None) -> None:
            subs = d / f"cold-{key}.subs.json"
            if content is None:
                os.mkfifo(subs)
            else:
                subs.write_text(content)
            path = cfg(f"cold-{key}", subs)
            how, p = await spawn_and_watch(proxy_argv(path, mesh.nofile), d, f"cold-{key}", 8, 3.0)
            if p is not None:
                procs.append(p)
            if how != "running" or p is None:
                cold[key] = how
                return
            st_r, body_r = await p.get("/ready")
            subs_now = ""
            try:
                subs_now = str(json.loads(body_r).get("discovery", {}).get("subscriptions"))
            except (ValueError, AttributeError):
                pass
            cold[key] = f"running, /ready {st_r}, subscriptions {subs_now}" + said_about_file(p)

        async with trio.open_nursery() as n:
            for k, v in shapes.items():
                n.start_soon(cold_start, k, v)
        res["cold_starts"] = cold
    finally:
        for p in procs:
            await stop(p)
    return res


async def case_cp_flood(ctx: Ctx) -> dict[str, object]:
    from octoproxy.controlplane import DiscoveryClient

    cp = ctx.mesh.procs["cp"]
    url = f"ws://{cp.addresses['listen']}/v1/discovery"
    before = rss_mb(cp.process.pid)
    cp_mark = cp.stderr_path.stat().st_size
    seen = LogTap("octoproxy")
    outcomes: dict[str, str] = {}
    clients: list[DiscoveryClient] = []
    res: dict[str, object] = {}
    token_file = await ctx.mesh.join_token("abuse-flooder")
    kw: dict[str, object] = {"token": token_file.read_text().strip()} if token_file else {}
    if CP_AUTH:  # a session without a token must be refused
        anon = DiscoveryClient([url], "abuse-anonymous", backoff=(0.5, 2.0))
        async with trio.open_nursery() as an:
            await an.start(anon.run)
            try:
                await anon.wait_connected(3)
                res["unauthenticated_session"] = "ACCEPTED"
            except trio.TooSlowError:
                res["unauthenticated_session"] = "refused"
            an.cancel_scope.cancel()
    # sessions 0-2 ask for 20,000 names each (over a 10,000 cap, a 5 MB message); 3-5 for 9,999 (at the cap)
    plan = [20_000] * 3 + [9_999] * 3
    run_errors: dict[str, int] = {}

    async def keep(c: DiscoveryClient, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await c.run(task_status=task_status)
        except BaseException as exc:  # DiscoveryClient.run should not raise but Cancelled: the rest is reported
            errors, rest = (exc.split(Exception) if isinstance(exc, BaseExceptionGroup)
                            else ((exc, None) if isinstance(exc, Exception) else (None, exc)))
            if errors is not None:
                key = describe_exc(errors)[-160:]
                run_errors[key] = run_errors.get(key, 0) + 1
            if rest is not None:
                raise rest from None

    async with trio.open_nursery() as n:
        for i in range(len(plan)):
            c = DiscoveryClient([url], f"abuse-flood-{i}", **kw)  # type: ignore[arg-type]
            clients.append(c)
            await n.start(keep, c)

        async def flood(i: int, c: DiscoveryClient) -> None:
            key = f"session{i} x{plan[i]}"
            try:
                await c.wait_connected(5)
                prefix = f"s{i}x"
                names = [f"{prefix}{j:05d}" + "n" * (253 - len(prefix) - 5) for j in range(plan[i])]
                await c.subscribe(names, timeout=15)
                outcomes[key] = f"all resolved (connections={c.connections})"
            except trio.TooSlowError:
                outcomes[key] = f"not resolved in 15 s (connections={c.connections})"
            except Exception as exc:  # noqa: BLE001 - reported
                outcomes[key] = describe_exc(exc)[:160]

        async with trio.open_nursery() as fl:
            for i, c in enumerate(clients):
                fl.start_soon(flood, i, c)
        res["sessions"] = outcomes
        try:
            t0 = trio.current_time()
            st, _h, body = await http_request(cp.addresses["admin"], "GET", "/sessions", headers=ctx.mesh.operator_headers(), timeout=20)
            res["GET /sessions"] = f"HTTP {st}, {len(body) / MIB:.2f} MiB in {trio.current_time() - t0:.1f} s"
        except Exception as exc:  # noqa: BLE001 - reported
            res["GET /sessions"] = f"{type(exc).__name__}"
        res["cp_rss_mb_during"] = rss_mb(cp.process.pid)
        n.cancel_scope.cancel()
    res["cp_rss_mb_before"] = before
    res["client_run_raised"] = run_errors
    res["client_side_log"] = seen.close()
    with open(cp.stderr_path, "rb") as f:
        f.seek(cp_mark)
        lines = f.read(4 * MIB).decode(errors="replace").splitlines()
    warn = [ln.split(": ", 1)[-1][:160] for ln in lines if " WARNING " in ln or " ERROR " in ln]
    res["cp_log"] = {"warning_or_error_lines": len(warn), "first": list(dict.fromkeys(warn))[:2]}
    return res


CASES: dict[str, tuple[CaseFn, float]] = {  # name: (function, deadline s)
    "garbage": (case_garbage, 60.0),
    "big_bodies": (case_big_bodies, 90.0),
    "head_of_line": (case_head_of_line, 30.0),
    "memory_pinning": (case_memory_pinning, 60.0),
    "idle_flood": (case_idle_flood, 75.0),
    "subscriptions": (case_subscriptions, 60.0),
    "cp_flood": (case_cp_flood, 60.0),
}


# --------------------------------------------------------------------------- runner


def fmt_rss(b: dict[str, float], m: dict[str, float], a: dict[str, float], name: str) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    return f"{name} {f(b.get(name))}/{f(m.get(name))}/{f(a.get(name))}"


async def run(args: argparse.Namespace, tmp: Path) -> int:
    after_wait = args.after if args.after is not None else (5.0 if args.quick else 30.0)
    names = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else list(CASES)
    bad = [c for c in names if c not in CASES]
    if bad:
        raise SystemExit(f"unknown case(s): {', '.join(bad)}; known: {', '.join(CASES)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20000) if hard != resource.RLIM_INFINITY else 20000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # this process holds 2,000+ idle sockets
    mesh = Mesh(tmp, args.proxy_nofile)
    good = GoodClient()
    rows: list[dict[str, object]] = []
    sampler = RssSampler(mesh.pids)
    t_start = time.monotonic()
    try:
        with trio.fail_after(RUN_DEADLINE):
            await mesh.start_all()
            log(f"mesh up in {time.monotonic() - t_start:.1f} s: caller pid {mesh.procs['caller'].process.pid}, "
                f"echo provider proxy pid {mesh.procs['echo-proxy'].process.pid}; proxies RLIMIT_NOFILE {args.proxy_nofile}")
            async with trio.open_nursery() as nursery, sdk.open_client(mesh.caller_sock) as client:
                nursery.start_soon(sampler.run)
                nursery.start_soon(good.worker, client, "echo", "echo")
                nursery.start_soon(good.worker, client, "other", "other")
                await trio.sleep(3.0)  # warm: links up, first calls done
                idle = sampler.take()
                idle_pair = idle.get("caller", 0.0) + idle.get("provider", 0.0)
                ctx = Ctx(mesh, good, nursery, args.quick)
                after: dict[str, float] = idle
                for name in names:
                    fn, deadline = CASES[name]
                    before = sampler.take()
                    sampler.reset()
                    marks = stderr_marks(mesh)
                    t0 = trio.current_time()
                    detail: dict[str, object]
                    with trio.move_on_after(deadline) as scope:
                        try:
                            detail = await fn(ctx)
                        except Exception as exc:  # noqa: BLE001 - a case that breaks is reported, the run goes on
                            detail = {"case_error": describe_exc(exc)}
                    if scope.cancelled_caught:
                        detail = {"case_error": f"deadline {deadline:g} s passed"}
                    good.paused.clear()
                    t_case = trio.current_time() - t0
                    deaths = await mesh.heal()
                    await trio.sleep(after_wait)
                    deaths += await mesh.heal()
                    after = sampler.take()
                    gw = good.window(t0, trio.current_time())
                    row: dict[str, object] = {
                        "case": name,
                        "seconds": round(t_case, 1),
                        "rss_before": before,
                        "rss_max": dict(sampler.max),
                        "rss_after": after,
                        "good": gw,
                        "detail": detail,
                        "deaths": deaths,
                        "logs": stderr_news(mesh, marks),
                    }
                    rows.append(row)
                    print(
                        f"{name:<15} {fmt_rss(before, sampler.max, after, 'caller')}  {fmt_rss(before, sampler.max, after, 'provider')} MB"
                        f"  good_failures={gw['failures']} {gw['failure_statuses'] or ''} calls={gw['calls']} max_ms={gw['max_latency_ms']}"
                        f"  {t_case:.0f}s"
                        + (f"  {fmt_rss(before, sampler.max, after, 'cp')} MB" if name == "cp_flood" else "")
                        + (f"  DEATHS={deaths}" if deaths else ""),
                        flush=True,
                    )
                    print(f"    detail: {json.dumps(detail, default=str)}", flush=True)
                    if row["logs"]:
                        print(f"    logs: {json.dumps(row['logs'])}", flush=True)
                good.stopped = True
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await mesh.stop_all()
    total_fail = sum(int(r["good"]["failures"]) for r in rows)  # type: ignore[index, misc]
    after_pair = after.get("caller", 0.0) + after.get("provider", 0.0)
    max_pair = sampler.max_pair_all
    targets = {
        "good_failures == 0": total_fail == 0,
        "rss_after within 10 % of idle": abs(after_pair - idle_pair) <= 0.10 * idle_pair,
        "max_rss <= 2x idle": max_pair <= 2 * idle_pair,
    }
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items())
          + f"; total {time.monotonic() - t_start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"idle": idle, "rows": rows, "targets": targets, "restarts": mesh.restarts}, indent=1, default=str))
    print(f"abuse: cases={len(rows)} good_failures={total_fail} idle_rss_mb={idle_pair:.1f} "
          f"max_rss_mb={max_pair:.1f} rss_after_mb={after_pair:.1f}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 s after-wait instead of 30 s (development)")
    ap.add_argument("--after", type=float, default=None, help="seconds to wait after each case before the 'after' RSS")
    ap.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--proxy-nofile", type=int, default=1024, help="RLIMIT_NOFILE soft limit of the proxies (0: inherit)")
    ap.add_argument("--json", metavar="PATH", help="write every figure there")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="abuse-", dir="/tmp"))
    try:
        return trio.run(run, args, tmp)
    finally:
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
