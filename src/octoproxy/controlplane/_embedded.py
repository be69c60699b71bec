"""The embedded store: everything in memory, leases on the Trio clock, optional snapshot file.

Theory of operation: the store *is* its :class:`RegistryView` plus a lease
table (lease id -> TTL, deadline, attached keys). Every mutation is
synchronous (no ``await`` between reading and writing state), so concurrent
sessions never interleave half-done updates. A reaper task sleeps until the
earliest lease deadline and removes the keys of every expired lease.

With a snapshot file, every change marks the store dirty; a writer task
coalesces changes for ``snapshot_delay`` seconds, then writes the whole state
atomically (temporary file in the same directory, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new snapshot, never half
of one. At start the snapshot is loaded: route rules as they were, and every
registration under a fresh lease of its own TTL, so that its owner has one TTL
to reconnect and re-register before it expires.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import trio
from google.protobuf import json_format

from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._store import Lease, LeaseNotFound, RegistryView, Store

__all__ = ["EmbeddedStore"]

logger = logging.getLogger("octoproxy.controlplane.embedded")


@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[tuple[str, str]] = field(default_factory=set)


def _write_atomic(path: str, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: blocking, run in a thread.

    Mode 0600: the snapshot holds join-token hashes and the whole registry.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an old temporary file may have had another mode
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class EmbeddedStore(Store):
    """In-memory store for a single control-plane process.

    Args:
        snapshot_path: file to restore from at start and to keep up to date
            (``None``: no persistence).
        snapshot_delay: how long changes are coalesced before a snapshot write.
    """

    def __init__(self, snapshot_path: str | None = None, *, snapshot_delay: float = 0.05) -> None:
        self.view = RegistryView()
        self.snapshot_path = snapshot_path
        self.snapshot_delay = snapshot_delay
        self._leases: dict[int, _Lease] = {}
        self._owner: dict[tuple[str, str], int] = {}
        self._next_lease = 1
        self._reaper_wakeup = trio.Event()
        self._dirty = trio.Event()

    # ------------------------------------------------------------ background
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the snapshot (if any), then expire leases and write snapshots until cancelled.

        Raises:
            OSError: if the snapshot exists but cannot be read.
            ValueError: if the snapshot is not valid.
        """
        if self.snapshot_path is not None:
            await self._load(self.snapshot_path)
        with self.view.listen(lambda _change: self._dirty.set()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reaper)
                if self.snapshot_path is not None:
                    nursery.start_soon(self._snapshot_writer, self.snapshot_path)
                task_status.started()

    async def _reaper(self) -> None:
        while True:
            now = trio.current_time()
            for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
                logger.info("lease %d expired", lease_id)
                self._drop_lease(lease_id)
            deadline = min((lease.deadline for lease in self._leases.values()), default=math.inf)
            with trio.move_on_at(deadline):
                await self._reaper_wakeup.wait()
            self._reaper_wakeup = trio.Event()

    async def _snapshot_writer(self, path: str) -> None:
        try:
            while True:
                await self._dirty.wait()
                await trio.sleep(self.snapshot_delay)
                self._dirty = trio.Event()
                await self._write(path)
        finally:
            if self._dirty.is_set():  # last changes before shutdown
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await self._write(path)

    async def _write(self, path: str) -> None:
        snap = self.snapshot()  # consistent: taken with no await in between

        def encode_and_write() -> None:  # JSON encoding, write, fsync, rename: all off the event loop
            _write_atomic(path, json_format.MessageToJson(snap, preserving_proto_field_name=True, indent=1).encode())

        try:
            await trio.to_thread.run_sync(encode_and_write)
        except OSError as exc:  # keep serving; the next change retries
            logger.error("cannot write snapshot %s: %s", path, exc)
            self._dirty.set()

    def snapshot(self) -> pb.StoreSnapshot:
        """Return the whole state as a ``StoreSnapshot`` message."""
        snap = pb.StoreSnapshot()
        for service in sorted(self.view.services):
            eps = self.view.services[service]
            for address in sorted(eps):
                lease_id = self._owner.get((service, address))
                ttl = self._leases[lease_id].ttl if lease_id in self._leases else 0.0
                snap.registrations.add(service=service, endpoint=eps[address], lease_ttl_ms=round(ttl * 1000))
        for service in sorted(self.view.routes):
            snap.routes.append(self.view.routes[service])
        for tid in sorted(self.view.tokens):
            snap.tokens.append(self.view.tokens[tid])
        for name in sorted(self.view.app_configs):
            snap.app_configs.append(self.view.app_configs[name])
        for service in sorted(self.view.authz):
            snap.authz.append(self.view.authz[service])
        for service in sorted(self.view.governance):
            snap.governance.append(self.view.governance[service])
        return snap

    async def _load(self, path: str) -> None:
        try:
            data = await trio.to_thread.run_sync(_read_file, path)
        except FileNotFoundError:
            logger.debug("no snapshot at %s: starting empty", path)
            return
        snap = pb.StoreSnapshot()
        try:
            json_format.Parse(data, snap, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise ValueError(f"invalid snapshot {path}: {exc}") from exc
        for reg in snap.registrations:
            lease = await self.grant_lease(max(reg.lease_ttl_ms, 1000) / 1000)
            await self.put_endpoint(reg.service, reg.endpoint, lease.id)
        for rules in snap.routes:
            await self.put_route_rules(rules)
        for token in snap.tokens:
            self.view.set_token(token)
        for record in snap.app_configs:
            self.view.set_app_config(record)
        for policy in snap.authz:
            self.view.set_authz(policy)
        for record in snap.governance:
            self.view.set_governance(record)
        logger.info(
            "restored %d registrations, %d route rules, %d join tokens, %d authorization policies, "
            "%d governance policies from %s",
            len(snap.registrations), len(snap.routes), len(snap.tokens), len(snap.authz), len(snap.governance), path,
        )

    # ------------------------------------------------------------ leases
    def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        for key in lease.keys:
            if self._owner.get(key) == lease_id:
                del self._owner[key]
                self.view.remove_endpoint(*key)

    def _live(self, lease_id: int) -> _Lease | None:
        lease = self._leases.get(lease_id)
        if lease is not None and lease.deadline <= trio.current_time():
            self._drop_lease(lease_id)  # expired, the reaper has not run yet
            return None
        return lease

    async def grant_lease(self, ttl: float) -> Lease:
        """See :meth:`Store.grant_lease`.

        Raises:
            ValueError: if ``ttl`` is not positive.
        """
        if not ttl > 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        lease_id = self._next_lease
        self._next_lease += 1
        self._leases[lease_id] = _Lease(ttl, trio.current_time() + ttl)
        self._reaper_wakeup.set()
        return Lease(lease_id, ttl)

    async def keepalive_lease(self, lease_id: int) -> bool:
        """See :meth:`Store.keepalive_lease`."""
        lease = self._live(lease_id)
        if lease is None:
            return False
        lease.deadline = trio.current_time() + lease.ttl
        return True

    async def revoke_lease(self, lease_id: int) -> None:
        """See :meth:`Store.revoke_lease`."""
        self._drop_lease(lease_id)

    # ------------------------------------------------------------ keys
    async def put_endpoint(self, service: str, endpoint: pb.Endpoint, lease_id: int) -> None:
        """See :meth:`Store.put_endpoint`."""
        lease = self._live(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id} not found")
        key = (service, endpoint.address)
        old = self._owner.get(key)
        if old is not None and old != lease_id and old in self._leases:
            self._leases[old].keys.discard(key)
        self._owner[key] = lease_id
        lease.keys.add(key)
        self.view.set_endpoint(service, endpoint)

    async def delete_endpoint(self, service: str, address: str) -> bool:
        """See :meth:`Store.delete_endpoint`."""
        lease_id = self._owner.pop((service, address), None)
        if lease_id is not None and lease_id in self._leases:
            self._leases[lease_id].keys.discard((service, address))
        return self.view.remove_endpoint(service, address)

    async def set_status(self, service: str, address: str, status: int) -> bool:
        """See :meth:`Store.set_status`."""
        current = self.view.services.get(service, {}).get(address)
        if current is None:
            return False
        endpoint = pb.Endpoint()
        endpoint.CopyFrom(current)
        endpoint.status = status  # type: ignore[assignment]
        self.view.set_endpoint(service, endpoint)
        return True

    async def put_route_rules(self, rules: pb.RouteRules) -> None:
        """See :meth:`Store.put_route_rules`."""
        self.view.set_routes(rules)

    async def put_token(self, token: pb.JoinToken) -> None:
        """See :meth:`Store.put_token`."""
        self.view.set_token(token)

    async def delete_token(self, token_id: str) -> bool:
        """See :meth:`Store.delete_token`."""
        return self.view.remove_token(token_id)

    async def put_app_config(self, record: pb.AppConfigRecord) -> None:
        """See :meth:`Store.put_app_config`."""
        self.view.set_app_config(record)

    async def put_authz_policy(self, policy: pb.AuthorizationPolicy) -> None:
        """See :meth:`Store.put_authz_policy`."""
        self.view.set_authz(policy)

    async def delete_authz_policy(self, service: str) -> bool:
        """See :meth:`Store.delete_authz_policy`."""
        return self.view.remove_authz(service)

    async def put_governance(self, record: pb.GovernancePolicyRecord) -> None:
        """See :meth:`Store.put_governance`."""
        self.view.set_governance(record)
