"""Load generation: closed-loop clients in worker processes, merged into one result.

Design.  A `LoadSpec` says what every logical client does (one transfer per request, batches,
a read/write mix) for how long.  `run_load` forks load-generator processes (one below 64
clients; several above, so on a 2-core machine the client side is not what is measured; up to
two for batched requests), each
runs its share of the clients as asyncio tasks with one `AsyncClient` per logical client — the
project's own client, sessions and retries included — or, for the latency workload, one blocking
`Client`.  All processes start at one `time.monotonic()` instant (the clock is system-wide on
Linux), warm up, measure, and send back a `Recorder`: a latency `Histogram` and completion
`Timeline`s per operation kind, and errors counted by kind (exception class or result code).
Only completions inside the measurement window count towards throughput and percentiles.

While the workers run, the main process shows progress on stderr from shared counters and
calls `during(elapsed_s)` now and then, which is how failover kills a leader and profiling
attaches to one under steady load.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_mod
import random
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Callable

from raftpay.codes import Code

from .hist import Histogram, Timeline

CURRENCY = 840
_OK_CODES = (Code.OK, Code.EXISTS)


@dataclass(frozen=True)
class LoadSpec:
    """One workload run.  `kind`: "latency" (one blocking client, one transfer at a time),
    "transfer" (one transfer per request), "batch" (`batch` transfers per request) or "mix"
    (`read_fraction` of requests are `lookup_accounts` with `consistency`)."""

    name: str
    kind: str
    seeds: str
    clients: int = 1
    procs: int | None = None  # None: chosen from `clients`
    accounts: int = 1000  # transfers pick debit/credit uniformly from ids 1..accounts
    batch: int = 1
    inflight_per_client: int = 1  # requests each logical client keeps in flight
    #: Connections the clients share, as etcd's benchmark `--conns` (its `--clients` share
    #: them): logical clients are spread round-robin over this many `AsyncClient`s.  None: one
    #: each.
    conns: int | None = None
    read_fraction: float = 0.0
    consistency: str = "linearizable"
    follower_addrs: tuple[str, ...] = ()  # where follower reads go
    warmup_s: float = 1.0
    duration_s: float = 5.0
    fine_width_s: float | None = None  # an extra fine timeline (failover)
    keep_times: bool = False  # keep every success completion time (failover)
    timeout_s: float = 10.0

    def nprocs(self) -> int:
        if self.procs:
            return max(1, min(self.procs, self.clients))
        if self.kind == "batch":
            return min(2, self.clients)  # a few large requests in flight: up to two processes
        if self.kind == "latency" or self.clients < 64:
            return 1
        return min(4, max(2, self.clients // 64))


class Recorder:
    """Per-operation-kind histograms, timelines and error counts of one process."""

    def __init__(self, origin: float, measure_from: float, measure_to: float,
                 fine_width_s: float | None = None, keep_times: bool = False):
        self.origin, self.measure_from, self.measure_to = origin, measure_from, measure_to
        self.fine_width_s = fine_width_s
        self.keep_times = keep_times
        self.ops: dict[str, dict] = {}
        self.errors: dict[str, int] = {}
        self.errors_all: dict[str, int] = {}
        self.error_examples: list[str] = []
        self.times = array("d")
        self.cpu_s: float | None = None

    def _op(self, name: str) -> dict:
        op = self.ops.get(name)
        if op is None:
            op = self.ops[name] = {
                "hist": Histogram(), "requests": 0, "items": 0, "done": [],
                "timeline": Timeline(self.origin, 1.0),
                "fine": Timeline(self.origin, self.fine_width_s) if self.fine_width_s else None}
        return op

    def ok(self, name: str, t0: float, t1: float, items: int = 1) -> None:
        op = self._op(name)
        op["timeline"].add(t1, items)
        if op["fine"] is not None:
            op["fine"].add(t1, items)
        if self.keep_times:
            self.times.append(t1)
        if self.measure_from <= t1 <= self.measure_to:
            op["hist"].record(round((t1 - t0) * 1e6))
            op["requests"] += 1
            op["items"] += items
            op["done"].append((t1, items))

    def error(self, name: str, kind: str, t1: float, example: str = "") -> None:
        self._op(name)
        key = f"{name}:{kind}"
        self.errors_all[key] = self.errors_all.get(key, 0) + 1
        if self.measure_from <= t1 <= self.measure_to:
            self.errors[key] = self.errors.get(key, 0) + 1
        if example and len(self.error_examples) < 5:
            self.error_examples.append(f"{key}: {example[:200]}")

    def to_dict(self) -> dict:
        return {
            "ops": {n: {"hist": o["hist"].to_dict(), "requests": o["requests"],
                        "items": o["items"], "timeline": o["timeline"].to_dict(),
                        # (time, items) of each completion in the window, for big batches only
                        # (few of them): see `_paced_rate`.
                        "done": o["done"] if len(o["done"]) <= 2000 else [],
                        "fine": o["fine"].to_dict() if o["fine"] else None}
                    for n, o in self.ops.items()},
            "errors": self.errors, "errors_all": self.errors_all,
            "error_examples": self.error_examples, "times": self.times.tolist(),
            "cpu_s": self.cpu_s}


def merge_results(parts: list[dict]) -> dict:
    """Merge worker `Recorder.to_dict()`s into one: ops -> Histogram/Timeline objects."""
    ops: dict[str, dict] = {}
    errors: dict[str, int] = {}
    errors_all: dict[str, int] = {}
    examples: list[str] = []
    times: list[float] = []
    cpu = 0.0
    for p in parts:
        for name, o in p["ops"].items():
            m = ops.get(name)
            h = Histogram.from_dict(o["hist"])
            tl = Timeline.from_dict(o["timeline"])
            fine = Timeline.from_dict(o["fine"]) if o["fine"] else None
            if m is None:
                ops[name] = {"hist": h, "requests": o["requests"], "items": o["items"],
                             "timeline": tl, "fine": fine, "done": list(o["done"])}
            else:
                m["done"].extend(o["done"])
                m["hist"].merge(h)
                m["requests"] += o["requests"]
                m["items"] += o["items"]
                m["timeline"].merge(tl)
                if fine is not None:
                    m["fine"] = fine if m["fine"] is None else m["fine"].merge(fine)
        for src, dst in ((p["errors"], errors), (p["errors_all"], errors_all)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        examples.extend(p["error_examples"])
        times.extend(p["times"])
        cpu += p["cpu_s"] or 0.0
    times.sort()
    return {"ops": ops, "errors": errors, "errors_all": errors_all,
            "error_examples": examples[:10], "times": times, "client_cpu_s": cpu}


def _paced_rate(done: list) -> float | None:
    """Items per second between the first and the last completion of the window (the first
    completion's items are not counted: they were earned before it).  None below 4 requests."""
    if len(done) < 4:
        return None
    done = sorted(done)
    span = done[-1][0] - done[0][0]
    if span <= 0:
        return None
    return sum(n for _, n in done[1:]) / span


# --- the worker process -------------------------------------------------------------------------

class _Ids:
    """Unique transfer ids for one process: a random run nonce, the process slot, a counter."""

    def __init__(self, proc: int):
        self.base = (random.randrange(1, 1 << 22) << 40) | (proc << 34)
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.base + self.n


def _transfer_event(tid: int, rng: random.Random, accounts: int) -> dict:
    debit = rng.randrange(1, accounts + 1)
    credit = rng.randrange(1, accounts)
    if credit >= debit:
        credit += 1
    return {"op": "create_transfer", "id": tid, "debit_account_id": debit,
            "credit_account_id": credit, "amount": 1, "currency": CURRENCY, "flags": 0}


def _classify_codes(codes) -> tuple[int, str | None]:
    """(events that succeeded, the first failure code's name or None)."""
    ok, bad = 0, None
    for c in codes:
        if c in _OK_CODES:
            ok += 1
        elif bad is None:
            try:
                bad = f"code:{Code(c).name.lower()}"
            except ValueError:
                bad = f"code:{c}"
    return ok, bad


def _worker(spec: LoadSpec, proc: int, client_ids: list[int], start_at: float,
            counters, results) -> None:
    """Process entry point: run this process's clients, put (proc, result dict) on `results`."""
    try:
        rec = Recorder(start_at, start_at + spec.warmup_s,
                       start_at + spec.warmup_s + spec.duration_s, spec.fine_width_s,
                       spec.keep_times)
        if spec.kind == "latency":
            _run_sync(spec, proc, rec, start_at, counters)
        else:
            asyncio.run(_run_async(spec, proc, client_ids, rec, start_at, counters))
        results.put((proc, rec.to_dict(), None))
    except BaseException:  # the parent reports it; never hang the parent
        results.put((proc, None, traceback.format_exc()))


def _run_sync(spec: LoadSpec, proc: int, rec: Recorder, start_at: float, counters) -> None:
    from raftpay.client import Client
    ids, rng = _Ids(proc), random.Random(proc)
    end = start_at + spec.warmup_s + spec.duration_s
    with Client(spec.seeds, timeout_s=spec.timeout_s) as c:
        _sleep_until(start_at)
        cpu0 = None
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                break
            if cpu0 is None and t0 >= rec.measure_from:
                cpu0 = time.process_time()
            ev = _transfer_event(ids.next(), rng, spec.accounts)
            try:
                ok, bad = _classify_codes(c.submit([ev]))
                t1 = time.monotonic()
                if bad is None:
                    rec.ok("transfer", t0, t1)
                    counters[2 * proc] += 1
                else:
                    rec.error("transfer", bad, t1)
                    counters[2 * proc + 1] += 1
            except Exception as e:
                rec.error("transfer", type(e).__name__, time.monotonic(), str(e))
                counters[2 * proc + 1] += 1
        if cpu0 is not None:
            rec.cpu_s = time.process_time() - cpu0


def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


async def _run_async(spec: LoadSpec, proc: int, client_ids: list[int], rec: Recorder,
                     start_at: float, counters) -> None:
    from raftpay.client import AsyncClient
    ids = _Ids(proc)
    end = start_at + spec.warmup_s + spec.duration_s
    nconns = len(client_ids)
    if spec.conns:
        nconns = max(1, min(nconns, -(-spec.conns * len(client_ids) // spec.clients)))
    pool = [AsyncClient(spec.seeds, timeout_s=spec.timeout_s) for _ in range(nconns)]
    writers = [pool[slot % nconns] for slot in range(len(client_ids))]
    readers = writers
    if spec.kind == "mix" and spec.consistency == "follower" and spec.follower_addrs:
        # A client seeded with only one follower reads from it; writes still go to the leader.
        readers = [AsyncClient(spec.follower_addrs[c % len(spec.follower_addrs)],
                               timeout_s=spec.timeout_s) for c in client_ids]

    async def one_client(slot: int, cid: int, lane: int) -> None:
        w, r = writers[slot], readers[slot]
        rng = random.Random((proc << 20) ^ (cid << 4) ^ lane)
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            if spec.kind == "mix" and rng.random() < spec.read_fraction:
                name = "read"
                a = rng.randrange(1, spec.accounts + 1)
                coro = r.lookup_accounts([a], consistency=spec.consistency)
            else:
                name = "transfer"
                n = spec.batch if spec.kind == "batch" else 1
                events = [_transfer_event(ids.next(), rng, spec.accounts) for _ in range(n)]
                coro = w.submit(events)
            try:
                res = await coro
                t1 = time.monotonic()
                if name == "read":
                    ok, bad = (1, None) if res and res[0] is not None else (0, "not_found")
                else:
                    ok, bad = _classify_codes(res)
                if bad is None:
                    rec.ok(name, t0, t1, ok)
                    counters[2 * proc] += ok
                else:
                    rec.error(name, bad, t1)
                    counters[2 * proc + 1] += 1
            except Exception as e:
                rec.error(name, type(e).__name__, time.monotonic(), str(e))
                counters[2 * proc + 1] += 1

    async def cpu_probe() -> None:
        await asyncio.sleep(max(0.0, rec.measure_from - time.monotonic()))
        c0 = time.process_time()
        await asyncio.sleep(max(0.0, rec.measure_to - time.monotonic()))
        rec.cpu_s = time.process_time() - c0

    wait = start_at - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    tasks = [one_client(slot, cid, lane) for slot, cid in enumerate(client_ids)
             for lane in range(spec.inflight_per_client)]
    probe = asyncio.ensure_future(cpu_probe())
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), spec.warmup_s + spec.duration_s
                               + spec.timeout_s + 30)
    finally:
        probe.cancel()
        for c in set(writers) | set(readers):
            await c.close()


# --- the parent side ----------------------------------------------------------------------------

def run_load(spec: LoadSpec, progress=None, during: Callable[[float], None] | None = None,
             cpu_sampler: Callable[[], dict] | None = None, start_delay_s: float = 0.3) -> dict:
    """Run `spec` in worker processes; block until done; return the merged result with
    throughput per op kind over the measurement window.  `during(elapsed_s)` is called about
    every 50 ms from the main thread while the load runs (elapsed from the start instant).
    `cpu_sampler()` returns {name: cpu seconds}; its difference over the window is reported."""
    ctx = mp.get_context("fork")
    nprocs = spec.nprocs()
    counters = ctx.RawArray("q", 2 * nprocs)
    results = ctx.Queue()
    start_at = time.monotonic() + start_delay_s
    share = [list(range(spec.clients))[p::nprocs] for p in range(nprocs)]
    procs = [ctx.Process(target=_worker, args=(spec, p, share[p], start_at, counters, results),
                         daemon=True) for p in range(nprocs)]
    for p in procs:
        p.start()
    total_s = spec.warmup_s + spec.duration_s
    measure_from, measure_to = start_at + spec.warmup_s, start_at + total_s
    cpu0 = cpu1 = None
    got: dict[int, dict] = {}
    failures: list[str] = []
    deadline = start_at + total_s + spec.timeout_s + 60
    last_print = 0.0
    try:
        while len(got) + len(failures) < nprocs:
            now = time.monotonic()
            if cpu_sampler and cpu0 is None and now >= measure_from:
                cpu0 = cpu_sampler()
            if cpu_sampler and cpu1 is None and now >= measure_to:
                cpu1 = cpu_sampler()
            if during is not None and now >= start_at:
                during(now - start_at)
            if progress is not None and now - last_print >= 0.5:
                last_print = now
                ok = sum(counters[2 * i] for i in range(nprocs))
                err = sum(counters[2 * i + 1] for i in range(nprocs))
                progress.update(max(0.0, now - start_at), total_s, ok, err)
            try:
                proc, res, err_text = results.get(timeout=0.05)
                if res is None:
                    failures.append(f"load process {proc} failed:\n{err_text}")
                else:
                    got[proc] = res
            except queue_mod.Empty:
                pass
            if now > deadline:
                failures.append("load processes did not finish before the deadline")
                break
            if all(not p.is_alive() for p in procs) and results.empty() \
                    and len(got) + len(failures) < nprocs:
                time.sleep(0.2)
                if results.empty():
                    failures.append("a load process died without a result")
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if cpu_sampler and cpu0 is not None and cpu1 is None:
        cpu1 = cpu_sampler()  # the workers finished right at the end of the window
    if failures:
        raise RuntimeError("\n".join(failures))
    merged = merge_results(list(got.values()))
    merged["spec"] = spec
    merged["start_at"] = start_at
    merged["nprocs"] = nprocs
    for name, o in merged["ops"].items():
        o["per_s"] = o["items"] / spec.duration_s
        o["requests_per_s"] = o["requests"] / spec.duration_s
        paced = _paced_rate(o.pop("done", []))
        if spec.kind == "batch" and paced is not None:
            # A window holds only a handful of 8k-event requests, so items/window is quantised
            # (±1 request = ±1k transfers/s); first-to-last completion is the finer estimate.
            o["per_s_window"] = o["per_s"]
            o["per_s"] = paced
    if cpu0 is not None and cpu1 is not None:
        merged["node_cpu_s"] = {k: (None if cpu0.get(k) is None or cpu1.get(k) is None
                                    else round(cpu1[k] - cpu0[k], 3)) for k in cpu1}
        merged["samples"] = {"start": cpu0, "end": cpu1}
    return merged
