"""Secrets in files with owner-only modes: the admin token, the hot-restart secret.

A secret file must be a regular file (not a symlink) owned by this process's
user, with no permission for group or others; otherwise it is refused, never
used. New files are created with mode 0600 from the start (``O_EXCL``, so a
file planted first is found and checked, not written through). Secrets are
compared with :func:`hmac.compare_digest` and never logged.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from ..protocol._errors import OctoproxyError

__all__ = ["SecretFileError", "load_or_create_secret", "read_secret", "write_fresh_secret", "same_secret"]

_MIN_LENGTH = 16  # characters; a generated secret has 43


class SecretFileError(OctoproxyError):
    """A secret file is missing, unreadable, unsafe (owner, mode, type) or empty."""


def _check(st: os.stat_result, path: Path) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{path}: not a regular file")
    if st.st_uid != os.geteuid():
        raise SecretFileError(f"{path}: owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise SecretFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or write it; chmod 0600")


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a secret file after checking it is safe.

    Args:
        path: the file.

    Returns:
        Its content, surrounding whitespace removed.

    Raises:
        SecretFileError: missing, a symlink, not ours, group/other permissions, or too short.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"{p}: cannot open: {exc.strerror or exc}") from None
    try:
        _check(os.fstat(fd), p)
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < _MIN_LENGTH:
        raise SecretFileError(f"{p}: the secret is shorter than {_MIN_LENGTH} characters")
    return data


def load_or_create_secret(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """Read a secret file, creating it (mode 0600, a random secret) if it does not exist.

    Args:
        path: the file.

    Returns:
        ``(secret, created)``.

    Raises:
        SecretFileError: see :func:`read_secret`, or the file cannot be created.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_secret(p), False
    except OSError as exc:
        raise SecretFileError(f"{p}: cannot create: {exc.strerror or exc}") from None
    token = secrets.token_urlsafe(32).encode()
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, token + b"\n")
    finally:
        os.close(fd)
    return token, True


def write_fresh_secret(path: str | os.PathLike[str]) -> bytes:
    """Replace ``path`` atomically with a new random secret (mode 0600).

    Args:
        path: the file; its directory must be writable.

    Returns:
        The new secret.

    Raises:
        SecretFileError: if it cannot be written.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}")
    token = secrets.token_urlsafe(32).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, token + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SecretFileError(f"{p}: cannot write: {exc.strerror or exc}") from None
    return token


def same_secret(given: str | bytes | None, expected: bytes) -> bool:
    """Constant-time comparison of a presented secret with the expected one."""
    if given is None:
        return False
    if isinstance(given, str):
        try:
            given = given.encode("ascii")
        except UnicodeEncodeError:
            return False
    return hmac.compare_digest(given, expected)
