"""Closed-loop load generator for the throughput benchmark (plain Python, raw sockets, epoll).

    python bench/_loadgen.py --uds PATH [--thrift] [-c CONNS] [-d DEPTH] [--body 100]
                             [--warmup 1] [--duration 4] [--cpu 1] [--watch-pids 12,34]

Opens CONNS connections to a UDS and keeps DEPTH calls in flight on each: a new call is issued as
soon as a response arrives (closed loop). Every request a read made possible goes out in one
``send``. After ``--warmup`` seconds it measures for ``--duration`` seconds: responses received,
errors (not counted as calls), latency percentiles of all responses (a ``perf_counter_ns`` taken just before the send, per stream id,
against the time the read that brought the response returned from ``epoll``). With
``--watch-pids`` it reads those processes' CPU time (``/proc/PID/stat`` utime+stime, and the
nanosecond ``schedstat`` of all their threads) exactly at the window's start and end.

Prints one JSON line on stdout.

Protocols: octoproxy v1 frames (default; REQUEST with header {service, method}; a response is an
error unless it is a RESPONSE with flags 0 and an empty header), or ``--thrift``: framed binary
Thrift, method "echo", one string argument (field 1); a response is an error unless it is a
REPLY whose result struct starts with field 0 (success).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time

BUF_SIZE = 256 * 1024
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT

# octoproxy v1
PREFIX = struct.Struct(">HBBIQHH")
MAGIC = 0xABBA
REQUEST, RESPONSE = 1, 2

# thrift framed binary
T_HEAD = struct.Struct(">IiI")  # frame length, version|type, name length
T_SEQ_FIELD = struct.Struct(">iBh")  # seqid, first field type, first field id
T_REPLY = 2


def encode_header(service: str, method: str) -> bytes:
    """protobuf octoproxy.v1.Header with fields 1 (service) and 2 (method)."""

    def field(num: int, value: bytes) -> bytes:
        n = len(value)
        varint = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                varint.append(b | 0x80)
            else:
                varint.append(b)
                break
        return bytes([num << 3 | 2]) + bytes(varint) + value

    return field(1, service.encode()) + field(2, method.encode())


def octo_request_packer(service: str, method: str, body: bytes):
    hdr = encode_header(service, method)
    head = struct.pack(">HBBI", MAGIC, 1, REQUEST, 12 + len(hdr) + len(body))
    tail = struct.pack(">HH", 0, len(hdr)) + hdr + body
    s = struct.Struct(f">{len(head)}sQ{len(tail)}s")
    return lambda sid, _p=s.pack, _h=head, _t=tail: _p(_h, sid, _t)


def thrift_request_packer(method: str, body: bytes):
    name = method.encode()
    # after the frame length: version|CALL, name, seqid, field(string, 1), len, body, STOP
    msg_len = 4 + 4 + len(name) + 4 + 3 + 4 + len(body) + 1
    head = struct.pack(">IIi", msg_len, 0x80010001, len(name)) + name
    tail = struct.pack(">BhI", 11, 1, len(body)) + body + b"\x00"
    s = struct.Struct(f">{len(head)}si{len(tail)}s")
    return lambda sid, _p=s.pack, _h=head, _t=tail: _p(_h, sid, _t)


def read_cpu(pids: list[int]) -> dict:
    """Per pid: utime+stime clock ticks (/proc/PID/stat) and on-CPU ns summed over its threads."""
    res = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            ticks = None
        ns = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                        ns += int(f.read().split()[0])
                except (OSError, IndexError, ValueError):
                    pass
        except OSError:
            ns = None
        res[str(pid)] = {"ticks": ticks, "sched_ns": ns}
    # busy clock ticks of each CPU, to tell how much else ran there during the window
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals]
                    res[name.decode()] = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait
    except OSError:
        pass
    return res


class Conn:
    __slots__ = ("sock", "fd", "buf", "mv", "rlen", "inflight", "next_sid", "pending", "dead")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.rlen = 0
        self.inflight: dict[int, int] = {}
        self.next_sid = 1
        self.pending = b""
        self.dead = False


def percentile(sorted_vals: list[int], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * (len(sorted_vals) - 1) + 0.5))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uds", required=True)
    ap.add_argument("--thrift", action="store_true")
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument("-d", "--depth", type=int, default=32, help="calls in flight per connection")
    ap.add_argument("--body", type=int, default=100, help="body size in bytes")
    ap.add_argument("--service", default="echo")
    ap.add_argument("--method", default=None, help='default "ping" (octoproxy) / "echo" (thrift)')
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to that CPU")
    ap.add_argument("--watch-pids", default="", help="comma-separated pids whose CPU time to read")
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    watch = [int(p) for p in args.watch_pids.split(",") if p.strip()]
    body = bytes((i * 7 + 13) & 0xFF for i in range(args.body))
    if args.thrift:
        pack_req = thrift_request_packer(args.method or "echo", body)
    else:
        pack_req = octo_request_packer(args.service, args.method or "ping", body)

    result: dict = {
        "protocol": "thrift" if args.thrift else "octoproxy",
        "connections": args.connections,
        "depth": args.depth,
        "body": args.body,
    }

    conns: dict[int, Conn] = {}
    try:
        deadline = time.monotonic() + args.connect_timeout
        for _ in range(args.connections):
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(1.0)
                    s.connect(args.uds)
                    break
                except OSError as e:
                    s.close()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cannot connect to {args.uds}: {e}") from e
                    time.sleep(0.05)
            s.setblocking(False)
            c = Conn(s)
            conns[c.fd] = c
    except RuntimeError as e:
        result["error"] = str(e)
        print(json.dumps(result), flush=True)
        return 1

    ep = select.epoll()
    counters = {"calls": 0, "errors": 0, "reads": 0, "unknown": 0, "lost": 0}
    lat: list[int] = []
    measuring = False

    def kill(c: Conn, why: str) -> None:
        if c.dead:
            return
        c.dead = True
        result.setdefault("conn_errors", []).append(why)
        if measuring:
            counters["lost"] += len(c.inflight)
        c.inflight.clear()
        try:
            ep.unregister(c.fd)
        except (OSError, ValueError):
            pass

    def send(c: Conn, data: bytes) -> None:
        if c.pending:
            c.pending += data
            return
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            c.pending = data[n:]
            ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def start_calls(c: Conn, count: int) -> bytes:
        sid = c.next_sid
        if sid + count > 0x7FFFFFFF:  # (thrift seqids are i32)
            sid = 1
        c.next_sid = sid + count
        sids = range(sid, sid + count)
        data = b"".join([pack_req(s) for s in sids])
        c.inflight.update(dict.fromkeys(sids, time.perf_counter_ns()))
        return data

    octo_from = PREFIX.unpack_from
    t_head_from = T_HEAD.unpack_from
    t_seq_from = T_SEQ_FIELD.unpack_from
    perf = time.perf_counter_ns
    thrift = args.thrift

    def on_readable(c: Conn, now: int) -> None:
        """Read once, settle every complete response, issue the replacements in one send."""
        n = c.sock.recv_into(c.mv[c.rlen :])
        if n == 0:
            kill(c, "closed by peer")
            return
        buf = c.buf
        rlen = c.rlen + n
        off = 0
        inflight = c.inflight
        done = 0
        bad = 0
        unknown = 0
        rec = measuring
        if thrift:
            while rlen - off >= 12:
                flen, vt, nlen = t_head_from(buf, off)
                end = off + 4 + flen
                if end > rlen:
                    break
                p = off + 12 + nlen
                if p + 7 > end:
                    if p + 4 > end:
                        kill(c, "short thrift reply")
                        return
                    seq, ftype, fid = struct.unpack_from(">i", buf, p)[0], 0, -1
                else:
                    seq, ftype, fid = t_seq_from(buf, p)
                t = inflight.pop(seq, None)
                if t is None:
                    unknown += 1
                else:
                    done += 1
                    if rec:
                        lat.append(now - t)
                    if vt & 0xFF != T_REPLY or fid != 0:
                        bad += 1
                off = end
        else:
            while rlen - off >= 20:
                magic, _ver, typ, length, sid, flags, hlen = octo_from(buf, off)
                end = off + 8 + length
                if end > rlen:
                    break
                if magic != MAGIC:
                    kill(c, f"bad magic {magic:#x}")
                    return
                t = inflight.pop(sid, None)
                if t is None:
                    unknown += 1
                else:
                    done += 1
                    if rec:
                        lat.append(now - t)
                    if typ != RESPONSE or flags or hlen:
                        bad += 1
                off = end
        if off:
            rest = rlen - off
            if rest:
                buf[:rest] = bytes(c.mv[off:rlen])
            c.rlen = rest
        else:
            c.rlen = rlen
            if rlen == len(buf):  # a response bigger than the buffer
                buf.extend(bytes(len(buf)))
                c.mv = memoryview(buf)
        if rec:
            counters["reads"] += 1
            counters["calls"] += done - bad  # only good responses count as completed calls
            counters["errors"] += bad
            counters["unknown"] += unknown
        if done:
            send(c, start_calls(c, done))

    t0 = perf()
    t_start = t0 + int(args.warmup * 1e9)
    t_end = t_start + int(args.duration * 1e9)
    for c in conns.values():
        ep.register(c.fd, EPOLLIN)
    for c in list(conns.values()):
        try:
            send(c, start_calls(c, args.depth))
        except OSError as e:
            kill(c, f"send: {e}")

    cpu_start = cpu_end = None
    w_start = w_end = None
    while True:
        now = perf()
        if not measuring and now >= t_start:
            cpu_start = read_cpu(watch)
            w_start = perf()
            measuring = True
        elif measuring and now >= t_end:
            w_end = now
            cpu_end = read_cpu(watch)
            break
        timeout = max(0.0, min(0.2, ((t_start if not measuring else t_end) - now) / 1e9))
        try:
            events = ep.poll(timeout)
        except InterruptedError:
            continue
        now = perf()
        for fd, ev in events:
            c = conns[fd]
            if c.dead:
                continue
            try:
                if ev & EPOLLOUT and c.pending:
                    data, c.pending = c.pending, b""
                    n = c.sock.send(data)
                    if n < len(data):
                        c.pending = data[n:]
                    else:
                        ep.modify(fd, EPOLLIN)
                if ev & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    on_readable(c, now)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                kill(c, f"{type(e).__name__}: {e}")

    window = (w_end - w_start) / 1e9
    lat.sort()
    calls = counters["calls"]
    result.update(
        {
            "window_s": round(window, 4),
            "calls": calls,
            "errors": counters["errors"] + counters["lost"],
            "unknown_responses": counters["unknown"],
            "calls_per_s": calls / window if window > 0 else 0.0,
            "p50_us": (percentile(lat, 0.50) or 0) / 1e3 if lat else None,
            "p99_us": (percentile(lat, 0.99) or 0) / 1e3 if lat else None,
            "p999_us": (percentile(lat, 0.999) or 0) / 1e3 if lat else None,
            "mean_us": sum(lat) / len(lat) / 1e3 if lat else None,
            "responses_per_read": calls / counters["reads"] if counters["reads"] else None,
            "live_connections": sum(1 for c in conns.values() if not c.dead),
            "cpu_start": cpu_start,
            "cpu_end": cpu_end,
            "clk_tck": os.sysconf("SC_CLK_TCK"),
        }
    )
    for c in conns.values():
        c.sock.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
