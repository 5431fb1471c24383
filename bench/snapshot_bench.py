"""Loop stalls during log compaction with a large ledger: `python -m bench.snapshot_bench`.

One node, ticking on an asyncio loop as `raftpay node start` runs it, hosting a ledger filled
beforehand to `--transfers` transfers over `--accounts` accounts (built in this process, then
handed to the node, so the run does not spend minutes replicating it).  A probe task on the loop
sleeps 1 ms at a time and records how late it wakes: any time the loop spends in one go (a Raft
tick that writes a snapshot, say) shows as a late wake-up.  A proposer thread keeps one entry of
`--batch` transfers in flight, so the ledger changes while snapshots are written and every
compaction happens under load; the node compacts every `--compact-entries` entries.

The ways run in the same process, one after the other, on the same ledger, each until
`--compactions` snapshots were placed:

* **old**: `snapshot_in_background=False`, the snapshot serialised and written on the Raft
  thread (the loop's thread), as before;
* **copied**: a forked child makes the ledger's snapshot into one bytes object and writes that
  (how the child worked before `Ledger.snapshot_parts`);
* **new**: the default, a forked child writes the snapshot's parts, the columns straight from
  the memory it shares with the node; the loop pays for the fork, the rename and the
  compaction of the journal.

Prints a markdown table (longest stall, p99 and max commit latency, compactions, what each
snapshot cost its writer in CPU and page faults per million transfers in it, the fork's own
cost measured beside), the ratio old / new of the longest stall and copied / new of the
writer's cost.  Numbers depend on the machine and its load: compare the rows of one run, not
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

import msgpack

from raftpay import node as rn
from raftpay.codes import Code
from raftpay.ledger import MS, Ledger


def build_ledger(transfers: int, accounts: int) -> Ledger:
    led = Ledger()
    ts = MS
    for start in range(0, accounts, 8000):
        ts += MS
        events = [{"op": "create_account", "id": i + 1, "currency": 1}
                  for i in range(start, min(accounts, start + 8000))]
        assert led.apply({"type": "submit", "events": events}, ts)["code"] == 0
    for start in range(0, transfers, 8000):
        ts += MS
        events = [{"op": "create_transfer", "id": i + 1, "debit_account_id": i % accounts + 1,
                   "credit_account_id": (i * 7 + 1) % accounts + 1, "amount": 1, "currency": 1}
                  for i in range(start, min(transfers, start + 8000))]
        led.apply({"type": "submit", "events": events}, ts)
    return led


class _Prebuilt:
    """A `ledger_cls` whose constructor hands the node the ledger built beforehand."""

    ledger: Ledger | None = None
    restore = staticmethod(Ledger.restore)

    def __new__(cls, session_ttl_ms: int):
        return cls.ledger


def _free_addr() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def fork_cost_ms(repeat: int = 5) -> float:
    """What `os.fork` alone costs this process now (median, ms): the floor of the new way."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        samples.append((time.perf_counter() - t0) * 1000)
        os.waitpid(pid, 0)
    return statistics.median(samples)


MODES = {"old": "old (on the loop)", "copied": "forked writer, one bytes object",
         "new": "forked writer, parts (default)"}


def run_mode(mode: str, ledger: Ledger, args, next_id: list[int]) -> dict:
    data_dir = tempfile.mkdtemp(prefix="raftpay-snapbench-", dir=args.dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(fn, *a):
        async def call():
            return fn(*a)
        return asyncio.run_coroutine_threadsafe(call(), loop).result(60)

    _Prebuilt.ledger = ledger
    node = rn.Node("bench", _free_addr(), {}, data_dir, fsync=args.fsync,
                   log_compaction_min_entries=args.compact_entries, ledger_cls=_Prebuilt,
                   snapshot_in_background=mode != "old", propose_timeout_s=60)
    started: list[float] = []
    jobs: list = []  # (job, transfers in its snapshot)
    orig_begin = node._begin_snapshot

    def begin(last, prev):  # count compactions as the adapter starts them
        started.append(time.monotonic())
        jobs.append((orig_begin(last, prev), ledger.transfer_count))
        return jobs[-1][0]
    node._begin_snapshot = begin
    if mode == "copied":  # the child asks the ledger for its parts: hand it one copy instead
        ledger.snapshot_parts = lambda: [b"".join(Ledger.snapshot_parts(ledger))]
    on_loop(node.start, loop)
    gaps: list[float] = []
    probing = True

    async def probe():
        while probing:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            gaps.append(loop.time() - t0 - 0.001)
    probe_task = asyncio.run_coroutine_threadsafe(probe(), loop)
    deadline = time.monotonic() + 30
    while not node.is_leader():
        if time.monotonic() > deadline:
            raise RuntimeError("the node did not become leader")
        time.sleep(0.01)

    latencies: list[float] = []
    done = threading.Event()
    result: list = []

    def cb(code, replies, index):
        result.append(code)
        done.set()
    ts = ledger.last_ts + MS
    t_end = time.monotonic() + args.max_seconds
    # Run until --compactions snapshots were started and the last one has been placed.
    while time.monotonic() < t_end:
        if len(started) >= args.compactions and not node.status()["snapshot_writing"]:
            break
        events = []
        for _ in range(args.batch):
            i = next_id[0]
            next_id[0] += 1
            events.append({"op": "create_transfer", "id": i, "debit_account_id": i % 997 + 1,
                           "credit_account_id": i % 991 + 2, "amount": 1, "currency": 1})
        ts += MS
        payload = msgpack.packb([ts, [{"type": "submit", "events": events}]])
        done.clear()
        result.clear()
        t0 = time.perf_counter()
        node.propose(payload, cb)
        done.wait(60)
        latencies.append(time.perf_counter() - t0)
        if result != [Code.OK]:
            raise RuntimeError(f"proposal failed: {result}")
    probing = False
    probe_task.result(10)
    node.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    ledger.__dict__.pop("snapshot_parts", None)
    latencies.sort()
    # The ledger grows from way to way: a writer's cost is given per million transfers.
    costs = [(j.cost, 1e6 / n) for j, n in jobs if j.cost is not None]
    return {"mode": MODES[mode],
            "writer_cpu_s": statistics.mean((u + s) * k for (u, s, _), k in costs)
            if costs else None,
            "writer_faults": statistics.mean(f * k for (_, _, f), k in costs) if costs else None,
            "compactions": len(started), "proposals": len(latencies),
            "longest_stall_ms": max(gaps) * 1000,
            "p99_commit_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "max_commit_ms": latencies[-1] * 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.snapshot_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=1_000_000,
                    help="transfers in the ledger before the run (default: %(default)s)")
    ap.add_argument("--accounts", type=int, default=100_000,
                    help="accounts in the ledger (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=100,
                    help="transfers per proposed entry (default: %(default)s)")
    ap.add_argument("--compact-entries", type=int, default=200,
                    help="log entries between compactions (default: %(default)s)")
    ap.add_argument("--compactions", type=int, default=3,
                    help="compactions per way (default: %(default)s)")
    ap.add_argument("--fsync", choices=rn.FSYNC_POLICIES, default="always")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="give up on a way after this long (default: %(default)s)")
    ap.add_argument("--dir", default=None, help="where the data dirs go (default: $TMPDIR)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ledger = build_ledger(args.transfers, args.accounts)
    gc.collect()
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    t_snap = time.perf_counter()
    size_mb = len(ledger.snapshot()) / 2 ** 20
    snap_s = time.perf_counter() - t_snap
    print(f"ledger: {args.transfers:,} transfers, {args.accounts:,} accounts, built in "
          f"{time.perf_counter() - t0:.1f} s; snapshot {size_mb:.0f} MiB in {snap_s:.2f} s; "
          f"process RSS {rss_mb:.0f} MiB; fork alone {fork_cost_ms():.1f} ms", file=sys.stderr,
          flush=True)
    next_id = [args.transfers + 1]
    rows = {}
    for mode in MODES:
        rows[mode] = r = run_mode(mode, ledger, args, next_id)
        print(f"{r['mode']}: longest stall {r['longest_stall_ms']:.0f} ms", file=sys.stderr,
              flush=True)
    print("| way | compactions | proposals | longest loop stall | p99 commit | max commit "
          "| writer CPU per 1M transfers | writer page faults per 1M transfers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        cpu = "-" if r["writer_cpu_s"] is None else f"{r['writer_cpu_s']:.2f} s"
        faults = "-" if r["writer_faults"] is None else f"{r['writer_faults']:,.0f}"
        print(f"| {r['mode']} | {r['compactions']} | {r['proposals']} | "
              f"{r['longest_stall_ms']:.1f} ms | {r['p99_commit_ms']:.1f} ms | "
              f"{r['max_commit_ms']:.1f} ms | {cpu} | {faults} |")
    old, copied, new = rows["old"], rows["copied"], rows["new"]
    ratio = old["longest_stall_ms"] / new["longest_stall_ms"]
    print(f"\nlongest loop stall, old / new: {ratio:.1f}x ({old['longest_stall_ms']:.0f} ms -> "
          f"{new['longest_stall_ms']:.0f} ms) with a {size_mb:.0f} MiB snapshot, "
          f"{args.transfers:,} transfers")
    if copied["writer_cpu_s"] and new["writer_cpu_s"]:
        print(f"writer CPU per million transfers, copied / new: "
              f"{copied['writer_cpu_s'] / new['writer_cpu_s']:.2f}x "
              f"({copied['writer_cpu_s']:.2f} s -> {new['writer_cpu_s']:.2f} s); page faults "
              f"{copied['writer_faults']:,.0f} -> {new['writer_faults']:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
