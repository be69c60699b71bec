"""On-demand discovery in the proxy: subscriptions, dynamic clusters, registration.

The proxy holds only the services its own app calls. A service gets
subscribed three ways: ``POST /subscribe`` (the SDK does it on connect), the
first request for a service with no route (it waits for the subscription
within its deadline), and the persisted subscription file at start-up, which
is restored before the proxy reports ready. Subscriptions unused for
``discovery.idle_unsubscribe`` seconds are dropped.

Every subscribed service becomes a cluster named after it, with a route
``(service, "*")`` (a static route for the same service wins), and one pool of
upstream connections per endpoint. Endpoint changes from the control plane
are applied in place: new endpoints get connections, removed ones are drained
(their connections close when their in-flight requests are answered), and
endpoints that are not HEALTHY (STARTING, STOPPING, UNHEALTHY) get no new
requests. A removed *service* is kept for ``REMOVAL_GRACE`` seconds, so that a
control plane that restarts without its state (providers re-register within
a lease) does not empty a cluster under traffic. While the control plane is
unreachable the proxy keeps its last endpoints and says so in ``/ready``.

With each service's endpoints the proxy subscribes to its ``RouteRules`` and
its ``GovernancePolicy`` (and, on the provider side, to its own service's
policy): whenever what it holds changes it hands the proxy's ``[governance]``
with the control plane's policies over it to ``Proxy.set_governance``, route
rules folded into the policies' routing (docs/control-plane.md section 10).
Each discovered endpoint gets the routing facts the governed balancer uses
(center, backup role, warm-up start).

On the provider side the proxy registers its app's endpoint once the app's
UDS answers, marks it STOPPING when it drains (so callers stop picking it
before it goes) and deregisters at the end; a hot restart hands the
registration over instead (the new generation registers the same address).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..core._balancer import Endpoint
from ..discovery._governance import HeldPolicies, control_plane_policy_set, effective_policy_set
from ..discovery._governance import policy_from_message as policy_from_governance
from ..discovery._xds_client import TYPE_APPCONFIG, TYPE_AUTHZ, TYPE_GOVERNANCE, TYPE_ROUTES
from ..discovery._xds_server import check_service_name
from ..discovery import TYPE_ENDPOINTS, ResourceChange
from ..discovery._client import DiscoveryClient
from ..governance import PolicySet, ServicePolicy, dump_policy_set
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ..core._authz import policy_from_message
from ..core._engine import Cluster, Route

if TYPE_CHECKING:
    from ._appconfig import AppConfigState
    from ._server import Proxy

log = logging.getLogger("octoproxy.discovery")

__all__ = [
    "Discovery", "REMOVAL_GRACE", "SUBSCRIPTIONS_FILE_MAX", "SUBSCRIPTIONS_FILE_MODE", "SubscriptionsFileError",
    "read_subscriptions_file", "read_state_file", "service_names", "write_atomic", "run_blocking",
]  # fmt: skip

T = TypeVar("T")

#: a service the control plane says is gone keeps its endpoints this long
REMOVAL_GRACE = 10.0
#: lazy subscriptions stop here (explicit POST /subscribe is not limited)
MAX_SUBSCRIPTIONS = 10000
#: what the proxy subscribes to for each service its app calls
SERVICE_TYPES = (TYPE_ENDPOINTS, TYPE_ROUTES, TYPE_GOVERNANCE)


#: the subscriptions file is refused past this size (10,000 long names fit)
SUBSCRIPTIONS_FILE_MAX = 4 * 1024 * 1024
#: the subscriptions file is written with this mode (it is the proxy's own state)
SUBSCRIPTIONS_FILE_MODE = 0o600


class SubscriptionsFileError(ValueError):
    """The subscriptions file cannot be used; the message names the file and what is wrong."""


def service_names(value: object, what: str = "services") -> list[str]:
    """Check a list of service names (from the subscriptions file or ``POST /subscribe``).

    Args:
        value: what was decoded from JSON.
        what: how to name it in the error (``"services"``).

    Returns:
        The names, in order.

    Raises:
        ValueError: ``value`` is not a list of valid service names; the
            message names the first bad entry (``services[1]: ...``).
    """
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a list of service names, got {_describe(value)}")
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise ValueError(f"{what}[{i}]: expected a service name (a string), got {_describe(name)}")
        reason = check_service_name(name)
        if reason is not None:
            raise ValueError(f"{what}[{i}]: {reason}")
    return list(value)


def _describe(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def read_subscriptions_file(path: Path) -> list[str]:
    """Read and check the subscriptions file. Blocking: run it in a worker thread.

    Only a regular file is read: a FIFO, a device or a symbolic link is
    refused without blocking (``O_NONBLOCK | O_NOFOLLOW``, then ``fstat``),
    and so is a file over :data:`SUBSCRIPTIONS_FILE_MAX` bytes.

    Returns:
        The service names (none if the file does not exist).

    Raises:
        SubscriptionsFileError: the file cannot be read, is not a regular
            file, is too big, is not JSON, or is not ``{"services": [names]}``.
    """
    data = read_state_file(path, SUBSCRIPTIONS_FILE_MAX)
    if data is None:
        return []
    if not isinstance(data, dict) or "services" not in data:
        raise SubscriptionsFileError(f'{path}: expected {{"services": [names]}}, got {_describe(data)}')
    try:
        return service_names(data["services"])
    except ValueError as exc:
        raise SubscriptionsFileError(f"{path}: {exc}") from None


def read_state_file(path: Path, max_size: int) -> Any:
    """Read a JSON state file the proxy wrote (subscriptions, the app's configuration).

    Blocking: run it in a worker thread. Only a regular file is read (a FIFO,
    a device or a symbolic link is refused without blocking: ``O_NONBLOCK |
    O_NOFOLLOW``, then ``fstat``), and at most ``max_size`` bytes of it.

    Returns:
        The decoded JSON, or ``None`` if the file does not exist.

    Raises:
        SubscriptionsFileError: the file cannot be read, is not a regular
            file, is too big, or is not JSON.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SubscriptionsFileError(f"{path}: is a symbolic link; only a regular file is read") from None
        raise SubscriptionsFileError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SubscriptionsFileError(f"{path}: is not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > max_size:
            raise SubscriptionsFileError(f"{path}: {st.st_size} bytes, more than the {max_size} allowed")
        chunks, size = [], 0
        while size <= max_size:  # bounded even if the file grows while we read
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise SubscriptionsFileError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > max_size:
        raise SubscriptionsFileError(f"{path}: more than the {max_size} bytes allowed")
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:  # also bad UTF-8
        raise SubscriptionsFileError(f"{path}: not valid JSON ({exc})") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return kind
    return "not a regular file"


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, so that the event loop never waits on the disk.

    Under a :class:`trio.testing.MockClock` (tests, ``octoproxy.testing``
    meshes with ``autojump_clock``) it runs inline instead: a task waiting on a
    thread looks idle to autojump, which would move virtual time past every
    deadline while the disk works.
    """
    testing = sys.modules.get("trio.testing")  # not imported unless a test did (it costs ~10 MB)
    if testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock):
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def write_atomic(path: Path, data: bytes, mode: int = SUBSCRIPTIONS_FILE_MODE) -> None:
    """Write a file so that readers see the old or the new content, never a mix.

    A temporary file beside ``path`` (created exclusively, with ``mode``, not
    through a symbolic link) is written, fsynced and renamed over ``path``;
    then the directory is fsynced. Blocking: run it in a worker thread.

    Raises:
        OSError: the file could not be written (``path`` is unchanged).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # left over by a crash of a process with our pid
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _control_plane_tls(ca_file: Path | None) -> ssl.SSLContext:
    """Client TLS context for a ``wss://`` control plane (used only for such URLs)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def proxy_service(d: Discovery) -> str:
    return d.proxy.config.proxy.service


class Discovery:
    """The proxy's side of discovery (one per proxy process)."""

    def __init__(self, proxy: Proxy) -> None:
        cfg = proxy.config.discovery
        assert cfg is not None
        self.proxy = proxy
        self.cfg = cfg
        self.engine = proxy.engine
        node = cfg.node_id or f"{proxy.config.proxy.service or 'octoproxy'}@{socket.gethostname()}:{os.getpid()}"
        self.client = DiscoveryClient(
            list(cfg.control_plane),
            node,
            self._on_change,
            token=self._join_token,
            validate=self._validate,
            ssl_context=_control_plane_tls(cfg.ca_file) if any(u.startswith("wss:") for u in cfg.control_plane) else None,
        )
        self.path = proxy.config.subscriptions_path
        #: service -> when it was subscribed / last seen used
        self.subscribed: dict[str, float] = {}
        self._last_picks: dict[str, int] = {}
        self._removed_at: dict[str, float] = {}
        self._lazy: set[str] = set()
        self.restored = trio.Event()
        self._save_lock = trio.Lock()
        self._changes = 0  # bumped on every change of self.subscribed
        self._saved = 0  # the change count the file holds
        self.registered_address: str | None = None
        self._token_mode_warned = False
        self._nursery: trio.Nursery | None = None
        self.route_timeout = cfg.route_timeout or proxy.config.upstream.default_timeout
        #: an explicit discovery.route_timeout is a cap; unset, the caller's deadline holds
        self.route_max_timeout = cfg.route_timeout or 0.0
        #: the app's configuration (``proxy.service`` set): see proxy/_appconfig.py
        self.appconfig: AppConfigState | None = None
        if proxy.config.proxy.service and check_service_name(proxy.config.proxy.service) is None:
            from ._appconfig import AppConfigState

            settings = proxy.config.proxy
            self.appconfig = AppConfigState(settings.service, settings.environment, proxy.config.app_config_path)
        #: the control plane's policies for the services we call or serve (``None``: nothing pushed)
        self.governance: PolicySet | None = None
        #: what ``Proxy.set_governance`` got last: ``[governance]`` with :attr:`governance` over it
        self.effective: PolicySet | None = proxy.config.governance
        #: how many times a policy set was handed to the proxy
        self.governance_applied = 0
        self._held_policies: dict[str, HeldPolicies] = {}
        #: GovernancePolicy parsed once per resource version: name -> (version, policy)
        self._parsed: dict[str, tuple[str, ServicePolicy]] = {}
        #: service -> address -> warm-up window (ms) of discovered endpoints, as registered (0: the route's)
        self.warmup_windows: dict[str, dict[str, int]] = {}
        self._app_up_unix_ms = 0

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.client.run)
            if self.appconfig is not None:
                await self.appconfig.restore()  # the last known values, until the control plane answers
                self.client.subscribe_nowait([self.appconfig.name], types=(TYPE_APPCONFIG,))
            if self._own_service():  # our service's policy (inbound limits...): waited for by _restore
                self.client.subscribe_nowait([self._own_service()], types=(TYPE_GOVERNANCE,))
            self.engine.on_unknown_service = self._lazy_subscribe
            self.engine.unrouted_timeout = self.cfg.subscribe_timeout + 1.0
            task_status.started()
            nursery.start_soon(self._restore)
            if self.cfg.idle_unsubscribe > 0:
                nursery.start_soon(self._reap_idle)
            nursery.start_soon(self._expire_removals)
            if self.proxy.config.inbound is not None and self.cfg.register:
                nursery.start_soon(self._register)
            if self.engine.inbound_guard is not None and proxy_service(self):
                nursery.start_soon(self._watch_authz)

    async def _restore(self) -> None:
        """Subscribe to what the file says, before the proxy reports ready.

        A file that cannot be used (not a regular file, too big, not JSON of
        the right shape) is logged in one line and ignored: the proxy starts
        without it (and rewrites it on the next change), so a bad file never
        blocks a start or a hot restart.

        The policies come with them (and our own service's, subscribed in
        :meth:`run`): a proxy reports ready, and a hot restart's successor
        takes traffic, with the control plane's governance in force.
        """
        deadline = trio.current_time() + self.cfg.subscribe_timeout
        names: list[str] = []
        try:
            names = await run_blocking(read_subscriptions_file, self.path)
        except SubscriptionsFileError as exc:
            log.error("subscriptions file ignored, starting without its subscriptions: %s", exc)
            self.proxy.stats.error("subscriptions_file_invalid")
        inherited = [n for n in self.proxy.inherited_subscriptions if isinstance(n, str) and check_service_name(n) is None]
        if len(inherited) != len(self.proxy.inherited_subscriptions):
            log.error("hot restart: ignored %d invalid subscription names from the previous generation",
                      len(self.proxy.inherited_subscriptions) - len(inherited))  # fmt: skip
        names += inherited
        if names:
            log.info("restoring %d subscriptions from %s", len(set(names)), self.path)
            try:
                await self.subscribe(names, timeout=self.cfg.subscribe_timeout)
            except trio.TooSlowError:
                log.warning("subscriptions not all held after %.1fs; kept, serving what is known", self.cfg.subscribe_timeout)
        own = self._own_service()
        if own:
            try:
                timeout = max(deadline - trio.current_time(), 0.0)
                await self.client.subscribe([own], timeout=timeout, types=(TYPE_GOVERNANCE,))
            except trio.TooSlowError:
                log.warning("no answer about the governance policy of %s yet; [governance] applies meanwhile", own)
        self.restored.set()

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, names: Iterable[str], timeout: float) -> dict[str, int]:
        """Subscribe and wait until every name is held (or known absent).

        Returns:
            Endpoints known per service.

        Raises:
            ValueError: a name is not a valid service name (nothing was
                subscribed or saved).
            trio.TooSlowError: not all held within ``timeout`` (the
                subscriptions stay, and are persisted).
        """
        names = sorted(set(service_names(list(names))))
        now = trio.current_time()
        new = [n for n in names if n not in self.subscribed]
        for n in names:
            self.subscribed[n] = now
        if new:
            await self._save()
        await self.client.subscribe(names, timeout=timeout, types=SERVICE_TYPES)
        held = self.client.held(TYPE_ENDPOINTS)
        return {n: len(getattr(held.get(n), "endpoints", ())) for n in names}

    def unsubscribe(self, names: Iterable[str]) -> None:
        names = [n for n in set(names) if n in self.subscribed]
        if not names:
            return
        own = self._own_service()
        self.client.unsubscribe(names, types=(TYPE_ENDPOINTS, TYPE_ROUTES))
        self.client.unsubscribe([n for n in names if n != own], types=(TYPE_GOVERNANCE,))  # (ours stays watched)
        for n in names:
            del self.subscribed[n]
            self._drop_service(n)
        self._apply_governance()
        if self._nursery is not None:
            self._nursery.start_soon(self._save)

    async def _save(self) -> None:
        """Persist the subscriptions (atomic write and fsync in a worker thread).

        Saves coalesce: a save that finds a newer snapshot already written
        returns at once, so a burst of changes costs one or two writes.
        """
        self._changes += 1
        wanted = self._changes
        async with self._save_lock:
            if self._saved >= wanted:
                return
            snapshot = self._changes
            data = json.dumps({"services": sorted(self.subscribed)}).encode()
            try:
                await run_blocking(write_atomic, self.path, data)
            except OSError as exc:
                log.error("cannot persist subscriptions to %s: %s", self.path, exc)
                self.proxy.stats.error("subscriptions_persist_failed")
                return
            self._saved = snapshot

    def _lazy_subscribe(self, service: str) -> None:
        """The engine saw a request for an unknown service: subscribe, then release it."""
        if service in self._lazy or self._nursery is None:
            return
        if check_service_name(service) is not None:  # the control plane would refuse it: NO_ROUTE, nothing saved
            self.engine.release_unrouted(service, False, trio.current_time())
            return
        if len(self.subscribed) >= MAX_SUBSCRIPTIONS:
            # callers naming ever new services must not grow us without bound
            log.warning("not subscribing to %s: already %d subscriptions", service, len(self.subscribed))
            self.proxy.stats.error("subscription_limit")
            self.engine.release_unrouted(service, False, trio.current_time())
            return
        self._lazy.add(service)
        self._nursery.start_soon(self._lazy_task, service)

    async def _lazy_task(self, service: str) -> None:
        found = False
        try:
            counts = await self.subscribe([service], timeout=self.cfg.subscribe_timeout)
            found = counts.get(service, 0) > 0
            log.info("lazy subscription to %s: %d endpoints", service, counts.get(service, 0))
        except trio.TooSlowError:
            log.warning("lazy subscription to %s: no answer within %.1fs", service, self.cfg.subscribe_timeout)
        finally:
            self._lazy.discard(service)
            found = found and any(r.service == service for r in self.engine.routes)
            self.engine.release_unrouted(service, found, trio.current_time())
            self.proxy.flusher.flush()

    async def _reap_idle(self) -> None:
        idle = self.cfg.idle_unsubscribe
        while True:
            await trio.sleep(max(min(idle / 4, 30.0), 0.05))
            now = trio.current_time()
            stale = []
            for name, since in list(self.subscribed.items()):
                cluster = self.engine.clusters.get(name)
                picks = cluster.picks if cluster is not None else 0
                if picks != self._last_picks.get(name):
                    self._last_picks[name] = picks
                    self.subscribed[name] = now
                elif now - since >= idle:
                    stale.append(name)
            if stale:
                log.info("dropping %d subscriptions unused for %.0fs: %s", len(stale), idle, ", ".join(stale))
                self.unsubscribe(stale)

    # ------------------------------------------------------------ applying changes

    # ------------------------------------------------------------ authorization policy (pushed)

    async def _watch_authz(self) -> None:
        """Subscribe to our own service's AuthorizationPolicy; updates apply as they come."""
        try:
            await self.client.subscribe([proxy_service(self)], timeout=self.cfg.subscribe_timeout, types=(TYPE_AUTHZ,))
        except trio.TooSlowError:
            log.warning("no answer about the authorization policy of %s yet; [authz] applies meanwhile", proxy_service(self))

    def _validate(self, type_url: str, name: str, resource: Any) -> None:
        """NACK an invalid delivery (raising rejects the update; nothing changes)."""
        if type_url == TYPE_AUTHZ:
            policy_from_message(resource, proxy_service(self), "check")
        elif type_url == TYPE_GOVERNANCE:
            policy_from_governance(resource)  # a PolicyError lists every error in the NACK
        elif type_url == TYPE_APPCONFIG:
            if self.appconfig is None:
                raise ValueError("this proxy has no proxy.service: no configuration expected")
            self.appconfig.validate(name, resource)

    def _apply_authz(self, change: ResourceChange) -> None:
        guard = self.engine.inbound_guard
        if guard is None or change.name != proxy_service(self):
            return
        if change.resource is None:
            guard.set_policy(guard.config_policy)
            log.info("authorization policy of %s removed from the control plane: [authz] applies", change.name)
            return
        policy = policy_from_message(change.resource, change.name, change.version)  # validated already
        guard.set_policy(policy)
        log.info("authorization policy of %s version %s applied (%d rules, default %s)", change.name, change.version, len(policy.rules), policy.default)

    def _own_service(self) -> str:
        """The service this proxy serves (registers), or ``""``."""
        return proxy_service(self) if self.proxy.config.inbound is not None else ""

    def _apply_governance(self) -> None:
        """Hand the control plane's policies for what we hold to the proxy, if they changed.

        Policies were checked when they arrived (``_validate``: an invalid one
        is NACKed and never held), so parsing them again cannot fail. Route
        rules become the routing of a service whose policy has none.
        """
        policies = self.client.held(TYPE_GOVERNANCE)
        versions = self.client.core.versions(TYPE_GOVERNANCE)
        held: dict[str, HeldPolicies] = {}
        for name, msg in policies.items():
            assert isinstance(msg, pb.GovernancePolicy)
            cached = self._parsed.get(name)
            if cached is None or cached[0] != versions[name]:
                cached = self._parsed[name] = (versions[name], policy_from_governance(msg))
            held[name] = HeldPolicies(policy=(msg.version, cached[1]), policy_resource_version=versions[name])
        for name in set(self._parsed) - set(policies):
            del self._parsed[name]
        route_versions = self.client.core.versions(TYPE_ROUTES)
        for name, rules in self.client.held(TYPE_ROUTES).items():
            assert isinstance(rules, pb.RouteRules)
            held[name] = replace(held.get(name, HeldPolicies()), routes=(route_versions[name], rules))
        self._held_policies = held
        pushed = control_plane_policy_set(held)
        if (pushed.version if pushed else None) == (self.governance.version if self.governance else None):
            return
        self.governance = pushed
        self.effective = effective_policy_set(self.proxy.config.governance, pushed)
        self.governance_applied += 1
        ignored = sorted(n for n, h in held.items() if h.routes_ignored)
        if ignored:
            log.warning("route rules of %s ignored: their governance policy has its own routing", ", ".join(ignored))
        log.info("governance from the control plane: %s", pushed.version if pushed else "none ([governance] applies)")
        self.proxy.set_governance(self.effective)

    def _on_change(self, changes: list[ResourceChange]) -> None:
        now = trio.current_time()
        governance = False
        for change in changes:
            if change.type_url in (TYPE_GOVERNANCE, TYPE_ROUTES):
                governance = True
                continue
            if change.type_url == TYPE_APPCONFIG:
                if self.appconfig is not None and change.name == self.appconfig.name and self._nursery is not None:
                    self.appconfig.delivered(change.resource, self._nursery)
                continue
            if change.type_url == TYPE_AUTHZ:
                self._apply_authz(change)
                continue
            if change.type_url == TYPE_ENDPOINTS and change.name == self._own_service():
                # inbound cluster_rate limits are divided among our service's live instances
                eps = getattr(change.resource, "endpoints", ())
                self.engine.set_inbound_instances(sum(1 for ep in eps if ep.status == pb.Endpoint.HEALTHY))
            if change.type_url != TYPE_ENDPOINTS or change.name not in self.subscribed:
                continue  # (not subscribed: our own service, watched by _register)
            if change.resource is None:
                if change.name in self.engine.clusters and change.name not in self._removed_at:
                    self._removed_at[change.name] = now  # applied after REMOVAL_GRACE
                continue
            self._removed_at.pop(change.name, None)
            self._apply(change.name, list(change.resource.endpoints))
        if governance:
            self._apply_governance()
        self.proxy.flusher.flush()

    async def _expire_removals(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for name, t in list(self._removed_at.items()):
                if now - t >= REMOVAL_GRACE:
                    del self._removed_at[name]
                    if self.client.is_absent(name):
                        log.info("service %s is gone: dropping its endpoints", name)
                        self._apply(name, [])

    def _apply(self, service: str, endpoints: list[Any]) -> None:
        engine = self.engine
        static = any(r.service == service for r in self.proxy.static_routes)
        if static:
            return  # a static route for this service wins
        cluster = engine.clusters.get(service)
        if cluster is None:
            cluster = Cluster(service, self.cfg.lb, [])
            engine.clusters[service] = cluster
            engine.set_routes(list(engine.routes) + [Route(service, "*", service, self.route_timeout, self.route_max_timeout)])
            log.info("new cluster %s from discovery", service)
        wanted = {ep.address: ep for ep in endpoints}
        current = {ep.address: ep for ep in cluster.endpoints}
        windows = self.warmup_windows.setdefault(service, {})
        for address, ep in current.items():
            if address not in wanted:
                cluster.endpoints.remove(ep)
                windows.pop(address, None)
                self.proxy.stop_endpoint(cluster, ep)
        for address, src in wanted.items():
            weight = src.weight or 100
            if src.status != pb.Endpoint.HEALTHY:
                weight = 0  # registered but not routable: no new requests
            known = current.get(address)
            if known is None:
                ep = Endpoint(address, weight, src.region, src.idc, dict(src.tags))
                ep.healthy = False  # until a connection is up
                cluster.endpoints.append(ep)
                self.proxy.start_endpoint(cluster, ep)
            else:
                ep = known
                known.weight = weight
                known.region, known.idc, known.tags = src.region, src.idc, dict(src.tags)
            # the governed balancer's facts; its clock is unix ms (Engine.now_ms), as the control plane's stamp
            ep.center, ep.backup, ep.warmup_start_ms = src.center, src.role == pb.Endpoint.BACKUP, src.warmup_start_unix_ms
            ep.warmup_window_ms = windows[address] = src.warmup_window_ms
        if not windows:
            del self.warmup_windows[service]
        cluster.balancer = None
        cluster.__post_init__()  # a fresh balancer over the new endpoint list

    def _drop_service(self, service: str) -> None:
        cluster = self.engine.clusters.get(service)
        if cluster is None or any(r.service == service for r in self.proxy.static_routes):
            return
        for ep in list(cluster.endpoints):
            self.proxy.stop_endpoint(cluster, ep)
        self.warmup_windows.pop(service, None)
        del self.engine.clusters[service]
        self.engine.set_routes([r for r in self.engine.routes if r.cluster != service])

    # ------------------------------------------------------------ registration

    def _join_token(self) -> str | None:
        """The join token, read at each connection (so the file can be replaced)."""
        path = self.cfg.join_token_file
        if path is None:
            return None
        try:
            # A few bytes, read on the loop: non-blocking open and regular files only, so
            # a FIFO or a device at that path cannot hang or bloat the proxy.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    log.error("discovery.join_token_file %s is not a regular file", path)
                    return None
                if st.st_mode & 0o077 and not self._token_mode_warned:
                    self._token_mode_warned = True
                    log.warning("discovery.join_token_file %s is readable by others (mode %o): chmod 600 it", path, st.st_mode & 0o777)
                return os.read(fd, 4096).decode("ascii", "replace").strip() or None
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot read discovery.join_token_file %s: %s", path, exc)
            return None

    def _registration_missing(self, service: str, address: str) -> bool:
        """True if the control plane's view of our own service lacks our endpoint.

        It happens when an operator deleted it or its lease expired while we
        stayed connected: we then register again (issue 11: "a provider whose
        registration disappears puts it back").
        """
        if not self.client.connected or not self.client.core.is_resolved(TYPE_ENDPOINTS, service):
            return False
        held = self.client.held(TYPE_ENDPOINTS).get(service)
        return held is None or all(ep.address != address for ep in getattr(held, "endpoints", ()))

    def _advertised(self) -> str:
        if self.cfg.advertise:
            return self.cfg.advertise
        return self.proxy.addresses.get("inbound", "")

    async def _register(self) -> None:
        """Register the local app's endpoint while the app answers; mark it UNHEALTHY when it does not."""
        service = self.proxy.config.proxy.service
        app = self.engine.inbound_cluster
        if not service or app is None:
            log.warning("registration needs proxy.service and [inbound]; not registering")
            return
        address = self._advertised()
        registered = healthy = False
        missing_since: float | None = None
        while True:
            # routable once the app answers and (mTLS) we hold a certificate to serve peers with
            up = bool(app.links.get(app.endpoints[0].address)) and self.proxy.tls_ready()
            if registered and healthy and up:
                if service not in self.client.core.wanted(TYPE_ENDPOINTS):
                    # watch our own service's endpoints, to notice our registration vanish
                    # (_on_change ignores it unless the app subscribed to it too)
                    self.client.subscribe_nowait([service], types=(TYPE_ENDPOINTS,))
                now = trio.current_time()
                if self._registration_missing(service, address):
                    missing_since = missing_since if missing_since is not None else now
                    if now - missing_since >= 0.5:  # not a change still on its way to us
                        log.warning("our registration of %s at %s disappeared: registering again", service, address)
                        registered = False
                        missing_since = None
                else:
                    missing_since = None
            if up != healthy or not registered:
                try:
                    if not registered and up:
                        if not self._app_up_unix_ms:  # our app's warm-up began when it first answered
                            self._app_up_unix_ms = int(time.time() * 1000)
                        px = self.proxy.config.proxy
                        ep = pb.Endpoint(
                            address=address,
                            weight=self.cfg.weight,
                            region=self.cfg.region or px.region,
                            idc=self.cfg.idc or px.idc,
                            center=px.center,
                            tags=dict(self.cfg.tags),
                            status=pb.Endpoint.HEALTHY,
                            role=pb.Endpoint.BACKUP if self.cfg.role == "backup" else pb.Endpoint.NORMAL,
                            warmup_window_ms=round(self.cfg.warmup * 1000),
                            warmup_start_unix_ms=self._app_up_unix_ms,
                        )
                        await self.client.register(service, ep, ttl=self.cfg.lease_ttl, timeout=5.0)
                        registered = healthy = True
                        self.registered_address = address
                        log.info("registered %s at %s (lease %.1fs)", service, address, self.cfg.lease_ttl)
                    elif registered:
                        status = pb.Endpoint.HEALTHY if up else pb.Endpoint.UNHEALTHY
                        await self.client.set_status(service, address, status, timeout=5.0)
                        healthy = up
                        log.info("%s at %s is now %s", service, address, pb.Endpoint.Status.Name(status))
                except (trio.TooSlowError, OSError, Exception) as exc:  # retried below
                    log.warning("registration of %s failed (%s); retrying", service, exc)
                    await trio.sleep(1.0)
                    continue
            await trio.sleep(0.05)

    async def stopping(self) -> None:
        """Drain began (no successor): mark our endpoint STOPPING so callers stop picking it."""
        if self.registered_address is None:
            return
        with trio.move_on_after(1.0):
            await self.client.set_status(self.proxy.config.proxy.service, self.registered_address, pb.Endpoint.STOPPING)

    async def deregister(self) -> None:
        if self.registered_address is None:
            return
        with trio.move_on_after(1.0):
            await self.client.deregister(self.proxy.config.proxy.service, self.registered_address)
            log.info("deregistered %s at %s", self.proxy.config.proxy.service, self.registered_address)

    def governance_state(self) -> dict[str, Any]:
        """``GET /governance``: the policy set in force, what the control plane pushed, the endpoints' routing facts."""
        ps, pushed = self.effective, self.governance
        local = self.proxy.config.governance
        return {
            "version": ps.version if ps is not None else "",
            "applied": self.governance_applied,
            "policy": dump_policy_set(ps) if ps is not None else None,
            "control_plane_version": pushed.version if pushed is not None else "",
            "inbound_instances": self.engine.inbound_instances,
            "local_version": local.version if local is not None else None,
            "sources": {
                name: {
                    "policy_version": h.policy[0] if h.policy is not None else None,
                    "route_rules": h.routes[0] if h.routes is not None else None,
                    "route_rules_ignored": h.routes_ignored,
                }
                for name, h in sorted(self._held_policies.items())
            },
            "endpoints": {
                service: {
                    ep.address: {
                        "region": ep.region,
                        "center": ep.center,
                        "idc": ep.idc,
                        "role": "backup" if ep.backup else "normal",
                        "warmup_start_unix_ms": ep.warmup_start_ms,
                        "warmup_window_ms": windows.get(ep.address, 0),
                    }
                    for ep in sorted(self.engine.clusters[service].endpoints, key=lambda e: e.address)
                }
                for service, windows in sorted(self.warmup_windows.items())
                if service in self.engine.clusters
            },
        }

    def state(self) -> dict[str, Any]:
        return {
            "control_plane": {"connected": self.client.connected, "url": self.client.url},
            "subscriptions": sorted(self.subscribed),
            "restored": self.restored.is_set(),
            "registered": self.registered_address,
            "governance": self.governance.version if self.governance is not None else "",
            "app_config": None if self.appconfig is None else {
                "name": self.appconfig.name, "version": self.appconfig.version, "source": self.appconfig.source,
            },
        }
