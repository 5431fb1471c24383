#!/usr/bin/env python3
"""Reproduce a finding of the chaos suite: a deposed leader's `status` says "leader" with the
new leader's term.

What happens.  A leader that learns of a higher term (here: it was paused, the others elected a
new leader, and it is resumed) runs upstream's `__setCurrentTerm(new_term)` — which sets the
term, then writes and fsyncs the meta file, releasing the GIL — and only afterwards
`__setState(FOLLOWER)`.  `Node.status()` reads role and term from the server thread without the
Raft thread, so a status served in between reports role "leader" in the *new* term, in which
another node is the leader: two leaders in one term, as far as `status` can tell.  Writes and
reads are not affected (the Raft thread decides them), but anything that takes "who leads" from
`status` or `is_leader()` (the election-safety monitor here, `wait_for_leader`, leader hints)
can see it.  A possible fix in raftpay/node.py: read role and term together from a snapshot the
Raft thread publishes once per tick, as `_published_log` does for the log.

    python tests/chaos/status_race.py [--rounds 12]

Prints, per round, how many of ~2,000 status samples of the old leader taken right after it is
resumed said "leader" with the new term; exits 1 if any did.  Loopback only; about 30 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from chaos.cluster import ChaosCluster  # noqa: E402
from raftpay.client import Client  # noqa: E402
from raftpay.codes import RaftpayError  # noqa: E402


def new_leader(c: ChaosCluster, old: str, old_term: int, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for nid in c.ids:
            if nid == old:
                continue
            st = c.status(nid, 0.5)
            if st and st.get("role") == "leader" and st["term"] > old_term:
                return nid, st["term"]
        time.sleep(0.05)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    total = 0
    with tempfile.TemporaryDirectory(prefix="raftpay-status-race-") as d:
        with ChaosCluster(d, topology="loopback", seed=3) as c:
            c.start()
            if c.wait_for_leader(30) is None:
                print("no leader")
                return 2
            for rnd in range(args.rounds):
                old = c.leader()
                term = c.status(old)["term"]
                c.pause(old)
                new = new_leader(c, old, term)
                addr = c.client_addr(old)
                samples = []
                with Client(addr, timeout_s=2, attempt_timeout_s=2) as cl:
                    c.resume(old)
                    end = time.monotonic() + 1.5
                    while time.monotonic() < end:
                        try:
                            st = cl.status(addr=addr)
                            samples.append((st["role"], st["term"]))
                        except RaftpayError:
                            pass
                bad = [s for s in samples if new and s[0] == "leader" and s[1] >= new[1]]
                total += len(bad)
                print(f"round {rnd}: {old} led term {term}; {new and new[0]} leads term "
                      f"{new and new[1]}; {len(bad)} of {len(samples)} samples of {old} said "
                      f"leader in term >= {new and new[1]}", flush=True)
    print(f"{total} samples showed a second leader in the new term")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
