"""The thin client: find the leader, follow redirects, retry safely, say when it cannot know.

Design.  `Client` (blocking) and `AsyncClient` (asyncio) share one core (httpx's pattern): the
decisions — which node to ask, what a reply means, when to redirect, back off, retry or give up —
are written once as a generator, `_Core.call`, that yields I/O steps (`_Send`, `_Sleep`) and is
sent their outcomes.  Each client only performs those steps with its own kind of I/O.

Retries keep the request's identity: the same events with the same ids, and, when the client
uses a session, the same (session, seq).  So a retry after a lost reply is answered from the
ledger's stored reply or with `exists`, never applied twice (TigerBeetle's reliable submission;
Raft thesis §6.3).  Redirects are bounded per attempt; `no_leader`, `overloaded` and
`read_not_ready` back off with jitter; everything stops at the call's deadline, and a write
is not sent again when less of it is left than twice the longest a node took to answer this
call (cut short, its outcome would be unknown).

When the deadline passes the client raises `Unavailable` if nothing could have been applied
(no node accepted the request), or `OutcomeUnknown` if the request may have been applied (a
connection broke after sending, or the server answered `timeout`/`outcome_unknown`).  After
`OutcomeUnknown`, calling again with the same ids is always safe.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from . import codes, wire
from .config import parse_addr
from .codes import (Code, OutcomeUnknown, ProtocolError, RaftpayError, RequestRejected,
                    Unavailable)
from .ledger import ACCOUNT_FLAG_NAMES, TRANSFER_FLAG_NAMES, events_as_rows

#: Environment variable holding the seed list ("host:port,host:port").
CLUSTER_ENV = "RAFTPAY_CLUSTER"

_WRITE_TYPES = frozenset({"submit", "register_session", "keep_alive"})


def parse_seeds(seeds: str | Sequence[str] | None) -> list[str]:
    """"h:p,h:p" or a list -> list of "h:p".  Falls back to $RAFTPAY_CLUSTER."""
    if seeds is None:
        seeds = os.environ.get(CLUSTER_ENV, "")
    if isinstance(seeds, str):
        seeds = [s.strip() for s in seeds.split(",")]
    out = [s for s in seeds if s]
    for s in out:
        try:
            parse_addr(s)
        except ValueError as e:
            raise ValueError(f"seed {e}") from None
    if not out:
        raise ValueError(f"no cluster address given (pass seeds or set {CLUSTER_ENV})")
    return out


def flags_of(names: Iterable[str] | int | None, table: dict[str, int]) -> int:
    """Flag names ("pending", "linked", ...) -> bit mask; an int passes through."""
    if names is None:
        return 0
    if isinstance(names, int):
        return names
    mask = 0
    for n in names:
        if n not in table:
            raise ValueError(f"unknown flag {n!r}; known: {', '.join(table)}")
        mask |= table[n]
    return mask


# --- The sans-I/O core --------------------------------------------------------------------------

@dataclass
class _Send:
    addr: str
    frame: bytes
    rid: int
    timeout_s: float


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Failed:
    """The outcome of a `_Send` that got no reply.  `sent` says whether the bytes may have left."""
    error: BaseException
    sent: bool


#: Longest pause between attempts (before jitter of up to half of it).
MAX_BACKOFF_S = 0.1


class _Core:
    """Leader tracking, session numbering and the retry policy.  Not thread-safe by itself; the
    clients serialise access to it (the sync one with a lock, the async one by its loop)."""

    def __init__(self, seeds, *, timeout_s: float, max_redirects: int, attempt_timeout_s: float,
                 use_session: bool):
        self.seeds = parse_seeds(seeds)
        for name, value in (("timeout_s", timeout_s), ("attempt_timeout_s", attempt_timeout_s)):
            # NaN passes `> 0` as False but also every deadline test: a call would never end.
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (isinstance(max_redirects, int) and not isinstance(max_redirects, bool)
                and max_redirects >= 0):
            raise ValueError(f"max_redirects must be an int >= 0, got {max_redirects!r}")
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.attempt_timeout_s = attempt_timeout_s
        self.use_session = use_session
        self.leader: str | None = None
        self._rids = itertools.count(random.getrandbits(32))
        self._rotate = itertools.cycle(range(len(self.seeds)))
        self.session: int | None = None
        self._next_seq = 1
        self._outstanding: set[int] = set()

    def _pick(self) -> str:
        if self.leader:
            return self.leader
        return self.seeds[next(self._rotate)]

    def call(self, kind: str, body: dict, *, addr: str | None = None):
        """Generator: yields `_Send`/`_Sleep`, receives an `Envelope` or `_Failed` for each
        `_Send`; returns the reply body of a successful call or raises."""
        deadline = time.monotonic() + self.timeout_s
        maybe_applied = False
        redirects = 0
        backoff = 0.005
        last_problem = "no attempt made"
        answered = False  # a node answered with a code we retry on
        seq = None
        attempts, packed = 0, None
        slowest = 0.0  # the longest a node took to answer an attempt of this call
        while True:
            if kind == "submit" and self.use_session and self.session is None:
                reg = yield from self.call("register_session", {})
                self.session = reg["session"]
            if kind == "submit" and self.use_session and seq is None:
                seq = self._next_seq
                self._next_seq += 1
                self._outstanding.add(seq)
            extra = None
            if seq is not None:
                ack = min(self._outstanding) if self._outstanding else self._next_seq
                extra = {"session": self.session, "seq": seq, "ack": ack}
            target = addr or self._pick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempts and kind in _WRITE_TYPES and not maybe_applied and remaining < 2 * slowest:
                # An attempt the deadline would likely cut short (the nodes take this long to
                # answer now) is not sent: cut short, a write's outcome is unknown, where now
                # nothing has been applied (128 clients of 8k batches, ten times what the log
                # took: every `outcome unknown` was a last attempt sent with 0.03-2.6 s left
                # after `overloaded` answers that took up to 1.2 s).  Once the outcome is
                # unknown anyway, an attempt answered in time can only settle it.
                last_problem += (f"; not sent again with {remaining:.1f} s left, as nodes took "
                                 f"up to {slowest:.1f} s to answer")
                break
            rid = next(self._rids) & wire.U64_MAX
            try:
                # The first attempt packs the body with its envelope (the cheaper way for small
                # bodies); a retry packs it once more, and every later retry only copies it.
                if attempts == 1:
                    packed = wire.PackedBody(body)
                frame = (wire.encode(kind, rid, dict(body, **extra) if extra else body)
                         if packed is None else wire.encode_packed(kind, rid, packed, extra))
                attempts += 1
            except Exception:
                # Misuse (a value the protocol cannot carry, a frame over the limit): raised to
                # the caller before anything was sent, so the request gives its seq back; held,
                # it would pin the session's ack and the stored replies behind it for good.
                if seq is not None:
                    self._outstanding.discard(seq)
                raise
            attempt_s = min(self.attempt_timeout_s, remaining)
            sent_at = time.monotonic()
            outcome = yield _Send(target, frame, rid, attempt_s)
            retry_now = False
            if isinstance(outcome, _Failed):
                if self.leader == target:
                    self.leader = None
                if outcome.sent and kind in _WRITE_TYPES:
                    maybe_applied = True
                # A last attempt the deadline cut short says only that time ran out; a node's
                # earlier answer (a follower behind the asked version, say) says why.
                if not (answered and attempt_s < self.attempt_timeout_s
                        and isinstance(outcome.error, TimeoutError)):
                    last_problem = f"{target}: {outcome.error!r}"
                if addr:
                    raise Unavailable(last_problem) from outcome.error
            else:
                slowest = max(slowest, time.monotonic() - sent_at)
                rb = outcome.body
                code = rb.get("code")
                if code == Code.OK or (kind == "submit" and code is not None and code < 100):
                    leader_only = kind in _WRITE_TYPES or (
                        kind != "status" and body.get("consistency") == "linearizable")
                    if leader_only and not addr:
                        self.leader = target
                    if seq is not None:
                        self._outstanding.discard(seq)
                    return rb
                last_problem = f"{target}: {codes.name(code)} {rb.get('message', '')}".strip()
                answered = True
                if code == Code.NOT_LEADER and not addr:
                    redirects += 1
                    hint = rb.get("leader")  # a bad hint is no hint: a seed is tried instead
                    self.leader = hint if isinstance(hint, str) and _is_host_port(hint) else None
                    retry_now = redirects <= self.max_redirects and self.leader is not None
                    if not retry_now:
                        redirects = 0
                        self.leader = None
                elif code in (Code.NO_LEADER, Code.OVERLOADED, Code.READ_NOT_READY):
                    if code == Code.NO_LEADER:
                        self.leader = None
                elif code in (Code.TIMEOUT, Code.OUTCOME_UNKNOWN):
                    maybe_applied = maybe_applied or kind in _WRITE_TYPES
                elif code == Code.SESSION_EXPIRED and kind == "submit":
                    # A new session; the events keep their ids, so a transfer that was applied
                    # under the old session answers `exists`.
                    self._outstanding.discard(seq)
                    self.session, seq = None, None
                    retry_now = True
                else:
                    if seq is not None:
                        self._outstanding.discard(seq)
                    raise RequestRejected(code if code is not None else Code.INTERNAL_ERROR,
                                          rb.get("message", ""))
            if not retry_now:
                # Exponential with jitter, capped low: during an election every answer is a cheap
                # `no_leader`, and a cap of 0.5 s (x2 jitter) left clients asleep for up to a
                # second after the new leader was ready (the harness's failover rows).
                pause = min(backoff * (1 + 0.5 * random.random()),
                            max(0.0, deadline - time.monotonic()))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                if pause > 0:
                    yield _Sleep(pause)
        if seq is not None:
            self._outstanding.discard(seq)
        if maybe_applied:
            raise OutcomeUnknown(f"{kind}: no answer within {self.timeout_s} s and it may have "
                                 f"been applied; retry with the same ids ({last_problem})")
        raise Unavailable(f"{kind}: no node took the request within {self.timeout_s} s "
                          f"({last_problem})")


#: `Code` members by value.  Calling the enum for each of an 8,000-event batch's results took
#: ~4.8 ms of the client's CPU per request; looking them up here takes ~0.15 ms.
_CODE_OF = {c.value: c for c in Code}


def _results(rb: dict) -> list[Code]:
    """A submit reply's results as `Code`s.  A value this client does not know (a newer
    server's code, or not a code at all) raises `ProtocolError`, inside the client's exception
    tree: the server did answer, so the request is over and a retry with the same ids is safe
    (an applied transfer answers `exists`)."""
    results = rb.get("results")
    try:
        return list(map(_CODE_OF.__getitem__, results))
    except (KeyError, TypeError):
        pass
    if isinstance(results, list):
        where = next((f"{c!r} for event {i}" for i, c in enumerate(results)
                      if type(c) is not int or c not in _CODE_OF), repr(results))
    else:
        where = f"{results!r} instead of a list"
    raise ProtocolError(f"submit: result {where} is not a code this client knows (a newer "
                        f"server?); the request was answered, so retrying it with the same ids "
                        f"is safe and answers again")


# --- Request builders shared by both clients ------------------------------------------------------

class _Api:
    """The ledger methods, written once; `_call(kind, body)` is the client's transport."""

    def _call(self, kind: str, body: dict, addr: str | None = None):  # pragma: no cover
        raise NotImplementedError

    def submit(self, events: list[dict]):
        """Submit ledger events; returns one `Code` per event.  A batch of at least
        `wire.ROWS_MIN_EVENTS` events that all have the same fields in the same order travels in the
        protocol's compact form (`wire`'s keys and rows): the same events in about a third of the
        bytes, and less work for the node."""
        return self._submit(_items("submit", events))

    def _submit(self, events: list[dict]):
        compact = events_as_rows(events) if len(events) >= wire.ROWS_MIN_EVENTS else None
        body = {"events": events} if compact is None else {"keys": compact[0], "rows": compact[1]}
        return self._map(self._call("submit", body), _results)

    def create_accounts(self, accounts: list[dict]):
        """Each account: {id, currency, flags?, user_data?}.  Flags may be names."""
        return self._submit([_account_event(a) for a in _items("create_accounts", accounts)])

    def create_account(self, id, currency: int, flags=None, user_data: int = 0):
        return self._map(self.create_accounts([{"id": id, "currency": currency, "flags": flags,
                                                "user_data": user_data}]), lambda r: r[0])

    def create_transfers(self, transfers: list[dict]):
        """Each transfer: {id, debit_account_id, credit_account_id, amount, currency, flags?,
        user_data?, pending_id?, timeout_ms?}.  Flags may be names."""
        return self._submit([_transfer_event(t) for t in _items("create_transfers", transfers)])

    def transfer(self, id, debit_account_id, credit_account_id, amount: int, currency: int,
                 flags=None, **fields):
        t = dict(id=id, debit_account_id=debit_account_id, credit_account_id=credit_account_id,
                 amount=amount, currency=currency, flags=flags, **fields)
        return self._map(self.create_transfers([t]), lambda r: r[0])

    def post_pending(self, id, pending_id, amount: int | None = None):
        t = {"id": id, "pending_id": pending_id, "flags": ["post_pending"]}
        if amount is not None:
            t["amount"] = amount
        return self._map(self.create_transfers([t]), lambda r: r[0])

    def void_pending(self, id, pending_id):
        t = {"id": id, "pending_id": pending_id, "flags": ["void_pending"]}
        return self._map(self.create_transfers([t]), lambda r: r[0])

    def close_account(self, account_id):
        return self._map(self._submit([{"op": "close_account", "account_id": account_id}]),
                         lambda r: r[0])

    def lookup_accounts(self, ids: list, consistency: str = "linearizable",
                        min_version: int = 0):
        return self._map(self._call("lookup_accounts", _read_body(
            {"ids": _ids("lookup_accounts", ids)}, consistency, min_version)),
            lambda rb: rb["accounts"])

    def lookup_transfers(self, ids: list, consistency: str = "linearizable",
                         min_version: int = 0):
        return self._map(self._call("lookup_transfers", _read_body(
            {"ids": _ids("lookup_transfers", ids)}, consistency, min_version)),
            lambda rb: rb["transfers"])

    def account_transfers(self, account, limit: int = 100, cursor: int = 0,
                          consistency: str = "linearizable", min_version: int = 0):
        """Returns (transfers, next_cursor)."""
        return self._map(self._call("account_transfers", _read_body(
            {"account": account, "limit": limit, "cursor": cursor}, consistency, min_version)),
            lambda rb: (rb["transfers"], rb.get("next_cursor")))

    def status(self, addr: str | None = None, state_hash: bool = False):
        """The status of one node (the given address, else whichever answers).  `state_hash`
        adds the ledger's hash, which costs the node a full serialisation of its state."""
        body = {"state_hash": True} if state_hash else {}
        if addr is not None and not (isinstance(addr, str) and _is_host_port(addr)):
            raise ValueError(f"status: address {addr!r} is not host:port")
        return self._map(self._call("status", body, addr=addr), lambda rb: rb["status"])


def _read_body(body: dict, consistency: str, min_version: int) -> dict:
    body["consistency"] = consistency
    if min_version:
        body["min_version"] = min_version
    return body


def _is_host_port(addr: str) -> bool:
    """As a node's config would take it (`config.parse_addr`): a port in 1..65535, IPv6 in
    brackets."""
    try:
        parse_addr(addr)
    except ValueError:
        return False
    return True


def _items(what: str, items) -> list:
    """The events of a batch call, refused with a clear TypeError unless a list (or other
    iterable, not a mapping or string) of dicts; nothing is sent."""
    items = _as_list(what, items, "dicts")
    for i, item in enumerate(items):
        if type(item) is not dict and not isinstance(item, Mapping):
            raise TypeError(f"{what}: item {i} is {type(item).__name__}, not a dict of fields")
    return items


def _as_list(what: str, items, of: str, hint: str = "") -> list:
    """`items` as a list, refused with a clear TypeError unless a list (or other iterable, not
    a mapping or string: a string would be read one character at a time); nothing is sent."""
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{what} takes a list of {of}, got {type(items).__name__}{hint}")
    return list(items)


def _ids(what: str, ids) -> list:
    """The ids of a lookup: a lone id is refused ("alice" would look up five accounts)."""
    return _as_list(what, ids, "ids", " (for one id: [id])")


def _account_event(a: dict) -> dict:
    ev = {"op": "create_account", **{k: v for k, v in a.items() if v is not None}}
    ev["flags"] = flags_of(a.get("flags"), ACCOUNT_FLAG_NAMES)
    return ev


def _transfer_event(t: dict) -> dict:
    ev = {"op": "create_transfer", **{k: v for k, v in t.items() if v is not None}}
    ev["flags"] = flags_of(t.get("flags"), TRANSFER_FLAG_NAMES)
    return ev


def _zookeeper_directory(hosts: str, cluster: str, root: str, digest: str | None,
                         timeout_s: float):
    """Read the cluster's directory in ZooKeeper (the `raftpay.zk` layout): returns
    (watch, seeds, leader address or None, cores), where `watch` is a started `LeaderWatch`
    that keeps the leader of every `_Core` appended to `cores` current.  Blocks up to about
    `timeout_s`; raises `Unavailable` when ZooKeeper does not answer or lists no members."""
    try:
        from .zk import LeaderWatch, ZkUnavailable
    except ImportError as e:
        raise RaftpayError(str(e)) from e
    cores: list[_Core] = []

    def on_change(info) -> None:
        # kazoo's event thread: one attribute write, the same hint a `not_leader` reply gives.
        for core in cores:
            core.leader = info.client_addr if info is not None else None

    watch = LeaderWatch(hosts, cluster, root=root, on_change=on_change, digest=digest)
    try:
        watch.start(timeout_s)
        seeds = watch.members(timeout_s)
    except ZkUnavailable as e:
        watch.stop(1.0)
        raise Unavailable(f"cluster {cluster!r} not found through ZooKeeper: {e}") from e
    leader = watch.leader
    if not seeds and leader is not None:
        seeds = [leader.client_addr]
    if not seeds:
        watch.stop(1.0)
        raise Unavailable(f"no members of cluster {cluster!r} are registered under {root}")
    return watch, seeds, cores


# --- Blocking client ----------------------------------------------------------------------------

def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read (end of stream included) right now."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Client(_Api):
    """Blocking client.  Thread-safe (one request at a time per client; use several clients, or
    `AsyncClient`, for concurrency).  `seeds`: "h:p,h:p", a list, or None for $RAFTPAY_CLUSTER.

    `timeout_s` bounds a whole call including retries; `use_session` makes writes exactly-once
    even for events without natural ids (the ledger stores each request's reply)."""

    def __init__(self, seeds=None, *, timeout_s: float = 10.0, max_redirects: int = 5,
                 attempt_timeout_s: float = 5.0, use_session: bool = True,
                 max_frame_bytes: int = wire.MAX_FRAME_BYTES):
        self._core = _Core(seeds, timeout_s=timeout_s, max_redirects=max_redirects,
                           attempt_timeout_s=attempt_timeout_s, use_session=use_session)
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._max_frame_bytes = max_frame_bytes
        self._zk_watch = None  # set by from_zookeeper

    @classmethod
    def from_zookeeper(cls, hosts: str, cluster: str, *, root: str = "/raftpay",
                       digest: str | None = None, zk_timeout_s: float = 5.0, **kw) -> "Client":
        """A client that finds the cluster through ZooKeeper instead of a seed list.

        Seeds are the client addresses under ``<root>/<cluster>/members``; the leader starts as
        ``<root>/<cluster>/leader`` says and follows it while the client is open (a
        `LeaderWatch`).  The znode is a hint like any other: `not_leader` replies are still
        followed as usual, and a ZooKeeper outage later on costs nothing but the hint.  Blocks
        up to about `zk_timeout_s`; raises `Unavailable` if ZooKeeper does not answer or lists
        no members.  `kw` goes to the constructor.  `close()` also closes the ZooKeeper session.
        """
        watch, seeds, cores = _zookeeper_directory(hosts, cluster, root, digest, zk_timeout_s)
        client = cls(seeds, **kw)
        client._zk_watch = watch
        cores.append(client._core)
        leader = watch.leader  # read after registering, so no change slips between
        client._core.leader = leader.client_addr if leader is not None else None
        return client

    @staticmethod
    def _map(value, fn):
        return fn(value)

    def _call(self, kind: str, body: dict, addr: str | None = None):
        with self._lock:
            gen = self._core.call(kind, body, addr=addr)
            step = next(gen)
            while True:
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    result = None
                else:
                    result = self._roundtrip(step)
                try:
                    step = gen.send(result)
                except StopIteration as done:
                    return done.value

    def _roundtrip(self, step: _Send):
        sent = False
        try:
            sock = self._socks.get(step.addr)
            if sock is not None and _readable(sock):
                # Between requests a node sends nothing: the connection was closed (idle too
                # long, or over the node's connection cap after its `overloaded` answer).
                # Written into anyway, a request there counts as sent, and a write's outcome
                # as unknown, though no node could have read it.
                self._drop(step.addr)
                sock = None
            if sock is None:
                sock = socket.create_connection(parse_addr(step.addr), timeout=step.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks[step.addr] = sock
            sock.settimeout(step.timeout_s)
            sent = True
            wire.send_frame(sock, step.frame)
            while True:
                env = wire.decode(wire.recv_frame(sock, self._max_frame_bytes, step.timeout_s),
                                  self._max_frame_bytes)
                if env.id == step.rid:
                    return env
                if env.id == 0 and env.body.get("code") == Code.INVALID_REQUEST:
                    return env  # the server could not even read our frame
        except (OSError, ProtocolError, TimeoutError) as e:
            self._drop(step.addr)
            return _Failed(e, sent)

    def _drop(self, addr: str) -> None:
        sock = self._socks.pop(addr, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for addr in list(self._socks):
            self._drop(addr)
        watch, self._zk_watch = self._zk_watch, None
        if watch is not None:
            watch.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- asyncio client -----------------------------------------------------------------------------

class _AsyncConn(asyncio.Protocol):
    """One pipelined connection: many requests in flight, replies matched by id.  A protocol
    (frames split by `wire.FrameBuffer`), so a reply costs no task and no stream read.

    Two things keep the per-request cost down when many calls share the connection (each
    `send` and each wake-up of the peer costs tens of µs on a small VM, more than the rest of
    a request):

    * Writes coalesce: a frame written while other requests are in flight joins the frames
      written in the same loop pass, and they go out in one `send` at the end of it.  A lone
      request is written at once, so it pays no extra loop pass.
    * Deadlines share one timer per connection instead of one `call_later` each: requests
      carry their deadline, and the timer, armed for the earliest one, fails those past it
      when it fires and re-arms for the next.
    """

    def __init__(self, max_frame_bytes: int):
        self.frames = wire.FrameBuffer(max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self.waiters: dict[int, tuple[asyncio.Future, float]] = {}  # rid -> (future, deadline)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = None
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self.frames.feed(data):
                env = wire.decode(payload, self.max_frame_bytes)
                w = self.waiters.pop(env.id, None)
                if w is not None and not w[0].done():
                    w[0].set_result(env)
        except ProtocolError as e:
            self._fail(e)
            return
        if self.frames.error is not None:
            self._fail(self.frames.error)

    def connection_lost(self, exc) -> None:
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, error: BaseException) -> None:
        self.closed = True
        waiters, self.waiters = self.waiters, {}
        for fut, _ in waiters.values():
            if not fut.done():
                fut.set_exception(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def request(self, rid: int, frame: bytes, timeout_s: float) -> asyncio.Future:
        """Send `frame` and return the future of the reply with id `rid`; it fails with
        `TimeoutError` after `timeout_s`, or with the connection's error if it breaks."""
        if self.closed:
            raise ConnectionError("connection closed")
        loop = self._loop
        fut = loop.create_future()
        deadline = loop.time() + timeout_s
        self.waiters[rid] = (fut, deadline)
        if self._out:
            self._out.append(frame)  # a flush is already due in this loop pass
        elif len(self.waiters) > 1:
            self._out.append(frame)
            loop.call_soon(self._flush)
        else:
            self.transport.write(frame)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed:
            self.transport.write(b"".join(out))

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        nxt = None
        for rid, (fut, deadline) in list(self.waiters.items()):
            if fut.done():  # cancelled by its caller
                del self.waiters[rid]
            elif deadline <= now:
                del self.waiters[rid]
                fut.set_exception(TimeoutError("no reply within the attempt timeout"))
            elif nxt is None or deadline < nxt:
                nxt = deadline
        if nxt is not None:
            self._arm(nxt)

    def close(self) -> None:
        self._fail(ConnectionError("connection closed"))


class AsyncClient(_Api):
    """asyncio client.  Many calls may run concurrently on one client (they pipeline on one
    connection per node).  Same arguments and guarantees as `Client`; every method is a
    coroutine."""

    def __init__(self, seeds=None, *, timeout_s: float = 10.0, max_redirects: int = 5,
                 attempt_timeout_s: float = 5.0, use_session: bool = True,
                 max_frame_bytes: int = wire.MAX_FRAME_BYTES):
        self._core = _Core(seeds, timeout_s=timeout_s, max_redirects=max_redirects,
                           attempt_timeout_s=attempt_timeout_s, use_session=use_session)
        self._conns: dict[str, _AsyncConn] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._max_frame_bytes = max_frame_bytes
        self._session_lock: asyncio.Lock | None = None
        self._zk_watch = None  # set by from_zookeeper

    @classmethod
    async def from_zookeeper(cls, hosts: str, cluster: str, *, root: str = "/raftpay",
                             digest: str | None = None, zk_timeout_s: float = 5.0,
                             **kw) -> "AsyncClient":
        """Like `Client.from_zookeeper` (same arguments and contract), as a coroutine: the
        ZooKeeper reads run in a worker thread so the event loop never blocks on them."""
        watch, seeds, cores = await asyncio.to_thread(_zookeeper_directory, hosts, cluster,
                                                      root, digest, zk_timeout_s)
        client = cls(seeds, **kw)
        client._zk_watch = watch
        cores.append(client._core)
        leader = watch.leader
        client._core.leader = leader.client_addr if leader is not None else None
        return client

    @staticmethod
    async def _map(value, fn):
        return fn(await value)

    async def _call(self, kind: str, body: dict, addr: str | None = None):
        if kind == "submit" and self._core.use_session and self._core.session is None:
            # One registration for many concurrent first calls.
            if self._session_lock is None:
                self._session_lock = asyncio.Lock()
            async with self._session_lock:
                if self._core.session is None:
                    reg = await self._run(self._core.call("register_session", {}))
                    self._core.session = reg["session"]
        return await self._run(self._core.call(kind, body, addr=addr))

    async def _run(self, gen):
        step = next(gen)
        while True:
            if isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
                result = None
            else:
                result = await self._roundtrip(step)
            try:
                step = gen.send(result)
            except StopIteration as done:
                return done.value

    async def _conn(self, addr: str, timeout_s: float) -> _AsyncConn:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(addr)
        if pending is None:
            pending = asyncio.ensure_future(self._open(addr, timeout_s))
            self._connecting[addr] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(addr, None))
        return await asyncio.shield(pending)

    async def _open(self, addr: str, timeout_s: float) -> _AsyncConn:
        host, port = parse_addr(addr)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: _AsyncConn(self._max_frame_bytes), host, port), timeout_s)
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conns[addr] = conn
        return conn

    async def _roundtrip(self, step: _Send):
        sent = False
        try:
            conn = await self._conn(step.addr, step.timeout_s)
            sent = True
            return await conn.request(step.rid, step.frame, step.timeout_s)
        except (OSError, ProtocolError, asyncio.TimeoutError, TimeoutError,
                asyncio.IncompleteReadError) as e:
            conn = self._conns.pop(step.addr, None)
            if conn is not None:
                conn.close()
            return _Failed(e, sent)

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        watch, self._zk_watch = self._zk_watch, None
        if watch is not None:
            await asyncio.to_thread(watch.stop)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


__all__ = ["Client", "AsyncClient", "parse_seeds", "CLUSTER_ENV", "RaftpayError",
           "OutcomeUnknown", "Unavailable", "RequestRejected"]
