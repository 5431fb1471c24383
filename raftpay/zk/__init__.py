"""Optional ZooKeeper integration (the `[zk]` extra).

Design: Raft alone decides who leads and what is committed; ZooKeeper is never on that path.
`ZkMirror` copies each node's view (client address, role, term) into ephemeral znodes so that
operators and clients can find the cluster through a ZooKeeper they already run, and
`LeaderWatch` is the client side of that directory.  A ZooKeeper outage therefore costs
discovery only, never a payment: every ZooKeeper call happens on the mirror's own thread, and
the mirror catches up when ZooKeeper returns.  The layout under `root` (default `/raftpay`):

    /raftpay/<cluster>/members/<node_id>   ephemeral, JSON {node_id, client_addr, role, term}
    /raftpay/<cluster>/leader              ephemeral, JSON {node_id, client_addr, term}

The leader znode is advisory: the holder with the higher Raft term wins, and a stale one may
linger for one session timeout after a crash.  Clients must still follow `not_leader` hints.

kazoo is imported only inside this package, so the core works without the extra.
"""

try:
    import kazoo  # noqa: F401  (probe only; the modules below import what they use)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "raftpay.zk needs kazoo, which is not installed: pip install 'raftpay[zk]'"
    ) from exc

from raftpay.zk.mirror import LeaderWatch, ZkMirror, ZkUnavailable, leader_path, members_path

__all__ = ["LeaderWatch", "ZkMirror", "ZkUnavailable", "leader_path", "members_path"]
