"""`python -m bench`: run the benchmark and write results.json, results.md and plots.

    python -m bench --quick                 # < 2 minutes; what CI runs to keep the harness alive
    python -m bench                         # the full matrix (about 9 minutes on 2 cores)
    python -m bench --out /tmp/b --only 3n-fsync-always
    python -m bench --modes raft,zk-election --zk-hosts 127.0.0.1:2181   # once zk-election exists

Exit code 0 when the run completed (targets missed are reported, not failed: this is a
measurement, not a test); 1 when a step could not run at all; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import report, runner
from .clusters import MODES, ClusterSpec
from .progress import Progress

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the < 2 minute profile (one size of each workload, 1 failover)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="where results.json, results.md and the PNGs go (default: %(default)s)")
    ap.add_argument("--only", default=None,
                    help="run only clusters whose label contains this (e.g. 3n-fsync-always), "
                         "or 'bare' for the PySyncObj ceiling alone")
    ap.add_argument("--modes", default="raft",
                    help=f"comma-separated replication modes to measure ({', '.join(MODES)}); "
                         "modes other than raft get the same clusters as raft")
    ap.add_argument("--zk-hosts", default="",
                    help="ZooKeeper ensemble for mode zk-election (host:port,...)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if "zk-election" in modes and not args.zk_hosts:
        ap.error("mode zk-election needs --zk-hosts (a running ZooKeeper ensemble)")
    profile = runner.quick_profile() if args.quick else runner.full_profile()
    clusters = []
    for mode in modes:
        options = (("zk_hosts", args.zk_hosts),) if mode == "zk-election" else ()
        for spec in profile.clusters:
            clusters.append(ClusterSpec(spec.nodes, spec.fsync, mode, options))
    profile.clusters = clusters

    progress = Progress(0, enabled=not args.no_progress)
    t0 = time.monotonic()
    results = runner.run(profile, argv, progress, only=args.only)
    paths = report.write_all(results, args.out)
    print(report.targets_text(results), file=sys.stderr)
    print(f"wrote {paths['md']} and {paths['json']} "
          f"({len(results.get('plots') or [])} plots) in {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    if results["problems"]:
        print("problems:\n  " + "\n  ".join(results["problems"]), file=sys.stderr)
    return 1 if results["problems"] and not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
