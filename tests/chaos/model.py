"""A small, independent model of the ledger, for the chaos checkers.

Design.  The checkers must not trust raftpay, so they do not use `raftpay.ledger`: this is a
second, deliberately naive implementation of the part of the ledger the chaos workload uses —
`create_account` (with the must-not-exceed flags), plain and pending transfers, and posting or
voiding a pending transfer — written from the semantics stated in `raftpay/ledger.py` and
`raftpay/codes.py` (check order, `EXISTS` / `ID_ALREADY_FAILED` idempotency, transient failures
remembered).  Only the result-code *numbers* come from `raftpay.codes`: they are the protocol.

`GroupModel` is mutable and every step returns an undo record, because the linearizability
search (`wgl.py`) walks forwards and backwards millions of times and copying a state per step
would dominate.  `fingerprint()` is a cheap, hashable summary of the whole state: the balances
plus an order-independent 128-bit hash of the id records (Zobrist hashing, XOR of one random
value per record), so two search paths that reach the same state collide in the cache.

One model instance covers one *group*: a set of accounts that transfers never leave.  The
workload keeps groups disjoint, which makes linearizability compositional (Herlihy & Wing's
locality): the whole history is linearizable iff each group's sub-history is.

Not thread-safe.  Deterministic.
"""

from __future__ import annotations

import hashlib
from typing import Any

from raftpay.codes import TRANSIENT, Code

# Account flags and transfer kinds as the ledger numbers them.
DEBITS_MUST_NOT_EXCEED_CREDITS = 2
CREDITS_MUST_NOT_EXCEED_DEBITS = 4
F_PENDING, F_POST, F_VOID = 2, 4, 8
KIND_FLAGS = {"plain": 0, "pending": F_PENDING, "post": F_POST, "void": F_VOID}
MAX_BALANCE = (1 << 63) - 1

#: The order in which a retry's body is compared with what the ledger holds.
_DIFF_CODES = (Code.EXISTS_WITH_DIFFERENT_FLAGS, Code.EXISTS_WITH_DIFFERENT_CURRENCY,
               Code.EXISTS_WITH_DIFFERENT_USER_DATA, Code.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID,
               Code.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, Code.EXISTS_WITH_DIFFERENT_AMOUNT,
               Code.EXISTS_WITH_DIFFERENT_PENDING_ID, Code.EXISTS_WITH_DIFFERENT_TIMEOUT)

_MASK = (1 << 128) - 1


def _zobrist(*parts: Any) -> int:
    """A stable 128-bit value for a record (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest(), "big")


def transfer_body(op: dict) -> tuple:
    """The raw body of a transfer op as the ledger compares it:
    (flags, currency, user_data, debit, credit, amount, pending_id, timeout_ms)."""
    kind = op["kind"]
    resolving = kind in ("post", "void")
    return (KIND_FLAGS[kind], None if resolving else op.get("currency"), 0,
            None if resolving else op["dr"], None if resolving else op["cr"],
            op.get("amount"), op.get("pending_id"), 0)


class GroupModel:
    """The ledger restricted to one group of accounts.  Balances per account are
    [debits_pending, debits_posted, credits_pending, credits_posted]."""

    def __init__(self, currency: int):
        self.currency = currency
        self.accounts: dict[Any, list[int]] = {}  # id -> balances
        self.account_flags: dict[Any, int] = {}
        self.applied: dict[Any, tuple] = {}  # transfer id -> (body with gaps filled, kind)
        self.failed: dict[Any, tuple] = {}  # transfer id -> (code, raw body)
        self.pstate: dict[Any, str] = {}  # pending id -> pending | posted | voided
        self._h = 0

    # --- the search's interface ---------------------------------------------------------------

    def fingerprint(self) -> tuple:
        return (tuple(v for b in self.accounts.values() for v in b), self._h)

    def step(self, op: dict) -> tuple[Any, list]:
        """Apply `op` (a history op's `f` and `value`); returns (output, undo).  Total: every op
        yields an output.  `undo(undo)` restores the state exactly."""
        f = op["f"]
        if f == "read":
            return self.read(op["value"]["accounts"]), []
        if f == "create_account":
            return self._create_account(op["value"])
        return self._transfer(op["value"])

    def undo(self, undo: list) -> None:
        for kind, *args in reversed(undo):
            if kind == "bal":
                acct, idx, delta = args
                self.accounts[acct][idx] -= delta
            elif kind == "dict":
                d, key, old = args
                if old is _ABSENT:
                    del d[key]
                else:
                    d[key] = old
            elif kind == "hash":
                self._h ^= args[0]
            elif kind == "account":
                del self.accounts[args[0]]
                del self.account_flags[args[0]]

    # --- reads ----------------------------------------------------------------------------------

    def read(self, ids) -> list:
        return [list(self.accounts[a]) if a in self.accounts else None for a in ids]

    # --- writes ---------------------------------------------------------------------------------

    def _set(self, undo, d, key, value) -> None:
        undo.append(("dict", d, key, d.get(key, _ABSENT)))
        d[key] = value

    def _hash(self, undo, *parts) -> None:
        z = _zobrist(*parts)
        self._h ^= z
        undo.append(("hash", z))

    def _add(self, undo, acct, idx, delta) -> None:
        if delta:
            self.accounts[acct][idx] += delta
            undo.append(("bal", acct, idx, delta))

    def _create_account(self, v: dict):
        aid, flags = v["id"], v.get("flags", 0)
        if aid in self.accounts:
            if self.account_flags[aid] != flags:
                return int(Code.EXISTS_WITH_DIFFERENT_FLAGS), []
            return int(Code.EXISTS), []
        self.accounts[aid] = [0, 0, 0, 0]
        self.account_flags[aid] = flags
        undo = [("account", aid)]
        self._hash(undo, "account", aid, flags)
        return int(Code.OK), undo

    def _transfer(self, v: dict):
        tid, kind = v["id"], v["kind"]
        undo: list = []
        raw = transfer_body(v)
        resolving = kind in ("post", "void")
        held = self.applied.get(tid)
        if held is not None:
            body = list(raw)
            if resolving and held[1] in ("post", "void"):
                # Gaps filled from the pending transfer, as the ledger does.
                pbody = self.applied[held[0][6]][0]
                body[3], body[4] = pbody[3], pbody[4]
                if body[5] is None:
                    body[5] = pbody[5]
                body[1] = None  # we never send a currency with post/void
            stored = list(held[0])
            if resolving:
                stored[1] = None
            for code, a, b in zip(_DIFF_CODES, stored, body):
                if a != b:
                    return int(code), undo
            return int(Code.EXISTS), undo
        failed = self.failed.get(tid)
        if failed is not None:
            for code, a, b in zip(_DIFF_CODES, failed[1], raw):
                if a != b:
                    return int(code), undo
            return int(Code.ID_ALREADY_FAILED), undo

        code, filled = self._state_checks(v, raw)
        if code != Code.OK:
            if code in TRANSIENT:
                self._set(undo, self.failed, tid, (int(code), raw))
                self._hash(undo, "failed", tid, int(code))
            return int(code), undo

        self._set(undo, self.applied, tid, (filled, kind))
        self._hash(undo, "applied", tid)
        dr, cr, amount = filled[3], filled[4], filled[5]
        if kind == "plain":
            self._add(undo, dr, 1, amount)
            self._add(undo, cr, 3, amount)
        elif kind == "pending":
            self._add(undo, dr, 0, amount)
            self._add(undo, cr, 2, amount)
            self._set(undo, self.pstate, tid, "pending")
            self._hash(undo, "pending", tid)
        else:
            pid = v["pending_id"]
            reserved = self.applied[pid][0][5]
            posted = amount if kind == "post" else 0
            self._add(undo, dr, 0, -reserved)
            self._add(undo, cr, 2, -reserved)
            self._add(undo, dr, 1, posted)
            self._add(undo, cr, 3, posted)
            new = "posted" if kind == "post" else "voided"
            self._set(undo, self.pstate, pid, new)
            self._hash(undo, "pending", pid)
            self._hash(undo, new, pid)
        return int(Code.OK), undo

    def _state_checks(self, v: dict, raw: tuple):
        kind = v["kind"]
        body = list(raw)
        if kind in ("post", "void"):
            pid = v["pending_id"]
            p = self.applied.get(pid)
            if p is None:
                return Code.PENDING_TRANSFER_NOT_FOUND, None
            if p[1] != "pending":
                return Code.PENDING_TRANSFER_NOT_PENDING, None
            reserved = p[0][5]
            body[1], body[3], body[4] = p[0][1], p[0][3], p[0][4]
            if body[5] is None:
                body[5] = reserved
            if kind == "post" and body[5] > reserved:
                return Code.EXCEEDS_PENDING_TRANSFER_AMOUNT, None
            if kind == "void" and body[5] != reserved:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT, None
            state = self.pstate[pid]
            if state == "posted":
                return Code.PENDING_TRANSFER_ALREADY_POSTED, None
            if state == "voided":
                return Code.PENDING_TRANSFER_ALREADY_VOIDED, None
            return Code.OK, tuple(body)
        dr, cr, amount = v["dr"], v["cr"], v["amount"]
        if dr not in self.accounts:
            return Code.DEBIT_ACCOUNT_NOT_FOUND, None
        if cr not in self.accounts:
            return Code.CREDIT_ACCOUNT_NOT_FOUND, None
        if v.get("currency") != self.currency:
            return Code.TRANSFER_MUST_HAVE_THE_SAME_CURRENCY_AS_ACCOUNTS, None
        d, c = self.accounts[dr], self.accounts[cr]
        if d[0] + d[1] + amount > MAX_BALANCE:
            return Code.OVERFLOWS_DEBITS, None
        if c[2] + c[3] + amount > MAX_BALANCE:
            return Code.OVERFLOWS_CREDITS, None
        if self.account_flags[dr] & DEBITS_MUST_NOT_EXCEED_CREDITS and d[0] + d[1] + amount > d[3]:
            return Code.EXCEEDS_CREDITS, None
        if self.account_flags[cr] & CREDITS_MUST_NOT_EXCEED_DEBITS and c[2] + c[3] + amount > c[1]:
            return Code.EXCEEDS_DEBITS, None
        return Code.OK, tuple(body)


class _Absent:
    def __repr__(self):
        return "<absent>"


_ABSENT = _Absent()
