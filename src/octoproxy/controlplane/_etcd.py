"""The etcd store: registrations as leased keys in etcd v3, read by list-then-watch.

Why a thin client of our own: every maintained Python etcd v3 client (aetcd,
etcd3, aioetcd3, ...) is built on asyncio and/or grpcio's event loop, neither
of which runs under Trio. etcd's gRPC gateway serves the same v3 API as JSON
over HTTP/1.1 (keys and values base64), which a few dozen lines over h11 and
``trio.open_tcp_stream`` speak natively, with Trio cancellation and deadlines:
unary calls reuse :func:`octoproxy.common._admin.http_request`, the watch is one
long-lived chunked response read here line by line.

Theory of operation: keys live under a prefix (default ``/octoproxy/``):
``services/<service>/<address>`` holds the JSON form of an ``Endpoint`` and is
attached to a lease; ``routes/<service>`` holds the JSON form of a
``RouteRules`` and has no lease; ``authz/<service>`` likewise holds an
``AuthorizationPolicy``, and ``governance/<service>`` a
``GovernancePolicyRecord``. :meth:`EtcdStore.run` lists the whole prefix
into the :class:`RegistryView`, then watches from the next revision, applying
each event to the view (which notifies the control plane's sessions). If the
watch ends, fails, or its member stops answering ``/health``, the store lists
again on the next endpoint and diffs the result into the view, so nothing is
missed even across compaction. Every control-plane replica over the same etcd
therefore converges on the same view, and since versions are content hashes,
on the same versions. Unary calls try each endpoint in turn (starting with the
last one that worked) under a per-call deadline.

TLS: with ``https://`` endpoints the store verifies etcd's certificate
against ``ca_file`` (else the system's trust store) and presents a client
certificate (``cert_file`` + ``key_file``) when given, for etcd started with
``--client-cert-auth``. Plain HTTP calls go through
:func:`octoproxy.common._admin.http_request`; TLS ones through :func:`_https_request`
here (same h11 exchange over a ``trio.SSLStream``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import h11
import trio
from google.protobuf import json_format

from ..common._admin import http_request
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._store import Lease, LeaseNotFound, RegistryView, Store, StoreError, StoreUnavailable

__all__ = ["EtcdStore", "EtcdError", "client_ssl_context"]

logger = logging.getLogger("octoproxy.controlplane.etcd")

_RETRY_CODES = frozenset({4, 14})  # gRPC DEADLINE_EXCEEDED, UNAVAILABLE: try another member
_NOT_FOUND = 5


class EtcdError(StoreError):
    """etcd answered with an error.

    Attributes:
        code: the gRPC status code etcd reported (0 if unknown).
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


#: compare-and-swap attempts of one configuration write before giving up
CAS_ATTEMPTS = 8
#: a stored record (a protobuf message) read and rewritten by a compare-and-swap
_R = TypeVar("_R", pb.GovernancePolicyRecord, pb.AppConfigRecord)


def _to_json(
    msg: pb.Endpoint | pb.RouteRules | pb.JoinToken | pb.AppConfigRecord | pb.AuthorizationPolicy | pb.GovernancePolicyRecord,
) -> str:
    return str(json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=None, sort_keys=True))


def _parse_endpoint_url(url: str) -> tuple[str, str]:
    """``"https://h:1"`` -> ``("https", "h:1")``."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"etcd endpoint must look like http://host:port or https://host:port, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}"


async def _open(address: str, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    host, _, port = address.rpartition(":")
    tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
    if ssl_context is None:
        return tcp
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host.strip("[]"))
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _https_request(
    address: str, method: str, path: str, body: bytes, ssl_context: ssl.SSLContext, timeout: float
) -> tuple[int, bytes]:
    """One HTTP/1.1 request over TLS on a fresh connection: ``(status, body)``.

    Raises:
        OSError, trio.TooSlowError, trio.BrokenResourceError: as ``http_request``
            (a TLS failure is a ``BrokenResourceError``).
    """
    with trio.fail_after(timeout):
        stream = await _open(address, ssl_context)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", address), ("Connection", "close"), ("Content-Length", str(len(body)))]
            if body:
                headers.append(("Content-Type", "application/json"))
            data = conn.send(h11.Request(method=method, target=path, headers=headers))
            data += conn.send(h11.Data(data=body)) if body else b""
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, b"".join(chunks)
                elif isinstance(event, h11.ConnectionClosed):
                    raise trio.BrokenResourceError("connection closed before the reply")
        except h11.ProtocolError as exc:
            raise trio.BrokenResourceError(f"bad HTTP reply: {exc}") from exc
        finally:
            await trio.aclose_forcefully(stream)


def client_ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context for etcd: verify it against ``ca_file``, present ``cert_file``.

    Raises:
        ValueError: if only one of ``cert_file`` and ``key_file`` is given.
        OSError, ssl.SSLError: if a file cannot be loaded.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("etcd TLS: give both the client certificate and its key, or neither")
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class EtcdStore(Store):
    """Store over an etcd v3 cluster (JSON gateway, HTTP or HTTPS).

    Args:
        endpoints: client URLs of the etcd members, e.g.
            ``["http://127.0.0.1:2379"]`` or ``["https://10.0.0.5:2379"]``
            (all of one scheme).
        prefix: key prefix of everything octoproxy stores.
        request_timeout: deadline of each call to one member.
        health_interval: how often the watched member's ``/health`` is probed.
        ca_file: HTTPS: CA certificates to verify etcd with (default: the
            system's).
        cert_file: HTTPS: client certificate chain (PEM) to present.
        key_file: HTTPS: its private key.
        ssl_context: HTTPS: a ready client context instead of the three files.

    Raises:
        ValueError: if an endpoint URL is not ``http(s)://host:port``, the
            schemes are mixed, or TLS files are given for ``http://``.
        OSError, ssl.SSLError: if a TLS file cannot be loaded.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/octoproxy/",
        request_timeout: float = 2.0,
        health_interval: float = 1.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("need at least one etcd endpoint")
        self.view = RegistryView()
        parsed = [_parse_endpoint_url(u) for u in endpoints]
        schemes = {scheme for scheme, _ in parsed}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http:// and https://")
        tls_files = ca_file or cert_file or key_file
        if "https" in schemes:
            self.ssl_context: ssl.SSLContext | None = ssl_context or client_ssl_context(ca_file, cert_file, key_file)
        elif tls_files or ssl_context is not None:
            raise ValueError("etcd TLS options need https:// endpoints")
        else:
            self.ssl_context = None
        self.addresses = [address for _, address in parsed]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self._current = 0  # index of the member that answered last

    # ------------------------------------------------------------ HTTP
    async def _http(self, address: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.ssl_context is not None:
            return await _https_request(address, method, path, body, self.ssl_context, self.request_timeout)
        headers = [("Content-Type", "application/json")] if body else []
        status, _, data = await http_request(address, method, path, body, headers=headers, timeout=self.request_timeout)
        return status, data

    async def _call_one(self, address: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, data = await self._http(address, "POST", path, json.dumps(body).encode())
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            raise EtcdError(f"{path}: HTTP {status}, not JSON", 14) from None
        if status != 200 or "error" in reply:
            # {"error": "...", "message": "...", "code": N}, or (streams) {"error": {...}}
            err = reply["error"] if isinstance(reply.get("error"), dict) else reply
            message = err.get("message") or err.get("error") or f"HTTP {status}"
            code = int(err.get("code", 0) or 0)
            raise EtcdError(f"{path}: {message}", code or (14 if status >= 500 else 0))
        return reply.get("result", reply)  # type: ignore[no-any-return]

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call ``path`` on the members in turn until one answers.

        Raises:
            StoreUnavailable: if no member answered.
            EtcdError: if a member answered with a (non-retryable) error.
        """
        errors = []
        n = len(self.addresses)
        start = self._current  # the watch task may move _current meanwhile
        # Two passes: a member that just lost its leader answers again once
        # the election (a few election timeouts) is over.
        for i in range(2 * n):
            if i == n:
                await trio.sleep(self.request_timeout / 4)
            idx = (start + i) % n
            try:
                reply = await self._call_one(self.addresses[idx], path, body)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                errors.append(f"{self.addresses[idx]}: {type(exc).__name__}: {exc}")
                continue
            except EtcdError as exc:
                if exc.code not in _RETRY_CODES:
                    raise
                errors.append(f"{self.addresses[idx]}: {exc}")
                continue
            self._current = idx
            return reply
        raise StoreUnavailable(f"no etcd member answered {path}: " + "; ".join(errors))

    # ------------------------------------------------------------ list + watch
    def _decode(self, key: str, value: str) -> tuple[str, str, Any] | None:
        rest = key[len(self.prefix) :]
        kind, _, tail = rest.partition("/")
        try:
            if kind == "services":
                service, _, address = tail.partition("/")
                ep = json_format.Parse(value, pb.Endpoint(), ignore_unknown_fields=True) if value else None
                return ("services", service, (address, ep))
            if kind == "routes":
                rules = json_format.Parse(value, pb.RouteRules(), ignore_unknown_fields=True) if value else None
                return ("routes", tail, rules)
            if kind == "tokens":
                token = json_format.Parse(value, pb.JoinToken(), ignore_unknown_fields=True) if value else None
                return ("tokens", tail, token)
            if kind == "appconfig":
                record = json_format.Parse(value, pb.AppConfigRecord(), ignore_unknown_fields=True) if value else None
                return ("appconfig", tail, record)
            if kind == "authz":
                policy = json_format.Parse(value, pb.AuthorizationPolicy(), ignore_unknown_fields=True) if value else None
                return ("authz", tail, policy)
            if kind == "governance":
                record = json_format.Parse(value, pb.GovernancePolicyRecord(), ignore_unknown_fields=True) if value else None
                return ("governance", tail, record)
        except json_format.ParseError as exc:
            logger.warning("ignoring undecodable key %s: %s", key, exc)
        return None

    async def _list(self) -> int:
        """Load the whole prefix into the view. Returns the revision it reflects."""
        reply = await self._call(
            "/v3/kv/range", {"key": _b64(self.prefix), "range_end": _prefix_end(self.prefix)}
        )
        services: dict[str, dict[str, pb.Endpoint]] = {}
        routes: dict[str, pb.RouteRules] = {}
        tokens: dict[str, pb.JoinToken] = {}
        app_configs: dict[str, pb.AppConfigRecord] = {}
        authz: dict[str, pb.AuthorizationPolicy] = {}
        governance: dict[str, pb.GovernancePolicyRecord] = {}
        for kv in reply.get("kvs", []):
            item = self._decode(_unb64(kv["key"]), _unb64(kv.get("value", "")))
            if item is None:
                continue
            if item[0] == "services" and item[2][1] is not None:
                address, ep = item[2]
                services.setdefault(item[1], {})[address] = ep
            elif item[0] == "routes" and item[2] is not None and item[2].rules:
                routes[item[1]] = item[2]
            elif item[0] == "tokens" and item[2] is not None:
                tokens[item[1]] = item[2]
            elif item[0] == "appconfig" and item[2] is not None:
                app_configs[item[1]] = item[2]
            elif item[0] == "authz" and item[2] is not None:
                authz[item[1]] = item[2]
            elif item[0] == "governance" and item[2] is not None:
                governance[item[1]] = item[2]
        changed = self.view.replace_all(services, routes, tokens, app_configs, authz, governance)
        revision = int(reply["header"]["revision"])
        logger.info("listed %d services from etcd at revision %d (%d changes)", len(services), revision, changed)
        return revision

    def _apply(self, event: dict[str, Any]) -> None:
        kv = event.get("kv", {})
        deleted = event.get("type") == "DELETE"
        item = self._decode(_unb64(kv.get("key", "")), "" if deleted else _unb64(kv.get("value", "")))
        if item is None:
            return
        kind, service, payload = item
        if kind == "services":
            address, ep = payload
            if ep is None:
                self.view.remove_endpoint(service, address)
            else:
                self.view.set_endpoint(service, ep)
        elif kind == "appconfig":
            if payload is None:
                self.view.remove_app_config(service)
            else:
                self.view.set_app_config(payload)
        elif kind == "tokens":
            if payload is None:
                self.view.remove_token(service)
            else:
                self.view.set_token(payload)
        elif kind == "authz":
            if payload is None:
                self.view.remove_authz(service)
            else:
                self.view.set_authz(payload)
        elif kind == "governance":
            if payload is None:
                self.view.remove_governance(service)
            else:
                self.view.set_governance(payload)
        elif payload is None:
            self.view.remove_routes(service)
        else:
            self.view.set_routes(payload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List, then watch, forever; started once the first list succeeded.

        Unreachable etcd at start is retried (with back-off) until it answers.
        """
        delay = 0.05
        started = False
        while True:
            try:
                revision = await self._list()
                if not started:
                    task_status.started()
                    started = True
                delay = 0.05
                await self._watch(self.addresses[self._current], revision + 1)
            except (StoreError, OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError, ValueError) as exc:
                logger.warning("etcd watch: %s: %s; relisting", type(exc).__name__, exc)
                self._current = (self._current + 1) % len(self.addresses)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _watch(self, address: str, start_revision: int) -> None:
        """Stream watch events from one member until the stream ends or the member looks unhealthy."""
        body = {
            "create_request": {
                "key": _b64(self.prefix),
                "range_end": _prefix_end(self.prefix),
                "start_revision": str(start_revision),
            }
        }
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._health_probe, address, nursery.cancel_scope)
            try:
                await self._stream(address, body)
            except (StoreError, OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError, ValueError) as exc:
                error = exc
            nursery.cancel_scope.cancel()
        raise error or StoreUnavailable(f"watch on {address} ended")

    async def _health_probe(self, address: str, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.health_interval)
            try:
                status, data = await self._http(address, "GET", "/health")
                healthy = status == 200 and json.loads(data).get("health") == "true"
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError):
                healthy = False
            if not healthy:
                logger.warning("etcd member %s unhealthy: leaving its watch", address)
                scope.cancel()
                return

    async def _stream(self, address: str, body: dict[str, Any]) -> None:
        with trio.fail_after(self.request_timeout):
            stream = await _open(address, self.ssl_context)
        try:
            conn = h11.Connection(h11.CLIENT)
            payload = json.dumps(body).encode()
            headers = [("Host", address), ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
            data = conn.send(h11.Request(method="POST", target="/v3/watch", headers=headers))
            data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
            with trio.fail_after(self.request_timeout):
                await stream.send_all(data)
            buf = bytearray()
            first_deadline: float | None = trio.current_time() + self.request_timeout
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    # Until the watch is created, every wait has a deadline;
                    # after that silence is normal and the health probe bounds it.
                    with trio.fail_at(first_deadline if first_deadline is not None else math.inf):
                        conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise EtcdError(f"watch: HTTP {event.status_code}", 14)
                elif isinstance(event, h11.Data):
                    buf += event.data
                    while b"\n" in buf:
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf = bytearray(rest)
                        if line.strip() and self._on_watch_line(json.loads(line)):
                            first_deadline = None
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        finally:
            await trio.aclose_forcefully(stream)

    def _on_watch_line(self, msg: dict[str, Any]) -> bool:
        """Apply one watch message. Returns True if it reports the watch created."""
        if "error" in msg:
            raise EtcdError(f"watch: {msg['error']}", 14)
        result = msg.get("result", {})
        if result.get("canceled") or result.get("compact_revision"):
            raise EtcdError(f"watch canceled: {result.get('cancel_reason', 'compacted')}", 14)
        for event in result.get("events", []):
            self._apply(event)
        return bool(result.get("created"))

    # ------------------------------------------------------------ leases
    async def grant_lease(self, ttl: float) -> Lease:
        """See :meth:`Store.grant_lease`; etcd rounds TTLs up to whole seconds (and its minimum)."""
        reply = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))})
        return Lease(int(reply["ID"]), float(reply.get("TTL", ttl)))

    async def keepalive_lease(self, lease_id: int) -> bool:
        """See :meth:`Store.keepalive_lease`."""
        reply = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        return int(reply.get("TTL", 0)) > 0

    async def revoke_lease(self, lease_id: int) -> None:
        """See :meth:`Store.revoke_lease`."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as exc:
            if exc.code != _NOT_FOUND:
                raise

    # ------------------------------------------------------------ keys
    def _service_key(self, service: str, address: str) -> str:
        return f"{self.prefix}services/{service}/{address}"

    async def put_endpoint(self, service: str, endpoint: pb.Endpoint, lease_id: int) -> None:
        """See :meth:`Store.put_endpoint`."""
        body = {"key": _b64(self._service_key(service, endpoint.address)), "value": _b64(_to_json(endpoint))}
        body["lease"] = str(lease_id)
        try:
            await self._call("/v3/kv/put", body)
        except EtcdError as exc:
            if exc.code == _NOT_FOUND or "lease not found" in str(exc):
                raise LeaseNotFound(str(exc)) from None
            raise

    async def delete_endpoint(self, service: str, address: str) -> bool:
        """See :meth:`Store.delete_endpoint`."""
        reply = await self._call("/v3/kv/deleterange", {"key": _b64(self._service_key(service, address))})
        return int(reply.get("deleted", 0)) > 0

    async def set_status(self, service: str, address: str, status: int) -> bool:
        """See :meth:`Store.set_status` (read-modify-write; the lease is kept)."""
        key = _b64(self._service_key(service, address))
        reply = await self._call("/v3/kv/range", {"key": key})
        kvs = reply.get("kvs", [])
        if not kvs:
            return False
        ep = pb.Endpoint()
        json_format.Parse(_unb64(kvs[0].get("value", "")), ep, ignore_unknown_fields=True)
        ep.status = status  # type: ignore[assignment]
        await self._call("/v3/kv/put", {"key": key, "value": _b64(_to_json(ep)), "ignore_lease": True})
        return True

    async def put_route_rules(self, rules: pb.RouteRules) -> None:
        """See :meth:`Store.put_route_rules`."""
        key = _b64(f"{self.prefix}routes/{rules.service}")
        if rules.rules:
            await self._call("/v3/kv/put", {"key": key, "value": _b64(_to_json(rules))})
        else:
            await self._call("/v3/kv/deleterange", {"key": key})

    async def put_authz_policy(self, policy: pb.AuthorizationPolicy) -> None:
        """See :meth:`Store.put_authz_policy` (``<prefix>authz/<service>``, never leased)."""
        await self._call("/v3/kv/put", {"key": _b64(f"{self.prefix}authz/{policy.service}"), "value": _b64(_to_json(policy))})

    async def delete_authz_policy(self, service: str) -> bool:
        """See :meth:`Store.delete_authz_policy`."""
        reply = await self._call("/v3/kv/deleterange", {"key": _b64(f"{self.prefix}authz/{service}")})
        return int(reply.get("deleted", 0)) > 0

    async def put_governance(self, record: pb.GovernancePolicyRecord) -> None:
        """See :meth:`Store.put_governance` (``<prefix>governance/<service>``, never leased)."""
        key = _b64(f"{self.prefix}governance/{record.service}")
        await self._call("/v3/kv/put", {"key": key, "value": _b64(_to_json(record))})

    async def update_governance(
        self, service: str, update: Callable[[pb.GovernancePolicyRecord], pb.GovernancePolicyRecord]
    ) -> tuple[pb.GovernancePolicyRecord, pb.GovernancePolicyRecord]:
        """See :meth:`Store.update_governance`: a compare-and-swap on the key's revision.

        Two operators changing one service's policy through two replicas at
        once both get a version of their own (numbers are never reused).
        """
        return await self._cas_update(
            f"{self.prefix}governance/{service}", pb.GovernancePolicyRecord(service=service), update, f"governance policy of {service}", skip_same=True
        )

    async def put_token(self, token: pb.JoinToken) -> None:
        """See :meth:`Store.put_token` (``<prefix>tokens/<id>``, never leased)."""
        await self._call("/v3/kv/put", {"key": _b64(f"{self.prefix}tokens/{token.id}"), "value": _b64(_to_json(token))})

    async def delete_token(self, token_id: str) -> bool:
        """See :meth:`Store.delete_token`."""
        reply = await self._call("/v3/kv/deleterange", {"key": _b64(f"{self.prefix}tokens/{token_id}")})
        return int(reply.get("deleted", 0)) > 0

    async def put_app_config(self, record: pb.AppConfigRecord) -> None:
        """See :meth:`Store.put_app_config` (``<prefix>appconfig/<service>.<env>``, never leased)."""
        key = _b64(f"{self.prefix}appconfig/{record.service}.{record.environment}")
        await self._call("/v3/kv/put", {"key": key, "value": _b64(_to_json(record))})

    async def update_app_config(
        self, service: str, env: str, update: Callable[[pb.AppConfigRecord], pb.AppConfigRecord]
    ) -> tuple[pb.AppConfigRecord, pb.AppConfigRecord]:
        """See :meth:`Store.update_app_config`: a compare-and-swap on the key's revision.

        Two operators writing the same record through two replicas at once
        both succeed, one after the other (the loser reads again and
        re-applies its change); after :data:`CAS_ATTEMPTS` lost races it
        gives up with :class:`StoreError`.
        """
        return await self._cas_update(
            f"{self.prefix}appconfig/{service}.{env}", pb.AppConfigRecord(service=service, environment=env), update, f"configuration {service}.{env}"
        )

    async def _cas_update(self, key_text: str, empty: _R, update: Callable[[_R], _R], what: str, *, skip_same: bool = False) -> tuple[_R, _R]:
        """Read-modify-write one record with a compare-and-swap on its revision.

        ``empty`` is the record when the key does not exist (its create
        revision must still be 0 when we write). A lost race reads again and
        re-applies ``update``; after :data:`CAS_ATTEMPTS` lost races,
        :class:`StoreError`. With ``skip_same``, an update that changes
        nothing writes nothing.
        """
        key = _b64(key_text)
        for _ in range(CAS_ATTEMPTS):
            reply = await self._call("/v3/kv/range", {"key": key})
            kvs = reply.get("kvs") or []
            old = type(empty)()
            old.CopyFrom(empty)
            revision = 0
            if kvs:
                revision = int(kvs[0].get("mod_revision", 0))
                try:
                    json_format.Parse(_unb64(kvs[0].get("value", "")), old, ignore_unknown_fields=True)
                except json_format.ParseError as exc:
                    raise StoreError(f"undecodable {what} in etcd: {exc}") from None
            new = update(old)
            if skip_same and new == old:
                return old, new
            compare = {"key": key, "target": "MOD", "mod_revision": str(revision), "result": "EQUAL"}
            if not revision:
                compare = {"key": key, "target": "CREATE", "create_revision": "0", "result": "EQUAL"}
            txn = {"compare": [compare], "success": [{"request_put": {"key": key, "value": _b64(_to_json(new))}}]}
            if (await self._call("/v3/kv/txn", txn)).get("succeeded"):
                return old, new
        raise StoreError(f"{what}: {CAS_ATTEMPTS} concurrent writes in a row; try again")
