"""``octoproxy run -c proxy.toml``: load the config, run one proxy, drain on signals."""

from __future__ import annotations

import gc
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import trio

from ._config import ProxyConfig, describe_config_error, load_config
from ..protocol._errors import ConfigError
from ..common._secretfile import SecretFileError
from ._handover import Channel
from ._takeover import ChildShell, take_over
from ..core._hot_restart import ChildEvent, ChildState, HotRestartError
from ._server import Proxy
from ..common._memory import trim_memory

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
            elif not await wait_until_ready(proxy, done):
                nursery.cancel_scope.cancel()  # shut down before it was ready: no ready line
                return status
            nursery.start_soon(_warn_unconnected_clusters, proxy)
            # one line on stdout that tools (tests, the agent) can wait for
            addrs = " ".join(f"{k}={v}" for k, v in sorted(proxy.addresses.items()) if k != "hot_restart")
            token_file = proxy.config.admin_token_path  # the path, never the token
            print(
                f"octoproxy ready {addrs} generation={proxy.generation} pid={os.getpid()} admin_token_file={token_file}",
                flush=True,
            )
            settle_memory()
            await done.wait()
            nursery.cancel_scope.cancel()
    return status


def settle_memory() -> None:
    """Once started: collect start-up's garbage and give the freed heap back to the system.

    Parsing the configuration, building the parser and the tables leave
    freed blocks all over glibc's heap; ``malloc_trim`` returns the free
    pages among them (about 1 MB of an idle proxy's RSS; docs/benchmarks.md).
    """
    gc.collect()
    trim_memory()


#: while a starting proxy is not ready: first warning after this long, then at this interval
READY_WARN_AFTER = 2.0
READY_WARN_EVERY = 10.0


async def wait_until_ready(proxy: Proxy, done: trio.Event) -> bool:
    """Wait until what this host owes is ready: the ready line must mean ready.

    That is every condition of ``GET /ready`` but the upstream clusters
    (whose peers run elsewhere, see :func:`_warn_unconnected_clusters`): the
    subscriptions restored and the local app (``inbound.app_uds``) accepting.
    While waiting, one warning line every :data:`READY_WARN_EVERY` seconds
    names what is missing.

    Returns:
        True once ready; False if the proxy stopped first.
    """
    start = trio.current_time()
    next_warning = start + READY_WARN_AFTER
    while not done.is_set():
        missing = local_blockers(proxy)
        if not missing:
            return True
        now = trio.current_time()
        if now >= next_warning:
            if proxy.config.inbound is not None and "app_uds" in missing and proxy.http_app is None:
                problem = await trio.to_thread.run_sync(_socket_problem, proxy.config.inbound.app_uds)
                missing["app_uds"] += f" ({problem})"
            log.warning("not ready after %.0fs: waiting for %s", now - start, "; ".join(missing.values()))
            next_warning = now + READY_WARN_EVERY
        await trio.sleep(0.05)
    return False


def local_blockers(proxy: Proxy) -> dict[str, str]:
    """What keeps this proxy from being ready, upstream clusters aside: a phrase per condition."""
    state = proxy.ready_state()
    missing = {}
    discovery = state.get("discovery")
    if discovery is not None and not discovery["restored"]:
        missing["subscriptions"] = (
            f"the subscriptions in {proxy.config.subscriptions_path} to be restored (discovery.subscriptions_file)"
        )
    app = state.get("local_app")
    if app is not None and not app["connected"] and proxy.config.inbound is not None:
        missing["app_uds"] = f"the local app on inbound.app_uds {proxy.config.inbound.app_uds}"
        if proxy.http_app is not None:
            missing["app_uds"] = f"the local app's HTTP port inbound.app_http {proxy.http_app.app_http}"
    if state["healthcheck_failed"]:
        missing["healthcheck"] = "POST /healthcheck/ok (the health check was failed by hand)"
    # a provider waits until peers can reach it (certificate, registration); a caller-only proxy
    # starts without them (e.g. with the persisted app configuration while the control plane is down)
    if not proxy.tls_ready() and proxy.config.inbound is not None:
        missing["certificate"] = "a certificate from the control plane (mTLS; discovery.join_token_file, tls.mode)"
    disc = proxy.discovery
    if (
        disc is not None
        and disc.cfg.register
        and proxy.config.inbound is not None
        and proxy.config.proxy.service
        and disc.registered_address is None
        and "app_uds" not in missing
    ):
        # peers find this provider only once it is registered: the ready line waits for that too
        missing["registration"] = f"the registration of {proxy.config.proxy.service} with the control plane"
    return missing


def _socket_problem(path: Path) -> str:
    """Why nothing accepts on ``path``, as far as the file system tells (blocking: run in a thread)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            return f"the directory {path.parent} does not exist"
        return "no socket there yet: is the app started?"
    except OSError as exc:
        return f"cannot reach it: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    return "nothing accepts connections there yet"


async def _warn_unconnected_clusters(proxy: Proxy) -> None:
    """After the ready line: name the clusters still without a connected endpoint (their peers run elsewhere)."""
    await trio.sleep(proxy.config.upstream.connect_timeout + 0.5)
    for name, cluster in proxy.ready_state()["clusters"].items():
        if cluster["endpoints"] and not cluster["connected"]:
            log.warning("cluster %s: none of its %d endpoints is connected yet; GET /ready answers 503 until one is",
                        name, cluster["endpoints"])  # fmt: skip


async def complete_hand_over(proxy: Proxy, chan: Channel, msg: dict[str, Any], nursery: trio.Nursery) -> bool:
    """The child's second step: warm up, say READY, then follow the parent until DONE.

    ``proxy`` (from :func:`take_over_proxy`) must already run, not accepting.
    Every step is an event of the child's table (``proxy.predecessor``).

    Args:
        proxy: the new generation, running.
        chan: the hot-restart channel to the parent (``proxy.predecessor.chan``).
        msg: the parent's LISTENERS message.
        nursery: where the task that waits for the parent's DONE runs.

    Returns:
        True once the proxy accepts (the parent was told, and drains); False if it was not
        ready within ``proxy.hot_restart_timeout`` (the parent was told, and
        keeps serving; the channel is closed).
    """
    child = proxy.predecessor
    assert child is not None and child.chan is chan
    if await _warm_up(proxy, child) is not ChildState.SERVING:
        return False
    nursery.start_soon(_follow_parent, child)
    return True


async def _warm_up(proxy: Proxy, child: ChildShell) -> ChildState:
    """Wait until the new generation can take all traffic: WARM (then READY) or WARMUP_FAILED."""
    timeout = proxy.config.proxy.hot_restart_timeout
    with trio.move_on_after(timeout) as waiting:
        while not proxy.ready_state()["ready"]:
            await trio.sleep(0.02)
    if waiting.cancelled_caught:
        child.failure = f"not ready within {timeout}s: {proxy.ready_state()}"
    else:
        try:
            proxy.arm_hot_restart()  # the secret the generation after us must show
        except SecretFileError as exc:
            child.failure = f"cannot write the hand-over secret: {exc}"
    if child.failure:
        log.error("hot restart: %s; giving up, the running proxy keeps serving", child.failure)
        return await child.fire(ChildEvent.WARMUP_FAILED)
    return await child.fire(ChildEvent.WARM)


async def _follow_parent(child: ChildShell) -> None:
    """Until the previous generation is done: each of its messages (or its loss) an event."""
    assert child.chan is not None
    try:
        while child.state is ChildState.SERVING:
            msg, _ = await child.chan.recv()
            if msg["type"] == "done":
                child.final_stats = msg["stats"]
            await child.fire(child.event_for(msg))
    except (EOFError, OSError, HotRestartError, trio.ClosedResourceError) as exc:
        log.warning("hot restart: lost the previous generation before DONE (%s); using its hand-over counters", exc)
    finally:
        if child.state is ChildState.SERVING:
            await child.fire(ChildEvent.PARENT_LOST)


def run_from_cli(config_path: str, *, hot_restart: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(describe_config_error(exc, config_path, "octoproxy"), file=sys.stderr)
        return 2
    setup_logging(config.proxy.log_level)
    try:
        if hot_restart:
            return trio.run(_hot_restart_main, config)
        return trio.run(serve, Proxy(config))
    except (OSError, HotRestartError, SecretFileError, ConfigError) as exc:
        print(f"octoproxy: {exc}", file=sys.stderr)
        return 1
    except (EOFError, trio.TooSlowError) as exc:  # take_over_proxy: the other side went quiet or away
        how = "closed the connection" if isinstance(exc, EOFError) else "did not answer in time"
        print(f"octoproxy: hot restart: the process on proxy.hot_restart_uds = {config.hot_restart_path} {how} "
              "instead of handing its listeners over", file=sys.stderr)  # fmt: skip
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
        child, msg, socks = await take_over(path, config.hot_restart_secret_path)
    except OSError as exc:
        raise HotRestartError(f"hot restart: no running proxy answers on {path}: {exc}") from None
    assert child.chan is not None
    log.info("hot restart: took %s from the running proxy (generation %d)", ", ".join(sorted(socks)), msg["generation"])
    try:
        proxy = Proxy(config, listeners=socks, generation=msg["generation"] + 1, accept=False)
    except BaseException:
        child.chan.close()  # the parent hears EOF and keeps serving
        raise
    proxy.follow_predecessor(child)
    proxy.inherited_subscriptions = [str(n) for n in msg.get("subscriptions", [])]
    return proxy, child.chan, msg


async def _hot_restart_main(config: ProxyConfig) -> int:
    proxy, chan, msg = await take_over_proxy(config)
    return await serve(proxy, (chan, msg))
