"""A node cut off from the leader comes back without costing the cluster its leader.

Real node processes, each in its own network namespace (`chaos.netns`), partitions by
iptables; the test process is the client, across the bridge, and reaches every node throughout.

Upstream PySyncObj starts an election with a new term whenever its timer runs out, so a cut-off
follower's term runs ahead and, once the cut heals, its vote request deposes a healthy leader;
a follower cut from the leader alone is elected by the other follower at once, and the two flip
leadership for as long as the cut lasts.  With pre-vote (`raftpay/node.py`) neither happens:
the leader, its term and the clients' writes go on as if nothing had been cut.
"""

from __future__ import annotations

import time

import pytest

from raftpay.client import Client
from raftpay.codes import Code, RaftpayError
from raftpay.config import RaftConfig

from chaos import netns
from chaos.cluster import ChaosCluster

ELECTION_MS = 300
HOLD_S = 12 * ELECTION_MS / 1000  # six to twelve election timeouts of the cut-off node


@pytest.fixture
def cluster(tmp_path):
    reason = netns.available()
    if reason:
        pytest.fail(f"partition tests need network namespaces: {reason} "
                    "(CI runs as root with iproute2 and iptables)")
    c = ChaosCluster(str(tmp_path), topology="netns",
                     raft=RaftConfig(election_timeout_ms=ELECTION_MS, heartbeat_ms=30))
    try:
        c.start()
        yield c
    finally:
        c.close()


class Payer:
    """Transfers one at a time through the client library; counts what did not succeed."""

    def __init__(self, c: ChaosCluster):
        self.client = Client(c.client_addrs, timeout_s=5.0, attempt_timeout_s=1.0)
        self.client.create_accounts([{"id": "a", "currency": 840}, {"id": "b", "currency": 840}])
        self.n = 0
        self.failed: list[str] = []

    def pay(self) -> None:
        self.n += 1
        try:
            code = self.client.transfer(f"t{self.n}", debit_account_id="a",
                                        credit_account_id="b", amount=1, currency=840)
            if code != Code.OK:
                self.failed.append(f"t{self.n}: {code}")
        except RaftpayError as e:
            self.failed.append(f"t{self.n}: {e!r}")

    def close(self) -> None:
        self.client.close()


def _settled(c: ChaosCluster) -> tuple[str, int]:
    """The leader and its term, once every node follows it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = c.statuses(1.0)
        leaders = [nid for nid, s in st.items() if s.get("role") == "leader"]
        if len(st) == c.n and len(leaders) == 1 and all(
                s.get("leader_id") == leaders[0] for s in st.values()):
            return leaders[0], st[leaders[0]]["term"]
        time.sleep(0.1)
    raise AssertionError(f"no settled leader: {c.statuses(1.0)}")


def _hold_and_pay(c: ChaosCluster, payer: Payer, seconds: float, watch: list[dict]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        payer.pay()
        watch.append(c.statuses(0.5))
        time.sleep(0.02)


def _caught_up(c: ChaosCluster, nid: str) -> dict:
    """Statuses once `nid` follows the leader (whichever it is) and applied its commits."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = c.statuses(1.0)
        leader = st.get(nid, {}).get("leader_id")
        if (leader in st and leader != nid
                and st[nid]["applied_index"] >= st[leader]["commit_index"]):
            return st
        time.sleep(0.1)
    raise AssertionError(f"{nid} did not catch up: {c.statuses(1.0)}")


def _one_leadership(watch: list[dict], leader: str, term: int) -> None:
    for st in watch:
        for nid, s in st.items():
            assert s["term"] == term, f"{nid} went to term {s['term']} (was {term}): {st}"
            assert (s["role"] == "leader") == (nid == leader), f"{nid} {s['role']}: {st}"


@pytest.mark.parametrize("cut_from", ["everyone", "the leader alone"])
def test_a_cut_off_follower_costs_no_election(cluster, cut_from):
    """Cut from everyone, the follower rejoins without an election.  Cut from the leader alone,
    it still reaches the other follower, which hears from the leader and so refuses it its
    pre-vote: it does not take over."""
    c = cluster
    leader, term = _settled(c)
    follower = next(nid for nid in c.ids if nid != leader)
    payer = Payer(c)
    try:
        for other in (c.ids if cut_from == "everyone" else [leader]):
            if other != follower:
                c.net.cut(c.index[follower], c.index[other])
        watch: list[dict] = []
        _hold_and_pay(c, payer, HOLD_S, watch)
        # Cut off for many of its election timeouts, it never raised its term.
        assert c.status(follower)["term"] == term
        c.net.heal()
        _hold_and_pay(c, payer, 5 * ELECTION_MS / 1000, watch)
        st = _caught_up(c, follower)
        payer.pay()
    finally:
        payer.close()
    _one_leadership(watch + [st], leader, term)
    assert not payer.failed, payer.failed
    assert payer.n > 20
    assert not c.log_findings()
