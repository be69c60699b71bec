"""The hot-restart state machines, from their tables: every state x event, and the docs."""

from __future__ import annotations

import os
import pathlib

import pytest

from octoproxy.core._hot_restart import (
    CHILD,
    DRAINING_STATES,
    HANDED_OVER_STATES,
    PARENT,
    PARENT_ALIVE_STATES,
    ChildAction,
    ChildEvent,
    ChildState,
    HotRestartError,
    IllegalEvent,
    Machine,
    ParentAction,
    ParentEvent,
    ParentState,
    decode,
    encode,
    refusal,
    render_markdown,
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "hot-restart.md"
BEGIN = "<!-- BEGIN GENERATED: hot-restart tables -->"
END = "<!-- END GENERATED: hot-restart tables -->"

PS, PE, PA = ParentState, ParentEvent, ParentAction
CS, CE, CA = ChildState, ChildEvent, ChildAction

#: the parent's table, written out again: a change to it must be made twice, on purpose
EXPECTED_PARENT = {
    (PS.SERVING, PE.HELLO): (PS.HANDING_OVER, (PA.ADOPT, PA.SEND_LISTENERS)),
    (PS.SERVING, PE.SHUTDOWN): (PS.DRAINING, (PA.STOP_ACCEPTING, PA.DRAIN)),
    (PS.SERVING, PE.ABORT): (PS.SERVING, ()),
    (PS.FOLLOWING, PE.HELLO): (PS.FOLLOWING, (PA.REFUSE,)),
    (PS.FOLLOWING, PE.PREDECESSOR_DONE): (PS.SERVING, ()),
    (PS.FOLLOWING, PE.SHUTDOWN): (PS.DRAINING, (PA.STOP_ACCEPTING, PA.DRAIN)),
    (PS.FOLLOWING, PE.ABORT): (PS.FOLLOWING, ()),
    (PS.HANDING_OVER, PE.HELLO): (PS.HANDING_OVER, (PA.REFUSE,)),
    (PS.HANDING_OVER, PE.CHILD_READY): (PS.HANDED_OVER, (PA.STOP_ACCEPTING, PA.STOP_ADMIN, PA.SEND_DRAINING, PA.DRAIN)),
    (PS.HANDING_OVER, PE.CHILD_FAILED): (PS.SERVING, (PA.RELEASE, PA.COUNT_ABORTED)),
    (PS.HANDING_OVER, PE.CHILD_LOST): (PS.SERVING, (PA.RELEASE, PA.COUNT_ABORTED)),
    (PS.HANDING_OVER, PE.HANDOVER_TIMEOUT): (PS.SERVING, (PA.RELEASE, PA.COUNT_ABORTED)),
    (PS.HANDING_OVER, PE.SHUTDOWN): (PS.DRAINING, (PA.RELEASE, PA.STOP_ACCEPTING, PA.DRAIN)),
    (PS.HANDING_OVER, PE.ABORT): (PS.SERVING, (PA.RELEASE, PA.COUNT_ABORTED)),
    (PS.HANDED_OVER, PE.HELLO): (PS.HANDED_OVER, (PA.REFUSE,)),
    (PS.HANDED_OVER, PE.CHILD_LOST): (PS.HANDED_OVER, (PA.RELEASE,)),
    (PS.HANDED_OVER, PE.SHUTDOWN): (PS.HANDED_OVER, ()),
    (PS.HANDED_OVER, PE.DRAINED): (PS.FAREWELL, (PA.SEND_DONE,)),
    (PS.HANDED_OVER, PE.ABORT): (PS.HANDED_OVER, (PA.RELEASE,)),
    (PS.FAREWELL, PE.HELLO): (PS.FAREWELL, (PA.REFUSE,)),
    (PS.FAREWELL, PE.DONE_SENT): (PS.DONE, (PA.RELEASE,)),
    (PS.FAREWELL, PE.CHILD_LOST): (PS.DONE, (PA.RELEASE,)),
    (PS.FAREWELL, PE.SHUTDOWN): (PS.FAREWELL, ()),
    (PS.FAREWELL, PE.ABORT): (PS.DONE, (PA.RELEASE,)),
    (PS.DONE, PE.HELLO): (PS.DONE, (PA.REFUSE,)),
    (PS.DONE, PE.SHUTDOWN): (PS.DONE, ()),
    (PS.DONE, PE.ABORT): (PS.DONE, ()),
    (PS.DRAINING, PE.HELLO): (PS.DRAINING, (PA.REFUSE,)),
    (PS.DRAINING, PE.SHUTDOWN): (PS.DRAINING, ()),
    (PS.DRAINING, PE.DRAINED): (PS.DRAINED, ()),
    (PS.DRAINING, PE.PREDECESSOR_DONE): (PS.DRAINING, ()),
    (PS.DRAINING, PE.ABORT): (PS.DRAINING, ()),
    (PS.DRAINED, PE.HELLO): (PS.DRAINED, (PA.REFUSE,)),
    (PS.DRAINED, PE.SHUTDOWN): (PS.DRAINED, ()),
    (PS.DRAINED, PE.PREDECESSOR_DONE): (PS.DRAINED, ()),
    (PS.DRAINED, PE.ABORT): (PS.DRAINED, ()),
}

_ALONE = (CA.RESTORE_STATS, CA.CLOSE, CA.LEAD)
EXPECTED_CHILD = {
    (CS.CONNECTING, CE.CONNECTED): (CS.RECEIVING, (CA.SEND_HELLO,)),
    (CS.CONNECTING, CE.PARENT_LOST): (CS.FAILED, (CA.CLOSE,)),
    (CS.CONNECTING, CE.ABORT): (CS.FAILED, (CA.CLOSE,)),
    (CS.RECEIVING, CE.LISTENERS): (CS.WARMING, ()),
    (CS.RECEIVING, CE.REFUSED): (CS.FAILED, (CA.CLOSE,)),
    (CS.RECEIVING, CE.PARENT_LOST): (CS.FAILED, (CA.CLOSE,)),
    (CS.RECEIVING, CE.ABORT): (CS.FAILED, (CA.CLOSE,)),
    (CS.WARMING, CE.WARM): (CS.SAYING_READY, (CA.SEND_READY,)),
    (CS.WARMING, CE.WARMUP_FAILED): (CS.FAILED, (CA.SEND_FAILED, CA.CLOSE)),
    (CS.WARMING, CE.ABORT): (CS.FAILED, (CA.SEND_FAILED, CA.CLOSE)),
    (CS.SAYING_READY, CE.READY_SENT): (CS.SERVING, (CA.START_ACCEPTING,)),
    (CS.SAYING_READY, CE.PARENT_LOST): (CS.FAILED, (CA.CLOSE,)),
    (CS.SAYING_READY, CE.ABORT): (CS.FAILED, (CA.CLOSE,)),
    (CS.SERVING, CE.PARENT_DRAINING): (CS.SERVING, ()),
    (CS.SERVING, CE.PARENT_DONE): (CS.ALONE, _ALONE),
    (CS.SERVING, CE.PARENT_LOST): (CS.ALONE, _ALONE),
    (CS.SERVING, CE.ABORT): (CS.ALONE, _ALONE),
    (CS.ALONE, CE.ABORT): (CS.ALONE, ()),
    (CS.FAILED, CE.ABORT): (CS.FAILED, ()),
}


@pytest.mark.parametrize("state", list(ParentState))
@pytest.mark.parametrize("event", list(ParentEvent))
def test_parent_every_state_and_event(state: ParentState, event: ParentEvent) -> None:
    m = Machine(PARENT, state)
    want = EXPECTED_PARENT.get((state, event))
    if want is None:
        with pytest.raises(IllegalEvent, match=f"{event.value} is not allowed in state {state.value}"):
            m.fire(event)
        assert m.state is state and not m.can(event) and m.history == []
    else:
        assert m.can(event)
        tr = m.fire(event)
        assert (tr.state, tr.actions) == want and m.state is want[0]
        assert m.history == [(state, event, want[0])]


@pytest.mark.parametrize("state", list(ChildState))
@pytest.mark.parametrize("event", list(ChildEvent))
def test_child_every_state_and_event(state: ChildState, event: ChildEvent) -> None:
    m = Machine(CHILD, state)
    want = EXPECTED_CHILD.get((state, event))
    if want is None:
        with pytest.raises(IllegalEvent):
            m.fire(event)
        assert m.state is state and m.history == []
    else:
        tr = m.fire(event)
        assert (tr.state, tr.actions) == want and m.state is want[0]


def test_tables_hold_exactly_the_expected_entries() -> None:
    got = {(s, e): (t.state, t.actions) for s, row in PARENT.items() for e, t in row.items()}
    assert got == EXPECTED_PARENT
    got = {(s, e): (t.state, t.actions) for s, row in CHILD.items() for e, t in row.items()}
    assert got == EXPECTED_CHILD
    assert set(PARENT) == set(ParentState) and set(CHILD) == set(ChildState)


def test_abort_is_declared_in_every_state_and_ends_a_hand_over() -> None:
    """An illegal event is answered with ABORT, so ABORT must be legal everywhere."""
    for state in ParentState:
        assert ParentEvent.ABORT in PARENT[state], state
    for state in ChildState:
        assert ChildEvent.ABORT in CHILD[state], state
    # a hand-over under way: the child is let go and counted, we serve on
    assert PARENT[PS.HANDING_OVER][PE.ABORT].state is PS.SERVING
    # a child not accepting yet gives up (the parent keeps serving)
    for state in (CS.CONNECTING, CS.RECEIVING, CS.WARMING, CS.SAYING_READY):
        tr = CHILD[state][CE.ABORT]
        assert tr.state is CS.FAILED and CA.START_ACCEPTING not in tr.actions


def test_every_state_is_reachable_and_reaches_an_end() -> None:
    for table, starts, ends in (
        (PARENT, {PS.SERVING, PS.FOLLOWING}, {PS.DONE, PS.DRAINED}),
        (CHILD, {CS.CONNECTING}, {CS.ALONE, CS.FAILED}),
    ):
        seen = set(starts)
        todo = list(starts)
        while todo:
            for tr in table[todo.pop()].values():
                if tr.state not in seen:
                    seen.add(tr.state)
                    todo.append(tr.state)
        assert seen == set(table)
        for state in table:  # an end can be reached from every state (ends: only abort and no-ops)
            reach, todo = {state}, [state]
            while todo:
                for tr in table[todo.pop()].values():
                    if tr.state not in reach:
                        reach.add(tr.state)
                        todo.append(tr.state)
            assert reach & ends, state
        for end in ends:
            assert all(tr.state is end for tr in table[end].values())


def test_derived_flags() -> None:
    assert DRAINING_STATES == {PS.HANDED_OVER, PS.FAREWELL, PS.DONE, PS.DRAINING, PS.DRAINED}
    assert HANDED_OVER_STATES == {PS.HANDED_OVER, PS.FAREWELL, PS.DONE}
    assert PARENT_ALIVE_STATES == {CS.WARMING, CS.SAYING_READY, CS.SERVING}
    # draining begins exactly on the transitions that start a drain
    for row in PARENT.values():
        for tr in row.values():
            if PA.DRAIN in tr.actions:
                assert tr.state in DRAINING_STATES


def test_one_hand_over_at_a_time() -> None:
    m = Machine(PARENT, PS.SERVING)
    m.fire(PE.HELLO)
    assert m.fire(PE.HELLO).actions == (PA.REFUSE,)  # a second child is refused
    m.fire(PE.CHILD_LOST)  # the first child failed: serving again, a new one may come
    assert m.fire(PE.HELLO).actions == (PA.ADOPT, PA.SEND_LISTENERS)
    assert "already under way" in refusal(PS.HANDING_OVER)
    assert "at most two generations" in refusal(PS.FOLLOWING)
    assert "shutting down" in refusal(PS.DRAINING)


def test_a_new_generation_follows_until_its_predecessor_is_done() -> None:
    m = Machine(PARENT, PS.FOLLOWING)
    assert m.fire(PE.HELLO).actions == (PA.REFUSE,)
    child = Machine(CHILD, CS.SERVING)
    assert PA.REFUSE not in PARENT[PS.SERVING][PE.HELLO].actions
    assert CA.LEAD in child.fire(CE.PARENT_DONE).actions
    m.fire(PE.PREDECESSOR_DONE)
    assert m.state is PS.SERVING


def test_messages_round_trip_and_are_checked() -> None:
    line = encode("listeners", names=["admin"], generation=2, stats={}, subscriptions=["a"])
    assert line.endswith(b"\n")
    assert decode(line[:-1]) == {"type": "listeners", "names": ["admin"], "generation": 2, "stats": {}, "subscriptions": ["a"]}
    with pytest.raises(HotRestartError):
        encode("listeners", names=[])
    with pytest.raises(HotRestartError):
        encode("nonsense")
    # a hello without the hand-over secret does not even parse (issue 11)
    for bad in (b"not json", b"[1]", b'{"type": "what"}', b'{"type": "hello"}', b'{"type": "hello", "version": 1, "pid": 2}'):
        with pytest.raises(HotRestartError):
            decode(bad)


def test_docs_tables_are_generated_from_the_code() -> None:
    text = DOC.read_text()
    head, sep, rest = text.partition(BEGIN)
    committed, sep2, tail = rest.partition(END)
    assert sep and sep2, f"{DOC} lacks the {BEGIN} / {END} markers"
    generated = "\n" + render_markdown()
    if os.environ.get("OCTOPROXY_REGEN_DOCS"):
        DOC.write_text(head + BEGIN + generated + END + tail)
        return
    assert committed == generated, (
        "docs/hot-restart.md is out of date; run OCTOPROXY_REGEN_DOCS=1 python -m pytest tests/test_hot_restart_core.py -k docs"
    )
