"""A TLS connection over a raw non-blocking socket, through memory BIOs.

Why not :class:`ssl.SSLSocket`: one ``SSLSocket.recv_into`` returns at most
one TLS record, through three Python frames, with the GIL released around a
``read`` syscall each time. A peer proxy that flushes several small records
per round (one per SDK connection it read) made us pay that per record. Here
one ``recv_into`` of the raw socket takes everything the kernel holds, the
*whole* records among it go into the incoming BIO (a partial record waits in
our buffer for the rest), and ``SSLObject.read`` decrypts them from memory,
one C call per record, until the BIO is empty: no failed read, no exception,
in the common case. Measured on 4 records of 1.5 KB: 13 us instead of 33 us
to receive them (loaded machine; see docs/benchmarks.md, ``## mTLS``).

The object offers what :class:`~._io.Conn` uses of a socket (``recv_into``,
``send``, ``pending``, ``fileno``, ``setblocking``, ``shutdown``, ``recv``,
``close``) with the same non-blocking contract: "would block" is
:class:`BlockingIOError`, end of stream is 0.

Sending: ``SSLObject.write`` encrypts all of the plaintext into the outgoing
BIO at once and the ciphertext goes out with one ``send``. When the socket
takes only part of it, the rest waits here and ``send`` raises
BlockingIOError, *remembering* how much plaintext it took: the caller retries
with the same bytes at the front of its buffer (as OpenSSL requires of
``SSL_write``), and the retry that gets the last ciphertext out returns that
count. So a caller's buffer only loses bytes once they are on the wire.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

__all__ = ["TLSConnection"]

_HEADER = 5  # TLS record header: type, version (2), length (2)
_CBUF = 64 * 1024  # > one record (16 KiB + 256); as the connection's own buffer
_MAX_RECORD = 16384 + 2048  # RFC 8446 5.2: TLSCiphertext.length <= 2^14 + 256 (TLS 1.2 allows + 2048)
_FRAME_MAGIC = b"\xab\xba"  # a plaintext octoproxy frame (protocol.MAGIC), i.e. a peer with TLS off


def _bad_record(buf: bytearray, pos: int) -> str | None:
    """Why the record header at ``buf[pos:pos + 5]`` is not TLS (None: it is).

    Checked before the record is awaited: a plaintext peer's bytes read as a
    length of up to 64 KiB would otherwise make us wait for the rest until the
    handshake deadline, and say nothing of why.
    """
    if buf[pos : pos + 2] == _FRAME_MAGIC:
        return "a plaintext octoproxy frame: the peer proxy has TLS off ([tls] mode = \"plaintext\")"
    if not 20 <= buf[pos] <= 24 or buf[pos + 1] != 3:  # content type; protocol version major
        return f"not a TLS record (first bytes {bytes(buf[pos : pos + 5]).hex()})"
    if (buf[pos + 3] << 8 | buf[pos + 4]) > _MAX_RECORD:
        return "a TLS record longer than the protocol allows"
    return None


class TLSConnection:
    """One TLS connection (client or server side) over a raw socket."""

    __slots__ = ("raw", "obj", "_in", "_out", "_cbuf", "_cmv", "_clen", "_cout", "_accepted", "_ready", "_shut")

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        raw.setblocking(False)
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        #: ciphertext read from the socket and not yet in the BIO (a partial record)
        self._cbuf = bytearray(_CBUF)
        self._cmv = memoryview(self._cbuf)
        self._clen = 0
        #: ciphertext encrypted but not sent yet, and how much plaintext it holds
        self._cout = bytearray()
        self._accepted = 0
        #: the BIO holds whole records not read yet
        self._ready = False
        #: after shutdown(): reads only drain the socket (close_after_flush)
        self._shut = False

    # ------------------------------------------------------------ plumbing

    def fileno(self) -> int:
        return self.raw.fileno()

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    def getpeercert(self) -> dict[str, Any] | None:
        return self.obj.getpeercert()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def pending(self) -> bool:
        """Plaintext (or whole records) held here: read it before waiting for the socket."""
        return self._ready or self.obj.pending() > 0

    def shutdown(self, how: int) -> None:
        self._shut = True
        self.raw.shutdown(how)

    def recv(self, n: int) -> bytes:
        """Raw bytes (after ``shutdown``: only to drain the peer before closing)."""
        return self.raw.recv(n)

    def close(self) -> None:
        self.raw.close()

    # ------------------------------------------------------------ input

    def _take_records(self) -> int:
        """Move the whole records at the front of our buffer into the BIO; return the bytes moved."""
        buf = self._cbuf
        clen = self._clen
        pos = 0
        while pos + _HEADER <= clen:
            bad = _bad_record(buf, pos)
            if bad is not None:
                raise ssl.SSLError(bad)
            end = pos + _HEADER + (buf[pos + 3] << 8 | buf[pos + 4])
            if end > clen:
                break
            pos = end
        if pos:
            self._in.write(self._cmv[:pos])
            rest = clen - pos
            if rest:
                buf[:rest] = buf[pos:clen]
            self._clen = rest
            self._ready = True
        return pos

    def _fill(self) -> int:
        """One ``recv`` from the socket. Returns the bytes read (0: end of stream).

        Raises:
            BlockingIOError: nothing there.
        """
        if self._clen == _CBUF:  # cannot happen with records <= 16 KiB + overhead
            raise ssl.SSLError("TLS record larger than the receive buffer")
        n = self.raw.recv_into(self._cmv[self._clen :])
        if n:
            self._clen += n
            self._take_records()
        return n

    def _decrypt(self, view: memoryview, total: int) -> int:
        obj = self.obj
        size = len(view)
        while total < size and (self._ready or obj.pending()):
            try:
                n: int = obj.read(size - total, view[total:])  # type: ignore[assignment]  # a count, given a buffer
            except ssl.SSLWantReadError:  # a non-data record (post-handshake message) and nothing after it
                self._ready = False
                break
            except ssl.SSLZeroReturnError:  # close_notify
                self._ready = False
                break
            if not n:
                self._ready = False
                break
            total += n
            if not self._in.pending:
                self._ready = False
        return total

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Decrypt into ``buffer`` (its first ``nbytes``, or all of it) what is here and what the kernel holds.

        Returns:
            Bytes written (0: the peer closed).

        Raises:
            BlockingIOError: nothing to read yet.
            ssl.SSLError: the peer broke TLS (a bad record, an alert).
        """
        if self._shut:  # draining before close: what arrives is dropped anyway
            return self.raw.recv_into(buffer, nbytes)
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if nbytes and nbytes < len(view):
            view = view[:nbytes]
        total = self._decrypt(view, 0)
        if total == len(view):
            return total
        try:
            n = self._fill()
        except BlockingIOError:
            if total:
                return total
            raise
        if not n:
            return total  # the end: 0 now, or on the next call
        total = self._decrypt(view, total)
        if not total:
            raise BlockingIOError(errno.EAGAIN, "a partial TLS record")
        return total

    # ------------------------------------------------------------ output

    def _flush(self) -> bool:
        """Send queued ciphertext; True when all of it is out."""
        cout = self._cout
        if cout:
            n = self.raw.send(cout)
            del cout[:n]
        return not cout

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and send ``data``; see the module doc for the partial-send contract.

        Returns:
            Plaintext bytes that are now on the wire (all of ``data``, or what an
            earlier call took, once its ciphertext is out).

        Raises:
            BlockingIOError: ciphertext is still queued (retry with the same bytes first).
            OSError: the connection failed.
        """
        if self._cout:
            if not self._flush():
                raise BlockingIOError(errno.EAGAIN, "TLS records queued")
            taken, self._accepted = self._accepted, 0
            return taken
        self.obj.write(data)
        ciphertext = self._out.read()
        try:
            n = self.raw.send(ciphertext)
        except BlockingIOError:
            n = 0
        if n < len(ciphertext):
            self._cout += memoryview(ciphertext)[n:]
            self._accepted = len(data)
            raise BlockingIOError(errno.EAGAIN, "TLS records queued")
        return len(data)

    # ------------------------------------------------------------ handshake (driven by proxy/_tls.py)

    def handshake_step(self) -> bool:
        """One step: True when the handshake is complete. Queue its output with :meth:`handshake_output`."""
        try:
            self.obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    def handshake_output(self) -> None:
        out = self._out.read()
        if out:
            self._cout += out

    def handshake_flush(self) -> bool:
        """Send queued handshake bytes; True when all are out (False: wait until writable)."""
        try:
            return self._flush()
        except BlockingIOError:
            return False

    def handshake_done(self) -> None:
        """After the handshake: records that came with its last flight are data to read."""
        self._ready = bool(self._in.pending)

    def handshake_fill(self) -> bool:
        """Read handshake records; False when the peer closed.

        Raises:
            BlockingIOError: nothing there.
        """
        return self._fill() > 0
