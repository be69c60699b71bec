"""W3C traceparent: validation vectors, propagation with a new span id, new traces, tracestate."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from octoproxy.governance import TraceConfig, Tracer, parse_traceparent

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TID}-00f067aa0ba902b7-01"


def words(first: list[int], config: TraceConfig | None = None) -> Tracer:
    """A tracer whose random 64-bit words are ``first``, then 1, 2, 3, ... (span ids in order)."""
    it = itertools.chain(first, itertools.count(1))

    def randbits(k: int) -> int:
        assert k % 64 == 0
        v = 0
        for _ in range(k // 64):
            v = (v << 64) | next(it)
        return v

    return Tracer(config or TraceConfig(), randbits)


def counter_rand() -> Tracer:
    return words([])


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (VALID, True),
        (f"00-{TID}-00f067aa0ba902b7-00", True),
        (f"01-{TID}-00f067aa0ba902b7-01", True),               # later version, 55 chars
        (f"01-{TID}-00f067aa0ba902b7-01-extra", True),         # later version may extend after '-'
        (f"00-{TID}-00f067aa0ba902b7-01-extra", False),        # version 00 is exactly 55 chars
        (f"01-{TID}-00f067aa0ba902b7-01x", False),
        (f"ff-{TID}-00f067aa0ba902b7-01", False),              # version ff is invalid
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", False),         # all-zero trace id
        (f"00-{TID}-0000000000000000-01", False),              # all-zero parent id
        (f"00-{TID.upper()}-00f067aa0ba902b7-01", False),      # uppercase
        (f"00-{TID}-00f067aa0ba902b7-0", False),
        (f"00-{TID[:-1]}-00f067aa0ba902b7-01", False),
        (f"00_{TID}-00f067aa0ba902b7-01", False),
        (f"00-{TID}-00f067aa0ba902b7-1g", False),
        (f" 00-{TID}-00f067aa0ba902b7-01", False),
        ("", False),
    ],
)
def test_validation(value: str, ok: bool) -> None:
    assert (parse_traceparent(value) is not None) is ok
    t = counter_rand()
    out, state = t.next_hop(value, "k=v")
    assert (out.split("-")[1] == TID) is ok
    assert (state == "k=v") is ok  # tracestate kept only with a valid parent
    outb, stateb = counter_rand().next_hop_bytes(value.encode(), b"k=v")
    assert outb.decode() == out and (stateb == b"k=v") is ok


def test_parse_fields() -> None:
    ctx = parse_traceparent(VALID)
    assert ctx is not None and ctx.trace_id == TID and ctx.parent_id == "00f067aa0ba902b7" and ctx.flags == 1 and ctx.sampled


def test_next_hop_keeps_trace_and_flags_with_new_span() -> None:
    t = counter_rand()
    out, st_ = t.next_hop(f"00-{TID}-00f067aa0ba902b7-00", "a=1,b=2")
    assert out == f"00-{TID}-0000000000000001-00" and st_ == "a=1,b=2"
    out2, _ = t.next_hop(out)
    assert out2 == f"00-{TID}-0000000000000002-00"


def test_later_version_is_downgraded_to_00() -> None:
    out, _ = counter_rand().next_hop(f"cc-{TID}-00f067aa0ba902b7-09-whatever")
    assert out == f"00-{TID}-0000000000000001-09"


def test_new_trace_when_absent() -> None:
    t = words([0, 0, 5, 6, 0, 7], TraceConfig(sampled=False))  # zero words are skipped
    out, state = t.next_hop(None, "dropped=1")
    assert out == "00-00000000000000050000000000000006-0000000000000007-00" and state is None
    assert parse_traceparent(out) is not None


def test_sampled_flag_of_new_traces() -> None:
    assert counter_rand().new_traceparent().endswith("-01")


def test_default_random_source() -> None:
    a, _ = Tracer(TraceConfig()).next_hop(None)
    b, _ = Tracer(TraceConfig()).next_hop(None)
    assert a != b and parse_traceparent(a) and parse_traceparent(b)


@given(st.text(max_size=80))
def test_any_input_yields_a_valid_traceparent(value: str) -> None:
    t = Tracer(TraceConfig(), random.Random(1).getrandbits)
    out, _ = t.next_hop(value)
    assert parse_traceparent(out) is not None and len(out) == 55


@given(st.binary(max_size=80))
def test_any_bytes_yield_a_valid_traceparent(value: bytes) -> None:
    out, _ = counter_rand().next_hop_bytes(value)
    assert parse_traceparent(out.decode()) is not None


def test_span_ids_differ_per_hop_and_are_reproducible() -> None:
    a = Tracer(TraceConfig(), random.Random(3).getrandbits)
    b = Tracer(TraceConfig(), random.Random(3).getrandbits)
    outs = [a.next_hop(VALID)[0] for _ in range(100)]  # more than one pool refill
    assert outs == [b.next_hop(VALID)[0] for _ in range(100)]
    assert len({o.split("-")[2] for o in outs}) == 100


_HEXISH = st.sampled_from("0123456789abcdefA0")


@given(
    version=st.sampled_from(["00", "01", "fe", "ff", "0A"]),
    trace_id=st.one_of(st.just("0" * 32), st.text(_HEXISH, min_size=31, max_size=33)),
    span=st.one_of(st.just("0" * 16), st.text(_HEXISH, min_size=16, max_size=16)),
    flags=st.sampled_from(["00", "01", "ff", "0g"]),
    tail=st.sampled_from(["", "-x", "x"]),
)
def test_fast_and_general_paths_agree(version: str, trace_id: str, span: str, flags: str, tail: str) -> None:
    value = f"{version}-{trace_id}-{span}-{flags}{tail}"
    ctx = parse_traceparent(value)  # the general validator
    out, state = counter_rand().next_hop(value, "s=1")
    outb, _ = counter_rand().next_hop_bytes(value.encode(), b"s=1")
    assert outb.decode() == out
    if ctx is None:
        assert state is None and out.split("-")[1] != trace_id
    else:
        assert out == f"00-{ctx.trace_id}-0000000000000001-{ctx.flags:02x}" and state == "s=1"
