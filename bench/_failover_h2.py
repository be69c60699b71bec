"""HTTP/2 pieces for bench/failover.py's Envoy side: an echo provider and a multiplexing client.

    python bench/_failover_h2.py --uds PATH --name NAME    # the provider; prints "provider ready"

The provider answers every request (a POST) with 200 and the request's body, like
tests/apps/gov_provider.py's echo method does for octoproxy. The client keeps ONE HTTP/2
connection (prior knowledge, h2c) over a Unix socket, as the SDK keeps one connection to its
proxy, and runs many concurrent streams on it. Both use the `h2` sans-IO library under Trio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

IDLE = 120.0  # a provider connection idle this long is dropped (every await on a peer has a deadline)


async def _serve_conn(stream: trio.SocketStream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    bodies: dict[int, bytearray] = {}
    async with stream:
        await stream.send_all(conn.data_to_send())
        while True:
            with trio.move_on_after(IDLE):
                data = await stream.receive_some(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        bodies[ev.stream_id] = bytearray()
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        body = bytes(bodies.pop(ev.stream_id, b""))
                        if ev.stream_id not in conn.streams:
                            # reset by a later frame of the same read (h2 hands over the events of a
                            # whole read at once): a provider's Envoy, SIGCONTed after the stop,
                            # forwards the caller's resets right behind the requests
                            continue
                        try:
                            conn.send_headers(ev.stream_id, [(b":status", b"200"), (b"content-length", str(len(body)).encode())])
                            conn.send_data(ev.stream_id, body, end_stream=True)
                        except h2.exceptions.StreamClosedError:
                            continue  # as above, the reset seen before its stream was forgotten
                    elif isinstance(ev, h2.events.StreamReset):
                        bodies.pop(ev.stream_id, None)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)
                continue
            return  # idle


async def serve(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_conn(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h2.exceptions.ProtocolError as e:  # should not happen: say so in the log
            print(f"provider: connection dropped on {e!r}", file=sys.stderr, flush=True)

    async with trio.open_nursery() as n:
        print("provider ready", flush=True)
        n.start_soon(trio.serve_listeners, handle, [listener])


class CallFailed(Exception):
    """A call that got no 200 with a body: a status, a reset, a lost connection or the deadline."""


class _Pending:
    __slots__ = ("done", "status", "body", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.status = 0
        self.body = bytearray()
        self.error = ""


class H2Client:
    """One HTTP/2 connection; `call` sends a POST and waits for its answer within `timeout`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed = ""

    async def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out:
            await self._stream.send_all(out)

    async def _reader(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)  # cancelled with the client's nursery
                if not data:
                    raise trio.BrokenResourceError("closed by the proxy")
                for ev in self._conn.receive_data(data):
                    p = self._pending.get(getattr(ev, "stream_id", 0) or 0)
                    if isinstance(ev, h2.events.ResponseReceived) and p is not None:
                        p.status = int(dict(ev.headers).get(b":status", b"0"))
                    elif isinstance(ev, h2.events.DataReceived):
                        try:
                            self._conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        except h2.exceptions.StreamClosedError:
                            pass  # a stream we reset at its deadline
                        if p is not None:
                            p.body.extend(ev.data)
                    elif isinstance(ev, h2.events.StreamEnded) and p is not None:
                        p.done.set()
                    elif isinstance(ev, h2.events.StreamReset) and p is not None:
                        p.error = f"reset {ev.error_code!r}"
                        p.done.set()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        raise trio.BrokenResourceError(f"GOAWAY {ev.error_code!r}")
                async with self._send_lock:
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError) as e:
            self._closed = str(e) or type(e).__name__
            for p in self._pending.values():
                p.error = self._closed
                p.done.set()

    async def call(self, path: bytes, body: bytes, timeout: float) -> bytes:
        if self._closed:
            raise CallFailed(self._closed)
        p = _Pending()
        async with self._send_lock:
            sid = self._conn.get_next_available_stream_id()
            self._pending[sid] = p
            self._conn.send_headers(sid, [
                (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"echo"), (b":path", path),
                (b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode()),
            ])
            self._conn.send_data(sid, body, end_stream=True)
            await self._flush()
        try:
            with trio.move_on_after(timeout) as scope:
                await p.done.wait()
        finally:
            self._pending.pop(sid, None)
        if scope.cancelled_caught:
            async with self._send_lock:
                try:
                    self._conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    await self._flush()
                except (h2.exceptions.ProtocolError, trio.BrokenResourceError):
                    pass
            raise CallFailed("deadline")
        if p.error:
            raise CallFailed(p.error)
        if p.status != 200:
            raise CallFailed(f"status {p.status} {bytes(p.body[:160]).decode(errors='replace')}")
        return bytes(p.body)


async def open_h2_client(path: Path, nursery: trio.Nursery, connect_timeout: float = 5.0) -> H2Client:
    """Connect over the Unix socket at `path`, send the preface, start the reader in `nursery`."""
    with trio.fail_after(connect_timeout):
        stream = await trio.open_unix_socket(str(path))
    client = H2Client(stream)
    client._conn.initiate_connection()
    await client._flush()
    nursery.start_soon(client._reader)
    return client


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds", required=True)
    ap.add_argument("--name", default="provider")
    a = ap.parse_args()
    trio.run(serve, a.uds)
