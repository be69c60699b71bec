"""Frame codec benchmark: decode + route throughput of the compiled path vs the twin.

    python bench/codec.py [--seconds 2]

Workload: a realistic mix of request frames (typical headers: service, method,
caller, timeout, a traceparent) with 100-byte bodies, fed in 64 KiB chunks
(frames split across chunk boundaries, the remainder carried to the next read,
as a proxy does), plus a 4 KiB-body run and an encode run. One core.

The last line is exactly ``speedup: <N>x compiled_mfps: <M>``: compiled over
pure-Python decode+route throughput, and the compiled path's millions of frames
per second (100-byte bodies, 64 KiB chunks).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

# The installed package (pip install '.[test]'), never the checkout's src/: that
# one has no compiled module unless it was built in place.
try:
    from octoproxy.protocol import _frame_py
except ImportError:  # pragma: no cover
    sys.exit("bench/codec.py: octoproxy is not installed; run `pip install '.[test]'` first")

try:
    from octoproxy.protocol import _fastframe
except ImportError:  # pragma: no cover
    _fastframe = None  # type: ignore[assignment]

CHUNK = 64 * 1024
SERVICES = [f"com.example.service{i}" for i in range(20)]
METHODS = ["get", "put", "list", "delete", "search"]


def make_stream(impl, body_size: int, n_frames: int) -> bytes:
    rng = random.Random(1)
    frames = []
    for i in range(n_frames):
        svc = rng.choice(SERVICES)
        frames.append(
            impl.encode_request(
                i + 1,
                svc,
                rng.choice(METHODS),
                bytes(body_size),
                caller="com.example.caller",
                timeout_ms=1000,
                metadata={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            )
        )
    return b"".join(frames)


def make_routes(impl):
    entries = []
    rid = 0
    for s in SERVICES:
        entries.append((s, "*", rid))
        rid += 1
        entries.append((s, "get", rid))
        rid += 1
    return impl.RouteTable(entries)


def chunks_of(stream: bytes) -> list[bytes]:
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]


def decode_route(impl, chunks: list[bytes], seconds: float) -> tuple[float, int]:
    """Proxy-style loop: a reusable buffer, scan, carry the partial frame over."""
    scanner = impl.Scanner(make_routes(impl), capacity=4096)
    buf = bytearray(4 * CHUNK)
    frames = 0
    misses = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        fill = 0
        for chunk in chunks:
            n = len(chunk)
            buf[fill : fill + n] = chunk
            end = fill + n
            start = 0
            while True:
                got = scanner.scan(buf, start, end)
                if not got:
                    break
                frames += got
                start = scanner.consumed
            rest = end - start
            if rest:
                buf[:rest] = buf[start:end]
            fill = rest
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    return frames / elapsed, misses


def decode_objects(impl, chunks: list[bytes], seconds: float) -> float:
    """SDK-style loop: FrameDecoder producing Frame objects."""
    frames = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        dec = impl.FrameDecoder()
        for chunk in chunks:
            dec.receive_data(chunk)
            while dec.next_frame() is not None:
                frames += 1
    return frames / (time.perf_counter() - t0)


def encode(impl, seconds: float) -> float:
    body = bytes(100)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for i in range(1000):
            impl.encode_request(i, "com.example.service1", "get", body, caller="c", timeout_ms=1000)
        n += 1000
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = ap.parse_args()
    if _fastframe is None:
        sys.exit("the compiled module octoproxy.protocol._fastframe is not built (pip install .)")
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    s100 = chunks_of(make_stream(_frame_py, 100, 20000))
    s4k = chunks_of(make_stream(_frame_py, 4096, 2000))
    print(f"frame size: 100-byte body {len(b''.join(s100)) // 20000} B, 4 KiB body {len(b''.join(s4k)) // 2000} B; chunks of {CHUNK} B")
    results = {}
    for name, impl in (("compiled", _fastframe), ("python", _frame_py)):
        secs = args.seconds if name == "compiled" else args.seconds / 2
        r100, _ = decode_route(impl, s100, secs)
        r4k, _ = decode_route(impl, s4k, secs / 2)
        obj = decode_objects(impl, s100, secs / 2)
        enc = encode(impl, secs / 2)
        results[name] = r100
        print(
            f"{name:9s} decode+route 100B: {r100 / 1e6:7.3f} M frames/s   4KiB: {r4k / 1e6:7.3f} M frames/s"
            f"   Frame objects: {obj / 1e6:6.3f} M/s   encode_request: {enc / 1e6:6.3f} M/s"
        )
    speedup = results["compiled"] / results["python"]
    print(f"speedup: {speedup:.1f}x compiled_mfps: {results['compiled'] / 1e6:.2f}")


if __name__ == "__main__":
    main()
