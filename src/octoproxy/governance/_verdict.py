"""What a governance filter tells the pipeline: continue, answer now, or hold (sans-IO).

A filter in the kernel's declared pipeline (docs/governance.md, "Wiring") never
calls onward; it returns a :class:`Verdict`. Three kinds, as Envoy's
``FilterHeadersStatus``:

* ``CONTINUE``: pass the request to the next filter (or the balancer);
* ``ANSWER``: answer the caller now with ``status`` and ``reason`` (the proxy
  writes the response frame; the request goes nowhere);
* ``HOLD``: park the request in the held-request queue with ``reason`` until the
  filter's condition clears or the request's deadline passes.

Verdicts are immutable and the cores build every answer they can give once, at
configuration time, so the fast path returns a shared object and allocates
nothing. Compare kinds with ``verdict is CONTINUE`` or ``verdict.kind``.
"""

from __future__ import annotations

import enum

from ..protocol._protocol import Status

__all__ = ["Kind", "Verdict", "CONTINUE", "answer", "hold"]


class Kind(enum.IntEnum):
    """The three things a filter can ask of the pipeline."""

    CONTINUE = 0
    ANSWER = 1
    HOLD = 2


class Verdict:
    """An immutable filter verdict.

    Attributes:
        kind: continue, answer now, or hold.
        status: the status to answer with (``OK`` for continue and hold).
        reason: human-readable reason (the response's ``error`` field, or why
            the request is held); empty for continue.
    """

    __slots__ = ("kind", "status", "reason")

    kind: Kind
    status: Status
    reason: str

    def __init__(self, kind: Kind, status: Status, reason: str) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reason", reason)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Verdict is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verdict):
            return NotImplemented
        return self.kind == other.kind and self.status == other.status and self.reason == other.reason

    def __hash__(self) -> int:
        return hash((self.kind, self.status, self.reason))

    def __repr__(self) -> str:
        if self.kind is Kind.CONTINUE:
            return "CONTINUE"
        return f"Verdict({self.kind.name}, {self.status.name}, {self.reason!r})"

    @property
    def ok(self) -> bool:
        """True for ``CONTINUE``."""
        return self.kind is Kind.CONTINUE


#: The one continue verdict (compare with ``is``).
CONTINUE = Verdict(Kind.CONTINUE, Status.OK, "")


def answer(status: Status, reason: str) -> Verdict:
    """Build an "answer now" verdict (do it at configuration time, not per request).

    Args:
        status: the status the caller receives; never ``OK``.
        reason: the response's ``error`` text.

    Returns:
        A new verdict.

    Raises:
        ValueError: if ``status`` is ``OK``.
    """
    if status == Status.OK:
        raise ValueError("an answer verdict needs a failure status")
    return Verdict(Kind.ANSWER, Status(status), reason)


def hold(reason: str) -> Verdict:
    """Build a "hold" verdict: park the request until it can go on or times out.

    Args:
        reason: why the request waits (for logs and ``/stats``).

    Returns:
        A new verdict.
    """
    return Verdict(Kind.HOLD, Status.OK, reason)
