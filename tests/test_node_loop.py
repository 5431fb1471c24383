"""`Node.start(loop=...)`: the Raft group ticking on an asyncio loop, as `raftpay node start`
runs it (one thread for the client server and Raft), and the transport fix that goes with it.

Three nodes share one event loop running in a helper thread; the tests talk to them from the test
thread through the node's thread-safe API, so every call crosses threads as a server's would not.
Real TCP on 127.0.0.1; every wait is a deadline on a condition.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from raftpay import node as rn
from raftpay.codes import Code

from test_node import Cluster, Result, payload, propose, wait_for


class LoopThread:
    """An asyncio loop in a daemon thread; `call(fn)` runs fn on it and returns its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class LoopCluster(Cluster):
    """`test_node.Cluster` whose nodes start on one shared loop."""

    def __init__(self, root, lt: LoopThread, **kw):
        super().__init__(root, **kw)
        self.lt = lt

    def start(self, *ids, **kw):
        for i in ids or self.ids:
            n = self.nodes[i] = self.make(i, **kw)
            self.lt.call(n.start, self.lt.loop)
        return self


@pytest.fixture
def loop_cluster(tmp_path):
    lt = LoopThread()
    made = []

    def make(**kw):
        c = LoopCluster(str(tmp_path), lt, **kw)
        made.append(c)
        return c
    try:
        yield make
    finally:
        for c in made:
            c.stop()
        lt.close()


def test_loop_nodes_replicate_and_run_no_thread_of_their_own(loop_cluster):
    before = {t.name for t in threading.enumerate()}
    c = loop_cluster().start()
    leader = c.leader()
    assert leader.runs_on(c.lt.loop) and not leader.runs_on(asyncio.new_event_loop())
    assert not any(t.name.startswith("raft-") for t in threading.enumerate()
                   if t.name not in before)
    seen = []
    r = Result()
    # The callback runs on the loop's thread.
    leader.propose(payload({"type": "register_session"}),
                   lambda *a: (seen.append(threading.current_thread()), r(*a)))
    code, replies, index = r.get()
    assert code == Code.OK and replies[0]["code"] == 0 and index > 0
    assert seen == [c.lt.thread]
    c.converged()


def test_loop_nodes_reconnect_after_a_peer_restarts(loop_cluster):
    """Upstream closes a socket before it unsubscribes it; the loop poller must not fail there,
    or the connection is never re-opened and the restarted node never catches up."""
    c = loop_cluster().start()
    leader = c.leader()
    follower = c.followers()[0]
    fid = follower.node_id
    c.stop(fid)
    for _ in range(3):
        assert propose(leader, {"type": "register_session"})[0] == Code.OK
    c.start(fid)
    assert propose(c.leader(), {"type": "register_session"})[0] == Code.OK
    c.converged(timeout_s=15)
    # And once more with the leader: a new one is elected among the loop nodes.
    old = c.leader().node_id
    c.stop(old)
    new = wait_for(lambda: next((n for n in c.running() if n.is_leader()), None), 15,
                   "a new leader")
    assert new.node_id != old
    assert propose(new, {"type": "register_session"})[0] == Code.OK


def test_loop_node_stops_from_another_thread_and_answers_what_is_pending(loop_cluster):
    c = loop_cluster(ids=("a",)).start()
    n = c.leader()
    n.stop()
    r = Result()
    n.propose(payload({"type": "tick"}), r)
    assert r.get()[0] in (Code.NOT_LEADER, Code.NO_LEADER)
    assert not n.is_leader() and n.status()["running"] is False
    c.nodes.pop("a")


def test_loop_poller_survives_upstreams_close_then_unsubscribe():
    """The order upstream uses in TcpConnection.disconnect: close the socket, then unsubscribe
    it.  Then the fd number is reused by a new socket, which must work normally."""
    lt = LoopThread()
    try:
        events = []
        poller = rn._LoopPoller(lt.loop, lambda: events.append("tick"), events.append)
        a, b = socket.socketpair()
        got = threading.Event()

        def on_event(fd, ev):
            events.append(ev)
            got.set()
        mask = rn.POLL_EVENT_TYPE.READ | rn.POLL_EVENT_TYPE.WRITE | rn.POLL_EVENT_TYPE.ERROR
        fd = a.fileno()
        lt.call(poller.subscribe, fd, on_event, mask)
        assert got.wait(5) and rn.POLL_EVENT_TYPE.WRITE in events and "tick" in events
        a.close()
        lt.call(poller.unsubscribe, fd)  # must not raise
        c, d = socket.socketpair()
        try:
            got.clear()
            events.clear()
            lt.call(poller.subscribe, c.fileno(), on_event, rn.POLL_EVENT_TYPE.READ)
            d.send(b"x")
            assert got.wait(5) and events[0] == rn.POLL_EVENT_TYPE.READ
            lt.call(poller.unsubscribe, c.fileno())
        finally:
            c.close()
            d.close()
        b.close()
    finally:
        lt.close()
