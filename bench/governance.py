"""Governance cores micro-benchmark: nanoseconds per decision, per core.

    python bench/governance.py [--n 200000] [--repeat 5]

Each line times one decision the proxy would make per call, in a tight loop
over pre-built state (best of ``--repeat`` runs of ``--n`` iterations; the
loop's own overhead is measured and subtracted). Time is the thread's CPU
time, so other processes on a shared machine inflate it less than wall time. The cluster has 10 endpoints
in three localities. The last line is exactly
``governed_ns_per_call: <total> ungoverned_pick_ns: <pick>``: the sum of every
per-call decision of a fully governed route (rule pick, breaker acquire and
release, rate-limit take, budget deposit, outlier record, traceparent next
hop), next to the plain round-robin pick the routing core replaces. The retry
decision runs only on a failed try, so it is listed but not counted.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable


from octoproxy.core._balancer import Endpoint, RoundRobin, WeightedRandom
from octoproxy.protocol._protocol import Status
from octoproxy.governance import (
    BreakerLimits,
    BudgetConfig,
    CircuitBreaker,
    Direction,
    Locality,
    LocalityMode,
    Member,
    OutlierConfig,
    OutlierDetector,
    RateLimiter,
    RateLimitRule,
    RetryBudget,
    RetryPolicy,
    RouteRule,
    Router,
    RoutingPolicy,
    SlowStart,
    TraceConfig,
    Tracer,
    decide,
)
from octoproxy.governance._ratelimit import Limit, TokenBucket

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def members() -> list[Member]:
    out = []
    for i in range(10):
        region, center, idc = [("bj", "bj-n", "yf"), ("bj", "bj-n", "dx"), ("sh", "sh-1", "sha")][i % 3]
        tags = {"swimlane": "blue"} if i < 4 else {}
        out.append(Member(Endpoint(f"10.0.0.{i}:9000", 100, region, idc, tags), center, False, 0))
    return out


def timed(fn: Callable[[int], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        fn(n)
        best = min(best, time.thread_time_ns() - t0)
    return best / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, repeat = args.n, args.repeat

    ms = members()
    eps = [m.endpoint for m in ms]
    rr = RoundRobin()
    wr = WeightedRandom(random.Random(1))
    here = Locality("bj", "bj-n", "yf")
    rule = RouteRule("blue", method="Get*", match_metadata=(("swimlane", "blue"),), endpoint_tags=(("swimlane", "blue"),))
    router = Router("c", RoutingPolicy(rules=(rule,), slow_start=SlowStart(window_ms=30_000)), here, random.Random(1))
    router.update(ms)
    plain = Router("c", RoutingPolicy(locality=LocalityMode.OFF), Locality(), random.Random(1))
    plain.update(ms)
    meta = {"swimlane": "blue", "traceparent": TP}
    outlier = OutlierDetector("c", OutlierConfig(), 0)
    outlier.update(e.address for e in eps)
    breaker = CircuitBreaker("c", BreakerLimits())
    budget = RetryBudget(BudgetConfig(), 0)
    policy = RetryPolicy(idempotent_methods=("Get*",))
    limiter = RateLimiter([RateLimitRule("r", rate=1e9)], Direction.INBOUND)
    tb = TokenBucket(Limit(RateLimitRule("r", rate=1e9), 1), 0)
    tracer = Tracer(TraceConfig(), random.Random(1).getrandbits)
    tpb = TP.encode()

    def empty(k: int) -> None:
        for _ in range(k):
            pass

    def rr_pick(k: int) -> None:
        p = rr.pick
        for _ in range(k):
            p(eps)

    def wr_pick(k: int) -> None:
        p = wr.pick
        for _ in range(k):
            p(eps)

    def rule_pick(k: int) -> None:
        p = router.pick
        for i in range(k):
            p("svc", "GetUser", meta, 1_000_000)

    def plain_pick(k: int) -> None:
        p = plain.pick
        for i in range(k):
            p("svc", "GetUser", meta, 1_000_000)

    def outlier_record(k: int) -> None:
        r = outlier.record_status
        a = eps[0].address
        for i in range(k):
            r(a, 0, i)

    def breaker_pair(k: int) -> None:
        acq, rel = breaker.acquire_request, breaker.release_request
        for _ in range(k):
            acq()
            rel()

    def budget_deposit(k: int) -> None:
        d = budget.deposit
        for i in range(k):
            d(i)

    def budget_withdraw(k: int) -> None:
        w = budget.try_withdraw
        for i in range(k):
            w(i)

    def retry_decide_ok(k: int) -> None:
        for i in range(k):
            decide(policy, status=0, flags=0, connect_failed=False, idempotent=True, attempt=1,
                   now_ms=i, deadline_ms=i + 1000, endpoint="a")

    def retry_decide_retry(k: int) -> None:
        for i in range(k):
            decide(policy, status=Status.UNAVAILABLE, flags=0, connect_failed=False, idempotent=True, attempt=1,
                   now_ms=i, deadline_ms=i + 1000, endpoint="a")

    def bucket_take(k: int) -> None:
        t = tb.take
        for i in range(k):
            t(i)

    def limiter_check(k: int) -> None:
        c = limiter.check
        for i in range(k):
            c("svc", "GetUser", "caller", i)

    def trace_next(k: int) -> None:
        h = tracer.next_hop
        for _ in range(k):
            h(TP, None)

    def trace_next_bytes(k: int) -> None:
        h = tracer.next_hop_bytes
        for _ in range(k):
            h(tpb, None)

    def trace_new(k: int) -> None:
        h = tracer.next_hop
        for _ in range(k):
            h(None, None)

    counter = [0]

    def calibrate(k: int) -> None:
        for _ in range(k):
            counter[0] += 1

    base = timed(empty, n, repeat)
    calib = timed(calibrate, n, repeat)
    rows = [
        ("baseline: RoundRobin.pick (10 eps, ungoverned)", rr_pick, False),
        ("baseline: WeightedRandom.pick (10 eps)", wr_pick, False),
        ("routing: pick with a matching swimlane rule + locality + warm-up", rule_pick, True),
        ("routing: pick, no rules, locality off", plain_pick, False),
        ("outlier: record a response", outlier_record, True),
        ("breaker: acquire + release request", breaker_pair, True),
        ("retry budget: deposit (per original request)", budget_deposit, True),
        ("retry budget: try_withdraw (per retry)", budget_withdraw, False),
        ("retry: decide on success (not called per call: the shell skips OK)", retry_decide_ok, False),
        ("retry: decide to retry (idempotent, allocates)", retry_decide_retry, False),
        ("rate limit: TokenBucket.take", bucket_take, False),
        ("rate limit: RateLimiter.check inbound (key hit)", limiter_check, True),
        ("trace: next hop (str)", trace_next, True),
        ("trace: next hop (bytes)", trace_next_bytes, False),
        ("trace: new trace (absent)", trace_new, False),
    ]
    print(f"# governance cores, {sys.implementation.name} {sys.version.split()[0]}, best of {repeat} x {n}, loop overhead {base:.1f} ns subtracted")
    print(f"# calibration: one `x[0] += 1` loop iteration {calib:.0f} ns (compare runs by it: higher = a busier machine)")
    total = 0.0
    pick_ns = 0.0
    for label, fn, governed in rows:
        ns = max(0.0, timed(fn, n, repeat) - base)
        if fn is rr_pick:
            pick_ns = ns
        if governed:
            total += ns
        print(f"{label:<68} {ns:8.0f} ns{'  *' if governed else ''}")
    print("(* counted in a fully governed call)")
    print(f"governed_ns_per_call: {total:.0f} ungoverned_pick_ns: {pick_ns:.0f}")


if __name__ == "__main__":
    main()
