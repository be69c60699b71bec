"""Echo provider for bench/hot_restart.py that also records which calls it executed.

    python bench/_hr_echo.py --uds PATH --stats FILE [--lost-ids FILE] [--http]

Default: octoproxy v1 frames, served by bench/_echo.py's epoll loop (its ``answer_octo`` is
replaced by a copy that also notes each request's call id). ``--http``: HTTP/1.1 keep-alive over
the UDS (Trio + h11): every request is answered 200 with its own body.

A call id is the first 20 bytes of a request body (bench/_hr_loadgen.py writes it as 20 ASCII
digits). On SIGTERM/SIGINT the provider writes FILE, one JSON object:
``{"requests": N, "unique": U, "duplicates": D, "lost_executed": L}``: requests seen, distinct
call ids, requests whose id had been seen before (a call executed twice), and, when ``--lost-ids``
names a file (one call id per line, written by the load generator before the provider stops),
how many of those lost calls were executed here all the same (their answer was lost on the way
back).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _echo

ID_LEN = 20
seen: set[bytes] = set()
counts = {"requests": 0, "duplicates": 0}


def note(call_id: bytes) -> None:
    counts["requests"] += 1
    if call_id in seen:
        counts["duplicates"] += 1
    else:
        seen.add(call_id)


def answer_octo_recording(c, out: bytearray) -> int:
    """bench/_echo.py's answer_octo, plus noting every REQUEST's call id."""
    buf, mv, rlen = c.buf, c.mv, c.rlen
    off = 0
    unpack_from = _echo.PREFIX.unpack_from
    pack = _echo.RESP_PREFIX.pack
    MAGIC, REQUEST, RESPONSE, PING, PONG = _echo.MAGIC, _echo.REQUEST, _echo.RESPONSE, _echo.PING, _echo.PONG
    while rlen - off >= _echo.PREFIX_SIZE:
        magic, ver, typ, length, sid, _flags, hlen = unpack_from(buf, off)
        if magic != MAGIC or ver != 1 or length < 12:
            raise _echo.ProtocolError(f"bad prefix magic={magic:#x} version={ver} length={length}")
        end = off + 8 + length
        if end > rlen:
            if length + 8 > _echo.MAX_FRAME:
                raise _echo.ProtocolError("frame too large")
            break
        if typ == REQUEST:
            bstart = off + _echo.PREFIX_SIZE + hlen
            note(bytes(mv[bstart : bstart + ID_LEN]))
            out += pack(MAGIC, 1, RESPONSE, 12 + end - bstart, sid, 0)
            out += mv[bstart:end]
        elif typ == PING:
            out += pack(MAGIC, 1, PONG, 12, sid, 0)
        off = end
    return off


async def serve_http(uds: str) -> None:
    import os
    import socket

    import h11
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                body = bytearray()
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
                if isinstance(ev, h11.ConnectionClosed):
                    return
                note(bytes(body[:ID_LEN]))
                out = conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/octet-stream"), ("content-length", str(len(body)))]))
                out += conn.send(h11.Data(data=bytes(body)))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    try:
        os.unlink(uds)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(uds)
    sock.listen(1024)
    listener = trio.SocketListener(sock)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    try:
        os.unlink(uds)
    except OSError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uds", required=True)
    ap.add_argument("--stats", required=True, help="JSON file written on exit")
    ap.add_argument("--lost-ids", default=None, help="file of call ids the load generator lost")
    ap.add_argument("--http", action="store_true", help="HTTP/1.1 instead of octoproxy frames")
    args = ap.parse_args()
    if args.http:
        import trio

        trio.run(serve_http, args.uds)
    else:
        _echo.answer_octo = answer_octo_recording  # looked up by _echo.main at start
        sys.argv = [sys.argv[0], "--uds", args.uds]
        _echo.main()
    res = {"requests": counts["requests"], "unique": len(seen), "duplicates": counts["duplicates"]}
    if args.lost_ids:
        try:
            lost = {ln.strip().encode() for ln in Path(args.lost_ids).read_text().splitlines() if ln.strip()}
            res["lost_checked"] = len(lost)
            res["lost_executed"] = len(lost & seen)
        except OSError:
            pass
    Path(args.stats).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
