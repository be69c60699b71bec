"""Ctrl-C of a provider exits cleanly: the README's snippet and each front end's
``run_provider``/``serve``, run as real processes and sent SIGINT."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e import short_tmpdir
from octoproxy.sdk import sync

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_provider_snippet() -> str:
    """The first Python block under "Run a real pair of services" (the provider)."""
    text = README.read_text()
    section = text[text.index("## Run a real pair of services") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


SCRIPTS = {
    "trio-run_provider": """
from octoproxy import sdk
async def handler(req: sdk.Request) -> bytes:
    return req.body
sdk.run_provider(PATH, handler)
""",
    "asyncio-run_provider": """
from octoproxy.sdk import aio
async def handler(req: aio.Request) -> bytes:
    return req.body
aio.run_provider(PATH, handler)
""",
    "blocking-serve": """
from octoproxy.sdk import sync
def handler(req: sync.Request) -> bytes:
    return req.body
sync.serve(PATH, handler, workers=4)
""",
}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_and_interrupt(code: str, path: Path, *, with_client: bool) -> subprocess.CompletedProcess[str]:
    # Ctrl-C as a terminal sends it: SIGINT at its default disposition in the child. A test run
    # started in the background by a non-interactive shell has SIGINT ignored, and children
    # inherit that: Python then installs no KeyboardInterrupt handler and the provider never sees it.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 20
        client = None
        while True:  # serving once a call goes through
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the provider never served"
            try:
                client = sync.connect(path)
                assert client.call("echo", "hello", b"world", timeout=5) == b"world"
                break
            except OSError:
                time.sleep(0.05)
        if not with_client:
            client.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        if client is not None:
            client.close()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_readme_provider_snippet_exits_cleanly_on_ctrl_c() -> None:
    snippet = readme_provider_snippet()
    assert "examples/provider-app.sock" in snippet
    with short_tmpdir() as d:
        path = d / "provider-app.sock"
        p = run_and_interrupt(snippet.replace('"examples/provider-app.sock"', repr(str(path))), path, with_client=True)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "ExceptionGroup" not in p.stderr, p.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("with_client", [False, True], ids=["idle", "client-connected"])
def test_run_provider_exits_cleanly_on_ctrl_c(name: str, with_client: bool) -> None:
    with short_tmpdir() as d:
        path = d / "p.sock"
        p = run_and_interrupt(SCRIPTS[name].replace("PATH", repr(str(path))), path, with_client=with_client)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr


def test_trio_run_of_serve_raises_a_bare_keyboard_interrupt() -> None:
    """``trio.run(sdk.serve, path, handler)``: Ctrl-C is a plain KeyboardInterrupt, not an exception group."""
    code = """
import trio
from octoproxy import sdk
async def handler(req):
    return req.body
try:
    trio.run(sdk.serve, PATH, handler)
except KeyboardInterrupt:
    print("bare KeyboardInterrupt")
"""
    with short_tmpdir() as d:
        path = d / "p.sock"
        p = run_and_interrupt(code.replace("PATH", repr(str(path))), path, with_client=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "bare KeyboardInterrupt", (p.stdout, p.stderr)


def test_snippet_is_the_whole_provider() -> None:
    """The README snippet runs as pasted: it imports what it uses."""
    snippet = readme_provider_snippet()
    assert "from octoproxy import sdk" in snippet and "run_provider" in snippet
