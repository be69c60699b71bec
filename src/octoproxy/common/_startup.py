"""One line, not a traceback, when a command cannot start listening.

The commands (``run``, ``control-plane``, ``agent``) bind their listeners
deep inside Trio nurseries, so a bind that fails arrives at the command line
as an exception group whose ``OSError`` names neither the address nor the
configuration key (``[Errno 98] Address already in use``). The command line
is the single boundary that knows both: it hands the error and the command's
listeners (``(key, address)`` pairs, e.g. ``("inbound.listen",
"127.0.0.1:9000")``) to :func:`describe_listen_failure`, which finds the
listener at fault and says what to fix in one line.

The listener at fault is the one whose path the error names (a live server
on a socket path, a path that is not a socket) or else the first one, in
the order the command binds them, whose bind fails the same way again when
tried here (a throw-away socket, closed at once; a socket file it creates is
removed).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from ..protocol._errors import exception_leaves

__all__ = ["describe_listen_failure", "Listener"]

#: ``(config key or flag, address)``: ``"host:port"``, ``"unix:/path"`` or a bare path
Listener = tuple[str, str]

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


def describe_listen_failure(exc: BaseException, listeners: Sequence[Listener]) -> str | None:
    """Say which listener could not be bound, and why, in one line.

    Args:
        exc: what the command raised (an exception group or a bare error).
        listeners: the command's listeners in the order it binds them; an
            empty address is skipped.

    Returns:
        ``"<key> = <address>: <what is wrong>"``, or ``None`` if ``exc`` is
        not (only) a failure to bind one of ``listeners``.
    """
    leaves = exception_leaves(exc)
    if not leaves or not all(isinstance(leaf, OSError) for leaf in leaves):
        return None
    err = leaves[0]
    assert isinstance(err, OSError)
    candidates = [(key, address) for key, address in listeners if address]
    if err.filename is not None:
        for key, address in candidates:
            path = _unix_path(address)
            if path is not None and os.path.abspath(path) == os.path.abspath(str(err.filename)):
                return f"{key} = {address}: {_why(err, path)}"
    for key, address in candidates:
        again = _try_bind(address)
        if again is not None and (again.errno, _text(again)) == (err.errno, _text(err)):
            return f"{key} = {address}: {_why(err, _unix_path(address))}"
    return None


def _text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _unix_path(address: str) -> str | None:
    if address.startswith("unix:"):
        return address[5:]
    if address.startswith("/") or ":" not in address:
        return address
    return None


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _try_bind(address: str) -> OSError | None:
    """Bind ``address`` again, as the command does; the error, or None if it binds now."""
    path = _unix_path(address)
    if path is not None:
        if os.path.lexists(path):
            return None  # the command removes a stale socket first: cannot replay that here
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            return exc
        finally:
            sock.close()
        os.unlink(path)  # we made it
        return None
    hp = _host_port(address)
    if hp is None:
        return None
    host, port = hp
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    for family, kind, proto, _name, sockaddr in infos[:1]:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            return exc
        finally:
            sock.close()
    return None


def _why(err: OSError, path: str | None) -> str:
    """What is wrong and what to do, for a bind that failed with ``err``."""
    code = err.errno
    if path is not None:
        parent = Path(path).parent
        if code == errno.ENOENT and not parent.is_dir():
            return f"the directory {parent} does not exist (create it, or point the key at one that does)"
        if code == errno.EADDRINUSE:
            return "a server already listens on this socket (another octoproxy? `octoproxy run --hot-restart` takes over from it)"
        if code == errno.EEXIST:
            if os.path.isdir(path):
                return "is a directory; the key names the socket file itself"
            return "a file that is not a socket is in the way (remove it, or choose another path)"
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: this user cannot create a socket in {parent}"
        if code is None and "too long" in str(err):
            return f"the path is {len(os.fsencode(path))} bytes, more than the {_UNIX_PATH_MAX} a Unix socket path can have"
    elif code == errno.EADDRINUSE:
        return "address already in use (another process listens on this port: stop it or choose another port)"
    elif code in (errno.EACCES, errno.EPERM):
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif code == errno.EADDRNOTAVAIL:
        return "this host has no such address (use 127.0.0.1, 0.0.0.0 or one of its own addresses)"
    elif isinstance(err, socket.gaierror):
        return f"cannot resolve the host ({err.strerror})"
    return _text(err)
