"""Pure-Python twin of ``octoproxy.core._fastpath``: the engine's per-frame fast path.

The common case of each frame (a routed REQUEST with a healthy upstream; a
RESPONSE with a pending entry) is handled here, in one pass over a scan's
frames; anything else goes to ``Engine.slow_request`` / ``slow_response``,
which hold the policy. The compiled module does exactly the same with C
loops. Keep the two in step.
"""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING, Any

from ..protocol._protocol import PREFIX_SIZE

if TYPE_CHECKING:
    from ._engine import Engine, Link

IMPLEMENTATION = "python"

_U64 = Struct(">Q")
_U32 = Struct(">I")
_U16 = Struct(">H")


def forward(
    engine: Engine, down: Link, up: Link, scanner: Any, i: int, mv: memoryview, now: float, route_timeout: float, max_timeout: float, oneway: bool
) -> None:
    """Append request frame ``i`` to ``up`` (new stream id, caller stamp) and track it.

    The deadline is the frame's own timeout, else ``route_timeout``; capped at
    ``max_timeout`` when that is not 0.
    """
    off, size, _ftype, _flags, sid, timeout_ms, _route, _status = scanner.frame(i)
    out = up.out
    o = len(out)
    stamp = engine.stamp
    if stamp and down.listener == "outbound":
        hend = off + PREFIX_SIZE + (mv[off + 18] << 8 | mv[off + 19])
        out += mv[off:hend]
        out += stamp
        out += mv[hend : off + size]
        _U32.pack_into(out, o + 4, size - 8 + len(stamp))
        _U16.pack_into(out, o + 18, hend - off - PREFIX_SIZE + len(stamp))
    else:
        out += mv[off : off + size]
    dirty = engine.dirty
    if not dirty or dirty[-1] is not up:
        dirty.append(up)
    if oneway:
        engine.stats.oneway.inc()
        return
    timeout = timeout_ms / 1000.0 if timeout_ms else route_timeout
    if max_timeout and timeout > max_timeout:
        timeout = max_timeout
    deadline = now + timeout
    service, method = scanner.routing_key(i)
    cache = engine.rs_cache[down.listener]
    key = service + b"\0" + method
    stats_id = cache.get(key)
    if stats_id is None:
        stats_id = engine.rstats.id_of(engine.stats.request_stats(down.listener, service, method))
        if len(cache) < 10000:  # beyond, ProxyStats pools them anyway
            cache[key] = stats_id
    _U64.pack_into(out, o + 8, engine.table.add(down, sid, up, deadline, now, stats_id, None))


def relay_requests(engine: Engine, down: Link, scanner: Any, n: int, mv: memoryview, now: float) -> None:
    """Forward the ``n`` scanned frames that came from a downstream link."""
    if down.reject or engine.drain_mode is not None:
        for i in range(n):
            engine.slow_request(down, scanner, i, mv, now)
        return
    inbound = down.listener == "inbound"
    high = engine.high_watermark
    stamp_len = 0 if inbound else len(engine.stamp)
    max_size = engine.max_frame_size - stamp_len
    for i in range(n):
        off, size, ftype, _flags, _sid, _timeout, route_id, _status = scanner.frame(i)
        if ftype != 1 or (stamp_len and (size > max_size or (mv[off + 18] << 8 | mv[off + 19]) + stamp_len > 0xFFFF)):
            # not a request, or too big to carry the caller stamp: the slow path says why
            engine.slow_request(down, scanner, i, mv, now)
            continue
        if inbound:
            cluster = engine._inbound_fast  # None while the inbound side is governed
            route_timeout = engine.default_timeout
            max_timeout = engine.inbound_max_timeout
        elif route_id >= 0:
            cluster = engine._route_clusters[route_id]
            route_timeout = engine._route_timeouts[route_id]
            max_timeout = engine._route_max_timeouts[route_id]
        else:
            cluster = None
        if cluster is None or engine.table.count >= engine.max_pending:
            engine.slow_request(down, scanner, i, mv, now)
            continue
        up = cluster.pick()
        if up is None or len(up.out) > high:  # no link, or a full one: the slow path says what to do
            engine.slow_request(down, scanner, i, mv, now)
            continue
        forward(engine, down, up, scanner, i, mv, now, route_timeout, max_timeout, False)


def relay_responses(engine: Engine, up: Link, scanner: Any, n: int, mv: memoryview, now: float) -> None:
    """Relay the ``n`` scanned frames that came from an upstream link."""
    table = engine.table
    for i in range(n):
        off, size, ftype, flags, sid, _timeout, _route, status = scanner.frame(i)
        if ftype != 2 or flags & 1:
            engine.slow_response(up, scanner, i, mv, now)
            continue
        slot = table.find(up, sid)
        if slot < 0:
            engine.stats.error("late_response")
            continue
        if table.gov[slot] is not None:  # a governed call: the chain in reverse
            engine.governed_response(up, table.take(slot), scanner, i, mv, now)
            continue
        down = table.down[slot]
        stats_id = table.sid[slot]
        t0 = table.t0[slot]
        down_sid = table.down_sid[slot]
        table.remove(slot)
        engine.rstats.record(stats_id, status, now - t0)
        if not down.closed:
            out = down.out
            o = len(out)
            out += mv[off : off + size]
            _U64.pack_into(out, o + 8, down_sid)
            dirty = engine.dirty
            if not dirty or dirty[-1] is not down:
                dirty.append(down)
            if down.draining and down.inflight == 0 and down.on_idle is not None:
                down.on_idle(down)
