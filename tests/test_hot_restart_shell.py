"""The hot-restart shells around their tables: an illegal event aborts the hand-over safely.

A real proxy in-process, a real child role over its hot-restart socket (the
listeners arrive by SCM_RIGHTS), no mocks. The events the tables do not allow
cannot come from a well-behaved peer, so the parent's is injected through the
shell's one ``fire``; the child's comes from a fake parent that says DRAINING
before LISTENERS.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
import trio

from e2e import short_tmpdir
from octoproxy.common._admin import http_request
from octoproxy.proxy._config import parse_config
from octoproxy.proxy._takeover import take_over
from octoproxy.core._hot_restart import ChildState, HotRestartError, ParentEvent, ParentState
from octoproxy.proxy._server import Proxy


def _config(d):  # type: ignore[no-untyped-def]
    return parse_config(
        {"proxy": {"drain_time": 0.5, "shutdown_time": 2.0}, "outbound": {"uds": str(d / "out.sock")}, "admin": {"listen": "127.0.0.1:0"}},
        base_dir=d,
    )


def _errors(proxy: Proxy, kind: str) -> float:
    for line in proxy.stats.registry.render().splitlines():
        if line.startswith(f'octoproxy_errors_total{{kind="{kind}"}} '):
            return float(line.split()[-1])
    return 0.0


async def test_an_illegal_event_aborts_the_hand_over_and_the_old_generation_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30), short_tmpdir() as d:
        cfg = _config(d)
        proxy = Proxy(cfg)
        async with trio.open_nursery() as n:
            await n.start(proxy.run)
            while proxy.hot_restart_secret == b"" or "admin" not in proxy.addresses:
                await trio.sleep(0.01)
            child, msg, socks = await take_over(str(cfg.hot_restart_path), cfg.hot_restart_secret_path)
            try:
                assert child.state is ChildState.WARMING and sorted(socks) == ["admin", "hot_restart", "outbound"]
                assert proxy.hot_restart.state is ParentState.HANDING_OVER
                caplog.clear()
                with caplog.at_level(logging.INFO, logger="octoproxy.hot_restart"):
                    # DRAINED while handing over: nothing drains, a bug somewhere
                    assert proxy.hot_restart.fire(ParentEvent.DRAINED) is ParentState.SERVING
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert errors == ["hot restart: drained is not allowed in state handing_over: hand-over aborted"]
                assert _errors(proxy, "hot_restart_illegal_event") == 1 and _errors(proxy, "hot_restart_aborted") == 1
                assert not proxy.draining and not proxy.handed_over and not proxy.keep_socket_files
                # the child was let go: its connection ends, and it never got to accept
                assert child.chan is not None
                with trio.fail_after(5), pytest.raises((EOFError, OSError)):
                    await child.chan.recv()
            finally:
                for s in socks.values():
                    s.close()
                if child.chan is not None:
                    child.chan.close()
            # the old generation still serves: its admin listener answers, a new hand-over can start
            status, _h, _b = await http_request(proxy.addresses["admin"], "GET", "/healthz", timeout=5)
            assert status == 200
            state = json.loads((await http_request(proxy.addresses["admin"], "GET", "/ready", timeout=5))[2])
            assert state["hot_restart"]["state"] == "serving"
            child2, _msg, socks2 = await take_over(str(cfg.hot_restart_path), cfg.hot_restart_secret_path)
            for s in socks2.values():
                s.close()
            assert proxy.hot_restart.state is ParentState.HANDING_OVER
            assert child2.chan is not None
            child2.chan.close()  # this one goes away: CHILD_LOST, serving again
            with trio.fail_after(5):
                while proxy.hot_restart.state is not ParentState.SERVING:
                    await trio.sleep(0.01)
            assert _errors(proxy, "hot_restart_aborted") == 2
            proxy.request_shutdown()
        assert proxy.hot_restart.state is ParentState.DRAINED
        assert not (d / "out.sock").exists()  # a plain drain removes its socket files


async def test_an_illegal_message_makes_the_child_give_up(caplog: pytest.LogCaptureFixture) -> None:
    """A parent that says DRAINING before LISTENERS: the child aborts, nothing is taken over."""
    with trio.fail_after(10), short_tmpdir() as d:
        path = d / "hr.sock"
        secret = d / "hr.sock.secret"
        secret.write_text("s" * 43)
        os.chmod(secret, 0o600)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(str(path))
        listener.listen(1)
        heard: list[bytes] = []

        async def fake_parent() -> None:
            conn, _ = await listener.accept()
            with conn:
                heard.append(await conn.recv(4096))
                await conn.send(b'{"type":"draining"}\n')
                await conn.recv(4096)  # until the child closes

        async with trio.open_nursery() as n:
            n.start_soon(fake_parent)
            with caplog.at_level(logging.INFO, logger="octoproxy.hot_restart"), pytest.raises(HotRestartError, match="unexpected draining"):
                await take_over(str(path), secret)
        listener.close()
        assert json.loads(heard[0])["type"] == "hello"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == ["hot restart: parent_draining is not allowed in state receiving: hand-over aborted"]


async def test_a_child_that_says_ready_twice_is_let_go_and_the_drain_completes(caplog: pytest.LogCaptureFixture) -> None:
    """CHILD_READY after the hand-over is illegal: one error line, the connection closed, the drain goes on."""
    with trio.fail_after(30), short_tmpdir() as d:
        cfg = _config(d)
        proxy = Proxy(cfg)
        with caplog.at_level(logging.INFO, logger="octoproxy.hot_restart"):
            async with trio.open_nursery() as n:
                await n.start(proxy.run)
                while proxy.hot_restart_secret == b"":
                    await trio.sleep(0.01)
                child, _msg, socks = await take_over(str(cfg.hot_restart_path), cfg.hot_restart_secret_path)
                assert child.chan is not None
                try:
                    await child.chan.send(b'{"type":"ready"}\n{"type":"ready"}\n')
                    said = []
                    with pytest.raises((EOFError, OSError)):  # let go: the connection ends, no DONE on it
                        while True:
                            said.append((await child.chan.recv())[0]["type"])
                    assert set(said) <= {"draining"}
                finally:
                    for s in socks.values():
                        s.close()
                    child.chan.close()
        assert proxy.hot_restart.state is ParentState.DONE and proxy.handed_over and proxy.keep_socket_files
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == ["hot restart: child_ready is not allowed in state handed_over: hand-over aborted"]
        assert _errors(proxy, "hot_restart_illegal_event") == 1
        assert (d / "out.sock").exists()  # the sockets' files are the next generation's
