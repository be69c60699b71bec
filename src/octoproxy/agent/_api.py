"""The agent's admin HTTP API, and the client side of ``POST /upgrade``.

``GET /healthz``, ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text),
``POST /upgrade`` (optional JSON body ``{"command": [...], "config": "path"}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._admin import Request, Response, Routes, http_request
from .._errors import OctoproxyError

if TYPE_CHECKING:
    from ._supervisor import Agent

__all__ = ["admin_routes", "post_upgrade", "UpgradeClientError"]

_PROM = "text/plain; version=0.0.4; charset=utf-8"
_SLACK = 5.0  # beyond the agent's own deadlines, for the HTTP exchange


def _parse_upgrade_body(body: bytes, base_dir: Path) -> tuple[tuple[str, ...] | None, Path | None]:
    """Validate ``{"command": [...], "config": "path"}`` (both optional)."""
    if not body.strip():
        return None, None
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(data) - {"command", "config"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key")
    command, config = data.get("command"), data.get("config")
    if command is not None and not (
        isinstance(command, list) and command and all(isinstance(x, str) and x for x in command)
    ):
        raise ValueError(f"command: expected a non-empty array of non-empty strings, got {command!r}")
    if config is not None and not (isinstance(config, str) and config and "\0" not in config):
        raise ValueError(f"config: expected a non-empty path string, got {config!r}")
    path = None if config is None else Path(config).expanduser()
    if path is not None and not path.is_absolute():
        path = base_dir / path
    return (tuple(command) if command is not None else None), path


def admin_routes(agent: Agent) -> Routes:
    """The agent's admin routes, for :func:`~octoproxy._admin.serve_admin`.

    Args:
        agent: the agent they report on and act on.

    Returns:
        ``{(method, path): handler}``.
    """
    settings = agent.settings
    # a relative config in POST /upgrade is relative to where proxy_config lives
    base_dir = settings.proxy_config.parent

    async def healthz(_req: Request) -> Response:
        return Response(200, "ok\n")

    async def status(_req: Request) -> Response:
        return Response(200, agent.status())

    async def metrics(_req: Request) -> Response:
        return Response(200, agent.registry.render(), content_type=_PROM)

    async def upgrade(req: Request) -> Response:
        from ._supervisor import UpgradeBusy

        try:
            command, config = _parse_upgrade_body(req.body, base_dir)
        except ValueError as exc:
            return Response(400, {"error": str(exc)})
        try:
            pending = agent.request_upgrade(command, config, source="api")
        except UpgradeBusy as exc:
            return Response(409, {"error": str(exc)})
        with trio.move_on_after(settings.upgrade_timeout + settings.stop_grace + _SLACK):
            await pending.done.wait()
        result = pending.result
        if result is None:
            return Response(504, {"error": "the upgrade did not finish in time; see GET /status"})
        if result.outcome == "rejected":
            return Response(409, {"error": result.reason, **result.to_json()})
        return Response(200, result.to_json())

    return {
        ("GET", "/healthz"): healthz,
        ("GET", "/status"): status,
        ("GET", "/metrics"): metrics,
        ("POST", "/upgrade"): upgrade,
    }


class UpgradeClientError(OctoproxyError):
    """The agent refused the upgrade or could not be asked."""


async def post_upgrade(
    admin: str, *, command: list[str] | None = None, config: str | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Ask a running agent to upgrade its proxy, and wait for the outcome.

    Args:
        admin: the agent's admin address (``host:port`` or ``unix:/path``).
        command: the new proxy command (default: the agent's current one).
        config: the new proxy config path; give an absolute path (a relative
            one is resolved by the agent, against its ``proxy_config``'s directory).
        timeout: deadline of the whole exchange.

    Returns:
        The outcome (``outcome``, ``reason``, ``pid``, ``generation``, ...).

    Raises:
        UpgradeClientError: on 409 (busy, or the proxy is not running), 400,
            any other non-200 answer, or if the agent cannot be reached.
    """
    body: dict[str, Any] = {}
    if command is not None:
        body["command"] = command
    if config is not None:
        body["config"] = config
    try:
        status, _h, raw = await http_request(
            admin, "POST", "/upgrade", json.dumps(body).encode(), headers=[("Content-Type", "application/json")], timeout=timeout
        )
    except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise UpgradeClientError(f"cannot reach the agent at {admin}: {exc!r}") from exc
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UpgradeClientError(f"agent answered {status} with a body that is not a JSON object: {raw[:200]!r}")
    if status != 200:
        raise UpgradeClientError(f"agent answered {status}: {data.get('error', data)}")
    return data
