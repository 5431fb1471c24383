"""Jepsen-style chaos, the short profile: real node processes, real faults, and checkers that
rely only on what the clients recorded and on the final state.

Two runs of about a minute each (tests/chaos/run.py --profile short does the same from a shell):

* namespace layout — each node in its own network namespace: SIGKILL of the leader, SIGSTOP of
  the leader, the leader isolated by iptables, a one-way partition (the leader hears nobody), a
  restart of the leader with its clock 3 s behind or ahead, a bridge partition, a follower's
  link down, SIGKILL of every node;
* proxy layout — nodes on loopback, Raft traffic through the fault-injecting proxy: delays,
  message loss on the leader's links, a majority/minority partition, a follower killed, a
  clock-skewed restart, duplicated messages.

Each run must keep every acknowledged transfer exactly once, conserve money, keep constrained
accounts non-negative in every read, stay linearizable, keep timestamps increasing, and end with
identical replicas.  A failure prints the seed and the command that replays the schedule, and
the histories and node logs stay under pytest's tmp_path.  Set RAFTPAY_CHAOS_SEED to explore
other schedules.
"""

from __future__ import annotations

import os

import pytest

from chaos import netns
from chaos.run import PROFILES
from chaos.runner import RunConfig, run

SEED = int(os.environ.get("RAFTPAY_CHAOS_SEED", "20261121"))


def _short(topology: str) -> dict:
    return dict(next(p for p in PROFILES["short"] if p["topology"] == topology))


def _run(tmp_path, topology: str):
    spec = _short(topology)
    cfg = RunConfig(out_dir=str(tmp_path / f"chaos-{topology}"), seed=SEED, profile="short",
                    label=f"test-{topology}", **spec)
    result = run(cfg)
    assert result.ok, (f"chaos run failed (seed {SEED}); replay: {result.replay()}\n"
                       f"output: {result.out_dir}\n{result.report}")
    drawn = set(result.summary["faults"])
    wanted = {f.partition(":")[0] for f in spec["first"]}
    assert wanted <= drawn, f"faults not exercised: {wanted - drawn}"
    assert result.summary["transfers_acknowledged"] > 100, result.summary
    assert result.summary["linearizable"] is True
    return result


def test_chaos_short_network_namespaces(tmp_path):
    reason = netns.available()
    if reason:
        pytest.fail(f"the chaos suite needs network namespaces: {reason} "
                    "(CI runs as root with iproute2 and iptables)")
    _run(tmp_path, "netns")


def test_chaos_short_fault_proxy(tmp_path):
    _run(tmp_path, "proxy")
