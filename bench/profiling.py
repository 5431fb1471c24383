"""Where the leader's CPU goes: sample it with py-spy under steady load and summarise.

Design.  py-spy (a sampling profiler that attaches to a running process; in the bench and test
extras) records the leader's non-idle Python stacks for the length of a load run, per thread, in
"collapsed" form (one line per distinct stack with its sample count).  `summarise` turns that into
the shares a person asks for: per thread (the asyncio server vs the Raft thread), per module
(self time, where the CPU is actually burnt) and per module inclusive (time under any frame of
that module), and the top functions by self time.  Without py-spy the harness says so and goes
on; nothing else depends on it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


RATE_HZ = 250


def start(pid: int, duration_s: float, out_path: str, rate_hz: int = RATE_HZ,
          gil_only: bool = True) -> subprocess.Popen:
    """Start sampling `pid` for `duration_s` into `out_path` (collapsed stacks).

    `gil_only` samples only the thread holding the GIL: that is the Python CPU the process
    spends, and (unlike py-spy's idle heuristic) never counts a thread waiting in poll().  CPU
    spent in syscalls that release the GIL (send, recv, os.fsync) is not in it; a syscall that
    keeps the GIL (CPython 3.11's mmap.flush, i.e. msync) is, and blocks every other thread."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
           "--rate", str(rate_hz), "--format", "raw", "--threads", "--nonblocking",
           "--output", out_path]
    if gil_only:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


#: Frames at the root of every stack of a thread (entry points, the event loop's dispatch):
#: "inclusive" time under them is just the thread's total, so they are left out of that table.
_ROOTS = frozenset({"threading.py", "core.py", "<frozen runpy>", "runpy.py", "raftpay/cli.py",
                    "raftpay/__main__.py", "asyncio/runners.py", "asyncio/base_events.py",
                    "asyncio/events.py"})


def _module(file: str) -> str:
    """A readable module key for a frame's file: raftpay/x.py, pysyncobj/x.py, asyncio/x.py..."""
    f = file.replace("\\", "/")
    for marker in ("raftpay/", "pysyncobj/", "msgpack/", "cryptography/", "asyncio/"):
        i = f.rfind(marker)
        if i >= 0:
            return f[i:]
    return f.rsplit("/", 1)[-1] or "?"


def _parse(line: str):
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    thread = parts[0]
    frames = []
    for p in parts[1:]:
        m = _FRAME.match(p)
        if m:
            frames.append((m["func"], _module(m["file"])))
        else:
            frames.append((p, "?"))
    return thread, frames, int(count)


def summarise(path: str, top: int = 15) -> dict:
    """Shares (percent of the leader's sampled CPU) from a py-spy raw file."""
    threads, self_mod, incl_mod, self_fn = Counter(), Counter(), Counter(), Counter()
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            parsed = _parse(line)
            if parsed is None:
                continue
            thread, frames, n = parsed
            total += n
            name = thread.split(":", 1)[-1].strip() if ":" in thread else thread
            label = ("Raft thread" if name.startswith("raft") else
                     "asyncio server thread" if name == "MainThread" else name)
            threads[label] += n
            if frames:
                fn, mod = frames[-1]
                self_mod[mod] += n
                self_fn[f"{fn} ({mod})"] += n
            for mod in {m for _, m in frames} - _ROOTS:
                incl_mod[mod] += n

    def pct(counter: Counter, k: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(k)] \
            if total else []

    return {"samples": total, "threads": pct(threads), "self_by_module": pct(self_mod, top),
            "inclusive_by_module": pct(incl_mod, top), "top_self_functions": pct(self_fn, top)}
