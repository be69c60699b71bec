"""A test provider for the governance tests: the SDK's serve() as its own process.

    python tests/apps/gov_provider.py --uds PATH --name NAME

Methods: "who" returns NAME; "meta" returns the request's metadata and caller as
JSON; "count" records the body (a unique call id) and returns NAME; "seen"
returns {"unique": N, "duplicates": M, "ids": [...]} as JSON; "sleep" sleeps
float(body) seconds; anything else echoes the body. Prints "provider ready".
"""

from __future__ import annotations

import argparse
import json

import trio

from octoproxy import sdk

SEEN: dict[bytes, int] = {}


def make_handler(name: str):  # type: ignore[no-untyped-def]
    async def handler(req: sdk.Request) -> bytes:
        if req.method == "who":
            return name.encode()
        if req.method == "meta":
            return json.dumps({"metadata": dict(req.metadata), "caller": req.caller, "name": name}).encode()
        if req.method == "count":
            SEEN[req.body] = SEEN.get(req.body, 0) + 1
            await trio.sleep(0.002)
            return name.encode()
        if req.method == "seen":
            dups = sum(n - 1 for n in SEEN.values())
            return json.dumps({"unique": len(SEEN), "duplicates": dups, "ids": [k.decode() for k in SEEN]}).encode()
        if req.method == "sleep":
            await trio.sleep(float(req.body))
            return b"slept"
        return req.body

    return handler


async def main(path: str, name: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(sdk.serve, path, make_handler(name))
        print("provider ready", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds", required=True)
    ap.add_argument("--name", default="provider")
    a = ap.parse_args()
    trio.run(main, a.uds, a.name)
