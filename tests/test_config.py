"""The TOML configuration: defaults, validation messages, paths, dump, docs, examples."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from octoproxy.core._balancer import Endpoint
from octoproxy.proxy._config import (
    ProxyConfig,
    config_errors,
    RouteConfig,
    load_config,
    parse_config,
    render_config_reference,
    split_host_port,
)
from octoproxy.protocol._errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"

ECHO_CLUSTER = {"echo": {"endpoints": [{"address": "127.0.0.1:9000"}]}}


def with_echo(**sections: Any) -> dict[str, Any]:
    """A valid base document (one route, one cluster) plus the given sections."""
    doc: dict[str, Any] = {"routes": [{"service": "echo", "cluster": "echo"}], "clusters": ECHO_CLUSTER}
    doc.update(sections)
    return doc


# ---------------------------------------------------------------- defaults


def test_empty_document_gives_defaults() -> None:
    cfg = parse_config({})
    assert cfg == ProxyConfig()
    assert cfg.proxy.service == ""
    assert cfg.proxy.max_frame_size == 16 * 1024 * 1024
    assert (cfg.proxy.drain_time, cfg.proxy.shutdown_time, cfg.proxy.log_level) == (5.0, 10.0, "info")
    assert cfg.outbound.uds == Path("octoproxy-outbound.sock")
    assert cfg.outbound.uds_mode == 0o660
    assert (cfg.outbound.max_connections, cfg.outbound.max_buffer, cfg.outbound.max_pending) == (1024, 4194304, 65536)
    assert cfg.inbound is None
    assert cfg.admin.listen == "127.0.0.1:0"
    up = cfg.upstream
    assert (up.connections_per_endpoint, up.connect_timeout, up.ping_interval) == (2, 1.0, 10.0)
    assert (up.ping_timeout, up.default_timeout) == (5.0, 5.0)
    assert cfg.routes == ()
    assert dict(cfg.clusters) == {}


def test_inbound_defaults() -> None:
    cfg = parse_config({"inbound": {"app_uds": "/run/app.sock"}})
    assert cfg.inbound is not None
    assert cfg.inbound.listen == "127.0.0.1:9000"
    assert cfg.inbound.app_uds == Path("/run/app.sock")
    assert (cfg.inbound.app_connections, cfg.inbound.max_connections, cfg.inbound.max_buffer) == (2, 1024, 4194304)


def test_route_and_cluster_defaults() -> None:
    cfg = parse_config(with_echo(upstream={"default_timeout": 2.5}))
    (route,) = cfg.routes
    assert route == RouteConfig(service="echo", method="*", cluster="echo", timeout=2.5)
    cluster = cfg.clusters["echo"]
    assert cluster.lb == "round_robin"
    (ep,) = cluster.endpoints
    assert (ep.address, ep.weight, ep.region, ep.idc, dict(ep.tags)) == ("127.0.0.1:9000", 100, "", "", {})


def test_integers_accepted_for_seconds() -> None:
    cfg = parse_config({"upstream": {"connect_timeout": 2, "ping_interval": 0}})
    assert cfg.upstream.connect_timeout == 2.0 and isinstance(cfg.upstream.connect_timeout, float)
    assert cfg.upstream.ping_interval == 0.0


@pytest.mark.parametrize(("text", "mode"), [("0660", 0o660), ("0600", 0o600), ("0o644", 0o644), ("777", 0o777)])
def test_uds_mode(text: str, mode: int) -> None:
    assert parse_config({"outbound": {"uds_mode": text}}).outbound.uds_mode == mode


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9000", "localhost:0", "0.0.0.0:65535", "[::1]:9000", "[::]:0", "my-host.example.com:80"]
)
def test_good_listen_addresses(address: str) -> None:
    assert parse_config({"inbound": {"listen": address, "app_uds": "a"}}).inbound.listen == address  # type: ignore[union-attr]
    assert parse_config({"admin": {"listen": address}}).admin.listen == address


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert split_host_port("[::1]:80") == ("::1", 80)
    for bad in ["", "host", ":80", "host:", "host:65536", "::1:80", "[nope]:80", "host:８０", "a b:1"]:
        with pytest.raises(ValueError):
            split_host_port(bad)


# ---------------------------------------------------------------- errors

EP = "clusters.echo.endpoints[0]"

BAD: list[tuple[dict[str, Any], str]] = [
    # top level and sections
    ({"foo": 1}, "foo: unknown key"),
    ({"outbound": {"foo": 1}}, "outbound.foo: unknown key"),
    ({"outbound": "x"}, "outbound: expected a table, got 'x'"),
    ({"inbound": {"listen": "127.0.0.1:9000"}}, "inbound.app_uds: required key missing"),
    # [proxy]
    ({"proxy": {"service": 5}}, "proxy.service: expected a string, got 5"),
    ({"proxy": {"max_frame_size": 1000}}, "proxy.max_frame_size: expected an integer in 1024..1073741824, got 1000"),
    ({"proxy": {"max_frame_size": (1 << 30) + 1}}, "proxy.max_frame_size: expected an integer in"),
    ({"proxy": {"max_frame_size": 2048.0}}, "proxy.max_frame_size: expected an integer"),
    ({"proxy": {"max_frame_size": True}}, "proxy.max_frame_size: expected an integer"),
    ({"proxy": {"drain_time": "x"}}, "proxy.drain_time: expected a positive number, got 'x'"),
    ({"proxy": {"drain_time": 0}}, "proxy.drain_time: expected a positive number, got 0"),
    ({"proxy": {"drain_time": -1.0}}, "proxy.drain_time: expected a positive number"),
    ({"proxy": {"drain_time": float("inf")}}, "proxy.drain_time: expected a positive number"),
    ({"proxy": {"drain_time": float("nan")}}, "proxy.drain_time: expected a positive number"),
    ({"proxy": {"drain_time": True}}, "proxy.drain_time: expected a positive number"),
    ({"proxy": {"drain_time": 10.0, "shutdown_time": 8}}, "proxy.shutdown_time: 8.0 must be greater than proxy.drain_time (10.0)"),
    (
        {"proxy": {"shutdown_time": 1.0}},
        "proxy.shutdown_time: 1.0 must be greater than proxy.drain_time, whose default is 5.0; set proxy.drain_time below 1.0",
    ),
    ({"proxy": {"log_level": "trace"}}, "proxy.log_level: expected one of 'debug', 'info', 'warning', 'error'"),
    # [outbound]
    ({"outbound": {"uds": ""}}, "outbound.uds: expected a non-empty path string"),
    ({"outbound": {"uds": 3}}, "outbound.uds: expected a non-empty path string, got 3"),
    ({"outbound": {"uds_mode": "rw"}}, "outbound.uds_mode: expected an octal permission string"),
    ({"outbound": {"uds_mode": "0999"}}, "outbound.uds_mode: expected an octal"),
    ({"outbound": {"uds_mode": "7777"}}, "outbound.uds_mode: expected an octal"),
    ({"outbound": {"uds_mode": 660}}, "outbound.uds_mode: expected an octal"),
    ({"outbound": {"max_connections": 0}}, "outbound.max_connections: expected an integer >= 1, got 0"),
    ({"outbound": {"max_buffer": 65535}}, "outbound.max_buffer: expected an integer >= 65536"),
    ({"outbound": {"max_pending": "10"}}, "outbound.max_pending: expected an integer >= 1, got '10'"),
    # [inbound]
    ({"inbound": {"app_uds": "a", "listen": "localhost"}}, "inbound.listen: expected a host:port address"),
    ({"inbound": {"app_uds": "a", "listen": "h:70000"}}, "inbound.listen: expected a host:port address"),
    ({"inbound": {"app_uds": "a", "listen": "::1:9000"}}, "inbound.listen: expected a host:port"),
    ({"inbound": {"app_uds": "a", "listen": "[zz]:9000"}}, "inbound.listen: expected a host:port"),
    ({"inbound": {"app_uds": "a", "listen": 9000}}, "inbound.listen: expected a host:port"),
    ({"inbound": {"app_uds": ""}}, "inbound.app_uds: expected a non-empty path string"),
    ({"inbound": {"app_uds": "a", "app_connections": 65}}, "inbound.app_connections: expected an integer in 1..64"),
    ({"inbound": {"app_uds": "a", "max_connections": -1}}, "inbound.max_connections: expected an integer >= 1"),
    ({"inbound": {"app_uds": "a", "max_buffer": 1}}, "inbound.max_buffer: expected an integer >= 65536"),
    ({"inbound": {"app_uds": "a", "bar": 1}}, "inbound.bar: unknown key"),
    # [admin]
    ({"admin": {"listen": "unix:"}}, "admin.listen: expected 'host:port' or 'unix:/path', got 'unix:'"),
    ({"admin": {"listen": 9901}}, "admin.listen: expected"),
    ({"admin": {"listen": "127.0.0.1"}}, "admin.listen: expected"),
    # [upstream]
    ({"upstream": {"connect_timeout": "x"}}, "upstream.connect_timeout: expected a positive number, got 'x'"),
    ({"upstream": {"connections_per_endpoint": 0}}, "upstream.connections_per_endpoint: expected an integer in 1..64"),
    ({"upstream": {"ping_interval": -1}}, "upstream.ping_interval: expected a number >= 0, got -1"),
    ({"upstream": {"ping_timeout": 0}}, "upstream.ping_timeout: expected a positive number"),
    ({"upstream": {"default_timeout": "5s"}}, "upstream.default_timeout: expected a positive number, got '5s'"),
    # [[routes]]
    (with_echo(routes={"service": "echo"}), "routes: expected an array of tables"),
    (with_echo(routes=[1]), "routes[0]: expected a table, got 1"),
    (with_echo(routes=[{"cluster": "echo"}]), "routes[0].service: required key missing"),
    (with_echo(routes=[{"service": "echo"}]), "routes[0].cluster: required key missing"),
    (with_echo(routes=[{"service": "", "cluster": "echo"}]), "routes[0].service: expected a non-empty string"),
    (with_echo(routes=[{"service": "echo", "method": "", "cluster": "echo"}]), "routes[0].method: expected a non"),
    (with_echo(routes=[{"service": "echo", "cluster": "nope"}]), "routes[0].cluster: unknown cluster 'nope'"),
    (with_echo(routes=[{"service": "echo", "cluster": "echo", "timeout": 0}]), "routes[0].timeout: expected a positive"),
    (with_echo(routes=[{"service": "echo", "cluster": "echo", "x": 1}]), "routes[0].x: unknown key"),
    (
        with_echo(routes=[{"service": "a", "cluster": "echo"}, {"service": "a", "method": "*", "cluster": "echo"}]),
        "routes[1]: duplicate route for service 'a' method '*' (also routes[0])",
    ),
    # [clusters]
    (with_echo(clusters=[]), "clusters: expected a table of tables"),
    (with_echo(clusters={"echo": 3}), "clusters.echo: expected a table, got 3"),
    (with_echo(clusters={"echo": {"lb": "fastest"}}), "clusters.echo.lb: expected one of 'round_robin', 'random'"),
    (with_echo(clusters={"echo": {"lbb": "random"}}), "clusters.echo.lbb: unknown key"),
    (with_echo(clusters={"echo": {"endpoints": {}}}), "clusters.echo.endpoints: expected an array of tables"),
    (with_echo(clusters={"echo": {"endpoints": ["127.0.0.1:1"]}}), f"{EP}: expected a table, got '127.0.0.1:1'"),
    (with_echo(clusters={"echo": {"endpoints": [{}]}}), f"{EP}.address: required key missing"),
    (with_echo(clusters={"echo": {"endpoints": [{"address": "127.0.0.1:0"}]}}), f"{EP}.address: expected a host:port"),
    (with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "weight": -1}]}}), f"{EP}.weight: expected an integer"),
    (with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "region": 1}]}}), f"{EP}.region: expected a string"),
    (with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "tags": []}]}}), f"{EP}.tags: expected a table of"),
    (
        with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "tags": {"set": 1}}]}}),
        f"{EP}.tags.set: expected a string, got 1",
    ),
    (with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "port": 1}]}}), f"{EP}.port: unknown key"),
    (
        with_echo(clusters={"echo": {"endpoints": [{"address": "h:1"}, {"address": "h:1"}]}}),
        "clusters.echo.endpoints[1].address: duplicate address 'h:1' (also endpoints[0])",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_invalid_config_names_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(message), str(info.value)


def test_every_error_is_reported_at_once() -> None:
    data = {
        "proxy": {"drain_time": "x", "bogus": 1},
        "outbound": {"uds_mode": "rw"},
        "upstream": {"connect_timeout": 0, "ping_timeout": -1},
        "clusters": {"a": {"lb": "fastest", "endpoints": [{"address": "h:1", "tags": {"x": 1, "y": 2}}, {}]}},
        "discovery": {"control_plane": ["http://a", "ws://ok", 3]},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    errors = config_errors(info.value)
    assert errors[5].startswith("clusters.a.lb: expected one of 'round_robin'") and errors[5].endswith("got 'fastest'")
    errors[5] = "clusters.a.lb"
    assert errors == [
        "proxy.bogus: unknown key",
        "proxy.drain_time: expected a positive number, got 'x'",
        "outbound.uds_mode: expected an octal permission string such as '0660', got 'rw'",
        "upstream.connect_timeout: expected a positive number, got 0",
        "upstream.ping_timeout: expected a positive number, got -1",
        "clusters.a.lb",
        "clusters.a.endpoints[0].tags.x: expected a string, got 1",
        "clusters.a.endpoints[0].tags.y: expected a string, got 2",
        "clusters.a.endpoints[1].address: required key missing",
        "discovery.control_plane[0]: expected a ws:// URL, got 'http://a'",
        "discovery.control_plane[2]: expected a ws:// URL, got 3",
    ]


def test_every_cross_key_error_is_reported_at_once() -> None:
    data = with_echo(routes=[{"service": "a", "cluster": "nope"}, {"service": "a", "cluster": "echo"}])
    data["proxy"] = {"drain_time": 12, "shutdown_time": 12}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert config_errors(info.value) == [
        "proxy.shutdown_time: 12.0 must be greater than proxy.drain_time (12.0)",
        "routes[0].cluster: unknown cluster 'nope'",
        "routes[1]: duplicate route for service 'a' method '*' (also routes[0])",
    ]


def test_drain_time_alone_moves_the_hard_stop() -> None:
    """`drain_time = 20` alone is valid: the user never set shutdown_time, so it follows."""
    assert parse_config({"proxy": {"drain_time": 20}}).proxy.shutdown_time == 25.0
    assert parse_config({"proxy": {"drain_time": 3}}).proxy.shutdown_time == 10.0
    assert parse_config({"proxy": {"drain_time": 20, "shutdown_time": 21}}).proxy.shutdown_time == 21.0
    cfg = parse_config({"proxy": {"drain_time": 20}})
    assert parse_config(cfg.to_dict()) == cfg


def test_cli_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('[proxy]\ndrain_time = "x"\n[outbound]\nusd = "a.sock"\n')
    proc = subprocess.run([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"octoproxy: invalid configuration {cfg}: 2 errors",
        "  proxy.drain_time: expected a positive number, got 'x'",
        "  outbound.usd: unknown key",
    ]
    missing = tmp_path / "missing.toml"
    proc = subprocess.run([sys.executable, "-m", "octoproxy", "run", "-c", str(missing)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"octoproxy: {missing}: cannot read: No such file or directory"]
    cfg.write_text("[proxy]\nshutdown_time = 3\n")
    proc = subprocess.run([sys.executable, "-m", "octoproxy", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "shutdown_time" in proc.stderr and "drain_time, whose default is 5.0" in proc.stderr


# ---------------------------------------------------------------- paths


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "outbound": {"uds": "sub/out.sock"},
            "inbound": {"app_uds": "/abs/app.sock"},
            "admin": {"listen": "unix:admin.sock"},
        },
        base_dir=tmp_path,
    )
    assert cfg.outbound.uds == tmp_path / "sub" / "out.sock"
    assert cfg.inbound is not None and cfg.inbound.app_uds == Path("/abs/app.sock")
    assert cfg.admin.listen == f"unix:{tmp_path / 'admin.sock'}"


def test_default_socket_path_follows_the_file(tmp_path: Path) -> None:
    (tmp_path / "proxy.toml").write_text("")
    assert load_config(tmp_path / "proxy.toml").outbound.uds == tmp_path / "octoproxy-outbound.sock"


def test_load_config_resolves_against_file_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "proxy.toml").write_text('[inbound]\napp_uds = "app.sock"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config("conf/proxy.toml")  # a relative path to the file itself
    assert cfg.inbound is not None and cfg.inbound.app_uds == conf_dir / "app.sock"
    assert cfg.inbound.app_uds.is_absolute()


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[proxy\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("[outbound]\nusd = 'x'\n")
    with pytest.raises(ConfigError, match=r"^outbound\.usd: unknown key$"):
        load_config(tmp_path / "typo.toml")


# ---------------------------------------------------------------- dump


FULL = """
[proxy]
service = "svc"
max_frame_size = 1048576
drain_time = 1.5
shutdown_time = 3
log_level = "debug"

[outbound]
uds = "out.sock"
uds_mode = "0600"

[inbound]
listen = "[::1]:9000"
app_uds = "app.sock"
app_connections = 4

[admin]
listen = "unix:admin.sock"

[upstream]
ping_interval = 0

[[routes]]
service = "echo"
cluster = "echo"

[[routes]]
service = "echo"
method = "Slow"
cluster = "echo"
timeout = 30

[clusters.echo]
lb = "least_request"
endpoints = [
  { address = "10.0.0.1:9000", weight = 50, region = "bj", idc = "dx", tags = { set = "canary" } },
  { address = "10.0.0.2:9000" },
]
"""


def test_to_dict_round_trip(tmp_path: Path) -> None:
    (tmp_path / "full.toml").write_text(FULL)
    cfg = load_config(tmp_path / "full.toml")
    dumped = cfg.to_dict()
    assert json.loads(json.dumps(dumped)) == dumped  # JSON-able
    assert parse_config(dumped) == cfg
    assert dumped["outbound"] == {
        "uds": str(tmp_path / "out.sock"),
        "uds_mode": "0600",
        "max_connections": 1024,
        "max_buffer": 4194304,
        "max_pending": 65536,
        "idle_timeout": 3600.0,
    }
    assert dumped["routes"][0]["timeout"] == 5.0  # the default is made explicit
    assert dumped["clusters"]["echo"]["endpoints"][0]["tags"] == {"set": "canary"}
    assert "inbound" not in parse_config({}).to_dict()  # absent stays absent


def test_config_is_frozen() -> None:
    cfg = parse_config(with_echo())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.proxy.service = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.clusters["other"] = cfg.clusters["echo"]  # type: ignore[index]


def test_endpoint_config_to_endpoint() -> None:
    cfg = parse_config(
        with_echo(clusters={"echo": {"endpoints": [{"address": "h:1", "weight": 7, "region": "r", "tags": {"k": "v"}}]}})
    )
    ep = cfg.clusters["echo"].endpoints[0].to_endpoint()
    assert isinstance(ep, Endpoint)
    assert (ep.address, ep.weight, ep.region, ep.idc, ep.tags, ep.healthy, ep.active) == ("h:1", 7, "r", "", {"k": "v"}, True, 0)


# ---------------------------------------------------------------- docs and examples


def test_docs_match_schema() -> None:
    text = DOCS.read_text()
    head, sep, rest = text.partition(BEGIN)
    committed, sep2, tail = rest.partition(END)
    assert sep and sep2, f"{DOCS} lacks the {BEGIN} / {END} markers"
    generated = "\n" + render_config_reference()
    if os.environ.get("OCTOPROXY_REGEN_DOCS"):
        DOCS.write_text(head + BEGIN + generated + END + tail)
        return
    assert committed == generated, (
        "docs/configuration.md is out of date; run "
        "OCTOPROXY_REGEN_DOCS=1 python -m pytest tests/test_config.py -k docs"
    )


def test_reference_documents_every_key() -> None:
    ref = render_config_reference()
    for heading in ["[proxy]", "[outbound]", "[inbound]", "[admin]", "[upstream]", "[[routes]]", "[clusters.<name>]"]:
        assert f"### `{heading}`" in ref
    for key in ["max_frame_size", "uds_mode", "app_connections", "connections_per_endpoint", "default_timeout", "tags"]:
        assert f"| `{key}` |" in ref


def test_example_caller() -> None:
    cfg = load_config(ROOT / "examples" / "caller.toml")
    assert cfg.proxy.service == "caller-app"
    assert cfg.outbound.uds.parent == ROOT / "examples"
    assert cfg.inbound is None
    assert cfg.admin.listen == "127.0.0.1:9901"
    (route,) = cfg.routes
    assert (route.service, route.method, route.cluster) == ("echo", "*", "echo")
    assert [ep.address for ep in cfg.clusters["echo"].endpoints] == ["127.0.0.1:9000"]


def test_example_provider() -> None:
    cfg = load_config(ROOT / "examples" / "provider.toml")
    assert cfg.inbound is not None
    assert cfg.inbound.listen == "127.0.0.1:9000"
    assert cfg.inbound.app_uds == ROOT / "examples" / "provider-app.sock"
    assert cfg.outbound.uds == ROOT / "examples" / "provider-outbound.sock"
    assert cfg.admin.listen == "127.0.0.1:9902"
    assert cfg.routes == ()


def test_agent_cli_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nbogus = 1\nhealth_interval = "x"\n')
    proc = subprocess.run([sys.executable, "-m", "octoproxy", "agent", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"octoproxy agent: invalid configuration {cfg}: 3 errors",
        "  agent.bogus: unknown key",
        "  agent.proxy_config: required key missing",
        "  agent.health_interval: expected a positive number, got 'x'",
    ]


def test_http_keys() -> None:
    """[http] and the inbound app codec (docs/http.md)."""
    cfg = parse_config({"http": {"listen": "127.0.0.1:0", "max_body": 10}, "inbound": {"app_codec": "http1", "app_http": "127.0.0.1:8000"}})
    assert cfg.http is not None and cfg.http.max_body == 10 and cfg.http.idle_timeout == 60.0
    assert cfg.inbound is not None and cfg.inbound.app_http == "127.0.0.1:8000"
    assert parse_config({}).http is None
    assert parse_config(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="inbound.app_http: required with app_codec"):
        parse_config({"inbound": {"app_codec": "http1"}})
    with pytest.raises(ConfigError, match="inbound.app_codec"):
        parse_config({"inbound": {"app_codec": "grpc", "app_uds": "a"}})
    with pytest.raises(ConfigError, match="http.max_connections"):
        parse_config({"http": {"max_connections": 0}})
