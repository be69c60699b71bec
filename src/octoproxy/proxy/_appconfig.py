"""The app's configuration in the proxy: delivered, persisted, served on ``GET /config``.

Theory of operation: the proxy subscribes to ``<proxy.service>.<proxy.environment>``
of type ``octoproxy.v1.AppConfig`` on its discovery stream; the control plane
sends the configuration already resolved for this instance (gradual release).
A delivery is checked first (:func:`octoproxy.discovery._appconfig.validate_delivered`):
a bad one is NACKed and changes nothing. Each accepted version is written to
``discovery.app_config_file`` (the subscriptions file's atomic writer, mode
0600, in a worker thread) and read back at start (the subscriptions file's
bounded, regular-files-only reader), so an app that starts while the control
plane is down gets the last known values. A configuration the control plane
says does not exist (it restarted without its state, or none was ever set)
leaves the last known values in place.

``GET /config`` answers at once; ``GET /config?watch=<version>&timeout=<s>``
waits until the version differs from ``<version>`` (or the timeout, at most
:data:`MAX_WATCH_TIMEOUT`), with at most :data:`MAX_WATCHERS` waiting at once
(beyond: 429).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import trio

from ..discovery import _appconfig as core
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._discovery import SubscriptionsFileError, read_state_file, run_blocking, write_atomic

__all__ = ["AppConfigState", "MAX_WATCHERS", "MAX_WATCH_TIMEOUT", "APP_CONFIG_FILE_MAX"]

log = logging.getLogger("octoproxy.appconfig")

#: long-poll watchers waiting at once (each holds an admin connection)
MAX_WATCHERS = 64
#: the longest ``timeout`` of a watch, seconds
MAX_WATCH_TIMEOUT = 60.0
#: the persisted file is refused past this size (the largest configuration, JSON-escaped, fits)
APP_CONFIG_FILE_MAX = 8 * core.MAX_TOTAL_BYTES


class AppConfigState:
    """The configuration this proxy serves to its app.

    Args:
        service: ``proxy.service``.
        environment: ``proxy.environment``.
        path: the persisted file.
    """

    def __init__(self, service: str, environment: str, path: Path) -> None:
        self.service = service
        self.environment = environment
        self.name = core.resource_name(service, environment)
        self.path = path
        self.version = ""
        self.values: dict[str, str] = {}
        #: where the values come from: "none", "file" (persisted) or "control-plane"
        self.source = "none"
        self.watchers = 0
        self._changed = trio.Event()
        self._save_lock = trio.Lock()
        self._pending: pb.AppConfig | None = None

    def answer(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "environment": self.environment,
            "version": self.version,
            "values": dict(self.values),
            "source": self.source,
        }

    def _set(self, version: str, values: dict[str, str], source: str) -> None:
        changed = version != self.version or values != self.values
        self.version, self.values, self.source = version, values, source
        if changed:
            self._changed.set()
            self._changed = trio.Event()

    # ------------------------------------------------------------ from the control plane
    def validate(self, name: str, msg: pb.AppConfig) -> None:
        """NACK a delivery that is not ours or not valid (raises)."""
        if name != self.name:
            raise core.AppConfigError(f"not subscribed to configuration {name!r}")
        core.validate_delivered(name, msg)

    def delivered(self, msg: pb.AppConfig | None, nursery: trio.Nursery) -> None:
        """Apply an accepted delivery (``None``: the control plane has none: keep what we have)."""
        if msg is None:
            if self.version:
                log.warning("the control plane has no configuration %s: keeping version %s", self.name, self.version)
            return
        self._set(msg.version, dict(msg.values), "control-plane")
        log.info("configuration %s version %s (%d keys)", self.name, msg.version, len(msg.values))
        self._pending = msg
        nursery.start_soon(self._save)

    async def _save(self) -> None:
        async with self._save_lock:  # coalesced: the last delivery wins
            msg, self._pending = self._pending, None
            if msg is None:
                return
            data = json.dumps(
                {"service": msg.service, "environment": msg.environment, "version": msg.version, "values": dict(msg.values)},
                sort_keys=True,
            ).encode()
            try:
                await run_blocking(write_atomic, self.path, data)
            except OSError as exc:
                log.error("cannot persist the app's configuration to %s: %s", self.path, exc)

    # ------------------------------------------------------------ from the file
    async def restore(self) -> None:
        """Serve the persisted configuration until the control plane sends one.

        A file that cannot be used is logged in one line and ignored.
        """
        try:
            data = await run_blocking(read_state_file, self.path, APP_CONFIG_FILE_MAX)
            if data is None:
                return
            version, values = self.check_file(data)
        except (SubscriptionsFileError, core.AppConfigError) as exc:
            log.error("app configuration file ignored: %s: %s", self.path, exc)
            return
        if self.source == "none":
            self._set(version, values, "file")
            log.info("serving configuration %s version %s from %s until the control plane answers", self.name, version, self.path)

    def check_file(self, data: Any) -> tuple[str, dict[str, str]]:
        """The (version, values) of a decoded file, checked like a delivery.

        Raises:
            AppConfigError: not ours, or not valid.
        """
        if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
            raise core.AppConfigError('expected {"service", "environment", "version", "values": {...}}')
        if data.get("service") != self.service or data.get("environment") != self.environment:
            raise core.AppConfigError(f"holds the configuration of {str(data.get('service'))[:80]!r}, not {self.name!r}")
        version = data.get("version")
        if not isinstance(version, str) or not version.isdigit() or len(version) > 20:
            raise core.AppConfigError(f"invalid version {str(version)[:40]!r}")
        return version, core.check_values(data["values"])

    # ------------------------------------------------------------ watch
    async def wait_changed(self, since: str, timeout: float) -> bool:
        """Wait until the version differs from ``since`` or ``timeout`` passes. False: too many watchers."""
        if self.version != since:
            return True
        if self.watchers >= MAX_WATCHERS:
            return False
        self.watchers += 1
        try:
            with trio.move_on_after(timeout):
                while self.version == since:
                    await self._changed.wait()
        finally:
            self.watchers -= 1
        return True


def parse_watch(query: dict[str, str]) -> tuple[str | None, float]:
    """``(watch version or None, timeout)`` from the query of ``GET /config``.

    Raises:
        ValueError: bad values.
    """
    watch = query.get("watch")
    if watch is not None and (len(watch) > 20 or (watch and not watch.isdigit())):
        raise ValueError("watch: expected a version (digits) or empty")
    timeout = float(query.get("timeout", "30"))
    if not (0 <= timeout <= MAX_WATCH_TIMEOUT) or math.isnan(timeout):
        raise ValueError(f"timeout: expected 0..{MAX_WATCH_TIMEOUT} seconds")
    return watch, timeout
