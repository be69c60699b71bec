"""Call the "echo" service N times through the local octoproxy and print the results.

    python examples/caller.py examples/caller-outbound.sock -n 5 --body hello

The path is the proxy's outbound Unix socket (``[outbound] uds`` in
caller.toml), or an ``echo_provider.py`` socket directly. ``--parallel`` sends
the calls at once over the one multiplexed connection. The first call waits
(``--wait``, 10 s by default) for the proxy and the service to come up, so the
caller may start together with the proxies. Exits with status 1 if any call
failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from octoproxy import sdk


#: answers that mean "the mesh is still starting" while --wait lasts
STARTING = (sdk.Status.UNAVAILABLE, sdk.Status.NO_ROUTE)


class Caller:
    """Makes ``args.n`` calls; counts what it did for the summary (or the Ctrl-C line)."""

    def __init__(self, args: argparse.Namespace, nursery: trio.Nursery) -> None:
        self.args = args
        self.nursery = nursery
        self.done = 0
        self.failures = 0

    async def run(self) -> int:
        args = self.args
        if args.n <= 0:
            return 0
        client = await self.wait_for_service()
        if client is None:
            return 1
        try:
            if args.parallel:
                async with trio.open_nursery() as nursery:
                    for i in range(1, args.n):
                        nursery.start_soon(self.one, i, client)
            else:
                for i in range(1, args.n):
                    await self.one(i, client)
            print(f"{args.n - self.failures}/{args.n} ok, ping {await client.ping() * 1000:.2f} ms, "
                  f"connections opened {client.connections_opened}, hot-restart resends {client.resends}")
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
        return 1 if self.failures else 0

    async def wait_for_service(self) -> sdk.Client | None:
        """Connect and make call #0, retrying for up to ``--wait`` seconds while the mesh starts.

        The proxy's socket may not exist yet, and a proxy that has just started
        may answer UNAVAILABLE (its peer or the provider app is not up yet) or
        NO_ROUTE (discovery has not found the service yet): retried every 0.2 s
        until ``--wait`` runs out. Returns None (after saying why) if it ran out.
        """
        args = self.args
        deadline = trio.current_time() + args.wait
        said = False
        while True:
            try:
                client = await sdk.connect(self.nursery, args.path, connect_timeout=1.0)
            except OSError as exc:
                error = f"cannot connect to {args.path}: {exc.strerror or exc}"
            else:
                try:
                    await self.one(0, client, retry_on=STARTING)
                    return client
                except sdk.CallError as exc:
                    error = str(exc)
                await client.aclose()
            if trio.current_time() >= deadline:
                print(f"gave up waiting after {args.wait:g}s: {error}", file=sys.stderr)
                return None
            if not said:
                print(f"waiting up to {args.wait:g}s for {args.service} through {args.path} ({error})", file=sys.stderr)
                said = True
            await trio.sleep(0.2)

    async def one(self, i: int, client: sdk.Client, retry_on: tuple[sdk.Status, ...] = ()) -> None:
        """Call #i and print the outcome; an error whose status is in ``retry_on`` is raised instead."""
        args = self.args
        body = f"{args.body} #{i}".encode()
        start = trio.current_time()
        try:
            reply = await client.call(args.service, args.method, body, timeout=args.timeout)
        except sdk.CallError as exc:
            if exc.status in retry_on:
                raise
            self.failures += 1
            print(f"{i}: {exc}")
        else:
            print(f"{i}: {reply!r} ({(trio.current_time() - start) * 1000:.2f} ms)")
        self.done += 1


async def main(args: argparse.Namespace) -> int:
    """Run the calls; Ctrl-C (or SIGTERM) stops them with one line and status 130 (143)."""
    interrupted: int | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal interrupted
                async for signum in signals:
                    interrupted = signum
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            caller = Caller(args, nursery)
            status = await caller.run()
            nursery.cancel_scope.cancel()
    if interrupted is not None:
        print(f"interrupted after {caller.done}/{args.n} calls ({caller.failures} failed)", file=sys.stderr)
        return 128 + interrupted
    return status


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the proxy's outbound Unix socket")
    parser.add_argument("-n", type=int, default=3, help="number of calls (default 3)")
    parser.add_argument("--service", default="echo", help='callee service (default "echo")')
    parser.add_argument("--method", default="ping", help='method (default "ping")')
    parser.add_argument("--body", default="hello", help='request body prefix (default "hello")')
    parser.add_argument("--timeout", type=float, default=1.0, help="per-call timeout in seconds (default 1)")
    parser.add_argument("--parallel", action="store_true", help="make the calls concurrently (after the first)")
    parser.add_argument(
        "--wait", type=float, default=10.0, metavar="SECONDS",
        help="wait this long for the proxy and the service to come up before the first call (default 10; 0: no wait)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    sys.exit(trio.run(main, args))


if __name__ == "__main__":
    cli()
