"""Serve an echo handler on a Unix socket: the provider side of the Mesh SDK.

    python examples/echo_provider.py /tmp/echo.sock

Every request is answered with its own body, except method ``fail``, which
answers APPLICATION_ERROR, and method ``sleep``, which first waits the number
of seconds its body starts with (to try timeouts). Point the provider proxy's
inbound cluster at this socket (see provider.toml), or call it directly with
``examples/caller.py /tmp/echo.sock``: the frames are the same. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys

import trio

from octoproxy import sdk


async def echo(request: sdk.Request) -> bytes:
    """Answer with the request body."""
    if request.method == "fail":
        raise sdk.ApplicationError(f"asked to fail: {request.body.decode(errors='replace')}")
    if request.method == "sleep":
        await trio.sleep(float(request.body.split(maxsplit=1)[0] if request.body else 1))
    return request.body


async def main(path: str, max_concurrency: int) -> None:
    # Ctrl-C (SIGINT) and SIGTERM stop the server cleanly: a signal receiver
    # instead of KeyboardInterrupt, which would surface from inside the nursery
    # as an exception-group traceback.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(sdk.serve, path, echo, max_concurrency=max_concurrency))
            print(f"serving echo on {path}", flush=True)
            async for signum in signals:
                print(f"echo provider: {signal.Signals(signum).name}, stopped", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                break


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="Unix socket to listen on (a stale socket file is replaced)")
    parser.add_argument("--max-concurrency", type=int, default=1024, help="handlers running at once (default 1024)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(main, args.path, args.max_concurrency)
    except OSError as exc:
        sys.exit(f"echo provider: cannot serve on {args.path}: {exc.strerror or exc}")


if __name__ == "__main__":
    cli()
