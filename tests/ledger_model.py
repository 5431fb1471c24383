"""A deliberately naive reference model of `raftpay.ledger.Ledger`, for property tests.

Written from the rules in the ledger's module docstring and in `codes.py` (whose numbering is
the check precedence inside one event), not from the implementation: plain dicts, whole-state
deep copies for linked-chain rollback, a linear scan for pending expiry, and no indexes.  It is
slow on purpose; it only has to be obviously right for a few dozen objects.

Where the docstring is silent the model takes the reading written next to the rule (marked
"reading:"), so a disagreement with the ledger points at one sentence to argue about.
"""

from __future__ import annotations

import copy
from typing import Any

from raftpay.codes import Code

MS = 1 << 16  # one millisecond of log time (HLC: wall ms << 16 | counter)
MAX_U64 = (1 << 64) - 1
MAX_U32 = (1 << 32) - 1
MAX_AMOUNT = (1 << 63) - 1
MAX_BALANCE = (1 << 63) - 1
MAX_TS = (1 << 63) - 1  # a timestamp outside 0..MAX_TS is "no timestamp": last + 1
MAX_ID_BYTES = 64
MAX_REPLIES_PER_SESSION = 1024

LINKED = 1
DMNEC = 2  # account: debits_must_not_exceed_credits
CMNED = 4  # account: credits_must_not_exceed_debits
CLOSED = 8  # account
PENDING, POST, VOID = 2, 4, 8  # transfer kinds

ACCOUNT_KEYS = {"op", "id", "currency", "flags", "user_data"}
TRANSFER_KEYS = {"op", "id", "debit_account_id", "credit_account_id", "amount", "currency",
                 "flags", "user_data", "pending_id", "timeout_ms"}
CLOSE_KEYS = {"op", "account_id"}
INT_FIELDS = {"currency", "flags", "user_data", "amount", "timeout_ms"}
ID_FIELDS = {"id", "debit_account_id", "credit_account_id", "pending_id", "account_id"}

TRANSIENT = {c for c in Code if 60 <= c < 100}


def is_int(v: Any) -> bool:
    return type(v) is int  # bool is not an int here


def is_id_type(v: Any) -> bool:
    return type(v) is int or type(v) is str


def same(a: Any, b: Any) -> bool:
    """Field equality where 1, "1" and True are three different things."""
    return type(a) is type(b) and a == b


def id_problem(v: Any) -> str | None:
    """None if `v` is a valid id, else 'missing' / 'invalid' / 'too_long'."""
    if v is None:
        return "missing"
    if type(v) is int:
        return None if 1 <= v <= MAX_U64 else "invalid"
    if v == "":
        return "invalid"
    try:
        size = len(v.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: not text a replica (msgpack) could store
        return "invalid"
    return "too_long" if size > MAX_ID_BYTES else None


def is_linked(ev: Any) -> bool:
    # reading: an event links only if its flags are a proper non-negative int with bit 0 set.
    return type(ev) is dict and is_int(ev.get("flags")) and ev["flags"] > 0 \
        and ev["flags"] % 2 == 1


def present(ev: dict) -> dict:
    """The fields an event really sets: a nil (None) value counts as left out, everywhere."""
    return {k: v for k, v in ev.items() if v is not None}


class Model:
    def __init__(self, session_ttl_ms: int = 600_000, max_sessions: int = 100_000):
        self.ttl = session_ttl_ms * MS
        self.max_sessions = max_sessions
        self.time = 0  # last normalised timestamp
        self.ledger = {
            "accounts": {},  # id -> dict (the lookup_accounts shape)
            "transfers": {},  # id -> dict (lookup shape without status, plus "state")
            "order": [],  # transfer ids in apply order
            "failed": {},  # id -> dict (the lookup shape of a remembered failure)
        }
        self.sessions: dict[int, dict] = {}  # sid -> {"last", "floor", "replies"}
        self.replayed = False  # the last command was answered with a stored session reply

    # ------------------------------------------------------------------ commands
    def apply(self, command: Any, ts: Any) -> dict:
        self.replayed = False
        if not is_int(ts) or not 0 <= ts <= MAX_TS:
            ts = 0
        now = max(ts, self.time + 1)
        self.time = now
        self.expire_pending(now)
        if type(command) is not dict:
            return {"code": Code.INVALID_REQUEST}
        kind = command.get("type")
        if kind == "tick":
            return {"code": 0}
        if kind == "register_session":
            self.sessions = {sid: s for sid, s in self.sessions.items()
                             if now - s["last"] <= self.ttl}
            if len(self.sessions) >= self.max_sessions:  # the least recently used ends
                del self.sessions[min(self.sessions, key=lambda sid: self.sessions[sid]["last"])]
            self.sessions[now] = {"last": now, "floor": 1, "replies": {}}
            return {"code": 0, "session": now}
        if kind == "keep_alive":
            s = self.live_session(command.get("session"), now)
            if s is None:
                return {"code": Code.SESSION_EXPIRED}
            s["last"] = now
            return {"code": 0}
        if kind == "submit":
            return self.submit(command, now)
        return {"code": Code.INVALID_REQUEST}

    def live_session(self, sid: Any, now: int) -> dict | None:
        if not is_int(sid) or sid not in self.sessions:
            return None
        s = self.sessions[sid]
        if now - s["last"] > self.ttl:  # no activity for MORE than the TTL
            del self.sessions[sid]
            return None
        return s

    def alive_sessions(self, at: int) -> set[int]:
        return {sid for sid, s in self.sessions.items() if at - s["last"] <= self.ttl}

    def submit(self, command: dict, now: int) -> dict:
        events = command.get("events")
        if type(events) is not list:
            return {"code": Code.INVALID_REQUEST}
        sid = command.get("session")
        if sid is None:
            return {"code": 0, "results": self.apply_events(events, now)}
        seq, ack = command.get("seq"), command.get("ack", 0)
        if not is_int(seq) or seq < 1 or not is_int(ack):
            return {"code": Code.INVALID_REQUEST}
        s = self.live_session(sid, now)
        if s is None:
            return {"code": Code.SESSION_EXPIRED}
        s["last"] = now
        if ack > s["floor"]:
            s["floor"] = ack
            s["replies"] = {q: r for q, r in s["replies"].items() if q >= ack}
        if seq < s["floor"]:
            return {"code": Code.SESSION_REQUEST_TOO_OLD}
        if seq in s["replies"]:
            self.replayed = True
            return s["replies"][seq]
        reply = {"code": 0, "results": self.apply_events(events, now)}
        s["replies"][seq] = reply
        if len(s["replies"]) > MAX_REPLIES_PER_SESSION:
            oldest = min(s["replies"])
            del s["replies"][oldest]
            s["floor"] = max(s["floor"], oldest + 1)
        return reply

    def expire_pending(self, now: int) -> None:
        led = self.ledger
        for t in led["transfers"].values():
            if t["flags"] & PENDING and t["state"] == "pending" and t["timeout_ms"] \
                    and t["timestamp"] + t["timeout_ms"] * MS <= now:
                t["state"] = "expired"
                led["accounts"][t["debit_account_id"]]["debits_pending"] -= t["amount"]
                led["accounts"][t["credit_account_id"]]["credits_pending"] -= t["amount"]

    # ------------------------------------------------------------------ events and chains
    def apply_events(self, events: list, now: int) -> list[int]:
        n = len(events)
        results: list[int] = [0] * n
        # Split into chains: a chain runs from a linked event to the first unlinked one.
        groups, cur = [], []
        for i, ev in enumerate(events):
            cur.append(i)
            if not is_linked(ev):
                groups.append(cur)
                cur = []
        open_chain = cur  # linked events up to the end of the batch
        for g in groups:
            if len(g) == 1:
                results[g[0]] = self.event(events[g[0]], now + g[0], in_chain=False)
                continue
            saved = copy.deepcopy(self.ledger)
            failed_at = None
            for i in g:
                results[i] = self.event(events[i], now + i, in_chain=True)
                if results[i] not in (Code.OK, Code.EXISTS):
                    failed_at = i
                    break
            if failed_at is not None:
                self.ledger = saved  # nothing of a failed chain stays
                for i in g:
                    if i != failed_at:
                        results[i] = Code.LINKED_EVENT_FAILED
        if open_chain:
            for i in open_chain[:-1]:
                results[i] = Code.LINKED_EVENT_FAILED
            results[open_chain[-1]] = Code.LINKED_EVENT_CHAIN_OPEN
        self.time = max(self.time, now + n - 1)
        return results

    def event(self, ev: Any, ts: int, in_chain: bool) -> int:
        if type(ev) is not dict:
            return Code.INVALID_FIELD_TYPE
        op = ev.get("op")
        if op == "create_account":
            return self.create_account(ev, ts)
        if op == "create_transfer":
            return self.create_transfer(ev, ts, in_chain)
        if op == "close_account":
            return self.close_account(ev)
        return Code.UNKNOWN_OPERATION

    @staticmethod
    def shape(ev: dict, keys: set) -> int:
        if any(k not in keys for k in ev):  # a key the operation does not define, whatever
            return Code.UNKNOWN_FIELD       # its value (nil included)
        for k, v in present(ev).items():
            if k in INT_FIELDS and not is_int(v):
                return Code.INVALID_FIELD_TYPE
            if k in ID_FIELDS and not is_id_type(v):
                return Code.INVALID_FIELD_TYPE
        return Code.OK

    # ------------------------------------------------------------------ accounts
    def create_account(self, ev: dict, ts: int) -> int:
        code = self.shape(ev, ACCOUNT_KEYS)
        if code:
            return code
        ev = present(ev)
        flags = ev.get("flags", 0)
        if flags < 0 or flags & ~(LINKED | DMNEC | CMNED | CLOSED):
            return Code.RESERVED_FLAG
        problem = id_problem(ev.get("id"))
        if problem:
            return {"missing": Code.ID_MISSING, "invalid": Code.ID_INVALID,
                    "too_long": Code.ID_TOO_LONG}[problem]
        if flags & DMNEC and flags & CMNED:
            return Code.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if "currency" not in ev:
            return Code.CURRENCY_MISSING
        currency = ev["currency"]
        if not 1 <= currency <= MAX_U32:
            return Code.CURRENCY_INVALID
        user_data = ev.get("user_data", 0)
        if not 0 <= user_data <= MAX_U64:
            return Code.USER_DATA_INVALID
        flags = flags & ~LINKED
        accounts = self.ledger["accounts"]
        old = accounts.get(ev["id"])
        if old is not None:
            # Closing an account later must not make a retry of its creation a different body.
            if old["flags"] & ~CLOSED != flags & ~CLOSED:
                return Code.EXISTS_WITH_DIFFERENT_FLAGS
            if old["currency"] != currency:
                return Code.EXISTS_WITH_DIFFERENT_CURRENCY
            if old["user_data"] != user_data:
                return Code.EXISTS_WITH_DIFFERENT_USER_DATA
            return Code.EXISTS
        accounts[ev["id"]] = {
            "id": ev["id"], "currency": currency, "flags": flags, "user_data": user_data,
            "debits_pending": 0, "debits_posted": 0, "credits_pending": 0, "credits_posted": 0,
            "timestamp": ts,
        }
        return Code.OK

    def close_account(self, ev: dict) -> int:
        code = self.shape(ev, CLOSE_KEYS)
        if code:
            return code
        ev = present(ev)
        problem = id_problem(ev.get("account_id"))
        if problem == "missing":
            return Code.ACCOUNT_ID_MISSING
        if problem:
            return Code.ACCOUNT_ID_INVALID
        acc = self.ledger["accounts"].get(ev["account_id"])
        if acc is None:
            return Code.ACCOUNT_NOT_FOUND
        if acc["flags"] & CLOSED:
            return Code.ACCOUNT_ALREADY_CLOSED
        acc["flags"] |= CLOSED
        return Code.OK

    # ------------------------------------------------------------------ transfers
    def validate_transfer(self, ev: dict) -> int:
        code = self.shape(ev, TRANSFER_KEYS)
        if code:
            return code
        ev = present(ev)
        g = lambda k, d=None: d if ev.get(k) is None else ev[k]  # noqa: E731
        flags = g("flags", 0)
        if flags < 0 or flags & ~(LINKED | PENDING | POST | VOID):
            return Code.RESERVED_FLAG
        problem = id_problem(g("id"))
        if problem:
            return {"missing": Code.ID_MISSING, "invalid": Code.ID_INVALID,
                    "too_long": Code.ID_TOO_LONG}[problem]
        kinds = [k for k in (PENDING, POST, VOID) if flags & k]
        if len(kinds) > 1:
            return Code.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        resolving = bool(flags & (POST | VOID))
        if g("currency") is None:
            if not resolving:
                return Code.CURRENCY_MISSING
        elif not 1 <= g("currency") <= MAX_U32:
            return Code.CURRENCY_INVALID
        if not 0 <= g("user_data", 0) <= MAX_U64:
            return Code.USER_DATA_INVALID
        for key, missing, invalid in (
                ("debit_account_id", Code.DEBIT_ACCOUNT_ID_MISSING,
                 Code.DEBIT_ACCOUNT_ID_INVALID),
                ("credit_account_id", Code.CREDIT_ACCOUNT_ID_MISSING,
                 Code.CREDIT_ACCOUNT_ID_INVALID)):
            problem = id_problem(g(key))
            if problem == "missing":
                if not resolving:  # a post/void may leave the accounts to its pending transfer
                    return missing
            elif problem:
                return invalid
        if g("debit_account_id") is not None and same(g("debit_account_id"),
                                                      g("credit_account_id")):
            return Code.ACCOUNTS_MUST_BE_DIFFERENT
        amount = g("amount")
        if amount is None:
            if not resolving:
                return Code.AMOUNT_MISSING
        elif amount <= 0:
            return Code.AMOUNT_MUST_BE_POSITIVE
        elif amount > MAX_AMOUNT:
            return Code.AMOUNT_TOO_LARGE
        if not resolving and g("pending_id") is not None:
            return Code.PENDING_ID_MUST_NOT_BE_SET
        if resolving:
            problem = id_problem(g("pending_id"))
            if problem == "missing":
                return Code.PENDING_ID_MISSING
            if problem:
                return Code.PENDING_ID_INVALID
            if same(g("pending_id"), g("id")):
                return Code.PENDING_ID_MUST_BE_DIFFERENT
        timeout = g("timeout_ms", 0)
        if timeout != 0 and not flags & PENDING:
            return Code.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if not 0 <= timeout <= MAX_U32:
            return Code.TIMEOUT_INVALID
        return Code.OK

    def create_transfer(self, ev: dict, ts: int, in_chain: bool) -> int:
        code = self.validate_transfer(ev)
        if code:
            return code
        g = lambda k, d=None: d if ev.get(k) is None else ev[k]  # noqa: E731
        tid = g("id")
        body = {  # the raw body: what the client sent, LINKED left out
            "flags": g("flags", 0) & ~LINKED, "currency": g("currency"),
            "user_data": g("user_data", 0), "debit_account_id": g("debit_account_id"),
            "credit_account_id": g("credit_account_id"), "amount": g("amount"),
            "pending_id": g("pending_id"), "timeout_ms": g("timeout_ms", 0),
        }
        fields = [("flags", Code.EXISTS_WITH_DIFFERENT_FLAGS),
                  ("currency", Code.EXISTS_WITH_DIFFERENT_CURRENCY),
                  ("user_data", Code.EXISTS_WITH_DIFFERENT_USER_DATA),
                  ("debit_account_id", Code.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
                  ("credit_account_id", Code.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
                  ("amount", Code.EXISTS_WITH_DIFFERENT_AMOUNT),
                  ("pending_id", Code.EXISTS_WITH_DIFFERENT_PENDING_ID),
                  ("timeout_ms", Code.EXISTS_WITH_DIFFERENT_TIMEOUT)]
        led = self.ledger
        resolving = bool(body["flags"] & (POST | VOID))

        # Idempotency against an applied transfer: a post/void's gaps are filled in from the
        # pending transfer the stored one resolved; an omitted currency is not compared.
        stored = led["transfers"].get(tid)
        if stored is not None:
            want = dict(body)
            if resolving and stored["pending_id"] is not None:
                p = led["transfers"][stored["pending_id"]]
                for k in ("debit_account_id", "credit_account_id", "amount"):
                    if want[k] is None:
                        want[k] = p[k]
            if want["currency"] is None:
                want["currency"] = stored["currency"]
            for k, c in fields:
                if not same(stored[k], want[k]):
                    return c
            return Code.EXISTS
        # Idempotency against a remembered transient failure: raw body against raw body.
        failed = led["failed"].get(tid)
        if failed is not None:
            for k, c in fields:
                if not same(failed[k], body[k]):
                    return c
            return Code.ID_ALREADY_FAILED

        outcome = self.transfer_state(body, ts)
        if isinstance(outcome, int):
            if outcome in TRANSIENT and not in_chain:
                led["failed"][tid] = {"id": tid, "status": "failed", "code": outcome,
                                      "timestamp": ts, **body}
            return outcome
        debit, credit, amount, pending = outcome
        accounts = led["accounts"]
        d, c = accounts[debit], accounts[credit]
        kind = body["flags"] & (PENDING | POST | VOID)
        if kind == 0:
            d["debits_posted"] += amount
            c["credits_posted"] += amount
        elif kind == PENDING:
            d["debits_pending"] += amount
            c["credits_pending"] += amount
        else:
            p = led["transfers"][pending]
            d["debits_pending"] -= p["amount"]
            c["credits_pending"] -= p["amount"]
            if kind == POST:
                d["debits_posted"] += amount
                c["credits_posted"] += amount
                p["state"] = "posted"
            else:
                p["state"] = "voided"
        led["transfers"][tid] = {
            "id": tid, "debit_account_id": debit, "credit_account_id": credit,
            "amount": amount, "currency": d["currency"], "flags": body["flags"],
            "user_data": body["user_data"], "pending_id": pending,
            "timeout_ms": body["timeout_ms"], "timestamp": ts,
            "state": "pending" if kind == PENDING else None,
        }
        led["order"].append(tid)
        return Code.OK

    def transfer_state(self, body: dict, ts: int):
        """The state checks in code order: a failing code, or (debit, credit, amount, pending)."""
        led = self.ledger
        accounts, transfers = led["accounts"], led["transfers"]
        kind = body["flags"] & (PENDING | POST | VOID)
        resolving = kind in (POST, VOID)
        debit, credit, amount = (body["debit_account_id"], body["credit_account_id"],
                                 body["amount"])
        p = None
        if resolving:
            p = transfers.get(body["pending_id"])
            if p is None:
                return Code.PENDING_TRANSFER_NOT_FOUND
            if not p["flags"] & PENDING:
                return Code.PENDING_TRANSFER_NOT_PENDING
            debit = p["debit_account_id"] if debit is None else debit
            credit = p["credit_account_id"] if credit is None else credit
        if debit not in accounts:
            return Code.DEBIT_ACCOUNT_NOT_FOUND
        if credit not in accounts:
            return Code.CREDIT_ACCOUNT_NOT_FOUND
        d, c = accounts[debit], accounts[credit]
        if d["currency"] != c["currency"]:
            return Code.ACCOUNTS_MUST_HAVE_THE_SAME_CURRENCY
        if resolving:
            if not same(debit, p["debit_account_id"]):
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
            if not same(credit, p["credit_account_id"]):
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
            if body["currency"] is not None and body["currency"] != p["currency"]:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_CURRENCY
        elif body["currency"] != d["currency"]:
            return Code.TRANSFER_MUST_HAVE_THE_SAME_CURRENCY_AS_ACCOUNTS
        if resolving:
            if amount is None:
                amount = p["amount"]
            if kind == POST and amount > p["amount"]:
                return Code.EXCEEDS_PENDING_TRANSFER_AMOUNT
            if kind == VOID and amount != p["amount"]:
                return Code.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
            if p["state"] == "posted":
                return Code.PENDING_TRANSFER_ALREADY_POSTED
            if p["state"] == "voided":
                return Code.PENDING_TRANSFER_ALREADY_VOIDED
            if p["state"] == "expired" or (
                    p["timeout_ms"] and p["timestamp"] + p["timeout_ms"] * MS <= ts):
                return Code.PENDING_TRANSFER_EXPIRED
        if d["flags"] & CLOSED:
            return Code.DEBIT_ACCOUNT_CLOSED
        if c["flags"] & CLOSED:
            return Code.CREDIT_ACCOUNT_CLOSED
        if not resolving:
            d_total = d["debits_pending"] + d["debits_posted"]
            c_total = c["credits_pending"] + c["credits_posted"]
            if d_total + amount > MAX_BALANCE:
                return Code.OVERFLOWS_DEBITS
            if c_total + amount > MAX_BALANCE:
                return Code.OVERFLOWS_CREDITS
            if d["flags"] & DMNEC and d_total + amount > d["credits_posted"]:
                return Code.EXCEEDS_CREDITS
            if c["flags"] & CMNED and c_total + amount > c["debits_posted"]:
                return Code.EXCEEDS_DEBITS
        return debit, credit, amount, (body["pending_id"] if resolving else None)

    # ------------------------------------------------------------------ queries
    def lookup_account(self, aid: Any) -> dict | None:
        if not is_id_type(aid):
            return None
        a = self.ledger["accounts"].get(aid)
        return None if a is None else dict(a)

    def lookup_transfer(self, tid: Any) -> dict | None:
        if not is_id_type(tid):
            return None
        t = self.ledger["transfers"].get(tid)
        if t is None:
            f = self.ledger["failed"].get(tid)
            return None if f is None else dict(f)
        out = {k: v for k, v in t.items() if k != "state"}
        if t["flags"] & PENDING:
            state = t["state"]
            if state == "pending" and t["timeout_ms"] and \
                    t["timestamp"] + t["timeout_ms"] * MS <= self.time:
                state = "expired"  # due; released at the next command boundary
            out["status"] = state
        elif t["flags"] & VOID:
            out["status"] = "voided"
        else:
            out["status"] = "posted"
        return out

    def account_history(self, aid: Any) -> list:
        led = self.ledger
        return [tid for tid in led["order"]
                if same(led["transfers"][tid]["debit_account_id"], aid)
                or same(led["transfers"][tid]["credit_account_id"], aid)]

    def totals(self) -> dict[int, tuple[int, int, int, int]]:
        out: dict[int, list[int]] = {}
        for a in self.ledger["accounts"].values():
            t = out.setdefault(a["currency"], [0, 0, 0, 0])
            t[0] += a["debits_pending"]
            t[1] += a["debits_posted"]
            t[2] += a["credits_pending"]
            t[3] += a["credits_posted"]
        return {c: tuple(v) for c, v in out.items()}

    def next_expiry(self) -> int | None:
        """Earliest log time at which a still-pending transfer expires (None if none)."""
        due = [t["timestamp"] + t["timeout_ms"] * MS for t in self.ledger["transfers"].values()
               if t["state"] == "pending" and t["timeout_ms"]]
        return min(due) if due else None
