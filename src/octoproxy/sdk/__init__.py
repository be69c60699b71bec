"""The Mesh SDK: call services through the local octoproxy, and serve them.

An application talks to its local proxy over a Unix socket with the frames of
docs/protocol.md; the proxy forwards the same frames to the provider's app, so
a client can also talk straight to a server (as the tests do).

Calling. A client needs background reader tasks, so it lives in a nursery:
:func:`open_client` owns one for the duration of an ``async with`` block (the
usual way); :func:`connect` runs the tasks in a nursery you pass, for a client
that outlives one block (close it with ``aclose``)::

    async with octoproxy.sdk.open_client("/run/octoproxy/outbound.sock") as client:
        reply = await client.call("echo", "ping", b"hello", timeout=1.0)

Serving::

    async def handler(request: octoproxy.sdk.Request) -> bytes:
        return request.body

    await nursery.start(octoproxy.sdk.serve, "/run/app/inbound.sock", handler)

or, as a whole program that stops cleanly on Ctrl-C or SIGTERM::

    octoproxy.sdk.run_provider("/run/app/inbound.sock", handler)

Discovery. The proxy holds only the services its app calls: subscribe to them
once, on start (retried while the proxy is not up yet)::

    await octoproxy.sdk.subscribe("127.0.0.1:9901", ["echo", "users"])

A call to a service nobody subscribed to also works: the proxy subscribes on
demand and the first call waits for it.

A non-OK answer raises :class:`CallError` (with its :class:`Status`); a handler
raises :class:`ApplicationError` to answer APPLICATION_ERROR. Hot restarts of
the proxy are handled inside the client: calls answered HOT_RESTART are resent
on a new connection (``Client.resends`` counts them), GOAWAY moves new calls to
a new connection, and lost connections are redialled by the next call. With no
proxy on the socket, :func:`open_client` raises :class:`NoProxyError` naming the
path (``wait=`` seconds waits for one to appear first).

This module is the Trio front end. The same API for asyncio is
:mod:`octoproxy.sdk.aio`, and for threads (blocking, thread-safe)
:mod:`octoproxy.sdk.sync`; all three share one sans-IO core (``_core.py``,
``_server_core.py``), so framing, HOT_RESTART resends, GOAWAY and errors behave
the same. See docs/sdk.md.
"""

from __future__ import annotations

from ..protocol._protocol import Status as Status
from ._core import MAX_RESENDS as MAX_RESENDS
from ._core import CallError as CallError
from ._core import ClientClosedError as ClientClosedError
from ._core import NoProxyError as NoProxyError
from ._server_core import ApplicationError as ApplicationError
from ._server_core import Request as Request
from ._trio import Client as Client
from ._trio import Handler as Handler
from ._trio import connect as connect
from ._trio import open_client as open_client
from ._trio_server import run_provider as run_provider
from ._trio_server import serve as serve
from ._trio import subscribe as subscribe
from ._trio import get_config as get_config
from ._trio import watch_config as watch_config
from ._config_core import AppConfig as AppConfig

__all__ = [
    "MAX_RESENDS",
    "ApplicationError",
    "CallError",
    "Client",
    "ClientClosedError",
    "Handler",
    "NoProxyError",
    "Request",
    "Status",
    "connect",
    "open_client",
    "run_provider",
    "serve",
    "subscribe",
    "get_config",
    "watch_config",
    "AppConfig",
]
