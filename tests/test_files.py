"""The subscriptions file is the proxy's own state: a bad one never stops a start.

End to end, with real `octoproxy run` processes: valid JSON of the wrong
shape, a FIFO, a symbolic link to ``/dev/zero`` and an oversized file at the
subscriptions path are each refused with one log line naming the file, and
the proxy starts (and stays up, and hot-restarts) without those
subscriptions; ``POST /subscribe`` checks every name before it saves any;
the file is written atomically with mode 0600.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from e2e import Proc, free_port, proxy_argv, short_tmpdir, start_process, stop

from octoproxy.common._admin import http_request
from octoproxy.proxy._discovery import SUBSCRIPTIONS_FILE_MAX, read_subscriptions_file, service_names, write_atomic

pytestmark = pytest.mark.e2e


def proxy_toml(d: Path) -> str:
    # a control plane nobody listens on: nothing here needs an answer from it
    return (
        f'[proxy]\ndrain_time = 1.0\nshutdown_time = 3.0\n[outbound]\nuds = "{d}/out.sock"\n'
        f'[admin]\nlisten = "127.0.0.1:0"\n'
        f'[discovery]\ncontrol_plane = ["ws://127.0.0.1:{free_port()}/v1/discovery"]\nsubscribe_timeout = 0.5\n'
    )


def subs_path(d: Path) -> Path:
    return d / "out.sock.subscriptions.json"


async def ready_json(p: Proc) -> dict:  # type: ignore[type-arg]
    status, _h, body = await http_request(p.admin, "GET", "/ready", timeout=5)
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


async def terminate(p: Proc) -> int:
    """SIGTERM, and the exit status (within a bound: a hung proxy fails the test)."""
    p.process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        return await p.process.wait()


async def start_and_check_ignored(d: Path, expect: str) -> None:
    cfg = d / "p.toml"
    cfg.write_text(proxy_toml(d))
    with trio.fail_after(20):
        p = await start_process(proxy_argv(cfg), "octoproxy ready", d, "proxy")
        try:
            state = await ready_json(p)
            assert state["discovery"]["subscriptions"] == []
            await trio.sleep(0.3)  # never "ready, then exit 1"
            assert p.process.returncode is None, p.stderr()
            assert await terminate(p) == 0, p.stderr()
        finally:
            await stop(p)
    err = p.stderr()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "subscriptions file ignored" in line]
    assert len(lines) == 1, err
    assert str(subs_path(d)) in lines[0] and expect in lines[0], lines[0]


BAD_SHAPES = [
    ('["echo"]', 'expected {"services": [names]}, got list'),
    ("42", 'expected {"services": [names]}, got 42'),
    ('{"other": 1}', 'expected {"services": [names]}, got dict'),
    ('{"services": null}', "services: expected a list of service names, got null"),
    ('{"services": [""]}', "services[0]: invalid service name ''"),
    ('{"services": ["echo", 7]}', "services[1]: expected a service name (a string), got 7"),
    ('{"services": "echo"}', 'services: expected a list of service names, got "echo"'),
    ('{"services": ["a b"]}', "services[0]: invalid service name 'a b'"),
    ("{not json", "not valid JSON"),
    ('{"services": ["\xff"]}'.encode("latin-1").decode("latin-1"), "services[0]: invalid service name"),
]


@pytest.mark.parametrize("content,expect", BAD_SHAPES, ids=[c for c, _ in BAD_SHAPES])
async def test_wrong_shape_is_ignored_with_one_line(content: str, expect: str) -> None:
    with short_tmpdir() as d:
        subs_path(d).write_text(content)
        await start_and_check_ignored(d, expect)


async def test_fifo_does_not_hang_the_proxy() -> None:
    with short_tmpdir() as d:
        os.mkfifo(subs_path(d))
        await start_and_check_ignored(d, "is not a regular file (a FIFO)")


async def test_symlink_to_dev_zero_is_not_read() -> None:
    with short_tmpdir() as d:
        os.symlink("/dev/zero", subs_path(d))
        await start_and_check_ignored(d, "is a symbolic link")


async def test_oversized_file_is_not_read() -> None:
    with short_tmpdir() as d:
        with open(subs_path(d), "wb") as f:
            f.truncate(SUBSCRIPTIONS_FILE_MAX + 1)  # sparse: costs no disk
        await start_and_check_ignored(d, f"more than the {SUBSCRIPTIONS_FILE_MAX} allowed")


async def test_directory_is_not_read() -> None:
    with short_tmpdir() as d:
        subs_path(d).mkdir()
        await start_and_check_ignored(d, "is not a regular file (a directory)")


async def test_post_subscribe_checks_every_name_before_saving() -> None:
    with short_tmpdir() as d:
        cfg = d / "p.toml"
        cfg.write_text(proxy_toml(d))
        with trio.fail_after(25):
            p = await start_process(proxy_argv(cfg), "octoproxy ready", d, "proxy")
            try:
                for body, expect in [
                    ({"services": ["echo", ""]}, "services[1]: invalid service name ''"),
                    ({"services": "echo"}, 'services: expected a list of service names, got "echo"'),
                    ({"services": ["echo", None]}, "services[1]: expected a service name (a string), got null"),
                    ({"nothing": 1}, "services: expected a list of service names, got null"),
                    (["echo"], 'expected JSON {"services"'),
                ]:
                    status, _h, resp = await http_request(p.admin, "POST", "/subscribe", json.dumps(body).encode(), timeout=5)
                    assert status == 400, (body, status, resp)
                    assert expect in json.loads(resp)["error"], (body, resp)
                    assert not subs_path(d).exists(), "a refused subscription was saved"
                state = await ready_json(p)
                assert state["discovery"]["subscriptions"] == []
                # a valid one is saved (the control plane is away: 504, the subscription stays)
                status, _h, resp = await http_request(
                    p.admin, "POST", "/subscribe", json.dumps({"services": ["echo"], "timeout": 0.2}).encode(), timeout=5
                )
                assert status == 504, resp
                assert json.loads(subs_path(d).read_bytes()) == {"services": ["echo"]}
                assert stat.S_IMODE(os.stat(subs_path(d)).st_mode) == 0o600
                status, _h, resp = await http_request(
                    p.admin, "POST", "/unsubscribe", json.dumps({"services": ["echo", ""]}).encode(), timeout=5
                )
                assert status == 400, resp
                assert json.loads(subs_path(d).read_bytes()) == {"services": ["echo"]}
                assert await terminate(p) == 0
            finally:
                await stop(p)
        assert "Traceback" not in p.stderr()


async def test_hot_restart_with_a_bad_file_is_not_blocked() -> None:
    with short_tmpdir() as d:
        cfg = d / "p.toml"
        cfg.write_text(proxy_toml(d))
        with trio.fail_after(30):
            old = await start_process(proxy_argv(cfg), "octoproxy ready", d, "old")
            new = None
            try:
                subs_path(d).write_text('{"services": [""]}')
                new = await start_process(proxy_argv(cfg, hot_restart=True), "octoproxy ready", d, "new")
                with trio.fail_after(10):
                    assert await old.process.wait() == 0, old.stderr()
                # asked once the old one is gone: until it has heard READY, it may still
                # accept on the shared admin socket (and would rightly say generation 0)
                assert (await ready_json(new))["hot_restart"]["generation"] == 1
                assert await terminate(new) == 0, new.stderr()
            finally:
                await stop(old)
                if new is not None:
                    await stop(new)
        assert "Traceback" not in new.stderr()
        assert "subscriptions file ignored" in new.stderr()


# ---------------------------------------------------------------- the helpers themselves


def test_service_names_accepts_a_list_of_names() -> None:
    assert service_names(["echo", "pay.v2", "user-svc_1"]) == ["echo", "pay.v2", "user-svc_1"]
    for bad in [None, "echo", 42, {"a": 1}, [""], ["ok", 3], ["x" * 300]]:
        with pytest.raises(ValueError):
            service_names(bad)


def test_write_atomic_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "subs.json"
    old = os.umask(0)
    try:
        write_atomic(path, b'{"services": ["a"]}')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    write_atomic(path, b'{"services": ["b"]}')
    assert read_subscriptions_file(path) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["subs.json"]  # no temp file left
    assert read_subscriptions_file(tmp_path / "absent.json") == []


async def test_call_to_an_invalid_service_name_is_not_subscribed() -> None:
    """A call naming a service the control plane would refuse: NO_ROUTE at once, nothing saved."""
    from octoproxy import Status, sdk

    with short_tmpdir() as d:
        cfg = d / "p.toml"
        cfg.write_text(proxy_toml(d))
        with trio.fail_after(25):
            p = await start_process(proxy_argv(cfg), "octoproxy ready", d, "proxy")
            try:
                async with sdk.open_client(d / "out.sock") as client:
                    for name in ["bad name", "-dash", "x" * 300]:
                        start = trio.current_time()
                        with pytest.raises(sdk.CallError) as info:
                            await client.call(name, "m", b"", timeout=5)
                        assert info.value.status == Status.NO_ROUTE, info.value
                        assert trio.current_time() - start < 0.4  # not the 0.5 s subscribe_timeout
                assert not subs_path(d).exists()
                assert (await ready_json(p))["discovery"]["subscriptions"] == []
            finally:
                await stop(p)


async def test_file_io_under_autojump_clock_does_not_move_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    """In a worker thread, a disk wait would look idle to autojump and jump virtual time
    past every deadline (octoproxy.testing meshes run under it): run_blocking stays inline there."""
    import time

    from octoproxy.proxy._discovery import run_blocking

    start = trio.current_time()
    await run_blocking(time.sleep, 0.05)
    assert trio.current_time() == start
