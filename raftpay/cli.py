"""The `raftpay` command line.

Design: one click group whose entry points users and docs rely on — `up` (a local cluster in the
foreground), `demo` (the same plus a payment flow, then stop), `node init` (a new node's data
dir, once) and `node start` (one node from a config file), `status`, `account create|show`,
`transfer`, `history`, `logs merge`.  Help text says why, not only what (rqlite `flags.toml`).

Exit codes are for scripts: 0 success; 1 the ledger refused an event (its code is printed);
2 usage or configuration error; 3 the cluster could not be reached (nothing was applied);
4 outcome unknown (it may have been applied: run the same command again, ids make it safe);
5 the request was rejected as malformed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import click

from . import codes
from .codes import Code

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_UNKNOWN, EXIT_REJECTED = range(6)

_cluster_option = click.option(
    "--cluster", envvar="RAFTPAY_CLUSTER", metavar="HOST:PORT,...",
    help="Client addresses of some nodes (any will do: the client finds the leader). "
         "Default: $RAFTPAY_CLUSTER.")


def _client(cluster: str | None, timeout_s: float = 10.0):
    from .client import Client
    try:
        return Client(cluster, timeout_s=timeout_s)
    except ValueError as e:
        raise click.UsageError(str(e))


def _run_client(fn):
    """Map client exceptions onto exit codes with a message a person can act on."""
    try:
        return fn()
    except codes.OutcomeUnknown as e:
        click.echo(f"outcome unknown: {e}", err=True)
        sys.exit(EXIT_UNKNOWN)
    except codes.Unavailable as e:
        click.echo(f"cluster unavailable (nothing was applied): {e}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except codes.RequestRejected as e:
        click.echo(f"rejected: {e}", err=True)
        sys.exit(EXIT_REJECTED)
    except codes.ProtocolError as e:  # answered, but not in a way this client can read
        click.echo(f"outcome unknown, the reply was not understood: {e}", err=True)
        sys.exit(EXIT_UNKNOWN)
    except ValueError as e:  # refused by the client before sending (e.g. an int over 2**64-1)
        click.echo(f"invalid input: {e}", err=True)
        sys.exit(EXIT_USAGE)


def _id(text: str):
    """Ids typed at a shell: ASCII digits are integer ids, anything else a string id.  What no
    account or transfer can have (empty, 0, past 2**64-1, over 64 UTF-8 bytes, bytes that are
    not UTF-8) is a usage error here, not a lookup that answers "not found"."""
    from .ledger import MAX_ID_BYTES, MAX_U64
    if text.isascii() and text.isdigit():  # not "²": int() refuses it
        value = int(text)
        ok = 0 < value <= MAX_U64
    else:
        value = text
        try:
            ok = 0 < len(text.encode("utf-8")) <= MAX_ID_BYTES
        except UnicodeEncodeError:  # argv bytes that were not UTF-8 (surrogate-escaped)
            ok = False
    if not ok:
        raise click.UsageError(f"{text!r} is not an id: ids are integers 1..2**64-1 or text "
                               f"of 1 to {MAX_ID_BYTES} UTF-8 bytes")
    return value


_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level to stderr.")
def main(verbose: bool) -> None:
    """raftpay: a payment ledger replicated with Raft, with no outside coordinator."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=_LOG_FORMAT)


def _log_as(node_id: str) -> None:
    """Put the node's id in every line this process logs, after the time: the Raft adapter's and
    the engine's messages do not name the node, and logs of several replicas end up side by side.
    (Config validation keeps ids to letters, digits, '_' and '-', so the id is safe in a format.)"""
    fmt = logging.Formatter(_LOG_FORMAT.replace("%(name)s", f"{node_id} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)


# --- running nodes ------------------------------------------------------------------------------

@main.group()
def node() -> None:
    """Run a node."""


def _load_or_exit(config_path: str, doing: str = "start"):
    from .config import ConfigError, load
    try:
        return load(config_path)
    except (ConfigError, OSError) as e:
        click.echo(f"refusing to {doing}: {e}", err=True)
        sys.exit(EXIT_USAGE)


@node.command("init")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The node's TOML config (see configs/).")
@click.option("--rejoin", is_flag=True,
              help="For a node of a running cluster that lost its data (a new disk): it does "
                   "not vote or stand for leader until it holds what the cluster committed.")
def node_init(config_path: str, rejoin: bool) -> None:
    """Make a new node's data dir, once, before its first `node start`.

    A node starts only on a dir made for it: one that lost its data must come back with
    --rejoin, not as a new node (README, "A node that lost its data").  Refused (exit 1) if the
    dir already belongs to a node or holds a node's files, or, without --rejoin, if a peer
    already runs the cluster with a log."""
    from .node import FatalNodeError, data_dir_state, init_data_dir
    cfg = _load_or_exit(config_path, "initialize")
    if rejoin and len(cfg.cluster.peers) == 1:
        # It would wait for ever for a leader to catch up from; there is nobody to ask.
        click.echo("refusing to initialize: --rejoin catches up from the other nodes, and "
                   "this cluster has none (a one-node cluster that lost its data starts anew "
                   "with `raftpay node init`)", err=True)
        sys.exit(EXIT_USAGE)
    cluster = None if rejoin else _cluster_id(cfg)
    running = None if rejoin or data_dir_state(cfg.node.data_dir) != "empty" else \
        _running_peer(cfg, cluster)
    if running:
        click.echo(f"refusing to initialize: {running} already runs this cluster with a log. A "
                   f"node that joins it with an empty dir, new or one that lost its data, "
                   f"must not vote before it holds what the cluster committed (an empty log's "
                   f"vote can elect a leader that lacks it): make it with `raftpay node init "
                   f"--rejoin --config {config_path}`", err=True)
        sys.exit(EXIT_REFUSED)
    try:
        init_data_dir(cfg.node.data_dir, cfg.node.id, cluster,
                      sync=cfg.raft.fsync == "always", rejoin=rejoin)
    except (FatalNodeError, OSError) as e:
        click.echo(f"refusing to initialize: {e}", err=True)
        sys.exit(EXIT_REFUSED)
    how = (" to rejoin: it votes again once it holds what the cluster committed, and takes "
           "its peers' cluster id" if rejoin else f" in cluster {cfg.cluster.name!r} (id "
           f"{cluster})")
    click.echo(f"data dir {cfg.node.data_dir} is node {cfg.node.id}'s{how}; start it with "
               f"`raftpay node start --config {config_path}`")


@node.command("start")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The node's TOML config (see configs/).")
def node_start(config_path: str) -> None:
    """Run one node from a config file, in the foreground, until SIGTERM or Ctrl-C.

    The config is checked first: a node with a bad config refuses to start and says which key is
    wrong and what is allowed (exit code 2)."""
    cfg = _load_or_exit(config_path)
    _log_as(cfg.node.id)
    from .node import FatalNodeError
    fatal: tuple[type[Exception], ...] = (FatalNodeError,)
    if cfg.node.mode == "zk-election":
        try:
            from .zk.baseline import FatalNodeError as ZkFatalNodeError
            from .zk.baseline import serve
        except ImportError as e:
            click.echo(f"refusing to start: zk-election mode is not available: {e}", err=True)
            sys.exit(EXIT_USAGE)
        fatal += (ZkFatalNodeError,)
    else:
        from .server import serve
    ready = []
    try:
        asyncio.run(serve(cfg, on_ready=ready.append))
    except fatal as e:
        # Only a start raises it (a node that fails later stops Raft, or leaves the election,
        # and says why in its status): a data dir it cannot trust or that another node holds,
        # a snapshot that does not load.
        click.echo(f"refusing to start: {e}", err=True)
        sys.exit(EXIT_REFUSED)
    except OSError as e:
        if ready:
            raise
        # What the machine refuses before the node serves: a port another process holds, a
        # data dir that is a file or cannot be made.
        click.echo(f"refusing to start: {e}", err=True)
        sys.exit(EXIT_REFUSED)


class PortsInUse(RuntimeError):
    """A port a local cluster's node needs is taken (by another cluster, most likely)."""


class DataMissing(RuntimeError):
    """Some nodes of a local cluster have data and others none: a node that lost its data
    comes back with `raftpay node init --rejoin`, not as a new node
    (`raftpay.node.NOT_INITIALIZED`)."""


def init_new_cluster(configs, paths: dict[str, str] | None = None) -> bool:
    """Make every node's data dir (`raftpay.node.init_data_dir`) if none holds a node's data:
    a new cluster, which is the only time a local cluster makes them; True if it did.  Raises
    `DataMissing`, making nothing, if some hold data and some do not."""
    from .node import data_dir_state, init_data_dir
    states = {cfg.node.id: data_dir_state(cfg.node.data_dir) for cfg in configs}
    empty = [i for i, state in states.items() if state == "empty"]
    if not empty:
        return False
    if len(empty) < len(states):
        others = [i for i in states if i not in empty]
        how = "; ".join(f"`raftpay node init --rejoin --config {(paths or {}).get(i, '...')}`"
                        for i in empty)
        raise DataMissing(
            f"{', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no data while "
            f"{', '.join(others)} {'has' if len(others) == 1 else 'have'} some: a node that "
            f"lost its data comes back with {how} (README, 'A node that lost its data')")
    for cfg in configs:
        init_data_dir(cfg.node.data_dir, cfg.node.id, _cluster_id(cfg),
                      sync=cfg.raft.fsync == "always")
    return True


def _cluster_id(cfg) -> str:
    """The cluster a new node's dir is made for, from its config (`raftpay.node.cluster_id`)."""
    from .node import cluster_id
    return cluster_id(cfg.cluster.name, [p.id for p in cfg.cluster.peers])


def _running_peer(cfg, cluster: str) -> str | None:
    """A peer of `cfg`'s node that answers status with a log (its commit index past 0) for
    this cluster: "n1 (commit index 12)", or None if none does within a second each (a new
    cluster whose nodes are made before any starts)."""
    for peer in cfg.other_peers:
        try:
            st = _node_status(peer.client_addr, 1.0)
        except codes.RaftpayError:
            continue
        commit = st.get("commit_index")
        if st.get("cluster", cluster) == cluster and isinstance(commit, int) and commit > 0:
            return f"{st.get('id', peer.id)} (commit index {commit})"
    return None


def _port_taken(addr: str) -> bool:
    """True if nothing could listen on `addr` now (another process does).  SO_REUSEADDR as the
    node's own listeners have, so a port left in TIME_WAIT by a stopped node counts as free."""
    from .config import parse_addr
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(parse_addr(addr))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


class LocalCluster:
    """N node processes on loopback, for `up`, `demo`, tests and benchmarks.

    Writes one config per node into `data_dir`, starts `python -m raftpay node start` for each,
    and stops them with SIGTERM (SIGKILL after a grace period)."""

    def __init__(self, nodes: int = 3, data_dir: str | None = None, base_port: int = 7001,
                 secret: str | None = None, ports=None, **sections):
        from .config import dump_toml, make_local_cluster
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="raftpay-")
            data_dir = self._tmp.name
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.secret = secret if secret is not None else secrets.token_hex(16)
        self.configs = make_local_cluster(nodes, base_port, self.data_dir, self.secret,
                                          ports=ports, **sections)
        self.paths = []
        for cfg in self.configs:
            path = os.path.join(self.data_dir, f"{cfg.node.id}.toml")
            with open(path, "w") as f:
                f.write(dump_toml(cfg))
            os.chmod(path, 0o600)  # it holds the cluster secret
            self.paths.append(path)
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def client_addrs(self) -> list[str]:
        return [c.node.client_addr for c in self.configs]

    @property
    def seeds(self) -> str:
        return ",".join(self.client_addrs)

    def log_path(self, node_id: str) -> str:
        """Where a node's stdout and stderr (its log) go."""
        return os.path.join(self.data_dir, f"{node_id}.log")

    def start(self, node_id: str | None = None, env: dict[str, dict[str, str]] | None = None,
              prefix: dict[str, list[str]] | None = None) -> None:
        """Start every node (or one).  `env` adds environment variables per node id (the test
        hooks, e.g. RAFTPAY_CLOCK_SKEW_MS); `prefix` wraps a node's command (e.g.
        `ip netns exec NS`).  Raises `PortsInUse`, starting nothing, if a port of theirs is
        taken: a node would fail to bind it, and a client would find the cluster holding it.
        Makes the nodes' data dirs for a new cluster (`init_new_cluster`; `DataMissing` if only
        some have none)."""
        starting = [(cfg, path) for cfg, path in zip(self.configs, self.paths)
                    if not node_id or cfg.node.id == node_id]
        taken = [f"{addr} ({cfg.node.id} {kind})" for cfg, _ in starting
                 for kind, addr in (("raft", cfg.node.raft_addr),
                                    ("client", cfg.node.client_addr))
                 if not (prefix or {}).get(cfg.node.id) and _port_taken(addr)]
        if taken:
            raise PortsInUse(f"{', '.join(taken)} in use: another cluster on these ports? "
                             f"Stop it, or pick another --base-port")
        init_new_cluster(self.configs, dict(zip((c.node.id for c in self.configs), self.paths)))
        for cfg, path in starting:
            log = open(self.log_path(cfg.node.id), "ab")
            self.procs[cfg.node.id] = subprocess.Popen(
                [*(prefix or {}).get(cfg.node.id, []), sys.executable, "-m", "raftpay", "-v",
                 "node", "start", "--config", path],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {}).get(cfg.node.id, {})})
            log.close()

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(node_id)
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def stop(self, grace_s: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def wait_for_leader(self, timeout_s: float = 20.0) -> str:
        """Blocks until a node reports itself leader; returns its client address."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for addr in self.client_addrs:
                try:
                    if _node_status(addr, 0.5).get("role") == "leader":
                        return addr
                except codes.RaftpayError:
                    pass
                for node_id, proc in self.procs.items():
                    if proc.poll() is not None and proc.returncode not in (0, -9, -15):
                        raise RuntimeError(f"node {node_id} exited with {proc.returncode}; "
                                           f"see {self.data_dir}/{node_id}.log")
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout_s} s; logs in {self.data_dir}")

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@main.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Cluster size; 3 survives one failure, 5 survives two.")
@click.option("--data-dir", default="data/local", show_default=True,
              help="Where node configs, journals and logs go.  Reusing it restarts the same "
                   "cluster with its state.")
@click.option("--base-port", default=7001, show_default=True, type=click.IntRange(1, 65000),
              help="Raft ports are base..base+N-1, client ports base+100...")
@click.option("--fsync", type=click.Choice(["always", "never"]), default="always",
              show_default=True,
              help="'always' persists each entry before it counts towards a commit; 'never' "
                   "survives a process kill but not a power loss.")
def up(nodes: int, data_dir: str, base_port: int, fsync: str) -> None:
    """Run a local cluster in the foreground until Ctrl-C.  No ZooKeeper needed.

    A cluster secret (node-to-node encryption) is generated on first start and kept in the data
    dir's node configs."""
    from .config import RaftConfig
    secret = _existing_secret(data_dir)
    cluster = LocalCluster(nodes, data_dir, base_port, secret, raft=RaftConfig(fsync=fsync))
    _start_or_exit(cluster)
    try:
        leader = cluster.wait_for_leader()
        click.echo(f"raftpay: {nodes} nodes up; leader at {leader}")
        for cfg in cluster.configs:
            click.echo(f"  {cfg.node.id}  client {cfg.node.client_addr}  raft "
                       f"{cfg.node.raft_addr}  data {cfg.node.data_dir}")
        click.echo(f"\nexport RAFTPAY_CLUSTER={cluster.seeds}\nCtrl-C stops the cluster.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(0.5)
        for node_id, p in cluster.procs.items():
            if p.poll() is not None:
                click.echo(f"node {node_id} exited with code {p.returncode} (its log: "
                           f"{cluster.log_path(node_id)}); stopping the cluster", err=True)
        sys.exit(EXIT_REFUSED)  # `finally` stops the others
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        cluster.stop()


def _start_or_exit(cluster: "LocalCluster") -> None:
    try:
        cluster.start()
    except (PortsInUse, DataMissing) as e:
        click.echo(f"not starting: {e}", err=True)
        cluster.close()
        sys.exit(EXIT_USAGE)


def _existing_secret(data_dir: str) -> str | None:
    path = os.path.join(data_dir, "n1.toml")
    if not os.path.exists(path):
        return None
    from .config import load
    try:
        return load(path).cluster.secret or None
    except Exception:
        return None


@main.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--base-port", default=7001, show_default=True, type=click.IntRange(1, 65000))
def demo(nodes: int, base_port: int) -> None:
    """Start a local cluster, show a payment flowing, stop.

    Creates two accounts, pays, retries the same payment id (answered `exists`, nothing moves
    twice), and reads the balances, then stops the cluster."""
    from .client import Client
    with LocalCluster(nodes, None, base_port) as cluster:
        _start_or_exit(cluster)
        click.echo(f"starting {nodes} nodes on loopback...")
        leader = cluster.wait_for_leader()
        click.echo(f"leader elected: {leader}\n")
        with Client(cluster.seeds) as c:
            def show(what, result):
                click.echo(f"  {what:<52} -> {codes.name(result)}")

            show("create account alice (USD=840, no overdraft)",
                 c.create_account("alice", 840, flags=["debits_must_not_exceed_credits"]))
            show("create account bob (USD=840)", c.create_account("bob", 840))
            show("create account bank (USD=840)", c.create_account("bank", 840))
            show("deposit 100.00 bank -> alice (id dep-1)",
                 c.transfer("dep-1", "bank", "alice", 10000, 840))
            show("pay 25.00 alice -> bob (id pay-1)", c.transfer("pay-1", "alice", "bob", 2500, 840))
            show("retry the same payment (id pay-1)",
                 c.transfer("pay-1", "alice", "bob", 2500, 840))
            show("same id, different amount (id pay-1)",
                 c.transfer("pay-1", "alice", "bob", 9900, 840))
            show("pay 500.00 alice -> bob (id pay-2): too much",
                 c.transfer("pay-2", "alice", "bob", 50000, 840))
            click.echo("\nbalances (linearizable read):")
            for a in c.lookup_accounts(["alice", "bob", "bank"]):
                click.echo(f"  {a['id']:<6} credits {a['credits_posted'] / 100:>8.2f}  "
                           f"debits {a['debits_posted'] / 100:>8.2f}  "
                           f"balance {(a['credits_posted'] - a['debits_posted']) / 100:>8.2f}")
        click.echo("\nstopping the cluster.")


# --- status -------------------------------------------------------------------------------------

@main.command()
@_cluster_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(cluster: str | None, as_json: bool) -> None:
    """A table of nodes: role, term, commit and applied index, lag, address.

    One node's address is enough: every node names its cluster's members, and each is asked."""
    from .client import parse_seeds
    try:
        addrs = parse_seeds(cluster)
    except ValueError as e:
        raise click.UsageError(str(e))
    rows = _status_rows(addrs)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        leader_commit = max((r.get("commit_index", 0) for r in rows), default=0)
        click.echo(f"{'node':<6}{'role':<12}{'term':>6}{'commit':>10}{'applied':>10}"
                   f"{'lag':>8}{'clock offset':>16}  address")
        for r in rows:
            lag = leader_commit - r["applied_index"] if "applied_index" in r else ""
            role = "stopped" if r.get("running") is False else r.get("role", "?")
            click.echo(f"{str(r.get('id', '?')):<6}{role:<12}"
                       f"{str(r.get('term', '')):>6}{str(r.get('commit_index', '')):>10}"
                       f"{str(r.get('applied_index', '')):>10}{str(lag):>8}"
                       f"{_clock_text(r.get('clock')):>16}  {r['address']}")
        for line in _status_problems(rows):
            click.echo(line)
    if all(r.get("role") == "unreachable" for r in rows):
        sys.exit(EXIT_UNAVAILABLE)


def _node_status(addr: str, timeout_s: float) -> dict:
    """The status of the node at client address `addr` itself (no redirect), within
    `timeout_s`; raises `RaftpayError`."""
    from .client import Client
    with Client(addr, timeout_s=timeout_s, attempt_timeout_s=timeout_s) as c:
        return c.status(addr=addr)


def _status_rows(seeds: list[str]) -> list[dict]:
    """Each node's status, from the seeds and every member a node names (its config's client
    addresses), so one seed shows the whole cluster; by node id, then address."""
    rows: dict[str, dict] = {}  # node id (address while unknown) -> row
    names: dict[str, str] = {}  # client address -> node id, as the members lists give them
    todo, asked = list(seeds), set()
    while todo:
        addr = todo.pop(0)
        if addr in asked:
            continue
        asked.add(addr)
        try:
            row = dict(_node_status(addr, 2.0), address=addr)
        except codes.RaftpayError as e:
            row = {"address": addr, "role": "unreachable", "error": str(e)}
        members = row.get("members")
        if isinstance(members, dict):
            for nid, member in members.items():
                if isinstance(member, str):
                    names.setdefault(member, str(nid))
                    todo.append(member)
        key = str(row.get("id", addr))
        if key not in rows or rows[key].get("role") == "unreachable":
            rows[key] = row
    for row in rows.values():  # one that did not answer, by the id its members know it by
        if "id" not in row and row["address"] in names:
            row["id"] = names[row["address"]]
    return sorted(rows.values(), key=lambda r: (str(r.get("id", "~")), r["address"]))


def _status_problems(rows: list[dict]) -> list[str]:
    """What the table cannot show: why a node did not answer, why it stopped its Raft (a full
    disk, an entry it could not apply), a node that rejoins after losing its data, which peers
    a running node has no Raft connection to, and nodes whose data dirs were made for different
    clusters."""
    out = []
    clusters: dict[str, list[str]] = {}
    for r in rows:
        if isinstance(r.get("cluster"), str):
            clusters.setdefault(r["cluster"], []).append(str(r.get("id", r["address"])))
    if len(clusters) > 1:
        groups = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        out.append("data dirs made for different clusters (" + "; ".join(
            f"{', '.join(names)}: {c}" for c, names in groups) + "): nodes of two clusters "
            "refuse each other (README, 'A node that lost its data')")
    for r in rows:
        name = r.get("id", r["address"])
        if r.get("role") == "unreachable" and r.get("error"):
            at = "" if name == r["address"] else f" at {r['address']}"
            error = r["error"].removeprefix(f"{r['address']}: ")  # the client's own prefix
            out.append(f"{name}: unreachable{at}: {error}")
        if r.get("fatal"):
            out.append(f"{name}: stopped: {r['fatal']}")
        if r.get("rejoining") and r.get("running") is not False:
            out.append(f"{name}: rejoining after losing its data: does not vote until it "
                       f"holds what the cluster committed")
        down = sorted(str(p) for p, v in (r.get("peers") or {}).items()
                      if isinstance(v, dict) and not v.get("connected"))
        if down and r.get("running") is not False:
            out.append(f"{name}: no Raft connection to {', '.join(down)}")
    return out


def _clock_text(clock: dict | None) -> str:
    """"+3 ms ±1 ms" (NTP when configured, else against the other nodes), "!" when the guard
    says this node's clock is too far off."""
    if not clock:
        return ""
    ntp = clock.get("ntp") or {}
    if ntp.get("offset_ms") is not None:
        text = f"{ntp['offset_ms']:+.0f}±{ntp.get('error_ms') or 0:.0f} ntp"
    elif clock.get("cluster_offset_ms") is not None:
        # The cluster's time relative to ours; our offset is the opposite.
        text = f"{-clock['cluster_offset_ms']:+.0f}±{clock.get('bound_ms', 0):.0f} ms"
    else:
        text = "?"
    return text + ("" if clock.get("guard_ok", True) else " !")


# --- ledger commands for people at a shell --------------------------------------------------------

@main.group()
def account() -> None:
    """Create and show accounts."""


@account.command("create")
@_cluster_option
@click.argument("account_id")
@click.option("--currency", required=True, type=click.IntRange(1, 2 ** 32 - 1),
              help="Ledger/currency code (e.g. ISO 4217 numeric: 840 for USD).")
@click.option("--flag", "flags", multiple=True,
              type=click.Choice(["debits_must_not_exceed_credits",
                                 "credits_must_not_exceed_debits", "closed"]),
              help="Account constraint; repeatable.")
@click.option("--user-data", default=0, type=click.IntRange(0, 2 ** 64 - 1))
def account_create(cluster, account_id, currency, flags, user_data) -> None:
    """Create an account (safe to repeat: the same account answers `exists`)."""
    aid = _id(account_id)
    with _client(cluster) as c:
        code = _run_client(lambda: c.create_account(aid, currency, list(flags), user_data))
    _finish(code)


@account.command("show")
@_cluster_option
@click.argument("account_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def account_show(cluster, account_ids, as_json) -> None:
    """Show accounts and their balances (a linearizable read)."""
    ids = [_id(a) for a in account_ids]
    with _client(cluster) as c:
        accounts = _run_client(lambda: c.lookup_accounts(ids))
    if as_json:
        click.echo(json.dumps(accounts, indent=2))
        return
    missing = False
    for aid, a in zip(account_ids, accounts):
        if a is None:
            click.echo(f"{aid}: not found")
            missing = True
            continue
        click.echo(f"{a['id']}: currency {a['currency']}  debits posted {a['debits_posted']} "
                   f"pending {a['debits_pending']}  credits posted {a['credits_posted']} "
                   f"pending {a['credits_pending']}  flags {a['flags']}")
    if missing:
        sys.exit(EXIT_REFUSED)


@main.command()
@_cluster_option
@click.option("--id", "transfer_id", required=True,
              help="The idempotency key: retrying with the same id never pays twice.")
@click.option("--from", "debit", help="Debit account id.")
@click.option("--to", "credit", help="Credit account id.")
@click.option("--amount", type=int, help="Minor units (cents).")
@click.option("--currency", type=int)
@click.option("--pending", is_flag=True, help="Reserve only; post or void later.")
@click.option("--timeout-ms", type=int, default=0, help="A pending transfer expires after this.")
@click.option("--post", "post_id", help="Post the pending transfer with this id.")
@click.option("--void", "void_id", help="Void the pending transfer with this id.")
def transfer(cluster, transfer_id, debit, credit, amount, currency, pending, timeout_ms,
             post_id, void_id) -> None:
    """Move money between two accounts (or post/void a pending transfer)."""
    t = {"id": _id(transfer_id)}
    if post_id is not None and void_id is not None:
        raise click.UsageError("--post and --void exclude each other")
    if post_id is not None or void_id is not None:
        t.update(pending_id=_id(post_id if post_id is not None else void_id),
                 flags=["post_pending" if post_id is not None else "void_pending"])
    else:
        missing = [n for n, v in (("--from", debit), ("--to", credit), ("--amount", amount),
                                  ("--currency", currency)) if v is None]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)}")
        t["flags"] = ["pending"] if pending else []
        if timeout_ms:
            t["timeout_ms"] = timeout_ms
    for key, value in (("debit_account_id", debit), ("credit_account_id", credit),
                       ("amount", amount), ("currency", currency)):
        if value is not None:
            t[key] = _id(value) if key.endswith("_id") else value
    with _client(cluster) as c:
        (code,) = _run_client(lambda: c.create_transfers([t]))
    _finish(code)


@main.command()
@_cluster_option
@click.argument("account_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--cursor", default=0, type=click.IntRange(0), help="From a previous page.")
@click.option("--json", "as_json", is_flag=True)
def history(cluster, account_id, limit, cursor, as_json) -> None:
    """An account's transfers in the order they were applied."""
    aid = _id(account_id)
    with _client(cluster) as c:
        items, next_cursor = _run_client(lambda: c.account_transfers(aid, limit, cursor))
    if as_json:
        click.echo(json.dumps({"transfers": items, "next_cursor": next_cursor}, indent=2))
        return
    for t in items:
        click.echo(f"{t['timestamp']:>20}  {str(t['id']):<20} {str(t['debit_account_id']):>12} -> "
                   f"{str(t['credit_account_id']):<12} {t['amount']:>14}  {t['status']}")
    if next_cursor is not None:
        click.echo(f"(more: --cursor {next_cursor})")


def _finish(code: int) -> None:
    click.echo(codes.name(code))
    sys.exit(EXIT_OK if code in (Code.OK, Code.EXISTS) else EXIT_REFUSED)


# --- logs ---------------------------------------------------------------------------------------

@main.group()
def logs() -> None:
    """Work with nodes' structured event logs."""


@logs.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--window-ms", default=1000, show_default=True, type=click.IntRange(0),
              help="Reorder window for lines without an HLC stamp.")
def logs_merge(files, window_ms) -> None:
    """Merge several nodes' event logs into one ordered stream (HLC order)."""
    from .logmerge import merge
    for line in merge(list(files), window_ms=window_ms):
        click.echo(line.rstrip("\n"))
