"""An idle proxy loads only what its configuration uses (issue 9: idle RSS <= 30 MB).

The heavy modules below are imported lazily (docs/benchmarks.md, "Idle RSS"):
protobuf on the first full header parse, the HTTP/1.1 codecs (httptools, the
SDK's server core) with an ``[http]`` listener or an HTTP app, the TLS shell
and cryptography with mTLS, the governance policy modules with a policy set,
the operator CLI never in ``octoproxy run``, the discovery client and its
WebSocket stack with a control plane. A real ``python -m octoproxy run``
process reports its ``sys.modules`` right after its ready line; a second run,
configured to use some of them, shows the check sees them when they load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

#: modules an idle proxy with no [http], no mTLS, no policies and no control plane must not load
LAZY = (
    "google.protobuf",
    "octoproxy.protocol.proto.octoproxy_header_pb2",
    "httptools",
    "octoproxy.protocol._http1",
    "octoproxy.proxy._http_listener",
    "octoproxy.proxy._http_app",
    "octoproxy.sdk",
    "cryptography",
    "octoproxy.proxy._tls",
    "octoproxy.identity._tls",
    "octoproxy.governance._policy",
    "octoproxy.governance._ratelimit",
    "octoproxy.governance._outlier",
    "octoproxy.governance._trace",
    "octoproxy.ctl",
    "difflib",
    "argparse",
    "gettext",
    "octoproxy.discovery",
    "trio_websocket",
    "wsproto",
    "octoproxy.controlplane",
    "h11",  # the admin server's parser: on its first connection
)

# Runs the CLI as `python -m octoproxy run -c CONFIG` does; once the proxy is
# ready (settle_memory runs right after the ready line) it writes its module
# names to OUT and stops itself with SIGTERM (a normal drain).
_WRAPPER = r"""
import json, os, runpy, signal, sys
out, config = sys.argv[1], sys.argv[2]
import octoproxy.proxy._main as main
settle = main.settle_memory
def report():
    settle()
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
    os.kill(os.getpid(), signal.SIGTERM)
main.settle_memory = report
sys.argv = ["octoproxy", "run", "-c", config]
runpy.run_module("octoproxy", run_name="__main__")
"""

_PRELOADED_BY_WRAPPER = ("json", "runpy")  # the wrapper's own imports, not the proxy's


def _config(tmp: Path, app: Path, extra: str = "") -> Path:
    cfg = tmp / "proxy.toml"
    cfg.write_text(f"""
[proxy]
service = "echo"
[inbound]
listen = "127.0.0.1:0"
app_uds = "{app}"
[outbound]
uds = "{tmp / 'out.sock'}"
[admin]
listen = "127.0.0.1:0"
{extra}
""")
    return cfg


def _idle_modules(tmp: Path, extra: str = "") -> set[str]:
    """The module names of a real proxy process, right after it said it is ready."""
    app = tmp / "app.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the local app: accepting is enough
    listener.bind(str(app))
    listener.listen(16)
    out = tmp / "modules.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(out), str(_config(tmp, app, extra))],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
    finally:
        listener.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "octoproxy ready" in proc.stdout, proc.stderr[-2000:]
    return set(json.loads(out.read_text()))


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_idle_proxy_does_not_load_the_lazy_modules(tmp_path: Path) -> None:
    modules = _idle_modules(tmp_path)
    assert "octoproxy.proxy._server" in modules and "trio" in modules  # it really ran
    loaded = [name for name in LAZY if _loaded(modules, name) and name not in _PRELOADED_BY_WRAPPER]
    assert loaded == [], f"an idle proxy loaded {loaded}: import them where they are used (docs/benchmarks.md)"


def test_the_check_sees_them_when_the_config_uses_them(tmp_path: Path) -> None:
    """With an [http] listener and a policy set, the HTTP codecs and the policy modules do load."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = f"""
[http]
listen = "127.0.0.1:{port}"
[governance]
version = "1"
[governance.services.echo.tracing]
sampled = false
"""
    modules = _idle_modules(tmp_path, extra)
    for name in ("octoproxy.protocol._http1", "octoproxy.proxy._http_listener", "octoproxy.governance._policy", "octoproxy.governance._trace"):
        assert _loaded(modules, name), name
    for name in ("cryptography", "octoproxy.proxy._tls", "octoproxy.ctl", "octoproxy.discovery"):
        assert not _loaded(modules, name), name


@pytest.mark.parametrize("argv", [["run", "-c", "x.toml"], ["agent", "-c", "x.toml"], ["demo"]])
def test_cli_parses_other_commands_without_ctl(argv: list[str]) -> None:
    code = (
        "import sys\nfrom octoproxy import _cli\n"
        f"_cli.build_parser(_cli._command_of({argv!r})).parse_args({argv!r})\n"
        "assert 'octoproxy.ctl' not in sys.modules, 'ctl loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_full_help_still_lists_ctl() -> None:
    out = subprocess.run([sys.executable, "-m", "octoproxy", "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "ctl" in out.stdout


def test_header_class_loads_protobuf_on_first_use() -> None:
    """``octoproxy.frame.Header`` and ``parse_header`` still work: protobuf loads when first needed."""
    code = (
        "import sys\nimport octoproxy.frame as frame\n"
        "assert 'google.protobuf' not in sys.modules\n"
        "h = frame.parse_header(frame.encode_header(service='svc', method='m'))\n"
        "assert (h.service, h.method) == ('svc', 'm')\n"
        "assert 'google.protobuf' in sys.modules and frame.Header is type(h)\n"
        "from octoproxy.frame import Header\nassert Header is type(h)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "-c", "p.toml"],
        ["run", "--config", "p.toml"],
        ["run", "-c", "p.toml", "--hot-restart"],
        ["run", "--hot-restart", "--config", "dir/p.toml"],
        ["run", "-c", ""],
    ],
)
def test_plain_run_is_parsed_as_argparse_would(argv: list[str]) -> None:
    """``octoproxy run -c PATH [--hot-restart]`` skips argparse, with the same result."""
    from octoproxy import _cli

    fast = _cli._parse_run(argv)
    full = _cli.build_parser().parse_args(argv)
    assert fast is not None
    assert vars(fast) == {k: v for k, v in vars(full).items() if k in ("command", "config", "hot_restart")}
    assert (full.command, full.config, full.hot_restart) == (fast.command, fast.config, fast.hot_restart)


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "-c"],
        ["run", "-c", "--hot-restart"],
        ["run", "-cp.toml"],
        ["run", "--config=p.toml"],
        ["run", "--conf", "p.toml"],
        ["run", "-c", "p.toml", "--hot"],
        ["run", "-c", "p.toml", "--help"],
        ["run", "-c", "a.toml", "-c", "b.toml"],
        ["run", "--hot-restart", "-c", "p.toml", "--hot-restart"],
        ["agent", "-c", "a.toml"],
        ["--version"],
        [],
    ],
)
def test_everything_else_goes_to_argparse(argv: list[str]) -> None:
    from octoproxy import _cli

    assert _cli._parse_run(argv) is None
