"""Configuration for apps: the sans-IO parts (versions, limits, gradual release, delivery checks, SDK parsing)."""

from __future__ import annotations

import json

import pytest

from octoproxy.discovery import _appconfig as core
from octoproxy.protocol._protocol import Status
from octoproxy.discovery._xds_client import INVALID_ARGUMENT, TYPE_APPCONFIG, XdsClient
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb
from octoproxy.sdk import CallError
from octoproxy.sdk import _config_core as cfgcore
from octoproxy.sdk._subscribe_core import HttpReply


def rec() -> pb.AppConfigRecord:
    return core.new_record("app", "default")


def test_versions_release_promote_rollback() -> None:
    r = core.put_version(rec(), {"a": "1"}, 1000)
    assert (r.last_version, r.stable, r.candidate) == (1, 1, 0)
    r = core.put_version(r, {"a": "2"}, 2000, percent=30)
    assert (r.stable, r.candidate, r.percent) == (1, 2, 30)
    r = core.release(r, 2, 60)
    assert (r.stable, r.candidate, r.percent) == (1, 2, 60)
    r = core.promote(r)
    assert (r.stable, r.candidate, r.percent) == (2, 0, 0)
    r = core.rollback(r, 1, 3000)
    assert (r.last_version, r.stable) == (3, 3) and dict(r.history[-1].values) == {"a": "1"}
    assert r.history[-1].note == "rollback to 1"
    with pytest.raises(core.AppConfigError, match="no release in progress"):
        core.promote(r)
    with pytest.raises(core.AppConfigError, match="no version 9"):
        core.rollback(r, 9, 0)
    with pytest.raises(core.AppConfigError, match="percent"):
        core.release(r, 1, 101)
    # a first version released to a share has nothing to fall back on: it is stable
    first = core.put_version(rec(), {"a": "1"}, 0, percent=10)
    assert (first.stable, first.candidate) == (1, 0)
    # release of the stable version ends a release in progress
    r2 = core.release(core.put_version(r, {"b": "1"}, 0, percent=5), r.stable, 50)
    assert (r2.stable, r2.candidate) == (r.stable, 0)


def test_resolution_is_per_instance_deterministic_and_sticky() -> None:
    r = core.put_version(core.put_version(rec(), {"a": "1"}, 0), {"a": "2"}, 0, percent=25)
    nodes = [f"n{i}" for i in range(2000)]
    got = {n: core.resolve(r, n).version for n in nodes}  # type: ignore[union-attr]
    share = sum(v == "2" for v in got.values()) / len(nodes)
    assert 0.22 < share < 0.28
    assert got == {n: core.resolve(r, n).version for n in nodes}  # type: ignore[union-attr]
    inside = {n for n, v in got.items() if v == "2"}
    wider = core.release(r, 2, 60)
    assert inside <= {n for n in nodes if core.resolve(wider, n).version == "2"}  # type: ignore[union-attr]
    assert core.resolve(None, "n") is None and core.resolve(rec(), "n") is None
    assert 0 <= core.bucket("app", "default", "x") < 10000
    assert core.bucket("app", "default", "x") != core.bucket("app", "prod", "x") or core.bucket("b", "default", "x") != core.bucket("app", "default", "x")


def test_limits() -> None:
    assert core.check_values({"a.b/c-d_e": "v"}) == {"a.b/c-d_e": "v"}
    for bad, match in [
        ({"": "v"}, "invalid key"), ({"-a": "v"}, "invalid key"), ({"a b": "v"}, "invalid key"),
        ({"k" * (core.MAX_KEY_LENGTH + 1): "v"}, "invalid key"), ({"k": 1}, "values are strings"),
        ({"k": "x" * (core.MAX_VALUE_BYTES + 1)}, "allowed per key"),
        ({f"k{i}": "" for i in range(core.MAX_KEYS + 1)}, "keys"),
        ({f"k{i}": "x" * 60000 for i in range(5)}, "per service"),
    ]:  # fmt: skip
        with pytest.raises(core.AppConfigError, match=match):
            core.check_values(bad)  # type: ignore[arg-type]
    for env in ("", "a.b", "a b", "x" * 64, "-x"):
        assert core.check_environment(env) is not None
    assert core.split_name("my.svc.prod") == ("my.svc", "prod")
    with pytest.raises(core.AppConfigError):
        core.split_name("nodot")
    with pytest.raises(core.AppConfigError):
        core.resource_name("a/b", "default")


def test_history_is_bounded_in_count_and_bytes_but_keeps_stable_and_candidate() -> None:
    r = core.put_version(rec(), {"keep": "me"}, 0)
    for i in range(core.MAX_HISTORY + 20):
        r = core.put_version(r, {"i": str(i)}, 0, percent=5)  # each a candidate; 1 stays stable
    assert len(r.history) == core.MAX_HISTORY
    kept = [v.version for v in r.history]
    assert kept[0] == 1 and kept[-1] == r.last_version == r.candidate and kept[1] == r.last_version - core.MAX_HISTORY + 2
    big = core.put_version(rec(), {f"k{i}": "x" * 50000 for i in range(5)}, 0)
    for _ in range(10):
        big = core.put_version(big, {f"k{i}": "y" * 50000 for i in range(5)}, 0)
    assert sum(v.ByteSize() for v in big.history) <= core.MAX_HISTORY_BYTES


def test_diff() -> None:
    assert core.diff({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "x" * 100}) == [
        "~ b: '2' -> '3'", f"+ c = {'x' * 60!r}... (100 chars)",
    ]  # fmt: skip
    assert core.diff({"a": "1"}, {}) == ["- a"]


def _response(msg: pb.AppConfig, name: str, nonce: str = "n1") -> pb.ServerMessage:
    return pb.ServerMessage(response=pb.DiscoveryResponse(
        type_url=TYPE_APPCONFIG, nonce=nonce, resources=[pb.Resource(name=name, version="v" + nonce, body=msg.SerializeToString())]
    ))


def test_a_rejected_delivery_changes_nothing() -> None:
    client = XdsClient("n")
    client.subscribe(TYPE_APPCONFIG, ["app.default"])

    def validate(type_url: str, name: str, res: object) -> None:
        core.validate_delivered(name, res)  # type: ignore[arg-type]

    ok = pb.AppConfig(service="app", environment="default", version="1", values={"a": "b"})
    out, changes = client.on_response(_response(ok, "app.default"), validate)
    assert [c.name for c in changes] == ["app.default"] and not out[0].discovery.HasField("error_detail")
    for bad, name in [
        (pb.AppConfig(service="app", environment="default", version="2", values={"a": "x" * (core.MAX_VALUE_BYTES + 1)}), "app.default"),
        (pb.AppConfig(service="app", environment="default", version="v2"), "app.default"),
        (pb.AppConfig(service="other", environment="default", version="2"), "app.default"),
    ]:
        out, changes = client.on_response(_response(bad, name, "n2"), validate)
        assert changes == [] and out[0].discovery.error_detail.code == INVALID_ARGUMENT
        assert client.held(TYPE_APPCONFIG)["app.default"] == ok


def test_sdk_core_parses_answers() -> None:
    req = cfgcore.config_request("127.0.0.1:1", cfgcore.config_path("3", 5))
    assert req.startswith(b"GET /config?watch=3&timeout=5 HTTP/1.1\r\n")
    assert cfgcore.config_path() == "/config" and cfgcore.config_path("", 1).endswith("watch=&timeout=1")
    body = json.dumps({"version": "3", "values": {"k": "[1]"}, "source": "file", "service": "s", "environment": "e"}).encode()
    c = cfgcore.config_result(200, body)
    assert (c.version, c.values, c.source, c.json("k")) == ("3", {"k": "[1]"}, "file", [1])
    for status, reply, code in [(404, b"", Status.NO_ROUTE), (429, b"", Status.OVERLOADED), (500, b"", Status.UNAVAILABLE),
                                (200, b"nope", Status.UNAVAILABLE), (200, b'{"version": "1", "values": {"k": 1}}', Status.UNAVAILABLE)]:  # fmt: skip
        with pytest.raises(CallError) as info:
            cfgcore.config_result(status, reply)
        assert info.value.status == code
    r = HttpReply()
    r.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert r.complete and r.body == b"{}"


def test_proxy_environment_and_app_config_file_keys(tmp_path: object) -> None:
    from pathlib import Path

    from octoproxy.proxy._config import parse_config
    from octoproxy.protocol._errors import ConfigError

    cfg = parse_config({"proxy": {"service": "app"}, "outbound": {"uds": "/tmp/x.sock"}})
    assert cfg.proxy.environment == "default" and cfg.app_config_path == Path("/tmp/x.sock.appconfig.json")
    cfg = parse_config({"proxy": {"environment": "prod-eu_1"},
                        "discovery": {"control_plane": ["ws://127.0.0.1:1/v1/discovery"], "app_config_file": "/tmp/c.json"}})  # fmt: skip
    assert cfg.proxy.environment == "prod-eu_1" and cfg.app_config_path == Path("/tmp/c.json")
    for bad in ("", "a.b", "-x", "x" * 64, "é"):
        with pytest.raises(ConfigError, match="proxy.environment"):
            parse_config({"proxy": {"environment": bad}})
