"""The SDK's sans-IO cores on their own: a client core wired to a server core
by bytes (no sockets, no event loop, time passed in), and table-driven cases
for each decision the front ends delegate to them."""

from __future__ import annotations

import errno
import pickle

import pytest

from octoproxy.frame import Flags, FrameDecoder, FrameType, Status, encode_frame, encode_header, encode_request, encode_response
from octoproxy.sdk import ApplicationError, CallError, ClientClosedError, NoProxyError
from octoproxy.sdk._core import MAX_RESENDS, CallCore, ClientCore, ConnectionCore, Pending, connect_delays, no_proxy_error
from octoproxy.sdk._server_core import Request, ServerConnectionCore, check_body, expired, outcome_of_exception, response_frame

PATH = "/run/test/outbound.sock"


def new_client() -> tuple[ClientCore[ConnectionCore[Pending]], ConnectionCore[Pending]]:
    core: ClientCore[ConnectionCore[Pending]] = ClientCore(PATH, 1 << 20)
    conn: ConnectionCore[Pending] = ConnectionCore(core.next_number(), PATH, 1 << 20)
    core.adopt(conn)
    return core, conn


def send(core: ClientCore[ConnectionCore[Pending]], conn: ConnectionCore[Pending], call: CallCore, now: float) -> tuple[int, Pending, bytes]:
    sid = core.next_id()
    waiter = Pending()
    conn.pending[sid] = waiter
    return sid, waiter, core.encode(call, sid, now)


def frames(data: bytes) -> list:  # type: ignore[type-arg]
    dec = FrameDecoder()
    dec.receive_data(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


# ---------------------------------------------------------------- a client core and a server core, wired by bytes


def test_round_trip_through_both_cores() -> None:
    core, conn = new_client()
    server = ServerConnectionCore(1 << 20)
    call = CallCore("users", "get", b"42", {"traceparent": "00-ab"}, timeout=2.0, now=100.0)
    sid, waiter, data = send(core, conn, call, now=100.5)
    server.receive_data(data)
    req = server.next_request(now=7.0)  # the provider's own clock
    assert req is not None
    assert (req.service, req.method, req.body, req.metadata, req.stream_id) == ("users", "get", b"42", {"traceparent": "00-ab"}, sid)
    assert req.deadline == pytest.approx(7.0 + 1.5)  # the time left when sent, measured from receipt
    assert server.next_request(now=7.0) is None
    reply = server.response(req, Status.OK, "", b"user 42")
    assert reply is not None
    assert conn.receive_data(reply) == [waiter]
    assert core.outcome(call, waiter) == b"user 42"
    assert not conn.pending and conn.usable


def test_application_error_through_both_cores() -> None:
    core, conn = new_client()
    server = ServerConnectionCore(1 << 20)
    call = CallCore("users", "get", b"bob", None, None, now=0.0)
    _sid, waiter, data = send(core, conn, call, now=0.0)
    server.receive_data(data)
    req = server.next_request(now=0.0)
    assert req is not None and req.deadline is None
    status, error, body = outcome_of_exception(req, ApplicationError("no such user"))
    conn.receive_data(server.response(req, status, error, body) or b"")
    with pytest.raises(CallError) as info:
        core.outcome(call, waiter)
    assert (info.value.status, info.value.message) == (Status.APPLICATION_ERROR, "no such user")


@pytest.mark.parametrize(
    ("timeout", "now", "expected"),
    [(None, 5.0, 0), (2.0, 0.0, 2000), (2.0, 1.9995, 1), (2.0, 3.0, 1), (1e9, 0.0, 0xFFFFFFFF), (0.0015, 0.0, 2)],
)
def test_timeout_ms_is_the_time_left(timeout: float | None, now: float, expected: int) -> None:
    assert CallCore("s", "m", b"", None, timeout, now=0.0).timeout_ms(now) == expected


# ---------------------------------------------------------------- hot restart, GOAWAY, loss


def test_hot_restart_answer_drains_the_connection_and_says_resend() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    sid, waiter, _ = send(core, conn, call, now=0.0)
    other_sid, other, _ = send(core, conn, CallCore("s", "m", b"y", None, None, now=0.0), now=0.0)
    assert conn.receive_data(encode_response(sid, flags=Flags.HOT_RESTART, status=Status.UNAVAILABLE)) == [waiter]
    assert conn.draining and not conn.usable and core.usable_connection() is None  # new work goes elsewhere
    assert core.outcome(call, waiter) is None and core.resends == 1 and call.resends == 1
    assert not conn.drained()  # the other call is still pending on it
    assert conn.receive_data(encode_response(other_sid, b"done")) == [other]
    assert conn.drained()


def test_hot_restart_resends_are_bounded() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    for i in range(MAX_RESENDS + 1):
        waiter = Pending()
        waiter.hot_restart = True
        if i < MAX_RESENDS:
            assert core.outcome(call, waiter) is None
        else:
            with pytest.raises(CallError, match="still answered HOT_RESTART after 5 resends") as info:
                core.outcome(call, waiter)
            assert info.value.status == Status.UNAVAILABLE


def test_goaway_stops_new_work_but_pending_calls_complete() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    sid, waiter, _ = send(core, conn, call, now=0.0)
    assert conn.receive_data(encode_frame(FrameType.GOAWAY, 0, encode_header(error="hot restart"))) == []
    assert conn.goaway == "hot restart" and not conn.usable and not conn.drained()
    conn.receive_data(encode_response(sid, b"ok"))
    assert core.outcome(call, waiter) == b"ok" and conn.drained()


def test_lost_connection_fails_pending_calls_with_unavailable() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    _sid, waiter, _ = send(core, conn, call, now=0.0)
    conn.receive_data(encode_frame(FrameType.GOAWAY, 0, encode_header(error="bye")))
    assert conn.lost("closed by the peer") == [waiter]
    assert conn.lost("again") == []  # once
    with pytest.raises(CallError) as info:
        core.outcome(call, waiter)
    assert info.value.status == Status.UNAVAILABLE
    assert info.value.message == f"connection to {PATH} closed by the peer (after GOAWAY: bye)"
    core.forget(conn)
    assert core.current is None and not core.connections


def test_close_marks_waiters_closed() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    _sid, waiter, _ = send(core, conn, call, now=0.0)
    assert core.close() == [conn]
    assert conn.close() == [waiter]
    with pytest.raises(ClientClosedError):
        core.outcome(call, waiter)
    with pytest.raises(ClientClosedError):
        core.usable_connection()
    assert core.close() == []


def test_not_written_calls_move_a_bounded_number_of_times() -> None:
    core, _conn = new_client()
    call = CallCore("s", "m", b"x", None, None, now=0.0)
    for _ in range(MAX_RESENDS):
        core.not_sent(call)
    with pytest.raises(CallError, match="no connection would take the call"):
        core.not_sent(call)


# ---------------------------------------------------------------- what the peer sends a client


def test_peer_ping_and_request_get_answers_in_the_outbox() -> None:
    _core, conn = new_client()
    conn.receive_data(encode_frame(FrameType.PING, 77) + encode_request(9, "x", "y"))
    pong, refusal = frames(conn.data_to_send())
    assert (pong.type, pong.stream_id) == (FrameType.PONG, 77)
    assert (refusal.type, refusal.stream_id, refusal.header.status) == (FrameType.RESPONSE, 9, Status.NO_ROUTE)
    assert conn.data_to_send() == b""


def test_protocol_error_from_the_peer_queues_a_goaway_and_stops_reading() -> None:
    _core, conn = new_client()
    waiter = Pending()
    conn.pending[1] = waiter
    assert conn.receive_data(b"\xab\xba\x09 not a frame") == []
    assert conn.protocol_error == "closed after a protocol error from the peer: unsupported version 9"
    (goaway,) = frames(conn.data_to_send())
    assert goaway.type == FrameType.GOAWAY and goaway.header.error == "unsupported version 9"
    assert conn.receive_data(encode_response(1, b"late")) == []  # ignored from now on
    assert not conn.usable


def test_unknown_status_is_unavailable() -> None:
    core, conn = new_client()
    call = CallCore("s", "m", b"", None, None, now=0.0)
    sid, waiter, _ = send(core, conn, call, now=0.0)
    conn.receive_data(encode_response(sid, status=42, error="from the future"))
    with pytest.raises(CallError) as info:
        core.outcome(call, waiter)
    assert (info.value.status, info.value.message) == (Status.UNAVAILABLE, "unknown status 42: from the future")


def test_late_response_is_dropped() -> None:
    _core, conn = new_client()
    assert conn.receive_data(encode_response(12345, b"late")) == []
    assert conn.usable


def test_request_over_max_frame_size_is_refused_before_sending() -> None:
    core: ClientCore[ConnectionCore[Pending]] = ClientCore(PATH, 1024)
    with pytest.raises(CallError) as info:
        core.encode(CallCore("s", "m", bytes(2000), None, None, now=0.0), 1, now=0.0)
    assert info.value.status == Status.FRAME_TOO_LARGE


# ---------------------------------------------------------------- dialling


@pytest.mark.parametrize(
    ("exc", "no_proxy", "also"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), True, FileNotFoundError),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True, ConnectionRefusedError),
        (PermissionError(errno.EACCES, "Permission denied"), False, None),
    ],
)
def test_dial_failures(exc: OSError, no_proxy: bool, also: type[BaseException] | None) -> None:
    err = no_proxy_error(PATH, exc)
    assert err.status == Status.UNAVAILABLE
    assert isinstance(err, NoProxyError) is no_proxy
    if no_proxy:
        assert also is not None and isinstance(err, also) and isinstance(err, OSError) and err.errno == exc.errno
        assert err.message.startswith(f"no octoproxy listening on {PATH} (is the proxy running? outbound.uds in its config)")
    else:
        assert err.message == f"cannot connect to {PATH}: Permission denied"


def test_no_proxy_error_pickles_as_itself() -> None:
    err = no_proxy_error(PATH, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, NoProxyError) and isinstance(back, ConnectionRefusedError)
    assert (back.status, back.message, back.errno, back.path) == (err.status, err.message, errno.ECONNREFUSED, PATH)


def test_calls_queued_behind_a_failed_dial_share_its_failure() -> None:
    core: ClientCore[ConnectionCore[Pending]] = ClientCore(PATH, 1 << 20)
    seen = core.dial_attempts
    assert core.shared_dial_failure(seen) is None
    err = core.dial_failed(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert core.shared_dial_failure(seen) is err  # queued before the attempt: share it
    assert core.shared_dial_failure(core.dial_attempts) is None  # came after it: dial again


@pytest.mark.parametrize("wait", [0.0, 0.05, 1.0, 10.0])
def test_connect_delays_add_up_to_the_wait(wait: float) -> None:
    delays = connect_delays(wait)
    assert sum(delays) == pytest.approx(wait)
    assert all(0 < d <= 0.5 for d in delays) and len(delays) <= 30


# ---------------------------------------------------------------- the provider core


def test_server_core_answers_ping_and_ignores_goaway_and_strays() -> None:
    server = ServerConnectionCore(1 << 20)
    server.receive_data(encode_frame(FrameType.PING, 5) + encode_frame(FrameType.GOAWAY, 0) + encode_response(3, b"?") + encode_request(4, "s", "m"))
    req = server.next_request(now=0.0)
    assert req is not None and req.stream_id == 4
    (pong,) = frames(server.data_to_send())
    assert (pong.type, pong.stream_id) == (FrameType.PONG, 5)


def test_server_core_refuses_a_malformed_request_then_goaway() -> None:
    server = ServerConnectionCore(1 << 20)
    good = encode_request(1, "s", "m", b"in flight")
    bad = encode_frame(FrameType.REQUEST, 5, b"\x0a\x01s\x12\x01m\x1a\x02\xff\xfe", b"")  # caller is not UTF-8
    server.receive_data(good + bad)
    req = server.next_request(now=0.0)
    assert req is not None and req.stream_id == 1  # frames before the bad one are served
    assert server.next_request(now=0.0) is None and server.error is not None
    refusal, goaway = frames(server.data_to_send())
    assert (refusal.stream_id, refusal.header.status) == (5, Status.PROTOCOL_ERROR)
    assert goaway.type == FrameType.GOAWAY
    server.receive_data(encode_request(6, "s", "m"))
    assert server.next_request(now=0.0) is None  # nothing more is read


def test_oneway_gets_no_response() -> None:
    server = ServerConnectionCore(1 << 20)
    server.receive_data(encode_request(1, "log", "append", b"x", oneway=True))
    req = server.next_request(now=0.0)
    assert req is not None and req.oneway and server.response(req, Status.OK, "", b"ignored") is None


def test_response_over_max_frame_size_becomes_frame_too_large() -> None:
    req = Request("s", "m", b"", stream_id=3)
    (f,) = frames(response_frame(req, Status.OK, "", bytes(5000), 1024))
    assert f.stream_id == 3 and f.header.status == Status.FRAME_TOO_LARGE


def test_handler_outcomes() -> None:
    req = Request("s", "m", b"", stream_id=1, deadline=10.0)
    assert outcome_of_exception(req, ApplicationError("why")) == (Status.APPLICATION_ERROR, "why", b"")
    assert outcome_of_exception(req, ZeroDivisionError()) == (Status.APPLICATION_ERROR, "internal error: ZeroDivisionError", b"")
    assert check_body(bytearray(b"ab")) == b"ab"
    with pytest.raises(TypeError, match="handler returned str, not bytes"):
        check_body("text")
    assert not expired(req, 9.99) and expired(req, 10.0)
    assert not expired(Request("s", "m", b""), 1e12)
