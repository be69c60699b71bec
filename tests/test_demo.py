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


async def test_ctrl_c_stops_everything_with_one_line() -> None:
    """SIGINT (Ctrl-C) mid-demo: no traceback, exit 130, one line, the workdir and children gone."""
    import re
    import signal
    import subprocess
    from pathlib import Path

    with trio.fail_after(90):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "octoproxy", "demo", "--duration", "60", "--workers", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        out = b""
        while b"[demo] provider 2" not in out:  # the mesh is half up: several children to stop
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, out
            out += chunk
        proc.send_signal(signal.SIGINT)
        err = b""
        async with trio.open_nursery() as n:

            async def drain_out() -> None:
                nonlocal out
                while chunk := await proc.stdout.receive_some(4096):  # type: ignore[union-attr]
                    out += chunk

            n.start_soon(drain_out)
            while chunk := await proc.stderr.receive_some(4096):
                err += chunk
        rc = await proc.wait()
    text = err.decode()
    assert "Traceback" not in text, text
    assert rc == 130, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[demo] interrupted after"), text
    workdir = re.search(rb"\[demo\] workdir (\S+)", out)
    assert workdir is not None
    assert not Path(workdir.group(1).decode()).exists()
