"""One chaos run: a cluster, a workload, a seeded schedule of faults, then the checkers.

Design.  `run(RunConfig)` starts a `ChaosCluster` in the chosen layout, and splits the schedule
into *epochs* of at most `epoch_rounds` rounds.  Each epoch uses fresh accounts (so its history
stays small enough to search) and goes: set-up (accounts, funding) -> workload running -> for
each round: apply the faults, hold them, heal, wait for a leader again -> heal everything ->
stop the workload and resolve every unknown transfer -> read the final state back (linearizable
reads of every account, every account's transfers in apply order, a lookup of every transfer id
ever sent) -> wait for the replicas to converge -> run every checker.  Everything is written
under `out_dir`: the schedule, and per epoch the history, nemesis log, final state, replica
status, node-log findings and `report.txt`; `summary.json` holds the counters.

A failing run says how to replay it: the seed, the layout, the round count and the schedule.
Recovery is measured from the history itself: for each heal, the time to the next write that
succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, fields

from raftpay.client import Client
from raftpay.config import RaftConfig

from chaos import checkers
from chaos.cluster import ChaosCluster
from chaos.history import History
from chaos.nemesis import Nemesis, describe, hold, make_schedule
from chaos.workload import Workload, make_spec


@dataclass
class RunConfig:
    out_dir: str
    topology: str = "netns"
    mode: str = "raft"
    seed: int = 1
    rounds: int = 6
    nodes: int = 3
    hold_s: tuple[float, float] = (2.0, 4.0)
    settle_s: float = 1.0
    combo_p: float = 0.25
    kinds: list[str] | None = None
    first: list[str] | None = None
    epoch_rounds: int = 25
    workers: int = 8
    think_ms: tuple[float, float] = (0.0, 20.0)
    election_timeout_ms: int = 1000
    recovery_timeout_s: float = 30.0
    zk_hosts: str = ""
    zk: object = None  # the ZkEnsemble behind zk_hosts, if the nemesis may fault it
    max_steps: int = 3_000_000
    keep_data: bool = False
    profile: str = "custom"
    label: str = ""
    verbose: bool = True


@dataclass
class RunResult:
    ok: bool
    out_dir: str
    summary: dict = field(default_factory=dict)
    report: str = ""

    def replay(self) -> str:
        return self.summary.get("replay", "")


def _say(cfg: RunConfig, text: str) -> None:
    if cfg.verbose:
        print(f"[chaos {cfg.label or cfg.topology} {time.strftime('%H:%M:%S')}] {text}",
              flush=True)


def replay_command(cfg: RunConfig) -> str:
    cmd = (f"python tests/chaos/run.py --seed {cfg.seed} --topology {cfg.topology} "
           f"--mode {cfg.mode} --rounds {cfg.rounds} --nodes {cfg.nodes}")
    if cfg.profile in ("short", "long"):
        cmd += f" --profile {cfg.profile}"
    if cfg.kinds:
        cmd += f" --kinds {','.join(cfg.kinds)}"
    if cfg.first:
        cmd += f" --first {','.join(cfg.first)}"
    return cmd


def run(cfg: RunConfig) -> RunResult:
    os.makedirs(cfg.out_dir, exist_ok=True)
    schedule = make_schedule(cfg.seed, cfg.rounds, cfg.topology, cfg.nodes, hold_s=cfg.hold_s,
                             combo_p=cfg.combo_p, kinds=cfg.kinds, first=cfg.first,
                             zk=cfg.zk is not None)
    with open(os.path.join(cfg.out_dir, "schedule.json"), "w") as f:
        json.dump({"config": _jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg)
                                        if f.name != "zk"}),
                   "schedule": schedule}, f, indent=1)
    _say(cfg, f"seed {cfg.seed}, {cfg.rounds} rounds, {cfg.topology} layout, mode {cfg.mode}; "
              f"output in {cfg.out_dir}")
    t_start = time.monotonic()
    summary: dict = {"seed": cfg.seed, "topology": cfg.topology, "mode": cfg.mode,
                     "rounds": 0, "faults": {}, "epochs": [], "replay": replay_command(cfg)}
    reports: list[str] = []
    ok = True
    cluster = ChaosCluster(os.path.join(cfg.out_dir, "cluster"), nodes=cfg.nodes,
                           topology=cfg.topology, mode=cfg.mode, seed=cfg.seed,
                           raft=RaftConfig(election_timeout_ms=cfg.election_timeout_ms,
                                           heartbeat_ms=max(10, cfg.election_timeout_ms // 10)),
                           zk_hosts=cfg.zk_hosts)
    cluster.zk = cfg.zk
    try:
        cluster.start()
        if cluster.wait_for_leader(60) is None:
            raise RuntimeError(f"no leader at start; logs in {cluster.out_dir}")
        epochs = [schedule[i:i + cfg.epoch_rounds]
                  for i in range(0, len(schedule), max(1, cfg.epoch_rounds))] or [[]]
        for e, chunk in enumerate(epochs):
            e_ok, e_summary, e_report = _epoch(cfg, cluster, e, chunk)
            ok = ok and e_ok
            summary["epochs"].append(e_summary)
            summary["rounds"] += len(chunk)
            for k, v in e_summary["faults"].items():
                summary["faults"][k] = summary["faults"].get(k, 0) + v
            reports.append(e_report)
            if not e_ok:
                _say(cfg, f"epoch {e} FAILED; stopping here")
                break
    finally:
        cluster.close()
        if ok and not cfg.keep_data:
            for nid in cluster.ids:
                shutil.rmtree(os.path.join(cluster.out_dir, nid), ignore_errors=True)
    summary["ok"] = ok
    summary["duration_s"] = round(time.monotonic() - t_start, 1)
    for key in ("transfers_acknowledged", "lost", "doubled", "ops", "unknown_left"):
        summary[key] = sum(ep.get(key, 0) for ep in summary["epochs"])
    verdicts = [ep.get("linearizable") for ep in summary["epochs"]]
    summary["linearizable"] = (False if False in verdicts else None if None in verdicts
                               else bool(verdicts))
    header = [f"raftpay chaos run: {'PASS' if ok else 'FAIL'}",
              f"  seed {cfg.seed}, layout {cfg.topology}, mode {cfg.mode}, {cfg.nodes} nodes, "
              f"{summary['rounds']} rounds in {summary['duration_s']} s",
              f"  faults: {summary['faults']}",
              f"  replay: {summary['replay']}", ""]
    report = "\n".join(header) + "\n\n".join(reports)
    with open(os.path.join(cfg.out_dir, "report.txt"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    if not ok:
        _say(cfg, "FAILED.  Replay with:\n    " + summary["replay"] + "\n  schedule:\n    "
             + "\n    ".join(describe(r) for r in schedule[:summary["rounds"]]))
    return RunResult(ok, cfg.out_dir, summary, report)


def _epoch(cfg: RunConfig, cluster: ChaosCluster, e: int, chunk: list[dict]):
    folder = os.path.join(cfg.out_dir, f"epoch{e}")
    os.makedirs(folder, exist_ok=True)
    history = History()
    spec = make_spec(f"e{e}", groups=3)
    with open(os.path.join(folder, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    nemesis = Nemesis(cluster, history, cfg.seed * 1000 + e)
    wl = Workload(history, spec, cluster.client_addrs, seed=cfg.seed * 1000 + e,
                  workers=cfg.workers, think_ms=cfg.think_ms)
    liveness: list[str] = []
    heals: list[float] = []
    first_sample = len(cluster.leader_samples)
    final = statuses = None
    converged = False
    unknown_left = 0
    error: BaseException | None = None
    try:
        wl.setup()
        wl.start()
        hold(cfg.settle_s)
        for rnd in chunk:
            _say(cfg, describe(rnd))
            resolved = nemesis.apply(rnd)
            if any("error" in r for r in resolved):
                _say(cfg, f"  could not apply: {resolved}")
            hold(rnd["hold_s"], cluster.watch)
            nemesis.heal(rnd["round"])
            heals.append(history.log_nemesis("healed", round=rnd["round"])["mono"])
            t0 = time.monotonic()
            leader = cluster.wait_for_leader(cfg.recovery_timeout_s)
            if leader is None:
                liveness.append(f"round {rnd['round']}: no leader {cfg.recovery_timeout_s} s "
                                "after the heal")
                _say(cfg, "  no leader after the heal!")
            else:
                history.log_nemesis("leader", round=rnd["round"], node=leader,
                                    after_s=round(time.monotonic() - t0, 3))
            hold(cfg.settle_s, cluster.watch)
        nemesis.heal_all()
        if cluster.wait_for_leader(cfg.recovery_timeout_s) is None:
            liveness.append("no leader after healing everything")
        wl.stop()
        unknown_left = wl.resolve(60)
        final = read_final(cluster, spec, history)
        statuses, converged = cluster.converge(30)
    except Exception as ex:  # reported as a failed check, with whatever was recorded
        error = ex
        _say(cfg, f"harness error: {ex!r}")
    finally:
        if not wl.stopping:
            wl.stop(5)
        wl.close()
        history.save(folder)
    ops = history.finished_ops()
    checks = checkers.run_all(ops, spec, final, statuses, converged, max_steps=cfg.max_steps)
    crashes = cluster.check_crashes()
    health = checkers.Check("node health", True, "no node crashed or went fatal")
    for msg in cluster.crashes + crashes:
        health.ok = False
        health.add(msg)
    for nid, st in (statuses or {}).items():
        if st.get("fatal"):
            health.ok = False
            health.add(f"{nid} reports fatal: {st['fatal']}")
    findings = cluster.log_findings()
    for line in findings[:15]:
        health.add("log: " + line)
    if not health.ok:
        health.summary = "a node crashed or went fatal"
    elif findings:
        health.summary = f"no crash; {len(findings)} log lines worth a look (see details)"
    checks.append(health)
    elect = checkers.Check("election safety", True, "")
    terms = {t: ns for t, ns in cluster.leaders_by_term(first_sample).items() if t is not None}
    single = 0
    for t, ns in sorted(terms.items()):
        confirmed = sorted(n for n, k in ns.items() if k >= 2)
        if len(confirmed) > 1:
            elect.ok = False
            samples = [f"{m:.3f}s {n} commit {c}"
                       for m, n, tt, c in cluster.leader_samples[first_sample:] if tt == t]
            elect.add(f"term {t}: {', '.join(confirmed)} each reported itself leader in several "
                      f"samples: {samples[:12]}")
        elif len(ns) > 1:
            single += 1
            elect.add(f"note: term {t}: {dict(ns)} — a single sample of a second leader (a "
                      "status read racing a step-down; see ChaosCluster.leaders_by_term)")
    elect.stats = {"terms": len(terms), "single_sample_overlaps": single}
    elect.summary = (f"one leader per term over {len(terms)} terms seen"
                     + (f" ({single} single-sample overlaps, see notes)" if single else "")
                     if elect.ok else "two leaders in one term")
    checks.append(elect)
    live = checkers.Check("liveness", not liveness, "a leader came back after every heal")
    for msg in liveness:
        live.add(msg)
    rec = _recovery(ops, heals)
    live.stats = rec
    if rec["rounds"]:
        live.summary += (f"; first successful write after a heal: median "
                         f"{rec['median_s']} s, max {rec['max_s']} s")
    if not liveness and rec.get("never", 0):
        live.add(f"{rec['never']} heals were not followed by a successful write before the next "
                 "fault")
    if liveness:
        live.summary = "no leader after some heal"
    checks.append(live)
    if error is not None:
        checks.append(checkers.Check("harness", False, f"the run broke off: {error!r}"))
    with open(os.path.join(folder, "final.json"), "w") as f:
        json.dump(_jsonable({"final": final, "statuses": statuses, "converged": converged}), f)
    report = checkers.format_report(checks)
    tr = next((c for c in checks if c.name.startswith("transfers")), None)
    lin = next(c for c in checks if c.name == "linearizability")
    counts = {t: sum(1 for op in ops if op["type"] == t) for t in ("ok", "fail", "info")}
    e_summary = {
        "epoch": e, "rounds": len(chunk), "faults": dict(nemesis.counts), "ops": len(ops),
        "op_types": counts, "unknown_left": unknown_left,
        "transfers_acknowledged": tr.stats.get("acknowledged", 0) if tr else 0,
        "lost": tr.stats.get("lost", 0) if tr else 0,
        "doubled": (tr.stats.get("doubled_acks", 0) + tr.stats.get("balance_mismatch", 0))
        if tr else 0,
        "unknown_outcomes": {k: v for k, v in (tr.stats if tr else {}).items()
                             if k.startswith("unknown_")},
        "linearizable": lin.ok, "search": lin.stats, "recovery": rec,
        "checks": {c.name: c.verdict for c in checks},
        "workload_counters": wl.counters,
    }
    # Node health and liveness are findings too, but only safety decides pass/fail, plus crashes.
    e_ok = all(c.ok is not False for c in checks if c.name != "liveness")
    text = f"== epoch {e}: rounds {chunk[0]['round'] if chunk else '-'}.." \
           f"{chunk[-1]['round'] if chunk else '-'} ({len(ops)} ops: {counts})\n" + report
    with open(os.path.join(folder, "report.txt"), "w") as f:
        f.write(text + "\n")
    _say(cfg, f"epoch {e}: " + ", ".join(f"{c.name} {c.verdict}" for c in checks))
    return e_ok, e_summary, text


def _recovery(ops: list[dict], heals: list[float]) -> dict:
    writes = sorted(op["complete_mono"] for op in ops
                    if op["f"] == "transfer" and op["type"] == "ok" and op["complete_mono"])
    import bisect
    gaps, never = [], 0
    for k, t in enumerate(heals):
        nxt = heals[k + 1] if k + 1 < len(heals) else float("inf")
        i = bisect.bisect_left(writes, t)
        if i < len(writes) and writes[i] < nxt:
            gaps.append(writes[i] - t)
        else:
            never += 1
    out = {"rounds": len(heals), "never": never}
    if gaps:
        out.update(median_s=round(statistics.median(gaps), 3), max_s=round(max(gaps), 3))
    return out


def read_final(cluster: ChaosCluster, spec: dict, history: History,
               timeout_s: float = 60.0) -> dict:
    """The final state, read with linearizable reads through the leader (retried until the
    deadline: the cluster was just healed)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with Client(cluster.client_addrs, timeout_s=10, attempt_timeout_s=2) as c:
                return _read_final(c, spec, history)
        except Exception as e:  # retried: a leader may still be settling
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"could not read the final state: {last!r}")


def _read_final(c: Client, spec: dict, history: History) -> dict:
    ids = [a for gs in spec["groups"].values() for a in gs["accounts"]]
    accounts = {a["id"]: a for a in c.lookup_accounts(ids) if a is not None}
    hist = {}
    for a in ids:
        items, cursor = [], 0
        for _ in range(100_000):
            page, nxt = c.account_transfers(a, limit=1000, cursor=cursor)
            items.extend(page)
            if nxt is None:
                break
            cursor = nxt
        hist[a] = items
    tids = sorted({op["value"]["id"] for op in history.finished_ops() if op["f"] == "transfer"})
    transfers = {}
    for i in range(0, len(tids), 1000):
        chunk = tids[i:i + 1000]
        for tid, t in zip(chunk, c.lookup_transfers(chunk)):
            transfers[tid] = t
    return {"accounts": accounts, "account_transfers": hist, "transfers": transfers}


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, (set, tuple))
                                 else str(o)))


def recheck(folder: str, max_steps: int = 3_000_000) -> str:
    """Run the checkers again on a saved epoch folder; returns the report."""
    from chaos.history import load_ops
    with open(os.path.join(folder, "spec.json")) as f:
        spec = json.load(f)
    with open(os.path.join(folder, "final.json")) as f:
        saved = json.load(f)
    ops = load_ops(os.path.join(folder, "history.jsonl"))
    checks = checkers.run_all(ops, spec, saved["final"], saved["statuses"], saved["converged"],
                              max_steps=max_steps)
    return checkers.format_report(checks)
