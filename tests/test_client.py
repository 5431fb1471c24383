"""The client's sans-I/O core (`raftpay.client._Core`): what it sends, how long it waits between
attempts, and what it concludes — driven by hand, no sockets and no sleeping."""

from __future__ import annotations

import pytest

from raftpay import client as rc
from raftpay import wire
from raftpay.codes import Code, OutcomeUnknown


def _reply(step: rc._Send, code: int, **fields) -> wire.Envelope:
    return wire.decode(wire.reply(step.rid, code, **fields)[wire.PREFIX_BYTES:])


def _core(**kw) -> rc._Core:
    args = dict(timeout_s=10.0, max_redirects=5, attempt_timeout_s=1.0, use_session=False)
    args.update(kw)
    return rc._Core("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", **args)


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


def test_a_write_whose_reply_is_lost_ends_outcome_unknown():
    gen = _core(timeout_s=0.05).call("submit", {"events": [{"op": "create_account"}]})
    step = next(gen)
    with pytest.raises(OutcomeUnknown):
        while True:
            if isinstance(step, rc._Sleep):
                step = gen.send(None)
            else:
                step = gen.send(rc._Failed(ConnectionResetError(), sent=True))
