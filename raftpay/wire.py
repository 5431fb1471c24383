"""The client↔node protocol: one framed msgpack envelope, never pickle.

Design: every message on a client connection is a *frame* — a 4-byte big-endian unsigned length N
followed by N bytes of msgpack — holding one *envelope*, a map with exactly the keys
`v` (protocol version), `type` (what the message is), `id` (a 64-bit number the client picks and
the reply echoes, so replies can be matched and retries recognised) and `body` (a map with string
keys).  rqlite's `command.proto` is the model: one envelope, a small closed set of request types,
and a schema per type that is checked before anything is proposed to Raft.

The bytes come from anyone who can reach the client port, so decoding is defensive: the length
prefix is checked against a limit before the body is read (a 4 GB announcement costs nothing),
msgpack runs with every container and string bounded by the frame size, map keys restricted to
strings, extension types (including the built-in timestamp) refused, and trailing bytes refused.
Whatever the bytes are, `decode` raises `WireError` and nothing else.  pickle never appears here:
it would let any client run code on a node.

This module checks the *shape* of a request (which keys, which types, which ranges).  The events
inside `submit` are the ledger's business — it returns one result code per event — so here they
are only required to be maps.  A request that fails here is answered with `invalid_request` or
`batch_too_large` and never reaches Raft.

A `submit` carries its events in one of two forms: `events`, a list of maps, or the compact
`keys` (a list of distinct field names) with `rows` (a list of lists as long as `keys`), which
stands for exactly the events `[dict(zip(keys, row)) for row in rows]`.  The compact form is
what the ledger keeps in a Raft entry anyway (`ledger.events_as_rows`); a client that sends it
(`client.py` does for a batch of like events) saves the node decoding the maps and rebuilding
them: the harness's 8,000-transfer request is 263 kB instead of 767 kB, and decoding and checking
it takes 3.6 ms instead of 10.1 ms plus 4.7 ms to make the rows.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any, Callable, NamedTuple

import msgpack

from raftpay.codes import Code, FrameTooLarge, ProtocolError

#: The only protocol version this code speaks.  A change to the envelope or to a body schema that
#: an older peer would misread bumps it.
VERSION = 1

#: Default bound on one frame's payload (after the 4-byte prefix), both directions.
MAX_FRAME_BYTES = 16 * 1024 * 1024

#: Most events one `submit` may carry; more is `batch_too_large` (split the batch).
MAX_EVENTS = 10_000

#: Most ids one lookup may name, and the largest `limit` of `account_transfers`.
MAX_IDS = 10_000

#: Largest value of an unsigned 64-bit field (`id`, `session`, `seq`, ...).
U64_MAX = 2**64 - 1

#: The length prefix: 4 bytes, big-endian, unsigned.  It also caps any frame at 2**32 - 1 bytes.
PREFIX = struct.Struct(">I")
PREFIX_BYTES = PREFIX.size
MAX_PREFIX_VALUE = 2**32 - 1

#: The type of every message a node sends back.
REPLY = "reply"

#: Read consistency a lookup may ask for.  `linearizable` reads go through the leader and reflect
#: every write acknowledged before the read began; `follower` reads are served by whichever node
#: answers, as of its applied state (optionally no older than `min_version`).
CONSISTENCY = ("linearizable", "follower")

_ENVELOPE_KEYS = ("v", "type", "id", "body")


class WireError(ProtocolError):
    """A frame that does not decode, or a request that does not follow its schema.

    `code` is the `Code` to answer with (`INVALID_REQUEST` or `BATCH_TOO_LARGE`); `message` names
    the offending key and what is allowed.  `request_id` is the envelope's `id` when it could be
    read (so the server can echo it in the error reply), else None.
    """

    def __init__(self, code: Code, message: str, request_id: int | None = None):
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(message)


class FrameTimeout(ProtocolError):
    """A peer started a frame and did not finish it within the frame timeout."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection cleanly, between frames (sync `recv_frame` only)."""


class Envelope(NamedTuple):
    """One decoded message.  `body` is a dict with str keys; nothing in it is checked yet."""

    v: int
    type: str
    id: int
    body: dict[str, Any]


# --- Encoding -------------------------------------------------------------------------------------


def encode(type: str, id: int, body: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The whole frame (length prefix included) for one envelope.

    Pure; safe from any thread.  Raises `FrameTooLarge` when the payload would exceed `max_bytes`
    (the peer would refuse it anyway), and `TypeError`/`ValueError` on misuse (a body that is not a
    dict, an id outside 0..2**64-1, a value msgpack cannot pack).
    """
    _check_head(type, id)
    if not isinstance(body, dict):
        raise TypeError(f"body must be a dict, got {_kind(body)}")
    try:
        payload = msgpack.packb({"v": VERSION, "type": type, "id": id, "body": body},
                                use_bin_type=True)
    except OverflowError as e:
        raise _int_too_large(type, e) from None
    return _framed(type, payload, max_bytes)


class PackedBody:
    """A request body packed once, for a sender that may send it several times under new ids
    (a client's retries): `encode_packed` then costs a copy, not a packing.  An 8,000-transfer
    batch took the client ~1.2 ms to pack on every attempt, and a leader flooded with such
    batches answers most attempts `overloaded`.

    Raises what `encode` raises on a body it cannot carry, at construction."""

    __slots__ = ("keys", "items")

    def __init__(self, body: dict[str, Any]):
        if not isinstance(body, dict):
            raise TypeError(f"body must be a dict, got {_kind(body)}")
        self.keys = frozenset(body)
        try:
            self.items = _pack_items(body, msgpack.Packer(use_bin_type=True))
        except OverflowError as e:
            raise _int_too_large("request", e) from None


def encode_packed(type: str, id: int, body: PackedBody, extra: dict[str, Any] | None = None,
                  max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The same bytes as `encode(type, id, {**body, **extra})`, for a body packed before
    (`PackedBody`) and a few `extra` keys that change between sends (a session's `ack`).
    Raises what `encode` raises."""
    _check_head(type, id)
    extra = extra or {}
    if not extra.keys().isdisjoint(body.keys):
        raise ValueError(f"extra keys {sorted(extra.keys() & body.keys)} are in the body already")
    packer = msgpack.Packer(use_bin_type=True)
    try:
        payload = b"".join((_ENVELOPE_HEAD, packer.pack(type), b"\xa2id", packer.pack(id),
                            b"\xa4body", packer.pack_map_header(len(body.keys) + len(extra)),
                            body.items, _pack_items(extra, packer)))
    except OverflowError as e:
        raise _int_too_large(type, e) from None
    return _framed(type, payload, max_bytes)


#: msgpack of a 4-key map's header and its first key and value, `{"v": VERSION, "type": ...`;
#: `encode_packed` writes the rest of the envelope as `encode`'s packb does.
_ENVELOPE_HEAD = b"\x84\xa1v" + msgpack.packb(VERSION) + b"\xa4type"


def _pack_items(d: dict[str, Any], packer: msgpack.Packer) -> bytes:
    return b"".join([packer.pack(k) + packer.pack(v) for k, v in d.items()])


def _check_head(type: str, id: int) -> None:
    if not isinstance(type, str):
        raise TypeError(f"type must be str, got {_kind(type)}")
    if not _is_u64(id):
        raise ValueError(f"id must be an int in 0..2**64-1, got {id!r}")


def _int_too_large(what: str, e: OverflowError) -> ValueError:
    """msgpack's OverflowError as the ValueError `encode` documents."""
    return ValueError(f"{what} body holds an integer outside -2**63..2**64-1, which the "
                      f"protocol cannot carry ({e})")


def _framed(type: str, payload: bytes, max_bytes: int) -> bytes:
    limit = min(max_bytes, MAX_PREFIX_VALUE)
    if len(payload) > limit:
        raise FrameTooLarge(f"{type} frame of {len(payload)} bytes exceeds the limit of {limit}")
    return PREFIX.pack(len(payload)) + payload


def peek(payload: bytes) -> tuple[str, int] | None:
    """A request's (type, id) read from the first bytes of its payload, without decoding the
    body, when the envelope's first three keys are v, type and id as `encode` writes them;
    None otherwise (the caller then decodes it as usual).  For refusing a large request before
    paying for its body.  Pure; raises nothing."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64)
        unpacker.feed(payload[:64])
        if unpacker.read_map_header() < 4:
            return None
        head = [unpacker.unpack() for _ in range(6)]
    except Exception:
        return None
    if head[0:5:2] != ["v", "type", "id"] or not isinstance(head[3], str) \
            or not _is_u64(head[5]):
        return None
    return head[3], head[5]


def wrong_port_reply(payload: bytes, port: str, client_addr: str | None) -> bytes | None:
    """The reply to `payload` if it is a client's request sent to a node's `port` for its
    peers (e.g. "node n1's Raft port"): `invalid_request`, saying nothing was applied and
    where clients connect (`client_addr`, if known).  None if it is no request.  Pure."""
    try:
        env = decode(payload)
    except ProtocolError:
        return None
    where = f"its client_addr, {client_addr}" if client_addr else "the nodes' client_addr"
    return reply(env.id, Code.INVALID_REQUEST, message=(
        f"{port}, for its peers; nothing was applied. Clients connect to {where}"))


def reply(id: int, code: int, /, **fields: Any) -> bytes:
    """The frame of a reply to request `id`: body `{"code": int(code), **fields}`.

    Bounded by the default `MAX_FRAME_BYTES`; a server configured for larger frames calls
    `encode(REPLY, id, body, max_bytes)` itself.
    """
    return encode(REPLY, id, {"code": int(code), **fields})


# --- Framing for protocol-style readers ----------------------------------------------------------


class FrameBuffer:
    """Splits a byte stream into frame payloads, incrementally (sans-I/O: the asyncio protocols
    of the server and the async client feed it whatever `data_received` got).

    `feed(data)` returns the payloads completed by `data`, in order.  A prefix announcing more
    than `max_bytes` sets `error` (a `FrameTooLarge`) and stops the buffer: the stream is out of
    step, close it.  Frames before the bad prefix are still returned.  A frame arriving in many
    pieces is joined once, when its last piece arrives, not re-copied per piece.
    """

    __slots__ = ("max_bytes", "error", "_buf", "_need")

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES):
        self.max_bytes = max_bytes
        self.error: FrameTooLarge | None = None
        self._buf = bytearray()
        self._need = 0  # bytes the buffered frame needs before it can be parsed further

    @property
    def partial(self) -> bool:
        """True while part of a frame is buffered (the server times such frames out)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        out = []
        pos, n, limit = 0, len(data), self.max_bytes
        while n - pos >= PREFIX_BYTES:
            size = int.from_bytes(data[pos:pos + PREFIX_BYTES], "big")
            if size > limit:
                self.error = FrameTooLarge(f"frame announces {size} bytes; the limit is {limit}")
                return out
            end = pos + PREFIX_BYTES + size
            if end > n:
                self._need = end - pos
                break
            out.append(data[pos + PREFIX_BYTES:end])
            pos = end
        else:
            self._need = PREFIX_BYTES
        if pos < n:
            buf += memoryview(data)[pos:]
        return out


# --- Decoding -------------------------------------------------------------------------------------


class _ExtRefused(Exception):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    # Extension types would let a peer smuggle values the rest of the code never expects.
    raise _ExtRefused(f"msgpack extension type {code} is not allowed")


def decode(payload: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Decode the part of a frame after the length prefix into an `Envelope`.

    Checks the envelope (exactly the keys v, type, id, body; v an int, type a str, id in
    0..2**64-1, body a map with str keys) but not the version or the body's schema — that is
    `validate_request` — so that a reply can still echo the id.  Pure; safe from any thread.

    Raises `FrameTooLarge` if `payload` is longer than `max_bytes`, else `WireError`
    (`INVALID_REQUEST`) for anything malformed.  It raises nothing else, whatever the bytes.
    """
    if len(payload) > max_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the limit of {max_bytes}")
    # Every msgpack element takes at least one byte, so no string, array or map inside a payload
    # can honestly be longer than the payload; a header announcing more is an attack or garbage,
    # and bounding by it stops msgpack from pre-allocating for it.
    n = max(len(payload), 1)
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2 or 1,
            # Zero also refuses the timestamp extension (-1), which msgpack decodes by itself
            # without asking ext_hook.
            max_ext_len=0,
        )
    except Exception as e:  # noqa: BLE001 - see below
        # The decoder is a C extension whose errors on bad input are ValueError, TypeError,
        # UnicodeDecodeError, FormatError, StackError, ExtraData and our own _ExtRefused.  All of
        # them mean "the peer sent garbage", and the contract is that garbage is a WireError.
        raise WireError(
            Code.INVALID_REQUEST, f"frame is not valid msgpack: {_short(str(e))}"
        ) from None

    if type(obj) is dict and len(obj) == 4:
        # The common case, checked in one pass; anything unusual takes the path below, which
        # finds and names the problem.
        v, type_, rid, body = obj.get("v"), obj.get("type"), obj.get("id"), obj.get("body")
        if (type(v) is int and type(type_) is str and type(rid) is int and 0 <= rid <= U64_MAX
                and type(body) is dict):
            for k in body:
                if type(k) is not str:
                    break
            else:
                return Envelope(v, type_, rid, body)
    if not isinstance(obj, dict):
        raise WireError(
            Code.INVALID_REQUEST,
            f"envelope: got {_kind(obj)}; allowed: a map with exactly the keys v, type, id, body",
        )
    raw_id = obj.get("id")
    request_id = raw_id if _is_u64(raw_id) else None

    def bad(message: str) -> WireError:
        return WireError(Code.INVALID_REQUEST, message, request_id)

    missing = [k for k in _ENVELOPE_KEYS if k not in obj]
    extra = [k for k in obj if k not in _ENVELOPE_KEYS]
    if missing or extra:
        what = []
        if missing:
            what.append("missing " + ", ".join(repr(k) for k in missing))
        if extra:
            what.append("unknown " + ", ".join(_short(repr(k)) for k in extra[:5]))
        raise bad(f"envelope: {'; '.join(what)}; allowed: exactly the keys v, type, id, body")
    v, type_, body = obj["v"], obj["type"], obj["body"]
    if type(v) is not int:
        raise bad(
            f"envelope.v: got {_describe(v)}; allowed: an integer (this node speaks {VERSION})"
        )
    if not isinstance(type_, str):
        raise bad(f"envelope.type: got {_describe(type_)}; allowed: a string")
    if request_id is None:
        raise bad(f"envelope.id: got {_describe(raw_id)}; allowed: an integer in 0..2**64-1")
    if not isinstance(body, dict):
        raise bad(f"envelope.body: got {_describe(body)}; allowed: a map with string keys")
    for k in body:
        if not isinstance(k, str):
            raise bad(f"envelope.body: key {_describe(k)}; allowed: string keys only")
    return Envelope(v, type_, request_id, body)


# --- Request schemas ------------------------------------------------------------------------------
#
# One table: request type -> {key: (required, check)}.  A check takes the value and returns None
# when it is fine, or the "got ...; allowed: ..." text.  Checks that need a different code
# (`batch_too_large`) raise themselves.  Cross-key rules follow in `_cross_checks`.

_Check = Callable[[str, str, Any], "str | None"]


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python; msgpack `true` must not pass for 1.
    return type(v) is int


def _is_u64(v: Any) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX


def _u64(req: str, key: str, v: Any) -> str | None:
    return None if _is_u64(v) else f"got {_describe(v)}; allowed: an integer in 0..2**64-1"


def _positive_u64(req: str, key: str, v: Any) -> str | None:
    if _is_u64(v) and v >= 1:
        return None
    return f"got {_describe(v)}; allowed: an integer in 1..2**64-1"


def _bool(req: str, key: str, v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    return f"got {_describe(v)}; allowed: true or false"


def _consistency(req: str, key: str, v: Any) -> str | None:
    if isinstance(v, str) and v in CONSISTENCY:
        return None
    return f"got {_describe(v)}; allowed: " + " or ".join(repr(c) for c in CONSISTENCY)


def _limit(req: str, key: str, v: Any) -> str | None:
    if _is_int(v) and 1 <= v <= MAX_IDS:
        return None
    return f"got {_describe(v)}; allowed: an integer in 1..{MAX_IDS}"


def _id_value(req: str, key: str, v: Any) -> str | None:
    # Only the type is checked: an id that cannot exist is simply not found by the ledger.
    if _is_int(v) or isinstance(v, str):
        return None
    return f"got {_describe(v)}; allowed: an integer or a string id"


def _list_of(v: Any, most: int, noun: str, item_ok: Callable[[Any], bool],
             allowed: str) -> str | None:
    """A list of 1..`most` items, each passing `item_ok`; else what is wrong, then `allowed`."""
    if not isinstance(v, list):
        return f"got {_describe(v)}; {allowed}"
    if not 1 <= len(v) <= most:
        return f"got a list of {len(v)} {noun}; {allowed}"
    for i, item in enumerate(v):
        if not item_ok(item):
            return f"item {i} is {_describe(item)}; {allowed}"
    return None


def _ids(req: str, key: str, v: Any) -> str | None:
    return _list_of(v, MAX_IDS, "ids", lambda x: _is_int(x) or isinstance(x, str),
                    f"allowed: a list of 1..{MAX_IDS} ids, each an integer or a string")


def _batch(req: str, key: str, v: Any, allowed: str) -> str | None:
    """The list checks `events` and `rows` share: a list of 1..MAX_EVENTS items."""
    if not isinstance(v, list):
        return f"got {_describe(v)}; {allowed}"
    if not v:
        return f"got an empty list; {allowed}"
    if len(v) > MAX_EVENTS:
        raise WireError(
            Code.BATCH_TOO_LARGE,
            f"{req}.{key}: got {len(v)} events; allowed: at most {MAX_EVENTS} per request "
            "(split the batch)",
        )
    return None


def _events(req: str, key: str, v: Any) -> str | None:
    allowed = f"allowed: a list of 1..{MAX_EVENTS} event maps"
    problem = _batch(req, key, v, allowed)
    if problem is not None:
        return problem
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            return f"item {i} is {_describe(item)}; {allowed}"
    return None


#: Most field names in the compact form of a submit (an event has about ten).
MAX_KEYS = 64

#: A submit of at least this many events that all have the same keys goes in the compact form:
#: from the client (`client._Api.submit`) and into the Raft entry (`server.Server._write`, for
#: events sent as maps).  Below it the saving is not worth a look.
ROWS_MIN_EVENTS = 16


def _keys(req: str, key: str, v: Any) -> str | None:
    allowed = f"allowed: a list of 1..{MAX_KEYS} distinct field names (strings)"
    problem = _list_of(v, MAX_KEYS, "names", lambda x: isinstance(x, str), allowed)
    if problem is None and len(set(v)) != len(v):
        problem = f"a name appears twice; {allowed}"
    return problem


def _rows(req: str, key: str, v: Any) -> str | None:
    # Each row's length is checked against `keys` in `_cross_checks`.
    return _batch(req, key, v, f"allowed: a list of 1..{MAX_EVENTS} rows, each a list of values "
                               "as long as keys")


_LOOKUP: dict[str, tuple[bool, _Check]] = {
    "ids": (True, _ids),
    "consistency": (False, _consistency),
    "min_version": (False, _u64),
}

#: Request type -> {key: (required, check)}.  The order of the types is the order in messages.
SCHEMAS: dict[str, dict[str, tuple[bool, _Check]]] = {
    "ping": {},
    # `state_hash` asks for the ledger's hash: it serialises the whole state, so only on request.
    "status": {"state_hash": (False, _bool)},
    "register_session": {},
    "keep_alive": {"session": (True, _u64)},
    "submit": {
        # One of the two forms: `events`, or `keys` with `rows` (see the module's docstring).
        "events": (False, _events),
        "keys": (False, _keys),
        "rows": (False, _rows),
        "session": (False, _u64),
        "seq": (False, _positive_u64),
        "ack": (False, _u64),
    },
    "lookup_accounts": dict(_LOOKUP),
    "lookup_transfers": dict(_LOOKUP),
    "account_transfers": {
        "account": (True, _id_value),
        "limit": (False, _limit),
        "cursor": (False, _u64),
        "consistency": (False, _consistency),
        "min_version": (False, _u64),
    },
}

REQUEST_TYPES: tuple[str, ...] = tuple(SCHEMAS)


def validate_request(env: Envelope) -> None:
    """Check a decoded request's version, type and body schema; return None when it is fine.

    Raises `WireError` with `request_id` set: `BATCH_TOO_LARGE` for a `submit` of more than
    `MAX_EVENTS` events, `INVALID_REQUEST` for everything else, with a message of the form
    `<type>.<key>: got ...; allowed: ...`.  The first problem found is reported.  Pure.
    """

    def bad(message: str) -> WireError:
        return WireError(Code.INVALID_REQUEST, message, env.id)

    if env.v != VERSION:
        raise bad(f"unsupported protocol version {env.v}; this node supports version {VERSION}")
    schema = SCHEMAS.get(env.type)
    if schema is None:
        raise bad(
            f"unknown request type {_short(repr(env.type))}; known: {', '.join(REQUEST_TYPES)}"
        )
    for key in env.body:
        if key not in schema:
            allowed = ", ".join(schema) if schema else "none (the body must be empty)"
            raise bad(f"{env.type}: unknown key {_short(repr(key))}; allowed keys: {allowed}")
    for key, (required, check) in schema.items():
        if key not in env.body:
            if required:
                raise bad(f"{env.type}.{key}: missing; it is required")
            continue
        try:
            problem = check(env.type, key, env.body[key])
        except WireError as e:  # a check that needs its own code (batch_too_large)
            e.request_id = env.id
            raise
        if problem is not None:
            raise bad(f"{env.type}.{key}: {problem}")
    _cross_checks(env, bad)


def _cross_checks(env: Envelope, bad: Callable[[str], WireError]) -> None:
    if env.type == "submit":
        body = env.body
        if "events" in body:
            if "keys" in body or "rows" in body:
                raise bad("submit: both events and keys/rows given; allowed: one of the two")
        elif "keys" not in body and "rows" not in body:
            raise bad("submit.events: missing; it is required (or keys with rows)")
        elif "rows" not in body:
            raise bad("submit.rows: missing; it is required with keys")
        elif "keys" not in body:
            raise bad("submit.keys: missing; it is required with rows")
        else:
            n = len(body["keys"])
            allowed = f"allowed: a list of {n} values, one per name in keys"
            for i, row in enumerate(body["rows"]):
                if type(row) is not list or len(row) != n:
                    raise bad(f"submit.rows: item {i} is {_describe(row)}; {allowed}")
        # A session makes a retried submit idempotent: the node keeps the reply per (session,
        # seq), so a session without seq (or a seq without session) cannot mean anything.
        if "session" in body and "seq" not in body:
            raise bad("submit.seq: missing; it is required when session is given")
        if "seq" in body and "session" not in body:
            raise bad("submit.session: missing; seq and ack are only allowed with a session")
        if "ack" in body and "session" not in body:
            raise bad("submit.session: missing; seq and ack are only allowed with a session")


def validate_reply(env: Envelope) -> None:
    """Check that a decoded message is a reply: type `reply`, version `VERSION`, an int `code`.

    For the client side.  Raises `WireError(INVALID_REQUEST, ...)` otherwise.  Pure.
    """
    if env.v != VERSION:
        raise WireError(
            Code.INVALID_REQUEST,
            f"unsupported protocol version {env.v}; this client supports version {VERSION}",
            env.id,
        )
    if env.type != REPLY:
        raise WireError(
            Code.INVALID_REQUEST,
            f"envelope.type: got {_describe(env.type)}; allowed: 'reply'",
            env.id,
        )
    if not _is_int(env.body.get("code")):
        raise WireError(
            Code.INVALID_REQUEST,
            f"reply.code: got {_describe(env.body.get('code'))}; allowed: an integer result code",
            env.id,
        )


# --- asyncio transport ----------------------------------------------------------------------------


async def read_frame(
    reader: asyncio.StreamReader,
    max_bytes: int = MAX_FRAME_BYTES,
    timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
) -> bytes | None:
    """Read one frame's payload (the bytes after the prefix) from `reader`.

    Two clocks, because waiting and sending are different things: `idle_timeout_s` bounds the wait
    for the first byte of a frame (None: forever) and raises `TimeoutError` — an idle connection,
    not an error.  `timeout_s` bounds the time from that first byte to the end of the frame and
    raises `FrameTimeout` — a peer that sends half a frame and stalls is dropped, rather than
    holding a buffer and a task forever.

    Returns None on a clean EOF before any byte of a frame.  Raises `FrameTooLarge` as soon as the
    prefix announces more than `max_bytes`, before reading (or buffering) the body, and
    `ProtocolError` on EOF inside a frame.  After any exception the stream is out of step: close it.
    """
    try:
        async with asyncio.timeout(idle_timeout_s):
            first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            (n,) = PREFIX.unpack(first + await reader.readexactly(PREFIX_BYTES - 1))
            if n > max_bytes:
                raise FrameTooLarge(f"frame announces {n} bytes; the limit is {max_bytes}")
            return await reader.readexactly(n)
    except TimeoutError:
        raise FrameTimeout(f"frame not completed within {timeout_s} s") from None
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            f"connection closed mid-frame ({len(e.partial)} of {e.expected} bytes)"
        ) from None


async def write_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    """Write one whole frame (from `encode`/`reply`) and wait until the transport drains.

    Waiting on `drain` is the back-pressure: a client that stops reading stops getting served.
    """
    writer.write(frame)
    await writer.drain()


# --- Blocking-socket transport (the sync client) --------------------------------------------------


def send_frame(sock: socket.socket, frame: bytes) -> None:
    """Send one whole frame; blocks up to the socket's own timeout."""
    sock.sendall(frame)


def recv_frame(
    sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES, timeout_s: float | None = None
) -> bytes:
    """Receive one frame's payload from a blocking socket.

    `timeout_s` is a deadline for the whole frame (None: the socket's own timeout per recv); the
    socket's timeout setting is restored afterwards.  Raises `ConnectionClosed` on a clean EOF
    before the frame, `FrameTooLarge` when the prefix announces more than `max_bytes` (before
    reading the body), `ProtocolError` on EOF mid-frame, and `TimeoutError` when the deadline
    passes.  After any exception the socket is out of step: close it.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    saved = sock.gettimeout()
    try:
        (n,) = PREFIX.unpack(_recv_exactly(sock, PREFIX_BYTES, deadline, at_frame_start=True))
        if n > max_bytes:
            raise FrameTooLarge(f"frame announces {n} bytes; the limit is {max_bytes}")
        return _recv_exactly(sock, n, deadline, at_frame_start=False)
    finally:
        if deadline is not None:
            sock.settimeout(saved)


def _recv_exactly(
    sock: socket.socket, n: int, deadline: float | None, at_frame_start: bool
) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("frame not received before the deadline")
            sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0 and at_frame_start:
                raise ConnectionClosed("connection closed by peer")
            raise ProtocolError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


# --- Message helpers ------------------------------------------------------------------------------


def _kind(v: Any) -> str:
    return {dict: "map", list: "list", str: "string", bytes: "binary", bool: "boolean",
            int: "integer", float: "float", type(None): "nil"}.get(type(v), type(v).__name__)


def _describe(v: Any) -> str:
    """`string 'abc'`, `integer -3`, `list of 12 items` — enough to find the value, never huge."""
    if isinstance(v, (list, dict)):
        return f"{_kind(v)} of {len(v)} items"
    return f"{_kind(v)} {_short(repr(v))}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
