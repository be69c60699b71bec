"""`octoproxy demo` itself, as a user runs it: it must finish with 0 failed calls."""

from __future__ import annotations

import sys

import pytest
import trio

pytestmark = pytest.mark.e2e


async def test_demo_runs_clean() -> None:
    with trio.fail_after(120):
        proc = await trio.run_process(
            [sys.executable, "-m", "octoproxy", "demo", "--duration", "6", "--workers", "16"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode()[-3000:]
    assert "result: OK, no call failed" in out
    assert "provider 1 proxy upgraded via agent: succeeded" in out
    assert "caller proxy hot-restarted: generation 1" in out
    assert "errors                                    0" in out
