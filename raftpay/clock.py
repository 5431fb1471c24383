"""Time for raftpay: a hybrid logical clock, an SNTP client, and a guard against skewed peers.

Design: the ledger never reads a clock; the leader stamps every entry with a hybrid logical
clock (HLC, Kulkarni et al. 2014, "Logical Physical Clocks") and replicas apply that stamp.
An HLC timestamp is one 64-bit integer, 48 bits of wall-clock milliseconds above a 16-bit
logical counter, so timestamps compare as plain integers, stay close to wall time (useful to
people reading logs and to pending-transfer timeouts), and still order every send before its
receive when wall clocks disagree.  The wall clock is injected (kazoo's `sleep_func` habit), so
tests drive it backwards and forwards at will.

An HLC only stays close to real time if the wall clocks under it do.  Two checks watch them:
`NtpMonitor` asks NTP servers (SNTP, RFC 4330, written here on a bare UDP socket) how far this
host is from UTC, and `ClockGuard` compares this node with its peers from ping/pong samples and
takes the time most of them agree on (Marzullo's algorithm).  A leader whose clock the cluster
outvotes must stop stamping (the node wires that: it steps down).

Nothing in this module is on the ledger's deterministic path except `normalise()`, which is pure.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import socket
import struct
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Hybrid logical clock
# --------------------------------------------------------------------------------------------

COUNTER_BITS = 16
MS = 1 << COUNTER_BITS  # one millisecond in timestamp units
COUNTER_MAX = MS - 1  # 0xFFFF
WALL_MS_MAX = (1 << 48) - 1  # 48 bits of milliseconds last until the year 10889


def pack(ms: int, c: int) -> int:
    """The timestamp for wall milliseconds `ms` and logical counter `c`.  Pure.

    Raises ValueError when either part does not fit its field (48 and 16 bits)."""
    if not 0 <= ms <= WALL_MS_MAX:
        raise ValueError(f"wall milliseconds {ms} outside 0..2**48-1")
    if not 0 <= c <= COUNTER_MAX:
        raise ValueError(f"logical counter {c} outside 0..{COUNTER_MAX}")
    return (ms << COUNTER_BITS) | c


def unpack(ts: int) -> tuple[int, int]:
    """`(ms, c)` of a timestamp.  Pure."""
    return ts >> COUNTER_BITS, ts & COUNTER_MAX


def ms_of(ts: int) -> int:
    """The wall-clock milliseconds part of a timestamp.  Pure."""
    return ts >> COUNTER_BITS


def normalise(ts: int, last_ts: int) -> int:
    """The timestamp a replica applies: `max(ts, last_ts + 1)`.  Pure and deterministic.

    Entries carry the leader's stamp, and a new leader's HLC may (after a failover) stamp below
    what the old leader stamped last.  Every replica applies the same log in the same order, so
    lifting each stamp above the previous applied one gives every replica the same strictly
    increasing sequence without any replica consulting its own clock."""
    return max(ts, last_ts + 1)


def _system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ClockOffsetError(Exception):
    """A remote timestamp is further ahead of our wall clock than the configured maximum.

    Following it would drag this node's clock (and every stamp it issues) into the future, so
    `HLC.update()` refuses and leaves the clock as it was."""

    def __init__(self, remote_ts: int, wall_ms: int, max_offset_ms: int) -> None:
        self.remote_ts = remote_ts
        self.wall_ms = wall_ms
        self.max_offset_ms = max_offset_ms
        self.ahead_ms = ms_of(remote_ts) - wall_ms
        super().__init__(
            f"remote timestamp is {self.ahead_ms} ms ahead of the local wall clock "
            f"(maximum {max_offset_ms} ms)"
        )


class HLC:
    """A hybrid logical clock; `now()` and `update()` follow Kulkarni et al. 2014, Fig. 5.

    Contract:
    - Every value returned by `now()`/`update()` is strictly greater than every value returned
      before by this instance, whatever the injected wall clock does (it may jump back).
    - `update(m)` returns a value strictly greater than `m`.
    - The physical part stays >= the wall clock's reading at the time of the call.
    - Thread-safe: one lock serialises all calls.  Never blocks on I/O.
    - `wall_ms` is called once per `now()`/`update()`, under the lock; it must be cheap and must
      not call back into this clock.

    Counter overflow: the paper's counter is unbounded, ours has 16 bits.  When `c` would pass
    0xFFFF (65,536 events inside one wall millisecond, or a peer that sent c = 0xFFFF) the clock
    moves its physical part one millisecond ahead and restarts the counter at 0.  That keeps
    timestamps strictly increasing and costs at most one millisecond of lead over the wall clock
    per 65,536 events, which real event rates never reach.
    """

    def __init__(
        self,
        wall_ms: Callable[[], int] = _system_wall_ms,
        max_offset_ms: int | None = None,
    ) -> None:
        if max_offset_ms is not None and max_offset_ms < 0:
            raise ValueError("max_offset_ms must be >= 0 or None")
        self._wall_ms = wall_ms
        self.max_offset_ms = max_offset_ms
        self._lock = threading.Lock()
        self._l = 0  # physical part (ms)
        self._c = 0  # logical counter

    def peek(self) -> int:
        """The last timestamp issued (0 before the first), without advancing the clock."""
        with self._lock:
            return (self._l << COUNTER_BITS) | self._c

    def now(self) -> int:
        """A timestamp for a local or send event (the paper's send rule)."""
        with self._lock:
            pt = self._wall_ms()
            l_old = self._l
            self._l = max(l_old, pt)
            if self._l == l_old:
                self._c += 1
            else:
                self._c = 0
            return self._settle()

    def update(self, remote_ts: int) -> int:
        """Merge a received timestamp (the paper's receive rule) and return a new timestamp.

        Raises ClockOffsetError, leaving the clock untouched, when `max_offset_ms` is set and the
        remote physical part is more than `max_offset_ms` ahead of our wall clock; ValueError
        when `remote_ts` is not a 64-bit unsigned timestamp."""
        if not 0 <= remote_ts <= 0xFFFF_FFFF_FFFF_FFFF:
            raise ValueError(f"timestamp {remote_ts} is not a 64-bit unsigned integer")
        l_m, c_m = unpack(remote_ts)
        with self._lock:
            pt = self._wall_ms()
            if self.max_offset_ms is not None and l_m - pt > self.max_offset_ms:
                raise ClockOffsetError(remote_ts, pt, self.max_offset_ms)
            l_old, c_old = self._l, self._c
            self._l = max(l_old, l_m, pt)
            if self._l == l_old and self._l == l_m:
                self._c = max(c_old, c_m) + 1
            elif self._l == l_old:
                self._c = c_old + 1
            elif self._l == l_m:
                self._c = c_m + 1
            else:
                self._c = 0
            return self._settle()

    # A replica applying a committed entry observes its stamp exactly like a received message.
    # The entry is committed whatever this clock thinks: on the apply path catch
    # ClockOffsetError, log it, and apply the entry anyway (`normalise()` keeps order).
    observe = update

    def _settle(self) -> int:
        # Called with the lock held.  See the class docstring on counter overflow.
        if self._c > COUNTER_MAX:
            self._l += 1
            self._c = 0
        return pack(self._l, self._c)


# --------------------------------------------------------------------------------------------
# Marzullo's algorithm
# --------------------------------------------------------------------------------------------


def marzullo(intervals: Iterable[tuple[float, float]]) -> tuple[float, float, int]:
    """The interval agreed by the most sources: `(lo, hi, count)`.  Pure and deterministic.

    Classic Marzullo (1984): sweep the sorted interval edges, counting how many intervals cover
    each point.  Intervals are closed, so two that only touch agree on that point (starts sort
    before ends at the same value).  When several disjoint intervals reach the same count, the
    lowest one wins, so the answer never depends on input order.

    Raises ValueError for no intervals or an interval with lo > hi."""
    edges: list[tuple[float, int]] = []
    for lo, hi in intervals:
        if lo > hi:
            raise ValueError(f"interval ({lo}, {hi}) has lo > hi")
        edges.append((lo, -1))  # -1 sorts before +1: a start before an end at the same value
        edges.append((hi, +1))
    if not edges:
        raise ValueError("marzullo() needs at least one interval")
    edges.sort()
    best = 0
    count = 0
    best_lo = best_hi = edges[0][0]
    for i, (value, kind) in enumerate(edges):
        count -= kind
        if count > best:
            best = count
            best_lo = value
            best_hi = edges[i + 1][0]  # a start is never the last edge
    return best_lo, best_hi, best


# --------------------------------------------------------------------------------------------
# SNTP client (RFC 4330)
# --------------------------------------------------------------------------------------------

NTP_PORT = 123
NTP_UNIX_DELTA_S = 2_208_988_800  # 1900-01-01 to 1970-01-01
_ERA_S = 1 << 32
_PACKET = struct.Struct("!BBbbII4sQQQQ")  # 48 bytes, RFC 4330 section 4
# Random low bits of our transmit timestamp are the nonce the server must echo back.  24 bits
# of the 32-bit fraction are below 4 ms; we never read the time back out of that field (T1 is
# kept locally at full precision), so the noise costs nothing.
_NONCE_BITS = 24
# RFC 5905's frequency tolerance: an idle clock's error grows by 15 us per second.
PHI = 15e-6

MODE_CLIENT = 3
MODE_SERVER = 4
MODE_BROADCAST = 5
LEAP_UNSYNCHRONISED = 3


class NtpError(Exception):
    """Root of the SNTP client's errors."""


class NtpTimeout(NtpError, TimeoutError):
    """No acceptable reply before the deadline."""


class NtpNetworkError(NtpError):
    """The socket failed (name resolution, ICMP port unreachable, no route...)."""


class NtpBadReply(NtpError):
    """A reply failed a sanity check; `reason` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class KissOfDeath(NtpError):
    """The server sent a kiss-o'-death (stratum 0); `code` is the 4-letter kiss code.

    DENY and RSTR mean: never ask this server again.  RATE means: ask less often."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(f"kiss-o'-death {code!r}")


@dataclasses.dataclass(frozen=True)
class NtpSample:
    """One SNTP exchange.  Times are seconds (Unix epoch for t1..t4).

    t1 = our transmit, t2 = server receive, t3 = server transmit, t4 = our receive;
    `offset_s` is how far the server's clock is ahead of ours."""

    server: str
    offset_s: float
    delay_s: float
    stratum: int
    leap: int
    version: int
    refid: str
    root_delay_s: float
    root_dispersion_s: float
    t1: float
    t2: float
    t3: float
    t4: float

    @property
    def error_s(self) -> float:
        """Bound on |true offset to UTC - offset_s|: our half round trip plus the server's own
        synchronisation distance (root delay / 2 + root dispersion, RFC 5905 "root distance")."""
        return max(self.delay_s, 0.0) / 2 + self.root_delay_s / 2 + self.root_dispersion_s

    @property
    def offset_ms(self) -> float:
        return self.offset_s * 1000.0

    @property
    def delay_ms(self) -> float:
        return self.delay_s * 1000.0

    @property
    def error_ms(self) -> float:
        return self.error_s * 1000.0


def _to_ntp(unix_s: float) -> int:
    return int(round((unix_s + NTP_UNIX_DELTA_S) * _ERA_S)) & 0xFFFF_FFFF_FFFF_FFFF


def _from_ntp(ntp: int, near_unix_s: float) -> float:
    # A 64-bit NTP timestamp wraps every 136 years (next in 2036); pick the era that puts it
    # closest to our own clock, which is RFC 4330 section 3's advice in general form.
    # Seconds and fraction apart: one float division of the whole 64 bits would lose ~0.4 us.
    s = ((ntp >> 32) - NTP_UNIX_DELTA_S) + (ntp & 0xFFFF_FFFF) / _ERA_S
    era = round((near_unix_s - s) / _ERA_S)
    return s + era * _ERA_S


def _short_to_s(v: int) -> float:
    # NTP short format: 16.16 fixed point.  Root delay is signed in RFC 4330 (some servers send
    # tiny negatives); a negative distance would shrink our error bound, so clamp at 0.
    if v & 0x8000_0000:
        v -= 1 << 32
    return max(v / 65536.0, 0.0)


def _refid_text(refid: bytes, stratum: int) -> str:
    if stratum <= 1:  # a kiss code (stratum 0) or a reference clock name (stratum 1)
        return refid.rstrip(b"\0").decode("ascii", "replace")
    return ".".join(str(b) for b in refid)  # IPv4 address (or an IPv6 hash, shown alike)


def _check_reply(data: bytes, server: str, tx: int, t1: float, t4: float) -> NtpSample:
    """Parse a reply whose originate timestamp already matched.  Raises NtpBadReply/KissOfDeath."""
    (li_vn_mode, stratum, _poll, _prec, root_delay, root_disp, refid, _ref_ts, orig, recv, xmit) = (
        _PACKET.unpack_from(data)
    )
    assert orig == tx  # checked by the caller before anything else
    leap, version, mode = li_vn_mode >> 6, (li_vn_mode >> 3) & 7, li_vn_mode & 7
    if mode not in (MODE_SERVER, MODE_BROADCAST):
        raise NtpBadReply(f"mode {mode} is not server (4) or broadcast (5)")
    if version not in (3, 4):
        raise NtpBadReply(f"version {version} is not 3 or 4")
    if stratum == 0:
        # Kiss-o'-death packets carry leap 3 as well, so the kiss code must be read first.
        raise KissOfDeath(refid.rstrip(b"\0").decode("ascii", "replace"))
    if stratum > 15:
        raise NtpBadReply(f"stratum {stratum} means unsynchronised")
    if leap == LEAP_UNSYNCHRONISED:
        raise NtpBadReply("leap indicator 3: server clock is unsynchronised")
    if xmit == 0:
        raise NtpBadReply("transmit timestamp is zero")
    if recv == 0:
        raise NtpBadReply("receive timestamp is zero")
    t2 = _from_ntp(recv, t4)
    t3 = _from_ntp(xmit, t4)
    return NtpSample(
        server=server,
        offset_s=((t2 - t1) + (t3 - t4)) / 2,
        delay_s=(t4 - t1) - (t3 - t2),
        stratum=stratum,
        leap=leap,
        version=version,
        refid=_refid_text(refid, stratum),
        root_delay_s=_short_to_s(root_delay),
        root_dispersion_s=_short_to_s(root_disp),
        t1=t1,
        t2=t2,
        t3=t3,
        t4=t4,
    )


def sntp_query(
    host: str,
    port: int = NTP_PORT,
    timeout_s: float = 1.0,
    *,
    wall: Callable[[], float] = time.time,
) -> NtpSample:
    """Send one SNTPv4 client request and return the measured sample.

    Blocks the calling thread for up to `timeout_s`.  Thread-safe (one fresh socket per call).
    `wall` is the local clock being measured (seconds since the Unix epoch).

    The socket is connected, so the kernel drops datagrams from other addresses; a datagram
    whose originate timestamp does not echo our transmit timestamp (a spoof, or a stale reply)
    is ignored and we keep waiting.  If only such datagrams came, the deadline raises
    NtpBadReply rather than NtpTimeout, since something did answer.

    Raises NtpTimeout, NtpNetworkError, NtpBadReply(reason) or KissOfDeath(code)."""
    server = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        family, socktype, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as e:
        raise NtpNetworkError(f"{server}: cannot resolve: {e}") from e
    ignored: str | None = None
    try:
        with socket.socket(family, socktype, proto) as sock:
            sock.connect(addr)
            t1 = wall()
            tx = (_to_ntp(t1) & ~((1 << _NONCE_BITS) - 1)) | secrets.randbits(_NONCE_BITS)
            tx = tx or 1  # a zero transmit timestamp would match a careless zero originate
            # LI 0, version 4, mode 3 (client); every other field zero but the transmit stamp.
            first = (0 << 6) | (4 << 3) | MODE_CLIENT
            sock.send(_PACKET.pack(first, 0, 0, 0, 0, 0, b"\0" * 4, 0, 0, 0, tx))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if ignored is not None:
                        raise NtpBadReply(f"{server}: no valid reply: {ignored}")
                    raise NtpTimeout(f"{server}: no reply within {timeout_s} s")
                sock.settimeout(remaining)
                try:
                    data = sock.recv(1024)
                except socket.timeout:
                    continue  # the loop head turns it into the right exception
                t4 = wall()
                if len(data) < _PACKET.size:
                    ignored = f"short packet ({len(data)} bytes)"
                    continue
                if _PACKET.unpack_from(data)[8] != tx:
                    ignored = "originate timestamp does not echo our transmit timestamp"
                    continue
                return _check_reply(data, server, tx, t1, t4)
    except NtpError:
        raise
    except OSError as e:
        raise NtpNetworkError(f"{server}: {e}") from e


def probe(
    host: str,
    port: int = NTP_PORT,
    samples: int = 4,
    timeout_s: float = 1.0,
    *,
    spacing_s: float = 2.0,
    wall: Callable[[], float] = time.time,
) -> NtpSample:
    """Query `samples` times and return the sample with the smallest round-trip delay.

    The least-delayed exchange has the least room for asymmetric queueing, so its offset is the
    most trustworthy (NTP's clock filter keeps the same one).  `spacing_s` between queries is
    2 s by default, like ntpd's iburst: public servers answer faster bursts with RATE.
    Blocks up to about samples * (timeout_s + spacing_s).

    A kiss-o'-death is raised at once (asking again is what it forbids).  Other failures are
    tolerated while at least one query succeeds; if none does, the last error is raised."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    best: NtpSample | None = None
    last_error: NtpError | None = None
    for i in range(samples):
        if i and spacing_s > 0:
            time.sleep(spacing_s)
        try:
            s = sntp_query(host, port, timeout_s, wall=wall)
        except KissOfDeath:
            raise
        except NtpError as e:
            last_error = e
            continue
        if best is None or s.delay_s < best.delay_s:
            best = s
    if best is None:
        assert last_error is not None
        raise last_error
    return best


def _parse_server(spec: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(spec, tuple):
        return spec[0], int(spec[1])
    if spec.startswith("["):  # [::1]:123
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else NTP_PORT
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, NTP_PORT


@dataclasses.dataclass
class _ServerState:
    host: str
    port: int
    interval_s: float
    next_due: float = 0.0  # monotonic seconds
    state: str = "pending"  # pending | ok | error | denied
    sample: NtpSample | None = None
    sample_at: float = 0.0  # monotonic seconds when `sample` was taken
    last_error: str | None = None
    kiss: str | None = None
    polls: int = 0


class NtpMonitor:
    """Polls NTP servers in a background thread and keeps this host's offset from UTC.

    Each server is asked once per `interval_s` (one SNTP exchange, or `samples` with the
    least-delayed kept).  Its latest sample gives the interval offset +/- error, the error
    growing by PHI (15 ppm) per second of the sample's age; `offset_ms`/`error_ms` are
    Marzullo's agreement over the servers' intervals (midpoint and half-width), so one wrong
    server among three is outvoted.

    Kiss-o'-death: DENY and RSTR disable that server for good (logged as a warning); RATE
    doubles its interval, capped at `max_interval_s`.  Other kiss codes and failures count as
    a failed poll; the previous sample is kept and ages.

    Thread-safety: all public methods may be called from any thread.  `poll_once()` runs the
    queries on the caller's thread and blocks for them; `start()` runs the same loop on a daemon
    thread until `stop()`.  `monotonic` schedules polls and ages samples; `wall` is the clock
    being measured.
    """

    def __init__(
        self,
        servers: Iterable[str | tuple[str, int]],
        interval_s: float = 64.0,
        *,
        samples: int = 1,
        timeout_s: float = 1.0,
        max_interval_s: float = 1024.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._servers = [
            _ServerState(host, port, interval_s) for host, port in map(_parse_server, servers)
        ]
        if not self._servers:
            raise ValueError("NtpMonitor needs at least one server")
        self.interval_s = interval_s
        self.samples = samples
        self.timeout_s = timeout_s
        self.max_interval_s = max(max_interval_s, interval_s)
        self._wall = wall
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- polling ------------------------------------------------------------------------------

    def poll_once(self, force: bool = False) -> int:
        """Poll every enabled server that is due (all enabled ones if `force`).  Blocks.

        Returns the number of servers polled."""
        now = self._monotonic()
        with self._lock:
            due = [
                s for s in self._servers if s.state != "denied" and (force or s.next_due <= now)
            ]
        for s in due:
            self._poll(s)
        return len(due)

    def _poll(self, s: _ServerState) -> None:
        # The query runs without the lock held, so status() never waits on the network.
        try:
            sample = probe(
                s.host, s.port, self.samples, self.timeout_s, spacing_s=0.0, wall=self._wall
            )
            error: NtpError | None = None
        except NtpError as e:
            sample, error = None, e
        now = self._monotonic()
        with self._lock:
            s.polls += 1
            if sample is not None:
                s.state, s.sample, s.sample_at, s.last_error = "ok", sample, now, None
            elif isinstance(error, KissOfDeath) and error.code in ("DENY", "RSTR"):
                s.state, s.kiss, s.last_error = "denied", error.code, str(error)
                log.warning(
                    "NTP server %s:%d sent kiss-o'-death %s; it will not be asked again",
                    s.host, s.port, error.code,
                )
            elif isinstance(error, KissOfDeath) and error.code == "RATE":
                s.kiss, s.last_error = error.code, str(error)
                s.interval_s = min(s.interval_s * 2, self.max_interval_s)
                log.info(
                    "NTP server %s:%d asks us to slow down (RATE); interval now %.0f s",
                    s.host, s.port, s.interval_s,
                )
            else:
                # The previous sample (if any) still counts, with its error growing by age.
                s.state, s.last_error = "error", str(error)
                if isinstance(error, KissOfDeath):
                    s.kiss = error.code
                log.info("NTP poll of %s:%d failed: %s", s.host, s.port, error)
            s.next_due = now + s.interval_s

    def start(self) -> None:
        """Start the background polling thread (idempotent).  Does not block."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ntp-monitor", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float | None = 5.0) -> None:
        """Stop the background thread and wait up to `timeout_s` for it (an in-flight query
        finishes first, so allow `timeout_s` of the monitor)."""
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(timeout_s)

    def __enter__(self) -> NtpMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                # A bug must not silently end monitoring; NtpErrors never get here.
                log.exception("NTP monitor poll failed")
            with self._lock:
                enabled = [s.next_due for s in self._servers if s.state != "denied"]
            if not enabled:
                log.warning("NTP monitor: every server refused service; polling stopped")
                return
            # At least a short pause, so a persistent bug above cannot spin the CPU.
            self._stop.wait(max(min(enabled) - self._monotonic(), 0.05))

    # --- results ------------------------------------------------------------------------------

    def _intervals_ms(self, now: float) -> list[tuple[float, float]]:
        out = []
        for s in self._servers:
            if s.sample is None or s.state == "denied":
                continue
            err = s.sample.error_ms + PHI * (now - s.sample_at) * 1000.0
            out.append((s.sample.offset_ms - err, s.sample.offset_ms + err))
        return out

    def _estimate(self) -> tuple[float, float, int] | None:
        with self._lock:
            intervals = self._intervals_ms(self._monotonic())
        if not intervals:
            return None
        lo, hi, count = marzullo(intervals)
        return (lo + hi) / 2, (hi - lo) / 2, count

    @property
    def offset_ms(self) -> float | None:
        """How far UTC (as the servers agree on it) is ahead of our wall clock; None before the
        first sample."""
        est = self._estimate()
        return None if est is None else est[0]

    @property
    def error_ms(self) -> float | None:
        """Bound on the error of `offset_ms`; None before the first sample."""
        est = self._estimate()
        return None if est is None else est[1]

    def exceeds(self, max_offset_ms: float) -> bool:
        """True when our clock may be more than `max_offset_ms` from UTC, i.e. the offset plus
        its error bound passes it.  False while there is no sample (unknown is not a warning
        here; `status()` shows it)."""
        est = self._estimate()
        return est is not None and abs(est[0]) + est[1] > max_offset_ms

    def status(self) -> dict:
        """A JSON-ready snapshot for `raftpay status`."""
        now = self._monotonic()
        with self._lock:
            intervals = self._intervals_ms(now)
            servers = {}
            for s in self._servers:
                d: dict = {
                    "state": s.state,
                    "interval_s": s.interval_s,
                    "polls": s.polls,
                    "kiss": s.kiss,
                    "last_error": s.last_error,
                }
                if s.sample is not None:
                    d.update(
                        offset_ms=s.sample.offset_ms,
                        delay_ms=s.sample.delay_ms,
                        error_ms=s.sample.error_ms + PHI * (now - s.sample_at) * 1000.0,
                        stratum=s.sample.stratum,
                        refid=s.sample.refid,
                        age_s=now - s.sample_at,
                    )
                servers[f"{s.host}:{s.port}"] = d
        offset = error = None
        agreeing = 0
        if intervals:
            lo, hi, agreeing = marzullo(intervals)
            offset, error = (lo + hi) / 2, (hi - lo) / 2
        return {
            "offset_ms": offset,
            "error_ms": error,
            "agreeing": agreeing,
            "sources": len(intervals),
            "servers": servers,
        }


# --------------------------------------------------------------------------------------------
# Peer clocks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerSample:
    """A peer's clock relative to ours, in ms: the peer reads our time + offset_ms, give or
    take bound_ms (half the round trip of the exchange that measured it)."""

    offset_ms: float
    bound_ms: float
    taken_at: float  # monotonic seconds


@dataclasses.dataclass(frozen=True)
class ClusterOffset:
    """Marzullo's answer over the peers and ourselves: the time `count` of `sources` clocks
    agree on lies in [lo_ms, hi_ms], relative to our clock."""

    lo_ms: float
    hi_ms: float
    count: int
    sources: int

    @property
    def offset_ms(self) -> float:
        """The cluster's estimate of the time, relative to ours (the midpoint)."""
        return (self.lo_ms + self.hi_ms) / 2

    @property
    def majority(self) -> bool:
        return 2 * self.count > self.sources


class ClockGuard:
    """Watches whether this node's wall clock agrees with its peers'.

    Samples come from ping/pong exchanges: we send at t1 (our clock), the peer reads its clock
    t_remote, we receive the pong at t4.  The peer read its clock somewhere in [t1, t4] of ours,
    so its offset lies in t_remote - t4 .. t_remote - t1: the midpoint +/- half the round trip.
    The latest sample per peer is kept for `sample_ttl_s`; a peer gone silent stops voting.

    Healthy clocks are not equal, only close: a loopback round trip bounds a measurement to a
    few microseconds while NTP-disciplined clocks differ by milliseconds, so raw intervals of
    healthy peers would rarely overlap.  Every interval, our own (0, 0) included, is therefore
    widened by `tolerance_ms` each side (default max_offset_ms / 2: clocks each within that of
    the true time are within max_offset_ms of each other, and then their intervals overlap).
    `cluster_offset()` is Marzullo over those intervals.

    `ok()` is False only when a strict majority of the cluster (ourselves included) agrees on a
    time more than `max_offset_ms` from ours: we are provably the odd one out.  Without a
    majority nobody can tell who is wrong, and stepping every leader down would only stop the
    cluster.

    Thread-safe (a lock); never blocks.  Times are milliseconds of any one local clock.
    """

    def __init__(
        self,
        max_offset_ms: float,
        *,
        tolerance_ms: float | None = None,
        sample_ttl_s: float | None = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_offset_ms <= 0:
            raise ValueError("max_offset_ms must be > 0")
        self.max_offset_ms = max_offset_ms
        self.tolerance_ms = max_offset_ms / 2 if tolerance_ms is None else tolerance_ms
        self.sample_ttl_s = sample_ttl_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._samples: dict[object, PeerSample] = {}

    def add_sample(
        self, peer: object, t1_local_send: float, t_remote: float, t4_local_recv: float
    ) -> tuple[float, float]:
        """Record one ping/pong sample (replacing the peer's previous one); returns
        `(offset_ms, bound_ms)` of the peer's clock relative to ours.

        Raises ValueError when t4 < t1 (our clock stepped back mid-exchange: the sample says
        nothing)."""
        if t4_local_recv < t1_local_send:
            raise ValueError("t4_local_recv is before t1_local_send")
        bound = (t4_local_recv - t1_local_send) / 2
        offset = t_remote - (t1_local_send + t4_local_recv) / 2
        with self._lock:
            self._samples[peer] = PeerSample(offset, bound, self._monotonic())
        return offset, bound

    def remove_peer(self, peer: object) -> None:
        with self._lock:
            self._samples.pop(peer, None)

    def peers(self) -> dict[object, PeerSample]:
        """The live (unexpired) samples by peer."""
        now = self._monotonic()
        with self._lock:
            return {
                p: s
                for p, s in self._samples.items()
                if self.sample_ttl_s is None or now - s.taken_at <= self.sample_ttl_s
            }

    def cluster_offset(self) -> ClusterOffset:
        """Marzullo over the live peer samples and ourselves.  Deterministic for given samples."""
        tol = self.tolerance_ms
        intervals = [(-tol, tol)] + [
            (s.offset_ms - s.bound_ms - tol, s.offset_ms + s.bound_ms + tol)
            for s in self.peers().values()
        ]
        lo, hi, count = marzullo(intervals)
        return ClusterOffset(lo, hi, count, len(intervals))

    def ok(self) -> bool:
        """False when a majority agrees on a time further than `max_offset_ms` from ours."""
        est = self.cluster_offset()
        return not (est.majority and abs(est.offset_ms) > self.max_offset_ms)

    def suspects(self) -> list[object]:
        """Peers whose clock is, beyond measurement error, more than `max_offset_ms` from the
        time a majority agrees on (empty without a majority).  Sorted by repr."""
        est = self.cluster_offset()
        if not est.majority:
            return []
        return sorted(
            (
                p
                for p, s in self.peers().items()
                if abs(s.offset_ms - est.offset_ms) - s.bound_ms > self.max_offset_ms
            ),
            key=repr,
        )
