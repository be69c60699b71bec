"""The agent's Trio shell: runs proxy processes and does what the policy says.

Theory of operation: one task (:meth:`Agent._loop`) owns the
:class:`~octoproxy.agent._policy.Policy`. Everything that happens reaches it
as a message on one channel: a child process was spawned, printed its ready
line and answered ``/ready``, passed or failed a liveness check, exited; an
upgrade or a stop was requested. The loop also sleeps until the policy's
deadline and feeds TIMER. It carries out each decision's actions by starting
short tasks (spawn, terminate, kill, reap) in the agent's one nursery, so it
never blocks on a process itself.

Each child process is run by :class:`~octoproxy.agent._child.ChildRunner`
(``_child.py``), which reports what it sees as messages. Messages about a
child that is no longer the proxy or the candidate are stale and dropped (an
old process reaped after a hot restart, a killed candidate).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..common._admin import AdminAuth, serve_admin
from ..common._secretfile import load_or_create_secret
from ..protocol._errors import OctoproxyError
from ..common._metrics import Registry
from ._child import REAP_BOUND, ChildRunner, ProxyChild, kv
from ._config import AgentSettings, UpgradeSettings
from ._policy import Action, Decision, Event, Policy, State

__all__ = ["Agent", "UpgradeBusy", "UpgradeRequest", "UpgradeResult"]

log = logging.getLogger("octoproxy.agent")


class UpgradeBusy(OctoproxyError):
    """An upgrade is already in progress."""


@dataclass(frozen=True)
class UpgradeResult:
    """How one upgrade ended.

    Attributes:
        outcome: ``"succeeded"``, ``"rolled_back"`` (the old proxy still
            serves), ``"failed"`` (the old one had exited too: the agent
            restarts from scratch), ``"aborted"`` (the agent was stopped) or
            ``"rejected"`` (not started: the proxy was not running).
        reason: in words.
        time: wall-clock time (Unix seconds) of the end.
        duration: seconds from request to end.
        command, config: what was asked for.
        version: the ``[upgrade] versions`` name asked for, if any.
        pid: the supervised proxy's pid afterwards.
        generation: successful upgrades so far.
    """

    outcome: str
    reason: str
    time: float
    duration: float
    command: tuple[str, ...]
    config: str
    pid: int | None
    generation: int
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "reason": self.reason, "time": self.time, "duration": round(self.duration, 3),
            "command": list(self.command), "config": self.config, "version": self.version, "pid": self.pid,
            "generation": self.generation,
        }  # fmt: skip


@dataclass(eq=False)
class UpgradeRequest:
    """A pending upgrade; :attr:`done` is set once :attr:`result` is filled in."""

    command: tuple[str, ...]
    config: Path
    source: str
    started_at: float
    version: str | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: UpgradeResult | None = None


@dataclass
class _Msg:
    event: Event
    child: ProxyChild | None = None
    code: int | None = None
    reason: str = ""
    upgrade: UpgradeRequest | None = None


class Agent:
    """Supervises one proxy process (see the module docstring).

    Args:
        settings: the ``[agent]`` table.
        upgrade: the ``[upgrade]`` table: what ``POST /upgrade`` may ask for
            (default: nothing but the current command and config).
        on_ready: called once, with the agent's admin address and the proxy's
            pid, the first time the proxy is ready.
        handle_signals: install SIGTERM/SIGINT (stop) and SIGHUP (upgrade)
            handlers; needs the main thread.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        upgrade: UpgradeSettings | None = None,
        on_ready: Callable[[str, int], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.upgrade_settings = upgrade if upgrade is not None else UpgradeSettings()
        self.policy = Policy(settings.policy())
        self.command: tuple[str, ...] = settings.command
        self.config: Path = settings.proxy_config
        self.current: ProxyChild | None = None
        self.candidate: ProxyChild | None = None
        self.admin_address: str | None = None
        self.last_upgrade: UpgradeResult | None = None
        self.last_exit: dict[str, Any] | None = None
        self._on_ready = on_ready
        self._handle_signals = handle_signals
        self._upgrade: UpgradeRequest | None = None
        self._children: set[ProxyChild] = set()
        self._send, self._inbox = trio.open_memory_channel[_Msg](math.inf)
        self._nursery: trio.Nursery | None = None
        self.registry = Registry()
        self._restarts = self.registry.counter("agent_restarts_total", "Proxy restarts made by the agent.")
        self._upgrades = self.registry.counter("agent_upgrades_total", "Upgrades by outcome.", ["outcome"])
        self._checks = self.registry.counter("agent_health_checks_total", "Liveness checks by result.", ["result"])
        self.registry.gauge_func("agent_proxy_up", "1 while the supervised proxy is ready and serving.", self._up)
        self.registry.gauge_func("agent_generation", "Successful upgrades so far.", lambda: float(self.policy.generation))
        self._runner = ChildRunner(
            self._report,
            lambda ok: self._checks.labels("ok" if ok else "failed").inc(),
            health_interval=settings.health_interval,
            health_timeout=settings.health_timeout,
            log_file=settings.log_file,
            proxy_token_file=settings.proxy_token_file,
        )

    # ------------------------------------------------------------ public

    @property
    def upgrading(self) -> bool:
        return self._upgrade is not None

    def _up(self) -> float:
        alive = self.current is not None and self.current.alive
        return float(alive and self.policy.state in (State.RUNNING, State.UNHEALTHY, State.UPGRADING))

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> int:
        """Serve the admin API, run the proxy, and return once stopped.

        Args:
            task_status: receives the agent's admin address once it listens.

        Returns:
            The agent's exit status: 0, or 1 if it had stopped restarting
            because of a crash loop.

        Raises:
            OSError: if the admin address cannot be bound.
            SecretFileError: if ``token_file`` is unsafe or cannot be created.
        """
        from ._api import ADMIN_PUBLIC, admin_routes

        token_file = self.settings.token_file
        created = False
        if token_file is None:  # built in code without a file: a token nobody knows (peers of our uid on a UDS only)
            token = secrets.token_urlsafe(32).encode()
        else:
            token, created = load_or_create_secret(token_file)
        auth = AdminAuth(token, ADMIN_PUBLIC)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.admin_address = await nursery.start(
                functools.partial(serve_admin, self.settings.admin, admin_routes(self), auth=auth)
            )
            if token_file is not None and created:  # said once we listen: a failed start says one line
                log.info(kv("admin_token_created", path=token_file))
            log.info(kv("agent_listening", admin=self.admin_address, pid=os.getpid()))
            if self._handle_signals:
                await nursery.start(self._watch_signals)
            task_status.started(self.admin_address)
            self._apply(self.policy.start(trio.current_time()))
            await self._loop()
            await self._stop_children()
            nursery.cancel_scope.cancel()
        log.info(kv("agent_stopped", crash_loop=bool(self.policy.crash_reason)))
        return 1 if self.policy.crash_reason else 0

    def request_stop(self) -> None:
        """Stop the proxy (SIGTERM) and make :meth:`run` return."""
        self._post(_Msg(Event.STOP))

    def request_upgrade(
        self,
        command: tuple[str, ...] | None = None,
        config: Path | None = None,
        *,
        source: str = "api",
        version: str | None = None,
    ) -> UpgradeRequest:
        """Ask for a hot-restart upgrade; await ``.done`` on the result.

        The caller has checked ``command`` and ``config`` against the agent's
        own configuration (``POST /upgrade`` does, with
        :func:`~octoproxy.agent._api.resolve_upgrade`): this runs what it is given.

        Args:
            command: the new command (default: the current one).
            config: the new proxy config file (default: the current one,
                which the new process reads afresh).
            source: who asked, for the log.
            version: the ``[upgrade] versions`` name of ``command``, for the record.

        Returns:
            The pending request.

        Raises:
            UpgradeBusy: if an upgrade is already in progress.
        """
        if self._upgrade is not None:
            raise UpgradeBusy("an upgrade is already in progress")
        req = UpgradeRequest(command or self.command, config or self.config, source, trio.current_time(), version)
        self._upgrade = req
        log.info(kv("upgrade_requested", source=source, version=version or "-", command=req.command, config=req.config))
        self._post(_Msg(Event.UPGRADE_REQUESTED, upgrade=req))
        return req

    def log_refused_upgrade(self, reason: str) -> None:
        """Log one ``POST /upgrade`` refused for asking what the configuration does not allow."""
        log.warning(kv("upgrade_refused", reason=reason))

    def status(self) -> dict[str, Any]:
        """The body of ``GET /status``."""
        cur = self.current
        cand = self.candidate
        return {
            "state": self.policy.state.value,
            "pid": cur.pid if cur is not None and cur.alive else None,
            "command": list(self.command),
            "config": str(self.config),
            "version": cur.version if cur is not None else None,
            "proxy_admin": cur.addresses.get("admin") if cur is not None else None,
            "ready": bool(cur is not None and cur.alive and cur.ready),
            "generation": self.policy.generation,
            "restarts": self.policy.restarts,
            "health_failures": self.policy.health_failures,
            "upgrading": self._upgrade is not None,
            "candidate_pid": cand.pid if cand is not None else None,
            "last_upgrade": self.last_upgrade.to_json() if self.last_upgrade is not None else None,
            "last_exit": self.last_exit,
            "crash_loop_reason": self.policy.crash_reason or None,
            "agent": {"pid": os.getpid(), "admin": self.admin_address},
        }

    # ------------------------------------------------------------ the loop

    def _post(self, msg: _Msg) -> None:
        self._send.send_nowait(msg)  # unbounded: children never wait on the loop

    def _report(self, event: Event, child: ProxyChild, code: int | None, reason: str) -> None:
        if event is Event.EXITED:
            self._children.discard(child)
        self._post(_Msg(event, child, code, reason))

    async def _watch_signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    try:
                        self.request_upgrade(source="SIGHUP")
                    except UpgradeBusy:
                        log.warning(kv("upgrade_ignored", source=name, reason="an upgrade is already in progress"))
                else:
                    log.info(kv("stop_requested", signal=name))
                    self.request_stop()

    async def _loop(self) -> None:
        while not self.policy.state.terminal:
            deadline = self.policy.deadline
            msg: _Msg | None = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                msg = await self._inbox.receive()
            if msg is None:
                self._feed(Event.TIMER)
            else:
                self._dispatch(msg)

    def _dispatch(self, msg: _Msg) -> None:
        ev, child = msg.event, msg.child
        if ev is Event.UPGRADE_REQUESTED:
            if msg.upgrade is None or msg.upgrade is not self._upgrade:
                return  # already answered
            if self.policy.accepts(ev):
                self._feed(ev, reason=f"requested by {msg.upgrade.source}")
            else:
                self._finish_upgrade("rejected", f"the proxy is {self.policy.state.value}: cannot upgrade now")
            return
        if ev is Event.STOP:
            if self.policy.accepts(ev):
                self._feed(ev, reason="agent stopping")
            return
        if child is None:
            return
        if ev is Event.EXITED and child.process is not None:
            unexpected = child is self.current and not child.stop_requested
            log.log(logging.WARNING if unexpected else logging.INFO, kv("exited", pid=child.pid, code=msg.code))
        if child is self.current:
            if ev is Event.EXITED:
                self.last_exit = {"pid": child.pid, "code": msg.code, "time": time.time(), "reason": msg.reason or None}
            self._feed(ev, code=msg.code, reason=msg.reason)
        elif child is self.candidate:
            if ev is Event.READY:
                self._feed(Event.UPGRADE_READY, reason=f"candidate pid {child.pid} ready")
            elif ev is Event.EXITED:
                what = "could not be started" if msg.code is None else f"exited with code {msg.code}"
                why = f"candidate {what} before it was ready" + (f": {msg.reason}" if msg.reason else "")
                self._feed(Event.UPGRADE_FAILED, reason=why)
            else:
                self._feed(ev)
        elif ev is Event.EXITED:
            log.info(kv("reaped", pid=child.pid, code=msg.code))

    def _feed(self, event: Event, *, code: int | None = None, reason: str = "") -> None:
        decision = self.policy.handle(event, trio.current_time(), code=code, reason=reason)
        if decision.state is not decision.old or decision.actions:
            fields: dict[str, object] = {"from": decision.old.value, "to": decision.state.value, "on": event.value}
            if decision.actions:
                fields["actions"] = ",".join(a.value for a in decision.actions)
            if decision.delay is not None:
                fields["delay"] = round(decision.delay, 3)
            level = logging.WARNING if decision.state in (State.BACKOFF, State.RESTARTING) else logging.INFO
            log.log(level, kv("transition", **fields, reason=decision.reason))
        self._apply(decision)

    # ------------------------------------------------------------ actions

    def _apply(self, d: Decision) -> None:
        nursery = self._nursery
        assert nursery is not None
        grace = self.settings.stop_grace
        for action in d.actions:
            if action is Action.SPAWN:
                self.current = self._start_child(self.command, self.config, hot_restart=False)
                if self.policy.restarts:
                    self._restarts.inc()
            elif action is Action.TERMINATE and self.current is not None:
                self._stop(self.current, signal.SIGTERM, grace)
            elif action is Action.SPAWN_UPGRADE:
                assert self._upgrade is not None
                self.candidate = self._start_child(self._upgrade.command, self._upgrade.config, hot_restart=True)
            elif action is Action.COMMIT_UPGRADE:
                old, self.current, self.candidate = self.current, self.candidate, None
                assert self.current is not None
                self.command, self.config = self.current.command, self.current.config
                if old is not None:
                    old.health_scope.cancel()
                    nursery.start_soon(self._retire, old)
            elif action is Action.ABORT_UPGRADE and self.candidate is not None:
                self._stop(self.candidate, signal.SIGKILL, 0.0)
                self.candidate = None
        if d.outcome is not None:
            self._finish_upgrade(d.outcome, d.reason)
        cur = self.current
        if d.state in (State.RUNNING, State.UNHEALTHY) and cur is not None and not cur.supervise.is_set():
            cur.supervise.set()
            nursery.start_soon(self._runner.fetch_version, cur)
            log.info(kv("proxy_ready", **{**cur.addresses, "pid": cur.pid}))
            if self._on_ready is not None and self.admin_address is not None and cur.pid is not None:
                self._on_ready(self.admin_address, cur.pid)
                self._on_ready = None
        if d.state is State.CRASH_LOOP:
            log.critical(kv("crash_loop", reason=d.reason))
            print(f"octoproxy agent: CRASH LOOP, not restarting the proxy any more: {d.reason}", file=sys.stderr, flush=True)

    def _finish_upgrade(self, outcome: str, reason: str) -> None:
        req, self._upgrade = self._upgrade, None
        if req is None:
            return
        cur = self.current
        result = UpgradeResult(
            outcome, reason or outcome, time.time(), trio.current_time() - req.started_at, req.command,
            str(req.config), cur.pid if cur is not None and cur.alive else None, self.policy.generation, req.version,
        )  # fmt: skip
        if outcome != "rejected":
            self.last_upgrade = result
            self._upgrades.labels(outcome).inc()
        level = logging.INFO if outcome == "succeeded" else logging.WARNING
        log.log(level, kv("upgrade_done", outcome=outcome, reason=result.reason, pid=result.pid, generation=result.generation))
        req.result = result
        req.done.set()

    def _start_child(self, command: tuple[str, ...], config: Path, *, hot_restart: bool) -> ProxyChild:
        assert self._nursery is not None
        child = ProxyChild(command, config, hot_restart)
        self._children.add(child)
        self._nursery.start_soon(self._runner.run, child)
        return child

    def _stop(self, child: ProxyChild, sig: signal.Signals, grace: float) -> None:
        assert self._nursery is not None
        child.health_scope.cancel()  # no more checks of a process on its way out
        if not child.stop_requested:  # once: a second SIGTERM would cut a drain short
            child.stop_requested = True
            self._nursery.start_soon(self._runner.signal, child, sig, grace)

    async def _retire(self, old: ProxyChild) -> None:
        """After a hot restart the old process drains and exits by itself; make sure it does."""
        with trio.move_on_after(self.settings.stop_grace):
            await old.exited.wait()
        if not old.exited.is_set() and not old.stop_requested:
            log.warning(kv("retire", pid=old.pid, reason=f"old proxy still running {self.settings.stop_grace}s after the upgrade"))
            old.stop_requested = True
            await self._runner.signal(old, signal.SIGTERM, self.settings.stop_grace)

    async def _stop_children(self) -> None:
        """On the way out: stop whatever still runs (the old one of an upgrade too)."""
        grace = self.settings.stop_grace
        for child in list(self._children):
            self._stop(child, signal.SIGTERM, grace)
        with trio.move_on_after(grace + REAP_BOUND):
            for child in list(self._children):
                await child.exited.wait()
