"""logmerge: causal order across nodes, the reorder window, streaming."""

from __future__ import annotations

import io
import itertools
import json
import random
import tracemalloc

import pytest

from raftpay.clock import HLC, pack
from raftpay.logmerge import EventLog, LogMerge, merge


class Wall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def parse(lines):
    return [json.loads(l) for l in lines]


# --- HLC logs from several nodes --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_three_nodes_merge_in_causal_order(tmp_path, seed):
    """Three nodes with badly skewed, jumping clocks exchange messages in a random schedule;
    the merged log is sorted, keeps each file's order, and puts every send before its receive."""
    rnd = random.Random(seed)
    base = 1_700_000_000_000
    names = ["n1", "n2", "n3"]
    walls = {n: Wall(base + rnd.randint(-5000, 5000)) for n in names}
    logs = {n: EventLog(tmp_path / f"{n}.jsonl", HLC(walls[n]), n) for n in names}
    in_flight: list[tuple[str, int, int]] = []  # (to, msg id, send stamp)
    for msg in range(600):
        for w in walls.values():
            w.ms += rnd.choice([0, 0, 1, 3, -20])  # clocks stall and jump back too
        n = rnd.choice(names)
        action = rnd.random()
        if action < 0.4 or not in_flight:
            to = rnd.choice([m for m in names if m != n])
            ts = logs[n].write("send", msg=msg, to=to)
            in_flight.append((to, msg, ts))
        elif action < 0.8:
            to, m, ts = in_flight.pop(rnd.randrange(len(in_flight)))
            logs[to].hlc.update(ts)
            logs[to].write("recv", msg=m, **{"from": "?"})
        else:
            logs[n].write("local", note="x" * rnd.randint(0, 20))
    for log in logs.values():
        log.close()

    paths = [tmp_path / f"{n}.jsonl" for n in rnd.sample(names, 3)]  # any source order
    merged = parse(merge(paths))
    assert len(merged) == sum(len(p.read_text().splitlines()) for p in paths)
    keys = [(e["hlc"], e["node"]) for e in merged]
    assert keys == sorted(keys)
    for n in names:  # each node's lines keep their file order
        mine = [e for e in merged if e["node"] == n]
        assert mine == parse((tmp_path / f"{n}.jsonl").read_text().splitlines())
    position = {}
    for i, e in enumerate(merged):
        if e["event"] in ("send", "recv"):
            position[(e["event"], e["msg"])] = i
    for (event, msg), i in position.items():
        if event == "recv":
            assert position[("send", msg)] < i


def test_event_log_stamps_and_rejects_reserved_fields(tmp_path):
    wall = Wall(1000)
    with EventLog(tmp_path / "a.jsonl", HLC(wall), "a") as log:
        t1 = log.write("start", port=7000, obj=object())
        t2 = log.write("stop")
        with pytest.raises(ValueError, match="hlc"):
            log.write("bad", hlc=5)
    lines = parse((tmp_path / "a.jsonl").read_text().splitlines())
    assert [l["hlc"] for l in lines] == [t1, t2] == [pack(1000, 0), pack(1000, 1)]
    assert lines[0]["node"] == "a" and lines[0]["event"] == "start" and lines[0]["port"] == 7000
    assert lines[0]["obj"].startswith("<object")


def test_ties_break_by_node_then_line():
    a = ['{"hlc": 100, "node": "b", "event": "x"}\n', '{"hlc": 100, "node": "b", "event": "y"}\n']
    b = ['{"hlc": 100, "node": "a", "event": "z"}']  # no trailing newline
    out = list(merge([a, b]))
    assert [json.loads(l)["event"] for l in out] == ["z", "x", "y"]
    assert all(l.endswith("\n") and not l.endswith("\n\n") for l in out)


def test_plain_lines_follow_their_predecessor():
    a = [
        '{"hlc": %d, "node": "a", "event": "boom"}' % pack(10, 0),
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        '{"hlc": %d, "node": "a", "event": "after"}' % pack(30, 0),
    ]
    b = ['{"hlc": %d, "node": "b", "event": "mid"}' % pack(20, 0)]
    out = [l.rstrip("\n") for l in merge([a, b])]
    assert out == [a[0], a[1], a[2], b[0], a[3]]


# --- the reorder window -----------------------------------------------------------------------


def ts_line(t_s: float, i: int) -> str:
    return json.dumps({"ts": t_s, "node": "w", "i": i})


def test_window_reorders_wall_clock_lines():
    rnd = random.Random(1)
    times = [1000.0 + k * 0.01 for k in range(500)]
    # Each line delayed by up to 0.5 s: disorder inside the 1 s window.
    shuffled = sorted(times, key=lambda t: t + rnd.uniform(0, 0.5))
    assert shuffled != times
    m = LogMerge([[ts_line(t, i) for i, t in enumerate(shuffled)]], window_ms=1000)
    out = parse(m)
    assert [e["ts"] for e in out] == times
    assert m.late == 0


def test_window_releases_lines_once_the_newest_time_passes_it():
    # A generator that records how far merge() has read, to see when lines come out.
    read = []

    def source():
        for t in [10.0, 10.2, 10.5, 11.1, 11.3, 12.0]:
            read.append(t)
            yield ts_line(t, len(read))

    it = merge([source()], window_ms=1000)
    assert json.loads(next(it))["ts"] == 10.0
    assert read[-1] == 11.1  # 10.0 left only when 11.1 (> 1 s newer) had been seen
    assert json.loads(next(it))["ts"] == 10.2
    assert read[-1] == 11.3
    assert [json.loads(l)["ts"] for l in it] == [10.5, 11.1, 11.3, 12.0]


def test_line_later_than_the_window_is_emitted_and_flagged():
    times = [10.0, 10.3, 11.5, 12.0, 10.1, 12.4, 14.0]  # 10.1 comes ~2 s late
    m = LogMerge([[ts_line(t, i) for i, t in enumerate(times)]], window_ms=1000)
    out = list(m)
    body, warning = parse(out[:-1]), json.loads(out[-1])
    # 10.1 went out right when it was read, right after what had been released by then.
    assert [e["ts"] for e in body] == [10.0, 10.3, 10.1, 11.5, 12.0, 12.4, 14.0]
    assert m.late == 1
    assert warning["event"] == "logmerge.late_lines" and warning["count"] == 1
    assert warning["window_ms"] == 1000 and warning["sources"] == {"<source 0>": 1}


def test_hlc_line_out_of_file_order_is_flagged():
    a = ['{"hlc": 200, "node": "a"}', '{"hlc": 100, "node": "a"}', '{"hlc": 300, "node": "a"}']
    m = LogMerge([a])
    out = list(m)
    assert m.late == 1 and len(out) == 4
    assert [json.loads(l).get("hlc") for l in out[:3]] == [200, 100, 300]


def test_hlc_and_wall_clock_sources_interleave():
    hlc_src = ['{"hlc": %d, "node": "a"}' % pack(ms, 0) for ms in (1000, 3000, 5000)]
    ts_src = [ts_line(t, 0) for t in (4.0, 2.0, 6.0)]  # seconds: 2000..6000 ms
    out = parse(merge([hlc_src, ts_src], window_ms=5000))
    times = [e["hlc"] >> 16 if "hlc" in e else e["ts"] * 1000 for e in out]
    assert times == [1000, 2000, 3000, 4000, 5000, 6000]


def test_zero_window_releases_on_any_newer_line():
    m = LogMerge([[ts_line(t, 0) for t in (2.0, 3.0, 1.0, 2.5)]], window_ms=0)
    out = parse(m)
    # 2.0 left as soon as 3.0 was seen, so 1.0 is late; 2.5 is still reordered before 3.0.
    assert [e.get("ts") for e in out[:4]] == [2.0, 1.0, 2.5, 3.0]
    assert m.late == 1 and out[4]["count"] == 1


def test_streams_and_paths_mix(tmp_path):
    p = tmp_path / "a.log"
    p.write_text('{"hlc": 1, "node": "a"}\n{"hlc": 3, "node": "a"}\n')
    out = parse(merge([p, io.StringIO('{"hlc": 2, "node": "b"}\n')]))
    assert [e["hlc"] for e in out] == [1, 2, 3]


def test_single_use():
    m = LogMerge([[]])
    assert list(m) == []
    with pytest.raises(RuntimeError):
        iter(m)


# --- streaming --------------------------------------------------------------------------------


def test_merge_streams_unbounded_sources():
    # Infinite sources: only a streaming merge can yield anything at all.
    def node(name: str, step: int):
        for k in itertools.count():
            yield '{"hlc": %d, "node": "%s"}' % (pack(k * step, 0), name)

    def wall_source():
        for k in itertools.count():
            yield ts_line(k * 0.002, k)

    it = merge([node("a", 1), node("b", 2), node("c", 3), wall_source()])
    first = parse(itertools.islice(it, 20_000))
    times = [e["hlc"] >> 16 if "hlc" in e else e["ts"] * 1000 for e in first]
    assert times == sorted(times)
    it.close()


def test_large_files_stream_in_bounded_memory(tmp_path):
    n_lines = 10_000
    pad = "p" * 400
    paths = []
    for n in range(3):
        p = tmp_path / f"n{n}.jsonl"
        with open(p, "w") as f:
            for k in range(n_lines):
                f.write('{"hlc": %d, "node": "n%d", "pad": "%s"}\n' % (pack(3 * k + n, 0), n, pad))
        paths.append(p)
    total_bytes = sum(p.stat().st_size for p in paths)
    tracemalloc.start()
    try:
        count, prev = 0, -1
        for line in merge(paths):
            hlc = int(line[8 : line.index(",")])  # cheaper than json.loads for 120k lines
            assert hlc > prev
            prev = hlc
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 3 * n_lines
    assert peak < total_bytes / 50, (peak, total_bytes)  # measured: ~55 KB of 13 MB
