"""One supervised proxy process, from spawn to reaping (part of the agent's Trio shell).

Each :class:`ProxyChild` is run by one :meth:`ChildRunner.run` task with its
own nursery: the stdout reader (the ready line), the start-up probe
(``/ready`` until 200) and, once the agent adopts it (``supervise``), the
health loop. When the process exits, the task reports EXITED and its nursery
ends. The runner reports what happens through a callback and decides nothing.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from ..common._admin import http_request
from ..common._secretfile import SecretFileError, read_secret
from ._policy import Event

__all__ = ["ChildRunner", "ProxyChild", "Report", "kv", "parse_ready_line", "READY_PREFIX"]

log = logging.getLogger("octoproxy.agent")

READY_PREFIX = "octoproxy ready"
_READY_POLL = 0.05  # how often a starting proxy's /ready is asked
_SPAWN_BOUND = 30.0  # open_process runs in a thread; never wait on it for ever
REAP_BOUND = 5.0  # after SIGKILL
_PEER_ERRORS = (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError)


def kv(event: str, **fields: object) -> str:
    """Format one structured log line: ``event=NAME key=value ...``.

    Values with spaces, quotes or ``=`` (and lists) are JSON-quoted.
    """
    parts = [f"event={event}"]
    for k, v in fields.items():
        if isinstance(v, (list, tuple)):
            s = json.dumps([str(x) for x in v])
        else:
            s = str(v)
            if not s or any(c in s for c in ' "=\n\t'):
                s = json.dumps(s)
        parts.append(f"{k}={s}")
    return " ".join(parts)


def parse_ready_line(line: str) -> dict[str, str] | None:
    """Parse ``octoproxy ready admin=H:P outbound=unix:/p ...``.

    Args:
        line: one line of the proxy's stdout, without the newline.

    Returns:
        The ``key=value`` words as a dict, or None if it is not the ready line.
    """
    if not line.startswith(READY_PREFIX + " ") and line != READY_PREFIX:
        return None
    words = line[len(READY_PREFIX) :].split()
    return dict(w.split("=", 1) for w in words if "=" in w)


@dataclass(eq=False)
class ProxyChild:
    """One proxy process, from spawn to reaping."""

    command: tuple[str, ...]
    config: Path
    hot_restart: bool
    process: trio.Process | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None
    version: str | None = None
    ready: bool = False  # the last /ready answer was 200
    stop_requested: bool = False
    spawned: trio.Event = field(default_factory=trio.Event)  # spawn attempt over
    ready_line: trio.Event = field(default_factory=trio.Event)
    supervise: trio.Event = field(default_factory=trio.Event)  # the policy adopted it: health-check it
    exited: trio.Event = field(default_factory=trio.Event)
    health_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.exited.is_set()

    def argv(self) -> list[str]:
        return [*self.command, "-c", str(self.config), *(["--hot-restart"] if self.hot_restart else [])]


#: ``report(event, child, exit status, reason)``: STARTED, READY, HEALTH_OK/FAILED, EXITED
Report = Callable[[Event, ProxyChild, "int | None", str], None]


class ChildRunner:
    """Runs, probes and signals :class:`ProxyChild` processes.

    Args:
        report: called (synchronously) for every event about a child.
        on_check: called with the result of every liveness check.
        health_interval, health_timeout: as in the agent configuration.
        log_file: where the children's stderr is appended (None: inherited).
        proxy_token_file: the proxy's admin token file (None: the one its
            ready line names).
    """

    def __init__(
        self,
        report: Report,
        on_check: Callable[[bool], None],
        *,
        health_interval: float,
        health_timeout: float,
        log_file: Path | None,
        proxy_token_file: Path | None = None,
    ) -> None:
        self.proxy_token_file = proxy_token_file
        self._report = report
        self._on_check = on_check
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.log_file = log_file

    async def run(self, child: ProxyChild) -> None:
        """Spawn ``child``, watch it until it exits, report EXITED."""
        argv = child.argv()
        stderr: BinaryIO | None = None
        try:
            if self.log_file is not None:
                stderr = await trio.to_thread.run_sync(open, self.log_file, "ab")
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
            )
        except OSError as exc:
            log.error(kv("spawn_failed", argv=argv, error=exc))
            child.exited.set()
            self._report(Event.EXITED, child, None, str(exc))
            return
        finally:
            if stderr is not None:
                stderr.close()
            child.spawned.set()
        child.process = process
        log.info(kv("spawned", pid=process.pid, argv=argv))
        self._report(Event.STARTED, child, None, "")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout, child)
                nursery.start_soon(self._startup, child)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:  # we are being cancelled: leave no orphan
                    process.kill()
                    with trio.move_on_after(REAP_BOUND):
                        await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
            child.returncode = process.returncode
            child.exited.set()
        self._report(Event.EXITED, child, code, "")

    async def signal(self, child: ProxyChild, sig: signal.Signals, grace: float) -> None:
        """Send ``sig`` to ``child``; if it outlives ``grace``, SIGKILL it."""
        with trio.move_on_after(_SPAWN_BOUND):
            await child.spawned.wait()
        process = child.process
        if process is None or child.exited.is_set():
            return
        log.info(kv("signal", pid=process.pid, signal=sig.name))
        process.send_signal(sig)
        if sig is signal.SIGKILL:
            return
        with trio.move_on_after(grace):
            await child.exited.wait()
        if not child.exited.is_set():
            log.warning(kv("signal", pid=process.pid, signal="SIGKILL", reason=f"still running {grace}s after {sig.name}"))
            process.kill()

    async def fetch_version(self, child: ProxyChild) -> None:
        """Fill in ``child.version`` from its ``GET /config_dump``, if it says."""
        admin = child.addresses.get("admin")
        if admin is None:
            return
        token_file = self.proxy_token_file or child.addresses.get("admin_token_file")
        try:
            token = read_secret(token_file) if token_file else None
        except SecretFileError as exc:
            log.warning(kv("proxy_token_unreadable", pid=child.pid, error=exc))
            token = None
        try:
            status, _h, body = await http_request(admin, "GET", "/config_dump", timeout=self.health_timeout, token=token)
            data = json.loads(body) if status == 200 else None
        except _PEER_ERRORS:
            return
        if isinstance(data, dict) and isinstance(data.get("version"), str):
            child.version = data["version"]

    async def _read_stdout(self, child: ProxyChild) -> None:
        # No deadline: this reads for the child's whole life and ends with it.
        assert child.process is not None and child.process.stdout is not None
        stdout, buf = child.process.stdout, b""
        while data := await stdout.receive_some(65536):
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                words = parse_ready_line(line)
                if words is not None and not child.ready_line.is_set():
                    child.addresses = words
                    child.ready_line.set()
                elif line:
                    log.info(kv("proxy_stdout", pid=child.pid, line=line))
            if len(buf) > 65536:  # no newline in sight: not a line we care about
                buf = b""

    async def _probe(self, admin: str, path: str) -> int:
        try:
            status, _headers, _body = await http_request(admin, "GET", path, timeout=self.health_timeout)
        except _PEER_ERRORS:
            return 0
        return status

    async def _startup(self, child: ProxyChild) -> None:
        # The waits here are bounded by the policy: past start_timeout /
        # upgrade_timeout the process is killed, which ends this nursery.
        await child.ready_line.wait()
        admin = child.addresses.get("admin")
        if admin is None:
            log.error(kv("no_admin_address", pid=child.pid, reason="the ready line has no admin=; cannot check it"))
            return
        while await self._probe(admin, "/ready") != 200:
            await trio.sleep(_READY_POLL)
        child.ready = True
        self._report(Event.READY, child, None, "")
        await child.supervise.wait()
        with child.health_scope:
            await self._health_loop(child, admin)

    async def _health_loop(self, child: ProxyChild, admin: str) -> None:
        interval = self.health_interval
        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_at)
            status = await self._probe(admin, "/healthz")
            ok = status == 200
            self._on_check(ok)
            if not ok:
                log.warning(kv("health_failed", pid=child.pid, status=status or "no answer"))
            event = Event.HEALTH_OK if ok else Event.HEALTH_FAILED
            self._report(event, child, None, f"/healthz: {status or 'no answer'}")
            ready = await self._probe(admin, "/ready") == 200
            if ready != child.ready:
                log.info(kv("readiness", pid=child.pid, ready=ready))
            child.ready = ready
            next_at = max(next_at + interval, trio.current_time())
