"""The ledger: raftpay's replicated state machine.

Design.  `Ledger` is a pure, deterministic state machine (hashicorp/raft `fsm.go`; TigerBeetle
`state_machine.zig`): no I/O, no clock, no randomness, no threads, no logging.  Time arrives with
every command as an integer timestamp (a hybrid-logical-clock stamp: wall milliseconds << 16 |
a 16-bit counter, see clock.py), and the ledger normalises it so its own time is strictly
increasing: each command is stamped ``max(ts, last_ts + 1)`` and each event inside it one tick
after the previous one.  Every replica that applies the same log reaches the same state and the
same `state_hash()`.

What it stores (TigerBeetle's model, in minor units, integers only):

* **Accounts** with a client-chosen id, a currency code, flags (`DEBITS_MUST_NOT_EXCEED_CREDITS`,
  `CREDITS_MUST_NOT_EXCEED_DEBITS`, `CLOSED`), user data, and debits/credits both pending and
  posted.
* **Transfers** with a client-chosen id that is the idempotency key.  Plain transfers post at
  once; a `PENDING` transfer reserves the amount (optionally with `timeout_ms`, after which it
  expires by log time); `POST_PENDING` posts all or part of a pending transfer; `VOID_PENDING`
  releases it.

Idempotency rule.  A create event whose id exists with the same body returns `EXISTS` and changes
nothing; with a different body it returns the first differing field's `EXISTS_WITH_DIFFERENT_*`.
A transfer that failed with a *transient* code (one the ledger state decided, `codes.TRANSIENT`:
unknown account, insufficient funds, ...) is remembered with its body: a retry with the same body
returns `ID_ALREADY_FAILED` — never a late success that the client did not expect — and a
different body returns `EXISTS_WITH_DIFFERENT_*`.  A failure that the body alone decides
(validation) is not remembered, because the same body fails the same way for ever.  The original
failure code stays readable through `lookup_transfers`.

Linked events.  An event with the `LINKED` flag is chained with the next one; a chain ends at the
first event without the flag and succeeds or fails as a whole.  When one event of a chain fails,
everything the chain did is rolled back (through an undo log of deltas), the failing event
reports its own code and every other event of the chain `LINKED_EVENT_FAILED`; nothing of a
failed chain is remembered, so the whole chain can be retried.  `EXISTS` does not fail a chain: it
changes nothing.  A batch whose last event is linked reports `LINKED_EVENT_CHAIN_OPEN`.

Client sessions (Raft thesis §6.3).  `register_session` returns a session id (the normalised
timestamp of the registration, unique by construction).  A `submit` carrying ``session`` and
``seq`` is applied at most once: its reply is stored, and a duplicate gets the stored reply.
``ack`` (every seq below it has been received by the client) lets the ledger drop stored replies;
a request below that floor gets `SESSION_REQUEST_TOO_OLD`.  A session that saw no request or
`keep_alive` for `session_ttl_ms` of log time expires deterministically.  At most
`max_sessions` live at once (TigerBeetle's client table is bounded likewise): registering one
more ends the least recently used, whose next request gets `SESSION_EXPIRED` (the client
registers anew; its events keep their ids, so a retry answers `exists`).

Pending expiry and session expiry happen at command boundaries, driven only by command
timestamps, so they are replayed identically.  A `tick` command moves log time with no other
effect (the node proposes one now and then so that expiries happen on an idle ledger).

Storage is columnar for transfers (one `array` per field plus a dict id -> row) so a stored
transfer costs well under 200 bytes and a snapshot is a few `tobytes()` calls.

Thread safety: none.  The node applies entries and runs queries under one lock.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import sys
from array import array
from typing import Any, Iterable

import msgpack

from .codes import TRANSIENT, Code

# --- Limits ---------------------------------------------------------------------------------------
MAX_ID_BYTES = 64
MAX_U64 = (1 << 64) - 1
MAX_U32 = (1 << 32) - 1
MAX_AMOUNT = (1 << 63) - 1
#: Each of an account's debits (pending + posted) and credits (pending + posted) stays below this.
MAX_BALANCE = (1 << 63) - 1
MAX_TIMEOUT_MS = MAX_U32
#: Timestamps stay below this (an HLC stamp of 48-bit ms << 16 is far below it), which leaves
#: headroom for the per-event ticks within the 64-bit timestamp column.
MAX_TS = (1 << 63) - 1
#: One millisecond in timestamp units (the low 16 bits are the HLC's logical counter).
MS = 1 << 16

# --- Flags ----------------------------------------------------------------------------------------
LINKED = 1
# account flags
DEBITS_MUST_NOT_EXCEED_CREDITS = 2
CREDITS_MUST_NOT_EXCEED_DEBITS = 4
CLOSED = 8
ACCOUNT_FLAGS = LINKED | DEBITS_MUST_NOT_EXCEED_CREDITS | CREDITS_MUST_NOT_EXCEED_DEBITS | CLOSED
# transfer flags
PENDING = 2
POST_PENDING = 4
VOID_PENDING = 8
TRANSFER_FLAGS = LINKED | PENDING | POST_PENDING | VOID_PENDING

ACCOUNT_FLAG_NAMES = {
    "linked": LINKED,
    "debits_must_not_exceed_credits": DEBITS_MUST_NOT_EXCEED_CREDITS,
    "credits_must_not_exceed_debits": CREDITS_MUST_NOT_EXCEED_DEBITS,
    "closed": CLOSED,
}
TRANSFER_FLAG_NAMES = {
    "linked": LINKED,
    "pending": PENDING,
    "post_pending": POST_PENDING,
    "void_pending": VOID_PENDING,
}

# Pending-transfer states.
_PENDING, _POSTED, _VOIDED, _EXPIRED = 0, 1, 2, 3
_STATE_NAMES = {_PENDING: "pending", _POSTED: "posted", _VOIDED: "voided", _EXPIRED: "expired"}

#: Stored replies kept per session beyond the client's ack (bounds memory of a careless client).
MAX_REPLIES_PER_SESSION = 1024

#: Live sessions at most (default `max_sessions`).  A session costs ~650 bytes with one stored
#: reply; a client that makes a new session per request (a new `Client` per web request, say)
#: at 1,000 a second kept ~600,000 alive for the 10-minute TTL, ~390 MB on every replica.
MAX_SESSIONS = 100_000

SNAPSHOT_FORMAT = "raftpay-ledger"
SNAPSHOT_VERSION = 1

# Field sets per operation (anything else is UNKNOWN_FIELD).
_ACCOUNT_KEYS = frozenset({"op", "id", "currency", "flags", "user_data"})
_TRANSFER_KEYS = frozenset({
    "op", "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
    "user_data", "pending_id", "timeout_ms",
})
_CLOSE_KEYS = frozenset({"op", "account_id"})
_INT_KEYS = frozenset({"currency", "flags", "user_data", "amount", "timeout_ms"})
_ID_KEYS = frozenset({"id", "debit_account_id", "credit_account_id", "pending_id", "account_id"})

_OK = Code.OK
_EXISTS = Code.EXISTS


def _id_shard_table(shards: int, slots: int) -> bytes:
    """Slot (a hash modulo `slots`) -> shard, giving shard j a share of the slots in proportion
    to 2 ** (j / shards): the shares span one doubling, evenly in ratio.  See `_ID_SHARD_OF`."""
    weights = [2 ** (j / shards) for j in range(shards)]
    exact = [slots * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(shards), key=lambda j: counts[j] - exact[j])
    for j in by_remainder[:slots - sum(counts)]:
        counts[j] += 1
    return bytes(j for j in range(shards) for _ in range(counts[j]))


#: Every map that grows with the ledger (the transfer index id -> row, and the accounts,
#: remembered failures and pending states below) is split into `_ID_SHARDS` dicts by the key's
#: hash.  A dict that grows rebuilds its whole table at each doubling, in one call: one dict
#: of 11M ids took 2.1 s to do it, on every replica, longer than an election timeout.  Shards
#: of equal shares would all rebuild at the same moment (to within the hash's noise), so the
#: shares differ, spread over one doubling: the shards rebuild one at a time, each a 1/64-1/32
#: part of the map.  Shard choice uses `hash()`, which differs between processes for str ids;
#: nothing that reaches the state (snapshot, hash, replies) depends on it: the snapshot lists
#: each map in the order its entries came (rows), never in shard order.
_ID_SHARDS = 64
#: A prime, written out where an id is looked up (``% 8179``).  Not a power of two: a dict
#: places a key by its hash's low bits, so shards chosen by those same bits would hold keys
#: that all fall on a sliver of their tables (sequential ids ran 8-18% slower that way).
#: Enough slots that no two shards get the same share (equal shares rebuild together).
_ID_SLOTS = 8179
_ID_SHARD_OF = _id_shard_table(_ID_SHARDS, _ID_SLOTS)


def _new_id_index() -> list[dict]:
    """A sharded map: for each of the `_ID_SLOTS` slots, the shard (one dict of 64) it maps
    to, so a lookup is ``index[hash(key) % 8179][key]`` (`_shard`)."""
    shards = [{} for _ in range(_ID_SHARDS)]
    return [shards[j] for j in _ID_SHARD_OF]


def _shard(index: list, key) -> dict:
    """`key`'s shard of a map made by `_new_id_index` (hot paths write this out)."""
    return index[hash(key) % 8179]


def _index_of(keys: Iterable) -> list[dict]:
    """A sharded map (`_new_id_index`) of each key to its position in `keys`."""
    index = _new_id_index()
    for pos, key in enumerate(keys):
        index[hash(key) % 8179][key] = pos
    return index


def _shards(index: list) -> list[dict]:
    """The distinct shards of a map made by `_new_id_index`, in shard order."""
    return list({id(d): d for d in index}.values())


def _id_code(value: Any, missing: Code, invalid: Code) -> int:
    """Validate an id (int 1..2**64-1 or non-empty str of at most 64 UTF-8 bytes)."""
    if value is None:
        return missing
    if type(value) is int:
        return _OK if 0 < value <= MAX_U64 else invalid
    # type(value) is str: types were checked before.
    if not value:
        return invalid
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: not text any replica could store
            return invalid
    if size > MAX_ID_BYTES:
        return Code.ID_TOO_LONG if missing is Code.ID_MISSING else invalid
    return _OK


def _check_shape(ev: Any, keys: frozenset) -> int:
    """Unknown fields and wrong types; returns a code.  A nil value counts as left out."""
    if not keys.issuperset(ev):
        return Code.UNKNOWN_FIELD
    for k, v in ev.items():
        if v is None:
            continue
        t = type(v)
        if k in _INT_KEYS:
            if t is not int:
                return Code.INVALID_FIELD_TYPE
        elif k in _ID_KEYS:
            if t is not int and t is not str:
                return Code.INVALID_FIELD_TYPE
    return _OK



# --- the compact form of a batch of like events ---------------------------------------------------
#
# A batch of 8,000 transfers is 8,000 maps with the same seven keys.  Unpacking them cost each
# follower ~3 µs an event, as much as applying one; the same values as arrays behind one list of
# keys unpack in ~0.5 µs.  The leader's server writes a submit's events in this form when they
# all have the same keys in the same order, and every replica turns them back into the very same
# dicts before applying, so the form changes the log's size and nothing the ledger decides.

def events_as_rows(events: list) -> tuple[list, list] | None:
    """(keys, rows) for `events` if they are all dicts with the same str keys in the same order,
    else None.  `rows_as_events(keys, rows)` gives back equal dicts, keys in the same order."""
    if not events or type(events[0]) is not dict:
        return None
    keys = tuple(events[0])
    for k in keys:
        if type(k) is not str:
            return None
    rows = []
    append = rows.append
    for ev in events:
        if type(ev) is not dict or tuple(ev) != keys:
            return None
        append(list(ev.values()))
    return list(keys), rows


def _rows_ok(keys: Any, rows: Any) -> bool:
    if type(keys) is not list or type(rows) is not list:
        return False
    n = len(keys)
    for k in keys:
        if type(k) is not str:
            return False
    if len(set(keys)) != n:
        return False
    for row in rows:
        if type(row) is not list or len(row) != n:
            return False
    return True


def rows_as_events(keys: Any, rows: Any) -> list | None:
    """The events a compact submit stands for, or None if it is malformed (never raises)."""
    return _Rows(keys, rows).as_events() if _rows_ok(keys, rows) else None


class _Rows:
    """A well-formed compact batch (`_rows_ok`), as `_apply_events` takes it."""

    __slots__ = ("keys", "rows")

    def __init__(self, keys: list, rows: list):
        self.keys, self.rows = keys, rows

    def as_events(self) -> list:
        keys = self.keys
        return [dict(zip(keys, row)) for row in self.rows]


class Ledger:
    """The replicated state machine.  Deterministic; not thread-safe; never does I/O."""

    def __init__(self, session_ttl_ms: int = 600_000, max_sessions: int = MAX_SESSIONS):
        if type(session_ttl_ms) is not int or session_ttl_ms <= 0:
            raise ValueError("session_ttl_ms must be a positive integer")
        if type(max_sessions) is not int or max_sessions <= 0:
            raise ValueError("max_sessions must be a positive integer")
        self.session_ttl_ms = session_ttl_ms
        self.max_sessions = max_sessions
        self.last_ts = 0
        # Accounts: id -> row in a sharded map (`_new_id_index`), and one list per field.
        self._acc: list[dict[Any, int]] = _new_id_index()
        self._a_id: list = []
        self._a_currency: list[int] = []
        self._a_flags: list[int] = []  # creation flags without LINKED; CLOSED may be added later
        self._a_user_data: list[int] = []
        self._a_ts: list[int] = []
        self._a_dpend: list[int] = []
        self._a_dpost: list[int] = []
        self._a_cpend: list[int] = []
        self._a_cpost: list[int] = []
        self._a_hist: list[array] = []  # rows of the transfers touching the account, in order
        # Transfers: id -> row in a sharded map (`_new_id_index`), and one compact array per field.
        self._tx: list[dict[Any, int]] = _new_id_index()
        self._t_id: list = []
        self._t_debit = array("I")  # account rows
        self._t_credit = array("I")
        self._t_amount = array("Q")
        self._t_ts = array("Q")
        self._t_flags = array("B")
        self._t_user_data = array("Q")
        self._t_pending = array("i")  # row of the pending transfer a post/void names, else -1
        self._t_timeout = array("I")
        self._p_state: list[dict[int, int]] = _new_id_index()  # pending row -> state
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at_ts, pending row)
        # Remembered transient failures: (id, code, ts, body tuple) in the order they came, and
        # id -> position in a sharded index.  The index holds ints and the rows are tuples of
        # atoms, which the garbage collector stops tracking: a dict holding containers is
        # tracked itself, and every full collection of a node's heap walked its millions of
        # items (0.75 s at 5.7M failures).
        self._f_rows: list[tuple] = []
        self._failed: list[dict[Any, int]] = _new_id_index()
        # Sessions: id -> [last_active_ts, floor_seq, {seq: reply}], least recently used first
        # (each use moves its session to the end), so the expired ones lead.
        self._sessions: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._next_session_sweep = 0
        # Undo log, a list only while a linked chain is being applied.
        self._undo: list | None = None

    # ==========================================================================================
    # Commands
    # ==========================================================================================

    def apply_entry(self, commands: list, ts: int) -> list[dict]:
        """Apply one replicated entry (a batch of client commands) stamped `ts`.

        Deterministic.  Returns one reply per command.  Never raises on bad input.
        """
        if type(commands) is not list:
            return [{"code": int(Code.INVALID_REQUEST), "message": "entry is not a list"}]
        return [self.apply(c, ts) for c in commands]

    def apply(self, command: Any, ts: int) -> dict:
        """Apply one command at timestamp `ts`; returns its reply (a dict with at least `code`).

        Command shapes (all maps):
        ``{"type": "submit", "events": [...], "session"?: int, "seq"?: int, "ack"?: int}``
        -> ``{"code", "results": [code per event]}``; in place of ``events``, a submit may carry
        ``"keys": [str, ...], "rows": [[value, ...], ...]``, which means exactly the events
        ``[dict(zip(keys, row)) for row in rows]`` (see `events_as_rows`);
        ``{"type": "register_session"}`` -> ``{"code", "session"}``;
        ``{"type": "keep_alive", "session": int}`` -> ``{"code"}``;
        ``{"type": "tick"}`` -> ``{"code"}`` (moves log time only).

        Deterministic; never raises on bad input; the reply must be treated as read-only (a
        session keeps it to answer duplicates).
        """
        if type(ts) is not int or not 0 <= ts <= MAX_TS:
            ts = 0  # not a timestamp: the command gets last_ts + 1, like a clock behind ours
        now = ts if ts > self.last_ts else self.last_ts + 1
        self.last_ts = now
        if self._expiry and self._expiry[0][0] <= now:
            self._expire_pending(now)
        if now >= self._next_session_sweep:
            self._sweep_sessions(now)
        if type(command) is not dict:
            return {"code": int(Code.INVALID_REQUEST), "message": "command is not a map"}
        kind = command.get("type")
        if kind == "submit":
            return self._submit(command, now)
        if kind == "register_session":
            sessions = self._sessions
            if len(sessions) >= self.max_sessions:
                self._drop_expired_sessions(now)
                if len(sessions) >= self.max_sessions:
                    sessions.popitem(last=False)  # the least recently used
            sessions[now] = [now, 1, {}]
            return {"code": 0, "session": now}
        if kind == "keep_alive":
            s = self._live_session(command.get("session"), now)
            if s is None:
                return {"code": int(Code.SESSION_EXPIRED)}
            s[0] = now
            return {"code": 0}
        if kind == "tick":
            return {"code": 0}
        return {"code": int(Code.INVALID_REQUEST), "message": f"unknown command type {kind!r}"}

    def _submit(self, command: dict, now: int) -> dict:
        events = command.get("events")
        if events is None and "rows" in command:
            keys, rows = command.get("keys"), command.get("rows")
            if not _rows_ok(keys, rows):
                return {"code": int(Code.INVALID_REQUEST),
                        "message": "keys must be distinct strings and rows lists as long as keys"}
            events = _Rows(keys, rows)
        elif type(events) is not list:
            return {"code": int(Code.INVALID_REQUEST), "message": "events must be a list"}
        sid = command.get("session")
        if sid is None:
            return {"code": 0, "results": self._apply_events(events, now)}
        seq, ack = command.get("seq"), command.get("ack", 0)
        if type(seq) is not int or seq < 1 or type(ack) is not int:
            return {"code": int(Code.INVALID_REQUEST),
                    "message": "a session request needs an integer seq >= 1 and ack"}
        s = self._live_session(sid, now)
        if s is None:
            return {"code": int(Code.SESSION_EXPIRED)}
        s[0] = now
        replies = s[2]
        if ack > s[1]:
            s[1] = ack
            for old in [q for q in replies if q < ack]:
                del replies[old]
        if seq < s[1]:
            return {"code": int(Code.SESSION_REQUEST_TOO_OLD)}
        stored = replies.get(seq)
        if stored is not None:
            return stored
        reply = {"code": 0, "results": self._apply_events(events, now)}
        replies[seq] = reply
        if len(replies) > MAX_REPLIES_PER_SESSION:
            oldest = min(replies)
            del replies[oldest]
            s[1] = max(s[1], oldest + 1)
        return reply

    def _live_session(self, sid: Any, now: int) -> list | None:
        """The session `sid` if it is live, now its most recently used; None (and it is
        forgotten) if it expired."""
        s = self._sessions.get(sid) if type(sid) is int else None
        if s is not None:
            if s[0] + self.session_ttl_ms * MS < now:
                del self._sessions[sid]
                return None
            self._sessions.move_to_end(sid)
        return s

    def _drop_expired_sessions(self, now: int) -> None:
        ttl = self.session_ttl_ms * MS
        sessions = self._sessions
        while sessions:
            sid, s = next(iter(sessions.items()))
            if s[0] + ttl >= now:
                return  # least recently used first: the rest are live too
            del sessions[sid]

    def _sweep_sessions(self, now: int) -> None:
        self._drop_expired_sessions(now)
        # Sweeping a quarter TTL apart bounds the work and the memory of abandoned sessions.
        self._next_session_sweep = now + max(self.session_ttl_ms * MS // 4, 1)

    def _expire_pending(self, now: int) -> None:
        heap, p_state = self._expiry, self._p_state
        while heap and heap[0][0] <= now:
            _, row = heapq.heappop(heap)
            state = p_state[hash(row) % 8179]
            if state.get(row) == _PENDING:
                state[row] = _EXPIRED
                amount = self._t_amount[row]
                self._a_dpend[self._t_debit[row]] -= amount
                self._a_cpend[self._t_credit[row]] -= amount

    # ------------------------------------------------------------------------------------------
    # Events and linked chains
    # ------------------------------------------------------------------------------------------

    def _apply_events(self, events: "list | _Rows", now: int) -> list[int]:
        if type(events) is _Rows:
            results = self._apply_rows(events, now)
            if results is not None:
                return results
            events = events.as_events()
        n = len(events)
        results = [0] * n
        i = 0
        fast = self._fast_transfer
        while i < n:
            ev = events[i]
            if type(ev) is dict:
                flags = ev.get("flags")
                linked = type(flags) is int and flags > 0 and flags & LINKED
            else:
                flags, linked = None, False
            if not linked:
                plain = flags is None or (flags == 0 and type(flags) is int)
                code = fast(ev, now + i) if plain else None
                results[i] = self._apply_event(ev, now + i) if code is None else code
                i += 1
                continue
            j = i
            while j < n and _is_linked(events[j]):
                j += 1
            if j == n:  # the chain never closes
                for k in range(i, n - 1):
                    results[k] = Code.LINKED_EVENT_FAILED
                results[n - 1] = Code.LINKED_EVENT_CHAIN_OPEN
                break
            self._undo = undo = []
            failed_at = -1
            for k in range(i, j + 1):
                code = self._apply_event(events[k], now + k)
                results[k] = code
                if code != _OK and code != _EXISTS:
                    failed_at = k
                    break
            self._undo = None
            if failed_at >= 0:
                self._rollback(undo)
                for k in range(i, j + 1):
                    if k != failed_at:
                        results[k] = Code.LINKED_EVENT_FAILED
            i = j + 1
        self.last_ts = max(self.last_ts, now + n - 1)
        return results

    def _store_transfer(self, tid, drow: int, crow: int, amount: int, ts: int, flags: int,
                        user_data: int, prow: int, timeout_ms: int, ids: dict) -> int:
        """Append one transfer to every column and to both accounts' histories; returns its
        row.  The one place that knows the column layout (rollback pops the same columns).
        `ids`: `tid`'s shard of the index (`_shard`), which every caller has looked in."""
        row = len(self._t_id)
        ids[tid] = row
        self._t_id.append(tid)
        self._t_debit.append(drow)
        self._t_credit.append(crow)
        self._t_amount.append(amount)
        self._t_ts.append(ts)
        self._t_flags.append(flags)
        self._t_user_data.append(user_data)
        self._t_pending.append(prow)
        self._t_timeout.append(timeout_ms)
        self._a_hist[drow].append(row)
        self._a_hist[crow].append(row)
        return row

    def _apply_rows(self, rows: "_Rows", now: int) -> list[int] | None:
        """`_apply_events` for events in the compact form, without making a dict of the ones
        the fast path takes: the same results and the same state as applying
        `rows.as_events()`, event by event.  None (nothing applied) when the rows need the
        general path as a whole: keys the fast path never takes, or a linked event."""
        keys = rows.keys
        pos = {k: i for i, k in enumerate(keys)}
        if not _FAST_KEYS.issuperset(keys) or "op" not in pos:
            return None
        ifl = pos.get("flags")
        if ifl is not None:
            for row in rows.rows:
                f = row[ifl]
                if type(f) is int and f > 0 and f & LINKED:
                    return None
        iop = pos["op"]
        iid, idr, icr = pos.get("id"), pos.get("debit_account_id"), pos.get("credit_account_id")
        iam, icu, iud = pos.get("amount"), pos.get("currency"), pos.get("user_data")
        fast = self._fast_values
        results = []
        append = results.append
        ts = now
        for row in rows.rows:
            code = None
            f = None if ifl is None else row[ifl]
            # As `_apply_events`: the fast path for a plain (no flags or int 0) transfer.
            if row[iop] == "create_transfer" and (f is None or (f == 0 and type(f) is int)):
                code = fast(None if iid is None else row[iid], None if idr is None else row[idr],
                            None if icr is None else row[icr], None if iam is None else row[iam],
                            None if icu is None else row[icu], None if iud is None else row[iud],
                            ts)
            append(self._apply_event(dict(zip(keys, row)), ts) if code is None else code)
            ts += 1
        self.last_ts = max(self.last_ts, ts - 1)  # as `_apply_events`: one tick per event
        return results

    def _fast_transfer(self, ev: Any, ts: int) -> int | None:
        """The common case on its own short path: a plain (no flags), well-formed transfer with
        a new id between two open accounts that can take it.  Applies it and returns OK, or
        returns None for anything else, which the general path then decides — so the result
        and the state are the same either way; this only skips work."""
        if type(ev) is not dict or ev.get("op") != "create_transfer" \
                or not _FAST_KEYS.issuperset(ev):
            return None
        return self._fast_values(ev.get("id"), ev.get("debit_account_id"),
                                 ev.get("credit_account_id"), ev.get("amount"),
                                 ev.get("currency"), ev.get("user_data"), ts)

    def _fast_values(self, tid, debit_id, credit_id, amount, currency, user_data,
                     ts: int) -> int | None:
        """`_fast_transfer` on an event's values (None: the key is absent or nil)."""
        if user_data is None:
            user_data = 0
        if (type(amount) is not int or type(currency) is not int or type(user_data) is not int
                or not 0 < amount <= MAX_AMOUNT or not 0 < currency <= MAX_U32
                or not 0 <= user_data <= MAX_U64
                # Each id plain: an int in 1..MAX_U64 or an ASCII str of 1..MAX_ID_BYTES
                # (written out: a helper called for each of the three cost 5% of this path).
                or not (0 < tid <= MAX_U64 if type(tid) is int else type(tid) is str
                        and 0 < len(tid) <= MAX_ID_BYTES and tid.isascii())
                or not (0 < debit_id <= MAX_U64 if type(debit_id) is int else
                        type(debit_id) is str and 0 < len(debit_id) <= MAX_ID_BYTES
                        and debit_id.isascii())
                or not (0 < credit_id <= MAX_U64 if type(credit_id) is int else
                        type(credit_id) is str and 0 < len(credit_id) <= MAX_ID_BYTES
                        and credit_id.isascii())
                or (debit_id == credit_id and type(debit_id) is type(credit_id))):
            return None
        slot = hash(tid) % 8179
        ids = self._tx[slot]
        if tid in ids or tid in self._failed[slot]:
            return None
        acc = self._acc
        try:
            drow = acc[hash(debit_id) % 8179][debit_id]
            crow = acc[hash(credit_id) % 8179][credit_id]
        except KeyError:  # the general path names the account that does not exist
            return None
        a_currency, a_flags = self._a_currency, self._a_flags
        if a_currency[drow] != currency or a_currency[crow] != currency \
                or (a_flags[drow] | a_flags[crow]) & CLOSED:
            return None
        dposted = self._a_dpost[drow] + amount
        cposted = self._a_cpost[crow] + amount
        if self._a_dpend[drow] + dposted > MAX_BALANCE \
                or self._a_cpend[crow] + cposted > MAX_BALANCE:
            return None
        if a_flags[drow] & DEBITS_MUST_NOT_EXCEED_CREDITS and (
                self._a_dpend[drow] + dposted > self._a_cpost[drow]):
            return None
        if a_flags[crow] & CREDITS_MUST_NOT_EXCEED_DEBITS and (
                self._a_cpend[crow] + cposted > self._a_dpost[crow]):
            return None
        self._store_transfer(tid, drow, crow, amount, ts, 0, user_data, -1, 0, ids)
        self._a_dpost[drow] = dposted
        self._a_cpost[crow] = cposted
        return _OK

    def _apply_event(self, ev: Any, ts: int) -> int:
        if type(ev) is not dict:
            return Code.INVALID_FIELD_TYPE
        op = ev.get("op")
        if op == "create_transfer":
            return self._create_transfer(ev, ts)
        if op == "create_account":
            return self._create_account(ev, ts)
        if op == "close_account":
            return self._close_account(ev)
        return Code.UNKNOWN_OPERATION

    # ------------------------------------------------------------------------------------------
    # Accounts
    # ------------------------------------------------------------------------------------------

    def _create_account(self, ev: dict, ts: int) -> int:
        code = _check_shape(ev, _ACCOUNT_KEYS)
        if code:
            return code
        flags = ev.get("flags") or 0
        if flags & ~ACCOUNT_FLAGS or flags < 0:
            return Code.RESERVED_FLAG
        aid = ev.get("id")
        code = _id_code(aid, Code.ID_MISSING, Code.ID_INVALID)
        if code:
            return code
        if flags & DEBITS_MUST_NOT_EXCEED_CREDITS and flags & CREDITS_MUST_NOT_EXCEED_DEBITS:
            return Code.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        currency = ev.get("currency")
        if currency is None:
            return Code.CURRENCY_MISSING
        if not 0 < currency <= MAX_U32:
            return Code.CURRENCY_INVALID
        user_data = ev.get("user_data") or 0
        if not 0 <= user_data <= MAX_U64:
            return Code.USER_DATA_INVALID
        flags &= ~LINKED
        accs = _shard(self._acc, aid)
        row = accs.get(aid)
        if row is not None:
            # CLOSED is left out: closing an account later must not make a retry of its
            # creation look like a different body.
            if (self._a_flags[row] & ~CLOSED) != (flags & ~CLOSED):
                return Code.EXISTS_WITH_DIFFERENT_FLAGS
            if self._a_currency[row] != currency:
                return Code.EXISTS_WITH_DIFFERENT_CURRENCY
            if self._a_user_data[row] != user_data:
                return Code.EXISTS_WITH_DIFFERENT_USER_DATA
            return _EXISTS
        accs[aid] = len(self._a_id)
        self._a_id.append(aid)
        self._a_currency.append(currency)
        self._a_flags.append(flags)
        self._a_user_data.append(user_data)
        self._a_ts.append(ts)
        self._a_dpend.append(0)
        self._a_dpost.append(0)
        self._a_cpend.append(0)
        self._a_cpost.append(0)
        self._a_hist.append(array("I"))
        if self._undo is not None:
            self._undo.append(("account",))
        return _OK

    def _close_account(self, ev: dict) -> int:
        code = _check_shape(ev, _CLOSE_KEYS)
        if code:
            return code
        code = _id_code(ev.get("account_id"), Code.ACCOUNT_ID_MISSING, Code.ACCOUNT_ID_INVALID)
        if code:
            return code
        aid = ev["account_id"]
        row = _shard(self._acc, aid).get(aid)
        if row is None:
            return Code.ACCOUNT_NOT_FOUND
        if self._a_flags[row] & CLOSED:
            return Code.ACCOUNT_ALREADY_CLOSED
        self._a_flags[row] |= CLOSED
        if self._undo is not None:
            self._undo.append(("close", row))
        return _OK

    # ------------------------------------------------------------------------------------------
    # Transfers
    # ------------------------------------------------------------------------------------------

    def _create_transfer(self, ev: dict, ts: int) -> int:
        # Shape: unknown keys and wrong types.
        if not _TRANSFER_KEYS.issuperset(ev):
            return Code.UNKNOWN_FIELD
        get = ev.get
        tid = get("id")
        debit_id = get("debit_account_id")
        credit_id = get("credit_account_id")
        amount = get("amount")
        currency = get("currency")
        # A nil value counts as left out, as for every other field.
        flags = get("flags")
        user_data = get("user_data")
        pending_id = get("pending_id")
        timeout_ms = get("timeout_ms")
        if flags is None:
            flags = 0
        if user_data is None:
            user_data = 0
        if timeout_ms is None:
            timeout_ms = 0
        for v in (tid, debit_id, credit_id, pending_id):
            t = type(v)
            if t is not int and t is not str and v is not None:
                return Code.INVALID_FIELD_TYPE
        for v in (amount, currency):
            if type(v) is not int and v is not None:
                return Code.INVALID_FIELD_TYPE
        if type(flags) is not int or type(user_data) is not int or type(timeout_ms) is not int:
            return Code.INVALID_FIELD_TYPE
        if flags & ~TRANSFER_FLAGS or flags < 0:
            return Code.RESERVED_FLAG

        # Body validation (the body alone decides).
        code = _id_code(tid, Code.ID_MISSING, Code.ID_INVALID)
        if code:
            return code
        kind = flags & (PENDING | POST_PENDING | VOID_PENDING)
        if kind & (kind - 1):
            return Code.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        resolving = kind == POST_PENDING or kind == VOID_PENDING
        if currency is None:
            if not resolving:
                return Code.CURRENCY_MISSING
        elif not 0 < currency <= MAX_U32:
            return Code.CURRENCY_INVALID
        if not 0 <= user_data <= MAX_U64:
            return Code.USER_DATA_INVALID
        if debit_id is None and resolving:
            pass
        else:
            code = _id_code(debit_id, Code.DEBIT_ACCOUNT_ID_MISSING, Code.DEBIT_ACCOUNT_ID_INVALID)
            if code:
                return code
        if credit_id is None and resolving:
            pass
        else:
            code = _id_code(credit_id, Code.CREDIT_ACCOUNT_ID_MISSING,
                            Code.CREDIT_ACCOUNT_ID_INVALID)
            if code:
                return code
        if debit_id is not None and debit_id == credit_id and type(debit_id) is type(credit_id):
            return Code.ACCOUNTS_MUST_BE_DIFFERENT
        if amount is None:
            if not resolving:
                return Code.AMOUNT_MISSING
        elif amount <= 0:
            return Code.AMOUNT_MUST_BE_POSITIVE
        elif amount > MAX_AMOUNT:
            return Code.AMOUNT_TOO_LARGE
        if resolving:
            code = _id_code(pending_id, Code.PENDING_ID_MISSING, Code.PENDING_ID_INVALID)
            if code:
                return code
            if pending_id == tid and type(pending_id) is type(tid):
                return Code.PENDING_ID_MUST_BE_DIFFERENT
        elif pending_id is not None:
            return Code.PENDING_ID_MUST_NOT_BE_SET
        if timeout_ms:
            if kind != PENDING:
                return Code.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
            if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
                return Code.TIMEOUT_INVALID
        flags &= ~LINKED
        raw = (flags, currency, user_data, debit_id, credit_id, amount, pending_id, timeout_ms)

        # Idempotency.  An applied post/void is compared with the gaps it left filled in from
        # its pending transfer (which never goes away); a remembered failure with the raw body.
        ids = _shard(self._tx, tid)
        row = ids.get(tid)
        if row is not None:
            if resolving:
                prow = self._t_pending[row]
                if debit_id is None:
                    debit_id = self._a_id[self._t_debit[prow]]
                if credit_id is None:
                    credit_id = self._a_id[self._t_credit[prow]]
                if amount is None:
                    amount = self._t_amount[prow]
            return self._compare_transfer(row, flags, currency, user_data, debit_id, credit_id,
                                          amount, pending_id, timeout_ms)
        failures = _shard(self._failed, tid)
        failed = failures.get(tid)
        if failed is not None:
            return self._compare_failed(self._f_rows[failed][3], raw)

        code = self._transfer_state_checks(
            kind, pending_id, debit_id, credit_id, amount, currency, ts)
        if type(code) is not tuple:
            if code in TRANSIENT and self._undo is None:
                failures[tid] = len(self._f_rows)
                self._f_rows.append((tid, int(code), ts, raw))  # a Code would be tracked
            return code
        drow, crow, amount, prow = code

        # Apply.
        row = self._store_transfer(tid, drow, crow, amount, ts, flags, user_data, prow,
                                   timeout_ms, ids)
        undo = self._undo
        if kind == 0:
            self._a_dpost[drow] += amount
            self._a_cpost[crow] += amount
            if undo is not None:
                undo.append(("transfer", drow, crow, 0, amount, 0, amount))
        elif kind == PENDING:
            self._a_dpend[drow] += amount
            self._a_cpend[crow] += amount
            _shard(self._p_state, row)[row] = _PENDING
            if timeout_ms:
                heapq.heappush(self._expiry, (ts + timeout_ms * MS, row))
            if undo is not None:
                undo.append(("transfer", drow, crow, amount, 0, amount, 0))
        else:
            reserved = self._t_amount[prow]
            posted = amount if kind == POST_PENDING else 0
            self._a_dpend[drow] -= reserved
            self._a_cpend[crow] -= reserved
            self._a_dpost[drow] += posted
            self._a_cpost[crow] += posted
            _shard(self._p_state, prow)[prow] = _POSTED if kind == POST_PENDING else _VOIDED
            if undo is not None:
                undo.append(("transfer", drow, crow, -reserved, posted, -reserved, posted))
                undo.append(("resolve", prow))
        return _OK

    def _transfer_state_checks(self, kind, pending_id, debit_id, credit_id, amount, currency,
                               ts):
        """State-dependent checks, in code order.  Returns a failing code, or
        (debit row, credit row, amount, pending row) with the gaps of a post/void filled in."""
        acc = self._acc
        a_currency = self._a_currency
        prow = -1
        resolving = kind == POST_PENDING or kind == VOID_PENDING
        if resolving:
            prow = _shard(self._tx, pending_id).get(pending_id, -1)
            if prow < 0:
                return Code.PENDING_TRANSFER_NOT_FOUND
            if not self._t_flags[prow] & PENDING:
                return Code.PENDING_TRANSFER_NOT_PENDING
            p_drow, p_crow = self._t_debit[prow], self._t_credit[prow]
            drow = p_drow if debit_id is None else _shard(acc, debit_id).get(debit_id)
            crow = p_crow if credit_id is None else _shard(acc, credit_id).get(credit_id)
        else:
            drow = _shard(acc, debit_id).get(debit_id)
            crow = _shard(acc, credit_id).get(credit_id)
        if drow is None:
            return Code.DEBIT_ACCOUNT_NOT_FOUND
        if crow is None:
            return Code.CREDIT_ACCOUNT_NOT_FOUND
        if a_currency[drow] != a_currency[crow]:
            return Code.ACCOUNTS_MUST_HAVE_THE_SAME_CURRENCY
        if resolving:
            if drow != p_drow:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
            if crow != p_crow:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
            if currency is not None and currency != a_currency[p_drow]:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_CURRENCY
        elif currency != a_currency[drow]:
            return Code.TRANSFER_MUST_HAVE_THE_SAME_CURRENCY_AS_ACCOUNTS
        if resolving:
            reserved = self._t_amount[prow]
            if amount is None:
                amount = reserved
            if kind == POST_PENDING and amount > reserved:
                return Code.EXCEEDS_PENDING_TRANSFER_AMOUNT
            if kind == VOID_PENDING and amount != reserved:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
            state = _shard(self._p_state, prow)[prow]
            if state == _POSTED:
                return Code.PENDING_TRANSFER_ALREADY_POSTED
            if state == _VOIDED:
                return Code.PENDING_TRANSFER_ALREADY_VOIDED
            timeout = self._t_timeout[prow]
            if state == _EXPIRED or (timeout and self._t_ts[prow] + timeout * MS <= ts):
                return Code.PENDING_TRANSFER_EXPIRED
        a_flags = self._a_flags
        if a_flags[drow] & CLOSED:
            return Code.DEBIT_ACCOUNT_CLOSED
        if a_flags[crow] & CLOSED:
            return Code.CREDIT_ACCOUNT_CLOSED
        if not resolving:
            dpend, dpost = self._a_dpend[drow], self._a_dpost[drow]
            cpend, cpost = self._a_cpend[crow], self._a_cpost[crow]
            if dpend + dpost + amount > MAX_BALANCE:
                return Code.OVERFLOWS_DEBITS
            if cpend + cpost + amount > MAX_BALANCE:
                return Code.OVERFLOWS_CREDITS
            if a_flags[drow] & DEBITS_MUST_NOT_EXCEED_CREDITS and (
                    dpend + dpost + amount > self._a_cpost[drow]):
                return Code.EXCEEDS_CREDITS
            if a_flags[crow] & CREDITS_MUST_NOT_EXCEED_DEBITS and (
                    cpend + cpost + amount > self._a_dpost[crow]):
                return Code.EXCEEDS_DEBITS
        # Posting moves reserved money to posted (never more than was reserved) and voiding
        # releases it: neither can overflow or break a must-not-exceed rule that held before.
        return drow, crow, amount, prow

    def _compare_transfer(self, row, flags, currency, user_data, debit_id, credit_id, amount,
                          pending_id, timeout_ms) -> int:
        drow = self._t_debit[row]
        if self._t_flags[row] != flags:
            return Code.EXISTS_WITH_DIFFERENT_FLAGS
        if currency is not None and self._a_currency[drow] != currency:
            return Code.EXISTS_WITH_DIFFERENT_CURRENCY
        if self._t_user_data[row] != user_data:
            return Code.EXISTS_WITH_DIFFERENT_USER_DATA
        if debit_id is not None and not _same_id(self._a_id[drow], debit_id):
            return Code.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if credit_id is not None and not _same_id(self._a_id[self._t_credit[row]], credit_id):
            return Code.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if amount is not None and self._t_amount[row] != amount:
            return Code.EXISTS_WITH_DIFFERENT_AMOUNT
        prow = self._t_pending[row]
        stored_pending = self._t_id[prow] if prow >= 0 else None
        if not _same_id(stored_pending, pending_id):
            return Code.EXISTS_WITH_DIFFERENT_PENDING_ID
        if self._t_timeout[row] != timeout_ms:
            return Code.EXISTS_WITH_DIFFERENT_TIMEOUT
        return _EXISTS

    @staticmethod
    def _compare_failed(body: tuple, raw: tuple) -> int:
        """A remembered failure against a retry's raw body: first differing field, else
        ID_ALREADY_FAILED."""
        for code, stored, given in zip(_DIFFERENT_FIELD_CODES, body, raw):
            if not _same_id(stored, given):
                return code
        return Code.ID_ALREADY_FAILED

    def _rollback(self, undo: list) -> None:
        """Undo a failed chain's effects, newest first.  Balance undo is by delta, so a change
        made outside the chain in between (none today) would survive."""
        for entry in reversed(undo):
            kind = entry[0]
            if kind == "transfer":
                _, drow, crow, dpend, dpost, cpend, cpost = entry
                self._a_dpend[drow] -= dpend
                self._a_dpost[drow] -= dpost
                self._a_cpend[crow] -= cpend
                self._a_cpost[crow] -= cpost
                row = len(self._t_id) - 1
                tid = self._t_id.pop()
                del _shard(self._tx, tid)[tid]
                for col in (self._t_debit, self._t_credit, self._t_amount, self._t_ts,
                            self._t_flags, self._t_user_data, self._t_pending, self._t_timeout):
                    col.pop()
                self._a_hist[drow].pop()
                self._a_hist[crow].pop()
                if _shard(self._p_state, row).pop(row, None) is not None:
                    entries = [e for e in self._expiry if e[1] != row]
                    if len(entries) != len(self._expiry):
                        heapq.heapify(entries)
                        self._expiry = entries
            elif kind == "resolve":
                prow = entry[1]
                _shard(self._p_state, prow)[prow] = _PENDING
            elif kind == "account":
                aid = self._a_id.pop()
                del _shard(self._acc, aid)[aid]
                for col in (self._a_currency, self._a_flags, self._a_user_data, self._a_ts,
                            self._a_dpend, self._a_dpost, self._a_cpend, self._a_cpost,
                            self._a_hist):
                    col.pop()
            elif kind == "close":
                self._a_flags[entry[1]] &= ~CLOSED

    # ==========================================================================================
    # Queries (read-only; the caller decides how fresh they must be)
    # ==========================================================================================

    def lookup_accounts(self, ids: Iterable) -> list[dict | None]:
        """One dict per id (None where unknown): balances, flags, currency, user data, timestamp."""
        out = []
        for aid in ids:
            row = _shard(self._acc, aid).get(aid) if type(aid) in (int, str) else None
            out.append(None if row is None else self._account_dict(row))
        return out

    def _account_dict(self, row: int) -> dict:
        return {
            "id": self._a_id[row],
            "currency": self._a_currency[row],
            "flags": self._a_flags[row],
            "user_data": self._a_user_data[row],
            "debits_pending": self._a_dpend[row],
            "debits_posted": self._a_dpost[row],
            "credits_pending": self._a_cpend[row],
            "credits_posted": self._a_cpost[row],
            "timestamp": self._a_ts[row],
        }

    def lookup_transfers(self, ids: Iterable) -> list[dict | None]:
        """One dict per id (None where unknown).  `status` is posted, pending, voided, expired
        (for pending transfers), or failed (a remembered transient failure, with its `code`)."""
        out = []
        for tid in ids:
            if type(tid) not in (int, str):
                out.append(None)
                continue
            row = _shard(self._tx, tid).get(tid)
            if row is not None:
                out.append(self._transfer_dict(row))
                continue
            failed = _shard(self._failed, tid).get(tid)
            if failed is None:
                out.append(None)
                continue
            _, code, ts, body = self._f_rows[failed]
            out.append({
                "id": tid, "status": "failed", "code": code, "timestamp": ts,
                "flags": body[0], "currency": body[1], "user_data": body[2],
                "debit_account_id": body[3], "credit_account_id": body[4], "amount": body[5],
                "pending_id": body[6], "timeout_ms": body[7],
            })
        return out

    def _transfer_dict(self, row: int) -> dict:
        flags = self._t_flags[row]
        prow = self._t_pending[row]
        drow = self._t_debit[row]
        if flags & PENDING:
            state = _shard(self._p_state, row)[row]
            timeout = self._t_timeout[row]
            if state == _PENDING and timeout and self._t_ts[row] + timeout * MS <= self.last_ts:
                state = _EXPIRED  # due; released at the next command boundary
            status = _STATE_NAMES[state]
        elif flags & VOID_PENDING:
            status = "voided"
        else:
            status = "posted"
        return {
            "id": self._t_id[row],
            "debit_account_id": self._a_id[drow],
            "credit_account_id": self._a_id[self._t_credit[row]],
            "amount": self._t_amount[row],
            "currency": self._a_currency[drow],
            "flags": flags,
            "user_data": self._t_user_data[row],
            "pending_id": self._t_id[prow] if prow >= 0 else None,
            "timeout_ms": self._t_timeout[row],
            "timestamp": self._t_ts[row],
            "status": status,
        }

    def account_transfers(self, account_id: Any, limit: int = 100,
                          cursor: int = 0) -> tuple[list[dict], int | None]:
        """The account's transfers in the order they were applied, from position `cursor`.

        Returns (transfers, next_cursor); next_cursor is None at the end.  Unknown account:
        ([], None)."""
        row = (_shard(self._acc, account_id).get(account_id)
               if type(account_id) in (int, str) else None)
        if row is None:
            return [], None
        hist = self._a_hist[row]
        cursor = max(0, cursor)
        end = min(len(hist), cursor + max(1, limit))
        items = [self._transfer_dict(r) for r in hist[cursor:end]]
        return items, (end if end < len(hist) else None)

    def balances(self, ids: Iterable) -> list[dict | None]:
        """Balances only: posted and pending per side, and `available` for a debit-limited
        account (credits posted - debits posted - debits pending)."""
        out = []
        for a in self.lookup_accounts(ids):
            if a is None:
                out.append(None)
                continue
            out.append({
                "id": a["id"], "currency": a["currency"],
                "debits_pending": a["debits_pending"], "debits_posted": a["debits_posted"],
                "credits_pending": a["credits_pending"], "credits_posted": a["credits_posted"],
                "available": a["credits_posted"] - a["debits_posted"] - a["debits_pending"],
            })
        return out

    @property
    def transfer_count(self) -> int:
        return len(self._t_id)

    @property
    def account_count(self) -> int:
        return len(self._a_id)

    @property
    def failure_count(self) -> int:
        """Transfer ids remembered as failed with a transient code (see the module's rules)."""
        return len(self._f_rows)

    def totals(self) -> dict[int, tuple[int, int, int, int]]:
        """Per currency: (debits_pending, debits_posted, credits_pending, credits_posted).
        Double entry means debits equal credits in each currency, always."""
        out: dict[int, list[int]] = {}
        for row, cur in enumerate(self._a_currency):
            t = out.setdefault(cur, [0, 0, 0, 0])
            t[0] += self._a_dpend[row]
            t[1] += self._a_dpost[row]
            t[2] += self._a_cpend[row]
            t[3] += self._a_cpost[row]
        return {c: tuple(v) for c, v in out.items()}

    # ==========================================================================================
    # Snapshot, restore, hash
    # ==========================================================================================

    def snapshot(self) -> bytes:
        """The whole state as versioned msgpack bytes.  Deterministic: equal states give equal
        bytes, so `state_hash` is a hash of this."""
        parts = self.snapshot_parts()
        try:
            return b"".join(parts)
        finally:
            _release(parts)

    def snapshot_parts(self) -> list:
        """`snapshot()` as a list of bytes-like parts, in order: the transfer columns are views
        of the columns' own memory, not copies of it.

        A forked child writes a snapshot from these (`raftpay.node`), and every page it fills
        is a page fault on a core the nodes share: with 3M transfers, making the one bytes
        object and writing it cost a child 111k faults, writing these parts 71k (the rest is
        the id list, whose items the packer touches).  A column cannot grow while a
        view of it exists (BufferError): take the parts only where the ledger does not change
        while they live (such a child's copy of it), or call `snapshot()`."""
        t_cols = [self._t_debit, self._t_credit, self._t_amount, self._t_ts, self._t_flags,
                  self._t_user_data, self._t_pending, self._t_timeout]
        packer = msgpack.Packer(use_bin_type=True)
        pack = packer.pack
        head = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "session_ttl_ms": self.session_ttl_ms,
            "max_sessions": self.max_sessions,
            "last_ts": self.last_ts,
            "accounts": [self._a_id, self._a_currency, self._a_flags, self._a_user_data,
                         self._a_ts, self._a_dpend, self._a_dpost, self._a_cpend, self._a_cpost,
                         [_le_bytes(h) for h in self._a_hist]],
        }
        tail = {
            # In row order, the order they were added in (as one dict would list them),
            # whatever shard each fell in.
            "pending": sorted([r, s] for d in _shards(self._p_state) for r, s in d.items()),
            "expiry": [list(e) for e in self._expiry],
            "failed": [[tid, code, ts, list(body)] for tid, code, ts, body in self._f_rows],
            "sessions": [[sid, s[0], s[1], [[q, r] for q, r in s[2].items()]]
                         for sid, s in self._sessions.items()],
            "next_session_sweep": self._next_session_sweep,
        }
        # The map msgpack.packb would write for {**head, "transfers": [...], **tail}, in pieces.
        parts = [packer.pack_map_header(len(head) + 1 + len(tail))]
        for key, value in head.items():
            parts += (pack(key), pack(value))
        parts += (pack("transfers"), packer.pack_array_header(1 + len(t_cols)), pack(self._t_id))
        for col in t_cols:
            view = _le_view(col)
            parts += (_bin_header(view.nbytes), view)
        for key, value in tail.items():
            parts += (pack(key), pack(value))
        return parts

    @classmethod
    def restore(cls, data: bytes) -> "Ledger":
        """Rebuild a ledger from `snapshot()` bytes.  Raises ValueError on a foreign or
        newer-version snapshot (a node must not start from state it cannot read)."""
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise ValueError(f"snapshot does not decode: {e}") from None
        if type(doc) is not dict or doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a raftpay ledger snapshot")
        if doc.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {doc.get('version')!r} is not supported "
                             f"(this build reads version {SNAPSHOT_VERSION})")
        led = cls(doc["session_ttl_ms"], doc.get("max_sessions", MAX_SESSIONS))
        led.last_ts = doc["last_ts"]
        (a_id, led._a_currency, led._a_flags, led._a_user_data, led._a_ts, led._a_dpend,
         led._a_dpost, led._a_cpend, led._a_cpost, hist) = doc["accounts"]
        led._a_id = a_id
        led._acc = _index_of(a_id)
        led._a_hist = [_from_le("I", h) for h in hist]
        t_id, *cols = doc["transfers"]
        led._t_id = t_id
        led._tx = _index_of(t_id)
        (led._t_debit, led._t_credit, led._t_amount, led._t_ts, led._t_flags, led._t_user_data,
         led._t_pending, led._t_timeout) = [
            _from_le(tc, b) for tc, b in zip("IIQQBQiI", cols)]
        p_state = led._p_state
        for r, s in doc["pending"]:
            p_state[hash(r) % 8179][r] = s
        led._expiry = [tuple(e) for e in doc["expiry"]]
        led._f_rows = [(tid, code, ts, tuple(body)) for tid, code, ts, body in doc["failed"]]
        led._failed = _index_of(row[0] for row in led._f_rows)
        # Least recently used first, as `_drop_expired_sessions` needs: a snapshot written
        # before sessions were kept in that order listed them as registered.
        led._sessions = collections.OrderedDict(
            (sid, [last, floor, {q: r for q, r in replies}])
            for sid, last, floor, replies in sorted(doc["sessions"], key=lambda s: s[1]))
        led._next_session_sweep = doc["next_session_sweep"]
        return led

    def state_hash(self) -> str:
        """SHA-256 (hex) of the snapshot: replicas that applied the same log agree on it."""
        parts = self.snapshot_parts()
        try:
            digest = hashlib.sha256()
            for part in parts:
                digest.update(part)
            return digest.hexdigest()
        finally:
            _release(parts)


# Order of the fields in a remembered failure's body, with the code for a difference in each.
_DIFFERENT_FIELD_CODES = (
    Code.EXISTS_WITH_DIFFERENT_FLAGS, Code.EXISTS_WITH_DIFFERENT_CURRENCY,
    Code.EXISTS_WITH_DIFFERENT_USER_DATA, Code.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID,
    Code.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, Code.EXISTS_WITH_DIFFERENT_AMOUNT,
    Code.EXISTS_WITH_DIFFERENT_PENDING_ID, Code.EXISTS_WITH_DIFFERENT_TIMEOUT,
)


_FAST_KEYS = frozenset({"op", "id", "debit_account_id", "credit_account_id", "amount", "currency",
                        "user_data", "flags"})


def _is_linked(ev: Any) -> bool:
    if type(ev) is not dict:
        return False
    flags = ev.get("flags")
    return type(flags) is int and flags > 0 and bool(flags & LINKED)


def _same_id(a: Any, b: Any) -> bool:
    # 1 and "1" are different ids; True == 1 must not make them equal either.
    return a == b and type(a) is type(b)


def _le_bytes(col: array) -> bytes:
    if sys.byteorder == "little":
        return col.tobytes()
    swapped = array(col.typecode, col)
    swapped.byteswap()
    return swapped.tobytes()


def _le_view(col: array) -> memoryview:
    """The column's bytes, little-endian, as a view of its memory where the machine is."""
    if sys.byteorder == "little":
        return memoryview(col).cast("B")
    return memoryview(_le_bytes(col))


def _bin_header(n: int) -> bytes:
    """The header msgpack writes before `n` bytes of bin (its smallest form)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError(f"a column of {n} bytes does not fit a msgpack bin")


def _release(parts: list) -> None:
    for part in parts:
        if type(part) is memoryview:
            part.release()


def _from_le(typecode: str, data: bytes) -> array:
    col = array(typecode)
    col.frombytes(data)
    if sys.byteorder != "little":
        col.byteswap()
    return col
