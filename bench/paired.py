"""Paired windows: raftpay against the echo ceiling, alternated on one host.

Why.  The full profile runs each workload once, minutes apart, and on the shared 2-core machine
the echo ceiling (`bench.echo`: what the host does at all for request/reply over loopback with
raftpay's client) has ranged from 29k to 56k requests/s at 64 clients on the same day.  A figure
from one full run says as much about the host's speed at that minute as about raftpay.  This
alternates short windows on one host — echo at N clients, raftpay at N clients, raftpay with
batched requests — with an echo window before and after every pair of raftpay windows, and
reports each raftpay window against the mean of the two echo windows around it:

    E0  R1 B1  E1  R2 B2  E2 ...      R_i / mean(E_i-1, E_i),  B_i / mean(E_i-1, E_i)

The median of those ratios is raftpay's rate per unit of host; a floor divided by it is the
echo rate at which this host lets raftpay reach that floor.  The echo server and the cluster
(real `raftpay node start` processes, `bench.clusters`) are started once and both stay up, the
idle one costing only its ticks.

    python -m bench.paired                             # 4 rounds of 8 s windows, 3 nodes
    python -m bench.paired --rounds 6 --accounts 1000 --fsync never --json /tmp/paired.json

Prints one line per window, then the ratios and the echo rate each issue-4 floor needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from . import echo
from .clusters import BenchCluster, ClusterSpec
from .load import LoadSpec, run_load
from .progress import Progress
from .report import TARGETS
from .runner import _create_accounts, full_profile

#: The full profile's accounts, warm-up and batched requests in flight, so a window here is the
#: same workload as the full run's row of the same name.
_FULL = full_profile()

#: Issue 4's throughput floors (transfers/s, 3 nodes, fsync always), as the full run's report
#: checks them.
FLOORS = {"transfer": TARGETS["conc64_per_s"], "batch": TARGETS["batch8000_per_s"]}


def bracket_ratios(echo_rates: list[float], rates: list[float]) -> list[float]:
    """rates[i] ran between echo windows i and i+1: its ratio to their mean."""
    if len(echo_rates) != len(rates) + 1:
        raise ValueError(f"{len(rates)} windows need {len(rates) + 1} echo windows around "
                         f"them, got {len(echo_rates)}")
    out = []
    for i, r in enumerate(rates):
        ref = (echo_rates[i] + echo_rates[i + 1]) / 2
        if ref <= 0:
            raise ValueError(f"echo windows {i} and {i + 1} completed nothing")
        out.append(r / ref)
    return out


def summarise(echo_rates: list[float], windows: dict[str, list[float]],
              floors: dict[str, float] = FLOORS) -> dict:
    """Ratios per window kind, their median and range, and per floor the echo rate at which
    the median ratio reaches it."""
    out = {"echo_per_s": echo_rates, "kinds": {}}
    for kind, rates in windows.items():
        ratios = bracket_ratios(echo_rates, rates)
        med = statistics.median(ratios)
        k = {"per_s": rates, "ratios": ratios, "median_ratio": med,
             "min_ratio": min(ratios), "max_ratio": max(ratios)}
        if kind in floors and med > 0:
            k["floor"] = floors[kind]
            k["echo_needed_per_s"] = floors[kind] / med
            k["windows_at_floor"] = sum(r >= floors[kind] for r in rates)
        out["kinds"][kind] = k
    return out


def check_args(rounds, seconds, clients, batch, batch_clients, nodes, accounts) -> None:
    """ValueError unless every count is positive and there are at least 2 accounts."""
    if min(rounds, clients, batch, batch_clients, nodes) < 1 or seconds <= 0 or accounts < 2:
        raise ValueError("rounds, seconds, clients, batch, batch clients and nodes must be "
                         "positive, and accounts at least 2")


def run(rounds: int = 4, seconds: float = _FULL.concurrency_s, clients: int = 64,
        batch: int = 8000, batch_clients: int = _FULL.batch_clients, nodes: int = 3,
        fsync: str = "always", accounts: int = _FULL.accounts, warmup_s: float = _FULL.warmup_s,
        progress: Progress | None = None) -> dict:
    """Run the alternation; returns `summarise(...)` plus what ran."""
    check_args(rounds, seconds, clients, batch, batch_clients, nodes, accounts)
    progress = progress or Progress(2 + 3 * rounds, enabled=False)
    spec = ClusterSpec(nodes, fsync)
    echo_rates: list[float] = []
    windows: dict[str, list[float]] = {"transfer": [], "batch": []}

    def window(seeds: str, kind: str, label: str) -> float:
        n, b = (batch_clients, batch) if kind == "batch" else (clients, 1)
        ls = LoadSpec(label, kind, seeds, clients=n, batch=b, accounts=accounts,
                      warmup_s=warmup_s, duration_s=seconds)
        progress.begin(label)
        res = run_load(ls, progress)
        op = res["ops"].get("transfer")
        rate = op["per_s"] if op else 0.0
        errors = sum(res["errors"].values())
        progress.done(f"{rate:,.0f} transfers/s, errors {errors}")
        return rate

    with echo.EchoServer() as srv, BenchCluster(spec) as cluster:
        progress.begin(f"{spec.label}: start cluster, create {accounts:,} accounts")
        cluster.start()
        _create_accounts(cluster.seeds, accounts)
        progress.done("ready")
        echo_rates.append(window(srv.addr, "transfer", f"echo: {clients} clients"))
        for i in range(rounds):
            windows["transfer"].append(window(cluster.seeds, "transfer",
                                              f"{spec.label}: {clients} clients ({i + 1})"))
            windows["batch"].append(window(cluster.seeds, "batch",
                                           f"{spec.label}: batched {batch:,} ({i + 1})"))
            echo_rates.append(window(srv.addr, "transfer", f"echo: {clients} clients"))
    # The floors are stated for 64 clients and 8k batches on 3 nodes with fsync always.
    stated = {"transfer": clients == 64, "batch": batch == 8000}
    floors = {k: v for k, v in FLOORS.items() if nodes == 3 and fsync == "always" and stated[k]}
    out = summarise(echo_rates, windows, floors)
    out["setup"] = {"rounds": rounds, "seconds": seconds, "clients": clients, "batch": batch,
                    "batch_clients": batch_clients, "accounts": accounts, "cluster": spec.label}
    return out


def report(out: dict) -> str:
    s = out["setup"]
    lines = [f"{s['cluster']}, {s['accounts']:,} accounts, {s['rounds']} rounds of "
             f"{s['seconds']:g} s windows; echo at "
             f"{s['clients']} clients: "
             + ", ".join(f"{r:,.0f}" for r in out["echo_per_s"]) + " /s"]
    names = {"transfer": f"{s['clients']} clients x 1 transfer/request",
             "batch": f"batched {s['batch']:,} transfers/request"}
    for kind, k in out["kinds"].items():
        lines.append(f"{names.get(kind, kind)}: "
                     + ", ".join(f"{r:,.0f}" for r in k["per_s"])
                     + f" /s; / echo around it: median {k['median_ratio']:.3f} "
                     f"(range {k['min_ratio']:.3f}-{k['max_ratio']:.3f})")
        if "floor" in k:
            lines.append(f"  floor {k['floor']:,}/s: reached in {k['windows_at_floor']} of "
                         f"{len(k['per_s'])} windows; at the median ratio it needs an echo "
                         f"ceiling of {k['echo_needed_per_s']:,.0f}/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paired",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="raftpay window pairs (default 4)")
    p.add_argument("--seconds", type=float, default=_FULL.concurrency_s,
                   help="measured s per window (default %(default)g, as the full profile)")
    p.add_argument("--clients", type=int, default=64, help="clients, one transfer each (64)")
    p.add_argument("--batch", type=int, default=8000, help="transfers per batched request (8000)")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--accounts", type=int, default=_FULL.accounts,
                   help="accounts the transfers pick from (default %(default)s, as the full "
                        "profile)")
    p.add_argument("--fsync", choices=("always", "never"), default="always")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    a = p.parse_args(argv)
    try:
        check_args(a.rounds, a.seconds, a.clients, a.batch, _FULL.batch_clients, a.nodes,
                   a.accounts)
    except ValueError as e:
        p.error(str(e))
    out = run(a.rounds, a.seconds, a.clients, a.batch, nodes=a.nodes, fsync=a.fsync,
              accounts=a.accounts, progress=Progress(2 + 3 * a.rounds))
    print(report(out), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
