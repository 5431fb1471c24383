"""The benchmark harness (bench/) still works: its pure parts are right on known data, and its
smallest profile runs end to end against a real 3-node cluster and writes its reports.

This is not a performance test: it asserts that the harness measures something and writes it,
never how fast the ledger is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import socket
import subprocess
import sys

import pytest

from bench import echo, fsync_probe, paired, report, runner
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
    # Replies the dead leader sent just before the kill, reaching clients just after it, are
    # not the end of the outage.
    late = runner.analyse_failover(sorted(times + [10.004, 10.01]), 10.0, 0.0, 15.5)
    assert late["unavailable_s"] == pytest.approx(11.5 - 10.01, abs=1e-6)
    assert late["kill_to_first_success_s"] == pytest.approx(1.5)
    # Only those late replies and nothing after them: never recovered, no window.
    never = runner.analyse_failover(times[:1000] + [10.004], 10.0, 0.0, 15.5)
    assert never["unavailable_s"] is None and never["recovered_after_s"] is None


def test_failover_runs_on_the_detail_cluster_and_its_counterpart_in_every_other_mode():
    zk = (("zk_hosts", "127.0.0.1:1"),)
    p = runner.quick_profile()
    p.clusters = [ClusterSpec(n, f, m, zk if m != "raft" else ())
                  for m in ("raft", "zk-election") for n, f in ((3, "always"), (3, "never"))]
    assert runner.failover_labels(p) == {"3n-fsync-always", "zk-election-3n-fsync-always"}
    p.detail_cluster = "5n-fsync-always"  # not in the profile
    assert runner.failover_labels(p) == set()


def _failover_row(cluster: str, mode: str, run: int, unavailable: float | None) -> dict:
    return {"cluster": cluster, "mode": mode, "run": run, "unavailable_s": unavailable,
            "recovered_after_s": None, "errors": {}}


def _conc64_row(cluster: str, mode: str, per_s: float) -> dict:
    return {"cluster": cluster, "mode": mode, "spec_name": "conc64", "op": "transfer",
            "per_s": per_s}


def test_ratios_failover_time_raft_over_zk_mode_and_the_echo_ceiling():
    raft, zk = "3n-fsync-always", "zk-election-3n-fsync-always"
    results = {
        "detail_cluster": raft, "bare": {},
        "clusters": {raft: {"mode": "raft", "nodes": 3, "fsync": "always"},
                     zk: {"mode": "zk-election", "nodes": 3, "fsync": "always"},
                     "3n-fsync-never": {"mode": "raft", "nodes": 3, "fsync": "never"}},
        "failover": [_failover_row(raft, "raft", 1, 1.0), _failover_row(raft, "raft", 2, 3.0),
                     _failover_row(raft, "raft", 3, 2.0), _failover_row(zk, "zk-election", 1, 4.0),
                     _failover_row(zk, "zk-election", 2, None),
                     _failover_row(zk, "zk-election", 3, 5.0)],
        "runs": [_conc64_row(raft, "raft", 3000.0), _conc64_row(zk, "zk-election", 2000.0),
                 _conc64_row(echo.LABEL, "echo", 12000.0)]}
    assert report.median_unavailable(results, raft) == (2.0, 3, 3)
    assert report.median_unavailable(results, zk) == (4.5, 2, 3)  # the None run is left out
    rs = {(r["group"], r["what"].split(":")[0]): r for r in report.ratios(results)}
    fo = rs[("Raft / ZooKeeper mode", "failover time")]
    assert fo["ratio"] == round(2.0 / 4.5, 2) and fo["ok"] is True and fo["target"] == "<= 0.5"
    assert raft in fo["what"] and zk in fo["what"]
    thr = rs[("Raft / ZooKeeper mode", "throughput, 64 clients")]
    assert thr["ratio"] == 1.5
    assert rs[("raftpay / echo ceiling", raft)]["ratio"] == 0.25
    assert rs[("raftpay / echo ceiling", zk)]["ratio"] == round(2000 / 12000, 3)
    assert not any(r["what"].startswith(echo.LABEL) for r in report.ratios(results))
    for f in results["failover"][3:]:
        f["unavailable_s"] = 3.0  # Raft 2.0 s vs 3.0 s: misses the target
    assert [r["ok"] for r in report.ratios(results) if "failover" in r["what"]] == [False]
    text = report.ratios_text(results)
    assert "failover time" in text and "FAIL" in text


def test_echo_server_answers_the_real_clients_and_survives_garbage():
    from raftpay import wire
    from raftpay.client import AsyncClient, Client
    from raftpay.codes import Code, RequestRejected

    with echo.EchoServer() as server:
        host, port = server.addr.rsplit(":", 1)
        # Garbage: undecodable payloads get invalid_request with id 0; a frame announcing more
        # than the limit closes that connection.  The server lives on either way.
        for junk, answered in ((b"\x00\x00\x00\x03abc", True), (b"\x00\x00\x00\x01\xc1", True),
                               (b"\x00\x00\x00\x02\x93\x01", True),  # not a map
                               (b"\xff\xff\xff\xffxyz", False)):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(junk)
                reply = s.recv(4096)
            if answered:
                env = wire.decode(reply[wire.PREFIX_BYTES:])
                assert env.id == 0 and env.body["code"] == Code.INVALID_REQUEST, junk
            else:
                assert reply == b"", junk
        assert server.alive()

        with Client(server.addr, timeout_s=5) as c:  # sessions on, as in the harness
            assert c.status()["role"] == "leader"
            assert c.submit([{"op": "create_transfer", "id": 1}] * 3) == [Code.OK] * 3
            big = [{"op": "create_transfer", "id": i, "amount": 1} for i in range(8000)]
            assert c.submit(big) == [Code.OK] * 8000  # a frame in many pieces
            with pytest.raises(RequestRejected):
                c.lookup_accounts([1])

        async def many() -> list:
            async with AsyncClient(server.addr, timeout_s=5) as ac:
                return await asyncio.gather(*[ac.submit([{"op": "create_transfer", "id": i}])
                                              for i in range(50)])

        assert asyncio.run(many()) == [[Code.OK]] * 50
    assert not server.alive()


def test_fsync_probe_times_real_syncs_and_leaves_no_files(tmp_path, capsys):
    lat = fsync_probe.measure(str(tmp_path), 2, 20)
    assert len(lat) == 40 and lat == sorted(lat) and lat[0] > 0
    assert list(tmp_path.iterdir()) == []
    assert fsync_probe.main(["--procs", "1,2", "--count", "5", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 process(es) syncing at once" in out and "p50 with 2 / with 1:" in out
    with pytest.raises(SystemExit):
        fsync_probe.main(["--procs", "0"])


def test_paired_ratios_are_taken_against_the_echo_windows_around_each_window():
    # E0=40k, R1, E1=20k, R2, E2=30k: R1 against 30k, R2 against 25k.
    assert paired.bracket_ratios([40e3, 20e3, 30e3], [9e3, 10e3]) == [0.3, 0.4]
    with pytest.raises(ValueError, match="need 3 echo windows"):
        paired.bracket_ratios([40e3, 20e3], [9e3, 10e3])
    with pytest.raises(ValueError, match="completed nothing"):
        paired.bracket_ratios([0.0, 0.0], [9e3])
    out = paired.summarise([40e3, 20e3, 30e3, 50e3],
                           {"transfer": [9e3, 10e3, 16e3], "other": [1.0, 1.0, 1.0]},
                           {"transfer": 15_000})
    t = out["kinds"]["transfer"]
    assert t["median_ratio"] == pytest.approx(0.4)
    assert (t["min_ratio"], t["max_ratio"]) == (pytest.approx(0.3), pytest.approx(0.4))
    assert t["echo_needed_per_s"] == pytest.approx(37_500)  # 15,000 / 0.4
    assert t["windows_at_floor"] == 1
    assert "floor" not in out["kinds"]["other"]


def test_paired_windows_run_against_a_real_echo_server_and_cluster(capsys):
    out = paired.run(rounds=1, seconds=0.8, clients=4, batch=50, batch_clients=2, accounts=200,
                     warmup_s=0.3)
    echo_rates = out["echo_per_s"]
    assert len(echo_rates) == 2 and min(echo_rates) > 0
    for kind in ("transfer", "batch"):
        k = out["kinds"][kind]
        assert len(k["per_s"]) == 1 and k["per_s"][0] > 0
        assert k["ratios"] == [k["per_s"][0] / (sum(echo_rates) / 2)]
        assert "floor" not in k  # the floors are stated for 64 clients and 8k batches only
    text = paired.report(out)
    assert "batched 50 transfers/request" in text and "4 clients x 1 transfer/request" in text
    assert "200 accounts" in text
    for bad in (["--rounds", "0"], ["--accounts", "1"]):
        with pytest.raises(SystemExit):
            paired.main(bad)
        assert "must be positive" in capsys.readouterr().err


def test_load_processes_are_chosen_from_the_workload():
    from bench.load import LoadSpec

    def procs(kind, clients, given=None):
        return LoadSpec("x", kind, "127.0.0.1:1", clients=clients, procs=given).nprocs()

    assert [procs("batch", n) for n in (1, 2, 4, 64)] == [1, 2, 2, 2]
    assert [procs("transfer", n) for n in (8, 63, 64, 128, 256, 1024)] == [1, 1, 2, 2, 4, 4]
    assert procs("latency", 1) == 1
    assert (procs("batch", 4, 3), procs("transfer", 2, 8)) == (3, 2)  # given, at most one each


def test_a_mode_is_a_parameter():
    assert set(MODES) >= {"raft", "zk-election"}
    with pytest.raises(ValueError, match="zk-hosts"):
        BenchCluster(ClusterSpec(3, "always", "zk-election"))
    assert ClusterSpec(5, "never").label == "5n-fsync-never"


def test_smoke_profile_runs_end_to_end_and_writes_reports(tmp_path):
    profile = runner.smoke_profile()
    results = runner.run(profile, ["(test)"], Progress(0, enabled=False))
    assert not results["problems"], results["problems"]
    by_name = {(r["spec_name"], r["op"]): r for r in results["runs"] if r["mode"] != "echo"}
    for key in [("latency", "transfer"), ("conc4", "transfer"), ("batch100", "transfer"),
                ("mix-linearizable", "read"), ("mix-follower", "read"),
                ("contention", "transfer")]:
        row = by_name[key]
        assert row["per_s"] > 0 and row["latency"]["count"] > 0, key
        assert not row["errors"], (key, row["errors"], row["error_examples"])
    (fo,) = results["failover"]
    assert fo["unavailable_s"] is not None and fo["new_leader"] not in (None, fo["killed"])
    (echo_row,) = [r for r in results["runs"] if r["mode"] == "echo"]
    assert echo_row["cluster"] == echo.LABEL and echo_row["per_s"] > 0, echo_row
    assert not echo_row["errors"], (echo_row["errors"], echo_row["error_examples"])
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


def test_ledger_growth_times_every_batch_and_names_the_slowest(tmp_path, capsys):
    from bench import ledger_bench
    out = tmp_path / "ledger.json"
    assert ledger_bench.main(["--only", "growth", "--growth-transfers", "20000", "--ids", "int",
                              "--growth-of", "transfers,failures", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["growth"]
    assert [(r["of"], r["ids"]) for r in runs] == [("transfers", "int"), ("failures", "int")]
    for r in runs:
        assert r["size"] == 20_000 and r["batches"] == 3  # 8,000 + 8,000 + 4,000
        sizes = [w["size_before"] for w in r["slowest"]]
        assert sizes == [0, 8_000, 16_000]  # every batch, in the order the table grew
        assert max(w["seconds"] for w in r["slowest"]) >= r["median_batch_s"] > 0
    printed = capsys.readouterr().out
    assert "while growing to 20,000 transfers | int | median" in printed
    assert "while growing to 20,000 failures | int | median" in printed


@pytest.mark.parametrize("what", ["accounts", "failures", "pending"])
def test_ledger_growth_commands_add_to_the_table_they_name(what):
    # Each batch must grow the table it is named after, and nothing fail by accident.
    from bench import ledger_bench
    led = ledger_bench.new_ledger("str")
    (cmd,) = ledger_bench.growth_commands(what, 0, 50, 8000, "str")
    reply = led.apply(cmd, 10 * ledger_bench.MS)
    assert reply["results"] == [ledger_bench._GROWTH_CODE[what]] * 50
    ids = [e.get("id") for e in cmd["events"]]
    statuses = {t and t["status"] for t in led.lookup_transfers(ids)}
    assert led.account_count - ledger_bench.ACCOUNTS == (50 if what == "accounts" else 0)
    assert statuses == {"accounts": {None}, "failures": {"failed"}, "pending": {"pending"}}[what]


def test_ledger_growth_refuses_an_unknown_table(capsys):
    from bench import ledger_bench
    with pytest.raises(SystemExit):
        ledger_bench.main(["--only", "growth", "--growth-of", "sessions"])
    assert "--growth-of takes some of transfers,accounts,failures,pending" \
        in capsys.readouterr().err


def test_the_benchmarks_own_zookeeper_ensemble_leaves_nothing_behind(tmp_path, monkeypatch):
    # `python -m bench --modes zk-election` without --zk-hosts runs a real 3-server ensemble;
    # every full run used to leave its data and logs in /tmp.
    import tempfile

    from bench.__main__ import zk_ensemble
    from kazoo.client import KazooClient
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with zk_ensemble() as ensemble:
        (root,) = tmp_path.iterdir()
        zk = KazooClient(hosts=ensemble.hosts)
        zk.start(timeout=15)
        try:
            zk.create("/raftpay-bench-probe", b"x")
        finally:
            zk.stop()
            zk.close()
    assert not root.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), zk_ensemble():  # and when the run fails
        raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_a_short_soak_passes_its_checks_and_keeps_its_data_only_when_asked(
        tmp_path, monkeypatch, capsys):
    # A real 3-node soak with one leader kill.  Each run wrote 150-250 MB into /tmp and left it
    # there; the data is kept only when a check fails or with --keep.
    import tempfile

    from bench import soak
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["--seconds", "6", "--kill-every", "3", "--clients", "4"]
    assert soak.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["acknowledged"] > 0 and len(summary["kills"]) == 1
    assert len(set(summary["replica_hashes"].values())) == 1
    assert list(tmp_path.iterdir()) == []
    assert soak.main(args + ["--keep"]) == 0
    (kept,) = tmp_path.iterdir()
    assert f"kept in {kept}" in capsys.readouterr().err
    assert {"n1.log", "n2.log", "n3.log"} <= {p.name for p in kept.iterdir()}


def test_the_stress_runs_report_memory_and_outcomes_and_check_the_replicas(tmp_path, capsys):
    """`bench.stress` end to end, small: a follower stopped 5/6 of the time under batches with
    the flow control on (a 64 kB backlog, so it holds entries back) and off, a flood, and
    idle connections past a leader's cap.  Every replica must end on one state hash, the slow
    follower catch up, and the leader keep serving."""
    from bench import stress
    out_json = tmp_path / "stress.json"
    assert stress.main(["--seconds", "3", "--flood-seconds", "2", "--flood-clients", "8",
                        "--batch", "500", "--backlog-bytes", "65536", "--fd-limit", "600",
                        "--client-conns", "150", "--raft-conns", "20", "--json",
                        str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| 0.0625 MiB |" in text and "| 4 GiB (no flow control) |" in text
    assert "median peak, flow control on / off:" in text and "flood (8 clients x 500" in text
    out = json.loads(out_json.read_text())
    runs = out["slow_follower"]
    assert [r["backlog_bytes"] for r in runs] == [65536, stress.UNBOUNDED]
    for r in runs + [out["flood"]]:
        assert r["replicas_agree"] and len(r["replica_hashes"]) == 3
        assert r["transfers_per_s"] > 0
    assert all(r["caught_up"] for r in runs)
    assert out["flood"]["requests_acknowledged"] > 0 and out["flood"]["leader_peak_mb"] > 0
    k = out["connections"]  # 150 idle connections at a cap of 88 (600 - 512 kept back)
    assert k["client_cap"] == 88 and k["client_conns_opened"] == 150
    assert k["leader_fds_flooded"] < 88 + 20 + 60  # the refused ones did not stay open
    assert k["transfers_ok_while_flooded"] == 200 and k["transfer_after_close_ok"]
    assert k["new_client_while_flooded"] == "Unavailable"
    assert k["error_lines"] == 0 and k["tick_failures"] == 0
    assert "connections (a leader at ulimit -n 600, client cap 88)" in text
    for bad in (["--seconds", "0"], ["--flood-clients", "-1"]):
        with pytest.raises(SystemExit):
            stress.main(bad)
        assert "must be positive" in capsys.readouterr().err


_BUSY = """
import threading, time  # py-spy names threads from the threading module, as in a node
def spin_here():
    end = time.monotonic() + 30
    x = 0
    print("spinning", flush=True)
    while time.monotonic() < end:
        x += 1
spin_here()
"""


def test_leader_profile_reads_what_real_py_spy_records(tmp_path):
    """`profiling` parses py-spy's own output (not a hand-written sample): a process that does
    nothing but spin in one function shows that function on top, in its script's module."""
    from bench import profiling
    assert profiling.available(), "py-spy is in the test extra (setup.cfg)"
    script = tmp_path / "busy.py"
    script.write_text(_BUSY)
    busy = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert busy.stdout.readline() == b"spinning\n"
        out = tmp_path / "busy.pyspy.txt"
        spy = profiling.start(busy.pid, 2, str(out), rate_hz=100)
        _, err = spy.communicate(timeout=60)
        assert spy.returncode == 0, err.decode()[-500:]
    finally:
        busy.kill()
        busy.wait()
    s = profiling.summarise(str(out), top=5)
    assert s["samples"] >= 100  # ~200 at 100 Hz for 2 s, with the GIL always held
    assert s["threads"][0][0] == "asyncio server thread"  # summarise's label for MainThread
    fn, share = s["top_self_functions"][0]
    assert fn == "spin_here (busy.py)" and share >= 80, s["top_self_functions"]
    assert s["self_by_module"][0][0] == "busy.py"
