"""Sans-IO tests of caller authorization and of the inbound guard (service, caller, credentials)."""

from __future__ import annotations

import os

import pytest

from conftest import IMPLS
from octoproxy import FrameType, Status
from octoproxy.core._balancer import Endpoint
from octoproxy.frame import FrameDecoder, encode_frame, encode_request
from octoproxy.core._authz import Policy, Rule, parse_rules, policy_from_config
from octoproxy.core._engine import DOWNSTREAM, UPSTREAM, Cluster, Engine, Link
from octoproxy.core._guard import InboundGuard, InboundPeer

NO_EXTENSIONS = os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0")

# ---------------------------------------------------------------- policy

RULES = [
    ("allow", ["billing", "web"], ["Get*", "List"]),
    ("deny", ["web"], ["GetSecret"]),
    ("allow", ["ops"], ["*"]),
    ("deny", ["*"], ["Admin*"]),
]


@pytest.mark.parametrize(
    ("default", "caller", "method", "status"),
    [
        ("deny", "billing", "GetUser", None),
        ("deny", "billing", "List", None),
        ("deny", "billing", "ListAll", Status.PERMISSION_DENIED),  # exact, not a prefix
        ("deny", "web", "GetSecret", Status.PERMISSION_DENIED),  # deny wins over the allow above it
        ("deny", "web", "GetUser", None),
        ("deny", "ops", "Anything", None),
        ("deny", "ops", "AdminReset", Status.PERMISSION_DENIED),  # deny "*" beats allow "*"
        ("deny", "stranger", "GetUser", Status.PERMISSION_DENIED),  # unknown caller, default deny
        ("allow", "stranger", "GetUser", None),  # unknown caller, default allow
        ("allow", "stranger", "AdminX", Status.PERMISSION_DENIED),
        ("deny", None, "GetUser", Status.UNAUTHENTICATED),  # no verified identity
        ("allow", None, "GetUser", None),
        ("allow", None, "AdminX", Status.UNAUTHENTICATED),  # deny "*" also covers the unverified
    ],
)
def test_decisions(default: str, caller: str | None, method: str, status: Status | None) -> None:
    policy = policy_from_config("accounts", default, RULES)
    verdict = policy.decide(caller, method)
    assert (verdict[0] if verdict else None) == status
    view = policy.for_caller(caller)  # the per-connection view agrees
    v2 = view.check(method.encode())
    assert (v2[0] if v2 else None) == status
    if verdict is not None:
        assert v2 == verdict


def test_reasons_name_the_caller_and_the_rule() -> None:
    policy = policy_from_config("accounts", "deny", RULES)
    status, reason = policy.decide("web", "GetSecret")  # type: ignore[misc]
    assert "'web'" in reason and "accounts/GetSecret" in reason and "rule #1" in reason and "deny" in reason
    status, reason = policy.decide("stranger", "Get")  # type: ignore[misc]
    assert "'stranger'" in reason and "default is 'deny'" in reason
    status, reason = policy.decide(None, "Get")  # type: ignore[misc]
    assert status == Status.UNAUTHENTICATED and "no verified caller identity" in reason


def test_uniform_views_need_no_lookup() -> None:
    policy = policy_from_config("accounts", "deny", RULES)
    assert policy.for_caller("billing").uniform is False  # method lists apply to it
    stranger = policy.for_caller("stranger")
    assert not stranger.uniform  # the deny "*" Admin* rule names everyone
    only_star = policy_from_config("s", "deny", [("allow", ["a"], ["*"])])
    view = only_star.for_caller("a")
    assert view.uniform and view.verdict is None
    denied = only_star.for_caller("b")
    assert denied.uniform and denied.check(b"X") is not None
    assert Policy("s").allows_everything and not only_star.allows_everything


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="action"):
        Rule("maybe", ("a",))
    with pytest.raises(ValueError, match="method pattern"):
        parse_rules([("allow", ["a"], ["G*t"])])
    with pytest.raises(ValueError, match="caller"):
        parse_rules([("allow", [], ["*"])])
    with pytest.raises(ValueError, match="default"):
        Policy("s", "sometimes")


# ---------------------------------------------------------------- the guard in the engine


def inbound_engine(service: str = "echo", policy: Policy | None = None) -> tuple[Engine, Link]:
    engine = Engine(caller=service)
    app = Cluster("local_app", "least_request", [Endpoint("unix:/app.sock")])
    up = Link(UPSTREAM, "app#0", endpoint=app.endpoints[0], cluster=app)
    app.add_link(up)
    engine.inbound_cluster = app
    engine.inbound_guard = InboundGuard(service, policy, engine.max_frame_size)
    return engine, up


def peer_link(caller: str | None) -> Link:
    link = Link(DOWNSTREAM, "inbound#1", listener="inbound")
    link.peer = InboundPeer(caller) if caller else None
    return link


def feed(engine: Engine, link: Link, data: bytes) -> int:
    buf = bytearray(data)
    return engine.feed(link, engine.new_scanner(link), buf, len(buf), 0.0)


def frames(link: Link) -> list:
    dec = FrameDecoder()
    dec.receive_data(bytes(link.out))
    link.out.clear()
    return list(dec)


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
@pytest.mark.parametrize("caller", [None, "billing"])
def test_other_service_is_no_route_and_never_forwarded(caller: str | None) -> None:
    engine, app = inbound_engine()
    d = peer_link(caller)
    feed(engine, d, encode_request(7, "admin-svc", "Reset", b"x") + encode_request(8, "echo", "ok", b"y"))
    (fwd,) = frames(app)
    assert fwd.service == "echo"
    (resp,) = frames(d)
    assert resp.stream_id == 7 and resp.header.status == Status.NO_ROUTE
    assert "serves 'echo', not 'admin-svc'" in resp.header.error
    assert engine.stats.rejected_count("no_route") == 1


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
def test_empty_service_serves_nothing() -> None:
    engine, app = inbound_engine(service="")
    d = peer_link(None)
    feed(engine, d, encode_request(1, "echo", "m"))
    assert not app.out
    (resp,) = frames(d)
    assert resp.header.status == Status.NO_ROUTE and "serves no service" in resp.header.error


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
def test_caller_comes_from_the_certificate_and_credentials_are_stripped() -> None:
    engine, app = inbound_engine()
    d = peer_link("billing")
    forged = encode_request(
        5, "echo", "Get", b"body", caller="root-admin-svc", metadata={"Authorization": "Bearer forged", "traceparent": "00-ab"}
    )
    plain = encode_request(6, "echo", "Get", b"b2", caller="root-admin-svc")
    feed(engine, d, forged + plain + encode_frame(FrameType.PING, 99))
    out = frames(app)
    assert [f.header.caller for f in out] == ["billing", "billing"]
    assert dict(out[0].header.metadata) == {"traceparent": "00-ab"}
    assert bytes(out[0].body) == b"body" and bytes(out[1].body) == b"b2"
    (pong,) = frames(d)
    assert pong.type == FrameType.PONG and pong.stream_id == 99


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
def test_plaintext_keeps_caller_but_strips_credentials() -> None:
    engine, app = inbound_engine()
    d = peer_link(None)
    feed(engine, d, encode_request(5, "echo", "Get", b"", caller="caller-app", metadata={"authorization": "x", "k": "v"}))
    (f,) = frames(app)
    assert f.header.caller == "caller-app"  # unverified in plaintext mode (documented)
    assert dict(f.header.metadata) == {"k": "v"}
    # a clean plaintext batch goes through unchanged
    raw = encode_request(9, "echo", "Get", b"z", caller="c")
    feed(engine, d, raw)
    (g,) = frames(app)
    assert g.raw[20:] == raw[20:]


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
def test_authz_in_the_engine() -> None:
    policy = policy_from_config("echo", "deny", [("allow", ["billing"], ["Get*"]), ("deny", ["billing"], ["GetSecret"])])
    engine, app = inbound_engine(policy=policy)
    d = peer_link("billing")
    feed(engine, d, encode_request(1, "echo", "GetUser") + encode_request(2, "echo", "GetSecret") + encode_request(3, "echo", "Put"))
    (ok,) = frames(app)
    assert ok.method == "GetUser"
    answers = {f.stream_id: f.header for f in frames(d)}
    assert answers[2].status == Status.PERMISSION_DENIED and "rule #1" in answers[2].error
    assert answers[3].status == Status.PERMISSION_DENIED and "default is 'deny'" in answers[3].error
    # no identity at all: UNAUTHENTICATED
    anon = peer_link(None)
    feed(engine, anon, encode_request(4, "echo", "GetUser"))
    (a,) = frames(anon)
    assert a.header.status == Status.UNAUTHENTICATED
    assert not app.out
    # a policy swap applies to the next read of a connection already open
    engine.inbound_guard.set_policy(policy_from_config("echo", "allow", []))
    feed(engine, d, encode_request(5, "echo", "Put"))
    (put,) = frames(app)
    assert put.method == "Put" and put.header.caller == "billing"


@pytest.mark.usefixtures("impl")  # compiled and twin guard, relay and scanner
def test_stamp_that_does_not_fit_is_refused() -> None:
    engine, app = inbound_engine()
    engine.max_frame_size = 4096
    engine.inbound_guard.max_frame_size = 4096
    d = peer_link("billing")
    body = bytes(4096 - 20 - len("echo") - len("m") - 4 - 2)  # exactly at the limit before the stamp
    req = encode_request(1, "echo", "m", body)
    assert len(req) <= 4096
    feed(engine, d, req)
    assert not app.out
    (resp,) = frames(d)
    assert resp.header.status == Status.FRAME_TOO_LARGE


# ---------------------------------------------------------------- the compiled loops and their twin


def test_compiled_guard_loaded() -> None:
    from octoproxy.core import _guard

    assert _guard.IMPLEMENTATION == ("python" if NO_EXTENSIONS else "cython")


BATCHES = [
    [encode_request(1, "echo", "m", b"x"), encode_request(2, "echo", "n", b"y" * 300, caller="c")],
    [encode_request(1, "echo", "m", b"x", metadata={"AuthoriZation": "t"}), encode_request(2, "echo", "m")],
    [encode_request(1, "echo", "m", b"\x0a\x0dauthorization in the body only")],
    [encode_frame(FrameType.PING, 5), encode_request(2, "other", "m"), encode_request(3, "echo", "m")],
    [encode_request(1, "echo", "m", bytes(4000))],  # too large for the stamp at a 4 KiB limit
    [encode_request(1, "echo", "m", oneway=True, metadata={"k": "authorizatioN"}), encode_request(2, "echo", "m", metadata={"authorization": ""})],
]


@pytest.mark.parametrize("batch", range(len(BATCHES)))
def test_twin_and_compiled_loops_agree(batch: int) -> None:
    data = bytearray(b"".join(BATCHES[batch]))
    stamp = InboundPeer("billing").stamp
    results = []
    for each in IMPLS.values():  # each guard over the scanner of its own implementation
        impl = each.guard
        sc = each.codec.Scanner(each.codec.RouteTable([("echo", "*", 0)]), 1 << 20, 64)
        n = sc.scan(data, 0, len(data))
        out = bytearray()
        stops = []
        i = 0
        while i < n:
            i = impl.stamp_frames(sc, data, i, n, stamp, out, 4096)
            stops.append(i)
            i += 1
        heads = [(f.stream_id, f.header.caller, dict(f.header.metadata)) for f in FrameDecoder_all(bytes(out))]
        cred = [impl.has_credential(data, 0, len(data))]
        results.append((impl.first_unclean(sc, data, 0, n), stops, heads, bytes(out), cred))
    assert all(r == results[0] for r in results), results


def FrameDecoder_all(data: bytes) -> list:
    dec = FrameDecoder()
    dec.receive_data(data)
    return list(dec)


def test_policy_from_a_pushed_message() -> None:
    from types import SimpleNamespace as NS

    from octoproxy.core._authz import policy_from_message

    msg = NS(service="echo", default_action="deny", rules=[NS(action="allow", callers=["web"], methods=[])])
    p = policy_from_message(msg, "echo", "v7")
    assert p.version == "v7" and p.decide("web", "Anything") is None and p.decide("x", "A") is not None
    assert policy_from_message(NS(service="", default_action="", rules=[]), "echo", "v1").allows_everything
    for bad in (
        NS(service="other", default_action="", rules=[]),
        NS(service="echo", default_action="maybe", rules=[]),
        NS(service="echo", default_action="", rules=[NS(action="allow", callers=[""], methods=[])]),
        NS(service="echo", default_action="", rules=[NS(action="allow", callers=["a"], methods=["G*t"])]),
        NS(service="echo", default_action="", rules=[NS(action="permit", callers=["a"], methods=[])]),
    ):
        with pytest.raises(ValueError):
            policy_from_message(bad, "echo", "v2")
