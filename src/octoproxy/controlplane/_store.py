"""The store interface of the control plane, and the in-memory view both stores share.

Theory of operation: the control plane is stateless; a :class:`Store` holds
every registration (leased: it disappears when its lease is not kept alive
within its TTL) and every service's route rules. Reads never wait on the
network: each store keeps a :class:`RegistryView` in memory (the embedded
store *is* its view; the etcd store fills it by list-then-watch), and the view
tells its listeners which resource changed, synchronously, as soon as it
changes. A resource's version is a hash of its canonical encoding, so the same
content has the same version in every control-plane replica and across
restarts: a reconnecting proxy is re-sent nothing it already holds.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import trio

from ..protocol._errors import OctoproxyError
from ..discovery._governance import current_policy
from ..discovery._xds_client import TYPE_APPCONFIG, TYPE_AUTHZ, TYPE_ENDPOINTS, TYPE_GOVERNANCE, TYPE_ROUTES
from ..discovery._xds_server import check_service_name
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ..core._authz import policy_from_message

__all__ = [
    "Store",
    "StoreChange",
    "StoreError",
    "StoreUnavailable",
    "LeaseNotFound",
    "Lease",
    "RegistryView",
    "Listener",
    "resource_version",
    "TYPE_TOKENS",
    "check_authz_policy",
    "stamp_warmup",
]

logger = logging.getLogger("octoproxy.controlplane.store")


class StoreError(OctoproxyError):
    """A store operation failed."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached (every etcd endpoint failed)."""


class LeaseNotFound(StoreError):
    """The lease does not exist (it expired or was revoked)."""


@dataclass(frozen=True, slots=True)
class StoreChange:
    """``name`` of ``type_url`` may have changed; ``name is None`` means anything may have."""

    type_url: str
    name: str | None


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: ``id`` and the TTL the store really applies, in seconds."""

    id: int
    ttl: float


Listener = Callable[[StoreChange], None]

#: ``StoreChange.type_url`` of a join token (name = token id); never sent to proxies
TYPE_TOKENS = "octoproxy.v1.JoinToken"


def check_authz_policy(policy: pb.AuthorizationPolicy) -> str | None:
    """Why ``policy`` must not be stored, or None if it is valid.

    The same validation the provider's proxy applies to a delivery
    (:func:`octoproxy.core._authz.policy_from_message`), so the control plane
    never stores a policy every proxy would NACK.
    """
    error = check_service_name(policy.service)
    if error is not None:
        return error
    try:
        policy_from_message(policy, policy.service, "check")
    except ValueError as exc:
        return str(exc)
    return None


def stamp_warmup(view: RegistryView, service: str, endpoint: pb.Endpoint, now_unix: float) -> None:
    """Set ``endpoint.warmup_start_unix_ms`` before it is stored (a registration).

    The start of an endpoint already registered at that address is kept (a
    reconnect, a hot restart's successor, a re-registration on another
    replica: the app is warm). Otherwise the registration's own start is
    taken when it is in the past (the provider's proxy sends when its app came
    up, so a control plane restarted without its state does not start every
    endpoint's warm-up again), else now.
    """
    current = view.services.get(service, {}).get(endpoint.address)
    now_ms = int(now_unix * 1000)
    if current is not None:
        endpoint.warmup_start_unix_ms = current.warmup_start_unix_ms
    elif not 0 < endpoint.warmup_start_unix_ms <= now_ms:
        endpoint.warmup_start_unix_ms = now_ms


def resource_version(body: bytes) -> str:
    """Return the version of a canonically encoded resource (a content hash)."""
    return hashlib.sha256(body).hexdigest()[:16]


class RegistryView:
    """Services' endpoints and route rules, in memory, with change listeners.

    Mutations return whether anything changed, and notify listeners only then.
    """

    def __init__(self) -> None:
        self.services: dict[str, dict[str, pb.Endpoint]] = {}
        self.routes: dict[str, pb.RouteRules] = {}
        #: join tokens by id (hashes only)
        self.tokens: dict[str, pb.JoinToken] = {}
        #: app configuration records by resource name ``"<service>.<env>"`` (octoproxy.discovery._appconfig)
        self.app_configs: dict[str, pb.AppConfigRecord] = {}
        #: pushed authorization policies by service (docs/security.md, Authorization)
        self.authz: dict[str, pb.AuthorizationPolicy] = {}
        #: governance policy records (current version + history) by service (docs/governance.md)
        self.governance: dict[str, pb.GovernancePolicyRecord] = {}
        self.revision = 0
        self._listeners: list[Listener] = []
        self._cache: dict[tuple[str, str], tuple[str, bytes]] = {}

    @contextmanager
    def listen(self, listener: Listener) -> Iterator[None]:
        """Call ``listener`` on every change while the ``with`` block runs."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def _changed(self, type_url: str, name: str | None) -> None:
        self.revision += 1
        if name is None:
            self._cache.clear()
        else:
            self._cache.pop((type_url, name), None)
        change = StoreChange(type_url, name)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a broken listener must not stop the others
                logger.exception("store listener failed")

    def set_endpoint(self, service: str, endpoint: pb.Endpoint) -> bool:
        """Add or replace ``endpoint`` (by address). Returns True if it changed."""
        eps = self.services.setdefault(service, {})
        old = eps.get(endpoint.address)
        if old is not None and old == endpoint:
            return False
        new = pb.Endpoint()
        new.CopyFrom(endpoint)
        eps[endpoint.address] = new
        self._changed(TYPE_ENDPOINTS, service)
        return True

    def remove_endpoint(self, service: str, address: str) -> bool:
        """Remove an endpoint; a service left with none ceases to exist."""
        eps = self.services.get(service)
        if eps is None or eps.pop(address, None) is None:
            return False
        if not eps:
            del self.services[service]
        self._changed(TYPE_ENDPOINTS, service)
        return True

    def set_routes(self, rules: pb.RouteRules) -> bool:
        """Replace a service's route rules (no rules = delete). Returns True if changed."""
        if not rules.rules:
            return self.remove_routes(rules.service)
        old = self.routes.get(rules.service)
        if old is not None and old == rules:
            return False
        new = pb.RouteRules()
        new.CopyFrom(rules)
        self.routes[rules.service] = new
        self._changed(TYPE_ROUTES, rules.service)
        return True

    def remove_routes(self, service: str) -> bool:
        """Delete a service's route rules. Returns True if there were any."""
        if self.routes.pop(service, None) is None:
            return False
        self._changed(TYPE_ROUTES, service)
        return True

    def set_authz(self, policy: pb.AuthorizationPolicy) -> bool:
        """Add or replace a service's authorization policy. Returns True if it changed."""
        old = self.authz.get(policy.service)
        if old is not None and old == policy:
            return False
        new = pb.AuthorizationPolicy()
        new.CopyFrom(policy)
        self.authz[policy.service] = new
        self._changed(TYPE_AUTHZ, policy.service)
        return True

    def remove_authz(self, service: str) -> bool:
        """Delete a service's authorization policy. Returns True if there was one."""
        if self.authz.pop(service, None) is None:
            return False
        self._changed(TYPE_AUTHZ, service)
        return True

    def set_governance(self, record: pb.GovernancePolicyRecord) -> bool:
        """Add or replace a service's governance record. Returns True if it changed."""
        old = self.governance.get(record.service)
        if old is not None and old == record:
            return False
        new = pb.GovernancePolicyRecord()
        new.CopyFrom(record)
        self.governance[record.service] = new
        self._changed(TYPE_GOVERNANCE, record.service)
        return True

    def remove_governance(self, service: str) -> bool:
        """Forget a service's governance record (policy and history). Returns True if there was one."""
        if self.governance.pop(service, None) is None:
            return False
        self._changed(TYPE_GOVERNANCE, service)
        return True

    def set_token(self, token: pb.JoinToken) -> bool:
        """Add or replace a join token (by id). Returns True if it changed."""
        old = self.tokens.get(token.id)
        if old is not None and old == token:
            return False
        new = pb.JoinToken()
        new.CopyFrom(token)
        self.tokens[token.id] = new
        self._changed(TYPE_TOKENS, token.id)
        return True

    def remove_token(self, token_id: str) -> bool:
        """Forget a join token. Returns True if there was one."""
        if self.tokens.pop(token_id, None) is None:
            return False
        self._changed(TYPE_TOKENS, token_id)
        return True

    def set_app_config(self, record: pb.AppConfigRecord) -> bool:
        """Add or replace an app configuration record. Returns True if it changed."""
        name = f"{record.service}.{record.environment}"
        old = self.app_configs.get(name)
        if old is not None and old == record:
            return False
        new = pb.AppConfigRecord()
        new.CopyFrom(record)
        self.app_configs[name] = new
        self._changed(TYPE_APPCONFIG, name)
        return True

    def remove_app_config(self, name: str) -> bool:
        """Forget an app configuration record. Returns True if there was one."""
        if self.app_configs.pop(name, None) is None:
            return False
        self._changed(TYPE_APPCONFIG, name)
        return True

    def replace_all(
        self,
        services: Mapping[str, Mapping[str, pb.Endpoint]],
        routes: Mapping[str, pb.RouteRules],
        tokens: Mapping[str, pb.JoinToken] | None = None,
        app_configs: Mapping[str, pb.AppConfigRecord] | None = None,
        authz: Mapping[str, pb.AuthorizationPolicy] | None = None,
        governance: Mapping[str, pb.GovernancePolicyRecord] | None = None,
    ) -> int:
        """Make the view equal to the given content, notifying per changed name.

        Returns:
            How many resources changed.
        """
        n = 0
        for service in set(self.services) - set(services):
            for address in list(self.services.get(service, {})):
                n += self.remove_endpoint(service, address)
        for service, eps in services.items():
            for address in set(self.services.get(service, {})) - set(eps):
                n += self.remove_endpoint(service, address)
            for ep in eps.values():
                n += self.set_endpoint(service, ep)
        for service in set(self.routes) - set(routes):
            n += self.remove_routes(service)
        for rules in routes.values():
            n += self.set_routes(rules)
        if tokens is not None:
            for tid in set(self.tokens) - set(tokens):
                n += self.remove_token(tid)
            for token in tokens.values():
                n += self.set_token(token)
        if app_configs is not None:
            for name in set(self.app_configs) - set(app_configs):
                n += self.remove_app_config(name)
            for record in app_configs.values():
                n += self.set_app_config(record)
        if authz is not None:
            for service in set(self.authz) - set(authz):
                n += self.remove_authz(service)
            for policy in authz.values():
                n += self.set_authz(policy)
        if governance is not None:
            for service in set(self.governance) - set(governance):
                n += self.remove_governance(service)
            for record in governance.values():
                n += self.set_governance(record)
        return n

    def lookup(self, type_url: str, name: str) -> tuple[str, bytes] | None:
        """Return ``(version, canonical encoding)`` of a resource, or ``None`` if absent."""
        key = (type_url, name)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        msg: pb.ClusterLoadAssignment | pb.RouteRules | pb.AuthorizationPolicy | pb.GovernancePolicy | None = None
        if type_url == TYPE_ENDPOINTS and name in self.services:
            eps = self.services[name]
            msg = pb.ClusterLoadAssignment(service=name, endpoints=[eps[a] for a in sorted(eps)])
        elif type_url == TYPE_ROUTES and name in self.routes:
            msg = self.routes[name]
        elif type_url == TYPE_AUTHZ and name in self.authz:
            msg = self.authz[name]
        elif type_url == TYPE_GOVERNANCE and name in self.governance:
            msg = current_policy(self.governance[name])  # None while deleted (the history stays)
        if msg is None:
            # not cached: names anyone may subscribe to must not pin memory (issue 10)
            self._cache.pop(key, None)
            return None
        body = msg.SerializeToString(deterministic=True)
        value = (resource_version(body), body)
        self._cache[key] = value
        return value


class Store(abc.ABC):
    """Where registrations and route rules live. Every method may be called
    from any task once :meth:`run` has started.

    Writes go to the backing store; reads come from :attr:`view`, which
    reflects writes as soon as the store has applied them (at once for the
    embedded store, after the watch event for etcd: milliseconds).
    """

    view: RegistryView

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the store's background work (lease expiry, snapshots, watches).

        Use as ``await nursery.start(store.run)``: returns from ``start`` once
        the view is loaded. Runs until cancelled.
        """

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> Lease:
        """Create a lease that expires ``ttl`` seconds from now unless kept alive.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def keepalive_lease(self, lease_id: int) -> bool:
        """Restart the lease's TTL. Returns False if it no longer exists.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None:
        """Delete the lease and every key still attached to it (no error if gone).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def put_endpoint(self, service: str, endpoint: pb.Endpoint, lease_id: int) -> None:
        """Register ``endpoint`` under ``service``, attached to the lease.

        Replaces a registration of the same address (and moves it to this lease).

        Raises:
            LeaseNotFound: if the lease expired.
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def delete_endpoint(self, service: str, address: str) -> bool:
        """Remove a registration. Returns False if there was none.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def set_status(self, service: str, address: str, status: int) -> bool:
        """Change a registration's status, keeping its lease. False if not registered.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def put_route_rules(self, rules: pb.RouteRules) -> None:
        """Replace a service's route rules; no rules deletes them (never leased).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def put_token(self, token: pb.JoinToken) -> None:
        """Store a join token record (its hash, never the token).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    @abc.abstractmethod
    async def delete_token(self, token_id: str) -> bool:
        """Delete a join token record. Returns False if there was none.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """

    async def put_app_config(self, record: pb.AppConfigRecord) -> None:
        """Store an app configuration record (never leased; see :mod:`octoproxy.discovery._appconfig`).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        raise NotImplementedError

    async def update_app_config(
        self, service: str, env: str, update: Callable[[pb.AppConfigRecord], pb.AppConfigRecord]
    ) -> tuple[pb.AppConfigRecord, pb.AppConfigRecord]:
        """Read (service, env)'s record, ``update`` it, write it; return ``(old, new)``.

        ``update`` may raise (nothing is written). The default reads the view
        and writes with no ``await`` in between that another writer of this
        process could interleave with; a store shared by several replicas
        (etcd) overrides it with a compare-and-swap.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        old = self.view.app_configs.get(f"{service}.{env}") or pb.AppConfigRecord(service=service, environment=env)
        new = update(old)
        await self.put_app_config(new)
        return old, new

    async def put_authz_policy(self, policy: pb.AuthorizationPolicy) -> None:
        """Store a service's authorization policy (never leased; validate first with
        :func:`check_authz_policy`).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        raise NotImplementedError

    async def delete_authz_policy(self, service: str) -> bool:
        """Delete a service's authorization policy. Returns False if there was none.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        raise NotImplementedError

    async def get_authz_policy(self, service: str) -> tuple[str, pb.AuthorizationPolicy] | None:
        """Return ``(version, policy)`` of ``service``, or ``None`` if it has none."""
        found = self.view.lookup(TYPE_AUTHZ, service)
        if found is None:
            return None
        return found[0], pb.AuthorizationPolicy.FromString(found[1])

    async def put_governance(self, record: pb.GovernancePolicyRecord) -> None:
        """Store a service's governance record (never leased).

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        raise NotImplementedError

    async def update_governance(
        self, service: str, update: Callable[[pb.GovernancePolicyRecord], pb.GovernancePolicyRecord]
    ) -> tuple[pb.GovernancePolicyRecord, pb.GovernancePolicyRecord]:
        """Read ``service``'s governance record, ``update`` it, write it; return ``(old, new)``.

        ``update`` may raise (nothing is written); a ``new`` equal to ``old``
        is not written. As :meth:`update_app_config`: no ``await`` between
        the read and the write here; etcd overrides it with a compare-and-swap.

        Raises:
            StoreUnavailable: if the backing store cannot be reached.
        """
        old = self.view.governance.get(service) or pb.GovernancePolicyRecord(service=service)
        new = update(old)
        if new != old:
            await self.put_governance(new)
        return old, new

    async def get_governance(self, service: str) -> tuple[str, pb.GovernancePolicy] | None:
        """Return ``(resource version, policy in force)`` of ``service``, or ``None`` if it has none."""
        found = self.view.lookup(TYPE_GOVERNANCE, service)
        if found is None:
            return None
        return found[0], pb.GovernancePolicy.FromString(found[1])

    async def get_endpoints(self, service: str) -> tuple[str, pb.ClusterLoadAssignment] | None:
        """Return ``(version, endpoints)`` of ``service``, or ``None`` if it has none."""
        found = self.view.lookup(TYPE_ENDPOINTS, service)
        if found is None:
            return None
        return found[0], pb.ClusterLoadAssignment.FromString(found[1])

    async def get_route_rules(self, service: str) -> tuple[str, pb.RouteRules] | None:
        """Return ``(version, rules)`` of ``service``, or ``None`` if it has none."""
        found = self.view.lookup(TYPE_ROUTES, service)
        if found is None:
            return None
        return found[0], pb.RouteRules.FromString(found[1])

    def listen(self, listener: Listener) -> AbstractContextManager[None]:
        """Call ``listener(StoreChange)`` on every change while the ``with`` block runs."""
        return self.view.listen(listener)
