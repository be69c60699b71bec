"""The agent's supervision policy (sans-IO): the table, back-off, crash loops,
health thresholds, upgrades; and the docs generated from it."""

from __future__ import annotations

import pathlib
import re

import pytest

from octoproxy.agent import _policy
from octoproxy.protocol._errors import ConfigError
from octoproxy.agent._api import resolve_upgrade
from octoproxy.agent._config import UpgradeSettings, parse_agent_config, render_agent_reference
from octoproxy.agent._policy import (
    TRANSITIONS,
    Action,
    Event,
    Policy,
    PolicyConfig,
    PolicyError,
    State,
    backoff_delay,
    render_mermaid,
)

S, E, A = State, Event, Action
ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "agent.md"

# (state, event) -> (target, actions) under default conditions: a fresh policy,
# no earlier failures, the old process alive during an upgrade.
EXPECTED: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.STARTING, E.STARTED): (S.STARTING, ()),
    (S.STARTING, E.READY): (S.RUNNING, ()),
    (S.STARTING, E.EXITED): (S.BACKOFF, ()),
    (S.STARTING, E.TIMER): (S.RESTARTING, (A.TERMINATE,)),
    (S.STARTING, E.STOP): (S.STOPPED, (A.TERMINATE,)),
    (S.RUNNING, E.HEALTH_OK): (S.RUNNING, ()),
    (S.RUNNING, E.HEALTH_FAILED): (S.UNHEALTHY, ()),
    (S.RUNNING, E.EXITED): (S.BACKOFF, ()),
    (S.RUNNING, E.UPGRADE_REQUESTED): (S.UPGRADING, (A.SPAWN_UPGRADE,)),
    (S.RUNNING, E.STOP): (S.STOPPED, (A.TERMINATE,)),
    (S.UNHEALTHY, E.HEALTH_OK): (S.RUNNING, ()),
    (S.UNHEALTHY, E.HEALTH_FAILED): (S.UNHEALTHY, ()),
    (S.UNHEALTHY, E.EXITED): (S.BACKOFF, ()),
    (S.UNHEALTHY, E.UPGRADE_REQUESTED): (S.UPGRADING, (A.SPAWN_UPGRADE,)),
    (S.UNHEALTHY, E.STOP): (S.STOPPED, (A.TERMINATE,)),
    (S.RESTARTING, E.STARTED): (S.RESTARTING, ()),
    (S.RESTARTING, E.READY): (S.RESTARTING, ()),
    (S.RESTARTING, E.HEALTH_OK): (S.RESTARTING, ()),
    (S.RESTARTING, E.HEALTH_FAILED): (S.RESTARTING, ()),
    (S.RESTARTING, E.EXITED): (S.BACKOFF, ()),
    (S.RESTARTING, E.STOP): (S.STOPPED, (A.TERMINATE,)),
    (S.UPGRADING, E.STARTED): (S.UPGRADING, ()),
    (S.UPGRADING, E.HEALTH_OK): (S.UPGRADING, ()),
    (S.UPGRADING, E.HEALTH_FAILED): (S.UPGRADING, ()),
    (S.UPGRADING, E.EXITED): (S.UPGRADING, ()),
    (S.UPGRADING, E.UPGRADE_READY): (S.RUNNING, (A.COMMIT_UPGRADE,)),
    (S.UPGRADING, E.UPGRADE_FAILED): (S.RUNNING, (A.ABORT_UPGRADE,)),
    (S.UPGRADING, E.TIMER): (S.RUNNING, (A.ABORT_UPGRADE,)),
    (S.UPGRADING, E.STOP): (S.STOPPED, (A.ABORT_UPGRADE, A.TERMINATE)),
    (S.BACKOFF, E.TIMER): (S.STARTING, (A.SPAWN,)),
    (S.BACKOFF, E.STOP): (S.STOPPED, ()),
    (S.CRASH_LOOP, E.STOP): (S.STOPPED, ()),
}

CONFIG = PolicyConfig(
    failure_threshold=3, backoff_initial=0.2, backoff_max=10.0, crash_loop_limit=5,
    crash_loop_window=60.0, start_timeout=15.0, upgrade_timeout=15.0,
)  # fmt: skip


def policy_in(state: State, now: float = 100.0) -> Policy:
    p = Policy(CONFIG)
    p.start(now)
    p.state = state
    p.deadline = now  # a TIMER at `now` is due
    return p


def test_core_is_sans_io() -> None:
    text = pathlib.Path(_policy.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(trio|socket|asyncio|time)\b", text, re.M)
    for clock in ("time.time(", "time.monotonic(", "current_time(", "perf_counter("):
        assert clock not in text


def test_expected_covers_exactly_the_table() -> None:
    table = {(s, e) for s, row in TRANSITIONS.items() for e in row}
    assert table == set(EXPECTED)
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.name)
def test_every_state_event_pair(state: State, event: Event) -> None:
    p = policy_in(state)
    if (state, event) not in EXPECTED:
        assert not p.accepts(event)
        with pytest.raises(PolicyError, match=f"no transition from {state.name}"):
            p.handle(event, 100.0, code=1)
        assert p.state is state  # an error changes nothing
        return
    assert p.accepts(event)
    target, actions = EXPECTED[(state, event)]
    d = p.handle(event, 100.0, code=1)
    assert (d.old, d.state, d.event, d.actions) == (state, target, event, actions)
    assert p.state is target


def test_start_spawns_once() -> None:
    p = Policy(CONFIG)
    d = p.start(0.0)
    assert (d.state, d.actions, p.deadline) == (S.STARTING, (A.SPAWN,), 15.0)
    with pytest.raises(PolicyError):
        p.start(1.0)


def test_timer_before_deadline_or_without_one_is_an_error() -> None:
    p = Policy(CONFIG)
    p.start(0.0)
    with pytest.raises(PolicyError, match="before its deadline"):
        p.handle(E.TIMER, 14.9)
    assert p.handle(E.READY, 1.0).state is S.RUNNING
    assert p.deadline is None


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.2), (6, 6.4), (7, 10.0), (8, 10.0), (1000, 10.0)],
)
def test_backoff_delay(failures: int, delay: float) -> None:
    assert backoff_delay(failures, 0.2, 10.0) == pytest.approx(delay)


def test_backoff_delay_rejects_zero() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, 0.2, 10.0)


def crash(p: Policy, now: float, code: int = 2) -> float | None:
    """STARTING -> exited; returns the back-off delay (None if crash-looped)."""
    d = p.handle(E.EXITED, now, code=code)
    if d.state is S.CRASH_LOOP:
        return None
    assert d.state is S.BACKOFF and p.deadline == pytest.approx(now + (d.delay or 0))
    return d.delay


def test_backoff_sequence_doubles_up_to_the_cap_and_counts_restarts() -> None:
    p = Policy(PolicyConfig(backoff_initial=0.5, backoff_max=3.0, crash_loop_limit=100))
    now = 0.0
    p.start(now)
    delays = []
    for _ in range(6):
        delay = crash(p, now)
        assert delay is not None
        delays.append(delay)
        now += delay
        d = p.handle(E.TIMER, now)
        assert (d.state, d.actions) == (S.STARTING, (A.SPAWN,))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert p.restarts == 6


def test_crash_loop_after_limit_failures_within_the_window() -> None:
    p = Policy(CONFIG)
    now = 0.0
    p.start(now)
    for i in range(4):
        delay = crash(p, now)
        assert delay is not None, f"crash loop too early, after {i + 1} failures"
        now += delay
        p.handle(E.TIMER, now)
    d = p.handle(E.EXITED, now, code=2)
    assert d.state is S.CRASH_LOOP and p.deadline is None
    assert d.reason == "crash loop: 5 failures within 60.0s (last: exited with code 2)"
    assert p.crash_reason == d.reason
    for event in Event:  # nothing but STOP gets it out
        if event is not E.STOP:
            assert not p.accepts(event)
    assert p.handle(E.STOP, now).state is S.STOPPED and p.state.terminal


def test_no_crash_loop_when_failures_are_spread_out() -> None:
    p = Policy(CONFIG)
    now = 0.0
    p.start(now)
    for _ in range(20):  # one crash every 20 s: at most 3 within a 60 s window
        delay = crash(p, now)
        assert delay is not None and delay <= 0.8
        now += 20.0
        p.handle(E.TIMER, now)
    assert p.state is S.STARTING and p.recent_failures(now) == 2
    # failures once spread out are forgotten: back-off starts over
    assert crash(p, now + 61.0) == 0.2


def test_failures_in_any_state_count_towards_the_crash_loop() -> None:
    p = Policy(PolicyConfig(crash_loop_limit=3))
    p.start(0.0)
    p.handle(E.READY, 0.1)
    p.handle(E.EXITED, 1.0, code=-9)  # RUNNING -> BACKOFF
    p.handle(E.TIMER, 2.0)
    p.handle(E.TIMER, 17.0)  # not ready within start_timeout -> RESTARTING
    assert p.handle(E.EXITED, 17.5, code=-15).state is S.BACKOFF
    p.handle(E.TIMER, 20.0)
    d = p.handle(E.EXITED, 21.0, code=None)
    assert d.state is S.CRASH_LOOP and "(last: could not be started)" in d.reason


def test_health_threshold_consecutive_failures() -> None:
    p = Policy(CONFIG)
    p.start(0.0)
    p.handle(E.READY, 1.0)
    assert p.handle(E.HEALTH_FAILED, 2.0).state is S.UNHEALTHY
    assert p.handle(E.HEALTH_FAILED, 3.0).state is S.UNHEALTHY
    assert p.handle(E.HEALTH_OK, 4.0).state is S.RUNNING  # resets the count
    assert p.health_failures == 0
    assert p.handle(E.HEALTH_FAILED, 5.0).state is S.UNHEALTHY
    assert p.handle(E.HEALTH_FAILED, 6.0).state is S.UNHEALTHY
    d = p.handle(E.HEALTH_FAILED, 7.0, reason="/healthz: no answer")
    assert (d.state, d.actions) == (S.RESTARTING, (A.TERMINATE,))
    assert d.reason == "3 liveness checks failed in a row (/healthz: no answer)"
    assert p.handle(E.HEALTH_FAILED, 7.5).state is S.RESTARTING  # late reports: ignored
    d = p.handle(E.EXITED, 8.0, code=-15)
    assert d.state is S.BACKOFF and d.delay == 0.2


def test_threshold_of_one_restarts_at_the_first_failure() -> None:
    p = Policy(PolicyConfig(failure_threshold=1))
    p.start(0.0)
    p.handle(E.READY, 1.0)
    assert p.handle(E.HEALTH_FAILED, 2.0).state is S.RESTARTING


def upgrading(now: float = 10.0) -> Policy:
    p = Policy(CONFIG)
    p.start(0.0)
    p.handle(E.READY, 1.0)
    d = p.handle(E.UPGRADE_REQUESTED, now)
    assert (d.state, d.actions, p.deadline) == (S.UPGRADING, (A.SPAWN_UPGRADE,), now + 15.0)
    assert not p.accepts(E.UPGRADE_REQUESTED)  # one at a time
    return p


def test_upgrade_success_commits_and_counts_a_generation() -> None:
    p = upgrading()
    p.handle(E.STARTED, 10.1)
    p.handle(E.EXITED, 11.0, code=0)  # the old one drains and leaves: expected
    d = p.handle(E.UPGRADE_READY, 11.5)
    assert (d.state, d.actions, d.outcome) == (S.RUNNING, (A.COMMIT_UPGRADE,), "succeeded")
    assert p.generation == 1 and p.recent_failures(11.5) == 0 and p.deadline is None


@pytest.mark.parametrize("event", [E.UPGRADE_FAILED, E.TIMER])
def test_upgrade_failure_rolls_back_while_the_old_one_lives(event: Event) -> None:
    p = upgrading()
    d = p.handle(event, 25.0, reason="candidate exited with code 2 before it was ready")
    assert (d.state, d.actions, d.outcome) == (S.RUNNING, (A.ABORT_UPGRADE,), "rolled_back")
    if event is E.TIMER:
        assert d.reason == "candidate not ready within upgrade_timeout (15.0s)"
    assert p.generation == 0 and p.recent_failures(25.0) == 0


def test_upgrade_failure_after_the_old_one_left_restarts_from_scratch() -> None:
    p = upgrading()
    p.handle(E.EXITED, 11.0, code=0)
    d = p.handle(E.UPGRADE_FAILED, 12.0, reason="candidate exited with code 1 before it was ready")
    assert (d.state, d.actions, d.outcome) == (S.BACKOFF, (A.ABORT_UPGRADE,), "failed")
    assert "the old process had exited too" in d.reason
    assert p.handle(E.TIMER, 12.0 + (d.delay or 0)).actions == (A.SPAWN,)
    # the next upgrade starts with the old process alive again
    p.handle(E.READY, 13.0)
    p.handle(E.UPGRADE_REQUESTED, 14.0)
    assert p.handle(E.UPGRADE_FAILED, 15.0).outcome == "rolled_back"


def test_stop_during_upgrade_aborts_it() -> None:
    p = upgrading()
    d = p.handle(E.STOP, 11.0)
    assert (d.state, d.actions, d.outcome) == (S.STOPPED, (A.ABORT_UPGRADE, A.TERMINATE), "aborted")


def test_mermaid_diagram_names_every_state_and_move() -> None:
    text = render_mermaid()
    assert text.startswith("stateDiagram-v2\n    [*] --> STARTING")
    for state in State:
        assert state.name in text
    assert "UNHEALTHY --> RESTARTING: health_failed [threshold] / terminate" in text
    assert "UPGRADING --> RUNNING: upgrade_ready / commit_upgrade<br/>" in text
    arrows = sum(len(edges) for row in TRANSITIONS.values() for edges in row.values())
    assert sum(line.count("<br/>") + 1 for line in text.splitlines()[2:-1]) == arrows


def _between(text: str, begin: str, end: str) -> str:
    start = text.index(begin) + len(begin)
    return text[start : text.index(end, start)]


def test_docs_state_diagram_is_generated_from_the_table() -> None:
    block = _between(DOC.read_text(), "<!-- BEGIN STATE DIAGRAM -->", "<!-- END STATE DIAGRAM -->")
    assert block == f"\n```mermaid\n{render_mermaid()}```\n", "run: python tests/test_agent_policy.py"


def test_docs_config_reference_is_generated_from_the_schema() -> None:
    block = _between(DOC.read_text(), "<!-- BEGIN CONFIG -->", "<!-- END CONFIG -->")
    assert block == f"\n{render_agent_reference()}\n", "run: python tests/test_agent_policy.py"


# ------------------------------------------------------------ POST /upgrade allow-list


def _allowed(tmp: pathlib.Path) -> tuple[UpgradeSettings, pathlib.Path]:
    (tmp / "proxy.toml").write_text("")
    (tmp / "other.toml").write_text("")
    (tmp / "d").mkdir()
    (tmp / "d" / "ok.toml").write_text("")
    (tmp / "d" / "loop.toml").symlink_to(tmp / "other.toml")
    (tmp / "d" / "inside-link.toml").symlink_to(tmp / "d" / "ok.toml")
    cfg = parse_agent_config(
        {"agent": {"proxy_config": "proxy.toml"}, "upgrade": {"versions": {"v2": ["/opt/v2/octoproxy", "run"]}, "config_dir": "d"}},
        base_dir=tmp,
    )
    return cfg.upgrade, tmp / "proxy.toml"


def test_upgrade_body_names_a_version_never_a_command(tmp_path: pathlib.Path) -> None:
    allowed, current = _allowed(tmp_path)
    assert resolve_upgrade(b"", allowed, current) == (None, None, None)
    assert resolve_upgrade(b'{"version": "v2"}', allowed, current) == ("v2", ("/opt/v2/octoproxy", "run"), None)
    for body, reason in [
        (b'{"command": ["/bin/sh", "-c", "id"]}', '"command" is not accepted'),
        (b'{"version": "v3"}', "'v3' is not in the agent's [upgrade] versions (v2)"),
        (b'{"version": 2}', "is not in the agent's [upgrade] versions"),
        (b"[1]", "must be a JSON object"),
        (b"{", "not JSON"),
        (b'{"config": ""}', "expected a non-empty path string"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            resolve_upgrade(body, allowed, current)
    none = parse_agent_config({"agent": {"proxy_config": "p.toml"}}).upgrade
    with pytest.raises(ValueError, match=re.escape("(none configured)")):
        resolve_upgrade(b'{"version": "v2"}', none, current)


def test_upgrade_config_must_be_allowed_after_resolving_symlinks(tmp_path: pathlib.Path) -> None:
    allowed, current = _allowed(tmp_path)
    d = tmp_path / "d"
    assert resolve_upgrade(b'{"config": "proxy.toml"}', allowed, current)[2] == current.resolve()  # the current one
    assert resolve_upgrade(b'{"config": "d/ok.toml"}', allowed, current)[2] == (d / "ok.toml").resolve()
    assert resolve_upgrade(b'{"config": "d/inside-link.toml"}', allowed, current)[2] == (d / "ok.toml").resolve()
    for path, reason in [
        ("other.toml", "is not allowed"),
        ("d/loop.toml", "is not allowed"),  # a symlink out of config_dir
        ("d/../other.toml", "is not allowed"),
        (str(tmp_path / "other.toml"), "is not allowed"),
        ("d", "is not a regular file"),
        ("d/missing.toml", "No such file or directory"),
        ("/etc/passwd", "is not allowed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            resolve_upgrade(f'{{"config": "{path}"}}'.encode(), allowed, current)
    listed = parse_agent_config({"agent": {"proxy_config": "proxy.toml"}, "upgrade": {"configs": ["other.toml"]}}, base_dir=tmp_path)
    assert resolve_upgrade(b'{"config": "other.toml"}', listed.upgrade, current)[2] == (tmp_path / "other.toml").resolve()


def test_upgrade_table_is_validated() -> None:
    for upgrade, msg in [
        ({"versions": {"v": "octoproxy run"}}, "upgrade.versions.v: expected a non-empty array of non-empty strings"),
        ({"versions": {"v": []}}, "upgrade.versions.v: expected a non-empty array"),
        ({"configs": "a.toml"}, "upgrade.configs: expected an array of path strings"),
        ({"command": ["x"]}, "upgrade.command: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            parse_agent_config({"agent": {"proxy_config": "p.toml"}, "upgrade": upgrade})


def regenerate_docs() -> None:
    """Rewrite the generated blocks of docs/agent.md."""
    text = DOC.read_text()
    for begin, end, body in [
        ("<!-- BEGIN STATE DIAGRAM -->", "<!-- END STATE DIAGRAM -->", f"\n```mermaid\n{render_mermaid()}```\n"),
        ("<!-- BEGIN CONFIG -->", "<!-- END CONFIG -->", f"\n{render_agent_reference()}\n"),
    ]:
        head, rest = text.split(begin, 1)
        text = head + begin + body + end + rest.split(end, 1)[1]
    DOC.write_text(text)


if __name__ == "__main__":
    regenerate_docs()
