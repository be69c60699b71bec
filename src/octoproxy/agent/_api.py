"""The agent's admin HTTP API, and the client side of ``POST /upgrade``.

``GET /healthz``, ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text),
``POST /upgrade`` (optional JSON body ``{"version": "name", "config": "path"}``,
both checked against the agent's own ``[upgrade]`` table: see :func:`resolve_upgrade`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..common._admin import Request, Response, Routes, http_request
from ..protocol._errors import OctoproxyError

if TYPE_CHECKING:
    from ._config import UpgradeSettings
    from ._supervisor import Agent

__all__ = ["ADMIN_PUBLIC", "admin_routes", "post_upgrade", "resolve_upgrade", "UpgradeClientError"]

_PROM = "text/plain; version=0.0.4; charset=utf-8"
#: open without the agent's token: the probes and the metrics scrape. GET /status (it shows the
#: command and config paths) and POST /upgrade need it.
ADMIN_PUBLIC = frozenset({("GET", "/healthz"), ("GET", "/metrics")})
_SLACK = 5.0  # beyond the agent's own deadlines, for the HTTP exchange


def resolve_upgrade(body: bytes, allowed: UpgradeSettings, current_config: Path) -> tuple[str | None, tuple[str, ...] | None, Path | None]:
    """Check a ``POST /upgrade`` body against what the agent's own configuration allows.

    The body names ``{"version": NAME}`` (a key of ``[upgrade] versions``) and/or
    ``{"config": PATH}``; it never carries a command line. A relative ``config``
    is resolved against ``current_config``'s directory; symlinks are resolved,
    and the real path must be ``current_config``, one of ``[upgrade] configs``,
    or inside ``[upgrade] config_dir``, and a regular file.

    Args:
        body: the request body (empty: same version, same config).
        allowed: the agent's ``[upgrade]`` table.
        current_config: the proxy's configuration file now.

    Returns:
        ``(version name, command, real config path)``; None for what was not asked.

    Raises:
        ValueError: with the reason, for anything not allowed (nothing is run).
    """
    if not body.strip():
        return None, None, None
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    if "command" in data:
        raise ValueError('"command" is not accepted: name a version from the agent\'s [upgrade] versions')
    unknown = set(data) - {"version", "config"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key")
    version, config = data.get("version"), data.get("config")
    command = None
    if version is not None:
        if not isinstance(version, str) or version not in allowed.versions:
            names = ", ".join(sorted(allowed.versions)) or "none configured"
            raise ValueError(f"version {version!r} is not in the agent's [upgrade] versions ({names})")
        command = allowed.versions[version]
    real = None
    if config is not None:
        if not (isinstance(config, str) and config and "\0" not in config):
            raise ValueError(f"config: expected a non-empty path string, got {config!r}")
        real = _allowed_config(Path(config), allowed, current_config)
    return version, command, real


def _allowed_config(path: Path, allowed: UpgradeSettings, current_config: Path) -> Path:
    if not path.is_absolute():
        path = current_config.parent / path
    try:
        real = Path(os.path.realpath(path, strict=True))
        st = os.stat(real)
    except OSError as exc:
        raise ValueError(f"config {str(path)!r}: {exc.strerror or exc}") from None
    ok = real in {Path(os.path.realpath(p)) for p in (current_config, *allowed.configs)}
    if not ok and allowed.config_dir is not None:
        ok = real.is_relative_to(os.path.realpath(allowed.config_dir))
    if not ok:
        raise ValueError(
            f"config {str(path)!r} is not allowed: it must be agent.proxy_config, one of [upgrade] configs, "
            "or inside [upgrade] config_dir (symlinks resolved)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"config {str(path)!r} is not a regular file")
    return real


def admin_routes(agent: Agent) -> Routes:
    """The agent's admin routes, for :func:`~octoproxy.common._admin.serve_admin`.

    Args:
        agent: the agent they report on and act on.

    Returns:
        ``{(method, path): handler}``.
    """
    settings = agent.settings

    async def healthz(_req: Request) -> Response:
        return Response(200, "ok\n")

    async def status(_req: Request) -> Response:
        return Response(200, agent.status())

    async def metrics(_req: Request) -> Response:
        return Response(200, agent.registry.render(), content_type=_PROM)

    async def upgrade(req: Request) -> Response:
        from ._supervisor import UpgradeBusy

        try:
            # a relative config is relative to where the current proxy config lives
            version, command, config = resolve_upgrade(req.body, agent.upgrade_settings, agent.config)
        except ValueError as exc:
            agent.log_refused_upgrade(str(exc))
            return Response(400, {"error": str(exc)})
        try:
            pending = agent.request_upgrade(command, config, source="api", version=version)
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
    admin: str,
    *,
    version: str | None = None,
    config: str | None = None,
    token: str | bytes | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Ask a running agent to upgrade its proxy, and wait for the outcome.

    Args:
        admin: the agent's admin address (``host:port`` or ``unix:/path``).
        version: the name of a proxy command in the agent's ``[upgrade] versions``
            (default: the agent's current command).
        config: the new proxy config path, one the agent's ``[upgrade]`` table
            allows; give an absolute path (a relative one is resolved by the
            agent, against its ``proxy_config``'s directory).
        token: the agent's admin token (``agent.token_file``).
        timeout: deadline of the whole exchange.

    Returns:
        The outcome (``outcome``, ``reason``, ``pid``, ``generation``, ...).

    Raises:
        UpgradeClientError: on 409 (busy, or the proxy is not running), 400,
            any other non-200 answer, or if the agent cannot be reached.
    """
    body: dict[str, Any] = {}
    if version is not None:
        body["version"] = version
    if config is not None:
        body["config"] = config
    headers = [("Content-Type", "application/json")]
    try:
        status, _h, raw = await http_request(
            admin, "POST", "/upgrade", json.dumps(body).encode(), headers=headers, timeout=timeout, token=token
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
