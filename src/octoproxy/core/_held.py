"""The held-request queue: requests that wait before they can be routed. Sans-IO.

A request the engine cannot route *yet* waits here, under a reason and a key:

``connecting`` (key: the :class:`~octoproxy.core._kernel.Cluster`)
    it found no connection of its cluster while one is being (re)established
    (a GOAWAY replaced one, the proxy just started, a governance filter said
    HOLD); released when a connection comes up or an attempt fails.
``discovery`` (key: the service name)
    it named a service the proxy has no route for, and the shell subscribes
    to it on demand; released when the subscription ends.

Each entry keeps the downstream link, the raw frame, when it was first held
and its deadline, plus an opaque ``unit`` (a circuit breaker's PENDING unit a
governed request took; the engine gives it back when the entry leaves).

The queue is bounded per key and in total. Appending is O(1); releasing a key
costs its entries; expiry looks at the head of each key's queue and pops the
expired ones (O(1) each): entries expire in FIFO order per key, so an entry
whose deadline is earlier than one before it (rare: a route changed between
two replays) leaves together with that one, never after it.
The queue decides nothing about the requests: the engine answers or replays
what it hands back. No I/O, no clock: time comes in as an argument.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any

__all__ = ["CONNECTING", "DISCOVERY", "Held", "HeldQueue", "MAX_HELD", "MAX_PER_KEY"]

#: waiting for a connection of a cluster (key: the cluster)
CONNECTING = "connecting"
#: waiting for a lazy discovery subscription (key: the service name)
DISCOVERY = "discovery"
#: requests held per key (per cluster, per service)
MAX_PER_KEY = 10000
#: requests held in total (the Engine's ``max_held``)
MAX_HELD = 65536


class Held:
    """One held request."""

    __slots__ = ("reason", "key", "down", "raw", "since", "deadline", "unit")

    def __init__(self, reason: str, key: Any, down: Any, raw: bytes, since: float, deadline: float, unit: Any = None) -> None:
        self.reason = reason
        #: the cluster (``connecting``) or the service name (``discovery``)
        self.key = key
        #: the downstream link it came from (the engine's ``Link``)
        self.down = down
        #: the whole frame, as it arrived
        self.raw = raw
        #: when it was first held (a request held again after a replay keeps it)
        self.since = since
        #: when it is answered if still held
        self.deadline = deadline
        #: what it holds while held (a breaker's PENDING unit), given back when it leaves
        self.unit = unit

    def __repr__(self) -> str:
        return f"<Held {self.reason} {self.key!r} since={self.since} deadline={self.deadline}>"


class HeldQueue:
    """Held requests by (reason, key), each key's in arrival order.

    Args:
        max_per_key: requests held under one (reason, key) at most.
        max_total: requests held in all at most.
    """

    __slots__ = ("max_per_key", "max_total", "_queues", "_total")

    def __init__(self, max_per_key: int = MAX_PER_KEY, max_total: int = MAX_HELD) -> None:
        if max_per_key < 1 or max_total < 1:
            raise ValueError("held-request limits must be at least 1")
        self.max_per_key = max_per_key
        self.max_total = max_total
        #: (reason, key) -> its entries, oldest first; no empty queue is kept
        self._queues: dict[tuple[str, Hashable], deque[Held]] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def count(self, reason: str, key: Hashable) -> int:
        """Requests held under (reason, key)."""
        q = self._queues.get((reason, key))
        return 0 if q is None else len(q)

    def has_room(self, reason: str, key: Hashable) -> bool:
        """Whether one more request may be held under (reason, key)."""
        if self._total >= self.max_total:
            return False
        q = self._queues.get((reason, key))
        return q is None or len(q) < self.max_per_key

    def hold(self, reason: str, key: Hashable, down: Any, raw: bytes, since: float, deadline: float, unit: Any = None) -> Held | None:
        """Append a request under (reason, key); None when full (per key or in total): nothing was held."""
        if self._total >= self.max_total:
            return None
        k = (reason, key)
        q = self._queues.get(k)
        if q is None:
            q = self._queues[k] = deque()
        elif len(q) >= self.max_per_key:
            return None
        entry = Held(reason, key, down, raw, since, deadline, unit)
        q.append(entry)
        self._total += 1
        return entry

    def release(self, reason: str, key: Hashable) -> list[Held]:
        """Take every request held under (reason, key), oldest first."""
        q = self._queues.pop((reason, key), None)
        if q is None:
            return []
        self._total -= len(q)
        return list(q)

    def expire(self, now: float) -> list[Held]:
        """Take the requests whose deadline is before ``now``: from the head of each key's queue."""
        if not self._total:
            return []
        out: list[Held] = []
        emptied = []
        for k, q in self._queues.items():
            while q and q[0].deadline < now:
                out.append(q.popleft())
            if not q:
                emptied.append(k)
        for k in emptied:
            del self._queues[k]
        self._total -= len(out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline at the head of a key's queue (when :meth:`expire` next has work), or None."""
        heads = [q[0].deadline for q in self._queues.values()]
        return min(heads) if heads else None

    def abort(self) -> list[Held]:
        """Take every request held, key by key in the order the keys were first used."""
        out = [entry for q in self._queues.values() for entry in q]
        self._queues.clear()
        self._total = 0
        return out

    def keys(self, reason: str) -> list[Hashable]:
        """The keys with requests held under ``reason``."""
        return [key for r, key in self._queues if r == reason]

    def entries(self, reason: str, key: Hashable) -> tuple[Held, ...]:
        """The requests held under (reason, key), oldest first (a copy: for inspection)."""
        q = self._queues.get((reason, key))
        return () if q is None else tuple(q)

    def __iter__(self) -> Iterator[Held]:
        for q in self._queues.values():
            yield from q

    def summary(self) -> dict[str, dict[str, int]]:
        """reason -> key's name -> requests held (what the admin endpoints show)."""
        out: dict[str, dict[str, int]] = {}
        for (reason, key), q in self._queues.items():
            name = key if isinstance(key, str) else getattr(key, "name", repr(key))
            by_key = out.setdefault(reason, {})
            by_key[name] = by_key.get(name, 0) + len(q)
        return out
