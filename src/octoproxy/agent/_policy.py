"""The agent's supervision policy, as data (sans-IO: no Trio, no clock reads).

Theory of operation: one proxy process is supervised at a time (two during an
upgrade: the serving "old" one and the hot-restarted "candidate"). The shell
feeds :class:`Policy` what happened (an :class:`Event` and the current time)
and gets back a :class:`Decision`: the new :class:`State`, the
:class:`Action` s to carry out, and, through :attr:`Policy.deadline`, when to
feed :attr:`Event.TIMER` next. The policy never acts and never sleeps.

Every move is an entry of :data:`TRANSITIONS` ``[state][event]``: a tuple of
:class:`Edge` alternatives, the first whose :class:`Guard` holds wins. An
event with no entry for the current state is a bug in the shell and raises
:class:`PolicyError` (:meth:`Policy.accepts` asks first, for events that come
from outside, such as an upgrade request). :func:`render_mermaid` draws the
same table for ``docs/agent.md``.

Counting rules:

* A move into BACKOFF or CRASH_LOOP is a *failure*. Failures are timed; the
  ones within ``crash_loop_window`` seconds (this one included) drive both the
  back-off (``backoff_initial * 2 ** (n - 1)``, capped at ``backoff_max``) and
  the crash-loop guard (``n >= crash_loop_limit``). Failures spread out
  therefore keep restarting with a short delay; a burst stops the agent.
* Liveness failures count while RUNNING or UNHEALTHY; one success resets the
  count, and ``failure_threshold`` in a row restarts the proxy.
* Each state sets its own deadline when entered: STARTING ``start_timeout``,
  UPGRADING ``upgrade_timeout``, BACKOFF the back-off delay; the others none.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from ..protocol._errors import OctoproxyError

__all__ = [
    "State", "Event", "Action", "Guard", "Edge", "Decision", "PolicyConfig", "PolicyError", "Policy",
    "TRANSITIONS", "INITIAL_STATE", "backoff_delay", "render_mermaid",
]  # fmt: skip


class PolicyError(OctoproxyError):
    """An event arrived in a state that has no transition for it."""


class State(enum.Enum):
    """Where the supervised proxy is (values are what ``GET /status`` shows)."""

    STARTING = "starting"  # spawned; waiting for its ready line and /ready 200
    RUNNING = "running"  # ready; liveness checks pass
    UNHEALTHY = "unhealthy"  # ready, but the last liveness check(s) failed
    RESTARTING = "restarting"  # being stopped (SIGTERM, then SIGKILL) to restart it
    UPGRADING = "upgrading"  # a hot-restarted candidate is getting ready
    BACKOFF = "backoff"  # no process; waiting before the next start
    CRASH_LOOP = "crash_loop"  # too many failures: no more restarts
    STOPPED = "stopped"  # the agent is shutting down

    @property
    def terminal(self) -> bool:
        """True for STOPPED, the one state with no way out."""
        return self is State.STOPPED


class Event(enum.Enum):
    """What the shell reports."""

    STARTED = "started"  # a process (proxy or candidate) was spawned
    READY = "ready"  # the proxy printed its ready line and /ready answered 200
    HEALTH_OK = "health_ok"  # GET /healthz answered 200
    HEALTH_FAILED = "health_failed"  # ... did not, or not in time
    EXITED = "exited"  # the supervised proxy exited (or could not be spawned)
    UPGRADE_REQUESTED = "upgrade_requested"
    UPGRADE_READY = "upgrade_ready"  # the candidate is ready
    UPGRADE_FAILED = "upgrade_failed"  # the candidate exited or could not be spawned
    TIMER = "timer"  # :attr:`Policy.deadline` passed
    STOP = "stop"  # the agent was told to exit (SIGTERM, SIGINT)


class Action(enum.Enum):
    """What the shell must do, in order."""

    SPAWN = "spawn"  # start the proxy
    TERMINATE = "terminate"  # SIGTERM the proxy, SIGKILL it after stop_grace
    SPAWN_UPGRADE = "spawn_upgrade"  # start the candidate with --hot-restart
    COMMIT_UPGRADE = "commit_upgrade"  # the candidate becomes the proxy; reap the old one
    ABORT_UPGRADE = "abort_upgrade"  # kill the candidate; the old one keeps serving


class Guard(enum.Enum):
    """Conditions an :class:`Edge` may require (values label the diagram)."""

    ALWAYS = ""
    CRASH_LOOP = "crash loop"  # this failure makes crash_loop_limit within the window
    THRESHOLD = "threshold"  # this liveness failure makes failure_threshold in a row
    OLD_ALIVE = "old alive"  # during an upgrade, the old process has not exited


@dataclass(frozen=True)
class Edge:
    """One alternative of a transition."""

    target: State
    actions: tuple[Action, ...] = ()
    guard: Guard = Guard.ALWAYS
    outcome: str | None = None  # upgrade outcome this move records


_S, _E, _A, _G = State, Event, Action, Guard


def _failure(*actions: Action, outcome: str | None = None) -> tuple[Edge, ...]:
    """Into CRASH_LOOP if this failure completes the burst, else into BACKOFF."""
    return (
        Edge(_S.CRASH_LOOP, actions, _G.CRASH_LOOP, outcome),
        Edge(_S.BACKOFF, actions, outcome=outcome),
    )


def _health() -> Mapping[Event, tuple[Edge, ...]]:
    return {
        _E.HEALTH_OK: (Edge(_S.RUNNING),),
        _E.HEALTH_FAILED: (Edge(_S.RESTARTING, (_A.TERMINATE,), _G.THRESHOLD), Edge(_S.UNHEALTHY)),
        _E.EXITED: _failure(),
        _E.UPGRADE_REQUESTED: (Edge(_S.UPGRADING, (_A.SPAWN_UPGRADE,)),),
        _E.STOP: (Edge(_S.STOPPED, (_A.TERMINATE,)),),
    }


def _upgrade_over(outcome_ok: str = "rolled_back") -> tuple[Edge, ...]:
    return (
        Edge(_S.RUNNING, (_A.ABORT_UPGRADE,), _G.OLD_ALIVE, outcome_ok),
        *_failure(_A.ABORT_UPGRADE, outcome="failed"),
    )


INITIAL_STATE = State.STARTING

#: ``TRANSITIONS[state][event]``: the alternatives, first matching guard wins.
TRANSITIONS: Mapping[State, Mapping[Event, tuple[Edge, ...]]] = {
    _S.STARTING: {
        _E.STARTED: (Edge(_S.STARTING),),
        _E.READY: (Edge(_S.RUNNING),),
        _E.EXITED: _failure(),
        _E.TIMER: (Edge(_S.RESTARTING, (_A.TERMINATE,)),),  # not ready within start_timeout
        _E.STOP: (Edge(_S.STOPPED, (_A.TERMINATE,)),),
    },
    _S.RUNNING: _health(),
    _S.UNHEALTHY: _health(),
    _S.RESTARTING: {
        # reports already on their way when the stop began: ignored
        _E.STARTED: (Edge(_S.RESTARTING),),
        _E.READY: (Edge(_S.RESTARTING),),
        _E.HEALTH_OK: (Edge(_S.RESTARTING),),
        _E.HEALTH_FAILED: (Edge(_S.RESTARTING),),
        _E.EXITED: _failure(),
        _E.STOP: (Edge(_S.STOPPED, (_A.TERMINATE,)),),
    },
    _S.UPGRADING: {
        _E.STARTED: (Edge(_S.UPGRADING),),  # the candidate's pid is known
        # the old process's checks are not acted on mid-upgrade
        _E.HEALTH_OK: (Edge(_S.UPGRADING),),
        _E.HEALTH_FAILED: (Edge(_S.UPGRADING),),
        _E.EXITED: (Edge(_S.UPGRADING),),  # the old one left (handed over, or died)
        _E.UPGRADE_READY: (Edge(_S.RUNNING, (_A.COMMIT_UPGRADE,), outcome="succeeded"),),
        _E.UPGRADE_FAILED: _upgrade_over(),
        _E.TIMER: _upgrade_over(),  # not ready within upgrade_timeout
        _E.STOP: (Edge(_S.STOPPED, (_A.ABORT_UPGRADE, _A.TERMINATE), outcome="aborted"),),
    },
    _S.BACKOFF: {
        _E.TIMER: (Edge(_S.STARTING, (_A.SPAWN,)),),
        _E.STOP: (Edge(_S.STOPPED),),
    },
    _S.CRASH_LOOP: {
        _E.STOP: (Edge(_S.STOPPED),),
    },
    _S.STOPPED: {},
}


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """The delay before the next start after ``failures`` recent failures.

    Args:
        failures: failures within the crash-loop window, this one included (>= 1).
        initial: the delay after one failure.
        maximum: the cap.

    Returns:
        ``min(initial * 2 ** (failures - 1), maximum)``.

    Raises:
        ValueError: if ``failures < 1``.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    return min(initial * 2.0 ** min(failures - 1, 64), maximum)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The knobs of :class:`Policy` (seconds for times)."""

    failure_threshold: int = 3
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    crash_loop_limit: int = 5
    crash_loop_window: float = 60.0
    start_timeout: float = 15.0
    upgrade_timeout: float = 15.0


@dataclass(frozen=True)
class Decision:
    """What :meth:`Policy.handle` decided.

    Attributes:
        old: the state before the event.
        state: the state after it.
        event: the event handled.
        actions: what the shell must do now, in order.
        reason: why, in words (for logs and ``/status``).
        outcome: for the move that ends an upgrade: ``"succeeded"``,
            ``"rolled_back"`` (the old process still serves), ``"failed"`` (it
            does not either) or ``"aborted"``; else ``None``.
        delay: in BACKOFF, the wait before the next start.
    """

    old: State
    state: State
    event: Event
    actions: tuple[Action, ...]
    reason: str = ""
    outcome: str | None = None
    delay: float | None = None


class Policy:
    """The supervision state machine (see the module docstring).

    Attributes:
        state: the current :class:`State`.
        deadline: when to feed :attr:`Event.TIMER` (same clock as ``now``), or None.
        restarts: starts after the first one.
        generation: successful upgrades.
        health_failures: liveness failures in a row.
        crash_reason: why the agent stopped restarting (CRASH_LOOP), else "".
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.state = INITIAL_STATE
        self.deadline: float | None = None
        self.restarts = 0
        self.generation = 0
        self.health_failures = 0
        self.crash_reason = ""
        self._failures: deque[float] = deque()
        self._old_gone = False
        self._started = False

    def start(self, now: float) -> Decision:
        """Begin: spawn the proxy for the first time.

        Args:
            now: the current time.

        Returns:
            A decision to SPAWN, in STARTING.

        Raises:
            PolicyError: if called twice.
        """
        if self._started:
            raise PolicyError("Policy.start() called twice")
        self._started = True
        self.deadline = now + self.config.start_timeout
        return Decision(self.state, self.state, Event.STARTED, (Action.SPAWN,), "initial start")

    def accepts(self, event: Event) -> bool:
        """Whether the current state has a transition for ``event``."""
        return event in TRANSITIONS[self.state]

    def recent_failures(self, now: float) -> int:
        """Failures within ``crash_loop_window`` seconds before ``now``."""
        self._prune(now)
        return len(self._failures)

    def _prune(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.config.crash_loop_window:
            self._failures.popleft()

    def _holds(self, guard: Guard, now: float) -> bool:
        if guard is Guard.ALWAYS:
            return True
        if guard is Guard.CRASH_LOOP:
            return self.recent_failures(now) + 1 >= self.config.crash_loop_limit
        if guard is Guard.THRESHOLD:
            return self.health_failures >= self.config.failure_threshold
        return not self._old_gone  # OLD_ALIVE

    def handle(self, event: Event, now: float, *, code: int | None = None, reason: str = "") -> Decision:
        """Feed one event.

        Args:
            event: what happened.
            now: the current time (the clock of :attr:`deadline`).
            code: for EXITED, the exit status (negative: killed by that
                signal; None: could not be spawned).
            reason: details for the log and ``/status`` (e.g. why an upgrade failed).

        Returns:
            The :class:`Decision`.

        Raises:
            PolicyError: if the state has no transition for ``event``, or a
                TIMER comes with no deadline or before it.
        """
        old = self.state
        edges = TRANSITIONS[old].get(event)
        if edges is None:
            raise PolicyError(f"no transition from {old.name} on {event.value!r}")
        if event is Event.TIMER and (self.deadline is None or now < self.deadline):
            raise PolicyError(f"timer in {old.name} before its deadline ({self.deadline!r}, now {now!r})")
        if old in (State.RUNNING, State.UNHEALTHY):
            if event is Event.HEALTH_OK:
                self.health_failures = 0
            elif event is Event.HEALTH_FAILED:
                self.health_failures += 1
        if event is Event.EXITED and old is State.UPGRADING:
            self._old_gone = True
        edge = next(e for e in edges if self._holds(e.guard, now))
        reason = self._explain(old, event, edge, code, reason, now)
        delay = None
        if edge.target in (State.BACKOFF, State.CRASH_LOOP):
            self._failures.append(now)
            if edge.target is State.CRASH_LOOP:
                self.crash_reason = reason
            else:
                delay = backoff_delay(self.recent_failures(now), self.config.backoff_initial, self.config.backoff_max)
        if Action.SPAWN in edge.actions:
            self.restarts += 1
        if Action.COMMIT_UPGRADE in edge.actions:
            self.generation += 1
        self.state = edge.target
        if edge.target is not old:
            self._enter(edge.target, now, delay)
        return Decision(old, edge.target, event, edge.actions, reason, edge.outcome, delay)

    def _enter(self, state: State, now: float, delay: float | None) -> None:
        self.deadline = None
        if state is State.RUNNING:
            self.health_failures = 0
        elif state is State.STARTING:
            self.deadline = now + self.config.start_timeout
        elif state is State.UPGRADING:
            self._old_gone = False
            self.deadline = now + self.config.upgrade_timeout
        elif state is State.BACKOFF:
            assert delay is not None
            self.deadline = now + delay

    def _explain(self, old: State, event: Event, edge: Edge, code: int | None, reason: str, now: float) -> str:
        what = reason
        if event is Event.EXITED:
            what = "could not be started" if code is None else _exit_words(code)
            what = f"{what}: {reason}" if reason else what
        elif event is Event.TIMER and old is State.STARTING:
            what = f"not ready within start_timeout ({self.config.start_timeout}s)"
        elif event is Event.TIMER and old is State.UPGRADING:
            what = f"candidate not ready within upgrade_timeout ({self.config.upgrade_timeout}s)"
        elif edge.guard is Guard.THRESHOLD:
            what = f"{self.health_failures} liveness checks failed in a row" + (f" ({reason})" if reason else "")
        if edge.target is State.CRASH_LOOP:
            n = self.recent_failures(now) + 1
            return f"crash loop: {n} failures within {self.config.crash_loop_window}s (last: {what})"
        if edge.outcome == "failed":
            what += "; the old process had exited too"
        return what


def _exit_words(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _label(event: Event, edge: Edge) -> str:
    label = event.value
    if edge.guard is not Guard.ALWAYS:
        label += f" [{edge.guard.value}]"
    if edge.actions:
        label += " / " + ", ".join(a.value for a in edge.actions)
    return label


def render_mermaid() -> str:
    """Render :data:`TRANSITIONS` as a Mermaid state diagram.

    Moves between the same two states are merged onto one arrow, their labels
    joined with ``<br/>``; a label reads ``event [guard] / actions``.

    Returns:
        The diagram source (``stateDiagram-v2``), without the code fence.
    """
    arrows: dict[tuple[State, State], list[str]] = {}
    for state, row in TRANSITIONS.items():
        for event, edges in row.items():
            for edge in edges:
                arrows.setdefault((state, edge.target), []).append(_label(event, edge))
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL_STATE.name}: start / spawn"]
    for (src, dst), labels in arrows.items():
        lines.append(f"    {src.name} --> {dst.name}: {'<br/>'.join(labels)}")
    lines.append(f"    {State.STOPPED.name} --> [*]")
    return "\n".join(lines) + "\n"
