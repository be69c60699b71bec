"""The Mesh SDK for asyncio apps (FastAPI, aiohttp, plain ``asyncio.run``).

The same names, statuses and errors as :mod:`octoproxy.sdk` (Trio), over the
same sans-IO core: HOT_RESTART resends, GOAWAY and reconnects behave the same::

    from octoproxy.sdk import aio

    async with aio.open_client("/run/octoproxy/outbound.sock") as client:
        reply = await client.call("echo", "ping", b"hello", timeout=1.0)

    async def handler(request: aio.Request) -> bytes:
        return request.body

    aio.run_provider("/run/app/inbound.sock", handler)  # until Ctrl-C or SIGTERM

See docs/sdk.md.
"""

from __future__ import annotations

from ..protocol._protocol import Status as Status
from ._asyncio import Client as Client
from ._asyncio import Handler as Handler
from ._asyncio import connect as connect
from ._asyncio import open_client as open_client
from ._asyncio import subscribe as subscribe
from ._asyncio import get_config as get_config
from ._asyncio import watch_config as watch_config
from ._config_core import AppConfig as AppConfig
from ._asyncio_server import Server as Server
from ._asyncio_server import run_provider as run_provider
from ._asyncio_server import serve as serve
from ._asyncio_server import start_server as start_server
from ._core import CallError as CallError
from ._core import ClientClosedError as ClientClosedError
from ._core import MAX_RESENDS as MAX_RESENDS
from ._core import NoProxyError as NoProxyError
from ._server_core import ApplicationError as ApplicationError
from ._server_core import Request as Request

__all__ = [
    "MAX_RESENDS",
    "ApplicationError",
    "CallError",
    "Client",
    "ClientClosedError",
    "Handler",
    "NoProxyError",
    "Request",
    "Server",
    "Status",
    "connect",
    "open_client",
    "run_provider",
    "serve",
    "start_server",
    "subscribe",
    "get_config",
    "watch_config",
    "AppConfig",
]
