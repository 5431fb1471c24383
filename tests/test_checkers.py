"""The chaos checkers, tested on hand-made histories: each kind of violation must fail with a
report that names it, and a correct history — concurrent, with unknown outcomes and follower
reads — must pass.  No cluster is involved: the checkers only read histories."""

from __future__ import annotations

import pytest

from raftpay.codes import Code

from chaos import checkers, wgl
from chaos.model import F_PENDING, F_POST, F_VOID, GroupModel

OK, EXISTS, EXCEEDS = int(Code.OK), int(Code.EXISTS), int(Code.EXCEEDS_CREDITS)
SPEC = {"groups": {"g1": {"currency": 1, "accounts": {"bank": 0, "a": 2, "b": 2}}}}
ACCOUNTS = ["bank", "a", "b"]


class H:
    """A hand-written history.  Times are seconds from the start; every op is in group g1."""

    def __init__(self):
        self.ops: list[dict] = []

    def add(self, proc, f, value, t0, t1, type_="ok", result=None):
        op = {"index": len(self.ops), "process": proc, "f": f, "group": "g1", "value": value,
              "invoke_mono": t0, "complete_mono": t1, "invoke_wall": t0, "complete_wall": t1,
              "type": type_, "result": result, "version": None, "error": None}
        if type_ != "ok":
            op["error"] = "test"
        self.ops.append(op)
        return op

    def setup(self, funding=10):
        """Accounts at 0..0.1, then bank -> a of `funding` at 0.2..0.3."""
        for i, (a, fl) in enumerate(SPEC["groups"]["g1"]["accounts"].items()):
            self.add("setup", "create_account", {"id": a, "flags": fl}, 0.01 * i, 0.01 * i + 0.005,
                     result=OK)
        self.transfer("setup", "fund", "bank", "a", funding, 0.2, 0.3)
        return self

    def transfer(self, proc, tid, dr, cr, amount, t0, t1, result=OK, type_="ok", kind="plain"):
        return self.add(proc, "transfer", {"id": tid, "kind": kind, "dr": dr, "cr": cr,
                                           "amount": amount, "currency": 1, "pending_id": None},
                        t0, t1, type_, result if type_ == "ok" else None)

    def resolve(self, proc, tid, kind, pending_id, t0, t1, result=OK, type_="ok"):
        return self.add(proc, "transfer", {"id": tid, "kind": kind, "dr": None, "cr": None,
                                           "amount": None, "currency": None,
                                           "pending_id": pending_id},
                        t0, t1, type_, result if type_ == "ok" else None)

    def read(self, proc, balances, t0, t1, consistency="linearizable", type_="ok"):
        return self.add(proc, "read", {"accounts": ACCOUNTS, "consistency": consistency},
                        t0, t1, type_, [balances[a] for a in ACCOUNTS] if type_ == "ok" else None)


def final_from(history: H, applied_ids: list, *, doubled: str | None = None,
               drop: str | None = None) -> dict:
    """The final state of a ledger that was sent `applied_ids` in that order (their bodies from
    the history; those that fail are remembered as failed), as the runner would read it back.
    `doubled` applies that transfer's balance effect twice (a double apply the transfer list
    hides); `drop` leaves one out of the ledger."""
    bodies = {}
    for op in history.ops:
        if op["f"] == "transfer":
            bodies.setdefault(op["value"]["id"], op["value"])
    m = GroupModel(1)
    for a, fl in SPEC["groups"]["g1"]["accounts"].items():
        m.step({"f": "create_account", "value": {"id": a, "flags": fl}})
    records, hist = {}, {a: [] for a in ACCOUNTS}
    for k, tid in enumerate(applied_ids):
        if tid == drop:
            continue
        v = bodies[tid]
        for _ in range(2 if tid == doubled else 1):
            out, _undo = m.step({"f": "transfer", "value": v})
            if tid == doubled and out == EXISTS:  # force the second effect past dedup
                m.applied.pop(tid)
                out, _undo = m.step({"f": "transfer", "value": v})
        if out != OK:
            continue  # a remembered failure (listed below)
        filled = m.applied[tid][0]
        flags = {"plain": 0, "pending": F_PENDING, "post": F_POST, "void": F_VOID}[v["kind"]]
        t = {"id": tid, "debit_account_id": filled[3], "credit_account_id": filled[4],
             "amount": filled[5], "currency": 1, "flags": flags, "pending_id": v["pending_id"],
             "timestamp": 1000 + k, "status": "posted"}
        records[tid] = t
        hist[filled[3]].append(t)
        hist[filled[4]].append(t)
    for pid, state in m.pstate.items():
        records[pid]["status"] = state
    for tid, (code, _raw) in m.failed.items():
        records[tid] = {"id": tid, "status": "failed", "code": code}
    accounts = {}
    for i, a in enumerate(ACCOUNTS):
        b = m.accounts[a]
        accounts[a] = {"id": a, "currency": 1, "flags": m.account_flags[a], "timestamp": i,
                       "debits_pending": b[0], "debits_posted": b[1], "credits_pending": b[2],
                       "credits_posted": b[3]}
    ids = {op["value"]["id"] for op in history.ops if op["f"] == "transfer"}
    return {"accounts": accounts, "account_transfers": hist,
            "transfers": {tid: records.get(tid) for tid in ids}}


def verdicts(checks):
    return {c.name: c.ok for c in checks}


def report(checks):
    return checkers.format_report(checks)


# --- a correct history passes ---------------------------------------------------------------------


def correct_history() -> tuple[H, list]:
    h = H().setup(10)
    # Two clients race for a's 10: p1 takes 6, so p2's 6 must fail (in either order, one fails).
    h.transfer("p1", "t1", "a", "b", 6, 1.0, 2.0, result=OK)
    h.transfer("p2", "t2", "a", "b", 6, 1.1, 1.9, result=EXCEEDS)
    h.read("p3", {"bank": [0, 10, 0, 0], "a": [0, 0, 0, 10], "b": [0, 0, 0, 0]}, 1.05, 1.5)
    h.read("p3", {"bank": [0, 10, 0, 0], "a": [0, 6, 0, 10], "b": [0, 0, 0, 6]}, 2.1, 2.2)
    # An unknown outcome, retried with the same id: the retry says it had been applied.
    h.transfer("p1", "t3", "b", "a", 2, 3.0, 4.0, type_="info")
    h.transfer("p1", "t3", "b", "a", 2, 4.1, 4.2, result=EXISTS)
    # An unknown outcome that never happened.
    h.transfer("p2", "t4", "a", "b", 1, 3.5, 5.0, type_="info")
    # Two-phase: reserve 3 from b, post it.
    h.transfer("p2", "p5", "b", "a", 3, 5.1, 5.2, kind="pending")
    h.read("p3", {"bank": [0, 10, 0, 0], "a": [0, 6, 3, 12], "b": [3, 2, 0, 6]}, 5.3, 5.4,
           consistency="follower")
    h.resolve("p2", "c5", "post", "p5", 5.5, 5.6)
    # A follower read may lag behind others' writes (not its own): it sees before the post.
    h.read("p4", {"bank": [0, 10, 0, 0], "a": [0, 6, 3, 12], "b": [3, 2, 0, 6]}, 5.7, 5.8,
           consistency="follower")
    h.read("p3", {"bank": [0, 10, 0, 0], "a": [0, 6, 0, 15], "b": [0, 5, 0, 6]}, 5.9, 6.0)
    return h, ["fund", "t1", "t3", "p5", "c5"]


def test_a_correct_history_passes():
    h, order = correct_history()
    final = final_from(h, order)
    final["transfers"]["t2"] = {"id": "t2", "status": "failed", "code": EXCEEDS}
    checks = checkers.run_all(h.ops, SPEC, final, {"n1": {"state_hash": "x", "applied_index": 9},
                                                    "n2": {"state_hash": "x", "applied_index": 9}})
    assert all(c.ok for c in checks), report(checks)
    tr = next(c for c in checks if c.name.startswith("transfers"))
    assert tr.stats["lost"] == 0 and tr.stats["unknown_absent"] == 1


def test_a_correct_history_passes_without_a_final_state():
    h, _ = correct_history()
    c = checkers.check_linearizable(h.ops, SPEC)
    assert c.ok, report([c])


# --- lost write -----------------------------------------------------------------------------------


def test_a_lost_write_is_reported():
    h, order = correct_history()
    final = final_from(h, order, drop="c5")  # the post was acknowledged, then forgotten
    checks = checkers.run_all(h.ops, SPEC, final)
    v = verdicts(checks)
    assert v["transfers (lost / doubled / phantom)"] is False
    assert v["linearizability"] is False  # the final state cannot follow the history either
    text = report(checks)
    assert "LOST: transfer c5 was acknowledged (#13 p2 [5.500..5.600] post c5 of p5 => OK)" \
        in text
    tr = next(c for c in checks if c.name.startswith("transfers"))
    assert tr.stats["lost"] == 1


# --- double apply ---------------------------------------------------------------------------------


def test_a_double_apply_hidden_by_the_transfer_list_is_reported():
    h, order = correct_history()
    final = final_from(h, order, doubled="t3")
    checks = checkers.run_all(h.ops, SPEC, final)
    text = report(checks)
    assert verdicts(checks)["transfers (lost / doubled / phantom)"] is False, text
    assert "DOUBLED or LOST effect: a has balances" in text
    assert verdicts(checks)["linearizability"] is False


def test_a_transfer_acknowledged_as_applied_twice_is_reported():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 2, 1.0, 1.1, type_="info")
    h.transfer("p1", "t1", "a", "b", 2, 1.2, 1.3, result=OK)
    h.transfer("p1", "t1", "a", "b", 2, 1.4, 1.5, result=OK)  # should have been EXISTS
    final = final_from(h, ["fund", "t1"])
    checks = checkers.run_all(h.ops, SPEC, final)
    text = report(checks)
    assert "transfer t1 was answered OK (applied now) 2 times" in text
    assert verdicts(checks)["linearizability"] is False


# --- stale read -----------------------------------------------------------------------------------


def stale_read_history() -> H:
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 4, 1.0, 2.0, result=OK)
    # Begins after t1 was acknowledged, yet does not see it: an old leader answered.
    h.read("p2", {"bank": [0, 10, 0, 0], "a": [0, 0, 0, 10], "b": [0, 0, 0, 0]}, 3.0, 3.1)
    return h


def test_a_stale_read_is_not_linearizable_and_the_report_shows_it():
    h = stale_read_history()
    c = checkers.check_linearizable(h.ops, SPEC)
    assert c.ok is False
    text = report([c])
    assert "stuck: #5 p2 [3.000..3.100] read/linearizable" in text
    assert "model: bank=[0 10 0 0] a=[0 4 0 10] b=[0 0 0 4]" in text  # what it should have seen


def test_a_stale_read_is_named_by_the_apply_order_check():
    h = stale_read_history()
    c = checkers.check_reads_order(h.ops, SPEC, final_from(h, ["fund", "t1"]))
    assert c.ok is False
    text = report([c])
    assert "STALE read" in text and "because of #4 p1" in text


def test_a_follower_read_must_see_its_own_writes_but_not_others():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 4, 1.0, 2.0, result=OK)
    old = {"bank": [0, 10, 0, 0], "a": [0, 0, 0, 10], "b": [0, 0, 0, 0]}
    h.read("p2", old, 3.0, 3.1, consistency="follower")  # another client: allowed to lag
    final = final_from(h, ["fund", "t1"])
    assert checkers.check_reads_order(h.ops, SPEC, final).ok
    h.read("p1", old, 3.2, 3.3, consistency="follower")  # the writer itself: not allowed
    c = checkers.check_reads_order(h.ops, SPEC, final)
    assert c.ok is False and "STALE read: #6 p1" in report([c])


# --- non-linearizable order -----------------------------------------------------------------------


def test_results_that_only_fit_the_reverse_of_real_time_order_are_caught():
    # a holds 10.  t1 (6) fails for lack of funds, and *afterwards* t2 (6) succeeds, with nothing
    # paid into a in between.  Only the order t2, t1 explains the answers, and real time forbids
    # it.  The final state agrees with that (wrong) order, so only the search can tell.
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 6, 1.0, 1.1, result=EXCEEDS)
    h.transfer("p2", "t2", "a", "b", 6, 2.0, 2.1, result=OK)
    final = final_from(h, ["fund", "t2", "t1"])
    checks = checkers.run_all(h.ops, SPEC, final)
    v = verdicts(checks)
    assert v["transfers (lost / doubled / phantom)"] and v["read invariants"], report(checks)
    assert v["linearizability"] is False
    text = report(checks)
    # Nothing can come before t1 (t2 starts after it returned), and there it would succeed.
    assert "stuck: #4 p1 [1.000..1.100] plain t1 a->b 6 => EXCEEDS_CREDITS" in text
    assert "model: OK" in text


def test_the_same_answers_concurrently_are_linearizable():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 6, 1.0, 2.5, result=EXCEEDS)
    h.transfer("p2", "t2", "a", "b", 6, 2.0, 2.1, result=OK)
    assert checkers.check_linearizable(h.ops, SPEC).ok


# --- more money invariants ------------------------------------------------------------------------


def test_a_read_that_breaks_conservation_or_overdraws_fails():
    h = H().setup(10)
    h.read("p1", {"bank": [0, 10, 0, 0], "a": [0, 0, 0, 9], "b": [0, 0, 0, 0]}, 1, 1.1)
    h.read("p1", {"bank": [0, 10, 0, 0], "a": [0, 12, 0, 10], "b": [0, 0, 0, 12]}, 2, 2.1,
           consistency="follower")
    c = checkers.check_read_invariants(h.ops, SPEC)
    assert c.ok is False and c.stats["bad_reads"] == 2
    text = report([c])
    assert "group g1 not conserved" in text
    assert "a (debits_must_not_exceed_credits) shows debits 0+12 > credits 10" in text


def test_an_unavailable_transfer_that_was_applied_fails():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 1, 1.0, 1.1, type_="fail")
    c = checkers.check_transfers(h.ops, final_from(h, ["fund", "t1"]))
    assert c.ok is False and "every attempt was told nothing happened" in report([c])


def test_a_phantom_transfer_fails():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 1, 1.0, 1.1, result=OK)
    final = final_from(h, ["fund", "t1"])
    h.ops = [op for op in h.ops if op["value"].get("id") != "t1"]
    c = checkers.check_transfers(h.ops, final)
    assert c.ok is False and "PHANTOM: transfer t1" in report([c])


def test_timestamps_out_of_order_fail():
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 1, 1.0, 1.1, result=OK)
    final = final_from(h, ["fund", "t1"])
    final["account_transfers"]["a"][1]["timestamp"] = 5  # t1 now stamped before fund
    c = checkers.check_hlc(final)
    assert c.ok is False and "has timestamp 5 <=" in report([c])


def test_diverged_replicas_fail():
    c = checkers.check_replicas({"n1": {"state_hash": "aa", "applied_index": 7},
                                 "n2": {"state_hash": "bb", "applied_index": 7}}, True)
    assert c.ok is False and "n2: applied 7 hash bb" in report([c])


# --- the search itself ----------------------------------------------------------------------------


def test_the_search_gives_up_honestly_when_out_of_budget():
    h = H().setup(1000)
    for i in range(12):  # many concurrent unknowns: a large search space
        h.transfer(f"p{i}", f"u{i}", "a", "b", 1 + i, 1.0 + i * 0.001, None, type_="info")
    h.read("r", {"bank": [0, 1000, 0, 0], "a": [0, 0, 0, 1000], "b": [0, 0, 0, 0]}, 0.5, 0.6)
    h.read("r", {"bank": [0, 1000, 0, 0], "a": [0, 999, 0, 1000], "b": [0, 0, 0, 999]}, 3, 3.1)
    c = checkers.check_linearizable(h.ops, SPEC, max_steps=50)
    assert c.ok is None and "gave up" in report([c])


@pytest.mark.parametrize("n", [40])
def test_the_search_is_fast_on_a_long_concurrent_history(n):
    h = H().setup(10_000)
    bal = {"bank": [0, 10_000, 0, 0], "a": [0, 0, 0, 10_000], "b": [0, 0, 0, 0]}
    t = 1.0
    for i in range(n):  # three overlapping writers and a reader, repeatedly
        for p in range(3):
            h.transfer(f"p{p}", f"t{i}-{p}", "a", "b", 1, t + p * 0.01, t + 0.5 + p * 0.01)
        bal["a"][1] += 3
        bal["b"][3] += 3
        h.read("r", {k: list(v) for k, v in bal.items()}, t + 0.6, t + 0.7)
        t += 1
    res = wgl.check([wgl.SearchOp(op["f"], op["value"], op["invoke_mono"], op["complete_mono"],
                                  op["result"], op) for op in h.ops],
                    lambda: GroupModel(1))
    assert res.ok and res.steps < 20_000


def test_unknown_attempts_of_an_id_another_attempt_applied_are_dropped_from_the_search():
    # Two unknown attempts early, the id applied by a retry much later: the early attempts
    # changed nothing, and without them the search stays linear.
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 2, 1.0, 1.5, type_="info")
    h.transfer("p1", "t1", "a", "b", 2, 1.6, 2.0, type_="info")
    for i in range(30):
        h.read("r", {"bank": [0, 10, 0, 0], "a": [0, 0, 0, 10], "b": [0, 0, 0, 0]},
               3 + i, 3.5 + i)
    h.transfer("p1", "t1", "a", "b", 2, 40, 40.1, result=OK)
    final = final_from(h, ["fund", "t1"])
    c = checkers.check_linearizable(h.ops, SPEC, final)
    assert c.ok, report([c])
    assert c.stats["g1"]["dropped_unknown"] == 2


def test_an_early_effect_of_an_attempt_said_to_apply_later_is_caught():
    # The retry answered OK ("applied by me, now"), but reads saw the money move long before:
    # then the early attempt applied it and the OK is false.
    h = H().setup(10)
    h.transfer("p1", "t1", "a", "b", 2, 1.0, 1.5, type_="info")
    h.read("r", {"bank": [0, 10, 0, 0], "a": [0, 2, 0, 10], "b": [0, 0, 0, 2]}, 3, 3.5)
    h.transfer("p1", "t1", "a", "b", 2, 40, 40.1, result=OK)
    final = final_from(h, ["fund", "t1"])
    assert checkers.check_linearizable(h.ops, SPEC, final).ok is False
