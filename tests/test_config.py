"""Tests of node configuration: loading, validation messages, building and writing.

One table holds the bad configs: each row edits a good config and names the `section.key` and the
words of the "allowed" half its message must contain.  Every file under configs/ must load.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftpay import config
from raftpay.config import ConfigError, NodeConfig, Peer, RaftConfig

REPO = Path(__file__).resolve().parent.parent


def good_doc() -> dict:
    return {
        "node": {"id": "n1", "raft_addr": "127.0.0.1:7001", "client_addr": "127.0.0.1:7101",
                 "data_dir": "data/n1", "mode": "raft"},
        "cluster": {
            "name": "test",
            "secret": "",
            "peers": [
                {"id": f"n{i}", "raft_addr": f"127.0.0.1:{7000 + i}", "client_addr": f"127.0.0.1:{7100 + i}"}
                for i in (1, 2, 3)
            ],
        },
        "raft": {"fsync": "always", "election_timeout_ms": 1000, "heartbeat_ms": 100},
    }


def to_toml(doc: dict) -> str:
    """A tiny writer for test documents, able to write wrong types on purpose."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    out = []
    for name, table in doc.items():
        if isinstance(table, dict):
            out.append(f"[{name}]")
            out.extend(f"{k} = {value(v)}" for k, v in table.items())
        else:
            out.insert(0, f"{name} = {value(table)}")  # a top-level key, before any table
    return "\n".join(out) + "\n"


def write(tmp_path: Path, text: str, name: str = "n1.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_doc(tmp_path: Path, doc: dict) -> NodeConfig:
    return config.load(write(tmp_path, to_toml(doc)))


def edit(fn):
    def apply():
        doc = good_doc()
        fn(doc)
        return doc
    return apply


def set_(section, key, value):
    def fn(doc):
        doc.setdefault(section, {})[key] = value
    return edit(fn)


def drop(section, key=None):
    def fn(doc):
        if key is None:
            del doc[section]
        else:
            del doc[section][key]
    return edit(fn)


def peers(*entries):
    return set_("cluster", "peers", list(entries))


def peer(i, **over):
    p = {"id": f"n{i}", "raft_addr": f"127.0.0.1:{7000 + i}", "client_addr": f"127.0.0.1:{7100 + i}"}
    p.update(over)
    return p


def all_remote(doc, secret=""):
    doc["cluster"]["secret"] = secret
    doc["node"]["raft_addr"] = "10.0.0.1:7001"
    doc["cluster"]["peers"] = [peer(1, raft_addr="10.0.0.1:7001"), peer(2, raft_addr="10.0.0.2:7002"),
                               peer(3, raft_addr="10.0.0.3:7003")]


BAD = [
    # (name, document, location, words of the message)
    ("id empty", set_("node", "id", ""), "node.id", ["got ''", "letters, digits"]),
    ("id space", set_("node", "id", "n 1"), "node.id", ["got 'n 1'"]),
    ("id type", set_("node", "id", 1), "node.id", ["got integer 1", "letters, digits"]),
    ("no port", set_("node", "raft_addr", "127.0.0.1"), "node.raft_addr", ["host:port", "port 1..65535"]),
    ("port range", set_("node", "raft_addr", "127.0.0.1:70000"), "node.raft_addr",
     ["port '70000' is not in 1..65535"]),
    ("port zero", set_("node", "client_addr", "127.0.0.1:0"), "node.client_addr", ["not in 1..65535"]),
    ("bare v6", set_("node", "client_addr", "::1:7101"), "node.client_addr", ["[::1]:port"]),
    ("same addrs", set_("node", "client_addr", "127.0.0.1:7001"), "node.client_addr",
     ["same as node.raft_addr"]),
    ("mode", set_("node", "mode", "paxos"), "node.mode", ["got 'paxos'", "'raft' or 'zk-election'"]),
    ("no data_dir", drop("node", "data_dir"), "node.data_dir", ["missing", "relative paths resolve"]),
    ("empty data_dir", set_("node", "data_dir", ""), "node.data_dir", ["empty"]),
    ("no node", drop("node"), "node", ["missing section", "[node] is required"]),
    ("node not table", edit(lambda d: d.update(node="n1")), "node", ["got string", "a [node] table"]),
    ("unknown section", edit(lambda d: d.update(rafts={"fsync": "never"})), "rafts",
     ["unknown section (did you mean 'raft'?)", "allowed sections: node, cluster, raft"]),
    ("unknown key", set_("raft", "heartbeat", 50), "raft.heartbeat",
     ["unknown key (did you mean 'heartbeat_ms'?)", "allowed keys: fsync, election_timeout_ms"]),
    ("unknown key, nothing close", set_("server", "zzz", 1), "server.zzz",
     ["unknown key; allowed keys: max_frame_bytes"]),
    ("int as string", set_("raft", "heartbeat_ms", "100"), "raft.heartbeat_ms",
     ["got string '100'", "a positive integer (milliseconds)"]),
    ("int as bool", set_("raft", "heartbeat_ms", True), "raft.heartbeat_ms", ["got boolean True"]),
    ("int as float", set_("raft", "election_timeout_ms", 1000.0), "raft.election_timeout_ms",
     ["got float 1000.0"]),
    ("fsync", set_("raft", "fsync", "sometimes"), "raft.fsync", ["got 'sometimes'", "'always' or 'never'"]),
    ("heartbeat vs election", set_("raft", "heartbeat_ms", 500), "raft.heartbeat_ms",
     ["500 is not less than a third of election_timeout_ms (1000)", "less than a third"]),
    ("heartbeat just over a third", set_("raft", "heartbeat_ms", 334), "raft.heartbeat_ms",
     ["334 is not less than a third"]),
    ("election zero", set_("raft", "election_timeout_ms", 0), "raft.election_timeout_ms",
     ["got 0", "a positive integer"]),
    ("entry bytes", set_("raft", "max_entry_bytes", -1), "raft.max_entry_bytes", ["got -1"]),
    ("backlog bytes", set_("raft", "append_backlog_bytes", 0), "raft.append_backlog_bytes",
     ["got 0", "bytes of entries a leader lets wait unsent for one follower"]),
    ("compaction bytes", set_("raft", "log_compaction_bytes", 0), "raft.log_compaction_bytes",
     ["got 0", "a positive integer (bytes of log entries"]),
    ("frame bytes", set_("server", "max_frame_bytes", 2**32), "server.max_frame_bytes",
     ["got 4294967296", "1..4294967295"]),
    ("frame timeout", set_("server", "frame_timeout_ms", 0), "server.frame_timeout_ms", ["got 0"]),
    ("inflight", set_("server", "max_inflight_requests", 0), "server.max_inflight_requests", ["got 0"]),
    ("connections", set_("server", "max_connections", 0), "server.max_connections",
     ["got 0", "client connections open at once"]),
    ("offset", set_("clock", "max_offset_ms", 0), "clock.max_offset_ms", ["got 0"]),
    ("ntp addr", set_("clock", "ntp_servers", ["127.0.0.1:123", "pool.ntp.org"]), "clock.ntp_servers[1]",
     ["'pool.ntp.org' is not \"host:port\"", "a list of \"host:port\" strings"]),
    ("ntp type", set_("clock", "ntp_servers", "pool.ntp.org:123"), "clock.ntp_servers",
     ["got string", "a list of"]),
    ("ntp items", set_("clock", "ntp_servers", [123]), "clock.ntp_servers", ["got array"]),
    ("ttl", set_("ledger", "session_ttl_ms", 0), "ledger.session_ttl_ms", ["got 0", "same on every node"]),
    ("zk quorum", set_("zk", "quorum", "some"), "zk.quorum", ["got 'some'", "'all' or 'majority'"]),
    ("zk root", set_("zk", "root", "raftpay"), "zk.root", ["got 'raftpay'", "absolute znode path"]),
    ("zk root slash", set_("zk", "root", "/raftpay/"), "zk.root", ["got '/raftpay/'"]),
    ("zk digest", set_("zk", "digest", "user"), "zk.digest", ["user:password"]),
    ("zk hosts", set_("zk", "hosts", "127.0.0.1:2181,zk2"), "zk.hosts", ["'zk2'", "comma-separated"]),
    ("zk timeout", set_("zk", "session_timeout_ms", 0), "zk.session_timeout_ms", ["got 0"]),
    ("zk-election needs hosts", set_("node", "mode", "zk-election"), "zk.hosts",
     ["node.mode is 'zk-election'", "comma-separated"]),
    ("cluster name", set_("cluster", "name", "a b"), "cluster.name", ["got 'a b'"]),
    ("no peers", drop("cluster", "peers"), "cluster.peers", ["missing", "every member including"]),
    ("peers empty", peers(), "cluster.peers", ["got 0 members", "1..9"]),
    ("peers ten", peers(*(peer(i) for i in range(1, 11))), "cluster.peers", ["got 10 members"]),
    ("self not listed", peers(peer(2), peer(3)), "cluster.peers",
     ["this node ('n1') is not listed", "every member including this node"]),
    ("self addr differs", peers(peer(1, raft_addr="127.0.0.1:7009"), peer(2)), "node.raft_addr",
     ["differs from this node's entry in cluster.peers", "they must be equal"]),
    ("duplicate id",
     peers(peer(1), peer(2), peer(2, raft_addr="127.0.0.1:7005", client_addr="127.0.0.1:7105")),
     "cluster.peers[2].id", ["'n2' is also cluster.peers[1].id", "ids must be unique"]),
    ("duplicate addr", peers(peer(1), peer(2, client_addr="127.0.0.1:7001")), "cluster.peers[1].client_addr",
     ["127.0.0.1:7001 is also cluster.peers[0].raft_addr", "every address must be unique"]),
    ("peer bad addr", peers(peer(1), peer(2, raft_addr="x")), "cluster.peers[1].raft_addr", ["host:port"]),
    ("peer unknown key", peers(peer(1), {**peer(2), "addr": "x"}), "cluster.peers[1].addr",
     ["unknown key", "allowed keys: id, raft_addr, client_addr"]),
    ("peer missing key", peers(peer(1), {"id": "n2", "raft_addr": "127.0.0.1:7002"}),
     "cluster.peers[1].client_addr", ["missing", "host:port"]),
    ("peer key type", peers(peer(1), peer(2, raft_addr=7002)), "cluster.peers[1].raft_addr",
     ["got integer 7002"]),
    ("peer not table", peers(peer(1), "n2"), "cluster.peers[1]", ["got string", "a table"]),
    ("peers not list", set_("cluster", "peers", "n1"), "cluster.peers", ["got string", "a list of 1..9"]),
    ("remote without secret", edit(all_remote), "cluster.secret",
     ["raft address 10.0.0.1:7001 is not loopback", "pickle", "run code", "set [cluster] secret",
      "keep every raft_addr on loopback"]),
    ("remote peer without secret", peers(peer(1), peer(2, raft_addr="192.168.1.2:7002")), "cluster.secret",
     ["192.168.1.2:7002 is not loopback"]),
    ("any-interface without secret", peers(peer(1), peer(2, raft_addr="0.0.0.0:7002")), "cluster.secret",
     ["0.0.0.0:7002"]),
    ("hostname without secret", peers(peer(1), peer(2, raft_addr="node2.example:7002")), "cluster.secret",
     ["node2.example:7002"]),
]


@pytest.mark.parametrize("name,make,location,words", BAD, ids=[row[0] for row in BAD])
def test_bad_configs_name_the_key_and_what_is_allowed(tmp_path, name, make, location, words):
    path = write(tmp_path, to_toml(make()))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    lines = [p for p in info.value.problems if p.startswith(f"{path}: {location}: ")]
    assert lines, f"no problem at {location}: {info.value.problems}"
    for w in words:
        assert any(w in line for line in lines), (w, lines)
    for line in info.value.problems:
        assert line.startswith(f"{path}: ")
        assert "; " in line  # "<what is wrong>; <what is allowed>"


def test_every_problem_is_listed_at_once(tmp_path):
    doc = good_doc()
    doc["node"]["mode"] = "paxos"
    doc["raft"]["fsync"] = "sometimes"
    doc["raft"]["heartbeat"] = 5
    doc["zk"] = {"quorum": "some"}
    with pytest.raises(ConfigError) as info:
        load_doc(tmp_path, doc)
    locations = {p.split(": ")[1] for p in info.value.problems}
    assert locations == {"node.mode", "raft.fsync", "raft.heartbeat", "zk.quorum"}
    assert str(info.value) == "\n".join(info.value.problems)


def test_a_shape_problem_is_not_repeated_by_validation(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_doc(tmp_path, set_("node", "id", 5)())
    assert [p.split(": ")[1] for p in info.value.problems] == ["node.id"]
    with pytest.raises(ConfigError) as info:
        load_doc(tmp_path, drop("node")())
    assert [p.split(": ")[1] for p in info.value.problems] == ["node"]
    # Only the same key or what lies inside it is held back, not a key sharing a prefix.
    doc = good_doc()
    doc["raft"].update(heartbeat=5, heartbeat_ms=600)
    with pytest.raises(ConfigError) as info:
        load_doc(tmp_path, doc)
    assert [p.split(": ")[1] for p in info.value.problems] == ["raft.heartbeat", "raft.heartbeat_ms"]


@pytest.mark.parametrize("text,line", [
    ("[node]\nid = \n", 2),
    ("[node]\nid = \"n1\"\n\n[node]\n", 4),
    ("[node\n", 1),
])
def test_toml_syntax_errors_name_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}:{line}:")
    assert "TOML syntax error" in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[cluster]\nname = "\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


# --- Good configs ---------------------------------------------------------------------------------


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_doc(tmp_path, good_doc())
    assert cfg.node.id == "n1" and cfg.node.mode == "raft"
    assert cfg.raft == RaftConfig()
    from raftpay.node import LOG_COMPACTION_BYTES  # the same default for a Node made in code
    assert cfg.raft.log_compaction_bytes == LOG_COMPACTION_BYTES
    assert cfg.server.frame_timeout_ms == 10_000 and cfg.ledger.session_ttl_ms == 600_000
    assert cfg.zk.hosts == "" and cfg.clock.ntp_servers == ()
    assert cfg.source == str(tmp_path / "n1.toml")
    assert cfg.self_peer == Peer("n1", "127.0.0.1:7001", "127.0.0.1:7101")
    assert [p.id for p in cfg.other_peers] == ["n2", "n3"]
    assert cfg.peer_by_raft_addr("127.0.0.1:7002").id == "n2"
    assert cfg.peer_by_raft_addr("127.0.0.1:7102") is None


@pytest.mark.parametrize("make", [
    edit(lambda d: all_remote(d, secret="s3cret")),
    peers(peer(1)),  # a single node is a cluster
    peers(peer(1), peer(2)),  # even sizes are allowed
    peers(*(peer(i) for i in range(1, 10))),
    peers(peer(1), peer(2, raft_addr="localhost:7002"), peer(3, raft_addr="127.9.9.9:7003")),
    edit(lambda d: (d["node"].update(raft_addr="[::1]:7001"),
                    d["cluster"].update(peers=[peer(1, raft_addr="[::1]:7001")]))),
    edit(lambda d: (d["node"].update(mode="zk-election"),
                    d.update(zk={"hosts": "127.0.0.1:2181, 127.0.0.1:2182", "quorum": "majority",
                                 "digest": "raftpay:pw", "root": "/a/b_c.d"}))),
    set_("clock", "ntp_servers", ["127.0.0.1:11123", "[::1]:123"]),
    set_("raft", "fsync", "never"),
], ids=["remote with secret", "one node", "two nodes", "nine nodes", "loopback names", "ipv6 loopback",
        "zk-election", "ntp servers", "fsync never"])
def test_good_variants_load(tmp_path, make):
    config.load(write(tmp_path, to_toml(make())))


def test_relative_data_dir_resolves_against_the_file_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs" / "x"
    folder.mkdir(parents=True)
    doc = good_doc()
    doc["node"]["data_dir"] = "../../data/x/n1"
    path = write(folder, to_toml(doc))
    monkeypatch.chdir(folder)  # the working directory must not matter
    cfg = config.load(path.relative_to(folder))
    assert cfg.node.data_dir == str(tmp_path / "data" / "x" / "n1")
    monkeypatch.chdir(tmp_path)
    assert config.load(path).node.data_dir == str(tmp_path / "data" / "x" / "n1")


def test_absolute_data_dir_is_kept(tmp_path):
    doc = good_doc()
    doc["node"]["data_dir"] = str(tmp_path / "abs")
    assert load_doc(tmp_path, doc).node.data_dir == str(tmp_path / "abs")


CONFIG_FILES = sorted((REPO / "configs").rglob("*.toml"))


def test_the_repository_has_config_files():
    folders = {p.parent.name for p in CONFIG_FILES}
    assert {"three", "five"} <= folders


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_config_file_loads(path):
    cfg = config.load(path)
    assert cfg.node.id == path.stem
    # Their data lands in the repository's git-ignored /data/.
    assert Path(cfg.node.data_dir).is_relative_to(REPO / "data")


@pytest.mark.parametrize("folder", sorted({p.parent for p in CONFIG_FILES}), ids=lambda p: p.name)
def test_each_config_folder_is_one_consistent_cluster(folder):
    configs = [config.load(p) for p in sorted(folder.glob("*.toml"))]
    config.validate_cluster(configs)
    assert len({c.node.data_dir for c in configs}) == len(configs)


# --- Validation of configs built in code ----------------------------------------------------------


def test_validate_by_hand_built_config():
    cfg = config.make_local_cluster(3, 7001, "/tmp/raftpay-test")[0]
    config.validate(cfg)
    cfg.validate()
    broken = dataclasses.replace(cfg, raft=RaftConfig(fsync="maybe"))
    with pytest.raises(ConfigError) as info:
        config.validate(broken)
    assert info.value.problems == ["<config>: raft.fsync: got 'maybe'; allowed: 'always' or 'never'"]


def test_validate_cluster_finds_disagreements():
    a, b, c = config.make_local_cluster(3, 7001, "/tmp/raftpay-test")
    b = dataclasses.replace(b, ledger=config.LedgerConfig(session_ttl_ms=1))
    with pytest.raises(ConfigError, match="node n2: ledger.session_ttl_ms: differs from node n1"):
        config.validate_cluster([a, b, c])
    with pytest.raises(ConfigError, match="lists"):
        config.validate_cluster([a, c])


def test_secret_is_not_in_repr():
    cfg = config.make_local_cluster(1, 7001, "/tmp/x", secret="hunter2")[0]
    assert "hunter2" not in repr(cfg)
    assert cfg.cluster.secret == "hunter2"


# --- make_local_cluster and dump_toml -------------------------------------------------------------


def test_make_local_cluster(tmp_path):
    cfgs = config.make_local_cluster(3, 7001, tmp_path / "data")
    assert [c.node.id for c in cfgs] == ["n1", "n2", "n3"]
    assert [c.node.raft_addr for c in cfgs] == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert [c.node.client_addr for c in cfgs] == ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
    assert [c.node.data_dir for c in cfgs] == [str(tmp_path / "data" / f"n{i}") for i in (1, 2, 3)]
    assert all(c.cluster == cfgs[0].cluster for c in cfgs)
    assert cfgs[1].self_peer.id == "n2" and [p.id for p in cfgs[1].other_peers] == ["n1", "n3"]


def test_make_local_cluster_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfgs = config.make_local_cluster(2, 0, "rel", ports=[(40001, 40002), (40003, 40004)],
                                     raft=RaftConfig(fsync="never"), name="t", mode="raft")
    assert cfgs[1].node.raft_addr == "127.0.0.1:40003" and cfgs[1].node.client_addr == "127.0.0.1:40004"
    assert cfgs[0].node.data_dir == str(tmp_path / "rel" / "n1")  # absolute, against the cwd
    assert cfgs[0].raft.fsync == "never" and cfgs[0].cluster.name == "t"
    assert config.make_local_cluster(1, 7001, "d", host="::1")[0].node.raft_addr == "[::1]:7001"
    with pytest.raises(TypeError):
        config.make_local_cluster(1, 7001, "d", rafts=RaftConfig())
    with pytest.raises(ValueError):
        config.make_local_cluster(2, 7001, "d", ports=[(1, 2)])


def test_make_local_cluster_refuses_remote_host_without_secret():
    with pytest.raises(ConfigError, match=r"cluster\.secret: empty, but raft address 10\.1\.2\.3:7001"):
        config.make_local_cluster(3, 7001, "/tmp/x", host="10.1.2.3")
    config.make_local_cluster(3, 7001, "/tmp/x", "s3cret", host="10.1.2.3")
    with pytest.raises(ConfigError, match="got 10 members"):
        config.make_local_cluster(10, 7001, "/tmp/x")


def test_dump_toml_round_trips(tmp_path):
    for cfg in config.make_local_cluster(5, 7001, tmp_path / "data", "s3cret"):
        assert config.load(write(tmp_path, config.dump_toml(cfg), f"{cfg.node.id}.toml")) == cfg


@settings(max_examples=100, deadline=None)
@given(
    secret=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    ntp=st.lists(st.sampled_from(["127.0.0.1:123", "[::1]:11123", "time.example:123"]), max_size=3),
    data_dir=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                     min_size=1, max_size=20),
)
def test_dump_toml_round_trips_awkward_strings(tmp_path_factory, secret, ntp, data_dir):
    base = config.make_local_cluster(3, 7001, "/tmp/x", secret)[0]
    cfg = dataclasses.replace(
        base,
        node=dataclasses.replace(base.node, data_dir="/" + data_dir),
        clock=config.ClockConfig(ntp_servers=tuple(ntp)),
    )
    path = write(tmp_path_factory.mktemp("dump"), config.dump_toml(cfg))
    loaded = config.load(path)
    assert loaded.cluster.secret == secret
    assert loaded.clock.ntp_servers == tuple(ntp)
    assert loaded.node.data_dir == os.path.normpath("/" + data_dir)


def test_dump_toml_writes_every_key():
    text = config.dump_toml(config.make_local_cluster(3, 7001, "/tmp/x")[0])
    for name, cls in config.SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in text, f"{name}.{f.name}"


def test_config_objects_are_frozen():
    cfg = config.make_local_cluster(1, 7001, "/tmp/x")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.raft.heartbeat_ms = 1  # type: ignore[misc]
    assert copy.deepcopy(cfg) == cfg


@pytest.mark.parametrize("given, want", [("/.", "/"), ("/data/./n1/", "/data/n1"),
                                         ("/data//n1/..", "/data")])
def test_an_absolute_data_dir_is_normalised_too(tmp_path, given, want):
    """Found by the round-trip property above: "/." loaded back as "/." (only relative paths
    were normalised), so one folder could be named two ways."""
    base = config.make_local_cluster(3, 7001, "/tmp/x", "s3cret-s3cret-s3cret")[0]
    cfg = dataclasses.replace(base, node=dataclasses.replace(base.node, data_dir=given))
    assert config.load(write(tmp_path, config.dump_toml(cfg))).node.data_dir == want
