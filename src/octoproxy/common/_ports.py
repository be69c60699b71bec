"""A free TCP port on loopback for a process we are about to start (demo, tests).

Binding port 0 and closing the socket hands out a port from the kernel's
*ephemeral* range, the same range outgoing connections take their local
ports from: between the pick and the new process's bind, any connect() on the
machine may take it ("address already in use"; seen in CI with the demo's
providers). So the port is picked *below* the ephemeral range, where the
kernel never assigns ports by itself, and checked free by binding it.
"""

from __future__ import annotations

import random
import socket

_LOWEST = 10000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, outside the ephemeral range when there is room below it."""
    low = _ephemeral_low()
    if low - _LOWEST >= 1000:
        for _ in range(100):
            port = random.randrange(_LOWEST, low)
            if _bindable(port, host):
                return port
    with socket.socket() as s:  # no room below the range: the kernel's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])
