"""Checkers: decide from the recorded history and the final state alone whether money was lost,
doubled or seen out of order.

Design.  Nothing here asks raftpay whether it behaved: the inputs are the client-side history
(`history.py`: what each client asked, when, and what it was told), the final state read back
after every fault was healed (accounts, each account's transfers in apply order, a lookup of
every transfer id any client ever sent), and the replicas' status.  Each checker returns a
`Check` with a verdict, a one-line summary, readable details (the minimal operations around a
violation, with times relative to the start of the run) and counters.

* `check_read_invariants` — in every successful read (any consistency) and in the final state,
  per currency (group) debits equal credits, posted and pending; an account with
  debits_must_not_exceed_credits never shows more debits than credits.
* `check_transfers` — every acknowledged transfer (an attempt answered `ok` or `exists`) is in
  the final ledger exactly once, with the body that was sent; an acknowledged failure never is;
  an unknown one at most once (ids are unique, so "at most once" is: each account's balances
  equal the sum of the transfers in its own history, and every transfer is in exactly the
  histories of its two accounts); nothing appears that no client sent; no id was answered `ok`
  twice.
* `check_hlc` — timestamps strictly increase along every account's history and no two
  transfers share one (the ledger stamps events in apply order).
* `check_linearizable` — Wing & Gong / Lowe search (`wgl.py`) against the independent model
  (`model.py`), per group of accounts (groups are disjoint, so per-group linearizability is the
  whole thing).  Linearizable reads and every write take part; the final state is a last read.
* `check_reads_order` — a witness check that needs no search: the final ledger's timestamps
  give the apply order; replaying it in the model must be valid, every read (follower reads
  too) must equal the state after some prefix of it, that prefix must hold the reader's own
  acknowledged writes (read-your-writes), must not hold anything invoked after the read
  returned, and for a linearizable read must hold every write acknowledged before it began.
* `check_replicas` — after healing, all replicas report one applied index and one state hash.

Three facts shrink the search without trusting the system: an unknown transfer whose id the
final ledger does not hold is dropped (had it applied, its amount would be in some balance and
`check_transfers` would fail); an unknown attempt is dropped when another attempt with the same
id was answered `ok` or a first-time transient failure (that attempt decided the id, so this one
changed nothing — a second effect would again show in the balances); and an unknown attempt's
window closes when any attempt with the same id got a definite answer (after that the id is
decided: a later arrival can only answer `exists`/`id_already_failed`).

Pure functions; deterministic; no I/O.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from raftpay.codes import TRANSIENT, Code, name as code_name

from chaos import wgl
from chaos.model import (CREDITS_MUST_NOT_EXCEED_DEBITS, DEBITS_MUST_NOT_EXCEED_CREDITS,
                         F_PENDING, F_POST, F_VOID, GroupModel, transfer_body)

APPLIED = frozenset({"posted", "pending", "voided", "expired"})
ACK_APPLIED = frozenset({int(Code.OK), int(Code.EXISTS)})
ACK_FAILED = frozenset({int(c) for c in TRANSIENT} | {int(Code.ID_ALREADY_FAILED)})
#: Answers after which a transfer id is decided for good (applied or remembered as failed).
DECIDED = frozenset({int(Code.OK)} | {c for c in range(40, 50)} | {int(c) for c in TRANSIENT})
#: Answers that say "this very request decided the id": it applied it, or it failed it for the
#: first time (a later request would get `exists` / `id_already_failed`).
FIRST_DECISION = frozenset({int(Code.OK)} | {int(c) for c in TRANSIENT})
DETAIL_LIMIT = 25


@dataclass
class Check:
    name: str
    ok: bool | None  # None: could not decide (e.g. the search budget ran out)
    summary: str
    details: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "UNKNOWN"}[self.ok]

    def add(self, text: str) -> None:
        if len(self.details) < DETAIL_LIMIT:
            self.details.append(text)
        elif len(self.details) == DETAIL_LIMIT:
            self.details.append("... (more left out)")


# --- formatting ---------------------------------------------------------------------------------


def fmt_result(op: dict) -> str:
    if op["type"] != "ok":
        return f"{op['type'].upper()} ({op.get('error') or 'no answer'})"
    r = op["result"]
    if op["f"] == "read":
        return fmt_balances(op["value"]["accounts"], r)
    return code_name(r).upper() if isinstance(r, int) else repr(r)


def fmt_balances(accounts, balances) -> str:
    parts = []
    for a, b in zip(accounts, balances or []):
        parts.append(f"{a}=absent" if b is None else f"{a}=[{b[0]} {b[1]} {b[2]} {b[3]}]")
    return " ".join(parts)


def fmt_op(op: dict) -> str:
    v = op["value"]
    t1 = op.get("complete_mono")
    when = f"[{op['invoke_mono']:.3f}..{'?' if t1 is None else f'{t1:.3f}'}]"
    if op["f"] == "read":
        what = f"read/{v.get('consistency', 'linearizable')}"
        if v.get("min_version"):
            what += f"(min_version={v['min_version']})"
    elif op["f"] == "create_account":
        what = f"create_account {v['id']} flags={v.get('flags', 0)}"
    elif v["kind"] in ("post", "void"):
        amt = "" if v.get("amount") is None else f" amount={v['amount']}"
        what = f"{v['kind']} {v['id']} of {v['pending_id']}{amt}"
    else:
        what = f"{v['kind']} {v['id']} {v['dr']}->{v['cr']} {v['amount']}"
    return f"#{op['index']} {op['process']} {when} {what} => {fmt_result(op)}"


def _transfer_ops(history: Iterable[dict]) -> dict[Any, list[dict]]:
    by_id: dict[Any, list[dict]] = collections.defaultdict(list)
    for op in history:
        if op["f"] == "transfer":
            by_id[op["value"]["id"]].append(op)
    return by_id


def _group_of_account(spec: dict) -> dict:
    return {a: g for g, gs in spec["groups"].items() for a in gs["accounts"]}


# --- money invariants in every read ---------------------------------------------------------------


def check_read_invariants(history: list[dict], spec: dict, final: dict | None = None) -> Check:
    chk = Check("read invariants", True, "")
    reads = [op for op in history if op["f"] == "read" and op["type"] == "ok"]
    samples = [(fmt_op(op), op["value"]["accounts"], op["result"]) for op in reads]
    if final is not None:
        for g, gs in spec["groups"].items():
            ids = list(gs["accounts"])
            bal = [_bal(final["accounts"].get(a)) for a in ids]
            samples.append((f"final state of group {g}", ids, bal))
    flags = {a: f for gs in spec["groups"].values() for a, f in gs["accounts"].items()}
    group_of = _group_of_account(spec)
    bad = 0
    for label, ids, bal in samples:
        problems = []
        per_group = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
        for a, b in zip(ids, bal):
            if b is None:
                continue
            g = group_of.get(a)
            t = per_group[g]
            for k in range(4):
                t[k] += b[k]
            t[4] += 1
            if flags.get(a, 0) & DEBITS_MUST_NOT_EXCEED_CREDITS and b[0] + b[1] > b[3]:
                problems.append(f"{a} (debits_must_not_exceed_credits) shows debits "
                                f"{b[0]}+{b[1]} > credits {b[3]}")
            if flags.get(a, 0) & CREDITS_MUST_NOT_EXCEED_DEBITS and b[2] + b[3] > b[1]:
                problems.append(f"{a} (credits_must_not_exceed_debits) shows credits "
                                f"{b[2]}+{b[3]} > debits {b[1]}")
        for g, t in per_group.items():
            complete = g is not None and t[4] == len(spec["groups"][g]["accounts"])
            if complete and (t[0] != t[2] or t[1] != t[3]):
                problems.append(f"group {g} not conserved: debits pending/posted {t[0]}/{t[1]} "
                                f"!= credits pending/posted {t[2]}/{t[3]}")
        if problems:
            bad += 1
            chk.ok = False
            chk.add(f"{label}: " + "; ".join(problems))
    chk.stats = {"reads_checked": len(samples), "bad_reads": bad}
    chk.summary = (f"{len(samples)} reads: totals conserved, no constrained account overdrawn"
                   if chk.ok else f"{bad} of {len(samples)} reads break a money invariant")
    return chk


def _bal(acct: dict | None):
    if acct is None:
        return None
    return [acct["debits_pending"], acct["debits_posted"], acct["credits_pending"],
            acct["credits_posted"]]


# --- lost, doubled, phantom -----------------------------------------------------------------------


def check_transfers(history: list[dict], final: dict) -> Check:
    chk = Check("transfers (lost / doubled / phantom)", True, "")
    by_id = _transfer_ops(history)
    ftx = final["transfers"]
    st = collections.Counter({k: 0 for k in (
        "acknowledged", "acknowledged_failed", "lost", "doubled_acks", "balance_mismatch",
        "unknown_applied", "unknown_absent", "unknown_failed", "phantom")})
    for tid, attempts in by_id.items():
        oks = [op for op in attempts if op["type"] == "ok"]
        applied_acks = [op for op in oks if op["result"] in ACK_APPLIED]
        failed_acks = [op for op in oks if op["result"] in ACK_FAILED]
        firsts = [op for op in oks if op["result"] == Code.OK]
        f = ftx.get(tid)
        status = None if f is None else f.get("status")
        is_applied = status in APPLIED
        if len(firsts) > 1:
            chk.ok = False
            st["doubled_acks"] += 1
            chk.add(f"transfer {tid} was answered OK (applied now) {len(firsts)} times: "
                    + " | ".join(fmt_op(o) for o in firsts))
        if applied_acks and failed_acks:
            chk.ok = False
            st["contradictory"] += 1
            chk.add(f"transfer {tid} was acknowledged both as applied and as failed: "
                    + " | ".join(fmt_op(o) for o in applied_acks + failed_acks))
        if applied_acks:
            st["acknowledged"] += 1
            if not is_applied:
                chk.ok = False
                st["lost"] += 1
                chk.add(f"LOST: transfer {tid} was acknowledged ({fmt_op(applied_acks[0])}) but "
                        f"the final ledger has {'nothing' if f is None else status}")
        elif failed_acks:
            st["acknowledged_failed"] += 1
            if is_applied:
                chk.ok = False
                st["failed_but_applied"] += 1
                chk.add(f"transfer {tid} was answered {fmt_result(failed_acks[0])} but the final "
                        f"ledger applied it ({status})")
        elif oks:
            st["rejected"] += 1  # a validation answer: nothing remembered, nothing applied
            if is_applied:
                chk.ok = False
                chk.add(f"transfer {tid} was rejected ({fmt_op(oks[0])}) but is in the ledger")
        else:
            kinds = {op["type"] for op in attempts}
            if kinds == {"fail"} and is_applied:
                chk.ok = False
                st["unavailable_but_applied"] += 1
                chk.add(f"transfer {tid}: every attempt was told nothing happened (unavailable) "
                        f"but the final ledger applied it: "
                        + " | ".join(fmt_op(o) for o in attempts))
            elif "info" in kinds:
                st["unknown_" + ("applied" if is_applied else "failed" if status == "failed"
                                 else "absent")] += 1
            else:
                st["unavailable"] += 1
        if is_applied:
            sent = attempts[0]["value"]
            problem = _body_mismatch(sent, f, ftx)
            if problem:
                chk.ok = False
                chk.add(f"transfer {tid} is in the ledger with a different body: {problem}")

    # Every applied transfer in exactly its two accounts' histories, balances = sum of effects.
    seen: dict[Any, list] = collections.defaultdict(list)
    for acct, items in final["account_transfers"].items():
        expect = [0, 0, 0, 0]
        for t in items:
            seen[t["id"]].append(acct)
            amt = t["amount"]
            side = 0 if t["debit_account_id"] == acct else 2 if t["credit_account_id"] == acct \
                else None
            if side is None:
                chk.ok = False
                chk.add(f"transfer {t['id']} is in the history of {acct}, which it does not touch")
                continue
            if t["flags"] & F_PENDING:
                if t["status"] == "pending":
                    expect[side] += amt
            elif t["flags"] & F_POST:
                expect[side + 1] += amt
            elif not t["flags"] & F_VOID:
                expect[side + 1] += amt
            if t["status"] not in APPLIED:
                chk.ok = False
                chk.add(f"transfer {t['id']} in {acct}'s history has status {t['status']!r}")
        have = _bal(final["accounts"].get(acct))
        if have != expect:
            chk.ok = False
            st["balance_mismatch"] += 1
            chk.add(f"DOUBLED or LOST effect: {acct} has balances {have} but the transfers in its "
                    f"history add up to {expect} (debits pending/posted, credits pending/posted)")
    for tid, accts in seen.items():
        if len(accts) != 2 or len(set(accts)) != 2:
            chk.ok = False
            st["bad_history_membership"] += 1
            chk.add(f"transfer {tid} appears in account histories {accts} (expected once in each "
                    "of its two accounts)")
        if tid not in by_id:
            chk.ok = False
            st["phantom"] += 1
            chk.add(f"PHANTOM: transfer {tid} is in the ledger but no client ever sent it")
    st["applied_final"] = len(seen)
    chk.stats = dict(st)
    lost, doubled = st["lost"], st["doubled_acks"] + st["balance_mismatch"]
    chk.summary = (f"{st['acknowledged']} acknowledged transfers, {len(seen)} in the final "
                   f"ledger; lost {lost}, doubled {doubled}; unknown outcomes: "
                   f"{st['unknown_applied']} applied, {st['unknown_absent']} never applied, "
                   f"{st['unknown_failed']} failed")
    return chk


def _body_mismatch(sent: dict, f: dict, ftx: dict) -> str | None:
    if sent.get("pending_id") is not None and f.get("pending_id") != sent["pending_id"]:
        return f"pending_id {f.get('pending_id')!r}, sent {sent['pending_id']!r}"
    if sent["kind"] in ("plain", "pending"):
        for k_sent, k_final in (("dr", "debit_account_id"), ("cr", "credit_account_id"),
                                ("amount", "amount")):
            if sent[k_sent] != f.get(k_final):
                return f"{k_final} {f.get(k_final)!r}, sent {sent[k_sent]!r}"
    elif sent["kind"] == "post" and sent.get("amount") is not None \
            and f.get("amount") != sent["amount"]:
        return f"amount {f.get('amount')!r}, sent {sent['amount']!r}"
    return None


# --- timestamps -----------------------------------------------------------------------------------


def check_hlc(final: dict) -> Check:
    chk = Check("HLC timestamps", True, "")
    owner: dict[int, Any] = {}
    n = 0
    for acct, items in final["account_transfers"].items():
        prev = None
        for t in items:
            ts = t["timestamp"]
            n += 1
            if prev is not None and ts <= prev[0]:
                chk.ok = False
                chk.add(f"{acct}: transfer {t['id']} has timestamp {ts} <= {prev[0]} of "
                        f"{prev[1]} before it in apply order")
            prev = (ts, t["id"])
            other = owner.setdefault(ts, t["id"])
            if other != t["id"]:
                chk.ok = False
                chk.add(f"transfers {other} and {t['id']} share timestamp {ts}")
    chk.stats = {"timestamps": n}
    chk.summary = ("strictly increasing along every account, all distinct" if chk.ok
                   else "timestamps out of order or shared")
    return chk


# --- linearizability ------------------------------------------------------------------------------


def group_ops(history: list[dict], spec: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {g: [] for g in spec["groups"]}
    for op in history:
        if op.get("group") in out:
            out[op["group"]].append(op)
    return out


def _search_ops(ops: list[dict], final: dict | None, by_id: dict) -> tuple[list, list]:
    """History ops -> SearchOps (see the module docstring for what is dropped or bounded)."""
    sops, dropped = [], []
    for op in ops:
        if op["f"] == "read" and op["value"].get("consistency", "linearizable") != "linearizable":
            continue
        if op["type"] == "fail":
            continue  # certainly did not happen
        if op["type"] == "info":
            if op["f"] == "read":
                continue  # a read with no answer constrains nothing
            ret = None
            if op["f"] == "transfer":
                tid = op["value"]["id"]
                if final is not None and final["transfers"].get(tid) is None:
                    dropped.append(op)
                    continue
                same = [o for o in by_id.get(tid, ()) if o["type"] == "ok"
                        and transfer_body(o["value"]) == transfer_body(op["value"])]
                if any(o["result"] in FIRST_DECISION for o in same):
                    # Another attempt decided the id itself (applied it, or failed it first):
                    # this one changed nothing, whenever it arrived.
                    dropped.append(op)
                    continue
                decided = [o["complete_mono"] for o in same if o["result"] in DECIDED]
                if any(t <= op["invoke_mono"] for t in decided):
                    dropped.append(op)
                    continue
                if decided:
                    ret = min(decided)
            sops.append(wgl.SearchOp(op["f"], op["value"], op["invoke_mono"], ret, None, op,
                                     known=False))
            continue
        sops.append(wgl.SearchOp(op["f"], op["value"], op["invoke_mono"], op["complete_mono"],
                                 op["result"], op))
    return sops, dropped


def check_linearizable(history: list[dict], spec: dict, final: dict | None = None, *,
                       max_steps: int = 3_000_000) -> Check:
    chk = Check("linearizability", True, "")
    by_id = _transfer_ops(history)
    end = max([op["complete_mono"] or op["invoke_mono"] for op in history] + [0.0])
    stats = {}
    for g, ops in group_ops(history, spec).items():
        gs = spec["groups"][g]
        sops, dropped = _search_ops(ops, final, by_id)
        if final is not None:
            ids = list(gs["accounts"])
            fake = {"index": "final", "process": "checker", "f": "read", "group": g,
                    "value": {"accounts": ids, "consistency": "linearizable"},
                    "invoke_mono": end + 1, "complete_mono": end + 2, "type": "ok",
                    "result": [_bal(final["accounts"].get(a)) for a in ids]}
            sops.append(wgl.SearchOp("read", fake["value"], end + 1, end + 2, fake["result"],
                                     fake))
        accounts = list(gs["accounts"])
        res = wgl.check(sops, lambda: GroupModel(gs["currency"]), max_steps=max_steps,
                        state_of=lambda m: m.read(accounts))
        stats[g] = {"ops": len(sops), "dropped_unknown": len(dropped), "steps": res.steps,
                    "linearizable": res.ok}
        if res.ok is None:
            if chk.ok:
                chk.ok = None
            chk.add(f"group {g}: search gave up after {res.steps} steps ({len(sops)} ops)")
        elif not res.ok:
            chk.ok = False
            chk.details.extend(_lin_report(g, accounts, sops, res))
    chk.stats = stats
    n = sum(s["ops"] for s in stats.values())
    chk.summary = {True: f"all {len(stats)} groups linearizable ({n} ops)",
                   None: "search budget exhausted for some group",
                   False: "NOT linearizable: " + ", ".join(
                       g for g, s in stats.items() if s["linearizable"] is False)}[chk.ok]
    return chk


def _lin_report(g, accounts, sops, res) -> list[str]:
    out = [f"group {g}: no linearization exists (searched {res.steps} steps).",
           f"  The longest linearizable prefix has {len(res.prefix)} ops; its last ones:"]
    for i in res.prefix[-8:]:
        out.append("    " + fmt_op(sops[i].ref))
    out.append(f"  model state after it: {fmt_balances(accounts, res.state)}")
    blocked = sops[res.blocked].ref
    out.append(f"  stuck: {fmt_op(blocked)}")
    out.append("    completed, but no order of the operations still open lets it return that.")
    out.append("  operations that could go next, and what the model answers there:")
    for i, answer in res.candidates:
        op = sops[i].ref
        if op["f"] == "read":
            said = fmt_balances(op["value"]["accounts"], answer)
        else:
            said = code_name(answer).upper()
        out.append(f"    {fmt_op(op)}\n        model: {said}")
    return out


# --- reads against the final apply order ---------------------------------------------------------


def _replay_events(gs: dict, final: dict) -> tuple[list, list[str]]:
    """The group's events in apply (timestamp) order, as model ops."""
    events = []
    for a, flags in gs["accounts"].items():
        acct = final["accounts"].get(a)
        if acct is not None:
            events.append((acct["timestamp"], "account:" + str(a),
                           {"f": "create_account", "value": {"id": a, "flags": flags}}))
    seen = set()
    for a in gs["accounts"]:
        for t in final["account_transfers"].get(a, []):
            if t["id"] in seen:
                continue
            seen.add(t["id"])
            fl = t["flags"]
            kind = ("pending" if fl & F_PENDING else "post" if fl & F_POST else
                    "void" if fl & F_VOID else "plain")
            v = {"id": t["id"], "kind": kind, "dr": t["debit_account_id"],
                 "cr": t["credit_account_id"], "amount": t["amount"], "currency": t["currency"],
                 "pending_id": t.get("pending_id")}
            if kind == "void":
                v["amount"] = None
            events.append((t["timestamp"], t["id"], {"f": "transfer", "value": v}))
    events.sort(key=lambda e: e[0])
    return events, []


def check_reads_order(history: list[dict], spec: dict, final: dict) -> Check:
    chk = Check("reads vs. the final apply order", True, "")
    by_id = _transfer_ops(history)
    first_invoke = {tid: min(o["invoke_mono"] for o in ops) for tid, ops in by_id.items()}
    counts = collections.Counter()
    for g, ops in group_ops(history, spec).items():
        gs = spec["groups"][g]
        events, _ = _replay_events(gs, final)
        model = GroupModel(gs["currency"])
        accounts = list(gs["accounts"])
        states = [model.read(accounts)]
        pos: dict[Any, int] = {}
        for k, (ts, key, ev) in enumerate(events, start=1):
            out, _ = model.step(ev)
            if out != Code.OK:
                chk.ok = False
                chk.add(f"group {g}: the final ledger's order is not a valid execution: event {k} "
                        f"({key}, ts {ts}) gives {code_name(out).upper()} when replayed")
            pos[key] = k
            states.append(model.read(accounts))
        index: dict[tuple, dict] = {}

        def matches(ids):
            key = tuple(ids)
            if key not in index:
                cols = [accounts.index(a) if a in accounts else None for a in ids]
                m = collections.defaultdict(list)
                for k, s in enumerate(states):
                    m[repr([None if c is None else s[c] for c in cols])].append(k)
                index[key] = m
            return index[key]

        # Acknowledged applied writes by completion time, with running maxima of their
        # positions (everyone's, and each process's own), to bound each read from below.
        acks = sorted(((op["complete_mono"], op["process"], pos[op["value"]["id"]], op)
                       for op in ops
                       if op["f"] == "transfer" and op["type"] == "ok"
                       and op["result"] in ACK_APPLIED and op["value"]["id"] in pos),
                      key=lambda a: a[0])
        all_lo = _running_max([(a[0], a[2], a[3]) for a in acks])
        own_lo = {p: _running_max([(a[0], a[2], a[3]) for a in acks if a[1] == p])
                  for p in {a[1] for a in acks}}
        # Events by the first time any client sent them, with suffix minima of their positions,
        # to bound each read from above (nothing sent after a read returned can be in it).
        future = sorted((first_invoke.get(key, math.inf), k, key) for key, k in pos.items()
                        if not str(key).startswith("account:"))
        fut_times = [f[0] for f in future]
        suffix_min: list = [(len(states), None)] * (len(future) + 1)
        for i in range(len(future) - 1, -1, -1):
            suffix_min[i] = min(suffix_min[i + 1], (future[i][1], future[i][2]),
                                key=lambda x: x[0])
        for op in ops:
            if op["f"] != "read" or op["type"] != "ok":
                continue
            lin = op["value"].get("consistency", "linearizable") == "linearizable"
            counts["linearizable" if lin else "follower"] += 1
            lo, lo_why = _max_before(all_lo if lin else own_lo.get(op["process"], ([], [])),
                                     op["invoke_mono"])
            k_min, hi_why = suffix_min[bisect.bisect_right(fut_times, op["complete_mono"])]
            hi = min(len(states) - 1, k_min - 1)
            ks = matches(op["value"]["accounts"]).get(repr(op["result"]), [])
            if any(lo <= k <= hi for k in ks):
                continue
            chk.ok = False
            counts["bad"] += 1
            kind = "STALE read" if ks and max(ks) < lo else \
                "read from the FUTURE" if ks and min(ks) > hi else \
                "read of a state that never existed" if not ks else "read out of window"
            lines = [f"group {g}: {kind}: {fmt_op(op)}",
                     f"    allowed prefixes of the apply order: {lo}..{hi} of {len(states) - 1}"]
            if lo_why is not None:
                lines.append(f"    at least {lo} because of {fmt_op(lo_why)}")
            if hi_why is not None:
                lines.append(f"    at most {hi} because {hi_why} was first sent after the read "
                             "returned")
            if ks:
                lines.append(f"    the value read is the state after prefix(es) {ks[:10]}")
            lines.append(f"    state after prefix {lo}: {fmt_balances(accounts, states[lo])}")
            chk.add("\n".join(lines))
    chk.stats = dict(counts)
    chk.summary = (f"{counts['linearizable']} linearizable and {counts['follower']} follower "
                   f"reads fit the apply order" if chk.ok else
                   f"{counts['bad']} reads do not fit the apply order")
    return chk


def _running_max(items: list[tuple]) -> tuple[list, list]:
    """[(time, position, op)] sorted by time -> (times, [(max position so far, its op)])."""
    times, best, cur = [], [], (0, None)
    for t, p, op in items:
        if p > cur[0]:
            cur = (p, op)
        times.append(t)
        best.append(cur)
    return times, best


def _max_before(run: tuple[list, list], t: float) -> tuple[int, Any]:
    times, best = run
    i = bisect.bisect_left(times, t)  # strictly before t
    return best[i - 1] if i else (0, None)


# --- replicas -------------------------------------------------------------------------------------


def check_replicas(statuses: dict[str, dict], converged: bool) -> Check:
    chk = Check("replica convergence", True, "")
    hashes = {n: s.get("state_hash") for n, s in statuses.items()}
    applied = {n: s.get("applied_index") for n, s in statuses.items()}
    chk.stats = {"nodes": len(statuses), "applied": applied}
    if not statuses:
        chk.ok = False
        chk.summary = "no replica answered"
        return chk
    if not converged or len(set(hashes.values())) != 1:
        chk.ok = False
        for n in sorted(statuses):
            chk.add(f"{n}: applied {applied[n]} hash {str(hashes[n])[:16]} role "
                    f"{statuses[n].get('role')} fatal {statuses[n].get('fatal')}")
        chk.summary = "replicas did not converge on one applied index and state hash"
    else:
        chk.summary = (f"{len(statuses)} replicas at applied index {next(iter(applied.values()))} "
                       f"with hash {next(iter(hashes.values()))[:16]}")
    return chk


# --- all together ---------------------------------------------------------------------------------


def run_all(history: list[dict], spec: dict, final: dict | None, statuses: dict | None = None,
            converged: bool = True, max_steps: int = 3_000_000) -> list[Check]:
    checks = [check_read_invariants(history, spec, final)]
    if final is not None:
        checks += [check_transfers(history, final), check_hlc(final),
                   check_reads_order(history, spec, final)]
    checks.append(check_linearizable(history, spec, final, max_steps=max_steps))
    if statuses is not None:
        checks.append(check_replicas(statuses, converged))
    return checks


def format_report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.verdict}] {c.name}: {c.summary}")
        for d in c.details:
            lines.extend("    " + x for x in d.splitlines())
    return "\n".join(lines)
