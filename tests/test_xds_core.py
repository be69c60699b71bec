"""Sans-IO tests of the discovery cores: a client core wired to a server core.

The "store" here is a dict ``{(type_url, name): message}``; versions are
content hashes as in the real control plane.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from google.protobuf.message import Message

from octoproxy.discovery._xds_client import TYPE_ENDPOINTS, TYPE_ROUTES, DiscoveryError, XdsClient
from octoproxy.discovery._xds_server import LimitExceeded, XdsServerSession, check_address, check_endpoint, check_service_name
from octoproxy.controlplane._store import resource_version
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "octoproxy"


def cla(service: str, *addresses: str) -> pb.ClusterLoadAssignment:
    return pb.ClusterLoadAssignment(service=service, endpoints=[pb.Endpoint(address=a) for a in addresses])


class Pair:
    """A client core wired to a server core over a fake store."""

    def __init__(self, store: dict[tuple[str, str], Message] | None = None) -> None:
        self.store: dict[tuple[str, str], Message] = store if store is not None else {}
        self.client = XdsClient("node-1")
        self.server = XdsServerSession("s-")
        self.changes: list[tuple[str, str, bool]] = []
        self.sent_names: list[str] = []

    def lookup(self, type_url: str, name: str) -> tuple[str, bytes] | None:
        msg = self.store.get((type_url, name))
        if msg is None:
            return None
        body = msg.SerializeToString(deterministic=True)
        return resource_version(body), body

    def put(self, type_url: str, name: str, msg: Message | None) -> None:
        if msg is None:
            self.store.pop((type_url, name), None)
        else:
            self.store[(type_url, name)] = msg
        self.server.mark_changed(type_url, name)

    def to_server(self, messages: list[pb.ClientMessage]) -> None:
        for m in messages:
            self.server.on_request(pb.ClientMessage.FromString(m.SerializeToString()).discovery)

    def pump(self, validate: object = None, max_rounds: int = 10) -> list[pb.ServerMessage]:
        """Run server rounds until quiet; return the responses that went out."""
        out: list[pb.ServerMessage] = []
        for _ in range(max_rounds):
            dirty = self.server.take_dirty()
            if not dirty:
                return out
            for type_url, names in dirty.items():
                resp = self.server.make_response(type_url, {n: self.lookup(type_url, n) for n in names})
                if resp is None:
                    continue
                resp = pb.ServerMessage.FromString(resp.SerializeToString())
                out.append(resp)
                self.sent_names += [r.name for r in resp.response.resources] + list(resp.response.removed_resources)
                acks, changes = self.client.on_response(resp, validate)  # type: ignore[arg-type]
                self.changes += [(c.type_url, c.name, c.resource is not None) for c in changes]
                self.to_server(acks)
        raise AssertionError("server never went quiet")


def test_subscribe_ack() -> None:
    p = Pair({(TYPE_ENDPOINTS, "svc-a"): cla("svc-a", "10.0.0.1:9000")})
    msgs = p.client.subscribe(TYPE_ENDPOINTS, ["svc-a"])
    assert [m.discovery.subscribe for m in msgs] == [["svc-a"]]
    assert msgs[0].discovery.node_id == "node-1"
    p.to_server(msgs)
    [resp] = p.pump()
    assert resp.response.nonce == "s-1" and [r.name for r in resp.response.resources] == ["svc-a"]
    held = p.client.held(TYPE_ENDPOINTS)["svc-a"]
    assert isinstance(held, pb.ClusterLoadAssignment) and held.endpoints[0].address == "10.0.0.1:9000"
    assert p.server.pending_nonces == frozenset()  # ACKed
    assert p.client.is_resolved(TYPE_ENDPOINTS, "svc-a")
    assert p.changes == [(TYPE_ENDPOINTS, "svc-a", True)]
    # subscribing again is a no-op
    assert p.client.subscribe(TYPE_ENDPOINTS, ["svc-a"]) == []


def test_update_is_pushed_and_unchanged_content_is_not() -> None:
    p = Pair({(TYPE_ENDPOINTS, "a"): cla("a", "1.1.1.1:1")})
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a"]))
    p.pump()
    p.put(TYPE_ENDPOINTS, "a", cla("a", "1.1.1.1:1", "2.2.2.2:2"))
    [resp] = p.pump()
    assert len(p.client.held(TYPE_ENDPOINTS)["a"].endpoints) == 2  # type: ignore[attr-defined]
    p.put(TYPE_ENDPOINTS, "a", cla("a", "1.1.1.1:1", "2.2.2.2:2"))  # same content, same version
    assert p.pump() == []


def test_nack_keeps_last_good_state() -> None:
    p = Pair({(TYPE_ENDPOINTS, "a"): cla("a", "1.1.1.1:1"), (TYPE_ENDPOINTS, "b"): cla("b", "3.3.3.3:3")})
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a", "b"]))
    p.pump()
    good_a = p.client.versions(TYPE_ENDPOINTS)["a"]

    def reject_four(type_url: str, name: str, res: Message) -> None:
        if any(e.address.startswith("4.") for e in res.endpoints):  # type: ignore[attr-defined]
            raise ValueError("no 4.x please")

    p.put(TYPE_ENDPOINTS, "a", cla("a", "4.4.4.4:4"))
    p.put(TYPE_ENDPOINTS, "b", cla("b", "5.5.5.5:5"))  # same response: rejected with it
    p.changes.clear()
    [resp] = p.pump(validate=reject_four)
    assert p.client.versions(TYPE_ENDPOINTS)["a"] == good_a
    assert p.client.held(TYPE_ENDPOINTS)["b"].endpoints[0].address == "3.3.3.3:3"  # type: ignore[attr-defined]
    assert p.changes == [] and "no 4.x please" in p.client.last_error
    assert p.server.nacks == 1 and p.server.pending_nonces == frozenset()
    # the rejected version is not sent again ...
    p.server.mark_changed(TYPE_ENDPOINTS, "a")
    assert p.pump(validate=reject_four) == []
    # ... the next different one is
    p.put(TYPE_ENDPOINTS, "a", cla("a", "6.6.6.6:6"))
    p.pump(validate=reject_four)
    assert p.client.held(TYPE_ENDPOINTS)["a"].endpoints[0].address == "6.6.6.6:6"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: setattr(r.resources[0], "body", b"\xff\xff\xff"),
        lambda r: setattr(r.resources[0], "version", ""),
        lambda r: r.resources.add(name="a", version="x"),
        lambda r: r.removed_resources.append("a"),
        lambda r: setattr(r.resources[0], "body", cla("other").SerializeToString()),
        lambda r: setattr(r, "type_url", "octoproxy.v1.Nope"),
    ],
    ids=["undecodable", "no-version", "duplicate", "updated-and-removed", "wrong-service", "unknown-type"],
)
def test_malformed_responses_are_nacked(mutate: object) -> None:
    c = XdsClient("n")
    c.subscribe(TYPE_ENDPOINTS, ["a"])
    body = cla("a", "1.1.1.1:1").SerializeToString()
    msg = pb.ServerMessage(response=pb.DiscoveryResponse(type_url=TYPE_ENDPOINTS, nonce="n1"))
    msg.response.resources.add(name="a", version="v1", body=body)
    mutate(msg.response)  # type: ignore[operator]
    [nack], changes = c.on_response(msg)
    assert nack.discovery.response_nonce == "n1" and nack.discovery.HasField("error_detail")
    assert changes == [] and c.held(TYPE_ENDPOINTS) == {}


def test_removal_and_absent_resolution() -> None:
    p = Pair({(TYPE_ENDPOINTS, "a"): cla("a", "1.1.1.1:1")})
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a", "ghost"]))
    [resp] = p.pump()
    assert list(resp.response.removed_resources) == ["ghost"]  # does not exist: said so
    assert p.client.is_resolved(TYPE_ENDPOINTS, "ghost") and p.client.is_absent(TYPE_ENDPOINTS, "ghost")
    assert "ghost" not in p.client.held(TYPE_ENDPOINTS)
    p.put(TYPE_ENDPOINTS, "a", None)  # last endpoint went away: the service is removed
    [resp] = p.pump()
    assert list(resp.response.removed_resources) == ["a"] and not resp.response.resources
    assert p.client.held(TYPE_ENDPOINTS) == {} and (TYPE_ENDPOINTS, "a", False) in p.changes
    p.server.mark_changed(TYPE_ENDPOINTS, "a")  # removal is not repeated
    assert p.pump() == []
    p.put(TYPE_ENDPOINTS, "ghost", cla("ghost", "9.9.9.9:9"))  # appears later: pushed
    p.pump()
    assert "ghost" in p.client.held(TYPE_ENDPOINTS) and not p.client.is_absent(TYPE_ENDPOINTS, "ghost")


def test_reconnect_sends_versions_and_server_sends_only_differences() -> None:
    store: dict[tuple[str, str], Message] = {
        (TYPE_ENDPOINTS, "a"): cla("a", "1.1.1.1:1"),
        (TYPE_ENDPOINTS, "b"): cla("b", "2.2.2.2:2"),
        (TYPE_ENDPOINTS, "c"): cla("c", "3.3.3.3:3"),
        (TYPE_ROUTES, "a"): pb.RouteRules(service="a", rules=[pb.RouteRule(name="r1", timeout_ms=50)]),
    }
    p = Pair(store)
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a", "b", "c"]) + p.client.subscribe(TYPE_ROUTES, ["a"]))
    p.pump()
    held_before = p.client.versions(TYPE_ENDPOINTS)
    # while disconnected: b changes, c goes away, a is untouched
    store[(TYPE_ENDPOINTS, "b")] = cla("b", "2.2.2.2:2", "2.2.2.3:2")
    del store[(TYPE_ENDPOINTS, "c")]
    assert p.client.versions(TYPE_ENDPOINTS) == held_before  # nothing dropped meanwhile
    p.server = XdsServerSession("t-")  # a new connection (maybe another replica)
    p.sent_names.clear()
    hello = p.client.on_reconnect()
    assert {m.discovery.type_url for m in hello} == {TYPE_ENDPOINTS, TYPE_ROUTES}
    eds = next(m.discovery for m in hello if m.discovery.type_url == TYPE_ENDPOINTS)
    assert sorted(eds.subscribe) == ["a", "b", "c"] and dict(eds.initial_resource_versions) == held_before
    p.to_server(hello)
    p.pump()
    assert sorted(p.sent_names) == ["b", "c"]  # not "a", and no routes at all
    assert p.client.versions(TYPE_ENDPOINTS).keys() == {"a", "b"}
    assert len(p.client.held(TYPE_ENDPOINTS)["b"].endpoints) == 2  # type: ignore[attr-defined]


def test_initial_versions_only_count_on_first_request() -> None:
    s = XdsServerSession()
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=["a"]))
    s.on_request(
        pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=["b"], initial_resource_versions={"b": "v1"})
    )
    assert s.client_versions(TYPE_ENDPOINTS) == {}


def test_unsubscribed_resources_are_never_sent() -> None:
    store = {(TYPE_ENDPOINTS, n): cla(n, "1.1.1.1:1") for n in ("a", "b", "secret")}
    p = Pair(store)  # type: ignore[arg-type]
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a", "b"]))
    p.pump()
    assert not p.server.mark_changed(TYPE_ENDPOINTS, "secret")
    p.server.mark_all_changed()
    p.put(TYPE_ENDPOINTS, "secret", cla("secret", "6.6.6.6:6"))
    p.pump()
    p.to_server(p.client.unsubscribe(TYPE_ENDPOINTS, ["b"]))
    assert "b" not in p.client.held(TYPE_ENDPOINTS)
    p.put(TYPE_ENDPOINTS, "b", cla("b", "7.7.7.7:7"))
    p.pump()
    assert "secret" not in p.sent_names and p.sent_names.count("b") == 1
    # a response for a name we no longer want (in flight during unsubscribe) is dropped, still ACKed
    late = pb.ServerMessage(response=pb.DiscoveryResponse(type_url=TYPE_ENDPOINTS, nonce="x"))
    late.response.resources.add(name="b", version="v9", body=cla("b").SerializeToString())
    [ack], changes = p.client.on_response(late)
    assert not ack.discovery.HasField("error_detail") and changes == []
    assert "b" not in p.client.held(TYPE_ENDPOINTS)


def test_subscribe_during_lookup_is_not_lost() -> None:
    p = Pair({(TYPE_ENDPOINTS, "a"): cla("a", "1.1.1.1:1")})
    p.to_server(p.client.subscribe(TYPE_ENDPOINTS, ["a"]))
    dirty = p.server.take_dirty()
    p.put(TYPE_ENDPOINTS, "a", cla("a", "2.2.2.2:2"))  # changes while the shell looks "a" up
    p.server.make_response(TYPE_ENDPOINTS, {"a": (resource_version(b"old"), cla("a", "1.1.1.1:1").SerializeToString())})
    assert dirty and p.server.has_dirty()


def test_server_rejects_bad_requests() -> None:
    s = XdsServerSession()
    with pytest.raises(DiscoveryError):
        s.on_request(pb.DiscoveryRequest(type_url="nope", subscribe=["a"]))
    with pytest.raises(DiscoveryError):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=[""]))
    # an unknown nonce (older connection) is ignored
    out = s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, response_nonce="zz"))
    assert out.acked == "" and out.nack is None


def test_client_rejects_misuse() -> None:
    c = XdsClient("n")
    with pytest.raises(ValueError):
        c.subscribe("nope", ["a"])
    with pytest.raises(ValueError):
        c.subscribe(TYPE_ENDPOINTS, [""])
    with pytest.raises(ValueError):
        c.on_response(pb.ServerMessage(ack=pb.RegisterAck()))


def test_validation_helpers() -> None:
    assert check_service_name("user-service.v2") is None
    assert check_service_name("a/b") and check_service_name("") and check_service_name("x" * 300)
    assert check_endpoint(pb.Endpoint(address="10.0.0.1:9000")) is None
    assert check_endpoint(pb.Endpoint(address="[::1]:9000")) is None
    assert check_endpoint(pb.Endpoint(address="nope")) and check_endpoint(pb.Endpoint(address="a/b:1"))


def test_server_bounds_subscriptions_and_names() -> None:
    s = XdsServerSession(max_subscriptions=3)
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=["a", "b", "c"]))
    with pytest.raises(LimitExceeded, match="limit 3, raise it with --max-subscriptions"):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=["d"]))
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ENDPOINTS, subscribe=["d"], unsubscribe=["a"]))  # a swap is fine
    s.on_request(pb.DiscoveryRequest(type_url=TYPE_ROUTES, subscribe=["a", "b", "c"]))  # per type
    with pytest.raises(DiscoveryError, match="invalid service name"):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ROUTES, subscribe=["x" * 254]))
    with pytest.raises(DiscoveryError, match="invalid service name"):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ROUTES, subscribe=["../etc"]))
    with pytest.raises(DiscoveryError, match="node_id"):
        s.on_request(pb.DiscoveryRequest(type_url=TYPE_ROUTES, node_id="n" * 300))


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("10.0.0.1:9000", True), ("127.0.0.1:1", True), ("[::1]:9000", True), ("[2001:db8::1]:443", True),
        ("provider.internal:9000", True), ("169.254.169.254:80", False), ("169.254.0.1:9000", False),
        ("[fe80::1]:80", False), ("0.0.0.0:9000", False), ("[::]:9000", False), ("224.0.0.251:5353", False),
        ("[ff02::1]:9000", False), ("255.255.255.255:9", False), ("[::ffff:169.254.169.254]:80", False),
        ("10.0.0.1:0", False), ("10.0.0.1:70000", False), ("::1:80", False),
    ],
)
def test_endpoint_address_policy(address: str, ok: bool) -> None:
    assert (check_address(address) is None) == ok, check_address(address)


@pytest.mark.parametrize("name", ["discovery/_xds_client.py", "discovery/_xds_server.py"])
def test_cores_are_sans_io(name: str) -> None:
    text = (SRC / name).read_text()
    mods: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    assert not mods & {"trio", "socket", "asyncio", "selectors", "time", "trio_websocket"}
    assert "current_time(" not in text and "monotonic(" not in text
