"""The ledger state machine alone, on one core: `python -m bench.ledger_bench [--transfers N]`.

No Raft, no network, no msgpack on the way in: this measures `Ledger.apply` itself, the
ceiling every node's apply loop runs under.

* **Apply throughput**: transfers applied per second for batch sizes 1, 100 and 8,000 (one
  `submit` command per batch; command dicts are built before the clock starts; accounts
  exist), with int ids and with 16-character str ids; best of `--repeat` runs, each on a fresh
  ledger.  Wall clock, and per CPU-second of the process beside it (the fairer figure on a
  shared machine: the work is single-threaded and CPU-bound).
* **Memory per stored transfer**: tracemalloc over applying `--memory-transfers` (1M)
  transfers in batches of 8,000, retained bytes divided by the count (the commands are built
  inside the traced region and dropped, so the ids the ledger keeps are counted), for int ids
  and 16-char str ids; the RSS growth of the process is shown beside it.
* **Snapshot and restore** of a `--memory-transfers` ledger: `snapshot()` time, snapshot size,
  `Ledger.restore()` time (best of `--repeat`), and `state_hash()` time.
* **Stalls while growing** (`--only growth`, not in the default run: it needs a few GB): one
  ledger grown by `--growth-transfers` entries in batches of 8,000, each batch timed; the
  median batch, and the slowest ones with the table's size when they ran.  `--growth-of` says
  which table grows: transfers (the default), accounts, failures (transfers that fail
  transiently, which the ledger remembers by id) or pending (two-phase transfers left
  pending).  A replica's Raft thread does nothing else while it applies, so a batch that
  takes longer than the election timeout costs the cluster an election.

Prints a markdown table with the issue's targets beside each figure and writes JSON to
`bench/results/ledger.json` (or `--out`).  Exit code 0 even when a target is missed: this is a
measurement.  Profile one case with, e.g.:

    python -m cProfile -s tottime -m bench.ledger_bench --only apply --batches 8000 \\
        --transfers 160000 --repeat 1 --ids int
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc

from raftpay.codes import Code
from raftpay.ledger import MS, PENDING, Ledger

TARGET_TPS = 300_000  # applied transfers/s in large batches
TARGET_BYTES = 200  # per stored transfer
TARGET_SNAP_RESTORE_S = 3.0  # snapshot + restore of 1M transfers
ACCOUNTS = 1_000
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ledger.json")


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------
def account_id(i: int, kind: str):
    return i + 1 if kind == "int" else f"acct-{i:011d}"  # 16 chars


def transfer_id(i: int, kind: str):
    return i + 1 if kind == "int" else f"tx-{i:013d}"  # 16 chars


def new_ledger(kind: str) -> Ledger:
    led = Ledger()
    events = [{"op": "create_account", "id": account_id(i, kind), "currency": 1}
              for i in range(ACCOUNTS)]
    reply = led.apply({"type": "submit", "events": events}, 1 * MS)
    assert all(c == 0 for c in reply["results"]), "accounts not created"
    return led


def _batched(start: int, count: int, batch: int, event) -> list[dict]:
    """Events event(start)..event(start+count-1) as submit commands of `batch` events."""
    end = start + count
    return [{"type": "submit", "events": [event(i) for i in range(b, min(b + batch, end))]}
            for b in range(start, end, batch)]


def build_commands(start: int, count: int, batch: int, kind: str) -> list[dict]:
    """`count` transfers (ids start..start+count-1) as submit commands of `batch` events."""
    acc = [account_id(i, kind) for i in range(ACCOUNTS)]
    return _batched(start, count, batch, lambda i: {
        "op": "create_transfer", "id": transfer_id(i, kind), "debit_account_id": acc[i % ACCOUNTS],
        "credit_account_id": acc[(i * 7 + 1) % ACCOUNTS], "amount": 1 + i % 1000, "currency": 1})


def apply_all(led: Ledger, cmds: list[dict], ts0: int) -> None:
    apply = led.apply
    ts = ts0
    for cmd in cmds:
        ts += MS
        reply = apply(cmd, ts)
        if reply["code"] != 0:
            raise RuntimeError(f"submit failed: {reply}")


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def measure_apply(transfers: int, batch: int, kind: str, repeat: int) -> dict:
    count = max(batch, transfers // batch * batch)
    best = best_cpu = float("inf")
    for _ in range(repeat):
        led = new_ledger(kind)
        cmds = build_commands(0, count, batch, kind)
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        apply_all(led, cmds, 2 * MS)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        if led.transfer_count != count:
            raise RuntimeError(f"{led.transfer_count} transfers stored, expected {count}")
        # the first results must be ok (a silent failure would look fast)
        assert led.lookup_transfers([transfer_id(0, kind)])[0]["status"] == "posted"
        del led, cmds
    return {"batch": batch, "ids": kind, "transfers": count, "seconds": best,
            "transfers_per_s": count / best, "cpu_seconds": best_cpu,
            "transfers_per_cpu_s": count / best_cpu}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_big(n: int, kind: str, chunk: int = 80_000) -> Ledger:
    led = new_ledger(kind)
    ts = 2 * MS
    for start in range(0, n, chunk):
        cmds = build_commands(start, min(chunk, n - start), 8000, kind)
        apply_all(led, cmds, ts)
        ts = led.last_ts
        del cmds
    return led


def measure_memory(n: int, kind: str) -> dict:
    gc.collect()
    rss0 = _rss()
    tracemalloc.start()
    led = new_ledger(kind)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    ts = 2 * MS
    for start in range(0, n, 80_000):
        cmds = build_commands(start, min(80_000, n - start), 8000, kind)
        apply_all(led, cmds, ts)
        ts = led.last_ts
        del cmds
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rss = _rss() - rss0
    assert led.transfer_count == n
    del led
    gc.collect()
    return {"ids": kind, "transfers": n, "bytes_per_transfer": retained / n,
            "rss_bytes_per_transfer": rss / n}


def measure_snapshot(n: int, kind: str, repeat: int) -> dict:
    led = build_big(n, kind)
    gc.collect()
    snap_s = restore_s = float("inf")
    data = b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        data = led.snapshot()
        snap_s = min(snap_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy = Ledger.restore(data)
        restore_s = min(restore_s, time.perf_counter() - t0)
        assert copy.transfer_count == n
        del copy
        gc.collect()
    t0 = time.perf_counter()
    led.state_hash()
    hash_s = time.perf_counter() - t0
    return {"ids": kind, "transfers": n, "snapshot_s": snap_s, "restore_s": restore_s,
            "snapshot_plus_restore_s": snap_s + restore_s, "snapshot_bytes": len(data),
            "state_hash_s": hash_s}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
#: What `--only growth` can grow: the table each batch adds 8,000 entries to.
GROWTH_OF = ("transfers", "accounts", "failures", "pending")


def growth_commands(what: str, start: int, count: int, batch: int, kind: str) -> list[dict]:
    """`count` events numbered start.. for `what` (see GROWTH_OF), as submit commands of
    `batch` events: plain transfers; new accounts; transfers from an account that does not
    exist (a transient failure, which the ledger remembers by id); pending transfers with no
    timeout (each stays pending)."""
    if what == "accounts":
        return _batched(start, count, batch, lambda i: {
            "op": "create_account", "id": account_id(ACCOUNTS + 1 + i, kind), "currency": 1})
    cmds = build_commands(start, count, batch, kind)
    if what != "transfers":
        missing = account_id(ACCOUNTS, kind)  # accounts are 0..ACCOUNTS-1
        for cmd in cmds:
            for ev in cmd["events"]:
                if what == "failures":
                    ev["debit_account_id"] = missing
                ev["flags"] = PENDING if what == "pending" else 0
    return cmds


#: The result code every event of a growth batch must get.
_GROWTH_CODE = {"transfers": 0, "accounts": 0, "pending": 0,
                "failures": int(Code.DEBIT_ACCOUNT_NOT_FOUND)}


def measure_growth(n: int, kind: str, what: str = "transfers", chunk: int = 80_000,
                   slowest: int = 5) -> dict:
    led = new_ledger(kind)
    # As a node does once its ledger is made or restored (`raftpay.node._settle_heap`): what
    # lives now is never walked by the garbage collector again, so the stalls measured are the
    # ones a node would see as its ledger grows.
    gc.collect()
    gc.freeze()
    ts = 2 * MS
    want = _GROWTH_CODE[what]
    times = []  # (seconds, entries of `what` in the ledger before the batch)
    for start in range(0, n, chunk):
        before = start
        for cmd in growth_commands(what, start, min(chunk, n - start), 8000, kind):
            ts += MS
            t0 = time.perf_counter()
            reply = led.apply(cmd, ts)
            times.append((time.perf_counter() - t0, before))
            before += len(cmd["events"])
            if reply["code"] != 0 or any(c != want for c in reply["results"]):
                raise RuntimeError(f"growth batch of {what} failed: {str(reply)[:200]}")
    del led
    gc.unfreeze()
    gc.collect()
    median = sorted(t for t, _ in times)[len(times) // 2]
    worst = sorted(times, reverse=True)[:slowest]
    return {"ids": kind, "of": what, "size": n, "batches": len(times),
            "median_batch_s": median,
            "slowest": [{"seconds": t, "size_before": b} for t, b in sorted(
                worst, key=lambda w: w[1])]}


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def markdown(res: dict) -> str:
    lines = ["| measurement | ids | value | target |", "|---|---|---:|---|"]
    for r in res.get("apply", []):
        target = (f">= {TARGET_TPS:,}/s ({_mark(r['transfers_per_s'] >= TARGET_TPS)})"
                  if r["batch"] >= 1000 else "-")
        lines.append(f"| apply, batch {r['batch']:,} ({r['transfers']:,} transfers) | "
                     f"{r['ids']} | {r['transfers_per_s']:,.0f} transfers/s (per CPU-second: "
                     f"{r['transfers_per_cpu_s']:,.0f}) | {target} |")
    for r in res.get("memory", []):
        ok = r["bytes_per_transfer"] <= TARGET_BYTES
        lines.append(f"| memory per stored transfer ({r['transfers']:,}; tracemalloc) | "
                     f"{r['ids']} | {r['bytes_per_transfer']:.0f} B (RSS growth "
                     f"{r['rss_bytes_per_transfer']:.0f} B) | <= {TARGET_BYTES} B ({_mark(ok)}) |")
    for r in res.get("snapshot", []):
        ok = r["snapshot_plus_restore_s"] <= TARGET_SNAP_RESTORE_S
        lines.append(f"| snapshot + restore ({r['transfers']:,} transfers) | {r['ids']} | "
                     f"{r['snapshot_s']:.2f} s + {r['restore_s']:.2f} s = "
                     f"{r['snapshot_plus_restore_s']:.2f} s | <= {TARGET_SNAP_RESTORE_S:.0f} s "
                     f"({_mark(ok)}) |")
        size, per = r["snapshot_bytes"], r["snapshot_bytes"] / r["transfers"]
        lines.append(f"| snapshot size ({r['transfers']:,} transfers) | {r['ids']} | "
                     f"{size / 1e6:.1f} MB ({per:.0f} B/transfer) | - |")
        lines.append(f"| state_hash ({r['transfers']:,} transfers) | {r['ids']} | "
                     f"{r['state_hash_s']:.2f} s | - |")
    for r in res.get("growth", []):
        slow = ", ".join(f"{w['seconds'] * 1000:,.0f} ms at {w['size_before']:,}"
                         for w in r["slowest"])
        lines.append(f"| batches of 8,000 while growing to {r['size']:,} {r['of']} | "
                     f"{r['ids']} | median {r['median_batch_s'] * 1000:.1f} ms; slowest: "
                     f"{slow} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ledger_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=240_000,
                    help="transfers per throughput run (default: %(default)s)")
    ap.add_argument("--memory-transfers", type=int, default=1_000_000,
                    help="ledger size for the memory and snapshot figures (default: %(default)s)")
    ap.add_argument("--growth-transfers", type=int, default=12_000_000,
                    help="entries the growth run adds (default: %(default)s)")
    ap.add_argument("--growth-of", default="transfers",
                    help="what the growth run adds, any of " + ",".join(GROWTH_OF)
                         + " (default: %(default)s)")
    ap.add_argument("--batches", default="1,100,8000", help="batch sizes (default: %(default)s)")
    ap.add_argument("--ids", default="int,str", help="id kinds: int, str (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default: %(default)s)")
    ap.add_argument("--only", default="apply,memory,snapshot",
                    help="which parts to run, of apply,memory,snapshot,growth "
                         "(default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    kinds = [k for k in args.ids.split(",") if k]
    if any(k not in ("int", "str") for k in kinds) or not batches or args.repeat < 1:
        ap.error("bad --ids, --batches or --repeat")
    parts = set(args.only.split(","))
    growth_of = [w for w in args.growth_of.split(",") if w]
    if not growth_of or any(w not in GROWTH_OF for w in growth_of):
        ap.error(f"--growth-of takes some of {','.join(GROWTH_OF)}, got {args.growth_of!r}")

    res: dict = {"python": sys.version.split()[0], "machine": platform.machine(),
                 "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "targets": {"transfers_per_s": TARGET_TPS, "bytes_per_transfer": TARGET_BYTES,
                             "snapshot_plus_restore_s": TARGET_SNAP_RESTORE_S}}
    if "apply" in parts:
        res["apply"] = []
        for kind in kinds:
            for batch in batches:
                r = measure_apply(args.transfers, batch, kind, args.repeat)
                print(f"apply batch={batch} ids={kind}: {r['transfers_per_s']:,.0f}/s",
                      file=sys.stderr, flush=True)
                res["apply"].append(r)
    if "memory" in parts:
        res["memory"] = []
        for kind in kinds:
            r = measure_memory(args.memory_transfers, kind)
            print(f"memory ids={kind}: {r['bytes_per_transfer']:.0f} B/transfer",
                  file=sys.stderr, flush=True)
            res["memory"].append(r)
    if "snapshot" in parts:
        res["snapshot"] = []
        for kind in kinds:
            r = measure_snapshot(args.memory_transfers, kind, args.repeat)
            print(f"snapshot ids={kind}: {r['snapshot_plus_restore_s']:.2f} s",
                  file=sys.stderr, flush=True)
            res["snapshot"].append(r)
    if "growth" in parts:
        res["growth"] = []
        for what, kind in [(w, k) for w in growth_of for k in kinds]:
            r = measure_growth(args.growth_transfers, kind, what)
            print(f"growth of {what} ids={kind}: slowest batch "
                  f"{max(w['seconds'] for w in r['slowest']):.2f} s",
                  file=sys.stderr, flush=True)
            res["growth"].append(r)
    table = markdown(res)
    print(table)
    res["markdown"] = table
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
