"""Writing results: results.json, results.md (tables), PNG plots, and the check against targets.

Design.  Everything here reads the plain results dict that `runner.run` builds; nothing measures.
`check_targets` compares the figures with the targets of issue 4 and says pass/fail beside each
figure, in the markdown and on stderr; `ratios` divides figures by others of the same run
(raftpay / bare PySyncObj, Raft / ZooKeeper mode for throughput and failover time, raftpay / the
echo ceiling), which on a shared machine say more than absolute figures.  Plots need matplotlib
(the `bench` extra); without it the JSON and markdown are still written and the markdown says
the plots were skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

from .echo import LABEL as ECHO_LABEL
from .hist import Histogram

#: Issue 4's targets.
TARGETS = {
    "p50_ms": 1.5,  # single client, one transfer at a time
    "p99_ms": 5.0,
    "conc64_per_s": 15_000,
    "batch8000_per_s": 100_000,
    "fsync_ratio": 0.7,  # fsync=always throughput >= 70% of fsync=never
}

#: The spec name of "64 clients sharing 8 connections" (`runner.Profile.shared_conns`).
SHARED64 = "conc64c8"

#: Failover time (median unavailability window) of Raft over that of the ZooKeeper mode.
FAILOVER_RATIO_TARGET = 0.5


def _find(results: dict, cluster: str, spec_name: str, op: str = "transfer") -> dict | None:
    for r in results["runs"]:
        if r["cluster"] == cluster and r["spec_name"] == spec_name and r["op"] == op:
            return r
    return None


def detail_label(results: dict) -> str:
    return results.get("detail_cluster") or "3n-fsync-always"


def check_targets(results: dict) -> list[dict]:
    """One row per target: what was measured where, and whether it meets the target."""
    main = detail_label(results)
    never = main.replace("fsync-always", "fsync-never")
    rows = []

    def add(name, target_text, value, ok, where, unit=""):
        rows.append({"target": name, "wanted": target_text,
                     "measured": None if value is None else f"{value:,.3f}".rstrip("0").rstrip(".")
                     + unit, "ok": ok, "where": where})

    lat = _find(results, main, "latency")
    p50 = lat["latency"]["p50_ms"] if lat else None
    p99 = lat["latency"]["p99_ms"] if lat else None
    add("single-client p50", f"<= {TARGETS['p50_ms']} ms", p50,
        None if p50 is None else p50 <= TARGETS["p50_ms"], f"{main}, 1 blocking client", " ms")
    add("single-client p99", f"<= {TARGETS['p99_ms']} ms", p99,
        None if p99 is None else p99 <= TARGETS["p99_ms"], f"{main}, 1 blocking client", " ms")
    c64 = _find(results, main, "conc64")
    v = c64["per_s"] if c64 else None
    add("64 clients", f">= {TARGETS['conc64_per_s']:,} transfers/s", v,
        None if v is None else v >= TARGETS["conc64_per_s"], f"{main}, 1 transfer/request",
        " /s")
    c64s = _find(results, main, SHARED64)
    if c64s:
        v = c64s["per_s"]
        add("64 clients, shared connections", f">= {TARGETS['conc64_per_s']:,} transfers/s", v,
            v >= TARGETS["conc64_per_s"], f"{main}, {c64s['workload']}", " /s")
    b8 = _find(results, main, "batch8000")
    v = b8["per_s"] if b8 else None
    add("batched 8k", f">= {TARGETS['batch8000_per_s']:,} transfers/s", v,
        None if v is None else v >= TARGETS["batch8000_per_s"], f"{main}, 8,000 events/request",
        " /s")
    for spec_name, what in (("conc64", "64 clients"), (SHARED64, "64 clients over 8 conns"),
                            ("batch8000", "batched 8k")):
        a, n = _find(results, main, spec_name), _find(results, never, spec_name)
        ratio = a["per_s"] / n["per_s"] if a and n and n["per_s"] else None
        add(f"fsync always vs never ({what})",
            f">= {TARGETS['fsync_ratio']:.2f} (within 30%)", ratio,
            None if ratio is None else ratio >= TARGETS["fsync_ratio"],
            f"{main} / {never}")
    return rows


def _modes_text(results: dict) -> str:
    """Which modes the run's clusters used, for the results header."""
    names = {"raft": "Raft mode", "zk-election": "ZooKeeper-elected primary-backup mode, with "
             "a ZooKeeper ensemble: 3 servers the harness starts, unless --zk-hosts named one"}
    modes = sorted({c.get("mode") for c in (results.get("clusters") or {}).values()
                    if c.get("mode") in names} or {"raft"})
    return " and ".join(names[m] for m in modes)


def _ratio(group: str, what: str, value, reference, nd: int = 3,
           target: float | None = None) -> dict:
    r = round(value / reference, nd)
    return {"group": group, "what": what, "value": value, "reference": reference, "ratio": r,
            "target": None if target is None else f"<= {target}",
            "ok": None if target is None else r <= target}


def median_unavailable(results: dict, cluster: str) -> tuple[float | None, int, int]:
    """(median unavailability window in s, runs with a window, failover runs) of `cluster`.
    A run with no success after the kill within the observed time has no window."""
    runs = [f for f in results.get("failover") or [] if f["cluster"] == cluster]
    xs = [f["unavailable_s"] for f in runs if f.get("unavailable_s") is not None]
    return (statistics.median(xs) if xs else None), len(xs), len(runs)


def mode_pairs(results: dict) -> list[tuple[str, str]]:
    """(Raft cluster, cluster of another mode with the same nodes and fsync) for every such
    pair in the run, from `results["clusters"]` (the echo ceiling is no mode)."""
    cl = results.get("clusters") or {}
    pairs = []
    for a, ca in sorted(cl.items()):
        if ca.get("mode") != "raft":
            continue
        for b, cb in sorted(cl.items()):
            if cb.get("mode") not in ("raft", "echo") and (cb.get("nodes"), cb.get("fsync")) \
                    == (ca.get("nodes"), ca.get("fsync")):
                pairs.append((a, b))
    return pairs


def ratios(results: dict) -> list[dict]:
    """Figures divided by others of the same run, one dict each: `group`, `what`, `value`,
    `reference`, `ratio`, and `target`/`ok` where there is a target.  Groups: raftpay / bare
    PySyncObj; Raft / ZooKeeper mode (64-client and 8k-batch throughput, and failover time =
    median unavailability window, target <= 0.5); raftpay / the echo ceiling at 64 clients."""
    out = []
    bare = results.get("bare", {})
    main = detail_label(results)
    thr = bare.get("default/throughput")
    lat = bare.get("no-batch/latency")
    labels = sorted({r["cluster"] for r in results["runs"] if r.get("mode") != "echo"})
    g = "raftpay / bare PySyncObj"
    for label in labels:
        c64 = _find(results, label, "conc64")
        if thr and c64 and thr["per_s"]:
            out.append(_ratio(g, f"{label}: 64 clients transfers/s / bare commands/s",
                              c64["per_s"], thr["per_s"]))
        b = _find(results, label, "batch8000")
        if thr and b and thr["per_s"]:
            out.append(_ratio(g, f"{label}: batched 8k transfers/s / bare commands/s",
                              b["per_s"], thr["per_s"]))
    r = _find(results, main, "latency")
    if lat and r and lat["latency"]["p50_ms"]:
        out.append(_ratio(g, f"{main}: single-client p50 ms / bare appendEntriesUseBatch=False "
                             "p50 ms", r["latency"]["p50_ms"], lat["latency"]["p50_ms"], 2))
    g = "Raft / ZooKeeper mode"
    for a, b in mode_pairs(results):
        for spec_name, what in (("conc64", "64 clients"), (SHARED64, "64 clients over 8 conns"),
                                ("batch8000", "batched 8k")):
            ra, rb = _find(results, a, spec_name), _find(results, b, spec_name)
            if ra and rb and rb["per_s"]:
                out.append(_ratio(g, f"throughput, {what}: {a} / {b} (transfers/s)",
                                  ra["per_s"], rb["per_s"]))
        (ma, na, ta), (mb, nb, tb) = median_unavailable(results, a), median_unavailable(results, b)
        if ma is not None and mb:
            note = "" if (na, nb) == (ta, tb) else \
                f"; runs with no success after the kill left out: {ta - na} and {tb - nb}"
            out.append(_ratio(g, f"failover time: {a} / {b} (median unavailable s, {na} and "
                                 f"{nb} runs{note})", ma, mb, 2, FAILOVER_RATIO_TARGET))
        elif ta or tb:
            out.append({"group": g, "what": f"failover time: {a} / {b} (no unavailability "
                                             "window measured on one side)",
                        "value": ma, "reference": mb, "ratio": None,
                        "target": f"<= {FAILOVER_RATIO_TARGET}", "ok": None})
    g = "raftpay / echo ceiling"
    for spec_name, what in (("conc64", "64 clients"), (SHARED64, "64 clients over 8 conns")):
        echo64 = _find(results, ECHO_LABEL, spec_name)
        if echo64 and echo64["per_s"]:
            for label in labels:
                c64 = _find(results, label, spec_name)
                if c64:
                    out.append(_ratio(g, f"{label}: {what} transfers/s / {ECHO_LABEL} at "
                                         f"{what}", c64["per_s"], echo64["per_s"]))
    return out


# --- JSON -----------------------------------------------------------------------------------

def _jsonable(o):
    if isinstance(o, Histogram):
        return o.to_dict()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return _jsonable(dataclasses.asdict(o))
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and o != o:
        return None
    return o


def write_json(results: dict, path: str) -> None:
    doc = dict(results)
    doc["profiles"] = [{k: v for k, v in p.items() if k != "collapsed_stacks"}
                       for p in results.get("profiles") or []]
    with open(path, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
        f.write("\n")


# --- markdown -------------------------------------------------------------------------------

def _fmt(v, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _fmt_num(v) -> str:
    return _fmt(float(v)) if isinstance(v, (int, float)) else _fmt(v)


def _cores(c: dict | None) -> str:
    if not c:
        return "–"
    other = c.get("other_cores")
    return (f"{c['nodes_cores']:.2f}+{c['clients_cores']:.2f}"
            + ("" if other is None else f" ({other:.2f})"))


def _ok(v) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def markdown(results: dict) -> str:
    m = results["meta"]
    L = [f"# raftpay benchmark — {m['profile']} profile", "",
         f"- command: `{m['command']}`",
         f"- started {m['date_utc']}, finished {m.get('finished_utc', '?')}",
         f"- git {m.get('git_commit')}{' + uncommitted changes in raftpay/' if m.get('raftpay_tree_dirty') else ''};"
         f" Python {m['python']}; PySyncObj {m['pysyncobj']}; {m['cpus']} CPUs ({m['machine']},"
         f" Linux {m['kernel']})",
         f"- clusters are real node processes on 127.0.0.1 ({_modes_text(results)}; node "
         "traffic authenticated with the cluster secret), started and stopped by the harness; "
         "clients are the project's own (`Client` for the latency row, `AsyncClient` otherwise, "
         "one per logical client with sessions, or shared as the \"over N connections\" rows "
         "say); load generators are separate processes on the same 2 cores."]
    if any(r.get("mode") == "echo" for r in results["runs"]):
        L.append(f"- `{ECHO_LABEL}` rows: `bench/echo.py`, one process that answers the same "
                 "client protocol with code 0 per event and does nothing else (no replication, "
                 "no ledger, no fsync), driven by the same clients and load generator: what this "
                 "machine does at all for request/reply over loopback with this client.")
    L.append("")
    L += ["## Targets (issue 4)", "", "| target | wanted | measured | result | where |",
          "|---|---|---|---|---|"]
    for t in check_targets(results):
        L.append(f"| {t['target']} | {t['wanted']} | {t['measured'] or '–'} | {_ok(t['ok'])} |"
                 f" {t['where']} |")
    L += ["", "## Throughput and latency", "",
          "Latency is per request (send to reply), from an HDR-style log-linear histogram "
          "(< 1% error).  Throughput counts only successful events completed inside the "
          "measurement window (after warm-up).  Leader CPU is the leader process's user+system "
          "CPU over the window divided by the transfers in it (at low rates that includes the "
          "idle tick).  Batched rows: transfers/s from the first to the last completion in "
          "the window (a window holds few 8k requests).  Requests/Raft entry: client requests completed per leader commit-index "
          "step (group commit at work).  Cores busy: CPU seconds per second of the window used by the node "
          "processes and the load generators, and in brackets by everything else on the machine "
          "(a shared machine shows up there).", "",
          "| cluster | workload | clients (procs) | events/req | ops/s | p50 ms | p99 ms | "
          "p99.9 ms | max ms | errors | requests/Raft entry | leader CPU µs/transfer | "
          "cores busy: nodes+clients (other) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lat = r["latency"]
        errs = sum(r["errors"].values())
        wl = r["workload"] + (" — reads" if r["op"] == "read" else
                              " — writes" if r["kind"] == "mix" else "")
        L.append(f"| {r['cluster']} | {wl} | {r['clients']} ({r['load_procs']}) | "
                 f"{_fmt(r['events_per_request'])} | {_fmt(float(r['per_s']))} {r['unit']} | "
                 f"{_fmt(lat['p50_ms'])} | {_fmt(lat['p99_ms'])} | {_fmt(lat['p999_ms'])} | "
                 f"{_fmt(lat['max_ms'])} | {errs or 0} | {_fmt(r.get('requests_per_entry'), 1)} | "
                 f"{_fmt(r['leader_cpu_us_per_item'], 0)} | "
                 f"{_cores(r.get('cpu_cores'))} |")
    errs = [(r["cluster"], r["workload"], r["errors"], r["error_examples"])
            for r in results["runs"] if r["errors"]]
    if errs:
        L += ["", "Errors by kind (operation:exception class or result code):", ""]
        for c, w, e, ex in errs:
            L.append(f"- {c}, {w}: " + ", ".join(f"`{k}` × {v}" for k, v in e.items())
                     + (f" (e.g. {ex[0]!r})" if ex else ""))
    if results.get("failover"):
        L += ["", "## Failover (kill -9 of the leader under steady load)", "",
              "On the detail cluster and on the cluster of each other mode with the same nodes "
              "and fsync (for zk-election the leader is the ZooKeeper-elected primary).  "
              "Unavailable = last success before the kill → first success after it (replies "
              "the old leader sent before it died that reach a client up to 0.25 s after the "
              "kill count as before: `runner.analyse_failover`).  Back to "
              "full = from the kill to the start of the first 1 s window with ≥ 90% of the "
              "pre-kill rate.", ""]
        for label in dict.fromkeys(f["cluster"] for f in results["failover"]):
            med, n, runs = median_unavailable(results, label)
            backs = [f["recovered_after_s"] for f in results["failover"]
                     if f["cluster"] == label and f["recovered_after_s"] is not None]
            back = f"{_fmt(statistics.median(backs))} s" if backs else "–"
            L.append(f"- {label}: median unavailable {_fmt(med)} s over {n} of {runs} runs; "
                     f"median back to full {back} ({len(backs)} of {runs} runs got there)")
        L += ["",
              "| cluster | run | clients | killed → new leader | pre-kill transfers/s | "
              "unavailable s | kill → first success s | new leader seen after s | "
              "back to full s | errors | restarted node caught up after s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in results["failover"]:
            e = ", ".join(f"{k} × {v}" for k, v in f["errors"].items()) or "0"
            back = _fmt(f["recovered_after_s"]) if f["recovered_after_s"] is not None else \
                f"not within {f.get('observed_after_kill_s')} s"
            L.append(f"| {f['cluster']} | {f['run']} | {f['clients']} | {f['killed']} → "
                     f"{f['new_leader'] or '?'} | {_fmt(f['baseline_per_s'])} | "
                     f"{_fmt(f['unavailable_s'])} | {_fmt(f.get('kill_to_first_success_s'))} | "
                     f"{_fmt(f['leader_seen_after_s'])} | {back} | {e} | "
                     f"{_fmt(f.get('restart_caught_up_s'))} |")
    if results.get("bare"):
        L += ["", "## Ceiling: bare PySyncObj 0.3.17, 3 processes, submitters in the leader "
              "process", "",
              "No raftpay code, no encryption, in-memory journal, 100-byte commands; "
              "`window` commands in flight.", "",
              "| settings | run | window | commands/s | p50 ms | p99 ms | leader CPU µs/command |"
              " errors | PySyncObj's own log (so far) |", "|---|---|---|---|---|---|---|---|---|"]
        for key, b in results["bare"].items():
            cfg = ("defaults (appendEntriesUseBatch=True)" if b["config"] == "default"
                   else "appendEntriesUseBatch=False")
            cpu = b["leader_cpu_ms_per_op"]
            L.append(f"| {cfg} | {key.split('/')[1]} | {b['window']:,} | {_fmt(b['per_s'])} | "
                     f"{_fmt(b['latency']['p50_ms'])} | {_fmt(b['latency']['p99_ms'])} | "
                     f"{_fmt(None if cpu is None else cpu * 1000, 0)} | "
                     f"{sum(b['errors'].values())} | "
                     + (", ".join(f"{k} × {v}" for k, v in b.get("upstream_log", {}).items())
                        or "clean") + " |")
    rs = ratios(results)
    if rs:
        L += ["", "## Ratios (same run)", "",
              "| group | what | value | reference | ratio | target |",
              "|---|---|---|---|---|---|"]
        for r in rs:
            tgt = f"{r['target']}: {_ok(r['ok'])}" if r["target"] else ""
            ratio = "–" if r["ratio"] is None else r["ratio"]
            L.append(f"| {r['group']} | {r['what']} | {_fmt_num(r['value'])} | "
                     f"{_fmt_num(r['reference'])} | {ratio} | {tgt} |")
    profs = [p for p in results.get("profiles") or [] if "skipped" not in p]
    if profs:
        L += ["", "## Where the leader's CPU goes (py-spy --gil)", "",
              "Samples of the thread holding the GIL in the leader process: where its Python "
              "time goes.  On a saturated machine a thread can hold the GIL while the OS has "
              "it descheduled, so 'GIL held' can exceed the process's CPU share.  CPU in syscalls that release the GIL (socket I/O, os.fsync) is not in "
              "them; msync through `mmap.flush()` is, because CPython keeps the GIL across it "
              "(it then blocks the asyncio thread too).  Percent of samples."]
        for prof in profs:
            L += ["", f"### {prof['workload']} ({prof['cluster']}, leader {prof['leader']})", "",
                  f"{_fmt(prof['transfers_per_s'])} transfers/s; leader process "
                  f"{_fmt(prof['leader_cores'])} cores = "
                  f"{_fmt(prof['leader_cpu_us_per_transfer'], 0)} µs CPU per transfer; GIL held "
                  f"{100 * prof['gil_held_fraction']:.0f}% of the time; "
                  f"{_fmt(prof['requests_per_entry'], 1)} requests per Raft entry; machine "
                  f"busy {_fmt(prof['machine_busy_cores'])} of {results['meta']['cpus']} cores; "
                  f"{prof['samples']:,} samples.", "",
                  "| thread | % | | self time by module | % | | inclusive by module | % |",
                  "|---|---|---|---|---|---|---|---|"]
            cols = [prof["threads"], prof["self_by_module"], prof["inclusive_by_module"]]
            for i in range(max(len(c) for c in cols)):
                cells = []
                for c in cols:
                    name, pct = c[i] if i < len(c) else ("", "")
                    cells += [name, str(pct)]
                L.append("| " + " | | ".join(f"{cells[j]} | {cells[j + 1]}"
                                            for j in range(0, 6, 2)) + " |")
            L += ["", "| top functions by self time | % |", "|---|---|"]
            L += [f"| `{n}` | {p} |" for n, p in prof["top_self_functions"]]
    for prof in results.get("profiles") or []:
        if "skipped" in prof:
            L += ["", f"Leader profile under {prof['workload']} skipped: {prof['skipped']}"]
    if results.get("plots"):
        L += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})"
                                     for p in results["plots"]]
    elif results.get("plots_skipped"):
        L += ["", f"Plots skipped: {results['plots_skipped']}"]
    if results.get("problems"):
        L += ["", "## Problems during the run", ""] + [f"- {p}" for p in results["problems"]]
    return "\n".join(L) + "\n"


# --- plots ----------------------------------------------------------------------------------

def plots(results: dict, out_dir: str) -> list[str]:
    """Write the PNGs; returns their file names.  Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = results["runs"]
    labels = sorted({r["cluster"] for r in runs})
    bare_thr = results.get("bare", {}).get("default/throughput")
    meta = results["meta"]
    foot = f"{meta['date_utc']}, git {meta.get('git_commit')}, {meta['cpus']} CPUs, loopback"

    # 1. Throughput vs clients, and vs batch size.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for label in labels:
        pts = sorted((r["clients"], r["per_s"]) for r in runs
                     if r["cluster"] == label and r["spec_name"].startswith("conc"))
        if pts:
            style = (dict(color="black", ls=":", marker="^") if label == ECHO_LABEL
                     else dict(marker="o"))
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        pts = sorted((r["events_per_request"], r["per_s"]) for r in runs
                     if r["cluster"] == label and r["kind"] == "batch")
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", label=label)
    ax1.axhline(TARGETS["conc64_per_s"], color="red", ls="--", lw=1,
                label=f"target at 64 clients ({TARGETS['conc64_per_s']:,}/s)")
    if bare_thr:
        ax1.axhline(bare_thr["per_s"], color="gray", ls=":", lw=1.5,
                    label=f"bare PySyncObj ceiling ({bare_thr['per_s']:,.0f} commands/s)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent clients (one transfer per request)")
    ax1.set_ylabel("transfers per second (log scale)")
    ax1.set_title("Throughput vs concurrent clients")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.axhline(TARGETS["batch8000_per_s"], color="red", ls="--", lw=1,
                label=f"target at 8k/request ({TARGETS['batch8000_per_s']:,}/s)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("transfers per request (batched)")
    ax2.set_ylabel("transfers per second (log scale)")
    ax2.set_title("Throughput vs batch size")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"raftpay throughput ({foot})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput_vs_clients.png"), dpi=110)
    plt.close(fig)
    written.append("throughput_vs_clients.png")

    # 2. Latency CDF.
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        if r["spec_name"] not in ("latency", "conc64"):
            continue
        h = r["hist"] if isinstance(r["hist"], Histogram) else Histogram.from_dict(r["hist"])
        if not h.count:
            continue
        pts = h.cdf()
        what = "1 client" if r["spec_name"] == "latency" else "64 clients"
        ax.step([v / 1000 for v, _ in pts], [100 * f for _, f in pts], where="post",
                ls="-" if r["spec_name"] == "latency" else "--",
                label=f"{r['cluster']}, {what} (p50 {r['latency']['p50_ms']} ms)")
    ax.axvline(TARGETS["p50_ms"], color="red", ls=":", lw=1, label="target p50 1.5 ms (1 client)")
    ax.axvline(TARGETS["p99_ms"], color="darkred", ls="-.", lw=1,
               label="target p99 5 ms (1 client)")
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms, log scale)")
    ax.set_ylabel("percent of requests at or below")
    ax.set_title("Latency CDF, one transfer per request")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.01, foot, fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency_cdf.png"), dpi=110)
    plt.close(fig)
    written.append("latency_cdf.png")

    # 3. Failover timeline, one panel per cluster (Raft and its ZooKeeper-mode counterpart).
    if results.get("failover"):
        written.append(_failover_plot(plt, results, out_dir, foot))

    # 4. Throughput over time (1 s buckets) for every run of the detail cluster.
    main = detail_label(results)
    rows = [r for r in runs if r["cluster"] == main and r["timeline_1s"]]
    if rows:
        fig, ax = plt.subplots(figsize=(10, 5))
        for r in rows:
            wl = r["workload"] + (" (reads)" if r["op"] == "read" else "")
            ax.plot(range(len(r["timeline_1s"])), r["timeline_1s"], marker=".", lw=1, label=wl)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the run started (first seconds are warm-up)")
        ax.set_ylabel("successful operations per second (log scale)")
        ax.set_title(f"Throughput over time, per 1 s bucket ({main})")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.text(0.01, 0.01, foot, fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "throughput_over_time.png"), dpi=110)
        plt.close(fig)
        written.append("throughput_over_time.png")
    return written


_MODE_NAMES = {"raft": "Raft", "zk-election": "ZooKeeper-elected primary"}


def _failover_plot(plt, results: dict, out_dir: str, foot: str) -> str:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    by_cluster: dict[str, list[dict]] = {}
    for f in results["failover"]:
        by_cluster.setdefault(f["cluster"], []).append(f)
    n = len(by_cluster)
    fig, axes = plt.subplots(n, 1, figsize=(12, 3.8 * n + 0.8), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], by_cluster.items()):
        mode = rows[0].get("mode") or results.get("clusters", {}).get(label, {}).get("mode")
        for f in rows:
            pts = f.get("timeline_50ms") or []
            if not pts:
                continue
            # 250 ms moving average of the 50 ms buckets: readable, still shows the gap.
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            sm = [sum(ys[max(0, i - 2):i + 3]) / len(ys[max(0, i - 2):i + 3])
                  for i in range(len(ys))]
            back = f["recovered_after_s"]
            line, = ax.plot(xs, sm, lw=1.2,
                            label=f"run {f['run']}: {f['killed']} → {f['new_leader'] or '?'}; "
                                  f"unavailable {_fmt(f['unavailable_s'])} s, back to full "
                                  f"{'never' if back is None else _fmt(back)} s")
            color = line.get_color()
            if f.get("unavailable_s") and f.get("kill_to_first_success_s") is not None:
                end = f["kill_to_first_success_s"]
                ax.axvspan(end - f["unavailable_s"], end, color=color, alpha=0.12)

            def at(x: float) -> float:
                return sm[min(range(len(xs)), key=lambda i: abs(xs[i] - x))]

            if f.get("leader_seen_after_s") is not None:
                x = f["leader_seen_after_s"]
                ax.plot([x], [at(x)], marker="^", ms=9, color=color, ls="none", mec="black",
                        clip_on=False, zorder=5)
            if back is not None:
                ax.plot([back], [at(back)], marker="o", ms=7, color=color, ls="none",
                        mec="black", clip_on=False, zorder=5)
        ax.axvline(0, color="red", ls="--", lw=1)
        med, k, runs = median_unavailable(results, label)
        ax.set_title(f"{_MODE_NAMES.get(mode, mode)} ({label}): median unavailable "
                     f"{_fmt(med)} s over {k} of {runs} runs", fontsize=10)
        ax.set_ylabel("successful transfers/s\n(250 ms moving average)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        handles, _ = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="red", ls="--", lw=1, label="kill -9 of the leader"),
                    Patch(color="gray", alpha=0.25, label="shaded: no successful transfer\n"
                          "(last success before the kill → first after)"),
                    Line2D([], [], color="gray", marker="^", mec="black", ls="none",
                           label="harness first saw the new leader"),
                    Line2D([], [], color="gray", marker="o", mec="black", ls="none",
                           label="back to full: first 1 s window\nat ≥ 90% of the pre-kill rate")]
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1, 0].set_xlabel("seconds since the leader was killed (kill -9 at 0)")
    first = results["failover"][0]
    fig.suptitle(f"Failover under steady load: {first['clients']} clients x 1 transfer/request,"
                 f" the leader killed with SIGKILL at t = 0", fontsize=11)
    fig.text(0.01, 0.005, foot, fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(os.path.join(out_dir, "failover_timeline.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "failover_timeline.png"


def write_all(results: dict, out_dir: str) -> dict[str, str]:
    """results.json, results.md, plots (if matplotlib is there), leader stacks (if profiled).
    Returns {what: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    try:
        results["plots"] = plots(results, out_dir)
    except ImportError as e:
        results["plots"], results["plots_skipped"] = [], f"matplotlib is not installed ({e})"
    for i, prof in enumerate(results.get("profiles") or []):
        if prof.get("collapsed_stacks"):
            name = f"leader_stacks_{i + 1}.txt"
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(prof["collapsed_stacks"])
            prof["stacks_file"] = name
    results["targets"] = check_targets(results)
    results["ratios"] = ratios(results)
    paths["json"] = os.path.join(out_dir, "results.json")
    write_json(results, paths["json"])
    paths["md"] = os.path.join(out_dir, "results.md")
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    return paths


def targets_text(results: dict) -> str:
    lines = ["targets (issue 4):"]
    for t in check_targets(results):
        lines.append(f"  {_ok(t['ok']):4}  {t['target']:<34} wanted {t['wanted']:<28} "
                     f"measured {t['measured'] or '–':<14} ({t['where']})")
    return "\n".join(lines)


def ratios_text(results: dict) -> str:
    lines = ["ratios (same run):"]
    for r in ratios(results):
        tgt = f"  (target {r['target']}: {_ok(r['ok'])})" if r["target"] else ""
        ratio = "–" if r["ratio"] is None else r["ratio"]
        lines.append(f"  {r['group']:<24} {ratio!s:>7}  {r['what']}{tgt}")
    return "\n".join(lines)
