"""Unix-socket helpers shared by the admin server, the SDK server and the proxy."""

from __future__ import annotations

import errno
import os
import socket
import stat

import trio

__all__ = ["bind_unix", "remove_stale_socket"]


async def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on.

    Raises:
        FileExistsError: ``path`` exists and is not a socket.
        OSError: (EADDRINUSE) a live server listens there.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    with trio.move_on_after(1.0):  # a hung server counts as alive
        try:
            stream = await trio.open_unix_socket(path)
        except OSError:  # nobody listening: stale
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        await trio.aclose_forcefully(stream)
    raise OSError(errno.EADDRINUSE, "a server is already listening on", path)


def bind_unix(path: str, mode: int, backlog: int) -> socket.socket:
    """Bind and listen on a UDS (call :func:`remove_stale_socket` first).

    Bound synchronously: trio's ``bind`` runs a Unix-path bind in a worker
    thread, which costs more than the bind itself and which a MockClock's
    autojump mistakes for idleness. The mode is set before ``listen``, so
    nobody can connect through looser permissions.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
