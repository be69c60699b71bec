"""Raw-socket attackers for bench/abuse.py: hostile peers that speak (or mangle) octoproxy v1 frames.

Every function here has a deadline: nothing waits on the proxy for ever. A target is either
``("uds", "/path")`` (an outbound SDK socket) or ``("tcp", "127.0.0.1:PORT")`` (an inbound peer
listener).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass, field

import trio

from octoproxy.frame import FrameDecoder, FrameType, encode_request

Target = tuple[str, str]
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)

#: magic, version, type, length (of what follows these 8 bytes)
PREFIX8 = struct.Struct(">HBBI")
MAGIC, VERSION, REQUEST = 0xABBA, 1, 1


def describe(target: Target) -> str:
    return "caller uds" if target[0] == "uds" else f"peer tcp {target[1]}"


async def connect(target: Target, timeout: float = 2.0) -> trio.socket.SocketType:
    """One raw connection; raises OSError / trio.TooSlowError if the proxy does not take it."""
    kind, addr = target
    if kind == "uds":
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dest: object = addr
    else:
        host, port = addr.rsplit(":", 1)
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        dest = (host, int(port))
    try:
        with trio.fail_after(timeout):
            await s.connect(dest)
    except BaseException:
        s.close()
        raise
    return s


async def send_all(s: trio.socket.SocketType, data: bytes | memoryview, chunk: int = 1 << 20) -> int:
    """Send ``data``; return how many bytes went out before the peer closed (no exception on that)."""
    mv = memoryview(data)
    off = 0
    while off < len(mv):
        try:
            n = await s.send(mv[off : off + chunk])
        except (BrokenPipeError, ConnectionResetError, OSError):
            return off
        off += n
    return off


async def closed_by_peer(s: trio.socket.SocketType, timeout: float) -> bool:
    """Read and discard until EOF or error (True) or ``timeout`` (False)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                data = await s.recv(65536)
            except OSError:
                return True
            if not data:
                return True
    return False


def request_prefix(total_size: int) -> bytes:
    """The first 8 bytes of a REQUEST frame of ``total_size`` bytes."""
    return PREFIX8.pack(MAGIC, VERSION, REQUEST, total_size - 8)


def frame_of_size(total_size: int, service: str = "echo", method: str = "echo") -> bytes:
    """A valid REQUEST frame of exactly ``total_size`` bytes (body of zeros)."""
    empty = len(encode_request(1, service, method, b""))
    return encode_request(1, service, method, bytes(total_size - empty))


async def one_call(target: Target, service: str, body: bytes, timeout: float = 5.0) -> str:
    """A brand-new peer: one REQUEST on a fresh connection; return "OK" or what went wrong."""
    try:
        s = await connect(target, timeout=min(2.0, timeout))
    except (OSError, trio.TooSlowError) as exc:
        return f"connect failed: {type(exc).__name__} {exc}".strip()
    dec = FrameDecoder()
    try:
        with trio.move_on_after(timeout):
            await send_all(s, encode_request(1, service, "echo", body))
            while True:
                try:
                    data = await s.recv(65536)
                except OSError as exc:
                    return f"recv failed: {exc}"
                if not data:
                    return "closed without an answer"
                dec.receive_data(data)
                for f in dec:
                    if f.type == FrameType.RESPONSE and f.stream_id == 1:
                        st = f.header.status
                        return "OK" if st == 0 and bytes(f.body) == body else f"status {st}"
                    if f.type == FrameType.GOAWAY:
                        return f"GOAWAY status {f.header.status}"
        return f"no answer within {timeout:g} s"
    finally:
        s.close()


@dataclass
class Flood:
    """Idle connections held open against one target."""

    target: Target
    socks: list[trio.socket.SocketType] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def open(self, n: int, per_connect: float = 1.0, give_up_after: int = 5) -> None:
        misses = 0
        while len(self.socks) < n and misses < give_up_after:
            try:
                self.socks.append(await connect(self.target, timeout=per_connect))
                misses = 0
            except (OSError, trio.TooSlowError) as exc:
                misses += 1
                self.refused.append(errno.errorcode.get(getattr(exc, "errno", 0) or 0, type(exc).__name__))

    def closed_count(self) -> int:
        """How many of the held connections the proxy has closed (one poll(2) over all, no wait)."""
        poller = select.poll()
        for s in self.socks:
            poller.register(s.fileno(), select.POLLIN | POLLRDHUP)
        return sum(1 for _fd, ev in poller.poll(0) if ev & (POLLRDHUP | select.POLLHUP | select.POLLERR))

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


async def garbage(target: Target, kind: str, hold: float) -> str:
    """One hostile connection of ``kind``; return "closed" if the proxy closed it, else "held"."""
    try:
        s = await connect(target)
    except (OSError, trio.TooSlowError) as exc:
        return f"connect failed ({type(exc).__name__})"
    try:
        if kind == "random":
            await send_all(s, os.urandom(4096))
        elif kind == "bad_magic":
            await send_all(s, b"\xde\xad\xbe\xef" * 64)
        elif kind == "oversize":  # length field says 64 MiB
            await send_all(s, request_prefix(64 << 20) + b"\x00" * 12)
        elif kind == "half_prefix":  # 10 of the 20 bytes of a frame prefix, then silence
            await send_all(s, encode_request(1, "echo", "echo", b"x")[:10])
        elif kind == "truncated":  # a 1 MiB frame, 64 KiB of it, then silence
            await send_all(s, frame_of_size(1 << 20)[: 64 << 10])
        elif kind == "slow_loris":  # a valid small request, one byte every 0.25 s (a minute for all of it)
            data = encode_request(1, "echo", "echo", b"y" * 200)
            with trio.move_on_after(hold):
                for i in range(len(data)):
                    if await send_all(s, data[i : i + 1]) < 1:
                        return "closed"
                    await trio.sleep(0.25)
            return "held"
        else:
            raise ValueError(kind)
        return "closed" if await closed_by_peer(s, hold) else "held"
    finally:
        s.close()
