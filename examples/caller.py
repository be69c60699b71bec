"""Call the "echo" service N times through the local octoproxy and print the results.

    python examples/caller.py examples/caller-outbound.sock -n 5 --body hello

The path is the proxy's outbound Unix socket (``[outbound] uds`` in
caller.toml), or an ``echo_provider.py`` socket directly. ``--parallel`` sends
the calls at once over the one multiplexed connection. Exits with status 1 if
any call failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from octoproxy import sdk


async def main(args: argparse.Namespace) -> int:
    failures = 0

    async def one(i: int, client: sdk.Client) -> None:
        nonlocal failures
        body = f"{args.body} #{i}".encode()
        start = trio.current_time()
        try:
            reply = await client.call(args.service, args.method, body, timeout=args.timeout)
        except sdk.CallError as exc:
            failures += 1
            print(f"{i}: {exc}")
        else:
            print(f"{i}: {reply!r} ({(trio.current_time() - start) * 1000:.2f} ms)")

    async with sdk.open_client(args.path, wait=args.wait) as client:
        if args.parallel:
            async with trio.open_nursery() as nursery:
                for i in range(args.n):
                    nursery.start_soon(one, i, client)
        else:
            for i in range(args.n):
                await one(i, client)
        print(f"{args.n - failures}/{args.n} ok, ping {await client.ping() * 1000:.2f} ms, "
              f"connections opened {client.connections_opened}, hot-restart resends {client.resends}")
    return 1 if failures else 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the proxy's outbound Unix socket")
    parser.add_argument("-n", type=int, default=3, help="number of calls (default 3)")
    parser.add_argument("--service", default="echo", help='callee service (default "echo")')
    parser.add_argument("--method", default="ping", help='method (default "ping")')
    parser.add_argument("--body", default="hello", help='request body prefix (default "hello")')
    parser.add_argument("--timeout", type=float, default=1.0, help="per-call timeout in seconds (default 1)")
    parser.add_argument("--parallel", action="store_true", help="make the calls concurrently")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the proxy's socket to appear (default 10)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        sys.exit(trio.run(main, args))
    except sdk.NoProxyError as exc:  # one line naming the path and the config key
        print(exc, file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        sys.exit(f"cannot connect to {args.path}: {exc}")


if __name__ == "__main__":
    cli()
