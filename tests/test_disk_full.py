"""A node whose disk fills up stops with a reason, and the cluster goes on without it.

Real node processes on loopback; one node's data directory is a real tmpfs of a few MB, which
fills up as the cluster takes 8k-event batches.  Upstream's journal grows its file with
ftruncate and writes through an mmap, so the first write into a page the disk cannot give was a
SIGBUS: the node died with "Bus error" and nothing more.  raftpay reserves the blocks when the
journal grows, so the node learns of the full disk at the append, stops acknowledging, and
says why in its status; the majority commits on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raftpay.client import Client
from raftpay.codes import Code

from cluster_fixtures import local_cluster, node_statuses, wait_until

SMALL_DISK = "3m"


@pytest.fixture
def small_disk_cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs and needs root (CI runs as root)")
    c = local_cluster(tmp_path, 3)
    small = os.path.join(c.data_dir, "n2")
    os.makedirs(small, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", small],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {mount.stderr.strip()}")
    try:
        yield c
    finally:
        c.close()
        subprocess.run(["umount", "-l", small], capture_output=True)


def test_a_node_with_a_full_disk_stops_with_a_reason_and_the_others_go_on(small_disk_cluster):
    c = small_disk_cluster
    # n2 joins once n1 and n3 have a leader, so it is a follower: it learns of its full disk
    # while it handles the leader's appendEntries, outside any tick.
    c.start("n1")
    c.start("n3")
    wait_until(lambda: any(s.get("role") == "leader" for s in node_statuses(c).values()),
               what="a leader among n1 and n3")
    c.start("n2")
    wait_until(lambda: node_statuses(c).get("n2", {}).get("leader_id"), what="n2 to follow")
    with Client(c.seeds, timeout_s=20.0) as client:
        client.create_accounts([{"id": i, "currency": 840} for i in (1, 2)])
        batches = 0

        def full():
            nonlocal batches
            batch = [{"id": batches * 8000 + k + 100, "debit_account_id": 1,
                      "credit_account_id": 2, "amount": 1, "currency": 840}
                     for k in range(8000)]
            assert set(client.create_transfers(batch)) == {Code.OK}
            batches += 1
            rc = c.procs["n2"].poll()
            assert rc is None, f"n2 died (exit {rc}) instead of stopping with a reason"
            return node_statuses(c).get("n2", {}).get("fatal")
        fatal = wait_until(full, timeout_s=120, what="n2's disk to fill up", interval_s=0)
        assert "cannot grow the journal" in fatal and "No space left on device" in fatal
        assert batches * 8000 * 30 > 2 ** 20  # it did take MBs before the disk was full
        # The two others still commit, and n2 acknowledges nothing any more.
        st = wait_until(lambda: (lambda s: s if s.get("n2", {}).get("running") is False
                                 else None)(node_statuses(c)), what="n2 to stop")
        applied = st["n2"]["applied_index"]
        for k in range(3):
            assert client.transfer(f"after-{k}", debit_account_id=1, credit_account_id=2,
                                   amount=1, currency=840) == Code.OK
        st = node_statuses(c)
        assert st["n2"]["applied_index"] == applied
        leader = next(s for s in st.values() if s.get("role") == "leader")
        assert leader["id"] != "n2" and leader["commit_index"] > applied
        assert leader["peers"]["n2"]["match_index"] <= applied
    # What an operator sees first: the table says n2 stopped, and below it why, and that the
    # others have lost their link to it (its Raft is down).
    r = subprocess.run([sys.executable, "-m", "raftpay", "status", "--cluster", c.seeds],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("n2 "))
    assert row.split()[1] == "stopped", r.stdout
    assert "n2: stopped: " in r.stdout and "No space left on device" in r.stdout, r.stdout
    wait_until(lambda: all(f"{n}: no Raft connection to n2" in subprocess.run(
        [sys.executable, "-m", "raftpay", "status", "--cluster", c.seeds], capture_output=True,
        text=True, timeout=60).stdout for n in ("n1", "n3")), what="the others to miss n2")
