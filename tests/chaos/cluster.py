"""Node processes for chaos runs, in one of three network layouts.

Design.  Like `raftpay.cli.LocalCluster` (one `python -m raftpay node start --config F` process
per node, configs written next to the data), but built for a nemesis: a node can be started
with a skewed wall clock (`RAFTPAY_CLOCK_SKEW_MS`), killed with any signal, paused and resumed,
and the network between nodes is something a test can break.

* ``loopback`` — every node on 127.0.0.1, nothing between them (kills, pauses, clock skew).
* ``proxy`` — every node on 127.0.0.1, each pair's Raft traffic through `proxy.FaultProxy`
  (delays, message loss and duplication, one-way and full partitions).  No cluster secret: the
  proxy reads the connecting node's introduction (see proxy.py).
* ``netns`` — every node in its own network namespace with its own address (`netns.NetnsNet`),
  clients in the root namespace across a bridge (iptables partitions, links down).  Raft
  addresses are not loopback, so there is a cluster secret.

`mode` is the node mode written into the configs ("raft"; "zk-election" also needs `zk_hosts`).
Every wait here is a poll against a deadline.  `close()` ends every process this object started
(by pid), stops the proxy and removes the namespaces; it is safe to call twice.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

from raftpay.cli import init_new_cluster
from raftpay.client import Client
from raftpay.codes import RaftpayError
from raftpay.config import (ClusterConfig, NodeConfig, NodeSection, Peer, RaftConfig, ZkConfig,
                            dump_toml, validate, validate_cluster)

from chaos import netns
from chaos.proxy import FaultProxy, ports_for
from cluster_fixtures import free_ports  # noqa: E402 (one helper for all tests)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPOLOGIES = ("loopback", "proxy", "netns")
SKEW_ENV = "RAFTPAY_CLOCK_SKEW_MS"


def _ports_free(ports) -> bool:
    for p in ports:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        finally:
            s.close()
    return True


class ChaosCluster:
    def __init__(self, out_dir: str, *, nodes: int = 3, topology: str = "netns",
                 mode: str = "raft", seed: int = 0, raft: RaftConfig | None = None,
                 zk_hosts: str = "", name: str = "chaos"):
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology {topology!r}; allowed: {TOPOLOGIES}")
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.n = nodes
        self.topology = topology
        self.mode = mode
        self.ids = [f"n{i}" for i in range(1, nodes + 1)]
        self.index = {nid: i for i, nid in enumerate(self.ids, start=1)}
        self.rng = random.Random(seed)
        self.net: netns.NetnsNet | None = None
        self.proxy: FaultProxy | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.paused: set[str] = set()
        self.skew_ms: dict[str, int] = {}
        self.expected_exit: set[str] = set()  # nodes we stopped or killed on purpose
        self.crashes: list[str] = []  # nodes that exited without being told to
        self.starts = 0
        # (monotonic time, node, term, commit index) of every status that said "leader".
        self.leader_samples: list[tuple] = []
        self.zk = None  # a ZkEnsemble for modes that use one (the nemesis may fault it)
        raft = raft or RaftConfig()
        sections = {"raft": raft}
        if zk_hosts:
            sections["zk"] = ZkConfig(hosts=zk_hosts, session_timeout_ms=2000)
        try:
            self.configs = self._build(sections, name)
        except BaseException:
            self.close()
            raise
        self.paths = {}
        for cfg in self.configs.values():
            path = os.path.join(self.out_dir, f"{cfg.node.id}.toml")
            with open(path, "w") as f:
                f.write(dump_toml(cfg))
            os.chmod(path, 0o600)
            self.paths[cfg.node.id] = path

    # --- building the layout ------------------------------------------------------------------

    def _node(self, i, raft_addr, client_addr, peers, secret, sections, name) -> NodeConfig:
        nid = f"n{i}"
        return NodeConfig(
            node=NodeSection(id=nid, raft_addr=raft_addr, client_addr=client_addr,
                             data_dir=os.path.join(self.out_dir, nid), mode=self.mode),
            cluster=ClusterConfig(name=name, secret=secret, peers=tuple(peers)), **sections)

    def _build(self, sections, name) -> dict[str, NodeConfig]:
        n = self.n
        if self.topology == "loopback":
            ports = free_ports(2 * n)
            peers = [Peer(f"n{i}", f"127.0.0.1:{ports[2 * i - 2]}", f"127.0.0.1:{ports[2 * i - 1]}")
                     for i in range(1, n + 1)]
            cfgs = [self._node(i, p.raft_addr, p.client_addr, peers, "", sections, name)
                    for i, p in enumerate(peers, start=1)]
            validate_cluster(cfgs)
        elif self.topology == "netns":
            reason = netns.available()
            if reason:
                raise RuntimeError(reason)
            netns.sweep_stale()
            self.net = netns.NetnsNet(n).up()
            peers = [Peer(f"n{i}", f"{self.net.addr(i)}:7000", f"{self.net.addr(i)}:7100")
                     for i in range(1, n + 1)]
            secret = secrets.token_hex(16)
            cfgs = [self._node(i, p.raft_addr, p.client_addr, peers, secret, sections, name)
                    for i, p in enumerate(peers, start=1)]
            validate_cluster(cfgs)
        else:
            plan = None
            for _ in range(50):
                base = self.rng.randrange(20000, 60000 - 100 * n, 100)
                cand = ports_for(base, n)
                listen = [cand["name"][i][j] for i in cand["name"] for j in cand["name"][i]
                          if j < i]
                if _ports_free(list(cand["raft"].values()) + list(cand["client"].values())
                               + listen):
                    plan = cand
                    break
            if plan is None:
                raise RuntimeError("no free port plan for the proxy layout")
            cfgs = []
            for i in range(1, n + 1):
                peers = [Peer(f"n{j}",
                              f"127.0.0.1:{plan['raft'][i] if j == i else plan['name'][i][j]}",
                              f"127.0.0.1:{plan['client'][j]}") for j in range(1, n + 1)]
                cfg = self._node(i, f"127.0.0.1:{plan['raft'][i]}",
                                 f"127.0.0.1:{plan['client'][i]}", peers, "", sections, name)
                validate(cfg)  # each node has its own view of its peers' addresses
                cfgs.append(cfg)
            self.proxy = FaultProxy(seed=self.rng.randrange(2 ** 32))
            for i in range(1, n + 1):
                for j in range(1, i):
                    self.proxy.add_pair(i, j, plan["name"][i][j], plan["raft"][j],
                                        f"127.0.0.1:{plan['raft'][i]}",
                                        f"127.0.0.1:{plan['name'][j][i]}")
            self.proxy.start()
        return {c.node.id: c for c in cfgs}

    # --- addresses ----------------------------------------------------------------------------

    def client_addr(self, nid: str) -> str:
        return self.configs[nid].node.client_addr

    @property
    def client_addrs(self) -> list[str]:
        return [self.client_addr(nid) for nid in self.ids]

    # --- processes ----------------------------------------------------------------------------

    def alive(self, nid: str) -> bool:
        p = self.procs.get(nid)
        return p is not None and p.poll() is None

    def start(self, nid: str | None = None, skew_ms: int | None = None) -> None:
        """Start one node (or every node not running).  `skew_ms` sets the node's clock skew
        from now on (None keeps the last one)."""
        init_new_cluster(list(self.configs.values()), self.paths)  # the first start makes dirs
        for node_id in ([nid] if nid else self.ids):
            if self.alive(node_id):
                continue
            if skew_ms is not None:
                self.skew_ms[node_id] = skew_ms
            skew = self.skew_ms.get(node_id, 0)
            env = dict(os.environ)
            env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
            env.pop(SKEW_ENV, None)
            if skew:
                env[SKEW_ENV] = str(skew)
            prefix = self.net.exec_prefix(self.index[node_id]) if self.net else []
            log_path = os.path.join(self.out_dir, f"{node_id}.log")
            with open(log_path, "ab") as log:
                log.write(f"=== chaos: start {node_id} at {time.time():.3f} skew_ms={skew}\n"
                          .encode())
                log.flush()
                self.procs[node_id] = subprocess.Popen(
                    prefix + [sys.executable, "-m", "raftpay", "-v", "node", "start", "--config",
                              self.paths[node_id]],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                    cwd=REPO)
            self.expected_exit.discard(node_id)
            self.paused.discard(node_id)
            self.starts += 1

    def send_signal(self, nid: str, sig: int) -> None:
        p = self.procs.get(nid)
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, nid: str, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        """Kill one node and reap it (a paused node is resumed first for anything but
        SIGKILL, so it can act on the signal)."""
        p = self.procs.get(nid)
        if p is None or p.poll() is not None:
            return
        self.expected_exit.add(nid)
        if sig != signal.SIGKILL and nid in self.paused:
            p.send_signal(signal.SIGCONT)
        p.send_signal(sig)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        self.paused.discard(nid)

    def stop(self, nid: str, grace_s: float = 8.0) -> None:
        self.kill(nid, signal.SIGTERM, grace_s)

    def pause(self, nid: str) -> None:
        if self.alive(nid):
            self.send_signal(nid, signal.SIGSTOP)
            self.paused.add(nid)

    def resume(self, nid: str) -> None:
        if nid in self.paused:
            self.send_signal(nid, signal.SIGCONT)
            self.paused.discard(nid)

    def check_crashes(self) -> list[str]:
        """Nodes that exited though nobody told them to (each reported once)."""
        new = []
        for nid, p in self.procs.items():
            if p.poll() is not None and nid not in self.expected_exit:
                self.expected_exit.add(nid)
                msg = f"{nid} exited by itself with code {p.returncode}"
                self.crashes.append(msg)
                new.append(msg)
        return new

    # --- asking the nodes ---------------------------------------------------------------------

    def status(self, nid: str, timeout_s: float = 1.0) -> dict | None:
        if not self.alive(nid) or nid in self.paused:
            return None
        addr = self.client_addr(nid)
        try:
            with Client(addr, timeout_s=timeout_s, attempt_timeout_s=timeout_s) as c:
                return c.status(addr=addr, state_hash=True)
        except (RaftpayError, OSError):
            return None

    def statuses(self, timeout_s: float = 1.0) -> dict[str, dict]:
        """Every reachable node's status.  Also notes who claims to lead in which term, for
        the election-safety check (Raft: at most one leader per term); see `leaders_by_term`."""
        out = {}
        for nid in self.ids:
            st = self.status(nid, timeout_s)
            if st is not None:
                out[nid] = st
                if st.get("role") == "leader":
                    self.leader_samples.append((time.monotonic(), nid, st.get("term"),
                                                st.get("commit_index")))
        return out

    def leaders_by_term(self, since: int = 0) -> dict:
        """term -> {node: number of samples (from sample `since` on) that showed it leading in
        that term}.

        One sample alone proves little: `status()` reads role and term without the Raft
        thread's cooperation, and a leader stepping down for a higher term sets the term
        before the (fsynced) meta write and the role after it, so a status served in between
        says "leader" with the next term.  A claim seen in two separate samples is a
        leadership that lasted at least one sampling interval."""
        out: dict = {}
        for _, nid, term, _ in self.leader_samples[since:]:
            d = out.setdefault(term, {})
            d[nid] = d.get(nid, 0) + 1
        return out

    def watch(self) -> None:
        """One sample of every node's view (called while a fault is held)."""
        self.check_crashes()
        self.statuses(0.5)

    def leader(self, timeout_s: float = 1.0) -> str | None:
        """The node that reports itself leader in the highest term, if any answers."""
        st = self.statuses(timeout_s)
        leaders = [(s.get("term", 0), nid) for nid, s in st.items() if s.get("role") == "leader"]
        return max(leaders)[1] if leaders else None

    def wait_for_leader(self, timeout_s: float = 30.0) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            nid = self.leader(0.5)
            if nid is not None:
                return nid
            time.sleep(0.1)
        return None

    def converge(self, timeout_s: float = 30.0) -> tuple[dict, bool]:
        """Poll until every running node reports the same applied index and state hash."""
        deadline = time.monotonic() + timeout_s
        st: dict = {}
        while time.monotonic() < deadline:
            running = [nid for nid in self.ids if self.alive(nid) and nid not in self.paused]
            st = self.statuses(1.0)
            if len(st) == len(running) and st:
                applied = {s.get("applied_index") for s in st.values()}
                hashes = {s.get("state_hash") for s in st.values()}
                if len(applied) == 1 and len(hashes) == 1:
                    return st, True
            time.sleep(0.2)
        return st, False

    def log_findings(self) -> list[str]:
        """Lines in the node logs that an operator must look at."""
        out = []
        pat = re.compile(r"CRITICAL|FatalNodeError|Traceback|truncating", re.I)
        for nid in self.ids:
            path = os.path.join(self.out_dir, f"{nid}.log")
            if not os.path.exists(path):
                continue
            with open(path, errors="replace") as f:
                for line in f:
                    if pat.search(line):
                        out.append(f"{nid}: {line.rstrip()[:300]}")
        return out

    # --- the end --------------------------------------------------------------------------------

    def close(self) -> None:
        for nid in list(self.paused):
            self.send_signal(nid, signal.SIGCONT)
        self.paused.clear()
        for nid, p in list(self.procs.items()):
            if p.poll() is None:
                self.expected_exit.add(nid)
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.net is not None:
            self.net.close()
            self.net = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["ChaosCluster", "TOPOLOGIES"]
