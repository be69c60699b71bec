"""Helpers for the HTTP/1.1 end-to-end tests: a plain HTTP app, a provider proxy in
front of it (``app_codec = "http1"``) and a caller proxy with an ``[http]``
listener, all real processes on loopback."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from e2e import HERE, Proc, free_port, proxy, run_process, short_tmpdir, wait_ready

SERVICE = "web"


def http_provider_toml(d: Path, port: int, app_port: int, name: str = "web-proxy", extra_inbound: str = "", extra_proxy: str = "") -> str:
    return f"""
[proxy]
service = "{SERVICE}"
drain_time = 3.0
shutdown_time = 6.0
{extra_proxy}
[outbound]
uds = "{d}/{name}-out.sock"
[inbound]
listen = "127.0.0.1:{port}"
app_codec = "http1"
app_http = "127.0.0.1:{app_port}"
{extra_inbound}
[admin]
listen = "127.0.0.1:0"
"""


def http_caller_toml(d: Path, http_port: int, upstream_port: int, extra_http: str = "", extra_proxy: str = "", route_timeout: str = "5.0") -> str:
    return f"""
[proxy]
service = "client-app"
drain_time = 3.0
shutdown_time = 6.0
{extra_proxy}
[outbound]
uds = "{d}/caller.sock"
[http]
listen = "127.0.0.1:{http_port}"
{extra_http}
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = 0.5
[[routes]]
service = "{SERVICE}"
cluster = "{SERVICE}"
timeout = {route_timeout}
[clusters.{SERVICE}]
endpoints = [ {{ address = "127.0.0.1:{upstream_port}" }} ]
"""


@dataclass
class HttpMesh:
    dir: Path
    app: Proc
    provider: Proc
    caller: Proc
    http_port: int
    provider_port: int
    app_port: int

    @property
    def base(self) -> str:
        """The caller proxy's HTTP listener as a base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@asynccontextmanager
async def http_app(d: Path, name: str = "http-app") -> AsyncIterator[Proc]:
    async with run_process([sys.executable, str(HERE / "apps" / "http_app.py")], "http app ready", d, name) as p:
        yield p


@asynccontextmanager
async def http_mesh(extra_http: str = "", extra_inbound: str = "", route_timeout: str = "5.0") -> AsyncIterator[HttpMesh]:
    with short_tmpdir() as d:
        async with http_app(d) as app:
            app_port = int(app.addresses["port"])
            pport = free_port()
            hport = free_port()
            async with proxy(d, "web-proxy", http_provider_toml(d, pport, app_port, extra_inbound=extra_inbound)) as pp:
                async with proxy(d, "caller-proxy", http_caller_toml(d, hport, pport, extra_http, route_timeout=route_timeout)) as cp:
                    await wait_ready(pp)
                    await wait_ready(cp)
                    yield HttpMesh(d, app, pp, cp, hport, pport, app_port)
