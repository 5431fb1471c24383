"""Real node processes on loopback for tests: free ports, deadlines, no sleeps as synchronisation."""

from __future__ import annotations

import time
from typing import Callable

from bench.clusters import free_ports  # one copy, shared with the harness and the soak
from raftpay.cli import LocalCluster
from raftpay.client import Client
from raftpay.codes import RaftpayError


def local_cluster(tmp_path, nodes: int = 3, **sections) -> LocalCluster:
    ports = free_ports(2 * nodes)
    pairs = [(ports[2 * i], ports[2 * i + 1]) for i in range(nodes)]
    return LocalCluster(nodes, str(tmp_path), 0, ports=pairs, **sections)


def free_addrs(n: int) -> list[str]:
    """n distinct free loopback addresses, picked together: picked one at a time, two could
    be the same port (the kernel hands a closed one out again)."""
    return [f"127.0.0.1:{p}" for p in free_ports(n)]


def free_addr() -> str:
    return free_addrs(1)[0]


def wait_until(cond: Callable[[], object], timeout_s: float = 15.0, what: str = "condition",
               interval_s: float = 0.02):
    """Poll `cond` until it returns something truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (RaftpayError, OSError) as e:
            last_exc = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


def node_statuses(cluster: LocalCluster) -> dict[str, dict]:
    out = {}
    for cfg in cluster.configs:
        if cfg.node.id not in cluster.procs or cluster.procs[cfg.node.id].poll() is not None:
            continue
        try:
            with Client(cfg.node.client_addr, timeout_s=1, attempt_timeout_s=1) as c:
                out[cfg.node.id] = c.status(addr=cfg.node.client_addr, state_hash=True)
        except RaftpayError:
            pass
    return out


def converged_hashes(cluster: LocalCluster, timeout_s: float = 20.0) -> dict[str, str]:
    """Wait until every running node has applied the same index, then return their hashes."""

    def same():
        st = node_statuses(cluster)
        running = [c.node.id for c in cluster.configs
                   if c.node.id in cluster.procs and cluster.procs[c.node.id].poll() is None]
        if len(st) != len(running):
            return None
        applied = {s["applied_index"] for s in st.values()}
        hashes = {s["state_hash"] for s in st.values()}
        if len(applied) == 1 and len(hashes) == 1:
            return {k: s["state_hash"] for k, s in st.items()}
        return None

    return wait_until(same, timeout_s, "replicas to converge on one applied index and hash",
                      interval_s=0.2)


def assert_wrong_port_answered(cluster: LocalCluster, port: str, account: str) -> None:
    """A client given node 1's raft_addr (its `port`, as the node's message names it) is
    answered `invalid_request` at once, naming the client port, and `account` is not made."""
    from raftpay.codes import Code
    cfg = cluster.configs[0]
    t0 = time.monotonic()
    try:
        with Client(cfg.node.raft_addr, timeout_s=10) as c:
            c.create_accounts([{"id": account, "currency": 1}])
    except RaftpayError as e:
        error = e
    else:
        raise AssertionError(f"{cfg.node.raft_addr} took a request")
    assert time.monotonic() - t0 < 5
    assert getattr(error, "code", None) == Code.INVALID_REQUEST and str(error).endswith(
        f"node {cfg.node.id}'s {port}, for its peers; nothing was applied. Clients connect to "
        f"its client_addr, {cfg.node.client_addr}"), str(error)
    with Client(cluster.seeds) as c:
        assert c.lookup_accounts([account]) == [None]
