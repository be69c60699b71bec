"""Print the test-vector block of docs/protocol.md (JSON) from hand-written cases.

Each case is built from explicit bytes where it matters (bad input) and from
the encoder for the good frames; tests/test_vectors.py then checks the block
against BOTH codec implementations and against protobuf itself, so a change
in the encoder that altered these bytes fails the tests.

    python ci/gen_vectors.py > /tmp/vectors.json
"""

import json
import struct

from octoproxy import _frame_py as f


def prefix(ftype, length, sid, flags, hlen, magic=0xABBA, version=1):
    return struct.pack(">HBBIQHH", magic, version, ftype, length, sid, flags, hlen)


cases = []


def good(name, raw, **expect):
    cases.append({"name": name, "hex": raw.hex(), "frames": [expect]})


def bad(name, raw, status, message, stream_id=None, frames=()):
    cases.append({"name": name, "hex": raw.hex(), "frames": list(frames),
                  "error": {"status": status, "message": message, "stream_id": stream_id}})


hdr = f.encode_header(service="echo", method="ping")
good("request-minimal", f.encode_request(1, "echo", "ping", b"hello"),
     type=1, stream_id=1, flags=0, header_hex=hdr.hex(), body_hex=b"hello".hex(),
     service="echo", method="ping", timeout_ms=0)
full = dict(service="users", method="get", caller="web", timeout_ms=250,
            metadata={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "x-set": "blue"})
h = f.encode_header(**full)
good("request-full-header", f.encode_frame(1, 0x0102030405060708, h, b"\x00\x01"),
     type=1, stream_id=0x0102030405060708, flags=0, header_hex=h.hex(), body_hex="0001",
     service="users", method="get", timeout_ms=250, header=full)
good("response-ok-empty-header", f.encode_response(1, b"hello"),
     type=2, stream_id=1, flags=0, header_hex="", body_hex=b"hello".hex(), service="", method="", timeout_ms=0)
h = f.encode_header(status=3, error="no healthy endpoint")
good("response-unavailable", f.encode_response(42, status=3, error="no healthy endpoint"),
     type=2, stream_id=42, flags=0, header_hex=h.hex(), body_hex="", service="", method="", timeout_ms=0,
     header={"status": 3, "error": "no healthy endpoint"})
good("response-hot-restart", f.encode_response(7, flags=1),
     type=2, stream_id=7, flags=1, header_hex="", body_hex="", service="", method="", timeout_ms=0)
good("oneway", f.encode_request(9, "log", "append", b"x", oneway=True),
     type=3, stream_id=9, flags=0, header_hex=f.encode_header(service="log", method="append").hex(), body_hex="78",
     service="log", method="append", timeout_ms=0)
good("ping", f.encode_frame(4, 0xDEADBEEF), type=4, stream_id=0xDEADBEEF, flags=0, header_hex="", body_hex="",
     service="", method="", timeout_ms=0)
good("pong", f.encode_frame(5, 0xDEADBEEF), type=5, stream_id=0xDEADBEEF, flags=0, header_hex="", body_hex="",
     service="", method="", timeout_ms=0)
h = f.encode_header(error="hot restart")
good("goaway", f.encode_frame(6, 0, h), type=6, stream_id=0, flags=0, header_hex=h.hex(), body_hex="",
     service="", method="", timeout_ms=0, header={"error": "hot restart"})
# method before service, and a repeated service: the last one wins
h = bytes.fromhex("12036765740a01780a057573657273")
good("fields-any-order-last-wins", f.encode_frame(1, 3, h, b""), type=1, stream_id=3, flags=0, header_hex=h.hex(),
     body_hex="", service="users", method="get", timeout_ms=0)
# unknown field 9 (varint) and 10 (fixed64) are skipped
h = f.encode_header(service="a", method="b") + bytes.fromhex("4801") + bytes.fromhex("51") + bytes(8)
good("unknown-fields-skipped", f.encode_frame(1, 4, h), type=1, stream_id=4, flags=0, header_hex=h.hex(),
     body_hex="", service="a", method="b", timeout_ms=0)

bad("bad-magic", prefix(1, 12, 1, 0, 0, magic=0xABBB), "PROTOCOL_ERROR", "bad magic 0xabbb")
bad("bad-version", prefix(1, 12, 1, 0, 0, version=2), "PROTOCOL_ERROR", "unsupported version 2")
bad("unknown-type", prefix(7, 12, 1, 0, 0), "PROTOCOL_ERROR", "unknown frame type 7")
bad("length-below-minimum", prefix(1, 11, 1, 0, 0), "PROTOCOL_ERROR", "frame length 11 below minimum 12")
bad("too-large-refused-at-length-field", prefix(1, 0x7FFFFFF0, 1, 0, 0)[:8], "FRAME_TOO_LARGE",
    "frame of 2147483640 bytes exceeds the limit of 16777216 bytes")
bad("header-length-past-frame", prefix(1, 14, 5, 0, 3) + b"\x0a\x00", "PROTOCOL_ERROR", "header length 3 exceeds frame", 5)
bad("header-truncated-string", prefix(1, 15, 6, 0, 3) + b"\x0a\x05a", "PROTOCOL_ERROR",
    "malformed header: field length past end", 6)
bad("header-wrong-wire-type", prefix(1, 14, 7, 0, 2) + b"\x08\x01", "PROTOCOL_ERROR",
    "malformed header: wrong wire type for field 1", 7)
bad("header-group-wire-type", prefix(1, 14, 8, 0, 2) + b"\x0b\x00", "PROTOCOL_ERROR",
    "malformed header: invalid wire type 3", 8)
bad("header-field-zero", prefix(1, 14, 9, 0, 2) + b"\x02\x00", "PROTOCOL_ERROR", "malformed header: bad field number", 9)
bad("good-then-bad", f.encode_request(1, "echo", "ping") + prefix(1, 12, 2, 0, 0, version=9), "PROTOCOL_ERROR",
    "unsupported version 9", None,
    frames=[dict(type=1, stream_id=1, flags=0, header_hex=hdr.hex(), body_hex="", service="echo", method="ping", timeout_ms=0)])

print(json.dumps(cases, indent=1))
