"""Too much and too uneven: a follower slower than the writes, more batched writers than the log
takes.  What the leader's memory does, and what the clients are told.

    python -m bench.stress                          # all three, ~5 min
    python -m bench.stress --only slow-follower --rounds 3 --json /tmp/stress.json

slow-follower: 3 nodes (fsync never: the stopped follower, not the disk, is the slow part), 4
clients of `--batch`-transfer requests, one follower stopped (SIGSTOP) 0.5 s of every 0.6 s for
`--seconds`.  Run in pairs (`--rounds` of them): the flow control on (`[raft]
append_backlog_bytes`, 16 MiB unless `--backlog-bytes`), and out of reach (4 GiB: every entry
since the follower fell behind waits in the leader's memory, as upstream PySyncObj does).
Reports the leader's resident memory above the healthy follower's (sampled every 0.5 s: peak,
and mean over the second half; it varies from run to run: a leader drops its link to a
follower whose loop is blocked for long, installing a snapshot at a sixth of its speed, and
with it what waited to be sent), transfers/s, whether the slow follower catches up once
resumed, and whether the three replicas end on one state hash.

flood: 3 nodes, fsync always, `--flood-clients` (128) clients of `--batch`-transfer requests at
once for `--flood-seconds`.  Reports the requests acknowledged, and those that ended
`outcome unknown`, `unavailable` or otherwise, the leader's peak resident memory, and whether
the replicas end on one state hash.

connections: 3 nodes started at a descriptor limit of `--fd-limit` (1000); `--client-conns`
(3000) idle connections to the leader's client port and `--raft-conns` (500) to its Raft port,
at once.  Reports the leader's descriptors then and 5 s later, whether 200 transfers over a
connection opened before all succeed meanwhile, what a new client gets, whether one succeeds
once the connections close, and the ERROR/CRITICAL lines and failed Raft ticks in the logs.

Prints a table (and `--json`); exits 1 if the replicas disagree, the slow follower does not
catch up within 60 s, or a transfer fails or an error is logged under the connections.
Memory is reported, not judged: no issue states a bound.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

from .clusters import BenchCluster, ClusterSpec, proc_rss_mb, replica_hashes
from .load import LoadSpec, run_load
from .runner import _create_accounts

ACCOUNTS = 1000
#: The follower's duty cycle: stopped, then running, seconds.
STOPPED_S, RUNNING_S = 0.5, 0.1
#: "Out of reach": more than the run can append.
UNBOUNDED = 4 * 1024 ** 3
#: How often memory is sampled.
SAMPLE_S = 0.5


def _load(seeds: str, clients: int, batch: int, seconds: float, during=None) -> dict:
    return run_load(LoadSpec(name="stress", kind="batch", seeds=seeds, clients=clients,
                             batch=batch, accounts=ACCOUNTS, warmup_s=0.5, duration_s=seconds,
                             timeout_s=10), during=during)


def _outcomes(res: dict) -> dict:
    """Requests acknowledged, and the errors by kind over the whole run (warm-up included)."""
    op = res["ops"].get("transfer", {})
    errors = {k.split(":", 1)[1]: n for k, n in res.get("errors_all", {}).items()}
    return {"transfers_per_s": round(op.get("per_s", 0)), "errors": errors,
            "outcome_unknown": errors.get("OutcomeUnknown", 0),
            "error_examples": res.get("error_examples", [])[:3]}


def _said(c: BenchCluster, words: str) -> int:
    """Lines of the nodes' logs that contain `words`."""
    n = 0
    for node_id in c.addr_of:
        try:
            with open(c.local.log_path(node_id), errors="replace") as f:
                n += sum(words in line for line in f)
        except OSError:
            pass
    return n


def slow_follower(backlog_bytes: int, seconds: float, batch: int) -> dict:
    spec = ClusterSpec(nodes=3, fsync="never",
                       options=(("raft", (("append_backlog_bytes", backlog_bytes),)),))
    with BenchCluster(spec) as c:
        c.start()
        leader = c.wait_for_leader()
        _create_accounts(c.seeds, ACCOUNTS)
        slow, healthy = c.followers()[:2]
        slow_pid, leader_pid, healthy_pid = c.pid(slow), c.pid(leader), c.pid(healthy)
        extra: list[float] = []  # leader RSS above the healthy follower's, MiB
        state = {"stopped": False, "flip_at": 0.0, "sample_at": 0.0}

        def during(elapsed: float) -> None:
            if elapsed >= state["flip_at"]:
                state["stopped"] = not state["stopped"]
                os.kill(slow_pid, signal.SIGSTOP if state["stopped"] else signal.SIGCONT)
                state["flip_at"] = elapsed + (STOPPED_S if state["stopped"] else RUNNING_S)
            if elapsed >= state["sample_at"]:
                state["sample_at"] = elapsed + SAMPLE_S
                lead, other = proc_rss_mb(leader_pid), proc_rss_mb(healthy_pid)
                if lead is not None and other is not None:
                    extra.append(lead - other)
        try:
            res = _load(c.seeds, 4, batch, seconds, during)
        finally:
            os.kill(slow_pid, signal.SIGCONT)
        t0 = time.monotonic()
        caught_up = c.wait_caught_up(60)
        catch_up_s = time.monotonic() - t0
        hashes = replica_hashes(c.addr_of)
        cut_off = _said(c, "no Raft connection to")
        dropped = _said(c, "dropping a Raft connection")
        half = extra[len(extra) // 2:] or [float("nan")]
        return {"backlog_bytes": backlog_bytes, **_outcomes(res),
                "leader_extra_mb_peak": round(max(extra, default=float("nan")), 1),
                "leader_extra_mb_late_mean": round(sum(half) / len(half), 1),
                "caught_up": caught_up, "catch_up_s": round(catch_up_s, 1),
                "links_down_10s": cut_off, "connections_refused": dropped,
                "replicas_agree": len(hashes) == 3 and len(set(hashes.values())) == 1,
                "replica_hashes": hashes}


def flood(clients: int, seconds: float, batch: int) -> dict:
    with BenchCluster(ClusterSpec(nodes=3, fsync="always")) as c:
        c.start()
        leader = c.wait_for_leader()
        _create_accounts(c.seeds, ACCOUNTS)
        leader_pid = c.pid(leader)
        peak = [0.0]
        sample_at = [0.0]

        def during(elapsed: float) -> None:
            if elapsed >= sample_at[0]:
                sample_at[0] = elapsed + SAMPLE_S
                peak[0] = max(peak[0], proc_rss_mb(leader_pid) or 0.0)
        res = _load(c.seeds, clients, batch, seconds, during)
        hashes = replica_hashes(c.addr_of)
        requests = res["ops"].get("transfer", {}).get("requests", 0)
        return {"clients": clients, **_outcomes(res), "requests_acknowledged": requests,
                "leader_peak_mb": round(peak[0], 1),
                "replicas_agree": len(hashes) == 3 and len(set(hashes.values())) == 1,
                "replica_hashes": hashes}


def connections(fd_limit: int, client_conns: int, raft_conns: int) -> dict:
    """A leader whose descriptor limit is `fd_limit` (`ulimit -n`, set for the nodes) gets
    `client_conns` idle connections on its client port and `raft_conns` on its Raft port, at
    once.  Writes go on over a connection opened before; see what the node says and keeps."""
    import resource
    import socket

    from raftpay.client import Client
    from raftpay.codes import Code, RaftpayError
    from raftpay.server import connection_cap
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = client_conns + raft_conns + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"--fd-limit scenario needs a hard descriptor limit of {need} for this "
                         f"process (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))
    try:
        c = BenchCluster(ClusterSpec(nodes=3, fsync="never"))
        c.start()  # the nodes inherit the low limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    socks: list = []
    with c:
        leader = c.wait_for_leader()
        pid = c.pid(leader)
        held = Client(c.addr_of[leader], timeout_s=10)
        held.create_accounts([{"id": i, "currency": 1} for i in (1, 2)])

        def fds() -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        def open_all(addr: str, n: int) -> int:
            host, port = addr.rsplit(":", 1)
            opened = 0
            for _ in range(n):
                sock = socket.socket()
                sock.settimeout(3)
                try:
                    sock.connect((host, int(port)))
                except OSError:
                    sock.close()
                    break
                socks.append(sock)
                opened += 1
            return opened
        raft_addr = next(x.node.raft_addr for x in c.local.configs if x.node.id == leader)
        opened_client = open_all(c.addr_of[leader], client_conns)
        opened_raft = open_all(raft_addr, raft_conns)
        time.sleep(1.5)
        fds_flooded = fds()
        ok = 0
        for i in range(200):
            try:
                ok += held.transfer(f"c-{i}", 1, 2, 1, 1) == Code.OK
            except RaftpayError:
                pass
        try:
            with Client(c.addr_of[leader], timeout_s=2) as fresh:
                fresh.transfer("fresh", 1, 2, 1, 1)
            new_client = "served"
        except RaftpayError as e:
            new_client = type(e).__name__
        time.sleep(5)  # the Raft port's strangers: closed after the connection timeout
        fds_later = fds()
        for sock in socks:
            sock.close()
        socks.clear()
        try:
            with Client(c.addr_of[leader], timeout_s=10) as after:
                after_ok = after.transfer("after", 1, 2, 1, 1) == Code.OK
        except RaftpayError:
            after_ok = False
        held.close()
        return {"fd_limit": fd_limit, "client_cap": connection_cap(10_000, fd_limit),
                "client_conns_opened": opened_client, "raft_conns_opened": opened_raft,
                "leader_fds_flooded": fds_flooded, "leader_fds_5s_later": fds_later,
                "transfers_ok_while_flooded": ok, "new_client_while_flooded": new_client,
                "transfer_after_close_ok": after_ok,
                "error_lines": _said(c, " ERROR ") + _said(c, " CRITICAL "),
                "tick_failures": _said(c, "Raft tick failed")}


def report(out: dict) -> str:
    lines = []
    runs = out.get("slow_follower")
    if runs:
        lines += [f"slow follower ({out['seconds']:g} s, 4 clients x {out['batch']} transfers, "
                  f"one follower stopped {STOPPED_S} s of every {STOPPED_S + RUNNING_S:g} s):",
                  "| append_backlog_bytes | leader above healthy follower, MiB: peak | "
                  "late mean | transfers/s | outcome unknown | caught up after | "
                  "links down ≥ 10 s / connections refused (log lines) | replicas agree |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            label = "4 GiB (no flow control)" if r["backlog_bytes"] == UNBOUNDED \
                else f"{r['backlog_bytes'] / 2**20:g} MiB"
            lines.append(f"| {label} | {r['leader_extra_mb_peak']:.0f} | "
                         f"{r['leader_extra_mb_late_mean']:.0f} | {r['transfers_per_s']:,} | "
                         f"{r['outcome_unknown']} | "
                         f"{r['catch_up_s'] if r['caught_up'] else 'NOT'} s | "
                         f"{r['links_down_10s']} / {r['connections_refused']} | "
                         f"{'yes' if r['replicas_agree'] else 'NO'} |")
        on = [r["leader_extra_mb_peak"] for r in runs if r["backlog_bytes"] != UNBOUNDED]
        off = [r["leader_extra_mb_peak"] for r in runs if r["backlog_bytes"] == UNBOUNDED]
        if on and off and statistics.median(off) > 0:
            lines.append(f"median peak, flow control on / off: {statistics.median(on):.0f} / "
                         f"{statistics.median(off):.0f} MiB = "
                         f"{statistics.median(on) / statistics.median(off):.2f}")
    k = out.get("connections")
    if k:
        lines += ["", f"connections (a leader at ulimit -n {k['fd_limit']}, client cap "
                  f"{k['client_cap']}): {k['client_conns_opened']} idle client and "
                  f"{k['raft_conns_opened']} idle Raft connections opened at once; leader "
                  f"descriptors {k['leader_fds_flooded']}, {k['leader_fds_5s_later']} 5 s later; "
                  f"{k['transfers_ok_while_flooded']}/200 transfers OK meanwhile over a "
                  f"connection opened before; a new client: {k['new_client_while_flooded']}; "
                  f"after they closed: {'OK' if k['transfer_after_close_ok'] else 'FAILED'}; "
                  f"ERROR/CRITICAL lines {k['error_lines']}, failed ticks {k['tick_failures']}"]
    f = out.get("flood")
    if f:
        errors = ", ".join(f"{k} {n}" for k, n in sorted(f["errors"].items())) or "none"
        lines += ["", f"flood ({f['clients']} clients x {out['batch']} transfers, "
                  f"{out['flood_seconds']:g} s, fsync always): {f['requests_acknowledged']} "
                  f"requests acknowledged in the window ({f['transfers_per_s']:,} transfers/s); "
                  f"errors over the run: {errors}; leader peak {f['leader_peak_mb']:.0f} MiB; "
                  f"replicas agree: {'yes' if f['replicas_agree'] else 'NO'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["slow-follower", "flood", "connections"])
    ap.add_argument("--seconds", type=float, default=45, help="slow-follower runs (each)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="slow-follower pairs (on, off) to run; the peaks vary from run to run")
    ap.add_argument("--flood-seconds", type=float, default=15)
    ap.add_argument("--flood-clients", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8000, help="transfers per request")
    ap.add_argument("--backlog-bytes", type=int, default=16 * 1024 * 1024,
                    help="append_backlog_bytes of the flow-controlled run")
    ap.add_argument("--fd-limit", type=int, default=1000,
                    help="connections: the nodes' descriptor limit (ulimit -n)")
    ap.add_argument("--client-conns", type=int, default=3000)
    ap.add_argument("--raft-conns", type=int, default=500)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    for name in ("seconds", "rounds", "flood_seconds", "flood_clients", "batch",
                 "backlog_bytes", "fd_limit", "client_conns", "raft_conns"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    out: dict = {"seconds": args.seconds, "flood_seconds": args.flood_seconds,
                 "batch": args.batch, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.only in (None, "slow-follower"):
        out["slow_follower"] = [slow_follower(b, args.seconds, args.batch)
                                for _ in range(args.rounds)
                                for b in (args.backlog_bytes, UNBOUNDED)]
    if args.only in (None, "flood"):
        out["flood"] = flood(args.flood_clients, args.flood_seconds, args.batch)
    if args.only in (None, "connections"):
        out["connections"] = connections(args.fd_limit, args.client_conns, args.raft_conns)
    print(report(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    runs = out.get("slow_follower", []) + ([out["flood"]] if "flood" in out else [])
    ok = all(r["replicas_agree"] and r.get("caught_up", True) for r in runs)
    k = out.get("connections")
    if k:
        ok = ok and (k["transfers_ok_while_flooded"] == 200 and k["transfer_after_close_ok"]
                     and k["tick_failures"] == 0 and k["error_lines"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
