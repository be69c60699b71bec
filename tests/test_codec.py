"""Frame codec: both implementations, unit cases, properties and a differential test."""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IMPLS, NO_EXTENSIONS
from octoproxy import LocalProtocolError, RemoteProtocolError, Status, frame
from octoproxy.protocol import _frame_py
from octoproxy.frame import Header

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def prefix(ftype: int, length: int, sid: int = 1, flags: int = 0, hlen: int = 0, magic: int = 0xABBA, version: int = 1) -> bytes:
    return struct.pack(">HBBIQHH", magic, version, ftype, length, sid, flags, hlen)


def decode_all(impl: ModuleType, data: bytes, cuts: list[int] | None = None, max_frame_size: int = 1 << 24) -> tuple[list[bytes], Any]:
    """Feed ``data`` split at ``cuts``; return (raw frames, error or None)."""
    dec = impl.FrameDecoder(max_frame_size)
    out: list[bytes] = []
    points = [0] + sorted(cuts or []) + [len(data)]
    try:
        for a, b in zip(points, points[1:]):
            dec.receive_data(data[a:b])
            while (f := dec.next_frame()) is not None:
                out.append((f.type, f.stream_id, f.flags, f.raw, f.service, f.method, f.timeout_ms))
    except RemoteProtocolError as exc:
        return out, exc
    return out, None


def scan_all(impl: ModuleType, data: bytes, cuts: list[int], capacity: int = 3) -> tuple[list[Any], Any]:
    """Proxy-style: a growing buffer, scans at each cut, the rest carried over."""
    scanner = impl.Scanner(impl.RouteTable([("svc", "*", 1), ("svc", "m", 2), ("other", "x", 3)]), 1 << 24, capacity)
    buf = b""
    out: list[Any] = []
    points = sorted(cuts) + [len(data)]
    last = 0
    try:
        for p in points:
            buf += data[last:p]
            last = p
            while True:
                n = scanner.scan(buf)
                if not n:
                    break
                for i in range(n):
                    out.append((scanner.frame(i), scanner.routing_key(i)))
                buf = buf[scanner.consumed :]
    except RemoteProtocolError as exc:
        return out, exc
    return out, None


# ------------------------------------------------------------------ loading


def test_compiled_module_loaded() -> None:
    """The fast path must really be there unless the twin was asked for."""
    if NO_EXTENSIONS:
        assert frame.IMPLEMENTATION == "python"  # the default; conftest's impl still runs both when built
    elif os.environ.get("OCTOPROXY_ALLOW_NO_EXTENSIONS"):
        pytest.skip("explicitly allowed to run without the compiled module")  # never set in CI
    else:
        assert "compiled" in IMPLS, "octoproxy.protocol._fastframe is not built: run `pip install .`"
        assert frame.IMPLEMENTATION == "cython"


def test_twins_export_the_same_names() -> None:
    names = ["FrameDecoder", "Scanner", "RouteTable", "encode_frame", "encode_header", "encode_request",
             "encode_response", "read_routing_key", "rewrite_stream_id", "ROUTE_MISS", "ROUTE_NOT_REQUEST", "IMPLEMENTATION"]
    for impl in IMPLS.values():
        for name in names:
            assert hasattr(impl, name), (impl.__name__, name)


# ------------------------------------------------------------------ decoder units


def test_round_trip_request(impl: ModuleType) -> None:
    raw = impl.encode_request(77, "users", "get", b"body", caller="web", timeout_ms=1500, metadata={"k": "v"})
    dec = impl.FrameDecoder()
    dec.receive_data(raw)
    f = dec.next_frame()
    assert f is not None and dec.next_frame() is None
    assert (f.type, f.stream_id, f.flags, f.service, f.method, f.timeout_ms) == (1, 77, 0, "users", "get", 1500)
    assert bytes(f.body) == b"body"
    assert isinstance(f.body, memoryview)
    assert f.header.caller == "web" and dict(f.header.metadata) == {"k": "v"}


def test_many_frames_one_chunk_and_byte_at_a_time(impl: ModuleType) -> None:
    frames = [impl.encode_request(i, "s", "m", bytes([i]) * i) for i in range(50)]
    data = b"".join(frames)
    assert [r[3] for r in decode_all(impl, data)[0]] == frames
    assert [r[3] for r in decode_all(impl, data, list(range(1, len(data))))[0]] == frames


def test_oversized_refused_at_length_field(impl: ModuleType) -> None:
    dec = impl.FrameDecoder(max_frame_size=1024)
    dec.receive_data(prefix(1, 1017)[:8])  # 8 + 1017 = 1025 > 1024
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_frame()
    assert info.value.status == Status.FRAME_TOO_LARGE
    assert dec.pending == 8  # nothing more was buffered
    ok = impl.FrameDecoder(max_frame_size=1024)
    ok.receive_data(prefix(1, 1016)[:8])
    assert ok.next_frame() is None  # exactly at the limit: waits for the rest


def test_error_is_sticky(impl: ModuleType) -> None:
    dec = impl.FrameDecoder()
    dec.receive_data(b"\x00\x00")
    with pytest.raises(RemoteProtocolError) as first:
        dec.next_frame()
    dec.receive_data(impl.encode_response(1))
    with pytest.raises(RemoteProtocolError) as second:
        dec.next_frame()
    assert first.value is second.value


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xab\xbb", "bad magic 0xabbb"),
        (b"\xab\xba\x00", "unsupported version 0"),
        (b"\xab\xba\x01\x00", "unknown frame type 0"),
        (prefix(1, 0)[:8], "frame length 0 below minimum 12"),
        (prefix(1, 12, sid=3, hlen=1), "header length 1 exceeds frame"),
        (prefix(1, 14, sid=3, hlen=2) + b"\x0a\x80", "malformed header: truncated varint"),
        (prefix(1, 23, sid=3, hlen=11) + b"\x0a" + b"\xff" * 10, "malformed header: varint too long"),
        (prefix(1, 14, sid=3, hlen=2) + b"\x20\x80", "malformed header: truncated varint"),
        (prefix(1, 14, sid=3, hlen=2) + b"\x22\x00", "malformed header: wrong wire type for field 4"),
        (prefix(1, 16, sid=3, hlen=4) + b"\x0d\x00\x00\x00", "malformed header: wrong wire type for field 1"),
        (prefix(1, 16, sid=3, hlen=4) + b"\x45\x00\x00\x00", "malformed header: field length past end"),
        (prefix(1, 14, sid=3, hlen=2) + b"\x0f\x00", "malformed header: invalid wire type 7"),
        (prefix(1, 16, sid=3, hlen=4) + b"\x0a\x02\xff\xfe", "malformed header: name is not valid UTF-8"),
    ],
)
def test_protocol_errors(impl: ModuleType, data: bytes, message: str) -> None:
    dec = impl.FrameDecoder()
    dec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_frame()
    assert str(info.value) == message
    assert info.value.status == Status.PROTOCOL_ERROR
    if len(data) >= 20:
        assert info.value.stream_id == 3


def test_header_parse_error_converted() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        frame.parse_header(b"\x0a\x05ab", stream_id=9)
    assert info.value.status == Status.PROTOCOL_ERROR and info.value.stream_id == 9


# ------------------------------------------------------------------ scanner


def test_scanner_partial_and_capacity(impl: ModuleType) -> None:
    routes = impl.RouteTable([("svc", "*", 4)])
    s = impl.Scanner(routes, capacity=2)
    frames = [impl.encode_request(i, "svc", "m", b"x" * 10, timeout_ms=i * 10) for i in range(3)]
    data = b"".join(frames) + frames[0][:10]
    assert s.scan(data) == 2 and s.consumed == len(frames[0]) + len(frames[1])
    assert s.frame(1)[4:] == (1, 10, 4, 0)
    assert s.scan(data, s.consumed) == 1
    assert s.next_size == len(frames[0])  # the partial frame's size is known
    assert s.scan(data, s.consumed) == 0 and s.next_size == len(frames[0])
    assert s.scan(data[:-7], s.consumed) == 0 and s.next_size == 0  # only 3 bytes: size unknown
    with pytest.raises(IndexError):
        s.frame(5)


def test_scanner_returns_good_frames_before_bad(impl: ModuleType) -> None:
    good = impl.encode_request(1, "svc", "m")
    data = good + good + b"\xde\xad" + good
    s = impl.Scanner()
    assert s.scan(data) == 2
    with pytest.raises(RemoteProtocolError):
        s.scan(data, s.consumed)
    assert s.count == 0  # nothing from the failed scan is valid
    with pytest.raises(IndexError):
        s.frame(0)


def test_scanner_routes_swap(impl: ModuleType) -> None:
    data = impl.encode_request(1, "a", "x") + impl.encode_request(2, "b", "y") + impl.encode_response(3)
    s = impl.Scanner(impl.RouteTable([("a", "*", 1)]))
    s.scan(data)
    assert [s.frame(i)[6] for i in range(3)] == [1, -1, -2]
    s2 = impl.Scanner()
    assert s2.scan(impl.encode_response(1, status=Status.TIMEOUT)) == 1
    assert s2.frame(0)[7] == Status.TIMEOUT
    s.routes = impl.RouteTable([("b", "y", 9)])
    s.scan(data)
    assert [s.frame(i)[6] for i in range(3)] == [-1, 9, -2]


def test_scanner_accepts_bytearray_and_memoryview(impl: ModuleType) -> None:
    data = impl.encode_request(1, "svc", "m") * 2
    for buf in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        s = impl.Scanner()
        assert s.scan(buf) == 2


# ------------------------------------------------------------------ route table


def test_route_table(impl: ModuleType) -> None:
    t = impl.RouteTable([("users", "*", 1), ("users", "get", 2), (b"orders", b"list", 3), ("", "", 4)])
    assert t.lookup("users", "get") == 2
    assert t.lookup("users", "put") == 1
    assert t.lookup(b"orders", "list") == 3
    assert t.lookup("orders", "get") == -1
    assert t.lookup("user", "get") == -1
    assert t.lookup("", "") == 4
    assert len(t) == 4 and ("users", "get", 2) in t.entries()
    assert impl.RouteTable().lookup("a", "b") == -1
    with pytest.raises(ValueError):
        impl.RouteTable([("a", "b", 1), ("a", "b", 2)])
    with pytest.raises(ValueError):
        impl.RouteTable([("a", "b", -1)])


def test_route_table_many_entries(impl: ModuleType) -> None:
    entries = [(f"service-{i}", "*" if i % 3 else f"m{i}", i) for i in range(2000)]
    t = impl.RouteTable(entries)
    for s, m, rid in entries:
        assert t.lookup(s, "anything" if m == "*" else m) == rid


def test_read_routing_key(impl: ModuleType) -> None:
    assert impl.read_routing_key(impl.encode_header(service="s", method="m", caller="c")) == (b"s", b"m")
    assert impl.read_routing_key(b"") == (b"", b"")
    with pytest.raises(RemoteProtocolError):
        impl.read_routing_key(b"\x0a\x09")


# ------------------------------------------------------------------ encoder


def test_encode_errors(impl: ModuleType) -> None:
    with pytest.raises(LocalProtocolError):
        impl.encode_frame(7, 1)
    with pytest.raises(LocalProtocolError):
        impl.encode_frame(1, -1)
    with pytest.raises(LocalProtocolError):
        impl.encode_frame(1, 1 << 64)
    with pytest.raises(LocalProtocolError):
        impl.encode_frame(1, 1, b"x" * 65536)
    with pytest.raises(LocalProtocolError):
        impl.encode_frame(1, 1, flags=1 << 16)
    with pytest.raises(LocalProtocolError):
        impl.encode_header(timeout_ms=1 << 32)


def test_rewrite_stream_id(impl: ModuleType) -> None:
    buf = bytearray(impl.encode_response(5, b"zz") * 2)
    size = len(buf) // 2
    assert impl.rewrite_stream_id(buf, size, (1 << 64) - 1) == 5
    dec = impl.FrameDecoder()
    dec.receive_data(buf)
    assert [f.stream_id for f in dec] == [5, (1 << 64) - 1]
    with pytest.raises(ValueError):
        impl.rewrite_stream_id(buf, len(buf) - 10, 1)


# ------------------------------------------------------------------ properties

names = st.text(max_size=40)
headers = st.fixed_dictionaries(
    {},
    optional={
        "service": names,
        "method": names,
        "caller": names,
        "timeout_ms": st.integers(0, 2**32 - 1),
        "status": st.sampled_from(list(Status)),
        "error": names,
        "metadata": st.dictionaries(names, names, max_size=4),
    },
)


@PROPS
@given(h=headers)
def test_encode_header_matches_protobuf(impl: ModuleType, h: dict[str, Any]) -> None:
    msg = Header(**h)
    encoded = impl.encode_header(**h)
    assert Header.FromString(encoded) == msg
    if len(h.get("metadata", {})) <= 1:  # protobuf's own map order is its own business
        assert encoded == msg.SerializeToString(deterministic=True)


@PROPS
@given(
    frames=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6]), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF), headers, st.binary(max_size=300)),
        max_size=8,
    ),
    data=st.data(),
)
def test_round_trip_any_chunking(impl: ModuleType, frames: list[Any], data: st.DataObject) -> None:
    encoded = [impl.encode_frame(t, sid, impl.encode_header(**h), body, flags) for t, sid, flags, h, body in frames]
    stream = b"".join(encoded)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    got, err = decode_all(impl, stream, cuts)
    assert err is None
    assert [g[3] for g in got] == encoded
    for g, (t, sid, flags, h, _body) in zip(got, frames):
        assert g[:3] == (t, sid, flags)
        if t in (1, 3):
            assert (g[4], g[5]) == (h.get("service", ""), h.get("method", ""))
        assert g[6] == h.get("timeout_ms", 0)


@PROPS
@given(garbage=st.binary(max_size=400), data=st.data())
def test_garbage_only_raises_protocol_errors(impl: ModuleType, garbage: bytes, data: st.DataObject) -> None:
    # prefix a valid frame part of the time so that deeper checks are reached
    if data.draw(st.booleans()):
        garbage = prefix(data.draw(st.integers(1, 6)), len(garbage) + 12, hlen=data.draw(st.integers(0, len(garbage)))) + garbage
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=5))
    got, err = decode_all(impl, garbage, cuts, max_frame_size=4096)  # returns: never hangs
    assert err is None or isinstance(err, RemoteProtocolError)
    s_got, s_err = scan_all(impl, garbage, cuts)
    assert s_err is None or isinstance(s_err, RemoteProtocolError)
    assert len(s_got) == len(got)


# ------------------------------------------------------------------ differential


def random_stream(rng: random.Random) -> bytes:
    """Valid frames with occasional corruption."""
    parts = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.7:
            h = {"service": rng.choice(["svc", "other", "nope", ""]), "method": rng.choice(["m", "x", "y"])}
            if rng.random() < 0.5:
                h["timeout_ms"] = rng.randint(0, 2**32 - 1)
            if rng.random() < 0.3:
                h["metadata"] = {"traceparent": "00-abc"}
            parts.append(_frame_py.encode_frame(rng.choice([1, 2, 3, 4, 5, 6]), rng.getrandbits(64), _frame_py.encode_header(**h), rng.randbytes(rng.randint(0, 200)), rng.getrandbits(16)))
        elif kind < 0.85:
            f = bytearray(_frame_py.encode_request(rng.getrandbits(64), "svc", "m", b"body"))
            f[rng.randrange(len(f))] = rng.getrandbits(8)
            parts.append(bytes(f))
        else:
            hdr = rng.randbytes(rng.randint(0, 20))
            parts.append(prefix(rng.randint(1, 6), 12 + len(hdr), rng.getrandbits(64), 0, len(hdr)) + hdr)
    return b"".join(parts)


@pytest.mark.skipif(len(IMPLS) < 2, reason="differential test needs both implementations (the compiled one is not built)")
def test_differential_random_streams() -> None:
    c, py = IMPLS["compiled"], IMPLS["python"]
    rng = random.Random(20261125)
    for _ in range(400):
        stream = random_stream(rng)
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(0, 12))]
        assert decode_all(c, stream, cuts) == decode_all(py, stream, cuts)
        cap = rng.randint(1, 8)
        assert scan_all(c, stream, cuts, cap) == scan_all(py, stream, cuts, cap)
