#!/usr/bin/env python3
"""Run the raftpay chaos suite from a shell.

    python tests/chaos/run.py --profile short              # ~70 s: netns + proxy layouts
    python tests/chaos/run.py --profile long --seed 7      # 220 fault rounds, ~20 min
    python tests/chaos/run.py --seed 7 --topology proxy --rounds 30 --combo 0.5
    python tests/chaos/run.py --topology proxy --nodes 5 --first duplicate:all+kill:leader
    python tests/chaos/run.py --mode zk-election           # ZooKeeper baseline (+ ZK faults)
    python tests/chaos/run.py --check OUT/.../epoch0       # re-run the checkers on saved files
    python tests/chaos/run.py --cleanup                    # remove namespaces of dead runs

A profile is a list of runs (one cluster each).  `short` runs the namespace layout (kill of the
leader, pause of the leader, leader isolated, one-way partition, clock-skewed restart, bridge
partition, a link down, kill of every node) and then the proxy layout (delay, message loss,
majority/minority partition, kill, clock skew, duplicated messages).  `long` runs 120 rounds on
namespaces and 100 through the proxy, with combinations, in epochs of 20 rounds.
`--topology` keeps one layout; `--rounds`, `--kinds`, `--first` and `--combo` reshape the
schedule; the same options and `--seed` replay it.

Needs root for the namespace layout (falls back to loopback without it).  Exit status 0 when
every run passed, 1 when a checker failed (the replay command is printed), 2 on usage errors.
Output (histories, reports, node logs) goes under --out (default /tmp/raftpay-chaos).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for `import chaos`
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for `import raftpay`

from chaos import netns  # noqa: E402
from chaos.runner import RunConfig, recheck, run  # noqa: E402

SHORT_NETNS_FIRST = ["kill:leader", "pause:leader", "partition:isolate-leader",
                     "partition-oneway:leader-deaf", "skew:leader", "partition:bridge",
                     "link-down:follower", "kill-all"]
SHORT_PROXY_FIRST = ["delay", "loss:leader", "partition:halves", "kill:follower", "skew:any",
                     "duplicate"]

PROFILES = {
    "short": [
        dict(topology="netns", rounds=8, first=SHORT_NETNS_FIRST, hold_s=(2.0, 3.0),
             combo_p=0.0, settle_s=0.8),
        dict(topology="proxy", rounds=6, first=SHORT_PROXY_FIRST, hold_s=(2.0, 3.0),
             combo_p=0.0, settle_s=0.8),
    ],
    "long": [
        dict(topology="netns", rounds=120, hold_s=(2.0, 6.0), combo_p=0.3, epoch_rounds=20),
        dict(topology="proxy", rounds=100, hold_s=(2.0, 6.0), combo_p=0.3, epoch_rounds=20),
    ],
}


def profile_runs(profile: str, *, seed: int, out: str, mode: str = "raft",
                 topology: str | None = None, rounds: int | None = None, nodes: int = 3,
                 kinds=None, first=None, keep_data: bool = False,
                 combo_p: float | None = None) -> list[RunConfig]:
    runs = []
    for k, spec in enumerate(PROFILES[profile]):
        spec = dict(spec)
        if topology and spec["topology"] != topology:
            continue
        if spec["topology"] == "netns" and netns.available():
            print(f"chaos: {netns.available()}; using the loopback layout instead",
                  file=sys.stderr)
            spec["topology"] = "loopback"
            spec["first"] = [f for f in spec.get("first") or []
                             if all(x.partition(":")[0] in ("kill", "pause", "skew", "kill-all")
                                    for x in f.split("+"))]
        if rounds is not None:
            spec["rounds"] = rounds
        if kinds:
            spec["kinds"] = kinds
            spec["first"] = [f for f in spec.get("first") or []
                             if all(x.partition(":")[0] in kinds for x in f.split("+"))]
        if first is not None:
            spec["first"] = first
        if combo_p is not None:
            spec["combo_p"] = combo_p
        label = f"{profile}-{spec['topology']}"
        runs.append(RunConfig(out_dir=os.path.join(out, f"{label}-seed{seed}"), mode=mode,
                              seed=seed, nodes=nodes, profile=profile, label=label,
                              keep_data=keep_data, **spec))
    if topology and not runs:  # a layout the profile does not list: one run of it
        runs.append(RunConfig(out_dir=os.path.join(out, f"{profile}-{topology}-seed{seed}"),
                              topology=topology, mode=mode, seed=seed, nodes=nodes,
                              rounds=rounds or 10, kinds=kinds, first=first, profile=profile,
                              combo_p=0.25 if combo_p is None else combo_p,
                              label=f"{profile}-{topology}", keep_data=keep_data))
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--mode", default="raft", choices=["raft", "zk-election"],
                    help="node mode; zk-election starts a 3-server ZooKeeper ensemble and runs on "
                         "the loopback layout with ZooKeeper faults")
    ap.add_argument("--topology", choices=["netns", "proxy", "loopback"])
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--kinds", help="comma-separated fault kinds to draw from")
    ap.add_argument("--first", help="comma-separated fault kinds that open the schedule")
    ap.add_argument("--combo", type=float, help="probability that a round combines two faults")
    ap.add_argument("--out", default="/tmp/raftpay-chaos")
    ap.add_argument("--keep-data", action="store_true", help="keep node data dirs after a pass")
    ap.add_argument("--check", metavar="EPOCH_DIR", help="re-run the checkers on saved files")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove namespaces and links left by chaos runs that died")
    args = ap.parse_args(argv)

    if args.cleanup:
        print("\n".join(netns.sweep_stale()) or "nothing to clean")
        return 0
    if args.check:
        print(recheck(args.check))
        return 0
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every cluster and namespace is cleaned up.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    kinds = args.kinds.split(",") if args.kinds else None
    first = args.first.split(",") if args.first is not None else None
    runs = profile_runs(args.profile, seed=seed, out=args.out, mode=args.mode,
                        topology=args.topology, rounds=args.rounds, nodes=args.nodes,
                        kinds=kinds, first=first, keep_data=args.keep_data,
                        combo_p=args.combo)
    results = []
    try:
        for cfg in runs:
            if args.mode != "raft":
                _zk_for(args.mode, cfg)
            try:
                results.append(run(cfg))
            finally:
                _stop_zk()
    finally:
        _stop_zk()
    print()
    for r in results:
        s = r.summary
        print(f"{'PASS' if r.ok else 'FAIL'} {r.out_dir}: {s['rounds']} rounds, faults "
              f"{s['faults']}, {s['transfers_acknowledged']} acknowledged transfers, lost "
              f"{s['lost']}, doubled {s['doubled']}, linearizable {s['linearizable']}, "
              f"{s['duration_s']} s")
        if not r.ok:
            print(f"    replay: {r.replay()}\n    report: {r.out_dir}/report.txt")
    return 0 if all(r.ok for r in results) else 1


_ZK = []


def _zk_for(mode: str, cfg: RunConfig) -> None:
    """A ZooKeeper ensemble for modes that need one.  ZooKeeper listens on loopback, which
    namespaced nodes cannot reach, and the proxy speaks PySyncObj's framing, not the baseline's:
    such runs use the loopback layout (kills, pauses, clock skew) plus faults on ZooKeeper."""
    if mode != "zk-election":
        raise SystemExit(f"unknown mode {mode!r}")
    if cfg.topology != "loopback":
        print(f"chaos: mode {mode} runs on the loopback layout, not {cfg.topology}",
              file=sys.stderr)
        cfg.topology = "loopback"
        cfg.label = cfg.label.replace("netns", "loopback").replace("proxy", "loopback2")
        cfg.out_dir = os.path.join(os.path.dirname(cfg.out_dir), f"{cfg.label}-zk-seed{cfg.seed}")
        cfg.first = [f for f in cfg.first or []
                     if all(x.partition(":")[0] in ("kill", "pause", "skew", "kill-all")
                            for x in f.split("+"))] + ["zk-kill:leader", "zk-pause:any"]
    from zk_fixtures import ZkEnsemble  # tests/, on sys.path above
    ens = ZkEnsemble(os.path.join(cfg.out_dir, "zk"), 3).start()
    _ZK.append(ens)
    cfg.zk_hosts, cfg.zk = ens.hosts, ens


def _stop_zk() -> None:
    for ens in _ZK:
        ens.stop()
    _ZK.clear()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every run's finally blocks have cleaned up by now
        print("chaos: interrupted; clusters, proxies and namespaces removed", file=sys.stderr)
        sys.exit(130)
