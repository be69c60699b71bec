"""``octoproxy run -c proxy.toml``: load the config, run one proxy, drain on signals."""

from __future__ import annotations

import logging
import signal
import sys

import trio

from .._config import load_config
from .._errors import ConfigError
from ._server import Proxy

log = logging.getLogger("octoproxy.proxy")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


async def serve(proxy: Proxy) -> None:
    """Run ``proxy`` until SIGTERM/SIGINT or ``POST /drain``, drain, and return.

    The whole process is bounded by ``proxy.shutdown_time`` from the signal on.
    """
    done = trio.Event()

    async def run_proxy(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await proxy.run(task_status=task_status)
        finally:
            done.set()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    proxy.request_shutdown()
                    nursery.cancel_scope.deadline = min(
                        nursery.cancel_scope.deadline, trio.current_time() + proxy.config.proxy.shutdown_time
                    )

            nursery.start_soon(watch)
            await nursery.start(run_proxy)
            # one line on stdout that tools (tests, the agent) can wait for
            addrs = " ".join(f"{k}={v}" for k, v in sorted(proxy.addresses.items()))
            print(f"octoproxy ready {addrs}", flush=True)
            await done.wait()
            nursery.cancel_scope.cancel()


def run_from_cli(config_path: str, *, hot_restart: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"octoproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.proxy.log_level)
    if hot_restart:
        print("octoproxy: --hot-restart is not implemented yet", file=sys.stderr)
        return 2
    try:
        trio.run(serve, Proxy(config))
    except OSError as exc:
        print(f"octoproxy: {exc}", file=sys.stderr)
        return 1
    return 0
