"""A test provider app: the SDK's serve() with a few methods, as its own process.

    python tests/apps/provider.py --uds PATH

Methods: "count" records the body (a unique call id) and returns it; "seen"
returns {"unique": N, "duplicates": M} as JSON; "echo" returns the body; "sleep" sleeps float(body) seconds, then
returns b"slept"; "big" returns int(body) bytes; "fail" raises ApplicationError.
Prints "provider ready" on stdout once listening.
"""

from __future__ import annotations

import argparse
import json

import trio

from octoproxy import sdk


SEEN: dict[bytes, int] = {}


async def handler(req: sdk.Request) -> bytes:
    if req.method == "count":  # exactly-once bookkeeping: body = a unique call id
        SEEN[req.body] = SEEN.get(req.body, 0) + 1
        await trio.sleep(0.002)  # keep calls in flight across restarts
        return req.body
    if req.method == "seen":
        dups = sum(n - 1 for n in SEEN.values())
        return json.dumps({"unique": len(SEEN), "duplicates": dups}).encode()
    if req.method == "sleep":
        await trio.sleep(float(req.body))
        return b"slept"
    if req.method == "big":
        return b"b" * int(req.body)
    if req.method == "fail":
        raise sdk.ApplicationError("failed on purpose")
    return req.body


async def main(path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(sdk.serve, path, handler)
        print("provider ready", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds", required=True)
    trio.run(main, ap.parse_args().uds)
