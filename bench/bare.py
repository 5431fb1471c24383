"""The ceiling: bare PySyncObj 0.3.17 with no raftpay in the way.

Design.  Three processes on loopback each host one `SyncObj` whose only replicated method counts
commands (no ledger, no client protocol, no encryption, in-memory journal: PySyncObj's defaults).
Submitters run in the leader's own process (ENGINE_NOTES: "in-process submitters", ~14.6k
commands/s): a thread keeps `window` commands in flight with callbacks, so the figure is Raft's
per-command cost.  `window=1` with a blocking call gives commit latency.  raftpay's figures are
divided by these from the same run, so the ratio says what raftpay adds on top of its engine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import queue as queue_mod
import threading
import time

from .clusters import free_ports, proc_cpu_s
from .hist import Histogram

#: A payload about the size of one msgpack-packed transfer.
PAYLOAD = b"x" * 100

CONFIGS = {
    "default": {},  # appendEntriesUseBatch=True, appendEntriesPeriod=0.1
    "no-batch": {"appendEntriesUseBatch": False},
}


def _node_main(idx: int, addrs: list[str], conf_kwargs: dict, cmds, results,
               log_path: str | None = None) -> None:
    if log_path:
        # PySyncObj prints its own errors (e.g. the log-truncation bug) to stderr; keep them out
        # of the progress display and count them afterwards.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    from pysyncobj import SyncObj, SyncObjConf, replicated
    from pysyncobj.config import FAIL_REASON

    class Counter(SyncObj):
        def __init__(self, me, others, conf):
            super().__init__(me, others, conf)
            self._n = 0

        @replicated
        def put(self, data):
            self._n += 1
            return self._n

    conf = SyncObjConf(bindAddress=addrs[idx], dynamicMembershipChange=False, **conf_kwargs)
    obj = Counter(addrs[idx], [a for i, a in enumerate(addrs) if i != idx], conf)
    try:
        while True:
            cmd = cmds.get()
            if cmd[0] == "status":
                results.put((idx, "status", {"leader": obj._isLeader(), "ready": obj.isReady()}))
            elif cmd[0] == "run":
                results.put((idx, "run", _submit(obj, FAIL_REASON, *cmd[1:])))
            else:
                break
    finally:
        obj.destroy()
        results.put((idx, "stopped", None))


def _submit(obj, FAIL_REASON, window: int, warmup_s: float, duration_s: float) -> dict:
    """Keep `window` commands in flight for warmup+duration; count commits in the window."""
    hist = Histogram()
    state = {"ok": 0, "errors": {}}
    start = time.monotonic()
    m_from, m_to = start + warmup_s, start + warmup_s + duration_s
    if window == 1:
        while time.monotonic() < m_to:
            t0 = time.monotonic()
            try:
                obj.put(PAYLOAD, sync=True, timeout=5)
                t1 = time.monotonic()
                if m_from <= t1 <= m_to:
                    state["ok"] += 1
                    hist.record(round((t1 - t0) * 1e6))
            except Exception as e:
                state["errors"][type(e).__name__] = state["errors"].get(type(e).__name__, 0) + 1
        return {"ok": state["ok"], "errors": state["errors"], "hist": hist.to_dict()}
    sem = threading.Semaphore(window)
    lock = threading.Lock()

    def callback_for(t0):
        def cb(result, error):
            t1 = time.monotonic()
            with lock:
                if error == FAIL_REASON.SUCCESS:
                    if m_from <= t1 <= m_to:
                        state["ok"] += 1
                        hist.record(round((t1 - t0) * 1e6))
                else:
                    k = f"fail_reason:{error}"
                    state["errors"][k] = state["errors"].get(k, 0) + 1
            sem.release()
        return cb

    while time.monotonic() < m_to:
        if sem.acquire(timeout=0.5):
            obj.put(PAYLOAD, callback=callback_for(time.monotonic()))
    for _ in range(window):  # let what is in flight finish (bounded)
        if not sem.acquire(timeout=2):
            break
    with lock:
        return {"ok": state["ok"], "errors": dict(state["errors"]), "hist": hist.to_dict()}


def run_bare(config: str, runs: list[tuple[str, int, float, float]], progress=None,
             nodes: int = 3) -> dict:
    """Start a bare cluster with PySyncObj settings `CONFIGS[config]`, run each
    (name, window, warmup_s, duration_s) in the leader's process, stop.  Returns
    {name: {"per_s", "latency", "errors", "leader_cpu_s_per_op"}}."""
    ctx = mp.get_context("fork")
    addrs = [f"127.0.0.1:{p}" for p in free_ports(nodes)]
    cmds = [ctx.Queue() for _ in addrs]
    results = ctx.Queue()
    logdir = tempfile.TemporaryDirectory(prefix="raftpay-bench-bare-")
    logs = [os.path.join(logdir.name, f"bare{i}.log") for i in range(nodes)]
    procs = [ctx.Process(target=_node_main,
                         args=(i, addrs, CONFIGS[config], cmds[i], results, logs[i]),
                         daemon=True) for i in range(nodes)]
    for p in procs:
        p.start()
    out: dict[str, dict] = {}
    try:
        leader = _find_leader(cmds, results, timeout_s=20)
        for name, window, warmup_s, duration_s in runs:
            if progress:
                progress.begin(f"bare PySyncObj ({config}) {name}")
            cpu0 = proc_cpu_s(procs[leader].pid)
            cmds[leader].put(("run", window, warmup_s, duration_s))
            deadline = time.monotonic() + warmup_s + duration_s + 60
            t_start = time.monotonic()
            res = None
            while res is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bare run {name} did not finish")
                try:
                    idx, kind, body = results.get(timeout=0.5)
                    if kind == "run":
                        res = body
                except queue_mod.Empty:
                    if progress:
                        progress.update(time.monotonic() - t_start, warmup_s + duration_s, 0, 0)
            cpu1 = proc_cpu_s(procs[leader].pid)
            hist = Histogram.from_dict(res["hist"])
            per_s = res["ok"] / duration_s
            cpu_per_op = ((cpu1 - cpu0) / max(1, res["ok"]) * (duration_s / (warmup_s + duration_s))
                          if cpu0 is not None and cpu1 is not None else None)
            out[name] = {"config": config, "window": window, "per_s": round(per_s, 1),
                         "upstream_log": _count_log_lines(logs),
                         "ok": res["ok"], "errors": res["errors"], "latency": hist.summary_ms(),
                         "hist": hist, "duration_s": duration_s,
                         "leader_cpu_ms_per_op": None if cpu_per_op is None
                         else round(cpu_per_op * 1000, 4)}
            if progress:
                progress.done(f"{per_s:,.0f} commands/s, p50 {hist.summary_ms()['p50_ms']} ms")
    finally:
        for q in cmds:
            q.put(("stop",))
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        logdir.cleanup()
    return out


def _count_log_lines(paths: list[str]) -> dict[str, int]:
    """What PySyncObj complained about so far: its truncation warning, failed ticks."""
    out = {"truncating already-applied entries": 0, "failed _onTick": 0}
    for p in paths:
        try:
            with open(p, errors="replace") as f:
                for line in f:
                    if "truncating already-applied" in line:
                        out["truncating already-applied entries"] += 1
                    elif line.startswith("failed _onTick"):
                        out["failed _onTick"] += 1
        except OSError:
            pass
    return {k: v for k, v in out.items() if v}


def _find_leader(cmds, results, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for q in cmds:
            q.put(("status",))
        seen = {}
        while len(seen) < len(cmds) and time.monotonic() < deadline:
            try:
                idx, kind, body = results.get(timeout=1)
            except queue_mod.Empty:
                break
            if kind == "status":
                seen[idx] = body
        leaders = [i for i, s in seen.items() if s["leader"] and s["ready"]]
        if len(leaders) == 1 and all(s["ready"] for s in seen.values()):
            return leaders[0]
        time.sleep(0.2)
    raise RuntimeError("bare PySyncObj cluster elected no leader")
