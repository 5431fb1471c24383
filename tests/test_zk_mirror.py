"""ZkMirror and LeaderWatch against real ZooKeeper servers.

Design: the node is replaced by a mutable dict that the test edits (the mirror reads it through
`status_fn`), and an independent kazoo client plays the operator who looks at the znodes.  Every
wait is a condition polled against a deadline (`wait_until`); the deadlines are generous, the
assertions on latency are separate and explicit.  Tests that stop or kill ZooKeeper get a server
of their own; the others share one per module and use their own cluster names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from raftpay.zk import LeaderWatch, ZkMirror, leader_path, members_path
from raftpay.zk.mirror import LeaderInfo
from zk_fixtures import zk_ensemble, zk_server, zk_standalone  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll `predicate` until it returns something truthy; return that, or fail after the
    deadline naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)  # polling interval; the deadline decides
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last value {value!r}")


def read_json(zk: KazooClient, path: str) -> dict | None:
    stat = zk.exists(path)
    if stat is None:
        return None
    data, _ = zk.get(path)
    return json.loads(data)


def leader_id(zk: KazooClient, path: str) -> str | None:
    return (read_json(zk, path) or {}).get("node_id")


def view(addr: str, role: str = "follower", term: int = 1, leader_id: str | None = None) -> dict:
    return {"client_addr": addr, "role": role, "term": term, "leader_id": leader_id}


@pytest.fixture
def cluster() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def observer(zk_standalone):  # noqa: F811
    zk = KazooClient(zk_standalone.hosts)
    zk.start(timeout=10)
    yield zk
    zk.stop()
    zk.close()


@pytest.fixture
def mirrors():
    """Factory: start a mirror whose status_fn reads a dict the test keeps editing."""
    started: list[ZkMirror] = []

    def make(hosts: str, cluster: str, node_id: str, status: dict, **kwargs) -> ZkMirror:
        m = ZkMirror(hosts, cluster, node_id, lambda: status, **kwargs)
        started.append(m)
        return m.start()

    yield make
    for m in started:
        m.stop()


# --- members and leader ---------------------------------------------------------------------


def test_members_appear_within_a_second(zk_standalone, observer, mirrors, cluster):  # noqa: F811
    statuses = {f"n{i}": view(f"127.0.0.1:71{i:02d}") for i in (1, 2, 3)}
    t0 = time.monotonic()
    for node_id, status in statuses.items():
        mirrors(zk_standalone.hosts, cluster, node_id, status)
    base = members_path("/raftpay", cluster)
    wait_until(
        lambda: observer.exists(base) and sorted(observer.get_children(base)) == ["n1", "n2", "n3"],
        1.0,
        "three member znodes",
    )
    assert time.monotonic() - t0 < 1.0
    for node_id, status in statuses.items():
        rec = read_json(observer, f"{base}/{node_id}")
        assert rec == {
            "node_id": node_id, "client_addr": status["client_addr"], "role": "follower", "term": 1,
        }
        assert observer.exists(f"{base}/{node_id}").ephemeralOwner != 0
    assert observer.exists(leader_path("/raftpay", cluster)) is None


def test_role_change_moves_leader_znode(zk_standalone, observer, mirrors, cluster):  # noqa: F811
    a, b = view("127.0.0.1:7101"), view("127.0.0.1:7102")
    ma = mirrors(zk_standalone.hosts, cluster, "n1", a)
    mirrors(zk_standalone.hosts, cluster, "n2", b)
    lpath = leader_path("/raftpay", cluster)

    a.update(role="leader", term=2)
    rec = wait_until(lambda: read_json(observer, lpath), 1.0, "leader znode for n1")
    assert rec == {"node_id": "n1", "client_addr": "127.0.0.1:7101", "term": 2}
    assert observer.exists(lpath).ephemeralOwner == ma.client.client_id[0]

    # n1 steps down before anyone else wins: it removes its own claim.
    a.update(role="follower", term=3)
    wait_until(lambda: observer.exists(lpath) is None, 1.0, "n1 to delete the leader znode")

    b.update(role="leader", term=3)
    wait_until(lambda: leader_id(observer, lpath) == "n2", 1.0, "leader znode for n2")
    assert read_json(observer, lpath) == {
        "node_id": "n2", "client_addr": "127.0.0.1:7102", "term": 3,
    }
    member = read_json(observer, f"{members_path('/raftpay', cluster)}/n1")
    assert member["role"] == "follower" and member["term"] == 3


def test_higher_term_replaces_stale_leader(zk_standalone, observer, mirrors, cluster):  # noqa: F811
    a, b = view("127.0.0.1:7101", "leader", 3), view("127.0.0.1:7102")
    ma = mirrors(zk_standalone.hosts, cluster, "n1", a)
    mb = mirrors(zk_standalone.hosts, cluster, "n2", b)
    lpath = leader_path("/raftpay", cluster)
    wait_until(lambda: leader_id(observer, lpath) == "n1", 1.0, "n1 leads")

    # n2 wins term 4 while n1 still believes it leads (a deposed leader does not know yet).
    b.update(role="leader", term=4)
    wait_until(lambda: leader_id(observer, lpath) == "n2", 1.0, "n2 takes over")
    assert observer.exists(lpath).ephemeralOwner == mb.client.client_id[0]

    # The stale n1 keeps claiming term 3: it must back off, and say why.
    blocked = wait_until(
        lambda: ma.status()["leader_blocked_by"], 2.0, "n1 to notice the higher-term holder"
    )
    assert blocked["node_id"] == "n2" and blocked["term"] == 4
    assert read_json(observer, lpath)["node_id"] == "n2"

    # n1 learns it was deposed: stepping down must not delete n2's znode.
    a.update(role="follower", term=4)
    calls = ma.status()["status_calls"]
    wait_until(lambda: ma.status()["status_calls"] >= calls + 3, 2.0, "n1 to run a few ticks")
    n1_path = f"{members_path('/raftpay', cluster)}/n1"
    wait_until(
        lambda: read_json(observer, n1_path)["role"] == "follower", 1.0, "n1 to say follower"
    )
    assert read_json(observer, lpath) == {
        "node_id": "n2", "client_addr": "127.0.0.1:7102", "term": 4,
    }


def test_writes_only_on_change(zk_standalone, observer, mirrors, cluster):  # noqa: F811
    a = view("127.0.0.1:7101", "leader", 1)
    # Resync (a full read-back) every 0.2 s: reads, but still no writes.
    m = mirrors(zk_standalone.hosts, cluster, "n1", a, interval_s=0.05, resync_s=0.2)
    wait_until(lambda: m.status()["in_sync"], 2.0, "first sync")
    writes = m.status()["writes"]
    calls = m.status()["status_calls"]
    wait_until(lambda: m.status()["status_calls"] >= calls + 10, 2.0, "ten more ticks")
    assert m.status()["writes"] == writes
    a["term"] = 2
    wait_until(lambda: m.status()["writes"] >= writes + 2, 1.0, "member and leader rewritten")
    calls = m.status()["status_calls"]
    wait_until(lambda: m.status()["status_calls"] >= calls + 5, 2.0, "five more ticks")
    assert m.status()["writes"] == writes + 2
    mstat = observer.exists(f"{members_path('/raftpay', cluster)}/n1")
    assert mstat.version == 1  # created once, set once: no churn


def test_bad_status_fn_is_recorded_and_survived(zk_standalone, observer, cluster):  # noqa: F811
    state = {"fail": True}

    def status_fn():
        if state["fail"]:
            raise RuntimeError("node not ready")
        return view("127.0.0.1:7101")

    m = ZkMirror(zk_standalone.hosts, cluster, "n1", status_fn).start()
    try:
        wait_until(lambda: "node not ready" in (m.status()["last_error"] or ""), 2.0, "the error")
        assert observer.exists(f"{members_path('/raftpay', cluster)}/n1") is None
        state["fail"] = False
        wait_until(
            lambda: observer.exists(f"{members_path('/raftpay', cluster)}/n1"), 1.0, "member znode"
        )
    finally:
        m.stop()


def test_invalid_names_rejected():
    with pytest.raises(ValueError):
        ZkMirror("127.0.0.1:1", "a/b", "n1", dict)
    with pytest.raises(ValueError):
        ZkMirror("127.0.0.1:1", "c", "", dict)
    with pytest.raises(ValueError):
        ZkMirror("127.0.0.1:1", "c", "n1", dict, digest="no-colon")


def test_stop_removes_znodes_at_once(zk_standalone, observer, cluster):  # noqa: F811
    m = ZkMirror(zk_standalone.hosts, cluster, "n1", lambda: view("127.0.0.1:7101", "leader", 1))
    m.start()
    lpath = leader_path("/raftpay", cluster)
    wait_until(lambda: observer.exists(lpath), 1.0, "leader znode")
    t0 = time.monotonic()
    m.stop()
    wait_until(lambda: observer.exists(lpath) is None, 0.5, "leader znode gone on close")
    assert observer.exists(f"{members_path('/raftpay', cluster)}/n1") is None
    assert time.monotonic() - t0 < 0.5  # far below the 4 s session timeout


# --- ZooKeeper trouble ----------------------------------------------------------------------


def test_outage_never_blocks_and_recovers(zk_server, mirrors, cluster):  # noqa: F811
    a = view("127.0.0.1:7101", "leader", 1)
    m = mirrors(zk_server.hosts, cluster, "n1", a)
    watch = LeaderWatch(zk_server.hosts, cluster).start()
    try:
        watch.wait_for_leader(2.0) or pytest.fail("watch saw no leader")

        zk_server.stop()
        wait_until(lambda: not m.status()["connected"], 5.0, "the mirror to notice the outage")

        # The node's side: its status changes, and the calls it makes into the mirror, stay
        # instantaneous while ZooKeeper is gone.
        slowest_s = 0.0
        for term in range(2, 52):
            t = time.perf_counter()
            a.update(term=term, client_addr="127.0.0.1:7201")
            m.status()
            slowest_s = max(slowest_s, time.perf_counter() - t)
        assert slowest_s < 0.05

        # A mirror started during the outage returns at once and connects later.
        b = view("127.0.0.1:7202")
        t = time.perf_counter()
        late = mirrors(zk_server.hosts, cluster, "n2", b)
        assert time.perf_counter() - t < 0.1

        # Its own thread keeps polling status_fn (it is not stuck in a ZooKeeper call).
        calls = m.status()["status_calls"]
        wait_until(lambda: m.status()["status_calls"] >= calls + 5, 3.0, "status_fn polls")
        wait_until(lambda: late.status()["status_calls"] >= 5, 3.0, "status_fn polls (late)")

        zk_server.start()  # returns once the server serves (the JVM's start is not the mirror's)
        t_back = time.monotonic()
        zk = KazooClient(zk_server.hosts)
        zk.start(timeout=10)
        try:
            lpath = leader_path("/raftpay", cluster)
            wait_until(
                lambda: (read_json(zk, lpath) or {}).get("term") == 51, 5.0, "leader at term 51"
            )
            assert read_json(zk, lpath)["client_addr"] == "127.0.0.1:7201"
            base = members_path("/raftpay", cluster)
            wait_until(
                lambda: zk.exists(f"{base}/n2") and read_json(zk, f"{base}/n1")["term"] == 51,
                5.0,
                "both members current",
            )
            recovered_s = time.monotonic() - t_back
            wait_until(
                lambda: watch.leader is not None and watch.leader.term == 51,
                5.0,
                "the watch to catch up",
            )
            assert recovered_s < 5.0
            print(f"mirror correct {recovered_s:.2f} s after ZooKeeper restarted")
        finally:
            zk.stop()
            zk.close()
    finally:
        watch.stop()


MIRROR_CHILD = """
import sys, threading
from raftpay.zk.mirror import ZkMirror
status = {"client_addr": "127.0.0.1:7101", "role": "leader", "term": 5}
ZkMirror(sys.argv[1], sys.argv[2], "n1", lambda: status, session_timeout_s=1.0).start()
print("started", flush=True)
threading.Event().wait()
"""


def test_killed_process_expires_and_higher_term_replaces_it(
    zk_standalone, observer, mirrors, cluster  # noqa: F811
):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    child = subprocess.Popen(
        [sys.executable, "-c", MIRROR_CHILD, zk_standalone.hosts, cluster],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "started"
        lpath = leader_path("/raftpay", cluster)
        mpath = f"{members_path('/raftpay', cluster)}/n1"
        wait_until(lambda: observer.exists(lpath) and observer.exists(mpath), 5.0, "child's znodes")
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        killed_at = time.monotonic()

        # The next leader (higher term) does not wait for the dead one's session to expire.
        mirrors(zk_standalone.hosts, cluster, "n2", view("127.0.0.1:7102", "leader", 6))
        wait_until(lambda: leader_id(observer, lpath) == "n2", 1.0, "n2 leads")
        replaced_s = time.monotonic() - killed_at

        # The dead node's member znode goes with its session (1 s, plus up to a tick).
        wait_until(lambda: observer.exists(mpath) is None, 5.0, "the dead member to expire")
        expired_s = time.monotonic() - killed_at
        assert replaced_s < expired_s
        assert 0.5 < expired_s < 3.0
        print(f"leader replaced after {replaced_s:.2f} s, dead member gone after {expired_s:.2f} s")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_session_expiry_recreates_znodes(zk_standalone, observer, mirrors, cluster):  # noqa: F811
    m = mirrors(zk_standalone.hosts, cluster, "n1", view("127.0.0.1:7101", "leader", 7))
    lpath = leader_path("/raftpay", cluster)
    mpath = f"{members_path('/raftpay', cluster)}/n1"
    wait_until(lambda: observer.exists(lpath) and observer.exists(mpath), 1.0, "znodes")
    old_session = m.client.client_id[0]

    # Expire the mirror's session the way kazoo's own tests do: a second client attaches to the
    # same session id and closes it.  The server drops the ephemerals at once.
    thief = KazooClient(zk_standalone.hosts, client_id=m.client.client_id)
    thief.start(timeout=10)
    thief.stop()
    thief.close()

    def rewritten():
        stat = observer.exists(mpath)
        lstat = observer.exists(lpath)
        return (
            stat is not None and lstat is not None
            and stat.ephemeralOwner not in (0, old_session)
            and lstat.ephemeralOwner == stat.ephemeralOwner
        )

    wait_until(rewritten, 5.0, "znodes re-created under a new session")
    assert m.status()["session_id"] != f"{old_session:#x}"
    assert read_json(observer, lpath) == {
        "node_id": "n1", "client_addr": "127.0.0.1:7101", "term": 7,
    }


# --- ACLs and the client side ---------------------------------------------------------------


def test_digest_acl_world_can_read_not_write(zk_standalone, observer, mirrors):  # noqa: F811
    # Own root: the ACL is set on the parents the mirror creates, which the shared root already has.
    root = f"/acl-{uuid.uuid4().hex[:8]}"
    mirrors(zk_standalone.hosts, "c", "n1", view("127.0.0.1:7101", "leader", 1),
            root=root, digest="raftpay:s3cret")
    lpath, base = leader_path(root, "c"), members_path(root, "c")
    wait_until(lambda: observer.exists(lpath), 1.0, "leader znode")

    # `observer` has no credentials: it reads everything...
    assert read_json(observer, lpath)["node_id"] == "n1"
    assert observer.get_children(base) == ["n1"]
    # ...and can change nothing.
    with pytest.raises(NoAuthError):
        observer.set(lpath, b"{}")
    with pytest.raises(NoAuthError):
        observer.delete(f"{base}/n1")
    with pytest.raises(NoAuthError):
        observer.create(f"{base}/intruder", b"{}")
    with pytest.raises(NoAuthError):
        observer.delete(lpath)

    # The user named in the digest can.
    owner = KazooClient(zk_standalone.hosts, auth_data=[("digest", "raftpay:s3cret")])
    owner.start(timeout=10)
    try:
        owner.create(f"{base}/probe", b"{}", ephemeral=True)
    finally:
        owner.stop()
        owner.close()

    # LeaderWatch needs no credentials to follow it.
    with LeaderWatch(zk_standalone.hosts, "c", root=root) as watch:
        assert watch.leader == LeaderInfo("n1", "127.0.0.1:7101", 1)


def test_leader_watch_follows_changes(zk_standalone, mirrors, cluster):  # noqa: F811
    seen: list[LeaderInfo | None] = []
    seen_lock = threading.Lock()

    def on_change(leader):
        with seen_lock:
            seen.append(leader)

    with LeaderWatch(zk_standalone.hosts, cluster, on_change=on_change) as watch:
        assert watch.leader is None
        assert watch.members() == []
        a, b = view("127.0.0.1:7101"), view("127.0.0.1:7102")
        mirrors(zk_standalone.hosts, cluster, "n1", a)
        mirrors(zk_standalone.hosts, cluster, "n2", b)
        wait_until(lambda: len(watch.members()) == 2, 1.0, "two members")
        assert watch.members() == ["127.0.0.1:7101", "127.0.0.1:7102"]
        assert watch.member_records()["n2"]["role"] == "follower"

        a.update(role="leader", term=1)
        assert watch.wait_for_leader(1.0) == LeaderInfo("n1", "127.0.0.1:7101", 1)

        a.update(role="follower", term=2)
        b.update(role="leader", term=2)
        got = watch.wait_for_leader(1.0, lambda info: info.node_id == "n2")
        assert got == LeaderInfo("n2", "127.0.0.1:7102", 2)

        b.update(role="follower", term=3)
        wait_until(lambda: watch.leader is None, 1.0, "no leader")
        with seen_lock:
            history = [s.node_id if s else None for s in seen]
        # First call reports the initial state; a change may pass through "no leader" while the
        # old leader steps down before the new one claims it.
        assert history[0] is None and history[-1] is None
        assert [h for h in history if h] == ["n1", "n2"]


def test_leader_watch_start_fails_fast_without_zookeeper():
    from raftpay.zk import ZkUnavailable
    from zk_fixtures import free_ports

    port = free_ports(1)[0]
    t = time.monotonic()
    with pytest.raises(ZkUnavailable):
        LeaderWatch(f"127.0.0.1:{port}", "c").start(timeout_s=0.5)
    assert time.monotonic() - t < 2.0


def test_core_imports_without_kazoo():
    code = (
        "import sys; sys.modules['kazoo'] = None\n"
        "import raftpay.codes\n"
        "try:\n"
        "    import raftpay.zk\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert "pip install 'raftpay[zk]'" in out.stdout, out.stderr


# --- the ensemble fixture -------------------------------------------------------------------


def test_ensemble_survives_losing_its_leader(zk_ensemble, mirrors, cluster):  # noqa: F811
    modes = sorted(s.mode() for s in zk_ensemble.servers)
    assert modes == ["follower", "follower", "leader"]

    status = view("127.0.0.1:7101", "leader", 1)
    m = mirrors(zk_ensemble.hosts, cluster, "n1", status)
    zk = KazooClient(zk_ensemble.hosts)
    zk.start(timeout=10)
    try:
        lpath = leader_path("/raftpay", cluster)
        wait_until(lambda: zk.exists(lpath), 2.0, "leader znode")

        old = zk_ensemble.leader()
        old.kill()
        new = zk_ensemble.wait_quorum(20.0, expect=2)
        assert new is not old and new.mode() == "leader"

        # Both clients fail over to a surviving server and keep their sessions.
        zk.retry(zk.create, f"/probe-{cluster}", b"x")
        status["term"] = 2
        wait_until(lambda: (read_json(zk, lpath) or {}).get("term") == 2, 5.0, "mirror writes on")
        assert m.status()["connected"]

        old.start()
        zk_ensemble.wait_quorum(20.0, expect=3)
    finally:
        zk.stop()
        zk.close()


def test_a_zookeeper_address_that_is_no_zookeeper_is_named_not_flooded(tmp_path, caplog):
    """`[zk] hosts` naming a raftpay node's client port (a real one here): its replies read as
    ended sessions to kazoo, which retried at once, ~10 times a second, each time warning
    "Session has expired" and nothing else.  The client's lines now name the ensemble, a
    streak says what to check, and each kind is said once a minute (with ZooKeeper down too:
    "Connection dropped" came every second)."""
    import logging

    from cluster_fixtures import free_addr, local_cluster
    from raftpay.zk.mirror import make_client
    caplog.set_level(logging.WARNING, logger="raftpay.zk.kazoo")
    with local_cluster(tmp_path, nodes=1) as c:
        c.start()
        c.wait_for_leader()
        for hosts in (c.client_addrs[0], free_addr()):  # no ZooKeeper; nothing listening
            caplog.clear()
            client = make_client(hosts, session_timeout_s=4, op_timeout_s=2)
            client.start_async()
            time.sleep(3)
            client.stop()
            client.close()
            said = [r.getMessage() for r in caplog.records]
            assert said and all(m.startswith(f"ZooKeeper {hosts}: ") for m in said), said
            # Each kind once, however many tries (kazoo tried ~30 times, or 3 with a backoff).
            for kind in ("Session has expired", "Connection dropped"):
                assert sum(m.startswith(f"ZooKeeper {hosts}: {kind}") for m in said) <= 2, said
            streak = [m for m in said if "likely no ZooKeeper; is [zk] hosts a ZooKeeper" in m]
            assert len(streak) == (hosts == c.client_addrs[0]), said
            assert len(said) <= 4, said
