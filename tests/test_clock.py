"""HLC (against the paper's rules as a reference model), normalise, Marzullo, ClockGuard."""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftpay.clock import (
    COUNTER_MAX,
    HLC,
    MS,
    ClockGuard,
    ClockOffsetError,
    marzullo,
    ms_of,
    normalise,
    pack,
    unpack,
)


class Wall:
    """An injected wall clock the test sets by hand."""

    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


# --- pack / unpack / normalise ---------------------------------------------------------------


def test_pack_layout():
    assert MS == 1 << 16
    assert pack(1, 0) == MS
    assert pack(5, 7) == 5 * MS + 7
    assert unpack(pack(123456789, 0xFFFF)) == (123456789, 0xFFFF)
    assert ms_of(pack(42, 9)) == 42
    assert pack(2**48 - 1, 0xFFFF) == 2**64 - 1


@pytest.mark.parametrize("ms, c", [(-1, 0), (2**48, 0), (0, -1), (0, 0x10000)])
def test_pack_rejects_out_of_range(ms, c):
    with pytest.raises(ValueError):
        pack(ms, c)


@pytest.mark.parametrize(
    "ts, last, expected",
    [
        (10, 5, 10),  # ahead: kept
        (6, 5, 6),  # just ahead: kept
        (5, 5, 6),  # equal: lifted by one
        (3, 5, 6),  # behind (a new leader's clock): lifted
        (0, 0, 1),
    ],
)
def test_normalise(ts, last, expected):
    assert normalise(ts, last) == expected


# --- HLC against the paper --------------------------------------------------------------------


class PaperHLC:
    """Kulkarni et al. 2014, Fig. 5, verbatim: unbounded counter, no offset guard."""

    def __init__(self) -> None:
        self.l = 0
        self.c = 0

    def send(self, pt: int) -> tuple[int, int]:
        l_old = self.l
        self.l = max(l_old, pt)
        self.c = self.c + 1 if self.l == l_old else 0
        return self.l, self.c

    def recv(self, pt: int, l_m: int, c_m: int) -> tuple[int, int]:
        l_old = self.l
        self.l = max(l_old, l_m, pt)
        if self.l == l_old == l_m:
            self.c = max(self.c, c_m) + 1
        elif self.l == l_old:
            self.c += 1
        elif self.l == l_m:
            self.c = c_m + 1
        else:
            self.c = 0
        return self.l, self.c


BASE_MS = 1_700_000_000_000
# Wall readings that jump back and forth around BASE_MS, remote stamps near them, and remote
# counters small enough that the 16-bit counter never overflows in 200 steps.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("wall"), st.integers(-50, 50)),
        st.tuples(st.just("now")),
        st.tuples(st.just("recv"), st.integers(-60, 60), st.integers(0, 1000)),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_hlc_matches_the_paper_and_is_monotonic(steps):
    wall = Wall(BASE_MS)
    hlc, ref = HLC(wall), PaperHLC()
    last = 0
    for op in steps:
        if op[0] == "wall":
            wall.ms = BASE_MS + op[1]  # may jump back
            continue
        if op[0] == "now":
            got, want = hlc.now(), ref.send(wall.ms)
        else:
            remote = pack(BASE_MS + op[1], op[2])
            got, want = hlc.update(remote), ref.recv(wall.ms, BASE_MS + op[1], op[2])
            assert got > remote  # receive rule: after what was received
        assert unpack(got) == want
        assert got > last  # strictly monotonic although the wall clock jumps back
        assert ms_of(got) >= wall.ms  # never behind the wall clock
        assert hlc.peek() == got
        last = got


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-3, 3), st.integers(-3, 3), st.integers(COUNTER_MAX - 3, COUNTER_MAX)
        ),
        max_size=100,
    )
)
def test_hlc_monotonic_through_counter_overflow(steps):
    # Remote counters at the very top of the range force overflow again and again.
    wall = Wall(BASE_MS)
    hlc = HLC(wall)
    last = 0
    for dwall, dremote, c in steps:
        wall.ms = BASE_MS + dwall
        remote = pack(BASE_MS + dremote, c)
        a = hlc.update(remote)
        b = hlc.now()
        assert last < a < b and a > remote
        assert unpack(a)[1] <= COUNTER_MAX
        last = b


def test_counter_overflow_moves_to_the_next_millisecond():
    wall = Wall(BASE_MS)
    hlc = HLC(wall)
    assert hlc.now() == pack(BASE_MS, 0)
    stamps = [hlc.now() for _ in range(COUNTER_MAX)]
    assert stamps[-1] == pack(BASE_MS, COUNTER_MAX)
    assert hlc.now() == pack(BASE_MS + 1, 0)  # 65,537th event in one wall millisecond
    assert hlc.now() == pack(BASE_MS + 1, 1)
    wall.ms = BASE_MS + 1  # the wall clock catches up: the counter simply continues
    assert hlc.now() == pack(BASE_MS + 1, 2)
    wall.ms = BASE_MS + 2
    assert hlc.now() == pack(BASE_MS + 2, 0)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_update_rejects_non_timestamps(bad):
    hlc = HLC(Wall(BASE_MS))
    before = hlc.now()
    with pytest.raises(ValueError):
        hlc.update(bad)
    assert hlc.peek() == before


def test_update_with_full_remote_counter_overflows():
    wall = Wall(BASE_MS)
    hlc = HLC(wall)
    assert hlc.update(pack(BASE_MS, COUNTER_MAX)) == pack(BASE_MS + 1, 0)


def test_receive_rule_cases():
    wall = Wall(BASE_MS)
    hlc = HLC(wall)
    assert hlc.now() == pack(BASE_MS, 0)
    # Remote ahead: take its time and counter + 1.
    assert hlc.update(pack(BASE_MS + 10, 4)) == pack(BASE_MS + 10, 5)
    # Same physical part as ours and the remote's: max counter + 1.
    assert hlc.update(pack(BASE_MS + 10, 9)) == pack(BASE_MS + 10, 10)
    # Remote behind: our counter + 1.
    assert hlc.update(pack(BASE_MS - 100, 50)) == pack(BASE_MS + 10, 11)
    # Wall clock passes both: counter restarts.
    wall.ms = BASE_MS + 20
    assert hlc.update(pack(BASE_MS + 15, 3)) == pack(BASE_MS + 20, 0)


def test_max_offset_guard_refuses_a_runaway_peer():
    wall = Wall(BASE_MS)
    hlc = HLC(wall, max_offset_ms=500)
    before = hlc.now()
    with pytest.raises(ClockOffsetError) as ei:
        hlc.update(pack(BASE_MS + 501, 0))
    assert ei.value.ahead_ms == 501 and ei.value.max_offset_ms == 500
    assert hlc.peek() == before  # the clock did not move
    assert hlc.now() == before + 1
    # Exactly at the limit is allowed; so is anything behind.
    assert hlc.update(pack(BASE_MS + 500, 3)) == pack(BASE_MS + 500, 4)
    assert hlc.update(pack(0, 0)) == pack(BASE_MS + 500, 5)
    # observe() is the same rule, guard included.
    with pytest.raises(ClockOffsetError):
        hlc.observe(pack(BASE_MS + 10_000, 0))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-1000, 1000)), max_size=100))
def test_max_offset_bounds_the_lead_over_the_wall_clock(steps):
    # With a wall clock that never goes back, accepted stamps keep the clock within
    # max_offset_ms of it (plus the overflow millisecond the test cannot reach here).
    wall = Wall(BASE_MS)
    hlc = HLC(wall, max_offset_ms=250)
    for advance, remote_delta in steps:
        wall.ms += advance
        before = hlc.peek()
        try:
            ts = hlc.update(pack(wall.ms + remote_delta, 0))
        except ClockOffsetError:
            assert remote_delta > 250
            assert hlc.peek() == before
            continue
        assert remote_delta <= 250
        assert ms_of(ts) - wall.ms <= 250


def test_hlc_is_thread_safe():
    hlc = HLC()
    per_thread: list[list[int]] = [[] for _ in range(4)]

    def work(out: list[int]) -> None:
        for _ in range(5000):
            out.append(hlc.now())

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = list(itertools.chain.from_iterable(per_thread))
    assert len(set(everything)) == len(everything)
    for out in per_thread:
        assert out == sorted(out)


def test_default_wall_clock_is_real_milliseconds():
    import time

    ts = HLC().now()
    assert abs(ms_of(ts) - time.time() * 1000) < 1000


# --- Marzullo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "intervals, expected",
    [
        ([(8, 12), (11, 13), (10, 12)], (11, 12, 3)),  # all agree on [11, 12]
        ([(8, 12), (11, 13), (14, 15)], (11, 12, 2)),  # one falseticker
        ([(8, 9), (8, 12), (10, 12)], (8, 9, 2)),  # tie between [8,9] and [10,12]: lowest wins
        ([(10, 12), (8, 12), (8, 9)], (8, 9, 2)),  # ... whatever the input order
        ([(0, 1), (1, 2)], (1, 1, 2)),  # closed intervals: touching ones agree on the point
        ([(0, 1), (5, 6)], (0, 1, 1)),  # no agreement: lowest
        ([(3, 4)], (3, 4, 1)),
        ([(0, 0), (0, 0), (-1, 1)], (0, 0, 3)),  # points
        ([(-5, 5), (-1, 1), (0, 10), (20, 30)], (0, 1, 3)),
        ([(-2.5, -1.5), (-2.0, 0.0), (0.0, 0.0)], (-2.0, -1.5, 2)),  # floats; tie: lowest
    ],
)
def test_marzullo_table(intervals, expected):
    assert marzullo(intervals) == expected


@pytest.mark.parametrize("bad", [[], [(2, 1)]])
def test_marzullo_rejects(bad):
    with pytest.raises(ValueError):
        marzullo(bad)


interval = st.tuples(st.integers(-50, 50), st.integers(0, 30)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(interval, min_size=1, max_size=12), st.randoms())
def test_marzullo_against_brute_force(intervals, rnd):
    lo, hi, count = marzullo(intervals)

    def cover(x: float) -> int:
        return sum(a <= x <= b for a, b in intervals)

    points = sorted({p for iv in intervals for p in iv})
    best = max(cover(p) for p in points)
    assert count == best
    assert lo <= hi
    assert cover(lo) == cover(hi) == cover((lo + hi) / 2) == best
    # The lowest best region: no point below `lo` reaches the best count.
    assert all(cover(p) < best for p in points if p < lo)
    shuffled = list(intervals)
    rnd.shuffle(shuffled)
    assert marzullo(shuffled) == (lo, hi, count)


# --- ClockGuard -------------------------------------------------------------------------------


def ping(guard: ClockGuard, peer: str, skew_self_ms: float, skew_peer_ms: float, at_ms=1e6):
    """A simulated ping/pong at true time `at_ms` with 1 ms each way."""
    return guard.add_sample(
        peer,
        t1_local_send=at_ms + skew_self_ms,
        t_remote=at_ms + 1 + skew_peer_ms,
        t4_local_recv=at_ms + 2 + skew_self_ms,
    )


def test_add_sample_offset_and_bound():
    g = ClockGuard(max_offset_ms=250)
    assert g.add_sample("b", 1000, 1501, 1002) == (500, 1)
    assert g.add_sample("c", 1000, 1000, 1010) == (-5, 5)
    with pytest.raises(ValueError):
        g.add_sample("d", 1000, 1000, 999)


@pytest.mark.parametrize("skew_ms", [2000.0, -2000.0])
def test_clock_guard_flags_a_skewed_node(skew_ms):
    skews = {"a": 0.0, "b": 3.0, "c": skew_ms}
    guards = {n: ClockGuard(max_offset_ms=250) for n in skews}
    for me, g in guards.items():
        for peer in skews:
            if peer != me:
                ping(g, peer, skews[me], skews[peer])
    # The skewed node sees a majority agreeing 2 s away from it and must not stamp.
    est = guards["c"].cluster_offset()
    assert est.count == 2 and est.sources == 3
    assert est.offset_ms == pytest.approx(-skew_ms, abs=5)
    assert not guards["c"].ok()
    assert guards["c"].suspects() == []  # from its own view the others agree
    # The healthy nodes stay ok and name the skewed one.
    for me in ("a", "b"):
        assert guards[me].ok()
        assert guards[me].suspects() == ["c"]
        assert abs(guards[me].cluster_offset().offset_ms) < 5


@pytest.mark.parametrize(
    "peer_skews_ms, ok",
    [
        ((0, 0), True),
        ((3, -2), True),  # NTP-grade differences are far inside the tolerance
        ((200, 240), True),  # both within max_offset_ms of us
        ((-240, -240), True),
        ((260, 270), False),  # a majority agrees on a time more than 250 ms from ours
        ((-300, -290), False),
        ((2000, 0), True),  # one peer off: we and the other are the majority
        ((2000, -2000), True),  # nobody agrees: no majority, no accusation
    ],
)
def test_clock_guard_threshold(peer_skews_ms, ok):
    g = ClockGuard(max_offset_ms=250)
    for name, skew in zip("bc", peer_skews_ms):
        ping(g, name, 0, skew)
    assert g.ok() is ok


def test_clock_guard_without_majority_does_not_accuse():
    # Two nodes that disagree: nobody can tell which one is wrong.
    g = ClockGuard(max_offset_ms=250)
    ping(g, "b", 0, -2000)
    assert g.cluster_offset().count == 1 and not g.cluster_offset().majority
    assert g.ok() and g.suspects() == []
    assert ClockGuard(max_offset_ms=250).ok()  # alone


def test_clock_guard_samples_expire():
    now = [0.0]
    g = ClockGuard(max_offset_ms=250, sample_ttl_s=10, monotonic=lambda: now[0])
    ping(g, "b", 2000, 0)
    ping(g, "c", 2000, 0)
    assert not g.ok()
    now[0] = 10.5
    assert g.peers() == {}
    assert g.ok()
    ping(g, "b", 2000, 0)  # a fresh sample replaces the old one
    g.remove_peer("c")
    assert list(g.peers()) == ["b"] and g.ok()
