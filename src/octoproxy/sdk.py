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

Discovery. The proxy holds only the services its app calls: subscribe to them
once, on start (retried while the proxy is not up yet)::

    await octoproxy.sdk.subscribe("127.0.0.1:9901", ["echo", "users"])

A call to a service nobody subscribed to also works: the proxy subscribes on
demand and the first call waits for it.

A non-OK answer raises :class:`CallError` (with its :class:`Status`); a handler
raises :class:`ApplicationError` to answer APPLICATION_ERROR. Hot restarts of
the proxy are handled inside the client: calls answered HOT_RESTART are resent
on a new connection (``Client.resends`` counts them), GOAWAY moves new calls to
a new connection, and lost connections are redialled by the next call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

from ._protocol import DEFAULT_MAX_FRAME_SIZE
from ._protocol import Status as Status
from ._sdk_client import MAX_RESENDS as MAX_RESENDS
from ._sdk_client import CallError as CallError
from ._sdk_client import Client as Client
from ._sdk_server import ApplicationError as ApplicationError
from ._sdk_server import Handler as Handler
from ._sdk_server import Request as Request
from ._sdk_server import serve as serve
from ._sdk_subscribe import subscribe as subscribe

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "MAX_RESENDS",
    "ApplicationError",
    "CallError",
    "Client",
    "Handler",
    "Request",
    "Status",
    "connect",
    "open_client",
    "serve",
    "subscribe",
]


async def connect(
    nursery: trio.Nursery,
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
) -> Client:
    """Connect to the proxy at ``path``, running the client's tasks in ``nursery``.

    For a client whose lifetime is not one ``async with`` block; otherwise use
    :func:`open_client`. The client must be closed with :meth:`Client.aclose`
    (or ``async with client:``), or the nursery never finishes.

    Args:
        nursery: where the client's reader tasks run.
        path: the proxy's Unix socket.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.

    Returns:
        A connected :class:`Client`.

    Raises:
        OSError: the first connection failed (``TimeoutError`` after
            ``connect_timeout``); later failures surface as :class:`CallError`.
    """
    client = Client(nursery, path, max_frame_size=max_frame_size, connect_timeout=connect_timeout)
    await client._connect_first()
    return client


@asynccontextmanager
async def open_client(
    path: str | os.PathLike[str],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    connect_timeout: float = 5.0,
) -> AsyncIterator[Client]:
    """Connect to the proxy at ``path`` for the duration of an ``async with`` block.

    ``async with open_client(path) as client: await client.call(...)``. The
    client's reader tasks live in a nursery this context manager owns; leaving
    the block closes the client. Exceptions from the block propagate as they
    are (not wrapped in an exception group): the client's own tasks never raise.

    Args:
        path: the proxy's Unix socket.
        max_frame_size: the largest frame sent or accepted.
        connect_timeout: deadline of each connection attempt, in seconds.

    Yields:
        A connected :class:`Client`.

    Raises:
        OSError: the first connection failed (``TimeoutError`` after
            ``connect_timeout``).
    """
    try:
        async with trio.open_nursery() as nursery:
            client = await connect(nursery, path, max_frame_size=max_frame_size, connect_timeout=connect_timeout)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        _reraise(group.exceptions[0])


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` out of the group that wrapped it, keeping its own context."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
