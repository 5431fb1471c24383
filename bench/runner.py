"""The benchmark plan and its execution: profiles, workloads per cluster, failover, the ceilings.

Design.  A `Profile` is data: which clusters (mode x nodes x fsync), which workloads with which
sizes and durations, how many failover repeats, which bare-PySyncObj runs.  `run(profile)` walks
it: for each cluster it starts the nodes, creates the accounts, runs the workloads
(`load.run_load`), optionally samples the leader with py-spy, kills leaders for failover, stops
the cluster; then it runs the same "N clients x 1 transfer/request" workloads against the echo
server (`echo`, the loopback ceiling) and finally measures the bare PySyncObj ceiling.  Failover
runs on the detail cluster and, so that modes compare like for like, on the cluster of every
other mode with the same nodes and fsync (`failover_labels`).  Every figure lands in one plain
dict (`results`) that `report` writes as JSON, markdown and plots.  A failing step is recorded as
an error row and the run goes on, so one bad cluster does not cost the whole run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from raftpay.client import Client
from raftpay.codes import Code

from . import bare, echo, profiling
from .clusters import BenchCluster, ClusterSpec, machine_busy_s, proc_cpu_s
from .load import CURRENCY, LoadSpec, run_load


@dataclass
class Profile:
    name: str
    clusters: list[ClusterSpec]
    #: Label of the cluster that also gets mix, contention, failover and profile; its
    #: counterparts in the other modes get failover too (`failover_labels`).
    detail_cluster: str
    accounts: int = 10_000
    warmup_s: float = 2.0
    latency_s: float = 10.0
    concurrency: tuple[int, ...] = (1, 8, 64, 256)
    concurrency_s: float = 8.0
    #: (clients, connections): those client counts run once more with the clients sharing
    #: that many connections, as etcd's benchmark `--clients` share its `--conns`.
    shared_conns: tuple[tuple[int, int], ...] = ((64, 8),)
    #: Clusters other than the detail one run only these client counts (None: all).
    concurrency_other: tuple[int, ...] | None = None
    batches: tuple[int, ...] = (100, 1000, 8000)
    batch_clients: int = 4  # batched requests in flight at once
    batch_s: float = 8.0
    batches_other: tuple[int, ...] | None = None
    mix_clients: int = 32
    mix_read_fraction: float = 0.5
    mix_s: float = 8.0
    hot_accounts: int = 2
    contention_clients: int = 64
    contention_s: float = 8.0
    failover_runs: int = 3
    failover_clients: int = 16
    failover_before_s: float = 4.0
    failover_after_s: float = 10.0
    profile_leader_s: float = 10.0  # 0: no py-spy run
    #: (what, kind, clients, events per request) to run under py-spy on the detail cluster.
    profile_workloads: tuple = (("64 clients x 1 transfer/request", "transfer", 64, 1),
                                ("batched 8,000 transfers/request", "batch", 4, 8000))
    bare_runs: list = field(default_factory=list)  # [(config, [(name, window, warm, dur)])]
    latency_other: bool = True
    #: Client counts run against the echo server (`echo`); None: those of `concurrency`.
    echo_clients: tuple[int, ...] | None = None


def quick_profile(specs_extra: tuple[ClusterSpec, ...] = ()) -> Profile:
    """< 2 minutes: enough to keep every code path of the harness working in CI."""
    main = ClusterSpec(3, "always")
    return Profile(
        name="quick", clusters=[main, ClusterSpec(3, "never"), *specs_extra],
        detail_cluster=main.label, accounts=1000, warmup_s=1.0, latency_s=3.0,
        concurrency=(8, 64), concurrency_s=3.0, concurrency_other=(64,),
        batches=(1000,), batch_clients=2, batch_s=3.0, batches_other=(),
        mix_clients=8, mix_s=2.5, contention_clients=16, contention_s=2.5,
        # 7 s after the kill: zk-election needs its 4 s ZooKeeper session timeout, then 1 s at
        # full rate, to show "back to full".
        failover_runs=1, failover_clients=8, failover_before_s=2.0, failover_after_s=7.0,
        profile_leader_s=0, latency_other=False, echo_clients=(64,),
        bare_runs=[("default", [("throughput", 5_000, 1.0, 2.5)]),
                   ("no-batch", [("latency", 1, 0.5, 2.0)])])


def smoke_profile() -> Profile:
    """Seconds, not minutes: every workload kind once, tiny, for tests/test_bench_quick.py."""
    main = ClusterSpec(3, "never")
    return Profile(
        name="smoke", clusters=[main], detail_cluster=main.label, accounts=200, warmup_s=0.3,
        latency_s=0.8, concurrency=(4,), concurrency_s=0.8, batches=(100,), batch_clients=2,
        batch_s=0.8, mix_clients=4, mix_s=0.6, contention_clients=4, contention_s=0.6,
        failover_runs=1, failover_clients=4, failover_before_s=0.8, failover_after_s=2.5,
        profile_leader_s=0, bare_runs=[("no-batch", [("latency", 1, 0.2, 0.8)])])


def full_profile(specs_extra: tuple[ClusterSpec, ...] = ()) -> Profile:
    """The whole matrix; about 9 minutes on the 2-core reference machine."""
    main = ClusterSpec(3, "always")
    return Profile(
        name="full",
        clusters=[main, ClusterSpec(3, "never"), ClusterSpec(5, "always"),
                  ClusterSpec(5, "never"), *specs_extra],
        detail_cluster=main.label, concurrency_other=(1, 8, 64, 256),
        batches_other=(8000,),
        bare_runs=[("default", [("throughput", 5_000, 1.0, 5.0), ("latency", 1, 0.5, 3.0)]),
                   ("no-batch", [("throughput", 5_000, 1.0, 5.0), ("latency", 1, 0.5, 3.0)])])


# --- running ------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip() \
            or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "raftpay"], capture_output=True,
                             text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(__file__))).stdout
        return bool(out.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def _meta(profile: Profile, argv: list[str]) -> dict:
    import pysyncobj.version
    return {"profile": profile.name, "command": "python -m bench " + " ".join(argv),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "git_commit": _git_commit(), "raftpay_tree_dirty": _git_dirty(),
            "python": platform.python_version(), "pysyncobj": pysyncobj.version.VERSION,
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "kernel": platform.release()}


def failover_labels(profile: Profile) -> set[str]:
    """Labels of the clusters that get failover runs: the detail cluster and, in every other
    mode of the profile, the cluster with the same nodes and fsync.  Empty when the detail
    cluster is not in the profile."""
    detail = next((s for s in profile.clusters if s.label == profile.detail_cluster), None)
    if detail is None:
        return set()
    return {s.label for s in profile.clusters
            if s.label == detail.label or (s.mode != detail.mode and s.nodes == detail.nodes
                                           and s.fsync == detail.fsync)}


def _echo_clients(profile: Profile) -> tuple[int, ...]:
    return profile.concurrency if profile.echo_clients is None else profile.echo_clients


def shared_workload(clients: int, conns: int) -> str:
    return f"{clients} clients over {conns} connections x 1 transfer/request"


def _steps(profile: Profile, only: str | None = None) -> int:
    n = 0
    failover = failover_labels(profile)
    for spec in profile.clusters:
        if only and only not in spec.label:
            continue
        detail = spec.label == profile.detail_cluster
        n += 1  # start + accounts
        n += 1 if (detail or profile.latency_other) else 0
        conc = (profile.concurrency if detail or profile.concurrency_other is None
                else profile.concurrency_other)
        n += len(conc) + sum(1 for c, _ in profile.shared_conns if c in conc)
        n += len(profile.batches if detail or profile.batches_other is None
                 else profile.batches_other)
        if detail:
            n += 3 + (len(profile.profile_workloads) if profile.profile_leader_s else 0)
        if spec.label in failover:
            n += profile.failover_runs
    if not only or "echo" in only:
        n += len(_echo_clients(profile)) + sum(1 for c, _ in profile.shared_conns
                                               if c in _echo_clients(profile))
    if not only or "bare" in only:
        n += sum(len(runs) for _, runs in profile.bare_runs)
    return n


def run(profile: Profile, argv: list[str], progress, only: str | None = None) -> dict:
    """Run `profile`; returns the results dict (see module docstring)."""
    progress.total_steps = _steps(profile, only)
    results = {"meta": _meta(profile, argv), "runs": [], "failover": [], "bare": {},
               "profiles": [], "problems": [], "clusters": {},
               "detail_cluster": profile.detail_cluster}
    for spec in profile.clusters:
        if only and only not in spec.label:
            continue
        try:
            _run_cluster(profile, spec, results, progress)
        except Exception as e:
            results["problems"].append(f"{spec.label}: {type(e).__name__}: {e}")
            progress.note(f"{spec.label} failed: {e}")
            traceback.print_exc(file=sys.stderr)
    if (not only or "echo" in only) and _echo_clients(profile):
        try:
            _run_echo(profile, results, progress)
        except Exception as e:
            results["problems"].append(f"{echo.LABEL}: {type(e).__name__}: {e}")
            progress.note(f"{echo.LABEL} failed: {e}")
            traceback.print_exc(file=sys.stderr)
    if not only or "bare" in only:
        for config, runs in profile.bare_runs:
            try:
                out = bare.run_bare(config, runs, progress)
                for name, r in out.items():
                    results["bare"][f"{config}/{name}"] = r
            except Exception as e:
                results["problems"].append(f"bare {config}: {type(e).__name__}: {e}")
                progress.note(f"bare {config} failed: {e}")
    results["meta"]["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return results


def _create_accounts(seeds: str, n: int) -> None:
    with Client(seeds, timeout_s=30) as c:
        for lo in range(1, n + 1, 5000):
            ids = range(lo, min(n, lo + 4999) + 1)
            codes = c.create_accounts([{"id": i, "currency": CURRENCY} for i in ids])
            bad = [x for x in codes if x not in (Code.OK, Code.EXISTS)]
            if bad:
                raise RuntimeError(f"creating accounts failed: {bad[:3]}")


def _measure(spec: ClusterSpec | EchoSpec, workload: str, ls: LoadSpec, results: dict, progress,
             leader: str | None, cpu_sampler: Callable[[], dict]) -> dict | None:
    """One `run_load`, its rows added to `results["runs"]`; None (and a problem) if it failed.
    `spec` is a `ClusterSpec` or anything with its label, mode, nodes and fsync (`EchoSpec`)."""
    progress.begin(f"{spec.label}: {workload}")
    try:
        res = run_load(ls, progress, cpu_sampler=cpu_sampler)
    except Exception as e:
        results["problems"].append(f"{spec.label} {workload}: {e}")
        progress.done(f"FAILED: {e}")
        return None
    rows = _rows(spec, workload, ls, res, leader)
    results["runs"].extend(rows)
    main = rows[-1] if rows else None
    if main:
        progress.done(f"{main['per_s']:,.0f} {main['unit']}/s, p50 "
                      f"{main['latency']['p50_ms']} ms, p99 {main['latency']['p99_ms']}"
                      f" ms, errors {sum(main['errors'].values())}")
    return res


def _run_cluster(profile: Profile, spec: ClusterSpec, results: dict, progress) -> None:
    detail = spec.label == profile.detail_cluster
    failover = spec.label in failover_labels(profile)
    progress.begin(f"{spec.label}: start cluster, create {profile.accounts:,} accounts")
    with BenchCluster(spec) as cluster:
        t_leader = cluster.start()
        _create_accounts(cluster.seeds, profile.accounts)
        results["clusters"][spec.label] = {"nodes": spec.nodes, "fsync": spec.fsync,
                                           "mode": spec.mode, "first_leader_s": round(t_leader, 2)}
        progress.done(f"leader after {t_leader:.1f} s")
        base = dict(seeds=cluster.seeds, accounts=profile.accounts, warmup_s=profile.warmup_s)

        def measure(workload: str, ls: LoadSpec) -> dict | None:
            lead = cluster.leader()
            return _measure(spec, workload, ls, results, progress, lead,
                            lambda: cluster.sample(lead))

        if detail or profile.latency_other:
            measure("latency (1 blocking client)",
                    LoadSpec("latency", "latency", duration_s=profile.latency_s, **base))
        conc = profile.concurrency if detail or profile.concurrency_other is None \
            else profile.concurrency_other
        for n in conc:
            measure(f"{n} clients x 1 transfer/request",
                    LoadSpec(f"conc{n}", "transfer", clients=n,
                             duration_s=profile.concurrency_s, **base))
        for n, k in profile.shared_conns:
            if n in conc:
                measure(shared_workload(n, k),
                        LoadSpec(f"conc{n}c{k}", "transfer", clients=n, conns=k,
                                 duration_s=profile.concurrency_s, **base))
        batches = profile.batches if detail or profile.batches_other is None \
            else profile.batches_other
        for b in batches:
            measure(f"batched {b:,} transfers/request",
                    LoadSpec(f"batch{b}", "batch", clients=profile.batch_clients, batch=b,
                             duration_s=profile.batch_s, **base))
        if detail:
            _detail_workloads(profile, spec, cluster, base, results, progress, measure)
        if failover:
            for i in range(profile.failover_runs):
                _failover(profile, spec, cluster, base, results, progress, i)


def _detail_workloads(profile: Profile, spec: ClusterSpec, cluster: BenchCluster, base: dict,
                      results: dict, progress, measure) -> None:
    """Mix, contention and (with py-spy) the leader profile: the detail cluster only."""
    for consistency in ("linearizable", "follower"):
        measure(f"mix {int(profile.mix_read_fraction * 100)}% reads ({consistency})",
                LoadSpec(f"mix-{consistency}", "mix", clients=profile.mix_clients,
                         read_fraction=profile.mix_read_fraction, consistency=consistency,
                         follower_addrs=tuple(cluster.addr_of[n]
                                              for n in cluster.followers()),
                         duration_s=profile.mix_s, **base))
    measure(f"contention: {profile.contention_clients} clients on "
            f"{profile.hot_accounts} hot accounts",
            LoadSpec("contention", "transfer", clients=profile.contention_clients,
                     duration_s=profile.contention_s,
                     **dict(base, accounts=profile.hot_accounts)))
    if profile.profile_leader_s:
        _profile_leader(profile, spec, cluster, base, results, progress)


@dataclass(frozen=True)
class EchoSpec:
    """What the result rows of the echo ceiling say in place of a `ClusterSpec`'s fields."""

    label: str = echo.LABEL
    mode: str = "echo"
    nodes: int = 1
    fsync: str = "n/a"


def _run_echo(profile: Profile, results: dict, progress) -> None:
    """The loopback ceiling: the "N clients x 1 transfer/request" workloads, same load
    generator, against the echo server in a process of its own (`echo`)."""
    spec = EchoSpec()
    with echo.EchoServer() as server:

        def sample() -> dict:
            return {"echo": proc_cpu_s(server.pid), "_machine": machine_busy_s()}

        runs = [(f"{n} clients x 1 transfer/request", f"conc{n}", n, None)
                for n in _echo_clients(profile)]
        runs += [(shared_workload(n, k), f"conc{n}c{k}", n, k) for n, k in profile.shared_conns
                 if n in _echo_clients(profile)]
        for workload, name, n, k in runs:
            _measure(spec, workload,
                     LoadSpec(name, "transfer", seeds=server.addr, clients=n, conns=k,
                              accounts=profile.accounts, warmup_s=profile.warmup_s,
                              duration_s=profile.concurrency_s),
                     results, progress, "echo", sample)
        if not server.alive():
            results["problems"].append(f"{spec.label}: the echo server died during the run")


def _rows(spec: ClusterSpec | EchoSpec, workload: str, ls: LoadSpec, res: dict, leader: str | None,
          **extra) -> list[dict]:
    rows = []
    cpu = dict(res.get("node_cpu_s") or {})
    machine = cpu.pop("_machine", None)
    entries = cpu.pop("_commit_index", None)
    nodes_s = sum(v for v in cpu.values() if v is not None)
    cores = {"machine_busy_cores": None if machine is None else round(machine / ls.duration_s, 2),
             "nodes_cores": round(nodes_s / ls.duration_s, 2),
             "clients_cores": round(res["client_cpu_s"] / ls.duration_s, 2)}
    if machine is not None:
        # Whatever else ran on the machine meanwhile (other users' jobs, this harness's parent).
        cores["other_cores"] = round(max(0.0, machine - nodes_s - res["client_cpu_s"])
                                     / ls.duration_s, 2)
    for name in sorted(res["ops"], key=lambda k: k != "read"):  # reads first, the main op last
        o = res["ops"][name]
        items = o["items"]
        lead_cpu = cpu.get(leader) if leader else None
        unit = "reads" if name == "read" else "transfers"
        rows.append({
            "cluster": spec.label, "mode": spec.mode, "nodes": spec.nodes, "fsync": spec.fsync,
            "workload": workload if name != "read" or ls.kind != "mix" else workload,
            "op": name, "kind": ls.kind, "spec_name": ls.name, "clients": ls.clients,
            "load_procs": res["nprocs"], "events_per_request": ls.batch,
            "consistency": ls.consistency if ls.kind == "mix" else None,
            "duration_s": ls.duration_s, "unit": unit,
            "per_s": round(o["per_s"], 1), "requests_per_s": round(o["requests_per_s"], 1),
            "latency": o["hist"].summary_ms(), "hist": o["hist"],
            "timeline_1s": [round(r, 1) for _, r in o["timeline"].series(
                0, int(ls.warmup_s + ls.duration_s) - 1)],
            "errors": {k: v for k, v in res["errors"].items() if k.startswith(name + ":")},
            "error_examples": res["error_examples"][:3],
            "leader": leader, "node_cpu_s": cpu,
            "leader_cpu_us_per_item": (round(lead_cpu / items * 1e6, 1)
                                       if lead_cpu is not None and items and name != "read"
                                       and len(res["ops"]) == 1 else None),
            "client_cpu_s": round(res["client_cpu_s"], 2), "cpu_cores": cores,
            "raft_entries_per_s": None if entries is None else round(entries / ls.duration_s, 1),
            "requests_per_entry": (round(o["requests"] / entries, 2)
                                   if entries and name != "read" and len(res["ops"]) == 1
                                   else None), **extra})
    return rows


def _profile_leader(profile, spec, cluster, base, results, progress) -> None:
    """py-spy on the leader under each of `profile.profile_workloads`; one summary each."""
    for what, kind, clients, batch in profile.profile_workloads:
        progress.begin(f"{spec.label}: py-spy on the leader under {what}")
        summary = _profile_one(profile, spec, cluster, base, what, kind, clients, batch)
        results.setdefault("profiles", []).append(summary)
        if "skipped" in summary:
            results["problems"].append(f"leader profile ({what}) skipped: {summary['skipped']}")
            progress.done(f"skipped: {summary['skipped']}")
        else:
            progress.done(f"{summary['samples']} GIL samples; top modules: "
                          f"{summary['self_by_module'][:3]}")


def _profile_one(profile, spec, cluster, base, what, kind, clients, batch) -> dict:
    if not profiling.available():
        return {"workload": what, "skipped": "py-spy is not installed (pip install py-spy)"}
    lead = cluster.leader()
    pid = cluster.pid(lead) if lead else None
    if pid is None:
        return {"workload": what, "skipped": "no leader to profile"}
    out_path = os.path.join(cluster.data_dir, f"leader-{kind}{clients}x{batch}.pyspy.txt")
    state = {"proc": None}

    def during(elapsed_s: float) -> None:
        if state["proc"] is None and elapsed_s >= profile.warmup_s:
            state["proc"] = profiling.start(pid, profile.profile_leader_s, out_path)

    ls = LoadSpec(f"profile-{kind}{clients}", kind, clients=clients, batch=batch,
                  duration_s=profile.profile_leader_s, **base)
    res = run_load(ls, None, during=during, cpu_sampler=lambda: cluster.sample(lead))
    proc = state["proc"]
    if proc is None:
        return {"workload": what, "skipped": "py-spy was not started"}
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = b"py-spy did not finish"
    if not os.path.exists(out_path):
        return {"workload": what, "skipped": f"py-spy wrote nothing: {err.decode()[-300:]}"}
    summary = profiling.summarise(out_path)
    o = res["ops"].get("transfer")
    cpu = res.get("node_cpu_s") or {}
    lead_cpu = cpu.get(lead)
    entries = cpu.get("_commit_index")
    summary.update(
        workload=what, cluster=spec.label, leader=lead, clients=clients, batch=batch,
        gil_held_fraction=round(summary["samples"] / (
            profiling.RATE_HZ * max(1, round(profile.profile_leader_s))), 2),
        transfers_per_s=round(o["per_s"], 1) if o else None,
        leader_cores=round(lead_cpu / ls.duration_s, 2) if lead_cpu is not None else None,
        leader_cpu_us_per_transfer=(round(lead_cpu / o["items"] * 1e6, 1)
                                    if o and o["items"] and lead_cpu else None),
        requests_per_entry=round(o["requests"] / entries, 2) if o and entries else None,
        node_cpu_s={k: v for k, v in cpu.items() if not k.startswith("_")},
        machine_busy_cores=(round(cpu["_machine"] / ls.duration_s, 2)
                            if cpu.get("_machine") is not None else None))
    with open(out_path) as f:
        summary["collapsed_stacks"] = f.read()
    return summary


def _failover(profile, spec, cluster, base, results, progress, i: int) -> None:
    """Kill -9 the leader under steady load; measure the gap and the time back to full speed."""
    lead = cluster.wait_for_leader()
    state = {"kill_t": None, "new_leader": None, "elected_t": None, "last_poll": 0.0}
    kill_at = profile.warmup_s + profile.failover_before_s

    def during(elapsed_s: float) -> None:
        import time as _t
        now = _t.monotonic()
        if state["kill_t"] is None and elapsed_s >= kill_at:
            state["kill_t"] = _t.monotonic()
            cluster.kill(lead)
            progress.note(f"killed leader {lead} (SIGKILL)")
        elif state["kill_t"] is not None and state["new_leader"] is None \
                and now - state["last_poll"] >= 0.1:
            state["last_poll"] = now
            new = cluster.leader()
            if new is not None and new != lead:
                state["new_leader"], state["elected_t"] = new, _t.monotonic()

    ls = LoadSpec(f"failover{i}", "transfer", clients=profile.failover_clients,
                  duration_s=profile.failover_before_s + profile.failover_after_s,
                  fine_width_s=0.05, keep_times=True, **base)
    progress.begin(f"{spec.label}: failover {i + 1}/{profile.failover_runs} "
                   f"({profile.failover_clients} clients, kill -9 leader {lead})")
    try:
        res = run_load(ls, progress, during=during)
        row = analyse_failover(res["times"], state["kill_t"], res["start_at"] + ls.warmup_s,
                               res["start_at"] + ls.warmup_s + ls.duration_s)
        o = res["ops"].get("transfer")
        row.update(cluster=spec.label, mode=spec.mode, run=i + 1, killed=lead,
                   new_leader=state["new_leader"],
                   leader_seen_after_s=(round(state["elected_t"] - state["kill_t"], 3)
                                        if state["elected_t"] else None),
                   clients=profile.failover_clients,
                   errors=res["errors_all"], error_examples=res["error_examples"][:3],
                   timeline_50ms=_fine_series(o, state["kill_t"], res["start_at"])
                   if o else [])
        results["failover"].append(row)
        progress.done(f"unavailable {row['unavailable_s']} s, back to 90% throughput after "
                      f"{row['recovered_after_s']} s")
    except Exception as e:
        results["problems"].append(f"{spec.label} failover {i + 1}: {e}")
        progress.done(f"FAILED: {e}")
    finally:
        t0 = time.monotonic()
        cluster.restart(lead)
        cluster.wait_for_leader()
        caught_up = cluster.wait_caught_up(30)
        took = round(time.monotonic() - t0, 1)
        if results["failover"] and results["failover"][-1].get("run") == i + 1:
            results["failover"][-1]["restart_caught_up_s"] = took if caught_up else None
        if not caught_up:
            results["problems"].append(f"{spec.label}: {lead} did not catch up within 30 s "
                                       "after its restart")
        else:
            progress.note(f"{lead} restarted and caught up in {took} s")


def _fine_series(o: dict, kill_t: float | None, start_at: float) -> list[tuple[float, float]]:
    """[(seconds relative to the kill, transfers/s)] per 50 ms bucket."""
    fine = o.get("fine")
    if fine is None or kill_t is None:
        return []
    return [(round(t + start_at - kill_t, 3), r) for t, r in fine.series()]


def analyse_failover(times: list[float], kill_t: float | None, measure_from: float,
                     measure_to: float, window_s: float = 1.0, full_fraction: float = 0.9,
                     late_s: float = 0.25) -> dict:
    """From sorted success completion times: the unavailability window (last success before the
    kill to first success after it), the baseline rate before the kill, and when a `window_s`
    window after the kill first reached `full_fraction` of that baseline (seconds from the
    kill).  Pure.

    Replies the old leader sent just before it died can reach the clients just after the kill;
    they are successes from before the outage, not the end of it.  So the window is the longest
    gap between consecutive successes that ends after the kill and starts no later than
    `late_s` after it; with no success after that, there is no window (never recovered)."""
    import bisect
    if kill_t is None:
        return {"unavailable_s": None, "recovered_after_s": None, "baseline_per_s": None,
                "note": "the leader was never killed"}
    i = bisect.bisect_left(times, kill_t)
    j = bisect.bisect_right(times, kill_t + late_s)
    if i == 0:  # no success before the kill
        last_before, first_after = None, (times[0] if times else None)
    elif j == len(times):  # nothing after the late replies: never recovered
        last_before, first_after = times[i - 1], None
    else:
        k = max(range(i, j + 1), key=lambda k: times[k] - times[k - 1])
        last_before, first_after = times[k - 1], times[k]
    base_from = max(measure_from, kill_t - 10.0)
    n_base = i - bisect.bisect_left(times, base_from)
    baseline = n_base / (kill_t - base_from) if kill_t > base_from else None
    recovered = None
    if first_after is not None and baseline:
        t = first_after
        step = 0.05
        while t + window_s <= measure_to:
            n = bisect.bisect_left(times, t + window_s) - bisect.bisect_left(times, t)
            if n / window_s >= full_fraction * baseline:
                recovered = round(t - kill_t, 3)
                break
            t += step
    return {
        "unavailable_s": (round(first_after - last_before, 3)
                          if first_after is not None and last_before is not None else None),
        "kill_to_first_success_s": (round(first_after - kill_t, 3)
                                    if first_after is not None else None),
        "baseline_per_s": round(baseline, 1) if baseline else None,
        "recovered_after_s": recovered,
        "observed_after_kill_s": round(measure_to - kill_t, 2),
    }
