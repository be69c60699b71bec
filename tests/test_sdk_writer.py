"""The Trio SDK's FrameWriter: concurrent writes are coalesced, whole, in order,
and a cancelled or vetoed write puts nothing on the wire."""

from __future__ import annotations

import socket

import pytest
import trio

from octoproxy.sdk._trio import FrameWriter


class CountingStream(trio.abc.Stream):
    """A real socket stream that counts its ``send_all`` calls."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.inner = trio.SocketStream(sock)
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def pair() -> tuple[CountingStream, socket.socket]:
    a, b = socket.socketpair()
    return CountingStream(trio.socket.from_stdlib_socket(a)), b


def read_all(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    out = b""
    while len(out) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


async def test_concurrent_writes_are_coalesced_whole_and_in_order() -> None:
    stream, peer = pair()
    with trio.fail_after(10), peer:
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(stream, nursery)
            frames = [bytes([i]) * (100 + i) for i in range(50)]

            order: list[int] = []

            async def one(i: int) -> None:
                await trio.sleep(0)
                order.append(i)  # send() queues before its first checkpoint: this is the wire order
                assert await writer.send(frames[i])

            async with trio.open_nursery() as senders:
                for i in range(50):
                    senders.start_soon(one, i)
            data = await trio.to_thread.run_sync(read_all, peer, sum(map(len, frames)))
            assert data == b"".join(frames[i] for i in order)
            assert stream.writes < 10, stream.writes  # one per round, not one per frame
            nursery.cancel_scope.cancel()


async def test_a_write_cancelled_while_queued_puts_nothing_on_the_wire() -> None:
    stream, peer = pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(10), peer:
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(stream, nursery)
            big = b"B" * (4 << 20)  # blocks in send_all until the peer reads
            nursery.start_soon(writer.send, big)
            await trio.sleep(0.1)
            with trio.move_on_after(0.1) as scope:
                await writer.send(b"CANCELLED")  # queued behind the big write, then cancelled
            assert scope.cancelled_caught
            vetoed: list[bool] = []

            async def veto() -> None:
                vetoed.append(await writer.send(b"VETOED", unless=lambda: True))  # decided when its round starts

            nursery.start_soon(veto)
            await trio.sleep(0.05)
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await trio.to_thread.run_sync(read_all, peer, len(big) + 3))

            nursery.start_soon(reader)
            assert await writer.send(b"END")
            while not got:
                await trio.sleep(0.01)
            assert got[0] == big + b"END"  # neither the cancelled nor the vetoed frame was written
            assert vetoed == [False]
            nursery.cancel_scope.cancel()


async def test_every_waiting_writer_learns_that_the_stream_failed() -> None:
    stream, peer = pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(stream, nursery, timeout=0.5)  # the peer never reads: the round times out
            errors: list[str] = []

            async def one(data: bytes) -> None:
                try:
                    await writer.send(data)
                except trio.BrokenResourceError as exc:
                    errors.append(str(exc))

            async with trio.open_nursery() as senders:
                senders.start_soon(one, b"x" * (8 << 20))
                await trio.sleep(0.05)
                for _ in range(5):
                    senders.start_soon(one, b"y")
            assert len(errors) == 6 and writer.broken
            with pytest.raises(trio.BrokenResourceError):
                await writer.send(b"z")
            nursery.cancel_scope.cancel()
    peer.close()
