"""Test helpers for users of octoproxy: a whole mesh inside one ``trio.run``.

:func:`open_mesh` starts a control plane (an :class:`~octoproxy.controlplane.EmbeddedStore`
behind a :class:`~octoproxy.controlplane.ControlPlaneServer`) and lets a test
add provider apps, each behind its own proxy, and caller proxies, all
in-process: proxies are :class:`~octoproxy.proxy._server.Proxy` objects,
provider apps are :func:`octoproxy.sdk.serve` tasks, and every byte still goes
through real sockets (Unix sockets in a temporary directory of the mesh's own,
TCP on 127.0.0.1 with ports picked by the kernel). Everything runs in one
nursery that the context manager owns; leaving the block, normally or on a
failed assertion, cancels it and removes the directory::

    import octoproxy.testing
    from octoproxy import sdk

    async def echo(request: sdk.Request) -> bytes:
        return request.body

    async def test_echo() -> None:
        async with octoproxy.testing.open_mesh() as mesh:
            provider = await mesh.add_provider("echo", echo)
            web = await mesh.add_caller("web")
            async with web.client(subscribe=["echo"]) as client:
                assert await client.call("echo", "m", b"x") == b"x"
            await mesh.hot_restart(web.proxy)  # the real hand-over, in-process
            await mesh.kill_proxy(provider.proxy)  # like SIGKILL

What a test can do to the mesh: add and remove providers
(:meth:`Mesh.add_provider`, :meth:`Mesh.remove_provider`), add callers
(:meth:`Mesh.add_caller`), stop a proxy gracefully (:meth:`Mesh.stop_proxy`,
like SIGTERM: it drains), kill it (:meth:`Mesh.kill_proxy`, like SIGKILL: its
tasks are cancelled and its sockets closed; its registration stays on the
control plane until the control plane revokes its closed session's lease),
start it again from scratch
(:meth:`Mesh.restart_proxy`), and hot-restart it (:meth:`Mesh.hot_restart`: a
new :class:`Proxy` generation connects to the running one's hot-restart
socket, receives its listening sockets over SCM_RIGHTS, warms up and takes
over while the old generation drains, exactly as ``octoproxy run
--hot-restart`` does).

Virtual time (pytest-trio's ``autojump_clock``)
-----------------------------------------------
The mesh works under :class:`trio.testing.MockClock` with
``autojump_threshold=0`` (the ``autojump_clock`` fixture), and timeouts then
cost no real time: a provider that sleeps 30 s behind a route timeout of 1 s
answers TIMEOUT at once, in 1 s of virtual time. This holds because
everything the mesh waits for is inside the Trio run: with the clock jumping
only when no task can run and no I/O is ready, and loopback and Unix socket
writes reaching the peer's receive buffer before ``send`` returns, a request
is never "in the kernel" when the clock jumps. Every deadline in the proxy,
the SDK and the control plane (route timeouts, leases, pings, drain time) is
read from the Trio clock, and the mesh's own addresses are numeric, so no
name is resolved in a thread.

What does not work under ``autojump_clock``, and why: anything that waits on
the world outside the Trio run. While such a wait is pending, every task is
blocked and no I/O is ready, so the clock jumps to the next deadline, again
and again (the proxies' timers wake every 50 ms of virtual time), and virtual
time races ahead of the real world: route timeouts, leases and ``fail_after``
guards fire although almost no real time passed. That covers a handler that
calls ``trio.to_thread.run_sync`` (a database driver, a file read in a thread),
a host name that must be resolved (``localhost`` in a config: use
``127.0.0.1``), a subprocess or a server outside the process, and
``EmbeddedStore`` snapshots (written in a thread; the mesh does not use one).
Use the real clock for those tests. Scheduling is also less deterministic
than in a pure in-memory test: when the host is busy the kernel may finish a
loopback TCP delivery a little later, and the clock then moves by a timer
tick (50 ms of virtual time) in between; assertions on exact virtual
durations should allow for that.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio

from . import sdk
from .proxy._config import ProxyConfig, parse_config
from .controlplane import ControlPlaneServer, EmbeddedStore
from .controlplane._auth import make_join_token
from .identity import DEFAULT_TRUST_DOMAIN, CertificateAuthority
from .proxy._handover import Channel
from .core._hot_restart import HotRestartError
from .proxy._main import complete_hand_over, take_over_proxy
from .proxy._server import Proxy

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Caller", "HotRestartError", "Mesh", "MeshProxy", "Provider", "Proxy", "open_mesh"]

#: Unix socket paths are limited to 108 bytes (107 and the NUL)
_MAX_UDS_PATH = 107


@dataclass(eq=False)
class _Task:
    """A task of the mesh that can be cancelled on its own (a proxy generation, an app)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)

    async def kill(self) -> None:
        self.scope.cancel()
        await self.finished.wait()


class MeshProxy:
    """One proxy of a :class:`Mesh`, across its hot restarts.

    Attributes:
        name: unique within the mesh; names its socket files.
        service: the local app's service name (``proxy.service``).
        config: the configuration of the current generation.
        proxy: the current generation (a new object after each hot restart).
        mesh: the mesh it belongs to.
    """

    def __init__(self, mesh: Mesh, name: str, service: str, raw: dict[str, Any], config: ProxyConfig) -> None:
        self.mesh = mesh
        self.name = name
        self.service = service
        self.config = config
        self._raw = raw
        self.proxy: Proxy = Proxy(config)
        self._run: _Task | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} generation={self.generation} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        """True while the current generation runs (not killed, stopped or drained)."""
        return self._run is not None and not self._run.finished.is_set()

    @property
    def generation(self) -> int:
        """Hot-restart generation of the current proxy (0: first)."""
        return self.proxy.generation

    @property
    def admin(self) -> str:
        """The admin API address (``host:port``), the same across hot restarts."""
        return self.proxy.addresses["admin"]

    @property
    def admin_token(self) -> str:
        """The admin bearer token, for endpoints that need it (``/config_dump``, ``/drain``, ...)."""
        return self.proxy.admin_token.decode()

    @property
    def outbound(self) -> Path:
        """The outbound Unix socket an app (the SDK) connects to."""
        return self.config.outbound.uds

    @asynccontextmanager
    async def client(
        self, subscribe: Iterable[str] = (), *, timeout: float = 5.0, connect_timeout: float = 5.0
    ) -> AsyncIterator[sdk.Client]:
        """An SDK client of this proxy, as an app next to it would have.

        Use as ``async with caller.client(subscribe=["echo"]) as client:``.

        Args:
            subscribe: services to subscribe to first (``sdk.subscribe`` on
                the admin API, as an app does on start), waiting until the
                proxy holds their endpoints.
            timeout: deadline of the subscription, in seconds.
            connect_timeout: deadline of each connection attempt of the client.

        Yields:
            A connected :class:`octoproxy.sdk.Client`, closed on exit.

        Raises:
            octoproxy.sdk.CallError: the subscription failed (TIMEOUT,
                UNAVAILABLE, or NO_ROUTE without discovery).
            OSError: the proxy's outbound socket did not accept the connection.
        """
        names = sorted(set(subscribe))
        if names:
            await sdk.subscribe(self.admin, names, timeout=timeout, retry_for=timeout)
        async with sdk.open_client(self.outbound, connect_timeout=connect_timeout) as client:
            yield client

    async def wait_endpoints(self, service: str, count: int = 1, *, timeout: float = 10.0) -> None:
        """Wait until this proxy can send ``service`` requests to exactly ``count`` endpoints.

        An endpoint counts once a connection to it is up and it takes new
        requests (healthy, weight > 0: not STOPPING or UNHEALTHY). With
        discovery, the proxy is subscribed to ``service`` first.

        Args:
            service: the service (the cluster of a static route, or a
                discovered service).
            count: the number of endpoints to wait for (0: none left).
            timeout: seconds to wait.

        Raises:
            trio.TooSlowError: not exactly ``count`` within ``timeout``.
        """
        proxy = self.proxy
        with trio.fail_after(timeout):
            if proxy.discovery is not None and service not in self.config.clusters:
                await proxy.discovery.subscribe([service], timeout=timeout)
            while self.endpoints(service) != count:
                await trio.sleep(0.01)

    def endpoints(self, service: str) -> int:
        """Endpoints of ``service`` (or of the cluster of that name) that take new requests now.

        Args:
            service: the cluster (service) name.

        Returns:
            How many of its endpoints have a connection up and are in rotation.
        """
        cluster = self.proxy.engine.clusters.get(service)
        if cluster is None:
            return 0
        return sum(1 for ep in cluster.endpoints if ep.healthy and ep.weight > 0 and cluster.links.get(ep.address))

    def metric(self, name_and_labels: str) -> float:
        """Sum of the ``/stats`` samples whose line starts with ``name_and_labels``.

        Args:
            name_and_labels: e.g. ``'octoproxy_requests_total{direction="outbound"'``
                or ``"octoproxy_hot_restart_generation"``.

        Returns:
            The sum (0.0 when nothing matches).
        """
        total = 0.0
        for line in self.proxy.stats.render().splitlines():
            if line.startswith(name_and_labels):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Provider(MeshProxy):
    """A provider app (an ``sdk.serve`` task) and the proxy in front of it.

    Attributes:
        handler: the app's request handler.
        app_path: the app's Unix socket (the proxy's ``inbound.app_uds``).
    """

    def __init__(self, mesh: Mesh, name: str, service: str, raw: dict[str, Any], config: ProxyConfig, handler: sdk.Handler) -> None:
        super().__init__(mesh, name, service, raw, config)
        self.handler = handler
        assert config.inbound is not None
        self.app_path = config.inbound.app_uds
        self._app: _Task | None = None

    @property
    def address(self) -> str:
        """The proxy's inbound ``host:port``: the endpoint address registered for the service."""
        return self.proxy.addresses["inbound"]

    @property
    def app_running(self) -> bool:
        """True while the provider app serves."""
        return self._app is not None and not self._app.finished.is_set()


class Caller(MeshProxy):
    """A proxy with discovery and no inbound side, for an app that only calls."""


class Mesh:
    """An in-process mesh; create it with :func:`open_mesh`.

    Attributes:
        directory: where every Unix socket of the mesh lives.
        store: the control plane's store (``store.view.services`` holds the
            registrations).
        control_plane: the control-plane server.
        control_plane_url: its discovery URL, as in ``discovery.control_plane``.
        ca: the control plane's certificate authority (it answers the
            proxies' ``CertificateRequest`` s; trust domain ``octoproxy.local``).
        operator_token: the control plane's operator token (for
            :class:`~octoproxy.controlplane.DiscoveryClient` s or admin calls
            a test makes as an operator).
        nodes: every proxy added so far, by name.

    Authentication is on, as in production: every proxy the mesh adds gets a
    join token of its service (:meth:`join_token_file`) in its
    ``discovery.join_token_file``.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        directory: Path,
        store: EmbeddedStore,
        control_plane: ControlPlaneServer,
        control_plane_url: str,
        *,
        lease_ttl: float,
        drain_time: float,
    ) -> None:
        self._nursery = nursery
        self.directory = directory
        self.store = store
        self.control_plane = control_plane
        self.control_plane_url = control_plane_url
        self.nodes: dict[str, MeshProxy] = {}
        self.operator_token = control_plane.operator_token or ""
        assert control_plane.ca is not None
        self.ca: CertificateAuthority = control_plane.ca
        self._lease_ttl = lease_ttl
        self._drain_time = drain_time
        self._tokens: dict[str, Path] = {}

    def join_token_file(self, service: str) -> Path:
        """A file holding a join token of ``service`` (made once per service, mode 0600).

        Raises:
            ValueError: if ``service`` is not a valid service name.
        """
        path = self._tokens.get(service)
        if path is None:
            token, record = make_join_token(service, time.time())
            self.store.view.set_token(record)  # the embedded store's view is the store
            path = self.directory / f"{service}.{record.id}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            self._tokens[service] = path
        return path

    # ------------------------------------------------------------ adding

    async def add_provider(
        self,
        service: str,
        handler: sdk.Handler,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        max_concurrency: int = 1024,
        timeout: float = 10.0,
    ) -> Provider:
        """Start a provider app serving ``service`` and a proxy in front of it.

        The proxy listens for peers on 127.0.0.1 (a free port) and registers
        the app with the control plane once the app answers; this returns
        after the registration is acknowledged, so callers find it at once.

        Args:
            service: the service name the app serves.
            handler: ``async def handler(request: sdk.Request) -> bytes``.
            name: unique name in the mesh (default: ``service``, then
                ``service-2``...); it names the socket files.
            config: overrides merged into the proxy's configuration (same
                shape as ``proxy.toml``: nested tables merge, other values
                replace, ``None`` removes a key or a section).
            max_concurrency: handlers the app runs at once.
            timeout: seconds to wait for the registration.

        Returns:
            The running :class:`Provider`.

        Raises:
            octoproxy.ConfigError: the resulting configuration is invalid.
            ValueError: ``name`` is taken, or a socket path is too long.
            OSError: a socket could not be bound.
            trio.TooSlowError: not registered within ``timeout``.
        """
        name = self._new_name(name or service)
        app_path = self.directory / f"{name}-app.sock"
        raw = self._base_config(name, service)
        raw["inbound"] = {"listen": "127.0.0.1:0", "app_uds": str(app_path)}
        raw = _merge(raw, config or {})
        cfg = self._parse(raw)
        node = Provider(self, name, service, raw, cfg, handler)
        node._app = _Task()
        assert cfg.inbound is not None
        await self._nursery.start(self._app_task, node._app, cfg.inbound.app_uds, handler, max_concurrency)
        self.nodes[name] = node
        try:
            await self._start(node, node.proxy)
            disc = cfg.discovery
            if disc is not None and disc.register and cfg.proxy.service:
                with trio.fail_after(timeout):
                    while node.proxy.discovery is not None and node.proxy.discovery.registered_address is None:
                        await trio.sleep(0.01)
        except BaseException:
            del self.nodes[name]
            with trio.CancelScope(shield=True):
                await self._kill_all(node)
            raise
        return node

    async def add_caller(
        self,
        service: str = "caller",
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> Caller:
        """Start a proxy with discovery for an app that calls other services.

        Returns once the proxy is ready (``GET /ready``: control plane
        reached, subscriptions restored).

        Args:
            service: the calling app's service name (stamped as the caller).
            name: unique name in the mesh (default: ``service``, then
                ``service-2``...); it names the socket files.
            config: overrides merged into the proxy's configuration (see
                :meth:`add_provider`), e.g. ``{"discovery": {"route_timeout": 1.0}}``
                or static ``routes`` and ``clusters``.
            timeout: seconds to wait for the proxy to be ready.

        Returns:
            The running :class:`Caller`.

        Raises:
            octoproxy.ConfigError: the resulting configuration is invalid.
            ValueError: ``name`` is taken, or a socket path is too long.
            OSError: a socket could not be bound.
            trio.TooSlowError: not ready within ``timeout``.
        """
        name = self._new_name(name or service)
        raw = _merge(self._base_config(name, service), config or {})
        cfg = self._parse(raw)
        node = Caller(self, name, service, raw, cfg)
        self.nodes[name] = node
        try:
            await self._start(node, node.proxy)
            with trio.fail_after(timeout):
                while not node.proxy.ready_state()["ready"]:
                    await trio.sleep(0.01)
        except BaseException:
            del self.nodes[name]
            with trio.CancelScope(shield=True):
                await self._kill_all(node)
            raise
        return node

    # ------------------------------------------------------------ taking away

    async def kill_proxy(self, target: Proxy | MeshProxy) -> None:
        """Stop a proxy abruptly, like SIGKILL.

        Its tasks are cancelled and its sockets closed: peers see their
        connections reset, calls in flight through it fail (UNAVAILABLE), and
        it neither drains nor deregisters: its endpoint stays on the control
        plane until the control plane revokes the lease of its closed session
        (``lease_grace``, 2 s, as for a real process whose kernel closes its
        sockets), and callers route around it meanwhile. A provider's app
        keeps running.

        Args:
            target: the proxy (``node.proxy``) or its node.

        Raises:
            ValueError: ``target`` is not the current generation of a running
                proxy of this mesh.
        """
        node = self._running_node(target)
        assert node._run is not None
        await node._run.kill()

    async def stop_proxy(self, target: Proxy | MeshProxy) -> None:
        """Stop a proxy gracefully, like SIGTERM, and wait until it is gone.

        It drains: a provider marks its endpoint STOPPING, in-flight requests
        finish within ``proxy.drain_time``, then it deregisters. Like the CLI,
        it is cancelled if it takes longer than ``proxy.shutdown_time``.

        Args:
            target: the proxy (``node.proxy``) or its node.

        Raises:
            ValueError: ``target`` is not the current generation of a running
                proxy of this mesh.
        """
        node = self._running_node(target)
        run = node._run
        assert run is not None
        node.proxy.request_shutdown()
        with trio.move_on_after(node.config.proxy.shutdown_time):
            await run.finished.wait()
        await run.kill()

    async def restart_proxy(self, target: Proxy | MeshProxy) -> Proxy:
        """Start a stopped or killed proxy again from scratch (generation 0), same configuration.

        A running one is killed first. This is a cold restart, like a
        supervisor starting a crashed process again; see :meth:`hot_restart`
        for the hand-over. It binds the same addresses as before (ports picked
        at the first start are kept), so a provider registers the same
        endpoint again.

        Args:
            target: the proxy (``node.proxy``, also an old one) or its node.

        Returns:
            The new :class:`Proxy` (also ``node.proxy``).

        Raises:
            ValueError: ``target`` does not belong to this mesh.
            OSError: a socket could not be bound.
        """
        node = self._node(target)
        if node.running:
            assert node._run is not None
            await node._run.kill()
        node.proxy = Proxy(node.config)
        await self._start(node, node.proxy)
        return node.proxy

    async def remove_provider(self, provider: Provider, *, graceful: bool = True) -> None:
        """Take a provider away: its proxy drains and deregisters, then its app stops.

        Args:
            provider: a provider of this mesh.
            graceful: False kills the proxy (like SIGKILL) instead of draining it.

        Raises:
            ValueError: ``provider`` does not belong to this mesh.
        """
        node = self._node(provider)
        if not isinstance(node, Provider):
            raise ValueError(f"{node.name} is not a provider")
        if node.running:
            if graceful:
                await self.stop_proxy(node)
            else:
                await self.kill_proxy(node)
        if node._app is not None:
            await node._app.kill()

    # ------------------------------------------------------------ hot restart

    async def hot_restart(
        self,
        target: Proxy | MeshProxy,
        *,
        config: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Proxy:
        """Hot-restart a proxy in-process, through its real hot-restart socket.

        A new :class:`Proxy` generation connects to the running one's
        hot-restart socket, receives its listening sockets (SCM_RIGHTS), warms
        up (upstream pools, local app, subscriptions), starts accepting and
        says READY; the old generation then stops accepting and drains. SDK
        clients and peer proxies move over without a failed call, exactly as
        with ``octoproxy run --hot-restart`` (docs/hot-restart.md).

        Args:
            target: the proxy (``node.proxy``) or its node.
            config: overrides for the new generation (an "upgrade" with a new
                configuration), merged into the node's configuration; the
                socket paths and listen addresses must stay the same.
            wait: wait until the old generation has drained and sent DONE
                (at most its ``proxy.shutdown_time``); then another hot
                restart is possible at once (two generations at most).

        Returns:
            The new generation (also ``node.proxy`` from now on).

        Raises:
            ValueError: ``target`` is not the current generation of a running
                proxy of this mesh.
            HotRestartError: the running proxy refused (e.g. its own parent
                still drains) or the new generation was not ready within
                ``proxy.hot_restart_timeout``; the old one keeps serving.
            octoproxy.ConfigError: ``config`` makes an invalid configuration.
        """
        node = self._running_node(target)
        old, old_run = node.proxy, node._run
        assert old_run is not None
        raw = node._raw if config is None else _merge(node._raw, config)
        cfg = node.config if config is None else self._parse(raw)
        new, chan, msg = await take_over_proxy(cfg)
        run = _Task()
        try:
            await self._nursery.start(self._proxy_task, run, new, (chan, msg))
        except BaseException:
            if chan.sock.fileno() >= 0:  # the parent sees EOF and keeps serving
                chan.close()
            raise
        node.proxy, node.config, node._raw, node._run = new, cfg, raw, run
        if wait:
            with trio.move_on_after(old.config.proxy.shutdown_time + 1.0):
                await old_run.finished.wait()
                while new.parent_alive and not run.finished.is_set():
                    await trio.sleep(0.01)
            if not old_run.finished.is_set():  # as the CLI bounds a draining process
                await old_run.kill()
        return new

    # ------------------------------------------------------------ internals

    def _new_name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "proxy"
        name, n = base, 1
        while name in self.nodes:
            n += 1
            name = f"{base}-{n}"
        return name

    def _base_config(self, name: str, service: str) -> dict[str, Any]:
        return {
            "proxy": {
                "service": service,
                "drain_time": self._drain_time,
                "shutdown_time": self._drain_time + 2.0,
                "hot_restart_timeout": 10.0,
            },
            "outbound": {"uds": str(self.directory / f"{name}.sock")},
            "admin": {"listen": "127.0.0.1:0"},
            "upstream": {"connect_timeout": 0.5},
            "discovery": {
                "control_plane": [self.control_plane_url],
                "node_id": name,
                "lease_ttl": self._lease_ttl,
                "join_token_file": str(self.join_token_file(service)),
            },
        }

    def _parse(self, raw: Mapping[str, Any]) -> ProxyConfig:
        cfg = parse_config(raw, base_dir=self.directory)
        paths = [cfg.outbound.uds, cfg.hot_restart_path]
        if cfg.inbound is not None:
            paths.append(cfg.inbound.app_uds)
        for p in paths:
            if len(os.fsencode(p)) > _MAX_UDS_PATH:
                raise ValueError(f"socket path too long for a Unix socket ({len(os.fsencode(p))} > {_MAX_UDS_PATH} bytes): {p}")
        return cfg

    def _node(self, target: Proxy | MeshProxy) -> MeshProxy:
        if isinstance(target, MeshProxy):
            if self.nodes.get(target.name) is target:
                return target
        else:
            for node in self.nodes.values():
                if node.proxy is target:
                    return node
        raise ValueError(f"{target!r} is not a proxy of this mesh (an old generation?)")

    def _running_node(self, target: Proxy | MeshProxy) -> MeshProxy:
        node = self._node(target)
        if not node.running:
            raise ValueError(f"{node.name} is not running")
        return node

    async def _start(self, node: MeshProxy, proxy: Proxy) -> None:
        run = _Task()
        await self._nursery.start(self._proxy_task, run, proxy, None)
        node._run = run
        # like a config file with fixed ports: a restart binds the same addresses
        pinned: dict[str, Any] = {}
        for section in ("inbound", "admin"):
            table = node._raw.get(section)
            if isinstance(table, Mapping) and str(table.get("listen", "")).endswith(":0") and section in proxy.addresses:
                pinned[section] = {"listen": proxy.addresses[section]}
        if pinned:
            node._raw = _merge(node._raw, pinned)
            node.config = self._parse(node._raw)

    async def _kill_all(self, node: MeshProxy) -> None:
        if node._run is not None:
            await node._run.kill()
        if isinstance(node, Provider) and node._app is not None:
            await node._app.kill()

    async def _proxy_task(
        self,
        run: _Task,
        proxy: Proxy,
        handover: tuple[Channel, dict[str, Any]] | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One proxy generation: run it (and finish a hand-over) in its own cancel scope."""
        ready = True
        try:
            with run.scope:
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(proxy.run)
                        if handover is not None:
                            chan, msg = handover
                            ready = await complete_hand_over(proxy, chan, msg, nursery)
                        if ready:
                            task_status.started()
                        else:
                            nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    _raise_single(group)
            if not ready:
                raise HotRestartError(f"hot restart: generation {proxy.generation} was not ready in time; the running proxy keeps serving")
        finally:
            run.finished.set()

    async def _app_task(
        self,
        run: _Task,
        path: Path,
        handler: sdk.Handler,
        max_concurrency: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with run.scope:
                await sdk.serve(path, handler, task_status=task_status, max_concurrency=max_concurrency)
        finally:
            run.finished.set()


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in: tables merge, other values replace, None removes."""
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the only exception of ``group`` as itself, or the group."""
    if len(group.exceptions) != 1:
        raise group
    exc = group.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        _raise_single(exc)
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


@asynccontextmanager
async def open_mesh(
    *,
    directory: str | os.PathLike[str] | None = None,
    lease_ttl: float = 2.0,
    drain_time: float = 1.0,
) -> AsyncIterator[Mesh]:
    """Run a control plane and let a test add proxies and apps, all in this Trio run.

    Use as ``async with open_mesh() as mesh:``, in a test or in a pytest-trio
    fixture (``async with open_mesh() as mesh: yield mesh``). On exit, also
    when the block raises, every proxy, app and the control plane are
    cancelled (like SIGKILL: no drain) and the directory is removed.

    Args:
        directory: where the Unix sockets go; by default a new directory under
            ``/tmp`` (short: Unix socket paths are limited to 108 bytes, and
            pytest's ``tmp_path`` often exceeds that), removed on exit. A given
            directory is left in place.
        lease_ttl: registration lease of the providers' proxies
            (``discovery.lease_ttl``): a provider whose control-plane
            connection stays open but silent disappears from
            callers within this time.
        drain_time: ``proxy.drain_time`` of every proxy
            (``proxy.shutdown_time`` is 2 s more).

    Yields:
        The :class:`Mesh`.

    Raises:
        OSError: the control plane could not listen, or the directory could
            not be made.
    """
    own_dir = directory is None
    if directory is None:
        path = Path(tempfile.mkdtemp(prefix="octomesh-", dir="/tmp"))
    else:
        path = Path(directory).absolute()
        path.mkdir(parents=True, exist_ok=True)
    try:
        try:
            async with trio.open_nursery() as nursery:
                store = EmbeddedStore()
                await nursery.start(store.run)
                # a CA of its own, as a real control plane has: proxies can obtain certificates
                server = ControlPlaneServer(store, ca=CertificateAuthority.generate(DEFAULT_TRUST_DOMAIN, time.time()))
                host, port = await nursery.start(server.serve, "127.0.0.1", 0)
                mesh = Mesh(
                    nursery,
                    path,
                    store,
                    server,
                    f"ws://{host}:{port}/v1/discovery",
                    lease_ttl=lease_ttl,
                    drain_time=drain_time,
                )
                try:
                    yield mesh
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_single(group)
    finally:
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)

