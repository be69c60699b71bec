"""The data-plane kernel alone, in process: engine CPU per call, no sockets.

What it measures: an Engine (routes, one cluster of 2 upstream links, a
caller stamp) fed by 4 downstream links, each read bringing 32 requests
(100-byte bodies); each upstream then answers everything it got in one read.
The figure is engine time per call (request in + response out), from
``time.perf_counter`` around ``Engine.feed`` and ``take_dirty`` only; building
the answers and draining the output buffers (what the upstream peer and the
socket writes would do) is outside the timed part.

Each implementation runs in its own fresh process, interleaved ``--rounds``
times, best and median reported:

  compiled   the compiled kernel (_kernel_c) with the compiled relay and scanner
  python     the same source interpreted, with the pure-Python twins
             (OCTOPROXY_NO_EXTENSIONS=1): the baseline measured in the same run

Last line, exactly:
    kernel_us_per_call: compiled=<X> python=<Y> ratio=<X/Y>

Run: ``python bench/kernel.py [--calls N] [--rounds R]``. Pin with
``taskset -c 1`` for steadier figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = "--child"


def child(calls: int) -> None:
    import gc

    from octoproxy.core._balancer import Endpoint
    from octoproxy.core._engine import DOWNSTREAM, KERNEL, UPSTREAM, Cluster, Engine, Link, Route
    from octoproxy.frame import FrameDecoder, encode_request, encode_response

    cluster = Cluster("echo", "round_robin", [Endpoint("10.0.0.1:9000"), Endpoint("10.0.0.2:9000")])
    engine = Engine(routes=[Route("echo", "*", "echo", 5.0)], clusters=[cluster], caller="web")
    ups = []
    for ep in cluster.endpoints:
        link = Link(UPSTREAM, ep.address, endpoint=ep, cluster=cluster)
        cluster.add_link(link)
        ups.append(link)
    downs = [Link(DOWNSTREAM, f"sdk{i}", listener="outbound") for i in range(4)]
    body = b"x" * 100
    batch = 32
    reqs = [bytearray(b"".join(encode_request(i * batch + k + 1, "echo", "Echo", body) for k in range(batch))) for i in range(len(downs))]
    scanners = {id(d): engine.new_scanner(d) for d in downs}
    up_scanner = {id(u): engine.new_scanner(u) for u in ups}
    dec = FrameDecoder()
    now = 100.0
    spent = 0.0
    done = 0
    gc.collect()
    gc.freeze()
    while done < calls:
        t = time.thread_time()
        for d, buf in zip(downs, reqs):
            engine.feed(d, scanners[id(d)], buf, len(buf), now)
        engine.take_dirty()
        spent += time.thread_time() - t
        answers = []
        for u in ups:
            dec.receive_data(bytes(u.out))
            u.out.clear()
            answers.append((u, bytearray(b"".join(encode_response(f.stream_id, body=body) for f in dec))))
        t = time.thread_time()
        for u, buf in answers:
            engine.feed(u, up_scanner[id(u)], buf, len(buf), now)
        engine.take_dirty()
        spent += time.thread_time() - t
        for d in downs:
            d.out.clear()
        done += batch * len(downs)
        now += 0.001
        if engine.pending_count:
            raise SystemExit(f"{engine.pending_count} calls left pending: the harness is wrong")
    print(json.dumps({"kernel": KERNEL, "us_per_call": spent / done * 1e6}))


def run_one(which: str, calls: int) -> float:
    env = dict(os.environ)
    if which == "python":
        env["OCTOPROXY_NO_EXTENSIONS"] = "1"
    else:
        env.pop("OCTOPROXY_NO_EXTENSIONS", None)
    out = subprocess.run([sys.executable, __file__, CHILD, str(calls)], env=env, capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    want = "cython" if which == "compiled" else "python"
    if res["kernel"] != want:
        raise SystemExit(f"{which}: the kernel loaded is {res['kernel']!r} (is the extension built?)")
    return float(res["us_per_call"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per measurement (python: a fifth of it)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    args = ap.parse_args()
    figures: dict[str, list[float]] = {"compiled": [], "python": []}
    for _ in range(args.rounds):
        figures["compiled"].append(run_one("compiled", args.calls))
        figures["python"].append(run_one("python", max(1024, args.calls // 5)))
    print(f"{'kernel':<10} {'best µs/call':>13} {'median µs/call':>15}")
    for name, xs in figures.items():
        print(f"{name:<10} {min(xs):13.2f} {statistics.median(xs):15.2f}")
    c = statistics.median(figures["compiled"])
    p = statistics.median(figures["python"])
    print(f"kernel_us_per_call: compiled={c:.2f} python={p:.2f} ratio={c / p:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        child(int(sys.argv[2]))
    else:
        main()
