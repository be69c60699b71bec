"""The proxy process: listeners, upstream pools, timers, admin, drain.

One :class:`Proxy` owns one nursery tree:

* ``run`` (the root) owns the admin server, the timer and pinger tasks, the
  accept loops and two child nurseries;
* the *pool* nursery owns one maintainer task per upstream connection slot
  (cluster x endpoint x ``connections_per_endpoint``, plus the local app pool
  on the inbound side), each of which runs its connection's reader and writer;
* the *connections* nursery owns every accepted downstream connection.

Shutdown is explicit: :meth:`Proxy.drain` stops accepting, answers new
requests with HOT_RESTART ("not processed"), sends GOAWAY to peer proxies,
waits until nothing is in flight or ``drain_time`` has passed, answers what is
left UNAVAILABLE, then cancels the tree.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from .. import frame
from ..common._admin import AdminAuth, Request, Response, serve_admin
from ..core._balancer import Endpoint
from ._config import ProxyConfig, split_host_port
from ..common._metrics import Registry
from ..common._secretfile import load_or_create_secret, write_fresh_secret
from ..common._unix import bind_unix, remove_stale_socket
from .._version import __version__
from ..core._authz import policy_from_config
from ..core._engine import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link, Route
from ..core._guard import InboundGuard, InboundPeer
from ..governance import Locality
from ..governance._breaker import CircuitBreaker, Resource
from ..governance._verdict import Kind
from ._handover import ParentShell, serve_hot_restart
from ._takeover import ChildShell
from ..core._held import CONNECTING
from ..core._hot_restart import DRAINING_STATES, HANDED_OVER_STATES, ParentEvent, ParentState
from ..common._memory import trim_memory, tune_malloc
from ._io import Budget, Conn, Flusher, connect_raw, is_transient_accept_error
from ..core._stats import ProxyStats

if TYPE_CHECKING:
    from ._discovery import Discovery
    from ._http_app import HttpAppBridge
    from ._http_listener import HttpListener
    from ._tls import CertificateFiles, ControlPlaneCertificates
    from ..governance import PolicySet

log = logging.getLogger("octoproxy.proxy")

__all__ = ["Proxy", "bind_tcp", "ADMIN_PUBLIC"]

#: admin routes open without the token: read-only probes (Kubernetes, Prometheus), and the
#: app-facing subscription calls the SDK makes with only the admin address (bounded below)
ADMIN_PUBLIC = frozenset(
    {("GET", "/healthz"), ("GET", "/ready"), ("GET", "/stats"), ("POST", "/subscribe"), ("POST", "/unsubscribe")}
    | {("GET", "/config")}  # the app's configuration: read-only, bounded watchers (proxy/_appconfig.py)
)
#: POST /subscribe: names per request, and the longest wait a caller may ask for
_SUBSCRIBE_MAX_NAMES = 1000
_SUBSCRIBE_MAX_TIMEOUT = 60.0
#: at exit, admin connections accepted before the admin listener stopped get this long to be
#: served (a probe accepted just before a hand-over may not have sent its request yet)
_ADMIN_LINGER = 3.0


def bind_tcp(address: str, backlog: int = 1024) -> socket.socket:
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _sock_address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def _make_key_and_csr(service: str, trust_domain: str) -> tuple[str, str]:
    from ..identity import make_key_and_csr  # cryptography loads on first use, not at start

    return make_key_and_csr(service, trust_domain)


def _cipher(sock: Any) -> str:
    c = sock.cipher()
    return str(c[0]) if c else "none"


class Proxy:
    """One sidecar proxy (both sides), configured by a :class:`ProxyConfig`.

    Args:
        config: the validated configuration.
        registry: metrics registry (a fresh one by default).
        listeners: already-bound listening sockets by name ("outbound",
            "inbound"), e.g. inherited through a hot restart; missing ones are
            bound from the config.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        registry: Registry | None = None,
        listeners: dict[str, socket.socket] | None = None,
        generation: int = 0,
        accept: bool = True,
    ) -> None:
        self.config = config
        self.generation = generation
        #: the parent role (hand-over to a next generation); its state is this proxy's
        #: drain state too (see ``draining``, ``handed_over``, ``keep_socket_files``)
        self.hot_restart = ParentShell(self)
        #: the child role, when this generation took over from a running one (:meth:`follow_predecessor`)
        self.predecessor: ChildShell | None = None
        self.force_closed = 0
        #: the admin bearer token (read or created at start; never logged)
        self.admin_token: bytes = b""
        #: this generation's hand-over secret (see :meth:`arm_hot_restart`)
        self.hot_restart_secret: bytes = b""
        self.stats = ProxyStats(registry)
        up = config.upstream
        clusters = []
        for name, cc in config.clusters.items():
            cluster = Cluster(name, cc.lb, [ep.to_endpoint() for ep in cc.endpoints])
            for ep in cluster.endpoints:
                ep.healthy = False  # until a connection is up
            clusters.append(cluster)
        routes = [Route(r.service, r.method, r.cluster, r.timeout or up.default_timeout, r.max_timeout or 0.0) for r in config.routes]
        self.static_routes = list(routes)
        #: subscriptions handed over by the previous generation (hot restart)
        self.inherited_subscriptions: list[str] = []
        self._endpoint_scopes: dict[tuple[str, str], trio.CancelScope] = {}
        self.engine = Engine(
            routes=routes,
            clusters=clusters,
            caller=config.proxy.service,
            max_pending=config.outbound.max_pending,
            default_timeout=up.default_timeout,
            max_frame_size=config.proxy.max_frame_size,
            stats=self.stats,
            park_timeout=up.connect_timeout,
            inbound_max_timeout=(config.inbound.max_timeout or 0.0) if config.inbound is not None else 0.0,
            high_watermark=up.high_watermark,
        )
        px_cfg = config.proxy
        disc = config.discovery  # this proxy's own locality (governed routes prefer it)
        self.engine.locality = Locality(
            px_cfg.region or (disc.region if disc is not None else ""),
            px_cfg.center,
            px_cfg.idc or (disc.idc if disc is not None else ""),
        )
        #: HTTP/1.1 in the mesh (docs/http.md): the provider-side bridge to an HTTP app, the caller-side listener
        self.http_app: HttpAppBridge | None = None
        self.http: HttpListener | None = None
        if config.inbound is not None and config.inbound.app_codec == "http1":
            # imported here, as the HTTP listener below: the HTTP/1.1 codecs (h11 mapping,
            # httptools, the SDK's server core) are for proxies configured to use them
            from ._http_app import HttpAppBridge

            ib = config.inbound
            assert ib.app_http is not None
            self.http_app = HttpAppBridge(ib.app_http, ib.app_http_connections, ib.app_http_timeout, config.proxy.max_frame_size)
        if config.http is not None:
            from ._http_listener import HttpListener

            self.http = HttpListener(
                config.http, str(config.outbound.uds), config.proxy.max_frame_size, self.stats.registry, lambda: self.handed_over
            )
        if config.inbound is not None:
            app_address = self.http_app.address if self.http_app is not None else f"unix:{config.inbound.app_uds}"
            app = Cluster("local_app", "least_request", [Endpoint(app_address)])
            app.endpoints[0].healthy = False
            self.engine.inbound_cluster = app
        px = config.proxy
        self.budget = Budget(px.memory_budget, px.connection_buffer_limit, px.frame_timeout, up.high_watermark)
        self.flusher = Flusher(self.engine, self.budget)
        if self.http is not None:  # HTTP requests go straight into the outbound pipeline
            from ._http_listener import DirectLink

            self.http.direct = DirectLink(self.engine, self.flusher, config.proxy.max_frame_size)
        #: data connections allowed by the fd limit (set in run(); see _fd_room)
        self._fd_base = 0
        self._fd_limit = 1 << 30
        #: rate-limited log lines: kind -> (last logged, left out since)
        self._log_state: dict[str, tuple[float, int]] = {}
        #: mTLS between proxies (None: plaintext); raises ConfigError on bad files
        self.tls: CertificateFiles | ControlPlaneCertificates | None = None
        #: what an upstream connect may raise and the pool retries (a handshake failure too, with mTLS)
        self._connect_errors: tuple[type[Exception], ...] = (OSError, trio.TooSlowError)
        self._tls_failures = 0
        #: inbound TLS handshakes under way (they count towards inbound.max_connections)
        self._handshaking = 0
        self._tls_handshakes = self.stats.registry.counter(
            "octoproxy_tls_handshakes_total", "mTLS handshakes completed, by side and cipher suite.", ("side", "cipher")
        )
        if config.tls_mode == "mtls":
            # imported here: a plaintext proxy never loads the TLS shell and identity modules
            from ._tls import CertificateFiles, ControlPlaneCertificates, HandshakeError

            self._connect_errors += (HandshakeError,)
            t = config.tls
            if t.cert_file is not None:
                assert t.key_file is not None and t.ca_file is not None
                self.tls = CertificateFiles(t.cert_file, t.key_file, t.ca_file, t.trust_domain)
            else:  # a key made here, a certificate from the control plane (renewed at 2/3 of its life)
                self.tls = ControlPlaneCertificates(config.proxy.service, t.trust_domain, self._request_certificate, _make_key_and_csr)
        if config.inbound is not None:
            authz = config.authz
            policy = policy_from_config(config.proxy.service, authz.default, [(r.action, r.callers, r.methods) for r in authz.rules])
            self.engine.inbound_guard = InboundGuard(config.proxy.service, policy, config.proxy.max_frame_size)
        self.discovery: Discovery | None = None
        if config.discovery is not None:
            # imported here: it brings the control plane's client and WebSocket
            # stack (about 2.3 MB of RSS), which a proxy without discovery never needs
            from ._discovery import Discovery

            self.discovery = Discovery(self)
        self.listeners: dict[str, socket.socket] = dict(listeners or {})
        self.addresses: dict[str, str] = {}
        self.conns: dict[str, set[Conn]] = {"outbound": set(), "inbound": set()}
        self.upstream_conns: set[Conn] = set()
        self.health_failed = False
        self.started_at = 0.0
        self._shutdown = trio.Event()
        self.drained = trio.Event()
        self._accepting = trio.Event()
        if accept:
            self._accepting.set()
        self._stop_accepting = trio.CancelScope()
        self._stop_admin = trio.CancelScope()  # the admin listener: only a hand-over stops it early
        self._admin_closing = trio.Event()  # exit: no new admin connections will come
        self._admin_conns_done: trio.Event | None = None  # set when the served ones are all over
        self._conn_nursery: trio.Nursery | None = None
        self._pool_nursery: trio.Nursery | None = None
        self._register_gauges()

    # ------------------------------------------------------------ governance

    def set_governance(self, policy_set: PolicySet | None) -> None:
        """Apply a governance policy set live (or none: every route back on the fast path).

        Runs between two reads (Trio runs one task at a time), in place: calls
        in flight keep and release what they hold, so none fails because of it.
        A policy set that failed to parse never gets here (``parse_policy_set``
        raised, the caller NACKed it and kept the old one).

        Args:
            policy_set: the new policies (from ``[governance]`` or the control plane).
        """
        try:
            now = trio.current_time()
        except RuntimeError:  # not running yet
            now = 0.0
        self.engine.set_governance(policy_set, now)
        version = policy_set.version if policy_set is not None else None
        log.info("governance policy set %s applied: %d governed routes", version, len(self.engine.governed_routes()))

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_shutdown`, then drain and return."""
        cfg = self.config
        self.started_at = trio.current_time()
        # the governance cores' clock: unix milliseconds (warm-up starts come from the control plane so)
        self.engine.clock_offset_ms = int(time.time() * 1000) - int(self.started_at * 1000)
        if cfg.governance is not None and self.engine.policies is None:
            self.set_governance(cfg.governance)
        self._set_fd_limit()
        if "outbound" not in self.listeners:
            await remove_stale_socket(str(cfg.outbound.uds))
            self.listeners["outbound"] = bind_unix(str(cfg.outbound.uds), cfg.outbound.uds_mode, 1024)
        if cfg.inbound is not None and "inbound" not in self.listeners:
            self.listeners["inbound"] = bind_tcp(cfg.inbound.listen)
        if cfg.http is not None and "http" not in self.listeners:
            self.listeners["http"] = bind_tcp(cfg.http.listen)
        if "admin" not in self.listeners:
            admin = cfg.admin.listen
            if admin.startswith("unix:"):
                await remove_stale_socket(admin[5:])
                self.listeners["admin"] = bind_unix(admin[5:], 0o660, 128)
            else:
                self.listeners["admin"] = bind_tcp(admin, 128)
        if "hot_restart" not in self.listeners:
            await remove_stale_socket(str(cfg.hot_restart_path))
            self.listeners["hot_restart"] = bind_unix(str(cfg.hot_restart_path), 0o600, 16)
        for name, sock in self.listeners.items():
            self.addresses[name] = _sock_address(sock)
        # after the binds: a start-up that cannot listen fails on that, in one line, and leaves no token file
        self.admin_token, created = load_or_create_secret(cfg.admin_token_path)
        if created:
            log.info("created the admin token file %s (mode 0600)", cfg.admin_token_path)
        if self._accepting.is_set():  # a hot-restarted one arms itself once warm, before it says READY
            self.arm_hot_restart()
        try:
            async with trio.open_nursery() as root:
                async with trio.open_nursery() as pools:
                    self._pool_nursery = pools
                    async with trio.open_nursery() as conns:
                        self._conn_nursery = conns
                        self._start_pools(pools)
                        if self.discovery is not None:
                            await pools.start(self.discovery.run)
                        root.start_soon(self._timer)
                        root.start_soon(self._sweeper)
                        if self.tls is not None:
                            from ._tls import CertificateFiles, ControlPlaneCertificates

                            if isinstance(self.tls, CertificateFiles):
                                root.start_soon(self.tls.watch, cfg.tls.reload_interval)
                            elif isinstance(self.tls, ControlPlaneCertificates):
                                await root.start(self.tls.run)
                        if cfg.upstream.ping_interval > 0:
                            root.start_soon(self._pinger)
                        root.start_soon(self._listen, root)
                        task_status.started(self)
                        await self._shutdown.wait()
                        self._stop_accepting.cancel()
                        await self._drain()
                        self.force_closed = len(self.conns["outbound"]) + len(self.conns["inbound"])
                        if self.force_closed:
                            self.stats.error("force_closed", self.force_closed)
                            log.warning("%d connections still open at shutdown: closed", self.force_closed)
                        conns.cancel_scope.cancel()
                    pools.cancel_scope.cancel()
                if self.handed_over:  # let the child hear that we are done
                    with trio.move_on_after(3):
                        await self.hot_restart.wait_done()
                self._stop_admin.cancel()
                if self._admin_conns_done is not None:
                    self._admin_closing.set()
                    with trio.move_on_after(_ADMIN_LINGER):
                        await self._admin_conns_done.wait()
                root.cancel_scope.cancel()
        finally:
            self._close_listeners()

    async def _listen(self, root: trio.Nursery) -> None:
        """Accept on every listener (admin and hot restart included), once allowed."""
        await self._accepting.wait()
        handlers = await root.start(self._admin_connections)
        await root.start(self._serve_admin, handlers)
        with self._stop_accepting:
            async with trio.open_nursery() as n:
                n.start_soon(serve_hot_restart, self, self.listeners["hot_restart"], root)
                for name in ("outbound", "inbound"):
                    if name in self.listeners:
                        n.start_soon(self._accept_loop, name, self.listeners[name])
                if self.http is not None and self._conn_nursery is not None:
                    n.start_soon(self.http.serve, self.listeners["http"], self._conn_nursery)
                if self.config.inbound is not None and not self.config.proxy.service:
                    log.warning("[inbound] without proxy.service: every request from peers is answered NO_ROUTE")
                log.info(
                    "octoproxy %s (generation %d) accepting: %s",
                    __version__,
                    self.generation,
                    " ".join(f"{k}={v}" for k, v in sorted(self.addresses.items())),
                )

    async def _admin_connections(self, *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery admin connections are served in, until every one is over at exit."""
        done = self._admin_conns_done = trio.Event()
        try:
            async with trio.open_nursery() as n:
                task_status.started(n)
                await self._admin_closing.wait()  # then the nursery waits for its connections
        finally:
            done.set()

    async def _serve_admin(self, handlers: trio.Nursery, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on the admin listener until the hand-over, or to the end of a plain drain.

        The admin listener is shared with the other generation during a hot
        restart, so the two rules that keep a probe from ever seeing a reset
        are: the accepted connections are served in ``handlers``
        (:meth:`_admin_connections`), not in the accept loop's own nursery, so
        stopping accepting never cancels a request half served, and at exit
        they get ``_ADMIN_LINGER`` to finish (one accepted just before the
        hand-over may not even have sent its request yet); and the old generation stops
        accepting exactly when the new one is ready (the hot-restart table's ``stop_admin`` on ``child_ready``),
        so whatever waits in the accept queue is the new one's. During a plain
        drain (SIGTERM, ``POST /drain``) it keeps serving, so that ``/ready``
        answers 503 "draining" rather than nothing. Closing the listener at
        exit does reset what is still queued; a hot restart never gets there
        with its admin listener, since the new generation holds the same socket.
        """
        with self._stop_admin:
            admin = trio.SocketListener(trio.socket.from_stdlib_socket(self.listeners["admin"]))
            auth = AdminAuth(self.admin_token, ADMIN_PUBLIC)
            await serve_admin(
                self.addresses["admin"],
                self._admin_routes(),
                listeners=[admin],
                auth=auth,
                max_connections=self.config.admin.max_connections,
                handler_nursery=handlers,
                task_status=task_status,
            )

    def arm_hot_restart(self) -> None:
        """Write this generation's hand-over secret next to the hot-restart socket.

        Done before the proxy reports ready, so that the next generation,
        started as soon as it does, reads the secret this one checks.

        Raises:
            SecretFileError: it cannot be written.
        """
        path = self.config.hot_restart_secret_path
        self.hot_restart_secret = write_fresh_secret(path)
        log.info("hot restart: hand-over secret written to %s (mode 0600)", path)

    def start_accepting(self) -> None:
        """Begin accepting (a hot-restarted proxy calls this once warm)."""
        self._accepting.set()

    def listener_sockets(self) -> tuple[list[str], list[socket.socket]]:
        """The listening sockets to hand to a new generation, by name."""
        names = sorted(self.listeners)
        return names, [self.listeners[n] for n in names]

    def subscriptions(self) -> list[str]:
        """Services this proxy holds discovery subscriptions for."""
        return sorted(self.discovery.subscribed) if self.discovery is not None else []

    # ------------------------------------------------------------ hot-restart state (the table's)

    @property
    def draining(self) -> bool:
        """Draining: a plain drain, or for the next generation after a hand-over."""
        return self.hot_restart.state in DRAINING_STATES

    @property
    def handed_over(self) -> bool:
        """The next generation took the listeners and is ready: we drain for it."""
        return self.hot_restart.state in HANDED_OVER_STATES

    @property
    def parent_alive(self) -> bool:
        """A hot-restarted proxy whose parent has not finished draining yet."""
        return self.predecessor is not None and self.predecessor.parent_alive

    @property
    def keep_socket_files(self) -> bool:
        """Leave the UDS files alone on exit: they belong to the other generation."""
        return self.handed_over or (self.predecessor is not None and self.predecessor.keeps_parent_files)

    def follow_predecessor(self, child: ChildShell) -> None:
        """This proxy is a new generation built by ``child`` (not running yet): no hand-over until its parent is done."""
        child.proxy = self
        self.predecessor = child
        self.hot_restart = ParentShell(self, ParentState.FOLLOWING)

    def stop_accepting(self) -> None:
        """Stop accepting on the data listeners and the hot-restart socket (a table action)."""
        self._stop_accepting.cancel()

    def stop_admin(self) -> None:
        """Stop accepting on the admin listener (a table action: its queue is the next generation's)."""
        self._stop_admin.cancel()

    def start_drain(self) -> None:
        """Begin draining (the table's DRAIN action; call :meth:`request_shutdown` instead)."""
        self._shutdown.set()

    def request_shutdown(self) -> None:
        """Begin a graceful drain (SIGTERM, ``POST /drain``).

        During a hand-over the hand-over is aborted first (the new process
        hears it and gives up), so that exactly one generation drains.
        """
        if self.hot_restart.state is ParentState.HANDING_OVER:
            log.warning("shutdown requested during a hot restart: hand-over aborted")
        self.hot_restart.fire(ParentEvent.SHUTDOWN)

    def _close_listeners(self) -> None:
        for sock in self.listeners.values():
            if sock.fileno() < 0:
                continue
            if sock.family == socket.AF_UNIX and not self.keep_socket_files:
                # the socket files belong to whoever holds the sockets: after a
                # hand-over that is the new generation, so leave them alone
                with contextlib.suppress(OSError):
                    os.unlink(sock.getsockname())
            sock.close()

    # ------------------------------------------------------------ downstream

    async def _accept_loop(self, name: str, lsock: socket.socket) -> None:
        cfg = self.config
        limits = {"outbound": (cfg.outbound.max_connections, cfg.outbound.max_buffer)}
        if cfg.inbound is not None:
            limits["inbound"] = (cfg.inbound.max_connections, cfg.inbound.max_buffer)
        max_conns, max_buffer = limits[name]
        accepted = self.stats.accepted.labels(name)
        assert self._conn_nursery is not None
        while True:
            await trio.lowlevel.wait_readable(lsock)
            # out of connection slots or of fds: make room by shedding the
            # oldest idle connection (overload mode), not by refusing this one
            full = len(self.conns[name]) >= max_conns
            no_fds = not self._fd_room()
            while (full or no_fds) and self._shed_idle(None if no_fds else name):
                full = len(self.conns[name]) >= max_conns
                no_fds = not self._fd_room()
            try:
                sock, _addr = lsock.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if is_transient_accept_error(exc):
                    self.stats.error("accept_failed")
                    self._log_limited(
                        "accept", logging.ERROR, "accept on %s failed: %s; shedding idle connections, backing off", name, exc.strerror or exc
                    )
                    if not self._shed_idle(None):
                        await trio.sleep(0.1)
                    continue
                raise
            accepted.inc()
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(DOWNSTREAM, f"{name}#{int(accepted.value)}", listener=name)
            if full or no_fds:
                link.reject = True
                self.stats.error("connection_limit")
                why = f"connection limit {max_conns}" if full else f"file descriptor limit (fd_reserve {cfg.proxy.fd_reserve} kept free)"
                self._log_limited("limit", logging.WARNING, "%s: %s reached, none idle; answering OVERLOADED on %s", name, why, link.name)
            if name == "inbound" and self.tls is not None:
                if link.reject or len(self.conns[name]) + self._handshaking >= max_conns:
                    # over the limit: no handshake (its CPU is what a flood wants to burn)
                    if not link.reject:
                        self.stats.error("connection_limit")
                    sock.close()
                    continue
                self._handshaking += 1
                self._conn_nursery.start_soon(self._serve_tls_inbound, sock, link, max_buffer)
                continue
            conn = Conn(sock, link, self.flusher, max_buffer=max_buffer, spawn=self._conn_nursery.start_soon)
            self.conns[name].add(conn)  # counted at once: the limits above see it before its task runs
            self._conn_nursery.start_soon(self._serve_downstream, conn)

    def tls_ready(self) -> bool:
        """True unless mTLS is on and no certificate is held yet (control plane)."""
        return self.tls is None or self.tls.contexts is not None

    async def _request_certificate(self, csr_pem: str, timeout: float) -> Any:
        from ._tls import HandshakeError

        if self.discovery is None:  # pragma: no cover - the config requires [discovery]
            raise HandshakeError("no control plane to ask for a certificate")
        return await self.discovery.client.request_certificate(csr_pem, timeout)

    def _tls_failed(self, what: str, exc: Exception) -> None:
        self.stats.error("tls_handshake_failed")
        self._tls_failures += 1
        n = self._tls_failures
        if n <= 20 or n % 1000 == 0:
            log.warning("%s: %s (%d TLS failures so far)", what, exc, n)

    async def _serve_tls_inbound(self, sock: socket.socket, link: Link, max_buffer: int) -> None:
        """Handshake (mTLS) with a peer proxy, learn its service, then serve it as any connection."""
        from ._tls import HandshakeError, accept_tls

        assert self.tls is not None
        try:
            contexts = self.tls.contexts
            if contexts is None:
                sock.close()
                raise HandshakeError("no certificate yet (waiting for the control plane)")
            tls_sock, caller = await accept_tls(sock, contexts, self.config.tls.handshake_timeout)
        except HandshakeError as exc:
            self._tls_failed(f"inbound {link.name} refused", exc)
            return
        finally:
            self._handshaking -= 1
        link.peer = InboundPeer(caller)
        self._tls_handshakes.labels("inbound", _cipher(tls_sock)).inc()
        # a TLSConnection offers what Conn uses of a socket (duck-typed)
        assert self._conn_nursery is not None
        conn = Conn(cast(socket.socket, tls_sock), link, self.flusher, max_buffer=max_buffer, spawn=self._conn_nursery.start_soon)
        await self._serve_downstream(conn)

    async def _tls_connect(self, sock: socket.socket, cluster: Cluster, address: str) -> socket.socket:
        """Upstream mTLS: the server must be a service this cluster routes to."""
        from ._tls import ControlPlaneCertificates, HandshakeError, connect_tls

        assert self.tls is not None
        expected = {r.service for r in self.engine.routes if r.cluster == cluster.name}
        try:
            if isinstance(self.tls, ControlPlaneCertificates) and self.tls.contexts is None:
                with trio.move_on_after(self.config.upstream.connect_timeout):
                    await self.tls.held.wait()
            contexts = self.tls.contexts
            if contexts is None:
                sock.close()
                raise HandshakeError("no certificate yet (waiting for the control plane)")
            tls_sock, _service = await connect_tls(sock, contexts, expected, self.config.tls.handshake_timeout)
        except HandshakeError as exc:
            self._tls_failed(f"cluster {cluster.name}: {address}", exc)
            raise
        self._tls_handshakes.labels("upstream", _cipher(tls_sock)).inc()
        return cast(socket.socket, tls_sock)  # duck-typed: what Conn uses of a socket

    def _log_limited(self, kind: str, level: int, msg: str, *args: object) -> None:
        """Log one line per ``kind`` per 10 s at most, with how many were left out (accept failures, refusals)."""
        now = trio.current_time()
        last, skipped = self._log_state.get(kind, (-1e9, 0))
        if now - last < 10.0:
            self._log_state[kind] = (last, skipped + 1)
            return
        if skipped:
            msg += f" ({skipped} more like this in the last 10 s)"
        log.log(level, msg, *args)
        self._log_state[kind] = (now, 0)

    def _set_fd_limit(self) -> None:
        """Leave ``proxy.fd_reserve`` fds below RLIMIT_NOFILE for admin, hot restart and upstreams."""
        import resource

        test_limit = os.environ.get("OCTOPROXY_TEST_RLIMIT_NOFILE")  # for tests: lower the limit in-process
        if test_limit:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(test_limit), hard))
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            self._fd_base = len(os.listdir("/proc/self/fd"))
        except OSError:  # pragma: no cover - no /proc
            self._fd_base = 32
        if soft != resource.RLIM_INFINITY:
            self._fd_limit = soft - self.config.proxy.fd_reserve
        tune_malloc()

    def _fd_room(self) -> bool:
        """Whether one more data connection stays within the fds not reserved."""
        used = self._fd_base + len(self.conns["outbound"]) + len(self.conns["inbound"]) + len(self.upstream_conns) + 8
        return used < self._fd_limit

    def _shed_idle(self, name: str | None) -> bool:
        """Close the downstream connection idle the longest (on listener ``name``, or any); False if none is idle."""
        groups = [self.conns[name]] if name is not None else list(self.conns.values())
        oldest: Conn | None = None
        for group in groups:
            for conn in group:
                link = conn.link
                if link.inflight or link.out or conn.started or link.reject:
                    continue
                if oldest is None or conn.last_active < oldest.last_active:
                    oldest = conn
        if oldest is None:
            return False
        self.stats.error("idle_connection_shed")
        self.engine.goaway(oldest.link, "idle connection shed: proxy at its connection limit")
        self.flusher.flush()
        self.conns[oldest.link.listener].discard(oldest)
        oldest.lost("idle connection shed")
        return True

    async def _serve_downstream(self, conn: Conn) -> None:
        name = conn.link.listener
        group = self.conns[name]
        group.add(conn)
        gauge = self.stats.connections.labels(name)
        gauge.inc()
        try:
            if self.draining and name == "inbound":
                self.engine.goaway(conn.link, "draining")
                self.flusher.flush()
            if conn.link.reject:
                # answer what it sends for a moment, then close
                with trio.move_on_after(1.0):
                    await self._run_conn(conn)
                await conn.close_after_flush("connection limit")
            else:
                await self._run_conn(conn)
        finally:
            group.discard(conn)
            gauge.dec()
            conn.lost("closed")

    async def _run_conn(self, conn: Conn) -> None:
        # one task per connection: its writer is started only on a partial send
        await conn.reader()

    # ------------------------------------------------------------ upstream pools

    def _start_pools(self, nursery: trio.Nursery) -> None:
        for cluster in self.engine.clusters.values():
            for ep in cluster.endpoints:
                self.start_endpoint(cluster, ep)
        app = self.engine.inbound_cluster
        if app is not None and self.http_app is not None:  # an HTTP app: served in process (docs/http.md)
            nursery.start_soon(self.http_app.run, self.engine, self.flusher, app)
        elif app is not None and self.config.inbound is not None:
            self.start_endpoint(app, app.endpoints[0], self.config.inbound.app_connections)

    def start_endpoint(self, cluster: Cluster, ep: Endpoint, connections: int | None = None) -> None:
        """Start the connection pool of one endpoint (its maintainers, under one cancel scope)."""
        assert self._pool_nursery is not None
        key = (cluster.name, ep.address)
        if key in self._endpoint_scopes:
            return
        scope = self._endpoint_scopes[key] = trio.CancelScope()
        per = connections or self.config.upstream.connections_per_endpoint

        # count the first connection attempts now, so that requests arriving
        # before the maintainers run wait for them instead of failing
        cluster.connecting += per

        async def maintain_all() -> None:
            with scope:
                async with trio.open_nursery() as n:
                    for slot in range(per):
                        n.start_soon(self._maintain, cluster, ep, slot, True)

        self._pool_nursery.start_soon(maintain_all)

    def stop_endpoint(self, cluster: Cluster, ep: Endpoint) -> None:
        """Stop dialling an endpoint; its connections close once their requests are answered."""
        scope = self._endpoint_scopes.pop((cluster.name, ep.address), None)
        if scope is not None:
            scope.cancel()
        for link in list(cluster.links.get(ep.address, [])):
            cluster.remove_link(link)
            link.draining = True
            if not link.npending and link.io is not None:
                link.io.lost("endpoint removed")
        ep.healthy = False

    async def _maintain(self, cluster: Cluster, ep: Endpoint, slot: int, precounted: bool = False) -> None:
        """Keep one upstream connection to ``ep`` open, reconnecting with back-off.

        A connection that receives GOAWAY is replaced at once: the new one is
        dialled while the old one finishes its in-flight requests in the
        background, and requests that find no connection in between wait in
        the engine's held queue until the new one is up.
        """
        up = self.config.upstream
        backoff = 0.05
        failures = 0
        gauge = self.stats.upstream_connections.labels(cluster.name)
        assert self._pool_nursery is not None
        counted = precounted  # cluster.connecting already counts the next attempt
        holding = precounted  # this task holds one count in cluster.connecting
        try:
            while True:
                if not counted:
                    cluster.connecting += 1
                counted = False
                holding = True
                breaker = await self._connection_unit(cluster)
                try:
                    sock = await connect_raw(ep.address, up.connect_timeout)
                    if self.tls is not None and cluster is not self.engine.inbound_cluster:
                        sock = await self._tls_connect(sock, cluster, ep.address)
                except self._connect_errors as exc:
                    if breaker is not None:
                        breaker.release(Resource.CONNECTIONS)
                    failures += 1
                    self.stats.error("upstream_connect_failed")
                    if failures == 1 or failures % 100 == 0:
                        log.warning("cluster %s: cannot connect to %s (%s); retrying", cluster.name, ep.address, exc or "timeout")
                    cluster.connecting -= 1
                    holding = False
                    self.engine.unpark(cluster, trio.current_time())  # nothing to wait for now: answer them
                    self.flusher.flush()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                cluster.connecting -= 1
                holding = False
                if failures:
                    log.info("cluster %s: connected to %s after %d failures", cluster.name, ep.address, failures)
                failures = 0
                backoff = 0.05
                link = Link(UPSTREAM, f"{cluster.name}/{ep.address}#{slot}", endpoint=ep, cluster=cluster)
                # a new link has just heard from its peer (the connect): without
                # this, last_rx = 0.0 on Trio's clock makes the pinger ping it at
                # once and close it ping_timeout later if the peer is slow
                link.last_rx = trio.current_time()
                conn = Conn(sock, link, self.flusher, max_buffer=self.budget.high_water, spawn=self._pool_nursery.start_soon)
                link.on_idle = lambda _link, c=conn: c.lost("drained after GOAWAY")
                replace = trio.Event()

                def on_goaway(_link: Link, e: trio.Event = replace) -> None:
                    # count the replacement attempt at once, so that requests in
                    # the same read already park instead of failing
                    nonlocal counted, holding
                    if not counted and not e.is_set():
                        cluster.connecting += 1
                        counted = holding = True
                    e.set()

                link.on_goaway = on_goaway
                cluster.add_link(link)
                self.engine.unpark(cluster, trio.current_time())
                self.flusher.flush()
                self.upstream_conns.add(conn)
                gauge.inc()
                self._pool_nursery.start_soon(self._run_upstream, conn, replace, gauge, breaker)
                await replace.wait()
                await trio.sleep(0 if link.draining else backoff)
        finally:
            if holding:
                cluster.connecting -= 1

    async def _run_upstream(self, conn: Conn, replace: trio.Event, gauge: Any, breaker: CircuitBreaker | None = None) -> None:
        try:
            await self._run_conn(conn)
        finally:
            self.upstream_conns.discard(conn)
            gauge.dec()
            conn.lost("closed")
            if breaker is not None:  # the object the unit came from (a pushed policy may have replaced it)
                breaker.release(Resource.CONNECTIONS)
            replace.set()

    async def _connection_unit(self, cluster: Cluster) -> CircuitBreaker | None:
        """Take a CONNECTIONS unit of the cluster's breaker before dialling (governed clusters).

        At the limit the pool dials nothing more and requests use the links
        that are open; this waits (re-checking each second: units come back
        as connections close, and a pushed policy may raise the limit).

        Returns:
            The breaker the unit was taken from (release into it), or None
            when the cluster has no breaker.
        """
        logged = False
        while True:
            gov = cluster.gov
            breaker = gov.breaker if gov is not None else None
            if breaker is None:
                return None
            verdict = breaker.acquire(Resource.CONNECTIONS)
            if verdict.kind is Kind.CONTINUE:
                return breaker
            if not logged:
                logged = True
                self.stats.error("upstream_connections_limited")
                log.warning("cluster %s: %s; no new connection until one closes", cluster.name, verdict.reason)
            await trio.sleep(1.0)

    # ------------------------------------------------------------ timers

    async def _timer(self) -> None:
        """Answer TIMEOUT for expired requests (precise to 50 ms at worst)."""
        engine = self.engine
        while True:
            now = trio.current_time()
            nxt = engine.expire(now)
            self.flusher.flush()
            wake = now + 0.05 if nxt is None else min(nxt, now + 0.05)
            await trio.sleep_until(wake)

    async def _sweeper(self) -> None:
        """Enforce frame deadlines and idle timeouts; give memory back after a burst of closes."""
        cfg = self.config
        idle = {"outbound": cfg.outbound.idle_timeout, "inbound": cfg.inbound.idle_timeout if cfg.inbound else 0.0}
        budget = self.budget
        frame_timeout = budget.frame_timeout
        period = min(0.5, frame_timeout / 4)
        last_trim = trio.current_time()
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            late: list[Conn] = []
            for name, group in self.conns.items():
                limit = idle[name]
                for conn in group:
                    link = conn.link
                    if conn.started and now - conn.started > frame_timeout:
                        late.append(conn)
                    elif link.inflight:
                        conn.last_active = now
                    elif limit and now - conn.last_active > limit and not link.out and not self.draining:
                        if not link.goaway_sent:
                            # send nothing new here; closed once the peer had time to hear it
                            self.engine.goaway(link, f"idle for {limit:g}s")
                            self.stats.error("idle_timeout")
                        elif now - conn.last_active > limit + 1.0:
                            conn.lost("idle timeout")
            for conn in self.upstream_conns:
                if conn.started and now - conn.started > frame_timeout:
                    late.append(conn)
            for conn in late:
                self.stats.error("frame_timeout")
                log.warning("%s: a frame begun %.1fs ago is still incomplete: closing it", conn.link.name, now - conn.started)
                conn.lost(f"frame not complete within {frame_timeout:g}s")
            self.flusher.flush()
            if budget.closes >= 32 and now - last_trim >= 2.0:
                # after a burst of closes: collect what trio's per-task cycles
                # still hold, then give the freed pages back to the system
                budget.closes = 0
                last_trim = now
                gc.collect()
                trim_memory()

    async def _pinger(self) -> None:
        """PING idle upstream connections; close the ones whose PONG is late."""
        up = self.config.upstream
        token = 0
        period = min(up.ping_interval, up.ping_timeout, 1.0)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for conn in list(self.upstream_conns):
                link = conn.link
                if link.awaiting_pong:
                    if now - link.last_rx > up.ping_interval + up.ping_timeout:
                        self.stats.error("ping_timeout")
                        log.warning("upstream %s: no PONG within %.1fs; closing it", link.name, up.ping_timeout)
                        conn.lost("ping timeout")
                elif now - link.last_rx >= up.ping_interval:
                    token += 1
                    self.engine.ping(link, token)
            self.flusher.flush()

    # ------------------------------------------------------------ drain

    async def _drain(self, mode: str = "hot_restart") -> None:
        """Stop taking work, finish what is in flight, answer the rest.

        Every downstream connection (SDK and peer proxy alike) gets GOAWAY at
        once: send nothing new here. Requests that still arrive are answered
        HOT_RESTART (not processed). The connections stay open until their
        peers close them, which they do once nothing is outstanding on them:
        closing from this side could cut a request the peer is sending. All of
        it is bounded by ``drain_time``.
        """
        engine = self.engine
        engine.drain_mode = mode
        if self.discovery is not None and not self.handed_over:
            await self.discovery.stopping()  # callers stop picking us before we go
        for group in self.conns.values():
            for conn in list(group):
                engine.goaway(conn.link, "draining" if not self.handed_over else "hot restart")
        self.flusher.flush()
        if self.http is not None:
            self.http.drain()
        log.info(
            "draining: %d requests in flight, %d connections, up to %.1fs",
            engine.pending_count,
            sum(len(g) for g in self.conns.values()),
            self.config.proxy.drain_time,
        )
        with trio.move_on_after(self.config.proxy.drain_time):
            while engine.pending_count or any(self.conns.values()) or (self.http is not None and self.http.open_connections):
                await trio.sleep(0.005)
        left = engine.abort_all("proxy shut down before the response arrived", [c.link for c in self.upstream_conns])
        self.flusher.flush()
        if left:
            log.warning("drain time over: %d requests answered UNAVAILABLE", left)
            self.stats.error("drain_aborted", left)
        # let the last responses leave
        with trio.move_on_after(0.5):
            for conn in list(self.conns["outbound"]) + list(self.conns["inbound"]):
                if conn.link.out:
                    await conn.drained.wait()
        if self.discovery is not None and not self.handed_over:
            await self.discovery.deregister()
        self.drained.set()
        log.info("drained")
        self.hot_restart.fire(ParentEvent.DRAINED)

    # ------------------------------------------------------------ admin

    def _register_gauges(self) -> None:
        reg = self.stats.registry
        reg.gauge_func("octoproxy_pending_requests", "Requests in flight through this proxy.", lambda: float(self.engine.pending_count))
        reg.gauge_func("octoproxy_draining", "1 while the proxy drains.", lambda: float(self.draining))
        reg.gauge_func(
            "octoproxy_control_plane_connected",
            "1 while the discovery stream is up (without discovery: 1).",
            lambda: float(self.discovery is None or self.discovery.client.connected),
        )
        reg.gauge_func("octoproxy_subscriptions", "Services subscribed through discovery.", lambda: float(len(self.subscriptions())))
        reg.gauge_func("octoproxy_hot_restart_generation", "Hot-restart generation of this process (0: first).", lambda: float(self.generation))
        reg.gauge_func(
            "octoproxy_tls_certificate_rotations",
            "Certificates loaded after the first (mTLS), since start.",
            lambda: float(self.tls.contexts.rotations if self.tls is not None and self.tls.contexts is not None else 0),
        )
        reg.gauge_func(
            "octoproxy_tls_certificate_expiry_timestamp_seconds",
            "When this proxy's mTLS certificate expires (Unix time; 0: none).",
            lambda: float(self.tls.not_after() if self.tls is not None else 0),
        )
        reg.gauge_func("octoproxy_hot_restart_parent_alive", "1 while the previous generation still drains.", lambda: float(self.parent_alive))

    def ready_state(self) -> dict[str, Any]:
        clusters = {}
        ok = not self.draining and not self.health_failed
        for name, c in self.engine.clusters.items():
            ready = sum(1 for ep in c.endpoints if c.links.get(ep.address))
            clusters[name] = {"endpoints": len(c.endpoints), "connected": ready}
            if c.endpoints and not ready:
                ok = False
        app = self.engine.inbound_cluster
        if self.discovery is not None and not self.discovery.restored.is_set():
            ok = False  # subscriptions are restored before we say ready
        detail: dict[str, Any] = {
            "ready": ok,
            "draining": self.draining,
            "healthcheck_failed": self.health_failed,
            "hot_restart": {
                "generation": self.generation,
                "state": self.hot_restart.state.value,
                "parent_alive": self.parent_alive,
                "force_closed": self.force_closed,
            },
            "clusters": clusters,
        }
        if self.discovery is not None:
            detail["discovery"] = self.discovery.state()
        guard = self.engine.inbound_guard
        if guard is not None and guard.policy_source is not None:
            p = guard.policy_source
            detail["authz"] = {"version": p.version, "default": p.default, "rules": len(p.rules)}
        detail["tls"] = {"mode": self.config.tls_mode}
        if self.tls is not None:
            contexts = self.tls.contexts
            detail["tls"].update(rotations=contexts.rotations if contexts else 0, not_after=self.tls.not_after())
            if contexts is None:
                detail["ready"] = False  # no certificate yet: nothing to serve peers with
                detail["tls"]["waiting_for_certificate"] = getattr(self.tls, "last_error", "") or True
        if app is not None:
            connected = bool(app.links.get(app.endpoints[0].address))
            detail["local_app"] = {"address": app.endpoints[0].address, "connected": connected}
            if not connected:
                detail["ready"] = False
        return detail

    def _admin_routes(self) -> dict[tuple[str, str], Any]:
        async def healthz(_req: Request) -> Response:
            return Response(200, "ok\n")

        async def ready(_req: Request) -> Response:
            state = self.ready_state()
            return Response(200 if state["ready"] else 503, state)

        async def stats(_req: Request) -> Response:
            return Response(200, self.stats.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

        async def clusters(_req: Request) -> Response:
            out: dict[str, dict[str, Any]] = {}
            for name, c in self.engine.clusters.items():
                out[name] = {
                    "lb": c.lb,
                    "endpoints": [
                        {
                            "address": ep.address,
                            "weight": ep.weight,
                            "region": ep.region,
                            "idc": ep.idc,
                            "tags": ep.tags,
                            "healthy": ep.healthy,
                            "active_requests": ep.active,
                            "connections": len(c.links.get(ep.address, [])),
                        }
                        for ep in c.endpoints
                    ],
                    # requests waiting for a connection of it being made (the engine's held queue)
                    "held_requests": self.engine.held.count(CONNECTING, c),
                }
                if c.gov is not None:  # a governed route uses it (docs/governance.md)
                    out[name]["governance"] = c.gov.state(self.engine.now_ms(trio.current_time()))
            return Response(200, out)

        async def config_dump(_req: Request) -> Response:
            data = json.loads(json.dumps(self.config.to_dict(), default=str))
            ps = self.engine.policies  # the policy set in force (from [governance] or pushed live)
            governance = {"version": ps.version, "governed_routes": self.engine.governed_routes()} if ps is not None else None
            return Response(
                200,
                {"version": __version__, "codec": frame.IMPLEMENTATION, "config": data, "addresses": self.addresses, "governance": governance},
            )

        async def governance(_req: Request) -> Response:
            # the control plane's policies this proxy holds (proxy/_discovery.py)
            if self.discovery is None:  # the [governance] table alone
                from ..governance import dump_policy_set

                local = self.config.governance
                return Response(200, {
                    "version": local.version if local is not None else "", "applied": 0,
                    "policy": dump_policy_set(local) if local is not None else None, "control_plane_version": "",
                    "local_version": local.version if local is not None else None, "sources": {}, "endpoints": {},
                    "inbound_instances": self.engine.inbound_instances,
                })  # fmt: skip
            return Response(200, self.discovery.governance_state())

        async def subscribe(req: Request) -> Response:
            if self.discovery is None:
                return Response(404, {"error": "discovery is not configured on this proxy ([discovery] section)"})
            from ._discovery import MAX_SUBSCRIPTIONS as _MAX_SUBSCRIPTIONS
            from ._discovery import service_names  # loaded already: discovery is configured

            try:
                body = req.json()
                if not isinstance(body, dict):
                    raise ValueError('expected JSON {"services": ["name", ...], "timeout": seconds}')
                services = service_names(body.get("services"))  # checked before anything is saved
                timeout = float(body.get("timeout", self.discovery.cfg.subscribe_timeout))
            except (ValueError, TypeError) as exc:
                return Response(400, {"error": str(exc)})
            # open without the token (the SDK calls it), so bounded: names per call, total, wait
            if len(services) > _SUBSCRIBE_MAX_NAMES or not all(0 < len(n) <= 255 for n in services):
                return Response(400, {"error": f"at most {_SUBSCRIBE_MAX_NAMES} service names of 1..255 characters"})
            if not 0 <= timeout <= _SUBSCRIBE_MAX_TIMEOUT:  # NaN fails too
                return Response(400, {"error": f"timeout: expected 0..{_SUBSCRIBE_MAX_TIMEOUT} seconds"})
            total = len(set(self.discovery.subscribed) | set(services))
            if total > _MAX_SUBSCRIPTIONS:
                self.stats.error("subscription_limit")
                return Response(429, {"error": f"this proxy holds at most {_MAX_SUBSCRIPTIONS} subscriptions"})
            try:
                counts = await self.discovery.subscribe(services, timeout=timeout)
            except trio.TooSlowError:
                return Response(504, {"error": f"endpoints not all known within {timeout}s; the subscription stays", "services": services})
            return Response(200, {"services": {n: {"endpoints": c} for n, c in counts.items()}})

        async def app_config(req: Request) -> Response:
            state = self.discovery.appconfig if self.discovery is not None else None
            if state is None:
                return Response(404, {"error": "no configuration for the app: needs [discovery] and proxy.service"})
            from ._appconfig import parse_watch

            try:
                watch, timeout = parse_watch(dict(req.query))
            except ValueError as exc:
                return Response(400, {"error": str(exc)})
            if watch is not None and not await state.wait_changed(watch, timeout):
                return Response(429, {"error": "too many configuration watchers on this proxy; retry later"})
            return Response(200, state.answer())

        async def unsubscribe(req: Request) -> Response:
            if self.discovery is None:
                return Response(404, {"error": "discovery is not configured on this proxy ([discovery] section)"})
            from ._discovery import service_names  # loaded already: discovery is configured

            try:
                body = req.json()
                if not isinstance(body, dict):
                    raise ValueError('expected JSON {"services": ["name", ...]}')
                services = service_names(body.get("services"))
            except (ValueError, TypeError) as exc:
                return Response(400, {"error": str(exc)})
            self.discovery.unsubscribe(services)
            return Response(200, {"unsubscribed": services})

        async def drain(_req: Request) -> Response:
            self.request_shutdown()
            return Response(200, {"draining": True})

        async def hc_fail(_req: Request) -> Response:
            self.health_failed = True
            return Response(200, {"healthcheck_failed": True})

        async def hc_ok(_req: Request) -> Response:
            self.health_failed = False
            return Response(200, {"healthcheck_failed": False})

        return {
            ("GET", "/healthz"): healthz,
            ("GET", "/ready"): ready,
            ("GET", "/stats"): stats,
            ("GET", "/clusters"): clusters,
            ("GET", "/config_dump"): config_dump,
            ("GET", "/governance"): governance,
            ("POST", "/drain"): drain,
            ("POST", "/subscribe"): subscribe,
            ("GET", "/config"): app_config,
            ("POST", "/unsubscribe"): unsubscribe,
            ("POST", "/healthcheck/fail"): hc_fail,
            ("POST", "/healthcheck/ok"): hc_ok,
        }


