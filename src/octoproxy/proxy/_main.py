"""``octoproxy run -c proxy.toml``: load the config, run one proxy, drain on signals."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import trio

from .._config import ProxyConfig, load_config
from .._errors import ConfigError
from .._secretfile import SecretFileError
from ._handover import Channel, take_over
from ._hot_restart import HotRestartError, encode
from ._server import Proxy

log = logging.getLogger("octoproxy.proxy")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


async def serve(proxy: Proxy, handover: tuple[Channel, dict[str, Any]] | None = None) -> int:
    """Run ``proxy`` until SIGTERM/SIGINT or ``POST /drain``, drain, and return.

    With ``handover`` (a hot restart), the proxy starts on the parent's
    listeners without accepting, warms up, says READY, and only then accepts.
    The whole process is bounded by ``proxy.shutdown_time`` from the signal on.

    Returns:
        The exit status: 0, or 1 if a hot restart could not get ready.
    """
    done = trio.Event()
    status = 0

    async def run_proxy(task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
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
            if handover is not None:
                chan, msg = handover
                if not await complete_hand_over(proxy, chan, msg, nursery):
                    status = 1
                    nursery.cancel_scope.cancel()
                    return status
            # one line on stdout that tools (tests, the agent) can wait for
            addrs = " ".join(f"{k}={v}" for k, v in sorted(proxy.addresses.items()) if k != "hot_restart")
            token_file = proxy.config.admin_token_path  # the path, never the token
            print(
                f"octoproxy ready {addrs} generation={proxy.generation} pid={os.getpid()} admin_token_file={token_file}",
                flush=True,
            )
            await done.wait()
            nursery.cancel_scope.cancel()
    return status


async def complete_hand_over(proxy: Proxy, chan: Channel, msg: dict[str, Any], nursery: trio.Nursery) -> bool:
    """The child's second step: warm up, say READY, then follow the parent until DONE.

    ``proxy`` (from :func:`take_over_proxy`) must already run, not accepting.

    Args:
        proxy: the new generation, running.
        chan: the hot-restart channel to the parent.
        msg: the parent's LISTENERS message.
        nursery: where the task that waits for the parent's DONE runs.

    Returns:
        True once the proxy accepts (the parent was told, and drains); False if it was not
        ready within ``proxy.hot_restart_timeout`` (the parent was told, and
        keeps serving; the channel is closed).
    """
    if not await _warm_up(proxy, chan):
        return False
    nursery.start_soon(_follow_parent, proxy, chan, msg["stats"])
    return True


async def _warm_up(proxy: Proxy, chan: Channel) -> bool:
    """Wait until the new generation can take all traffic, then say READY."""
    timeout = proxy.config.proxy.hot_restart_timeout
    with trio.move_on_after(timeout):
        while not proxy.ready_state()["ready"]:
            await trio.sleep(0.02)
        try:
            proxy.arm_hot_restart()  # the secret the generation after us must show
        except SecretFileError as exc:
            reason = f"cannot write the hand-over secret: {exc}"
            log.error("hot restart: %s; giving up, the running proxy keeps serving", reason)
            with trio.move_on_after(1):
                await chan.send(encode("failed", reason=reason))
            chan.close()
            return False
        # READY first: if the parent is gone or aborted the hand-over, the
        # send fails and we give up before accepting a single connection
        try:
            await chan.send(encode("ready"))
        except OSError as exc:
            log.error("hot restart: the running proxy went away or aborted the hand-over (%s); giving up", exc)
            chan.close()
            return False
        proxy.start_accepting()
        log.info("hot restart: warm and accepting (generation %d); the previous generation drains", proxy.generation)
        return True
    reason = f"not ready within {timeout}s: {proxy.ready_state()}"
    log.error("hot restart: %s; giving up, the running proxy keeps serving", reason)
    with trio.move_on_after(1):
        await chan.send(encode("failed", reason=reason))
    chan.close()
    return False


async def _follow_parent(proxy: Proxy, chan: Channel, handover_stats: dict[str, Any]) -> None:
    """Until the previous generation is done: then take its final counters."""
    final = None
    try:
        while True:
            msg, _ = await chan.recv()
            if msg["type"] == "done":
                final = msg["stats"]
                break
    except (EOFError, OSError, HotRestartError) as exc:
        log.warning("hot restart: lost the previous generation before DONE (%s); using its hand-over counters", exc)
    finally:
        try:
            proxy.stats.registry.restore(final if final is not None else handover_stats)
        except ValueError as exc:  # e.g. a metric relabelled by the upgrade
            log.error("hot restart: could not carry the previous generation's counters over: %s", exc)
            proxy.stats.error("counters_not_carried_over")
        proxy.parent_alive = False
        proxy.keep_socket_files = False
        chan.close()
        log.info("hot restart: previous generation done; generation %d serves alone", proxy.generation)


def run_from_cli(config_path: str, *, hot_restart: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"octoproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.proxy.log_level)
    try:
        if hot_restart:
            return trio.run(_hot_restart_main, config)
        return trio.run(serve, Proxy(config))
    except (OSError, HotRestartError, SecretFileError, ConfigError) as exc:
        print(f"octoproxy: {exc}", file=sys.stderr)
        return 1


async def take_over_proxy(config: ProxyConfig) -> tuple[Proxy, Channel, dict[str, Any]]:
    """The child's first step: take the running proxy's listeners, build the next generation.

    The returned proxy is not running yet; start it (``await nursery.start(proxy.run)``),
    then call :func:`complete_hand_over`.

    Args:
        config: the new generation's configuration (its ``hot_restart_path``
            names the running proxy's hot-restart socket).

    Returns:
        The new :class:`Proxy` (on the inherited listeners, not accepting), the
        channel to the parent and the parent's LISTENERS message.

    Raises:
        HotRestartError: nothing answers on the hot-restart socket, or the
            running proxy refused or sent something unexpected.
        trio.TooSlowError: the running proxy did not send its listeners in time.
        EOFError: the running proxy closed the connection instead.
    """
    path = str(config.hot_restart_path)
    try:
        chan, msg, socks = await take_over(path, config.hot_restart_secret_path)
    except OSError as exc:
        raise HotRestartError(f"hot restart: no running proxy answers on {path}: {exc}") from None
    log.info("hot restart: took %s from the running proxy (generation %d)", ", ".join(sorted(socks)), msg["generation"])
    proxy = Proxy(config, listeners=socks, generation=msg["generation"] + 1, accept=False)
    proxy.parent_alive = True
    proxy.keep_socket_files = True
    proxy.inherited_subscriptions = [str(n) for n in msg.get("subscriptions", [])]
    return proxy, chan, msg


async def _hot_restart_main(config: ProxyConfig) -> int:
    proxy, chan, msg = await take_over_proxy(config)
    return await serve(proxy, (chan, msg))
