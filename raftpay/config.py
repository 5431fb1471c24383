"""Node configuration: one dataclass per TOML section, every default in one place.

Design: hashicorp/raft's `DefaultConfig` + `ValidateConfig` is the model.  The dataclasses below
*are* the defaults — nothing else in raftpay invents a number — and they are frozen, so a running
node cannot drift from what it was started with.  `load(path)` reads one node's TOML file (stdlib
`tomllib`), checks the shape (known sections and keys, value types), resolves relative paths
against the file's folder, then runs `validate`, the semantic checks.  Every problem is collected
and reported at once, one line each, as `<file>: <section.key>: <what is wrong>; <what is
allowed>`, because a config that fails one problem at a time wastes an operator's afternoon.
Unknown sections and keys are errors, with a "did you mean" where one is close: a typo that
silently keeps a default (`heartbeat = 50` for `heartbeat_ms`) is worse than a refusal.

The one check with teeth is the secret: PySyncObj's node-to-node traffic is pickle, so a Raft port
reachable from another host without `[cluster] secret` (which turns on its encryption) lets anyone
who reaches it run code on the node.  Any non-loopback Raft address therefore requires a secret.

`make_local_cluster` builds configs in code (for `raftpay up` and tests) and `dump_toml` writes one
back out without a third-party TOML writer.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable

# --- The sections (the defaults live here and nowhere else) ---------------------------------------


@dataclass(frozen=True)
class Peer:
    """One cluster member as every node sees it."""

    id: str
    raft_addr: str  # node-to-node (PySyncObj), "host:port"
    client_addr: str  # client-facing server, "host:port"


@dataclass(frozen=True)
class NodeSection:
    """`[node]`: who this process is.  `id`, both addresses and `data_dir` are required."""

    id: str = ""
    raft_addr: str = ""
    client_addr: str = ""
    # Absolute after `load` (a relative path in the file resolves against the file's folder).
    data_dir: str = ""
    mode: str = "raft"  # or "zk-election", the ZooKeeper-elected baseline


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: identical on every node."""

    name: str = "local"
    # Node-to-node encryption secret.  Kept out of repr so it never lands in a log line.
    secret: str = field(default="", repr=False)
    peers: tuple[Peer, ...] = ()  # every member, this node included


@dataclass(frozen=True)
class RaftConfig:
    """`[raft]`: replication timing and the group-commit bounds."""

    fsync: str = "always"  # or "never" (survives a process kill, not a power loss)
    election_timeout_ms: int = 1000
    heartbeat_ms: int = 100
    max_entry_bytes: int = 4 * 1024 * 1024  # bound on one Raft entry built by group commit
    append_entries_batch_bytes: int = 2 * 1024 * 1024
    # A leader sends a follower no more entries while this many wait unsent for it (a follower
    # slower than the writes), instead of keeping every entry since it fell behind in memory.
    append_backlog_bytes: int = 16 * 1024 * 1024
    # Snapshot the ledger and drop the journal's entries once it holds this many, or once
    # they take this many bytes; either way not before they take as many bytes as the
    # snapshot that would replace them.
    log_compaction_entries: int = 5000
    log_compaction_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """`[server]`: the client-facing asyncio server."""

    max_frame_bytes: int = 16 * 1024 * 1024
    request_timeout_ms: int = 5000
    max_inflight_requests: int = 10_000
    # Client connections a node keeps open at once; more are answered `overloaded` and closed.
    # Lowered at start to what the file descriptor limit leaves beside the node's own needs.
    max_connections: int = 10_000
    idle_timeout_ms: int = 300_000
    frame_timeout_ms: int = 10_000  # a half-sent frame must complete within this


@dataclass(frozen=True)
class ClockConfig:
    """`[clock]`: the hybrid logical clock's tolerance and optional SNTP probes."""

    max_offset_ms: int = 500
    ntp_servers: tuple[str, ...] = ()  # "host:port" strings


@dataclass(frozen=True)
class LedgerConfig:
    """`[ledger]`: state-machine parameters; they must be the same on every node."""

    session_ttl_ms: int = 600_000


@dataclass(frozen=True)
class ZkConfig:
    """`[zk]`: the optional ZooKeeper mirror, and the zk-election baseline mode."""

    hosts: str = ""  # "127.0.0.1:2181,..."; empty means no mirror
    root: str = "/raftpay"
    digest: str = field(default="", repr=False)  # "user:password" for digest ACLs, optional
    quorum: str = "all"  # zk-election mode: "all" or "majority"
    session_timeout_ms: int = 4000


@dataclass(frozen=True)
class NodeConfig:
    """One node's whole configuration.  Build it with `load`, `make_local_cluster`, or by hand
    followed by `validate`; change it with `dataclasses.replace`."""

    node: NodeSection
    cluster: ClusterConfig
    raft: RaftConfig = field(default_factory=RaftConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    zk: ZkConfig = field(default_factory=ZkConfig)
    # The file it was loaded from, for messages; not part of the configuration's identity.
    source: str = field(default="", compare=False)

    @property
    def self_peer(self) -> Peer:
        """This node's entry in `cluster.peers` (a validated config always has one)."""
        for p in self.cluster.peers:
            if p.id == self.node.id:
                return p
        raise LookupError(f"node {self.node.id!r} is not in cluster.peers")

    @property
    def other_peers(self) -> tuple[Peer, ...]:
        """Every member but this node, in file order."""
        return tuple(p for p in self.cluster.peers if p.id != self.node.id)

    def peer_by_raft_addr(self, addr: str) -> Peer | None:
        """The member whose `raft_addr` is exactly `addr`, or None."""
        for p in self.cluster.peers:
            if p.raft_addr == addr:
                return p
        return None

    def validate(self) -> None:
        """Same as `validate(self)`."""
        validate(self)


#: TOML section name -> dataclass, in the order `dump_toml` writes them.
SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "cluster": ClusterConfig,
    "raft": RaftConfig,
    "server": ServerConfig,
    "clock": ClockConfig,
    "ledger": LedgerConfig,
    "zk": ZkConfig,
}
_REQUIRED = {"node": ("id", "raft_addr", "client_addr", "data_dir"), "cluster": ("peers",)}
_PEER_KEYS = ("id", "raft_addr", "client_addr")
_PEER_TABLE = '{ id = "..", raft_addr = "host:port", client_addr = "host:port" }'

MODES = ("raft", "zk-election")
FSYNC = ("always", "never")
ZK_QUORUMS = ("all", "majority")
MAX_CLUSTER_SIZE = 9

#: What each key accepts, in words; the second half of every message about that key.
ALLOWED: dict[str, str] = {
    "node.id": "letters, digits, '_' and '-' (e.g. \"n1\")",
    "node.raft_addr": "\"host:port\" with port 1..65535, the address other nodes reach for Raft",
    "node.client_addr": "\"host:port\" with port 1..65535, the address clients connect to",
    "node.data_dir": "a folder for the Raft log and snapshots; relative paths resolve against "
                     "the config file's folder",
    "node.mode": " or ".join(repr(m) for m in MODES),
    "cluster.name": "letters, digits, '_' and '-'",
    "cluster.secret": "a string, the same on every node; required when any raft_addr is not "
                      "loopback",
    "cluster.peers": f"a list of 1..{MAX_CLUSTER_SIZE} tables {_PEER_TABLE}, every member "
                     "including this node",
    "raft.fsync": " or ".join(repr(m) for m in FSYNC),
    "raft.election_timeout_ms": "a positive integer (milliseconds), more than three times heartbeat_ms",
    "raft.heartbeat_ms": "a positive integer (milliseconds), less than a third of election_timeout_ms",
    "raft.max_entry_bytes": "a positive integer (bytes)",
    "raft.append_entries_batch_bytes": "a positive integer (bytes)",
    "raft.append_backlog_bytes": "a positive integer (bytes of entries a leader lets wait "
                                 "unsent for one follower)",
    "raft.log_compaction_entries": "a positive integer (log entries kept before a snapshot "
                                   "replaces them)",
    "raft.log_compaction_bytes": "a positive integer (bytes of log entries kept before a "
                                 "snapshot replaces them)",
    "server.max_frame_bytes": "an integer in 1..4294967295 (bytes)",
    "server.request_timeout_ms": "a positive integer (milliseconds)",
    "server.max_inflight_requests": "a positive integer",
    "server.max_connections": "a positive integer (client connections open at once)",
    "server.idle_timeout_ms": "a positive integer (milliseconds)",
    "server.frame_timeout_ms": "a positive integer (milliseconds)",
    "clock.max_offset_ms": "a positive integer (milliseconds)",
    "clock.ntp_servers": "a list of \"host:port\" strings",
    "ledger.session_ttl_ms": "a positive integer (milliseconds), the same on every node",
    "zk.hosts": "\"\" (no ZooKeeper) or a comma-separated list of \"host:port\"",
    "zk.root": "an absolute znode path such as \"/raftpay\"",
    "zk.digest": "\"\" or \"user:password\"",
    "zk.quorum": " or ".join(repr(m) for m in ZK_QUORUMS),
    "zk.session_timeout_ms": "a positive integer (milliseconds)",
}


class ConfigError(ValueError):
    """A configuration that cannot be used.  `problems` holds one line per problem, each as
    `<file>: <section.key>: <what is wrong>; <what is allowed>`; the message is all of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- Loading --------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> NodeConfig:
    """Read, shape-check, resolve and validate one node's TOML file.

    Blocks on file I/O; no other side effects.  Raises `ConfigError` listing every problem found
    (a TOML syntax error is reported alone, as `<file>:<line>:<column>: ...`).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else path
        text = msg[: m.start()] if m else msg
        raise ConfigError([f"{where}: TOML syntax error: {text}"]) from None

    cfg, shape_problems = _from_dict(doc, source=path)
    cfg = _resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    # Semantic problems about a key whose shape was already reported would only repeat it.
    reported = [loc for loc, _ in shape_problems]
    semantic = [(loc, text) for loc, text in _problems(cfg)
                if not any(_within(r, loc) or _within(loc, r) for r in reported)]
    problems = shape_problems + semantic
    if problems:
        raise ConfigError([f"{path}: {loc}: {text}" for loc, text in problems])
    return cfg


def _within(loc: str, outer: str) -> bool:
    """Is `loc` the location `outer` or inside it (`cluster.peers[1].id` is inside `cluster`)?"""
    return loc == outer or loc.startswith((outer + ".", outer + "["))


def _from_dict(doc: dict[str, Any], source: str) -> tuple[NodeConfig, list[tuple[str, str]]]:
    """Build a NodeConfig from parsed TOML, keeping defaults wherever a value is unusable."""
    problems: list[tuple[str, str]] = []
    for name in doc:
        if name not in SECTIONS:
            problems.append((name, f"unknown section{_did_you_mean(name, SECTIONS)}; "
                                   f"allowed sections: {', '.join(SECTIONS)}"))
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = doc.get(name)
        if table is None:
            if name in _REQUIRED:
                problems.append((name, f"missing section; [{name}] is required"))
            table = {}
        elif not isinstance(table, dict):
            problems.append((name, f"got {_toml_kind(table)}; allowed: a [{name}] table"))
            table = {}
        kwargs = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in table.items():
            loc = f"{name}.{key}"
            if key not in known:
                problems.append((loc, f"unknown key{_did_you_mean(key, known)}; "
                                      f"allowed keys: {', '.join(known)}"))
                continue
            if name == "cluster" and key == "peers":
                peers = _peers_from_toml(value, problems)
                if peers is not None:
                    kwargs[key] = peers
                continue
            converted = _convert(loc, _default_of(known[key]), value, problems)
            if converted is not _BAD:
                kwargs[key] = converted
        # A section that is missing or not a table was reported whole; its keys need no lines.
        for key in _REQUIRED.get(name, ()) if isinstance(doc.get(name), dict) else ():
            if key not in table:
                problems.append((f"{name}.{key}", f"missing; required: {ALLOWED[f'{name}.{key}']}"))
        built[name] = cls(**kwargs)
    return NodeConfig(**built, source=source), problems


_BAD = object()


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _convert(loc: str, default: Any, value: Any, problems: list[tuple[str, str]]) -> Any:
    """`value` if it has the type of `default` (a tuple default means a list of strings)."""
    if isinstance(default, bool):  # no bool keys today; kept so one is not read as an int
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"{loc}: no converter for {type(default).__name__}")
    if ok:
        return value
    problems.append((loc, f"got {_toml_kind(value)} {_short(value)}; allowed: {ALLOWED[loc]}"))
    return _BAD


def _peers_from_toml(value: Any, problems: list[tuple[str, str]]) -> tuple[Peer, ...] | None:
    if not isinstance(value, list):
        problems.append(
            ("cluster.peers", f"got {_toml_kind(value)}; allowed: {ALLOWED['cluster.peers']}"))
        return None
    peers = []
    for i, item in enumerate(value):
        loc = f"cluster.peers[{i}]"
        if not isinstance(item, dict):
            problems.append((loc, f"got {_toml_kind(item)}; allowed: a table " + _PEER_TABLE))
            continue
        fine = True
        for key in item:
            if key not in _PEER_KEYS:
                problems.append((f"{loc}.{key}", f"unknown key{_did_you_mean(key, _PEER_KEYS)}; "
                                                 f"allowed keys: {', '.join(_PEER_KEYS)}"))
                fine = False
        for key in _PEER_KEYS:
            if key not in item:
                problems.append((f"{loc}.{key}", f"missing; required: {ALLOWED['node.' + key]}"))
                fine = False
            elif not isinstance(item[key], str):
                got = f"got {_toml_kind(item[key])} {_short(item[key])}"
                problems.append((f"{loc}.{key}", f"{got}; allowed: {ALLOWED['node.' + key]}"))
                fine = False
        if fine:
            peers.append(Peer(item["id"], item["raft_addr"], item["client_addr"]))
    return tuple(peers)


def _resolve_paths(cfg: NodeConfig, folder: str) -> NodeConfig:
    # Relative to the file, not to the working directory: the same command line must find the
    # same data whichever folder it is started from.
    # Normalised either way ("/data/." and "/data" are one folder, and must read as one).
    d = cfg.node.data_dir
    if d:
        d = os.path.expanduser(d)
        d = os.path.normpath(d if os.path.isabs(d) else os.path.join(folder, d))
        if d != cfg.node.data_dir:
            cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, data_dir=d))
    return cfg


# --- Validation -----------------------------------------------------------------------------------


def validate(cfg: NodeConfig) -> None:
    """Run the semantic checks; return None or raise `ConfigError` listing every problem.

    Pure (no I/O; it does not touch data_dir or resolve host names).
    """
    problems = _problems(cfg)
    if problems:
        where = cfg.source or "<config>"
        raise ConfigError([f"{where}: {loc}: {text}" for loc, text in problems])


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ZNODE = re.compile(r"(/[A-Za-z0-9_.-]+)+")


def parse_addr(addr: str) -> tuple[str, int]:
    """`"host:port"` (or `"[v6]:port"`) -> (host, port).  Raises ValueError with the reason."""
    if not isinstance(addr, str) or ":" not in addr:
        raise ValueError(f"{addr!r} is not \"host:port\"")
    host, _, port_text = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{addr!r}: {host!r} is not an IPv6 address") from None
    elif not host or ":" in host or any(c.isspace() for c in host):
        raise ValueError(f"{addr!r}: bad host {host!r} (write IPv6 as \"[::1]:port\")")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{addr!r}: port {port_text!r} is not in 1..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; any other name is assumed reachable from afar."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _problems(cfg: NodeConfig) -> list[tuple[str, str]]:
    """Every semantic problem as (section.key, "<what is wrong>; allowed: ...")."""
    out: list[tuple[str, str]] = []

    def bad(loc: str, what: str, allowed_key: str | None = None) -> None:
        out.append((loc, f"{what}; allowed: {ALLOWED[allowed_key or loc]}"))

    def check_addr(loc: str, addr: str, allowed_key: str | None = None) -> bool:
        try:
            parse_addr(addr)
            return True
        except ValueError as e:
            bad(loc, str(e), allowed_key)
            return False

    def positive(loc: str, value: int) -> None:
        if value <= 0:
            bad(loc, f"got {value}")

    node, cluster = cfg.node, cfg.cluster

    # [node]
    if not _NAME.fullmatch(node.id):
        bad("node.id", f"got {node.id!r}")
    check_addr("node.raft_addr", node.raft_addr)
    check_addr("node.client_addr", node.client_addr)
    if node.raft_addr and node.raft_addr == node.client_addr:
        bad("node.client_addr", f"same as node.raft_addr ({node.raft_addr})")
    if not node.data_dir:
        bad("node.data_dir", "empty")
    if node.mode not in MODES:
        bad("node.mode", f"got {node.mode!r}")

    # [cluster]
    if not _NAME.fullmatch(cluster.name):
        bad("cluster.name", f"got {cluster.name!r}")
    peers = cluster.peers
    if not 1 <= len(peers) <= MAX_CLUSTER_SIZE:
        bad("cluster.peers", f"got {len(peers)} members")
    seen_ids: dict[str, int] = {}
    seen_addrs: dict[str, str] = {}
    for i, p in enumerate(peers):
        loc = f"cluster.peers[{i}]"
        if not _NAME.fullmatch(p.id):
            bad(f"{loc}.id", f"got {p.id!r}", "node.id")
        elif p.id in seen_ids:
            bad(f"{loc}.id",
                f"{p.id!r} is also cluster.peers[{seen_ids[p.id]}].id; ids must be unique",
                "node.id")
        seen_ids.setdefault(p.id, i)
        for key in ("raft_addr", "client_addr"):
            addr = getattr(p, key)
            if check_addr(f"{loc}.{key}", addr, f"node.{key}"):
                if addr in seen_addrs:
                    bad(f"{loc}.{key}",
                        f"{addr} is also {seen_addrs[addr]}; every address must be unique",
                        f"node.{key}")
                seen_addrs.setdefault(addr, f"{loc}.{key}")
    me = [p for p in peers if p.id == node.id]
    if node.id and not me:
        bad("cluster.peers",
            f"this node ({node.id!r}) is not listed; list every member including this one")
    elif me:
        for key in ("raft_addr", "client_addr"):
            if getattr(me[0], key) != getattr(node, key):
                bad(f"node.{key}", f"{getattr(node, key)!r} differs from this node's entry in "
                                   f"cluster.peers ({getattr(me[0], key)!r}); they must be equal")

    # The secret.  Only Raft traffic is pickle; the client port speaks msgpack (wire.py).
    if not cluster.secret:
        exposed = [a for a in [node.raft_addr, *(p.raft_addr for p in peers)] if _non_loopback(a)]
        if exposed:
            out.append(("cluster.secret", (
                f"empty, but raft address {exposed[0]} is not loopback; node-to-node traffic is "
                "pickle, so without a secret anyone who can reach that port can run code on this "
                "node; set [cluster] secret to the same long random string on every node (it "
                "turns on PySyncObj's encryption), or keep every raft_addr on loopback")))

    # [raft]
    r = cfg.raft
    if r.fsync not in FSYNC:
        bad("raft.fsync", f"got {r.fsync!r}")
    positive("raft.election_timeout_ms", r.election_timeout_ms)
    positive("raft.heartbeat_ms", r.heartbeat_ms)
    heartbeat_ms, election_ms = r.heartbeat_ms, r.election_timeout_ms
    if heartbeat_ms > 0 and election_ms > 0 and 3 * heartbeat_ms >= election_ms:
        # A follower must see a few heartbeats within one election timeout, or a healthy leader
        # gets deposed by the first slow packet (PySyncObj itself asserts this ratio).
        bad("raft.heartbeat_ms", f"{r.heartbeat_ms} is not less than a third of election_timeout_ms "
                                 f"({r.election_timeout_ms})")
    positive("raft.max_entry_bytes", r.max_entry_bytes)
    positive("raft.append_entries_batch_bytes", r.append_entries_batch_bytes)
    positive("raft.append_backlog_bytes", r.append_backlog_bytes)
    positive("raft.log_compaction_entries", r.log_compaction_entries)
    positive("raft.log_compaction_bytes", r.log_compaction_bytes)

    # [server]
    s = cfg.server
    if not 1 <= s.max_frame_bytes <= 2**32 - 1:  # the frame's length prefix is 4 bytes
        bad("server.max_frame_bytes", f"got {s.max_frame_bytes}")
    for key in ("request_timeout_ms", "max_inflight_requests", "max_connections",
                "idle_timeout_ms", "frame_timeout_ms"):
        positive(f"server.{key}", getattr(s, key))

    # [clock]
    positive("clock.max_offset_ms", cfg.clock.max_offset_ms)
    for i, addr in enumerate(cfg.clock.ntp_servers):
        check_addr(f"clock.ntp_servers[{i}]", addr, "clock.ntp_servers")

    # [ledger]
    positive("ledger.session_ttl_ms", cfg.ledger.session_ttl_ms)

    # [zk]
    z = cfg.zk
    if z.hosts:
        for addr in z.hosts.split(","):
            if not check_addr("zk.hosts", addr.strip(), "zk.hosts"):
                break
    elif node.mode == "zk-election":
        bad("zk.hosts", "empty, but node.mode is 'zk-election', which needs ZooKeeper")
    if not _ZNODE.fullmatch(z.root):
        bad("zk.root", f"got {z.root!r}")
    if z.digest:
        user, sep, password = z.digest.partition(":")
        if not (sep and user and password):
            bad("zk.digest", "not of the form user:password")
    if z.quorum not in ZK_QUORUMS:
        bad("zk.quorum", f"got {z.quorum!r}")
    positive("zk.session_timeout_ms", z.session_timeout_ms)
    return out


def _non_loopback(addr: str) -> bool:
    try:
        host, _ = parse_addr(addr)
    except ValueError:
        return False  # reported as a bad address already
    return not is_loopback(host)


#: Settings every member must share; a mismatch splits the cluster's behaviour.
_SHARED = ("cluster", "ledger")


def validate_cluster(configs: Iterable[NodeConfig]) -> None:
    """Check that the configs of one cluster's nodes agree with each other.

    Each must be valid on its own; together they must list the same peers (each node exactly
    once), the same `[cluster]` (name, secret, peers) and the same `[ledger]` settings (the state
    machine must be identical everywhere).  Raises `ConfigError` listing every mismatch.  Pure.
    """
    configs = list(configs)
    problems: list[str] = []
    for c in configs:
        try:
            validate(c)
        except ConfigError as e:
            problems.extend(e.problems)
    if configs:
        first = configs[0]
        where0 = first.source or f"node {first.node.id}"
        for c in configs[1:]:
            where = c.source or f"node {c.node.id}"
            for section in _SHARED:
                a, b = getattr(first, section), getattr(c, section)
                for f in dataclasses.fields(a):
                    if getattr(a, f.name) != getattr(b, f.name):
                        problems.append(f"{where}: {section}.{f.name}: differs from {where0}; "
                                        "allowed: the same value on every node")
        ids = [c.node.id for c in configs]
        listed = sorted(p.id for p in first.cluster.peers)
        if sorted(ids) != listed:
            problems.append(f"{where0}: cluster.peers: lists {listed} but the configs are for "
                            f"{sorted(ids)}; allowed: one config per listed member")
    if problems:
        raise ConfigError(problems)


# --- Building and writing -------------------------------------------------------------------------


def make_local_cluster(
    n: int,
    base_port: int,
    data_dir: str | os.PathLike[str],
    secret: str = "",
    *,
    host: str = "127.0.0.1",
    ports: list[tuple[int, int]] | None = None,
    mode: str = "raft",
    name: str = "local",
    **sections: Any,
) -> list[NodeConfig]:
    """Validated configs for an `n`-node cluster on one host, nodes `n1`..`nN`.

    Node i (from 1) gets raft port `base_port + i - 1` and client port `base_port + 100 + i - 1`
    (base_port 7001 gives 7001.. and 7101..), unless `ports` gives the (raft, client) pair of each
    node — tests pass free ports there.  Its data goes to `<data_dir>/n<i>`, made absolute against
    the current directory so a written-out config does not move it.  `sections` replaces whole
    sections (`raft=RaftConfig(fsync="never")`).  Raises `ConfigError` if the result is invalid
    (e.g. a non-loopback `host` without a secret).  Pure.
    """
    unknown = set(sections) - (set(SECTIONS) - {"node", "cluster"})
    if unknown:
        raise TypeError(f"unknown sections {sorted(unknown)}")
    if ports is None:
        ports = [(base_port + i, base_port + 100 + i) for i in range(n)]
    if len(ports) != n:
        raise ValueError(f"ports has {len(ports)} pairs for {n} nodes")
    fmt = (lambda port: f"[{host}]:{port}") if ":" in host else (lambda port: f"{host}:{port}")
    peers = tuple(Peer(f"n{i + 1}", fmt(rp), fmt(cp)) for i, (rp, cp) in enumerate(ports))
    cluster = ClusterConfig(name=name, secret=secret, peers=peers)
    root = os.path.abspath(os.fspath(data_dir))
    configs = [
        NodeConfig(
            node=NodeSection(id=p.id, raft_addr=p.raft_addr, client_addr=p.client_addr,
                             data_dir=os.path.join(root, p.id), mode=mode),
            cluster=cluster,
            **sections,
        )
        for p in peers
    ]
    validate_cluster(configs)
    return configs


def dump_toml(cfg: NodeConfig) -> str:
    """The TOML text of `cfg`, every key written out, readable by `load`.

    `load(file_with(dump_toml(c))) == c` when `c.node.data_dir` is absolute.  The text holds the
    cluster secret if there is one: write it to a file only this user can read.
    """
    lines = [f"# raftpay node {cfg.node.id}: written by raftpay; relative paths resolve against "
             "this file's folder.", ""]
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if name == "cluster" and f.name == "peers":
                lines.append("peers = [")
                for p in value:
                    lines.append(f"  {{ id = {_toml_str(p.id)}, "
                                 f"raft_addr = {_toml_str(p.raft_addr)}, "
                                 f"client_addr = {_toml_str(p.client_addr)} }},")
                lines.append("]")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# --- Message helpers ------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_kind(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _short(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
