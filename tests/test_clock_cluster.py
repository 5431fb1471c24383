"""Clocks in a running cluster: skewed nodes, the offset guard, log time that never runs ahead.

Real node processes; a node's wall clock is skewed through RAFTPAY_CLOCK_SKEW_MS (the system
clock is left alone)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from raftpay.client import Client
from raftpay.clock import ClockGuard, ms_of
from raftpay.codes import Code
from raftpay.server import ClockRefused, guarded_stamp
from cluster_fixtures import local_cluster, node_statuses, wait_until


class _RecordingNode:
    """Only records step_down calls: the unit under test is the stamp function."""

    def __init__(self):
        self.step_downs = 0

    def step_down(self, avoid=()):
        self.step_downs += 1
        self.avoided = set(avoid)


def test_guarded_stamp_refuses_and_steps_down_when_the_majority_disagrees():
    from raftpay.clock import HLC
    guard = ClockGuard(500)
    hlc = HLC(wall_ms=lambda: 1_000_000)
    node = _RecordingNode()
    stamp = guarded_stamp(hlc, guard, node)
    assert ms_of(stamp()) == 1_000_000  # no samples yet: nobody disagrees
    # Two peers agree with each other and are 2 s behind us: we are the odd one out.
    guard.add_sample("p1", 1_000_000, 998_000, 1_000_001)
    guard.add_sample("p2", 1_000_000, 998_001, 1_000_001)
    with pytest.raises(ClockRefused):
        stamp()
    assert node.step_downs == 1
    # One peer agrees with us again: no majority against us, stamping resumes.
    guard.add_sample("p2", 1_000_000, 1_000_000, 1_000_001)
    assert stamp()


SKEW = {"n4": {"RAFTPAY_CLOCK_SKEW_MS": "2000"}, "n5": {"RAFTPAY_CLOCK_SKEW_MS": "-2000"}}


def test_skewed_nodes_are_flagged_and_never_stamp(tmp_path):
    c = local_cluster(tmp_path, 5)
    c.start(env=SKEW)
    try:
        c.wait_for_leader(30)
        # The guard fires where it should: on the two skewed nodes, on no other.
        def flagged():
            st = node_statuses(c)
            if len(st) < 5:
                return None
            bad = {k for k, s in st.items() if not s["clock"]["guard_ok"]}
            return bad if bad == {"n4", "n5"} else None
        wait_until(flagged, 20, "the guard to flag exactly n4 and n5", interval_s=0.2)

        t_start_ms = time.time_ns() // 1_000_000
        # A short attempt timeout: a paused node costs one second per try, not five.
        with Client(c.seeds, timeout_s=30, attempt_timeout_s=1) as cl:
            cl.create_accounts([{"id": "s-a", "currency": 1}, {"id": "s-b", "currency": 1}])
            assert cl.transfer("s-p", "s-a", "s-b", 5, 1, flags=["pending"],
                               timeout_ms=60_000) == Code.OK
            # Push leadership around: pause whichever normal node leads, so elections happen
            # among the rest (the skewed ones included), and keep paying throughout.
            paid = 0
            for kick in range(6):
                leader_addr = c.wait_for_leader(30)
                leader = next(x.node.id for x in c.configs if x.node.client_addr == leader_addr)
                victim = c.procs[leader]
                victim.send_signal(signal.SIGSTOP)
                try:
                    for k in range(5):
                        assert cl.transfer(f"s-{kick}-{k}", "s-a", "s-b", 1, 1) in (
                            Code.OK, Code.EXISTS)
                        paid += 1
                finally:
                    victim.send_signal(signal.SIGCONT)
            now_ms = time.time_ns() // 1_000_000
            # Log time never ran ahead of real time by more than the guard: no stamp from the
            # +2 s clock made it into the ledger, so nothing can expire early.
            items, cursor, stamps = [], 0, []
            while cursor is not None:
                items, cursor = cl.account_transfers("s-b", limit=1000, cursor=cursor)
                stamps += [t["timestamp"] for t in items]
            assert len(stamps) == paid + 1
            assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
            assert all(t_start_ms - 2500 <= ms_of(ts) <= now_ms + 500 for ts in stamps), (
                [ms_of(ts) - now_ms for ts in stamps])
            (pending,) = cl.lookup_transfers(["s-p"])
            assert pending["status"] == "pending"
            assert cl.post_pending("s-post", "s-p") == Code.OK
        logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("n1", "n2", "n3", "n4", "n5")}
        assert not any("CLOCK GUARD" in logs[n] for n in ("n1", "n2", "n3"))
        # The nodes' HLC-stamped event logs merge into one ordered history.
        files = [str(tmp_path / n / "events.jsonl") for n in ("n1", "n2", "n3", "n4", "n5")]
        r = subprocess.run([sys.executable, "-m", "raftpay", "logs", "merge", *files],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        merged = [json.loads(line) for line in r.stdout.splitlines()]
        assert [e["hlc"] for e in merged] == sorted(e["hlc"] for e in merged)
        assert {e["node"] for e in merged} == {"n1", "n2", "n3", "n4", "n5"}
        leaders = [e for e in merged if e["event"] == "raft.role" and e["role"] == "leader"]
        assert len(leaders) >= 2  # the pauses moved leadership at least once
    finally:
        for p in c.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        c.close()
