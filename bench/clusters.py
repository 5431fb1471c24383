"""Clusters the benchmark starts and tears down itself: real node processes on loopback.

Design.  A `ClusterSpec` names what is measured — the replication `mode`, the node count and the
fsync policy — and `BenchCluster` starts it with free ports in a temporary data dir, answers
"who leads?", kills and restarts nodes, reads their CPU time from /proc, and always stops what it
started.  A mode is only a parameter: `MODES` maps its name to the `LocalCluster` sections that
select it, so the "zk-election" baseline (ZooKeeper elects the leader) plugs in by name once its
server exists; everything else in the harness is the same for every mode.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from raftpay.cli import LocalCluster
from raftpay.client import Client
from raftpay.codes import RaftpayError


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (same approach as tests/cluster_fixtures.py)."""
    import socket
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class ClusterSpec:
    """What to start.  `mode` is a key of `MODES`; `options` carries mode-specific settings (for
    "zk-election": ``zk_hosts``) and, under ``raft``, `RaftConfig` fields as (key, value) pairs
    (``("raft", (("append_backlog_bytes", 2**32),))``)."""

    nodes: int = 3
    fsync: str = "always"
    mode: str = "raft"
    options: tuple = ()  # (key, value) pairs, hashable

    @property
    def label(self) -> str:
        base = f"{self.nodes}n-fsync-{self.fsync}"
        return base if self.mode == "raft" else f"{self.mode}-{base}"

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


def _raft_config(spec: ClusterSpec):
    from raftpay.config import RaftConfig
    return RaftConfig(fsync=spec.fsync, **dict(spec.option("raft", ())))


def _raft_sections(spec: ClusterSpec) -> dict:
    return {"raft": _raft_config(spec)}


def _zk_election_sections(spec: ClusterSpec) -> dict:
    """The ZooKeeper-elected baseline, on the ensemble in the spec's ``zk_hosts`` option:
    `python -m bench` starts a 3-server ensemble of its own unless ``--zk-hosts`` names one.
    The node's own zk-election server does the rest (`raftpay node start` dispatches on
    `[node] mode`)."""
    from raftpay.config import ZkConfig
    hosts = spec.option("zk_hosts")
    if not hosts:
        raise ValueError("mode 'zk-election' needs a ZooKeeper ensemble: pass --zk-hosts "
                         "HOST:PORT[,HOST:PORT...]")
    # A name of its own: the in-sync set lives in ZooKeeper under the cluster's name and
    # outlives the nodes, so a new cluster under an earlier one's name would wait for that
    # one's members to bring back what they committed (as it should, for a real cluster).
    name = f"bench-{spec.label}-{os.urandom(4).hex()}"
    return {"mode": "zk-election", "zk": ZkConfig(hosts=hosts),
            "raft": _raft_config(spec), "name": name}


#: mode name -> function(spec) -> keyword arguments for `LocalCluster` that select the mode.
MODES: dict[str, Callable[[ClusterSpec], dict]] = {
    "raft": _raft_sections,
    "zk-election": _zk_election_sections,
}


def replica_hashes(addr_of: dict[str, str], timeout_s: float = 30.0) -> dict[str, str]:
    """{node id: state hash (16 hex digits)} once every node in `addr_of` (id -> client
    address) answers at one applied index with one hash; at the deadline, what each answered
    last (a node that never answered is missing).  Equal values for every node: the replicas
    agree.

    The nodes are asked at once: an idle leader appends a tick entry every second, and hashing
    a ledger of millions of transfers takes ~0.5 s, so nodes asked one after the other were
    never seen at one index (`bench.stress` reported replicas that did not agree)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(addr: str) -> dict | None:
        try:
            with Client(addr, timeout_s=5, attempt_timeout_s=5) as c:
                return c.status(addr=addr, state_hash=True)
        except RaftpayError:
            return None

    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        applied = {}
        with ThreadPoolExecutor(len(addr_of)) as pool:
            answers = dict(zip(addr_of, pool.map(ask, addr_of.values())))
        for node_id, st in answers.items():
            if st is not None:
                seen[node_id] = st["state_hash"][:16]
                applied[node_id] = st["applied_index"]
        if len(applied) == len(addr_of) and len(set(applied.values())) == 1 \
                and len({seen[n] for n in addr_of}) == 1:
            return seen
        if time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds a process has used so far (Linux /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_mb(pid: int) -> float | None:
    """A process's resident memory in MiB (Linux /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (not idle, not I/O wait), from
    /proc/stat; the difference over a window shows whether other processes shared it."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


class BenchCluster:
    """A started cluster of `spec`.  Use as a context manager; `close()` stops every process
    and removes the data dir.  Blocking; main thread only."""

    def __init__(self, spec: ClusterSpec, data_dir: str | None = None):
        if spec.mode not in MODES:
            raise ValueError(f"unknown mode {spec.mode!r}; known: {', '.join(MODES)}")
        self.spec = spec
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"raftpay-bench-{spec.label}-")
            data_dir = self._tmp.name
        ports = free_ports(2 * spec.nodes)
        pairs = [(ports[2 * i], ports[2 * i + 1]) for i in range(spec.nodes)]
        self.local = LocalCluster(spec.nodes, data_dir, 0, ports=pairs, **MODES[spec.mode](spec))
        self.addr_of = {c.node.id: c.node.client_addr for c in self.local.configs}
        self.id_of = {a: i for i, a in self.addr_of.items()}

    @property
    def seeds(self) -> str:
        return self.local.seeds

    @property
    def data_dir(self) -> str:
        return self.local.data_dir

    def start(self, timeout_s: float = 30.0) -> float:
        """Start every node; returns seconds until a leader answered."""
        t0 = time.monotonic()
        self.local.start()
        self.wait_for_leader(timeout_s)
        return time.monotonic() - t0

    def wait_for_leader(self, timeout_s: float = 30.0) -> str:
        """Blocks until a node says it leads; returns its node id."""
        return self.id_of[self.local.wait_for_leader(timeout_s)]

    def leader(self) -> str | None:
        """The node id that says it leads right now, or None."""
        for node_id, addr in self.addr_of.items():
            if not self.alive(node_id):
                continue
            try:
                with Client(addr, timeout_s=0.5, attempt_timeout_s=0.5) as c:
                    if c.status(addr=addr).get("role") == "leader":
                        return node_id
            except RaftpayError:
                pass
        return None

    def followers(self) -> list[str]:
        lead = self.leader()
        return [n for n in self.addr_of if n != lead and self.alive(n)]

    def status(self, node_id: str, timeout_s: float = 1.0) -> dict | None:
        addr = self.addr_of[node_id]
        try:
            with Client(addr, timeout_s=timeout_s, attempt_timeout_s=timeout_s) as c:
                return c.status(addr=addr)
        except RaftpayError:
            return None

    def alive(self, node_id: str) -> bool:
        p = self.local.procs.get(node_id)
        return p is not None and p.poll() is None

    def pid(self, node_id: str) -> int | None:
        p = self.local.procs.get(node_id)
        return p.pid if p is not None and p.poll() is None else None

    def cpu_s(self) -> dict[str, float | None]:
        """CPU seconds used so far by each running node, and by the whole machine
        (key "_machine")."""
        out = {n: proc_cpu_s(self.pid(n)) if self.pid(n) else None for n in self.addr_of}
        out["_machine"] = machine_busy_s()
        return out

    def sample(self, leader: str | None) -> dict:
        """`cpu_s()` plus the leader's commit index (key "_commit_index"), so a window's
        difference gives Raft entries per second and hence requests per entry."""
        out = self.cpu_s()
        # A leader busy applying an 8k-event entry can take a while to answer.
        st = self.status(leader, timeout_s=3.0) if leader else None
        out["_commit_index"] = st.get("commit_index") if st else None
        return out

    def kill(self, node_id: str) -> None:
        """SIGKILL one node and wait for it to be gone."""
        self.local.kill(node_id, signal.SIGKILL)

    def restart(self, node_id: str) -> None:
        self.local.start(node_id)

    def wait_caught_up(self, timeout_s: float = 30.0) -> bool:
        """Wait until every running node has applied what the leader had committed when this
        was called (a deadline, not a sleep).  Returns False on timeout."""
        deadline = time.monotonic() + timeout_s
        target = None
        while time.monotonic() < deadline:
            lead = self.leader()
            st = self.status(lead) if lead else None
            if st and target is None:
                target = st.get("commit_index", 0)
            if target is not None:
                running = [n for n in self.addr_of if self.alive(n)]
                applied = [(self.status(n) or {}).get("applied_index", -1) for n in running]
                if all(a >= target for a in applied):
                    return True
            time.sleep(0.1)
        return False

    def log_tail(self, node_id: str, lines: int = 20) -> str:
        try:
            with open(self.local.log_path(node_id), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.local.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
