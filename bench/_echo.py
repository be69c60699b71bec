"""Echo provider for the throughput benchmark (plain Python, raw sockets, one epoll loop).

    python bench/_echo.py --uds PATH [--thrift] [--cpu N]

Default: octoproxy v1 frames (DESIGN.md section 2). Every REQUEST is answered with a RESPONSE
carrying the same stream id, flags 0, an empty header (= status OK) and the same body; a PING is
answered with a PONG; ONEWAY, RESPONSE, PONG and GOAWAY are swallowed. A bad magic or version
closes that connection.

``--thrift``: framed transport, binary protocol (strict). Every CALL is answered with a REPLY
with the same method name and seqid, whose result struct is the call's argument struct with its
first field renumbered to 0 (the "success" field), i.e. the first argument is echoed back.

Per connection: ``recv_into`` a reusable buffer, parse every complete frame in it, answer them all
with one ``send``. A partial send keeps the rest and stops reading from that connection until it
is drained (back-pressure). Prints ``ready`` on stdout once listening. Exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct
import sys

BUF_SIZE = 256 * 1024

# octoproxy v1 frame prefix: magic, version, type, length, stream id, flags, header length
PREFIX = struct.Struct(">HBBIQHH")
PREFIX_SIZE = 20
MAGIC = 0xABBA
REQUEST, RESPONSE, ONEWAY, PING, PONG, GOAWAY = 1, 2, 3, 4, 5, 6
# a response prefix: magic, version, type, length, stream id, flags 0, header length 0
RESP_PREFIX = struct.Struct(">HBBIQI")

# Thrift framed binary
T_HEAD = struct.Struct(">IiI")  # frame length, version|type, method name length
T_SEQ_FIELD = struct.Struct(">iBh")  # seqid, first field type, first field id
T_VERSION_MASK = 0xFFFF0000
T_CALL, T_REPLY, T_EXCEPTION, T_ONEWAY = 1, 2, 3, 4
T_REPLY_WORD = struct.pack(">I", 0x80010002)
MAX_FRAME = 64 * 1024 * 1024

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


class Conn:
    __slots__ = ("sock", "fd", "buf", "mv", "rlen", "pending", "reading")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.rlen = 0
        self.pending = b""  # unsent output (after a partial send)
        self.reading = True


class ProtocolError(Exception):
    pass


def answer_octo(c: Conn, out: bytearray) -> int:
    """Parse every complete frame in c.buf[:c.rlen], append answers to out; return bytes used."""
    buf, mv, rlen = c.buf, c.mv, c.rlen
    off = 0
    unpack_from = PREFIX.unpack_from
    pack = RESP_PREFIX.pack
    while rlen - off >= PREFIX_SIZE:
        magic, ver, typ, length, sid, _flags, hlen = unpack_from(buf, off)
        if magic != MAGIC or ver != 1 or length < 12:
            raise ProtocolError(f"bad prefix magic={magic:#x} version={ver} length={length}")
        end = off + 8 + length
        if end > rlen:
            if length + 8 > MAX_FRAME:
                raise ProtocolError("frame too large")
            break
        if typ == REQUEST:
            bstart = off + PREFIX_SIZE + hlen
            out += pack(MAGIC, 1, RESPONSE, 12 + end - bstart, sid, 0)
            out += mv[bstart:end]
        elif typ == PING:
            out += pack(MAGIC, 1, PONG, 12, sid, 0)
        off = end
    return off


def answer_thrift(c: Conn, out: bytearray) -> int:
    buf, mv, rlen = c.buf, c.mv, c.rlen
    off = 0
    head_from = T_HEAD.unpack_from
    seq_from = T_SEQ_FIELD.unpack_from
    while rlen - off >= 4:
        (flen,) = struct.unpack_from(">I", buf, off)
        end = off + 4 + flen
        if end > rlen:
            if flen + 4 > MAX_FRAME:
                raise ProtocolError("frame too large")
            break
        if flen < 12:
            raise ProtocolError("short thrift frame")
        _, vt, nlen = head_from(buf, off)
        if vt & T_VERSION_MASK != 0x80010000:  # (vt is signed; the mask makes it positive)
            raise ProtocolError("not strict binary thrift")
        mtype = vt & 0xFF
        p = off + 12 + nlen  # seqid
        if mtype == T_CALL:
            if p + 7 <= end:
                _seq, ftype, _fid = seq_from(buf, p)
            else:
                ftype = 0
            if ftype == 0:  # no argument: reply with an empty success struct
                out += struct.pack(">I", 8 + nlen + 4 + 1)
                out += T_REPLY_WORD
                out += mv[off + 8 : p + 4]
                out += b"\x00"
            else:
                # same frame, CALL -> REPLY, first field id -> 0 (success)
                out += mv[off : off + 4]
                out += T_REPLY_WORD
                out += mv[off + 8 : p + 5]
                out += b"\x00\x00"
                out += mv[p + 7 : end]
        off = end
    return off


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uds", required=True, help="path of the UDS to listen on")
    ap.add_argument("--thrift", action="store_true", help="framed binary Thrift instead of octoproxy frames")
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to that CPU")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    class Stop(Exception):
        pass

    def on_signal(_signum, _frame):
        raise Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    answer = answer_thrift if args.thrift else answer_octo
    try:
        os.unlink(args.uds)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(args.uds)
    lsock.listen(1024)
    lsock.setblocking(False)
    lfd = lsock.fileno()
    ep = select.epoll()
    ep.register(lfd, EPOLLIN)
    conns: dict[int, Conn] = {}
    print("ready", flush=True)

    def close(c: Conn) -> None:
        conns.pop(c.fd, None)
        try:
            ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def flush(c: Conn, data) -> None:
        """Send data (after anything pending); on a partial send keep the rest, stop reading."""
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            c.pending = bytes(data[n:])
            if c.reading:
                c.reading = False
                ep.modify(c.fd, EPOLLOUT)
        elif not c.reading:
            c.pending = b""
            c.reading = True
            ep.modify(c.fd, EPOLLIN)

    out = bytearray()
    try:
        while True:
            try:
                events = ep.poll(0.5)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    while True:
                        try:
                            s, _ = lsock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        s.setblocking(False)
                        c = Conn(s)
                        conns[c.fd] = c
                        ep.register(c.fd, EPOLLIN)
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                try:
                    if not c.reading:
                        if ev & (EPOLLOUT | EPOLLERR):
                            flush(c, c.pending)
                        continue
                    if c.rlen == len(c.buf):  # one frame bigger than the buffer: grow it
                        c.buf.extend(bytes(len(c.buf)))
                        c.mv = memoryview(c.buf)
                    n = c.sock.recv_into(c.mv[c.rlen :])
                    if n == 0:
                        close(c)
                        continue
                    c.rlen += n
                    used = answer(c, out)
                    if used:
                        rest = c.rlen - used
                        if rest:
                            c.buf[:rest] = bytes(c.mv[used : c.rlen])  # no overlapping copy
                        c.rlen = rest
                    if out:
                        flush(c, out)
                        out.clear()
                except (BlockingIOError, InterruptedError):
                    pass
                except (OSError, ProtocolError) as e:
                    if isinstance(e, ProtocolError):
                        print(f"echo: closing connection: {e}", file=sys.stderr, flush=True)
                    out.clear()
                    close(c)
    except Stop:
        pass
    finally:
        for c in list(conns.values()):
            close(c)
        lsock.close()
        try:
            os.unlink(args.uds)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
