"""docs/protocol.md's test vectors, checked against both codecs and protobuf."""

from __future__ import annotations

import json
import pathlib
import re
from types import ModuleType
from typing import Any

import pytest

from octoproxy import RemoteProtocolError, Status
from octoproxy.frame import parse_header

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def load_vectors() -> list[dict[str, Any]]:
    text = DOC.read_text()
    m = re.search(r"<!-- BEGIN VECTORS -->\s*```json\n(.*?)```\s*<!-- END VECTORS -->", text, re.S)
    assert m, "vector block missing from docs/protocol.md"
    return json.loads(m.group(1))  # type: ignore[no-any-return]


VECTORS = load_vectors()


def test_vector_block_is_substantial() -> None:
    names = {v["name"] for v in VECTORS}
    assert len(VECTORS) >= 20
    assert {"request-minimal", "bad-magic", "too-large-refused-at-length-field"} <= names


def check_frame(frame: Any, want: dict[str, Any]) -> None:
    assert frame.type == want["type"]
    assert frame.stream_id == want["stream_id"]
    assert frame.flags == want["flags"]
    assert frame.header_bytes.hex() == want["header_hex"]
    assert bytes(frame.body).hex() == want["body_hex"]
    assert frame.service == want["service"]
    assert frame.method == want["method"]
    assert frame.timeout_ms == want["timeout_ms"]
    header = parse_header(frame.header_bytes)
    for key, value in want.get("header", {}).items():
        if key == "metadata":
            assert dict(header.metadata) == value
        else:
            assert getattr(header, key) == value
    if frame.type in (1, 3):
        assert header.service == want["service"] and header.method == want["method"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_decoder_vectors(impl: ModuleType, vector: dict[str, Any], chunk: int) -> None:
    data = bytes.fromhex(vector["hex"])
    dec = impl.FrameDecoder()
    got: list[Any] = []
    error = None
    try:
        for i in range(0, len(data), chunk):
            dec.receive_data(data[i : i + chunk])
            while (frame := dec.next_frame()) is not None:
                got.append(frame)
    except RemoteProtocolError as exc:
        error = exc
    assert len(got) == len(vector["frames"])
    for frame, want in zip(got, vector["frames"]):
        check_frame(frame, want)
    if "error" in vector:
        assert error is not None, "no error raised"
        assert error.status == Status[vector["error"]["status"]]
        assert str(error) == vector["error"]["message"]
        assert error.stream_id == vector["error"]["stream_id"]
    else:
        assert error is None
        assert dec.pending == 0


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_scanner_vectors(impl: ModuleType, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    scanner = impl.Scanner(impl.RouteTable([("echo", "*", 5)]))
    frames = vector["frames"]
    if "error" in vector:
        start = 0
        if frames:  # good frames before the bad one come out first
            assert scanner.scan(data) == len(frames)
            start = scanner.consumed
        with pytest.raises(RemoteProtocolError) as info:
            scanner.scan(data, start)
        if frames:
            assert scanner.scan(data) == len(frames)  # re-scan, to check the frames below
        assert str(info.value) == vector["error"]["message"]
        assert info.value.status == Status[vector["error"]["status"]]
    else:
        assert scanner.scan(data) == len(frames)
        assert scanner.consumed == len(data)
    offset = 0
    for i, want in enumerate(frames):
        off, size, ftype, flags, sid, timeout, route, status = scanner.frame(i)
        assert (off, ftype, flags, sid, timeout) == (offset, want["type"], want["flags"], want["stream_id"], want["timeout_ms"])
        assert status == want.get("header", {}).get("status", 0)
        service, method = scanner.routing_key(i)
        if ftype in (1, 3):
            assert (service.decode(), method.decode()) == (want["service"], want["method"])
            assert route == (5 if want["service"] == "echo" else -1)
        else:
            assert route == -2
        offset += size


def test_encoder_reproduces_good_vectors(impl: ModuleType) -> None:
    for vector in VECTORS:
        if "error" in vector or len(vector["frames"]) != 1:
            continue
        want = vector["frames"][0]
        raw = impl.encode_frame(
            want["type"], want["stream_id"], bytes.fromhex(want["header_hex"]), bytes.fromhex(want["body_hex"]), want["flags"]
        )
        assert raw.hex() == vector["hex"], vector["name"]
        if "header" in want:
            assert impl.encode_header(**want["header"]).hex() == want["header_hex"]
