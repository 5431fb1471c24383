"""Raft mode with `[zk] hosts` set: the mirror, seen from ZooKeeper and from a client.

Design: real node processes (Raft mode, whose `serve()` starts a `ZkMirror`) against a real
ZooKeeper of this module's own, because one test stops and restarts it.  An independent kazoo
client plays the operator reading the znodes.  Every wait is a condition polled against a
deadline; the timings printed are observations and the assertions on them are loose bounds.
The point under test is the split of duties: Raft decides, ZooKeeper only learns about it, so
payments neither wait for ZooKeeper nor fail without it.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException

from raftpay.client import AsyncClient, Client
from raftpay.codes import Code
from raftpay.config import ZkConfig
from raftpay.zk import leader_path, members_path
from cluster_fixtures import local_cluster, node_statuses, wait_until
from zk_fixtures import ZkServer, _require_zookeeper

SESSION_MS = 2000


@pytest.fixture(scope="module")
def zk(tmp_path_factory):
    """A standalone ZooKeeper this module may stop and start again (same port and data)."""
    _require_zookeeper()
    server = ZkServer(tmp_path_factory.mktemp("zk-integration"))
    server.start()
    yield server
    server.stop()


def mirrored_cluster(tmp_path, zk, name: str):
    return local_cluster(tmp_path, 3, name=name,
                         zk=ZkConfig(hosts=zk.hosts, session_timeout_ms=SESSION_MS))


@pytest.fixture(scope="module")
def cluster(zk, tmp_path_factory):
    c = mirrored_cluster(tmp_path_factory.mktemp("zki"), zk, "zki")
    c.start()
    c.wait_for_leader()
    yield c
    c.close()


class Observer:
    """An operator's view of the directory; any ZooKeeper trouble reads as "not yet"."""

    def __init__(self, hosts: str, cluster: str):
        self.zk = KazooClient(hosts)
        self.zk.start(timeout=10)
        self.leader_path = leader_path("/raftpay", cluster)
        self.members_path = members_path("/raftpay", cluster)

    def leader(self) -> dict | None:
        try:
            data, _ = self.zk.get(self.leader_path)
            return json.loads(data)
        except (KazooException, ValueError):
            return None

    def members(self) -> dict[str, dict]:
        try:
            return {n: json.loads(self.zk.get(f"{self.members_path}/{n}")[0])
                    for n in self.zk.get_children(self.members_path)}
        except (KazooException, ValueError):
            return {}

    def close(self) -> None:
        self.zk.stop()
        self.zk.close()


def raft_leader(cluster) -> str:
    """The node id Raft says leads (polled until one does)."""
    def find():
        return next((k for k, s in node_statuses(cluster).items() if s["role"] == "leader"),
                    None)
    return wait_until(find, 20, "a Raft leader", interval_s=0.05)


def directory_matches(cluster, observer: Observer, leader: str) -> bool:
    """Both znode kinds agree with the cluster: every running node listed with its client
    address, and /leader naming `leader` at its address."""
    addrs = {c.node.id: c.node.client_addr for c in cluster.configs
             if c.node.id in cluster.procs and cluster.procs[c.node.id].poll() is None}
    members = observer.members()
    rec = observer.leader()
    return ({k: v["client_addr"] for k, v in members.items()} == addrs
            and rec is not None and rec["node_id"] == leader
            and rec["client_addr"] == addrs[leader])


def test_znodes_appear_and_follow_a_killed_leader(zk, tmp_path):
    c = mirrored_cluster(tmp_path, zk, "zki-kill")
    observer = Observer(zk.hosts, "zki-kill")
    started = time.monotonic()
    c.start()
    try:
        leader_addr = c.wait_for_leader()
        elected = time.monotonic()
        leader = next(cfg.node.id for cfg in c.configs if cfg.node.client_addr == leader_addr)
        wait_until(lambda: directory_matches(c, observer, leader), 1.0,
                   "members and leader znodes within a second of the election")
        print(f"\nznodes complete {time.monotonic() - elected:.2f} s after the Raft election "
              f"({time.monotonic() - started:.2f} s after the processes started)")

        killed_at = time.monotonic()
        c.kill(leader)  # kill -9: its session lingers; the new leader's higher term wins
        new = raft_leader(c)
        assert new != leader
        elected_s = time.monotonic() - killed_at
        wait_until(lambda: (observer.leader() or {}).get("node_id") == new, 5.0,
                   "the leader znode to name the new leader")
        print(f"after kill -9 of {leader}: Raft elected {new} in {elected_s:.2f} s, the leader "
              f"znode named it {time.monotonic() - killed_at:.2f} s after the kill")
        # The dead node's member znode goes with its session; restarted, it is back.
        wait_until(lambda: leader not in observer.members(), 10, "the dead member to expire")
        c.start(leader)
        wait_until(lambda: directory_matches(c, observer, new), 20,
                   "the restarted node listed again")
    finally:
        observer.close()
        c.close()


def test_payments_ignore_a_zookeeper_outage(zk, cluster):
    leader = raft_leader(cluster)
    addr = {cfg.node.id: cfg.node.client_addr for cfg in cluster.configs}[leader]
    n = 150

    def pay_loop(cl: Client, prefix: str) -> float:
        t = time.perf_counter()
        for i in range(n):
            assert cl.transfer(f"{prefix}-{i}", "o-a", "o-b", 1, 1) == Code.OK
        return time.perf_counter() - t

    with Client(addr) as cl:
        cl.create_accounts([{"id": "o-a", "currency": 1}, {"id": "o-b", "currency": 1}])
        pay_loop(cl, "warm")
        up_s = pay_loop(cl, "up")
        zk.stop()
        try:
            # Every node's mirror has noticed: what follows runs with ZooKeeper really gone.
            wait_until(lambda: all(not s["zk"]["connected"]
                                   for s in node_statuses(cluster).values()), 10,
                       "the mirrors to see the outage")
            down_s = pay_loop(cl, "down")
        finally:
            zk.start()
        back_at = time.monotonic()
        a, b = cl.lookup_accounts(["o-a", "o-b"])
        assert a["debits_posted"] == 3 * n == b["credits_posted"]
    print(f"\n{n} payments: {up_s:.2f} s with ZooKeeper up, {down_s:.2f} s with it down")
    # Loose on purpose: a shared 2-core machine is noisy.  "Full speed" means the loop is not
    # waiting on ZooKeeper, which would show as seconds, not as a few percent.
    assert down_s < 3 * up_s + 1.0

    observer = Observer(zk.hosts, "zki")
    try:
        wait_until(lambda: directory_matches(cluster, observer, leader)
                   and all(s["zk"]["connected"] and s["zk"]["in_sync"]
                           for s in node_statuses(cluster).values()), 10,
                   "the mirror to be correct again")
        print(f"mirror correct {time.monotonic() - back_at:.2f} s after ZooKeeper returned")
    finally:
        observer.close()


def test_client_from_zookeeper_pays(zk, cluster):
    leader = raft_leader(cluster)
    addr = {cfg.node.id: cfg.node.client_addr for cfg in cluster.configs}[leader]
    observer = Observer(zk.hosts, "zki")
    try:  # after the outage test the directory may still be healing
        wait_until(lambda: directory_matches(cluster, observer, leader), 10, "the directory")
    finally:
        observer.close()
    with Client.from_zookeeper(zk.hosts, "zki") as c:
        assert sorted(c._core.seeds) == sorted(cluster.client_addrs)
        assert c._core.leader == addr
        assert c.create_accounts([{"id": "zc-a", "currency": 1},
                                  {"id": "zc-b", "currency": 1}]) == [Code.OK, Code.OK]
        assert c.transfer("zc-1", "zc-a", "zc-b", 3, 1) == Code.OK

    async def pay_async():
        c = await AsyncClient.from_zookeeper(zk.hosts, "zki")
        try:
            assert c._core.leader == addr
            return await c.transfer("zc-2", "zc-a", "zc-b", 4, 1)
        finally:
            await c.close()

    assert asyncio.run(pay_async()) == Code.OK
    # An unknown cluster is reported as unavailable, not as an empty success.
    from raftpay.codes import Unavailable
    with pytest.raises(Unavailable):
        Client.from_zookeeper(zk.hosts, "no-such-cluster", zk_timeout_s=2.0)
