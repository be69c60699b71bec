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

On the provider side the proxy registers its app's endpoint once the app's
UDS answers, marks it STOPPING when it drains (so callers stop picking it
before it goes) and deregisters at the end; a hot restart hands the
registration over instead (the new generation registers the same address).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._balancer import Endpoint
from .._xds_client import TYPE_AUTHZ
from ..controlplane import TYPE_ENDPOINTS, DiscoveryClient, ResourceChange
from ..proto import octoproxy_discovery_pb2 as pb
from ._authz import policy_from_message
from ._engine import Cluster, Route

if TYPE_CHECKING:
    from ._server import Proxy

log = logging.getLogger("octoproxy.discovery")

__all__ = ["Discovery", "REMOVAL_GRACE"]

#: a service the control plane says is gone keeps its endpoints this long
REMOVAL_GRACE = 10.0
#: lazy subscriptions stop here (explicit POST /subscribe is not limited)
MAX_SUBSCRIPTIONS = 10000


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


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
        self.client = DiscoveryClient(list(cfg.control_plane), node, self._on_change, validate=self._validate)
        self.path = proxy.config.subscriptions_path
        #: service -> when it was subscribed / last seen used
        self.subscribed: dict[str, float] = {}
        self._last_picks: dict[str, int] = {}
        self._removed_at: dict[str, float] = {}
        self._lazy: set[str] = set()
        self.restored = trio.Event()
        self.registered_address: str | None = None
        self._nursery: trio.Nursery | None = None
        self.route_timeout = cfg.route_timeout or proxy.config.upstream.default_timeout

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.client.run)
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
        """Subscribe to what the file says, before the proxy reports ready."""
        names: list[str] = []
        try:
            data = json.loads(self.path.read_bytes())
            names = [str(n) for n in data.get("services", [])]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("cannot read subscriptions file %s (%s); starting with none", self.path, exc)
        names += self.proxy.inherited_subscriptions
        if names:
            log.info("restoring %d subscriptions from %s", len(set(names)), self.path)
            try:
                await self.subscribe(names, timeout=self.cfg.subscribe_timeout)
            except trio.TooSlowError:
                log.warning("subscriptions not all held after %.1fs; kept, serving what is known", self.cfg.subscribe_timeout)
        self.restored.set()

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, names: Iterable[str], timeout: float) -> dict[str, int]:
        """Subscribe and wait until every name is held (or known absent).

        Returns:
            Endpoints known per service.

        Raises:
            trio.TooSlowError: not all held within ``timeout`` (the
                subscriptions stay, and are persisted).
        """
        names = sorted(set(names))
        now = trio.current_time()
        new = [n for n in names if n not in self.subscribed]
        for n in names:
            self.subscribed[n] = now
        if new:
            self._persist()
        await self.client.subscribe(names, timeout=timeout)
        held = self.client.held(TYPE_ENDPOINTS)
        return {n: len(getattr(held.get(n), "endpoints", ())) for n in names}

    def unsubscribe(self, names: Iterable[str]) -> None:
        names = [n for n in set(names) if n in self.subscribed]
        if not names:
            return
        self.client.unsubscribe(names)
        for n in names:
            del self.subscribed[n]
            self._drop_service(n)
        self._persist()

    def _persist(self) -> None:
        try:
            write_atomic(self.path, json.dumps({"services": sorted(self.subscribed)}).encode())
        except OSError as exc:
            log.error("cannot persist subscriptions to %s: %s", self.path, exc)
            self.proxy.stats.error("subscriptions_persist_failed")

    def _lazy_subscribe(self, service: str) -> None:
        """The engine saw a request for an unknown service: subscribe, then release it."""
        if service in self._lazy or self._nursery is None:
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
        """NACK an invalid policy (raising rejects the update; nothing changes)."""
        if type_url == TYPE_AUTHZ:
            policy_from_message(resource, proxy_service(self), "check")

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

    def _on_change(self, changes: list[ResourceChange]) -> None:
        now = trio.current_time()
        for change in changes:
            if change.type_url == TYPE_AUTHZ:
                self._apply_authz(change)
                continue
            if change.type_url != TYPE_ENDPOINTS:
                continue
            if change.resource is None:
                if change.name in self.engine.clusters and change.name not in self._removed_at:
                    self._removed_at[change.name] = now  # applied after REMOVAL_GRACE
                continue
            self._removed_at.pop(change.name, None)
            self._apply(change.name, list(change.resource.endpoints))
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
            engine.set_routes(list(engine.routes) + [Route(service, "*", service, self.route_timeout)])
            log.info("new cluster %s from discovery", service)
        wanted = {ep.address: ep for ep in endpoints}
        current = {ep.address: ep for ep in cluster.endpoints}
        for address, ep in current.items():
            if address not in wanted:
                cluster.endpoints.remove(ep)
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
                known.weight = weight
                known.region, known.idc, known.tags = src.region, src.idc, dict(src.tags)
        cluster.balancer = None
        cluster.__post_init__()  # a fresh balancer over the new endpoint list

    def _drop_service(self, service: str) -> None:
        cluster = self.engine.clusters.get(service)
        if cluster is None or any(r.service == service for r in self.proxy.static_routes):
            return
        for ep in list(cluster.endpoints):
            self.proxy.stop_endpoint(cluster, ep)
        del self.engine.clusters[service]
        self.engine.set_routes([r for r in self.engine.routes if r.cluster != service])

    # ------------------------------------------------------------ registration

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
        while True:
            up = bool(app.links.get(app.endpoints[0].address))
            if up != healthy or not registered:
                try:
                    if not registered and up:
                        ep = pb.Endpoint(
                            address=address,
                            weight=self.cfg.weight,
                            region=self.cfg.region,
                            idc=self.cfg.idc,
                            tags=dict(self.cfg.tags),
                            status=pb.Endpoint.HEALTHY,
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

    def state(self) -> dict[str, Any]:
        return {
            "control_plane": {"connected": self.client.connected, "url": self.client.url},
            "subscriptions": sorted(self.subscribed),
            "restored": self.restored.is_set(),
            "registered": self.registered_address,
        }
