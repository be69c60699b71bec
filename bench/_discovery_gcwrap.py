"""Run `octoproxy ARGS...` with the time spent in the cyclic garbage collector recorded (diagnostics).

    python bench/_discovery_gcwrap.py control-plane --listen ...    (OCTOBENCH_GC_STATS=PATH)

Used by `bench/discovery.py --cp-gc-stats`: the same code as `python -m octoproxy`, plus a
gc.callbacks hook that adds up, per generation, the collections and their CPU time (thread time)
and the longest one; on SIGUSR1 it writes those cumulative figures as JSON to $OCTOBENCH_GC_STATS
(atomic replace, with a sequence number), so the benchmark can take the difference over its
measured phase. The hook costs a few microseconds per collection; no thread is added.

What-if experiments (not how octoproxy runs): OCTOBENCH_GC_THRESHOLD="0" disables the collector,
"A,B,C" calls gc.set_threshold(A, B, C) before octoproxy starts.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time

_stats = {"count": [0, 0, 0], "cpu_s": [0.0, 0.0, 0.0], "wall_s": [0.0, 0.0, 0.0], "longest_s": 0.0, "seq": 0}
_start = [0.0, 0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _start[0], _start[1] = time.perf_counter(), time.thread_time()
        return
    wall, cpu = time.perf_counter() - _start[0], time.thread_time() - _start[1]
    g = info["generation"]
    _stats["count"][g] += 1
    _stats["cpu_s"][g] += cpu
    _stats["wall_s"][g] += wall
    _stats["longest_s"] = max(_stats["longest_s"], wall)


def _dump(path: str) -> None:
    _stats["seq"] += 1
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**_stats, "tracked_objects": len(gc.get_objects())}, f)
    os.replace(tmp, path)


def main() -> None:
    path = os.environ.get("OCTOBENCH_GC_STATS")
    gc.callbacks.append(_on_gc)
    threshold = os.environ.get("OCTOBENCH_GC_THRESHOLD", "").strip()
    if threshold == "0":
        gc.disable()
    elif threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    if path:  # Trio only takes over the signals it is asked for (SIGTERM, SIGINT here)
        signal.signal(signal.SIGUSR1, lambda _s, _f: _dump(path))
    sys.argv = ["octoproxy", *sys.argv[1:]]
    runpy.run_module("octoproxy", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
