"""The disk's share of a commit: fdatasync of a small journal append, alone and concurrently.

With ``fsync = "always"`` every replica syncs its journal once per append round, and on one
machine the three replicas of a local cluster do it at the same moment on the same disk.  This
measures that floor without raftpay: each process appends a 150-byte record to an mmap'd file
grown by ftruncate (as the journal is), rewrites an 8-byte header, and times `os.fdatasync`;
N processes run the same loop at once.  One-client commit latency with fsync always cannot be
below the leader's path with fsync never plus about one concurrent sync (the leader's own sync
overlaps the followers').

    python -m bench.fsync_probe                    # 1 and 3 processes, 2,000 syncs each
    python -m bench.fsync_probe --procs 1,3,5 --count 500 --dir /var/tmp

Prints one line per process count (p50/p90/p99 over all processes' syncs) and the ratio of the
concurrent p50s to the lone one, measured in the same run.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import tempfile
import time

RECORD = b"x" * 150
FILE_BYTES = 64 << 20


def _sync_loop(folder: str, count: int, start: mp.Event, out: mp.Queue) -> None:
    fd, path = tempfile.mkstemp(prefix="fsync-probe-", dir=folder)
    try:
        with os.fdopen(fd, "r+b") as f:
            f.truncate(FILE_BYTES)
            os.fsync(f.fileno())
            mm = mmap.mmap(f.fileno(), 0)
            offset, lat = 4096, []
            start.wait()
            for _ in range(count):
                mm[offset:offset + len(RECORD)] = RECORD
                offset += len(RECORD)
                mm[0:8] = offset.to_bytes(8, "little")
                t = time.perf_counter()
                os.fdatasync(f.fileno())
                lat.append(time.perf_counter() - t)
                time.sleep(0.0005)  # a commit round is never back to back with the next
            mm.close()
        out.put(lat)
    finally:
        os.unlink(path)


def measure(folder: str, procs: int, count: int) -> list[float]:
    """All sync latencies (seconds) of `procs` processes syncing `count` times each at once."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_sync_loop, args=(folder, count, start, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    start.set()
    lat = []
    for _ in workers:
        lat += out.get(timeout=60 + count * 0.1)
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"probe process exited with {w.exitcode}")
    return sorted(lat)


def pct(sorted_lat: list[float], q: float) -> float:
    return sorted_lat[min(len(sorted_lat) - 1, int(len(sorted_lat) * q))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fsync_probe", description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,3", help="comma-separated process counts (default 1,3)")
    p.add_argument("--count", type=int, default=2000, help="syncs per process (default 2000)")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="folder on the disk to measure (default: the temp folder)")
    a = p.parse_args(argv)
    try:
        counts = [int(x) for x in a.procs.split(",")]
    except ValueError:
        p.error(f"--procs must be comma-separated integers, got {a.procs!r}")
    if not counts or min(counts) < 1 or a.count < 1:
        p.error("--procs and --count must be positive")
    if not os.path.isdir(a.dir):
        p.error(f"--dir {a.dir!r} is not a folder")
    p50 = {}
    for n in counts:
        lat = measure(a.dir, n, a.count)
        p50[n] = pct(lat, 0.5)
        print(f"{n} process(es) syncing at once: fdatasync p50 {p50[n] * 1e3:.3f} ms, "
              f"p90 {pct(lat, 0.9) * 1e3:.3f} ms, p99 {pct(lat, 0.99) * 1e3:.3f} ms "
              f"({len(lat)} syncs)", flush=True)
    first = counts[0]
    for n in counts[1:]:
        print(f"p50 with {n} / with {first}: {p50[n] / p50[first]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
