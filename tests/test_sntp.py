"""The SNTP client and NtpMonitor against a real chronyd and against FakeNtpServer."""

from __future__ import annotations

import socket
import time

import pytest
from ntp_fixtures import (  # noqa: F401  (chronyd is a fixture)
    FakeNtpServer,
    chronyd,
    chronyd_exe,
    start_chronyd,
    stop_chronyd,
    unassigned_udp_ports,
)

from raftpay.clock import (
    KissOfDeath,
    NtpBadReply,
    NtpMonitor,
    NtpNetworkError,
    NtpTimeout,
    probe,
    sntp_query,
)

FAST_S = 0.3  # timeout for exchanges that are meant to fail


# --- a real server ----------------------------------------------------------------------------


def test_chronyd_offset_is_near_zero(chronyd):
    host, port = chronyd
    s = sntp_query(host, port, timeout_s=1.0)
    # Same host, same clock: the only offset is measurement noise.
    assert abs(s.offset_ms) < 50
    assert -1.0 < s.delay_ms < 50
    assert s.stratum == 10  # `local stratum 10`
    assert s.leap != 3 and s.version == 4
    assert s.t1 <= s.t4
    assert s.error_ms >= max(s.delay_ms, 0) / 2


def test_chronyd_probe_keeps_least_delayed_sample(chronyd):
    host, port = chronyd
    s = probe(host, port, samples=4, timeout_s=1.0, spacing_s=0.0)
    assert abs(s.offset_ms) < 50
    assert s.delay_ms < 50


def test_chronyd_sees_a_skewed_local_clock(chronyd):
    # Our clock 2 s behind: the server is 2 s ahead of us.
    host, port = chronyd
    s = sntp_query(host, port, wall=lambda: time.time() - 2.0)
    assert s.offset_s == pytest.approx(2.0, abs=0.05)


def test_chronyd_monitor_status(chronyd):
    host, port = chronyd
    mon = NtpMonitor([f"{host}:{port}"], interval_s=60)
    assert mon.offset_ms is None and not mon.exceeds(1)
    assert mon.poll_once() == 1
    assert mon.poll_once() == 0  # not due again for 60 s
    st = mon.status()
    assert st["agreeing"] == 1 and abs(st["offset_ms"]) < 50
    assert st["servers"][f"{host}:{port}"]["state"] == "ok"
    assert not mon.exceeds(500)


def test_chronyd_fixture_moves_on_when_its_port_is_taken(tmp_path):
    # CI once lost all four chronyd tests to one port taken between the check and chronyd's bind.
    ports = unassigned_udp_ports()
    taken_port, free_port = next(ports), next(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", taken_port))
        proc, port = start_chronyd(chronyd_exe(), tmp_path, iter([taken_port, free_port]))
        try:
            assert port == free_port
            assert abs(sntp_query("127.0.0.1", port, timeout_s=1.0).offset_ms) < 50
        finally:
            stop_chronyd(proc)
        with pytest.raises(RuntimeError, match="Could not open NTP socket"):
            start_chronyd(chronyd_exe(), tmp_path, iter([taken_port] * 2), attempts=2)


def test_unassigned_ports_are_below_the_ephemeral_range():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = unassigned_udp_ports()
    assert all(1024 <= next(ports) < low for _ in range(50))


# --- FakeNtpServer: offsets -------------------------------------------------------------------


def test_skewed_server_offset_is_measured():
    with FakeNtpServer(offset_s=2.0) as srv:
        s = sntp_query(srv.host, srv.port)
    assert s.offset_s == pytest.approx(2.0, abs=0.05)
    assert s.delay_s < 0.05
    assert s.root_delay_s == pytest.approx(0.001, abs=1e-4)
    assert s.root_dispersion_s == pytest.approx(0.002, abs=1e-4)
    assert s.refid == "127.0.0.1"


def test_negative_skew_and_monitor_exceeds():
    with FakeNtpServer(offset_s=-2.0) as srv:
        mon = NtpMonitor([srv.spec], interval_s=10)
        mon.poll_once()
    assert mon.offset_ms == pytest.approx(-2000, abs=50)
    assert mon.exceeds(500)
    assert not mon.exceeds(3000)


def test_monitor_outvotes_one_wrong_server():
    with FakeNtpServer() as a, FakeNtpServer() as b, FakeNtpServer(offset_s=5.0) as liar:
        mon = NtpMonitor([a.spec, b.spec, liar.spec], interval_s=10)
        mon.poll_once()
    st = mon.status()
    assert st["agreeing"] == 2 and st["sources"] == 3
    assert abs(st["offset_ms"]) < 50


# --- FakeNtpServer: kiss-o'-death -------------------------------------------------------------


@pytest.mark.parametrize("code", ["DENY", "RSTR", "RATE"])
def test_kiss_of_death_is_raised_with_its_code(code):
    with FakeNtpServer(kiss=code) as srv:
        with pytest.raises(KissOfDeath) as ei:
            sntp_query(srv.host, srv.port)
    assert ei.value.code == code


def test_probe_stops_at_kiss_of_death():
    with FakeNtpServer(kiss="RATE") as srv:
        with pytest.raises(KissOfDeath):
            probe(srv.host, srv.port, samples=4, spacing_s=0.0)
        assert srv.requests == 1  # asking again is what the kiss forbids


@pytest.mark.parametrize("code", ["DENY", "RSTR"])
def test_monitor_stops_polling_a_server_that_denies(code, caplog):
    with FakeNtpServer(kiss=code) as bad, FakeNtpServer() as good:
        mon = NtpMonitor([bad.spec, good.spec], interval_s=10)
        with caplog.at_level("WARNING", logger="raftpay.clock"):
            mon.poll_once()
        assert mon.poll_once(force=True) == 1  # only the good one
        assert bad.requests == 1 and good.requests == 2
    st = mon.status()["servers"]
    assert st[bad.spec]["state"] == "denied" and st[bad.spec]["kiss"] == code
    assert st[good.spec]["state"] == "ok"
    assert code in caplog.text and "will not be asked again" in caplog.text


def test_monitor_backs_off_on_rate_and_caps_the_interval():
    now = [1000.0]
    with FakeNtpServer(kiss="RATE") as srv:
        mon = NtpMonitor([srv.spec], interval_s=16, max_interval_s=64, monotonic=lambda: now[0])
        intervals = []
        for _ in range(4):
            mon.poll_once(force=True)
            intervals.append(mon.status()["servers"][srv.spec]["interval_s"])
        assert intervals == [32, 64, 64, 64]
        now[0] += 63
        assert mon.poll_once() == 0  # not due yet: the doubled interval is respected
        now[0] += 1
        srv.kiss = None  # the server calms down; the longer interval stays
        assert mon.poll_once() == 1
    st = mon.status()["servers"][srv.spec]
    assert st["state"] == "ok" and st["interval_s"] == 64


def test_monitor_thread_polls_and_stops_when_every_server_denies():
    with FakeNtpServer() as good:
        with NtpMonitor([good.spec], interval_s=0.05) as mon:
            deadline = time.monotonic() + 5
            while good.requests < 3:
                assert time.monotonic() < deadline, "monitor thread did not poll"
                time.sleep(0.01)
        assert mon.status()["servers"][good.spec]["state"] == "ok"
    with FakeNtpServer(kiss="DENY") as bad:
        mon = NtpMonitor([bad.spec], interval_s=0.05)
        mon.start()
        mon._thread.join(5)  # it ends by itself: nobody is left to ask
        assert not mon._thread.is_alive() and bad.requests == 1


def test_spoofed_kiss_of_death_is_ignored():
    # A kiss that does not echo our transmit timestamp could come from anyone.
    with FakeNtpServer(kiss="DENY", bad_originate=True) as srv:
        with pytest.raises(NtpBadReply, match="originate"):
            sntp_query(srv.host, srv.port, timeout_s=FAST_S)


# --- FakeNtpServer: bad replies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ({"bad_originate": True}, "originate"),
        ({"leap": 3}, "leap"),
        ({"mode": 3}, "mode"),
        ({"mode": 1}, "mode"),
        ({"version": 2}, "version"),
        ({"stratum": 16}, "stratum"),
        ({"zero_transmit": True}, "transmit"),
    ],
)
def test_bad_reply_is_rejected(behaviour, reason):
    with FakeNtpServer(**behaviour) as srv:
        with pytest.raises(NtpBadReply, match=reason):
            sntp_query(srv.host, srv.port, timeout_s=FAST_S)


def test_broadcast_mode_and_version_3_are_accepted():
    with FakeNtpServer(mode=5, version=3) as srv:
        s = sntp_query(srv.host, srv.port)
    assert s.version == 3 and abs(s.offset_s) < 0.05


def test_no_reply_is_a_timeout():
    with FakeNtpServer(silent=True) as srv:
        t0 = time.monotonic()
        with pytest.raises(NtpTimeout):
            sntp_query(srv.host, srv.port, timeout_s=FAST_S)
        assert FAST_S <= time.monotonic() - t0 < FAST_S + 0.5
        assert srv.requests == 1


def test_closed_port_is_a_network_error_or_timeout():
    # Linux reports ICMP port unreachable on a connected UDP socket.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises((NtpNetworkError, NtpTimeout)):
        sntp_query("127.0.0.1", port, timeout_s=FAST_S)


def test_probe_survives_some_failures_and_raises_when_all_fail():
    with FakeNtpServer(drop=2) as srv:
        s = probe(srv.host, srv.port, samples=3, timeout_s=0.1, spacing_s=0.0)
        assert abs(s.offset_s) < 0.05 and srv.requests == 3
    with FakeNtpServer(silent=True) as srv:
        with pytest.raises(NtpTimeout):
            probe(srv.host, srv.port, samples=2, timeout_s=0.1, spacing_s=0.0)
        assert srv.requests == 2


def test_each_query_uses_a_fresh_nonce():
    with FakeNtpServer() as srv:
        a = sntp_query(srv.host, srv.port)
        b = sntp_query(srv.host, srv.port)
    tx_a, tx_b = srv.transmits
    nonce_mask = (1 << 24) - 1
    assert tx_a & nonce_mask != tx_b & nonce_mask  # equal by chance once in 2**24
    # Above the nonce the field still carries our send time (to within 2**-8 s).
    for tx, sample in ((tx_a, a), (tx_b, b)):
        assert abs(tx / 2**32 - 2_208_988_800 - sample.t1) < 2**-8 + 1e-6
