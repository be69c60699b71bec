"""The control plane's admin HTTP API: what ``octoproxy ctl`` talks to.

Every request but ``GET /healthz`` needs the operator's bearer token
(``Authorization: Bearer <operator token>``): 401 without valid credentials
(one rate-limited log line), 403 for a service's join token. Bodies and
answers are JSON; endpoints and route rules use the protobuf JSON mapping
(field names as in ``octoproxy_discovery.proto``).

| method | path | what |
|---|---|---|
| GET | /healthz | ``ok`` (no credentials: for health checkers) |
| GET | /sessions?offset=&limit= | summary + one page of sessions |
| GET | /v1/tokens | join tokens (ids, services, expiry; never secrets) |
| POST | /v1/tokens | ``{"service", "ttl"}`` -> ``{"id", "token", ...}`` (shown once) |
| POST | /v1/tokens/revoke | ``{"id"}`` |
| GET | /v1/endpoints?service= | the service's endpoints |
| POST | /v1/endpoints/register | ``{"service", "endpoint", "ttl"}`` (leased, not kept alive) |
| POST | /v1/endpoints/deregister | ``{"service", "address"}`` |
| POST | /v1/endpoints/status | ``{"service", "address", "status"}`` |
| GET | /v1/routes?service= | the service's route rules |
| PUT | /v1/routes | a ``RouteRules`` (no rules deletes them) |
| GET | /v1/authz?service= | the service's pushed ``AuthorizationPolicy`` (``policy`` null: none) |
| PUT | /v1/authz[?dry_run=1] | an ``AuthorizationPolicy`` (validated like the proxy does; dry run: only validated) |
| POST | /v1/authz/delete | ``{service}``: the proxies fall back to their ``[authz]`` |
| GET | /v1/policy?service= | the service's governance policy in force (``policy`` null: none) |
| GET | /v1/policy/history?service= | its stored versions, newest first |
| PUT | /v1/policy[?dry_run=1] | ``{service, policy}``: validated (400 lists every error); answers the canonical form and the diff |
| POST | /v1/policy/delete | ``{service}``: the proxies fall back to their ``[governance]`` table |
| GET, POST | /v1/config... | configuration for apps (see :mod:`._appconfig`) |
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.protobuf import json_format

from ..common._admin import Handler, Request, Response
from ..discovery._governance import canonical_policy, record_delete, record_set
from ..discovery._xds_client import RESOURCE_TYPES
from ..discovery._xds_server import check_endpoint, check_route_rules, check_service_name
from ..protocol.proto import octoproxy_discovery_pb2 as pb
from ._appconfig import appconfig_routes
from ._auth import RateLimitedLog, make_join_token
from ._server import ControlPlaneServer
from ._store import StoreError, check_authz_policy, stamp_warmup
from ..governance import PolicyError

__all__ = ["admin_routes", "MAX_PAGE"]

log = logging.getLogger("octoproxy.controlplane.admin")

#: largest page of GET /sessions
MAX_PAGE = 1000
_SHOWN_NAMES = 10


def _json(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)  # type: ignore[no-any-return]


def _token_info(t: pb.JoinToken) -> dict[str, Any]:
    return {"id": t.id, "service": t.service, "created_unix_ms": t.created_unix_ms, "expires_unix_ms": t.expires_unix_ms}


def _body(req: Request) -> dict[str, Any]:
    data = req.json()
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def admin_routes(server: ControlPlaneServer) -> dict[tuple[str, str], Handler]:
    """The admin API's routes for ``server`` (see the module doc)."""
    store = server.store
    refused = RateLimitedLog(log.warning)

    def operator_only(handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        async def guarded(req: Request) -> Response:
            principal = server.auth.authenticate(req.header("authorization"), time.time())
            if isinstance(principal, str):
                refused(trio.current_time(), f"refused an unauthenticated admin request {req.method} {req.path}: {principal}")
                return Response(
                    401, {"error": f"unauthenticated: {principal}"}, headers=[("WWW-Authenticate", 'Bearer realm="octoproxy"')]
                )
            if not principal.is_operator:
                return Response(403, {"error": f"permission denied: {principal.describe()} is not an operator"})
            try:
                return await handler(req)
            except (ValueError, json_format.ParseError) as exc:
                return Response(400, {"error": str(exc)})
            except StoreError as exc:
                return Response(503, {"error": f"store error: {exc}"})

        return guarded

    async def healthz(_: Request) -> Response:
        return Response(200, "ok\n")

    async def sessions(req: Request) -> Response:
        offset = int(req.query.get("offset", "0"))
        limit = min(int(req.query.get("limit", "100")), MAX_PAGE)
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        all_sessions = sorted(server.sessions, key=lambda s: s.peer)
        by_kind: dict[str, int] = {}
        for s in all_sessions:
            key = s.principal.service if s.principal.kind == "service" else "operator"
            by_kind[key] = by_kind.get(key, 0) + 1
        page = []
        for s in all_sessions[offset : offset + limit]:
            subscribed = {t: len(s.core.subscribed(t)) for t in RESOURCE_TYPES}
            names = sorted(set().union(*(s.core.subscribed(t) for t in RESOURCE_TYPES)))
            page.append({
                "peer": s.peer,
                "node_id": s.core.node_id,
                "principal": s.principal.describe(),
                "subscriptions": subscribed,
                "subscribed_sample": names[:_SHOWN_NAMES],
                "registrations": [f"{svc}/{addr}" for svc, addr in sorted(s.registrations)][:_SHOWN_NAMES],
                "registration_count": len(s.registrations),
            })
        return Response(200, {
            "total": len(all_sessions),
            "by_principal": by_kind,
            "refused": dict(server.refused),
            "offset": offset,
            "limit": limit,
            "sessions": page,
        })

    # ---------------------------------------------------------------- tokens
    async def tokens_list(_: Request) -> Response:
        return Response(200, {"tokens": [_token_info(t) for t in sorted(store.view.tokens.values(), key=lambda t: (t.service, t.id))]})

    async def tokens_create(req: Request) -> Response:
        body = _body(req)
        ttl = float(body.get("ttl", 0) or 0)
        token, record = make_join_token(str(body.get("service", "")), time.time(), ttl)
        await store.put_token(record)
        log.info("join token %s created for service %s", record.id, record.service)
        return Response(200, {**_token_info(record), "token": token})

    async def tokens_revoke(req: Request) -> Response:
        tid = str(_body(req).get("id", ""))
        found = await store.delete_token(tid) if tid else False
        if not found:
            return Response(404, {"error": f"no join token with id {tid!r}"})
        log.info("join token %s revoked", tid)
        return Response(200, {"revoked": tid})

    # ---------------------------------------------------------------- endpoints
    def service_arg(value: object) -> str:
        service = str(value or "")
        error = check_service_name(service)
        if error is not None:
            raise ValueError(error)
        return service

    async def endpoints_get(req: Request) -> Response:
        service = service_arg(req.query.get("service"))
        found = await store.get_endpoints(service)
        if found is None:
            return Response(200, {"service": service, "version": "", "endpoints": []})
        version, cla = found
        return Response(200, {"service": service, "version": version, "endpoints": [_json(e) for e in cla.endpoints]})

    async def endpoints_register(req: Request) -> Response:
        body = _body(req)
        service = service_arg(body.get("service"))
        endpoint = json_format.ParseDict(body.get("endpoint") or {}, pb.Endpoint())
        error = check_endpoint(endpoint, server.allowed_networks)
        if error is not None:
            raise ValueError(error)
        ttl = float(body.get("ttl", server.max_lease_ttl))
        ttl = min(max(ttl, server.min_lease_ttl), server.max_lease_ttl)
        stamp_warmup(store.view, service, endpoint, time.time())
        lease = await store.grant_lease(ttl)
        await store.put_endpoint(service, endpoint, lease.id)
        log.info("operator registered %s/%s (lease %.0fs, not kept alive)", service, endpoint.address, lease.ttl)
        return Response(200, {"service": service, "address": endpoint.address, "lease_ttl": lease.ttl})

    async def endpoints_deregister(req: Request) -> Response:
        body = _body(req)
        service, address = service_arg(body.get("service")), str(body.get("address", ""))
        if not await store.delete_endpoint(service, address):
            return Response(404, {"error": f"{service}/{address} is not registered"})
        log.info("operator deregistered %s/%s", service, address)
        return Response(200, {"deregistered": f"{service}/{address}"})

    async def endpoints_status(req: Request) -> Response:
        body = _body(req)
        service, address = service_arg(body.get("service")), str(body.get("address", ""))
        name = str(body.get("status", ""))
        if name not in pb.Endpoint.Status.keys():
            raise ValueError(f"unknown status {name!r} (want one of {', '.join(pb.Endpoint.Status.keys())})")
        if not await store.set_status(service, address, pb.Endpoint.Status.Value(name)):
            return Response(404, {"error": f"{service}/{address} is not registered"})
        log.info("operator set %s/%s %s", service, address, name)
        return Response(200, {"service": service, "address": address, "status": name})

    # ---------------------------------------------------------------- routes
    async def routes_get(req: Request) -> Response:
        service = service_arg(req.query.get("service"))
        found = await store.get_route_rules(service)
        rules = found[1] if found is not None else pb.RouteRules(service=service)
        return Response(200, {"version": found[0] if found else "", "rules": _json(rules)})

    async def routes_put(req: Request) -> Response:
        rules = json_format.ParseDict(_body(req), pb.RouteRules())
        error = check_route_rules(rules)
        if error is not None:
            raise ValueError(error)
        before = await store.get_route_rules(rules.service)
        await store.put_route_rules(rules)
        changed = (before[1] if before else pb.RouteRules(service=rules.service)) != rules
        log.info("operator put route rules of %s (%d rules, changed=%s)", rules.service, len(rules.rules), changed)
        return Response(200, {"service": rules.service, "changed": changed})

    # ---------------------------------------------------------------- authorization policies
    async def authz_get(req: Request) -> Response:
        service = service_arg(req.query.get("service"))
        found = await store.get_authz_policy(service)
        if found is None:
            return Response(200, {"service": service, "version": "", "policy": None})
        return Response(200, {"service": service, "version": found[0], "policy": _json(found[1])})

    async def authz_put(req: Request) -> Response:
        policy = json_format.ParseDict(_body(req), pb.AuthorizationPolicy())
        error = check_authz_policy(policy)
        if error is not None:
            raise ValueError(error)
        before = await store.get_authz_policy(policy.service)
        changed = before is None or before[1] != policy
        if req.query.get("dry_run"):
            return Response(200, {"service": policy.service, "changed": changed, "dry_run": True})
        await store.put_authz_policy(policy)
        log.info("operator put the authorization policy of %s (%d rules, default %s, changed=%s)", policy.service,
                 len(policy.rules), policy.default_action or "allow", changed)  # fmt: skip
        return Response(200, {"service": policy.service, "changed": changed})

    async def authz_delete(req: Request) -> Response:
        service = service_arg(_body(req).get("service"))
        if not await store.delete_authz_policy(service):
            return Response(404, {"error": f"{service} has no authorization policy"})
        log.info("operator deleted the authorization policy of %s", service)
        return Response(200, {"deleted": service})

    # ---------------------------------------------------------------- governance policies
    def policy_doc(policy_json: str) -> Any:
        return json.loads(policy_json) if policy_json else None

    def pretty(doc: Any) -> list[str]:
        return json.dumps(doc, indent=2, sort_keys=True).splitlines() if doc is not None else []

    async def policy_get(req: Request) -> Response:
        service = service_arg(req.query.get("service"))
        found = await store.get_governance(service)
        if found is None:
            return Response(200, {"service": service, "version": 0, "resource_version": "", "policy": None})
        resource_version, msg = found
        return Response(200, {"service": service, "version": msg.version, "resource_version": resource_version,
                              "policy": policy_doc(msg.policy_json)})  # fmt: skip

    async def policy_history(req: Request) -> Response:
        service = service_arg(req.query.get("service"))
        record = store.view.governance.get(service)
        if record is None:
            return Response(200, {"service": service, "current": 0, "history": []})
        history = [
            {"version": v.version, "created_unix_ms": v.created_unix_ms, "note": v.note, "policy": policy_doc(v.policy_json)}
            for v in reversed(record.history)
        ]
        return Response(200, {"service": service, "current": record.current, "history": history})

    async def policy_put(req: Request) -> Response:
        body = _body(req)
        unknown = sorted(set(body) - {"service", "policy"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}: want {{\"service\": ..., \"policy\": {{...}}}}")
        service = service_arg(body.get("service"))
        try:
            text, _ = canonical_policy(service, body.get("policy", {}))
        except PolicyError as exc:  # every error, each naming its key; nothing changes
            return Response(400, {"error": f"invalid governance policy for {service}:\n{exc}", "errors": list(exc.errors)})
        current = store.view.governance.get(service) or pb.GovernancePolicyRecord(service=service)
        before = None
        for v in current.history:
            if current.current and v.version == current.current:
                before = policy_doc(v.policy_json)
        diff = list(difflib.unified_diff(pretty(before), pretty(json.loads(text)), "current", "new", lineterm=""))
        answer: dict[str, Any] = {"service": service, "changed": bool(diff), "diff": diff, "policy": json.loads(text)}
        if req.query.get("dry_run"):
            return Response(200, {**answer, "dry_run": True, "version": current.current})
        now_ms = int(time.time() * 1000)
        _, new = await store.update_governance(service, lambda rec: record_set(rec, service, text, now_ms))
        log.info("operator set the governance policy of %s: version %d (changed=%s)", service, new.current, answer["changed"])
        return Response(200, {**answer, "version": new.current})

    async def policy_delete(req: Request) -> Response:
        service = service_arg(_body(req).get("service"))
        now_ms = int(time.time() * 1000)
        try:
            _, new = await store.update_governance(service, lambda rec: record_delete(rec, now_ms))
        except KeyError:
            return Response(404, {"error": f"{service} has no governance policy"})
        log.info("operator deleted the governance policy of %s (version %d)", service, new.last_version)
        return Response(200, {"deleted": service, "version": new.last_version})

    routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("GET", "/sessions"): sessions,
        ("GET", "/v1/tokens"): tokens_list,
        ("POST", "/v1/tokens"): tokens_create,
        ("POST", "/v1/tokens/revoke"): tokens_revoke,
        ("GET", "/v1/endpoints"): endpoints_get,
        ("POST", "/v1/endpoints/register"): endpoints_register,
        ("POST", "/v1/endpoints/deregister"): endpoints_deregister,
        ("POST", "/v1/endpoints/status"): endpoints_status,
        ("GET", "/v1/routes"): routes_get,
        ("PUT", "/v1/routes"): routes_put,
        ("GET", "/v1/authz"): authz_get,
        ("PUT", "/v1/authz"): authz_put,
        ("POST", "/v1/authz/delete"): authz_delete,
        ("GET", "/v1/policy"): policy_get,
        ("GET", "/v1/policy/history"): policy_history,
        ("PUT", "/v1/policy"): policy_put,
        ("POST", "/v1/policy/delete"): policy_delete,
    }
    routes.update(appconfig_routes(store))  # configuration for apps (controlplane/_appconfig.py)
    out: dict[tuple[str, str], Handler] = {k: operator_only(v) for k, v in routes.items()}
    out[("GET", "/healthz")] = healthz
    return out
