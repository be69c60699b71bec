"""Blocking Unix-socket helpers for the asyncio and thread front ends (the Trio ones in ``common/_unix.py`` import Trio)."""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = ["bind_replacing_stale"]


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on (as ``_unix.remove_stale_socket``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a hung server counts as alive
    try:
        probe.connect(path)
    except socket.timeout:
        pass
    except OSError:  # nobody listening: stale
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening on", path)


def bind_replacing_stale(path: str, mode: int, backlog: int) -> socket.socket:
    """Bind and listen on a UDS at ``path``, replacing a stale socket file.

    Raises:
        FileExistsError: ``path`` exists and is not a socket.
        OSError: (EADDRINUSE) a live server listens there; binding failed.
    """
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen: nobody connects through looser permissions
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
