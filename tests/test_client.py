"""The client's sans-I/O core (`raftpay.client._Core`): what it sends, how long it waits between
attempts, and what it concludes — driven by hand, no sockets and no sleeping."""

from __future__ import annotations

import re

import pytest

from raftpay import client as rc
from raftpay import wire
from raftpay.codes import Code, OutcomeUnknown, RequestRejected, Unavailable


def _reply(step: rc._Send, code: int, **fields) -> wire.Envelope:
    return wire.decode(wire.reply(step.rid, code, **fields)[wire.PREFIX_BYTES:])


def _core(**kw) -> rc._Core:
    args = dict(timeout_s=10.0, max_redirects=5, attempt_timeout_s=1.0, use_session=False)
    args.update(kw)
    return rc._Core("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", **args)


def test_a_client_refuses_timeouts_that_could_never_end_or_never_start():
    for kw, words in (({"timeout_s": float("nan")}, "timeout_s must be a positive"),
                      ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": -1}, "timeout_s"),
                      ({"timeout_s": "10"}, "timeout_s"), ({"timeout_s": float("inf")}, "got inf"),
                      ({"attempt_timeout_s": float("nan")}, "attempt_timeout_s"),
                      ({"max_redirects": -1}, "max_redirects must be an int >= 0"),
                      ({"max_redirects": 1.5}, "max_redirects")):
        with pytest.raises(ValueError, match=words):
            _core(**kw)
        with pytest.raises(ValueError, match=words):
            rc.Client("127.0.0.1:1", **kw)
    assert _core(timeout_s=0.5, attempt_timeout_s=1, max_redirects=0).timeout_s == 0.5


def test_pauses_during_an_election_stay_short():
    """While no node knows a leader every answer is no_leader.  The pauses grow, but never past
    MAX_BACKOFF_S plus half of it, so a client is back within ~0.15 s of a new leader."""
    gen = _core().call("lookup_accounts", {"ids": ["a"], "consistency": "linearizable"})
    step = next(gen)
    pauses = []
    while len(pauses) < 30:
        if isinstance(step, rc._Sleep):
            pauses.append(step.seconds)
            step = gen.send(None)
        else:
            step = gen.send(_reply(step, Code.NO_LEADER, message="election"))
    assert pauses[0] < 0.01
    assert max(pauses) <= 0.15 and max(pauses) <= 1.5 * rc.MAX_BACKOFF_S
    assert pauses[-1] >= rc.MAX_BACKOFF_S  # it does back off, to the cap
    gen.close()


def test_a_redirect_is_followed_at_once_and_remembered():
    core = _core()
    gen = core.call("lookup_accounts", {"ids": ["a"], "consistency": "linearizable"})
    step = next(gen)
    first = step.addr
    leader = next(a for a in core.seeds if a != first)
    step = gen.send(_reply(step, Code.NOT_LEADER, leader=leader))
    assert isinstance(step, rc._Send) and step.addr == leader  # no pause before a redirect
    with pytest.raises(StopIteration) as done:
        gen.send(_reply(step, Code.OK, accounts=[None], version=3))
    assert done.value.value["accounts"] == [None] and core.leader == leader


def test_a_redirect_to_a_malformed_address_is_not_followed():
    core = _core()
    gen = core.call("lookup_accounts", {"ids": ["a"], "consistency": "linearizable"})
    step = next(gen)
    for bad in ("nonsense", 7, None, "host:", ":1"):
        while isinstance(step, rc._Sleep):
            step = gen.send(None)
        step = gen.send(_reply(step, Code.NOT_LEADER, leader=bad))
        assert core.leader is None
        while isinstance(step, rc._Sleep):
            step = gen.send(None)
        assert step.addr in core.seeds  # a seed, not the bad hint
    gen.close()


def test_a_write_whose_reply_is_lost_ends_outcome_unknown():
    gen = _core(timeout_s=0.05).call("submit", {"events": [{"op": "create_account"}]})
    step = next(gen)
    with pytest.raises(OutcomeUnknown):
        while True:
            if isinstance(step, rc._Sleep):
                step = gen.send(None)
            else:
                step = gen.send(rc._Failed(ConnectionResetError(), sent=True))



def _answer_overloaded(gen, step, clock: list, answer_s: float) -> int:
    """Drive `gen` on a fake clock: every attempt answered `overloaded` after `answer_s`, every
    pause slept; returns the attempts sent, or raises what the call raises at its end."""
    sends = 0
    try:
        while True:
            if isinstance(step, rc._Sleep):
                clock[0] += step.seconds
                step = gen.send(None)
            else:
                sends += 1
                clock[0] += answer_s
                step = gen.send(_reply(step, Code.OVERLOADED, message="queue full"))
    except (Unavailable, OutcomeUnknown) as e:
        e.sends = sends
        raise


def test_a_write_is_not_sent_again_when_the_deadline_would_cut_it_short(monkeypatch):
    """Answers that take 0.2 s, `overloaded` (nothing applied): with less than twice that left,
    a write is not sent again, since cut short by the deadline its outcome would be unknown.
    The call ends `unavailable`, saying why.  Answered at once, it retries to the end; and so
    it does once an attempt may have applied it: the outcome is unknown anyway, and an
    attempt answered in time can only settle it."""
    clock = [1000.0]
    monkeypatch.setattr(rc.time, "monotonic", lambda: clock[0])
    body = {"events": [{"op": "create_account"}]}

    gen = _core(timeout_s=1.0).call("submit", body)
    with pytest.raises(Unavailable) as err:
        _answer_overloaded(gen, next(gen), clock, 0.2)
    # 0.2 s each, after pauses of 5, 10 and 20 ms (+ up to half of each): sent at 0, ~0.21 and
    # ~0.42 s; at 0.635-0.653 s less than 0.4 s (twice 0.2 s) is left.
    assert err.value.sends == 3 and 1000.63 <= clock[0] < 1000.66, (err.value.sends, clock[0])
    assert re.search(r"queue full; not sent again with 0\.[34] s left, as nodes took up to "
                     r"0\.2 s to answer", str(err.value)), str(err.value)

    clock[0] = 1000.0
    gen = _core(timeout_s=1.0).call("submit", body)
    with pytest.raises(Unavailable) as err:
        _answer_overloaded(gen, next(gen), clock, 0.0)
    assert err.value.sends > 10 and "not sent again" not in str(err.value)

    clock[0] = 1000.0
    gen = _core(timeout_s=1.0).call("submit", body)
    next(gen)
    step = gen.send(rc._Failed(ConnectionResetError(), sent=True))
    with pytest.raises(OutcomeUnknown) as err:
        _answer_overloaded(gen, step, clock, 0.2)
    assert clock[0] > 1000.9 and err.value.sends >= 3, (clock[0], err.value.sends)


def test_a_read_that_runs_out_of_time_says_why_the_nodes_turned_it_down():
    """A follower read for a version no follower reaches: each answers read_not_ready after its
    wait, and the last attempt, cut short by the client's deadline, times out.  The error names
    the follower's answer, not that timeout; with no answer at all it names the timeout."""
    body = {"ids": ["a"], "consistency": "follower", "min_version": 9}
    for answers, words in ((True, "read_not_ready applied 5 < asked version 9"),
                           (False, "TimeoutError")):
        gen = _core(timeout_s=0.05).call("lookup_accounts", body)
        step, sends = next(gen), 0
        with pytest.raises(Unavailable) as err:
            while True:
                if isinstance(step, rc._Sleep):
                    step = gen.send(None)
                elif sends == 0 and answers:
                    sends += 1
                    step = gen.send(_reply(step, Code.READ_NOT_READY, applied=5,
                                           message="applied 5 < asked version 9; retry"))
                else:
                    sends += 1
                    assert step.timeout_s < 1.0  # cut short by the deadline
                    step = gen.send(rc._Failed(TimeoutError("timed out"), sent=True))
        assert words in str(err.value) and sends >= 2, str(err.value)


def test_a_request_refused_before_sending_gives_its_seq_back():
    """A value the protocol cannot carry raises at once, names the problem, and does not keep
    a session seq outstanding (which would hold the session's ack below it for good)."""
    core = _core(use_session=True)
    core.session = 7
    good = {"events": [{"op": "create_account", "id": 1}]}
    gen = core.call("submit", good)
    step = next(gen)
    held = core._outstanding.copy()
    assert len(held) == 1
    for bad in ({"events": [{"op": "create_transfer", "amount": 2 ** 64}]},
                {"events": [{"op": "create_account", "id": 1, "user_data": {1, 2}}]}):
        with pytest.raises((ValueError, TypeError), match="outside -2|serialize"):
            next(core.call("submit", bad))
        assert core._outstanding == held  # only the good request, still in flight
    with pytest.raises(StopIteration):
        gen.send(_reply(step, Code.OK, results=[0]))
    assert not core._outstanding


def test_a_retried_write_is_packed_at_most_twice_and_sent_with_its_session_fields(monkeypatch):
    """An `overloaded` leader is retried with the same body under a new request id each time.
    The body is packed by the first attempt and once more for the retries, whatever their
    number (a large batch costs ms to pack), and each frame still carries the session's current
    ack: it moves up when an earlier request of the session ends."""
    packs = []
    real_encode, real_packed = wire.encode, wire.PackedBody
    monkeypatch.setattr(wire, "encode", lambda type, *a, **k: (
        type == "submit" and packs.append("encode")) or real_encode(type, *a, **k))
    monkeypatch.setattr(wire, "PackedBody", lambda b: packs.append("body") or real_packed(b))
    core = _core(use_session=True)
    core.session = 7
    first = core.call("submit", {"events": [{"op": "create_account", "id": 1}]})
    first_step = next(first)
    packs.clear()
    body = {"events": [{"op": "create_account", "id": 2}]}
    gen = core.call("submit", body)
    step, sent = next(gen), []
    while len(sent) < 6:
        if isinstance(step, rc._Sleep):
            step = gen.send(None)
            continue
        env = wire.decode(step.frame[wire.PREFIX_BYTES:])
        sent.append(env)
        if len(sent) == 3:  # the session's first request ends: its ack moves past it
            with pytest.raises(StopIteration):
                first.send(_reply(first_step, Code.OK, results=[0]))
        step = gen.send(_reply(step, Code.OVERLOADED, message="queue full"))
    gen.close()
    assert packs == ["encode", "body"]
    assert len({env.id for env in sent}) == 6
    assert [env.body["ack"] for env in sent] == [1, 1, 1, 2, 2, 2]
    for env in sent:
        assert env.body == dict(body, session=7, seq=2, ack=env.body["ack"])


# --- the async client's connection (`_AsyncConn`), over a recording transport ------------------

class _Transport:
    """Records what the connection writes; stands in for an asyncio transport."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True


def _conn():
    conn = rc._AsyncConn(wire.MAX_FRAME_BYTES)
    transport = _Transport()
    conn.connection_made(transport)
    return conn, transport


def _run(coro):
    import asyncio
    return asyncio.run(coro)


def test_a_lone_request_is_written_at_once_and_a_burst_in_one_write():
    import asyncio

    async def go():
        conn, t = _conn()
        f1 = conn.request(1, b"one", 5.0)
        assert t.writes == [b"one"]  # nothing else in flight: no extra loop pass
        f2 = conn.request(2, b"two", 5.0)
        f3 = conn.request(3, b"three", 5.0)
        assert t.writes == [b"one"]
        await asyncio.sleep(0)
        assert t.writes == [b"one", b"twothree"]  # the burst left in one send
        # Replies in any order, several per read, find their requests.
        conn.data_received(wire.reply(3, Code.OK, n=3) + wire.reply(1, Code.OK, n=1))
        conn.data_received(wire.reply(2, Code.OK, n=2))
        got = [(await f).body["n"] for f in (f1, f2, f3)]
        assert got == [1, 2, 3] and conn.waiters == {}
        conn.close()

    _run(go())


def test_deadlines_share_one_timer_and_an_earlier_one_rearms_it():
    import asyncio

    async def go():
        conn, _ = _conn()
        slow = conn.request(1, b"a", 5.0)
        timer = conn._timer
        conn.request(2, b"b", 5.0)
        assert conn._timer is timer  # a later deadline needs no timer of its own
        fast = conn.request(3, b"c", 0.05)
        assert conn._timer is not timer  # an earlier one re-arms it
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fast, 2.0)  # failed by the shared timer, not after 5 s
        assert not slow.done() and set(conn.waiters) == {1, 2}
        assert conn._timer is not None and conn._timer_at > asyncio.get_running_loop().time()
        conn.data_received(wire.reply(1, Code.OK))
        assert (await slow).body["code"] == Code.OK
        conn.close()

    _run(go())


def test_a_broken_connection_fails_every_request_and_its_timer():
    import asyncio

    async def go():
        conn, t = _conn()
        futs = [conn.request(i, b"x", 5.0) for i in range(1, 4)]
        await asyncio.sleep(0)
        conn.connection_lost(ConnectionResetError("reset"))
        for f in futs:
            with pytest.raises(ConnectionResetError):
                await f
        assert conn._timer is None and t.closed and conn.closed
        with pytest.raises(ConnectionError):
            conn.request(9, b"y", 5.0)  # refused at once, nothing written
        assert b"y" not in b"".join(t.writes)

    _run(go())


def test_a_garbled_reply_stream_fails_the_connection():
    import asyncio

    async def go():
        conn, t = _conn()
        fut = conn.request(1, b"x", 5.0)
        conn.data_received(b"\x00\x00\x00\x02\xc1\xc1")  # a frame that is not msgpack
        with pytest.raises(Exception):
            await fut
        assert conn.closed and t.closed

    _run(go())


class _RecordingApi(rc._Api):
    """The client's request builders over a transport that records what it is handed and
    answers `ok` for every event."""

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []

    def _call(self, kind, body, addr=None):
        self.sent.append((kind, body))
        return {"code": 0, "results": [0] * len(body.get("events") or body["rows"])}

    def _map(self, value, fn):
        return fn(value)


def _sent_body(events) -> dict:
    """The body `_Api.submit` hands its transport for `events`."""
    api = _RecordingApi()
    api.submit(events)
    return api.sent[0][1]


def test_a_batch_of_like_events_is_sent_compact_and_others_as_events():
    like = [{"op": "create_transfer", "id": i, "debit_account_id": 1, "credit_account_id": 2,
             "amount": 1, "currency": 840} for i in range(wire.ROWS_MIN_EVENTS)]
    body = _sent_body(like)
    assert set(body) == {"keys", "rows"}
    assert [dict(zip(body["keys"], row)) for row in body["rows"]] == like
    env = wire.decode(wire.encode("submit", 1, body)[wire.PREFIX_BYTES:])
    wire.validate_request(env)  # what the node will check
    assert _sent_body(like[:-1]) == {"events": like[:-1]}  # too few to bother
    mixed = like[:-1] + [dict(like[0], user_data=5)]  # one event with another field
    assert _sent_body(mixed) == {"events": mixed}


def test_submit_answers_a_code_member_per_event_and_refuses_an_unknown_code():
    results = {"codes": None}

    class _Api(rc._Api):
        def _call(self, kind, body, addr=None):
            return {"code": 0, "results": results["codes"]}

        def _map(self, value, fn):
            return fn(value)

    events = [{"op": "create_transfer", "id": i} for i in range(8000)]
    results["codes"] = [int(Code.OK), int(Code.EXISTS)] * 4000
    out = _Api().submit(events)
    assert out == [Code.OK, Code.EXISTS] * 4000
    assert all(type(c) is Code for c in out)  # members, not the ints of the reply
    for bad, named in ((65535, "65535 for event 1"), ("ok", "'ok' for event 1"),
                       ([0], "[0] for event 1"), (None, "None for event 1")):
        results["codes"] = [0, bad]
        with pytest.raises(rc.ProtocolError, match=re.escape(named) + ".*same ids is safe"):
            _Api().submit(events[:2])
    for bad in (None, 7, {"0": 0}):
        results["codes"] = bad
        with pytest.raises(rc.ProtocolError, match="instead of a list"):
            _Api().submit(events[:2])


def test_a_refusal_names_its_code_even_one_this_client_does_not_know():
    for code, named in ((Code.INVALID_REQUEST, "invalid_request: bad"),
                        (4242, "code_4242: bad")):
        gen = _core().call("submit", {"events": []})
        step = next(gen)
        with pytest.raises(RequestRejected, match=named) as refused:
            gen.send(_reply(step, code, message="bad"))
        assert refused.value.code == code
    # and the last problem an `Unavailable` reports, for codes it retries
    gen = _core(timeout_s=0.05).call("lookup_accounts", {"ids": [1]})
    step = next(gen)
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1:\d: no_leader election"):
        while True:
            step = (gen.send(None) if isinstance(step, rc._Sleep)
                    else gen.send(_reply(step, Code.NO_LEADER, message="election")))


def test_the_cli_says_outcome_unknown_for_a_reply_it_cannot_read():
    """A node cannot be made to answer a code this client does not know, so a loopback
    stand-in answers every request with one (a newer server's, say)."""
    import socket
    import threading

    from click.testing import CliRunner

    from raftpay.cli import EXIT_UNKNOWN, main

    srv = socket.create_server(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % srv.getsockname()[1]

    def serve():
        conn, _ = srv.accept()
        with conn:
            while True:
                try:
                    env = wire.decode(wire.recv_frame(conn, wire.MAX_FRAME_BYTES, 10))
                except Exception:  # the client hung up
                    return
                fields = ({"session": 1} if env.type == "register_session"
                          else {"results": [65535]})
                conn.sendall(wire.reply(env.id, Code.OK, **fields))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = CliRunner().invoke(main, ["transfer", "--cluster", addr, "--id", "t1", "--from",
                                      "a", "--to", "b", "--amount", "1", "--currency", "978"])
    finally:
        t.join(10)
        srv.close()
    assert r.exit_code == EXIT_UNKNOWN, r.output
    assert "not understood" in r.output and "65535 for event 0" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_batch_calls_refuse_what_is_not_a_list_of_dicts_before_sending():
    api = _RecordingApi()
    sent = api.sent
    for call in (api.create_accounts, api.create_transfers):
        name = call.__name__
        for bad, words in (({"id": 1}, "takes a list of dicts, got dict"),
                           ("abc", "takes a list of dicts, got str"), (7, "got int"),
                           ([{"id": 1}, None], "item 1 is NoneType, not a dict"),
                           ([1], "item 0 is int")):
            with pytest.raises(TypeError, match=f"{name}.*{words}"):
                call(bad)
    with pytest.raises(TypeError, match="submit takes a list of dicts, got dict"):
        api.submit({"op": "create_account", "id": 1, "currency": 1})
    for call in (api.lookup_accounts, api.lookup_transfers):
        # "alice" would be read as five ids, one per letter, and answered as five.
        for bad, words in (("alice", "got str"), (b"alice", "got bytes"), (7, "got int"),
                           ({"alice": 1}, "got dict")):
            with pytest.raises(TypeError, match=f"{call.__name__} takes a list of ids, {words}"):
                call(bad)
    assert sent == []  # nothing went out
    assert api.create_accounts(({"id": i, "currency": 1} for i in (1, 2))) == [Code.OK] * 2
    with pytest.raises(ValueError, match="status: address 'nonsense' is not host:port"):
        api.status(addr="nonsense")
    assert len(sent) == 1


def test_addresses_are_read_as_a_node_config_reads_them_and_ipv6_connects():
    """Seeds, redirect hints and status addresses go through `config.parse_addr`: a port past
    65535 or a bare IPv6 address is refused when the client is made, and "[::1]:port" (what a
    config with an IPv6 client address hands out) connects, blocking and async."""
    import asyncio
    import socket
    import threading

    for bad, words in (("127.0.0.1:99999", "port '99999' is not in 1..65535"),
                       ("127.0.0.1:0", "port '0'"), ("::1:7001", r"write IPv6 as"),
                       ("a b:1", "bad host")):
        with pytest.raises(ValueError, match=words):
            rc.parse_seeds(bad)
    srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    addr = "[::1]:%d" % srv.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                env = wire.decode(wire.recv_frame(conn, wire.MAX_FRAME_BYTES, 10))
                conn.sendall(wire.reply(env.id, Code.OK, status={"id": "v6"}))

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    async def via_async():
        async with rc.AsyncClient(addr, timeout_s=5) as c:
            return await c.status(addr=addr)
    try:
        with rc.Client(addr, timeout_s=5) as c:
            assert c.status(addr=addr) == {"id": "v6"}
        assert asyncio.run(via_async()) == {"id": "v6"}
    finally:
        t.join(10)
        srv.close()
