"""raftpay's benchmark harness: `python -m bench [--quick] [--out DIR]`.

Design.  The harness starts real clusters itself (loopback, free ports), drives them with the
project's own clients from separate load-generator processes, and writes what it saw to
`results.json`, `results.md` and PNG plots.  The modules, in the order a run uses them:

* `clusters` — `ClusterSpec` (mode, nodes, fsync) and `BenchCluster`; a replication mode is a
  parameter (`clusters.MODES`), so the ZooKeeper-elected baseline plugs in by name.
* `load` — `LoadSpec`, the worker processes, `run_load`.
* `hist` — HDR-style latency histograms and per-second timelines.
* `runner` — the `quick` and `full` profiles and their execution, failover included.
* `bare` — the bare-PySyncObj ceiling measured in the same run.
* `profiling` — py-spy on the leader, summarised.
* `report` — JSON, markdown, plots, the targets of issue 4.

Tools of their own: `paired` (raftpay against the echo ceiling, alternated), `soak` (leader
kills under load, every payment checked), `stress` (a slow follower and a flood of batches:
the leader's memory and what clients are told), `ledger_bench`, `snapshot_bench`,
`fsync_probe`.
"""
