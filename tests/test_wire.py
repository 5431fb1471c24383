"""Tests of the client↔node protocol: frames, envelopes, request schemas, and the transports.

Tables carry the schema cases (one row per bad request with its code and the words its message
must contain); hypothesis fuzzes the decoder with garbage; a real asyncio server on 127.0.0.1
checks that a half-sent frame is dropped on time.  Deadlines, never sleeps, synchronise.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftpay import wire
from raftpay.codes import Code, FrameTooLarge, ProtocolError
from raftpay.wire import WireError


def payload_of(frame: bytes) -> bytes:
    (n,) = struct.unpack(">I", frame[:4])
    assert len(frame) == 4 + n
    return frame[4:]


def raw(obj, **kw) -> bytes:
    """A payload packed by hand, to say things `encode` refuses to say."""
    return msgpack.packb(obj, use_bin_type=True, **kw)


def envelope(type_="ping", id_=1, body=None, v=wire.VERSION) -> dict:
    return {"v": v, "type": type_, "id": id_, "body": {} if body is None else body}


# --- Round trips ----------------------------------------------------------------------------------

GOOD_REQUESTS = [
    ("ping", {}),
    ("status", {}),
    ("register_session", {}),
    ("keep_alive", {"session": 7}),
    ("submit", {"events": [{"op": "create_account", "id": 1, "currency": 840}]}),
    ("submit", {"events": [{}] * wire.MAX_EVENTS, "session": 3, "seq": 1, "ack": 0}),
    ("submit", {"events": [{"op": "x"}], "session": 2**64 - 1, "seq": 2**64 - 1}),
    ("submit", {"keys": ["op", "id"], "rows": [["create_account", 1], ["x", None]]}),
    ("submit", {"keys": ["op"], "rows": [[1]] * wire.MAX_EVENTS, "session": 3, "seq": 1}),
    ("lookup_accounts", {"ids": [1, "acct-2", 2**64 - 1]}),
    ("lookup_accounts", {"ids": [1], "consistency": "follower", "min_version": 0}),
    ("lookup_transfers", {"ids": ["t"] * wire.MAX_IDS, "consistency": "linearizable"}),
    ("account_transfers", {"account": "a"}),
    ("account_transfers", {"account": 5, "limit": 10_000, "cursor": 0, "consistency": "follower",
                           "min_version": 12}),
]


@pytest.mark.parametrize("type_,body", GOOD_REQUESTS, ids=[t for t, _ in GOOD_REQUESTS])
def test_good_requests_round_trip_and_validate(type_, body):
    frame = wire.encode(type_, 42, body)
    env = wire.decode(payload_of(frame))
    assert env == wire.Envelope(wire.VERSION, type_, 42, body)
    wire.validate_request(env)


def test_reply_round_trip():
    frame = wire.reply(2**64 - 1, Code.NOT_LEADER, message="ask n2", leader="127.0.0.1:7102",
                       results=[[0, 1]], version=9)
    env = wire.decode(payload_of(frame))
    assert env.type == wire.REPLY and env.id == 2**64 - 1
    assert env.body == {"code": 110, "message": "ask n2", "leader": "127.0.0.1:7102",
                        "results": [[0, 1]], "version": 9}
    assert type(env.body["code"]) is int
    wire.validate_reply(env)


def test_binary_and_unicode_values_survive():
    body = {"events": [{"user_data": b"\x00\xff", "note": "zürich ✓"}]}
    assert wire.decode(payload_of(wire.encode("submit", 1, body))).body == body


def test_encode_refuses_misuse_and_oversized_frames():
    with pytest.raises(ValueError):
        wire.encode("ping", -1, {})
    with pytest.raises(ValueError):
        wire.encode("ping", 2**64, {})
    with pytest.raises(TypeError):
        wire.encode("ping", 1, [])
    for big in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"submit body holds an integer outside"):
            wire.encode("submit", 1, {"events": [{"amount": big}]})
    with pytest.raises(FrameTooLarge):
        wire.encode("submit", 1, {"events": [{"blob": b"x" * 2000}]}, max_bytes=1000)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(wire.REQUEST_TYPES), st.integers(0, 2**64 - 1),
       st.dictionaries(st.text(max_size=6), st.deferred(lambda: msgpack_values), max_size=20),
       st.data())
def test_a_packed_body_encodes_byte_for_byte_as_encode_does(type_, id_, body, data):
    """A client's retry sends the body packed once (`PackedBody`) with its extra keys; the
    frame is exactly `encode`'s, whatever the values and however the keys split (map headers
    change size at 16 keys)."""
    extra_keys = data.draw(st.sets(st.sampled_from(sorted(body)) if body else st.nothing()))
    base = {k: v for k, v in body.items() if k not in extra_keys}
    extra = {k: v for k, v in body.items() if k in extra_keys}
    assert wire.encode_packed(type_, id_, wire.PackedBody(base), extra) == \
        wire.encode(type_, id_, {**base, **extra})


def test_encode_packed_refuses_what_encode_refuses():
    packed = wire.PackedBody({"events": [{"op": "x"}]})
    with pytest.raises(ValueError, match="id must be"):
        wire.encode_packed("submit", 2**64, packed)
    with pytest.raises(TypeError, match="type must be str"):
        wire.encode_packed(b"submit", 1, packed)
    with pytest.raises(TypeError, match="body must be a dict"):
        wire.PackedBody([("events", [])])
    with pytest.raises(ValueError, match=r"request body holds an integer outside"):
        wire.PackedBody({"events": [{"amount": 2**64}]})
    with pytest.raises(ValueError, match=r"submit body holds an integer outside"):
        wire.encode_packed("submit", 1, packed, {"ack": -2**63 - 1})
    with pytest.raises(ValueError, match=r"extra keys \['events'\] are in the body already"):
        wire.encode_packed("submit", 1, packed, {"events": [], "ack": 1})
    with pytest.raises(FrameTooLarge):
        wire.encode_packed("submit", 1, wire.PackedBody({"blob": b"x" * 2000}), max_bytes=1000)


# --- Envelope errors ------------------------------------------------------------------------------

BAD_PAYLOADS = [
    # (payload, words the message must contain, request_id the error must carry)
    (b"", ["not valid msgpack"], None),
    (b"\xc1", ["not valid msgpack"], None),  # the one byte msgpack never uses
    (raw(envelope()) + b"\x00", ["not valid msgpack", "extra data"], None),
    (raw([1, "ping", 1, {}]), ["envelope", "got list", "v, type, id, body"], None),
    (raw(5), ["envelope", "got integer"], None),
    (raw({1: 2}), ["not valid msgpack", "map key"], None),  # strict_map_key
    (raw({"v": 1, "type": "ping", "id": 3}), ["missing 'body'"], 3),
    (raw({**envelope(id_=4), "extra": 1}), ["unknown 'extra'", "exactly the keys"], 4),
    (raw(envelope(v="1")), ["envelope.v", "string '1'", "an integer"], 1),
    (raw(envelope(v=True)), ["envelope.v", "boolean"], 1),
    (raw(envelope(type_=b"ping")), ["envelope.type", "binary"], 1),
    (raw(envelope(id_=-1)), ["envelope.id", "integer -1", "0..2**64-1"], None),
    (raw(envelope(id_=True)), ["envelope.id", "boolean"], None),
    (raw(envelope(id_="7")), ["envelope.id", "string '7'"], None),
    (raw(envelope(body=[])), ["envelope.body", "list", "a map with string keys"], 1),
    (raw(envelope(body={b"events": []})), ["envelope.body", "binary", "string keys only"], 1),
    (raw(envelope(body={"t": msgpack.ExtType(5, b"ab")})), ["not valid msgpack"], None),
    (raw(envelope(body={"t": msgpack.ExtType(5, b"")})), ["not valid msgpack", "extension"], None),
    (raw(envelope(body={"t": msgpack.Timestamp(1, 0)})), ["not valid msgpack"], None),
    (raw(envelope()).replace(b"ping", b"p\xffng"), ["not valid msgpack"], None),  # bad UTF-8
    # A str32 header announcing 4 GiB: refused by the length bounds, not by trying to allocate.
    (b"\x81\xa1v\xdb\xff\xff\xff\xff", ["not valid msgpack"], None),
    (b"\xdd\xff\xff\xff\xff", ["not valid msgpack"], None),  # array32 of 4G items
    (b"\x91" * 100_000, ["not valid msgpack"], None),  # nested beyond the decoder's stack
]


@pytest.mark.parametrize("payload,words,request_id", BAD_PAYLOADS)
def test_bad_payloads_raise_invalid_request(payload, words, request_id):
    with pytest.raises(WireError) as info:
        wire.decode(payload)
    assert info.value.code == Code.INVALID_REQUEST
    for w in words:
        assert w in str(info.value)
    assert info.value.request_id == request_id


def test_decode_refuses_payload_beyond_max_bytes():
    with pytest.raises(FrameTooLarge):
        wire.decode(raw(envelope()), max_bytes=5)


# --- Request schema errors ------------------------------------------------------------------------

BAD_REQUESTS = [
    # (type, body, code, words the message must contain)
    ("nope", {}, Code.INVALID_REQUEST,
     ["unknown request type 'nope'", "known: ping, status, register_session, keep_alive, submit"]),
    ("reply", {"code": 0}, Code.INVALID_REQUEST, ["unknown request type 'reply'"]),
    ("ping", {"x": 1}, Code.INVALID_REQUEST, ["ping: unknown key 'x'", "must be empty"]),
    ("status", {"x": 1}, Code.INVALID_REQUEST, ["status: unknown key 'x'"]),
    ("register_session", {"session": 1}, Code.INVALID_REQUEST, ["register_session: unknown key"]),
    ("keep_alive", {}, Code.INVALID_REQUEST, ["keep_alive.session: missing"]),
    ("keep_alive", {"session": "1"}, Code.INVALID_REQUEST,
     ["keep_alive.session: got string '1'", "0..2**64-1"]),
    ("keep_alive", {"session": 1, "seq": 1}, Code.INVALID_REQUEST,
     ["keep_alive: unknown key 'seq'", "allowed keys: session"]),
    ("submit", {}, Code.INVALID_REQUEST, ["submit.events: missing"]),
    ("submit", {"events": []}, Code.INVALID_REQUEST, ["submit.events: got an empty list", "1..10000"]),
    ("submit", {"events": {"op": "x"}}, Code.INVALID_REQUEST, ["submit.events: got map", "list of"]),
    ("submit", {"events": [{}, [1]]}, Code.INVALID_REQUEST, ["submit.events: item 1 is list", "event maps"]),
    ("submit", {"events": [{}] * (wire.MAX_EVENTS + 1)}, Code.BATCH_TOO_LARGE,
     ["submit.events: got 10001 events", "at most 10000", "split the batch"]),
    ("submit", {"events": [{}], "evnts": 1}, Code.INVALID_REQUEST,
     ["submit: unknown key 'evnts'", "allowed keys: events, keys, rows, session, seq, ack"]),
    # The compact form: keys with rows, never with events.
    ("submit", {"events": [{}], "keys": ["op"], "rows": [["x"]]}, Code.INVALID_REQUEST,
     ["submit: both events and keys/rows given", "one of the two"]),
    ("submit", {"keys": ["op"]}, Code.INVALID_REQUEST, ["submit.rows: missing", "with keys"]),
    ("submit", {"rows": [["x"]]}, Code.INVALID_REQUEST, ["submit.keys: missing", "with rows"]),
    ("submit", {"keys": [], "rows": [[]]}, Code.INVALID_REQUEST,
     ["submit.keys: got a list of 0 names", "distinct field names"]),
    ("submit", {"keys": ["op", 1], "rows": [["x", 1]]}, Code.INVALID_REQUEST,
     ["submit.keys: item 1 is integer 1", "strings"]),
    ("submit", {"keys": ["id", "id"], "rows": [[1, 2]]}, Code.INVALID_REQUEST,
     ["submit.keys: a name appears twice"]),
    ("submit", {"keys": "op", "rows": [["x"]]}, Code.INVALID_REQUEST,
     ["submit.keys: got string 'op'"]),
    ("submit", {"keys": ["op"], "rows": []}, Code.INVALID_REQUEST,
     ["submit.rows: got an empty list", "1..10000 rows"]),
    ("submit", {"keys": ["op"], "rows": {"op": "x"}}, Code.INVALID_REQUEST, ["submit.rows: got map"]),
    ("submit", {"keys": ["op", "id"], "rows": [["x", 1], ["x"]]}, Code.INVALID_REQUEST,
     ["submit.rows: item 1 is list of 1 items", "a list of 2 values"]),
    ("submit", {"keys": ["op"], "rows": [["x"], {"op": "x"}]}, Code.INVALID_REQUEST,
     ["submit.rows: item 1 is map"]),
    ("submit", {"keys": ["op"], "rows": [["x"]] * (wire.MAX_EVENTS + 1)}, Code.BATCH_TOO_LARGE,
     ["submit.rows: got 10001 events", "at most 10000", "split the batch"]),
    ("submit", {"keys": ["op"], "rows": [["x"]], "session": 1}, Code.INVALID_REQUEST,
     ["submit.seq: missing", "required when session is given"]),
    ("submit", {"events": [{}], "session": 1}, Code.INVALID_REQUEST,
     ["submit.seq: missing", "required when session is given"]),
    ("submit", {"events": [{}], "seq": 1}, Code.INVALID_REQUEST, ["submit.session: missing"]),
    ("submit", {"events": [{}], "ack": 1}, Code.INVALID_REQUEST, ["submit.session: missing"]),
    ("submit", {"events": [{}], "session": 1, "seq": 0}, Code.INVALID_REQUEST,
     ["submit.seq: got integer 0", "1..2**64-1"]),
    ("submit", {"events": [{}], "session": -1, "seq": 1}, Code.INVALID_REQUEST,
     ["submit.session: got integer -1"]),
    ("submit", {"events": [{}], "session": 1, "seq": 1, "ack": True}, Code.INVALID_REQUEST,
     ["submit.ack: got boolean True"]),
    ("submit", {"events": [{}], "session": 1, "seq": 1.0}, Code.INVALID_REQUEST,
     ["submit.seq: got float 1.0"]),
    ("lookup_accounts", {}, Code.INVALID_REQUEST, ["lookup_accounts.ids: missing"]),
    ("lookup_accounts", {"ids": []}, Code.INVALID_REQUEST,
     ["lookup_accounts.ids: got a list of 0 ids", "1..10000 ids"]),
    ("lookup_accounts", {"ids": [1] * (wire.MAX_IDS + 1)}, Code.INVALID_REQUEST,
     ["lookup_accounts.ids: got a list of 10001 ids"]),
    ("lookup_accounts", {"ids": 1}, Code.INVALID_REQUEST, ["lookup_accounts.ids: got integer 1"]),
    ("lookup_accounts", {"ids": [1, None]}, Code.INVALID_REQUEST,
     ["lookup_accounts.ids: item 1 is nil", "an integer or a string"]),
    ("lookup_accounts", {"ids": [b"x"]}, Code.INVALID_REQUEST, ["item 0 is binary"]),
    ("lookup_accounts", {"ids": [1], "consistency": "strong"}, Code.INVALID_REQUEST,
     ["lookup_accounts.consistency: got string 'strong'", "'linearizable' or 'follower'"]),
    ("lookup_transfers", {"ids": [1], "min_version": -1}, Code.INVALID_REQUEST,
     ["lookup_transfers.min_version: got integer -1", "0..2**64-1"]),
    ("lookup_transfers", {"ids": [1], "limit": 3}, Code.INVALID_REQUEST,
     ["lookup_transfers: unknown key 'limit'", "allowed keys: ids, consistency, min_version"]),
    ("account_transfers", {}, Code.INVALID_REQUEST, ["account_transfers.account: missing"]),
    ("account_transfers", {"account": [1]}, Code.INVALID_REQUEST,
     ["account_transfers.account: got list", "an integer or a string id"]),
    ("account_transfers", {"account": 1, "limit": 0}, Code.INVALID_REQUEST,
     ["account_transfers.limit: got integer 0", "1..10000"]),
    ("account_transfers", {"account": 1, "limit": 10_001}, Code.INVALID_REQUEST,
     ["account_transfers.limit: got integer 10001"]),
    ("account_transfers", {"account": 1, "cursor": -5}, Code.INVALID_REQUEST,
     ["account_transfers.cursor: got integer -5"]),
    ("account_transfers", {"account": 1, "consistency": 1}, Code.INVALID_REQUEST,
     ["account_transfers.consistency: got integer 1"]),
]


@pytest.mark.parametrize("type_,body,code,words", BAD_REQUESTS,
                         ids=[f"{t}-{i}" for i, (t, *_rest) in enumerate(BAD_REQUESTS)])
def test_bad_requests_name_key_and_allowed(type_, body, code, words):
    env = wire.decode(payload_of(wire.encode(type_, 99, body)))
    with pytest.raises(WireError) as info:
        wire.validate_request(env)
    assert info.value.code == code
    assert info.value.request_id == 99
    for w in words:
        assert w in str(info.value), str(info.value)


def test_unsupported_version_names_the_supported_one():
    env = wire.decode(raw(envelope(v=2, id_=8)))
    with pytest.raises(WireError) as info:
        wire.validate_request(env)
    assert info.value.code == Code.INVALID_REQUEST
    assert "unsupported protocol version 2" in str(info.value)
    assert f"supports version {wire.VERSION}" in str(info.value)


def test_wire_error_is_a_protocol_error():
    assert issubclass(WireError, ProtocolError)
    assert issubclass(wire.FrameTimeout, ProtocolError)
    assert issubclass(wire.ConnectionClosed, ProtocolError)


@pytest.mark.parametrize("body", [{}, {"code": "0"}, {"code": None}, {"code": False}])
def test_validate_reply_requires_an_int_code(body):
    with pytest.raises(WireError, match="reply.code"):
        wire.validate_reply(wire.decode(raw(envelope(type_="reply", body=body))))


def test_validate_reply_refuses_a_request():
    with pytest.raises(WireError, match="envelope.type"):
        wire.validate_reply(wire.decode(raw(envelope(type_="ping"))))


# --- Fuzz -----------------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.binary(max_size=3),
                                                                inner, max_size=4),
    max_leaves=20,
)


def decode_and_validate(payload: bytes) -> None:
    try:
        env = wire.decode(payload)
        wire.validate_request(env)
    except (WireError, FrameTooLarge):
        pass


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_garbage_bytes_only_raise_wire_errors(data):
    decode_and_validate(data)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_fuzz_any_msgpack_value_only_raises_wire_errors(value):
    decode_and_validate(raw(value))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*wire.REQUEST_TYPES, "reply", "x"]),
    st.dictionaries(
        st.sampled_from(["events", "session", "seq", "ack", "ids", "consistency", "min_version",
                         "account", "limit", "cursor", "code", "zz"]),
        msgpack_values,
        max_size=5,
    ),
)
def test_fuzz_near_valid_requests_only_raise_wire_errors(type_, body):
    decode_and_validate(raw(envelope(type_=type_, body=body)))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([r for r in GOOD_REQUESTS if len(raw(r[1])) < 1000]), st.data())
def test_fuzz_mutated_frames_only_raise_wire_errors(request, data):
    payload = bytearray(payload_of(wire.encode(request[0], 1, request[1])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    decode_and_validate(bytes(payload[:cut]))


# --- asyncio transport: a real server on 127.0.0.1 ------------------------------------------------


async def serve_one(handler):
    """Start a server whose handler's outcome (return value or exception) lands in a future."""
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        try:
            outcome.set_result(await handler(reader, writer))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, outcome


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_asyncio_round_trip_echo():
    async def main():
        async def handler(reader, writer):
            env = wire.decode(await wire.read_frame(reader, timeout_s=5))
            wire.validate_request(env)
            await wire.write_frame(writer, wire.reply(env.id, Code.OK, echo=env.body))
            return await wire.read_frame(reader, timeout_s=5)  # then a clean EOF

        server, port, outcome = await serve_one(handler)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await wire.write_frame(writer, wire.encode("keep_alive", 11, {"session": 5}))
            env = wire.decode(await wire.read_frame(reader, timeout_s=5))
            assert env.id == 11 and env.body == {"code": 0, "echo": {"session": 5}}
            writer.close()
            assert await outcome is None

    run(main())


def test_half_frame_then_stall_is_dropped_after_the_frame_timeout():
    frame_timeout_s = 0.3

    async def main():
        async def handler(reader, writer):
            return await wire.read_frame(reader, timeout_s=frame_timeout_s)

        server, port, outcome = await serve_one(handler)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            frame = wire.encode("ping", 1, {})
            started = time.monotonic()
            writer.write(frame[:6])  # the prefix and part of the payload, then nothing
            await writer.drain()
            with pytest.raises(wire.FrameTimeout):
                await outcome
            # The server closed the connection: the client sees EOF.
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""
            elapsed = time.monotonic() - started
            assert frame_timeout_s * 0.9 <= elapsed < frame_timeout_s + 3
            writer.close()

    run(main())


def test_half_prefix_then_stall_is_dropped_too():
    async def main():
        server, port, outcome = await serve_one(lambda r, w: wire.read_frame(r, timeout_s=0.2))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\x00")
            await writer.drain()
            with pytest.raises(wire.FrameTimeout):
                await outcome
            writer.close()

    run(main())


def test_oversized_prefix_is_refused_before_the_body_arrives():
    async def main():
        # A long frame timeout: the refusal must come from the prefix alone, not from waiting.
        server, port, outcome = await serve_one(
            lambda r, w: wire.read_frame(r, max_bytes=1024, timeout_s=30))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(struct.pack(">I", 1025))
            await writer.drain()
            with pytest.raises(FrameTooLarge, match="1025"):
                await outcome
            assert time.monotonic() - started < 5
            writer.close()

    run(main())


def test_eof_mid_frame_is_a_protocol_error():
    async def main():
        server, port, outcome = await serve_one(lambda r, w: wire.read_frame(r, timeout_s=5))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(wire.encode("ping", 1, {})[:-1])
            await writer.drain()
            writer.close()
            with pytest.raises(ProtocolError, match="mid-frame") as info:
                await outcome
            assert type(info.value) is ProtocolError

    run(main())


def test_idle_timeout_is_a_timeout_error():
    async def main():
        server, port, outcome = await serve_one(
            lambda r, w: wire.read_frame(r, timeout_s=5, idle_timeout_s=0.1))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(TimeoutError):
                await outcome
            writer.close()

    run(main())


# --- Blocking-socket transport --------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_sync_round_trip(pair):
    a, b = pair
    wire.send_frame(a, wire.encode("ping", 3, {}))
    wire.send_frame(a, wire.reply(3, Code.OK))
    assert wire.decode(wire.recv_frame(b, timeout_s=5)).type == "ping"
    assert wire.decode(wire.recv_frame(b, timeout_s=5)).body == {"code": 0}
    assert b.gettimeout() is None  # restored


def test_sync_clean_eof_is_connection_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.recv_frame(b, timeout_s=5)


def test_sync_eof_mid_frame_is_protocol_error(pair):
    a, b = pair
    a.sendall(wire.encode("ping", 3, {})[:-2])
    a.close()
    with pytest.raises(ProtocolError, match="mid-frame") as info:
        wire.recv_frame(b, timeout_s=5)
    assert type(info.value) is ProtocolError


def test_sync_oversized_prefix_refused_before_body(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 2**32 - 1))
    with pytest.raises(FrameTooLarge):
        wire.recv_frame(b, max_bytes=1024, timeout_s=5)


def test_sync_deadline_covers_the_whole_frame(pair):
    a, b = pair
    a.sendall(wire.encode("ping", 3, {})[:5])
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wire.recv_frame(b, timeout_s=0.2)
    assert 0.18 <= time.monotonic() - started < 3
    assert b.gettimeout() is None


# --- FrameBuffer: the protocols' incremental splitter ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_frame_buffer_returns_every_frame_whatever_the_pieces(bodies, cuts):
    stream = b"".join(wire.PREFIX.pack(len(b)) + b for b in bodies)
    edges = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    fb = wire.FrameBuffer(1000)
    got = []
    for a, b in zip(edges, edges[1:]):
        got += fb.feed(stream[a:b])
    assert got == bodies and not fb.partial and fb.error is None


def test_frame_buffer_flags_a_partial_frame_and_an_oversized_announcement():
    fb = wire.FrameBuffer(100)
    frame = wire.encode("ping", 7, {})
    assert fb.feed(frame[:3]) == [] and fb.partial
    assert [wire.decode(p).id for p in fb.feed(frame[3:])] == [7] and not fb.partial
    # A good frame, then a prefix announcing 101 bytes: the good one still comes out.
    out = fb.feed(frame + wire.PREFIX.pack(101) + b"x")
    assert [wire.decode(p).id for p in out] == [7]
    assert isinstance(fb.error, FrameTooLarge) and "101" in str(fb.error)
    assert fb.feed(frame) == []  # a stopped buffer stays stopped
