"""The hot-restart state machines, from their tables: every state x event."""

from __future__ import annotations

import pathlib
import re

import pytest

from octoproxy.core._hot_restart import (
    CHILD,
    PARENT,
    ChildEvent,
    ChildState,
    HotRestartError,
    Machine,
    ParentEvent,
    ParentState,
    decode,
    encode,
    mermaid,
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "hot-restart.md"

EXPECTED_PARENT = {
    (ParentState.SERVING, ParentEvent.HELLO): ParentState.HANDING_OVER,
    (ParentState.SERVING, ParentEvent.SHUTDOWN): ParentState.DRAINING,
    (ParentState.HANDING_OVER, ParentEvent.CHILD_READY): ParentState.DRAINING,
    (ParentState.HANDING_OVER, ParentEvent.CHILD_LOST): ParentState.SERVING,
    (ParentState.HANDING_OVER, ParentEvent.HANDOVER_TIMEOUT): ParentState.SERVING,
    (ParentState.HANDING_OVER, ParentEvent.SHUTDOWN): ParentState.SERVING,
    (ParentState.DRAINING, ParentEvent.DRAINED): ParentState.DONE,
    (ParentState.DRAINING, ParentEvent.CHILD_LOST): ParentState.DRAINING,
    (ParentState.DRAINING, ParentEvent.SHUTDOWN): ParentState.DRAINING,
}

EXPECTED_CHILD = {
    (ChildState.CONNECTING, ChildEvent.CONNECTED): ChildState.RECEIVING,
    (ChildState.CONNECTING, ChildEvent.PARENT_LOST): ChildState.FAILED,
    (ChildState.RECEIVING, ChildEvent.LISTENERS): ChildState.WARMING,
    (ChildState.RECEIVING, ChildEvent.REFUSED): ChildState.FAILED,
    (ChildState.RECEIVING, ChildEvent.PARENT_LOST): ChildState.FAILED,
    (ChildState.WARMING, ChildEvent.WARM): ChildState.SERVING,
    (ChildState.WARMING, ChildEvent.WARMUP_FAILED): ChildState.FAILED,
    (ChildState.WARMING, ChildEvent.PARENT_LOST): ChildState.FAILED,
    (ChildState.SERVING, ChildEvent.PARENT_DONE): ChildState.ALONE,
    (ChildState.SERVING, ChildEvent.PARENT_LOST): ChildState.ALONE,
}


@pytest.mark.parametrize("state", list(ParentState))
@pytest.mark.parametrize("event", list(ParentEvent))
def test_parent_every_state_and_event(state: ParentState, event: ParentEvent) -> None:
    m = Machine(PARENT, state)
    want = EXPECTED_PARENT.get((state, event))
    if want is None:
        with pytest.raises(HotRestartError):
            m.fire(event)
        assert m.state is state and not m.can(event)
    else:
        assert m.can(event)
        assert m.fire(event) is want and m.state is want
        assert m.history == [(state, event, want)]


@pytest.mark.parametrize("state", list(ChildState))
@pytest.mark.parametrize("event", list(ChildEvent))
def test_child_every_state_and_event(state: ChildState, event: ChildEvent) -> None:
    m = Machine(CHILD, state)
    want = EXPECTED_CHILD.get((state, event))
    if want is None:
        with pytest.raises(HotRestartError):
            m.fire(event)
    else:
        assert m.fire(event) is want


def test_a_second_hello_is_refused_while_handing_over() -> None:
    m = Machine(PARENT, ParentState.SERVING)
    m.fire(ParentEvent.HELLO)
    assert not m.can(ParentEvent.HELLO)
    m.fire(ParentEvent.CHILD_LOST)  # the first child failed: serving again, a new one may come
    assert m.can(ParentEvent.HELLO)


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


def test_docs_diagrams_match_the_tables() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert mermaid(PARENT, ParentState.SERVING).strip() in [b.strip() for b in blocks]
    assert mermaid(CHILD, ChildState.CONNECTING).strip() in [b.strip() for b in blocks]
