"""The compact form of a submit (`keys` + `rows`, see `raftpay.ledger.events_as_rows`): applying
it must give the same results and the same state as applying the events themselves, whatever
the events are — good, bad, linked, duplicated — since the leader's server picks the form and
the followers' ledgers must not be able to tell."""

from __future__ import annotations

import random

import msgpack
import pytest

from raftpay.codes import Code
from raftpay.ledger import Ledger, events_as_rows, rows_as_events

KEY_SETS = [
    ("op", "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags"),
    ("op", "id", "debit_account_id", "credit_account_id", "amount", "currency"),
    ("id", "op", "amount", "currency", "credit_account_id", "debit_account_id", "user_data"),
    ("op", "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
     "user_data"),
    ("op", "id", "debit_account_id", "credit_account_id", "amount"),  # no currency
    ("op", "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
     "pending_id", "timeout"),  # keys the fast path never takes
    ("op", "id", "currency", "flags"),  # accounts
    ("op", "account_id"),  # close_account
]


def _value(key: str, rng: random.Random, ids: list):
    r = rng.random()
    if key == "op":
        return rng.choice(["create_transfer"] * 6 + ["create_account", "close_account", "nope"])
    if key in ("id", "debit_account_id", "credit_account_id", "account_id", "pending_id"):
        if r < 0.75:
            return rng.choice(ids)
        return rng.choice([None, -1, 0, "", "x" * 40, 2 ** 64 - 1, True, 1.5, b"b", [1]])
    if key == "amount":
        return rng.choice([1, 2, 5, 10 ** 6]) if r < 0.8 else rng.choice(
            [0, -3, None, "1", 2 ** 64 - 1, True])
    if key == "currency":
        return 840 if r < 0.85 else rng.choice([1, 0, None, "840", 2 ** 33])
    if key == "flags":
        return 0 if r < 0.6 else rng.choice([1, 1, 2, 4, 8, 16, True, None, -1, 1 << 20, "0"])
    if key == "user_data":
        return rng.randrange(0, 100) if r < 0.7 else rng.choice([None, -1, 2 ** 64 - 1, "u"])
    if key == "timeout":
        return rng.choice([0, 1000, None])
    return None


def _setup(led: Ledger) -> None:
    led.apply({"type": "submit", "events": [
        {"op": "create_account", "id": i, "currency": 840, **({"flags": 2} if i % 5 == 0 else {})}
        for i in range(1, 13)] + [
        {"op": "create_account", "id": f"s{i}", "currency": 840} for i in range(4)] + [
        {"op": "create_account", "id": 99, "currency": 1}]}, 10)
    led.apply({"type": "submit", "events": [
        {"op": "create_transfer", "id": 10 ** 6, "debit_account_id": 1, "credit_account_id": 2,
         "amount": 50, "currency": 840}]}, 20)


@pytest.mark.parametrize("seed", range(300))
def test_rows_apply_exactly_as_their_events(seed):
    rng = random.Random(seed)
    keys = rng.choice(KEY_SETS)
    ids = list(range(1, 14)) + [f"s{i}" for i in range(5)] + [99, 10 ** 6] + \
        [1000 + rng.randrange(30) for _ in range(10)]
    events = [{k: _value(k, rng, ids) for k in keys} for _ in range(rng.randrange(1, 60))]
    compact = events_as_rows(events)
    assert compact is not None and rows_as_events(*compact) == events
    a, b = Ledger(), Ledger()
    _setup(a)
    _setup(b)
    ts = 1000 + rng.randrange(5)
    # Through msgpack, as the log carries them.
    ca = msgpack.unpackb(msgpack.packb({"type": "submit", "events": events}), raw=False)
    cb = msgpack.unpackb(msgpack.packb({"type": "submit", "keys": compact[0],
                                        "rows": compact[1]}), raw=False)
    ra, rb = a.apply(ca, ts), b.apply(cb, ts)
    assert ra == rb
    assert a.state_hash() == b.state_hash()
    # And they go on alike (time, ids, balances).
    nxt = {"type": "submit", "events": [{"op": "create_transfer", "id": 5 * 10 ** 6,
                                         "debit_account_id": 3, "credit_account_id": 4,
                                         "amount": 1, "currency": 840}]}
    assert a.apply(nxt, ts) == b.apply(nxt, ts) and a.state_hash() == b.state_hash()


def test_events_as_rows_only_for_like_dicts():
    assert events_as_rows([]) is None
    assert events_as_rows([{"a": 1}, {"b": 1}]) is None
    assert events_as_rows([{"a": 1, "b": 2}, {"b": 2, "a": 1}]) is None  # order matters
    assert events_as_rows([{"a": 1}, [1]]) is None
    assert events_as_rows([{1: 1}]) is None
    assert events_as_rows([{"a": 1}, {"a": [2]}]) == (["a"], [[1], [[2]]])


@pytest.mark.parametrize("command", [
    {"type": "submit", "keys": "op", "rows": []},
    {"type": "submit", "keys": ["op", "op"], "rows": [[1, 2]]},
    {"type": "submit", "keys": ["op", 1], "rows": [[1, 2]]},
    {"type": "submit", "keys": ["op"], "rows": [[1, 2]]},
    {"type": "submit", "keys": ["op"], "rows": [{"op": 1}]},
    {"type": "submit", "keys": ["op"], "rows": None},
    {"type": "submit", "rows": [["create_transfer"]]},
])
def test_a_malformed_compact_submit_is_refused_and_changes_nothing(command):
    led = Ledger()
    _setup(led)
    before = led.state_hash()
    reply = led.apply(command, 5000)
    assert reply["code"] == Code.INVALID_REQUEST and "keys" in reply["message"]
    # Only log time moved, as for any refused command.
    ref = Ledger()
    _setup(ref)
    ref.apply({"type": "submit", "events": None}, 5000)
    assert led.state_hash() == ref.state_hash() and before != ""
