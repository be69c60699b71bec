"""The SDK's discovery subscription: ``POST /subscribe`` to the local proxy's admin API.

The SDK subscribes to the services its app calls when it connects, so the
proxy only ever holds those. The proxy may not be up yet (it starts next to
the app): the SDK retries with exponential back-off until ``retry_for`` runs
out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import trio

from ._admin import http_request
from ._protocol import Status
from ._sdk_client import CallError

logger = logging.getLogger("octoproxy.sdk")

__all__ = ["subscribe"]


async def subscribe(admin: str, services: Iterable[str], *, timeout: float = 5.0, retry_for: float = 30.0) -> dict[str, int]:
    """Subscribe the local proxy to ``services``; return once it holds their endpoints.

    Args:
        admin: the proxy's admin address (``host:port`` or ``unix:/path``).
        services: the service names this app calls.
        timeout: how long the proxy may wait for the control plane.
        retry_for: how long to keep retrying while the proxy is not up.

    Returns:
        Endpoints known per service (0: the control plane knows no endpoint).

    Raises:
        CallError: UNAVAILABLE if the proxy never answered within
            ``retry_for``, or TIMEOUT if it did not get the endpoints in time;
            NO_ROUTE if the proxy has no discovery configured.
    """
    names = sorted(set(services))
    body = json.dumps({"services": names, "timeout": timeout}).encode()
    delay = 0.05
    last: BaseException | None = None
    with trio.move_on_after(retry_for):
        while True:
            try:
                status, _headers, reply = await http_request(admin, "POST", "/subscribe", body, timeout=timeout + 2.0)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                last = exc  # the proxy is not up (yet): back off and retry
                logger.info("subscribe: proxy at %s not answering (%s); retrying in %.2fs", admin, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if status == 200:
                services_state = json.loads(reply).get("services", {})
                return {n: int(v.get("endpoints", 0)) for n, v in services_state.items()}
            if status == 504:
                raise CallError(Status.TIMEOUT, f"subscribe {names}: the proxy got no endpoints within {timeout}s")
            if status == 404:
                raise CallError(Status.NO_ROUTE, f"subscribe {names}: the proxy has no discovery configured")
            raise CallError(Status.UNAVAILABLE, f"subscribe {names}: HTTP {status}: {reply[:200]!r}")
    raise CallError(Status.UNAVAILABLE, f"subscribe {names}: no proxy answered at {admin} within {retry_for}s ({last})")
