"""Property tests: `raftpay.ledger.Ledger` against the naive reference model in ledger_model.py.

A hypothesis state machine drives one ledger and the model with the same random commands over a
small id space (so duplicates, retries with same and different bodies, and id reuse after
failures are frequent) and log timestamps that sometimes go backwards or repeat, and checks:

* every reply (code, per-event results, session id) equals the model's, event by event, and after
  every step all accounts, transfers (incl. remembered failures and pending status) and every
  account's transfer history equal the model's;
* money is conserved per currency (`totals()`), balances never go negative, and accounts with
  debits_must_not_exceed_credits / credits_must_not_exceed_debits never break their rule;
* re-applying an earlier submit changes no balance and answers exists / id_already_failed /
  the same validation code; a session duplicate gets the identical stored reply;
* replaying the log into a fresh ledger gives the same `state_hash()`, and both agree (with the
  model) on which sessions are alive;
* snapshot -> restore gives the same hash, and the restored fork answers every later command
  exactly like the original and keeps the same hash;
* stored timestamps strictly increase in apply order.

Plus: one random batch against a fixed ledger (validation and precedence), an exhaustive
deterministic table (every mutation of every kind of event, every single-field retry, one
case per state-dependent code incl. the MAX_BALANCE and timeout boundaries), session TTL and
keep_alive boundaries, the stored-reply cap, and regressions for the bugs these tests found.

The machine aims at the interesting instants on purpose (the next pending expiry and the next
session expiry, exactly and a tick before) and fills placeholders from the current state
(`materialize`): posts/voids name pending transfers that exist, amounts sit on an account's
limit, credit accounts share the debit account's currency.  RAFTPAY_PROPS_SCALE=N multiplies
every max_examples for a longer soak.  The model lives in ledger_model.py.
"""

from __future__ import annotations

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule)

from raftpay.codes import TRANSIENT, Code
from raftpay.ledger import Ledger

try:
    from .ledger_model import (  # type: ignore[import-not-found]
        CLOSED, CMNED, DMNEC, LINKED, MAX_AMOUNT, MAX_U32, MAX_U64, MS, PENDING, POST, VOID,
        Model)
except ImportError:  # tests/ is not a package: pytest puts it on sys.path (rootdir-relative)
    from ledger_model import (  # type: ignore[no-redef]
        CLOSED, CMNED, DMNEC, LINKED, MAX_AMOUNT, MAX_U32, MAX_U64, MS, PENDING, POST, VOID,
        Model)

#: Multiplies every max_examples (e.g. RAFTPAY_PROPS_SCALE=20 for a long soak run).
SCALE = max(1, int(os.environ.get("RAFTPAY_PROPS_SCALE", "1")))
TTL_MS = 3  # session TTL of the machine's ledger: 3 ms of log time
MAX_LIVE = 3  # live sessions at most in the machine's ledger: a fourth ends the least recently used
BANKS = {1: "bank-1", 2: "bank-2"}  # unconstrained accounts that fund the others
ACC_IDS = [1, 2, 3, 4, "1", "acc-x"]  # 1 and "1" are different ids
ACC_POOL = ACC_IDS + list(BANKS.values())
TX_IDS = [1, 2, 3, 4, 5, 6, "t1", "2"]  # hot transfer ids: duplicates and retries are frequent
LONG_OK_ID = "é" * 32  # exactly 64 bytes of UTF-8: valid
# Clock steps relative to the ledger's last timestamp: backwards, repeated, +1, sub-ms, and
# jumps of whole milliseconds that cross pending timeouts (1..4 ms) and the session TTL.
DTS = [-3 * MS, -1, 0, 0, 1, 1, 7, MS - 1, MS, 2 * MS, 3 * MS, 3 * MS + 1, 4 * MS]
# The machine also aims at the exact instants where things happen: the next pending expiry
# (minus 0..2 ticks, so an event inside the batch can land on it) and the next session expiry.
CLOCK = DTS + ["expiry-0", "expiry-1", "expiry-2", "ttl+0", "ttl+1", "huge"]


# Placeholders filled in from the current state when a batch is applied (`materialize`), so the
# strategies stay static (and shrink well) yet posts/voids name pending transfers that exist.
class Fresh:  # a transfer id never used before
    def __repr__(self):
        return "FRESH"


class PendingRef:  # the k-th pending transfer created so far (or a hot id if there is none)
    def __init__(self, k):
        self.k = k

    def __repr__(self):
        return f"PENDING[{self.k}]"


class Echo:  # the named pending transfer's own value for this field (dropped if unknown)
    def __repr__(self):
        return "ECHO"


class DebitCurrency:  # the debit account's currency (1 if there is no such account)
    def __repr__(self):
        return "DEBIT_CURRENCY"


class Peer:  # the k-th other open-or-closed account with the debit account's currency
    def __init__(self, k):
        self.k = k

    def __repr__(self):
        return f"PEER[{self.k}]"


class EchoPlus:  # the named pending transfer's amount plus d
    def __init__(self, d):
        self.d = d

    def __repr__(self):
        return f"ECHO{self.d:+d}"


class Limit:  # what the debit (or credit) account's must-not-exceed rule still allows, plus d
    def __init__(self, d):
        self.d = d

    def __repr__(self):
        return f"LIMIT{self.d:+d}"


FRESH, ECHO, DEBIT_CURRENCY = Fresh(), Echo(), DebitCurrency()

# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------
acc_id = st.sampled_from(ACC_POOL)
account_pair = st.one_of(
    st.sampled_from([(a, b) for a in ACC_POOL for b in ACC_POOL if a != b]),
    st.tuples(acc_id, st.builds(Peer, st.integers(0, 7))),
    st.tuples(acc_id, st.builds(Peer, st.integers(0, 7))))
# Weights by index ranges (hypothesis' one_of does not weight repeated branches reliably).
tx_id = st.integers(0, 15).map(lambda k: TX_IDS[k] if k < len(TX_IDS) else FRESH)
fresh_biased_tx_id = st.integers(0, 23).map(lambda k: TX_IDS[k] if k < len(TX_IDS) else FRESH)
pending_ref = st.integers(0, 39).map(lambda k: PendingRef(k) if k < 32 else TX_IDS[k - 32])
currency = st.sampled_from([1, 2])
transfer_currency = st.one_of(st.just(DEBIT_CURRENCY), st.just(DEBIT_CURRENCY), currency)
SMALL = [1, 2, 5, 10, 25, 60, 100]
small_amount = st.sampled_from(SMALL)
_AMOUNTS = SMALL + [MAX_AMOUNT, MAX_AMOUNT // 2 + 1, Limit(0), Limit(1), Limit(-1), Limit(0)]
amount = st.integers(0, len(_AMOUNTS) - 1).map(_AMOUNTS.__getitem__)
_RESOLVE_AMOUNTS = SMALL[:4] + [ECHO, ECHO, EchoPlus(1), EchoPlus(-1)]
resolve_amount = st.integers(0, len(_RESOLVE_AMOUNTS) - 1).map(_RESOLVE_AMOUNTS.__getitem__)

create_account = st.fixed_dictionaries(
    {"op": st.just("create_account"), "id": acc_id, "currency": currency},
    optional={"flags": st.sampled_from([0, DMNEC, DMNEC, CMNED, CMNED, CLOSED]),
              "user_data": st.sampled_from([0, 7])})


def _with_accounts(d: dict, pair: tuple) -> dict:
    d = dict(d)
    d["debit_account_id"], d["credit_account_id"] = pair
    return d


plain_transfer = st.builds(_with_accounts, st.fixed_dictionaries(
    {"op": st.just("create_transfer"), "id": tx_id, "amount": amount,
     "currency": transfer_currency},
    optional={"user_data": st.sampled_from([0, 1]), "flags": st.just(0)}), account_pair)

pending_transfer = st.builds(_with_accounts, st.fixed_dictionaries(
    {"op": st.just("create_transfer"), "id": fresh_biased_tx_id, "amount": amount,
     "currency": transfer_currency, "flags": st.just(PENDING)},
    optional={"timeout_ms": st.sampled_from([0, 1, 2, 4]),
              "user_data": st.sampled_from([0, 1])}), account_pair)


def _resolve(flag: int):
    return st.fixed_dictionaries(
        {"op": st.just("create_transfer"), "id": fresh_biased_tx_id, "pending_id": pending_ref,
         "flags": st.just(flag)},
        optional={"amount": resolve_amount,
                  "debit_account_id": st.one_of(acc_id, st.just(ECHO), st.just(ECHO)),
                  "credit_account_id": st.one_of(acc_id, st.just(ECHO), st.just(ECHO)),
                  "currency": st.integers(0, 5).map(lambda k: k + 1 if k < 2 else ECHO),
                  "user_data": st.sampled_from([0, 1])})


post_transfer = _resolve(POST)
void_transfer = _resolve(VOID)
close_account = st.fixed_dictionaries(
    {"op": st.just("close_account"), "account_id": acc_id})

# Mutations that make an event invalid (or odd): (key, value); value _DROP removes the key.
_DROP = object()
MUTATIONS = [
    ("memo", 1),  # unknown field
    ("amount", "5"), ("flags", True), ("id", 1.5), ("currency", "1"), ("user_data", "0"),
    ("debit_account_id", 2.0), ("timeout_ms", "1"), ("account_id", [1]),  # wrong types
    ("amount", 0), ("amount", -3), ("amount", MAX_AMOUNT + 1),
    ("id", 0), ("id", -1), ("id", ""), ("id", "x" * 65), ("id", "😀" * 17), ("id", 1 << 64),
    ("id", LONG_OK_ID), ("debit_account_id", 0), ("credit_account_id", "y" * 65),
    ("pending_id", 0), ("pending_id", 3), ("pending_id", "z" * 65),
    ("account_id", ""), ("account_id", 1 << 64),
    ("flags", 16), ("flags", -1), ("flags", PENDING | POST), ("flags", DMNEC | CMNED),
    ("flags", POST | VOID), ("flags", PENDING), ("flags", POST), ("flags", VOID),
    ("id", "\ud800"), ("debit_account_id", "a\udfff"), ("pending_id", "\udc00"),  # surrogates
    ("id", None), ("amount", None), ("flags", None), ("user_data", None), ("currency", None),
    ("timeout_ms", None), ("debit_account_id", None), ("account_id", None), ("memo", None),
    ("op", None),  # nil counts as left out (but an undefined key is still unknown)
    ("currency", 0), ("currency", MAX_U32 + 1), ("user_data", -1), ("user_data", MAX_U64 + 1),
    ("timeout_ms", 3), ("timeout_ms", -1), ("timeout_ms", MAX_U32 + 1),
    ("id", _DROP), ("currency", _DROP), ("amount", _DROP), ("debit_account_id", _DROP),
    ("credit_account_id", _DROP), ("pending_id", _DROP), ("account_id", _DROP),
    ("op", _DROP), ("op", "create_widget"), ("op", 7),
]


def _mutate(ev: dict, mutation: tuple) -> dict:
    key, value = mutation
    ev = dict(ev)
    if value is _DROP:
        ev.pop(key, None)
    else:
        ev[key] = value
    return ev


def _same_accounts(ev: dict) -> dict:
    ev = dict(ev)
    if "debit_account_id" in ev:
        ev["credit_account_id"] = ev["debit_account_id"]
    return ev


valid_event = st.one_of(plain_transfer, plain_transfer, pending_transfer, pending_transfer,
                        post_transfer, void_transfer, create_account)
invalid_event = st.one_of(
    st.builds(_mutate, st.one_of(valid_event, close_account), st.sampled_from(MUTATIONS)),
    st.builds(_same_accounts, st.one_of(plain_transfer, pending_transfer, post_transfer)),
    st.sampled_from([5, "event", [], None]),
)


def _link(ev, linked: bool):
    if linked and type(ev) is dict and type(ev.get("flags", 0)) is int \
            and ev.get("flags", 0) >= 0:
        ev = dict(ev)
        ev["flags"] = ev.get("flags", 0) | LINKED
    return ev


event = st.builds(_link,
                  st.one_of(valid_event, valid_event, valid_event, valid_event, valid_event,
                            invalid_event, valid_event, valid_event, valid_event, valid_event,
                            invalid_event, close_account),
                  st.sampled_from([False, False, False, False, False, True]))
events = st.lists(event, min_size=0, max_size=6)

BAD_COMMANDS = [5, "submit", None, {}, {"type": "nope"}, {"type": "submit"},
                {"type": "submit", "events": "x"}, {"type": "submit", "events": {}},
                {"type": "keep_alive"}, {"type": "keep_alive", "session": "1"}]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def norm(reply: dict) -> dict:
    """A reply without its free-text message, with codes as plain ints."""
    out = {k: v for k, v in reply.items() if k != "message"}
    out["code"] = int(out["code"])
    if "results" in out:
        out["results"] = [int(c) for c in out["results"]]
    return out


def ids_in(evs) -> tuple[set, set]:
    """Hashable account and transfer ids named by some events (to look them up later)."""
    accs, txs = set(), set()
    for ev in evs if type(evs) is list else []:
        if type(ev) is not dict:
            continue
        for k, v in ev.items():
            if type(v) not in (int, str):
                continue
            if k in ("debit_account_id", "credit_account_id", "account_id") or (
                    k == "id" and ev.get("op") == "create_account"):
                accs.add(v)
            elif k == "pending_id" or (k == "id" and ev.get("op") == "create_transfer"):
                txs.add(v)
    return accs, txs


# Codes a re-applied submit may answer for an event, given its first answer.
def expected_on_retry(first: int) -> int:
    if first in (Code.OK, Code.EXISTS):
        return Code.EXISTS
    if first in TRANSIENT:
        return Code.ID_ALREADY_FAILED
    return first  # validation (the body decides) and exists_* / id_already_failed stay


# ------------------------------------------------------------------------------------------------
# The state machine
# ------------------------------------------------------------------------------------------------
class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.led = Ledger(session_ttl_ms=TTL_MS, max_sessions=MAX_LIVE)
        self.model = Model(TTL_MS, MAX_LIVE)
        self.log: list[tuple] = []  # (command, ts) exactly as given to the ledger
        self.fork: Ledger | None = None  # restored from a snapshot, fed every later command
        self.acc_ids: set = set(ACC_POOL)
        self.tx_ids: set = set(TX_IDS)
        self.fresh = 1000
        self.pendings: list = []  # ids of pending transfers created, in order
        # Client side of sessions: sid -> {"next": next seq, "sent": {seq: events},
        # "replies": {seq: first reply}}.
        self.clients: dict[int, dict] = {}
        self.plain_submits: list[tuple[list, list]] = []  # (events, first results)
        self.applied: list[tuple[str, object]] = []  # ("a"|"t", id) in apply order

    # -------------------------------------------------------------- plumbing
    def ts(self, dt) -> int:
        if dt == "huge":  # not a timestamp at all: the command gets last + 1
            return 1 << 64
        if dt == "max":  # the largest timestamp there is; time stays up there afterwards
            return (1 << 63) - 1
        if type(dt) is str:
            what, k = dt.split("+") if "+" in dt else dt.split("-")
            if what == "expiry":
                target = self.model.next_expiry()
                target = None if target is None else target - int(k)
            else:
                lasts = [s["last"] for s in self.model.sessions.values()]
                target = min(lasts) + self.model.ttl + int(k) if lasts else None
            return self.model.time + 1 if target is None else target
        return self.model.time + dt  # may be negative: the ledger clamps it to 0

    def materialize(self, evs: list) -> list:
        out = []
        for ev in evs:
            if type(ev) is not dict:
                out.append(ev)
                continue
            ev = dict(ev)
            if ev.get("id") is FRESH:
                self.fresh += 1
                ev["id"] = self.fresh
            ref = ev.get("pending_id")
            if isinstance(ref, PendingRef):
                ref = ev["pending_id"] = (self.pendings[ref.k % len(self.pendings)]
                                          if self.pendings else TX_IDS[ref.k % len(TX_IDS)])
            pending = self.model.ledger["transfers"].get(ref) if ref is not None else None
            peer = ev.get("credit_account_id")
            if isinstance(peer, Peer):
                accounts = self.model.ledger["accounts"]
                debit = accounts.get(ev.get("debit_account_id"))
                same = [a for a in ACC_POOL if a in accounts and debit is not None
                        and accounts[a]["currency"] == debit["currency"]
                        and a != ev.get("debit_account_id")]
                ev["credit_account_id"] = (same[peer.k % len(same)] if same
                                           else ACC_POOL[peer.k % len(ACC_POOL)])
            if ev.get("currency") is DEBIT_CURRENCY:
                debit = self.model.ledger["accounts"].get(ev.get("debit_account_id"))
                ev["currency"] = 1 if debit is None else debit["currency"]
            if isinstance(ev.get("amount"), EchoPlus):
                ev["amount"] = max(1, (pending["amount"] if pending else 10) + ev["amount"].d)
            if isinstance(ev.get("amount"), Limit):
                accounts = self.model.ledger["accounts"]
                d = accounts.get(ev.get("debit_account_id"))
                c = accounts.get(ev.get("credit_account_id"))
                room = 10
                if d is not None and d["flags"] & DMNEC:
                    room = d["credits_posted"] - d["debits_posted"] - d["debits_pending"]
                elif c is not None and c["flags"] & CMNED:
                    room = c["debits_posted"] - c["credits_posted"] - c["credits_pending"]
                ev["amount"] = max(1, room + ev["amount"].d)
            for k in ("debit_account_id", "credit_account_id", "amount", "currency"):
                if ev.get(k) is ECHO:
                    if pending is None:
                        del ev[k]
                    else:
                        ev[k] = pending[k]
            out.append(ev)
        return out

    def do(self, command, ts: int) -> dict:
        reply = self.led.apply(command, ts)
        expected = self.model.apply(copy.deepcopy(command), ts)
        assert norm(reply) == norm(expected), (command, ts)
        if self.fork is not None:
            fork_reply = self.fork.apply(copy.deepcopy(command), ts)
            assert norm(fork_reply) == norm(reply)
            assert self.fork.state_hash() == self.led.state_hash()
        self.log.append((copy.deepcopy(command), ts))
        if type(command) is dict and command.get("type") == "submit" \
                and type(command.get("events")) is list and not self.model.replayed:
            evs = command["events"]
            accs, txs = ids_in(evs)
            self.acc_ids |= accs
            self.tx_ids |= txs
            for ev, code in zip(evs, reply.get("results", ())):
                if code == Code.OK and type(ev) is dict \
                        and ev.get("op") in ("create_account", "create_transfer"):
                    self.applied.append(("a" if ev["op"] == "create_account" else "t", ev["id"]))
                    if ev["op"] == "create_transfer" and (ev.get("flags") or 0) & PENDING:
                        self.pendings.append(ev["id"])
        return reply

    def boundary_model(self, ts: int) -> Model:
        """The model as it will be just after the next command's boundary (pending expiry)."""
        m = copy.deepcopy(self.model)
        m.apply({"type": "tick"}, ts)
        return m

    # -------------------------------------------------------------- rules
    @initialize(setup=st.lists(
        st.tuples(currency, st.sampled_from([0, DMNEC, CMNED, 0, DMNEC, CMNED]),
                  st.sampled_from([False, False, True]), st.sampled_from([1000, 100, 0])),
        min_size=len(ACC_IDS), max_size=len(ACC_IDS)),
        pendings=st.lists(st.tuples(st.sampled_from([0, 1, 2, 4]), small_amount, st.booleans()),
                          min_size=4, max_size=4),
        dt=st.sampled_from(CLOCK))
    def open_accounts(self, setup, pendings, dt):
        """Banks, most of the pool's accounts, some money in them, and pending transfers."""
        evs = [{"op": "create_account", "id": b, "currency": c} for c, b in BANKS.items()]
        funding = []
        for aid, (cur, flags, skip, fund) in zip(ACC_IDS, setup):
            if skip and aid in (4, "acc-x"):
                continue  # left out: *_account_not_found stays reachable
            evs.append({"op": "create_account", "id": aid, "currency": cur, "flags": flags})
            if fund:
                debit, credit = ((aid, BANKS[cur]) if flags & CMNED else (BANKS[cur], aid))
                funding.append({"op": "create_transfer", "id": f"fund-{aid!r}", "amount": fund,
                                "currency": cur, "debit_account_id": debit,
                                "credit_account_id": credit})
        for i, (timeout, amt, outgoing) in enumerate(pendings):
            aid, cur = ACC_IDS[i], setup[i][0]
            debit, credit = (aid, BANKS[cur]) if outgoing else (BANKS[cur], aid)
            funding.append({"op": "create_transfer", "id": f"seed-{i}", "amount": amt,
                            "currency": cur, "debit_account_id": debit,
                            "credit_account_id": credit, "flags": PENDING,
                            "timeout_ms": timeout})
        self.do({"type": "submit", "events": evs + funding}, self.ts(dt))

    def _submit(self, data, dt):
        evs = self.materialize(data.draw(events, label="events"))
        reply = self.do({"type": "submit", "events": evs}, self.ts(dt))
        self.plain_submits.append((copy.deepcopy(evs), [int(c) for c in reply["results"]]))

    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def submit(self, data, dt):
        self._submit(data, dt)

    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def submit_more(self, data, dt):  # a second rule: submits are most of the traffic
        self._submit(data, dt)

    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def submit_again(self, data, dt):
        self._submit(data, dt)

    @precondition(lambda self: self.plain_submits)
    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def resubmit(self, data, dt):
        """Duplicates change nothing: re-apply an earlier submit with the same events."""
        evs, first = data.draw(st.sampled_from(self.plain_submits))
        ts = self.ts(dt)
        eligible = (
            Code.LINKED_EVENT_FAILED not in first and Code.LINKED_EVENT_CHAIN_OPEN not in first
            # close_account is not idempotent (a second close is account_already_closed)
            and not any(type(e) is dict and e.get("op") == "close_account" for e in evs))
        expected_accounts = self.boundary_model(ts).ledger["accounts"]
        count = self.led.transfer_count
        reply = self.do({"type": "submit", "events": copy.deepcopy(evs)}, ts)
        if eligible:
            assert [int(c) for c in reply["results"]] == [expected_on_retry(c) for c in first]
            assert self.led.transfer_count == count
            ids = sorted(expected_accounts, key=repr)
            assert self.led.lookup_accounts(ids) == [expected_accounts[a] for a in ids]

    def _known_bodies(self) -> list[dict]:
        """Create-transfer bodies to retry: as sent earlier, as stored (applied), and as
        remembered (failed)."""
        bodies = [e for evs, _ in self.plain_submits for e in evs
                  if type(e) is dict and e.get("op") == "create_transfer"
                  and type(e.get("flags", 0)) is int]
        keys = ("id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
                "user_data", "pending_id", "timeout_ms")
        for t in list(self.model.ledger["transfers"].values()) + \
                list(self.model.ledger["failed"].values()):
            body = {"op": "create_transfer"}
            body.update({k: t[k] for k in keys if t[k] is not None})
            bodies += [body, body]
        return bodies

    @precondition(lambda self: self.plain_submits)
    @rule(data=st.data(), dt=st.sampled_from(CLOCK),
          tweak=st.sampled_from(["none", "amount", "timeout_ms", "pending_id", "user_data",
                                 "currency", "debit_account_id", "credit_account_id", "flags",
                                 "drop"]))
    def retry_with_other_body(self, data, dt, tweak):
        """Retry a known transfer id with the same body, or one field changed or left out."""
        ev = dict(data.draw(st.sampled_from(self._known_bodies())))
        ev["flags"] = ev.get("flags", 0) & ~LINKED
        if tweak == "drop":
            key = data.draw(st.sampled_from(sorted(k for k in ev if k not in ("op", "id"))))
            del ev[key]
        elif tweak == "flags":
            ev["flags"] = data.draw(st.sampled_from([0, PENDING, POST, VOID]))
        elif tweak == "pending_id":
            ev["pending_id"] = self.materialize(
                [{"pending_id": data.draw(pending_ref)}])[0]["pending_id"]
        elif tweak in ("debit_account_id", "credit_account_id"):
            ev[tweak] = data.draw(acc_id)
        elif tweak == "currency":
            ev["currency"] = 3 - ev["currency"] if ev.get("currency") in (1, 2) else 1
        elif tweak == "timeout_ms":
            ev["timeout_ms"] = data.draw(st.sampled_from([0, 1, 2, 4]))
        elif tweak != "none":
            old = ev.get(tweak)
            ev[tweak] = old + 1 if type(old) is int else 1
        self.do({"type": "submit", "events": [ev]}, self.ts(dt))

    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def submit_chain(self, data, dt):
        """A closed linked chain of mostly valid events (so chains succeed and roll back)."""
        chain = data.draw(st.lists(st.one_of(valid_event, valid_event, valid_event,
                                             invalid_event), min_size=2, max_size=4))
        chain = [_link(ev, True) for ev in chain[:-1]] + chain[-1:]
        extra = data.draw(st.lists(event, max_size=2))
        evs = self.materialize(chain + extra)
        reply = self.do({"type": "submit", "events": evs}, self.ts(dt))
        self.plain_submits.append((copy.deepcopy(evs), [int(c) for c in reply["results"]]))

    @rule(dt=st.sampled_from(CLOCK))
    def register_session(self, dt):
        reply = self.do({"type": "register_session"}, self.ts(dt))
        self.clients[reply["session"]] = {"next": 1, "sent": {}, "replies": {}}

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), dt=st.sampled_from(CLOCK),
          mode=st.sampled_from(["new", "new", "new", "dup", "dup", "dup_other_body", "random"]),
          ack_mode=st.sampled_from(["zero", "zero", "all_but_last", "all", "random"]))
    def session_submit(self, data, dt, mode, ack_mode):
        sid = data.draw(st.sampled_from(sorted(self.clients) + [424242]))
        client = self.clients.get(sid, {"next": 1, "sent": {}, "replies": {}})
        seq = client["next"]
        evs = None
        if mode in ("dup", "dup_other_body") and client["sent"]:
            seq = data.draw(st.sampled_from(sorted(client["sent"])))
            if mode == "dup":
                evs = copy.deepcopy(client["sent"][seq])
        elif mode == "random":
            seq = data.draw(st.integers(0, client["next"] + 1))
        if evs is None:
            evs = self.materialize(data.draw(events, label="events"))
        ack = {"zero": 0, "all_but_last": max(0, client["next"] - 1), "all": client["next"],
               "random": data.draw(st.integers(-1, client["next"] + 1))}[ack_mode]
        ts = self.ts(dt)
        expected_accounts = self.boundary_model(ts).ledger["accounts"]
        count = self.led.transfer_count
        command = {"type": "submit", "events": evs, "session": sid, "seq": seq}
        if ack_mode != "zero" or data.draw(st.booleans()):
            command["ack"] = ack
        before_dup = seq in client["replies"]
        reply = self.do(command, ts)
        if reply["code"] == Code.OK and sid in self.clients:
            if before_dup:
                # A duplicate: the identical stored reply, and nothing changes.
                assert norm(reply) == norm(client["replies"][seq])
                assert self.led.transfer_count == count
                ids = sorted(expected_accounts, key=repr)
                assert self.led.lookup_accounts(ids) == [expected_accounts[a] for a in ids]
            else:
                client["replies"][seq] = copy.deepcopy(reply)
                client["sent"][seq] = copy.deepcopy(evs)
                client["next"] = max(client["next"], seq + 1)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), dt=st.sampled_from(CLOCK))
    def keep_alive(self, data, dt):
        sid = data.draw(st.sampled_from(sorted(self.clients) + [7]))
        self.do({"type": "keep_alive", "session": sid}, self.ts(dt))

    @rule(dt=st.sampled_from(CLOCK))
    def tick(self, dt):
        self.do({"type": "tick"}, self.ts(dt))

    @rule(command=st.sampled_from(BAD_COMMANDS), dt=st.sampled_from(CLOCK + [-(1 << 70), "max"]))
    def bad_command(self, command, dt):
        self.do(copy.deepcopy(command), self.ts(dt))

    @rule()
    def snapshot_fork(self):
        """snapshot -> restore: same bytes, same hash; the fork then follows every command."""
        data = self.led.snapshot()
        fork = Ledger.restore(data)
        assert fork.snapshot() == data
        assert fork.state_hash() == self.led.state_hash()
        self.fork = fork

    @precondition(lambda self: len(self.log) >= 5)
    @rule()
    def replay_log(self):
        """The same log into a fresh ledger: same hash, and the same sessions alive."""
        fresh = Ledger(session_ttl_ms=TTL_MS, max_sessions=MAX_LIVE)
        for command, ts in self.log:
            fresh.apply(copy.deepcopy(command), ts)
        assert fresh.state_hash() == self.led.state_hash()
        alive = self.model.alive_sessions(self.model.time + 1)
        for sid in sorted(self.clients):
            codes = []
            for led in (self.led, fresh):
                probe = Ledger.restore(led.snapshot())
                codes.append(probe.apply({"type": "keep_alive", "session": sid}, 0)["code"])
            assert codes[0] == codes[1], sid
            assert (codes[0] == Code.OK) == (sid in alive), sid

    # -------------------------------------------------------------- invariants
    @invariant()
    def matches_model(self):
        accs = sorted(self.acc_ids, key=repr)
        txs = sorted(self.tx_ids, key=repr)
        assert self.led.lookup_accounts(accs) == [self.model.lookup_account(a) for a in accs]
        assert self.led.lookup_transfers(txs) == [self.model.lookup_transfer(t) for t in txs]
        for a in accs:
            items, _ = self.led.account_transfers(a, limit=10_000)
            assert [t["id"] for t in items] == self.model.account_history(a), a
        assert self.led.last_ts == self.model.time
        assert self.led.transfer_count == len(self.model.ledger["order"])

    @invariant()
    def money_is_conserved(self):
        totals = self.led.totals()
        assert totals == self.model.totals()
        for cur, (dpend, dpost, cpend, cpost) in totals.items():
            assert dpend == cpend, cur
            assert dpost == cpost, cur

    @invariant()
    def constrained_accounts_hold(self):
        for a in self.led.lookup_accounts(sorted(self.acc_ids, key=repr)):
            if a is None:
                continue
            assert min(a["debits_pending"], a["debits_posted"], a["credits_pending"],
                       a["credits_posted"]) >= 0, a
            if a["flags"] & DMNEC:
                assert a["debits_pending"] + a["debits_posted"] <= a["credits_posted"], a
            if a["flags"] & CMNED:
                assert a["credits_pending"] + a["credits_posted"] <= a["debits_posted"], a

    @invariant()
    def timestamps_increase_in_apply_order(self):
        stamps = []
        for kind, i in self.applied:
            obj = (self.led.lookup_accounts if kind == "a" else self.led.lookup_transfers)([i])[0]
            stamps.append(obj["timestamp"])
        assert all(a < b for a, b in zip(stamps, stamps[1:])), stamps
        assert not stamps or stamps[-1] <= self.led.last_ts


LedgerMachine.TestCase.settings = settings(
    max_examples=100 * SCALE, stateful_step_count=40, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large])
TestLedgerAgainstModel = LedgerMachine.TestCase


# ------------------------------------------------------------------------------------------------
# Focused properties
# ------------------------------------------------------------------------------------------------
def _base() -> tuple[Ledger, Model]:
    """A small fixed ledger: accounts in both currencies with both limits, a closed one,
    money, an open pending transfer, a posted one, and a remembered failure."""
    led, model = Ledger(session_ttl_ms=TTL_MS), Model(TTL_MS)
    evs = [
        {"op": "create_account", "id": "bank-1", "currency": 1},
        {"op": "create_account", "id": "bank-2", "currency": 2},
        {"op": "create_account", "id": 1, "currency": 1, "flags": DMNEC},
        {"op": "create_account", "id": 2, "currency": 1, "flags": CMNED},
        {"op": "create_account", "id": 3, "currency": 2},
        {"op": "create_account", "id": "1", "currency": 1},
        {"op": "create_account", "id": "acc-x", "currency": 1, "flags": CLOSED},
        {"op": "create_transfer", "id": 1, "debit_account_id": "bank-1", "credit_account_id": 1,
         "amount": 100, "currency": 1},
        {"op": "create_transfer", "id": 2, "debit_account_id": 2, "credit_account_id": "bank-1",
         "amount": 100, "currency": 1},
        {"op": "create_transfer", "id": 3, "debit_account_id": 1, "credit_account_id": "1",
         "amount": 10, "currency": 1, "flags": PENDING, "timeout_ms": 50},
        {"op": "create_transfer", "id": 4, "debit_account_id": "bank-2",
         "credit_account_id": 3, "amount": 10, "currency": 2, "flags": PENDING},
        {"op": "create_transfer", "id": 5, "debit_account_id": 4, "credit_account_id": 1,
         "amount": 1, "currency": 1},  # account 4 does not exist: remembered failure
        {"op": "create_transfer", "id": 6, "debit_account_id": "bank-2",
         "credit_account_id": 3, "amount": 7, "currency": 2, "flags": PENDING},
        {"op": "create_transfer", "id": "t1", "pending_id": 6, "flags": POST, "amount": 3},
    ]
    for target in (led, model):
        target.apply({"type": "submit", "events": evs}, 10 * MS)
    return led, model


@settings(max_examples=300 * SCALE, deadline=None)
@given(batch=st.lists(st.one_of(
    st.tuples(st.one_of(plain_transfer, pending_transfer, post_transfer, void_transfer,
                        create_account, close_account),
              st.sampled_from(range(len(MUTATIONS)))),
    st.tuples(st.one_of(plain_transfer, pending_transfer, post_transfer, void_transfer,
                        create_account, close_account), st.none())),
    min_size=1, max_size=4), dt=st.sampled_from(DTS))
def test_validation_and_precedence_match_model(batch, dt):
    """One batch of (mostly invalid) events against a fixed ledger: every code, in precedence
    order, equals the model's; the failing ones change nothing the model does not change."""
    led, model = _base()
    machine = LedgerMachine.__new__(LedgerMachine)  # only for materialize()
    machine.model, machine.fresh, machine.pendings = model, 5000, [3, 4, 6, "t1"]
    evs = machine.materialize([ev if m is None else _mutate(ev, MUTATIONS[m])
                               for ev, m in batch])
    ts = model.time + dt
    got = led.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts)
    want = model.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts)
    assert norm(got) == norm(want)
    accs, txs = ids_in(evs)
    accs |= set(ACC_POOL)
    txs |= set(TX_IDS)
    accs, txs = sorted(accs, key=repr), sorted(txs, key=repr)
    assert led.lookup_accounts(accs) == [model.lookup_account(a) for a in accs]
    assert led.lookup_transfers(txs) == [model.lookup_transfer(t) for t in txs]
    assert led.totals() == model.totals()


_BASE_EVENTS = [
    {"op": "create_transfer", "id": 50, "debit_account_id": "bank-1", "credit_account_id": 1,
     "amount": 10, "currency": 1},
    {"op": "create_transfer", "id": 51, "debit_account_id": 1, "credit_account_id": "1",
     "amount": 5, "currency": 1, "flags": PENDING, "timeout_ms": 2},
    {"op": "create_transfer", "id": 52, "pending_id": 3, "flags": POST, "amount": 4},
    {"op": "create_transfer", "id": 53, "pending_id": 4, "flags": VOID},
    {"op": "create_account", "id": 54, "currency": 2, "flags": DMNEC},
    {"op": "close_account", "account_id": 3},
]
_TWEAKS = {"flags": [0, PENDING, POST, VOID], "currency": [1, 2], "user_data": [0, 1],
           "debit_account_id": [1, "bank-1", 2], "credit_account_id": [1, "1", "bank-1"],
           "amount": [1, 4, 10, 100], "pending_id": [3, 6], "timeout_ms": [0, 2, 50]}


def test_every_mutation_and_retry_matches_model():
    """Exhaustive (deterministic) companion of the test above: every mutation of every kind of
    event, alone and linked to a valid event, and every single-field change (or omission) of
    every transfer the base ledger stored or remembered as failed."""
    led0, model0 = _base()
    snap, base_model = led0.snapshot(), model0
    batches = []
    for ev in _BASE_EVENTS:
        batches.append([ev])
        for mutation in MUTATIONS:
            bad = _mutate(ev, mutation)
            batches.append([bad])
            batches.append([_link(_BASE_EVENTS[0], True), bad])
            batches.append([_link(bad, True), _BASE_EVENTS[4]])
        batches.append([_same_accounts(ev)])
    keys = ("id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
            "user_data", "pending_id", "timeout_ms")
    for t in list(model0.ledger["transfers"].values()) + list(model0.ledger["failed"].values()):
        body = {"op": "create_transfer", **{k: t[k] for k in keys if t[k] is not None}}
        batches.append([body])
        for k, values in _TWEAKS.items():
            batches.append([{kk: v for kk, v in body.items() if kk != k}])
            batches += [[dict(body, **{k: v})] for v in values]
    def tx(tid, debit, credit, amount, **kw):
        return {"op": "create_transfer", "id": tid, "debit_account_id": debit,
                "credit_account_id": credit, "amount": amount, "currency": 1, **kw}

    def res(tid, flag, pending_id, **kw):
        return {"op": "create_transfer", "id": tid, "flags": flag, "pending_id": pending_id,
                **kw}

    new = [{"op": "create_account", "id": a, "currency": 1} for a in (80, 81, 82, 83)]
    state_cases = [  # one per state-dependent code, in code order
        [{"op": "close_account", "account_id": 99}], [{"op": "close_account",
                                                       "account_id": "acc-x"}],
        [res(60, POST, 99)], [res(60, POST, 1)], [tx(60, 4, 1, 1)], [tx(60, 1, 4, 1)],
        [dict(tx(60, "bank-1", 3, 1), currency=2)],
        [res(60, POST, 3, debit_account_id="bank-1")], [res(60, POST, 3, credit_account_id=2)],
        [res(60, POST, 3, currency=2)], [dict(tx(60, "bank-1", 1, 1), currency=2)],
        [res(60, POST, 3, amount=11)], [res(60, VOID, 3, amount=5)], [res(60, POST, 6)],
        [res(60, VOID, 4), res(61, VOID, 4)], [tx(60, "acc-x", 1, 1)],
        [tx(60, "bank-1", "acc-x", 1)],
        # balances may reach MAX_BALANCE exactly, never one more (pending counts too)
        new + [tx(60, 80, 81, MAX_AMOUNT), tx(61, 80, 82, 1), tx(62, 83, 81, 1)],
        new + [tx(60, 80, 81, MAX_AMOUNT // 2 + 1, flags=PENDING),
               tx(61, 82, 83, MAX_AMOUNT // 2), tx(62, 83, 81, MAX_AMOUNT // 2),
               tx(63, 82, 81, 1), tx(64, 80, 82, MAX_AMOUNT // 2), tx(65, 80, 83, 1)],
        [tx(60, 1, "bank-1", 1000)], [tx(60, "bank-1", 2, 1000)],
        [res(60, POST, 60)], [_link(tx(60, "bank-1", 1, 1), True)],
        [_link(tx(60, "bank-1", 1, 1), True), _link(tx(61, "bank-1", 1, 1), True)],
        [tx(59, "bank-1", 1, 1), _link(tx(60, "bank-1", 1, 1), True),
         _link(tx(61, "bank-1", 1, 1), True), _link(tx(62, "bank-1", 1, 1), True)],
    ]
    runs = [(evs, 0) for evs in batches + state_cases]
    due = model0.ledger["transfers"][3]["timestamp"] + 50 * MS  # pending 3 times out (50 ms)
    runs += [([res(60, POST, 3)], due - 1),  # just in time
             ([res(60, POST, 3)], due),  # released at the command boundary
             ([{"op": "nope"}, res(60, POST, 3)], due - 1)]  # the event itself lands on it
    seen = set()
    for evs, ts in runs:
        led, model = Ledger.restore(snap), copy.deepcopy(base_model)
        got = led.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts)
        want = model.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts)
        assert norm(got) == norm(want), evs
        assert led.totals() == model.totals(), evs
        seen.update(got["results"])
    missing = {c for c in Code if c < 100} - seen
    assert not missing, sorted(c.name for c in missing)


def test_rolled_back_pending_leaves_no_timer_behind():
    """A pending transfer with a timeout created in a chain that fails is gone entirely: a
    transfer that later takes its row must not expire at the dead one's time."""
    led, model = _base()
    base_ts = model.time
    doomed = [{"op": "create_transfer", "id": 70, "debit_account_id": "bank-1",
               "credit_account_id": "1", "amount": 5, "currency": 1, "flags": PENDING | LINKED,
               "timeout_ms": 1},
              {"op": "create_transfer", "id": 71, "debit_account_id": 99,
               "credit_account_id": "1", "amount": 5, "currency": 1}]  # fails: no account 99
    keeper = [{"op": "create_transfer", "id": 72, "debit_account_id": "bank-1",
               "credit_account_id": "1", "amount": 5, "currency": 1, "flags": PENDING}]
    for evs, ts in [(doomed, base_ts + 1), (keeper, base_ts + 2), ([], base_ts + 10 * MS)]:
        assert norm(led.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts)) == \
            norm(model.apply({"type": "submit", "events": copy.deepcopy(evs)}, ts))
    assert led.lookup_transfers([70, 72]) == [None, model.lookup_transfer(72)]
    assert led.lookup_transfers([72])[0]["status"] == "pending"
    assert led.lookup_accounts(["1"]) == [model.lookup_account("1")]


@settings(max_examples=150 * SCALE, deadline=None)
@given(ttl_ms=st.integers(1, 50),
       gaps=st.lists(st.one_of(st.integers(0, 60 * MS), st.sampled_from([-1, 0, 1])),
                     min_size=1, max_size=8),
       slack=st.sampled_from([-1, 0, 1]),
       use_submit=st.booleans())
def test_session_expires_after_ttl_and_keep_alive_extends(ttl_ms, gaps, slack, use_submit):
    """No activity for more than ttl of log time -> SESSION_EXPIRED (for good); activity at or
    before the ttl keeps it alive, and each keep_alive / request restarts the clock."""
    led = Ledger(session_ttl_ms=ttl_ms)
    t0 = 5 * MS
    sid = led.apply({"type": "register_session"}, t0)["session"]
    assert sid == t0
    last, alive, seq = t0, True, 0
    gaps = gaps + [ttl_ms * MS + slack]  # always probe the exact boundary too
    for gap in gaps:
        ts = max(last + gap, led.last_ts + 1)  # this ts is used as is (never normalised)
        if use_submit:
            seq += 1
            reply = led.apply({"type": "submit", "events": [], "session": sid, "seq": seq}, ts)
        else:
            reply = led.apply({"type": "keep_alive", "session": sid}, ts)
        alive = alive and ts - last <= ttl_ms * MS
        assert reply["code"] == (Code.OK if alive else Code.SESSION_EXPIRED), (ts - last)
        last = ts
        # a replica fed the same log agrees, and so does one restored from a snapshot
        assert Ledger.restore(led.snapshot()).state_hash() == led.state_hash()


@settings(max_examples=60 * SCALE, deadline=None)
@given(cmds=st.lists(st.tuples(st.sampled_from(["register", "tick", "keep_alive"]),
                               st.sampled_from(DTS), st.integers(0, 5)), max_size=25))
def test_session_liveness_is_deterministic(cmds):
    """Two ledgers fed the same log agree on every reply and hash, and with the model on which
    sessions are alive."""
    a, b, model = Ledger(session_ttl_ms=2), Ledger(session_ttl_ms=2), Model(2)
    sids: list[int] = []
    for kind, dt, pick in cmds:
        ts = model.time + dt
        if kind == "register":
            command = {"type": "register_session"}
        elif kind == "keep_alive" and sids:
            command = {"type": "keep_alive", "session": sids[pick % len(sids)]}
        else:
            command = {"type": "tick"}
        ra, rb, rm = a.apply(command, ts), b.apply(command, ts), model.apply(command, ts)
        assert ra == rb
        assert norm(ra) == norm(rm)
        if kind == "register":
            sids.append(ra["session"])
    assert a.state_hash() == b.state_hash()
    for sid in sids:
        pa = Ledger.restore(a.snapshot()).apply({"type": "keep_alive", "session": sid}, 0)
        assert (pa["code"] == Code.OK) == (sid in model.alive_sessions(model.time + 1))


def test_stored_replies_are_capped_and_acked_ones_dropped():
    """MAX_REPLIES_PER_SESSION: the oldest reply is dropped and the floor moves past it."""
    led, model = Ledger(), Model()
    sid = led.apply({"type": "register_session"}, 1)["session"]
    model.apply({"type": "register_session"}, 1)
    for seq in range(1, 1031):
        cmd = {"type": "submit", "events": [], "session": sid, "seq": seq}
        assert norm(led.apply(cmd, 0)) == norm(model.apply(cmd, 0))
    for seq, ack in [(1, 0), (6, 0), (7, 0), (1030, 0), (8, 0), (20, 30), (29, 0), (30, 0)]:
        cmd = {"type": "submit", "events": [], "session": sid, "seq": seq, "ack": ack}
        got, want = led.apply(cmd, 0), model.apply(cmd, 0)
        assert norm(got) == norm(want), (seq, ack)
    assert led.apply({"type": "submit", "events": [], "session": sid, "seq": 7}, 0)["code"] \
        == Code.SESSION_REQUEST_TOO_OLD


def test_a_session_past_max_sessions_ends_the_least_recently_used():
    """At most `max_sessions` live: a new one ends the least recently used (a request or a
    keep_alive makes a session the most recently used), after the expired ones; the order
    survives a snapshot, and a ledger that replays the log ends on the same hash."""
    ms = 1_000_000  # 1 ms of log time
    led, model = Ledger(session_ttl_ms=1000, max_sessions=3), Model(1000, 3)
    log, t = [], 0

    def both(command):
        nonlocal t
        t += ms
        log.append((command, t))
        got, want = led.apply(dict(command), t), model.apply(dict(command), t)
        assert norm(got) == norm(want), command
        return got

    def alive():
        return [sid for sid in sids if Ledger.restore(led.snapshot()).apply(
            {"type": "keep_alive", "session": sid}, 0)["code"] == Code.OK]
    sids = [both({"type": "register_session"})["session"] for _ in range(3)]
    both({"type": "submit", "events": [], "session": sids[0], "seq": 1})
    both({"type": "keep_alive", "session": sids[1]})
    sids.append(both({"type": "register_session"})["session"])  # ends sids[2]
    assert alive() == [sids[0], sids[1], sids[3]]
    assert both({"type": "keep_alive", "session": sids[2]})["code"] == Code.SESSION_EXPIRED
    restored = Ledger.restore(led.snapshot())
    assert restored.state_hash() == led.state_hash()
    t += ms
    for one in (led, restored):  # both end sids[0], now the least recently used
        one.apply({"type": "register_session"}, t)
    model.apply({"type": "register_session"}, t)
    log.append(({"type": "register_session"}, t))
    assert restored.state_hash() == led.state_hash()
    assert alive() == [sids[1], sids[3]]
    # Expired sessions go first: 2 s later all three expired, and four new ones end only
    # the first of themselves.
    t += 2000 * ms
    new = [both({"type": "register_session"})["session"] for _ in range(4)]
    sids += new
    assert alive() == new[1:]
    fresh = Ledger(session_ttl_ms=1000, max_sessions=3)
    for command, ts in log:
        fresh.apply(dict(command), ts)
    assert fresh.state_hash() == led.state_hash()


def test_duplicate_session_request_returns_the_identical_reply_object():
    led = Ledger()
    sid = led.apply({"type": "register_session"}, 1)["session"]
    evs = [{"op": "create_account", "id": 1, "currency": 1}]
    first = led.apply({"type": "submit", "events": evs, "session": sid, "seq": 1}, 2)
    again = led.apply({"type": "submit", "events": [], "session": sid, "seq": 1}, 3)
    assert again is first and again == {"code": 0, "results": [Code.OK]}


# ------------------------------------------------------------------------------------------------
# Regressions: bugs these tests found (fixed in fc42b34)
# ------------------------------------------------------------------------------------------------
_ACCOUNTS = [{"op": "create_account", "id": 1, "currency": 1},
             {"op": "create_account", "id": 2, "currency": 1}]


def test_lone_surrogate_id_is_invalid_and_state_stays_snapshottable():
    """Was: an id with a lone surrogate passed validation, then snapshot() raised."""
    led = Ledger()
    led.apply({"type": "submit", "events": _ACCOUNTS}, 1)
    reply = led.apply({"type": "submit", "events": [
        {"op": "create_transfer", "id": "\ud800", "debit_account_id": 1,
         "credit_account_id": 2, "amount": 1, "currency": 1},
        {"op": "create_transfer", "id": 7, "debit_account_id": "a\udfff",
         "credit_account_id": 2, "amount": 1, "currency": 1},
        {"op": "create_account", "id": "\udc00x", "currency": 1}]}, 2)
    assert reply["results"] == [Code.ID_INVALID, Code.DEBIT_ACCOUNT_ID_INVALID, Code.ID_INVALID]
    assert Ledger.restore(led.snapshot()).state_hash() == led.state_hash()


@pytest.mark.parametrize("bad_ts", [1 << 64, 1 << 63, -1, "1", None, 1.5, True])
def test_out_of_range_timestamp_is_last_plus_one(bad_ts):
    """Was: a timestamp >= 2**64 raised half-way through storing a transfer."""
    led = Ledger()
    led.apply({"type": "submit", "events": _ACCOUNTS}, 5 * MS)
    ev = {"op": "create_transfer", "id": 5, "debit_account_id": 1, "credit_account_id": 2,
          "amount": 1, "currency": 1}
    last = led.last_ts
    assert led.apply({"type": "submit", "events": [ev]}, bad_ts)["results"] == [Code.OK]
    assert led.lookup_transfers([5])[0]["timestamp"] == last + 1
    assert Ledger.restore(led.snapshot()).state_hash() == led.state_hash()
    led.apply({"type": "tick"}, (1 << 63) - 1)  # the largest timestamp is still a timestamp
    assert led.last_ts == (1 << 63) - 1


def test_explicit_none_is_left_out_everywhere():
    """Was: nil meant 'left out' for some fields and 'wrong type' for others."""
    led, _ = _base()
    bases = {
        "create_account": {"op": "create_account", "id": 9, "currency": 1, "flags": 0,
                           "user_data": 0},
        "create_transfer": {"op": "create_transfer", "id": 9, "debit_account_id": "bank-1",
                            "credit_account_id": 1, "amount": 1, "currency": 1, "flags": PENDING,
                            "user_data": 0, "timeout_ms": 0},
        "close_account": {"op": "close_account", "account_id": 9},
    }
    for op, base in bases.items():
        for key in base:
            if key == "op":
                continue
            with_none = dict(base, **{key: None})
            without = {k: v for k, v in base.items() if k != key}
            got = Ledger.restore(led.snapshot()).apply(
                {"type": "submit", "events": [with_none]}, 0)["results"]
            want = Ledger.restore(led.snapshot()).apply(
                {"type": "submit", "events": [without]}, 0)["results"]
            assert got == want, (op, key)
    # ... but a key the operation does not define is unknown whatever its value
    reply = led.apply({"type": "submit", "events": [dict(bases["create_account"], memo=None)]}, 0)
    assert reply["results"] == [Code.UNKNOWN_FIELD]
