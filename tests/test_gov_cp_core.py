"""The GovernancePolicy resource's sans-IO parts and its storage (embedded, etcd).

Validation and canonical form, versions and history, how a proxy folds route
rules into the control plane's policy set, the warm-up clock conversion, the
warm-up stamp at registration, the NACK of an invalid delivery, and both
stores keeping records (snapshot restart; etcd list, watch, compare-and-swap).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from octoproxy.discovery._governance import (
    HISTORY_MAX,
    HISTORY_MAX_BYTES,
    MAX_POLICY_JSON,
    HeldPolicies,
    canonical_policy,
    control_plane_policy_set,
    current_policy,
    effective_policy_set,
    policy_from_message,
    record_delete,
    record_set,
)
from octoproxy.discovery._xds_client import TYPE_GOVERNANCE, XdsClient
from octoproxy.controlplane import EmbeddedStore, EtcdStore
from octoproxy.controlplane._store import RegistryView, stamp_warmup
from octoproxy.governance import LocalityMode, PolicyError, ServicePolicy, parse_policy_set
from octoproxy.protocol.proto import octoproxy_discovery_pb2 as pb
from test_controlplane import wait_for
from test_etcd import Member, etcd_bin, etcd_single  # noqa: F401  (fixtures)

RETRY = {"retry": {"max_attempts": 3}}


# ---------------------------------------------------------------- validation, canonical form
def test_canonical_form_spells_out_defaults_and_parses_back_equal() -> None:
    text, policy = canonical_policy("echo", {"retry": {"max_attempts": 3}, "breaker": {}})
    doc = json.loads(text)
    assert doc["breaker"] == {"max_connections": 1024, "max_pending": 1024, "max_requests": 1024, "max_retries": 3}
    assert doc["retry"]["max_attempts"] == 3 and doc["retry"]["budget"]["ratio"] == 0.2
    assert list(doc) == sorted(doc)
    again, policy2 = canonical_policy("echo", doc)
    assert again == text and policy2 == policy  # idempotent: equal policies, equal text (same resource version)
    assert parse_policy_set({"services": {"echo": doc}}).services["echo"] == policy


def test_an_empty_policy_is_kept_as_governing_nothing() -> None:
    text, policy = canonical_policy("echo", {})
    assert text == "{}" and policy == ServicePolicy(service="echo") and policy.empty


def test_every_error_is_listed_with_its_key() -> None:
    with pytest.raises(PolicyError) as info:
        canonical_policy("echo", {"retry": {"max_attempts": 0}, "breaker": {"max_requets": 5}, "nope": 1})
    errors = info.value.errors
    assert "governance.services.echo.retry.max_attempts: expected 1..10, got 0" in errors
    assert "governance.services.echo.breaker.max_requets: unknown key" in errors
    assert "governance.services.echo.nope: unknown key" in errors
    with pytest.raises(PolicyError, match="expected a table"):
        canonical_policy("echo", [1, 2])


def test_a_policy_over_the_size_limit_is_refused() -> None:
    rules = [{"name": f"r{i}", "match_metadata": {"k": "v" * 200}} for i in range(MAX_POLICY_JSON // 200)]
    with pytest.raises(PolicyError, match="more than the"):
        canonical_policy("echo", {"routing": {"rules": rules}})


def test_delivered_policy_checks() -> None:
    ok = pb.GovernancePolicy(service="echo", version=4, policy_json=json.dumps(RETRY))
    assert policy_from_message(ok).retry is not None
    for body, match in (("{not json", "not valid JSON"), ("[" * 100_000, "not valid JSON"), ("3", "expected a table"),
                        (json.dumps({"retry": {"max_attempts": 99}}), "max_attempts"),
                        ("x" * (MAX_POLICY_JSON + 1), "more than the")):  # fmt: skip
        with pytest.raises(PolicyError, match=match):
            policy_from_message(pb.GovernancePolicy(service="echo", version=5, policy_json=body))


def test_an_invalid_delivery_is_nacked_with_every_error_and_changes_nothing() -> None:
    core = XdsClient("caller")
    core.subscribe(TYPE_GOVERNANCE, ["echo"])

    def validate(type_url: str, name: str, res: object) -> None:
        assert isinstance(res, pb.GovernancePolicy)
        policy_from_message(res)

    def response(nonce: str, body: object) -> pb.ServerMessage:
        msg = pb.GovernancePolicy(service="echo", version=1, policy_json=json.dumps(body))
        res = pb.Resource(name="echo", version=nonce, body=msg.SerializeToString())
        return pb.ServerMessage(response=pb.DiscoveryResponse(type_url=TYPE_GOVERNANCE, nonce=nonce, resources=[res]))

    _, changes = core.on_response(response("n1", RETRY), validate)
    assert [c.name for c in changes] == ["echo"]
    out, changes = core.on_response(response("n2", {"retry": {"max_attempts": 0}, "breaker": {"x": 1}}), validate)
    assert changes == [] and core.versions(TYPE_GOVERNANCE) == {"echo": "n1"}
    nack = out[0].discovery.error_detail.message
    assert "retry.max_attempts" in nack and "breaker.x: unknown key" in nack


# ---------------------------------------------------------------- versions and history
def test_versions_are_never_reused_and_history_is_bounded() -> None:
    rec = pb.GovernancePolicyRecord(service="echo")
    assert current_policy(rec) is None
    with pytest.raises(KeyError):
        record_delete(rec, 1)
    rec = record_set(rec, "echo", '{"a":1}', 10)
    assert (rec.current, rec.last_version) == (1, 1)
    assert record_set(rec, "echo", '{"a":1}', 11) == rec  # same text: no new version
    rec = record_delete(rec, 12)
    assert (rec.current, rec.last_version, rec.history[-1].note) == (0, 2, "delete")
    assert current_policy(rec) is None
    rec = record_set(rec, "echo", '{"a":1}', 13)  # the same text again after a delete: a new version
    assert current_policy(rec) == pb.GovernancePolicy(service="echo", version=3, policy_json='{"a":1}')
    for i in range(HISTORY_MAX + 5):
        rec = record_set(rec, "echo", f'{{"a":{i + 2}}}', 20 + i)
    assert len(rec.history) == HISTORY_MAX and rec.history[-1].version == rec.current == rec.last_version
    assert current_policy(rec) is not None and current_policy(rec).policy_json == f'{{"a":{HISTORY_MAX + 6}}}'  # type: ignore[union-attr]


def test_history_is_bounded_in_bytes_too_and_keeps_the_current_version() -> None:
    rec = pb.GovernancePolicyRecord(service="echo")
    big = MAX_POLICY_JSON - 16
    for i in range(8):
        rec = record_set(rec, "echo", f'{{"x":"{i}{"y" * big}"}}', i)
    assert sum(len(v.policy_json) for v in rec.history) <= HISTORY_MAX_BYTES
    assert len(rec.history) == HISTORY_MAX_BYTES // MAX_POLICY_JSON and rec.history[-1].version == rec.current == 8
    assert current_policy(rec) is not None


# ---------------------------------------------------------------- route rules folded in
def _rules(*names: str, fallback: bool = False) -> tuple[str, pb.RouteRules]:
    rules = pb.RouteRules(service="echo", rules=[pb.RouteRule(name=n, fallback_to_all=fallback) for n in names])
    return "abcdef0123456789", rules


def test_route_rules_become_the_routing_of_a_policy_without_one() -> None:
    assert control_plane_policy_set({}) is None
    assert control_plane_policy_set({"echo": HeldPolicies()}) is None
    only_rules = control_plane_policy_set({"echo": HeldPolicies(routes=_rules("a", "b"))})
    assert only_rules is not None and only_rules.version == "echo=-+routes:abcdef012345"
    routing = only_rules.services["echo"].routing
    assert routing is not None and [r.name for r in routing.rules] == ["a", "b"]
    assert routing.rules[0].force  # no fallback_to_all: an empty subset is NO_ROUTE (docs/control-plane.md)
    assert routing.locality is LocalityMode.PREFER  # every other routing key at its default

    retry = policy_from_message(pb.GovernancePolicy(service="echo", version=2, policy_json=json.dumps(RETRY)))
    merged = control_plane_policy_set({"echo": HeldPolicies(policy=(2, retry), routes=_rules("a", fallback=True))})
    assert merged is not None and merged.version == "echo=2+routes:abcdef012345"
    p = merged.services["echo"]
    assert p.retry == retry.retry and p.routing is not None and not p.routing.rules[0].force

    own = policy_from_message(pb.GovernancePolicy(service="echo", version=3, policy_json='{"routing": {"locality": "off"}}'))
    held = HeldPolicies(policy=(3, own), routes=_rules("a"))
    pay = HeldPolicies(policy=(1, ServicePolicy("pay")), policy_resource_version="0123456789abcdef")
    wins = control_plane_policy_set({"echo": held, "pay": pay})
    assert held.routes_ignored and wins is not None and wins.version == "echo=3;pay=1#01234567"
    # a control plane that lost its store numbers from 1 again: the content hash keeps versions apart
    other = control_plane_policy_set({"pay": replace(pay, policy_resource_version="fedcba9876543210")})
    assert other is not None and other.version == "pay=1#fedcba98"
    assert wins.services["echo"] == own and wins.services["pay"].empty  # an empty policy still overrides the local one


def test_pushed_policies_replace_the_local_table_service_by_service() -> None:
    local = parse_policy_set({"version": "L", "services": {"echo": {"tracing": {}}, "pay": {"breaker": {}}}})
    pushed = control_plane_policy_set({"echo": HeldPolicies(policy=(2, ServicePolicy("echo")))})
    assert effective_policy_set(None, None) is None
    assert effective_policy_set(local, None) is local and effective_policy_set(None, pushed) is pushed
    both = effective_policy_set(local, pushed)
    assert both is not None and both.version == "local:L|echo=2"
    assert both.services["echo"].empty and both.services["pay"] == local.services["pay"]


# ---------------------------------------------------------------- warm-up stamp
def test_warmup_stamp_keeps_the_first_start_of_an_address() -> None:
    view, now = RegistryView(), 1_700_000_000.0
    ep = pb.Endpoint(address="10.0.0.1:9000")
    stamp_warmup(view, "echo", ep, now)
    assert ep.warmup_start_unix_ms == 1_700_000_000_000  # no start given: now
    view.set_endpoint("echo", ep)
    again = pb.Endpoint(address="10.0.0.1:9000", warmup_start_unix_ms=1_700_000_050_000)
    stamp_warmup(view, "echo", again, now + 60)  # a reconnect / hot restart of the same address: warm already
    assert again.warmup_start_unix_ms == 1_700_000_000_000
    own = pb.Endpoint(address="10.0.0.2:9000", warmup_start_unix_ms=1_699_999_990_000)
    stamp_warmup(view, "echo", own, now)  # the provider's own start (its app came up then) is taken
    assert own.warmup_start_unix_ms == 1_699_999_990_000
    future = pb.Endpoint(address="10.0.0.3:9000", warmup_start_unix_ms=1_800_000_000_000)
    stamp_warmup(view, "echo", future, now)
    assert future.warmup_start_unix_ms == 1_700_000_000_000


# ---------------------------------------------------------------- stores
def _record(text: str = '{"breaker":{}}') -> pb.GovernancePolicyRecord:
    return record_set(pb.GovernancePolicyRecord(service="echo"), "echo", text, 1)


async def test_embedded_snapshot_keeps_policies_and_history(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    async with trio.open_nursery() as nursery:
        s1 = EmbeddedStore(path, snapshot_delay=0.01)
        await nursery.start(s1.run)
        await s1.update_governance("echo", lambda r: record_set(r, "echo", '{"breaker":{}}', 1))
        await s1.update_governance("echo", lambda r: record_set(r, "echo", '{"retry":{}}', 2))
        before = await s1.get_governance("echo")
        assert before is not None and before[1].version == 2
        await wait_for(lambda: os.path.exists(path) and "retry" in open(path).read())
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        s2 = EmbeddedStore(path, snapshot_delay=0.01)
        await nursery.start(s2.run)
        assert await s2.get_governance("echo") == before  # same content, same resource version
        assert len(s2.view.governance["echo"].history) == 2
        _, new = await s2.update_governance("echo", lambda r: record_delete(r, 3))
        assert await s2.get_governance("echo") is None and new.last_version == 3  # history stays
        nursery.cancel_scope.cancel()


@pytest.mark.etcd
async def test_etcd_store_lists_watches_and_swaps_policies(etcd_single: list[Member]) -> None:  # noqa: F811
    url = etcd_single[0].client_url
    async with trio.open_nursery() as nursery:
        a, b = EtcdStore([url], prefix="/gov1/"), EtcdStore([url], prefix="/gov1/")
        await nursery.start(a.run)
        await a.update_governance("echo", lambda r: record_set(r, "echo", '{"breaker":{}}', 1))
        await nursery.start(b.run)  # lists what exists
        assert b.view.governance["echo"].current == 1
        # two replicas writing at once: both get a version of their own (compare-and-swap)
        async with trio.open_nursery() as writers:
            for store, text in ((a, '{"retry":{}}'), (b, '{"tracing":{}}')):
                writers.start_soon(store.update_governance, "echo", lambda r, t=text: record_set(r, "echo", t, 2))
        await wait_for(lambda: a.view.governance["echo"].current == 3 == b.view.governance["echo"].current)
        texts = {v.policy_json for v in a.view.governance["echo"].history}
        assert texts == {'{"breaker":{}}', '{"retry":{}}', '{"tracing":{}}'}
        assert await a.get_governance("echo") == await b.get_governance("echo")
        await a.update_governance("echo", lambda r: record_delete(r, 4))
        await wait_for(lambda: b.view.lookup(TYPE_GOVERNANCE, "echo") is None)
        nursery.cancel_scope.cancel()
