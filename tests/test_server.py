"""The server's reply path (`raftpay.server`): replies corked while a read or an entry is being
answered leave in one write per connection, in order, and never to a closed connection."""

from __future__ import annotations

from raftpay import server as rs
from raftpay import wire


class _Transport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data) -> None:
        assert not self.closing, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def _server_and_conns(n: int):
    srv = rs.Server(object(), stamp=lambda: 0, client_addr_of=lambda _id: None)
    conns = []
    for _ in range(n):
        conn = rs._Conn(srv)
        conn.transport = _Transport()
        conns.append(conn)
    return srv, conns


def test_corked_replies_leave_in_one_write_per_connection_in_order():
    srv, (a, b) = _server_and_conns(2)
    srv._cork()
    a.write(b"a1")
    b.write(b"b1")
    srv._cork()  # nested: an entry answered while a read is being handled
    a.write(b"a2")
    srv._uncork()
    assert a.transport.writes == [] and b.transport.writes == []  # still inside the outer one
    a.write(b"a3")
    srv._uncork()
    assert a.transport.writes == [b"a1a2a3"]
    assert b.transport.writes == [b"b1"]
    a.write(b"a4")  # uncorked: at once
    assert a.transport.writes == [b"a1a2a3", b"a4"]


def test_replies_held_for_a_connection_that_closes_are_dropped():
    srv, (a, b) = _server_and_conns(2)
    srv._cork()
    a.write(b"lost")
    b.write(b"kept")
    a.close()
    srv._uncork()
    assert a.transport.writes == [] and b.transport.writes == [b"kept"]
    assert srv._corked == [] and a._out == []


def test_a_batch_of_entry_replies_is_one_write(monkeypatch):
    """`_Batcher._answer` (an applied entry's replies) corks around them all."""
    srv, (a, b) = _server_and_conns(2)
    srv._inflight = 5
    for c in (a, b):
        c.pending = 3
    batcher = rs._Batcher(srv)
    items = [({}, 1, a, 9), ({}, 2, b, 9), ({}, 3, a, 9), ({}, 0, None, 9), ({}, 4, a, 9)]
    replies = [{"code": 0, "results": [i]} for i in range(len(items))]
    batcher._answer(items, rs.Code.OK, replies, 42)
    assert len(a.transport.writes) == 1 and len(b.transport.writes) == 1
    fb = wire.FrameBuffer()
    envs = [wire.decode(p) for p in fb.feed(a.transport.writes[0])]
    assert [e.id for e in envs] == [1, 3, 4]
    assert [e.body["results"] for e in envs] == [[0], [2], [4]]
    assert all(e.body["version"] == 42 for e in envs)
    assert srv._inflight == 1 and a.pending == 0 and b.pending == 2


class _LeaderNode:
    def is_leader(self) -> bool:
        return True


def _written_command(events=None, body=None):
    """The command `Server._write` queues for a submit of `events` (with a session), or of
    `body` as given."""
    srv = rs.Server(_LeaderNode(), stamp=lambda: 0, client_addr_of=lambda _id: None)
    got = []

    class _Batcher:
        def add(self, command, rid, conn, size):
            got.append(command)

    srv._batcher = _Batcher()
    if body is None:
        body = {"events": events, "session": 3, "seq": 1, "ack": 1}
    srv._write("submit", body, 9, object(), 100)
    return got[0]


def test_a_large_submit_of_like_events_goes_into_the_entry_compact():
    from raftpay.ledger import rows_as_events
    events = [{"op": "create_transfer", "id": i, "debit_account_id": 1, "credit_account_id": 2,
               "amount": 1, "currency": 840} for i in range(wire.ROWS_MIN_EVENTS)]
    cmd = _written_command(events)
    assert "events" not in cmd and cmd["session"] == 3 and cmd["seq"] == 1
    assert rows_as_events(cmd["keys"], cmd["rows"]) == events


def test_a_submit_sent_compact_goes_into_the_entry_as_it_came():
    keys, rows = ["op", "id"], [["create_account", i] for i in range(3)]
    cmd = _written_command(body={"keys": keys, "rows": rows, "session": 3, "seq": 2})
    assert cmd == {"type": "submit", "keys": keys, "rows": rows, "session": 3, "seq": 2}
    assert cmd["rows"] is rows  # not copied or rebuilt


def test_small_or_mixed_submits_keep_their_events():
    few = [{"op": "create_account", "id": i, "currency": 1} for i in range(3)]
    assert _written_command(few)["events"] is few
    mixed = few * 10 + [{"op": "create_account", "currency": 1, "id": 99}]  # other key order
    assert _written_command(mixed)["events"] is mixed


class _ProposingNode:
    """A leader that records proposals and applies them when the test says so."""

    def __init__(self, loop):
        self.loop = loop
        self.proposals: list = []  # (commands, on_result)

    def is_leader(self) -> bool:
        return True

    def runs_on(self, loop) -> bool:
        return loop is self.loop

    def propose(self, payload, on_result, decoded):
        self.proposals.append((decoded[1], on_result))


def test_group_commit_keeps_one_entry_in_flight_and_sends_what_waited_as_the_next():
    """The default: a lone request goes at once; requests that arrive while it is in flight
    wait (however many loop passes go by) and leave together as one entry when it applies."""
    import asyncio

    async def scenario():
        loop = asyncio.get_running_loop()
        node = _ProposingNode(loop)
        srv, (a,) = _server_and_conns(1)
        srv.node, srv._loop = node, loop
        srv._batcher = batcher = rs._Batcher(srv)
        a.pending = srv._inflight = 4
        batcher.add({"type": "submit", "n": 1}, 1, a, 100)
        assert [cmds for cmds, _ in node.proposals] == [[{"type": "submit", "n": 1}]]
        for n in (2, 3, 4):
            batcher.add({"type": "submit", "n": n}, n, a, 100)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(node.proposals) == 1, "a second entry went out while the first was in flight"
        node.proposals[0][1](rs.Code.OK, [{"code": 0, "results": [0]}], 7)
        await asyncio.sleep(0)
        assert [[c["n"] for c in cmds] for cmds, _ in node.proposals] == [[1], [2, 3, 4]]
        assert batcher.inflight == 1 and len(a.transport.writes) == 1  # entry 1's reply
        node.proposals[1][1](rs.Code.OK, [{"code": 0, "results": [0]}] * 3, 8)
        assert batcher.inflight == 0 and srv._inflight == 0 and a.pending == 0

    asyncio.run(scenario())


def test_group_commit_bounds_an_entry_by_the_requests_bytes():
    """An entry holds what waited up to `max_entry_bytes` of requests as they arrived (an
    estimate by event count let a few requests of large fields make one entry of any size,
    in every replica's log and memory); a request larger than the bound goes alone."""
    import asyncio

    async def scenario():
        loop = asyncio.get_running_loop()
        node = _ProposingNode(loop)
        srv, (a,) = _server_and_conns(1)
        srv.node, srv._loop = node, loop
        srv.settings.max_entry_bytes = 1000
        srv._batcher = batcher = rs._Batcher(srv)
        a.pending = srv._inflight = 7
        for n, size in enumerate((10, 400, 400, 400, 5000, 300, 300), 1):
            batcher.add({"type": "submit", "events": [{"n": n}]}, n, a, size)
        for i in range(4):
            await asyncio.sleep(0)
            node.proposals[i][1](rs.Code.OK, [{"code": 0, "results": [0]}] * 2, i + 1)
        await asyncio.sleep(0)
        assert [[c["events"][0]["n"] for c in cmds] for cmds, _ in node.proposals] == [
            [1], [2, 3], [4], [5], [6, 7]]

    asyncio.run(scenario())


def test_writes_beyond_two_entries_waiting_are_refused_overloaded_before_decoding():
    """Writes that wait for the next entry are bounded in bytes (`max_queued_bytes`): one that
    would pass the bound is answered `overloaded` (nothing happened; the client backs off and
    retries) from its head alone, instead of waiting behind the others until its client's
    deadline called its outcome unknown.  An idle leader admits any one request; reads pass."""
    import asyncio

    def frame(rid):
        body = {"events": [{"op": "create_account", "id": 1000 + rid * 100 + i,
                            "currency": 1} for i in range(20)]}  # the same size for every rid
        return wire.encode("submit", rid, body)[4:]

    async def scenario():
        loop = asyncio.get_running_loop()
        node = _ProposingNode(loop)
        srv, (a,) = _server_and_conns(1)
        srv.node, srv._loop = node, loop
        srv._batcher = rs._Batcher(srv)
        size = len(frame(1))
        srv.settings.max_queued_bytes = 2 * size + 10
        for rid in (1, 2, 3, 4):
            srv._dispatch(frame(rid), a)
        await asyncio.sleep(0)
        assert len(node.proposals) == 1 and srv._batcher.queued_bytes == 2 * size
        (refused,) = [wire.decode(w[4:]) for w in a.transport.writes]
        assert refused.id == 4 and refused.body["code"] == rs.Code.OVERLOADED
        assert refused.body["message"] == (f"{2 * size} bytes of writes wait for the log; "
                                           f"nothing was applied, retry shortly")
        read = wire.encode("lookup_accounts", 9, {"ids": [1]})[4:]
        assert srv._overloaded(read, a) is False and len(a.transport.writes) == 1
        # An undecodable head is decoded as usual, and refused for what it is.
        srv._dispatch(b"\x81\xa1x\x01", a)
        assert wire.decode(a.transport.writes[-1][4:]).body["code"] == rs.Code.INVALID_REQUEST
        node.proposals[0][1](rs.Code.OK, [{"code": 0, "results": [0] * 20}], 1)
        await asyncio.sleep(0)
        assert len(node.proposals) == 2 and srv._batcher.queued_bytes == 0
        srv._dispatch(frame(5), a)
        assert srv._batcher.queued_bytes == size  # admitted again

    asyncio.run(scenario())


def test_peek_reads_a_requests_type_and_id_from_its_head_only():
    payload = wire.encode("submit", 2**64 - 1, {"events": [{"x": "y" * 100_000}]})[4:]
    assert wire.peek(payload) == ("submit", 2**64 - 1)
    assert wire.peek(payload[:40]) == ("submit", 2**64 - 1)
    import msgpack
    for other in (b"", b"\xc1", msgpack.packb({"type": "submit", "v": 1, "id": 3, "body": {}}),
                  msgpack.packb({"v": 1, "type": 5, "id": 3, "body": {}}),
                  msgpack.packb({"v": 1, "type": "submit", "id": -1, "body": {}}),
                  msgpack.packb([1, 2, 3])):
        assert wire.peek(other) is None, other


def test_asyncio_says_it_ran_out_of_descriptors_once_a_minute(monkeypatch):
    """asyncio logs every accept that fails for want of descriptors, with a traceback, about a
    hundred a second: one a minute goes through, with a count of the rest."""
    import logging
    clock = [100.0]
    monkeypatch.setattr(rs.time, "monotonic", lambda: clock[0])
    quiet = rs._OncePerMinute("out of system resource")

    def record(msg):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
    said = [quiet.filter(record("socket.accept() out of system resource")) for _ in range(3)]
    assert said == [True, False, False]
    assert quiet.filter(record("something else")) is True
    clock[0] += 61
    again = record("socket.accept() out of system resource")
    assert quiet.filter(again) and "(2 more like it since the last report)" in again.msg
    assert any(isinstance(f, rs._OncePerMinute) for f in logging.getLogger("asyncio").filters)
