"""`python -m bench`: run the benchmark and write results.json, results.md and plots.

    python -m bench --quick                 # < 2 minutes; what CI runs to keep the harness alive
    python -m bench                         # the full matrix (about 9 minutes on 2 cores)
    python -m bench --out /tmp/b --only 3n-fsync-always
    python -m bench --modes raft,zk-election      # starts its own ZooKeeper ensemble

Exit code 0 when the run completed (targets missed are reported, not failed: this is a
measurement, not a test); 1 when a step could not run at all; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
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
                         "or 'echo' / 'bare' for the echo ceiling / the PySyncObj ceiling alone")
    ap.add_argument("--modes", default="raft",
                    help=f"comma-separated replication modes to measure ({', '.join(MODES)}); "
                         "modes other than raft get the same clusters as raft")
    ap.add_argument("--zk-hosts", default="",
                    help="ZooKeeper ensemble for mode zk-election (host:port,...); default: "
                         "start a 3-server ensemble on loopback for the run")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.argv = argv

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if "zk-election" in modes and not args.zk_hosts:
        # No ensemble given: run a 3-server one on loopback for the duration (Debian
        # `zookeeper`), with the same server classes the tests use.
        with zk_ensemble() as ensemble:
            args.zk_hosts = ensemble.hosts
            return _run(args, modes)
    return _run(args, modes)


@contextlib.contextmanager
def zk_ensemble():
    """A 3-server ZooKeeper ensemble in a temporary directory, stopped and removed on exit
    (each full run used to leave its servers' data and logs behind in /tmp)."""
    import pathlib
    import tempfile
    tests = pathlib.Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from zk_fixtures import ZkEnsemble
    with tempfile.TemporaryDirectory(prefix="raftpay-bench-zk-",
                                     ignore_cleanup_errors=True) as root:
        ensemble = ZkEnsemble(pathlib.Path(root), n=3)
        try:
            ensemble.start()
            ensemble.wait_quorum()
            print(f"started a 3-server ZooKeeper ensemble at {ensemble.hosts}", file=sys.stderr)
            yield ensemble
        finally:
            ensemble.stop()


def _run(args, modes) -> int:
    profile = runner.quick_profile() if args.quick else runner.full_profile()
    clusters = []
    for mode in modes:
        options = (("zk_hosts", args.zk_hosts),) if mode == "zk-election" else ()
        for spec in profile.clusters:
            clusters.append(ClusterSpec(spec.nodes, spec.fsync, mode, options))
    profile.clusters = clusters

    progress = Progress(0, enabled=not args.no_progress)
    t0 = time.monotonic()
    results = runner.run(profile, args.argv, progress, only=args.only)
    paths = report.write_all(results, args.out)
    print(report.targets_text(results), file=sys.stderr)
    print(report.ratios_text(results), file=sys.stderr)
    print(f"wrote {paths['md']} and {paths['json']} "
          f"({len(results.get('plots') or [])} plots) in {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    if results["problems"]:
        print("problems:\n  " + "\n  ".join(results["problems"]), file=sys.stderr)
    return 1 if results["problems"] and not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
