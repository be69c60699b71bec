"""Closed-loop load generator for bench/hot_restart.py: long-lived connections, counts lost calls.

    python bench/_hr_loadgen.py --mode sdk|raw|http --target UDS [-c 4] [-d 16] [--body 100]
                                [--timeout 5] [--max-duration 120] [--lost-ids FILE]

A Trio program. It connects, prints ``ready <t>`` (``t`` = time.monotonic(), when the load
starts), keeps the load up until a line ``stop`` (or EOF) arrives on stdin, lets the calls in
flight finish (each within ``--timeout``), then prints one JSON line with every figure.

Every call has a unique id (a global counter), sent as the first 20 bytes of its body (20 ASCII
digits, padded to ``--body`` bytes), and a call only counts as completed if that very body comes
back. A call is *lost* if it failed in any way: an error answer, its connection died with it in
flight, or no answer within ``--timeout`` (a timeout is a loss). The ids of lost calls are
written to ``--lost-ids`` (one per line) so that the provider can tell which of them it executed.

Modes:
  sdk   octoproxy's own SDK (``octoproxy.sdk.open_client`` / ``client.call``): C clients (each
        one long-lived client connection to the local proxy) x D worker tasks each calling in a
        loop. What the SDK does under a hot restart (a call answered HOT_RESTART is resent on a
        new connection, GOAWAY moves new calls to a new connection) is the protocol, not a
        failure: those calls only count if they fail in the end.
  raw   octoproxy v1 frames on C plain connections with D calls in flight each (as through
        Envoy's tcp_proxy, which copies bytes). No transparent reconnect-and-resend: when a
        connection dies its calls in flight are lost; the caller then opens a new connection
        and goes on with new calls (what a plain client does).
  http  HTTP/1.1 keep-alive (h11): C x D callers, each one connection with one call at a time
        (HTTP/1.1 does not multiplex). A response with ``Connection: close`` (how Envoy's
        http_connection_manager drains) is followed by a new connection for the next call: the
        protocol asked for it. As urllib3 does, an idle connection that became readable (closed
        by the server) is not reused. A call whose connection dies in flight is lost, not resent.

A *caller* is one SDK client (sdk), one connection slot (raw: re-opened after it dies) or one HTTP
connection slot (http). Stall = the longest gap between two consecutive completed calls of one
caller (from the load's start, and up to the stop); max latency = the slowest completed call.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import select
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loadgen import encode_header

ID_LEN = 20
PREFIX = struct.Struct(">HBBIQHH")
MAGIC = 0xABBA
REQUEST, RESPONSE = 1, 2
GAP_NOTE = 0.05  # gaps longer than this are listed in the JSON
BUCKET = 0.1  # completions timeline resolution, seconds


class Caller:
    __slots__ = ("completed", "connections", "idx", "last_done", "lost", "max_gap", "max_gap_end")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.completed = 0
        self.lost = 0
        self.last_done = 0.0
        self.max_gap = 0.0
        self.max_gap_end = 0.0
        self.connections = 0


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ids = itertools.count(1)
        pad = max(0, args.body - ID_LEN)
        self.pad = bytes((i * 7 + 13) & 0xFF for i in range(pad))
        self.stop = trio.Event()
        self.t_start = 0.0
        self.t_stop = math.inf
        self.callers: list[Caller] = []
        self.latencies: list[float] = []
        self.lost_ids: list[int] = []
        self.lost_reasons: Counter = Counter()
        self.loss_buckets: Counter = Counter()  # (10 ms bucket, reason) -> n
        self.gaps: list[tuple[float, float, int]] = []  # (start, end, caller)
        self.timeline: Counter = Counter()
        self.gap_max: dict[int, float] = {}  # 100 ms bucket (of the gap's end) -> longest gap ending there
        self.error_samples: dict[str, str] = {}
        self.counters: Counter = Counter()  # reconnects, connect failures, resends, ...

    def body(self, cid: int) -> bytes:
        return b"%020d" % cid + self.pad

    def done(self, c: Caller, t_sent: float, now: float) -> None:
        c.completed += 1
        self.latencies.append(now - t_sent)
        if now <= self.t_stop:
            gap = now - c.last_done
            if gap > c.max_gap:
                c.max_gap, c.max_gap_end = gap, now
            if gap > GAP_NOTE:
                self.gaps.append((c.last_done, now, c.idx))
            c.last_done = now
            b = int((now - self.t_start) / BUCKET)
            if gap > self.gap_max.get(b, 0.0):
                self.gap_max[b] = gap
        self.timeline[int((now - self.t_start) / BUCKET)] += 1

    def lose(self, c: Caller, cid: int, reason: str, now: float, n: int = 1) -> None:
        c.lost += 1
        self.lost_ids.append(cid)
        self.lost_reasons[reason] += 1
        self.loss_buckets[(round(now, 2), reason)] += 1


def os_reason(exc: BaseException) -> str:
    """A short name for why a connection failed: eof, ECONNRESET, EPIPE, ..."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return errno.errorcode.get(e.errno, str(e.errno))
        e = e.__cause__ or e.__context__
    if isinstance(exc, EOFError):
        return "eof"
    return type(exc).__name__


# --------------------------------------------------------------------------- sdk


async def sdk_mode(run: Run, started: trio.Event, go: trio.Event) -> None:
    from octoproxy import sdk

    args = run.args
    clients: list = []

    async def worker(client, c: Caller) -> None:
        while not run.stop.is_set():
            cid = next(run.ids)
            body = run.body(cid)
            t = time.monotonic()
            try:
                got = await client.call("echo", "echo", body, timeout=args.timeout)
            except sdk.CallError as exc:
                try:
                    name = sdk.Status(exc.status).name
                except ValueError:
                    name = str(exc.status)
                run.lose(c, cid, f"CallError {name}", time.monotonic())
                run.error_samples.setdefault(name, str(exc)[:300])
                continue
            except (trio.ClosedResourceError, OSError) as exc:
                run.lose(c, cid, type(exc).__name__, time.monotonic())
                continue
            now = time.monotonic()
            if got == body:
                run.done(c, t, now)
            else:
                run.lose(c, cid, "wrong body", now)

    async def one_client(c: Caller, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with sdk.open_client(args.target, connect_timeout=args.timeout) as client:
            clients.append(client)
            task_status.started()
            await go.wait()
            async with trio.open_nursery() as n:
                for _ in range(args.depth):
                    n.start_soon(worker, client, c)
            c.connections = client.connections_opened
            run.counters["sdk_resends"] += client.resends

    async with trio.open_nursery() as n:
        for c in run.callers:
            await n.start(one_client, c)
        started.set()


# --------------------------------------------------------------------------- raw


async def raw_mode(run: Run, started: trio.Event, go: trio.Event) -> None:
    args = run.args
    hdr = encode_header("echo", "echo")
    head = struct.Struct(">HBBIQHH")
    hlen = len(hdr)
    length = 12 + hlen + args.body
    unpack_from = PREFIX.unpack_from

    def request(cid: int, inflight: dict, now: float) -> bytes:
        body = run.body(cid)
        inflight[cid] = now
        return head.pack(MAGIC, 1, REQUEST, length, cid, 0, hlen) + hdr + body

    async def connect() -> trio.SocketStream | None:
        try:
            with trio.fail_after(args.timeout):
                return await trio.open_unix_socket(args.target)
        except (OSError, trio.TooSlowError) as exc:
            run.counters["connect_failures"] += 1
            run.error_samples.setdefault("connect", repr(exc)[:300])
            return None

    async def caller(c: Caller, first: trio.SocketStream) -> None:
        stream: trio.SocketStream | None = first
        while True:
            if stream is None:
                if run.stop.is_set():
                    return
                stream = await connect()
                if stream is None:
                    await trio.sleep(0.05)
                    continue
                run.counters["reconnects_after_failure"] += 1
            c.connections += 1
            inflight: dict[int, float] = {}
            buf = bytearray()
            reason = None
            try:
                now = time.monotonic()
                await stream.send_all(b"".join(request(next(run.ids), inflight, now) for _ in range(args.depth)))
                while inflight or not run.stop.is_set():
                    if run.stop.is_set() and not inflight:
                        break
                    data = None
                    with trio.move_on_after(0.1):
                        data = await stream.receive_some(262144)
                        if not data:
                            raise EOFError
                    now = time.monotonic()
                    due = 0
                    if data:
                        buf += data
                        off = 0
                        n = len(buf)
                        while n - off >= 20:
                            magic, _v, typ, flen, sid, flags, rh = unpack_from(buf, off)
                            end = off + 8 + flen
                            if end > n:
                                break
                            if magic != MAGIC:
                                raise EOFError("bad magic")
                            t = inflight.pop(sid, None)
                            if t is not None:
                                due += 1
                                bstart = off + 20 + rh
                                want = b"%020d" % sid
                                if typ == RESPONSE and not flags and not rh and buf[bstart : bstart + ID_LEN] == want:
                                    run.done(c, t, now)
                                else:
                                    run.lose(c, sid, "error response", now)
                            else:
                                run.counters["unknown_responses"] += 1
                            off = end
                        del buf[:off]
                    expired = [cid for cid, t in inflight.items() if now - t > args.timeout]
                    for cid in expired:
                        del inflight[cid]
                        run.lose(c, cid, "timeout", now)
                    due += len(expired)
                    if due and not run.stop.is_set():
                        await stream.send_all(b"".join(request(next(run.ids), inflight, now) for _ in range(due)))
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                reason = os_reason(exc)
            now = time.monotonic()
            for cid in inflight:
                run.lose(c, cid, f"connection died ({reason})", now)
            await trio.aclose_forcefully(stream)
            stream = None
            if reason is None:  # stopped and drained
                return
            run.counters["connections_died"] += 1
            run.counters[f"connections_died_{reason}"] += 1

    streams = []
    for _ in run.callers:
        s = await connect()
        if s is None:
            raise RuntimeError(f"cannot connect to {args.target}")
        streams.append(s)
    started.set()
    await go.wait()
    async with trio.open_nursery() as n:
        for c, s in zip(run.callers, streams):
            n.start_soon(caller, c, s)


# --------------------------------------------------------------------------- http


async def http_mode(run: Run, started: trio.Event, go: trio.Event) -> None:
    import h11

    args = run.args

    async def connect() -> trio.SocketStream | None:
        try:
            with trio.fail_after(args.timeout):
                return await trio.open_unix_socket(args.target)
        except (OSError, trio.TooSlowError) as exc:
            run.counters["connect_failures"] += 1
            run.error_samples.setdefault("connect", repr(exc)[:300])
            return None

    def dropped(stream: trio.SocketStream) -> bool:
        """An idle keep-alive connection that is readable was closed by the server (urllib3's check)."""
        try:
            return bool(select.select([stream.socket.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    async def caller(c: Caller, first: trio.SocketStream) -> None:
        stream: trio.SocketStream | None = first
        conn = h11.Connection(h11.CLIENT)
        c.connections += 1
        while not run.stop.is_set():
            if stream is None:
                stream = await connect()
                if stream is None:
                    await trio.sleep(0.05)
                    continue
                conn = h11.Connection(h11.CLIENT)
                c.connections += 1
            elif dropped(stream):
                run.counters["idle_closed_by_server"] += 1
                await trio.aclose_forcefully(stream)
                stream = None
                continue
            cid = next(run.ids)
            body = run.body(cid)
            t = time.monotonic()
            resp = None
            rbody = bytearray()
            try:
                with trio.fail_after(args.timeout):
                    out = conn.send(h11.Request(method="POST", target="/echo", headers=[
                        ("host", "echo"), ("content-type", "application/octet-stream"),
                        ("content-length", str(len(body)))]))
                    out += conn.send(h11.Data(data=body))
                    out += conn.send(h11.EndOfMessage())
                    await stream.send_all(out)
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(ev, h11.Response):
                            resp = ev
                        elif isinstance(ev, h11.Data):
                            rbody += ev.data
                        elif isinstance(ev, h11.EndOfMessage):
                            break
                        elif isinstance(ev, h11.ConnectionClosed):
                            raise EOFError
            except trio.TooSlowError:
                run.lose(c, cid, "timeout", time.monotonic())
                await trio.aclose_forcefully(stream)
                stream = None
                continue
            except (EOFError, h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                reason = os_reason(exc) if not isinstance(exc, h11.ProtocolError) else "eof mid-response"
                run.lose(c, cid, f"connection died ({reason})", time.monotonic())
                run.counters["connections_died"] += 1
                await trio.aclose_forcefully(stream)
                stream = None
                continue
            now = time.monotonic()
            if resp is not None and resp.status_code == 200 and rbody == body:
                run.done(c, t, now)
            else:
                code = resp.status_code if resp is not None else "?"
                run.lose(c, cid, f"HTTP {code}", now)
                run.error_samples.setdefault(f"HTTP {code}", bytes(rbody[:300]).decode(errors="replace"))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:  # Connection: close (Envoy draining): the protocol asks for a new connection
                run.counters["reconnects_asked"] += 1
                await trio.aclose_forcefully(stream)
                stream = None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    streams = []
    for _ in run.callers:
        s = await connect()
        if s is None:
            raise RuntimeError(f"cannot connect to {args.target}")
        streams.append(s)
    started.set()
    await go.wait()
    async with trio.open_nursery() as n:
        for c, s in zip(run.callers, streams):
            n.start_soon(caller, c, s)


# --------------------------------------------------------------------------- main


async def watch_stdin(run: Run) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    try:
        while b"stop" not in buf:
            data = await stdin.receive_some(1024)
            if not data:
                break
            buf += data
    finally:
        await stdin.aclose()
    run.t_stop = time.monotonic()
    run.stop.set()


async def amain(args: argparse.Namespace) -> dict:
    run = Run(args)
    n_callers = args.connections * args.depth if args.mode == "http" else args.connections
    run.callers = [Caller(i) for i in range(n_callers)]
    mode = {"sdk": sdk_mode, "raw": raw_mode, "http": http_mode}[args.mode]
    started = trio.Event()
    go = trio.Event()
    with trio.move_on_after(args.max_duration) as scope:
        async with trio.open_nursery() as n:
            n.start_soon(mode, run, started, go)
            with trio.fail_after(15):
                await started.wait()
            run.t_start = time.monotonic()
            for c in run.callers:
                c.last_done = run.t_start
            go.set()
            print(f"ready {run.t_start:.6f}", flush=True)
            n.start_soon(watch_stdin, run)
            await run.stop.wait()
            # the calls in flight get their timeout (and a little) to finish
            n.cancel_scope.deadline = trio.current_time() + args.timeout + 2.0
    if scope.cancelled_caught and not run.stop.is_set():
        run.counters["max_duration_reached"] += 1
    t_stop = min(run.t_stop, time.monotonic())
    # a caller that went quiet before the stop stalled until the stop
    for c in run.callers:
        tail = t_stop - c.last_done
        if tail > c.max_gap:
            c.max_gap, c.max_gap_end = tail, t_stop
        if tail > GAP_NOTE:
            run.gaps.append((c.last_done, t_stop, c.idx))
        b = int((t_stop - run.t_start) / BUCKET)
        if tail > run.gap_max.get(b, 0.0):
            run.gap_max[b] = tail

    lat = sorted(run.latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * (len(lat) - 1) + 0.5))] if lat else None

    completed = sum(c.completed for c in run.callers)
    lost = sum(c.lost for c in run.callers)
    worst = max(run.callers, key=lambda c: c.max_gap)
    if args.lost_ids:
        Path(args.lost_ids).write_text("".join(f"{i:020d}\n" for i in run.lost_ids))
    last_bucket = int((t_stop - run.t_start) / BUCKET)
    return {
        "mode": args.mode,
        "callers": n_callers,
        "connections": args.connections,
        "depth": args.depth,
        "in_flight": args.connections * args.depth,
        "timeout_s": args.timeout,
        "t_start": run.t_start,
        "t_stop": t_stop,
        "duration_s": t_stop - run.t_start,
        "completed": completed,
        "lost": lost,
        "lost_by_reason": dict(run.lost_reasons),
        "loss_events": [{"t": t, "reason": r, "n": n} for (t, r), n in sorted(run.loss_buckets.items())],
        "max_stall_s": worst.max_gap,
        "max_stall_end_t": worst.max_gap_end,
        "max_stall_caller": worst.idx,
        "stalls_over_50ms": [{"start": a, "end": b, "caller": i} for a, b, i in sorted(run.gaps)[:500]],
        "max_latency_s": lat[-1] if lat else None,
        "p50_latency_s": pct(0.5),
        "p99_latency_s": pct(0.99),
        "p999_latency_s": pct(0.999),
        "connections_opened": sum(c.connections for c in run.callers),
        "counters": dict(run.counters),
        "error_samples": run.error_samples,
        "completions_per_100ms": [run.timeline.get(i, 0) for i in range(last_bucket + 1)],
        "max_stall_per_100ms": [round(run.gap_max.get(i, 0.0), 6) for i in range(last_bucket + 1)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("sdk", "raw", "http"), required=True)
    ap.add_argument("--target", required=True, help="UDS of the caller-side proxy")
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument("-d", "--depth", type=int, default=16, help="calls in flight per connection")
    ap.add_argument("--body", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=5.0, help="per call; a call without answer by then is lost")
    ap.add_argument("--max-duration", type=float, default=120.0, help="hard limit of the whole run")
    ap.add_argument("--lost-ids", default=None, help="write the ids of lost calls there")
    args = ap.parse_args()
    if args.body < ID_LEN:
        ap.error(f"--body must be at least {ID_LEN}")
    try:
        res = trio.run(amain, args)
    except Exception as exc:  # noqa: BLE001 - reported to the orchestrator as JSON
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
