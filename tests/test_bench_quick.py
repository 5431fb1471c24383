"""The benchmark harness (bench/) still works: its pure parts are right on known data, and its
smallest profile runs end to end against a real 3-node cluster and writes its reports.

This is not a performance test: it asserts that the harness measures something and writes it,
never how fast the ledger is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest

from bench import report, runner
from bench.clusters import MODES, BenchCluster, ClusterSpec
from bench.hist import Histogram, Timeline, bucket_of, bucket_range
from bench.progress import Progress


def test_bucket_ranges_tile_the_integers_and_hold_their_values():
    prev_hi = -1
    for b in range(0, bucket_of(10**9) + 1):
        lo, hi = bucket_range(b)
        assert lo == prev_hi + 1, b  # no gaps, no overlaps
        assert bucket_of(lo) == b and bucket_of(hi) == b
        assert (hi - lo + 1) / max(lo, 1) <= 1 / 64 or hi < 128
        prev_hi = hi


def test_percentiles_on_known_data():
    h = Histogram.of(range(1, 10_001))  # 1..10000 µs, uniform
    assert h.count == 10_000 and h.min_us == 1 and h.max_us == 10_000
    for p, exact in ((50, 5000), (90, 9000), (99, 9900), (99.9, 9990)):
        assert abs(h.percentile_us(p) - exact) / exact < 0.01, p
    assert h.percentile_us(100) == 10_000
    assert Histogram.of(range(1, 101)).percentile_us(50) == 50  # exact below 128 µs
    s = h.summary_ms()
    assert s["max_ms"] == 10.0 and abs(s["p50_ms"] - 5.0) < 0.05
    assert Histogram().percentile_us(50) is None


def test_merge_and_round_trip_equal_one_histogram_of_everything():
    rng = random.Random(7)
    xs = [int(rng.lognormvariate(8, 1.5)) for _ in range(5000)]
    a, b = Histogram.of(xs[:2000]), Histogram.of(xs[2000:])
    merged = Histogram.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    whole = Histogram.of(xs)
    assert merged.counts == whole.counts and merged.count == whole.count
    for p in (50, 99, 99.9):
        assert merged.percentile_us(p) == whole.percentile_us(p)
        exact = sorted(xs)[max(0, math.ceil(len(xs) * p / 100) - 1)]
        assert abs(whole.percentile_us(p) - exact) <= exact / 128 + 1


def test_timeline_and_failover_analysis():
    tl = Timeline(100.0, 1.0)
    for t in (100.1, 100.2, 101.5, 103.0):
        tl.add(t)
    assert tl.series() == [(0.0, 2.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]
    # 100/s until t=10, the kill at 10.0, nothing until 11.5, then 100/s again.
    times = [i / 100 for i in range(0, 1000)] + [11.5 + i / 100 for i in range(0, 400)]
    r = runner.analyse_failover(times, 10.0, 0.0, 15.5)
    assert r["unavailable_s"] == pytest.approx(11.5 - 9.99, abs=1e-6)
    assert r["kill_to_first_success_s"] == pytest.approx(1.5)
    assert r["baseline_per_s"] == pytest.approx(100, rel=0.02)
    assert r["recovered_after_s"] == pytest.approx(1.5, abs=0.06)


def test_a_mode_is_a_parameter():
    assert set(MODES) >= {"raft", "zk-election"}
    with pytest.raises(ValueError, match="zk-hosts"):
        BenchCluster(ClusterSpec(3, "always", "zk-election"))
    assert ClusterSpec(5, "never").label == "5n-fsync-never"


def test_smoke_profile_runs_end_to_end_and_writes_reports(tmp_path):
    profile = runner.smoke_profile()
    results = runner.run(profile, ["(test)"], Progress(0, enabled=False))
    assert not results["problems"], results["problems"]
    by_name = {(r["spec_name"], r["op"]): r for r in results["runs"]}
    for key in [("latency", "transfer"), ("conc4", "transfer"), ("batch100", "transfer"),
                ("mix-linearizable", "read"), ("mix-follower", "read"),
                ("contention", "transfer")]:
        row = by_name[key]
        assert row["per_s"] > 0 and row["latency"]["count"] > 0, key
        assert not row["errors"], (key, row["errors"], row["error_examples"])
    (fo,) = results["failover"]
    assert fo["unavailable_s"] is not None and fo["new_leader"] not in (None, fo["killed"])
    assert results["bare"]["no-batch/latency"]["per_s"] > 0

    paths = report.write_all(results, str(tmp_path))
    doc = json.loads(open(paths["json"]).read())
    assert doc["runs"] and doc["targets"] and doc["meta"]["profile"] == "smoke"
    md = open(paths["md"]).read()
    assert "| target |" in md and "## Failover" in md and "bare PySyncObj" in md
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra; CI may lack it
        assert doc["plots_skipped"]
    else:
        assert {"throughput_vs_clients.png", "latency_cdf.png", "failover_timeline.png"} \
            <= set(doc["plots"])
        for p in doc["plots"]:
            assert (tmp_path / p).stat().st_size > 10_000
