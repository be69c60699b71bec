"""The Mesh SDK for threads: Flask, Django, Celery workers, scripts.

Blocking and thread-safe, with the same names, statuses and errors as
:mod:`octoproxy.sdk` (Trio) over the same sans-IO core::

    from octoproxy.sdk import sync

    client = sync.connect("/run/octoproxy/outbound.sock")   # share it between threads
    reply = client.call("echo", "ping", b"hello", timeout=1.0)

    def handler(request: sync.Request) -> bytes:            # runs in a worker thread
        return request.body

    sync.serve("/run/app/inbound.sock", handler, workers=16)  # until Ctrl-C

See docs/sdk.md.
"""

from __future__ import annotations

from ..protocol._protocol import Status as Status
from ._blocking import Client as Client
from ._blocking import Handler as Handler
from ._blocking import connect as connect
from ._blocking import subscribe as subscribe
from ._blocking import get_config as get_config
from ._blocking import watch_config as watch_config
from ._config_core import AppConfig as AppConfig
from ._blocking_server import Server as Server
from ._blocking_server import run_provider as run_provider
from ._blocking_server import serve as serve
from ._blocking_server import start_server as start_server
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
    "run_provider",
    "serve",
    "start_server",
    "subscribe",
    "get_config",
    "watch_config",
    "AppConfig",
]
